//! Control-plane write benchmark: acknowledged writes per second and latency percentiles of
//! a real 3-member Starling cluster, beside a 3-member etcd cluster (the baseline) started
//! on loopback in the same run, at 1, 16 and 64 concurrent clients.
//!
//! Both are driven by the same HTTP/1.1 client (reqwest) with JSON bodies: Starling through
//! `POST /v1/trigger` (each write queues a new build: a Raft entry, a state change, an
//! event), etcd through its v3 JSON gateway `POST /v3/kv/put`. Every write goes to the
//! leader. A write counts once its 2xx answer arrives, i.e. after the leader has it
//! committed by a quorum.
//!
//! `cargo bench --bench control_writes` (env `BENCH_SECS`, default 5, seconds per cell).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use starling_harness::{Members, MembersConfig};
use tokio::process::{Child, Command};

const TOKEN: &str = "bench-token-0123456789";
const CLUSTER_KEY: &str = "bench-cluster-key-0123456789";
const CONCURRENCY: [usize; 3] = [1, 16, 64];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

#[derive(Clone)]
enum System {
    Starling { url: String },
    Etcd { url: String },
}

impl System {
    fn name(&self) -> &'static str {
        match self {
            System::Starling { .. } => "starling",
            System::Etcd { .. } => "etcd",
        }
    }

    async fn write(&self, http: &reqwest::Client, client: usize, n: u64) -> bool {
        let resp = match self {
            System::Starling { url } => {
                let sha = format!("{client:08x}{n:032x}");
                http.post(format!("{url}/v1/trigger"))
                    .bearer_auth(TOKEN)
                    .json(&serde_json::json!({"repo": "bench/repo", "sha": sha}))
                    .send()
                    .await
            }
            System::Etcd { url } => {
                let b64 = base64::engine::general_purpose::STANDARD;
                let key = b64.encode(format!("bench/{client}/{n}"));
                let value = b64.encode(format!("{:040x}", n));
                http.post(format!("{url}/v3/kv/put"))
                    .json(&serde_json::json!({"key": key, "value": value}))
                    .send()
                    .await
            }
        };
        resp.is_ok_and(|r| r.status().is_success())
    }

    /// A request that goes through the same client, HTTP and JSON but not through
    /// consensus: a local read. What is left of a write's latency is the replicated path.
    async fn local_read(&self, http: &reqwest::Client) -> bool {
        let resp = match self {
            System::Starling { url } => {
                http.get(format!("{url}/v1/repos?stale=1"))
                    .bearer_auth(TOKEN)
                    .send()
                    .await
            }
            System::Etcd { url } => {
                let b64 = base64::engine::general_purpose::STANDARD;
                http.post(format!("{url}/v3/kv/range"))
                    .json(
                        &serde_json::json!({"key": b64.encode("bench/0/0"), "serializable": true}),
                    )
                    .send()
                    .await
            }
        };
        match resp {
            Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
            Err(_) => false,
        }
    }
}

/// The median latency of 500 local reads, one at a time.
async fn local_read_floor(sys: &System) -> Duration {
    let http = starling_client::http_builder(None)
        .expect("an HTTP client")
        .no_proxy()
        .build()
        .unwrap_or_default();
    let mut lat = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        if sys.local_read(&http).await {
            lat.push(t.elapsed());
        }
    }
    lat.sort();
    lat.get(lat.len() / 2).copied().unwrap_or_default()
}

struct Cell {
    ops: usize,
    errors: usize,
    secs: f64,
    p50: Duration,
    p99: Duration,
}

