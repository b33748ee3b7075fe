//! Rollouts with every part real: three control members, a build worker and `starling
//! node` processes in several regions. A deployment stages its release on every node at
//! once and activates it wave by wave; a region whose nodes fail their health check stops
//! it and every node returns to the release before; a leader killed mid-rollout hands
//! the deployment to the next one, and no wave runs twice.

mod common;

use common::*;
use starling_proto::{AppState, DeployStatus, DeploymentView, NodeInfo, ReleaseId};

/// A repository `acme/app` that rolls out in waves soaking `soak_ms`, stopping at the
/// first failed node, and the worker that builds it.
async fn repo_in_waves(c: &Cluster, soak_ms: u64) -> std::path::PathBuf {
    let work = c.work_tree();
    let rollout = serde_json::json!({"strategy": "waves", "soak_ms": soak_ms, "max_failed_pct": 0});
    c.add_repo_rolling(
        1,
        "acme/app",
        &format!("file://{}", work.display()),
        rollout,
    )
    .await;
    work
}

/// Nodes `names` (`<region>-<n>`), enrolled and announced before anything is deployed, so
/// that the first deployment's waves are planned over all of them.
async fn fleet(c: &Cluster, names: &[&str]) -> Vec<tokio::process::Child> {
    let token = c.join_token().await;
    let children = names
        .iter()
        .map(|n| {
            let region = n.split('-').next().unwrap();
            let env = [("STARLING_JOIN_TOKEN", token.as_str())];
            c.spawn_node(n, region, "acme/app", &format!("{n}.log"), &env)
        })
        .collect();
    c.wait_for_json(1, "/v1/nodes", |n: &Vec<NodeInfo>| n.len() == names.len())
        .await;
    children
}

fn all_run(n: usize, release: ReleaseId) -> impl Fn(&Vec<NodeInfo>) -> bool {
    move |nodes: &Vec<NodeInfo>| {
        nodes.len() == n
            && nodes
                .iter()
                .all(|x| x.release == Some(release) && x.state == AppState::Running)
    }
}

