//! Applying deployment commands: start (superseding a deployment still rolling), the
//! planner's steps, pause and resume. Each checks that it still fits the deployment as
//! it stands, records a transition in its history and an event, and touches the goal so
//! that nodes waiting on the goals hear of it.

use starling_proto::{
    DeployStatus, DeployStep, DeployTransition, Deployment, Event, EventKind, Millis, Outcome,
    Rejection, ReleaseId, RolloutPolicy, Wave, WaveTarget,
};

use super::{event_at, ControlState, GoalKey};

impl ControlState {
    pub fn deployment(&self, id: u64) -> Option<&Deployment> {
        self.records.deployments.get(&id)
    }

    /// Deployments of `repo` (all when `None`), newest first, at most `limit`.
    pub fn list_deployments(&self, repo: Option<&str>, limit: usize) -> Vec<Deployment> {
        self.records
            .deployments
            .values()
            .rev()
            .filter(|d| repo.is_none_or(|r| d.repo == r))
            .take(limit)
            .cloned()
            .collect()
    }

    /// The newest deployment of `repo`'s `env`.
    pub fn current_deployment(&self, repo: &str, env: &str) -> Option<&Deployment> {
        let goal = self.records.goals.get(&GoalKey::for_env(repo, env))?;
        self.records.deployments.get(&goal.deployment?)
    }

    /// Deployments still rolling or paused.
    pub fn active_deployments(&self) -> impl Iterator<Item = &Deployment> {
        self.records
            .goals
            .values()
            .filter_map(|g| self.records.deployments.get(&g.deployment?))
            .filter(|d| !d.status.is_final())
    }

    /// The release `repo`'s `env` ran before its current one: what a rollback returns
    /// to by default.
    pub fn previous_release(&self, repo: &str, env: &str) -> Option<ReleaseId> {
        let d = self.current_deployment(repo, env)?;
        match d.status {
            DeployStatus::Succeeded | DeployStatus::Rolling | DeployStatus::Paused => d.from,
            // Already back on `from`: the one before is that deployment's own `from`.
            DeployStatus::RolledBack | DeployStatus::Superseded => self
                .records
                .deployments
                .values()
                .rev()
                .filter(|p| p.repo == repo && p.env == d.env && p.id < d.id)
                .find(|p| p.status == DeployStatus::Succeeded && Some(p.release) != d.from)
                .map(|p| p.release),
        }
    }

    pub(super) fn start_deployment(
        &mut self,
        repo: &str,
        env: &str,
        release: ReleaseId,
        policy: RolloutPolicy,
        trigger: &str,
        at: Millis,
    ) -> Outcome {
        let (rel, env) = match self.check_goal(repo, env, release) {
            Ok(ok) => ok,
            Err(r) => return Outcome::Rejected(r),
        };
        let goal = self
            .records
            .goals
            .get(&GoalKey::for_env(repo, &env))
            .cloned();
        let previous = goal
            .as_ref()
            .and_then(|g| self.records.deployments.get(&g.deployment?).cloned());
        // What every node falls back on: the last release a deployment finished, or the
        // goal from before deployments.
        let from = match &previous {
            Some(d) if d.status == DeployStatus::Succeeded => Some(d.release),
            Some(d) => d.from,
            None => goal.map(|g| g.release),
        };
        let id = self.records.marks.last_deployment + 1;
        self.records.marks.last_deployment = id;
        self.touched.marks = true;
        if let Some(mut p) = previous.filter(|p| !p.status.is_final()) {
            let why = format!("superseded by deployment {id}");
            self.finish_deployment(&mut p, DeployStatus::Superseded, None, why, at);
        }
        let mut d = Deployment {
            id,
            repo: repo.to_string(),
            env: env.clone(),
            release,
            from,
            policy,
            trigger: trigger.to_string(),
            status: DeployStatus::Rolling,
            waves: Vec::new(),
            created_at: at,
            finished_at: None,
            reason: None,
            history: Vec::new(),
        };
        record(&mut d, at, "started", None, None);
        if policy.strategy == starling_proto::Strategy::AllAtOnce {
            // Nothing to wait for before the one wave: every node switches once it holds
            // the release, without a round through the rollout loop.
            let mut all = Wave::new("all", WaveTarget::All);
            all.started_at = Some(at);
            d.waves.push(all);
            record(&mut d, at, "wave_started", Some(0), None);
        }
        self.push_event(Event {
            repo: Some(repo.to_string()),
            build: Some(rel.build),
            sha: Some(rel.sha.clone()),
            detail: Some(format!("{release} ({}; {trigger})", policy.strategy)),
            deployment: Some(id),
            ..event_at(EventKind::DeployStarted, at)
        });
        self.store_deployment(d.clone());
        self.put_goal(repo, &env, &rel, Some(id), at);
        Outcome::Deployment(Box::new(d))
    }

