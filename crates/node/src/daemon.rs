//! `starling node`: one fleet machine. It enrols once (a join token for a certificate),
//! serves the chunks it holds to its peers, announces itself to every control member,
//! and for each of its repositories fetches the release the goal names — from peers in
//! its region first, other regions next, the origin last — unpacks it, switches to it and
//! says so in its next announcement.
//!
//! Once switched, it stops the previous release's process and runs the new release's
//! `[deploy]` commands ([`crate::app`]), and reports each repository's state — fetching,
//! starting, running or failed, with the reason — in its announcements, which are what
//! `GET /v1/nodes` shows. It long-polls the goals, keeps the last three releases
//! unpacked, and keeps its chunk store within its budget.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::stream::{FuturesUnordered, StreamExt};
use starling_client::ControlClient;
use starling_peer::{Announcement, PeerConfig, PeerConn, PeerEndpoint, Serving, Stored};
use starling_pki::Identity;
use starling_proto::join_token::JoinToken;
use starling_proto::peer::MAX_REASON;
use starling_proto::release::{Manifest, RunSpec};
use starling_proto::{AppReport, AppState, EnrollRequest, ReleaseId};
use starling_release::unpack::{activate, current, prune, unpack, unpacked};
use starling_release::{ChunkStore, FsChunkStore, OriginStore};
use starling_swarm::pace::{next_tracker_ask, ANNOUNCE_EVERY, GOAL_POLL};
use starling_swarm::{FetchConfig, Source};
use tokio::sync::broadcast;
use tracing::Instrument;

