//! A member as its HTTP handlers and background tasks see it: its configuration, its
//! Raft handle, its state and stores, and the operations on them (propose, read, admit).
//! `server` builds one and `api` serves it; this module depends on neither.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::async_runtime::watch::WatchReceiver;
use openraft::{BasicNode, ChangeMembers};
use starling_core::state::BuildQuery;
use starling_proto::{Build, Command, Deployment, Event, JoinRequest, Millis, Outcome, Release};
use starling_release::OriginStore;
use tokio::sync::watch;

use crate::store::{SharedState, StorageFault};
use crate::{NodeId, Raft};

/// Everything a member needs to start.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub id: NodeId,
    pub listen: SocketAddr,
    /// Address other members and clients use to reach this one; `None` for the address
    /// the listener got (which tells a `:0` port apart from the one the kernel chose).
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    pub bootstrap: bool,
    pub join: Option<String>,
    /// Bearer token for mutating API calls.
    pub api_token: String,
    /// A second token that may only read build logs and release contents.
    pub read_token: Option<String>,
    /// Serve build logs and release contents to anyone (`--public-read`).
    pub public_read: bool,
    /// Connection limit and timeouts of the HTTP listener.
    pub connections: crate::serve::ConnectionLimits,
    /// Shared secret of the members' Raft RPC.
    pub cluster_key: String,
    pub lease_ttl: Duration,
    pub max_attempts: u32,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_every: u64,
    /// Releases kept per repository beside every one a goal names.
    pub keep_releases: usize,
    /// Chunks younger than this are never collected (a release may be mid-publish).
    pub collect_grace: Duration,
    /// Where the origin store lives: `None` for `<data_dir>/origin` on this member's disk,
    /// or `s3://bucket[/prefix]` (needs the `s3` feature).
    pub origin: Option<String>,
    /// Chunk bytes this member's origin directory may hold (`None`: no limit).
    pub origin_quota: Option<u64>,
    /// Where the member serves the swarm over QUIC (`None`: the HTTP address, over UDP).
    pub peer_listen: Option<SocketAddr>,
    /// Serve HTTPS (API and Raft RPC) with a certificate from the cluster CA, and reach
    /// the other members over HTTPS. Every member of a cluster is started alike.
    pub tls: bool,
    /// The cluster CA's fingerprint, for a member joining an HTTPS cluster: it trusts the
    /// member it joins through by it.
    pub ca_fingerprint: Option<String>,
}

/// What the HTTP handlers share.
pub struct Member {
    pub cfg: ControlConfig,
    pub raft: Raft,
    pub state: SharedState,
    /// The history that left `state`'s memory.
    pub archive: crate::archive::Archive,
    pub events: watch::Receiver<u64>,
    pub http: reqwest::Client,
    /// The origin store (chunks and manifests): this member's copy under `--data-dir`, or
    /// a bucket the members share.
    pub origin: Arc<dyn OriginStore>,
    /// Set when this member's storage failed; it then stops.
    pub fault: Arc<StorageFault>,
    /// Permits for event-log readers (long-polls and streams).
    pub event_readers: Arc<tokio::sync::Semaphore>,
    /// Turns at reading and encoding a page of events.
    pub event_pages: tokio::sync::Semaphore,
    /// Chunks a worker was lately told are here: the collector spares them.
    pub recent_chunks: std::sync::Mutex<starling_core::retention::RecentChunks>,
    pub metrics: Arc<crate::metrics::ControlMetrics>,
    /// Which node serves which release: soft state fed by nodes' announcements.
    pub tracker: Arc<std::sync::Mutex<starling_core::tracker::Tracker>>,
    /// Which CA this member's HTTPS clients trust (set once the CA is known).
    pub trust: Arc<starling_pki::CaTrust>,
    /// The certificate its HTTPS listener presents (`--tls` only).
    pub https: Option<crate::serve::HttpsConfig>,
    /// When this member started: its tracker knows the whole fleet one announce
    /// interval later, not before.
    pub started: std::time::Instant,
}

