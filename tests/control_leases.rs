//! The worker lease API and the lease reaper: a worker that leases a build and stops
//! heartbeating loses it; the build is queued again with attempt+1, and after the last
//! attempt it is `failed` with the reason `worker lost`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use starling_proto::{Build, BuildStatus, Lease};

async fn lease(c: &Cluster, via: u64, worker: &str) -> Lease {
    let r = c
        .post(
            via,
            "/v1/leases",
            &json!({"worker": worker, "wait_ms": 5000}),
        )
        .await;
    assert_eq!(r.status().as_u16(), 200, "lease");
    r.json().await.expect("lease json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lapsed_leases_requeue_then_fail() {
    let c = Cluster::start(3, &["--lease-ttl", "1s", "--max-attempts", "2"]).await;
    c.add_repo(1, "acme/web").await;

    // A follower streams the event log (SSE) from the start and as it grows.
    let mut sse = c
        .http
        .get(format!("{}/v1/events/stream?after=0", c.url(3)))
        .send()
        .await
        .expect("sse");
    assert_eq!(
        sse.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );

    // Nothing queued: a short long-poll answers 204.
    let r = c
        .post(3, "/v1/leases", &json!({"worker": "w0", "wait_ms": 300}))
        .await;
    assert_eq!(r.status().as_u16(), 204);

    // A worker long-polling through a follower gets the build queued meanwhile.
    let waiting = {
        let http = c.http.clone();
        let url = c.url(3);
        tokio::spawn(async move {
            http.post(format!("{url}/v1/leases"))
                .bearer_auth(TOKEN)
                .json(&json!({"worker": "w1", "wait_ms": 10000}))
                .send()
                .await
                .expect("lease")
        })
    };
    // It waits on the leader, which counts it.
    let leader = c.leader().await.expect("leader");
    c.wait_until(
        "the lease request waits",
        Duration::from_secs(10),
        async |c| {
            let text = c
                .get(&format!("{}/metrics", c.url(leader)))
                .await
                .text()
                .await;
            text.is_ok_and(|t| t.lines().any(|l| l == "starling_lease_waiters 1"))
        },
    )
    .await;
    let r = c
        .post(
            2,
            "/v1/trigger",
            &json!({"repo": "acme/web", "sha": sha_of(1)}),
        )
        .await;
    assert_eq!(r.status().as_u16(), 201);
    let r = waiting.await.expect("long-poll task");
    assert_eq!(r.status().as_u16(), 200);
    let l1: Lease = r.json().await.expect("lease json");
    assert_eq!((l1.build.status, l1.attempt), (BuildStatus::Running, 1));
    let id = l1.build.id;

    let mut seen = String::new();
    while !seen.contains("event: build:started") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), sse.chunk())
            .await
            .expect("an SSE event within 5 s")
            .expect("sse chunk")
            .expect("stream open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    for kind in ["repo:put", "build:queued", "build:started"] {
        assert!(
            seen.contains(&format!("event: {kind}")),
            "no {kind} in {seen}"
        );
    }
    drop(sse);

    // Heartbeats keep it alive past the TTL.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = c
            .post(
                1,
                &format!("/v1/builds/{id}/heartbeat"),
                &json!({"worker": "w1", "attempt": 1}),
            )
            .await;
        assert_eq!(r.status().as_u16(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["cancel"], json!(false));
    }
    assert_eq!(c.build(2, id).await.status, BuildStatus::Running);

    // w1 goes silent: the reaper puts the build back with attempt 2.
    c.wait_until(
        "the lease lapsed and the build was requeued",
        Duration::from_secs(10),
        async |c| {
            let b = c.build(2, id).await;
            b.status == BuildStatus::Queued && b.attempt == 2
        },
    )
    .await;
    let b = c.build(2, id).await;
    assert!(
        b.reason.as_deref().unwrap_or("").contains("worker lost"),
        "{b:?}"
    );
    // The lost worker can neither renew nor complete.
    let r = c
        .post(
            1,
            &format!("/v1/builds/{id}/heartbeat"),
            &json!({"worker": "w1", "attempt": 1}),
        )
        .await;
    assert_eq!(r.status().as_u16(), 409);
    let r = c
        .post(
            1,
            &format!("/v1/builds/{id}/complete"),
            &json!({"worker": "w1", "attempt": 1, "status": "succeeded", "release": starling_proto::ReleaseId::of(b"r")}),
        )
        .await;
    assert_eq!(r.status().as_u16(), 409);

    // Second (last) attempt, also abandoned: failed, worker lost.
    let l2 = lease(&c, 2, "w2").await;
    assert_eq!((l2.build.id, l2.attempt), (id, 2));
    c.wait_until("the build failed", Duration::from_secs(10), async |c| {
        c.build(2, id).await.status == BuildStatus::Failed
    })
    .await;
    let b = c.build(2, id).await;
    assert!(
        b.reason.as_deref().unwrap_or("").contains("worker lost"),
        "{b:?}"
    );
    assert!(b.finished_at.is_some());
    use BuildStatus::*;
    assert_eq!(
        trail(&b),
        vec![
            (Queued, 1, None),
            (Running, 1, Some("w1".into())),
            (Queued, 2, None),
            (Running, 2, Some("w2".into())),
            (Failed, 2, Some("w2".into())),
        ]
    );
    // Never running without a live lease: nothing is left running.
    let running: Vec<Build> = c
        .get_json(&format!("{}/v1/builds?status=running", c.url(1)))
        .await;
    assert!(running.is_empty());

    // A worker that finishes in time completes the build normally.
    let r = c
        .post(
            1,
            "/v1/trigger",
            &json!({"repo": "acme/web", "sha": sha_of(2)}),
        )
        .await;
    assert_eq!(r.status().as_u16(), 201);
    let l3 = lease(&c, 1, "w3").await;
    let complete = |release: String| json!({"worker": "w3", "attempt": l3.attempt, "status": "succeeded", "release": release});
    let path = format!("/v1/builds/{}/complete", l3.build.id);
    // A release id is a digest: anything else is refused before it reaches the log.
    let r = c.post(3, &path, &complete("rel-1".into())).await;
    assert_eq!(r.status().as_u16(), 422, "a release id that is no digest");
    let release = starling_proto::ReleaseId::of(b"rel-1");
    let r = c.post(3, &path, &complete(release.to_string())).await;
    assert_eq!(r.status().as_u16(), 200);
    let b = c.build(2, l3.build.id).await;
    assert_eq!((b.status, b.release), (Succeeded, Some(release)));
}