use crate::app::{forget_logs, wait_healthy, AppProcess, STOP_GRACE};
use crate::fetcher::{fetch_release, SourceSpec, TrackerSources};

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Its name: a DNS label, the name in its certificate.
    pub name: String,
    pub region: String,
    pub data_dir: PathBuf,
    pub repos: Vec<String>,
    /// UDP address it serves chunks on.
    pub listen: SocketAddr,
    /// The address peers reach it at (default: `listen`).
    pub advertise: Option<String>,
    pub join_token: Option<String>,
    /// Bytes the chunk store may hold. Chunks no kept release refers to are always
    /// deleted; over the budget, kept releases go too, down to the current and the one
    /// before it, which stay whatever they cost.
    pub chunk_budget: Option<u64>,
    /// How long a release's health command may keep failing before the release counts
    /// as failed.
    pub health_deadline: Duration,
    pub metrics: Arc<crate::metrics::NodeMetrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("enrolment: {0}")]
    Enrol(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("chunk store: {0}")]
    Store(#[from] starling_release::ReleaseError),
    #[error("swarm endpoint: {0}")]
    Peer(#[from] starling_peer::PeerError),
}

/// Enrol (once) and keep the certificate under `<data-dir>/identity`.
async fn identity(
    cfg: &NodeConfig,
    control: &ControlClient,
) -> Result<(Identity, String), NodeError> {
    let dir = cfg.data_dir.join("identity");
    let (cert, key, ca) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    if let (Ok(c), Ok(k), Ok(a)) = (
        std::fs::read_to_string(&cert),
        std::fs::read_to_string(&key),
        std::fs::read_to_string(&ca),
    ) {
        return Ok((
            Identity {
                cert_pem: c,
                key_pem: k,
            },
            a,
        ));
    }
    let text = cfg.join_token.as_deref().ok_or_else(|| {
        NodeError::Enrol("no certificate yet and no join token (STARLING_JOIN_TOKEN)".into())
    })?;
    let token = JoinToken::parse(text)
        .ok_or_else(|| NodeError::Enrol("the join token is malformed".into()))?;
    let req = EnrollRequest {
        token: text.to_string(),
        name: cfg.name.clone(),
        region: cfg.region.clone(),
    };
    let reply = control
        .enroll(&req)
        .await
        .map_err(|e| NodeError::Enrol(e.to_string()))?;
    let fp = starling_pki::fingerprint(&reply.ca_cert_pem)
        .map_err(|e| NodeError::Enrol(e.to_string()))?;
    if fp != token.ca_fingerprint {
        return Err(NodeError::Enrol(
            "the control plane's CA is not the one the join token names".into(),
        ));
    }
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    std::fs::write(&key, &reply.key_pem)?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    std::fs::write(&cert, &reply.cert_pem)?;
    std::fs::write(&ca, &reply.ca_cert_pem)?;
    tracing::info!(node = %cfg.name, "enrolled");
    Ok((
        Identity {
            cert_pem: reply.cert_pem,
            key_pem: reply.key_pem,
        },
        reply.ca_cert_pem,
    ))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The address peers reach this node at when none was given: the listener's, or, if it
/// listens on every interface, the local address this machine uses to reach the control
/// plane (asking the kernel's routing table; no packet is sent), with the listener's port.
fn default_advertise(listen: SocketAddr, control_url: &str) -> Result<String, NodeError> {
    if !listen.ip().is_unspecified() {
        return Ok(listen.to_string());
    }
    let host = control_url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default();
    let target = std::net::ToSocketAddrs::to_socket_addrs(host)
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            NodeError::Enrol(format!(
                "cannot tell this node's address from {control_url}; give --advertise"
            ))
        })?;
    let probe = std::net::UdpSocket::bind(if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    probe.connect(target)?;
    Ok(SocketAddr::new(probe.local_addr()?.ip(), listen.port()).to_string())
}

/// Where a repository's releases live on this node.
fn repo_root(data_dir: &Path, repo: &str) -> PathBuf {
    data_dir.join("apps").join(repo.replace('/', "__"))
}

/// The control members' swarm endpoints: each member's HTTP address, over UDP, named
/// `member-<id>`.
async fn origins(control: &ControlClient) -> Vec<(String, SocketAddr)> {
    let Ok(cluster) = control.cluster().await else {
        return Vec::new();
    };
    cluster
        .members
        .iter()
        .filter_map(|m| {
            let addr = m.addr.parse().ok()?;
            Some((format!("member-{}", m.id), addr))
        })
        .collect()
}

/// Run the node until the process ends.
pub async fn run(cfg: NodeConfig, control: ControlClient) -> Result<(), NodeError> {
    let (identity, ca_cert_pem) = identity(&cfg, &control).await?;
    let store = Arc::new(FsChunkStore::new(cfg.data_dir.join("chunks"))?);
    let endpoint = Arc::new(PeerEndpoint::bind(
        cfg.listen,
        PeerConfig {
            name: cfg.name.clone(),
            region: cfg.region.clone(),
            ca_cert_pem,
            identity,
            upload_slots: starling_swarm::pace::NODE_UPLOAD_SLOTS,
            upload_queue: starling_swarm::pace::NODE_UPLOAD_QUEUE,
        },
    )?);
    let advertise = match &cfg.advertise {
        Some(a) => a.clone(),
        None => default_advertise(endpoint.local_addr()?, control.base())?,
    };
    let (stored, _) = broadcast::channel(4096);
    {
        let (endpoint, store, stored) = (endpoint.clone(), store.clone(), stored.clone());
        tokio::spawn(async move {
            endpoint
                .serve(Serving {
                    store,
                    stored: Some(stored),
                    tracker: None,
                })
                .await
        });
    }
    tracing::info!(node = %cfg.name, region = %cfg.region, %advertise, "node serving");
    let mut members: BTreeMap<String, Arc<PeerConn>> = BTreeMap::new();
    let mut apps: Vec<App> = cfg
        .repos
        .iter()
        .map(|repo| {
            App::resume(
                repo,
                &cfg.data_dir,
                cfg.health_deadline,
                cfg.metrics.clone(),
            )
        })
        .collect();
    // What ran before the node restarted runs again, unless its process still runs.
    for app in &mut apps {
        if let (Some(release), None) = (app.report.release, &app.process) {
            let run = run_spec(store.as_ref(), &release);
            app.launch(release, run, |_| async {}).await;
        }
    }
    let mut last_announce = std::time::Instant::now() - Duration::from_secs(60);
    // The newest goal seen: the long-poll answers as soon as one newer is set.
    let mut seen_goal: Option<u64> = None;
    let mut membership_read: Option<std::time::Instant> = None;
    // Members are connected to in the background: a member that is down must not hold
    // up this loop for a QUIC handshake's timeout.
    let (connected_tx, mut connected) = tokio::sync::mpsc::unbounded_channel();
    let mut connecting: BTreeMap<String, std::time::Instant> = BTreeMap::new();
    let mut first_round = true;
    loop {
        // Reach every member's swarm endpoint (they come and go): the membership is read
        // when a connection is missing, or once a minute.
        let all_open = !members.is_empty() && members.values().all(|c| c.is_open());
        let fresh = membership_read.is_some_and(|t| t.elapsed() < MEMBERSHIP_READ);
        let members_now = if all_open && fresh {
            Vec::new()
        } else {
            membership_read = Some(std::time::Instant::now());
            origins(&control).await
        };
        let mut started = 0;
        for (name, addr) in members_now {
            let open = members.get(&name).is_some_and(|c| c.is_open());
            let tried = connecting
                .get(&name)
                .is_some_and(|t| t.elapsed() < RECONNECT_PAUSE);
            if open || tried {
                continue;
            }
            connecting.insert(name.clone(), std::time::Instant::now());
            started += 1;
            let (endpoint, tx) = (endpoint.clone(), connected_tx.clone());
            tokio::spawn(async move {
                match endpoint.connect(addr, &name).await {
                    Ok(c) => {
                        let _ = tx.send((name, Arc::new(c)));
                    }
                    Err(e) => {
                        tracing::debug!(member = %name, error = %e, "cannot reach the member's swarm endpoint")
                    }
                }
            });
        }
        // On the first round, give the members a moment: the node announces itself to
        // them before it asks for its goals.
        if std::mem::take(&mut first_round) {
            let until = tokio::time::Instant::now() + FIRST_CONNECT;
            while started > 0 {
                match tokio::time::timeout_at(until, connected.recv()).await {
                    Ok(Some((name, conn))) => {
                        connecting.remove(&name);
                        members.insert(name, conn);
                        started -= 1;
                    }
                    _ => break,
                }
            }
        }
        while let Ok((name, conn)) = connected.try_recv() {
            connecting.remove(&name);
            members.insert(name, conn);
            last_announce = std::time::Instant::now() - Duration::from_secs(60);
        }
        for app in &mut apps {
            if app.watch() {
                last_announce = std::time::Instant::now() - Duration::from_secs(60);
            }
        }
        let read = control
            .node_goals(&cfg.name, &cfg.region, seen_goal, GOAL_POLL)
            .await;
        let goals = match read {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "reading the goals failed; trying again");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        seen_goal = goals.iter().map(|g| g.at).max().max(seen_goal).or(Some(0));
        for i in 0..apps.len() {
            let Some(goal) = goals
                .iter()
                .find(|g| g.repo == apps[i].report.repo && g.env == "default")
            else {
                continue;
            };
            // First what this node runs (its wave started, or a rollback), then what it
            // holds ready for its wave.
            if let Some(release) = goal.run.filter(|r| apps[i].wants(*r)) {
                let span = tracing::info_span!("deployment", repo = %apps[i].report.repo, %release, deployment = ?goal.deployment);
                let staged = stage(
                    &cfg, &endpoint, &members, &store, &stored, &advertise, &mut apps, i, release,
                )
                .instrument(span.clone())
                .await;
                // The node's announcement as it stands, for this repository's "starting".
                let mut me = announcement(&advertise, &apps);
                let app = &mut apps[i];
                let switched = match staged {
                    Ok(run) => switch(&cfg, &store, &app.root, release).await.map(|()| run),
                    Err(e) => Err(e),
                };
                match switched {
                    Ok(run) => {
                        cfg.metrics.activated();
                        app.report.release = Some(release);
                        app.report.activated_at = Some(now_ms());
                        let members = &members;
                        app.launch(release, run, |starting: AppReport| async move {
                            for r in me.apps.iter_mut().filter(|r| r.repo == starting.repo) {
                                *r = starting.clone();
                            }
                            for c in members.values() {
                                let _ = c.announce(&me).await;
                            }
                        })
                        .instrument(span)
                        .await;
                    }
                    Err(e) => {
                        let _g = span.enter();
                        tracing::warn!(error = %e, "deploying failed; trying again");
                        app.report_failure(&e);
                    }
                }
                last_announce = std::time::Instant::now() - Duration::from_secs(60);
            }
            let release = goal.release;
            if apps[i].report.staged != Some(release) && apps[i].report.release != Some(release) {
                let span = tracing::info_span!("staging", repo = %apps[i].report.repo, %release, deployment = ?goal.deployment);
                let staged = stage(
                    &cfg, &endpoint, &members, &store, &stored, &advertise, &mut apps, i, release,
                )
                .instrument(span.clone())
                .await;
                if let Err(e) = staged {
                    let _g = span.enter();
                    tracing::warn!(error = %e, "staging failed; trying again");
                    // The running release is unaffected: its state stays, the error shows.
                    apps[i].report.error = Some(reason(&format!("staging {release}: {e}")));
                } else if apps[i].report.state != AppState::Failed {
                    // A failed release's reason stays until it is replaced.
                    apps[i].report.error = None;
                }
                last_announce = std::time::Instant::now() - Duration::from_secs(60);
            }
        }
        if last_announce.elapsed() >= ANNOUNCE_EVERY {
            let a = announcement(&advertise, &apps);
            cfg.metrics.reports(&a.apps);
            for c in members.values() {
                let _ = c.announce(&a).await;
            }
            last_announce = std::time::Instant::now();
        }
    }
}

/// One repository on this node: what it reports, the process its release runs as.
struct App {
    root: PathBuf,
    report: AppReport,
    process: Option<AppProcess>,
    /// A release whose start or health command failed, or whose process ended: not
    /// started again until the goal names another (a deploy system that restarts a
    /// crashing release forever hides the crash; the report shows it instead).
    given_up: Option<ReleaseId>,
    health_deadline: Duration,
    metrics: Arc<crate::metrics::NodeMetrics>,
}

impl App {
    /// The repository as a previous run of this node left it.
    fn resume(
        repo: &str,
        data_dir: &Path,
        health_deadline: Duration,
        metrics: Arc<crate::metrics::NodeMetrics>,
    ) -> App {
        let root = repo_root(data_dir, repo);
        let release = current(&root);
        let activated_at = std::fs::symlink_metadata(root.join("current"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64);
        let process = AppProcess::adopt(&root);
        App {
            report: AppReport {
                release,
                activated_at,
                state: if release.is_some() {
                    AppState::Running
                } else {
                    AppState::Idle
                },
                ..AppReport::idle(repo)
            },
            root,
            process,
            given_up: None,
            health_deadline,
            metrics,
        }
    }

    /// Whether the goal's `release` is still to be deployed here.
    fn wants(&self, release: ReleaseId) -> bool {
        self.given_up != Some(release)
            && (self.report.release != Some(release) || self.report.state != AppState::Running)
    }

    /// Notice a process that ended by itself; whether the report changed.
    fn watch(&mut self) -> bool {
        let Some(why) = self.process.as_mut().and_then(|p| p.ended()) else {
            return false;
        };
        tracing::warn!(repo = %self.report.repo, %why, "the release's process ended");
        self.process = None;
        self.fail(why);
        true
    }

    /// Report `why` as this repository's failure (a fetch that fails is tried again).
    fn report_failure(&mut self, why: &str) {
        self.report.state = AppState::Failed;
        self.report.error = Some(reason(why));
    }

    /// The release failed to start or ended: reported, and not started again.
    fn fail(&mut self, why: String) {
        self.metrics.start_failed();
        self.report_failure(&why);
        self.given_up = self.report.release;
    }

    /// Stop the previous release's process, start `release`'s, and wait for its health
    /// command; `starting` is told the report while the health command runs.
    async fn launch<F, Fut>(&mut self, release: ReleaseId, run: Option<RunSpec>, starting: F)
    where
        F: FnOnce(AppReport) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        if let Some(p) = self.process.take() {
            p.stop(&self.root, STOP_GRACE).await;
        }
        let run = run.unwrap_or_default();
        let dir = self.root.join("releases").join(release.to_hex());
        let repo = self.report.repo.clone();
        if let Some(cmd) = &run.start {
            match AppProcess::start(&self.root, &dir, &repo, &release, cmd) {
                Ok(p) => self.process = Some(p),
                Err(e) => return self.fail(format!("cannot run the start command: {e}")),
            }
        }
        if let Some(health) = &run.health {
            self.report.state = AppState::Starting;
            starting(self.report.clone()).await;
            let healthy = wait_healthy(
                &dir,
                &repo,
                &release,
                health,
                self.process.as_mut(),
                self.health_deadline,
            )
            .await;
            if let Err(why) = healthy {
                tracing::warn!(%repo, %release, %why, "the release is not healthy");
                return self.fail(why);
            }
        }
        tracing::info!(%repo, %release, "release running");
        self.report.state = AppState::Running;
        self.report.error = None;
        self.given_up = None;
    }
}

/// An error as a report carries it: at most [`MAX_REASON`] bytes.
fn reason(e: &str) -> String {
    let mut end = e.len().min(MAX_REASON);
    while !e.is_char_boundary(end) {
        end -= 1;
    }
    e[..end].to_string()
}

/// The run commands of a release this node holds the manifest of.
fn run_spec(store: &FsChunkStore, release: &ReleaseId) -> Option<RunSpec> {
    let bytes = store.get_manifest(release).ok()?;
    Manifest::decode(&bytes).ok()?.run
}

/// What this node says about itself: where it serves, what it runs and holds.
fn announcement(advertise: &str, apps: &[App]) -> Announcement {
    Announcement {
        addr: advertise.to_string(),
        // Staged releases too: peers of later waves fetch from the early ones.
        holds: apps
            .iter()
            .flat_map(|a| a.report.release.into_iter().chain(a.report.staged))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
        fetching: Vec::new(),
        apps: apps.iter().map(|a| a.report.clone()).collect(),
    }
}

/// Tell every member this node is fetching `release`; the peers their trackers name, and
/// whether one of them takes this node for a gateway.
/// The members are asked at once; once one answered, the others get a moment more (a
/// member that is down must not hold up the fetch).
async fn ask_trackers(
    region: &str,
    members: &BTreeMap<String, Arc<PeerConn>>,
    me: &Announcement,
    release: ReleaseId,
) -> TrackerSources {
    let fetching = Announcement {
        fetching: vec![release],
        ..me.clone()
    };
    let mut asks: FuturesUnordered<_> = members
        .values()
        .map(|conn| {
            let fetching = &fetching;
            async move {
                conn.announce(fetching).await.ok()?;
                let answer = tokio::time::timeout(TRACKER_PATIENCE, conn.next_peers()).await;
                let answer = answer.ok().flatten()?;
                (answer.release == release).then_some(answer)
            }
        })
        .collect();
    let mut answers = Vec::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, asks.next()).await {
                Ok(n) => n,
                Err(_) => break,
            },
            None => asks.next().await,
        };
        let Some(answer) = next else { break };
        let Some(answer) = answer else { continue };
        deadline.get_or_insert_with(|| tokio::time::Instant::now() + OTHER_TRACKERS_GRACE);
        answers.push(answer);
    }
    // A complete answer's roles are final; a member whose tracker does not know the
    // asker's repository (it restarted, say) names other gateways, and the two must not
    // mix.
    let complete = answers.iter().any(|a| a.complete);
    let mut sources = TrackerSources {
        complete,
        ..TrackerSources::default()
    };
    for answer in answers.into_iter().filter(|a| a.complete == complete) {
        sources.gateway |= answer.gateway;
        for p in answer.peers {
            let Ok(addr) = p.addr.parse() else { continue };
            if sources.peers.iter().any(|s| s.name == p.node) {
                continue;
            }
            let source = if p.region == region {
                Source::SameRegion
            } else {
                Source::OtherRegion
            };
            sources.peers.push(SourceSpec {
                name: p.node,
                addr,
                source,
                fetching: p.fetching,
                gateway: p.gateway,
            });
        }
    }
    sources
}

