//! The peer protocol (`proto/PROTOCOL.md`) over QUIC: serving chunks from a
//! [`ChunkStore`] and fetching them from other peers, a unit (a run of chunks,
//! [`starling_swarm::units`]) per request, every connection mutually authenticated by the
//! cluster CA.
//!
//! It owns sockets, connections and streams, and the limits on what they carry. It never
//! decides what to fetch from whom (that is `starling-swarm`), and it never hands on a
//! byte of a chunk before that chunk has been hashed and found to match its name.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use starling_core::tracker::{Announce, Tracker};
use starling_pki::{client_config, server_config, Identity, PkiError};
use starling_proto::peer::{
    Frame, PeerAddr, Refusal, WireError, ALPN, MAX_CHUNK_BYTES, MAX_HAVE, MAX_LIST,
    MAX_MANIFEST_BYTES, PROTOCOL_VERSION,
};
use starling_proto::release::Manifest;
use starling_proto::{AppReport, ChunkHash, ReleaseId};
use starling_release::ChunkStore;
use starling_swarm::pace::{FAR_HAVE_BATCH, PEER_IDLE_TIMEOUT};
use starling_swarm::upload::{Asker, Offer, UploadQueue};
use starling_swarm::Units;
use tokio::sync::{broadcast, mpsc, Mutex};

/// How long a peer has to say hello, or to send a request's first frame.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("TLS: {0}")]
    Pki(#[from] PkiError),
    #[error("QUIC configuration: {0}")]
    Config(String),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream: {0}")]
    Stream(String),
    #[error("protocol: {0}")]
    Wire(#[from] WireError),
    #[error("the peer spoke out of turn: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("the peer speaks protocol version {0}, this one {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// Why a chunk was not fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the peer refused: {0:?}")]
    Refused(Refusal),
    #[error("the peer does not hold that manifest")]
    NoManifest,
    #[error("the bytes hash to {actual}, not {expected}")]
    Corrupt {
        expected: ChunkHash,
        actual: ChunkHash,
    },
    #[error(transparent)]
    Peer(#[from] PeerError),
}

/// Who this peer is.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Its name (a DNS label, as in its certificate) and region.
    pub name: String,
    pub region: String,
    pub ca_cert_pem: String,
    pub identity: Identity,
    /// Chunks sent at once. Few, so that each goes at the link's full speed and is whole
    /// early, ready to be passed on: sending many at once finishes them all together, late.
    pub upload_slots: usize,
    /// Requests that may wait for a slot, in the order they came; one beyond that is
    /// refused as `Busy` and asked of someone else.
    pub upload_queue: usize,
}

/// The upload slots and the queue before them; which waiter a freed slot goes to is
/// [`UploadQueue`]'s decision.
struct UploadSlots {
    queue: std::sync::Mutex<UploadQueue<Waiter>>,
}

/// A request waiting for a slot: where to hand it, and its connection's hold flag (the
/// peer said `Hold`: it receives as much as it takes for now).
struct Waiter {
    slot: tokio::sync::oneshot::Sender<Slot>,
    held: Arc<AtomicBool>,
}

impl Waiter {
    fn ready(&self) -> bool {
        !self.held.load(Ordering::Relaxed)
    }
}

/// A slot; handed to the next waiter (or freed) when dropped. It travels to the waiter
/// inside the channel, so a waiter that gives up after being chosen passes it on too.
struct Slot(Option<Arc<UploadSlots>>);

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(slots) = self.0.take() else { return };
        let mut q = slots.lock();
        let next = q.sent(Waiter::ready);
        slots.hand_on(&mut q, next);
    }
}

