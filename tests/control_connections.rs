//! A crowd of idle connections cannot take a member down: idle ones are closed, the
//! connection count is bounded (so file descriptors never run out), and Raft traffic and
//! forwarded writes still get through while client connections are all taken.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncReadExt;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Let this test process hold its 1,000 sockets whatever the machine's default limit.
fn raise_own_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < 4096 {
            lim.rlim_cur = lim.rlim_max.min(4096);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_are_bounded_and_closed() {
    raise_own_fd_limit();
    let c = Cluster::start(3, &["--max-connections", "64", "--idle-timeout", "3s"]).await;
    c.add_repo(1, "acme/web").await;
    let leader = c.leader().await.expect("leader");
    let follower = if leader == 1 { 2 } else { 1 };
    let term = c.status(leader).await.expect("status").term;
    let pid = c.members.pid(leader).expect("pid");
    let addr = c.members.addr(leader);

    // 1,000 connections that never send a byte.
    let mut idle = Vec::new();
    for _ in 0..1000 {
        if let Ok(s) = tokio::net::TcpStream::connect(&addr).await {
            idle.push(s);
        }
    }
    assert!(idle.len() > 500, "could not open the idle connections");
    // The member holds at most its limit (plus the reserve for members), not all of them.
    c.wait_until(
        "the leader sheds connections",
        Duration::from_secs(10),
        async |_| open_fds(pid) < 400,
    )
    .await;

    // Writes forwarded by a follower carry the cluster key and still reach the leader.
    c.queue_builds(follower, 0, 5).await;

    // Idle connections are closed by the member.
    let start = Instant::now();
    let mut closed = 0;
    for s in idle.iter_mut().take(20) {
        let mut buf = [0u8; 64];
        let left = Duration::from_secs(30).saturating_sub(start.elapsed());
        if let Ok(Ok(0)) = tokio::time::timeout(left, s.read(&mut buf)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 20, "idle connections were left open");
    drop(idle);

    // No election happened, and ordinary clients are served again.
    let s = c.status(leader).await.expect("the leader answers");
    assert_eq!(s.leader, Some(leader));
    assert_eq!(s.term, term, "the crowd cost the leader its leadership");
    let r = c.get(&format!("{}/healthz", c.url(leader))).await;
    assert_eq!(r.status().as_u16(), 200);
}