/// The manifest of `release` from whichever member answers first.
async fn fetch_manifest(
    members: &BTreeMap<String, Arc<PeerConn>>,
    release: ReleaseId,
) -> Result<Manifest, String> {
    let mut asks: FuturesUnordered<_> = members
        .iter()
        .map(|(name, conn)| async move { (name, conn.fetch_manifest(&release).await) })
        .collect();
    while let Some((name, answer)) = asks.next().await {
        match answer {
            Ok(bytes) => return Manifest::decode(&bytes).map_err(|e| e.to_string()),
            Err(e) => tracing::debug!(member = %name, error = %e, "no manifest from this member"),
        }
    }
    Err("no member has the release's manifest".into())
}

/// Make `release` ready to run under the repository of `apps[i]`: fetch its chunks (from
/// peers, then the origin) and unpack it, unless it is unpacked already, and say so in the
/// repository's report (`staged`). Its run commands.
#[allow(clippy::too_many_arguments)]
async fn stage(
    cfg: &NodeConfig,
    endpoint: &Arc<PeerEndpoint>,
    members: &BTreeMap<String, Arc<PeerConn>>,
    store: &Arc<FsChunkStore>,
    stored: &broadcast::Sender<Stored>,
    advertise: &str,
    apps: &mut [App],
    i: usize,
    release: ReleaseId,
) -> Result<Option<RunSpec>, String> {
    let root = apps[i].root.clone();
    let dest = root.join("releases").join(release.to_hex());
    let held = dest
        .exists()
        .then(|| store.get_manifest(&release).ok())
        .flatten();
    let manifest = match held {
        Some(bytes) => Manifest::decode(&bytes).map_err(|e| e.to_string())?,
        None => {
            let before = apps[i].report.state;
            apps[i].report.state = AppState::Fetching;
            apps[i].report.fetching = Some(release);
            let me = announcement(advertise, apps);
            let fetched = fetch(cfg, endpoint, members, store, stored, &me, release).await;
            apps[i].report.state = before;
            apps[i].report.fetching = None;
            let manifest = fetched?;
            if !dest.exists() {
                std::fs::create_dir_all(root.join("releases")).map_err(|e| e.to_string())?;
                let (store, m, d) = (store.clone(), manifest.clone(), dest.clone());
                tokio::task::spawn_blocking(move || unpack(&m, store.as_ref(), &d))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
            }
            manifest
        }
    };
    let report = &mut apps[i].report;
    if report.staged != Some(release) {
        report.staged = Some(release);
        report.staged_at = Some(now_ms());
    }
    Ok(manifest.run)
}

