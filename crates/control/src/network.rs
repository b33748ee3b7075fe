//! Raft RPC between members: JSON over HTTP POST to `/raft/*` on the peer's API port,
//! authenticated by the cluster key in the [`CLUSTER_KEY_HEADER`] header.
//!
//! Every member holds the same cluster key (`--cluster-key` / `STARLING_CLUSTER_KEY`); a
//! process without it cannot vote, append, install a snapshot or join. The key travels in
//! clear over HTTP, which is acceptable on loopback and inside a private network; mutual
//! TLS for this hop is left to the QUIC/TLS work of the distribution issue.

use std::future::Future;
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

/// Makes one [`PeerClient`] per peer; they share one connection pool.
#[derive(Clone)]
pub struct PeerNetwork {
    http: reqwest::Client,
    cluster_key: String,
}

impl PeerNetwork {
    pub fn new(cluster_key: String) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(16)
            .build()
            .unwrap_or_default();
        PeerNetwork { http, cluster_key }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            base: format!("http://{}", node.addr),
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
        let resp = self
            .http
            .post(&url)
            .header(CLUSTER_KEY_HEADER, &self.cluster_key)
            .json(req)
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
            return Err(RPCError::Network(NetworkError::from_string(format!(
                "member {} answered HTTP {status} on {url}",
                self.target
            ))));
        }
        resp.json::<Result<Resp, E>>()
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

fn remote<E: std::error::Error + 'static>(e: E) -> RPCError<TypeConfig> {
    // The peer answered but refused (e.g. it is shutting down): treat it as unreachable
    // for now so that openraft backs off and retries.
    RPCError::Unreachable(Unreachable::new(&e))
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = Vec<u8>;

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
        snapshot: SnapshotOf<TypeConfig, Vec<u8>>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let req = (vote, snapshot.meta, snapshot.snapshot);
        tokio::pin!(cancel);
        // A snapshot can be large; give it far longer than a heartbeat-sized RPC.
        let call = self
            .call::<_, SnapshotResponse<TypeConfig>, openraft::errors::Fatal<TypeConfig>>(
                "snapshot",
                &req,
                Duration::from_secs(120),
            );
        tokio::select! {
            closed = &mut cancel => Err(StreamingError::Closed(closed)),
            res = call => {
                let inner = res.map_err(StreamingError::from)?;
                inner.map_err(|e| StreamingError::from(remote(e)))
            }
        }
    }
}
