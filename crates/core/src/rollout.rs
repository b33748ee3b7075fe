//! The rollout planner: given a deployment and what the fleet reports, the one step to
//! take next — plan the waves, start the next wave, note that a wave is healthy, finish
//! it after its soak, stop and roll back, or declare success.
//!
//! A pure function of data, like the lease reaper: the leader's rollout loop feeds it the
//! deployment from the replicated state, the nodes' reports from its tracker and the
//! time, and proposes what it answers; applying re-checks the step against the state, so
//! a step decided twice (by a leader and its successor) takes effect once.

use std::collections::BTreeSet;

use starling_proto::{
    AppReport, AppState, DeployStatus, DeployStep, Deployment, Millis, NodeOutcome, Progress,
    RegionProgress, ReleaseId, Strategy, Wave, WaveTarget,
};

/// One live node of the deployment's repository, with its report for that repository.
#[derive(Debug, Clone, Copy)]
pub struct FleetNode<'a> {
    pub node: &'a str,
    pub region: &'a str,
    pub report: &'a AppReport,
}

impl FleetNode<'_> {
    /// Whether it switched to `release` and is in `state` on it.
    fn is(&self, release: ReleaseId, state: AppState) -> bool {
        self.report.release == Some(release) && self.report.state == state
    }
}

/// The waves of a deployment of deployment `id` over `fleet`. All at once: one wave.
/// Waves: a canary node, then its region, then every other region by name. The canary
/// changes from one deployment to the next (by `id`) so that no node is always first.
/// Nodes that join later are picked up by their region's wave; a region nobody reported
/// from when planning gets its nodes once the deployment succeeds.
pub fn plan_waves(id: u64, strategy: Strategy, fleet: &[FleetNode]) -> Vec<Wave> {
    let all = || vec![Wave::new("all", WaveTarget::All)];
    if strategy == Strategy::AllAtOnce || fleet.is_empty() {
        return all();
    }
    let mut names: Vec<(&str, &str)> = fleet.iter().map(|n| (n.node, n.region)).collect();
    names.sort_unstable();
    names.dedup();
    let (canary, canary_region) = names[(id as usize) % names.len()];
    let mut waves = vec![Wave::new(
        "canary",
        WaveTarget::Nodes(vec![canary.to_string()]),
    )];
    let regions: BTreeSet<&str> = names.iter().map(|(_, r)| *r).collect();
    let order =
        std::iter::once(canary_region).chain(regions.into_iter().filter(|r| *r != canary_region));
    waves.extend(order.map(|r| Wave::new(r, WaveTarget::Region(r.to_string()))));
    waves
}

/// The next step for `dep`, if one is due at `now`; `fleet` is every live node of its
/// repository.
pub fn next_step(dep: &Deployment, fleet: &[FleetNode], now: Millis) -> Option<DeployStep> {
    if dep.status != DeployStatus::Rolling {
        return None;
    }
    if dep.waves.is_empty() {
        return Some(DeployStep::Plan {
            waves: plan_waves(dep.id, dep.policy.strategy, fleet),
        });
    }
    let Some(i) = dep.current_wave() else {
        return Some(DeployStep::Succeed);
    };
    let wave = &dep.waves[i];
    if wave.started_at.is_none() {
        return Some(DeployStep::StartWave { wave: i });
    }
    let members: Vec<&FleetNode> = fleet
        .iter()
        .filter(|n| wave.target.selects(n.node, n.region))
        .collect();
    let failed: Vec<&&FleetNode> = members
        .iter()
        .filter(|n| n.is(dep.release, AppState::Failed))
        .collect();
    let allowed = usize::from(dep.policy.max_failed_pct) * members.len();
    if !failed.is_empty() && failed.len() * 100 > allowed {
        let first = failed[0];
        let reason = format!(
            "wave {}: {} of {} nodes failed ({}: {})",
            wave.name,
            failed.len(),
            members.len(),
            first.node,
            first.report.error.as_deref().unwrap_or("no reason given")
        );
        return Some(DeployStep::Fail {
            wave: i,
            reason,
            outcomes: outcomes(&members),
        });
    }
    let running = members
        .iter()
        .filter(|n| n.is(dep.release, AppState::Running))
        .count();
    if running < members.len() {
        // A wave that never comes up (nodes that cannot fetch, or hang in their health
        // check) must not hold the deployment forever.
        let started = wave.started_at.unwrap_or(now);
        if now >= started.saturating_add(dep.policy.wave_timeout_ms) {
            let reason = format!(
                "wave {}: not healthy after {} s ({running} of {} nodes running the release)",
                wave.name,
                dep.policy.wave_timeout_ms / 1000,
                members.len()
            );
            return Some(DeployStep::Fail {
                wave: i,
                reason,
                outcomes: outcomes(&members),
            });
        }
        return None;
    }
    match wave.healthy_at {
        None => Some(DeployStep::WaveHealthy { wave: i }),
        Some(t) if now >= t.saturating_add(dep.policy.soak_ms) => Some(DeployStep::CompleteWave {
            wave: i,
            outcomes: outcomes(&members),
        }),
        Some(_) => None,
    }
}

