//! Repositories, manual triggers, the build history and releases.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use starling_core::state::BuildQuery;
use starling_proto::{
    commit_id, repo_name, BuildStatus, Command, NodeInfo, Outcome, QueueOutcome, QueueResult, Repo,
    RepoSpec, TriggerRequest,
};

use super::{err, linearize, request_id, unexpected, ApiErr, ReadOpts, Shared};
use crate::member::{now_ms, Member};

pub(super) async fn list_repos(
    State(m): Shared,
    Query(o): Query<ReadOpts>,
) -> Result<Response, ApiErr> {
    linearize(&m, &o).await?;
    let repos: Vec<Repo> = m.read().list_repos().into_iter().map(shown).collect();
    Ok(Json(repos).into_response())
}

/// A repository as the API shows it: credentials in its URL hidden.
fn shown(mut r: Repo) -> Repo {
    r.url = starling_proto::redact::url(&r.url);
    r
}

pub(super) async fn put_repo(
    State(m): Shared,
    Json(mut spec): Json<RepoSpec>,
) -> Result<Response, ApiErr> {
    spec.name = repo_name(&spec.name)?;
    starling_core::state::validate_repo_spec(&spec)
        .map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?;
    let name = spec.name.clone();
    match m.propose(Command::PutRepo { spec, at: now_ms() }).await? {
        Outcome::Rejected(r) => Err(r.into()),
        _ => {
            let repo = m.read().repo(&name).map(|r| shown(r.repo.clone()));
            Ok((StatusCode::CREATED, Json(repo)).into_response())
        }
    }
}

/// `GET /v1/builds` query; the status is a string so that a bad one gets a clear 400.
/// (Not `#[serde(flatten)]`: query strings lose their number types through it.)
#[derive(Deserialize, Default)]
pub(super) struct BuildListQuery {
    stale: Option<String>,
    repo: Option<String>,
    status: Option<String>,
    sha: Option<String>,
    since: Option<u64>,
    until: Option<u64>,
    limit: Option<usize>,
}

pub(super) async fn list_builds(
    State(m): Shared,
    Query(q): Query<BuildListQuery>,
) -> Result<Response, ApiErr> {
    let status = q
        .status
        .as_deref()
        .map(str::parse::<BuildStatus>)
        .transpose()
        .map_err(|e| err(StatusCode::BAD_REQUEST, e))?;
    linearize(&m, &ReadOpts { stale: q.stale }).await?;
    // Names and commit ids are stored in lowercase (see `starling_proto::names`).
    let query = BuildQuery {
        repo: q.repo.map(|r| r.to_ascii_lowercase()),
        status,
        sha: q.sha.map(|s| s.to_ascii_lowercase()),
        since: q.since,
        until: q.until,
        limit: q.limit,
    };
    let found = super::blocking(&m, move |m| m.builds(&query)).await?;
    Ok(Json(found).into_response())
}

pub(super) async fn show_build(
    State(m): Shared,
    Path(id): Path<u64>,
    Query(o): Query<ReadOpts>,
) -> Result<Response, ApiErr> {
    linearize(&m, &o).await?;
    let b = super::blocking(&m, move |m| m.build(id)).await?;
    b.map(|b| Json(b).into_response())
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("unknown build {id}")))
}

#[tracing::instrument(skip_all, fields(build = id))]
pub(super) async fn cancel_build(
    State(m): Shared,
    Path(id): Path<u64>,
) -> Result<Response, ApiErr> {
    match m
        .propose(Command::CancelBuild {
            build: id,
            at: now_ms(),
        })
        .await?
    {
        Outcome::Build(b) => Ok(Json(b).into_response()),
        Outcome::Rejected(r) => Err(r.into()),
        other => Err(unexpected(other)),
    }
}

#[derive(Deserialize)]
pub(super) struct ReleaseQuery {
    repo: Option<String>,
    #[serde(default)]
    stale: Option<String>,
}

/// Collected releases listed from the archive, at most.
const ARCHIVED_RELEASES_SHOWN: usize = 100;

pub(super) async fn list_releases(
    State(m): Shared,
    Query(q): Query<ReleaseQuery>,
) -> Result<Response, ApiErr> {
    linearize(&m, &ReadOpts { stale: q.stale }).await?;
    let repo = q.repo;
    let found = super::blocking(&m, move |m| {
        m.releases(repo.as_deref(), ARCHIVED_RELEASES_SHOWN)
    })
    .await?;
    Ok(Json(found).into_response())
}

/// The fleet as this member's tracker knows it (nodes announce to every member).
pub(super) async fn list_nodes(State(m): Shared) -> Json<Vec<NodeInfo>> {
    Json(fleet_nodes(&m))
}

/// Every node this member's tracker heard from lately.
pub(super) fn fleet_nodes(m: &Member) -> Vec<NodeInfo> {
    let now = std::time::Instant::now();
    let now_ms = now_ms();
    let tracker = m.tracker.lock().unwrap_or_else(|p| p.into_inner());
    tracker
        .nodes(now)
        .map(|(a, at)| {
            let (release, activated_at, state, error) = NodeInfo::summary(&a.apps);
            NodeInfo {
                id: a.node.clone(),
                region: a.region.clone(),
                address: a.addr.clone(),
                release,
                state,
                last_seen: now_ms
                    .saturating_sub(now.saturating_duration_since(at).as_millis() as u64),
                activated_at,
                error,
                apps: a.apps.clone(),
            }
        })
        .collect()
}

