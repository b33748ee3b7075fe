//! GitHub and GitLab push webhooks: signature checks and the decision what a push means.
//! Pure functions over headers and bytes; the HTTP handler does the rest.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;

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

/// The JSON document of a delivery. GitHub sends `application/json`, or by default for a
/// new webhook `application/x-www-form-urlencoded` with the JSON in a `payload` field; the
/// signature covers the raw body either way, so it is checked against `body`, not this.
pub fn payload_json<'a>(
    content_type: Option<&str>,
    body: &'a [u8],
) -> Result<std::borrow::Cow<'a, [u8]>, WebhookError> {
    let mime = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase());
    match mime.as_deref() {
        None | Some("application/json") => Ok(std::borrow::Cow::Borrowed(body)),
        Some("application/x-www-form-urlencoded") => form_urlencoded::parse(body)
            .find(|(k, _)| k == "payload")
            .map(|(_, v)| std::borrow::Cow::Owned(v.into_owned().into_bytes()))
            .ok_or_else(|| {
                WebhookError::Malformed(
                    "a form-encoded delivery without a `payload` field; set the webhook's content type to application/json".into(),
                )
            }),
        Some(other) => Err(WebhookError::Malformed(format!(
            "content type {other} is not understood; set the webhook's content type to application/json"
        ))),
    }
}

/// The repository a payload names, in canonical form: GitLab's
/// `project.path_with_namespace`, else GitHub's `repository.full_name`. (GitLab's payloads
/// carry a `repository` object too, without `full_name`.)
pub fn payload_repo_name(json: &[u8]) -> Result<String, WebhookError> {
    #[derive(Deserialize)]
    struct Named {
        repository: Option<FullName>,
        project: Option<PathWithNamespace>,
    }
    #[derive(Deserialize)]
    struct FullName {
        full_name: Option<String>,
    }
    #[derive(Deserialize)]
    struct PathWithNamespace {
        path_with_namespace: Option<String>,
    }
    let n: Named = serde_json::from_slice(json).map_err(malformed)?;
    let name = n
        .project
        .and_then(|p| p.path_with_namespace)
        .or(n.repository.and_then(|r| r.full_name))
        .ok_or_else(|| {
            WebhookError::Malformed(
                "payload names no repository (no project.path_with_namespace or repository.full_name); add ?repo=NAME to the webhook URL".into(),
            )
        })?;
    starling_proto::repo_name(&name).map_err(|e| WebhookError::Malformed(e.to_string()))
}

fn malformed(e: serde_json::Error) -> WebhookError {
    WebhookError::Malformed(format!(
        "{e} (Starling reads JSON, or a form with a JSON `payload` field)"
    ))
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

/// Decide a GitHub delivery of `event` (the `X-GitHub-Event` header) from its JSON.
pub fn github_decision(
    event: &str,
    json: &[u8],
    branch: &str,
) -> Result<PushDecision, WebhookError> {
    match event {
        "ping" => Ok(PushDecision::Ping),
        "push" => {
            let p: PushPayload = serde_json::from_slice(json).map_err(malformed)?;
            // GitHub sends `head_commit: null` on deletions; `deleted` and the zero sha say
            // the same, and either is enough.
            push_decision(&p, p.deleted, branch)
        }
        other => Ok(PushDecision::Ignore(format!(
            "event {other:?} is not a push"
        ))),
    }
}

/// Decide a GitLab delivery of `event` (the `X-Gitlab-Event` header) from its JSON.
pub fn gitlab_decision(
    event: &str,
    json: &[u8],
    branch: &str,
) -> Result<PushDecision, WebhookError> {
    match event {
        "Push Hook" => {
            let p: PushPayload = serde_json::from_slice(json).map_err(malformed)?;
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
    let sha =
        starling_proto::commit_id(&p.after).map_err(|e| WebhookError::Malformed(e.to_string()))?;
    Ok(PushDecision::Build { sha })
}

/// HMAC-SHA256 signature header value GitHub would send; the demo and tests send it, and
/// notifications are signed with it.
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

    // The forges' documented payloads, whole (tests/fixtures).
    const GITHUB_PUSH: &[u8] = include_bytes!("../tests/fixtures/github_push.json");
    const GITHUB_PING: &[u8] = include_bytes!("../tests/fixtures/github_ping.json");
    const GITLAB_PUSH: &[u8] = include_bytes!("../tests/fixtures/gitlab_push_hook.json");
    const GITLAB_TAG: &[u8] = include_bytes!("../tests/fixtures/gitlab_tag_push_hook.json");

    #[test]
    fn documented_github_payloads() {
        assert_eq!(
            payload_repo_name(GITHUB_PUSH),
            Ok("octocat/hello-world".into())
        );
        assert_eq!(
            github_decision("push", GITHUB_PUSH, "main"),
            Ok(PushDecision::Build {
                sha: "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c".into()
            })
        );
        assert_eq!(
            payload_repo_name(GITHUB_PING),
            Ok("octocat/hello-world".into())
        );
        assert_eq!(
            github_decision("ping", GITHUB_PING, "main"),
            Ok(PushDecision::Ping)
        );
    }

    #[test]
    fn documented_gitlab_payloads() {
        assert_eq!(payload_repo_name(GITLAB_PUSH), Ok("mike/diaspora".into()));
        assert_eq!(
            gitlab_decision("Push Hook", GITLAB_PUSH, "master"),
            Ok(PushDecision::Build {
                sha: "da1560886d4f094c3e6c9ef40349f7d38b5d27d7".into()
            })
        );
        assert_eq!(payload_repo_name(GITLAB_TAG), Ok("jsmith/example".into()));
        assert!(matches!(
            gitlab_decision("Tag Push Hook", GITLAB_TAG, "master"),
            Ok(PushDecision::Ignore(_))
        ));
    }

    #[test]
    fn form_encoded_deliveries() {
        let form: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("payload", std::str::from_utf8(GITHUB_PUSH).unwrap())
            .finish();
        let json =
            payload_json(Some("application/x-www-form-urlencoded"), form.as_bytes()).unwrap();
        assert_eq!(&*json, GITHUB_PUSH);
        assert_eq!(
            &*payload_json(Some("application/json; charset=utf-8"), b"{}").unwrap(),
            b"{}"
        );
        assert_eq!(&*payload_json(None, b"{}").unwrap(), b"{}");
        let e = payload_json(Some("text/xml"), b"<x/>").unwrap_err();
        assert!(e.to_string().contains("application/json"), "{e}");
        assert!(payload_json(Some("application/x-www-form-urlencoded"), b"a=b").is_err());
    }
}
