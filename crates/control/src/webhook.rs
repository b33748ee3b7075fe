//! GitHub and GitLab push webhooks: signature checks and the decision what a push means.
//! Pure functions over headers and bytes; the HTTP handler does the rest.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Bodies above this are refused with 413 before anything else is looked at.
pub const MAX_WEBHOOK_BODY: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    #[error("missing or bad signature")]
    BadSignature,
    #[error("malformed payload: {0}")]
    Malformed(String),
}

/// What a delivery asks of us.
#[derive(Debug, PartialEq, Eq)]
pub enum PushDecision {
    /// A push to the default branch: build this commit.
    Build { sha: String },
    /// Answered 202 and otherwise ignored, with the reason.
    Ignore(String),
    /// GitHub's `ping` on webhook creation.
    Ping,
}

/// Check `X-Hub-Signature-256: sha256=<hex>` against HMAC-SHA256(secret, body), in
/// constant time. A repository without a secret accepts no webhook at all: an empty HMAC
/// key is one anybody can sign with.
pub fn verify_github_signature(
    secret: &str,
    body: &[u8],
    header: Option<&str>,
) -> Result<(), WebhookError> {
    if secret.is_empty() {
        return Err(WebhookError::BadSignature);
    }
    let hex_sig = header
        .and_then(|h| h.strip_prefix("sha256="))
        .ok_or(WebhookError::BadSignature)?;
    let given = hex::decode(hex_sig.trim()).map_err(|_| WebhookError::BadSignature)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .map_err(|_| WebhookError::BadSignature)?;
    mac.update(body);
    mac.verify_slice(&given)
        .map_err(|_| WebhookError::BadSignature)
}

/// Check `X-Gitlab-Token` against the secret, in constant time.
pub fn verify_gitlab_token(secret: &str, header: Option<&str>) -> Result<(), WebhookError> {
    let given = header.ok_or(WebhookError::BadSignature)?;
    if secret.is_empty() || !bool::from(secret.as_bytes().ct_eq(given.as_bytes())) {
        return Err(WebhookError::BadSignature);
    }
    Ok(())
}

/// The repository a payload names: GitHub's `repository.full_name`, GitLab's
/// `project.path_with_namespace`.
pub fn payload_repo_name(body: &[u8]) -> Result<String, WebhookError> {
    #[derive(Deserialize)]
    struct Named {
        repository: Option<FullName>,
        project: Option<PathWithNamespace>,
    }
    #[derive(Deserialize)]
    struct FullName {
        full_name: String,
    }
    #[derive(Deserialize)]
    struct PathWithNamespace {
        path_with_namespace: String,
    }
    let n: Named =
        serde_json::from_slice(body).map_err(|e| WebhookError::Malformed(e.to_string()))?;
    n.repository
        .map(|r| r.full_name)
        .or(n.project.map(|p| p.path_with_namespace))
        .ok_or_else(|| WebhookError::Malformed("payload names no repository".into()))
}

#[derive(Deserialize)]
struct PushPayload {
    #[serde(rename = "ref")]
    git_ref: String,
    after: String,
    #[serde(default)]
    deleted: bool,
}

const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

/// Decide a GitHub delivery of `event` (the `X-GitHub-Event` header).
pub fn github_decision(
    event: &str,
    body: &[u8],
    branch: &str,
) -> Result<PushDecision, WebhookError> {
    match event {
        "ping" => Ok(PushDecision::Ping),
        "push" => {
            let p: PushPayload =
                serde_json::from_slice(body).map_err(|e| WebhookError::Malformed(e.to_string()))?;
            // GitHub sends `head_commit: null` on deletions; `deleted` and the zero sha say
            // the same, and either is enough.
            push_decision(&p, p.deleted, branch)
        }
        other => Ok(PushDecision::Ignore(format!(
            "event {other:?} is not a push"
        ))),
    }
}

