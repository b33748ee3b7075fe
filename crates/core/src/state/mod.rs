//! The replicated state machine's data and its `apply`: pure, deterministic, no I/O.
//!
//! Every member applies the same commands in the same order and must end in the same
//! state, so nothing here reads a clock (commands carry the leader's `at`), iterates a
//! hash map in an order that matters, or touches a file. Persistence is the store's job:
//! `apply` records which records it touched in [`Touched`], and the store writes those.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use imbl::{OrdMap, Vector};
use serde::{Deserialize, Serialize};
use starling_proto::{
    Build, BuildStatus, CaRecord, Command, Deployment, Event, EventKind, JoinTokenRecord, Millis,
    Outcome, Rejection, Release, ReleaseId, Repo, RepoSpec, Transition, WorkerId,
};

mod deployments;
mod history;

pub use history::{HistoryMarks, HistoryWindow};

/// The environment a repository's successful builds go to when `auto_deploy` is on.
pub const DEFAULT_ENV: &str = "default";

/// A repository with the fields the API never shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRepo {
    pub repo: Repo,
    pub webhook_secret: String,
    /// The key notifications are signed with (empty: the webhook secret).
    #[serde(default)]
    pub notify_secret: String,
}

/// What a repository's environment should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goal {
    pub repo: String,
    pub env: String,
    /// The release its nodes hold (and run, once their wave started).
    pub release: ReleaseId,
    /// When it or its deployment last changed.
    pub at: Millis,
    /// The newest deployment of the environment, which says what each node runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<u64>,
}

/// The key of an environment's goal, `{repo}/{env}`. It names one goal only because an
/// environment name holds no `/` ([`starling_proto::env_name`]); it is made from the
/// goal's own fields, never parsed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GoalKey(String);

impl GoalKey {
    pub fn of(goal: &Goal) -> GoalKey {
        GoalKey::for_env(&goal.repo, &goal.env)
    }

    pub fn for_env(repo: &str, env: &str) -> GoalKey {
        GoalKey(format!("{repo}/{env}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The durable facts in memory: the working set and the newest history
/// ([`HistoryWindow`]). Everything else in [`ControlState`] is derived from these.
///
/// The larger collections are persistent (`imbl`): dropping events from the front of
/// the window and slicing them for readers costs O(log n).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Records {
    pub repos: BTreeMap<String, StoredRepo>,
    /// Builds in memory: queued, running and the newest finished ([`HistoryWindow`]).
    pub builds: OrdMap<u64, Build>,
    /// The newest events: `events[i]` has index `marks.events_archived + i + 1`.
    pub events: Vector<Event>,
    /// Releases not collected, and the newest collected.
    pub releases: OrdMap<ReleaseId, Release>,
    pub goals: BTreeMap<GoalKey, Goal>,
    /// The outcomes of the last [`starling_proto::REQUEST_WINDOW`] requests applied with a
    /// request id ([`Command::Once`]), by the order they were applied.
    #[serde(default)]
    pub requests: OrdMap<u64, RequestRecord>,
    /// The cluster's certificate authority, once the first leader made it.
    #[serde(default)]
    pub ca: Option<CaRecord>,
    /// Join tokens not yet expired (as of the last one added), by id.
    #[serde(default)]
    pub join_tokens: BTreeMap<String, JoinTokenRecord>,
    /// Every deployment, by id (from 1).
    #[serde(default)]
    pub deployments: OrdMap<u64, Deployment>,
    /// Events up to this index were notified (or given up on) by a leader's notifier.
    #[serde(default)]
    pub notified_up_to: u64,
    #[serde(default)]
    pub marks: HistoryMarks,
}

/// What a request with an id was answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub request: String,
    pub outcome: Outcome,
}

/// Keys of the records an `apply` changed, for the store to write.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Touched {
    pub repos: BTreeSet<String>,
    pub builds: BTreeSet<u64>,
    /// Events with an index at or above this were appended.
    pub events_from: Option<u64>,
    pub releases: BTreeSet<ReleaseId>,
    pub goals: BTreeSet<GoalKey>,
    /// Request records added, and those forgotten (to delete).
    pub requests: BTreeSet<u64>,
    pub requests_forgotten: BTreeSet<u64>,
    pub ca: bool,
    /// Join tokens added, and those forgotten (to delete).
    pub join_tokens: BTreeSet<String>,
    pub join_tokens_forgotten: BTreeSet<String>,
    pub deployments: BTreeSet<u64>,
    pub notified: bool,
    /// Records that left memory (see [`HistoryWindow`]), for the store's archive.
    pub archived_builds: Vec<Build>,
    pub archived_releases: Vec<Release>,
    pub archived_deployments: Vec<Deployment>,
    /// Events appended and archived since the last call: not in memory, not yet written.
    pub archived_events: Vec<Event>,
    /// [`Records::marks`] changed.
    pub marks: bool,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        *self == Touched::default()
    }
}

/// Look-ups derived from [`Records`], rebuilt on load rather than stored.
#[derive(Debug, Default, Clone)]
struct Indexes {
    /// Queued builds; the smallest id is the oldest and is leased first.
    queue: BTreeSet<u64>,
    /// Running builds, for the lease reaper.
    running: BTreeSet<u64>,
    by_delivery: HashMap<String, u64>,
    /// The builds of each (repo, sha) in memory.
    by_commit: HashMap<(String, String), BTreeSet<u64>>,
    /// Finished builds in memory, in the order they leave it.
    finished: BTreeSet<(Millis, u64)>,
    /// Collected releases in memory, in the order they leave it.
    collected: BTreeSet<(Millis, ReleaseId)>,
    /// Final deployments in memory that no goal names, in the order they leave it.
    finished_deployments: BTreeSet<(Millis, u64)>,
    /// Request id → its place in `Records::requests`.
    by_request: HashMap<String, u64>,
}

