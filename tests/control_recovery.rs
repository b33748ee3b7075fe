//! A member killed with SIGKILL and restarted catches up from its redb files; one that is
//! far behind after the others snapshot and purge their logs catches up by installing a
//! snapshot. Either way its history ends identical to the others'. One stopped with
//! SIGTERM exits by itself.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_member_catches_up_from_redb_and_from_a_snapshot() {
    // A small snapshot threshold is not needed: the test forces snapshots itself.
    let mut c = Cluster::start(3, &[]).await;
    c.add_repo(1, "acme/web").await;
    c.queue_builds(1, 0, 50).await;
    let leader = c.leader().await.expect("leader");
    let follower = if leader == 3 { 2 } else { 3 };

    // 1. Kill a follower, write while it is down, restart it: it recovers from its own
    //    redb files and the leader's log.
    let before = c.status(follower).await.expect("follower status");
    c.kill(follower).await;
    c.queue_builds(leader, 50, 80).await;
    c.spawn(follower).await;
    c.wait_until(
        "the restarted member answers",
        Duration::from_secs(20),
        async |c| c.status(follower).await.is_some(),
    )
    .await;
    // Right after the restart, before the leader has sent anything, the member already has
    // its log and most of its state from redb. (The state machine's last batch may be
    // re-applied: its writes are made durable by the next log fsync, not by their own.)
    let restarted = c.status(follower).await.expect("follower status");
    eprintln!("before kill: {before:?}\nafter restart: {restarted:?}");
    assert!(
        restarted.last_log_index >= before.last_log_index,
        "restart lost log entries"
    );
    assert!(
        restarted.last_applied.unwrap_or(0) > 0,
        "restart lost the applied state"
    );
    let after_restart = restarted.last_applied;
    c.wait_caught_up(follower, leader).await;
    c.assert_same_history(leader, follower).await;

    // 2. Kill it again, write a lot more, then make every live member snapshot and purge
    //    its log past the entries the dead one lacks. It can only catch up by snapshot.
    c.kill(follower).await;
    c.queue_builds(leader, 80, 280).await;
    for id in c.alive() {
        let snap = c.force_snapshot(id).await;
        eprintln!("member {id} snapshot: {snap}");
    }
    // The purge itself runs in the background once the snapshot is in place.
    c.wait_until(
        "the leader purged its log",
        Duration::from_secs(20),
        async |c| {
            c.status(leader)
                .await
                .is_some_and(|s| s.purged_index.is_some())
        },
    )
    .await;
    let st = c.status(leader).await.expect("leader status");
    let purged = st.purged_index.unwrap_or(0);
    let behind = c
        .status(leader)
        .await
        .and_then(|s| s.last_applied)
        .unwrap_or(0);
    assert!(
        purged > after_restart.unwrap_or(0),
        "purge did not pass the dead member's position"
    );
    eprintln!("leader purged up to {purged}, last applied {behind}");

    c.spawn(follower).await;
    c.wait_caught_up(follower, leader).await;
    let fs = c.status(follower).await.expect("follower status");
    assert!(
        fs.snapshot_index.is_some_and(|s| s >= purged),
        "follower did not install a snapshot: {fs:?}"
    );
    c.assert_same_history(leader, follower).await;
    let builds = c.builds_local(follower).await;
    assert_eq!(builds.len(), 280);

    // 3. And it survives one more restart with the snapshot as its base.
    c.kill(follower).await;
    c.spawn(follower).await;
    c.wait_caught_up(follower, leader).await;
    c.assert_same_history(leader, follower).await;

    // 4. Stopped as systemd stops it, with SIGTERM, it exits by itself and comes back.
    let exited = c
        .members
        .stop(follower, Duration::from_secs(30))
        .await
        .expect("stop");
    assert!(
        exited,
        "member {follower} did not exit on SIGTERM within 30 s"
    );
    c.spawn(follower).await;
    c.wait_caught_up(follower, leader).await;
    c.assert_same_history(leader, follower).await;

    // `starling cluster remove`: the follower leaves the voters; the other two go on.
    let r = c
        .http
        .delete(format!("{}/v1/cluster/members/{follower}", c.url(follower)))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("remove");
    assert_eq!(r.status().as_u16(), 200);
    let st = c.status(leader).await.expect("status");
    assert_eq!(st.members.len(), 2, "{st:?}");
    assert!(st.members.iter().all(|m| m.id != follower));
    let r = c
        .post(
            leader,
            "/v1/trigger",
            &serde_json::json!({"repo": "acme/web", "sha": sha_of(999)}),
        )
        .await;
    assert_eq!(r.status().as_u16(), 201);
}
