//! Membership, status and Prometheus metrics.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::ChangeMembers;
use starling_proto::{BuildStatus, ClusterStatus, Member as MemberInfo};

use super::{err, ApiErr, Shared};
use crate::member::Member;

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

pub(super) async fn metrics(State(m): Shared) -> Response {
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