#[derive(Debug, Default, Clone)]
pub struct ControlState {
    records: Records,
    index: Indexes,
    touched: Touched,
    window: HistoryWindow,
}

/// Filter of `GET /v1/builds`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct BuildQuery {
    pub repo: Option<String>,
    pub status: Option<BuildStatus>,
    /// A full sha or a prefix of one.
    pub sha: Option<String>,
    /// Only builds created at or after this time (ms).
    pub since: Option<Millis>,
    /// Only builds created before this time (ms).
    pub until: Option<Millis>,
    pub limit: Option<usize>,
}

pub const DEFAULT_LIST_LIMIT: usize = 100;
pub const MAX_LIST_LIMIT: usize = 100_000;

impl BuildQuery {
    pub fn matches(&self, b: &Build) -> bool {
        self.repo.as_ref().is_none_or(|r| &b.repo == r)
            && self.status.is_none_or(|s| b.status == s)
            && self
                .sha
                .as_ref()
                .is_none_or(|s| b.sha.starts_with(s.as_str()))
            && self.since.is_none_or(|t| b.created_at >= t)
            && self.until.is_none_or(|t| b.created_at < t)
    }

    /// How many builds to answer at most.
    pub fn limit(&self) -> usize {
        self.limit
            .unwrap_or(DEFAULT_LIST_LIMIT)
            .clamp(1, MAX_LIST_LIMIT)
    }
}

impl ControlState {
    /// The state of `records` with the cluster's history window. Records beyond the window
    /// (from a file written before it) leave memory at once; the store finds them in
    /// [`ControlState::take_touched`].
    pub fn from_records(records: Records) -> Self {
        Self::with_window(records, HistoryWindow::default())
    }

    pub fn with_window(records: Records, window: HistoryWindow) -> Self {
        let mut index = Indexes::default();
        for b in records.builds.values() {
            index_build(&mut index, b);
        }
        for (seq, r) in records.requests.iter() {
            index.by_request.insert(r.request.clone(), *seq);
        }
        let mut state = ControlState {
            records,
            index,
            touched: Touched::default(),
            window,
        };
        state.enforce_window();
        state
    }

    pub fn records(&self) -> &Records {
        &self.records
    }

    /// The records changed since the last call.
    pub fn take_touched(&mut self) -> Touched {
        std::mem::take(&mut self.touched)
    }

    pub fn repo(&self, name: &str) -> Option<&StoredRepo> {
        self.records.repos.get(name)
    }

    pub fn build(&self, id: u64) -> Option<&Build> {
        self.records.builds.get(&id)
    }

    pub fn last_event_index(&self) -> u64 {
        self.records.marks.events_archived + self.records.events.len() as u64
    }

    /// Events in memory with an index above `after`, at most `limit` of them. Those
    /// before [`ControlState::first_event_in_memory`] are in the store's archive.
    pub fn events_after(&self, after: u64, limit: usize) -> Vec<Event> {
        let after = after.saturating_sub(self.records.marks.events_archived);
        let start = (after as usize).min(self.records.events.len());
        let end = start.saturating_add(limit).min(self.records.events.len());
        // Read in place: slicing a clone rebuilt the vector's nodes on every call, 5 µs an
        // event, which a notifier catching up paid 100,000 times.
        let mut focus = self.records.events.focus();
        (start..end).map(|i| focus.index(i).clone()).collect()
    }

    pub fn queued_len(&self) -> usize {
        self.index.queue.len()
    }

    pub fn running(&self) -> impl Iterator<Item = &Build> {
        self.index
            .running
            .iter()
            .filter_map(|id| self.records.builds.get(id))
    }

    /// Builds in memory matching `q`, newest first.
    pub fn list_builds(&self, q: &BuildQuery) -> Vec<Build> {
        self.records
            .builds
            .values()
            .rev()
            .filter(|b| q.matches(b))
            .take(q.limit())
            .cloned()
            .collect()
    }

    pub fn list_repos(&self) -> Vec<Repo> {
        self.records
            .repos
            .values()
            .map(|r| r.repo.clone())
            .collect()
    }

