//! From a push to running on the fleet, with every part real: three control members, a
//! build worker, and four `starling node` processes in two regions that enrol with a join
//! token, fetch the release over QUIC (mutual TLS from the cluster CA), verify, unpack
//! and switch to it, and show up in `GET /v1/nodes` running it. On loopback; the
//! multi-host test in network namespaces is still to come.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::json;
use starling_proto::{Build, BuildStatus, NodeInfo};

fn spawn(c: &Cluster, args: &[&str], log: &str, env: &[(&str, &str)]) -> tokio::process::Child {
    let log = std::fs::File::create(c.dir.path().join(log)).unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["--control", &c.url(1)])
        .args(args)
        .current_dir(c.dir.path())
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_ends_up_running_on_every_node() {
    let c = Cluster::start(3, &[]).await;
    let work = c.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("index.html"), "<h1>hello fleet</h1>\n").unwrap();
    std::fs::write(
        work.join("starling.toml"),
        "[build]\ncommand = \"mkdir -p dist && cp index.html dist/ && head -c 3000000 /dev/urandom > dist/blob\"\noutput = \"dist\"\n",
    )
    .unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "first"]);
    let sha = git(&work, &["rev-parse", "HEAD"]);
    let r = c
        .post(1, "/v1/repos", &json!({
            "name": "acme/web", "url": format!("file://{}", work.display()), "branch": "main", "webhook_secret": SECRET
        }))
        .await;
    assert_eq!(r.status().as_u16(), 201);
    let _worker = spawn(
        &c,
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

    // A join token, once the CA exists (the first leader makes it at start).
    c.wait_until(
        "the cluster CA exists",
        Duration::from_secs(30),
        async |c| {
            c.post(1, "/v1/join-tokens", &json!({}))
                .await
                .status()
                .is_success()
        },
    )
    .await;
    let v: serde_json::Value = c
        .post(1, "/v1/join-tokens", &json!({}))
        .await
        .json()
        .await
        .unwrap();
    let token = v["token"].as_str().expect("a token").to_string();

    let nodes = [
        ("eu-1", "eu"),
        ("eu-2", "eu"),
        ("us-1", "us"),
        ("us-2", "us"),
    ];
    let mut children = Vec::new();
    for (name, region) in nodes {
        children.push(spawn(
            &c,
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
        let log = std::fs::read_to_string(c.dir.path().join(format!("{name}.log"))).unwrap();
        eprintln!(
            "{name}: {}",
            log.lines()
                .filter(|l| l.contains("release fetched"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
}
