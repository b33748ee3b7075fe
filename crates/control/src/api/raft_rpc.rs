//! Raft RPC between members, joining, forced snapshots: all behind the cluster key.

use super::*;

pub(super) async fn raft_append(
    State(m): Shared,
    headers: HeaderMap,
    Json(req): Json<AppendEntriesRequest<TypeConfig>>,
) -> Result<Response, ApiErr> {
    require_cluster_key(&m, &headers)?;
    Ok(Json(m.raft.append_entries(req).await).into_response())
}

pub(super) async fn raft_vote(
    State(m): Shared,
    headers: HeaderMap,
    Json(req): Json<VoteRequest<TypeConfig>>,
) -> Result<Response, ApiErr> {
    require_cluster_key(&m, &headers)?;
    Ok(Json(m.raft.vote(req).await).into_response())
}

/// The body carries the snapshot's raw bytes behind its JSON meta; see
/// [`decode_snapshot_body`].
pub(super) async fn raft_snapshot(
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

pub(super) async fn join(
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
pub(super) async fn force_snapshot(
    State(m): Shared,
    headers: HeaderMap,
) -> Result<Response, ApiErr> {
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