    /// Releases of `repo` (all repositories when `None`), newest first.
    pub fn list_releases(&self, repo: Option<&str>) -> Vec<Release> {
        let mut v: Vec<Release> = self
            .records
            .releases
            .values()
            .filter(|r| repo.is_none_or(|name| r.repo == name))
            .cloned()
            .collect();
        v.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.build.cmp(&a.build)));
        v
    }

    pub fn notified_up_to(&self) -> u64 {
        self.records.notified_up_to
    }

    pub fn goals(&self) -> impl Iterator<Item = &Goal> {
        self.records.goals.values()
    }

    /// Apply one committed command. Deterministic: the same state and command give the
    /// same result everywhere.
    pub fn apply(&mut self, cmd: &Command) -> Outcome {
        match cmd {
            Command::Once { request, command } => self.apply_once(request, command),
            Command::PutRepo { spec, at } => self.put_repo(spec, *at),
            Command::QueueBuild {
                repo,
                sha,
                trigger,
                delivery,
                force,
                at,
            } => self.queue_build(repo, sha, trigger, delivery.as_deref(), *force, *at),
            Command::LeaseBuild { worker, ttl_ms, at } => self.lease_build(worker, *ttl_ms, *at),
            Command::Heartbeat {
                build,
                worker,
                attempt,
                ttl_ms,
                at,
            } => self.heartbeat(*build, worker, *attempt, *ttl_ms, *at),
            Command::CompleteBuild {
                build,
                worker,
                attempt,
                status,
                release,
                reason,
                at,
            } => self.complete_build(
                *build,
                worker,
                *attempt,
                *status,
                *release,
                reason.clone(),
                *at,
            ),
            Command::CancelBuild { build, at } => self.cancel_build(*build, *at),
            Command::ExpireLeases {
                builds,
                max_attempts,
                at,
            } => self.expire_leases(builds, *max_attempts, *at),
            Command::SetGoal {
                repo,
                env,
                release,
                at,
            } => self.set_goal(repo, env, *release, *at),
            Command::CollectReleases { releases, keep, at } => {
                self.collect_releases(releases, *keep, *at)
            }
            Command::Noop => Outcome::Done,
            Command::SetClusterCa { ca, .. } => self.set_cluster_ca(ca),
            Command::AddJoinToken { token, at } => self.add_join_token(token, *at),
            Command::StartDeployment {
                repo,
                env,
                release,
                policy,
                trigger,
                at,
            } => self.start_deployment(repo, env, *release, *policy, trigger, *at),
            Command::AdvanceDeployment { id, step, at } => self.advance_deployment(*id, step, *at),
            Command::PauseDeployment { id, paused, at } => self.pause_deployment(*id, *paused, *at),
            // No event: marking events notified must not make one to notify.
            Command::MarkNotified { index, .. } => {
                let index = (*index).min(self.last_event_index());
                if index > self.records.notified_up_to {
                    self.records.notified_up_to = index;
                    self.touched.notified = true;
                }
                Outcome::Done
            }
        }
    }

    /// Releases retention lets go; see [`crate::retention::releases_to_collect`].
    pub fn releases_to_collect(&self, keep: usize) -> Vec<ReleaseId> {
        // What goals name, and what nodes not yet in a deployment's wave still run.
        let goals: BTreeSet<ReleaseId> = self
            .records
            .goals
            .values()
            .flat_map(|g| {
                let from = g
                    .deployment
                    .and_then(|id| self.records.deployments.get(&id))
                    .and_then(|d| d.from);
                std::iter::once(g.release).chain(from)
            })
            .collect();
        crate::retention::releases_to_collect(self.records.releases.values(), &goals, keep)
    }

    fn collect_releases(&mut self, ids: &[ReleaseId], keep: usize, at: Millis) -> Outcome {
        let due: BTreeSet<ReleaseId> = self.releases_to_collect(keep).into_iter().collect();
        let mut done = Vec::new();
        for id in ids.iter().filter(|id| due.contains(*id)) {
            let Some(mut r) = self.records.releases.get(id).cloned() else {
                continue;
            };
            r.collected_at = Some(at);
            self.records.releases.insert(*id, r.clone());
            self.touched.releases.insert(*id);
            self.collected(&r);
            self.push_event(Event {
                repo: Some(r.repo.clone()),
                build: Some(r.build),
                sha: Some(r.sha.clone()),
                detail: Some(id.to_string()),
                ..event_at(EventKind::ReleaseCollected, at)
            });
            done.push(*id);
        }
        Outcome::Collected(done)
    }

    fn set_cluster_ca(&mut self, ca: &CaRecord) -> Outcome {
        if self.records.ca.is_some() {
            return Outcome::Rejected(Rejection::Invalid("the cluster CA is already set".into()));
        }
        self.records.ca = Some(ca.clone());
        self.touched.ca = true;
        Outcome::Done
    }

    fn add_join_token(&mut self, token: &JoinTokenRecord, at: Millis) -> Outcome {
        let id_ok =
            (1..=32).contains(&token.id.len()) && token.id.bytes().all(|c| c.is_ascii_hexdigit());
        let hash_ok = token.secret_sha256.len() == 64
            && token.secret_sha256.bytes().all(|c| c.is_ascii_hexdigit());
        if !id_ok || !hash_ok || token.expires_at <= at {
            return Outcome::Rejected(Rejection::Invalid("malformed or expired join token".into()));
        }
        let expired: Vec<String> = self
            .records
            .join_tokens
            .iter()
            .filter(|(_, t)| t.expires_at <= at)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.records.join_tokens.remove(&id);
            self.touched.join_tokens.remove(&id);
            self.touched.join_tokens_forgotten.insert(id);
        }
        self.records
            .join_tokens
            .insert(token.id.clone(), token.clone());
        self.touched.join_tokens_forgotten.remove(&token.id);
        self.touched.join_tokens.insert(token.id.clone());
        Outcome::Done
    }

    pub fn cluster_ca(&self) -> Option<&CaRecord> {
        self.records.ca.as_ref()
    }

    pub fn join_token(&self, id: &str) -> Option<&JoinTokenRecord> {
        self.records.join_tokens.get(id)
    }

    fn put_repo(&mut self, spec: &RepoSpec, at: Millis) -> Outcome {
        if let Err(e) = validate_repo_spec(spec) {
            return Outcome::Rejected(Rejection::Invalid(e.to_string()));
        }
        let created_at = self
            .records
            .repos
            .get(&spec.name)
            .map_or(at, |r| r.repo.created_at);
        let stored = StoredRepo {
            repo: Repo {
                name: spec.name.clone(),
                url: spec.url.clone(),
                branch: spec.branch.clone(),
                auto_deploy: spec.auto_deploy,
                created_at,
                max_release_bytes: spec.max_release_bytes,
                rollout: spec.rollout,
                notify: spec.notify.clone(),
            },
            webhook_secret: spec.webhook_secret.clone(),
            notify_secret: spec.notify_secret.clone(),
        };
        self.records.repos.insert(spec.name.clone(), stored);
        self.touched.repos.insert(spec.name.clone());
        self.push_event(Event {
            repo: Some(spec.name.clone()),
            ..event_at(EventKind::RepoPut, at)
        });
        Outcome::Done
    }

    fn queue_build(
        &mut self,
        repo: &str,
        sha: &str,
        trigger: &str,
        delivery: Option<&str>,
        force: bool,
        at: Millis,
    ) -> Outcome {
        if !self.records.repos.contains_key(repo) {
            return Outcome::Rejected(Rejection::UnknownRepo(repo.to_string()));
        }
        if sha.is_empty() || sha.len() > 64 || !sha.bytes().all(|c| c.is_ascii_alphanumeric()) {
            return Outcome::Rejected(Rejection::Invalid(format!("bad commit id {sha:?}")));
        }
        if let Some(dup) = self.duplicate_of(repo, sha, delivery, force) {
            return dup;
        }
        let id = self.records.marks.last_build + 1;
        self.records.marks.last_build = id;
        self.touched.marks = true;
        let build = Build {
            id,
            repo: repo.to_string(),
            sha: sha.to_string(),
            status: BuildStatus::Queued,
            attempt: 1,
            worker: None,
            release: None,
            reason: None,
            trigger: trigger.to_string(),
            delivery: delivery.map(str::to_string),
            created_at: at,
            started_at: None,
            finished_at: None,
            lease_expires_at: None,
            cancel_requested: false,
            history: vec![Transition {
                status: BuildStatus::Queued,
                at,
                attempt: 1,
                worker: None,
                reason: None,
            }],
        };
        self.store_build(build.clone());
        self.push_build_event(EventKind::BuildQueued, &build, at);
        Outcome::Queued(build)
    }

    /// The answer to queueing (repo, sha) if it would be a duplicate: the delivery was seen,
    /// or (unless `force`) the commit already has a build. The API asks this before
    /// proposing so that redeliveries do not grow the log; `apply` asks it again because
    /// two identical deliveries can race past that first check.
    pub fn duplicate_of(
        &self,
        repo: &str,
        sha: &str,
        delivery: Option<&str>,
        force: bool,
    ) -> Option<Outcome> {
        let by_delivery = delivery.and_then(|d| self.index.by_delivery.get(d));
        if let Some(b) = by_delivery.and_then(|id| self.records.builds.get(id)) {
            return Some(Outcome::DuplicateDelivery(b.clone()));
        }
        if force {
            return None;
        }
        self.index
            .by_commit
            .get(&(repo.to_string(), sha.to_string()))
            .and_then(|ids| ids.last())
            .and_then(|id| self.records.builds.get(id))
            .map(|b| Outcome::DuplicateCommit(b.clone()))
    }

    fn lease_build(&mut self, worker: &WorkerId, ttl_ms: u64, at: Millis) -> Outcome {
        let Some(&id) = self.index.queue.first() else {
            return Outcome::NothingQueued;
        };
        let Some(mut b) = self.records.builds.get(&id).cloned() else {
            return Outcome::NothingQueued;
        };
        b.status = BuildStatus::Running;
        b.worker = Some(worker.clone());
        b.started_at = Some(at);
        b.lease_expires_at = Some(at.saturating_add(ttl_ms));
        b.history.push(Transition {
            status: BuildStatus::Running,
            at,
            attempt: b.attempt,
            worker: Some(worker.clone()),
            reason: None,
        });
        self.store_build(b.clone());
        self.push_build_event(EventKind::BuildStarted, &b, at);
        Outcome::Leased(b)
    }

    /// The running build `id` if `worker` holds its lease for `attempt`.
    fn held_lease(&self, id: u64, worker: &WorkerId, attempt: u32) -> Result<&Build, Rejection> {
        let Some(b) = self.records.builds.get(&id) else {
            // An archived build finished long ago: nobody holds its lease.
            return Err(if self.is_archived_build(id) {
                Rejection::NotLeaseHolder {
                    build: id,
                    worker: worker.clone(),
                    attempt,
                }
            } else {
                Rejection::UnknownBuild(id)
            });
        };
        if b.status != BuildStatus::Running
            || b.worker.as_ref() != Some(worker)
            || b.attempt != attempt
        {
            return Err(Rejection::NotLeaseHolder {
                build: id,
                worker: worker.clone(),
                attempt,
            });
        }
        Ok(b)
    }

    fn heartbeat(
        &mut self,
        id: u64,
        worker: &WorkerId,
        attempt: u32,
        ttl_ms: u64,
        at: Millis,
    ) -> Outcome {
        let mut b = match self.held_lease(id, worker, attempt) {
            Ok(b) => b.clone(),
            Err(r) => return Outcome::Rejected(r),
        };
        let until = at.saturating_add(ttl_ms);
        b.lease_expires_at = Some(until);
        let cancel = b.cancel_requested;
        self.store_build(b);
        Outcome::LeaseExtended {
            lease_expires_at: until,
            cancel,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn complete_build(
        &mut self,
        id: u64,
        worker: &WorkerId,
        attempt: u32,
        status: BuildStatus,
        release: Option<ReleaseId>,
        reason: Option<String>,
        at: Millis,
    ) -> Outcome {
        if !status.is_terminal() {
            return Outcome::Rejected(Rejection::Invalid(format!(
                "{status} is not a final status"
            )));
        }
        let mut b = match self.held_lease(id, worker, attempt) {
            Ok(b) => b.clone(),
            Err(r) => return Outcome::Rejected(r),
        };
        let release = if status == BuildStatus::Succeeded {
            release
        } else {
            None
        };
        b.release = release;
        self.finish(&mut b, status, reason, at);
        if let Some(rel) = release {
            let record = Release {
                id: rel,
                repo: b.repo.clone(),
                sha: b.sha.clone(),
                build: b.id,
                created_at: at,
                collected_at: None,
            };
            self.records.releases.insert(rel, record);
            self.touched.releases.insert(rel);
            self.push_event(Event {
                repo: Some(b.repo.clone()),
                build: Some(b.id),
                sha: Some(b.sha.clone()),
                detail: Some(rel.to_string()),
                ..event_at(EventKind::ReleaseCreated, at)
            });
            let auto = self
                .records
                .repos
                .get(&b.repo)
                .filter(|r| r.repo.auto_deploy)
                .map(|r| r.repo.rollout);
            if let Some(policy) = auto {
                let trigger = format!("build {}", b.id);
                self.start_deployment(&b.repo, DEFAULT_ENV, rel, policy, &trigger, at);
            }
        }
        Outcome::Build(b)
    }

    fn cancel_build(&mut self, id: u64, at: Millis) -> Outcome {
        let Some(mut b) = self.records.builds.get(&id).cloned() else {
            return Outcome::Rejected(if self.is_archived_build(id) {
                Rejection::AlreadyFinished(id)
            } else {
                Rejection::UnknownBuild(id)
            });
        };
        match b.status {
            BuildStatus::Queued => {
                self.finish(&mut b, BuildStatus::Cancelled, Some("cancelled".into()), at);
            }
            BuildStatus::Running => {
                if !b.cancel_requested {
                    b.cancel_requested = true;
                    self.store_build(b.clone());
                    self.push_build_event(EventKind::BuildCancelRequested, &b, at);
                }
            }
            _ => return Outcome::Rejected(Rejection::AlreadyFinished(id)),
        }
        Outcome::Build(b)
    }

    fn expire_leases(&mut self, ids: &[u64], max_attempts: u32, at: Millis) -> Outcome {
        let mut expired = Vec::new();
        for &id in ids {
            let Some(mut b) = self.records.builds.get(&id).cloned() else {
                continue;
            };
            let lapsed =
                b.status == BuildStatus::Running && b.lease_expires_at.is_some_and(|t| t <= at);
            if !lapsed {
                continue;
            }
            expired.push(id);
            let lost = format!(
                "worker lost: {} stopped renewing its lease",
                b.worker.as_ref().map_or("?", WorkerId::as_str)
            );
            if b.cancel_requested {
                self.finish(&mut b, BuildStatus::Cancelled, Some(lost), at);
            } else if b.attempt < max_attempts {
                b.attempt += 1;
                b.status = BuildStatus::Queued;
                b.worker = None;
                b.lease_expires_at = None;
                b.history.push(Transition {
                    status: BuildStatus::Queued,
                    at,
                    attempt: b.attempt,
                    worker: None,
                    reason: Some(lost.clone()),
                });
                b.reason = Some(lost);
                self.store_build(b.clone());
                self.push_build_event(EventKind::BuildRequeued, &b, at);
            } else {
                let reason = format!("worker lost (after {} attempts)", b.attempt);
                self.finish(&mut b, BuildStatus::Failed, Some(reason), at);
            }
        }
        Outcome::Expired(expired)
    }

    fn set_goal(&mut self, repo: &str, env: &str, release: ReleaseId, at: Millis) -> Outcome {
        match self.check_goal(repo, env, release) {
            Ok((rel, env)) => {
                self.put_goal(repo, &env, &rel, None, at);
                Outcome::Release(rel)
            }
            Err(r) => Outcome::Rejected(r),
        }
    }

    /// Whether `release` may be the goal of `repo`'s `env`: the release and the canonical
    /// environment name.
    fn check_goal(
        &self,
        repo: &str,
        env: &str,
        release: ReleaseId,
    ) -> Result<(Release, String), Rejection> {
        if !self.records.repos.contains_key(repo) {
            return Err(Rejection::UnknownRepo(repo.to_string()));
        }
        let Some(rel) = self.records.releases.get(&release).cloned() else {
            return Err(Rejection::Invalid(format!("unknown release {release}")));
        };
        if rel.repo != repo {
            return Err(Rejection::Invalid(format!(
                "release {release} belongs to {}",
                rel.repo
            )));
        }
        let env = starling_proto::env_name(env).map_err(|e| Rejection::Invalid(e.to_string()))?;
        Ok((rel, env))
    }

    fn put_goal(
        &mut self,
        repo: &str,
        env: &str,
        rel: &Release,
        deployment: Option<u64>,
        at: Millis,
    ) {
        let goal = Goal {
            repo: repo.to_string(),
            env: env.to_string(),
            release: rel.id,
            at,
            deployment,
        };
        let key = GoalKey::of(&goal);
        let before = self.records.goals.insert(key.clone(), goal);
        self.touched.goals.insert(key);
        if let Some(old) = before
            .and_then(|g| g.deployment)
            .filter(|d| Some(*d) != deployment)
        {
            self.deployment_done(old);
        }
        self.push_event(Event {
            repo: Some(repo.to_string()),
            build: Some(rel.build),
            sha: Some(rel.sha.clone()),
            detail: Some(format!("{env}={}", rel.id)),
            deployment,
            ..event_at(EventKind::GoalSet, at)
        });
    }

    /// Move `b` to a terminal status and record it.
    fn finish(&mut self, b: &mut Build, status: BuildStatus, reason: Option<String>, at: Millis) {
        b.status = status;
        b.finished_at = Some(at);
        b.lease_expires_at = None;
        b.reason = reason.clone();
        b.history.push(Transition {
            status,
            at,
            attempt: b.attempt,
            worker: b.worker.clone(),
            reason,
        });
        self.store_build(b.clone());
        self.push_build_event(EventKind::BuildCompleted, b, at);
        self.finished(b);
    }

    fn store_build(&mut self, b: Build) {
        if let Some(old) = self.records.builds.get(&b.id) {
            unindex_build(&mut self.index, old, false);
        }
        index_build(&mut self.index, &b);
        self.touched.builds.insert(b.id);
        self.records.builds.insert(b.id, b);
    }

    fn push_build_event(&mut self, kind: EventKind, b: &Build, at: Millis) {
        self.push_event(Event {
            repo: Some(b.repo.clone()),
            build: Some(b.id),
            sha: Some(b.sha.clone()),
            status: Some(b.status),
            detail: b.reason.clone(),
            ..event_at(kind, at)
        });
    }

    /// Apply `cmd` unless `request` was applied before; either way, its first outcome.
    fn apply_once(&mut self, request: &str, cmd: &Command) -> Outcome {
        if let Some(seq) = self.index.by_request.get(request) {
            if let Some(r) = self.records.requests.get(seq) {
                return r.outcome.clone();
            }
        }
        let outcome = self.apply(cmd);
        let seq = self
            .records
            .requests
            .get_max()
            .map_or(1, |(last, _)| last + 1);
        self.records.requests.insert(
            seq,
            RequestRecord {
                request: request.to_string(),
                outcome: outcome.clone(),
            },
        );
        self.index.by_request.insert(request.to_string(), seq);
        self.touched.requests.insert(seq);
        while self.records.requests.len() > starling_proto::REQUEST_WINDOW {
            let Some(old) = self.records.requests.get_min().map(|(k, _)| *k) else {
                break;
            };
            if let Some(r) = self.records.requests.remove(&old) {
                self.index.by_request.remove(&r.request);
            }
            self.touched.requests.remove(&old);
            self.touched.requests_forgotten.insert(old);
        }
        outcome
    }

    fn push_event(&mut self, mut e: Event) {
        e.index = self.last_event_index() + 1;
        self.touched.events_from.get_or_insert(e.index);
        self.records.events.push_back(e);
        self.trim_events();
    }
}

fn event_at(kind: EventKind, at: Millis) -> Event {
    Event {
        index: 0,
        at,
        kind,
        repo: None,
        build: None,
        sha: None,
        status: None,
        detail: None,
        deployment: None,
    }
}

fn index_build(ix: &mut Indexes, b: &Build) {
    match b.status {
        BuildStatus::Queued => {
            ix.queue.insert(b.id);
        }
        BuildStatus::Running => {
            ix.running.insert(b.id);
        }
        _ => {}
    }
    if let Some(d) = &b.delivery {
        ix.by_delivery.insert(d.clone(), b.id);
    }
    ix.by_commit
        .entry((b.repo.clone(), b.sha.clone()))
        .or_default()
        .insert(b.id);
}

/// Take `b` out of the indexes of its status; `forget` also out of those of its identity,
/// as when it leaves memory.
fn unindex_build(ix: &mut Indexes, b: &Build, forget: bool) {
    ix.queue.remove(&b.id);
    ix.running.remove(&b.id);
    if !forget {
        return;
    }
    if let Some(d) = &b.delivery {
        if ix.by_delivery.get(d) == Some(&b.id) {
            ix.by_delivery.remove(d);
        }
    }
    let key = (b.repo.clone(), b.sha.clone());
    if let Some(ids) = ix.by_commit.get_mut(&key) {
        ids.remove(&b.id);
        if ids.is_empty() {
            ix.by_commit.remove(&key);
        }
    }
}

/// Why `apply` refuses a repository.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("bad repository name {0:?}: use letters, digits, '-', '_', '.', '/'")]
    Name(String),
    #[error("repository url must be 1..2000 bytes")]
    Url,
    #[error("branch must be 1..250 bytes")]
    Branch,
    #[error("notification URLs: at most {MAX_NOTIFY_URLS}, each http:// or https:// and at most 2000 bytes")]
    Notify,
}

