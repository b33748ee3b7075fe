//! Distribution benchmark: how long one release takes to reach every node of a fleet, in
//! network namespaces with `tc`-shaped links (`starling_harness::testbed`), for three
//! systems in one run on the same topology:
//!
//! 1. **Starling**: three control members (the origin) on the origin host, nodes that
//!    enrol with a join token and fetch over QUIC when `deploy` sets the goal. A node is
//!    done when it has verified, unpacked and activated the release (`activated_at`).
//! 2. **A central HTTP server**: nginx on the origin host, `curl` on every node.
//! 3. **BitTorrent**: `opentracker` and an `aria2c` seed on the origin host, `aria2c` on
//!    every node, seeding as it leeches (1 MiB pieces, no DHT, no local discovery).
//!
//! For each: the time until the last node holds the verified release and the median,
//! the fluid lower bound `max(S/u_origin, N·S/(u_origin + Σu_nodes), S/u_WAN)` and the
//! ratio to it, the copies each remote region received over its WAN link, and the
//! copies the origin host sent (kernel counters, so QUIC, TCP and Ethernet framing count
//! too; for Starling the origin's count also holds its TCP acknowledgements of the
//! worker's uploads, about 0.07 of a copy for three members).
//!
//! Needs root, iproute2, nginx, curl, aria2, opentracker and mktorrent
//! (`apt-get install iproute2 nginx-light curl aria2 opentracker mktorrent`).
//! `cargo bench --bench distribution -- --regions 3 --nodes 4 --size-mib 48
//! --node-mbit 40 --origin-mbit 40 --wan-mbit 100 [--systems starling,http,bittorrent]`;
//! with `BENCH_KEEP=1` every process's log stays in a directory it names.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use starling_harness::testbed::{Host, Testbed, TestbedSpec};
use starling_harness::{noise, wait_for, Members, MembersConfig};
use starling_proto::{BuildStatus, DeployRequest, RepoSpec, Strategy, TriggerRequest};
use tokio::process::{Child, Command};

const TOKEN: &str = "bench-token-0123456789";
const CLUSTER_KEY: &str = "bench-cluster-key-0123456789";
const MBIT: u64 = 1_000_000;

struct Args {
    spec: TestbedSpec,
    size: u64,
    systems: Vec<String>,
}

fn args() -> Args {
    let mut a = Args {
        spec: TestbedSpec {
            regions: 3,
            nodes_per_region: 4,
            node_rate: 40 * MBIT,
            origin_rate: 40 * MBIT,
            wan_rate: 100 * MBIT,
        },
        size: 48 << 20,
        systems: vec!["starling".into(), "http".into(), "bittorrent".into()],
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        if flag == "--bench" {
            continue; // cargo bench adds it
        }
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let n = || -> u64 {
            value
                .parse()
                .unwrap_or_else(|_| panic!("{flag} {value}: not a number"))
        };
        match flag.as_str() {
            "--regions" => a.spec.regions = n() as usize,
            "--nodes" => a.spec.nodes_per_region = n() as usize,
            "--size-mib" => a.size = n() << 20,
            "--node-mbit" => a.spec.node_rate = n() * MBIT,
            "--origin-mbit" => a.spec.origin_rate = n() * MBIT,
            "--wan-mbit" => a.spec.wan_rate = n() * MBIT,
            "--systems" => a.systems = value.split(',').map(str::to_string).collect(),
            _ => panic!("unknown flag {flag}"),
        }
    }
    a
}

/// One system's run: each node's time to the verified release, and the bytes each region
/// received over its WAN link.
struct Outcome {
    system: &'static str,
    times: Vec<Duration>,
    wan: Vec<u64>,
    /// Bytes the origin host sent.
    origin: u64,
    /// Starling's time from the deployment's start to a node holding the release (p50,
    /// p99), as the deployment reports it.
    staged: Option<(Duration, Duration)>,
}

