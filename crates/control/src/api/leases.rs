//! The build-worker lease API: lease, heartbeat, complete.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use starling_proto::{
    Command, CompleteRequest, HeartbeatReply, HeartbeatRequest, Lease, LeaseRequest, Outcome,
    WorkerId,
};

use super::{request_id, unexpected, ApiErr, Shared, MAX_WAIT};
use crate::member::now_ms;

#[tracing::instrument(skip_all, fields(worker = %req.worker))]
pub(super) async fn lease(
    State(m): Shared,
    headers: HeaderMap,
    Json(req): Json<LeaseRequest>,
) -> Result<Response, ApiErr> {
    WorkerId::new(req.worker.as_str())?;
    let wait = Duration::from_millis(req.wait_ms).min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let ttl_ms = m.cfg.lease_ttl.as_millis() as u64;
    let mut events = m.events.clone();
    // Each proposal of this request gets its own id, numbered the same way on a retry: a
    // retried lease request finds the lease its first try was granted.
    let request = request_id(&headers)?;
    let mut tries = 0u32;
    let _waiting = m.metrics.lease_waiting();
    loop {
        events.borrow_and_update();
        if m.read().queued_len() > 0 {
            let cmd = Command::LeaseBuild {
                worker: req.worker.clone(),
                ttl_ms,
                at: now_ms(),
            };
            let once = request.as_ref().map(|r| format!("{r}/{tries}"));
            tries += 1;
            if let Outcome::Leased(b) = m.propose_once(cmd, once).await? {
                let repo = m.read().repo(&b.repo).map(|r| r.repo.clone());
                let lease = Lease {
                    url: repo.as_ref().map(|r| r.url.clone()).unwrap_or_default(),
                    max_release_bytes: repo
                        .map_or(starling_proto::DEFAULT_MAX_RELEASE_BYTES, |r| {
                            r.max_release_bytes
                        }),
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
pub(super) async fn heartbeat(
    State(m): Shared,
    Path(id): Path<u64>,
    Json(req): Json<HeartbeatRequest>,
) -> Result<Response, ApiErr> {
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
pub(super) async fn complete(
    State(m): Shared,
    Path(id): Path<u64>,
    Json(req): Json<CompleteRequest>,
) -> Result<Response, ApiErr> {
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