impl UploadSlots {
    fn new(slots: usize, max_waiting: usize) -> UploadSlots {
        UploadSlots {
            queue: std::sync::Mutex::new(UploadQueue::new(slots, max_waiting)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, UploadQueue<Waiter>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Give the slot the queue chose for `next` to it; if that waiter gave up, to the
    /// next one the queue chooses (or back to the queue).
    fn hand_on(self: &Arc<Self>, q: &mut UploadQueue<Waiter>, mut next: Option<Waiter>) {
        while let Some(w) = next {
            match w.slot.send(Slot(Some(self.clone()))) {
                Ok(()) => return,
                // That waiter gave up, and the slot came back: emptied, so that dropping
                // it does nothing, and offered to the next.
                Err(mut back) => drop(back.0.take()),
            }
            next = q.sent(Waiter::ready);
        }
    }

    /// A peer that said `Hold` may receive again: a free slot goes to its waiter.
    fn resume(self: &Arc<Self>) {
        let mut q = self.lock();
        let next = q.resume(Waiter::ready);
        self.hand_on(&mut q, next);
    }

    /// A slot to send `chunk` to `asker`, whose hold flag is `held`; `None` if every
    /// slot is taken and the queue is full, or a request that goes first took this
    /// one's place in it.
    async fn acquire(
        self: &Arc<Self>,
        chunk: &ChunkHash,
        held: &Arc<AtomicBool>,
        asker: Asker,
    ) -> Option<Slot> {
        let rx = {
            let mut q = self.lock();
            // Waiters that gave up still hold a place until a slot passes them by.
            q.retain(|w| !w.slot.is_closed());
            let (tx, rx) = tokio::sync::oneshot::channel();
            let waiter = Waiter {
                slot: tx,
                held: held.clone(),
            };
            match q.offer(chunk, waiter, asker, Waiter::ready) {
                Offer::Send(_) => return Some(Slot(Some(self.clone()))),
                Offer::Busy(_) => return None,
                // The refused waiter's channel closes with it: its task answers busy.
                Offer::Bumped(_) | Offer::Queued => rx,
            }
        };
        rx.await.ok()
    }
}

/// A control member's tracker's answer about one release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerAnswer {
    pub release: ReleaseId,
    pub peers: Vec<PeerAddr>,
    /// This node is one of its region's gateways for the release.
    pub gateway: bool,
    /// The gateways named are final: drawn from the repository's nodes.
    pub complete: bool,
}

/// What the other side said in its hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub node: String,
    pub region: String,
}

/// Stream and connection windows sized for a bandwidth-delay product of about 1 Gbit/s
/// × 100 ms, so that one connection across a continent is not window-bound. A peer that
/// dies without a word (SIGKILL, power) is taken for gone after 10 s of silence: its
/// requests go elsewhere and the chunks it was to bring into the region pass to others.
/// Keep-alives every 3 s keep a live but idle connection from looking like that.
/// Congestion control stays quinn's CUBIC: on the namespace testbed (12 nodes, 48 MiB,
/// 40 Mbit/s tbf uploads) BBR delivered the release in 27.5 s against CUBIC's 28.1 s, a
/// difference within the run-to-run spread, and BBR is marked experimental in quinn.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20))
        .receive_window(quinn::VarInt::from_u32(64 << 20))
        .send_window(64 << 20)
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(256))
        .keep_alive_interval(Some(Duration::from_secs(3)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(PEER_IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// A chunk this node just stored, for its server to announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub chunk: ChunkHash,
    /// It came from outside the node's region (the origin or another region): the node
    /// is likely the first of its region to hold it, and the peers of other regions
    /// whose ingress waits for some region to have it hear of it at once, not with the
    /// next batch ([`FAR_HAVE_BATCH`]). In the simulator this took the testbed's shapes
    /// from 12.12, 12.02 and 12.39 s to 11.92, 11.83 and 12.14 s (3 × 4, 4 × 5, 3 × 8)
    /// and 10 × 200 nodes from 16.92 to 16.51 s.
    pub entered_region: bool,
    /// The nodes this node knows to hold the chunk already (their `Have`s said so): they
    /// are not told, since a `Have` of a chunk a node holds changes nothing there. Late
    /// in a release most peers hold what a node stores, so this spares most `Have`s,
    /// which cross regions too.
    pub holders: Arc<[String]>,
}

/// What a node tells a control member about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Announcement {
    /// Where it serves chunks.
    pub addr: String,
    pub holds: Vec<ReleaseId>,
    pub fetching: Vec<ReleaseId>,
    /// What it does with each of its repositories.
    pub apps: Vec<AppReport>,
}

/// What an endpoint serves.
#[derive(Clone)]
pub struct Serving {
    pub store: Arc<dyn ChunkStore>,
    /// Chunks this node stores from now on, announced to peers that want their release.
    pub stored: Option<broadcast::Sender<Stored>>,
    /// On a control member: the tracker that `Announce`s feed and `Peers` answers come
    /// from.
    pub tracker: Option<Arc<std::sync::Mutex<Tracker>>>,
}

impl Serving {
    /// Only `store`'s chunks and manifests: no announcements, no tracker.
    pub fn store(store: Arc<dyn ChunkStore>) -> Serving {
        Serving {
            store,
            stored: None,
            tracker: None,
        }
    }
}

/// Socket buffers to ask for: a window of packets at 1 Gbit/s does not fit the kernel's
/// usual 208 KiB. The kernel caps the request at `net.core.{r,w}mem_max`.
const UDP_BUFFER: usize = 8 << 20;

/// A UDP socket bound to `addr` with buffers as large as the kernel allows up to
/// [`UDP_BUFFER`].
fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, PeerError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer is slower, not wrong.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.bind(&addr.into())?;
    tracing::debug!(
        recv = socket.recv_buffer_size().unwrap_or(0),
        send = socket.send_buffer_size().unwrap_or(0),
        "UDP socket buffers"
    );
    Ok(socket.into())
}

