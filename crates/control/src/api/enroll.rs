//! Enrolment: an operator makes a join token (`POST /v1/join-tokens`, API token); a new
//! node shows it (`POST /v1/enroll`) and gets a certificate from the cluster CA for its
//! name. The token's secret is kept only as a SHA-256 and compared in constant time; a
//! token is good until it expires, for as many nodes as the operator hands it to (one
//! token per fleet rollout, as with kubeadm).
//!
//! The node's key is made here and sent back in the answer, so the answer must travel
//! over TLS in production (`--tls`, to come with the distribution issue); on plain HTTP
//! enrolment is for loopback demos and tests.

use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use sha2::{Digest, Sha256};
use starling_proto::join_token::JoinToken;
use starling_proto::{
    Command, EnrollReply, EnrollRequest, JoinTokenRecord, JoinTokenReply, JoinTokenRequest, Outcome,
};
use subtle::ConstantTimeEq;

use super::{err, linearize, request_id, unexpected, ApiErr, ReadOpts, Shared};
use crate::member::now_ms;

const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

pub(super) async fn create_join_token(
    State(m): Shared,
    headers: HeaderMap,
    Json(req): Json<JoinTokenRequest>,
) -> Result<Response, ApiErr> {
    let ttl = req
        .ttl_ms
        .map_or(DEFAULT_TTL, Duration::from_millis)
        .clamp(Duration::from_secs(1), MAX_TTL);
    let ca_cert = m.cluster_ca().map(|c| c.cert_pem).ok_or_else(|| {
        err(
            StatusCode::SERVICE_UNAVAILABLE,
            "the cluster CA is not made yet; retry",
        )
    })?;
    let fingerprint = starling_pki::fingerprint(&ca_cert)
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let token = JoinToken {
        id: random_hex(4),
        secret: random_hex(16),
        ca_fingerprint: fingerprint,
    };
    let at = now_ms();
    let expires_at = at + ttl.as_millis() as u64;
    let record = JoinTokenRecord {
        id: token.id.clone(),
        secret_sha256: hex::encode(Sha256::digest(token.secret.as_bytes())),
        expires_at,
    };
    let cmd = Command::AddJoinToken { token: record, at };
    match m.propose_once(cmd, request_id(&headers)?).await? {
        Outcome::Done => Ok((
            StatusCode::CREATED,
            Json(JoinTokenReply {
                token: token.to_string(),
                expires_at,
            }),
        )
            .into_response()),
        Outcome::Rejected(r) => Err(r.into()),
        other => Err(unexpected(other)),
    }
}

pub(super) async fn enroll(
    State(m): Shared,
    Json(req): Json<EnrollRequest>,
) -> Result<Response, ApiErr> {
    let refused = || err(StatusCode::UNAUTHORIZED, "invalid or expired join token");
    let token = JoinToken::parse(&req.token).ok_or_else(refused)?;
    starling_pki::check_name(&req.name).map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?;
    if req.region.is_empty() || req.region.len() > 64 {
        return Err(err(StatusCode::BAD_REQUEST, "region must be 1..64 bytes"));
    }
    // A token made a moment ago on the leader must be found.
    linearize(&m, &ReadOpts::default()).await?;
    let record = m.read().join_token(&token.id).cloned();
    let (record, ca) = record.zip(m.cluster_ca()).ok_or_else(refused)?;
    let shown = hex::encode(Sha256::digest(token.secret.as_bytes()));
    let matches = bool::from(shown.as_bytes().ct_eq(record.secret_sha256.as_bytes()));
    let ours = starling_pki::fingerprint(&ca.cert_pem).is_ok_and(|f| f == token.ca_fingerprint);
    if !matches || !ours || record.expires_at <= now_ms() {
        return Err(refused());
    }
    let name = req.name.clone();
    let issued =
        tokio::task::spawn_blocking(move || ca.issue(&name, SystemTime::now()).map(|id| (id, ca)))
            .await
            .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let (identity, ca) = issued;
    tracing::info!(node = %req.name, region = %req.region, token = %token.id, "node enrolled");
    Ok(Json(EnrollReply {
        cert_pem: identity.cert_pem,
        key_pem: identity.key_pem,
        ca_cert_pem: ca.cert_pem,
    })
    .into_response())
}