/// One live node of a repository, with its report for that repository.
#[derive(Debug, Clone)]
pub struct FleetReport {
    pub node: String,
    pub region: String,
    pub report: starling_proto::AppReport,
}

impl FleetReport {
    pub fn view(all: &[FleetReport]) -> Vec<starling_core::rollout::FleetNode<'_>> {
        all.iter()
            .map(|f| starling_core::rollout::FleetNode {
                node: &f.node,
                region: &f.region,
                report: &f.report,
            })
            .collect()
    }
}

/// The CA as the log records it, as `starling-pki` uses it.
pub fn pki_ca(r: &starling_proto::CaRecord) -> starling_pki::ClusterCa {
    starling_pki::ClusterCa {
        name: r.name.clone(),
        cert_pem: r.cert_pem.clone(),
        key_pem: r.key_pem.clone(),
    }
}

pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

impl Member {
    /// Propose `cmd` on this member, which must be the leader.
    #[tracing::instrument(skip_all, fields(command = cmd.name()))]
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        let name = cmd.name();
        let started = std::time::Instant::now();
        let (result, answer) = match self.raft.client_write(cmd).await {
            Ok(resp) => ("ok", Ok(resp.data)),
            Err(e) if e.forward_to_leader().is_some() => {
                ("not_leader", Err(ProposeError::NotLeader))
            }
            Err(e) => {
                tracing::warn!(command = name, error = %e, "proposal failed");
                ("error", Err(ProposeError::Raft(e.to_string())))
            }
        };
        self.metrics.proposal(name, result, started.elapsed());
        answer
    }

    /// [`Member::propose`], applied at most once per `request` id when there is one.
    pub async fn propose_once(
        &self,
        cmd: Command,
        request: Option<String>,
    ) -> Result<Outcome, ProposeError> {
        match request {
            Some(request) => {
                self.propose(Command::Once {
                    request,
                    command: Box::new(cmd),
                })
                .await
            }
            None => self.propose(cmd).await,
        }
    }

    /// The URL of `path` on the member at `addr` (`host:port`).
    pub fn url(&self, addr: &str, path: &str) -> String {
        let scheme = if self.cfg.tls { "https" } else { "http" };
        format!("{scheme}://{addr}{path}")
    }

    /// The cluster CA, once the first leader made it.
    pub fn cluster_ca(&self) -> Option<starling_pki::ClusterCa> {
        self.read().cluster_ca().map(pki_ca)
    }

    /// The cluster CA, once this member's state has it (it polls: the CA is written once).
    pub async fn wait_cluster_ca(&self) -> starling_pki::ClusterCa {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
        loop {
            tick.tick().await;
            if let Some(ca) = self.cluster_ca() {
                return ca;
            }
        }
    }

    /// Remember that a worker was lately told of, or named, these chunks.
    pub fn chunks_confirmed(&self, hashes: &[starling_proto::ChunkHash]) {
        self.recent_chunks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mark(hashes, std::time::Instant::now());
    }

    /// Each live node that runs `repo`, as this member's tracker last heard from it.
    pub fn fleet(&self, repo: &str) -> Vec<FleetReport> {
        let tracker = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        tracker
            .nodes(std::time::Instant::now())
            .flat_map(|(a, _)| {
                a.apps
                    .iter()
                    .filter(|r| r.repo == repo)
                    .map(|r| FleetReport {
                        node: a.node.clone(),
                        region: a.region.clone(),
                        report: r.clone(),
                    })
            })
            .collect()
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, starling_core::state::ControlState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The build `id`, from memory or the archive. Reads the state file: call it off the
    /// async threads.
    pub fn build(&self, id: u64) -> std::io::Result<Option<Build>> {
        if let Some(b) = self.read().build(id) {
            return Ok(Some(b.clone()));
        }
        self.archive.build(id)
    }

    /// Whether build `id` was ever given (it may be archived).
    pub fn build_exists(&self, id: u64) -> bool {
        let st = self.read();
        st.build(id).is_some() || st.is_archived_build(id)
    }

    /// Builds matching `q` in memory and the archive, newest first.
    pub fn builds(&self, q: &BuildQuery) -> std::io::Result<Vec<Build>> {
        let mut found = self.read().list_builds(q);
        found.extend(self.archive.builds(q)?);
        found.sort_unstable_by_key(|b| std::cmp::Reverse(b.id));
        found.dedup_by_key(|b| b.id);
        found.truncate(q.limit());
        Ok(found)
    }

    /// Events with an index above `after`, at most `limit`: from the archive while they
    /// are older than memory's, then from memory.
    pub fn events_after(&self, after: u64, limit: usize) -> std::io::Result<Vec<Event>> {
        let first = self.read().first_event_in_memory();
        let mut evs = if after + 1 < first {
            self.archive.events(after, first, limit)?
        } else {
            Vec::new()
        };
        if evs.len() < limit {
            let from = evs.last().map_or(after, |e| e.index);
            evs.extend(self.read().events_after(from, limit - evs.len()));
        }
        Ok(evs)
    }

    /// The deployment `id`, from memory or the archive (reads the state file).
    pub fn deployment(&self, id: u64) -> std::io::Result<Option<Deployment>> {
        if let Some(d) = self.read().deployment(id) {
            return Ok(Some(d.clone()));
        }
        self.archive.deployment(id)
    }

    /// Deployments of `repo` (all when `None`) in memory and the archive, newest first.
    pub fn deployments(
        &self,
        repo: Option<&str>,
        limit: usize,
    ) -> std::io::Result<Vec<Deployment>> {
        let mut found = self.read().list_deployments(repo, limit);
        found.extend(self.archive.deployments(repo, limit)?);
        found.sort_unstable_by_key(|d| std::cmp::Reverse(d.id));
        found.dedup_by_key(|d| d.id);
        found.truncate(limit);
        Ok(found)
    }

    /// Releases of `repo` (all when `None`): those in memory, and at most `archived` of
    /// the collected ones in the archive; newest first.
    pub fn releases(&self, repo: Option<&str>, archived: usize) -> std::io::Result<Vec<Release>> {
        let mut all = self.read().list_releases(repo);
        all.extend(self.archive.releases(repo, archived)?);
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.build.cmp(&a.build)));
        let mut seen = std::collections::HashSet::new();
        all.retain(|r| seen.insert(r.id));
        Ok(all)
    }

    /// Why this member cannot serve, if it cannot: its storage failed, or its Raft core
    /// stopped (openraft stops on a storage error).
    pub fn broken(&self) -> Option<String> {
        if let Some(f) = self.fault.get() {
            return Some(f.to_string());
        }
        match &self.raft.metrics().borrow_watched().running_state {
            Ok(()) => None,
            Err(fatal) => Some(format!("Raft stopped: {fatal}")),
        }
    }

    /// The leader's id and HTTP address, as this member knows them.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow_watched().clone();
        let leader = m.current_leader?;
        let addr = m
            .membership_config
            .nodes()
            .find(|(id, _)| **id == leader)
            .map(|(_, n)| n.addr.clone())?;
        Some((leader, addr))
    }

    /// On the leader: add `req` as a learner, wait for it to catch up, promote it to voter.
    pub async fn admit(&self, req: JoinRequest) -> Result<(), AdmitError> {
        let voters: BTreeSet<NodeId> = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .voter_ids()
            .collect();
        if voters.contains(&req.id) {
            return Ok(());
        }
        self.raft
            .add_learner(req.id, BasicNode::new(req.addr.clone()), true)
            .await
            .map_err(|e| AdmitError::AddLearner(e.to_string()))?;
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([req.id])), false)
            .await
            .map_err(|e| AdmitError::Promote(e.to_string()))?;
        tracing::info!(id = req.id, addr = %req.addr, "member promoted to voter");
        Ok(())
    }
}

/// Why a member could not be admitted; openraft's errors, as their sentences.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("adding it as a learner: {0}")]
    AddLearner(String),
    #[error("promoting it to voter: {0}")]
    Promote(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("this member is not the leader")]
    NotLeader,
    #[error("{0}")]
    Raft(String),
}
