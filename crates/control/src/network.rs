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
/// encoded `(vote, snapshot meta)`, then the state image ([`crate::image`]), streamed.
/// This is its head.
pub fn snapshot_body_head(meta: &[u8]) -> Vec<u8> {
    let mut head = Vec::with_capacity(4 + meta.len());
    head.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    head.extend_from_slice(meta);
    head
}

/// A `Write` that hands what it is given to an HTTP body stream, from a blocking thread.
struct BodyWriter(tokio::sync::mpsc::Sender<io::Result<Vec<u8>>>);

impl io::Write for BodyWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Ok(buf.to_vec()))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the snapshot request ended"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The body of a snapshot request: `head`, then the image, made on a blocking thread as
/// the request takes it (about 1 MiB at a time, at most 8 MiB ahead).
fn snapshot_body(head: Vec<u8>, image: crate::image::StateImage) -> reqwest::Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Vec<u8>>>(8);
    tokio::task::spawn_blocking(move || {
        if tx.blocking_send(Ok(head)).is_err() {
            return;
        }
        let mut out = io::BufWriter::with_capacity(1 << 20, BodyWriter(tx.clone()));
        let made = match image {
            crate::image::StateImage::Txn(txn) => crate::image::write(&txn, &mut out),
            crate::image::StateImage::File(path) => std::fs::File::open(path)
                .and_then(|mut f| io::copy(&mut f, &mut out))
                .and_then(|_| io::Write::flush(&mut out)),
        };
        if let Err(e) = made {
            tracing::warn!(error = %e, "making the state image failed");
            let _ = tx.blocking_send(Err(e));
        }
    });
    reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotBodyError {
    #[error("snapshot body shorter than its length prefix")]
    Short,
    #[error("snapshot meta length {0} is out of bounds")]
    MetaLength(usize),
}

/// How long the head of a snapshot body starting with `start` is, once `start` holds its
/// length prefix; what is wrong with it.
pub fn snapshot_head_len(start: &[u8]) -> Result<Option<usize>, SnapshotBodyError> {
    let Some(len) = start.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*len) as usize;
    if len > MAX_SNAPSHOT_META {
        return Err(SnapshotBodyError::MetaLength(len));
    }
    Ok(Some(4 + len))
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
        let body = snapshot_body(snapshot_body_head(&meta), snapshot.snapshot);
        let rb = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
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
    fn snapshot_heads_are_bounded() {
        let head = snapshot_body_head(b"{\"m\":1}");
        assert_eq!(snapshot_head_len(&head), Ok(Some(head.len())));
        assert_eq!(snapshot_head_len(b"ab"), Ok(None));
        let mut lying = snapshot_body_head(b"xx");
        lying[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(snapshot_head_len(&lying).is_err());
    }
}