/// One QUIC endpoint: serves chunks to peers and connects to them.
pub struct PeerEndpoint {
    endpoint: Endpoint,
    cfg: PeerConfig,
}

impl PeerEndpoint {
    pub fn bind(addr: SocketAddr, cfg: PeerConfig) -> Result<PeerEndpoint, PeerError> {
        let tls = server_config(&cfg.ca_cert_pem, &cfg.identity, ALPN)?;
        let crypto =
            QuicServerConfig::try_from(tls).map_err(|e| PeerError::Config(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport());
        let runtime =
            quinn::default_runtime().ok_or_else(|| PeerError::Config("no async runtime".into()))?;
        let mut endpoint = Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            udp_socket(addr)?,
            runtime,
        )?;
        let tls = client_config(&cfg.ca_cert_pem, &cfg.identity, ALPN)?;
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| PeerError::Config(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(transport());
        endpoint.set_default_client_config(client);
        Ok(PeerEndpoint { endpoint, cfg })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, PeerError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Serve every peer that connects, until the endpoint closes: chunks and manifests
    /// from the store; to a `Want`, what the store holds of that release and then every
    /// chunk sent on `stored`; to an `Announce`, the tracker's `Peers`.
    pub async fn serve(&self, serving: Serving) {
        let slots = Arc::new(UploadSlots::new(
            self.cfg.upload_slots,
            self.cfg.upload_queue,
        ));
        while let Some(incoming) = self.endpoint.accept().await {
            let (serving, slots, me) = (serving.clone(), slots.clone(), self.hello());
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                // A handshake that fails (no certificate, another CA) ends here.
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(%remote, error = %e, "peer handshake refused");
                        return;
                    }
                };
                if let Err(e) = serve_connection(conn, serving, slots, me).await {
                    tracing::debug!(%remote, error = %e, "peer connection ended");
                }
            });
        }
    }

    fn hello(&self) -> Frame {
        Frame::Hello {
            version: PROTOCOL_VERSION,
            node: self.cfg.name.clone(),
            region: self.cfg.region.clone(),
        }
    }

    /// Connect to the peer `name` (the name in its certificate) at `addr`, and exchange
    /// hellos.
    pub async fn connect(&self, addr: SocketAddr, name: &str) -> Result<PeerConn, PeerError> {
        let conn = self.endpoint.connect(addr, name)?.await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(stream)?;
        write_frame(&mut send, &self.hello()).await?;
        let remote = match timed(read_frame(&mut recv), "a hello").await? {
            Frame::Hello {
                version,
                node,
                region,
            } => {
                if version != PROTOCOL_VERSION {
                    return Err(PeerError::Version(version));
                }
                Remote { node, region }
            }
            other => return Err(unexpected("Hello", &other)),
        };
        let (tx, haves) = mpsc::unbounded_channel();
        let (peers_tx, peers) = mpsc::unbounded_channel();
        let reader = conn.clone();
        tokio::spawn(async move {
            // What the peer announces on the control stream, until it ends.
            loop {
                match read_frame(&mut recv).await {
                    Ok(Frame::Have { release, chunks }) => {
                        if tx.send((release, chunks)).is_err() {
                            return;
                        }
                    }
                    Ok(Frame::Peers {
                        release,
                        peers,
                        gateway,
                        complete,
                    }) => {
                        let _ = peers_tx.send(TrackerAnswer {
                            release,
                            peers,
                            gateway,
                            complete,
                        });
                    }
                    Ok(Frame::Goodbye { .. }) | Err(_) => return,
                    Ok(other) => {
                        tracing::debug!(frame = ?other, "unexpected on the control stream");
                        reader.close(quinn::VarInt::from_u32(1), b"protocol");
                        return;
                    }
                }
            }
        });
        Ok(PeerConn {
            conn,
            remote,
            control: Mutex::new(send),
            haves: Mutex::new(haves),
            peers: Mutex::new(peers),
        })
    }

    /// Close every connection and stop serving.
    pub fn close(&self) {
        self.endpoint.close(quinn::VarInt::from_u32(0), b"closing");
    }
}

