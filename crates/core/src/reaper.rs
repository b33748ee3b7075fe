//! The lease reaper's decision: which running builds have lapsed leases. It replaces the
//! problem statement's health-check service. Pure: the caller passes the state and the
//! time, and proposes the returned command through Raft; applying it re-checks every lease,
//! so a decision made on a slightly stale view can never expire a renewed lease.

use starling_proto::{Command, Millis};

use crate::state::ControlState;

#[derive(Debug, Clone, Copy)]
pub struct LeaseReaper {
    /// Leases a build may lose before it fails with `worker lost`.
    pub max_attempts: u32,
}

impl LeaseReaper {
    /// The command that expires every lease lapsed at `now`, if there is any.
    pub fn due(&self, state: &ControlState, now: Millis) -> Option<Command> {
        let builds: Vec<u64> = state
            .running()
            .filter(|b| b.lease_expires_at.is_some_and(|t| t <= now))
            .map(|b| b.id)
            .collect();
        (!builds.is_empty()).then_some(Command::ExpireLeases {
            builds,
            max_attempts: self.max_attempts,
            at: now,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_proto::{Outcome, RepoSpec};

    #[test]
    fn only_lapsed_leases_are_due() {
        let mut s = ControlState::default();
        s.apply(&Command::PutRepo {
            spec: RepoSpec {
                name: "r".into(),
                url: "u".into(),
                branch: "main".into(),
                webhook_secret: String::new(),
                auto_deploy: false,
                max_release_bytes: starling_proto::DEFAULT_MAX_RELEASE_BYTES,
                notify: Vec::new(),
                notify_secret: String::new(),
                rollout: Default::default(),
            },
            at: 0,
        });
        for (i, sha) in ["a1", "b2"].iter().enumerate() {
            s.apply(&Command::QueueBuild {
                repo: "r".into(),
                sha: (*sha).into(),
                trigger: "manual".into(),
                delivery: None,
                force: false,
                at: i as u64,
            });
            s.apply(&Command::LeaseBuild {
                worker: "w".into(),
                ttl_ms: 100 * (i as u64 + 1),
                at: 10,
            });
        }
        let reaper = LeaseReaper { max_attempts: 3 };
        assert_eq!(reaper.due(&s, 109), None);
        let cmd = reaper.due(&s, 110).unwrap();
        assert!(matches!(&cmd, Command::ExpireLeases { builds, .. } if builds == &vec![1]));
        assert_eq!(s.apply(&cmd), Outcome::Expired(vec![1]));
        assert_eq!(reaper.due(&s, 150), None);
    }
}
