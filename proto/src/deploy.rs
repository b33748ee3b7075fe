//! Deployments: how a release goes from "the goal" to "what every node runs".
//!
//! Fetching is never gated: as soon as a deployment starts, every node of the repository
//! fetches and verifies the release and reports it staged. Waves gate only *activation*:
//! a node runs the new release once a wave that selects it has started, and keeps the
//! previous one until then. A wave is done when every node it selects runs the release
//! healthily for the soak time; too many failures in a wave stop the deployment and
//! every node returns to the release it ran before (`rolled_back`).
//!
//! A deployment is a Raft record with its own history; the leader's rollout loop moves
//! it on with [`DeployStep`]s that applying re-checks, so a step proposed twice (a leader
//! that lost its leadership, its successor) takes effect once.

use serde::{Deserialize, Serialize};

use crate::{AppState, Millis, ReleaseId};

/// How a deployment activates its release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// One canary node, then region by region, each wave soaking before the next.
    #[default]
    Waves,
    /// Every node switches as soon as it holds the release.
    AllAtOnce,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Waves => "waves",
            Strategy::AllAtOnce => "all-at-once",
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "waves" => Ok(Strategy::Waves),
            "all-at-once" => Ok(Strategy::AllAtOnce),
            other => Err(format!(
                "unknown strategy {other:?} (expected waves or all-at-once)"
            )),
        }
    }
}

/// A repository's rollout settings; a deploy call may override each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutPolicy {
    #[serde(default)]
    pub strategy: Strategy,
    /// How long a wave's nodes must run healthily before the next wave starts (ms).
    #[serde(default = "default_soak_ms")]
    pub soak_ms: u64,
    /// The share of a wave's nodes (percent) that may fail; more stops the deployment
    /// and rolls it back. 0 stops at the first failure.
    #[serde(default = "default_max_failed_pct")]
    pub max_failed_pct: u8,
    /// How long a wave may take to become healthy (ms): past it, the deployment stops
    /// and rolls back, as a wave with too many failures does.
    #[serde(default = "default_wave_timeout_ms")]
    pub wave_timeout_ms: u64,
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        RolloutPolicy {
            strategy: Strategy::Waves,
            soak_ms: default_soak_ms(),
            max_failed_pct: default_max_failed_pct(),
            wave_timeout_ms: default_wave_timeout_ms(),
        }
    }
}

/// A wave soaks for a minute unless the repository says otherwise.
pub fn default_soak_ms() -> u64 {
    60_000
}

fn default_max_failed_pct() -> u8 {
    10
}

/// A wave has half an hour to become healthy unless the repository says otherwise.
pub fn default_wave_timeout_ms() -> u64 {
    30 * 60_000
}

/// Where a deployment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployStatus {
    /// Waves are being activated.
    Rolling,
    /// No new wave starts until resumed; started waves stay as they are.
    Paused,
    /// Every wave is done: every node runs the release.
    Succeeded,
    /// A wave failed: every node returns to the release it ran before.
    RolledBack,
    /// A newer deployment of the same environment took over.
    Superseded,
}

impl DeployStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeployStatus::Rolling => "rolling",
            DeployStatus::Paused => "paused",
            DeployStatus::Succeeded => "succeeded",
            DeployStatus::RolledBack => "rolled_back",
            DeployStatus::Superseded => "superseded",
        }
    }

    /// A final status never changes again.
    pub fn is_final(self) -> bool {
        !matches!(self, DeployStatus::Rolling | DeployStatus::Paused)
    }
}

impl std::fmt::Display for DeployStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The nodes a wave activates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveTarget {
    /// These nodes, by name (a canary).
    Nodes(Vec<String>),
    /// Every node of the region, including those that join later.
    Region(String),
    /// Every node.
    All,
}

impl WaveTarget {
    pub fn selects(&self, node: &str, region: &str) -> bool {
        match self {
            WaveTarget::Nodes(names) => names.iter().any(|n| n == node),
            WaveTarget::Region(r) => r == region,
            WaveTarget::All => true,
        }
    }
}

