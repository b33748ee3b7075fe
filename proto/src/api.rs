//! Records and requests of the public HTTP API (JSON).

use serde::{Deserialize, Serialize};

use crate::Millis;

/// Where a build is in its life. The spelling (`snake_case`) is the API's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl BuildStatus {
    pub const ALL: [BuildStatus; 6] = [
        BuildStatus::Queued,
        BuildStatus::Running,
        BuildStatus::Succeeded,
        BuildStatus::Failed,
        BuildStatus::Cancelled,
        BuildStatus::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Queued => "queued",
            BuildStatus::Running => "running",
            BuildStatus::Succeeded => "succeeded",
            BuildStatus::Failed => "failed",
            BuildStatus::Cancelled => "cancelled",
            BuildStatus::TimedOut => "timed_out",
        }
    }

    /// A terminal status never changes again.
    pub fn is_terminal(self) -> bool {
        !matches!(self, BuildStatus::Queued | BuildStatus::Running)
    }
}

impl std::fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for BuildStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BuildStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown build status {s:?} (expected one of queued, running, succeeded, failed, cancelled, timed_out)"
                )
            })
    }
}

/// A repository as the API shows it. The webhook secret is never part of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repo {
    pub name: String,
    pub url: String,
    pub branch: String,
    pub auto_deploy: bool,
    pub created_at: Millis,
    /// A build whose release would be larger fails and stores nothing.
    #[serde(default = "default_max_release_bytes")]
    pub max_release_bytes: u64,
    #[serde(default)]
    pub rollout: crate::RolloutPolicy,
    /// Where notifications of its builds and deployments go.
    #[serde(default)]
    pub notify: Vec<String>,
}

/// The release size limit of a repository registered without one: 4 GiB.
pub const DEFAULT_MAX_RELEASE_BYTES: u64 = 4 << 30;

fn default_max_release_bytes() -> u64 {
    DEFAULT_MAX_RELEASE_BYTES
}

/// `POST /v1/repos`: register (or update) a repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoSpec {
    pub name: String,
    pub url: String,
    #[serde(default = "default_branch")]
    pub branch: String,
    /// Shared secret of the GitHub webhook (HMAC key) or GitLab token.
    #[serde(default)]
    pub webhook_secret: String,
    #[serde(default = "default_true")]
    pub auto_deploy: bool,
    /// Largest release a build may make, in bytes (default 4 GiB).
    #[serde(default = "default_max_release_bytes")]
    pub max_release_bytes: u64,
    /// How its deployments roll out (default: waves, a minute's soak, 10% failures).
    /// Always written: members exchange commands in postcard, which cannot skip a field.
    #[serde(default)]
    pub rollout: crate::RolloutPolicy,
    /// URLs that get a signed JSON POST when one of its builds or deployments ends.
    #[serde(default)]
    pub notify: Vec<String>,
    /// The HMAC key of those POSTs (`X-Starling-Signature-256`); empty: the webhook
    /// secret.
    #[serde(default)]
    pub notify_secret: String,
}

fn default_branch() -> String {
    "main".to_string()
}
fn default_true() -> bool {
    true
}

/// One state change of a build; the history of a build is the list of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub status: BuildStatus,
    pub at: Millis,
    pub attempt: u32,
    pub worker: Option<crate::WorkerId>,
    pub reason: Option<String>,
}

/// A build of one commit of one repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    pub id: u64,
    pub repo: String,
    pub sha: String,
    pub status: BuildStatus,
    /// 1 for the first lease; a lease that expires puts the build back with attempt+1.
    pub attempt: u32,
    pub worker: Option<crate::WorkerId>,
    pub release: Option<crate::ReleaseId>,
    pub reason: Option<String>,
    /// What asked for the build: `github`, `gitlab` or `manual`.
    pub trigger: String,
    /// The webhook delivery id, when a webhook asked for it.
    pub delivery: Option<String>,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    /// While `running`: when the current lease ends unless renewed.
    pub lease_expires_at: Option<Millis>,
    pub cancel_requested: bool,
    pub history: Vec<Transition>,
}

