//! Control-plane history benchmark: what years of builds cost a member.
//!
//! Starts a real 3-member cluster, stops it, and gives member 1's state file a history
//! of `--builds` finished builds (default 2,000,000: a year at 5,000 a day is 1.8
//! million) by applying real commands to the real state machine outside Raft — queue,
//! lease, complete, and retention's collections — then copies that file to the other two
//! members, so the three agree. It then restarts the cluster and prints: state file
//! size, the time to restart and catch up, each member's RSS, the latency of history
//! queries over HTTP, the time to take a snapshot, and the size and time of the image a
//! follower would be sent. Targets (issue 11): under 1 GiB RSS, restart under 10 s, each
//! query under 10 ms at 2 million builds.
//!
//! `cargo bench --bench control_history -- [--builds N] [--repos R] [--queries K]`

use std::path::Path;
use std::time::{Duration, Instant};

use redb::ReadableDatabase;
use starling_control::store::{apply_outside_raft, load_state, Files};
use starling_harness::{wait_for, Members, MembersConfig};
use starling_proto::{BuildStatus, Command, ReleaseId};

const TOKEN: &str = "bench-token-0123456789";
const CLUSTER_KEY: &str = "bench-cluster-key-0123456789";
/// 5,000 builds a day.
const BUILD_EVERY_MS: u64 = 86_400_000 / 5_000;
const T0: u64 = 1_700_000_000_000;

struct Args {
    builds: u64,
    repos: u64,
    queries: usize,
}