    pub(super) fn advance_deployment(&mut self, id: u64, step: &DeployStep, at: Millis) -> Outcome {
        let Some(mut d) = self.records.deployments.get(&id).cloned() else {
            return Outcome::Rejected(Rejection::UnknownDeployment(id));
        };
        if let Err(why) = fits(&d, step) {
            return Outcome::Rejected(Rejection::StepRefused {
                id,
                step: step.name().to_string(),
                why,
            });
        }
        match step {
            DeployStep::Plan { waves } => {
                d.waves = waves.clone();
                let names: Vec<&str> = waves.iter().map(|w| w.name.as_str()).collect();
                record(&mut d, at, "planned", None, Some(names.join(", ")));
            }
            DeployStep::StartWave { wave } => {
                d.waves[*wave].started_at = Some(at);
                record(&mut d, at, "wave_started", Some(*wave), None);
                self.push_wave_event(&d, EventKind::WaveStarted, *wave, at);
            }
            DeployStep::WaveHealthy { wave } => {
                d.waves[*wave].healthy_at = Some(at);
                record(&mut d, at, "wave_healthy", Some(*wave), None);
            }
            DeployStep::CompleteWave { wave, outcomes } => {
                let w = &mut d.waves[*wave];
                w.done_at = Some(at);
                w.outcomes = outcomes.clone();
                record(&mut d, at, "wave_done", Some(*wave), None);
                self.push_wave_event(&d, EventKind::WaveCompleted, *wave, at);
            }
            DeployStep::Fail {
                wave,
                reason,
                outcomes,
            } => {
                d.waves[*wave].outcomes = outcomes.clone();
                let status = DeployStatus::RolledBack;
                self.finish_deployment(&mut d, status, Some(*wave), reason.clone(), at);
                // Nodes hold and run the previous release again.
                if let Some(from) = d.from.and_then(|f| self.records.releases.get(&f).cloned()) {
                    self.put_goal(&d.repo, &d.env, &from, Some(id), at);
                }
                return Outcome::Deployment(Box::new(d));
            }
            DeployStep::Succeed => {
                let status = DeployStatus::Succeeded;
                self.finish_deployment(&mut d, status, None, "every wave is done".into(), at);
                self.touch_goal(&d, at);
                return Outcome::Deployment(Box::new(d));
            }
        }
        self.store_deployment(d.clone());
        self.touch_goal(&d, at);
        Outcome::Deployment(Box::new(d))
    }

    pub(super) fn pause_deployment(&mut self, id: u64, paused: bool, at: Millis) -> Outcome {
        let Some(mut d) = self.records.deployments.get(&id).cloned() else {
            return Outcome::Rejected(Rejection::UnknownDeployment(id));
        };
        let (from, to, what, kind) = if paused {
            let k = EventKind::DeployPaused;
            (DeployStatus::Rolling, DeployStatus::Paused, "paused", k)
        } else {
            let k = EventKind::DeployResumed;
            (DeployStatus::Paused, DeployStatus::Rolling, "resumed", k)
        };
        if d.status != from {
            return Outcome::Rejected(Rejection::StepRefused {
                id,
                step: what.to_string(),
                why: format!("it is {}", d.status),
            });
        }
        d.status = to;
        record(&mut d, at, what, None, None);
        self.push_event(Event {
            repo: Some(d.repo.clone()),
            deployment: Some(id),
            ..event_at(kind, at)
        });
        self.store_deployment(d.clone());
        Outcome::Deployment(Box::new(d))
    }

