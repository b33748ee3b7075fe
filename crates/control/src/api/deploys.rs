//! Goals, deployments and rollbacks. What each node runs comes from here: the goal names
//! the release every node holds, and a node that says who it is gets the release its
//! deployment's waves let it run.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use starling_proto::{
    repo_name, Command, DeployRequest, Deployment, DeploymentView, GoalInfo, Outcome,
    RollbackRequest, RolloutPolicy, Strategy,
};

use super::events::long_poll_wait;
use super::{err, linearize, request_id, unexpected, ApiErr, ReadOpts, Shared};
use crate::member::{now_ms, FleetReport, Member};

#[derive(Deserialize, Default)]
pub(super) struct GoalQuery {
    repo: Option<String>,
    #[serde(default)]
    stale: Option<String>,
    /// With `timeout`: answer once a goal changed after this time (ms), or at the timeout.
    after: Option<u64>,
    /// Long-poll for up to this long (at most 60 s).
    timeout: Option<String>,
    /// The asking node and its region: the answer says what that node runs (`run`).
    node: Option<String>,
    region: Option<String>,
}

/// Every goal, or one repository's. A node long-polls with `after` (the newest `at` it
/// has seen) so that it hears of a new goal or wave at once, as every other node does:
/// nodes that start a release together agree sooner on who brings which chunk into their
/// region.
pub(super) async fn list_goals(
    State(m): Shared,
    Query(q): Query<GoalQuery>,
) -> Result<Json<Vec<GoalInfo>>, ApiErr> {
    let wait = long_poll_wait(q.timeout.as_deref())?;
    linearize(&m, &ReadOpts { stale: q.stale }).await?;
    let repo = q.repo.as_deref().map(repo_name).transpose()?;
    let asker = q.node.as_deref().zip(q.region.as_deref());
    let goals = || -> Vec<GoalInfo> {
        let state = m.read();
        state
            .goals()
            .filter(|g| repo.as_ref().is_none_or(|r| &g.repo == r))
            .map(|g| {
                let deployment = g.deployment.and_then(|id| state.deployment(id));
                let run = asker.map(|(node, region)| match deployment {
                    Some(d) => d.release_for(node, region),
                    None => Some(g.release),
                });
                GoalInfo {
                    repo: g.repo.clone(),
                    env: g.env.clone(),
                    release: g.release,
                    at: g.at,
                    deployment: g.deployment,
                    run: run.flatten(),
                }
            })
            .collect()
    };
    let Some(after) = q.after.filter(|_| !wait.is_zero()) else {
        return Ok(Json(goals()));
    };
    // No reader permit, unlike the event log's long-polls: a goal poll reads a few rows
    // and encodes no pages, and every waiting node holds a connection, which the
    // connection limit (`--max-connections`) already bounds.
    let deadline = tokio::time::Instant::now() + wait;
    // Goals change by commands that also append an event: the event watch wakes us.
    let mut rx = m.events.clone();
    loop {
        rx.borrow_and_update();
        let now = goals();
        if now.iter().any(|g| g.at > after) {
            return Ok(Json(now));
        }
        // At the deadline, or if the member is stopping, answer with what is.
        if !matches!(
            tokio::time::timeout_at(deadline, rx.changed()).await,
            Ok(Ok(()))
        ) {
            return Ok(Json(now));
        }
    }
}

/// Start a deployment: every node of the repository fetches the release at once, and
/// runs it when its wave comes (all at once: as soon as it holds it).
pub(super) async fn deploy(
    State(m): Shared,
    headers: HeaderMap,
    Json(req): Json<DeployRequest>,
) -> Result<Response, ApiErr> {
    let repo = repo_name(&req.repo)?;
    let env = starling_proto::env_name(&req.env)?;
    let (mut policy, newest) = {
        let state = m.read();
        let stored = state
            .repo(&repo)
            .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("unknown repository {repo}")))?;
        let newest = state.list_releases(Some(&repo)).first().map(|r| r.id);
        (stored.repo.rollout, newest)
    };
    let release = req.release.or(newest).ok_or_else(|| {
        err(
            StatusCode::NOT_FOUND,
            format!("{repo} has no release yet: build one first"),
        )
    })?;
    policy.strategy = req.strategy.unwrap_or(policy.strategy);
    policy.soak_ms = req.soak_ms.unwrap_or(policy.soak_ms);
    policy.max_failed_pct = req.max_failed_pct.unwrap_or(policy.max_failed_pct);
    policy.wave_timeout_ms = req.wave_timeout_ms.unwrap_or(policy.wave_timeout_ms);
    if policy.max_failed_pct > 100 {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "max_failed_pct is a percentage: 0 to 100",
        ));
    }
    start(&m, &headers, repo, env, release, policy, "api").await
}

