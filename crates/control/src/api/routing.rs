//! Forwarding of writes and linearizable reads from a follower to the leader.

use super::*;

/// Requests answered by whichever member receives them.
pub(super) fn served_locally(req: &Request) -> bool {
    let path = req.uri().path();
    // Each member keeps its own copy of the origin store and of build logs: those calls
    // are answered by the member they reach.
    let local_path = path.starts_with("/raft/")
        || path.starts_with("/v1/events")
        || path.starts_with("/v1/chunks/")
        || path.starts_with("/v1/manifests/")
        || (path.starts_with("/v1/builds/") && path.ends_with("/logs"))
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

pub(super) async fn route_to_leader(State(m): Shared, req: Request, next: Next) -> Response {
    if served_locally(&req) || m.raft.is_leader() {
        return next.run(req).await;
    }
    forward(&m, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Relay `req` to the leader, retrying for a while if there is none or it changes.
pub(super) async fn forward(m: &Member, req: Request) -> Result<Response, ApiErr> {
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
            // Member to member: the key gives the request room on a leader whose client
            // connections are all taken.
            rb = rb
                .header(HOPS_HEADER, (hops + 1).to_string())
                .header(CLUSTER_KEY_HEADER, &m.cfg.cluster_key);
            match rb.send().await {
                Ok(resp) if resp.status() != StatusCode::SERVICE_UNAVAILABLE => {
                    return relay(resp, leader_id).await;
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
