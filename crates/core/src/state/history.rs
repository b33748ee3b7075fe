//! How much history [`ControlState`] keeps in memory, and what it lets go.
//!
//! A member holds the working set — queued and running builds, releases not yet
//! collected, goals, deployments — and only the newest part of the past: the
//! [`HistoryWindow::finished_builds`] builds that finished last, the newest
//! [`HistoryWindow::events`] events, the [`HistoryWindow::collected_releases`] releases
//! collected last and the [`HistoryWindow::finished_deployments`] deployments that
//! finished last (a deployment a goal names always stays). Older records are handed to
//! the store in [`super::Touched`], which moves them to its archive tables and answers
//! history queries from there.
//!
//! What is in memory decides some answers of `apply` (a commit or delivery is recognised
//! as a duplicate only while its build is), so the window is part of the replicated
//! semantics: it is a pure function of the records, the same on every member, whether a
//! member applied every command or loaded its records after a restart. Builds leave in
//! the order of `(finished_at, id)`; keeping the greatest keys as they arrive one by one
//! keeps exactly the set that loading all of them and keeping the greatest would.

use std::collections::BTreeSet;

use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use starling_proto::{Build, Millis, Release};

use super::ControlState;

/// The sizes of the in-memory window. Every member of a cluster must use the same one
/// ([`HistoryWindow::default`]); tests use smaller ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryWindow {
    /// Finished builds kept in memory: at 5,000 builds a day, four days — longer than
    /// forges redeliver webhooks (GitHub: three days).
    pub finished_builds: usize,
    pub events: usize,
    /// Collected releases kept in memory: long enough for every member's chunk collector
    /// to delete their manifests.
    pub collected_releases: usize,
    /// Finished deployments kept in memory, besides those a goal names.
    pub finished_deployments: usize,
}

impl Default for HistoryWindow {
    fn default() -> Self {
        HistoryWindow {
            finished_builds: 20_000,
            events: 100_000,
            collected_releases: 2_000,
            finished_deployments: 1_000,
        }
    }
}

/// Counters that outlive the records they count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryMarks {
    /// The highest build id ever given (the build may be archived).
    pub last_build: u64,
    /// Events with an index up to this one are no longer in memory.
    pub events_archived: u64,
    /// The highest deployment id ever given.
    #[serde(default)]
    pub last_deployment: u64,
}

/// A build's place in the order builds leave memory in.
fn finish_key(b: &Build) -> (Millis, u64) {
    (b.finished_at.unwrap_or(b.created_at), b.id)
}

fn collect_key(r: &Release) -> (Millis, starling_proto::ReleaseId) {
    (r.collected_at.unwrap_or(r.created_at), r.id)
}

/// Let the records whose keys come first in `order` go until `cap` remain: out of
/// `records` and the keys to write, into `archived`.
fn evict<K: Ord + Clone, V: Clone>(
    order: &mut BTreeSet<(Millis, K)>,
    cap: usize,
    records: &mut OrdMap<K, V>,
    touched: &mut BTreeSet<K>,
    archived: &mut Vec<V>,
) {
    while order.len() > cap {
        let Some((_, key)) = order.pop_first() else {
            break;
        };
        if let Some(old) = records.remove(&key) {
            touched.remove(&key);
            archived.push(old);
        }
    }
}

impl ControlState {
    pub fn marks(&self) -> HistoryMarks {
        self.records.marks
    }

    /// Whether build `id` was given and has left memory: it finished long ago.
    pub fn is_archived_build(&self, id: u64) -> bool {
        id >= 1 && id <= self.records.marks.last_build && !self.records.builds.contains_key(&id)
    }

    /// The index of the oldest event still in memory.
    pub fn first_event_in_memory(&self) -> u64 {
        self.records.marks.events_archived + 1
    }

    /// Note that `b` finished and let the oldest finished builds go past the window.
    pub(super) fn finished(&mut self, b: &Build) {
        self.index.finished.insert(finish_key(b));
        let from = self.touched.archived_builds.len();
        evict(
            &mut self.index.finished,
            self.window.finished_builds,
            &mut self.records.builds,
            &mut self.touched.builds,
            &mut self.touched.archived_builds,
        );
        for old in &self.touched.archived_builds[from..] {
            super::unindex_build(&mut self.index, old, true);
        }
    }

    /// Note that `r` was collected and let the oldest collected releases go.
    pub(super) fn collected(&mut self, r: &Release) {
        self.index.collected.insert(collect_key(r));
        evict(
            &mut self.index.collected,
            self.window.collected_releases,
            &mut self.records.releases,
            &mut self.touched.releases,
            &mut self.touched.archived_releases,
        );
    }

    /// Note that deployment `id` may be finished with: once it is final and no goal names
    /// it, it joins the finished ones and the oldest of those leave memory.
    pub(super) fn deployment_done(&mut self, id: u64) {
        let Some(d) = self.records.deployments.get(&id) else {
            return;
        };
        let named = self
            .records
            .goals
            .values()
            .any(|g| g.deployment == Some(id));
        if !d.status.is_final() || named {
            return;
        }
        self.index
            .finished_deployments
            .insert((d.finished_at.unwrap_or(d.created_at), id));
        evict(
            &mut self.index.finished_deployments,
            self.window.finished_deployments,
            &mut self.records.deployments,
            &mut self.touched.deployments,
            &mut self.touched.archived_deployments,
        );
    }