fn args() -> Args {
    let mut a = Args {
        builds: 2_000_000,
        repos: 20,
        queries: 50,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let value = || {
            argv.get(i + 1)
                .and_then(|v| v.replace('_', "").parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{} needs a number", argv[i]))
        };
        match argv[i].as_str() {
            "--builds" => a.builds = value(),
            "--repos" => a.repos = value(),
            "--queries" => a.queries = value() as usize,
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

fn repo(r: u64) -> String {
    format!("team-{r:02}/service")
}

fn sha(i: u64) -> String {
    blake3::hash(&i.to_le_bytes()).to_hex()[..40].to_string()
}

/// Build `i`'s three commands: six in seven succeed (with a release), the rest fail.
fn build_cmds(i: u64, repos: u64, out: &mut Vec<Command>) {
    let at = T0 + i * BUILD_EVERY_MS;
    let sha = sha(i);
    let succeeded = !i.is_multiple_of(7);
    out.push(Command::QueueBuild {
        repo: repo(i % repos),
        sha: sha.clone(),
        trigger: "github".into(),
        delivery: Some(format!("{i:016x}-delivery")),
        force: false,
        at,
    });
    out.push(Command::LeaseBuild {
        worker: "worker-1".into(),
        ttl_ms: 60_000,
        at: at + 1_000,
    });
    out.push(Command::CompleteBuild {
        build: 0, // filled in by the caller, who knows the id
        worker: "worker-1".into(),
        attempt: 1,
        status: if succeeded {
            BuildStatus::Succeeded
        } else {
            BuildStatus::Failed
        },
        release: succeeded.then(|| ReleaseId::of(sha.as_bytes())),
        reason: (!succeeded).then(|| "exit status: 1".to_string()),
        at: at + 90_000,
    });
}

/// Give member 1's state file `n` finished builds; returns how long it took.
fn grow_history(dir: &Path, a: &Args) -> Duration {
    let started = Instant::now();
    let files = Files::open(dir).expect("opening member 1's files");
    let mut state = load_state(&files.state).expect("loading member 1's state");
    let first = state.marks().last_build + 1;
    let mut cmds = Vec::new();
    let batch = 500;
    let mut i = 0;
    while i < a.builds {
        cmds.clear();
        for k in 0..batch.min(a.builds - i) {
            let id = first + i + k;
            build_cmds(id, a.repos, &mut cmds);
            if let Some(Command::CompleteBuild { build, .. }) = cmds.last_mut() {
                *build = id;
            }
        }
        i += batch.min(a.builds - i);
        // Retention, as the leader's collector proposes it: keep 10 per repository.
        let due = state.releases_to_collect(10);
        if !due.is_empty() {
            cmds.push(Command::CollectReleases {
                releases: due,
                keep: 10,
                at: T0 + (first + i) * BUILD_EVERY_MS,
            });
        }
        // A durable commit now and then lets redb reuse the pages earlier ones freed.
        let durable = i == a.builds || i.is_multiple_of(20 * batch);
        apply_outside_raft(&files.state, &mut state, &cmds, durable).expect("writing history");
        assert_eq!(
            state.marks().last_build,
            first + i - 1,
            "builds were refused"
        );
        if i % 200_000 == 0 {
            eprintln!(
                "{i} builds written ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        }
    }
    started.elapsed()
}

/// Start member 4, joining through `leader`, and wait until it has applied what the
/// leader had; the time that took and the member's peak RSS.
async fn join_a_member(http: &reqwest::Client, dir: &Path, leader: &str) -> (Duration, f64) {
    let status = |url: String| {
        let http = http.clone();
        async move {
            http.get(format!("{url}/v1/cluster"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .ok()?
                .json::<starling_proto::ClusterStatus>()
                .await
                .ok()
        }
    };
    let target = status(leader.to_string())
        .await
        .and_then(|s| s.last_applied)
        .expect("the leader's status");
    let data = dir.join("m4");
    std::fs::create_dir_all(&data).expect("member 4's data directory");
    let t = Instant::now();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args([
            "control",
            "--id",
            "4",
            "--listen",
            "127.0.0.1:0",
            "--join",
            leader,
        ])
        .arg("--data-dir")
        .arg(&data)
        .env("STARLING_TOKEN", TOKEN)
        .env("STARLING_CLUSTER_KEY", CLUSTER_KEY)
        .env("STARLING_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting member 4");
    let pid = child.id().unwrap_or(0);
    let addr = data.join(starling_control::server::LISTEN_ADDR_FILE);
    wait_for("member 4 to catch up", Duration::from_secs(600), || {
        let (addr, status) = (addr.clone(), &status);
        async move {
            let a = std::fs::read_to_string(&addr).ok()?;
            let s = status(format!("http://{}", a.trim())).await?;
            (s.last_applied? >= target).then_some(())
        }
    })
    .await
    .expect("member 4 caught up");
    let took = t.elapsed();
    let peak = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0);
    let _ = child.kill().await;
    (took, peak)
}

/// Take a snapshot on the member at `url` (and purge its log behind it).
async fn snapshot(http: &reqwest::Client, url: &str) {
    let r = http
        .post(format!("{url}/internal/snapshot"))
        .header("x-starling-cluster-key", CLUSTER_KEY)
        .send()
        .await
        .expect("a snapshot");
    assert!(r.status().is_success(), "snapshot: {}", r.status());
}

/// A sink that counts what is written to it.
struct Count(u64);

impl std::io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn dir_mib(p: &Path) -> f64 {
    let mut total = 0u64;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            // Blocks allocated, not length: redb files are sparse where never written.
            let m = e.metadata().ok();
            total += m
                .as_ref()
                .filter(|m| m.is_file())
                .map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(m) * 512);
        }
    }
    total as f64 / (1024.0 * 1024.0)
}

/// "a / b / c", one figure a member.
fn per_member(values: &[f64]) -> String {
    let shown: Vec<String> = values.iter().map(|v| format!("{v:.0}")).collect();
    shown.join(" / ")
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let a = args();
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let mut members = Members::new(
        MembersConfig {
            exe: env!("CARGO_BIN_EXE_starling").into(),
            dir: tmp.path().join("members"),
            token: TOKEN.into(),
            cluster_key: CLUSTER_KEY.into(),
            base_port: None,
            args: Vec::new(),
            env: vec![("STARLING_LOG".into(), "warn".into())],
            host: None,
            tls: false,
        },
        3,
    );
    members
        .start(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("starting the cluster: {e}"));
    let http = starling_client::http_builder(None)
        .expect("an HTTP client")
        .no_proxy()
        .build()
        .unwrap_or_default();
    let url1 = members.url(1);
    for r in 0..a.repos {
        let res = http
            .post(format!("{url1}/v1/repos"))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({"name": repo(r), "url": "https://git.example/x.git"}))
            .send()
            .await;
        assert!(
            res.is_ok_and(|r| r.status().is_success()),
            "adding a repository"
        );
    }
    // Every member has applied the repositories before they stop.
    for id in 1..=3 {
        let url = members.url(id);
        wait_for(
            "every member to have the repositories",
            Duration::from_secs(30),
            || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let repos: Vec<serde_json::Value> = http
                        .get(format!("{url}/v1/repos?stale=1"))
                        .bearer_auth(TOKEN)
                        .send()
                        .await
                        .ok()?
                        .json()
                        .await
                        .ok()?;
                    (repos.len() as u64 == a.repos).then_some(())
                }
            },
        )
        .await
        .expect("members caught up");
    }
    // Stopped with SIGTERM, a member makes its state file durable up to what it applied.
    for id in 1..=3 {
        let clean = members
            .stop(id, Duration::from_secs(30))
            .await
            .expect("stopping a member");
        assert!(clean, "member {id} did not stop on SIGTERM");
    }

    eprintln!("writing {} builds into member 1's state file…", a.builds);
    let grow = grow_history(&members.data_dir(1), &a);
    let state_file = members.data_dir(1).join("state.redb");

    for id in 2..=3 {
        std::fs::copy(&state_file, members.data_dir(id).join("state.redb"))
            .expect("copying the state file");
    }
    // The copies are gigabytes of dirty pages: written back now, not under the restart and
    // the queries that are measured next (a real member never copies its file).
    let flushed = std::process::Command::new("sync").status();
    assert!(flushed.is_ok_and(|s| s.success()), "sync");
    // The image a follower that needs a snapshot is sent: made from the state file.
    let (image_secs, image_mib) = {
        let files = Files::open(&members.data_dir(1)).expect("opening member 1's files");
        let t = Instant::now();
        let txn = files.state.begin_read().expect("a read transaction");
        let mut size = Count(0);
        starling_control::image::write(&txn, &mut size).expect("an image");
        (t.elapsed(), size.0 as f64 / (1024.0 * 1024.0))
    };

    // Restart: until each member answers a linearizable read.
    let t = Instant::now();
    for id in 1..=3 {
        members.spawn(id, &[]).await.expect("restarting a member");
    }
    let mut caught_up = Vec::new();
    for id in 1..=3 {
        let url = members.url(id);
        wait_for(
            "a restarted member to answer",
            Duration::from_secs(120),
            || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let r = http
                        .get(format!("{url}/v1/builds?limit=1"))
                        .bearer_auth(TOKEN)
                        .send()
                        .await
                        .ok()?;
                    r.status().is_success().then_some(())
                }
            },
        )
        .await
        .expect("restart");
        caught_up.push(t.elapsed());
    }
    let restart = caught_up.iter().copied().max().unwrap_or_default();
    let rss_restarted: Vec<f64> = (1..=3)
        .map(|id| members.pid(id).map_or(f64::NAN, rss_mib))
        .collect();

    // History queries, through the API, at member 1.
    let n = a.builds;
    let mid = sha(n / 2);
    let since = T0 + (n / 4) * BUILD_EVERY_MS;
    let queries: Vec<(&str, String)> = vec![
        ("newest 50", "/v1/builds?limit=50".into()),
        (
            "repository + status",
            format!("/v1/builds?repo={}&status=failed&limit=50", repo(7)),
        ),
        (
            "commit prefix",
            format!("/v1/builds?sha={}&limit=50", &mid[..8]),
        ),
        (
            "time range (a day, 3 months back)",
            format!(
                "/v1/builds?since={since}&until={}&limit=50",
                since + 86_400_000
            ),
        ),
        ("one archived build", format!("/v1/builds/{}", n / 3)),
        (
            "archived events",
            format!("/v1/events?after={}&limit=100", n),
        ),
        (
            "deployments of a repository",
            format!("/v1/deploys?repo={}&limit=50", repo(7)),
        ),
        ("one archived deployment", format!("/v1/deploys/{}", n / 4)),
    ];
    let mut rows = Vec::new();
    for (name, path) in &queries {
        let mut lat = Vec::new();
        let mut answered = 0;
        // One unmeasured run first: the first query of a kind warms its pages.
        for run in 0..=a.queries {
            let t = Instant::now();
            let r = http
                .get(format!("{url1}{path}"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .expect("a query");
            if !r.status().is_success() {
                let keep = tmp.keep();
                panic!("{path}: {} (files kept in {})", r.status(), keep.display());
            }
            let body = r.bytes().await.expect("a body");
            if run > 0 {
                lat.push(t.elapsed());
            }
            answered = match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(serde_json::Value::Array(v)) => v.len(),
                _ => 1,
            };
        }
        lat.sort();
        rows.push((
            *name,
            answered,
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100],
            lat[lat.len() - 1],
        ));
    }

    // A snapshot, as the log's policy takes them (every 10,000 entries by default).
    let leader = match members.client(1) {
        Ok(c) => c.cluster().await.ok().and_then(|s| s.leader).unwrap_or(1),
        Err(_) => 1,
    };
    let t = Instant::now();
    snapshot(&http, &members.url(leader)).await;
    let snapshot = t.elapsed();

    let rss: Vec<f64> = (1..=3)
        .map(|id| members.pid(id).map_or(f64::NAN, rss_mib))
        .collect();
    let data: Vec<f64> = (1..=3).map(|id| dir_mib(&members.data_dir(id))).collect();

    // A fourth member joins: the leader's log was purged behind the snapshot, so it is
    // sent the image and installs it.
    let (join_secs, join_peak) = join_a_member(&http, tmp.path(), &members.url(leader)).await;
    if std::env::var_os("BENCH_KEEP").is_some() {
        eprintln!("members left running; files in {}", tmp.keep().display());
        std::mem::forget(members);
    }

    println!();
    println!(
        "control_history: {} finished builds over {} repositories, 3 members on loopback",
        n, a.repos
    );
    println!(
        "machine: {} cores; history written outside Raft in {:.0} s",
        std::thread::available_parallelism().map_or(0, |p| p.get()),
        grow.as_secs_f64()
    );
    println!();
    println!("| measure | value | target |");
    println!("| --- | --- | --- |");
    println!(
        "| RSS per member (restarted) | {} MiB | < 1024 MiB |",
        per_member(&rss_restarted)
    );
    println!(
        "| RSS per member (after queries) | {} MiB | < 1024 MiB |",
        per_member(&rss)
    );
    println!("| data dir per member | {} MiB | |", per_member(&data));
    println!(
        "| restart to caught up (slowest of 3) | {:.2} s | < 10 s |",
        restart.as_secs_f64()
    );
    println!(
        "| snapshot (forced, then log purge) | {} ms | does not grow with history |",
        ms(snapshot)
    );
    println!(
        "| a fourth member joins (image streamed and installed) | {:.1} s, peak RSS {join_peak:.0} MiB | |",
        join_secs.as_secs_f64()
    );
    println!(
        "| image sent to a follower that needs one | {image_mib:.0} MiB in {:.1} s | (grows with history) |",
        image_secs.as_secs_f64()
    );
    println!();
    println!(
        "| query ({} runs, member 1) | answered | p50 ms | p99 ms | max ms | target |",
        a.queries
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, answered, p50, p99, max) in rows {
        println!(
            "| {name} | {answered} | {} | {} | {} | < 10 ms |",
            ms(p50),
            ms(p99),
            ms(max)
        );
    }
}
