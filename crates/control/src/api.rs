//! The HTTP API every member serves: public `/v1/*`, webhooks `/hooks/*`, Raft RPC
//! `/raft/*`, cluster-internal `/internal/*`, `/metrics` and `/healthz`.
//!
//! Writes and linearizable reads run on the leader. A follower does not bounce them to the
//! client: [`route_to_leader`] forwards the request to the leader and relays its answer,
//! retrying while an election is under way. Handlers can therefore assume they run on the
//! leader, and only have to cope with losing leadership mid-request (503, retryable).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures::Stream;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::{ChangeMembers, ReadPolicy};
use serde::Deserialize;
use starling_proto::{
    ApiError, BuildStatus, ClusterStatus, Command, CompleteRequest, HeartbeatReply,
    HeartbeatRequest, JoinRequest, Lease, LeaseRequest, Member as MemberInfo, Outcome,
    QueueOutcome, Rejection, RepoSpec, TriggerRequest,
};
use subtle::ConstantTimeEq;

use crate::network::{decode_snapshot_body, CLUSTER_KEY_HEADER};
use crate::server::{admit, now_ms, Member, ProposeError};
use crate::state::BuildQuery;
use crate::webhook::{self, PushDecision, WebhookError, MAX_WEBHOOK_BODY};
use crate::TypeConfig;

type Shared = State<Arc<Member>>;

/// An error answer: a status and a sentence.
#[derive(Debug)]
pub struct ApiErr(StatusCode, String);

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

impl From<ProposeError> for ApiErr {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::NotLeader => ApiErr(
                StatusCode::SERVICE_UNAVAILABLE,
                "leadership changed during the request; retry".into(),
            ),
            ProposeError::Raft(m) => ApiErr(StatusCode::SERVICE_UNAVAILABLE, m),
        }
    }
}

impl From<Rejection> for ApiErr {
    fn from(r: Rejection) -> Self {
        let status = match r {
            Rejection::UnknownRepo(_) | Rejection::UnknownBuild(_) => StatusCode::NOT_FOUND,
            Rejection::NotLeaseHolder { .. } | Rejection::AlreadyFinished(_) => {
                StatusCode::CONFLICT
            }
            Rejection::Invalid(_) => StatusCode::BAD_REQUEST,
        };
        ApiErr(status, r.to_string())
    }
}

fn err(status: StatusCode, msg: impl Into<String>) -> ApiErr {
    ApiErr(status, msg.into())
}

/// A command answered with an outcome that its handler does not expect: a bug.
fn unexpected(outcome: Outcome) -> ApiErr {
    tracing::error!(?outcome, "unexpected outcome");
    err(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("unexpected outcome {outcome:?}"),
    )
}

const MAX_API_BODY: usize = 1024 * 1024;
const MAX_RAFT_BODY: usize = 1024 * 1024 * 1024;
const HOPS_HEADER: &str = "x-starling-hops";

pub fn router(member: Arc<Member>) -> Router {
    let hooks = Router::new()
        .route("/hooks/github", post(github_hook))
        .route("/hooks/gitlab", post(gitlab_hook))
        .layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY));
    let raft = Router::new()
        .route("/raft/append", post(raft_append))
        .route("/raft/vote", post(raft_vote))
        .route("/raft/snapshot", post(raft_snapshot))
        .layer(DefaultBodyLimit::max(MAX_RAFT_BODY));
    let api = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/cluster", get(cluster))
        .route("/v1/cluster/members/{id}", delete(remove_member))
        .route("/v1/repos", get(list_repos).post(put_repo))
        .route("/v1/trigger", post(trigger))
        .route("/v1/builds", get(list_builds))
        .route("/v1/builds/{id}", get(show_build))
        .route("/v1/builds/{id}/cancel", post(cancel_build))
        .route("/v1/builds/{id}/heartbeat", post(heartbeat))
        .route("/v1/builds/{id}/complete", post(complete))
        .route("/v1/leases", post(lease))
        .route("/v1/releases", get(list_releases))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/events", get(events))
        .route("/v1/events/stream", get(events_stream))
        .route("/internal/join", post(join))
        .route("/internal/snapshot", post(force_snapshot))
        .layer(DefaultBodyLimit::max(MAX_API_BODY));
    Router::new()
        .merge(hooks)
        .merge(raft)
        .merge(api)
        .layer(middleware::from_fn_with_state(
            member.clone(),
            route_to_leader,
        ))
        .with_state(member)
}

