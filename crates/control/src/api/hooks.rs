//! GitHub and GitLab push webhooks.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use starling_core::webhook::{self, PushDecision, WebhookError};
use starling_proto::repo_name;

use super::builds::queue;
use super::{err, request_id, ApiErr, Shared};
use crate::member::Member;

#[derive(Deserialize)]
pub(super) struct HookQuery {
    /// Names the repository when the payload's name differs from Starling's.
    repo: Option<String>,
}

pub(super) fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

impl From<WebhookError> for ApiErr {
    fn from(e: WebhookError) -> Self {
        match e {
            WebhookError::BadSignature => err(StatusCode::UNAUTHORIZED, e.to_string()),
            WebhookError::Malformed(_) => err(StatusCode::BAD_REQUEST, e.to_string()),
        }
    }
}

pub(super) enum Forge {
    GitHub,
    GitLab,
}

impl Forge {
    fn name(&self) -> &'static str {
        match self {
            Forge::GitHub => "github",
            Forge::GitLab => "gitlab",
        }
    }
}

pub(super) async fn github_hook(
    State(m): Shared,
    Query(q): Query<HookQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiErr> {
    counted(
        &m,
        "github",
        hook(&m, Forge::GitHub, q, headers, body).await,
    )
}

pub(super) async fn gitlab_hook(
    State(m): Shared,
    Query(q): Query<HookQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiErr> {
    counted(
        &m,
        "gitlab",
        hook(&m, Forge::GitLab, q, headers, body).await,
    )
}

/// Count a delivery by what it was answered.
fn counted(
    m: &Member,
    forge: &'static str,
    answer: Result<Response, ApiErr>,
) -> Result<Response, ApiErr> {
    let status = match &answer {
        Ok(r) => r.status(),
        Err(e) => e.status(),
    };
    m.metrics.webhook(forge, status.as_u16());
    answer
}

/// Checks run in this order, each before anything reaches the log: size (413, by the body
/// limit), repository name (400), repository known (404), signature (401), payload (400).
#[tracing::instrument(skip_all, fields(forge = forge.name(), repo))]
pub(super) async fn hook(
    m: &Member,
    forge: Forge,
    q: HookQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiErr> {
    let json = webhook::payload_json(header(&headers, "content-type"), &body)?;
    let name = match q.repo {
        Some(r) => repo_name(&r)?,
        None => webhook::payload_repo_name(&json)?,
    };
    tracing::Span::current().record("repo", name.as_str());
    let repo = m
        .read()
        .repo(&name)
        .cloned()
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("unknown repository {name}")))?;
    let (decision, delivery, trigger) = match forge {
        Forge::GitHub => {
            webhook::verify_github_signature(
                &repo.webhook_secret,
                &body,
                header(&headers, "x-hub-signature-256"),
            )?;
            let event = header(&headers, "x-github-event")
                .ok_or_else(|| err(StatusCode::BAD_REQUEST, "missing X-GitHub-Event"))?;
            let d = webhook::github_decision(event, &json, &repo.repo.branch)?;
            (d, header(&headers, "x-github-delivery"), "github")
        }
        Forge::GitLab => {
            webhook::verify_gitlab_token(&repo.webhook_secret, header(&headers, "x-gitlab-token"))?;
            let event = header(&headers, "x-gitlab-event")
                .ok_or_else(|| err(StatusCode::BAD_REQUEST, "missing X-Gitlab-Event"))?;
            let d = webhook::gitlab_decision(event, &json, &repo.repo.branch)?;
            let delivery =
                header(&headers, "x-gitlab-event-uuid").or(header(&headers, "idempotency-key"));
            (d, delivery, "gitlab")
        }
    };
    let sha = match decision {
        PushDecision::Ping => {
            return Ok((StatusCode::OK, Json(serde_json::json!({"pong": true}))).into_response())
        }
        PushDecision::Ignore(reason) => {
            return Ok((
                StatusCode::ACCEPTED,
                Json(serde_json::json!({"ignored": reason})),
            )
                .into_response())
        }
        PushDecision::Build { sha } => sha,
    };
    if delivery.is_some_and(|d| d.len() > 200) {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "delivery id longer than 200 bytes",
        ));
    }
    let delivery = delivery.map(|d| format!("{trigger}:{d}"));
    queue(
        m,
        name,
        sha,
        trigger,
        delivery,
        false,
        request_id(&headers)?,
    )
    .await
}