/// Queue a build unless it is a known duplicate; 201 for a new build, 200 for a duplicate.
pub(super) async fn queue(
    m: &Member,
    repo: String,
    sha: String,
    trigger: &str,
    delivery: Option<String>,
    force: bool,
    request: Option<String>,
) -> Result<Response, ApiErr> {
    let known = m
        .read()
        .duplicate_of(&repo, &sha, delivery.as_deref(), force);
    let outcome = match known {
        Some(dup) => dup,
        None => {
            let cmd = Command::QueueBuild {
                repo,
                sha,
                trigger: trigger.into(),
                delivery,
                force,
                at: now_ms(),
            };
            m.propose_once(cmd, request).await?
        }
    };
    queue_answer(outcome)
}

pub(super) fn queue_answer(outcome: Outcome) -> Result<Response, ApiErr> {
    if let Outcome::Queued(b) = &outcome {
        tracing::info!(build = b.id, repo = %b.repo, sha = %b.sha, "build queued");
    }
    let (status, label, build) = match outcome {
        Outcome::Queued(b) => (StatusCode::CREATED, QueueResult::Queued, b),
        Outcome::DuplicateDelivery(b) => (StatusCode::OK, QueueResult::DuplicateDelivery, b),
        Outcome::DuplicateCommit(b) => (StatusCode::OK, QueueResult::DuplicateCommit, b),
        Outcome::Rejected(r) => return Err(r.into()),
        other => return Err(unexpected(other)),
    };
    Ok((
        status,
        Json(QueueOutcome {
            outcome: label,
            build,
        }),
    )
        .into_response())
}

#[tracing::instrument(skip_all, fields(repo = %req.repo, sha = ?req.sha, force = req.force))]
pub(super) async fn trigger(
    State(m): Shared,
    headers: HeaderMap,
    Json(req): Json<TriggerRequest>,
) -> Result<Response, ApiErr> {
    let request = request_id(&headers)?;
    let name = repo_name(&req.repo)?;
    let repo = m
        .read()
        .repo(&name)
        .map(|r| r.repo.clone())
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("unknown repository {name}")))?;
    // A full commit id as it is; anything else (a branch, a tag, HEAD) is resolved against
    // the remote now, so that only real commit ids are ever queued.
    let sha = match req.sha.as_deref().map(commit_id) {
        Some(Ok(sha)) => sha,
        Some(Err(_)) => resolve_ref(&repo.url, req.sha.as_deref().unwrap_or_default()).await?,
        None => resolve_ref(&repo.url, &format!("refs/heads/{}", repo.branch)).await?,
    };
    queue(&m, repo.name, sha, "manual", None, req.force, request).await
}

/// The commit `name` (a branch, a tag, `HEAD` or a full ref) points at in `url`, asked of
/// the real remote with `git ls-remote`.
pub(super) async fn resolve_ref(url: &str, name: &str) -> Result<String, ApiErr> {
    let shown = starling_proto::redact::url(url);
    if name.is_empty() || name.starts_with('-') || name.len() > 250 {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!("bad branch or tag name {name:?}"),
        ));
    }
    let candidates = [
        name.to_string(),
        format!("refs/heads/{name}"),
        format!("refs/tags/{name}"),
    ];
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("git")
            .args(["ls-remote", "--", url])
            .args(
                candidates
                    .iter()
                    .flat_map(|c| [c.clone(), format!("{c}^{{}}")]),
            )
            .env("GIT_TERMINAL_PROMPT", "0")
            .output(),
    )
    .await
    .map_err(|_| err(StatusCode::GATEWAY_TIMEOUT, "git ls-remote took over 30 s"))?
    .map_err(|e| {
        err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("running git: {e}"),
        )
    })?;
    if !out.status.success() {
        return Err(err(
            StatusCode::BAD_GATEWAY,
            format!(
                "git ls-remote {shown}: {}",
                starling_proto::redact::text(String::from_utf8_lossy(&out.stderr).trim())
            ),
        ));
    }
    let listing = String::from_utf8_lossy(&out.stdout);
    let refs: Vec<(&str, &str)> = listing.lines().filter_map(|l| l.split_once('\t')).collect();
    // Exact name first, then a branch, then a tag (its peeled commit if annotated).
    for want in &candidates {
        let peeled = format!("{want}^{{}}");
        let hit = refs
            .iter()
            .find(|(_, r)| *r == peeled)
            .or_else(|| refs.iter().find(|(_, r)| r == want));
        if let Some((sha, _)) = hit {
            return commit_id(sha).map_err(|e| err(StatusCode::BAD_GATEWAY, e.to_string()));
        }
    }
    Err(err(
        StatusCode::NOT_FOUND,
        format!(
            "{name:?} is neither a commit id (40 or 64 hex digits) nor a branch or tag of {shown}"
        ),
    ))
}
