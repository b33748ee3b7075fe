//! Membership, status and Prometheus metrics.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::ChangeMembers;
use starling_proto::{ClusterStatus, Member as MemberInfo};

use super::{err, ApiErr, Shared};
use crate::member::Member;
use crate::metrics::RaftFigures;

pub(super) fn cluster_status(m: &Member) -> ClusterStatus {
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
        cluster_ca: m
            .read()
            .cluster_ca()
            .and_then(|ca| starling_pki::fingerprint(&ca.cert_pem).ok()),
    }
}

/// 200 while this member can serve; 503 with the reason once its storage failed (it is
/// about to stop).
pub(super) async fn healthz(State(m): Shared) -> Response {
    match m.broken() {
        None => "ok\n".into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}\n"),
        )
            .into_response(),
    }
}

pub(super) async fn cluster(State(m): Shared) -> Json<ClusterStatus> {
    Json(cluster_status(&m))
}

pub(super) async fn remove_member(
    State(m): Shared,
    Path(id): Path<u64>,
) -> Result<Response, ApiErr> {
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

pub(super) async fn metrics(State(m): Shared) -> Result<Response, ApiErr> {
    let c = cluster_status(&m);
    let figures = RaftFigures {
        term: c.term,
        is_leader: c.leader == Some(c.id),
        last_applied: c.last_applied.unwrap_or(0),
        members: c.members.len(),
    };
    let text = m
        .metrics
        .render(figures, &m.read())
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, format!("metrics: {e}")))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
