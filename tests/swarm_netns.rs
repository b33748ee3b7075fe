//! The swarm across real hosts: network namespaces made by this test, three regions of
//! four nodes, each node's upload and each region's WAN link capped with `tc tbf`. The
//! control members (the origin) run on one host of region 0, the build worker on another.
//!
//! A 64 MiB release reaches every node, which verifies, unpacks and activates it, and the
//! kernel's counters of the WAN links show that each remote region received it about once.
//! A second 64 MiB release is cut short for two nodes and one control member by SIGKILL
//! once a quarter of it has crossed into a remote region; every other node still ends up
//! running it.
//!
//! Without root, `ip` or `tc` the test says so and passes; with `STARLING_REQUIRE_NETNS`
//! set (CI sets it) it fails instead, so that CI cannot skip it unnoticed.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use starling_harness::noise;
use starling_harness::testbed::{Testbed, TestbedSpec};
use starling_proto::{Build, BuildStatus, NodeInfo, ReleaseId};

const MIB: u64 = 1 << 20;
const RELEASE: u64 = 64 * MIB;
const MBIT: u64 = 1_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_crosses_each_wan_link_about_once_and_survives_kills() {
    if let Some(why) = Testbed::unavailable() {
        assert!(
            std::env::var_os("STARLING_REQUIRE_NETNS").is_none(),
            "STARLING_REQUIRE_NETNS is set, but the namespace test cannot run: {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let spec = TestbedSpec {
        regions: 3,
        nodes_per_region: 4,
        node_rate: 80 * MBIT,
        origin_rate: 80 * MBIT,
        wan_rate: 100 * MBIT,
    };
    let bed = tokio::task::spawn_blocking(move || Testbed::build(spec))
        .await
        .unwrap()
        .expect("building the testbed");
    let mut c = Cluster::start_on(3, &[], &[], Some(bed.origin().clone())).await;

    let work = c.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(
        work.join("starling.toml"),
        "[build]\ncommand = \"mkdir -p dist && cp blob dist/\"\noutput = \"dist\"\n",
    )
    .unwrap();
    std::fs::write(work.join("blob"), noise(1, RELEASE as usize)).unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "first"]);
    c.add_repo_from(1, "acme/web", &format!("file://{}", work.display()))
        .await;
    let _worker = c.spawn_starling_on(
        Some(bed.builder()),
        &["worker", "--name", "w1", "--data-dir", "w1"],
        "w1.log",
        &[("STARLING_TOKEN", TOKEN)],
    );
    let token = c.join_token().await;
    let mut nodes = Vec::new();
    for h in bed.nodes() {
        let name = format!(
            "r{}-{}",
            h.region,
            h.netns.rsplit('-').next().unwrap_or_default()
        );
        let listen = format!("{}:7400", h.ip);
        let child = c.spawn_starling_on(
            Some(h),
            &[
                "node",
                "--name",
                &name,
                "--region",
                &format!("r{}", h.region),
                "--data-dir",
                &name,
                "--repo",
                "acme/web",
                "--listen",
                &listen,
            ],
            &format!("{name}.log"),
            &[("STARLING_JOIN_TOKEN", token.as_str())],
        );
        nodes.push((name, child));
    }
    let all: BTreeSet<String> = nodes.iter().map(|(n, _)| n.clone()).collect();
    c.wait_for_json(1, "/v1/nodes", |n: &Vec<NodeInfo>| n.len() == all.len())
        .await;

    // The first release, to every node.
    let wan_before = wan_counters(&bed);
    let (release, started) = push_and_build(&c, &work, 1).await;
    let took = wait_running(&c, &all, release).await;
    let wan_after = wan_counters(&bed);
    eprintln!(
        "release 1 ({} MiB) on all {} nodes {:.1} s after its build succeeded",
        RELEASE / MIB,
        all.len(),
        took.duration_since(started).as_secs_f64()
    );
    for name in &all {
        let log = std::fs::read_to_string(c.dir.path().join(format!("{name}.log"))).unwrap();
        for l in log
            .lines()
            .filter(|l| l.contains("release fetched") || l.contains("dropped"))
        {
            eprintln!("{name}: {l}");
        }
    }
    for k in 1..bed.spec().regions {
        let copies = (wan_after[k] - wan_before[k]) as f64 / RELEASE as f64;
        eprintln!("region {k} received {copies:.3} copies over its WAN link");
        assert!(
            copies <= 1.1,
            "region {k} received {copies:.3} copies of the release over its WAN link"
        );
        assert!(
            copies >= 0.99,
            "region {k} received only {copies:.3} copies"
        );
    }
    assert_run(&c, &all, 1);

    // The second release; two nodes and a control member die a quarter of the way in.
    std::fs::write(work.join("blob"), noise(2, RELEASE as usize)).unwrap();
    git(&work, &["commit", "-q", "-am", "second"]);
    let wan_before = wan_counters(&bed);
    let (release2, started) = push_and_build(&c, &work, 2).await;
    c.wait_until(
        "a quarter of the second release in region 1",
        Duration::from_secs(120),
        async |_| wan_counters(&bed)[1] - wan_before[1] >= RELEASE / 4,
    )
    .await;
    let victims = ["r1-n0", "r2-n1"];
    for v in victims {
        let (_, child) = nodes.iter_mut().find(|(n, _)| n == v).unwrap();
        child.kill().await.unwrap();
    }
    let leader = c.leader().await.unwrap_or(3);
    // Nodes know the control plane by member 1's URL; any other member may die.
    let member = if leader == 1 { 3 } else { leader };
    c.kill(member).await;
    eprintln!("killed {victims:?} and control member {member}");
    let rest: BTreeSet<String> = all
        .iter()
        .filter(|n| !victims.contains(&n.as_str()))
        .cloned()
        .collect();
    let took = wait_running(&c, &rest, release2).await;
    let wan_after = wan_counters(&bed);
    eprintln!(
        "release 2 on the {} nodes left {:.1} s after its build succeeded",
        rest.len(),
        took.duration_since(started).as_secs_f64()
    );
    for k in 1..bed.spec().regions {
        let copies = (wan_after[k] - wan_before[k]) as f64 / RELEASE as f64;
        eprintln!("with the kills, region {k} received {copies:.3} copies");
    }
    assert_run(&c, &rest, 2);
    drop(nodes);
    drop(c);
    drop(bed);
}