/// How far `dep`'s nodes are: counts for the whole fleet, per region and per wave, and
/// the time to staged at the median and the 99th percentile.
pub fn progress(dep: &Deployment, fleet: &[FleetNode]) -> Progress {
    let count = |name: &str, nodes: &mut dyn Iterator<Item = &FleetNode>| {
        let mut p = RegionProgress {
            name: name.to_string(),
            ..RegionProgress::default()
        };
        for n in nodes {
            let switched = n.report.release == Some(dep.release);
            p.nodes += 1;
            p.staged += usize::from(switched || n.report.staged == Some(dep.release));
            p.running += usize::from(n.is(dep.release, AppState::Running));
            p.failed += usize::from(n.is(dep.release, AppState::Failed));
        }
        p
    };
    let all = count("all", &mut fleet.iter());
    let regions: BTreeSet<&str> = fleet.iter().map(|n| n.region).collect();
    let mut times: Vec<u64> = fleet
        .iter()
        .filter(|n| n.report.staged == Some(dep.release))
        .filter_map(|n| n.report.staged_at)
        .map(|t| t.saturating_sub(dep.created_at))
        .collect();
    times.sort_unstable();
    let pct = |p: usize| (!times.is_empty()).then(|| times[(times.len() - 1) * p / 100]);
    Progress {
        nodes: all.nodes,
        staged: all.staged,
        running: all.running,
        failed: all.failed,
        staged_p50_ms: pct(50),
        staged_p99_ms: pct(99),
        regions: regions
            .into_iter()
            .map(|r| count(r, &mut fleet.iter().filter(|n| n.region == r)))
            .collect(),
        waves: dep
            .waves
            .iter()
            .map(|w| {
                let mut selected = fleet.iter().filter(|n| w.target.selects(n.node, n.region));
                count(&w.name, &mut selected)
            })
            .collect(),
    }
}