/// A connection to one peer.
pub struct PeerConn {
    conn: Connection,
    pub remote: Remote,
    control: Mutex<SendStream>,
    haves: Mutex<mpsc::UnboundedReceiver<(ReleaseId, Vec<ChunkHash>)>>,
    peers: Mutex<mpsc::UnboundedReceiver<TrackerAnswer>>,
}

impl PeerConn {
    /// Tell the peer this node is fetching `release`; it answers with `Have`s.
    pub async fn want(&self, release: &ReleaseId) -> Result<(), PeerError> {
        let mut send = self.control.lock().await;
        write_frame(&mut send, &Frame::Want { release: *release }).await
    }

    /// The next chunks the peer says it holds; `None` once its control stream ended.
    pub async fn next_have(&self) -> Option<(ReleaseId, Vec<ChunkHash>)> {
        self.haves.lock().await.recv().await
    }

    /// Tell a control member where this node serves and what it holds or fetches; it
    /// answers with `Peers` for each release being fetched ([`PeerConn::next_peers`]).
    pub async fn announce(&self, a: &Announcement) -> Result<(), PeerError> {
        let frame = Frame::Announce {
            addr: a.addr.clone(),
            holds: a.holds.iter().take(MAX_LIST).copied().collect(),
            fetching: a.fetching.iter().take(MAX_LIST).copied().collect(),
            apps: a.apps.iter().take(MAX_LIST).cloned().collect(),
        };
        let mut send = self.control.lock().await;
        write_frame(&mut send, &frame).await
    }

    /// Tell the peer to hold this node's requests waiting for its upload slots, or to
    /// send them again.
    pub async fn hold(&self, hold: bool) -> Result<(), PeerError> {
        let mut send = self.control.lock().await;
        write_frame(&mut send, &Frame::Hold { hold }).await
    }

    /// The next peer list a control member sent; `None` once its control stream ended.
    pub async fn next_peers(&self) -> Option<TrackerAnswer> {
        self.peers.lock().await.recv().await
    }

    /// Fetch the manifest of `release` and check that it hashes to the release id.
    pub async fn fetch_manifest(&self, release: &ReleaseId) -> Result<Vec<u8>, FetchError> {
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(stream)?;
        write_frame(&mut send, &Frame::GetManifest { release: *release }).await?;
        send.finish().map_err(stream)?;
        match timed(read_frame(&mut recv), "an answer").await? {
            Frame::Manifest { release: r, len } if r == *release && len <= MAX_MANIFEST_BYTES => {
                let mut bytes = vec![0u8; len as usize];
                recv.read_exact(&mut bytes).await.map_err(stream)?;
                if ReleaseId::of(&bytes) != *release {
                    return Err(FetchError::Corrupt {
                        expected: ChunkHash::from_bytes(*release.as_bytes()),
                        actual: ChunkHash::of(&bytes),
                    });
                }
                Ok(bytes)
            }
            Frame::NoManifest { release: r } if r == *release => Err(FetchError::NoManifest),
            other => Err(unexpected("Manifest or NoManifest", &other).into()),
        }
    }