/// Deploy `to` (default: what the environment ran before) to every node at once: nodes
/// that still hold it switch without moving a byte.
pub(super) async fn rollback(
    State(m): Shared,
    headers: HeaderMap,
    Json(req): Json<RollbackRequest>,
) -> Result<Response, ApiErr> {
    let repo = repo_name(&req.repo)?;
    let env = starling_proto::env_name(&req.env)?;
    let to = match req.to {
        Some(to) => to,
        None => m.read().previous_release(&repo, &env).ok_or_else(|| {
            err(
                StatusCode::CONFLICT,
                format!("{repo} ({env}) ran no release before this one: name one with --to"),
            )
        })?,
    };
    let policy = RolloutPolicy {
        strategy: Strategy::AllAtOnce,
        ..m.read()
            .repo(&repo)
            .map(|r| r.repo.rollout)
            .unwrap_or_default()
    };
    start(&m, &headers, repo, env, to, policy, "rollback").await
}

async fn start(
    m: &Member,
    headers: &HeaderMap,
    repo: String,
    env: String,
    release: starling_proto::ReleaseId,
    policy: RolloutPolicy,
    trigger: &str,
) -> Result<Response, ApiErr> {
    let cmd = Command::StartDeployment {
        repo,
        env,
        release,
        policy,
        trigger: trigger.to_string(),
        at: now_ms(),
    };
    match m.propose_once(cmd, request_id(headers)?).await? {
        Outcome::Deployment(d) => Ok((StatusCode::CREATED, Json(*d)).into_response()),
        Outcome::Rejected(r) => Err(r.into()),
        other => Err(unexpected(other)),
    }
}

#[derive(Deserialize, Default)]
pub(super) struct DeployListQuery {
    repo: Option<String>,
    limit: Option<usize>,
    #[serde(default)]
    stale: Option<String>,
}

/// Deployments, newest first.
pub(super) async fn list_deploys(
    State(m): Shared,
    Query(q): Query<DeployListQuery>,
) -> Result<Json<Vec<Deployment>>, ApiErr> {
    linearize(&m, &ReadOpts { stale: q.stale }).await?;
    let repo = q.repo.as_deref().map(repo_name).transpose()?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let found = super::blocking(&m, move |m| m.deployments(repo.as_deref(), limit)).await?;
    Ok(Json(found))
}

/// One deployment, its history and how far its nodes are.
pub(super) async fn show_deploy(
    State(m): Shared,
    Path(id): Path<u64>,
    Query(o): Query<ReadOpts>,
) -> Result<Json<DeploymentView>, ApiErr> {
    linearize(&m, &o).await?;
    let deployment = super::blocking(&m, move |m| m.deployment(id))
        .await?
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("unknown deployment {id}")))?;
    let fleet = m.fleet(&deployment.repo);
    let progress = starling_core::rollout::progress(&deployment, &FleetReport::view(&fleet));
    Ok(Json(DeploymentView {
        deployment,
        progress,
    }))
}

pub(super) async fn pause(
    State(m): Shared,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Result<Response, ApiErr> {
    set_paused(&m, &headers, id, true).await
}

pub(super) async fn resume(
    State(m): Shared,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Result<Response, ApiErr> {
    set_paused(&m, &headers, id, false).await
}

async fn set_paused(
    m: &Member,
    headers: &HeaderMap,
    id: u64,
    paused: bool,
) -> Result<Response, ApiErr> {
    let cmd = Command::PauseDeployment {
        id,
        paused,
        at: now_ms(),
    };
    match m.propose_once(cmd, request_id(headers)?).await? {
        Outcome::Deployment(d) => Ok(Json(*d).into_response()),
        Outcome::Rejected(r) => Err(r.into()),
        other => Err(unexpected(other)),
    }
}