// ---------------------------------------------------------------------------------------
// Leader routing

/// Requests answered by whichever member receives them.
fn served_locally(req: &Request) -> bool {
    let path = req.uri().path();
    let local_path = path.starts_with("/raft/")
        || path.starts_with("/v1/events")
        || matches!(
            path,
            "/healthz" | "/metrics" | "/v1/cluster" | "/internal/snapshot"
        );
    let stale_read = req.method() == Method::GET
        && req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "stale=true" || kv == "stale=1"));
    local_path || stale_read
}

async fn route_to_leader(State(m): Shared, req: Request, next: Next) -> Response {
    if served_locally(&req) || m.raft.is_leader() {
        return next.run(req).await;
    }
    forward(&m, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Relay `req` to the leader, retrying for a while if there is none or it changes.
async fn forward(m: &Member, req: Request) -> Result<Response, ApiErr> {
    let hops: u32 = req
        .headers()
        .get(HOPS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if hops >= 3 {
        return Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "no stable leader; retry",
        ));
    }
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 2 * MAX_WEBHOOK_BODY)
        .await
        .map_err(|_| err(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"))?;
    let path_q = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let leader = m.leader().filter(|(id, _)| *id != m.cfg.id);
        if let Some((leader_id, addr)) = leader {
            let mut rb = m
                .http
                .request(parts.method.clone(), format!("http://{addr}{path_q}"))
                .timeout(Duration::from_secs(120))
                .body(body.clone());
            for (k, v) in parts.headers.iter() {
                if k != axum::http::header::HOST && k != axum::http::header::CONTENT_LENGTH {
                    rb = rb.header(k, v);
                }
            }
            rb = rb.header(HOPS_HEADER, (hops + 1).to_string());
            match rb.send().await {
                Ok(resp) if resp.status() != StatusCode::SERVICE_UNAVAILABLE => {
                    return Ok(relay(resp).await);
                }
                Ok(_) => tracing::debug!(leader_id, "leader busy; retrying"),
                Err(e) if e.is_connect() => {
                    tracing::debug!(leader_id, error = %e, "leader unreachable; retrying")
                }
                Err(e) => {
                    return Err(err(
                        StatusCode::BAD_GATEWAY,
                        format!("forwarding to leader {leader_id}: {e}"),
                    ))
                }
            }
        } else if m.raft.is_leader() {
            return Err(err(
                StatusCode::SERVICE_UNAVAILABLE,
                "this member just became leader; retry",
            ));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(err(
                StatusCode::SERVICE_UNAVAILABLE,
                "no leader reachable; retry",
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn relay(resp: reqwest::Response) -> Response {
    let status = resp.status();
    let ctype = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .cloned();
    let bytes = resp.bytes().await.unwrap_or_default();
    let mut out = Response::new(Body::from(bytes));
    *out.status_mut() = status;
    if let Some(ct) = ctype {
        out.headers_mut()
            .insert(axum::http::header::CONTENT_TYPE, ct);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Authentication

fn ct_eq(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn require_token(m: &Member, headers: &HeaderMap) -> Result<(), ApiErr> {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if ct_eq(t.trim(), &m.cfg.api_token) => Ok(()),
        _ => Err(err(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        )),
    }
}

fn require_cluster_key(m: &Member, headers: &HeaderMap) -> Result<(), ApiErr> {
    let given = headers
        .get(CLUSTER_KEY_HEADER)
        .and_then(|v| v.to_str().ok());
    match given {
        Some(k) if ct_eq(k, &m.cfg.cluster_key) => Ok(()),
        _ => Err(err(
            StatusCode::UNAUTHORIZED,
            "missing or wrong cluster key",
        )),
    }
}

#[derive(Deserialize, Default)]
struct ReadOpts {
    #[serde(default)]
    stale: Option<String>,
}

/// Wait until this member (the leader) may answer a linearizable read.
async fn linearize(m: &Member, opts: &ReadOpts) -> Result<(), ApiErr> {
    if matches!(opts.stale.as_deref(), Some("true" | "1")) {
        return Ok(());
    }
    m.raft
        .ensure_linearizable(ReadPolicy::ReadIndex)
        .await
        .map(|_| ())
        .map_err(|e| {
            err(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("read not linearizable: {e}; retry"),
            )
        })
}

// ---------------------------------------------------------------------------------------
// Raft RPC

async fn raft_append(
    State(m): Shared,
    headers: HeaderMap,
    Json(req): Json<AppendEntriesRequest<TypeConfig>>,
) -> Result<Response, ApiErr> {
    require_cluster_key(&m, &headers)?;
    Ok(Json(m.raft.append_entries(req).await).into_response())
}

async fn raft_vote(
    State(m): Shared,
    headers: HeaderMap,
    Json(req): Json<VoteRequest<TypeConfig>>,
) -> Result<Response, ApiErr> {
    require_cluster_key(&m, &headers)?;
    Ok(Json(m.raft.vote(req).await).into_response())
}

/// The body carries the snapshot's raw bytes behind its JSON meta; see
/// [`decode_snapshot_body`].
async fn raft_snapshot(
    State(m): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiErr> {
    require_cluster_key(&m, &headers)?;
    let (meta_json, data) =
        decode_snapshot_body(&body).map_err(|e| err(StatusCode::BAD_REQUEST, e))?;
    let (vote, meta): (VoteOf<TypeConfig>, SnapshotMetaOf<TypeConfig>) =
        serde_json::from_slice(meta_json).map_err(|e| {
            err(
                StatusCode::BAD_REQUEST,
                format!("malformed snapshot meta: {e}"),
            )
        })?;
    let snapshot = SnapshotOf::<TypeConfig, Vec<u8>> {
        meta,
        snapshot: data.to_vec(),
    };
    Ok(Json(m.raft.install_full_snapshot(vote, snapshot).await).into_response())
}

async fn join(
    State(m): Shared,
    headers: HeaderMap,
    Json(req): Json<JoinRequest>,
) -> Result<Response, ApiErr> {
    require_cluster_key(&m, &headers)?;
    admit(&m, req)
        .await
        .map_err(|e| err(StatusCode::SERVICE_UNAVAILABLE, e))?;
    Ok(StatusCode::OK.into_response())
}

/// Build a snapshot now and purge the log behind it (operators and tests).
async fn force_snapshot(State(m): Shared, headers: HeaderMap) -> Result<Response, ApiErr> {
    require_cluster_key(&m, &headers)?;
    let applied = m
        .raft
        .metrics()
        .borrow_watched()
        .last_applied
        .as_ref()
        .map(|l| l.index());
    m.raft
        .trigger()
        .snapshot()
        .await
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut rx = m.raft.metrics();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let snap = loop {
        let snap = rx.borrow_watched().snapshot.as_ref().map(|l| l.index());
        if snap >= applied {
            break snap;
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            return Err(err(
                StatusCode::GATEWAY_TIMEOUT,
                "snapshot did not finish in 30 s",
            ));
        }
    };
    if let Some(idx) = snap {
        m.raft
            .trigger()
            .purge_log(idx)
            .await
            .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    }
    Ok(Json(serde_json::json!({ "snapshot_index": snap })).into_response())
}

// ---------------------------------------------------------------------------------------
// Cluster

fn cluster_status(m: &Member) -> ClusterStatus {
    let mx = m.raft.metrics().borrow_watched().clone();
    let voters: Vec<u64> = mx.membership_config.voter_ids().collect();
    ClusterStatus {
        id: m.cfg.id,
        leader: mx.current_leader,
        term: mx.current_term,
        last_applied: mx.last_applied.as_ref().map(|l| l.index()),
        last_log_index: mx.last_log_index,
        snapshot_index: mx.snapshot.as_ref().map(|l| l.index()),
        purged_index: mx.purged.as_ref().map(|l| l.index()),
        members: mx
            .membership_config
            .nodes()
            .map(|(id, n)| MemberInfo {
                id: *id,
                addr: n.addr.clone(),
                voter: voters.contains(id),
            })
            .collect(),
    }
}

async fn cluster(State(m): Shared) -> Json<ClusterStatus> {
    Json(cluster_status(&m))
}

async fn remove_member(
    State(m): Shared,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Result<Response, ApiErr> {
    require_token(&m, &headers)?;
    let known = m
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .nodes()
        .any(|(n, _)| *n == id);
    if !known {
        return Err(err(
            StatusCode::NOT_FOUND,
            format!("member {id} is not in the cluster"),
        ));
    }
    m.raft
        .change_membership(ChangeMembers::RemoveVoters([id].into()), false)
        .await
        .map_err(|e| err(StatusCode::CONFLICT, e.to_string()))?;
    Ok(Json(cluster_status(&m)).into_response())
}

async fn metrics(State(m): Shared) -> Response {
    let c = cluster_status(&m);
    let mut out = String::new();
    let line = |out: &mut String, name: &str, help: &str, value: String| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
        ));
    };
    line(
        &mut out,
        "starling_raft_term",
        "Current Raft term.",
        c.term.to_string(),
    );
    line(
        &mut out,
        "starling_raft_is_leader",
        "1 if this member leads.",
        u8::from(c.leader == Some(c.id)).to_string(),
    );
    line(
        &mut out,
        "starling_raft_last_applied",
        "Index of the last applied log entry.",
        c.last_applied.unwrap_or(0).to_string(),
    );
    line(
        &mut out,
        "starling_raft_members",
        "Members in the configuration.",
        c.members.len().to_string(),
    );
    let st = m.read();
    line(
        &mut out,
        "starling_build_queue_depth",
        "Builds waiting for a worker.",
        st.queued_len().to_string(),
    );
    line(
        &mut out,
        "starling_events_total",
        "Entries in the event log.",
        st.last_event_index().to_string(),
    );
    out.push_str("# HELP starling_builds Builds by status.\n# TYPE starling_builds gauge\n");
    let mut counts = std::collections::BTreeMap::new();
    for b in st.records().builds.values() {
        *counts.entry(b.status.as_str()).or_insert(0u64) += 1;
    }
    for s in BuildStatus::ALL {
        let n = counts.get(s.as_str()).copied().unwrap_or(0);
        out.push_str(&format!("starling_builds{{status=\"{s}\"}} {n}\n"));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------
// Repositories, builds, releases

async fn list_repos(State(m): Shared, Query(o): Query<ReadOpts>) -> Result<Response, ApiErr> {
    linearize(&m, &o).await?;
    Ok(Json(m.read().list_repos()).into_response())
}

async fn put_repo(
    State(m): Shared,
    headers: HeaderMap,
    Json(spec): Json<RepoSpec>,
) -> Result<Response, ApiErr> {
    require_token(&m, &headers)?;
    crate::state::validate_repo_spec(&spec).map_err(|e| err(StatusCode::BAD_REQUEST, e))?;
    let name = spec.name.clone();
    match m.propose(Command::PutRepo { spec, at: now_ms() }).await? {
        Outcome::Rejected(r) => Err(r.into()),
        _ => {
            let repo = m.read().repo(&name).map(|r| r.repo.clone());
            Ok((StatusCode::CREATED, Json(repo)).into_response())
        }
    }
}

/// `GET /v1/builds` query; the status is a string so that a bad one gets a clear 400.
/// (Not `#[serde(flatten)]`: query strings lose their number types through it.)
#[derive(Deserialize, Default)]
struct BuildListQuery {
    stale: Option<String>,
    repo: Option<String>,
    status: Option<String>,
    sha: Option<String>,
    since: Option<u64>,
    until: Option<u64>,
    limit: Option<usize>,
}

async fn list_builds(
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
    let query = BuildQuery {
        repo: q.repo,
        status,
        sha: q.sha,
        since: q.since,
        until: q.until,
        limit: q.limit,
    };
    Ok(Json(m.read().list_builds(&query)).into_response())
}

async fn show_build(
    State(m): Shared,
    Path(id): Path<u64>,
    Query(o): Query<ReadOpts>,
) -> Result<Response, ApiErr> {
    linearize(&m, &o).await?;
    let b = m.read().build(id).cloned();
    b.map(|b| Json(b).into_response())
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("unknown build {id}")))
}

#[tracing::instrument(skip_all, fields(build = id))]
async fn cancel_build(
    State(m): Shared,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Result<Response, ApiErr> {
    require_token(&m, &headers)?;
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
struct ReleaseQuery {
    repo: Option<String>,
    #[serde(default)]
    stale: Option<String>,
}

async fn list_releases(
    State(m): Shared,
    Query(q): Query<ReleaseQuery>,
) -> Result<Response, ApiErr> {
    linearize(&m, &ReadOpts { stale: q.stale }).await?;
    Ok(Json(m.read().list_releases(q.repo.as_deref())).into_response())
}

/// Fleet nodes report in through the node-daemon issue; until then the list is empty.
async fn list_nodes() -> Json<Vec<serde_json::Value>> {
    Json(Vec::new())
}

/// Queue a build unless it is a known duplicate; 201 for a new build, 200 for a duplicate.
async fn queue(
    m: &Member,
    repo: String,
    sha: String,
    trigger: &str,
    delivery: Option<String>,
    force: bool,
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
            m.propose(cmd).await?
        }
    };
    queue_answer(outcome)
}

fn queue_answer(outcome: Outcome) -> Result<Response, ApiErr> {
    if let Outcome::Queued(b) = &outcome {
        tracing::info!(build = b.id, repo = %b.repo, sha = %b.sha, "build queued");
    }
    let (status, label, build) = match outcome {
        Outcome::Queued(b) => (StatusCode::CREATED, "queued", b),
        Outcome::DuplicateDelivery(b) => (StatusCode::OK, "duplicate_delivery", b),
        Outcome::DuplicateCommit(b) => (StatusCode::OK, "duplicate_commit", b),
        Outcome::Rejected(r) => return Err(r.into()),
        other => return Err(unexpected(other)),
    };
    Ok((
        status,
        Json(QueueOutcome {
            outcome: label.into(),
            build,
        }),
    )
        .into_response())
}

#[tracing::instrument(skip_all, fields(repo = %req.repo, sha = ?req.sha, force = req.force))]
async fn trigger(
    State(m): Shared,
    headers: HeaderMap,
    Json(req): Json<TriggerRequest>,
) -> Result<Response, ApiErr> {
    require_token(&m, &headers)?;
    let repo = m
        .read()
        .repo(&req.repo)
        .map(|r| r.repo.clone())
        .ok_or_else(|| {
            err(
                StatusCode::NOT_FOUND,
                format!("unknown repository {}", req.repo),
            )
        })?;
    let sha = match req.sha {
        Some(s) => s,
        None => branch_head(&repo.url, &repo.branch).await?,
    };
    queue(&m, repo.name, sha, "manual", None, req.force).await
}

/// The commit `branch` points at in `url`, asked of the real remote with `git ls-remote`.
async fn branch_head(url: &str, branch: &str) -> Result<String, ApiErr> {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("git")
            .args(["ls-remote", "--", url, &format!("refs/heads/{branch}")])
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
                "git ls-remote {url}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| {
            err(
                StatusCode::NOT_FOUND,
                format!("branch {branch} not found in {url}"),
            )
        })
}

// ---------------------------------------------------------------------------------------
// Webhooks

#[derive(Deserialize)]
struct HookQuery {
    /// Names the repository when the payload's name differs from Starling's.
    repo: Option<String>,
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
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

enum Forge {
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

async fn github_hook(
    State(m): Shared,
    Query(q): Query<HookQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiErr> {
    hook(m, Forge::GitHub, q, headers, body).await
}

async fn gitlab_hook(
    State(m): Shared,
    Query(q): Query<HookQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiErr> {
    hook(m, Forge::GitLab, q, headers, body).await
}

/// Checks run in this order, each before anything reaches the log: size (413, by the body
/// limit), repository name (400), repository known (404), signature (401), payload (400).
#[tracing::instrument(skip_all, fields(forge = forge.name(), repo))]
async fn hook(
    m: Arc<Member>,
    forge: Forge,
    q: HookQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiErr> {
    let name = match q.repo {
        Some(r) => r,
        None => webhook::payload_repo_name(&body)?,
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
            let d = webhook::github_decision(event, &body, &repo.repo.branch)?;
            (d, header(&headers, "x-github-delivery"), "github")
        }
        Forge::GitLab => {
            webhook::verify_gitlab_token(&repo.webhook_secret, header(&headers, "x-gitlab-token"))?;
            let event = header(&headers, "x-gitlab-event")
                .ok_or_else(|| err(StatusCode::BAD_REQUEST, "missing X-Gitlab-Event"))?;
            let d = webhook::gitlab_decision(event, &body, &repo.repo.branch)?;
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
    queue(&m, name, sha, trigger, delivery, false).await
}

// ---------------------------------------------------------------------------------------
// Worker leases

const MAX_LEASE_WAIT: Duration = Duration::from_secs(60);

#[tracing::instrument(skip_all, fields(worker = %req.worker))]
async fn lease(
    State(m): Shared,
    headers: HeaderMap,
    Json(req): Json<LeaseRequest>,
) -> Result<Response, ApiErr> {
    require_token(&m, &headers)?;
    if req.worker.is_empty() || req.worker.len() > 200 {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "worker name must be 1..200 bytes",
        ));
    }
    let wait = Duration::from_millis(req.wait_ms).min(MAX_LEASE_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let ttl_ms = m.cfg.lease_ttl.as_millis() as u64;
    let mut events = m.events.clone();
    loop {
        events.borrow_and_update();
        if m.read().queued_len() > 0 {
            let cmd = Command::LeaseBuild {
                worker: req.worker.clone(),
                ttl_ms,
                at: now_ms(),
            };
            if let Outcome::Leased(b) = m.propose(cmd).await? {
                let lease = Lease {
                    attempt: b.attempt,
                    lease_expires_at: b.lease_expires_at.unwrap_or_default(),
                    lease_ttl_ms: ttl_ms,
                    build: b,
                };
                tracing::info!(build = lease.build.id, worker = %req.worker, attempt = lease.attempt, "build leased");
                return Ok(Json(lease).into_response());
            }
        }
        if tokio::time::timeout_at(deadline, events.changed())
            .await
            .is_err()
        {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
}

#[tracing::instrument(skip_all, fields(build = id, worker = %req.worker, attempt = req.attempt))]
async fn heartbeat(
    State(m): Shared,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Json(req): Json<HeartbeatRequest>,
) -> Result<Response, ApiErr> {
    require_token(&m, &headers)?;
    let cmd = Command::Heartbeat {
        build: id,
        worker: req.worker,
        attempt: req.attempt,
        ttl_ms: m.cfg.lease_ttl.as_millis() as u64,
        at: now_ms(),
    };
    match m.propose(cmd).await? {
        Outcome::LeaseExtended {
            lease_expires_at,
            cancel,
        } => Ok(Json(HeartbeatReply {
            lease_expires_at,
            cancel,
        })
        .into_response()),
        Outcome::Rejected(r) => Err(r.into()),
        other => Err(unexpected(other)),
    }
}

#[tracing::instrument(skip_all, fields(build = id, worker = %req.worker, status = %req.status))]
async fn complete(
    State(m): Shared,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Json(req): Json<CompleteRequest>,
) -> Result<Response, ApiErr> {
    require_token(&m, &headers)?;
    let cmd = Command::CompleteBuild {
        build: id,
        worker: req.worker,
        attempt: req.attempt,
        status: req.status,
        release: req.release,
        reason: req.reason,
        at: now_ms(),
    };
    match m.propose(cmd).await? {
        Outcome::Build(b) => {
            tracing::info!(status = %b.status, release = ?b.release, reason = ?b.reason, "build finished");
            Ok(Json(b).into_response())
        }
        Outcome::Rejected(r) => Err(r.into()),
        other => Err(unexpected(other)),
    }
}

// ---------------------------------------------------------------------------------------
// Events

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    after: u64,
    /// Long-poll for up to this long (`30s`, `500ms`, `2m`; at most 60 s) when nothing is new.
    timeout: Option<String>,
    limit: Option<usize>,
}

/// Parse `500ms`, `30s`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
        _ => None,
    }
}

/// Served by any member from its applied state: the event log is append-only, so a member
/// that lags shows a prefix of the leader's, never something different.
async fn events(State(m): Shared, Query(q): Query<EventsQuery>) -> Result<Response, ApiErr> {
    let wait = match q.timeout.as_deref() {
        Some(t) => parse_duration(t)
            .ok_or_else(|| err(StatusCode::BAD_REQUEST, format!("bad timeout {t:?}")))?,
        None => Duration::ZERO,
    }
    .min(MAX_LEASE_WAIT);
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let deadline = tokio::time::Instant::now() + wait;
    let mut rx = m.events.clone();
    loop {
        rx.borrow_and_update();
        let evs = m.read().events_after(q.after, limit);
        if !evs.is_empty()
            || tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
        {
            return Ok(Json(evs).into_response());
        }
    }
}

/// Server-sent events: every event after `after`, then each new one as it is applied.
async fn events_stream(
    State(m): Shared,
    Query(q): Query<EventsQuery>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = m.events.clone();
    let stream = futures::stream::unfold(
        (m, rx, q.after, Vec::new()),
        |(m, mut rx, after, mut pending)| async move {
            loop {
                if let Some(e) = pending.pop() {
                    let e: starling_proto::Event = e;
                    let next = e.index;
                    let sse = SseEvent::default()
                        .id(e.index.to_string())
                        .event(e.kind.clone())
                        .json_data(&e)
                        .unwrap_or_default();
                    return Some((Ok(sse), (m, rx, next, pending)));
                }
                rx.borrow_and_update();
                let mut evs = m.read().events_after(after, 1000);
                if evs.is_empty() {
                    rx.changed().await.ok()?;
                    continue;
                }
                evs.reverse();
                pending = evs;
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}
