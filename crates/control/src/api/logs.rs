//! Build logs: workers append output while a build runs, to every member; any member
//! answers reads. Logs are kept beside the Raft state, not in it (they are bulky and only
//! appended), in `<data-dir>/logs/<build>.log`, capped as [`starling_core::build_log`] decides.

use std::io::Write;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use starling_core::build_log::{plan_append, LogAppend, CAP_NOTE};

use super::{err, ApiErr, Shared};
use crate::member::Member;

fn log_path(m: &Member, build: u64) -> std::path::PathBuf {
    m.cfg.data_dir.join("logs").join(format!("{build}.log"))
}

#[derive(Deserialize)]
pub(super) struct Offset {
    #[serde(default)]
    offset: u64,
}

/// `PUT /v1/builds/{id}/logs?offset=N`: append bytes that start at `offset` of the
/// worker's output. Idempotent: bytes already held are skipped, a gap is refused (409 with
/// the length held), so retries and several members stay consistent.
pub(super) async fn append_log(
    State(m): Shared,
    Path(id): Path<u64>,
    Query(q): Query<Offset>,
    body: Bytes,
) -> Result<Response, ApiErr> {
    if m.read().build(id).is_none() {
        return Err(err(StatusCode::NOT_FOUND, format!("unknown build {id}")));
    }
    let path = log_path(&m, id);
    let res = tokio::task::spawn_blocking(move || -> std::io::Result<LogAppend> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let held = match std::fs::metadata(&path) {
            Ok(md) => md.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let plan = plan_append(held, q.offset, body.len());
        if let LogAppend::Write {
            skip,
            take,
            cap_note,
            ..
        } = plan
        {
            if take > 0 || cap_note {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?;
                f.write_all(&body[skip..skip + take])?;
                if cap_note {
                    f.write_all(CAP_NOTE)?;
                }
            }
        }
        Ok(plan)
    })
    .await
    .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match res {
        LogAppend::Write { length, .. } => {
            Ok(Json(serde_json::json!({ "length": length })).into_response())
        }
        LogAppend::Gap { held } => Err(err(
            StatusCode::CONFLICT,
            format!("log of build {id} holds {held} bytes; append from there"),
        )),
    }
}

/// `GET /v1/builds/{id}/logs?offset=N`: the log from byte `offset` on.
pub(super) async fn read_log(
    State(m): Shared,
    Path(id): Path<u64>,
    Query(q): Query<Offset>,
) -> Result<Response, ApiErr> {
    if !m.build_exists(id) {
        return Err(err(StatusCode::NOT_FOUND, format!("unknown build {id}")));
    }
    let path = log_path(&m, id);
    let read = tokio::task::spawn_blocking(move || match std::fs::read(&path) {
        Ok(b) => Ok(b),
        // No file yet means no output yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("reading the log of build {id}: {e}")),
    })
    .await
    .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let bytes = read.map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let from = (q.offset as usize).min(bytes.len());
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        bytes[from..].to_vec(),
    )
        .into_response())
}
