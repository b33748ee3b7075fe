//! `starling`: the one binary of Starling — control-plane member, client CLI and demo.

mod client_cmd;
mod demo;
mod demo_app;
mod follow;
mod metrics_http;
mod tables;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "starling", version, about = "Global, fast code deployment")]
struct Cli {
    /// Control-plane URL of any member, or several separated by commas: a member that
    /// cannot be reached is passed over for the next.
    #[arg(
        long,
        global = true,
        env = "STARLING_CONTROL",
        default_value = "http://127.0.0.1:7001"
    )]
    control: String,
    /// Bearer token for mutating calls (servers: the token they accept).
    #[arg(long, global = true, env = "STARLING_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the token from this file instead (it must not be readable by group or others).
    #[arg(
        long,
        global = true,
        env = "STARLING_TOKEN_FILE",
        conflicts_with = "token"
    )]
    token_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// For an `https://` control plane: the cluster CA's fingerprint (SHA-256 of its
    /// certificate, as `GET /v1/cluster` shows it and join tokens carry it).
    #[arg(long, global = true, env = "STARLING_CA_FINGERPRINT")]
    ca_fingerprint: Option<String>,
    /// How logs (standard error) are written: text for people, json for machines.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "STARLING_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one control-plane member.
    Control(ControlArgs),
    /// Run a build worker: lease builds, run them, publish their releases.
    Worker(WorkerArgs),
    /// Run a fleet node: fetch the releases of its repositories from the swarm and run them.
    Node(NodeArgs),
    /// Run the whole system on this machine with embedded defaults and show it working.
    Demo(demo::DemoArgs),
    /// The sample service `starling demo` deploys.
    #[command(subcommand, hide = true, name = "demo-app")]
    DemoApp(demo_app::DemoAppCmd),
    #[command(flatten)]
    Client(client_cmd::ClientCmd),
}

#[derive(clap::Args)]
struct ControlArgs {
    #[arg(long)]
    id: u64,
    #[arg(long)]
    listen: SocketAddr,
    /// Address the other members and clients reach this one at (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    #[arg(long)]
    data_dir: PathBuf,
    /// Start a new cluster with this member as its only voter.
    #[arg(long, conflicts_with = "join")]
    bootstrap: bool,
    /// Join the cluster that this member URL belongs to.
    #[arg(long)]
    join: Option<String>,
    /// Shared secret of the members' Raft traffic (at least 16 characters).
    #[arg(long, env = "STARLING_CLUSTER_KEY", hide_env_values = true)]
    cluster_key: String,
    /// How long a worker's lease on a build lasts without a heartbeat.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    lease_ttl: std::time::Duration,
    /// Leases a build may lose before it fails with `worker lost`.
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// Build a Raft snapshot after this many entries.
    #[arg(long, default_value_t = 10_000)]
    snapshot_every: u64,
    /// Releases kept per repository, beside every release a goal names.
    #[arg(long, default_value_t = 10)]
    keep_releases: usize,
    /// Origin-store chunks younger than this are never collected.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    collect_grace: std::time::Duration,
    /// Origin store: `s3://bucket[/prefix]` (built with `--features s3`; credentials and
    /// endpoint from AWS_* variables). Default: `<data-dir>/origin` on this member.
    #[arg(long, env = "STARLING_ORIGIN")]
    origin: Option<String>,
    /// Chunk bytes this member's origin directory may hold (`50GiB`; default: no limit);
    /// beyond it chunk uploads get 507 and the build fails.
    #[arg(long, env = "STARLING_ORIGIN_QUOTA", value_parser = parse_size)]
    origin_quota: Option<u64>,
    /// A token that may read build logs and release contents, and nothing else.
    #[arg(long, env = "STARLING_READ_TOKEN", hide_env_values = true)]
    read_token: Option<String>,
    /// Serve build logs and release contents without a token.
    #[arg(long)]
    public_read: bool,
    /// Client connections served at once (members' Raft traffic has room beyond these).
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// A connection on which nothing moves this long is closed.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    idle_timeout: std::time::Duration,
    /// UDP address the member serves the swarm on (the origin store and the tracker over
    /// QUIC); default: the HTTP listener's address and port, over UDP.
    #[arg(long)]
    peer_listen: Option<SocketAddr>,
    /// Serve HTTPS (API and Raft RPC) with a certificate from the cluster CA, and reach
    /// the other members over HTTPS; start every member with it. A joining member needs
    /// --ca-fingerprint.
    #[arg(long)]
    tls: bool,
}