    /// Whether the connection is still up.
    pub fn is_open(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    pub fn remote_addr(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// What the connection carried so far: UDP bytes and packets, losses, frames.
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }

    /// Resolves when the connection closes, for whatever reason.
    pub async fn closed(&self) {
        self.conn.closed().await;
    }

    /// Fetch `chunks` of the unit named `unit` and check each one's bytes against its
    /// name before it goes to `each`, in order; `arriving` is called once the peer
    /// starts sending. `progress`: how much of its release this node holds, in 256ths
    /// ([`starling_swarm::Fetch::progress`]). The chunks that `each` took before an
    /// error are kept by the caller: a corrupt chunk spoils only itself.
    pub async fn fetch(
        &self,
        unit: &ChunkHash,
        chunks: &[ChunkHash],
        progress: u8,
        arriving: impl FnOnce(),
        mut each: impl FnMut(ChunkHash, Vec<u8>),
    ) -> Result<(), FetchError> {
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(stream)?;
        let get = Frame::Get {
            chunk: *unit,
            chunks: chunks.to_vec(),
            progress,
        };
        write_frame(&mut send, &get).await?;
        send.finish().map_err(stream)?;
        let mut arriving = Some(arriving);
        for chunk in chunks {
            // No time limit of its own: a request may wait in the peer's queue, held or
            // not, and the fetch's request timeout covers a peer that never answers.
            match read_frame(&mut recv).await? {
                Frame::Chunk { chunk: c, len } if c == *chunk && len <= MAX_CHUNK_BYTES => {
                    if let Some(f) = arriving.take() {
                        f();
                    }
                    let mut bytes = vec![0u8; len as usize];
                    recv.read_exact(&mut bytes).await.map_err(stream)?;
                    let actual = ChunkHash::of(&bytes);
                    if actual != *chunk {
                        return Err(FetchError::Corrupt {
                            expected: *chunk,
                            actual,
                        });
                    }
                    each(*chunk, bytes);
                }
                Frame::Refuse { chunk: c, why } if c == *unit && arriving.is_some() => {
                    return Err(FetchError::Refused(why))
                }
                other => return Err(unexpected("Chunk or Refuse", &other).into()),
            }
        }
        Ok(())
    }

    pub fn close(&self, reason: &str) {
        self.conn
            .close(quinn::VarInt::from_u32(0), reason.as_bytes());
    }
}

fn stream(e: impl std::fmt::Display) -> PeerError {
    PeerError::Stream(e.to_string())
}

fn unexpected(expected: &'static str, got: &Frame) -> PeerError {
    let mut got = format!("{got:?}");
    got.truncate(120);
    PeerError::Unexpected { expected, got }
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, PeerError>>,
    what: &'static str,
) -> Result<T, PeerError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, f)
        .await
        .map_err(|_| PeerError::Timeout(what))?
}

async fn write_frame(send: &mut SendStream, frame: &Frame) -> Result<(), PeerError> {
    send.write_all(&frame.encode()?).await.map_err(stream)
}

/// Read one frame: its length is checked before its body is read.
async fn read_frame(recv: &mut RecvStream) -> Result<Frame, PeerError> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await.map_err(stream)?;
    let mut body = vec![0u8; Frame::body_len(prefix)?];
    recv.read_exact(&mut body).await.map_err(stream)?;
    Ok(Frame::decode_body(&body)?)
}

/// One peer's connection: its hello on the control stream, then a request per stream.
/// Any error closes this connection only.
async fn serve_connection(
    conn: Connection,
    serving: Serving,
    slots: Arc<UploadSlots>,
    me: Frame,
) -> Result<(), PeerError> {
    let (mut send, mut recv) = timed(
        async { conn.accept_bi().await.map_err(PeerError::from) },
        "a control stream",
    )
    .await?;
    let remote = match timed(read_frame(&mut recv), "a hello").await {
        Ok(Frame::Hello {
            version,
            node,
            region,
        }) if version == PROTOCOL_VERSION => Remote { node, region },
        Ok(Frame::Hello { version, .. }) => {
            let bye = Frame::Goodbye {
                reason: format!("protocol version {version} is not {PROTOCOL_VERSION}"),
            };
            let _ = write_frame(&mut send, &bye).await;
            conn.close(quinn::VarInt::from_u32(1), b"version");
            return Err(PeerError::Version(version));
        }
        Ok(other) => {
            conn.close(quinn::VarInt::from_u32(1), b"protocol");
            return Err(unexpected("Hello", &other));
        }
        Err(e) => {
            conn.close(quinn::VarInt::from_u32(1), b"protocol");
            return Err(e);
        }
    };
    write_frame(&mut send, &me).await?;
    let far = !matches!(&me, Frame::Hello { region, .. } if *region == remote.region);
    // The peer's `Hold`: its waiting requests are passed over while it is set.
    let held = Arc::new(AtomicBool::new(false));
    tokio::spawn(serve_control(
        conn.clone(),
        send,
        recv,
        serving.clone(),
        remote,
        far,
        PeerHold(held.clone(), slots.clone()),
    ));
    loop {
        let (send, recv) = conn.accept_bi().await?;
        let (store, slots, conn) = (serving.store.clone(), slots.clone(), conn.clone());
        let held = held.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_request(send, recv, store, slots, &held, far).await {
                // A malformed request ends the connection it came on, nothing else.
                tracing::debug!(error = %e, "bad request; closing the connection");
                conn.close(quinn::VarInt::from_u32(1), b"protocol");
            }
        });
    }
}