    /// End `d` with `status`, recorded and announced.
    fn finish_deployment(
        &mut self,
        d: &mut Deployment,
        status: DeployStatus,
        wave: Option<usize>,
        reason: String,
        at: Millis,
    ) {
        d.status = status;
        d.finished_at = Some(at);
        d.reason = Some(reason.clone());
        record(d, at, status.as_str(), wave, Some(reason.clone()));
        self.push_event(Event {
            repo: Some(d.repo.clone()),
            detail: Some(format!("{status}: {reason}")),
            deployment: Some(d.id),
            ..event_at(EventKind::DeployCompleted, at)
        });
        self.store_deployment(d.clone());
        self.deployment_done(d.id);
    }

    fn push_wave_event(&mut self, d: &Deployment, kind: EventKind, wave: usize, at: Millis) {
        self.push_event(Event {
            repo: Some(d.repo.clone()),
            detail: Some(format!("wave {} ({})", wave + 1, d.waves[wave].name)),
            deployment: Some(d.id),
            ..event_at(kind, at)
        });
    }

    /// Mark the goal changed: nodes long-polling the goals ask again what they run.
    fn touch_goal(&mut self, d: &Deployment, at: Millis) {
        let key = GoalKey::for_env(&d.repo, &d.env);
        if let Some(g) = self.records.goals.get_mut(&key) {
            if g.deployment == Some(d.id) {
                g.at = at;
                self.touched.goals.insert(key);
            }
        }
    }

    fn store_deployment(&mut self, d: Deployment) {
        self.touched.deployments.insert(d.id);
        self.records.deployments.insert(d.id, d);
    }
}

/// Whether `step` still fits `d`; why not.
fn fits(d: &Deployment, step: &DeployStep) -> Result<(), String> {
    if d.status != DeployStatus::Rolling {
        return Err(format!("it is {}", d.status));
    }
    let current = d.current_wave();
    let wave_is = |w: usize| -> Result<&Wave, String> {
        if current != Some(w) {
            return Err(format!(
                "wave {} is not the current one ({})",
                w + 1,
                current.map_or("none".into(), |c| (c + 1).to_string())
            ));
        }
        Ok(&d.waves[w])
    };
    match step {
        DeployStep::Plan { waves } if !d.waves.is_empty() => Err("its waves are planned".into()),
        DeployStep::Plan { waves } if waves.is_empty() => Err("a plan needs a wave".into()),
        DeployStep::Plan { waves } if waves.iter().any(|w| w.started_at.is_some()) => {
            Err("a planned wave cannot have started".into())
        }
        DeployStep::Plan { .. } => Ok(()),
        DeployStep::StartWave { wave } if wave_is(*wave)?.started_at.is_some() => {
            Err("the wave started already".into())
        }
        DeployStep::WaveHealthy { wave } => match wave_is(*wave)? {
            w if w.started_at.is_none() => Err("the wave has not started".into()),
            w if w.healthy_at.is_some() => Err("the wave is soaking already".into()),
            _ => Ok(()),
        },
        DeployStep::CompleteWave { wave, .. } if wave_is(*wave)?.healthy_at.is_none() => {
            Err("the wave has not been healthy".into())
        }
        DeployStep::Fail { wave, .. } if wave_is(*wave)?.started_at.is_none() => {
            Err("the wave has not started".into())
        }
        DeployStep::Succeed if d.waves.is_empty() || current.is_some() => {
            Err("a wave is not done".into())
        }
        _ => Ok(()),
    }
}

fn record(d: &mut Deployment, at: Millis, what: &str, wave: Option<usize>, reason: Option<String>) {
    d.history.push(DeployTransition {
        at,
        what: what.to_string(),
        wave,
        reason,
    });
}

#[cfg(test)]
mod tests {
    use starling_proto::{AppState, BuildStatus, Command, NodeOutcome, RepoSpec, Strategy};

    use super::*;

    fn rel(n: u64) -> ReleaseId {
        ReleaseId::of(format!("r{n}").as_bytes())
    }