    /// Let the oldest events go past the window.
    pub(super) fn trim_events(&mut self) {
        let excess = self.records.events.len().saturating_sub(self.window.events);
        if excess == 0 {
            return;
        }
        // Events made since the store last wrote leave with the rest: it must still write them.
        let unwritten = self.touched.events_from.unwrap_or(u64::MAX);
        let first = self.first_event_in_memory();
        let leaving = self.records.events.take(excess);
        self.touched.archived_events.extend(
            leaving
                .into_iter()
                .enumerate()
                .filter(|(i, _)| first + *i as u64 >= unwritten)
                .map(|(_, e)| e),
        );
        self.records.events = self.records.events.skip(excess);
        self.records.marks.events_archived += excess as u64;
        self.touched.marks = true;
    }

    /// Bring records loaded from a file written before the window (or with a larger one)
    /// within it; what leaves is in [`ControlState::take_touched`].
    pub(super) fn enforce_window(&mut self) {
        let last = self.records.builds.get_max().map_or(0, |(k, _)| *k);
        if last > self.records.marks.last_build {
            self.records.marks.last_build = last;
            self.touched.marks = true;
        }
        let finished: Vec<Build> = self
            .records
            .builds
            .values()
            .filter(|b| b.status.is_terminal())
            .cloned()
            .collect();
        for b in &finished {
            self.finished(b);
        }
        let collected: Vec<Release> = self
            .records
            .releases
            .values()
            .filter(|r| r.collected_at.is_some())
            .cloned()
            .collect();
        for r in &collected {
            self.collected(r);
        }
        let last = self.records.deployments.get_max().map_or(0, |(k, _)| *k);
        if last > self.records.marks.last_deployment {
            self.records.marks.last_deployment = last;
            self.touched.marks = true;
        }
        let deployments: Vec<u64> = self.records.deployments.keys().copied().collect();
        for id in deployments {
            self.deployment_done(id);
        }
        self.trim_events();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_proto::{BuildStatus, Command, Outcome, Rejection, ReleaseId, RepoSpec};

    const SMALL: HistoryWindow = HistoryWindow {
        finished_builds: 3,
        events: 10,
        collected_releases: 2,
        finished_deployments: 2,
    };

    fn state() -> ControlState {
        state_deploying(false)
    }

    fn state_deploying(auto_deploy: bool) -> ControlState {
        let mut s = ControlState::with_window(Default::default(), SMALL);
        let spec = RepoSpec {
            name: "acme/web".into(),
            url: "file:///tmp/x".into(),
            branch: "main".into(),
            webhook_secret: "s".into(),
            auto_deploy,
            max_release_bytes: starling_proto::DEFAULT_MAX_RELEASE_BYTES,
            notify: Vec::new(),
            notify_secret: String::new(),
            rollout: Default::default(),
        };
        assert_eq!(s.apply(&Command::PutRepo { spec, at: 1 }), Outcome::Done);
        s
    }

    /// Queue, lease and finish a build of `sha` at `at`; its id.
    fn build(s: &mut ControlState, sha: &str, at: Millis) -> u64 {
        let queued = s.apply(&Command::QueueBuild {
            repo: "acme/web".into(),
            sha: sha.into(),
            trigger: "t".into(),
            delivery: Some(format!("d-{sha}")),
            force: false,
            at,
        });
        let Outcome::Queued(b) = queued else {
            panic!("{queued:?}")
        };
        s.apply(&Command::LeaseBuild {
            worker: "w".into(),
            ttl_ms: 1000,
            at,
        });
        let done = s.apply(&Command::CompleteBuild {
            build: b.id,
            worker: "w".into(),
            attempt: 1,
            status: BuildStatus::Succeeded,
            release: Some(ReleaseId::of(sha.as_bytes())),
            reason: None,
            at: at + 1,
        });
        assert!(matches!(done, Outcome::Build(_)), "{done:?}");
        b.id
    }

    #[test]
    fn the_oldest_finished_builds_leave_memory_and_ids_go_on() {
        let mut s = state();
        let ids: Vec<u64> = (0..6)
            .map(|i| build(&mut s, &format!("c{i}"), 10 + i))
            .collect();
        let touched = s.take_touched();
        let archived: Vec<u64> = touched.archived_builds.iter().map(|b| b.id).collect();
        assert_eq!(archived, &ids[..3]);
        assert!(archived.iter().all(|id| !touched.builds.contains(id)));
        assert_eq!(s.records().builds.len(), 3);
        assert!(s.is_archived_build(ids[0]));
        assert!(!s.is_archived_build(ids[5]));
        assert_eq!(s.marks().last_build, ids[5]);
        // What is archived is known to be finished, and its commit builds again.
        assert_eq!(
            s.apply(&Command::CancelBuild {
                build: ids[0],
                at: 30
            }),
            Outcome::Rejected(Rejection::AlreadyFinished(ids[0]))
        );
        assert_eq!(
            s.apply(&Command::CancelBuild { build: 99, at: 30 }),
            Outcome::Rejected(Rejection::UnknownBuild(99))
        );
        let again = s.apply(&Command::QueueBuild {
            repo: "acme/web".into(),
            sha: "c0".into(),
            trigger: "t".into(),
            delivery: None,
            force: false,
            at: 31,
        });
        assert!(
            matches!(&again, Outcome::Queued(b) if b.id == ids[5] + 1),
            "{again:?}"
        );
        // A commit still in memory is a duplicate.
        let dup = s.apply(&Command::QueueBuild {
            repo: "acme/web".into(),
            sha: "c5".into(),
            trigger: "t".into(),
            delivery: None,
            force: false,
            at: 32,
        });
        assert!(matches!(dup, Outcome::DuplicateCommit(_)), "{dup:?}");
    }

    #[test]
    fn events_keep_their_indexes_past_the_window() {
        let mut s = state();
        for i in 0..5 {
            build(&mut s, &format!("c{i}"), 10 + i);
        }
        let last = s.last_event_index();
        assert!(last > SMALL.events as u64, "{last}");
        assert_eq!(s.records().events.len(), SMALL.events);
        assert_eq!(s.first_event_in_memory(), last - SMALL.events as u64 + 1);
        let tail = s.events_after(0, 3);
        assert_eq!(tail[0].index, s.first_event_in_memory());
        assert_eq!(s.events_after(last - 1, 10).len(), 1);
        assert!(s.take_touched().marks);
    }

    #[test]
    fn collected_releases_leave_memory_after_the_newest() {
        let mut s = state();
        let ids: Vec<ReleaseId> = (0..6)
            .map(|i| {
                build(&mut s, &format!("c{i}"), 10 + i);
                ReleaseId::of(format!("c{i}").as_bytes())
            })
            .collect();
        s.take_touched();
        let due = s.releases_to_collect(1);
        assert_eq!(due.len(), 5);
        s.apply(&Command::CollectReleases {
            releases: due.clone(),
            keep: 1,
            at: 50,
        });
        let touched = s.take_touched();
        assert_eq!(touched.archived_releases.len(), 3);
        assert_eq!(s.records().releases.len(), 3);
        assert!(s.records().releases.contains_key(&ids[5]));
    }

    #[test]
    fn finished_deployments_leave_memory_but_not_the_current_one() {
        let mut s = state_deploying(true);
        for i in 0..6 {
            build(&mut s, &format!("c{i}"), 10 + i);
        }
        let touched = s.take_touched();
        let archived: Vec<u64> = touched.archived_deployments.iter().map(|d| d.id).collect();
        assert_eq!(archived, vec![1, 2, 3]);
        let kept: Vec<u64> = s.records().deployments.keys().copied().collect();
        assert_eq!(kept, vec![4, 5, 6]);
        assert_eq!(
            s.current_deployment("acme/web", "default").map(|d| d.id),
            Some(6)
        );
        assert_eq!(s.marks().last_deployment, 6);
        let loaded = ControlState::with_window(s.records().clone(), SMALL);
        assert_eq!(
            loaded.index.finished_deployments,
            s.index.finished_deployments
        );
    }

    /// A member that applied everything and one that loaded the records have the same
    /// memory, including what the next command lets go.
    #[test]
    fn loading_keeps_what_applying_kept() {
        let mut live = state();
        for i in 0..7 {
            build(&mut live, &format!("c{i}"), 100 - i * 10);
        }
        let mut loaded = ControlState::with_window(live.records().clone(), SMALL);
        assert!(loaded.take_touched().archived_builds.is_empty());
        assert_eq!(loaded.index.finished, live.index.finished);
        assert_eq!(loaded.index.by_commit, live.index.by_commit);
        assert_eq!(loaded.index.by_delivery, live.index.by_delivery);
        build(&mut live, "x", 5);
        build(&mut loaded, "x", 5);
        assert_eq!(loaded.records(), live.records());
        // Records from before the window (everything kept) are cut to the same set.
        let mut everything = ControlState::with_window(
            Default::default(),
            HistoryWindow {
                finished_builds: 1000,
                events: 1000,
                collected_releases: 1000,
                finished_deployments: 1000,
            },
        );
        everything.records = state().records.clone();
        for i in 0..7 {
            build(&mut everything, &format!("c{i}"), 100 - i * 10);
        }
        let mut cut = ControlState::with_window(everything.records().clone(), SMALL);
        let fresh = {
            let mut s = state();
            for i in 0..7 {
                build(&mut s, &format!("c{i}"), 100 - i * 10);
            }
            s
        };
        assert_eq!(cut.records().builds, fresh.records().builds);
        assert_eq!(cut.records().events, fresh.records().events);
        assert_eq!(cut.marks(), fresh.marks());
        assert_eq!(cut.take_touched().archived_builds.len(), 4);
    }
}
