//! Closed vocabularies of the API, as enums rather than strings: what an event records
//! and what became of a request to queue a build. Each serializes as the string the API
//! has always shown, so logs, snapshots and clients written before read the same.

use serde::{Deserialize, Serialize};

/// What an [`crate::Event`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// A repository was added or changed.
    #[serde(rename = "repo:put")]
    RepoPut,
    #[serde(rename = "build:queued")]
    BuildQueued,
    /// A worker leased the build.
    #[serde(rename = "build:started")]
    BuildStarted,
    /// Its lease lapsed and it went back to the queue.
    #[serde(rename = "build:requeued")]
    BuildRequeued,
    #[serde(rename = "build:cancel_requested")]
    BuildCancelRequested,
    /// It reached a final status (the event's `status`).
    #[serde(rename = "build:completed")]
    BuildCompleted,
    #[serde(rename = "release:created")]
    ReleaseCreated,
    /// Retention let it go; its chunks may be collected.
    #[serde(rename = "release:collected")]
    ReleaseCollected,
    /// An environment's goal now names a release.
    #[serde(rename = "goal:set")]
    GoalSet,
    /// A deployment started (its release is fetched everywhere from now on).
    #[serde(rename = "deploy:started")]
    DeployStarted,
    /// A wave's nodes may run the release.
    #[serde(rename = "deploy:wave_started")]
    WaveStarted,
    /// A wave's nodes ran the release healthily for the soak time.
    #[serde(rename = "deploy:wave_completed")]
    WaveCompleted,
    #[serde(rename = "deploy:paused")]
    DeployPaused,
    #[serde(rename = "deploy:resumed")]
    DeployResumed,
    /// It reached a final status (the event's `detail`): succeeded, rolled_back or
    /// superseded.
    #[serde(rename = "deploy:completed")]
    DeployCompleted,
}

impl EventKind {
    pub const ALL: [EventKind; 15] = [
        EventKind::RepoPut,
        EventKind::BuildQueued,
        EventKind::BuildStarted,
        EventKind::BuildRequeued,
        EventKind::BuildCancelRequested,
        EventKind::BuildCompleted,
        EventKind::ReleaseCreated,
        EventKind::ReleaseCollected,
        EventKind::GoalSet,
        EventKind::DeployStarted,
        EventKind::WaveStarted,
        EventKind::WaveCompleted,
        EventKind::DeployPaused,
        EventKind::DeployResumed,
        EventKind::DeployCompleted,
    ];

    /// The name the API shows, e.g. `build:queued`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::RepoPut => "repo:put",
            EventKind::BuildQueued => "build:queued",
            EventKind::BuildStarted => "build:started",
            EventKind::BuildRequeued => "build:requeued",
            EventKind::BuildCancelRequested => "build:cancel_requested",
            EventKind::BuildCompleted => "build:completed",
            EventKind::ReleaseCreated => "release:created",
            EventKind::ReleaseCollected => "release:collected",
            EventKind::GoalSet => "goal:set",
            EventKind::DeployStarted => "deploy:started",
            EventKind::WaveStarted => "deploy:wave_started",
            EventKind::WaveCompleted => "deploy:wave_completed",
            EventKind::DeployPaused => "deploy:paused",
            EventKind::DeployResumed => "deploy:resumed",
            EventKind::DeployCompleted => "deploy:completed",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What became of a request to queue a build (`QueueOutcome.outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueResult {
    /// A new build (201).
    Queued,
    /// This webhook delivery was seen before; its build (200).
    DuplicateDelivery,
    /// The commit already has a build and the request did not force another (200).
    DuplicateCommit,
}

impl std::fmt::Display for QueueResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QueueResult::Queued => "queued",
            QueueResult::DuplicateDelivery => "duplicate_delivery",
            QueueResult::DuplicateCommit => "duplicate_commit",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_serialize_as_the_names_the_api_shows() {
        for k in EventKind::ALL {
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<EventKind>(&json).unwrap(), k);
        }
        for q in [
            QueueResult::Queued,
            QueueResult::DuplicateDelivery,
            QueueResult::DuplicateCommit,
        ] {
            assert_eq!(serde_json::to_string(&q).unwrap(), format!("\"{q}\""));
        }
    }
}