#[tokio::main]
async fn main() {
    let args = args();
    if let Some(why) = Testbed::unavailable() {
        println!("distribution benchmark skipped: {why}");
        return;
    }
    let work = tempfile::tempdir().expect("a temporary directory");
    let payload = noise(7, args.size as usize);
    let spec = args.spec.clone();
    let bed = tokio::task::spawn_blocking(move || Testbed::build(spec))
        .await
        .expect("building the testbed")
        .expect("building the testbed");
    let mut outcomes = Vec::new();
    for system in &args.systems {
        let dir = work.path().join(system);
        std::fs::create_dir_all(&dir).expect("a directory per system");
        let before = wan(&bed);
        let origin_before = bed.sent_by(bed.origin()).expect("the origin's counter");
        let (name, (times, staged)) = match system.as_str() {
            "starling" => ("starling", starling(&bed, &dir, &payload).await),
            "http" => (
                "central HTTP (nginx)",
                (http(&bed, &dir, &payload).await, None),
            ),
            "bittorrent" => (
                "BitTorrent (aria2c)",
                (bittorrent(&bed, &dir, &payload).await, None),
            ),
            other => panic!("unknown system {other}"),
        };
        let after = wan(&bed);
        let origin_after = bed.sent_by(bed.origin()).expect("the origin's counter");
        outcomes.push(Outcome {
            system: name,
            times,
            wan: after.iter().zip(&before).map(|(a, b)| a - b).collect(),
            origin: origin_after - origin_before,
            staged,
        });
    }
    report(&args, &outcomes);
    if std::env::var_os("BENCH_KEEP").is_some() {
        println!("logs kept in {}", work.keep().display());
    }
}

fn report(args: &Args, outcomes: &[Outcome]) {
    let s = &args.spec;
    let n = (s.regions * s.nodes_per_region) as f64;
    let bits = (args.size * 8) as f64;
    let bound = (bits / s.origin_rate as f64)
        .max(n * bits / (s.origin_rate as f64 + n * s.node_rate as f64))
        .max(if s.regions > 1 {
            bits / s.wan_rate as f64
        } else {
            0.0
        });
    println!();
    println!(
        "{} regions × {} nodes, release {} MiB; upload per node {} Mbit/s, origin {} Mbit/s, \
         WAN {} Mbit/s each way; tc tbf in network namespaces on {} cores; starling {} build",
        s.regions,
        s.nodes_per_region,
        args.size >> 20,
        s.node_rate / MBIT,
        s.origin_rate / MBIT,
        s.wan_rate / MBIT,
        std::thread::available_parallelism().map_or(0, |p| p.get()),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    );
    println!("fluid lower bound: {bound:.2} s");
    println!(
        "{:<22} {:>9} {:>10} {:>9} {:>10} {:>14}  WAN copies per remote region",
        "system", "last (s)", "median (s)", "× bound", "× starling", "origin copies"
    );
    let last = |o: &Outcome| o.times.iter().max().copied().unwrap_or_default();
    let starling = outcomes
        .iter()
        .find(|o| o.system == "starling")
        .map(|o| last(o).as_secs_f64());
    for o in outcomes {
        let mut t = o.times.clone();
        t.sort();
        let median = t.get(t.len() / 2).copied().unwrap_or_default();
        let l = last(o).as_secs_f64();
        let copies: Vec<String> = o.wan[1..]
            .iter()
            .map(|b| format!("{:.2}", *b as f64 / args.size as f64))
            .collect();
        println!(
            "{:<22} {:>9.2} {:>10.2} {:>9.2} {:>10} {:>14.2}  {}",
            o.system,
            l,
            median.as_secs_f64(),
            l / bound,
            starling.map_or("-".into(), |st| format!("{:.2}", l / st)),
            o.origin as f64 / args.size as f64,
            copies.join(" ")
        );
    }
    for (o, (p50, p99)) in outcomes.iter().filter_map(|o| Some((o, o.staged?))) {
        println!(
            "{}: time to staged (the release held, verified and unpacked) p50 {:.2} s, p99 {:.2} s; \
             {:.2}× and {:.2}× the bound",
            o.system,
            p50.as_secs_f64(),
            p99.as_secs_f64(),
            p50.as_secs_f64() / bound,
            p99.as_secs_f64() / bound
        );
    }
}