/// Decide a GitLab delivery of `event` (the `X-Gitlab-Event` header).
pub fn gitlab_decision(
    event: &str,
    body: &[u8],
    branch: &str,
) -> Result<PushDecision, WebhookError> {
    match event {
        "Push Hook" => {
            let p: PushPayload =
                serde_json::from_slice(body).map_err(|e| WebhookError::Malformed(e.to_string()))?;
            push_decision(&p, false, branch)
        }
        other => Ok(PushDecision::Ignore(format!(
            "event {other:?} is not a push"
        ))),
    }
}

fn push_decision(
    p: &PushPayload,
    deleted: bool,
    branch: &str,
) -> Result<PushDecision, WebhookError> {
    let Some(pushed) = p.git_ref.strip_prefix("refs/heads/") else {
        return Ok(PushDecision::Ignore(format!(
            "{} is not a branch",
            p.git_ref
        )));
    };
    if deleted || p.after == ZERO_SHA {
        return Ok(PushDecision::Ignore(format!("branch {pushed} was deleted")));
    }
    if pushed != branch {
        return Ok(PushDecision::Ignore(format!(
            "push to {pushed}, not the default branch {branch}"
        )));
    }
    let sha_ok =
        (7..=64).contains(&p.after.len()) && p.after.bytes().all(|c| c.is_ascii_hexdigit());
    if !sha_ok {
        return Err(WebhookError::Malformed(format!(
            "bad commit id {:?}",
            p.after
        )));
    }
    Ok(PushDecision::Build {
        sha: p.after.to_ascii_lowercase(),
    })
}

/// HMAC-SHA256 signature header value GitHub would send; used by tests and the demo.
pub fn github_signature(secret: &str, body: &[u8]) -> String {
    // A key of any length is accepted by HMAC, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn push(r: &str, after: &str) -> Vec<u8> {
        format!(r#"{{"ref":"{r}","after":"{after}","repository":{{"full_name":"acme/web"}},"head_commit":null}}"#)
            .into_bytes()
    }

    #[test]
    fn signature_round_trip_and_tamper() {
        let body = push("refs/heads/main", SHA);
        let sig = github_signature("s3cret", &body);
        assert!(verify_github_signature("s3cret", &body, Some(&sig)).is_ok());
        assert!(verify_github_signature("other", &body, Some(&sig)).is_err());
        let mut tampered = body.clone();
        tampered[3] ^= 1;
        assert!(verify_github_signature("s3cret", &tampered, Some(&sig)).is_err());
        assert!(verify_github_signature("s3cret", &body, None).is_err());
        assert!(verify_github_signature("s3cret", &body, Some("sha256=zz")).is_err());
        let unsigned = github_signature("", &body);
        assert!(verify_github_signature("", &body, Some(&unsigned)).is_err());
    }

    #[test]
    fn gitlab_token() {
        assert!(verify_gitlab_token("t", Some("t")).is_ok());
        assert!(verify_gitlab_token("t", Some("u")).is_err());
        assert!(verify_gitlab_token("", Some("")).is_err());
        assert!(verify_gitlab_token("t", None).is_err());
    }

    #[test]
    fn decisions() {
        let d = |r: &str, a: &str| github_decision("push", &push(r, a), "main");
        assert_eq!(
            d("refs/heads/main", SHA),
            Ok(PushDecision::Build { sha: SHA.into() })
        );
        assert!(matches!(
            d("refs/heads/dev", SHA),
            Ok(PushDecision::Ignore(_))
        ));
        assert!(matches!(
            d("refs/tags/v1", SHA),
            Ok(PushDecision::Ignore(_))
        ));
        assert!(matches!(
            d("refs/heads/main", ZERO_SHA),
            Ok(PushDecision::Ignore(_))
        ));
        assert!(matches!(
            d("refs/heads/main", "x;rm"),
            Err(WebhookError::Malformed(_))
        ));
        assert!(github_decision("push", b"{not json", "main").is_err());
        assert_eq!(
            github_decision("ping", b"{}", "main"),
            Ok(PushDecision::Ping)
        );
        assert!(matches!(
            gitlab_decision("Tag Push Hook", b"{}", "main"),
            Ok(PushDecision::Ignore(_))
        ));
        assert_eq!(
            payload_repo_name(&push("refs/heads/main", SHA)),
            Ok("acme/web".into())
        );
    }
}
