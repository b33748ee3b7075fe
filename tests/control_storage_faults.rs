//! Storage that fails: a member whose state file cannot be written, or whose disk is full,
//! stops (fail-stop) instead of serving on with lost records or a stopped Raft core; the
//! others carry on; once restarted (with room again) it catches up and its history equals
//! the others'.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_state_write_stops_the_member_and_loses_nothing() {
    let mut c = Cluster::start(3, &[]).await;
    c.add_repo(1, "acme/web").await;
    c.queue_builds(1, 0, 10).await;
    let leader = c.leader().await.expect("leader");
    let f = if leader == 3 { 2 } else { 3 };
    // Restart a follower whose state-file writes fail after a few batches.
    c.kill(f).await;
    c.spawn_with(f, &[("STARLING_FAULT_STATE_WRITES_AFTER", "2")])
        .await;
    c.queue_builds(leader, 10, 40).await;
    let status = c.exits_within(f, Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| !s.success()),
        "member {f} went on after its state file could not be written ({status:?})"
    );
    // The other two carry on.
    c.queue_builds(leader, 40, 45).await;
    c.spawn(f).await;
    c.wait_caught_up(f, leader).await;
    c.assert_same_history(leader, f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_disk_stops_the_member_until_restarted() {
    if !Tmpfs::possible() {
        return;
    }
    let mut c = Cluster::start(3, &[]).await;
    c.add_repo(1, "acme/web").await;
    c.queue_builds(1, 0, 5).await;
    let leader = c.leader().await.expect("leader");
    let f = if leader == 3 { 2 } else { 3 };
    // Move the follower's data directory to a 64 MiB disk of its own. (Its files must come
    // along: a member that comes back with an empty log would have lost entries it
    // acknowledged, which Raft forbids.)
    c.kill(f).await;
    let dir = c.data_dir(f);
    let aside = dir.with_extension("aside");
    std::fs::rename(&dir, &aside).unwrap();
    let Some(_mount) = Tmpfs::mount(&dir, "64m") else {
        return;
    };
    copy_tree(&aside, &dir);
    c.spawn(f).await;
    let want = c.status(leader).await.and_then(|s| s.last_log_index);
    c.wait_until(
        "the member caught up",
        Duration::from_secs(60),
        async move |c| c.status(f).await.is_some_and(|s| s.last_applied >= want),
    )
    .await;
    // Fill the disk.
    let filler = dir.join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 1 << 20];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
    }
    // Writes go on through the leader; the full member stops by itself.
    let mut n = 5;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        c.queue_builds(leader, n, n + 5).await;
        n += 5;
        if let Some(s) = c.exits_within(f, Duration::from_millis(200)).await {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
    };
    assert!(
        status.is_some_and(|s| !s.success()),
        "member {f} with a full disk kept running"
    );
    c.queue_builds(leader, n, n + 5).await;
    // Room again: a restart recovers.
    std::fs::remove_file(&filler).unwrap();
    c.spawn(f).await;
    c.wait_caught_up(f, leader).await;
    c.assert_same_history(leader, f).await;
}

/// Copy the files under `from` into `to`, directories and all (the Raft log is `wal/`).
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let kind = e.file_type().unwrap();
        if kind.is_dir() {
            std::fs::create_dir_all(to.join(e.file_name())).unwrap();
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else if kind.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