fn outcomes(members: &[&FleetNode]) -> Vec<NodeOutcome> {
    members
        .iter()
        .map(|n| NodeOutcome {
            node: n.node.to_string(),
            region: n.region.to_string(),
            release: n.report.release,
            state: n.report.state,
            error: n.report.error.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_proto::RolloutPolicy;

    fn rel(n: u8) -> ReleaseId {
        ReleaseId::from_bytes([n; 32])
    }

    struct Fleet(Vec<(String, String, AppReport)>);

    impl Fleet {
        /// `per_region` nodes in each region, all running release 1.
        fn new(regions: &[&str], per_region: usize) -> Fleet {
            let mut v = Vec::new();
            for r in regions {
                for i in 0..per_region {
                    let report = AppReport {
                        release: Some(rel(1)),
                        activated_at: Some(0),
                        state: AppState::Running,
                        ..AppReport::idle("acme/web")
                    };
                    v.push((format!("{r}-{i}"), r.to_string(), report));
                }
            }
            Fleet(v)
        }

        fn view(&self) -> Vec<FleetNode<'_>> {
            self.0
                .iter()
                .map(|(n, r, report)| FleetNode {
                    node: n,
                    region: r,
                    report,
                })
                .collect()
        }

        /// Every node that `dep` says should run release 2 reports `state` on it.
        fn follow(&mut self, dep: &Deployment, state: AppState) {
            for (n, r, report) in &mut self.0 {
                if dep.release_for(n, r) == Some(rel(2)) {
                    report.release = Some(rel(2));
                    report.state = state;
                    report.error = (state == AppState::Failed).then(|| "exit status: 3".into());
                }
            }
        }
    }

    fn deployment(strategy: Strategy) -> Deployment {
        Deployment {
            id: 7,
            repo: "acme/web".into(),
            env: "default".into(),
            release: rel(2),
            from: Some(rel(1)),
            policy: RolloutPolicy {
                strategy,
                soak_ms: 1_000,
                max_failed_pct: 0,
                wave_timeout_ms: 60_000,
            },
            trigger: "api".into(),
            status: DeployStatus::Rolling,
            waves: Vec::new(),
            created_at: 0,
            finished_at: None,
            reason: None,
            history: Vec::new(),
        }
    }

    /// Apply `step` as the state machine would (the parts the planner reads).
    fn take(dep: &mut Deployment, step: &DeployStep, at: Millis) {
        match step {
            DeployStep::Plan { waves } => dep.waves = waves.clone(),
            DeployStep::StartWave { wave } => dep.waves[*wave].started_at = Some(at),
            DeployStep::WaveHealthy { wave } => dep.waves[*wave].healthy_at = Some(at),
            DeployStep::CompleteWave { wave, .. } => dep.waves[*wave].done_at = Some(at),
            DeployStep::Fail { .. } => dep.status = DeployStatus::RolledBack,
            DeployStep::Succeed => dep.status = DeployStatus::Succeeded,
        }
    }

    #[test]
    fn waves_are_a_canary_then_its_region_then_the_others() {
        let fleet = Fleet::new(&["us", "eu", "ap"], 3);
        let waves = plan_waves(7, Strategy::Waves, &fleet.view());
        let names: Vec<&str> = waves.iter().map(|w| w.name.as_str()).collect();
        // Sorted names: ap-0..2, eu-0..2, us-0..2; the 7th (7 % 9) is us-1.
        assert_eq!(names, ["canary", "us", "ap", "eu"]);
        assert_eq!(waves[0].target, WaveTarget::Nodes(vec!["us-1".into()]));
        let other = plan_waves(8, Strategy::Waves, &fleet.view());
        assert_ne!(other[0].target, waves[0].target, "the canary moves");
        assert_eq!(plan_waves(7, Strategy::AllAtOnce, &fleet.view()).len(), 1);
        assert_eq!(
            plan_waves(7, Strategy::Waves, &[])[0].target,
            WaveTarget::All
        );
    }

    #[test]
    fn a_healthy_rollout_soaks_each_wave_then_succeeds() {
        let mut fleet = Fleet::new(&["us", "eu"], 2);
        let mut dep = deployment(Strategy::Waves);
        let mut now = 0;
        let mut started = Vec::new();
        for _ in 0..100 {
            fleet.follow(&dep, AppState::Running);
            match next_step(&dep, &fleet.view(), now) {
                Some(step) => {
                    if let DeployStep::StartWave { wave } = step {
                        // The previous wave soaked for its full time first.
                        if wave > 0 {
                            let prev = &dep.waves[wave - 1];
                            assert!(prev.done_at.unwrap() >= prev.healthy_at.unwrap() + 1_000);
                        }
                        started.push(wave);
                    }
                    if step == DeployStep::Succeed {
                        take(&mut dep, &step, now);
                        break;
                    }
                    take(&mut dep, &step, now);
                }
                None => now += 250,
            }
        }
        assert_eq!(dep.status, DeployStatus::Succeeded);
        assert_eq!(started, [0, 1, 2], "each wave started once, in order");
        assert!(fleet.0.iter().all(|(_, _, r)| r.release == Some(rel(2))));
    }

    #[test]
    fn nothing_moves_while_a_wave_is_unhealthy_or_the_deployment_is_paused() {
        let fleet = Fleet::new(&["us"], 2);
        let mut dep = deployment(Strategy::AllAtOnce);
        dep.waves = plan_waves(7, Strategy::AllAtOnce, &fleet.view());
        dep.waves[0].started_at = Some(0);
        // Nobody runs release 2 yet (still fetching): wait.
        assert_eq!(next_step(&dep, &fleet.view(), 10_000), None);
        dep.status = DeployStatus::Paused;
        dep.waves.clear();
        assert_eq!(next_step(&dep, &fleet.view(), 10_000), None);
    }

    #[test]
    fn failures_over_the_threshold_stop_the_wave_and_say_why() {
        let mut fleet = Fleet::new(&["us", "eu"], 5);
        let mut dep = deployment(Strategy::Waves);
        dep.policy.max_failed_pct = 20;
        dep.waves = vec![
            Wave::new("us", WaveTarget::Region("us".into())),
            Wave::new("eu", WaveTarget::Region("eu".into())),
        ];
        dep.waves[0].started_at = Some(0);
        fleet.follow(&dep, AppState::Running);
        // One of five failing is 20%: within the threshold, and the wave is not healthy.
        fleet.0[0].2.state = AppState::Failed;
        assert_eq!(next_step(&dep, &fleet.view(), 0), None);
        fleet.0[1].2.state = AppState::Failed;
        fleet.0[1].2.error = Some("health: exit status 1".into());
        let Some(DeployStep::Fail {
            wave,
            reason,
            outcomes,
        }) = next_step(&dep, &fleet.view(), 0)
        else {
            panic!("two of five failing must stop the deployment");
        };
        assert_eq!(wave, 0);
        assert!(
            reason.starts_with("wave us: 2 of 5 nodes failed"),
            "{reason}"
        );
        assert_eq!(outcomes.len(), 5);
        assert!(outcomes.iter().all(|o| o.region == "us"));
    }

    #[test]
    fn progress_counts_staged_running_and_failed_nodes_per_region_and_wave() {
        let mut fleet = Fleet::new(&["us", "eu"], 2);
        let mut dep = deployment(Strategy::Waves);
        dep.created_at = 1_000;
        dep.waves = vec![
            Wave::new("us", WaveTarget::Region("us".into())),
            Wave::new("eu", WaveTarget::Region("eu".into())),
        ];
        dep.waves[0].started_at = Some(1_000);
        for (i, (_, _, r)) in fleet.0.iter_mut().enumerate() {
            r.staged = Some(rel(2));
            r.staged_at = Some(1_000 + 100 * (i as u64 + 1));
        }
        fleet.follow(&dep, AppState::Running);
        fleet.0[1].2.state = AppState::Failed;
        let p = progress(&dep, &fleet.view());
        assert_eq!((p.nodes, p.staged, p.running, p.failed), (4, 4, 1, 1));
        assert_eq!((p.staged_p50_ms, p.staged_p99_ms), (Some(200), Some(300)));
        let eu = &p.regions[0];
        assert_eq!((eu.name.as_str(), eu.staged, eu.running), ("eu", 2, 0));
        assert_eq!((p.waves[0].running, p.waves[0].failed), (1, 1));
    }

    #[test]
    fn a_wave_that_never_comes_up_stops_at_its_deadline() {
        let fleet = Fleet::new(&["us"], 3);
        let mut dep = deployment(Strategy::AllAtOnce);
        dep.waves = plan_waves(7, Strategy::AllAtOnce, &fleet.view());
        dep.waves[0].started_at = Some(1_000);
        // Nobody runs release 2 (say, nobody can fetch it): waiting, until the deadline.
        assert_eq!(next_step(&dep, &fleet.view(), 60_999), None);
        let Some(DeployStep::Fail { reason, .. }) = next_step(&dep, &fleet.view(), 61_000) else {
            panic!("the wave must fail at its deadline");
        };
        assert_eq!(
            reason,
            "wave all: not healthy after 60 s (0 of 3 nodes running the release)"
        );
    }

    #[test]
    fn a_node_failing_on_the_old_release_is_not_the_new_release_failing() {
        let mut fleet = Fleet::new(&["us"], 1);
        let mut dep = deployment(Strategy::AllAtOnce);
        dep.waves = plan_waves(7, Strategy::AllAtOnce, &fleet.view());
        dep.waves[0].started_at = Some(0);
        // A fetch that failed: the node still runs release 1.
        fleet.0[0].2.state = AppState::Failed;
        assert_eq!(next_step(&dep, &fleet.view(), 0), None);
    }
}