/// Notification URLs a repository may have.
pub const MAX_NOTIFY_URLS: usize = 8;

/// The rule `apply` has always held repositories to (the log holds entries written under
/// it): names are `owner/name`-like, at most 200 bytes. The API applies the stricter
/// [`starling_proto::repo_name`] before proposing.
pub fn validate_repo_spec(spec: &RepoSpec) -> Result<(), SpecError> {
    let ok_name = !spec.name.is_empty()
        && spec.name.len() <= 200
        && spec
            .name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_./".contains(&c))
        && !spec.name.starts_with('/')
        && !spec.name.contains("..");
    if !ok_name {
        return Err(SpecError::Name(spec.name.clone()));
    }
    if spec.url.is_empty() || spec.url.len() > 2000 {
        return Err(SpecError::Url);
    }
    if spec.branch.is_empty() || spec.branch.len() > 250 {
        return Err(SpecError::Branch);
    }
    let url_ok =
        |u: &String| (u.starts_with("http://") || u.starts_with("https://")) && u.len() <= 2000;
    if spec.notify.len() > MAX_NOTIFY_URLS || !spec.notify.iter().all(url_ok) {
        return Err(SpecError::Notify);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A release id named for a test.
    fn rel(name: &str) -> ReleaseId {
        ReleaseId::of(name.as_bytes())
    }

    fn repo_cmd() -> Command {
        Command::PutRepo {
            spec: RepoSpec {
                name: "acme/web".into(),
                url: "file:///tmp/x".into(),
                branch: "main".into(),
                webhook_secret: "s".into(),
                auto_deploy: true,
                max_release_bytes: starling_proto::DEFAULT_MAX_RELEASE_BYTES,
                notify: Vec::new(),
                notify_secret: String::new(),
                rollout: Default::default(),
            },
            at: 1,
        }
    }

    fn queue(sha: &str, delivery: Option<&str>, force: bool, at: Millis) -> Command {
        Command::QueueBuild {
            repo: "acme/web".into(),
            sha: sha.into(),
            trigger: "github".into(),
            delivery: delivery.map(Into::into),
            force,
            at,
        }
    }

    fn lease(worker: &str, at: Millis) -> Command {
        Command::LeaseBuild {
            worker: worker.into(),
            ttl_ms: 100,
            at,
        }
    }

    fn state() -> ControlState {
        let mut s = ControlState::default();
        assert_eq!(s.apply(&repo_cmd()), Outcome::Done);
        s
    }

    #[test]
    fn queue_is_idempotent_by_delivery_and_commit() {
        let mut s = state();
        assert!(matches!(
            s.apply(&queue("aa", Some("d1"), false, 2)),
            Outcome::Queued(_)
        ));
        assert!(matches!(
            s.apply(&queue("bb", Some("d1"), false, 3)),
            Outcome::DuplicateDelivery(b) if b.sha == "aa"
        ));
        assert!(matches!(
            s.apply(&queue("aa", Some("d2"), false, 3)),
            Outcome::DuplicateCommit(_)
        ));
        assert!(matches!(
            s.apply(&queue("aa", Some("d3"), true, 4)),
            Outcome::Queued(b) if b.id == 2
        ));
        assert_eq!(s.queued_len(), 2);
    }

    fn once(request: &str, cmd: Command) -> Command {
        Command::Once {
            request: request.into(),
            command: Box::new(cmd),
        }
    }

    #[test]
    fn a_request_id_applies_once() {
        let mut s = state();
        s.apply(&queue("aa", None, false, 2));
        s.apply(&queue("bb", None, false, 2));
        let first = s.apply(&once("r1", lease("w", 3)));
        assert!(matches!(&first, Outcome::Leased(b) if b.id == 1));
        // The retry gets the first answer; the second build stays queued.
        assert_eq!(s.apply(&once("r1", lease("w", 4))), first);
        assert_eq!(s.queued_len(), 1);
        // A forced trigger retried with its id queues one build, not two.
        let q = s.apply(&once("r2", queue("aa", None, true, 5)));
        assert_eq!(s.apply(&once("r2", queue("aa", None, true, 6))), q);
        assert_eq!(s.queued_len(), 2);
        // The window survives a reload from the records (as after a restart).
        let mut reloaded = ControlState::from_records(s.records().clone());
        assert_eq!(reloaded.apply(&once("r1", lease("w", 7))), first);
    }

    #[test]
    fn the_request_window_forgets_the_oldest() {
        let mut s = state();
        s.take_touched();
        for i in 0..starling_proto::REQUEST_WINDOW + 3 {
            s.apply(&once(&format!("n{i}"), Command::Noop));
        }
        assert_eq!(s.records().requests.len(), starling_proto::REQUEST_WINDOW);
        let t = s.take_touched();
        assert_eq!(t.requests_forgotten.len(), 3);
        assert_eq!(t.requests.len(), starling_proto::REQUEST_WINDOW);
        assert!(t.requests.is_disjoint(&t.requests_forgotten));
        // A forgotten id applies again.
        s.apply(&queue("aa", None, false, 2));
        assert!(matches!(
            s.apply(&once("n0", lease("w", 3))),
            Outcome::Leased(_)
        ));
    }

    #[test]
    fn unknown_repo_is_rejected_and_changes_nothing() {
        let mut s = state();
        let before = s.records().clone();
        s.take_touched();
        let out = s.apply(&Command::QueueBuild {
            repo: "nope".into(),
            sha: "aa".into(),
            trigger: "manual".into(),
            delivery: None,
            force: false,
            at: 5,
        });
        assert_eq!(
            out,
            Outcome::Rejected(Rejection::UnknownRepo("nope".into()))
        );
        assert_eq!(s.records(), &before);
        assert!(s.take_touched().is_empty());
    }

    #[test]
    fn lease_takes_oldest_and_expiry_requeues_then_fails() {
        let mut s = state();
        s.apply(&queue("aa", None, false, 2));
        s.apply(&queue("bb", None, false, 3));
        let Outcome::Leased(b) = s.apply(&lease("w1", 10)) else {
            panic!("no lease")
        };
        assert_eq!((b.id, b.attempt, b.lease_expires_at), (1, 1, Some(110)));

        // Not yet expired: nothing happens.
        let out = s.apply(&Command::ExpireLeases {
            builds: vec![1],
            max_attempts: 2,
            at: 109,
        });
        assert_eq!(out, Outcome::Expired(vec![]));

        // Expired: back in the queue with attempt 2, ahead of build 2.
        s.apply(&Command::ExpireLeases {
            builds: vec![1],
            max_attempts: 2,
            at: 110,
        });
        let b = s.build(1).unwrap();
        assert_eq!((b.status, b.attempt), (BuildStatus::Queued, 2));
        let Outcome::Leased(b) = s.apply(&lease("w2", 200)) else {
            panic!("no lease")
        };
        assert_eq!((b.id, b.attempt), (1, 2));

        // The old worker's heartbeat is refused.
        let hb = Command::Heartbeat {
            build: 1,
            worker: "w1".into(),
            attempt: 1,
            ttl_ms: 100,
            at: 201,
        };
        assert!(matches!(s.apply(&hb), Outcome::Rejected(_)));

        // Last attempt expires: failed, worker lost.
        s.apply(&Command::ExpireLeases {
            builds: vec![1],
            max_attempts: 2,
            at: 400,
        });
        let b = s.build(1).unwrap();
        assert_eq!(b.status, BuildStatus::Failed);
        assert!(b.reason.as_deref().unwrap().contains("worker lost"));
        let statuses: Vec<_> = b.history.iter().map(|t| t.status).collect();
        use BuildStatus::*;
        assert_eq!(statuses, vec![Queued, Running, Queued, Running, Failed]);
    }

    #[test]
    fn heartbeat_extends_and_complete_records_release_and_goal() {
        let mut s = state();
        s.apply(&queue("aa", None, false, 2));
        s.apply(&lease("w1", 10));
        let out = s.apply(&Command::Heartbeat {
            build: 1,
            worker: "w1".into(),
            attempt: 1,
            ttl_ms: 100,
            at: 90,
        });
        assert_eq!(
            out,
            Outcome::LeaseExtended {
                lease_expires_at: 190,
                cancel: false
            }
        );
        s.apply(&Command::ExpireLeases {
            builds: vec![1],
            max_attempts: 3,
            at: 150,
        });
        assert_eq!(s.build(1).unwrap().status, BuildStatus::Running);
        let out = s.apply(&Command::CompleteBuild {
            build: 1,
            worker: "w1".into(),
            attempt: 1,
            status: BuildStatus::Succeeded,
            release: Some(rel("r1")),
            reason: None,
            at: 160,
        });
        assert!(matches!(out, Outcome::Build(b) if b.status == BuildStatus::Succeeded));
        assert_eq!(s.list_releases(Some("acme/web")).len(), 1);
        assert_eq!(s.goals().next().unwrap().release, rel("r1"));
        let events = s.events_after(0, 100);
        let kinds: Vec<_> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            vec![
                "repo:put",
                "build:queued",
                "build:started",
                "build:completed",
                "release:created",
                "deploy:started",
                "goal:set"
            ]
        );
    }

    #[test]
    fn cancel_queued_at_once_running_via_heartbeat() {
        let mut s = state();
        s.apply(&queue("aa", None, false, 2));
        s.apply(&queue("bb", None, false, 2));
        s.apply(&Command::CancelBuild { build: 2, at: 3 });
        assert_eq!(s.build(2).unwrap().status, BuildStatus::Cancelled);
        s.apply(&lease("w1", 10));
        s.apply(&Command::CancelBuild { build: 1, at: 11 });
        let out = s.apply(&Command::Heartbeat {
            build: 1,
            worker: "w1".into(),
            attempt: 1,
            ttl_ms: 100,
            at: 12,
        });
        assert!(matches!(out, Outcome::LeaseExtended { cancel: true, .. }));
        assert!(matches!(
            s.apply(&Command::CancelBuild { build: 2, at: 13 }),
            Outcome::Rejected(Rejection::AlreadyFinished(2))
        ));
    }

    #[test]
    fn rebuilt_indexes_match_live_ones() {
        let mut s = state();
        for i in 0..10 {
            s.apply(&queue(&format!("c{i}"), Some(&format!("d{i}")), false, i));
        }
        s.apply(&lease("w", 20));
        let rebuilt = ControlState::from_records(s.records().clone());
        assert_eq!(rebuilt.index.queue, s.index.queue);
        assert_eq!(rebuilt.index.running, s.index.running);
        assert_eq!(rebuilt.index.by_delivery, s.index.by_delivery);
    }

    #[test]
    fn retention_keeps_newest_and_goals() {
        let mut s = state();
        // Four successful builds, each a release; auto_deploy makes the newest the goal.
        for i in 0..4u64 {
            s.apply(&queue(&format!("c{i}"), None, false, 10 * i));
            s.apply(&lease("w", 10 * i + 1));
            s.apply(&Command::CompleteBuild {
                build: i + 1,
                worker: "w".into(),
                attempt: 1,
                status: BuildStatus::Succeeded,
                release: Some(rel(&format!("r{i}"))),
                reason: None,
                at: 10 * i + 2,
            });
        }
        // Pin the oldest as a second environment's goal.
        s.apply(&Command::SetGoal {
            repo: "acme/web".into(),
            env: "canary".into(),
            release: rel("r0"),
            at: 100,
        });
        assert_eq!(s.releases_to_collect(2), vec![rel("r1")]);
        // An environment name with a `/` could make two goals share a key: refused.
        let out = s.apply(&Command::SetGoal {
            repo: "acme/web".into(),
            env: "eu/canary".into(),
            release: rel("r0"),
            at: 101,
        });
        assert!(
            matches!(out, Outcome::Rejected(Rejection::Invalid(_))),
            "{out:?}"
        );
        let keys: Vec<&str> = s.records().goals.keys().map(GoalKey::as_str).collect();
        assert_eq!(keys, ["acme/web/canary", "acme/web/default"]);
        let out = s.apply(&Command::CollectReleases {
            releases: vec![rel("r1"), rel("r3")],
            keep: 2,
            at: 200,
        });
        // r3 is kept (newest, and a goal): a wrong or stale proposal does nothing to it.
        assert_eq!(out, Outcome::Collected(vec![rel("r1")]));
        assert!(s.releases_to_collect(2).is_empty());
        assert_eq!(
            s.list_releases(None).len(),
            4,
            "the record stays, as history"
        );
    }

    #[test]
    fn the_ca_is_set_once_and_join_tokens_expire() {
        let mut s = ControlState::default();
        let ca = CaRecord {
            name: "c".into(),
            cert_pem: "cert".into(),
            key_pem: "key".into(),
        };
        assert_eq!(
            s.apply(&Command::SetClusterCa {
                ca: ca.clone(),
                at: 1
            }),
            Outcome::Done
        );
        let again = s.apply(&Command::SetClusterCa {
            ca: CaRecord {
                name: "other".into(),
                ..ca.clone()
            },
            at: 2,
        });
        assert!(matches!(again, Outcome::Rejected(_)));
        assert_eq!(s.cluster_ca(), Some(&ca));
        let token = |id: &str, expires_at| Command::AddJoinToken {
            token: JoinTokenRecord {
                id: id.into(),
                secret_sha256: "ab".repeat(32),
                expires_at,
            },
            at: 100,
        };
        assert_eq!(s.apply(&token("aa", 150)), Outcome::Done);
        assert!(matches!(s.apply(&token("bb", 90)), Outcome::Rejected(_)));
        assert!(matches!(
            s.apply(&token("not hex", 200)),
            Outcome::Rejected(_)
        ));
        s.take_touched();
        let later = Command::AddJoinToken {
            token: JoinTokenRecord {
                id: "cc".into(),
                secret_sha256: "cd".repeat(32),
                expires_at: 500,
            },
            at: 200,
        };
        assert_eq!(s.apply(&later), Outcome::Done);
        assert!(s.join_token("aa").is_none(), "expired tokens are forgotten");
        assert!(s.join_token("cc").is_some());
        let t = s.take_touched();
        assert!(t.join_tokens_forgotten.contains("aa") && t.join_tokens.contains("cc"));
    }

    #[test]
    fn list_filters_newest_first() {
        let mut s = state();
        s.apply(&queue("abc1", None, false, 2));
        s.apply(&queue("abd2", None, false, 3));
        s.apply(&queue("ffff", None, false, 4));
        let q = BuildQuery {
            sha: Some("ab".into()),
            ..Default::default()
        };
        let ids: Vec<_> = s.list_builds(&q).iter().map(|b| b.id).collect();
        assert_eq!(ids, vec![2, 1]);
        let q = BuildQuery {
            status: Some(BuildStatus::Running),
            ..Default::default()
        };
        assert!(s.list_builds(&q).is_empty());
    }
}