async fn serve_manifest(
    mut send: SendStream,
    store: Arc<dyn ChunkStore>,
    release: ReleaseId,
) -> Result<(), PeerError> {
    let read = tokio::task::spawn_blocking(move || store.get_manifest(&release))
        .await
        .map_err(stream)?;
    match read.ok().filter(|b| b.len() <= MAX_MANIFEST_BYTES as usize) {
        Some(bytes) => {
            let len = bytes.len() as u32;
            write_frame(&mut send, &Frame::Manifest { release, len }).await?;
            send.write_all(&bytes).await.map_err(stream)?;
        }
        None => write_frame(&mut send, &Frame::NoManifest { release }).await?,
    }
    send.finish().map_err(stream)
}

/// What `store` holds of `release`: the units of its manifest whose every chunk is
/// there. Nothing when the manifest is not (a node that has not started on that
/// release).
fn holdings(store: &dyn ChunkStore, release: &ReleaseId) -> Vec<ChunkHash> {
    let Ok(bytes) = store.get_manifest(release) else {
        return Vec::new();
    };
    let Ok(manifest) = Manifest::decode(&bytes) else {
        return Vec::new();
    };
    Units::of_manifest(&manifest)
        .iter()
        .filter(|u| {
            u.lacking(|c| store.has_chunk(c).unwrap_or(false))
                .next()
                .is_none()
        })
        .map(|u| u.id)
        .collect()
}

/// A connection's hold flag and the slots it is read by, as the control stream sets it.
/// Dropped with the control stream, however it ends, it lets the peer's held requests
/// go: they fail at once then (the connection is gone) and must not keep their places.
struct PeerHold(Arc<AtomicBool>, Arc<UploadSlots>);

impl PeerHold {
    fn set(&self, hold: bool) {
        self.0.store(hold, Ordering::Relaxed);
        if !hold {
            self.1.resume();
        }
    }
}

