//! The HTTP API every member serves: public `/v1/*`, webhooks `/hooks/*`, Raft RPC
//! `/raft/*`, cluster-internal `/internal/*`, `/metrics` and `/healthz`.
//!
//! Writes and linearizable reads run on the leader. A follower does not bounce them to the
//! client: [`route_to_leader`] forwards the request to the leader and relays its answer,
//! retrying while an election is under way. Handlers can therefore assume they run on the
//! leader, and only have to cope with losing leadership mid-request (503, retryable).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Json, Router};
use openraft::ReadPolicy;
use serde::Deserialize;
use starling_proto::routes::{Endpoint, Method};
use starling_proto::{ApiError, Outcome, Rejection};

use crate::member::{Member, ProposeError};

mod access;
mod builds;
mod cluster;
mod deploys;
mod enroll;
mod events;
mod hooks;
mod leases;
mod logs;
mod origin;
mod raft_rpc;
mod routing;
mod web;

pub(crate) use events::{MAX_EVENT_READERS, PAGE_WORKERS};

type Shared = State<Arc<Member>>;

/// Run `f` on a blocking thread: reads of the state file's archive.
async fn blocking<T: Send + 'static>(
    m: &Arc<Member>,
    f: impl FnOnce(&Member) -> std::io::Result<T> + Send + 'static,
) -> Result<T, ApiErr> {
    let m = m.clone();
    tokio::task::spawn_blocking(move || f(&m))
        .await
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| {
            tracing::error!(error = %e, "reading the archive failed");
            err(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading history: {e}"),
            )
        })
}

/// An error answer: a status and a sentence.
#[derive(Debug)]
pub struct ApiErr(StatusCode, String);

impl ApiErr {
    pub fn status(&self) -> StatusCode {
        self.0
    }
}

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
            Rejection::UnknownRepo(_)
            | Rejection::UnknownBuild(_)
            | Rejection::UnknownDeployment(_) => StatusCode::NOT_FOUND,
            Rejection::NotLeaseHolder { .. }
            | Rejection::AlreadyFinished(_)
            | Rejection::StepRefused { .. } => StatusCode::CONFLICT,
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

/// Longest a long-poll (a lease request, an events read) holds its request.
const MAX_WAIT: Duration = Duration::from_secs(60);
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

/// The member's router: one handler per endpoint of [`starling_proto::routes`], with the
/// route's body limit, behind the leader-or-local decision and, outermost, the access
/// check.
pub fn router(member: Arc<Member>) -> Router {
    let mut router = Router::new();
    for e in Endpoint::ALL {
        let route = e.route();
        router = router.route(
            route.path,
            handler(e).layer(DefaultBodyLimit::max(route.body_limit)),
        );
    }
    router
        .layer(middleware::from_fn_with_state(
            member.clone(),
            routing::route_to_leader,
        ))
        // Outermost: credentials are checked before anything reads a body or forwards.
        .layer(middleware::from_fn_with_state(
            member.clone(),
            access::authorize,
        ))
        .layer(middleware::map_response(close_after_unread_body))
        .with_state(member)
}

/// A body refused as too large is left unread: the connection cannot carry another
/// request, and a client that reused it would find it closed under its next one.
async fn close_after_unread_body(mut resp: axum::response::Response) -> axum::response::Response {
    if resp.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// The handler of `e`, on the method the table gives it.
fn handler(e: Endpoint) -> MethodRouter<Arc<Member>> {
    let m = match e.route().method {
        Method::Get => MethodFilter::GET,
        Method::Post => MethodFilter::POST,
        Method::Put => MethodFilter::PUT,
        Method::Delete => MethodFilter::DELETE,
    };
    match e {
        Endpoint::Healthz => on(m, cluster::healthz),
        Endpoint::Metrics => on(m, cluster::metrics),
        Endpoint::Cluster => on(m, cluster::cluster),
        Endpoint::RemoveMember => on(m, cluster::remove_member),
        Endpoint::ListRepos => on(m, builds::list_repos),
        Endpoint::PutRepo => on(m, builds::put_repo),
        Endpoint::Trigger => on(m, builds::trigger),
        Endpoint::ListBuilds => on(m, builds::list_builds),
        Endpoint::ShowBuild => on(m, builds::show_build),
        Endpoint::CancelBuild => on(m, builds::cancel_build),
        Endpoint::ReadLog => on(m, logs::read_log),
        Endpoint::AppendLog => on(m, logs::append_log),
        Endpoint::Heartbeat => on(m, leases::heartbeat),
        Endpoint::Complete => on(m, leases::complete),
        Endpoint::Lease => on(m, leases::lease),
        Endpoint::ListReleases => on(m, builds::list_releases),
        Endpoint::ListNodes => on(m, builds::list_nodes),
        Endpoint::Events => on(m, events::events),
        Endpoint::EventsStream => on(m, events::events_stream),
        Endpoint::GithubHook => on(m, hooks::github_hook),
        Endpoint::GitlabHook => on(m, hooks::gitlab_hook),
        Endpoint::GetChunk => on(m, origin::get_chunk),
        Endpoint::PutChunk => on(m, origin::put_chunk),
        Endpoint::MissingChunks => on(m, origin::missing_chunks),
        Endpoint::GetManifest => on(m, origin::get_manifest),
        Endpoint::PutManifest => on(m, origin::put_manifest),
        Endpoint::RaftAppend => on(m, raft_rpc::raft_append),
        Endpoint::RaftVote => on(m, raft_rpc::raft_vote),
        Endpoint::RaftSnapshot => on(m, raft_rpc::raft_snapshot),
        Endpoint::Join => on(m, raft_rpc::join),
        Endpoint::ClusterCa => on(m, raft_rpc::cluster_ca),
        Endpoint::Snapshot => on(m, raft_rpc::force_snapshot),
        Endpoint::CreateJoinToken => on(m, enroll::create_join_token),
        Endpoint::Enroll => on(m, enroll::enroll),
        Endpoint::ListGoals => on(m, deploys::list_goals),
        Endpoint::Deploy => on(m, deploys::deploy),
        Endpoint::ListDeploys => on(m, deploys::list_deploys),
        Endpoint::ShowDeploy => on(m, deploys::show_deploy),
        Endpoint::PauseDeploy => on(m, deploys::pause),
        Endpoint::ResumeDeploy => on(m, deploys::resume),
        Endpoint::Rollback => on(m, deploys::rollback),
        Endpoint::WebPage => on(m, web::page),
        Endpoint::WebFragment => on(m, web::fragment),
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
