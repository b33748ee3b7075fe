//! Raft RPC between members, joining, forced snapshots: all behind the cluster key.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use starling_proto::JoinRequest;

use super::hooks::header;
use super::{err, ApiErr, Shared};
use crate::network::{decode, encode, PROTOCOL_HEADER, RAFT_PROTOCOL};
use crate::TypeConfig;

/// Check the protocol version (the cluster key was checked before the body was read),
/// then decode the body.
fn raft_request<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiErr> {
    speaks_raft_protocol(headers)?;
    decode(body).map_err(|e| err(StatusCode::BAD_REQUEST, format!("malformed Raft RPC: {e}")))
}

fn speaks_raft_protocol(headers: &HeaderMap) -> Result<(), ApiErr> {
    match header(headers, PROTOCOL_HEADER) {
        Some(RAFT_PROTOCOL) => Ok(()),
        other => Err(err(
            StatusCode::BAD_REQUEST,
            format!("Raft protocol {other:?} is not spoken here (want {RAFT_PROTOCOL})"),
        )),
    }
}

fn raft_answer<T: serde::Serialize>(v: &T) -> Result<Response, ApiErr> {
    let bytes = encode(v).map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        bytes,
    )
        .into_response())
}

pub(super) async fn raft_append(
    State(m): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiErr> {
    let req: AppendEntriesRequest<TypeConfig> = raft_request(&headers, &body)?;
    raft_answer(&m.raft.append_entries(req).await)
}

pub(super) async fn raft_vote(
    State(m): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiErr> {
    let req: VoteRequest<TypeConfig> = raft_request(&headers, &body)?;
    raft_answer(&m.raft.vote(req).await)
}

/// The body carries the state image behind its encoded meta (see
/// [`crate::network::snapshot_body_head`]). The image goes to a file in the data
/// directory as it arrives, at most [`starling_proto::routes::MAX_SNAPSHOT_BODY`] bytes,
/// and is installed from there.
pub(super) async fn raft_snapshot(
    State(m): Shared,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiErr> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    // Before a byte of a body that may be gigabytes long.
    speaks_raft_protocol(&headers)?;
    static RECEIVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = RECEIVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = m.cfg.data_dir.join(format!("snapshot-incoming-{n}"));
    let io_err = |e: std::io::Error| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let mut file = tokio::fs::File::create(&path).await.map_err(io_err)?;
    let _remove = RemoveOnDrop(path.clone());
    let mut head = Vec::new();
    let mut head_len = None;
    let mut size: u64 = 0;
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?;
        size += chunk.len() as u64;
        if size > starling_proto::routes::MAX_SNAPSHOT_BODY as u64 {
            return Err(err(
                StatusCode::PAYLOAD_TOO_LARGE,
                "snapshot over the limit",
            ));
        }
        let mut data = &chunk[..];
        while head_len.is_none_or(|n| head.len() < n) && !data.is_empty() {
            let want = head_len.map_or(4, |n| n) - head.len();
            let take = want.min(data.len());
            head.extend_from_slice(&data[..take]);
            data = &data[take..];
            head_len = crate::network::snapshot_head_len(&head)
                .map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?;
        }
        file.write_all(data).await.map_err(io_err)?;
    }
    file.flush().await.map_err(io_err)?;
    let meta_bytes = match head_len {
        Some(n) if head.len() == n => &head[4..],
        _ => {
            return Err(err(
                StatusCode::BAD_REQUEST,
                "snapshot body cut inside its head",
            ))
        }
    };
    let (vote, meta): (VoteOf<TypeConfig>, SnapshotMetaOf<TypeConfig>) =
        raft_request(&headers, meta_bytes)?;
    let snapshot = SnapshotOf::<TypeConfig, crate::image::StateImage> {
        meta,
        snapshot: crate::image::StateImage::File(path),
    };
    raft_answer(&m.raft.install_full_snapshot(vote, snapshot).await)
}

/// Deletes a received image however its request ends.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(super) async fn join(
    State(m): Shared,
    Json(req): Json<JoinRequest>,
) -> Result<Response, ApiErr> {
    m.admit(req)
        .await
        .map_err(|e| err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(StatusCode::OK.into_response())
}

/// The cluster CA with its key, to another member (the access layer checked the cluster
/// key); 503 until the first leader made it.
pub(super) async fn cluster_ca(State(m): Shared) -> Result<Response, ApiErr> {
    let ca = m.read().cluster_ca().cloned().ok_or_else(|| {
        err(
            StatusCode::SERVICE_UNAVAILABLE,
            "the cluster has no CA yet; try again",
        )
    })?;
    Ok(Json(ca).into_response())
}

/// Build a snapshot now and purge the log behind it (operators and tests).
pub(super) async fn force_snapshot(State(m): Shared) -> Result<Response, ApiErr> {
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