/// Push the work tree's HEAD as delivery `n` and wait for its build: the release, and
/// when the build was seen to succeed (the goal is set as it succeeds).
async fn push_and_build(c: &Cluster, work: &Path, n: u64) -> (ReleaseId, Instant) {
    let sha = git(work, &["rev-parse", "HEAD"]);
    let (body, sig) = github_push("acme/web", "main", &sha, SECRET);
    let r = send_github(&c.http, &c.url(1), "push", &format!("d-{n}"), body, &sig)
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let built: Build = c
        .wait_for_json(1, &format!("/v1/builds/{n}"), |b: &Build| {
            b.status.is_terminal()
        })
        .await;
    assert_eq!(built.status, BuildStatus::Succeeded, "{built:?}");
    (built.release.expect("a release"), Instant::now())
}

/// Wait until every node in `names` runs `release`; when that was seen.
async fn wait_running(c: &Cluster, names: &BTreeSet<String>, release: ReleaseId) -> Instant {
    c.wait_for_json(1, "/v1/nodes", |n: &Vec<NodeInfo>| {
        names.iter().all(|name| {
            n.iter().any(|x| {
                &x.id == name
                    && x.release == Some(release)
                    && x.state == starling_proto::AppState::Running
            })
        })
    })
    .await;
    Instant::now()
}

/// Every node in `names` runs the release whose blob is `noise(seed)`.
fn assert_run(c: &Cluster, names: &BTreeSet<String>, seed: u64) {
    let want = noise(seed, RELEASE as usize);
    for name in names {
        let blob = std::fs::read(c.dir.path().join(name).join("apps/acme__web/current/blob"))
            .expect("the running release's blob");
        assert!(blob == want, "{name} runs other bytes");
    }
}

fn wan_counters(bed: &Testbed) -> Vec<u64> {
    (0..bed.spec().regions)
        .map(|k| bed.wan_received(k).expect("reading a WAN counter"))
        .collect()
}
