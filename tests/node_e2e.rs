//! From a push to running on the fleet, with every part real: three control members, a
//! build worker, and four `starling node` processes in two regions that enrol with a join
//! token, fetch the release over QUIC (mutual TLS from the cluster CA), verify, unpack
//! and switch to it, and show up in `GET /v1/nodes` running it. On loopback; the same
//! across shaped links between hosts is `swarm_netns.rs`.

mod common;

use common::*;
use starling_proto::{Build, BuildStatus, NodeInfo};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_ends_up_running_on_every_node() {
    let c = Cluster::start(3, &[]).await;
    let work = c.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("index.html"), "<h1>hello fleet</h1>\n").unwrap();
    // 3 MB that do not compress into one chunk, the same in every build.
    let blob = starling_harness::noise(0, 3_000_000);
    std::fs::write(work.join("blob"), blob).unwrap();
    std::fs::write(
        work.join("starling.toml"),
        "[build]\ncommand = \"mkdir -p dist && cp index.html blob dist/\"\noutput = \"dist\"\n",
    )
    .unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "first"]);
    let sha = git(&work, &["rev-parse", "HEAD"]);
    c.add_repo_from(1, "acme/web", &format!("file://{}", work.display()))
        .await;
    let _worker = c.spawn_starling(
        &["worker", "--name", "w1", "--data-dir", "w1"],
        "w1.log",
        &[("STARLING_TOKEN", TOKEN)],
    );
    let (body, sig) = github_push("acme/web", "main", &sha, SECRET);
    let r = send_github(&c.http, &c.url(1), "push", "d-1", body, &sig)
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let built: Build = c
        .wait_for_json(1, "/v1/builds/1", |b: &Build| b.status.is_terminal())
        .await;
    assert_eq!(built.status, BuildStatus::Succeeded, "{built:?}");
    let release = built.release.expect("a release");

    let token = c.join_token().await;

    let nodes = [
        ("eu-1", "eu"),
        ("eu-2", "eu"),
        ("us-1", "us"),
        ("us-2", "us"),
    ];
    let mut children = Vec::new();
    for (name, region) in nodes {
        children.push(c.spawn_starling(
            &[
                "node",
                "--name",
                name,
                "--region",
                region,
                "--data-dir",
                name,
                "--repo",
                "acme/web",
                "--listen",
                "127.0.0.1:0",
            ],
            &format!("{name}.log"),
            &[("STARLING_JOIN_TOKEN", token.as_str())],
        ));
    }
    let seen: Vec<NodeInfo> = c
        .wait_for_json(1, "/v1/nodes", |n: &Vec<NodeInfo>| {
            n.len() == 4
                && n.iter()
                    .all(|x| x.release == Some(release) && x.state == "running")
        })
        .await;
    assert!(seen.iter().all(|n| n.activated_at.is_some()));
    for (name, _) in nodes {
        let page = std::fs::read_to_string(
            c.dir
                .path()
                .join(name)
                .join("apps/acme__web/current/index.html"),
        )
        .unwrap();
        assert_eq!(page, "<h1>hello fleet</h1>\n", "{name}");
    }
    let held = |name: &str| count_files(&c.dir.path().join(name).join("chunks/chunks"));
    let before: Vec<usize> = nodes.iter().map(|(n, _)| held(n)).collect();

    // A second commit changes one small file: each node fetches about one chunk.
    std::fs::write(work.join("index.html"), "<h1>hello again</h1>\n").unwrap();
    git(&work, &["commit", "-q", "-am", "second"]);
    let sha2 = git(&work, &["rev-parse", "HEAD"]);
    let (body, sig) = github_push("acme/web", "main", &sha2, SECRET);
    let r = send_github(&c.http, &c.url(1), "push", "d-2", body, &sig)
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let second: Build = c
        .wait_for_json(1, "/v1/builds/2", |b: &Build| b.status.is_terminal())
        .await;
    let release2 = second.release.expect("a second release");
    c.wait_for_json(1, "/v1/nodes", |n: &Vec<NodeInfo>| {
        n.len() == 4 && n.iter().all(|x| x.release == Some(release2))
    })
    .await;
    for (i, (name, _)) in nodes.iter().enumerate() {
        let new = held(name) - before[i];
        eprintln!(
            "{name}: {} chunks for the first release, {new} more for the second",
            before[i]
        );
        assert!(
            new <= 2,
            "{name} fetched {new} chunks for a one-file change"
        );
        assert!(before[i] >= 2, "{name} held {} chunks", before[i]);
    }

    // Back to the first release with starling deploy: the nodes hold it, nothing moves.
    let after: Vec<usize> = nodes.iter().map(|(n, _)| held(n)).collect();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["--control", &c.url(2), "deploy", "acme/web", "--release"])
        .arg(release.to_string())
        .args(["--strategy", "all-at-once"])
        .env("STARLING_TOKEN", TOKEN)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    c.wait_for_json(1, "/v1/nodes", |n: &Vec<NodeInfo>| {
        n.len() == 4
            && n.iter()
                .all(|x| x.release == Some(release) && x.state == "running")
    })
    .await;
    let again: Vec<usize> = nodes.iter().map(|(n, _)| held(n)).collect();
    assert_eq!(after, again, "a rollback moved chunks");
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["--control", &c.url(1), "status"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("eu") && text.contains("us") && text.contains("running"),
        "{text}"
    );

    // A node killed and started again keeps its certificate and says at once what it runs
    // (from its new address: the old one's announcement is still in the tracker).
    let before: Vec<NodeInfo> = c.get_json(&format!("{}/v1/nodes", c.url(1))).await;
    let old_address = before
        .iter()
        .find(|x| x.id == "eu-1")
        .map(|x| x.address.clone())
        .expect("eu-1 is known");
    let mut eu1 = children.remove(0);
    eu1.kill().await.unwrap();
    let _eu1 = c.spawn_starling(
        &[
            "node",
            "--name",
            "eu-1",
            "--region",
            "eu",
            "--data-dir",
            "eu-1",
            "--repo",
            "acme/web",
            "--listen",
            "127.0.0.1:0",
        ],
        "eu-1.again.log",
        &[],
    );
    c.wait_for_json(1, "/v1/nodes", |n: &Vec<NodeInfo>| {
        n.iter().any(|x| {
            x.id == "eu-1"
                && x.address != old_address
                && x.release == Some(release)
                && x.state == "running"
        }) && n.len() == 4
    })
    .await;
    let log = std::fs::read_to_string(c.dir.path().join("eu-1.again.log")).unwrap();
    assert!(
        !log.contains("enrolled"),
        "the restarted node enrolled again"
    );
}

fn count_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        count_files(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}