/// What one node did in a wave, recorded when the wave ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeOutcome {
    pub node: String,
    pub region: String,
    /// The release it ran at the end of the wave.
    pub release: Option<ReleaseId>,
    pub state: AppState,
    pub error: Option<String>,
}

/// One wave of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    /// `canary`, a region's name, or `all`.
    pub name: String,
    pub target: WaveTarget,
    pub started_at: Option<Millis>,
    /// When every node it selects first ran the release healthily; it is done a soak
    /// time later.
    pub healthy_at: Option<Millis>,
    pub done_at: Option<Millis>,
    /// The nodes it selected, when it ended (done or failed).
    pub outcomes: Vec<NodeOutcome>,
}

impl Wave {
    pub fn new(name: impl Into<String>, target: WaveTarget) -> Wave {
        Wave {
            name: name.into(),
            target,
            started_at: None,
            healthy_at: None,
            done_at: None,
            outcomes: Vec::new(),
        }
    }
}

/// One change of a deployment; its history is the list of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployTransition {
    pub at: Millis,
    /// `started`, `planned`, `wave_started`, `wave_healthy`, `wave_done`, `paused`,
    /// `resumed`, `succeeded`, `rolled_back`, `superseded`.
    pub what: String,
    /// The wave it concerns, by index.
    pub wave: Option<usize>,
    pub reason: Option<String>,
}

/// `GET /v1/deploys/{id}`: a deployment and its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: u64,
    pub repo: String,
    pub env: String,
    pub release: ReleaseId,
    /// What the environment ran before (the last release a deployment finished, or the
    /// goal before the first): what nodes keep until their wave, and return to on a
    /// rollback.
    pub from: Option<ReleaseId>,
    pub policy: RolloutPolicy,
    /// Who asked: `build N`, `api`, `rollback`.
    pub trigger: String,
    pub status: DeployStatus,
    /// Empty until the leader planned them from the fleet it saw.
    pub waves: Vec<Wave>,
    pub created_at: Millis,
    pub finished_at: Option<Millis>,
    pub reason: Option<String>,
    pub history: Vec<DeployTransition>,
}

impl Deployment {
    /// The wave to act on next: the first one not done.
    pub fn current_wave(&self) -> Option<usize> {
        self.waves.iter().position(|w| w.done_at.is_none())
    }

    /// The release `node` of `region` should run now.
    pub fn release_for(&self, node: &str, region: &str) -> Option<ReleaseId> {
        match self.status {
            DeployStatus::Succeeded => Some(self.release),
            DeployStatus::RolledBack | DeployStatus::Superseded => self.from,
            DeployStatus::Rolling | DeployStatus::Paused => {
                let active = self
                    .waves
                    .iter()
                    .any(|w| w.started_at.is_some() && w.target.selects(node, region));
                if active {
                    Some(self.release)
                } else {
                    self.from
                }
            }
        }
    }
}

/// One move of a deployment, chosen by the rollout planner on the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeployStep {
    /// Set the waves (once, from the fleet the leader sees).
    Plan { waves: Vec<Wave> },
    /// Let the wave's nodes run the release.
    StartWave { wave: usize },
    /// Every node of the wave runs the release healthily; the soak begins.
    WaveHealthy { wave: usize },
    /// The soak passed.
    CompleteWave {
        wave: usize,
        outcomes: Vec<NodeOutcome>,
    },
    /// Too many of the wave's nodes failed: stop, and roll back.
    Fail {
        wave: usize,
        reason: String,
        outcomes: Vec<NodeOutcome>,
    },
    /// Every wave is done.
    Succeed,
}

impl DeployStep {
    pub fn name(&self) -> &'static str {
        match self {
            DeployStep::Plan { .. } => "planned",
            DeployStep::StartWave { .. } => "wave_started",
            DeployStep::WaveHealthy { .. } => "wave_healthy",
            DeployStep::CompleteWave { .. } => "wave_done",
            DeployStep::Fail { .. } => "rolled_back",
            DeployStep::Succeed => "succeeded",
        }
    }
}

