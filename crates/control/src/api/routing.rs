//! Forwarding of writes and linearizable reads from a follower to the leader.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use backon::Retryable;
use starling_core::retry::backoff;
use starling_proto::routes::{Endpoint, Method as RouteMethod};

use super::{err, ApiErr, Shared, HOPS_HEADER, REQUEST_ID_HEADER};
use crate::member::Member;
use crate::network::CLUSTER_KEY_HEADER;

/// The endpoint `req` reaches, if it must be answered by the leader; `None` when the
/// member it reached answers it (the route says so, it is a stale read, or no route
/// matches and the router answers 404).
fn leaders_endpoint(req: &Request) -> Option<Endpoint> {
    let method = RouteMethod::parse(req.method().as_str())?;
    let e = Endpoint::find(method, req.uri().path())?;
    let stale_ok = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "stale=true" || kv == "stale=1"));
    (!e.route().answered_here(stale_ok)).then_some(e)
}

pub(super) async fn route_to_leader(State(m): Shared, req: Request, next: Next) -> Response {
    let Some(e) = leaders_endpoint(&req).filter(|_| !m.raft.is_leader()) else {
        return next.run(req).await;
    };
    forward(&m, e.route().body_limit, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Relay `req` to the leader, retrying for a while if there is none or it changes.
async fn forward(m: &Member, body_limit: usize, req: Request) -> Result<Response, ApiErr> {
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
    let (mut parts, body) = req.into_parts();
    // The same id on every retry below: if the leader applied the request but its answer
    // was lost (a 503 after it appended), the retry gets that outcome, not a second effect.
    if !parts.headers.contains_key(REQUEST_ID_HEADER) {
        let id = format!("fwd-{:032x}", rand::random::<u128>());
        if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
            parts.headers.insert(REQUEST_ID_HEADER, v);
        }
    }
    let body = axum::body::to_bytes(body, body_limit)
        .await
        .map_err(|_| err(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"))?;
    let path_q = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let attempt = || async {
        let Some((leader_id, addr)) = m.leader().filter(|(id, _)| *id != m.cfg.id) else {
            if m.raft.is_leader() {
                return Err(Hop::Final(err(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "this member just became leader; retry",
                )));
            }
            return Err(Hop::Again("no leader known"));
        };
        let mut rb = m
            .http
            .request(parts.method.clone(), m.url(&addr, &path_q))
            .timeout(Duration::from_secs(120))
            .body(body.clone());
        for (k, v) in parts.headers.iter() {
            if k != axum::http::header::HOST && k != axum::http::header::CONTENT_LENGTH {
                rb = rb.header(k, v);
            }
        }
        // Member to member: the key gives the request room on a leader whose client
        // connections are all taken.
        rb = rb
            .header(HOPS_HEADER, (hops + 1).to_string())
            .header(CLUSTER_KEY_HEADER, &m.cfg.cluster_key);
        match rb.send().await {
            Ok(resp) if resp.status() != StatusCode::SERVICE_UNAVAILABLE => {
                relay(resp, leader_id).await.map_err(Hop::Final)
            }
            Ok(_) => Err(Hop::Again("leader busy")),
            Err(e) if e.is_connect() => Err(Hop::Again("leader unreachable")),
            Err(e) => Err(Hop::Final(err(
                StatusCode::BAD_GATEWAY,
                format!("forwarding to leader {leader_id}: {e}"),
            ))),
        }
    };
    attempt
        .retry(backoff().with_total_delay(Some(FORWARD_PATIENCE)))
        .when(|e| matches!(e, Hop::Again(_)))
        .notify(|e, after| {
            if let Hop::Again(why) = e {
                tracing::debug!(why, ?after, "forwarding again");
            }
        })
        .await
        .map_err(|e| match e {
            Hop::Final(e) => e,
            Hop::Again(why) => err(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no leader reachable ({why}); retry"),
            ),
        })
}

/// How long a follower keeps trying to reach a leader for a caller.
const FORWARD_PATIENCE: Duration = Duration::from_secs(10);

/// One try at forwarding: worth another, or the answer.
enum Hop {
    Again(&'static str),
    Final(ApiErr),
}

/// The leader's answer, as this member's; 502 if its body cannot be read whole (an empty
/// body would look like a real answer).
pub(super) async fn relay(
    resp: reqwest::Response,
    leader: crate::NodeId,
) -> Result<Response, ApiErr> {
    let status = resp.status();
    let ctype = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .cloned();
    let bytes = resp.bytes().await.map_err(|e| {
        err(
            StatusCode::BAD_GATEWAY,
            format!("reading the answer of leader {leader} (it may have applied the request): {e}"),
        )
    })?;
    let mut out = Response::new(Body::from(bytes));
    *out.status_mut() = status;
    if let Some(ct) = ctype {
        out.headers_mut()
            .insert(axum::http::header::CONTENT_TYPE, ct);
    }
    Ok(out)
}