/// A request sent again with its request id (as a follower does when it re-forwards after
/// a 503) applies once: the same lease, the same forced build, through any member, even
/// after the member that answered first restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_id_makes_retries_apply_once() {
    let mut c = Cluster::start(3, &[]).await;
    c.add_repo(1, "acme/web").await;
    for n in 0..2 {
        let (body, sig) = github_push("acme/web", "main", &sha_of(n), SECRET);
        let r = send_github(&c.http, &c.url(1), "push", &format!("q-{n}"), body, &sig)
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    }
    let send = async |c: &Cluster, via: u64, path: &str, body: Value| -> Value {
        let r = c
            .http
            .post(format!("{}{path}", c.url(via)))
            .bearer_auth(TOKEN)
            .header("x-starling-request-id", "retry-me-1")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        r.json().await.unwrap()
    };
    let lease = json!({"worker": "w1", "wait_ms": 1000});
    let first = send(&c, 2, "/v1/leases", lease.clone()).await;
    let leader = c.leader().await.expect("leader");
    // Restart a member: the window is part of the durable state.
    let other = if leader == 3 { 2 } else { 3 };
    c.kill(other).await;
    c.spawn(other).await;
    c.wait_until("the member is back", Duration::from_secs(20), async |c| {
        c.status(other).await.is_some()
    })
    .await;
    let again = send(&c, other, "/v1/leases", lease).await;
    assert_eq!(first["build"]["id"], again["build"]["id"]);
    let queued: Vec<Build> = c
        .get_json(&format!("{}/v1/builds?status=queued", c.url(1)))
        .await;
    assert_eq!(queued.len(), 1, "the retry leased a second build");
    assert_eq!(first["build"]["status"], "running");
}
