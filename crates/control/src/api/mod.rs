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
    commit_id, parse_duration, repo_name, ApiError, BuildStatus, ClusterStatus, Command,
    CompleteRequest, HeartbeatReply, HeartbeatRequest, JoinRequest, Lease, LeaseRequest,
    Member as MemberInfo, Outcome, QueueOutcome, Rejection, Repo, RepoSpec, TriggerRequest,
};
use subtle::ConstantTimeEq;

use crate::member::{now_ms, Member, ProposeError};
use crate::network::{
    carries_cluster_key, decode, decode_snapshot_body, encode, CLUSTER_KEY_HEADER, PROTOCOL_HEADER,
    RAFT_PROTOCOL,
};
use crate::TypeConfig;
use starling_core::state::BuildQuery;
use starling_core::webhook::{self, PushDecision, WebhookError, MAX_WEBHOOK_BODY};

mod access;
mod builds;
mod cluster;
mod events;
mod hooks;
mod leases;
mod logs;
mod origin;
mod raft_rpc;
mod routing;

use builds::*;
use cluster::*;
use events::*;
use hooks::*;
use leases::*;
use logs::*;
use origin::*;
use raft_rpc::*;
use routing::*;

pub(crate) use events::{MAX_EVENT_READERS, PAGE_WORKERS};

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

impl From<starling_proto::NameError> for ApiErr {
    fn from(e: starling_proto::NameError) -> Self {
        ApiErr(StatusCode::BAD_REQUEST, e.to_string())
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

/// Requests of the JSON API: a repository, a trigger, a completion with its reason.
const MAX_API_BODY: usize = 1024 * 1024;
/// A vote is a few dozen bytes.
const MAX_VOTE_BODY: usize = 64 * 1024;
/// A batch of log entries: each is a command made from an API request of at most
/// `MAX_API_BODY`, and openraft sends a few hundred at most.
const MAX_APPEND_BODY: usize = 256 * 1024 * 1024;
/// A whole snapshot: it grows with the history (about 100 MB at 200,000 builds).
const MAX_SNAPSHOT_BODY: usize = 1024 * 1024 * 1024;
const HOPS_HEADER: &str = "x-starling-hops";
/// A caller-chosen id that makes a mutating request apply at most once
/// ([`Command::Once`]); a follower that forwards a request sets one if the caller did not.
pub(crate) const REQUEST_ID_HEADER: &str = "x-starling-request-id";

/// The request id of `headers`, if any; at most 128 visible ASCII characters.
fn request_id(headers: &HeaderMap) -> Result<Option<String>, ApiErr> {
    let Some(v) = headers.get(REQUEST_ID_HEADER) else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(id) if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(id.to_string()))
        }
        _ => Err(err(
            StatusCode::BAD_REQUEST,
            format!("{REQUEST_ID_HEADER} must be 1 to 128 visible ASCII characters"),
        )),
    }
}

pub fn router(member: Arc<Member>) -> Router {
    let hooks = Router::new()
        .route("/hooks/github", post(github_hook))
        .route("/hooks/gitlab", post(gitlab_hook))
        .layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY));
    let origin = Router::new()
        .route("/v1/chunks/{hash}", get(get_chunk).put(put_chunk))
        .layer(DefaultBodyLimit::max(MAX_CHUNK))
        .merge(
            Router::new()
                .route("/v1/manifests/{id}", get(get_manifest).put(put_manifest))
                .layer(DefaultBodyLimit::max(MAX_MANIFEST)),
        )
        .merge(
            Router::new()
                .route("/v1/chunks/missing", post(missing_chunks))
                .layer(DefaultBodyLimit::max(MAX_MISSING_BODY)),
        );
    let raft = Router::new()
        .route("/raft/append", post(raft_append))
        .layer(DefaultBodyLimit::max(MAX_APPEND_BODY))
        .merge(
            Router::new()
                .route("/raft/vote", post(raft_vote))
                .layer(DefaultBodyLimit::max(MAX_VOTE_BODY)),
        )
        .merge(
            Router::new()
                .route("/raft/snapshot", post(raft_snapshot))
                .layer(DefaultBodyLimit::max(MAX_SNAPSHOT_BODY)),
        );
    let api = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/cluster", get(cluster))
        .route("/v1/cluster/members/{id}", delete(remove_member))
        .route("/v1/repos", get(list_repos).post(put_repo))
        .route("/v1/trigger", post(trigger))
        .route("/v1/builds", get(list_builds))
        .route("/v1/builds/{id}", get(show_build))
        .route("/v1/builds/{id}/cancel", post(cancel_build))
        .route("/v1/builds/{id}/logs", get(read_log).put(append_log))
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
        .merge(origin)
        .merge(raft)
        .merge(api)
        .layer(middleware::from_fn_with_state(
            member.clone(),
            route_to_leader,
        ))
        // Outermost: credentials are checked before anything reads a body or forwards.
        .layer(middleware::from_fn_with_state(
            member.clone(),
            access::authorize,
        ))
        .with_state(member)
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