#[derive(clap::Args)]
struct WorkerArgs {
    #[arg(long)]
    data_dir: PathBuf,
    /// Builds run at once.
    #[arg(long, default_value_t = 1)]
    slots: usize,
    /// Name in leases and history (default: host name and process id).
    #[arg(long)]
    name: Option<String>,
    /// The unprivileged user builds run as when the worker runs as root: a user name or
    /// UID:GID.
    #[arg(long, default_value = "nobody")]
    build_user: String,
    /// Serve `GET /metrics` (Prometheus) and `GET /healthz` on this address.
    #[arg(long, env = "STARLING_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(clap::Args)]
struct NodeArgs {
    /// The region this machine is in; peers in it are asked first.
    #[arg(long)]
    region: String,
    #[arg(long)]
    data_dir: PathBuf,
    /// A repository this machine runs (repeat for more).
    #[arg(long = "repo", required = true)]
    repos: Vec<String>,
    /// UDP address it serves chunks to its peers on.
    #[arg(long, default_value = "0.0.0.0:7400")]
    listen: SocketAddr,
    /// The address peers reach it at (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Its name, as in its certificate: lower-case letters, digits and '-' (default: the
    /// host name).
    #[arg(long)]
    name: Option<String>,
    /// Exchanged once for this machine's certificate.
    #[arg(long, env = "STARLING_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Disk the chunk store may use (`20G`, `512M`): over it, releases older than the
    /// current and previous one are let go. Chunks no kept release needs are always deleted.
    #[arg(long, value_parser = parse_size)]
    chunk_budget: Option<u64>,
    /// Serve `GET /metrics` (Prometheus) and `GET /healthz` on this address.
    #[arg(long, env = "STARLING_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// How long a release's `[deploy] health` command may keep failing before the
    /// release counts as failed on this node.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    health_timeout: std::time::Duration,
}

/// A user name, or `UID:GID`, as the ids builds run under.
fn resolve_user(spec: &str) -> Result<(u32, u32)> {
    if let Some((u, g)) = spec.split_once(':') {
        return Ok((
            u.parse().context("build user id")?,
            g.parse().context("build group id")?,
        ));
    }
    let name = std::ffi::CString::new(spec).context("build user name")?;
    // SAFETY: getpwnam(3) takes a NUL-terminated name and returns NULL or a pointer to a
    // static record that we read at once, before any other call could overwrite it.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!("no user {spec:?} for builds (--build-user NAME or UID:GID)");
    }
    // SAFETY: non-null, so it points to a valid passwd record (see above).
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    if uid == 0 {
        bail!("builds must not run as root (--build-user {spec})");
    }
    Ok((uid, gid))
}

/// The token from `--token-file`, which must be private to its owner, else `--token` or
/// STARLING_TOKEN.
fn token(cli: &Cli) -> Result<Option<String>> {
    let Some(path) = &cli.token_file else {
        return Ok(cli.token.clone());
    };
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("token file {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "token file {} is readable by others; chmod 600 it",
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("token file {}", path.display()))?;
    let t = text.trim();
    if t.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    Ok(Some(t.to_string()))
}