    /// `acme/web` (no auto-deploy) with releases r1..=r`n` built.
    fn state_with_releases(n: u64) -> ControlState {
        let mut s = ControlState::default();
        s.apply(&Command::PutRepo {
            spec: RepoSpec {
                name: "acme/web".into(),
                url: "file:///tmp/x".into(),
                branch: "main".into(),
                webhook_secret: "s".into(),
                auto_deploy: false,
                max_release_bytes: starling_proto::DEFAULT_MAX_RELEASE_BYTES,
                notify: Vec::new(),
                notify_secret: String::new(),
                rollout: RolloutPolicy::default(),
            },
            at: 1,
        });
        for i in 1..=n {
            s.apply(&Command::QueueBuild {
                repo: "acme/web".into(),
                sha: format!("{i:040x}"),
                trigger: "api".into(),
                delivery: None,
                force: false,
                at: 10 * i,
            });
            s.apply(&Command::LeaseBuild {
                worker: "w".into(),
                ttl_ms: 100,
                at: 10 * i,
            });
            s.apply(&Command::CompleteBuild {
                build: i,
                worker: "w".into(),
                attempt: 1,
                status: BuildStatus::Succeeded,
                release: Some(rel(i)),
                reason: None,
                at: 10 * i + 1,
            });
        }
        s
    }

    fn start(s: &mut ControlState, release: u64, strategy: Strategy, at: Millis) -> Deployment {
        let out = s.apply(&Command::StartDeployment {
            repo: "acme/web".into(),
            env: "default".into(),
            release: rel(release),
            policy: RolloutPolicy {
                strategy,
                ..RolloutPolicy::default()
            },
            trigger: "api".into(),
            at,
        });
        let Outcome::Deployment(d) = out else {
            panic!("not started: {out:?}");
        };
        *d
    }

    fn step(s: &mut ControlState, id: u64, step: DeployStep, at: Millis) -> Outcome {
        s.apply(&Command::AdvanceDeployment { id, step, at })
    }

    /// Take an all-at-once deployment through its one wave to success.
    fn succeed(s: &mut ControlState, id: u64, at: Millis) {
        let steps = [
            DeployStep::WaveHealthy { wave: 0 },
            DeployStep::CompleteWave {
                wave: 0,
                outcomes: Vec::new(),
            },
            DeployStep::Succeed,
        ];
        for st in steps {
            let out = step(s, id, st, at);
            assert!(matches!(out, Outcome::Deployment(_)), "{out:?}");
        }
    }

    #[test]
    fn all_at_once_switches_everyone_and_the_next_deployment_starts_from_it() {
        let mut s = state_with_releases(2);
        let d1 = start(&mut s, 1, Strategy::AllAtOnce, 100);
        assert_eq!(d1.from, None);
        assert_eq!(
            d1.release_for("any", "eu"),
            Some(rel(1)),
            "its one wave started"
        );
        succeed(&mut s, d1.id, 110);
        let d2 = start(&mut s, 2, Strategy::Waves, 200);
        assert_eq!(d2.from, Some(rel(1)));
        assert_eq!(d2.release_for("any", "eu"), Some(rel(1)), "no wave yet");
        let goal = s.goals().next().unwrap();
        assert_eq!((goal.release, goal.deployment), (rel(2), Some(d2.id)));
        assert_eq!(s.previous_release("acme/web", "default"), Some(rel(1)));
    }

    #[test]
    fn a_step_applies_once_and_only_in_order() {
        let mut s = state_with_releases(2);
        let d = start(&mut s, 2, Strategy::Waves, 100);
        let plan = DeployStep::Plan {
            waves: vec![
                Wave::new("canary", WaveTarget::Nodes(vec!["n1".into()])),
                Wave::new("eu", WaveTarget::Region("eu".into())),
            ],
        };
        let refused = |o: Outcome| matches!(o, Outcome::Rejected(Rejection::StepRefused { .. }));
        assert!(refused(step(
            &mut s,
            d.id,
            DeployStep::StartWave { wave: 0 },
            101
        )));
        assert!(!refused(step(&mut s, d.id, plan.clone(), 101)));
        assert!(refused(step(&mut s, d.id, plan, 102)), "planned once");
        assert!(refused(step(
            &mut s,
            d.id,
            DeployStep::StartWave { wave: 1 },
            102
        )));
        let goal_at = s.goals().next().unwrap().at;
        assert!(!refused(step(
            &mut s,
            d.id,
            DeployStep::StartWave { wave: 0 },
            103
        )));
        assert!(
            s.goals().next().unwrap().at > goal_at,
            "nodes hear of a wave"
        );
        assert!(refused(step(
            &mut s,
            d.id,
            DeployStep::StartWave { wave: 0 },
            104
        )));
        let done = DeployStep::CompleteWave {
            wave: 0,
            outcomes: Vec::new(),
        };
        assert!(refused(step(&mut s, d.id, done.clone(), 104)), "not soaked");
        assert!(!refused(step(
            &mut s,
            d.id,
            DeployStep::WaveHealthy { wave: 0 },
            105
        )));
        assert!(!refused(step(&mut s, d.id, done.clone(), 106)));
        assert!(refused(step(&mut s, d.id, done, 107)));
        assert!(refused(step(&mut s, d.id, DeployStep::Succeed, 107)));
        let d = s.deployment(d.id).unwrap();
        let what: Vec<&str> = d.history.iter().map(|t| t.what.as_str()).collect();
        assert_eq!(
            what,
            [
                "started",
                "planned",
                "wave_started",
                "wave_healthy",
                "wave_done"
            ]
        );
        assert_eq!(d.current_wave(), Some(1));
    }