/// Fetch every chunk of `release` into the store; its manifest.
async fn fetch(
    cfg: &NodeConfig,
    endpoint: &Arc<PeerEndpoint>,
    members: &BTreeMap<String, Arc<PeerConn>>,
    store: &Arc<FsChunkStore>,
    stored: &broadcast::Sender<Stored>,
    me: &Announcement,
    release: ReleaseId,
) -> Result<Manifest, String> {
    let settle = FetchConfig::default().settle;
    // Where to fetch from: what the trackers say now, and again every few seconds while
    // the fetch runs (peers that start later join it), and the origins.
    let asked_first = tokio::time::Instant::now();
    let mut sources = ask_trackers(&cfg.region, members, me, release).await;
    let (more_tx, more) = tokio::sync::mpsc::unbounded_channel();
    // Stopped as soon as the fetch ends: a late "fetching" must not follow "running".
    let refresher = {
        let (region, members, me) = (cfg.region.clone(), members.clone(), me.clone());
        tokio::spawn(async move {
            loop {
                let elapsed = asked_first.elapsed();
                tokio::time::sleep(next_tracker_ask(elapsed, settle)).await;
                let answer = ask_trackers(&region, &members, &me, release).await;
                if more_tx.send(answer).is_err() {
                    return;
                }
            }
        })
    };
    let manifest = fetch_manifest(members, release).await?;
    let fetch_started = std::time::Instant::now();
    for (name, conn) in members {
        sources.peers.push(SourceSpec {
            name: name.clone(),
            addr: conn.remote_addr(),
            source: Source::Origin,
            fetching: false,
            gateway: false,
        });
    }
    let report = fetch_release(
        endpoint.clone(),
        &cfg.name,
        release,
        &manifest,
        sources,
        more,
        store.clone() as Arc<dyn ChunkStore>,
        Some(stored.clone()),
        FetchConfig::default().for_release(manifest.archive_size),
        Duration::from_secs(60),
    )
    .await;
    refresher.abort();
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            cfg.metrics.fetch_failed();
            return Err(e.to_string());
        }
    };
    cfg.metrics.fetched(&report, fetch_started.elapsed());
    tracing::info!(
        %release,
        received = ?report.received,
        udp_bytes = ?report.udp_received,
        lost_packets = report.lost_packets,
        dropped = report.dropped.len(),
        "release fetched"
    );
    Ok(manifest)
}