/// `GET /v1/deploys/{id}`: a deployment with how far the fleet got, as the answering
/// member's tracker sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentView {
    #[serde(flatten)]
    pub deployment: Deployment,
    pub progress: Progress,
}

/// How far a deployment's nodes are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Live nodes of the repository.
    pub nodes: usize,
    /// Of those, holding the release ready (or running it).
    pub staged: usize,
    /// Running it and healthy.
    pub running: usize,
    /// Failed on it.
    pub failed: usize,
    /// Time from the deployment's start to a node holding the release, over the nodes
    /// that hold it (ms; the nodes' clocks).
    pub staged_p50_ms: Option<u64>,
    pub staged_p99_ms: Option<u64>,
    /// The same counts per region, by name.
    pub regions: Vec<RegionProgress>,
    /// Per wave, in order: the live nodes it selects and how many run the release.
    pub waves: Vec<RegionProgress>,
}

/// Counts of one region's (or one wave's) nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionProgress {
    pub name: String,
    pub nodes: usize,
    pub staged: usize,
    pub running: usize,
    pub failed: usize,
}

/// `POST /v1/deploys`: deploy `release` (default: the repository's newest) to `repo`'s
/// environment `env`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRequest {
    pub repo: String,
    #[serde(default)]
    pub release: Option<ReleaseId>,
    #[serde(default = "default_env")]
    pub env: String,
    /// Overrides of the repository's rollout policy.
    #[serde(default)]
    pub strategy: Option<Strategy>,
    #[serde(default)]
    pub soak_ms: Option<u64>,
    #[serde(default)]
    pub max_failed_pct: Option<u8>,
    #[serde(default)]
    pub wave_timeout_ms: Option<u64>,
}

/// `POST /v1/rollback`: deploy `to` (default: the release the environment ran before
/// its current one) to every node at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackRequest {
    pub repo: String,
    #[serde(default = "default_env")]
    pub env: String,
    #[serde(default)]
    pub to: Option<ReleaseId>,
}

fn default_env() -> String {
    "default".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(n: u8) -> ReleaseId {
        ReleaseId::from_bytes([n; 32])
    }

    fn deployment(status: DeployStatus, waves: Vec<Wave>) -> Deployment {
        Deployment {
            id: 1,
            repo: "acme/web".into(),
            env: "default".into(),
            release: rel(2),
            from: Some(rel(1)),
            policy: RolloutPolicy::default(),
            trigger: "api".into(),
            status,
            waves,
            created_at: 0,
            finished_at: None,
            reason: None,
            history: Vec::new(),
        }
    }

    #[test]
    fn a_node_runs_the_new_release_once_a_wave_that_selects_it_started() {
        let mut canary = Wave::new("canary", WaveTarget::Nodes(vec!["a1".into()]));
        canary.started_at = Some(5);
        let eu = Wave::new("eu", WaveTarget::Region("eu".into()));
        let d = deployment(DeployStatus::Rolling, vec![canary, eu]);
        assert_eq!(d.release_for("a1", "us"), Some(rel(2)));
        assert_eq!(d.release_for("e1", "eu"), Some(rel(1)));
        let paused = Deployment {
            status: DeployStatus::Paused,
            ..d.clone()
        };
        assert_eq!(paused.release_for("a1", "us"), Some(rel(2)));
        let back = Deployment {
            status: DeployStatus::RolledBack,
            ..d.clone()
        };
        assert_eq!(back.release_for("a1", "us"), Some(rel(1)));
        let done = Deployment {
            status: DeployStatus::Succeeded,
            ..d
        };
        assert_eq!(done.release_for("late", "asia"), Some(rel(2)));
    }

    #[test]
    fn strategies_read_as_the_cli_spells_them() {
        assert_eq!("waves".parse::<Strategy>(), Ok(Strategy::Waves));
        assert_eq!("all-at-once".parse::<Strategy>(), Ok(Strategy::AllAtOnce));
        assert!("yolo".parse::<Strategy>().is_err());
        assert_eq!(
            serde_json::to_string(&Strategy::AllAtOnce).unwrap(),
            "\"all-at-once\""
        );
    }
}
