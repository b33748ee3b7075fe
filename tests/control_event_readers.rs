//! A crowd replaying the event log cannot starve Raft: 200 server-sent-event clients
//! replaying a 10,000-event log from the start, while writes go on, cost the leader neither
//! its leadership nor its writes, and every one of them is served.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;

const EVENTS: u64 = 10_000;
/// Events each reader takes before it hangs up (all 200 reading everything would only make
/// the test longer).
const READ: u64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_replays_do_not_starve_raft() {
    let c = Cluster::start(3, &[]).await;
    c.add_repo(1, "acme/web").await;
    let leader = c.leader().await.expect("leader");
    let url = c.url(leader);
    // One event per queued build.
    futures::stream::iter(0..EVENTS)
        .map(|n| {
            let (c, url) = (&c, url.clone());
            async move {
                let (body, sig) = github_push("acme/web", "main", &sha_of(n), SECRET);
                let r = send_github(&c.http, &url, "push", &format!("e-{n}"), body, &sig)
                    .await
                    .expect("webhook");
                assert_eq!(r.status().as_u16(), 201);
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    let term = c.status(leader).await.expect("status").term;

    // 200 replays from the start, each reading as fast as it can.
    let started = Instant::now();
    let readers: Vec<_> = (0..200)
        .map(|_| {
            let http = c.http.clone();
            let url = format!("{url}/v1/events/stream?after=0");
            tokio::spawn(async move {
                let mut r = http.get(&url).send().await.expect("stream");
                if r.status().as_u16() != 200 {
                    return (r.status().as_u16(), 0);
                }
                let mut seen = 0u64;
                let deadline = Instant::now() + Duration::from_secs(60);
                while seen < READ && Instant::now() < deadline {
                    match tokio::time::timeout(Duration::from_secs(5), r.chunk()).await {
                        Ok(Ok(Some(bytes))) => {
                            seen += bytes.windows(4).filter(|w| w == b"id: ").count() as u64
                        }
                        _ => break,
                    }
                }
                (200, seen)
            })
        })
        .collect();

    // Meanwhile, writes go on and are answered.
    let writes = Instant::now();
    for n in EVENTS..EVENTS + 20 {
        let (body, sig) = github_push("acme/web", "main", &sha_of(n), SECRET);
        let r = send_github(&c.http, &url, "push", &format!("e-{n}"), body, &sig)
            .await
            .expect("webhook");
        assert_eq!(r.status().as_u16(), 201, "a write during the replays");
    }
    eprintln!("20 writes during the replays took {:?}", writes.elapsed());
    for r in readers {
        let (status, seen) = r.await.expect("reader");
        assert_eq!(status, 200, "a reader was refused");
        assert!(seen >= READ, "a stream stopped after {seen} events");
    }
    eprintln!(
        "200 replays of {READ} events each served in {:?}",
        started.elapsed()
    );
    let s = c.status(leader).await.expect("status");
    assert_eq!(
        s.leader,
        Some(leader),
        "leadership moved during the replays"
    );
    assert_eq!(s.term, term, "an election happened during the replays");
}
