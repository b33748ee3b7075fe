//! A typed HTTP client for the control plane's API: every process that talks to a member
//! (the CLI, workers, the demo) does it through here, with paths from the route table
//! (`starling_proto::routes`).
//!
//! It owns the request shapes, the bearer token and the mapping of error answers to
//! [`ClientError`]; it never retries a write by itself (a caller that retries must know the
//! write is idempotent, as webhook deliveries and heartbeats are).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use starling_pki::{https_client_config, CaTrust};
use starling_proto::routes::Endpoint;
use starling_proto::{
    ApiError, Build, BuildStatus, ClusterStatus, CompleteRequest, DeployRequest, Deployment,
    DeploymentView, EnrollReply, EnrollRequest, Event, GoalInfo, HeartbeatReply, HeartbeatRequest,
    JoinTokenReply, JoinTokenRequest, Lease, LeaseRequest, MissingChunks, NodeInfo, QueueOutcome,
    Release, Repo, RepoSpec, RollbackRequest, TriggerRequest, MAX_MISSING_QUERY,
};
use starling_proto::{ChunkHash, ReleaseId, WorkerId};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("no control member given")]
    NoMember,
    #[error("{status}: {message}")]
    Api { status: u16, message: String },
    #[error("setting up the HTTP client: {0}")]
    Setup(#[source] reqwest::Error),
    #[error("setting up TLS: {0}")]
    Tls(String),
    #[error("unexpected answer from {url}: {source}")]
    Decode {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

#[derive(Clone)]
pub struct ControlClient {
    /// The members this client may ask, and which of them it asks now: a member that
    /// cannot be connected to is passed over for the next one.
    bases: Arc<[String]>,
    current: Arc<AtomicUsize>,
    token: Option<String>,
    http: reqwest::Client,
}

/// How long a read answered 503 is asked again.
const READ_PATIENCE: Duration = Duration::from_secs(10);

/// Filter of [`ControlClient::builds`].
#[derive(Debug, Default, Clone, Serialize)]
pub struct BuildFilter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<BuildStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
}

/// An HTTP client builder for the control plane: `http://`, or `https://` to members
/// whose certificates come from the CA `trust` names (none: every `https://` server is
/// refused). Every Starling process builds its HTTP clients here: it is what gives
/// reqwest its TLS configuration and crypto provider (ring, as everywhere in Starling).
pub fn http_builder(trust: Option<Arc<CaTrust>>) -> Result<reqwest::ClientBuilder, ClientError> {
    let tls = https_client_config(trust.unwrap_or_default())
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    Ok(reqwest::Client::builder()
        .no_proxy()
        .tls_backend_preconfigured(tls))
}

/// An HTTP client builder for servers outside the cluster (notification URLs), trusting
/// this machine's root certificates.
pub fn public_http_builder() -> Result<reqwest::ClientBuilder, ClientError> {
    let tls =
        starling_pki::public_https_client_config().map_err(|e| ClientError::Tls(e.to_string()))?;
    Ok(reqwest::Client::builder()
        .no_proxy()
        .tls_backend_preconfigured(tls))
}

impl ControlClient {
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ClientError> {
        Self::with_trust(base, token, None)
    }

    /// A client that reaches `https://` members whose CA `trust` names. `base` may list
    /// several members, separated by commas: each request goes to the one that last
    /// answered, and to the next when it cannot be connected to (nothing was sent, so
    /// any request may go again).
    pub fn with_trust(
        base: &str,
        token: Option<String>,
        trust: Option<Arc<CaTrust>>,
    ) -> Result<Self, ClientError> {
        let http = http_builder(trust)?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(90))
            .build()
            .map_err(ClientError::Setup)?;
        let bases: Vec<String> = base
            .split(',')
            .map(|b| b.trim().trim_end_matches('/').to_string())
            .filter(|b| !b.is_empty())
            .collect();
        if bases.is_empty() {
            return Err(ClientError::NoMember);
        }
        Ok(ControlClient {
            bases: bases.into(),
            current: Arc::default(),
            token,
            http,
        })
    }

    /// The same client (token, connection pool) pointed at one other member only.
    pub fn with_base(&self, base: &str) -> ControlClient {
        ControlClient {
            bases: vec![base.trim_end_matches('/').to_string()].into(),
            current: Arc::default(),
            token: self.token.clone(),
            http: self.http.clone(),
        }
    }

    /// The same client pointed at the member whose address (`host:port`) the cluster
    /// lists, over this client's scheme.
    pub fn member(&self, addr: &str) -> ControlClient {
        let scheme = self.base().split("://").next().unwrap_or("http");
        self.with_base(&format!("{scheme}://{addr}"))
    }

    /// The member this client asks now.
    pub fn base(&self) -> &str {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    /// Send what `make` builds for a URL of `path` with the token, to the member that
    /// last answered or, when it cannot be connected to, the next; a non-2xx answer
    /// becomes [`ClientError::Api`] with the server's sentence. The URL it went to.
    async fn send_raw<F>(
        &self,
        path: &str,
        make: F,
    ) -> Result<(reqwest::Response, String), ClientError>
    where
        F: Fn(&str) -> reqwest::RequestBuilder,
    {
        let first = self.current.load(Ordering::Relaxed);
        let mut k = 0;
        let (resp, url) = loop {
            let i = (first + k) % self.bases.len();
            let url = format!("{}{path}", self.bases[i]);
            let rb = match &self.token {
                Some(t) => make(&url).bearer_auth(t),
                None => make(&url),
            };
            match rb.send().await {
                Ok(resp) => {
                    self.current.store(i, Ordering::Relaxed);
                    break (resp, url);
                }
                Err(source) if source.is_connect() && k + 1 < self.bases.len() => {
                    tracing::debug!(member = %self.bases[i], error = %source, "member unreachable; asking the next");
                    k += 1;
                }
                Err(source) => return Err(ClientError::Unreachable { url, source }),
            }
        };
        let status = resp.status();
        if status.is_success() {
            return Ok((resp, url));
        }
        let text = resp
            .text()
            .await
            .unwrap_or_else(|e| format!("(the answer's body could not be read: {e})"));
        let message = serde_json::from_str::<ApiError>(&text)
            .map(|e| e.error)
            .unwrap_or(text);
        Err(ClientError::Api {
            status: status.as_u16(),
            message,
        })
    }

    async fn send<T: DeserializeOwned, F>(&self, path: &str, make: F) -> Result<T, ClientError>
    where
        F: Fn(&str) -> reqwest::RequestBuilder,
    {
        let (resp, url) = self.send_raw(path, make).await?;
        resp.json()
            .await
            .map_err(|source| ClientError::Decode { url, source })
    }

    pub async fn get<T: DeserializeOwned, Q: Serialize + ?Sized>(
        &self,
        path: &str,
        query: &Q,
    ) -> Result<T, ClientError> {
        // A read answered 503 (no leader yet, a leader just elected) is asked again for a
        // while: it changes nothing, and elections take a second or two.
        let mut pause = Duration::from_millis(200);
        let mut waited = Duration::ZERO;
        loop {
            match self.send(path, |u| self.http.get(u).query(query)).await {
                Err(ClientError::Api { status: 503, .. }) if waited < READ_PATIENCE => {
                    tokio::time::sleep(pause).await;
                    waited += pause;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                answer => return answer,
            }
        }
    }

    pub async fn post<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(path, |u| self.http.post(u).json(body)).await
    }

    /// Ask for a build, waiting up to `wait` for one; `None` when nothing was queued.
    pub async fn lease(
        &self,
        worker: &WorkerId,
        wait: Duration,
    ) -> Result<Option<Lease>, ClientError> {
        let req = LeaseRequest {
            worker: worker.clone(),
            wait_ms: wait.as_millis() as u64,
        };
        let make = |u: &str| {
            self.http
                .post(u)
                .json(&req)
                .timeout(wait + Duration::from_secs(30))
        };
        let (resp, url) = self.send_raw(&Endpoint::Lease.path(&[]), make).await?;
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        resp.json()
            .await
            .map(Some)
            .map_err(|source| ClientError::Decode { url, source })
    }

    pub async fn heartbeat(
        &self,
        build: u64,
        req: &HeartbeatRequest,
    ) -> Result<HeartbeatReply, ClientError> {
        self.post(&Endpoint::Heartbeat.path(&[&build]), req).await
    }

    pub async fn complete(&self, build: u64, req: &CompleteRequest) -> Result<Build, ClientError> {
        self.post(&Endpoint::Complete.path(&[&build]), req).await
    }

    /// The build's log from byte `offset` on, as this member holds it.
    pub async fn log(&self, build: u64, offset: u64) -> Result<Vec<u8>, ClientError> {
        let path = Endpoint::ReadLog.path(&[&build]);
        let make = |u: &str| self.http.get(u).query(&[("offset", offset)]);
        let (resp, url) = self.send_raw(&path, make).await?;
        resp.bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|source| ClientError::Decode { url, source })
    }

    /// PUT `body` at `path`; `true` if the member did not have it (201).
    async fn put_new(&self, path: &str, body: Vec<u8>) -> Result<bool, ClientError> {
        let body = bytes::Bytes::from(body);
        let (resp, _) = self
            .send_raw(path, |u| self.http.put(u).body(body.clone()))
            .await?;
        Ok(resp.status() == reqwest::StatusCode::CREATED)
    }

    /// Store a chunk in this member's origin store; `true` if it was new there.
    pub async fn put_chunk(&self, hash: &ChunkHash, bytes: Vec<u8>) -> Result<bool, ClientError> {
        self.put_new(&Endpoint::PutChunk.path(&[hash]), bytes).await
    }

    /// Store an encoded manifest under its release id in this member's origin store.
    pub async fn put_manifest(
        &self,
        id: &ReleaseId,
        encoded: Vec<u8>,
    ) -> Result<bool, ClientError> {
        self.put_new(&Endpoint::PutManifest.path(&[id]), encoded)
            .await
    }

    /// Append build output that starts at byte `offset` to this member's copy of the log.
    pub async fn append_log(
        &self,
        build: u64,
        offset: u64,
        bytes: Vec<u8>,
    ) -> Result<(), ClientError> {
        let bytes = bytes::Bytes::from(bytes);
        let path = Endpoint::AppendLog.path(&[&build]);
        let make = |u: &str| {
            self.http
                .put(u)
                .query(&[("offset", offset)])
                .body(bytes.clone())
        };
        self.send_raw(&path, make).await.map(drop)
    }

    /// Which of `chunks` this member's origin store lacks, asked in batches the member
    /// accepts.
    pub async fn missing_chunks(
        &self,
        chunks: &[ChunkHash],
    ) -> Result<Vec<ChunkHash>, ClientError> {
        let mut missing = Vec::new();
        for batch in chunks.chunks(MAX_MISSING_QUERY) {
            let q = MissingChunks {
                chunks: batch.to_vec(),
            };
            let reply: MissingChunks = self.post(&Endpoint::MissingChunks.path(&[]), &q).await?;
            missing.extend(reply.chunks);
        }
        Ok(missing)
    }

    pub async fn put_repo(&self, spec: &RepoSpec) -> Result<Option<Repo>, ClientError> {
        self.post(&Endpoint::PutRepo.path(&[]), spec).await
    }

    pub async fn repos(&self) -> Result<Vec<Repo>, ClientError> {
        self.get(&Endpoint::ListRepos.path(&[]), &()).await
    }

    pub async fn trigger(&self, req: &TriggerRequest) -> Result<QueueOutcome, ClientError> {
        self.post(&Endpoint::Trigger.path(&[]), req).await
    }

    pub async fn builds(&self, filter: &BuildFilter) -> Result<Vec<Build>, ClientError> {
        self.get(&Endpoint::ListBuilds.path(&[]), filter).await
    }

    pub async fn build(&self, id: u64) -> Result<Build, ClientError> {
        self.get(&Endpoint::ShowBuild.path(&[&id]), &()).await
    }

    pub async fn cancel(&self, id: u64) -> Result<Build, ClientError> {
        self.post(&Endpoint::CancelBuild.path(&[&id]), &()).await
    }

    pub async fn releases(&self, repo: Option<&str>) -> Result<Vec<Release>, ClientError> {
        self.get(&Endpoint::ListReleases.path(&[]), &[("repo", repo)])
            .await
    }

    pub async fn cluster(&self) -> Result<ClusterStatus, ClientError> {
        self.get(&Endpoint::Cluster.path(&[]), &()).await
    }

    pub async fn remove_member(&self, id: u64) -> Result<ClusterStatus, ClientError> {
        self.send(&Endpoint::RemoveMember.path(&[&id]), |u| {
            self.http.delete(u)
        })
        .await
    }

    /// What each environment of `repo` (or of every repository) should run.
    pub async fn goals(&self, repo: Option<&str>) -> Result<Vec<GoalInfo>, ClientError> {
        self.get(&Endpoint::ListGoals.path(&[]), &[("repo", repo)])
            .await
    }

    /// Every goal, with what `node` of `region` runs; with `after`, once a goal changed
    /// after that time (ms) or `wait` passed (a long-poll).
    pub async fn node_goals(
        &self,
        node: &str,
        region: &str,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<Vec<GoalInfo>, ClientError> {
        let mut q = vec![("node", node.to_string()), ("region", region.to_string())];
        if let Some(after) = after {
            q.push(("after", after.to_string()));
            q.push(("timeout", format!("{}ms", wait.as_millis())));
        }
        self.get(&Endpoint::ListGoals.path(&[]), &q).await
    }

    /// Start deploying a release (`req.release`, or the repository's newest).
    pub async fn deploy(&self, req: &DeployRequest) -> Result<Deployment, ClientError> {
        self.post(&Endpoint::Deploy.path(&[]), req).await
    }

    /// Return an environment to a release it ran before, every node at once.
    pub async fn rollback(&self, req: &RollbackRequest) -> Result<Deployment, ClientError> {
        self.post(&Endpoint::Rollback.path(&[]), req).await
    }

    /// Deployments (of `repo`), newest first.
    pub async fn deployments(
        &self,
        repo: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Deployment>, ClientError> {
        let limit = limit.to_string();
        let q = [("repo", repo), ("limit", Some(limit.as_str()))];
        self.get(&Endpoint::ListDeploys.path(&[]), &q).await
    }

    /// A deployment with its history and progress.
    pub async fn deployment(&self, id: u64) -> Result<DeploymentView, ClientError> {
        self.get(&Endpoint::ShowDeploy.path(&[&id]), &()).await
    }

    /// Pause (no new wave starts) or resume a deployment.
    pub async fn pause_deployment(&self, id: u64, paused: bool) -> Result<Deployment, ClientError> {
        let e = if paused {
            Endpoint::PauseDeploy
        } else {
            Endpoint::ResumeDeploy
        };
        self.post(&e.path(&[&id]), &()).await
    }

    /// The fleet as the member answering knows it.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, ClientError> {
        self.get(&Endpoint::ListNodes.path(&[]), &()).await
    }

    /// A join token valid for `ttl`.
    pub async fn create_join_token(&self, ttl: Duration) -> Result<JoinTokenReply, ClientError> {
        let req = JoinTokenRequest {
            ttl_ms: Some(ttl.as_millis() as u64),
        };
        self.post(&Endpoint::CreateJoinToken.path(&[]), &req).await
    }

    /// Exchange a join token for a certificate.
    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollReply, ClientError> {
        self.post(&Endpoint::Enroll.path(&[]), req).await
    }

    /// Events after `after`, waiting up to `wait` for one to appear.
    pub async fn events(&self, after: u64, wait: Duration) -> Result<Vec<Event>, ClientError> {
        let timeout = format!("{}ms", wait.as_millis());
        self.get(
            &Endpoint::Events.path(&[]),
            &[("after", after.to_string()), ("timeout", timeout)],
        )
        .await
    }
}
