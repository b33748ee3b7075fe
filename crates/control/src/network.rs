//! Raft RPC between members: postcard over HTTP POST to `/raft/*` on the peer's API port,
//! authenticated by the cluster key in the [`CLUSTER_KEY_HEADER`] header and tagged with
//! the protocol version in [`PROTOCOL_HEADER`]; a member refuses a version it does not
//! speak rather than misreading it.
//!
//! Every member holds the same cluster key (`--cluster-key` / `STARLING_CLUSTER_KEY`); a
//! process without it cannot vote, append, install a snapshot or join. The key travels in
//! clear over HTTP, which is acceptable on loopback and inside a private network; mutual
//! TLS for this hop is left to the QUIC/TLS work of the distribution issue.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use openraft::errors::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotOf, VoteOf};
use openraft::{BasicNode, OptionalSend};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{NodeId, TypeConfig};

pub const CLUSTER_KEY_HEADER: &str = "x-starling-cluster-key";

/// Do `headers` carry the cluster key `key`? (Compared in constant time.)
pub fn carries_cluster_key(headers: &axum::http::HeaderMap, key: &str) -> bool {
    use subtle::ConstantTimeEq;
    headers
        .get(CLUSTER_KEY_HEADER)
        .is_some_and(|v| bool::from(v.as_bytes().ct_eq(key.as_bytes())))
}
/// Names the encoding of a Raft RPC body; see [`RAFT_PROTOCOL`].
pub const PROTOCOL_HEADER: &str = "x-starling-raft-protocol";
/// Version 1: request and answer bodies are postcard; the answer is
/// `Result<Response, Error>` of openraft's types.
pub const RAFT_PROTOCOL: &str = "1";

/// Encode a Raft RPC body.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(v)
}

/// Decode a Raft RPC body; bad input is an error, never a panic.
pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(b)
}
/// Largest encoded `(vote, snapshot meta)` accepted in front of a snapshot's bytes.
pub const MAX_SNAPSHOT_META: usize = 1024 * 1024;

/// The body of `POST /raft/snapshot`: a 4-byte big-endian length, that many bytes of
/// encoded `(vote, snapshot meta)`, then the snapshot's raw bytes (no re-encoding).
pub fn encode_snapshot_body(meta_json: &[u8], data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(4 + meta_json.len() + data.len());
    body.extend_from_slice(&(meta_json.len() as u32).to_be_bytes());
    body.extend_from_slice(meta_json);
    body.extend_from_slice(data);
    body
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotBodyError {
    #[error("snapshot body shorter than its length prefix")]
    Short,
    #[error("snapshot meta length {0} is out of bounds")]
    MetaLength(usize),
}

/// Split a snapshot body into its meta JSON and data, or say what is wrong with it.
pub fn decode_snapshot_body(body: &[u8]) -> Result<(&[u8], &[u8]), SnapshotBodyError> {
    let (len, rest) = body
        .split_first_chunk::<4>()
        .ok_or(SnapshotBodyError::Short)?;
    let len = u32::from_be_bytes(*len) as usize;
    if len > MAX_SNAPSHOT_META || len > rest.len() {
        return Err(SnapshotBodyError::MetaLength(len));
    }
    Ok(rest.split_at(len))
}

/// Makes one [`PeerClient`] per peer; they share one connection pool.
#[derive(Clone)]
pub struct PeerNetwork {
    http: reqwest::Client,
    cluster_key: String,
    scheme: &'static str,
}

impl PeerNetwork {
    /// Raft RPC over `http`, or over `https` to members whose CA `trust` names.
    pub fn new(
        cluster_key: String,
        tls: bool,
        trust: Arc<starling_pki::CaTrust>,
    ) -> Result<Self, starling_client::ClientError> {
        let http = starling_client::http_builder(Some(trust))?
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(16)
            .build()
            .map_err(starling_client::ClientError::Setup)?;
        let scheme = if tls { "https" } else { "http" };
        Ok(PeerNetwork {
            http,
            cluster_key,
            scheme,
        })
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            base: format!("{}://{}", self.scheme, node.addr),
            http: self.http.clone(),
            cluster_key: self.cluster_key.clone(),
        }
    }
}