/// Switch `root` to the unpacked `release`, keep the newest few releases, and keep the
/// chunk store within its budget.
async fn switch(
    cfg: &NodeConfig,
    store: &Arc<FsChunkStore>,
    root: &Path,
    release: ReleaseId,
) -> Result<(), String> {
    activate(root, &release).map_err(|e| e.to_string())?;
    // The active release and the two before it stay, for instant rollbacks.
    match prune(root, KEEP_RELEASES) {
        Ok(gone) if !gone.is_empty() => {
            forget_logs(root, &gone);
            tracing::info!(releases = gone.len(), "old releases removed")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "removing old releases failed"),
    }
    let (store, cfg) = (store.clone(), cfg.clone());
    let collected = tokio::task::spawn_blocking(move || keep_within_budget(&cfg, &store))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    if let Err(e) = collected {
        tracing::warn!(error = %e, "collecting chunks failed");
    }
    Ok(())
}

/// Delete the chunks no release kept on this node refers to; if the store is still over
/// the budget, keep only the current release and the one before it, and collect again.
fn keep_within_budget(cfg: &NodeConfig, store: &FsChunkStore) -> Result<(), String> {
    collect_unreferenced(cfg, store)?;
    let (Some(budget), Some(used)) = (cfg.chunk_budget, store.used_bytes()) else {
        return Ok(());
    };
    if used <= budget {
        return Ok(());
    }
    for repo in &cfg.repos {
        let root = repo_root(&cfg.data_dir, repo);
        let gone = prune(&root, 2).map_err(|e| e.to_string())?;
        forget_logs(&root, &gone);
    }
    collect_unreferenced(cfg, store)?;
    let used = store.used_bytes().unwrap_or(0);
    if used > budget {
        tracing::warn!(
            used,
            budget,
            "the chunk store is over its budget with only the current and previous releases"
        );
    }
    Ok(())
}

