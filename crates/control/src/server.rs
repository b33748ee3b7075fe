//! One control-plane member: opens its Raft log and redb files, starts openraft, serves
//! the HTTP API and Raft RPC on one port (openraft on the same runtime thread), the swarm
//! on a thread of its own, bootstraps or joins the cluster, and runs the lease reaper
//! while it leads.

use starling_swarm::pace::{REGION_GATEWAYS, TRACKER_PEERS, TRACKER_TTL};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::{BasicNode, Config, SnapshotPolicy};
use starling_proto::{Command, JoinRequest, Outcome};
use starling_release::{FsChunkStore, OriginStore};

use crate::log_store::LogStore;
use crate::member::{now_ms, pki_ca, ControlConfig, Member};
use crate::metrics::ControlMetrics;
use crate::network::{PeerNetwork, CLUSTER_KEY_HEADER};
use crate::store::{Files, StateMachineStore};
use crate::Raft;
use backon::Retryable;
use starling_core::reaper::LeaseReaper;
use starling_core::retry::backoff;
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("storage: {0}")]
    Storage(#[from] std::io::Error),
    #[error("origin store: {0}")]
    Origin(#[from] starling_release::ReleaseError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("configuration: {0}")]
    Config(String),
}

/// Start a member and serve until the process ends.
pub async fn run(mut cfg: ControlConfig) -> Result<(), ControlError> {
    if cfg.cluster_key.len() < 16 {
        return Err(ControlError::Config(
            "the cluster key must be at least 16 characters (STARLING_CLUSTER_KEY)".into(),
        ));
    }
    if cfg.api_token.is_empty() {
        return Err(ControlError::Config(
            "an API token is required (STARLING_TOKEN or --token)".into(),
        ));
    }
    // Before anything is written: a bad origin must not leave a half-started member.
    let origin = open_origin(&cfg)?;
    let files = Files::open(&cfg.data_dir)?;
    // Bound before Raft starts: with `--listen host:0` the address members know this one
    // by is the one the kernel chose.
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let bound = listener.local_addr()?;
    let advertise = cfg.advertise.clone().unwrap_or_else(|| bound.to_string());
    cfg.advertise = Some(advertise.clone());
    write_listen_addr(&cfg.data_dir, bound)?;
    let log = LogStore::open(&cfg.data_dir)?;
    let metrics = Arc::new(ControlMetrics::new());
    let sm = StateMachineStore::open(files.state, files.snapshots, metrics.clone())?;
    let state = sm.shared();
    let archive = sm.archive();
    let state_sync = sm.state_sync();
    let events = sm.events();
    let fault = sm.fault();

    let raft_cfg = Config {
        cluster_name: "starling".into(),
        heartbeat_interval: 150,
        election_timeout_min: 500,
        election_timeout_max: 1000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
        max_in_snapshot_log_to_keep: 500,
        // Entries are readable as soon as `append` returns (the log store's tail): let
        // replication send them then, not after the core's next round of messages.
        broadcast_submitted_on_append: Some(true),
        ..Default::default()
    };
    let raft_cfg = Arc::new(
        raft_cfg
            .validate()
            .map_err(|e| ControlError::Config(e.to_string()))?,
    );
    // openraft spawns its core, its state-machine worker and its replication tasks on the
    // runtime `Raft::new` runs on: this one, the HTTP API's, so that a write crosses no
    // thread between the API, Raft and the answer (see ARCHITECTURE.md, "one runtime").
    let id = cfg.id;
    let trust = starling_pki::CaTrust::new(cfg.ca_fingerprint.clone());
    let network = PeerNetwork::new(cfg.cluster_key.clone(), cfg.tls, trust.clone())
        .map_err(|e| ControlError::Config(format!("Raft HTTP client: {e}")))?;
    let raft = Raft::new(id, raft_cfg, network, log, sm)
        .await
        .map_err(|e| ControlError::Raft(e.to_string()))?;

    let http = starling_client::http_builder(Some(trust.clone()))
        .map_err(|e| ControlError::Config(e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| ControlError::Config(e.to_string()))?;
    let https = cfg.tls.then(crate::serve::HttpsConfig::default);
    let member = Arc::new(Member {
        cfg: cfg.clone(),
        raft: raft.clone(),
        state,
        archive,
        events,
        http,
        origin,
        fault,
        event_readers: Arc::new(tokio::sync::Semaphore::new(crate::api::MAX_EVENT_READERS)),
        event_pages: tokio::sync::Semaphore::new(crate::api::PAGE_WORKERS),
        recent_chunks: Default::default(),
        metrics,
        tracker: Arc::new(std::sync::Mutex::new(starling_core::tracker::Tracker::new(
            TRACKER_TTL,
            TRACKER_PEERS,
            REGION_GATEWAYS,
        ))),
        trust,
        https: https.clone(),
        started: std::time::Instant::now(),
    });

    tracing::info!(id = cfg.id, addr = %bound, %advertise, "control member listening");
    let app = crate::api::router(member.clone());
    let serve = tokio::spawn(crate::serve::serve(
        listener,
        app,
        cfg.connections,
        cfg.cluster_key.clone(),
        https,
    ));

    if cfg.bootstrap {
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| ControlError::Raft(e.to_string()))?;
        if !initialized {
            let nodes = BTreeMap::from([(cfg.id, BasicNode::new(advertise.clone()))]);
            raft.initialize(nodes)
                .await
                .map_err(|e| ControlError::Raft(e.to_string()))?;
            tracing::info!(id = cfg.id, "bootstrapped a new cluster");
        }
    }
    if let Some(url) = cfg.join.clone() {
        tokio::spawn(join_cluster(member.clone(), url, advertise.clone()));
    }
    // The lease reaper (the problem statement's health-check service) and retention.
    let reaper = LeaseReaper {
        max_attempts: cfg.max_attempts,
    };
    tokio::spawn(housekeeping(
        member.clone(),
        Duration::from_millis(250),
        move |st, now| reaper.due(st, now),
    ));
    let keep = cfg.keep_releases;
    tokio::spawn(housekeeping(
        member.clone(),
        Duration::from_secs(5),
        move |st, now| {
            let due = st.releases_to_collect(keep);
            (!due.is_empty()).then_some(Command::CollectReleases {
                releases: due,
                keep,
                at: now,
            })
        },
    ));
    tokio::spawn(roll_out(member.clone()));
    tokio::spawn(crate::notifier::notify(member.clone()));
    tokio::spawn(crate::collector::collect_chunks(member.clone()));
    tokio::spawn(ensure_cluster_ca(member.clone()));
    tokio::spawn(keep_https_identity(member.clone()));
    // The fleet's traffic (tracker asks, origin reads) on a thread of its own: at fleet
    // scale it is the heaviest load a member carries, and it must not delay Raft.
    own_thread_runtime("swarm")?.spawn(serve_swarm(
        member.clone(),
        cfg.peer_listen.unwrap_or(bound),
    ));

    tokio::select! {
        served = serve => match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ControlError::Storage(e)),
            Err(e) => Err(ControlError::Raft(e.to_string())),
        },
        failed = storage_failure(&member) => Err(failed),
        () = stop_signal() => {
            // Stop applying, then make what was applied durable: a restart then has no
            // log to replay.
            tracing::info!("stopping");
            raft.shutdown()
                .await
                .map_err(|e| ControlError::Raft(e.to_string()))?;
            state_sync.durable().await.map_err(ControlError::Storage)?;
            Ok(())
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops gracefully");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The file in a member's data directory that holds the address its listener got, for
/// whoever started it with `--listen host:0` (the demo, the tests).
pub const LISTEN_ADDR_FILE: &str = "listen.addr";

/// Write [`LISTEN_ADDR_FILE`] whole or not at all: a reader never sees half an address.
fn write_listen_addr(dir: &std::path::Path, addr: std::net::SocketAddr) -> std::io::Result<()> {
    let tmp = dir.join(format!("{LISTEN_ADDR_FILE}.tmp"));
    std::fs::write(&tmp, format!("{addr}\n"))?;
    std::fs::rename(&tmp, dir.join(LISTEN_ADDR_FILE))
}

/// Resolves when this member's storage fails. The member then stops (fail-stop): the
/// others carry on without it, and a restart recovers from the log once there is room
/// again. Serving on with a stopped Raft core would answer health checks while every write
/// sent here waits and fails.
async fn storage_failure(member: &Member) -> ControlError {
    let mut metrics = member.raft.metrics();
    loop {
        if let Some(why) = member.broken() {
            tracing::error!(%why, "storage failed; this member stops");
            return ControlError::Storage(std::io::Error::other(why));
        }
        // The fault flag has no watch of its own: look again at least every 200 ms.
        let _ = tokio::time::timeout(Duration::from_millis(200), metrics.changed()).await;
    }
}

/// A one-thread runtime on a thread of its own, alive as long as the process.
fn own_thread_runtime(name: &str) -> Result<tokio::runtime::Handle, ControlError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name(name)
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    Ok(handle)
}

/// Ask the cluster at `url` to add this member, until it says yes. Over HTTPS, the
/// member first fetches the cluster CA (trusted by `--ca-fingerprint`), so that it can
/// serve the leader's Raft RPC before Raft brings it the CA.
async fn join_cluster(member: Arc<Member>, url: String, advertise: String) {
    let base = url.trim_end_matches('/').to_string();
    if member.cfg.tls && member.cluster_ca().is_none() {
        let fetch = || async {
            let r = member
                .http
                .get(format!("{base}/internal/ca"))
                .header(CLUSTER_KEY_HEADER, &member.cfg.cluster_key)
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !r.status().is_success() {
                return Err(format!("{}", r.status()));
            }
            r.json::<starling_proto::CaRecord>()
                .await
                .map_err(|e| e.to_string())
        };
        let ca = fetch
            .retry(backoff())
            .notify(|e, after| tracing::warn!(error = %e, ?after, "fetching the cluster CA failed; retrying"))
            .await;
        match ca {
            Ok(ca) => install_https_identity(&member, &pki_ca(&ca)),
            Err(e) => tracing::error!(error = %e, "no cluster CA; cannot join"),
        }
    }
    let req = JoinRequest {
        id: member.cfg.id,
        addr: advertise,
    };
    let endpoint = format!("{base}/internal/join");
    let ask = || async {
        let r = member
            .http
            .post(&endpoint)
            .header(CLUSTER_KEY_HEADER, &member.cfg.cluster_key)
            .json(&req)
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        if status.is_success() {
            return Ok(());
        }
        let body = r
            .text()
            .await
            .unwrap_or_else(|e| format!("(unreadable: {e})"));
        Err(format!("{status}: {body}"))
    };
    // Until it says yes: a member that cannot join has nothing else to do.
    let joined = ask
        .retry(backoff())
        .notify(|e, after| tracing::warn!(error = %e, ?after, "join failed; retrying"))
        .await;
    if joined.is_ok() {
        tracing::info!(id = member.cfg.id, via = %url, "joined the cluster as a voter");
    }
}

/// Once the cluster CA is known (from the state, or fetched to join): trust it, write its
/// certificate to `<data-dir>/cluster-ca.pem` (what clients pin by fingerprint), and with
/// `--tls` issue this member's HTTPS certificate for its advertised host.
async fn keep_https_identity(member: Arc<Member>) {
    let ca = member.wait_cluster_ca().await;
    install_https_identity(&member, &ca);
}

fn install_https_identity(member: &Member, ca: &starling_pki::ClusterCa) {
    let fingerprint = match starling_pki::fingerprint(&ca.cert_pem) {
        Ok(f) => f,
        Err(e) => return tracing::error!(error = %e, "the cluster CA is unreadable"),
    };
    member.trust.set(&fingerprint);
    let pem = member.cfg.data_dir.join("cluster-ca.pem");
    if let Err(e) = std::fs::write(&pem, &ca.cert_pem) {
        tracing::warn!(error = %e, path = %pem.display(), "cannot write the CA certificate");
    }
    let Some(slot) = &member.https else {
        return;
    };
    let advertise = member.cfg.advertise.clone().unwrap_or_default();
    // `host:port` or `[v6]:port`: the certificate names the host.
    let host = advertise
        .rsplit_once(':')
        .map_or(advertise.as_str(), |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let name = format!("member-{}", member.cfg.id);
    let config = ca
        .issue_for_hosts(&name, &[host], std::time::SystemTime::now())
        .and_then(|id| starling_pki::https_server_config(&id));
    match config {
        Ok(c) => {
            *slot.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(c));
            tracing::info!(%fingerprint, "serving HTTPS with a certificate from the cluster CA");
        }
        Err(e) => tracing::error!(error = %e, "cannot issue this member's HTTPS certificate"),
    }
}

/// Serve this member's origin store and tracker to the swarm over QUIC, once the cluster
/// CA exists to give the member a certificate (`member-<id>`). A member that cannot bind
/// the UDP address says so and serves HTTP on.
async fn serve_swarm(member: Arc<Member>, addr: std::net::SocketAddr) {
    let ca = member.wait_cluster_ca().await;
    let name = format!("member-{}", member.cfg.id);
    let identity = match ca.issue(&name, std::time::SystemTime::now()) {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(error = %e, "no certificate for the swarm endpoint");
            return;
        }
    };
    let cfg = starling_peer::PeerConfig {
        name,
        region: "origin".into(),
        ca_cert_pem: ca.cert_pem,
        identity,
        upload_slots: starling_swarm::pace::ORIGIN_UPLOAD_SLOTS,
        upload_queue: starling_swarm::pace::ORIGIN_UPLOAD_QUEUE,
    };
    let endpoint = match starling_peer::PeerEndpoint::bind(addr, cfg) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot serve the swarm");
            return;
        }
    };
    tracing::info!(%addr, "serving the origin store and tracker over QUIC");
    let tracker = member.tracker.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TRACKER_TTL / 2);
        loop {
            tick.tick().await;
            let forgotten = tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .expire(std::time::Instant::now());
            if forgotten > 0 {
                tracing::info!(nodes = forgotten, "nodes that stopped announcing forgotten");
            }
        }
    });
    let store: Arc<dyn starling_release::ChunkStore> = member.origin.clone();
    endpoint
        .serve(starling_peer::Serving {
            store,
            stored: None,
            tracker: Some(member.tracker.clone()),
        })
        .await;
}