/// One entry of the append-only event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Monotonic, gap-free, starting at 1.
    pub index: u64,
    pub at: Millis,
    pub kind: crate::EventKind,
    pub repo: Option<String>,
    pub build: Option<u64>,
    pub sha: Option<String>,
    pub status: Option<BuildStatus>,
    pub detail: Option<String>,
    /// The deployment it concerns (`deploy:*` events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<u64>,
}

/// A release recorded by a successful build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub id: crate::ReleaseId,
    pub repo: String,
    pub sha: String,
    pub build: u64,
    pub created_at: Millis,
    /// Set when retention let it go: its chunks may be collected from the origin stores.
    /// The record itself stays, as history.
    pub collected_at: Option<Millis>,
}

/// `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub id: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_applied: Option<u64>,
    pub last_log_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub members: Vec<Member>,
    /// The cluster CA's fingerprint (what join tokens carry), once the first leader made it.
    #[serde(default)]
    pub cluster_ca: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    pub addr: String,
    pub voter: bool,
}

/// `POST /v1/trigger`: a build asked for by hand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerRequest {
    pub repo: String,
    /// What to build: a full commit id, or a branch, tag or `HEAD`, which the control
    /// plane resolves against the repository (`git ls-remote`) before queueing; absent,
    /// the repository's branch.
    pub sha: Option<String>,
    #[serde(default)]
    pub force: bool,
}

/// Answer to a trigger or webhook that reached the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueOutcome {
    pub outcome: crate::QueueResult,
    pub build: Build,
}

/// `POST /v1/chunks/missing`: which of these chunks does this member's origin store lack?
/// A worker asks before publishing, so that chunks already held are not sent again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingChunks {
    pub chunks: Vec<crate::ChunkHash>,
}

/// Most chunk names one [`MissingChunks`] question may carry (a 100 GiB release at the
/// default 1 MiB average).
pub const MAX_MISSING_QUERY: usize = 100_000;

/// `POST /v1/leases`: a worker asks for work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub worker: crate::WorkerId,
    /// How long to wait for a queued build before answering 204, in ms (capped at 60 s).
    #[serde(default)]
    pub wait_ms: u64,
}

/// A granted lease: the build and until when it is the worker's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub build: Build,
    pub attempt: u32,
    pub lease_expires_at: Millis,
    pub lease_ttl_ms: u64,
    /// The repository's URL as registered, credentials included: only token holders get
    /// leases, and the API shows it everywhere else redacted.
    #[serde(default)]
    pub url: String,
    /// The repository's release size limit.
    #[serde(default = "default_max_release_bytes")]
    pub max_release_bytes: u64,
}

/// `POST /v1/builds/{id}/heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub worker: crate::WorkerId,
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub lease_expires_at: Millis,
    /// The build was cancelled: stop it and complete it as `cancelled`.
    pub cancel: bool,
}

/// `POST /v1/builds/{id}/complete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteRequest {
    pub worker: crate::WorkerId,
    pub attempt: u32,
    /// One of the terminal statuses.
    pub status: BuildStatus,
    pub release: Option<crate::ReleaseId>,
    pub reason: Option<String>,
}

/// `POST /internal/join` (cluster key only): a new member asks to be added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub id: u64,
    pub addr: String,
}

/// Every error body of the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// `POST /v1/join-tokens`: a token a new node exchanges for its certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRequest {
    /// How long it is valid, in ms (default 24 h, at most 30 days).
    #[serde(default)]
    pub ttl_ms: Option<u64>,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenReply {
    pub token: String,
    pub expires_at: Millis,
}

impl std::fmt::Debug for JoinTokenReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinTokenReply")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// `POST /v1/enroll`: a node shows a join token and gets a certificate for `name`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub token: String,
    pub name: String,
    pub region: String,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("name", &self.name)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// The node's certificate and key, and the CA to trust.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollReply {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_cert_pem: String,
}

impl std::fmt::Debug for EnrollReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollReply").finish_non_exhaustive()
    }
}