/// Delete every chunk that no release unpacked under this node's repositories refers to.
/// A kept release whose manifest cannot be read stops the collection: its chunks are not
/// known, so nothing is deleted.
fn collect_unreferenced(cfg: &NodeConfig, store: &FsChunkStore) -> Result<(), String> {
    let mut referenced = std::collections::HashSet::new();
    for repo in &cfg.repos {
        let kept = unpacked(&repo_root(&cfg.data_dir, repo)).map_err(|e| e.to_string())?;
        for (_, id) in kept {
            let bytes = store
                .get_manifest(&id)
                .map_err(|e| format!("release {id} is kept but its manifest: {e}"))?;
            let m = Manifest::decode(&bytes).map_err(|e| e.to_string())?;
            referenced.extend(m.chunks.iter().map(|c| c.hash));
        }
    }
    let held = store.list_chunks().map_err(|e| e.to_string())?;
    let gone =
        starling_core::retention::garbage(&held, &referenced, SystemTime::now(), Duration::ZERO);
    for h in &gone {
        store.delete_chunk(h).map_err(|e| e.to_string())?;
    }
    if !gone.is_empty() {
        tracing::info!(chunks = gone.len(), "chunks no kept release needs deleted");
    }
    Ok(())
}

/// How long a node waits before it tries a member it could not connect to again.
const RECONNECT_PAUSE: Duration = Duration::from_secs(5);