/// Make the cluster CA once: the first leader that finds none proposes one. Applying
/// refuses a second, so two leaders racing cannot replace it.
async fn ensure_cluster_ca(member: Arc<Member>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if member.read().cluster_ca().is_some() {
            return;
        }
        if !member.raft.is_leader() {
            continue;
        }
        let name = format!("starling-{:08x}", rand::random::<u32>());
        let made = tokio::task::spawn_blocking(move || {
            starling_pki::ClusterCa::generate(&name, std::time::SystemTime::now())
        })
        .await;
        let ca = match made
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            Ok(ca) => ca,
            Err(e) => {
                tracing::error!(error = %e, "making the cluster CA failed");
                continue;
            }
        };
        let cmd = Command::SetClusterCa {
            ca: starling_proto::CaRecord {
                name: ca.name,
                cert_pem: ca.cert_pem,
                key_pem: ca.key_pem,
            },
            at: now_ms(),
        };
        match member.propose(cmd).await {
            Ok(_) => tracing::info!("cluster CA made"),
            Err(e) => tracing::debug!(error = %e, "proposing the cluster CA failed; retrying"),
        }
    }
}

/// While this member leads, every `period` ask `decide` (a pure function of the state and
/// the time) for a housekeeping command and propose it. Applying such a command re-checks
/// its premise, so a decision made on a slightly stale view is harmless.
async fn housekeeping<F>(member: Arc<Member>, period: Duration, decide: F)
where
    F: Fn(&starling_core::state::ControlState, starling_proto::Millis) -> Option<Command>,
{
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        if !member.raft.is_leader() {
            continue;
        }
        let Some(cmd) = decide(&member.read(), now_ms()) else {
            continue;
        };
        let name = cmd.name();
        match member.propose(cmd).await {
            Ok(Outcome::Expired(ids)) if !ids.is_empty() => {
                tracing::info!(builds = ?ids, "leases expired")
            }
            Ok(Outcome::Collected(ids)) if !ids.is_empty() => {
                tracing::info!(releases = ?ids, "releases collected by retention")
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(command = name, error = %e, "housekeeping proposal failed"),
        }
    }
}