    #[test]
    fn a_failed_wave_rolls_back_and_a_paused_deployment_waits() {
        let mut s = state_with_releases(2);
        let d1 = start(&mut s, 1, Strategy::AllAtOnce, 100);
        succeed(&mut s, d1.id, 101);
        let d = start(&mut s, 2, Strategy::AllAtOnce, 200);
        let pause = |s: &mut ControlState, paused, at| {
            s.apply(&Command::PauseDeployment {
                id: d.id,
                paused,
                at,
            })
        };
        assert!(matches!(pause(&mut s, true, 201), Outcome::Deployment(_)));
        assert!(matches!(pause(&mut s, true, 202), Outcome::Rejected(_)));
        let fail = DeployStep::Fail {
            wave: 0,
            reason: "wave all: 1 of 1 nodes failed".into(),
            outcomes: vec![NodeOutcome {
                node: "n1".into(),
                region: "eu".into(),
                release: Some(rel(2)),
                state: AppState::Failed,
                error: Some("exit status: 3".into()),
            }],
        };
        assert!(matches!(
            step(&mut s, d.id, fail.clone(), 203),
            Outcome::Rejected(_)
        ));
        pause(&mut s, false, 204);
        assert!(matches!(
            step(&mut s, d.id, fail, 205),
            Outcome::Deployment(_)
        ));
        let d = s.deployment(d.id).unwrap().clone();
        assert_eq!(d.status, DeployStatus::RolledBack);
        assert_eq!(d.release_for("n1", "eu"), Some(rel(1)));
        assert_eq!(d.waves[0].outcomes.len(), 1, "per-node outcomes are kept");
        assert_eq!(s.goals().next().unwrap().release, rel(1));
        let kinds: Vec<&str> = s
            .events_after(0, 1000)
            .iter()
            .filter(|e| e.deployment == Some(d.id))
            .map(|e| e.kind.as_str())
            .collect();
        assert_eq!(
            kinds,
            [
                "deploy:started",
                "goal:set",
                "deploy:paused",
                "deploy:resumed",
                "deploy:completed",
                "goal:set"
            ]
        );
        // Back on r1, the release before it is still r1's predecessor: none here.
        assert_eq!(s.previous_release("acme/web", "default"), None);
        // The release nodes fall back on is never collected.
        assert!(!s.releases_to_collect(0).contains(&rel(1)));
    }

    #[test]
    fn a_new_deployment_supersedes_one_still_rolling() {
        let mut s = state_with_releases(3);
        let d1 = start(&mut s, 1, Strategy::AllAtOnce, 100);
        succeed(&mut s, d1.id, 101);
        let d2 = start(&mut s, 2, Strategy::Waves, 200);
        let d3 = start(&mut s, 3, Strategy::Waves, 300);
        assert_eq!(
            s.deployment(d2.id).unwrap().status,
            DeployStatus::Superseded
        );
        assert_eq!(d3.from, Some(rel(1)), "the last release that finished");
        assert!(matches!(
            step(&mut s, d2.id, DeployStep::Succeed, 301),
            Outcome::Rejected(_)
        ));
        let ids: Vec<u64> = s
            .list_deployments(Some("acme/web"), 10)
            .iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(ids, [3, 2, 1]);
        assert_eq!(
            s.active_deployments().map(|d| d.id).collect::<Vec<_>>(),
            [3]
        );
    }
}