fn parse_size(s: &str) -> Result<u64, String> {
    starling_proto::parse_size(s).ok_or_else(|| format!("bad size {s:?} (try 50GiB, 500MiB)"))
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    starling_proto::parse_duration(s)
        .ok_or_else(|| format!("bad duration {s:?} (try 30s, 500ms, 2m)"))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // A control member does little CPU work per request and much waiting: on one runtime
    // thread its Raft, HTTP and apply tasks hand work to each other without cross-thread
    // wake-ups, which is most of a write's latency on a small machine. Blocking work (redb
    // commits, reads) runs on its own threads either way.
    let threads = std::env::var("STARLING_RUNTIME_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok());
    let mut rt = match (&cli.cmd, threads) {
        (_, Some(n)) if n > 1 => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        (Cmd::Control(_), _) | (_, Some(_)) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    rt.enable_all().build()?.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("STARLING_LOG")
            .unwrap_or_else(|_| "info,openraft=error".into())
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        // One JSON object a line, with the spans (build, deployment, ...) and their ids.
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
    let token = token(&cli)?;
    match cli.cmd {
        Cmd::Control(a) => {
            if !a.bootstrap
                && a.join.is_none()
                && !starling_control::log_store::has_log(&a.data_dir)
            {
                bail!("a new member needs --bootstrap or --join URL");
            }
            let token = token
                .context("an API token is required: STARLING_TOKEN, --token or --token-file")?;
            let cfg = starling_control::member::ControlConfig {
                id: a.id,
                listen: a.listen,
                advertise: a.advertise,
                data_dir: a.data_dir,
                bootstrap: a.bootstrap,
                join: a.join,
                api_token: token,
                read_token: a.read_token.filter(|t| !t.is_empty()),
                public_read: a.public_read,
                connections: starling_control::serve::ConnectionLimits {
                    max_clients: a.max_connections,
                    idle_timeout: a.idle_timeout,
                    ..Default::default()
                },
                cluster_key: a.cluster_key,
                lease_ttl: a.lease_ttl,
                max_attempts: a.max_attempts,
                snapshot_every: a.snapshot_every,
                keep_releases: a.keep_releases,
                collect_grace: a.collect_grace,
                origin: a.origin,
                origin_quota: a.origin_quota,
                peer_listen: a.peer_listen,
                tls: a.tls,
                ca_fingerprint: cli.ca_fingerprint.clone(),
            };
            starling_control::server::run(cfg).await?;
            Ok(())
        }
        Cmd::Node(a) => {
            // Trust in an https:// control plane: the fingerprint given, else the one in
            // the join token, else that of the CA the node enrolled with.
            let fingerprint = cli
                .ca_fingerprint
                .clone()
                .or_else(|| {
                    let t = a.join_token.as_deref()?;
                    Some(starling_proto::join_token::JoinToken::parse(t)?.ca_fingerprint)
                })
                .or_else(|| {
                    let pem = std::fs::read_to_string(a.data_dir.join("identity/ca.pem")).ok()?;
                    starling_pki::fingerprint(&pem).ok()
                });
            let client = control_client(&cli.control, token, fingerprint)?;
            let name = match a.name {
                Some(n) => n,
                None => {
                    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
                    host.trim()
                        .to_ascii_lowercase()
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                        .collect()
                }
            };
            let metrics = std::sync::Arc::new(starling_node::metrics::NodeMetrics::default());
            if let Some(addr) = a.metrics_listen {
                let m = metrics.clone();
                metrics_http::serve(addr, std::sync::Arc::new(move || m.render())).await?;
            }
            let cfg = starling_node::daemon::NodeConfig {
                name,
                region: a.region,
                data_dir: a.data_dir,
                repos: a
                    .repos
                    .iter()
                    .map(|r| starling_proto::repo_name(r))
                    .collect::<Result<_, _>>()?,
                listen: a.listen,
                advertise: a.advertise,
                join_token: a.join_token,
                chunk_budget: a.chunk_budget,
                health_deadline: a.health_timeout,
                metrics: metrics.clone(),
            };
            starling_node::daemon::run(cfg, client).await?;
            Ok(())
        }
        Cmd::Worker(a) => {
            let client = control_client(&cli.control, token, cli.ca_fingerprint.clone())?;
            let name = a.name.unwrap_or_else(|| {
                let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
                format!("{}-{}", host.trim(), std::process::id())
            });
            let metrics = std::sync::Arc::new(starling_worker::metrics::WorkerMetrics::default());
            if let Some(addr) = a.metrics_listen {
                let m = metrics.clone();
                metrics_http::serve(addr, std::sync::Arc::new(move || m.render())).await?;
            }
            let cfg = starling_worker::worker::WorkerConfig {
                name,
                data_dir: a.data_dir,
                slots: a.slots,
                build_user: resolve_user(&a.build_user)?,
                metrics,
            };
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                }
                tracing::info!("stopping: running builds finish first");
                let _ = stop_tx.send(true);
            });
            starling_worker::worker::run_worker(cfg, client, stop_rx)
                .await
                .map_err(anyhow::Error::msg)
        }
        Cmd::Demo(a) => demo::run(a).await,
        Cmd::DemoApp(a) => demo_app::run(a),
        Cmd::Client(c) => {
            let client = control_client(&cli.control, token, cli.ca_fingerprint.clone())?;
            client_cmd::run(&client, c, cli.json).await
        }
    }
}

/// A client of the control plane at `url` that trusts an `https://` one by the CA
/// `fingerprint`.
fn control_client(
    url: &str,
    token: Option<String>,
    fingerprint: Option<String>,
) -> Result<starling_client::ControlClient> {
    let trust = starling_pki::CaTrust::new(fingerprint);
    Ok(starling_client::ControlClient::with_trust(
        url,
        token,
        Some(trust),
    )?)
}