/// While this member leads, move each deployment on by the planner's next step, decided
/// from the replicated deployment and this member's tracker (nodes announce to every
/// member, so a new leader sees the fleet its predecessor saw). Applying re-checks each
/// step, so no wave starts twice across a change of leader.
async fn roll_out(member: Arc<Member>) {
    let mut tick = tokio::time::interval(ROLLOUT_TICK);
    loop {
        tick.tick().await;
        // A tracker that has not heard a whole announce interval would see a wave's
        // nodes as absent, and an empty wave as healthy.
        if !member.raft.is_leader() || member.started.elapsed() < TRACKER_FILL {
            continue;
        }
        // Ids and repositories only: a deployment (its history, its waves' outcomes) is
        // read in place under the state lock, not cloned four times a second.
        let active: Vec<(u64, String)> = member
            .read()
            .active_deployments()
            .map(|d| (d.id, d.repo.clone()))
            .collect();
        for (id, repo) in active {
            let fleet = member.fleet(&repo);
            let view = crate::member::FleetReport::view(&fleet);
            let decided = member.read().deployment(id).and_then(|d| {
                let step = starling_core::rollout::next_step(d, &view, now_ms())?;
                Some((step, d.release))
            });
            let Some((step, release)) = decided else {
                continue;
            };
            let span = tracing::info_span!("deployment", id, %repo, %release);
            let what = step.name();
            let cmd = Command::AdvanceDeployment {
                id,
                step,
                at: now_ms(),
            };
            let outcome = member.propose(cmd).instrument(span.clone()).await;
            let _g = span.enter();
            match outcome {
                Ok(Outcome::Deployment(d)) => {
                    tracing::info!(step = what, status = %d.status, reason = d.reason.as_deref().unwrap_or(""), "deployment moved on")
                }
                Ok(other) => tracing::debug!(step = what, ?other, "deployment step refused"),
                Err(e) => {
                    tracing::debug!(step = what, error = %e, "proposing a deployment step failed")
                }
            }
        }
    }
}

/// How often the leader looks at its deployments.
const ROLLOUT_TICK: Duration = Duration::from_millis(250);

/// How long a member listens to announcements before it trusts its tracker to know the
/// fleet: a node announces at least every 10 s.
const TRACKER_FILL: Duration = Duration::from_secs(12);

fn open_origin(cfg: &ControlConfig) -> Result<Arc<dyn OriginStore>, ControlError> {
    match cfg.origin.as_deref() {
        None => Ok(Arc::new(FsChunkStore::new(cfg.data_dir.join("origin"))?)),
        #[cfg(feature = "s3")]
        Some(url) => Ok(Arc::new(starling_release::S3ChunkStore::open(url)?)),
        #[cfg(not(feature = "s3"))]
        Some(url) => Err(ControlError::Config(format!(
            "origin {url}: this starling was built without the `s3` feature (cargo build --features s3)"
        ))),
    }
}