fn wan(bed: &Testbed) -> Vec<u64> {
    (0..bed.spec().regions)
        .map(|k| bed.wan_received(k).expect("a WAN counter"))
        .collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Start `program args…` on `host` with `env` added, its output to `log`; killed when
/// dropped.
fn spawn(host: &Host, program: &str, args: &[&str], env: &[(&str, &str)], log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("a log file");
    host.command(program)
        .args(args)
        .envs(env.iter().copied())
        .stdout(log.try_clone().expect("a log file"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"))
}

fn node_name(h: &Host) -> String {
    format!(
        "r{}-{}",
        h.region,
        h.netns.rsplit('-').next().unwrap_or_default()
    )
}

async fn starling(
    bed: &Testbed,
    dir: &Path,
    payload: &[u8],
) -> (Vec<Duration>, Option<(Duration, Duration)>) {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_starling"));
    let mut members = Members::new(
        MembersConfig {
            exe: exe.clone(),
            dir: dir.to_path_buf(),
            token: TOKEN.into(),
            cluster_key: CLUSTER_KEY.into(),
            base_port: Some(7001),
            args: Vec::new(),
            env: Vec::new(),
            host: Some(bed.origin().clone()),
            tls: false,
        },
        3,
    );
    members
        .start(Duration::from_secs(60))
        .await
        .expect("starting the members");
    let control = members.client(1).expect("a client");
    wait_for("the cluster CA", Duration::from_secs(30), || async {
        control.cluster().await.ok().and_then(|s| s.cluster_ca)
    })
    .await
    .expect("the cluster CA");

    // The release: one file of noise, built by a real worker from a git repository.
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).expect("the repository");
    std::fs::write(repo.join("blob"), payload).expect("the payload");
    std::fs::write(
        repo.join("starling.toml"),
        "[build]\ncommand = \"mkdir -p dist && cp blob dist/\"\noutput = \"dist\"\n",
    )
    .expect("starling.toml");
    for args in [
        &["init", "-q", "-b", "main"][..],
        &["add", "."],
        &[
            "-c",
            "user.name=b",
            "-c",
            "user.email=b@b",
            "commit",
            "-q",
            "-m",
            "bench",
        ],
    ] {
        let ok = std::process::Command::new("git")
            .args(args)
            .current_dir(&repo)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "git {args:?}");
    }
    control
        .put_repo(&RepoSpec {
            name: "bench/app".into(),
            url: format!("file://{}", repo.display()),
            branch: "main".into(),
            webhook_secret: String::new(),
            auto_deploy: false,
            max_release_bytes: 1 << 32,
            notify: Vec::new(),
            notify_secret: String::new(),
            rollout: Default::default(),
        })
        .await
        .expect("adding the repository");
    let exe_s = exe.to_string_lossy().to_string();
    let url = members.url(1);
    let worker_dir = dir.join("worker").to_string_lossy().to_string();
    let _worker = spawn(
        bed.builder(),
        &exe_s,
        &[
            "--control",
            &url,
            "worker",
            "--name",
            "w1",
            "--data-dir",
            &worker_dir,
        ],
        &[("STARLING_TOKEN", TOKEN)],
        &dir.join("worker.log"),
    );
    let queued = control
        .trigger(&TriggerRequest {
            repo: "bench/app".into(),
            sha: None,
            force: false,
        })
        .await
        .expect("queueing the build");
    let release = wait_for("the build", Duration::from_secs(600), || async {
        let b = control.build(queued.build.id).await.ok()?;
        if b.status.is_terminal() {
            assert_eq!(b.status, BuildStatus::Succeeded, "{b:?}");
            return b.release;
        }
        None
    })
    .await
    .expect("the build");
    let token = control
        .create_join_token(Duration::from_secs(3600))
        .await
        .expect("a join token")
        .token;

    let mut nodes = Vec::new();
    for h in bed.nodes() {
        let name = node_name(h);
        let data = dir.join(&name).to_string_lossy().to_string();
        let listen = format!("{}:7400", h.ip);
        let region = format!("r{}", h.region);
        nodes.push(spawn(
            h,
            &exe_s,
            &[
                "--control",
                &url,
                "node",
                "--name",
                &name,
                "--region",
                &region,
                "--data-dir",
                &data,
                "--repo",
                "bench/app",
                "--listen",
                &listen,
            ],
            &[("STARLING_JOIN_TOKEN", &token)],
            &dir.join(format!("{name}.log")),
        ));
    }
    let n = nodes.len();
    wait_for(
        "every node to announce itself",
        Duration::from_secs(120),
        || async { control.nodes().await.ok().filter(|v| v.len() == n) },
    )
    .await
    .expect("nodes");
    let deployment = control
        .deploy(&DeployRequest {
            repo: "bench/app".into(),
            release: Some(release),
            env: "default".into(),
            strategy: Some(Strategy::AllAtOnce),
            soak_ms: None,
            max_failed_pct: None,
            wave_timeout_ms: None,
        })
        .await
        .expect("deploying");
    let seen = wait_for(
        "every node to run the release",
        Duration::from_secs(1800),
        || async {
            let v = control.nodes().await.ok()?;
            let done: Vec<u64> = v
                .iter()
                .filter(|x| x.release == Some(release))
                .filter_map(|x| x.activated_at)
                .collect();
            (done.len() == n).then_some(done)
        },
    )
    .await
    .expect("the deploy");
    let progress = control
        .deployment(deployment.id)
        .await
        .expect("the deployment")
        .progress;
    let staged = progress
        .staged_p50_ms
        .zip(progress.staged_p99_ms)
        .map(|(a, b)| (Duration::from_millis(a), Duration::from_millis(b)));
    drop(nodes);
    let times = seen
        .iter()
        .map(|at| Duration::from_millis(at.saturating_sub(deployment.created_at)))
        .collect();
    (times, staged)
}

async fn http(bed: &Testbed, dir: &Path, payload: &[u8]) -> Vec<Duration> {
    let root = dir.join("www");
    std::fs::create_dir_all(&root).expect("the web root");
    std::fs::write(root.join("release.bin"), payload).expect("the payload");
    let ip = bed.origin().ip;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; sendfile on; tcp_nopush on;\n\
               client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n\
               uwsgi_temp_path {d}; scgi_temp_path {d};\n\
               server {{ listen {ip}:8080; root {r}; }} }}\n",
            d = dir.display(),
            r = root.display()
        ),
    )
    .expect("nginx.conf");
    let conf_s = conf.to_string_lossy().to_string();
    let _nginx = spawn(
        bed.origin(),
        "nginx",
        &["-c", &conf_s],
        &[],
        &dir.join("nginx.log"),
    );
    let url = format!("http://{ip}:8080/release.bin");
    wait_for("nginx to listen", Duration::from_secs(30), || async {
        let ok = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "-r", "0-0", &url])
            .status()
            .await
            .is_ok_and(|s| s.success());
        ok.then_some(())
    })
    .await
    .expect("nginx");
    let start = Instant::now();
    let mut downloads = Vec::new();
    for h in bed.nodes() {
        let out = dir.join(format!("{}.bin", node_name(h)));
        let child = h
            .command("curl")
            .args(["-sf", "-o"])
            .arg(&out)
            .arg(&url)
            .kill_on_drop(true)
            .spawn()
            .expect("curl");
        downloads.push((out, child));
    }
    let mut times = Vec::new();
    let waits = downloads.into_iter().map(|(out, mut child)| async move {
        let ok = child.wait().await.is_ok_and(|s| s.success());
        (out, ok, start.elapsed())
    });
    for (out, ok, took) in futures::future::join_all(waits).await {
        assert!(ok, "curl into {} failed", out.display());
        assert!(
            std::fs::read(&out).is_ok_and(|b| b == payload),
            "{} differs",
            out.display()
        );
        times.push(took);
    }
    times
}