/// Raft RPC client for one peer.
pub struct PeerClient {
    target: NodeId,
    base: String,
    http: reqwest::Client,
    cluster_key: String,
}

impl PeerClient {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Result<Resp, E>, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: DeserializeOwned,
    {
        let url = format!("{}/raft/{path}", self.base);
        let body = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let rb = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        self.send(rb, &url, timeout).await
    }

    async fn send<Resp, E>(
        &self,
        rb: reqwest::RequestBuilder,
        url: &str,
        timeout: Duration,
    ) -> Result<Result<Resp, E>, RPCError<TypeConfig>>
    where
        Resp: DeserializeOwned,
        E: DeserializeOwned,
    {
        let resp = rb
            .header(CLUSTER_KEY_HEADER, &self.cluster_key)
            .header(PROTOCOL_HEADER, RAFT_PROTOCOL)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(RPCError::Network(NetworkError::from_string(format!(
                "member {} answered HTTP {status} on {url}: {}",
                self.target,
                body.chars().take(300).collect::<String>()
            ))));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        decode::<Result<Resp, E>>(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

fn net(e: io::Error) -> StreamingError<TypeConfig> {
    StreamingError::from(RPCError::Network(NetworkError::new(&e)))
}

fn remote<E: std::error::Error + 'static>(e: E) -> RPCError<TypeConfig> {
    // The peer answered but refused (e.g. it is shutting down): treat it as unreachable
    // for now so that openraft backs off and retries.
    RPCError::Unreachable(Unreachable::new(&e))
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = crate::image::StateImage;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call::<_, _, RaftError<TypeConfig>>("append", &rpc, option.hard_ttl())
            .await?
            .map_err(remote)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call::<_, _, RaftError<TypeConfig>>("vote", &rpc, option.hard_ttl())
            .await?
            .map_err(remote)
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, crate::image::StateImage>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let url = format!("{}/raft/snapshot", self.base);
        let meta = encode(&(vote, snapshot.meta)).map_err(|e| net(io::Error::other(e)))?;
        // Made now, off the state machine's task: the state file as the snapshot saw it.
        let image = snapshot.snapshot;
        let data = tokio::task::spawn_blocking(move || image.into_bytes())
            .await
            .map_err(|e| net(io::Error::other(e)))?
            .map_err(net)?;
        let rb = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(encode_snapshot_body(&meta, &data));
        tokio::pin!(cancel);
        // A snapshot can be large; give it far longer than a heartbeat-sized RPC.
        let call = self.send::<SnapshotResponse<TypeConfig>, openraft::errors::Fatal<TypeConfig>>(
            rb,
            &url,
            Duration::from_secs(300),
        );
        tokio::select! {
            closed = &mut cancel => Err(StreamingError::Closed(closed)),
            res = call => {
                let inner = res.map_err(|e| {
                    tracing::warn!(target_member = self.target, error = %e, "sending a snapshot failed");
                    StreamingError::from(e)
                })?;
                inner.map_err(|e| StreamingError::from(remote(e)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_body_round_trip_and_bounds() {
        let body = encode_snapshot_body(b"{\"m\":1}", b"DATA");
        assert_eq!(
            decode_snapshot_body(&body),
            Ok((&b"{\"m\":1}"[..], &b"DATA"[..]))
        );
        assert!(decode_snapshot_body(b"ab").is_err());
        assert!(decode_snapshot_body(b"[1,2,3]").is_err());
        let mut lying = encode_snapshot_body(b"xx", b"");
        lying[3] = 200;
        assert!(decode_snapshot_body(&lying).is_err());
    }
}
