//! How a build ends, from the worker's side: what its command's end means for the build's
//! status and reason, and whether enough control members took its release.

use std::time::Duration;

use starling_proto::{BuildStatus, ReleaseId};

/// How a build command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The command ended by itself: its exit code, or the signal that ended it.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    TimedOut,
    Cancelled,
}

impl RunOutcome {
    pub fn success(&self) -> bool {
        matches!(self, RunOutcome::Exited { code: Some(0), .. })
    }
}

/// The result a build ends with, as the worker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub status: BuildStatus,
    pub release: Option<ReleaseId>,
    pub reason: Option<String>,
}

impl Finish {
    pub fn failed(reason: impl Into<String>) -> Self {
        Finish {
            status: BuildStatus::Failed,
            release: None,
            reason: Some(reason.into()),
        }
    }

    pub fn succeeded(release: ReleaseId) -> Self {
        Finish {
            status: BuildStatus::Succeeded,
            release: Some(release),
            reason: None,
        }
    }

    /// The build's end if its command did not succeed; `None` when it did and the
    /// output is to be packed. Reasons point at the log rather than quote it: the output
    /// may hold anything, and the log is private to token holders.
    pub fn of_run(outcome: &RunOutcome, timeout: Duration, build: u64) -> Option<Finish> {
        let see_log = format!("its output: starling builds logs {build}");
        match outcome {
            RunOutcome::TimedOut => Some(Finish {
                status: BuildStatus::TimedOut,
                release: None,
                reason: Some(format!("timed out after {timeout:?}; {see_log}")),
            }),
            RunOutcome::Cancelled => Some(Finish {
                status: BuildStatus::Cancelled,
                release: None,
                reason: Some("cancelled".into()),
            }),
            RunOutcome::Exited { .. } if outcome.success() => None,
            RunOutcome::Exited { code, signal } => {
                let how = match (code, signal) {
                    (Some(c), _) => format!("exit code {c}"),
                    (None, Some(s)) => format!("killed by signal {s}"),
                    _ => "ended abnormally".into(),
                };
                Some(Finish::failed(format!(
                    "build command failed ({how}); {see_log}"
                )))
            }
        }
    }
}

/// A release is stored once more than half of the control members took it: then any
/// majority that can elect a leader has a member holding it.
pub fn release_stored(took: usize, members: usize) -> bool {
    took * 2 > members
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_ends_the_build_unless_it_succeeded() {
        let t = Duration::from_secs(5);
        assert_eq!(
            Finish::of_run(
                &RunOutcome::Exited {
                    code: Some(0),
                    signal: None
                },
                t,
                7
            ),
            None
        );
        let failed = Finish::of_run(
            &RunOutcome::Exited {
                code: None,
                signal: Some(9),
            },
            t,
            7,
        )
        .unwrap();
        assert_eq!(failed.status, BuildStatus::Failed);
        assert!(failed.reason.unwrap().contains("killed by signal 9"));
        let timed = Finish::of_run(&RunOutcome::TimedOut, t, 7).unwrap();
        assert_eq!(timed.status, BuildStatus::TimedOut);
        assert!(timed.reason.unwrap().contains("builds logs 7"));
        assert_eq!(
            Finish::of_run(&RunOutcome::Cancelled, t, 7).unwrap().status,
            BuildStatus::Cancelled
        );
    }

    #[test]
    fn a_release_needs_a_strict_majority() {
        assert!(!release_stored(0, 1));
        assert!(release_stored(1, 1));
        assert!(!release_stored(1, 2));
        assert!(release_stored(2, 3));
        assert!(!release_stored(2, 4));
        assert!(release_stored(3, 5));
    }
}