impl Drop for PeerHold {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// The control stream after the hellos: answer `Want` with `Have`, then announce each
/// newly stored chunk to a peer that wants anything — at once to a peer of this region,
/// batched over [`FAR_HAVE_BATCH`] to one of another (`far`) unless the chunk entered
/// the region here.
async fn serve_control(
    conn: Connection,
    mut send: SendStream,
    mut recv: RecvStream,
    serving: Serving,
    remote: Remote,
    far: bool,
    hold: PeerHold,
) {
    let store = serving.store.clone();
    let mut stored = serving.stored.as_ref().map(broadcast::Sender::subscribe);
    let mut wanted: Vec<ReleaseId> = Vec::new();
    // Stored chunks not yet announced, and when they go.
    let mut pending: Vec<ChunkHash> = Vec::new();
    let mut flush_at: Option<tokio::time::Instant> = None;
    loop {
        let announced = async {
            match stored.as_mut() {
                Some(rx) => rx.recv().await.ok(),
                None => std::future::pending().await,
            }
        };
        let flush = async {
            match flush_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            frame = read_frame(&mut recv) => match frame {
                Ok(Frame::Want { release }) => {
                    if !wanted.contains(&release) {
                        wanted.push(release);
                    }
                    let store = store.clone();
                    let held = tokio::task::spawn_blocking(move || holdings(store.as_ref(), &release))
                        .await
                        .unwrap_or_default();
                    for batch in held.chunks(MAX_HAVE) {
                        let have = Frame::Have { release, chunks: batch.to_vec() };
                        if write_frame(&mut send, &have).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(Frame::Announce {
                    addr,
                    holds,
                    fetching,
                    apps,
                }) if serving.tracker.is_some() => {
                    let now = std::time::Instant::now();
                    let answers: Vec<Frame> = {
                        let Some(tracker) = serving.tracker.as_ref() else { return };
                        let mut t = tracker.lock().unwrap_or_else(|p| p.into_inner());
                        t.announce(
                            Announce {
                                node: remote.node.clone(),
                                region: remote.region.clone(),
                                addr,
                                holds,
                                fetching: fetching.clone(),
                                apps,
                            },
                            now,
                        );
                        fetching
                            .iter()
                            .map(|release| {
                                let answer = t.peers(&remote.node, &remote.region, release, now);
                                Frame::Peers {
                                    release: *release,
                                    peers: answer
                                        .peers
                                        .into_iter()
                                        .take(MAX_LIST)
                                        .map(|p| PeerAddr {
                                            node: p.node,
                                            region: p.region,
                                            addr: p.addr,
                                            fetching: p.fetching,
                                            gateway: p.gateway,
                                        })
                                        .collect(),
                                    gateway: answer.gateway,
                                    complete: answer.complete,
                                }
                            })
                            .collect()
                    };
                    for frame in answers {
                        if write_frame(&mut send, &frame).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(Frame::Hold { hold: h }) => hold.set(h),
                Ok(Frame::Goodbye { .. }) | Err(_) => return,
                Ok(other) => {
                    tracing::debug!(frame = ?other, "unexpected on the control stream");
                    conn.close(quinn::VarInt::from_u32(1), b"protocol");
                    return;
                }
            },
            Some(first) = announced => {
                let mut urgent = false;
                let mut news = |s: Stored| {
                    if !s.holders.contains(&remote.node) {
                        urgent |= s.entered_region;
                        pending.push(s.chunk);
                    }
                };
                news(first);
                if let Some(rx) = stored.as_mut() {
                    while let Ok(more) = rx.try_recv() {
                        news(more);
                    }
                }
                if pending.is_empty() {
                    continue;
                }
                if far && !urgent {
                    flush_at.get_or_insert(tokio::time::Instant::now() + FAR_HAVE_BATCH);
                    continue;
                }
                flush_at = None;
            }
            _ = flush => {}
        }
        // Announce what is pending, unless it waits for its batch.
        if pending.is_empty() || flush_at.is_some_and(|t| t > tokio::time::Instant::now()) {
            continue;
        }
        flush_at = None;
        let chunks = std::mem::take(&mut pending);
        for release in &wanted {
            for batch in chunks.chunks(MAX_HAVE) {
                let have = Frame::Have {
                    release: *release,
                    chunks: batch.to_vec(),
                };
                if write_frame(&mut send, &have).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn serve_request(
    mut send: SendStream,
    mut recv: RecvStream,
    store: Arc<dyn ChunkStore>,
    slots: Arc<UploadSlots>,
    held: &Arc<AtomicBool>,
    far: bool,
) -> Result<(), PeerError> {
    let (unit, chunks, progress) = match timed(read_frame(&mut recv), "a request").await? {
        Frame::Get {
            chunk,
            chunks,
            progress,
        } => (chunk, chunks, progress),
        Frame::GetManifest { release } => return serve_manifest(send, store, release).await,
        other => return Err(unexpected("Get or GetManifest", &other)),
    };
    let refuse = |why| Frame::Refuse { chunk: unit, why };
    let slot = tokio::select! {
        slot = slots.acquire(&unit, held, Asker { far, progress }) => slot,
        // The asker gave up while the request waited for a slot (it asked someone else):
        // its place in the queue goes now, not when a slot reaches it.
        _ = send.stopped() => return Ok(()),
    };
    let Some(_slot) = slot else {
        write_frame(&mut send, &refuse(Refusal::Busy)).await?;
        return send.finish().map_err(stream);
    };
    // All of the unit asked for, or nothing: a partial answer would spend the asker's
    // round trip and this slot on a request that must go elsewhere anyway.
    let check = store.clone();
    let (chunks, held_all) = tokio::task::spawn_blocking(move || {
        let all = chunks.iter().all(|c| check.has_chunk(c).unwrap_or(false));
        (chunks, all)
    })
    .await
    .map_err(stream)?;
    if !held_all {
        write_frame(&mut send, &refuse(Refusal::NotHeld)).await?;
        return send.finish().map_err(stream);
    }
    for chunk in chunks {
        let store = store.clone();
        let read = tokio::task::spawn_blocking(move || store.get_chunk(&chunk))
            .await
            .map_err(stream)?;
        // A chunk that went since the check (collected, or a failing disk): the asker
        // sees the stream end early and asks elsewhere.
        let bytes = read.map_err(|e| {
            tracing::warn!(%chunk, error = %e, "reading a chunk to serve failed");
            PeerError::Stream(format!("reading chunk {chunk}: {e}"))
        })?;
        let len = u32::try_from(bytes.len())
            .ok()
            .filter(|l| *l <= MAX_CHUNK_BYTES)
            .ok_or_else(|| PeerError::Stream(format!("stored chunk {chunk} is too large")))?;
        write_frame(&mut send, &Frame::Chunk { chunk, len }).await?;
        match send.write_all(&bytes).await {
            Ok(()) => {}
            // The asker cancelled (the endgame's other copy came first): no fault of the
            // connection's.
            Err(quinn::WriteError::Stopped(_)) => return Ok(()),
            Err(e) => return Err(stream(e)),
        }
    }
    // The slot is held until the peer has acknowledged every byte: `write_all` returns
    // once the bytes are in QUIC's send buffer (64 MiB a connection), so a slot given up
    // then would let every queued request go out at once, interleaved, each finishing
    // late. On the namespace testbed (3 × 4, 48 MiB) releasing at the acknowledgement
    // took the last node from 14.56 s to 13.82 s (and with `Hold`, which needs slots
    // that mean something, to 13.41 s instead of 19.55 s).
    send.finish().map_err(stream)?;
    let _ = send.stopped().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(n: usize, queue: usize) -> Arc<UploadSlots> {
        Arc::new(UploadSlots::new(n, queue))
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_chunk_asked_for_least() {
        let s = slots(1, 2);
        let go = Arc::new(AtomicBool::new(false));
        let (common, fresh, other) = (
            ChunkHash::of(b"a"),
            ChunkHash::of(b"b"),
            ChunkHash::of(b"c"),
        );
        // `common` has been asked for once already and holds the one slot.
        drop(s.acquire(&common, &go, Asker::default()).await);
        let held = s
            .acquire(&common, &go, Asker::default())
            .await
            .expect("a free slot");
        let mut first = Box::pin(s.acquire(&common, &go, Asker::default()));
        let mut second = Box::pin(s.acquire(&fresh, &go, Asker::default()));
        // Both wait; the queue is full now.
        assert!(futures_poll(&mut first).is_none() && futures_poll(&mut second).is_none());
        assert!(
            s.acquire(&other, &go, Asker::default()).await.is_none(),
            "a third waiter is refused"
        );
        drop(held);
        // The chunk never asked for before goes first, though it came later.
        assert!(futures_poll(&mut first).is_none());
        let fresh_slot = second.await.expect("the slot");
        drop(fresh_slot);
        assert!(first.await.is_some());
        // A waiter that gave up passes its turn on.
        let held = s
            .acquire(&other, &go, Asker::default())
            .await
            .expect("a free slot");
        let mut gave_up = Box::pin(s.acquire(&fresh, &go, Asker::default()));
        let mut next = Box::pin(s.acquire(&other, &go, Asker::default()));
        assert!(futures_poll(&mut gave_up).is_none() && futures_poll(&mut next).is_none());
        drop(gave_up);
        drop(held);
        assert!(next.await.is_some());
    }

    #[tokio::test]
    async fn a_held_peer_waits_and_its_turn_comes_when_it_lets_go() {
        let s = slots(1, 4);
        let c = ChunkHash::of(b"c");
        let (go, hold) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(true)),
        );
        let sending = s
            .acquire(&c, &go, Asker::default())
            .await
            .expect("a free slot");
        let mut held = Box::pin(s.acquire(&c, &hold, Asker::default()));
        let mut other = Box::pin(s.acquire(&c, &go, Asker::default()));
        assert!(futures_poll(&mut held).is_none() && futures_poll(&mut other).is_none());
        // The slot passes the held peer by, though it came first.
        drop(sending);
        assert!(futures_poll(&mut held).is_none());
        let slot = other.await.expect("the slot");
        drop(slot);
        // Nobody ready waits: the slot stays free until the held peer lets go.
        assert!(futures_poll(&mut held).is_none());
        hold.store(false, Ordering::Relaxed);
        s.resume();
        assert!(held.await.is_some());
    }

    #[tokio::test]
    async fn a_request_from_another_region_takes_the_place_of_a_waiting_one_of_this_region() {
        let s = slots(1, 1);
        let go = Arc::new(AtomicBool::new(false));
        let c = ChunkHash::of(b"c");
        let sending = s
            .acquire(&c, &go, Asker::default())
            .await
            .expect("a free slot");
        let mut near = Box::pin(s.acquire(&c, &go, Asker::default()));
        assert!(futures_poll(&mut near).is_none(), "it waits");
        let mut far = Box::pin(s.acquire(
            &c,
            &go,
            Asker {
                far: true,
                ..Asker::default()
            },
        ));
        assert!(
            futures_poll(&mut far).is_none(),
            "it waits in the near one's place"
        );
        assert!(near.await.is_none(), "the near one is refused as busy");
        drop(sending);
        assert!(far.await.is_some());
    }

    /// Poll once: the output if it is ready.
    fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
