//! Bad webhooks, unauthenticated API calls and garbage or unauthenticated Raft RPC get a
//! clear error and leave the Raft log and the event log exactly as they were.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// (last log index, events) on every member.
async fn fingerprint(c: &Cluster) -> Vec<(Option<u64>, usize)> {
    let mut v = Vec::new();
    for id in 1..=3 {
        let s = c.status(id).await.expect("status");
        v.push((s.last_log_index, c.events_local(id).await.len()));
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_changes_nothing() {
    let c = Cluster::start(3, &[]).await;
    c.add_repo(1, "acme/web").await;
    // A good delivery first, so that there is something to duplicate.
    let sha = sha_of(1);
    let (body, sig) = github_push("acme/web", "main", &sha, SECRET);
    let r = send_github(&c.http, &c.url(2), "push", "good-1", body.clone(), &sig)
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let leader = c.leader().await.expect("leader");
    for id in 1..=3 {
        c.wait_caught_up(id, leader).await;
    }
    let before = fingerprint(&c).await;

    let mut cases: Vec<(String, u16, u16)> = Vec::new(); // (case, want, got)
    let mut check = |name: &str, want: u16, got: u16| cases.push((name.to_string(), want, got));

    for id in 1..=3u64 {
        let url = c.url(id);
        let h = &c.http;
        // Wrong signature, no signature.
        let r = send_github(
            h,
            &url,
            "push",
            "bad-sig",
            body.clone(),
            &sign("wrong", &body),
        )
        .await
        .unwrap();
        check("bad signature", 401, r.status().as_u16());
        let r = h
            .post(format!("{url}/hooks/github"))
            .header("X-GitHub-Event", "push")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        check("missing signature", 401, r.status().as_u16());
        // Malformed body (signed, so it is the body that is wrong).
        let junk = b"{\"repository\":{\"full_name\":\"acme/web\"},\"ref\":12}".to_vec();
        let r = send_github(h, &url, "push", "junk", junk.clone(), &sign(SECRET, &junk))
            .await
            .unwrap();
        check("malformed payload", 400, r.status().as_u16());
        let r = send_github(
            h,
            &url,
            "push",
            "junk2",
            b"not json".to_vec(),
            &sign(SECRET, b"not json"),
        )
        .await
        .unwrap();
        check("not json", 400, r.status().as_u16());
        // Oversize body.
        let big = vec![b' '; 1024 * 1024 + 10];
        let r = send_github(h, &url, "push", "big", big.clone(), &sign(SECRET, &big))
            .await
            .unwrap();
        check("oversize body", 413, r.status().as_u16());
        // Unknown repository.
        let (b2, s2) = github_push("nobody/nothing", "main", &sha_of(9), SECRET);
        let r = send_github(h, &url, "push", "unknown", b2, &s2)
            .await
            .unwrap();
        check("unknown repository", 404, r.status().as_u16());
        // Another branch, a tag, a deletion: accepted and ignored.
        let (b3, s3) = github_push("acme/web", "feature", &sha_of(10), SECRET);
        let r = send_github(h, &url, "push", "other-branch", b3, &s3)
            .await
            .unwrap();
        check("push to another branch", 202, r.status().as_u16());
        let tag = json!({"ref": "refs/tags/v1", "after": sha_of(11), "repository": {"full_name": "acme/web"}}).to_string().into_bytes();
        let r = send_github(h, &url, "push", "tag", tag.clone(), &sign(SECRET, &tag))
            .await
            .unwrap();
        check("tag push", 202, r.status().as_u16());
        let del = json!({"ref": "refs/heads/main", "after": "0".repeat(40), "deleted": true, "head_commit": null, "repository": {"full_name": "acme/web"}}).to_string().into_bytes();
        let r = send_github(h, &url, "push", "delete", del.clone(), &sign(SECRET, &del))
            .await
            .unwrap();
        check("branch deletion", 202, r.status().as_u16());
        let r = send_github(h, &url, "ping", "ping", body.clone(), &sig)
            .await
            .unwrap();
        check("ping", 200, r.status().as_u16());
        // Redelivery and a new delivery of the same commit: no second build.
        let r = send_github(h, &url, "push", "good-1", body.clone(), &sig)
            .await
            .unwrap();
        check("redelivery", 200, r.status().as_u16());
        let r = send_github(h, &url, "push", &format!("again-{id}"), body.clone(), &sig)
            .await
            .unwrap();
        check("same commit, new delivery", 200, r.status().as_u16());
        // GitLab with a wrong token.
        let gl = json!({"ref": "refs/heads/main", "after": sha_of(12), "project": {"path_with_namespace": "acme/web"}}).to_string();
        let r = h
            .post(format!("{url}/hooks/gitlab"))
            .header("X-Gitlab-Event", "Push Hook")
            .header("X-Gitlab-Token", "nope")
            .body(gl)
            .send()
            .await
            .unwrap();
        check("gitlab wrong token", 401, r.status().as_u16());
        // Mutating API without the token.
        let r = h
            .post(format!("{url}/v1/repos"))
            .json(&json!({"name": "x/y", "url": "u"}))
            .send()
            .await
            .unwrap();
        check("repos add without token", 401, r.status().as_u16());
        let r = h
            .post(format!("{url}/v1/trigger"))
            .bearer_auth("wrong")
            .json(&json!({"repo": "acme/web", "sha": "abc"}))
            .send()
            .await
            .unwrap();
        check("trigger with a wrong token", 401, r.status().as_u16());
        // Raft RPC: no key, wrong key, garbage with the right key.
        let append = json!({"vote": {"leader_id": {"term": 99, "node_id": 7}, "committed": true}, "prev_log_id": null, "entries": [], "leader_commit": null});
        let r = h
            .post(format!("{url}/raft/append"))
            .json(&append)
            .send()
            .await
            .unwrap();
        check("raft append without key", 401, r.status().as_u16());
        let r = h.post(format!("{url}/raft/vote")).header("x-starling-cluster-key", "wrong-key-wrong-key").json(&json!({"vote": {"leader_id": {"term": 99, "node_id": 7}, "committed": false}, "last_log_id": null})).send().await.unwrap();
        check("raft vote with a wrong key", 401, r.status().as_u16());
        let r = h
            .post(format!("{url}/raft/append"))
            .header("x-starling-cluster-key", CLUSTER_KEY)
            .header("x-starling-raft-protocol", "1")
            .body("\u{0}garbage{{{")
            .send()
            .await
            .unwrap();
        check("raft append garbage", 400, r.status().as_u16());
        let r = h
            .post(format!("{url}/raft/vote"))
            .header("x-starling-cluster-key", CLUSTER_KEY)
            .header("x-starling-raft-protocol", "99")
            .body(vec![0u8; 8])
            .send()
            .await
            .unwrap();
        check(
            "raft vote, unknown protocol version",
            400,
            r.status().as_u16(),
        );
        let r = h
            .post(format!("{url}/raft/snapshot"))
            .header("x-starling-cluster-key", CLUSTER_KEY)
            .header("content-type", "application/json")
            .body("[1,2,3]")
            .send()
            .await
            .unwrap();
        check("raft snapshot garbage", 400, r.status().as_u16());
        let r = h
            .post(format!("{url}/internal/join"))
            .json(&json!({"id": 9, "addr": "127.0.0.1:1"}))
            .send()
            .await
            .unwrap();
        check("join without key", 401, r.status().as_u16());
    }

    // A correct GitLab push is accepted once; the same event UUID again is not a new build.
    let gl = json!({"ref": "refs/heads/main", "after": sha_of(13), "project": {"path_with_namespace": "acme/web"}}).to_string();
    for (attempt, want) in [(1, 201), (2, 200)] {
        let r = c
            .http
            .post(format!("{}/hooks/gitlab", c.url(attempt)))
            .header("X-Gitlab-Event", "Push Hook")
            .header("X-Gitlab-Token", SECRET)
            .header("X-Gitlab-Event-UUID", "gl-uuid-1")
            .body(gl.clone())
            .send()
            .await
            .unwrap();
        check("gitlab push", want, r.status().as_u16());
    }

    let wrong: Vec<_> = cases.iter().filter(|(_, want, got)| want != got).collect();
    assert!(
        wrong.is_empty(),
        "unexpected answers (case, want, got): {wrong:?}"
    );
    // Every request was answered, so any write one made is in the leader's log by now:
    // once every member has applied all of it, compare.
    for id in 1..=3 {
        c.wait_caught_up(id, leader).await;
    }
    let after = fingerprint(&c).await;
    // The one good GitLab push added one entry and two events (queued) on every member.
    let expected: Vec<_> = before
        .iter()
        .map(|(idx, ev)| (idx.map(|i| i + 1), ev + 1))
        .collect();
    assert_eq!(after, expected, "bad input changed the log");
    let builds = c.builds_local(1).await;
    assert_eq!(builds.len(), 2);
    assert_eq!(builds[0].trigger, "gitlab");
    let st = c.status(1).await.unwrap();
    assert_eq!(st.members.len(), 3, "membership changed");
}

/// Credentials are checked from the headers before any body is read: a request announcing
/// a 1 GiB body without the cluster key (or a 60 MB manifest without the token) is refused
/// at once, though the body never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_checked_before_bodies() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = Cluster::start(1, &[]).await;
    let addr = c.url(1).trim_start_matches("http://").to_string();
    for (method, path, length) in [
        ("POST", "/raft/append", 1u64 << 30),
        ("POST", "/raft/snapshot", 1 << 30),
        (
            "PUT",
            &format!("/v1/manifests/{}", "a".repeat(64)),
            60_000_000,
        ),
        ("PUT", &format!("/v1/chunks/{}", "a".repeat(64)), 8_000_000),
    ] {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head =
            format!("{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {length}\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&[0u8; 1024]).await.unwrap();
        let mut answer = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no answer while the body is missing"))
            .unwrap();
        let text = String::from_utf8_lossy(&answer[..n]);
        assert!(text.starts_with("HTTP/1.1 401"), "{method} {path}: {text}");
    }
}