fn spec(health: Option<&str>) -> String {
    let mut s = "[build]\ncommand = \"mkdir -p dist && cp index.html dist/\"\noutput = \"dist\"\n"
        .to_string();
    if let Some(h) = health {
        s += &format!("[deploy]\nhealth = \"{h}\"\n");
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_region_that_fails_its_health_check_rolls_the_deployment_back() {
    let c = Cluster::start(3, &[]).await;
    let work = repo_in_waves(&c, 1_500).await;
    let _worker = c.spawn_worker("w1");
    let names = ["ap-1", "ap-2", "eu-1", "eu-2", "us-1", "us-2"];
    let _nodes = fleet(&c, &names).await;

    // The first release goes out in waves: a canary, its region, then the others.
    let first = c
        .push(
            "acme/app",
            &work,
            1,
            1,
            &[("starling.toml", &spec(None)), ("index.html", "one\n")],
        )
        .await;
    let done: DeploymentView = c
        .wait_for_json(1, "/v1/deploys/1", |v: &DeploymentView| {
            v.deployment.status.is_final()
        })
        .await;
    assert_eq!(done.deployment.status, DeployStatus::Succeeded, "{done:?}");
    let waves: Vec<&str> = done
        .deployment
        .waves
        .iter()
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(waves.len(), 4, "a canary and three regions: {waves:?}");
    assert_eq!(waves[0], "canary");
    c.wait_for_json(1, "/v1/nodes", all_run(6, first)).await;

    // The second release's health check fails where a `broken` file sits in the node's
    // data directory (the check runs in the release's directory, four levels below).
    let health = "test ! -e ../../../../broken";
    let second = c
        .push(
            "acme/app",
            &work,
            1,
            2,
            &[
                ("starling.toml", &spec(Some(health))),
                ("index.html", "two\n"),
            ],
        )
        .await;
    let planned: DeploymentView = c
        .wait_for_json(1, "/v1/deploys/2", |v: &DeploymentView| {
            !v.deployment.waves.is_empty()
        })
        .await;
    // The last wave's region breaks (the canary's region always comes right after it).
    let last = planned.deployment.waves.last().unwrap().name.clone();
    for n in names.iter().filter(|n| n.starts_with(&format!("{last}-"))) {
        std::fs::write(c.dir.path().join(n).join("broken"), "").unwrap();
    }
    // Fetching is not gated by waves: every node holds the release before the last wave
    // starts, and nodes that run it report healthy meanwhile.
    let mut staged_early = false;
    let rolled: DeploymentView = loop {
        let v: DeploymentView = c.get_json(&format!("{}/v1/deploys/2", c.url(1))).await;
        let last_started = v
            .deployment
            .waves
            .last()
            .is_some_and(|w| w.started_at.is_some());
        staged_early |= !last_started && v.progress.staged == names.len();
        if v.deployment.status.is_final() {
            break v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        staged_early,
        "the last region fetched only when its wave came"
    );
    let d = &rolled.deployment;
    assert_eq!(d.status, DeployStatus::RolledBack, "{d:?}");
    let reason = d.reason.as_deref().unwrap_or_default();
    assert!(reason.starts_with(&format!("wave {last}: ")), "{reason}");
    let what: Vec<&str> = d.history.iter().map(|t| t.what.as_str()).collect();
    assert_eq!(what.last(), Some(&"rolled_back"), "{what:?}");
    assert_eq!(
        what.iter().filter(|w| **w == "wave_done").count(),
        3,
        "{what:?}"
    );
    // The waves before it ran the new release healthily: their outcomes say so.
    for w in &d.waves[..3] {
        assert!(!w.outcomes.is_empty(), "{w:?}");
        assert!(
            w.outcomes
                .iter()
                .all(|o| o.release == Some(second) && o.state == AppState::Running),
            "{w:?}"
        );
    }
    let failed = &d.waves[3].outcomes;
    assert!(
        failed.iter().any(|o| o.state == AppState::Failed),
        "{failed:?}"
    );
    // Every node returns to the first release by itself, the updated ones included.
    c.wait_for_json(1, "/v1/nodes", all_run(6, first)).await;
    let events: Vec<starling_proto::Event> =
        c.get_json(&format!("{}/v1/events?after=0", c.url(2))).await;
    assert!(events.iter().any(|e| {
        e.kind == starling_proto::EventKind::DeployCompleted
            && e.deployment == Some(2)
            && e.detail
                .as_deref()
                .is_some_and(|t| t.starts_with("rolled_back: wave"))
    }));
    let shown = c.cli(2, &["deploys", "show", "2"]).await;
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("rolled_back") && text.contains(&last),
        "{text}"
    );

    // Fixed, the release goes out all at once; `starling rollback` then returns every
    // node to the first release, which they still hold: no chunk moves.
    for n in &names {
        let _ = std::fs::remove_file(c.dir.path().join(n).join("broken"));
    }
    let hex = second.to_string();
    let out = c
        .cli(
            3,
            &[
                "deploy",
                "acme/app",
                "--release",
                &hex,
                "--strategy",
                "all-at-once",
                "--wait",
            ],
        )
        .await;
    assert!(out.status.success(), "{out:?}");
    c.wait_for_json(1, "/v1/nodes", all_run(6, second)).await;
    let held = |n: &str| {
        std::fs::read_dir(c.dir.path().join(n).join("chunks/chunks")).map_or(0, |d| d.count())
    };
    let before: Vec<usize> = names.iter().map(|n| held(n)).collect();
    let out = c.cli(3, &["rollback", "acme/app", "--wait"]).await;
    assert!(out.status.success(), "{out:?}");
    c.wait_for_json(1, "/v1/nodes", all_run(6, first)).await;
    let after: Vec<usize> = names.iter().map(|n| held(n)).collect();
    assert_eq!(
        before, after,
        "a rollback to a release the nodes hold moved chunks"
    );
    let list = c.cli(1, &["deploys", "list", "--repo", "acme/app"]).await;
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("rollback") && text.contains("succeeded"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_carries_a_rollout_on_without_running_a_wave_twice() {
    let mut c = Cluster::start(3, &[]).await;
    let work = repo_in_waves(&c, 3_000).await;
    let _worker = c.spawn_worker("w1");
    let names = ["eu-1", "eu-2", "us-1", "us-2"];
    let _nodes = fleet(&c, &names).await;
    let release = c
        .push(
            "acme/app",
            &work,
            1,
            1,
            &[("starling.toml", &spec(None)), ("index.html", "one\n")],
        )
        .await;
    // Mid-rollout: the canary is done and its region's wave has started.
    c.wait_for_json(1, "/v1/deploys/1", |v: &DeploymentView| {
        v.deployment
            .waves
            .get(1)
            .is_some_and(|w| w.started_at.is_some())
    })
    .await;
    let leader = c.leader().await.expect("a leader");
    c.kill(leader).await;
    let other = (1..=3).find(|id| *id != leader).unwrap();
    let done: DeploymentView = c
        .wait_for_json(other, "/v1/deploys/1", |v: &DeploymentView| {
            v.deployment.status.is_final()
        })
        .await;
    let d = &done.deployment;
    assert_eq!(d.status, DeployStatus::Succeeded, "{d:?}");
    for (i, w) in d.waves.iter().enumerate() {
        let started = d
            .history
            .iter()
            .filter(|t| t.what == "wave_started" && t.wave == Some(i))
            .count();
        assert_eq!(
            started,
            1,
            "wave {} ({}) started {started} times",
            i + 1,
            w.name
        );
        assert!(w.done_at.is_some(), "{w:?}");
    }
    let order: Vec<usize> = d
        .history
        .iter()
        .filter(|t| t.what == "wave_started")
        .filter_map(|t| t.wave)
        .collect();
    assert_eq!(order, (0..d.waves.len()).collect::<Vec<_>>());
    c.wait_for_json(other, "/v1/nodes", all_run(4, release))
        .await;
}