/// `GET /v1/nodes`: a fleet machine as the member answering last heard of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its name (as in its certificate).
    pub id: String,
    pub region: String,
    /// Where it serves chunks.
    pub address: String,
    /// The release it runs now (of its first repository, by name; `apps` has each).
    pub release: Option<crate::ReleaseId>,
    /// The most pressing of its repositories' states: `failed`, then `fetching`,
    /// `starting`, `running`, `idle`.
    pub state: AppState,
    /// When it last announced itself (ms since the epoch).
    pub last_seen: Millis,
    /// When it switched to `release` (ms since the epoch).
    pub activated_at: Option<Millis>,
    /// Why it failed, when `state` is `failed`.
    #[serde(default)]
    pub error: Option<String>,
    /// Each repository it runs.
    #[serde(default)]
    pub apps: Vec<AppReport>,
}

impl NodeInfo {
    /// The node-wide fields from its repositories' reports (the first by name gives
    /// `release` and `activated_at`).
    pub fn summary(
        apps: &[AppReport],
    ) -> (
        Option<crate::ReleaseId>,
        Option<Millis>,
        AppState,
        Option<String>,
    ) {
        let first = apps.iter().min_by(|a, b| a.repo.cmp(&b.repo));
        let worst = apps.iter().max_by_key(|a| a.state.urgency());
        (
            first.and_then(|a| a.release),
            first.and_then(|a| a.activated_at),
            worst.map_or(AppState::Idle, |a| a.state),
            worst.and_then(|a| a.error.clone()),
        )
    }
}

/// What a node is doing with one repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppState {
    /// No release yet.
    Idle,
    /// Fetching, unpacking or switching to the goal's release.
    Fetching,
    /// Its start command runs; the health command has not passed yet.
    Starting,
    /// Switched to the release; its process runs and passed its health command (either
    /// may be absent).
    Running,
    /// The last step failed; `error` says why.
    Failed,
}

impl AppState {
    /// How much a node in this state needs attention, for the node-wide state.
    fn urgency(self) -> u8 {
        match self {
            AppState::Idle => 0,
            AppState::Running => 1,
            AppState::Starting => 2,
            AppState::Fetching => 3,
            AppState::Failed => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AppState::Idle => "idle",
            AppState::Fetching => "fetching",
            AppState::Starting => "starting",
            AppState::Running => "running",
            AppState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One repository on a node, as the node reports it (on the wire in its `Announce`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppReport {
    pub repo: String,
    /// The release it runs (or last ran, when failed or fetching the next).
    pub release: Option<crate::ReleaseId>,
    /// When it switched to `release` (ms since the epoch).
    pub activated_at: Option<Millis>,
    pub state: AppState,
    /// Why, when `state` is `failed`; at most [`crate::peer::MAX_REASON`] bytes.
    pub error: Option<String>,
    /// The newest release it holds unpacked and ready beside `release` (staged for a
    /// deployment whose wave has not reached this node yet), and since when.
    #[serde(default)]
    pub staged: Option<crate::ReleaseId>,
    #[serde(default)]
    pub staged_at: Option<Millis>,
    /// The release it is fetching for this repository now, if any: how the tracker
    /// tells which nodes a fetch of that release is still to hear from.
    #[serde(default)]
    pub fetching: Option<crate::ReleaseId>,
}

impl AppReport {
    /// `repo` with no release yet: the report other ones are built from
    /// (`AppReport { state, ..AppReport::idle(repo) }`).
    pub fn idle(repo: impl Into<String>) -> AppReport {
        AppReport {
            repo: repo.into(),
            release: None,
            activated_at: None,
            state: AppState::Idle,
            error: None,
            staged: None,
            staged_at: None,
            fetching: None,
        }
    }
}

/// `GET /v1/goals?repo=`: what each repository's environments should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoalInfo {
    pub repo: String,
    pub env: String,
    /// The release nodes hold: fetched, verified and unpacked, ready to run.
    pub release: crate::ReleaseId,
    /// When it, or the deployment behind it, last changed (ms since the epoch): a
    /// long-poll answers once a goal changed after the time it was given.
    pub at: Millis,
    /// The deployment that set it, if one did (goals from before deployments existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<u64>,
    /// Asked for by a node (`?node=&region=`): the release that node runs now, which is
    /// `release` once its wave started and the one before until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<crate::ReleaseId>,
}
