//! The commands the control plane replicates through its Raft log, and what applying one
//! answers. Every command carries the time `at` chosen by the proposing leader, so that
//! applying it gives the same result on every member and on every replay.

use serde::{Deserialize, Serialize};

use crate::{
    Build, BuildStatus, DeployStep, Deployment, Millis, Release, ReleaseId, RepoSpec,
    RolloutPolicy, WorkerId,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Register or update a repository.
    PutRepo { spec: RepoSpec, at: Millis },
    /// Queue a build of `sha`. Idempotent by `delivery` and, unless `force`, by (repo, sha).
    QueueBuild {
        repo: String,
        sha: String,
        trigger: String,
        delivery: Option<String>,
        force: bool,
        at: Millis,
    },
    /// Hand the oldest queued build to `worker` until `at + ttl_ms`.
    LeaseBuild {
        worker: WorkerId,
        ttl_ms: u64,
        at: Millis,
    },
    /// Extend the lease of `build` held by `worker` for `attempt`.
    Heartbeat {
        build: u64,
        worker: WorkerId,
        attempt: u32,
        ttl_ms: u64,
        at: Millis,
    },
    /// The worker holding the lease reports the end of the build.
    CompleteBuild {
        build: u64,
        worker: WorkerId,
        attempt: u32,
        status: BuildStatus,
        release: Option<ReleaseId>,
        reason: Option<String>,
        at: Millis,
    },
    /// Cancel a build: a queued one at once, a running one at its next heartbeat.
    CancelBuild { build: u64, at: Millis },
    /// Proposed by the lease reaper for leases it saw expire. Applying re-checks each
    /// against `at`, so a stale proposal (the lease was renewed meanwhile) does nothing.
    ExpireLeases {
        builds: Vec<u64>,
        max_attempts: u32,
        at: Millis,
    },
    /// Set the release a repository's environment should run.
    SetGoal {
        repo: String,
        env: String,
        release: ReleaseId,
        at: Millis,
    },
    /// Proposed by the retention loop; applying re-checks each release is still outside
    /// the kept set, so a release that became a goal meanwhile stays.
    CollectReleases {
        releases: Vec<ReleaseId>,
        keep: usize,
        at: Millis,
    },
    /// No state change; used to measure the write path.
    Noop,
    /// `command`, applied at most once per `request` id within a window of recent ids: a
    /// request retried after an answer was lost (a leader's 503 after it appended, a
    /// follower re-forwarding) gets the first outcome again instead of a second effect.
    Once {
        request: String,
        command: Box<Command>,
    },
    /// Record the cluster's certificate authority; proposed once, by the first leader.
    /// Applying refuses a second one: certificates already issued must stay valid.
    SetClusterCa { ca: CaRecord, at: Millis },
    /// Record a join token (its secret only as a SHA-256); tokens past their
    /// `expires_at` are forgotten when the next one is added.
    AddJoinToken { token: JoinTokenRecord, at: Millis },
    /// Start deploying `release` to `repo`'s environment `env`; a deployment of the same
    /// environment still rolling is superseded. `policy` is the repository's with the
    /// call's overrides. An all-at-once deployment starts its one wave at once.
    StartDeployment {
        repo: String,
        env: String,
        release: ReleaseId,
        policy: RolloutPolicy,
        trigger: String,
        at: Millis,
    },
    /// Move deployment `id` on by `step`, proposed by the leader's rollout loop.
    /// Applying refuses a step that no longer fits (a wave already started, a
    /// deployment no longer rolling), so a step proposed twice acts once.
    AdvanceDeployment {
        id: u64,
        step: DeployStep,
        at: Millis,
    },
    /// Pause (no new wave starts) or resume a deployment.
    PauseDeployment { id: u64, paused: bool, at: Millis },
    /// The leader's notifier handled every event up to `index` (delivered, or gave up):
    /// a new leader goes on from there.
    MarkNotified { index: u64, at: Millis },
}

/// The cluster's certificate authority as the members keep it. Only members see it: it
/// is in the log, the state and snapshots, never in an API answer.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRecord {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CaRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaRecord")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A join token as the members keep it: a node that shows the secret whose SHA-256 this
/// is, before `expires_at`, gets a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    pub id: String,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
    pub expires_at: Millis,
}

/// Request ids remembered by [`Command::Once`]; the oldest is forgotten beyond this.
pub const REQUEST_WINDOW: usize = 4096;

impl Command {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::PutRepo { .. } => "put_repo",
            Command::QueueBuild { .. } => "queue_build",
            Command::LeaseBuild { .. } => "lease_build",
            Command::Heartbeat { .. } => "heartbeat",
            Command::CompleteBuild { .. } => "complete_build",
            Command::CancelBuild { .. } => "cancel_build",
            Command::ExpireLeases { .. } => "expire_leases",
            Command::SetGoal { .. } => "set_goal",
            Command::CollectReleases { .. } => "collect_releases",
            Command::Noop => "noop",
            Command::Once { command, .. } => command.name(),
            Command::SetClusterCa { .. } => "set_cluster_ca",
            Command::AddJoinToken { .. } => "add_join_token",
            Command::StartDeployment { .. } => "start_deployment",
            Command::AdvanceDeployment { .. } => "advance_deployment",
            Command::PauseDeployment { .. } => "pause_deployment",
            Command::MarkNotified { .. } => "mark_notified",
        }
    }
}

/// What applying a command answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Outcome {
    #[default]
    Done,
    /// A new build was queued.
    Queued(Build),
    /// The webhook delivery id was seen before: the build it made.
    DuplicateDelivery(Build),
    /// The commit already has a build and `force` was not set.
    DuplicateCommit(Build),
    /// A lease was granted.
    Leased(Build),
    /// Nothing is queued.
    NothingQueued,
    /// Heartbeat accepted.
    LeaseExtended {
        lease_expires_at: Millis,
        cancel: bool,
    },
    /// The build is in its new state.
    Build(Build),
    /// The builds whose leases had expired: requeued or failed.
    Expired(Vec<u64>),
    /// The releases retention let go.
    Collected(Vec<ReleaseId>),
    Release(Release),
    /// The deployment as the command left it.
    Deployment(Box<Deployment>),
    /// The command was refused; nothing changed.
    Rejected(Rejection),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("unknown repository {0}")]
    UnknownRepo(String),
    #[error("unknown build {0}")]
    UnknownBuild(u64),
    #[error("build {build} is not leased to {worker} for attempt {attempt}")]
    NotLeaseHolder {
        build: u64,
        worker: WorkerId,
        attempt: u32,
    },
    #[error("build {0} has already finished")]
    AlreadyFinished(u64),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("unknown deployment {0}")]
    UnknownDeployment(u64),
    #[error("deployment {id} cannot {step}: {why}")]
    StepRefused { id: u64, step: String, why: String },
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}