async fn bittorrent(bed: &Testbed, dir: &Path, payload: &[u8]) -> Vec<Duration> {
    let ip = bed.origin().ip;
    let seed = dir.join("seed");
    std::fs::create_dir_all(&seed).expect("the seed's directory");
    std::fs::write(seed.join("release.bin"), payload).expect("the payload");
    let torrent = dir.join("release.torrent");
    let announce = format!("http://{ip}:6969/announce");
    let made = std::process::Command::new("mktorrent")
        .args(["-l", "20", "-a", &announce, "-o"])
        .arg(&torrent)
        .arg(seed.join("release.bin"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(made, "mktorrent failed");
    let shown = std::process::Command::new("aria2c")
        .arg("-S")
        .arg(&torrent)
        .output()
        .expect("aria2c -S");
    let text = String::from_utf8_lossy(&shown.stdout);
    let info_hash = text
        .lines()
        .find_map(|l| l.strip_prefix("Info Hash: "))
        .expect("an info hash")
        .trim()
        .to_string();
    // Debian's opentracker serves only the info hashes in its whitelist. It refuses to run
    // as root: it chroots into its directory and becomes `nobody`, who must read the list.
    let jail = dir.join("tracker");
    std::fs::create_dir_all(&jail).expect("the tracker's directory");
    std::fs::write(jail.join("whitelist"), format!("{info_hash}\n")).expect("the whitelist");
    for (path, mode) in [(&jail, 0o755), (&jail.join("whitelist"), 0o644)] {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("chmod");
    }
    let d = jail.to_string_lossy().to_string();
    let ip_s = ip.to_string();
    let _tracker = spawn(
        bed.origin(),
        "opentracker",
        &[
            "-i",
            &ip_s,
            "-p",
            "6969",
            "-P",
            "6969",
            "-d",
            &d,
            "-w",
            "whitelist",
            "-u",
            "nobody",
        ],
        &[],
        &dir.join("opentracker.log"),
    );
    let torrent_s = torrent.to_string_lossy().to_string();
    let common = [
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--seed-ratio=0.0",
        "--file-allocation=none",
        "--summary-interval=0",
        "--console-log-level=warn",
        "--bt-max-peers=0",
        "--listen-port=6881",
    ];
    let seed_s = seed.to_string_lossy().to_string();
    let mut seeder_args = vec!["--bt-seed-unverified=true", "-d", &seed_s];
    seeder_args.extend(common);
    seeder_args.push(&torrent_s);
    let _seeder = spawn(
        bed.origin(),
        "aria2c",
        &seeder_args,
        &[],
        &dir.join("seed.log"),
    );
    // The seed must be known to the tracker before the leechers ask it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start_ms = now_ms();
    let mut leechers = Vec::new();
    let mut marks = Vec::new();
    for h in bed.nodes() {
        let name = node_name(h);
        let into = dir.join(&name);
        std::fs::create_dir_all(&into).expect("a node's directory");
        // aria2c runs this when the download is complete and checked, then seeds on.
        let hook = dir.join(format!("{name}.done.sh"));
        let mark = dir.join(format!("{name}.done"));
        std::fs::write(
            &hook,
            format!("#!/bin/sh\ndate +%s%3N > {}\n", mark.display()),
        )
        .expect("the hook");
        let _ = std::process::Command::new("chmod")
            .arg("+x")
            .arg(&hook)
            .status();
        let on_done = format!("--on-bt-download-complete={}", hook.display());
        let into_s = into.to_string_lossy().to_string();
        let mut a = vec!["-d", &into_s, &on_done];
        a.extend(common);
        a.push(&torrent_s);
        leechers.push(spawn(
            h,
            "aria2c",
            &a,
            &[],
            &dir.join(format!("{name}.log")),
        ));
        marks.push((into.join("release.bin"), mark));
    }
    let done = wait_for(
        "every leecher to finish",
        Duration::from_secs(1800),
        || async {
            let at: Vec<u64> = marks
                .iter()
                .filter_map(|(_, m)| std::fs::read_to_string(m).ok()?.trim().parse().ok())
                .collect();
            (at.len() == marks.len()).then_some(at)
        },
    )
    .await
    .expect("BitTorrent");
    for (file, _) in &marks {
        assert!(
            std::fs::read(file).is_ok_and(|b| b == payload),
            "{} differs",
            file.display()
        );
    }
    drop(leechers);
    done.iter()
        .map(|at| Duration::from_millis(at.saturating_sub(start_ms)))
        .collect()
}
