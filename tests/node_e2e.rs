//! From a push to running on the fleet, with every part real: three control members, a
//! build worker, and four `starling node` processes in two regions that enrol with a join
//! token, fetch the release over QUIC (mutual TLS from the cluster CA), verify, unpack
//! and switch to it, and show up in `GET /v1/nodes` running it. On loopback; the same
//! across shaped links between hosts is `swarm_netns.rs`.

mod common;

use common::*;
use starling_proto::{AppState, Build, BuildStatus, NodeInfo};

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
    let _worker = c.spawn_worker("w1");
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
        // One node serves its metrics, on a port the kernel picks (its log says which).
        let mut env = vec![("STARLING_JOIN_TOKEN", token.as_str())];
        if name == "eu-1" {
            env.push(("STARLING_METRICS_LISTEN", "127.0.0.1:0"));
        }
        children.push(c.spawn_node(name, region, "acme/web", &format!("{name}.log"), &env));
    }
    let seen: Vec<NodeInfo> = c
        .wait_for_json(1, "/v1/nodes", |n: &Vec<NodeInfo>| {
            n.len() == 4
                && n.iter()
                    .all(|x| x.release == Some(release) && x.state == AppState::Running)
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
    let log = std::fs::read_to_string(c.dir.path().join("eu-1.log")).unwrap();
    let addr = log
        .lines()
        .map(strip_ansi)
        .find(|l| l.contains("serving /metrics"))
        .and_then(|l| {
            Some(
                l.split("addr=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .to_string(),
            )
        })
        .expect("the node says where it serves its metrics");
    let metrics = String::from_utf8(c.get_bytes(&format!("http://{addr}/metrics")).await).unwrap();
    for want in [
        "starling_node_fetched_bytes_total{source=",
        "starling_node_activations_total 1",
        "starling_node_app{repo=\"acme/web\",state=\"running\"} 1",
    ] {
        assert!(metrics.contains(want), "{want} missing from:\n{metrics}");
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
    let hex = release.to_string();
    let deploy = [
        "deploy",
        "acme/web",
        "--release",
        &hex,
        "--strategy",
        "all-at-once",
    ];
    let out = c.cli(2, &deploy).await;
    assert!(out.status.success(), "{out:?}");
    c.wait_for_json(1, "/v1/nodes", |n: &Vec<NodeInfo>| {
        n.len() == 4
            && n.iter()
                .all(|x| x.release == Some(release) && x.state == AppState::Running)
    })
    .await;
    let again: Vec<usize> = nodes.iter().map(|(n, _)| held(n)).collect();
    assert_eq!(after, again, "a rollback moved chunks");
    let status = c.cli(1, &["status"]).await;
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
    let _eu1 = c.spawn_node("eu-1", "eu", "acme/web", "eu-1.again.log", &[]);
    c.wait_for_json(1, "/v1/nodes", |n: &Vec<NodeInfo>| {
        n.iter().any(|x| {
            x.id == "eu-1"
                && x.address != old_address
                && x.release == Some(release)
                && x.state == AppState::Running
        }) && n.len() == 4
    })
    .await;
    let log = std::fs::read_to_string(c.dir.path().join("eu-1.again.log")).unwrap();
    assert!(
        !log.contains("enrolled"),
        "the restarted node enrolled again"
    );
}

/// `s` without terminal colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
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

/// Kills the process groups the nodes started (they outlive the nodes, as services do)
/// when the test ends, passed or not.
struct Services(Vec<std::path::PathBuf>);

impl Drop for Services {
    fn drop(&mut self) {
        for record in &self.0 {
            for pid in pids_under(record) {
                // SAFETY: getpgid(2) and kill(2) on the process group of a process this
                // test's nodes started; no memory-safety preconditions.
                unsafe {
                    let group = libc::getpgid(pid);
                    if group > 1 {
                        libc::kill(-group, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

/// The pids every release under a node's `apps/acme__web/releases` wrote.
fn pids_under(releases: &std::path::Path) -> Vec<i32> {
    std::fs::read_dir(releases)
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("pid")).ok())
                .filter_map(|p| p.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
}

/// Commit `files` to `work`, push, and wait for build `n`'s release (registering
/// `acme/app` before the first).
async fn push(
    c: &Cluster,
    work: &std::path::Path,
    n: u64,
    files: &[(&str, &str)],
) -> starling_proto::ReleaseId {
    if n == 1 {
        c.add_repo_from(1, "acme/app", &format!("file://{}", work.display()))
            .await;
    }
    c.push("acme/app", work, 1, n, files).await
}

/// `[deploy]`: each node stops the previous release's process and starts the new one,
/// waits for its health command, reports a release that does not come up as failed with
/// the reason, and finds its running process again after it restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn releases_run_their_start_and_health_commands() {
    let c = Cluster::start(1, &[]).await;
    let work = c.work_tree();
    let spec = |start: &str| {
        format!(
            "[build]\ncommand = \"mkdir -p dist && cp app.sh dist/\"\noutput = \"dist\"\n\
             [deploy]\nstart = \"{start}\"\nhealth = \"test -f ready\"\n"
        )
    };
    let _worker = c.spawn_worker("w1");
    // The service: says who it is, becomes ready, and runs until stopped.
    let app = |v: &str| format!("echo $$ > pid; echo {v} > version; touch ready; exec sleep 600\n");
    let first = push(
        &c,
        &work,
        1,
        &[
            ("starling.toml", &spec("sh app.sh")),
            ("app.sh", &app("one")),
        ],
    )
    .await;
    let token = c.join_token().await;
    let names = ["n1", "n2"];
    let releases = |name: &str| c.dir.path().join(name).join("apps/acme__app/releases");
    let _services = Services(names.iter().map(|n| releases(n)).collect());
    let mut nodes: Vec<_> = names
        .iter()
        .map(|n| {
            c.spawn_node(
                n,
                "eu",
                "acme/app",
                &format!("{n}.log"),
                &[("STARLING_JOIN_TOKEN", token.as_str())],
            )
        })
        .collect();
    let running = |release| {
        move |n: &Vec<NodeInfo>| {
            n.len() == 2
                && n.iter()
                    .all(|x| x.release == Some(release) && x.state == AppState::Running)
        }
    };
    c.wait_for_json(1, "/v1/nodes", running(first)).await;
    let pid_of = |name: &str, release: starling_proto::ReleaseId| -> i32 {
        let f = releases(name).join(release.to_hex()).join("pid");
        std::fs::read_to_string(&f).unwrap().trim().parse().unwrap()
    };
    let first_pids: Vec<i32> = names.iter().map(|n| pid_of(n, first)).collect();
    assert!(first_pids.iter().all(|p| alive(*p)), "{first_pids:?}");

    // A new release: the old process is stopped before the new one starts.
    let second = push(&c, &work, 2, &[("app.sh", &app("two"))]).await;
    c.wait_for_json(1, "/v1/nodes", running(second)).await;
    for (i, n) in names.iter().enumerate() {
        assert!(
            !alive(first_pids[i]),
            "{n}: the first release's process still runs"
        );
        assert!(
            alive(pid_of(n, second)),
            "{n}: the second release's process is not running"
        );
    }

    // A release whose process dies at once is reported failed, with the reason.
    let third = push(
        &c,
        &work,
        3,
        &[("starling.toml", &spec("echo broken >&2; exit 3"))],
    )
    .await;
    let failed: Vec<NodeInfo> = c
        .wait_for_json(1, "/v1/nodes", |n: &Vec<NodeInfo>| {
            n.len() == 2
                && n.iter()
                    .all(|x| x.state == AppState::Failed && x.release == Some(third))
        })
        .await;
    for n in &failed {
        let error = n.error.as_deref().unwrap_or_default();
        assert!(error.contains("exit status: 3"), "{}: {error}", n.id);
        assert_eq!(n.apps[0].error.as_deref(), Some(error));
    }
    let status = c.cli(1, &["status"]).await;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("failed") && text.contains("exit status: 3"),
        "{text}"
    );

    // Back to the second release. A goal long-poll waiting meanwhile answers with it
    // (had it waited out its 60 s instead, it would answer with the third release).
    let goals: Vec<starling_proto::GoalInfo> = c
        .get_json(&format!("{}/v1/goals?repo=acme/app", c.url(1)))
        .await;
    let set_at = goals[0].at;
    let poll = {
        let (http, url) = (c.http.clone(), c.url(1));
        tokio::spawn(async move {
            let r = http
                .get(format!(
                    "{url}/v1/goals?repo=acme/app&after={set_at}&timeout=60s"
                ))
                .send()
                .await
                .unwrap();
            r.json::<Vec<starling_proto::GoalInfo>>().await.unwrap()
        })
    };
    let hex = second.to_string();
    let out = c.cli(1, &["deploy", "acme/app", "--release", &hex]).await;
    assert!(out.status.success(), "{out:?}");
    let woken = poll.await.unwrap();
    assert_eq!(woken[0].release, second);
    assert!(woken[0].at > set_at);
    // With nothing newer, a long-poll answers what is when its time is up.
    let same: Vec<starling_proto::GoalInfo> = c
        .get_json(&format!(
            "{}/v1/goals?repo=acme/app&after={}&timeout=1s",
            c.url(1),
            woken[0].at
        ))
        .await;
    assert_eq!(same, woken);
    c.wait_for_json(1, "/v1/nodes", running(second)).await;
    let pid = pid_of("n1", second);
    assert!(alive(pid));

    // n1 is killed and started again: it finds the running process, starts no second one.
    // (Its new announcement comes from a new address.)
    let old: Vec<NodeInfo> = c.get_json(&format!("{}/v1/nodes", c.url(1))).await;
    let old_address = old.iter().find(|x| x.id == "n1").map(|x| x.address.clone());
    nodes[0].kill().await.unwrap();
    nodes[0] = c.spawn_node("n1", "eu", "acme/app", "n1.again.log", &[]);
    c.wait_for_json(1, "/v1/nodes", |n: &Vec<NodeInfo>| {
        n.iter().any(|x| {
            x.id == "n1"
                && Some(&x.address) != old_address.as_ref()
                && x.release == Some(second)
                && x.state == AppState::Running
        })
    })
    .await;
    assert_eq!(pid_of("n1", second), pid, "a second process was started");
    assert!(alive(pid));
}

/// A node whose disk fills up says so: `GET /v1/nodes` shows it failed, with the reason,
/// instead of a fetch that never ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_a_full_disk_reports_it() {
    if !Tmpfs::possible() {
        return;
    }
    let c = Cluster::start(1, &[]).await;
    let work = c.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("blob"), starling_harness::noise(1, 3_000_000)).unwrap();
    let _worker = c.spawn_worker("w1");
    let spec = "[build]\ncommand = \"mkdir -p dist && cp blob dist/\"\noutput = \"dist\"\n";
    let release = push(&c, &work, 1, &[("starling.toml", spec)]).await;
    // 1 MiB of disk for a 3 MB release.
    let Some(_disk) = Tmpfs::mount(&c.dir.path().join("n1"), "1m") else {
        return;
    };
    let token = c.join_token().await;
    let _node = c.spawn_node(
        "n1",
        "eu",
        "acme/app",
        "n1.log",
        &[("STARLING_JOIN_TOKEN", token.as_str())],
    );
    let seen: Vec<NodeInfo> = c
        .wait_for_json(1, "/v1/nodes", |n: &Vec<NodeInfo>| {
            n.iter().any(|x| x.state == AppState::Failed)
        })
        .await;
    let error = seen[0].error.clone().unwrap_or_default();
    assert!(error.contains("No space left on device"), "{error}");
    assert_ne!(seen[0].release, Some(release));
}
