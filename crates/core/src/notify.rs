//! What a repository's notification URLs are told when one of its builds or deployments
//! ends: which events notify, the JSON body (with a Slack-compatible `text`), and its
//! signature. The leader's notifier (`starling-control`) does the sending and retrying.

use serde::Serialize;
use starling_proto::{short, Build, DeployStatus, Deployment, Event, EventKind};

use crate::state::ControlState;

/// One notification, ready to send to each of `urls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub urls: Vec<String>,
    pub event: EventKind,
    /// The event's index: receivers use it to drop a repeated delivery.
    pub index: u64,
    pub body: Vec<u8>,
    /// `sha256=<hex>`: HMAC-SHA256 of the body with the repository's notification key,
    /// as GitHub signs its webhooks.
    pub signature: String,
}

#[derive(Serialize)]
struct Body<'a> {
    event: &'a str,
    index: u64,
    at: u64,
    repo: &'a str,
    /// One line for people (Slack shows it as the message).
    text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    build: Option<&'a Build>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deployment: Option<&'a Deployment>,
}

/// The notification event `e` makes, if it is the end of a build or a deployment of a
/// repository with notification URLs.
pub fn notification(state: &ControlState, e: &Event) -> Option<Notification> {
    let repo = state.repo(e.repo.as_deref()?)?;
    if repo.repo.notify.is_empty() {
        return None;
    }
    let (text, build, deployment) = match e.kind {
        EventKind::BuildCompleted => {
            let b = state.build(e.build?)?;
            (build_text(b), Some(b), None)
        }
        EventKind::DeployCompleted => {
            let d = state.deployment(e.deployment?)?;
            (deploy_text(d), None, Some(d))
        }
        _ => return None,
    };
    let body = serde_json::to_vec(&Body {
        event: e.kind.as_str(),
        index: e.index,
        at: e.at,
        repo: &repo.repo.name,
        text,
        build,
        deployment,
    })
    .ok()?;
    let key = if repo.notify_secret.is_empty() {
        &repo.webhook_secret
    } else {
        &repo.notify_secret
    };
    Some(Notification {
        urls: repo.repo.notify.clone(),
        event: e.kind,
        index: e.index,
        signature: crate::webhook::github_signature(key, &body),
        body,
    })
}

fn build_text(b: &Build) -> String {
    let mut t = format!("{} build {} {} ({})", b.repo, b.id, b.status, short(&b.sha));
    match (&b.release, &b.reason) {
        (Some(r), _) => t += &format!(": release {}", short(&r.to_hex())),
        (None, Some(why)) => t += &format!(": {why}"),
        _ => {}
    }
    t
}

fn deploy_text(d: &Deployment) -> String {
    let release = short(&d.release.to_hex()).to_string();
    match d.status {
        DeployStatus::Succeeded => format!(
            "{} deployment {} of {release} succeeded: every node runs it",
            d.repo, d.id
        ),
        status => format!(
            "{} deployment {} of {release} {}: {}",
            d.repo,
            d.id,
            status.as_str().replace('_', " "),
            d.reason.as_deref().unwrap_or("")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_proto::{BuildStatus, Command, ReleaseId, RepoSpec};

    fn state(notify: Vec<String>) -> ControlState {
        let mut s = ControlState::default();
        s.apply(&Command::PutRepo {
            spec: RepoSpec {
                name: "acme/web".into(),
                url: "file:///x".into(),
                branch: "main".into(),
                webhook_secret: "hook".into(),
                auto_deploy: true,
                max_release_bytes: starling_proto::DEFAULT_MAX_RELEASE_BYTES,
                notify,
                notify_secret: "note".into(),
                rollout: Default::default(),
            },
            at: 1,
        });
        s.apply(&Command::QueueBuild {
            repo: "acme/web".into(),
            sha: "ab".repeat(20),
            trigger: "api".into(),
            delivery: None,
            force: false,
            at: 2,
        });
        s.apply(&Command::LeaseBuild {
            worker: "w".into(),
            ttl_ms: 100,
            at: 3,
        });
        s.apply(&Command::CompleteBuild {
            build: 1,
            worker: "w".into(),
            attempt: 1,
            status: BuildStatus::Succeeded,
            release: Some(ReleaseId::of(b"r")),
            reason: None,
            at: 4,
        });
        s
    }

    #[test]
    fn a_finished_build_notifies_signed_with_the_notification_key() {
        let s = state(vec!["https://hooks.example.com/x".into()]);
        let events = s.events_after(0, 100);
        let made: Vec<Notification> = events.iter().filter_map(|e| notification(&s, e)).collect();
        // The build's end; the auto-deployment has not ended yet.
        assert_eq!(made.len(), 1);
        let n = &made[0];
        assert_eq!(n.event, EventKind::BuildCompleted);
        assert_eq!(
            n.signature,
            crate::webhook::github_signature("note", &n.body)
        );
        let v: serde_json::Value = serde_json::from_slice(&n.body).unwrap();
        assert_eq!(v["event"], "build:completed");
        assert_eq!(v["build"]["id"], 1);
        let text = v["text"].as_str().unwrap();
        assert!(
            text.starts_with("acme/web build 1 succeeded (abababababab): release "),
            "{text}"
        );
    }

    #[test]
    fn a_repository_without_urls_notifies_nothing() {
        let s = state(Vec::new());
        assert!(s
            .events_after(0, 100)
            .iter()
            .all(|e| notification(&s, e).is_none()));
    }
}