async fn measure(sys: &System, clients: usize, secs: f64) -> Cell {
    let http = starling_client::http_builder(None)
        .expect("an HTTP client")
        .no_proxy()
        .pool_max_idle_per_host(128)
        .build()
        .unwrap_or_default();
    // Warm up connections and caches.
    for i in 0..clients.min(8) {
        sys.write(&http, 1_000_000 + i, 0).await;
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let stamp = start.elapsed().as_nanos() as u64;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (sys, http) = (sys.clone(), http.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let ok = sys.write(&http, c + clients * 1000, stamp + n).await;
                n += 1;
                if ok {
                    lat.push(t.elapsed());
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Cell {
        ops: all.len(),
        errors,
        secs,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

async fn wait_http(url: &str, what: &str) {
    let http = starling_client::http_builder(None)
        .expect("an HTTP client")
        .no_proxy()
        .build()
        .unwrap_or_default();
    for _ in 0..300 {
        if http
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not come up at {url}");
}

/// A 3-member Starling cluster, started by the same harness as the demo and the tests.
async fn start_starling(dir: &Path) -> (Members, System) {
    let mut members = Members::new(
        MembersConfig {
            exe: env!("CARGO_BIN_EXE_starling").into(),
            dir: dir.join("starling"),
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
        .unwrap_or_else(|e| panic!("starting starling: {e}"));
    let url = members.url(1);
    let http = starling_client::http_builder(None)
        .expect("an HTTP client")
        .no_proxy()
        .build()
        .unwrap_or_default();
    let r = http
        .post(format!("{url}/v1/repos"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"name": "bench/repo", "url": "file:///dev/null"}))
        .send()
        .await;
    assert!(
        r.is_ok_and(|r| r.status().is_success()),
        "registering the bench repository"
    );
    (members, System::Starling { url })
}

async fn start_etcd(dir: &Path) -> Option<(Vec<Child>, System)> {
    if std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .is_err()
    {
        return None;
    }
    let client: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peer: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let initial: Vec<String> = (0..3)
        .map(|i| format!("e{i}=http://127.0.0.1:{}", peer[i]))
        .collect();
    let mut children = Vec::new();
    for i in 0..3 {
        let child = Command::new("etcd")
            .args(["--name", &format!("e{i}")])
            .arg("--data-dir")
            .arg(dir.join(format!("e{i}")))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", client[i]),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", client[i]),
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", peer[i]),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", peer[i]),
            ])
            .args(["--initial-cluster", &initial.join(",")])
            .args([
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "bench",
            ])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .ok()?;
        children.push(child);
    }
    let http = starling_client::http_builder(None)
        .expect("an HTTP client")
        .no_proxy()
        .build()
        .unwrap_or_default();
    for port in &client {
        wait_http(&format!("http://127.0.0.1:{port}/health"), "etcd").await;
    }
    // Find the leader: the member whose own id is the leader id it reports.
    for _ in 0..100 {
        for port in &client {
            let url = format!("http://127.0.0.1:{port}");
            if let Ok(r) = http
                .post(format!("{url}/v3/maintenance/status"))
                .json(&serde_json::json!({}))
                .send()
                .await
            {
                if let Ok(v) = r.json::<serde_json::Value>().await {
                    if v["leader"].is_string() && v["leader"] == v["header"]["member_id"] {
                        return Some((children, System::Etcd { url }));
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// The durable-write floor of this disk, to read the table against: a 4 KiB append with
/// `fdatasync`, which grows the file (what a WAL that is not preallocated does per batch),
/// and a 4 KiB write over blocks the file already has, with `fdatasync` (what Starling's
/// log does per batch: its segments are filled with zeros ahead). Median of 300 each.
fn storage_floor(dir: &Path) {
    use std::os::unix::fs::FileExt;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let block = vec![7u8; 4096];
    let timed = |name: &str, zeros: usize| {
        let f = std::fs::File::create(dir.join(name)).unwrap_or_else(|e| panic!("{e}"));
        f.write_all_at(&vec![0; zeros], 0)
            .and_then(|_| f.sync_all())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut v = Vec::new();
        for i in 0..300u64 {
            let t = Instant::now();
            f.write_all_at(&block, i * 4096)
                .and_then(|_| f.sync_data())
                .unwrap_or_else(|e| panic!("{e}"));
            v.push(t.elapsed());
        }
        median(v)
    };
    let append = timed("floor.append", 0);
    let overwrite = timed("floor.wal", 300 * 4096);
    println!(
        "disk floor: 4 KiB append+fdatasync {:.3} ms, 4 KiB overwrite+fdatasync {:.3} ms (medians of 300)",
        append.as_secs_f64() * 1e3,
        overwrite.as_secs_f64() * 1e3
    );
}

fn conditions() {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let etcd = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|_| "not installed".into());
    println!(
        "conditions: {cpus} CPUs, 3 members each on 127.0.0.1, data on {}",
        std::env::temp_dir().display()
    );
    println!(
        "baseline:   {etcd}, default settings (fsync of its WAL before every acknowledged batch)"
    );
    println!("starling:   openraft log in a write-ahead log (wal/), fdatasync before every acknowledged batch on");
    println!(
        "            every member; state-machine rows (state.redb) fsynced about once a second,"
    );
    println!("            the rest recovered by log replay; Raft RPC postcard over HTTP/1.1");
    println!("client:     reqwest HTTP/1.1 + JSON for both, every write sent to the leader");
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    conditions();
    println!("duration:   {secs} s per cell");
    storage_floor(dir.path());
    println!();

    let (starling_children, starling) = start_starling(dir.path()).await;
    let etcd = start_etcd(dir.path()).await;
    if etcd.is_none() {
        println!("etcd is not installed (apt-get install etcd-server): measuring Starling alone\n");
    }
    let systems: Vec<System> = std::iter::once(starling)
        .chain(etcd.as_ref().map(|(_, s)| s.clone()))
        .collect();

    for sys in &systems {
        println!(
            "{:<9} local read (HTTP and JSON, no consensus), p50 of 500: {:.3} ms",
            sys.name(),
            local_read_floor(sys).await.as_secs_f64() * 1e3
        );
    }
    println!();
    println!(
        "{:<9} {:>8} {:>10} {:>9} {:>9} {:>7}",
        "system", "clients", "writes/s", "p50 ms", "p99 ms", "errors"
    );
    let mut rows = Vec::new();
    for &clients in &CONCURRENCY {
        for sys in &systems {
            let c = measure(sys, clients, secs).await;
            let wps = c.ops as f64 / c.secs;
            println!(
                "{:<9} {:>8} {:>10.0} {:>9.2} {:>9.2} {:>7}",
                sys.name(),
                clients,
                wps,
                c.p50.as_secs_f64() * 1e3,
                c.p99.as_secs_f64() * 1e3,
                c.errors
            );
            rows.push((sys.name(), clients, wps));
        }
    }
    if etcd.is_some() {
        println!("\nratio starling/etcd (writes/s):");
        for &clients in &CONCURRENCY {
            let get = |n: &str| {
                rows.iter()
                    .find(|r| r.0 == n && r.1 == clients)
                    .map_or(0.0, |r| r.2)
            };
            let ratio = get("starling") / get("etcd").max(1e-9);
            println!("  {clients:>3} clients: {ratio:.2}x");
        }
    }
    drop(starling_children);
    drop(etcd);
}