/// How long a starting node waits for its first connections to the members.
const FIRST_CONNECT: Duration = Duration::from_secs(3);

/// How long a member's tracker has to answer, and how long the others get once one did.
const TRACKER_PATIENCE: Duration = Duration::from_secs(5);
const OTHER_TRACKERS_GRACE: Duration = Duration::from_millis(300);

/// How often a node with every member connected reads the membership again.
const MEMBERSHIP_READ: Duration = Duration::from_secs(60);

/// Unpacked releases a node keeps per repository.
const KEEP_RELEASES: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;
    use starling_proto::ChunkHash;

    /// A node of `acme/web` with releases 1, 2, 3 unpacked (3 current, 2 the newest
    /// other) and a stray chunk; each release is one file of bytes of its own.
    fn node_with_three_releases(
        dir: &Path,
        budget: Option<u64>,
    ) -> (NodeConfig, FsChunkStore, Vec<ReleaseId>) {
        let cfg = NodeConfig {
            name: "n1".into(),
            region: "r".into(),
            data_dir: dir.to_path_buf(),
            // acme/api has never run here: nothing of it to keep or let go.
            repos: vec!["acme/web".into(), "acme/api".into()],
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise: None,
            join_token: None,
            chunk_budget: budget,
            health_deadline: crate::app::HEALTH_DEADLINE,
            metrics: Default::default(),
        };
        let store = FsChunkStore::new(dir.join("chunks")).unwrap();
        let root = repo_root(dir, "acme/web");
        let mut ids = Vec::new();
        for seed in 1..=3u64 {
            let src = dir.join(format!("src{seed}"));
            std::fs::create_dir_all(&src).unwrap();
            let bytes: Vec<u8> = (0..200_000u64).map(|i| (i * seed % 251) as u8).collect();
            std::fs::write(src.join("f"), bytes).unwrap();
            let (id, _, _) =
                starling_release::create_release(&src, &store, Default::default()).unwrap();
            std::fs::create_dir_all(root.join("releases").join(id.to_hex())).unwrap();
            activate(&root, &id).unwrap();
            ids.push(id);
            // Distinct modification times, oldest first.
            std::thread::sleep(Duration::from_millis(20));
        }
        store.put_chunk(&ChunkHash::of(b"stray"), b"stray").unwrap();
        (cfg, store, ids)
    }

    fn chunks_of(store: &FsChunkStore, id: &ReleaseId) -> Vec<ChunkHash> {
        let m = Manifest::decode(&store.get_manifest(id).unwrap()).unwrap();
        m.chunks.iter().map(|c| c.hash).collect()
    }

    #[test]
    fn chunks_no_kept_release_needs_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, store, ids) = node_with_three_releases(dir.path(), None);
        keep_within_budget(&cfg, &store).unwrap();
        assert!(!store.has_chunk(&ChunkHash::of(b"stray")).unwrap());
        for id in &ids {
            for c in chunks_of(&store, id) {
                assert!(store.has_chunk(&c).unwrap(), "a chunk of kept {id} went");
            }
        }
    }

    #[test]
    fn over_budget_only_the_current_and_previous_releases_stay() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, store, ids) = node_with_three_releases(dir.path(), Some(1));
        let oldest = chunks_of(&store, &ids[0]);
        keep_within_budget(&cfg, &store).unwrap();
        let root = repo_root(dir.path(), "acme/web");
        assert!(!root.join("releases").join(ids[0].to_hex()).exists());
        assert!(oldest.iter().all(|c| !store.has_chunk(c).unwrap()));
        for id in &ids[1..] {
            assert!(root.join("releases").join(id.to_hex()).exists());
            for c in chunks_of(&store, id) {
                assert!(store.has_chunk(&c).unwrap(), "a chunk of pinned {id} went");
            }
        }
    }

    #[test]
    fn a_wildcard_listener_advertises_the_address_that_reaches_the_control_plane() {
        let specific: SocketAddr = "127.0.0.1:7401".parse().unwrap();
        assert_eq!(
            default_advertise(specific, "http://10.9.9.9:1").unwrap(),
            "127.0.0.1:7401"
        );
        let any: SocketAddr = "0.0.0.0:7400".parse().unwrap();
        assert_eq!(
            default_advertise(any, "http://127.0.0.1:7001").unwrap(),
            "127.0.0.1:7400"
        );
        assert!(default_advertise(any, "not a url").is_err());
    }
}
