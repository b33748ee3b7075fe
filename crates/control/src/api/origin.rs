//! The origin store on this member: chunks and manifests, put by build workers, fetched by
//! nodes when no peer has them. Every put is checked against its name — a chunk must hash
//! to it, a manifest must decode and hash to its id — before anything is written.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use starling_proto::release::Manifest;
use starling_proto::{ChunkHash, MissingChunks, ReleaseId, MAX_MISSING_QUERY};
use starling_release::ReleaseError;

use super::{err, ApiErr, Shared};

fn store_err(e: ReleaseError) -> ApiErr {
    match e {
        ReleaseError::Store(m) => err(StatusCode::BAD_REQUEST, m),
        ReleaseError::NotFound(_) => {
            err(StatusCode::NOT_FOUND, "not in this member's origin store")
        }
        ReleaseError::Full(m) => err(StatusCode::INSUFFICIENT_STORAGE, m),
        other => err(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

/// Run blocking store work off the runtime thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReleaseError> + Send + 'static,
) -> Result<T, ApiErr> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(store_err)
}

#[tracing::instrument(skip_all, fields(chunk = %hash, bytes = body.len()))]
pub(super) async fn put_chunk(
    State(m): Shared,
    Path(hash): Path<ChunkHash>,
    body: Bytes,
) -> Result<Response, ApiErr> {
    let actual = ChunkHash::of(&body);
    if actual != hash {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!("chunk bytes hash to {actual}, not {hash}"),
        ));
    }
    let store = m.origin.clone();
    let quota = m.cfg.origin_quota;
    let len = body.len();
    let created = blocking(move || {
        if store.has_chunk(&hash)? {
            return Ok(false);
        }
        if let (Some(quota), Some(used)) = (quota, store.used_bytes()) {
            if used + body.len() as u64 > quota {
                return Err(ReleaseError::Full(format!(
                    "this member's origin store holds {used} bytes of its quota of {quota}"
                )));
            }
        }
        store.put_chunk(&hash, &body).map(|_| true)
    })
    .await?;
    if created {
        m.metrics.chunk_stored(len);
    }
    Ok(if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
    .into_response())
}

/// The chunks of `chunks` this member does not hold, in the order asked.
pub(super) async fn missing_chunks(
    State(m): Shared,
    Json(q): Json<MissingChunks>,
) -> Result<Json<MissingChunks>, ApiErr> {
    if q.chunks.len() > MAX_MISSING_QUERY {
        return Err(err(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {MAX_MISSING_QUERY} chunks per question"),
        ));
    }
    let store = m.origin.clone();
    let (held, missing) = blocking(move || {
        let (mut held, mut missing) = (Vec::new(), Vec::new());
        for c in q.chunks {
            if store.has_chunk(&c)? {
                held.push(c);
            } else {
                missing.push(c);
            }
        }
        Ok((held, missing))
    })
    .await?;
    // The worker will not send these: they must outlive its publication.
    m.chunks_confirmed(&held);
    Ok(Json(MissingChunks { chunks: missing }))
}

pub(super) async fn get_chunk(
    State(m): Shared,
    Path(hash): Path<ChunkHash>,
) -> Result<Response, ApiErr> {
    let store = m.origin.clone();
    blocking(move || store.get_chunk(&hash)).await.map(octets)
}

fn octets(bytes: Vec<u8>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        bytes,
    )
        .into_response()
}

#[tracing::instrument(skip_all, fields(release = %id))]
pub(super) async fn put_manifest(
    State(m): Shared,
    Path(id): Path<ReleaseId>,
    body: Bytes,
) -> Result<Response, ApiErr> {
    let manifest =
        Manifest::decode(&body).map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?;
    let (actual, encoded) = manifest.encode_with_id().map_err(|e| store_err(e.into()))?;
    if actual != id {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!("manifest hashes to {actual}, not {id}"),
        ));
    }
    // Its release is recorded only when the build completes; until then (and while it is
    // young) its chunks are spared by the collector.
    let named: Vec<ChunkHash> = manifest.chunks.iter().map(|c| c.hash).collect();
    m.chunks_confirmed(&named);
    let store = m.origin.clone();
    // A manifest is accepted only once every chunk it lists is here, so that a release id
    // this member knows is always complete.
    blocking(move || {
        for c in &manifest.chunks {
            if !store.has_chunk(&c.hash)? {
                return Err(ReleaseError::Store(format!("chunk {} is missing", c.hash)));
            }
        }
        store.put_manifest(&id, &encoded)
    })
    .await?;
    Ok(StatusCode::CREATED.into_response())
}

pub(super) async fn get_manifest(
    State(m): Shared,
    Path(id): Path<ReleaseId>,
) -> Result<Response, ApiErr> {
    let store = m.origin.clone();
    blocking(move || store.get_manifest(&id)).await.map(octets)
}
