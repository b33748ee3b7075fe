//! One release fetched from the swarm: the driver that runs a [`Fetch`] over QUIC.
//!
//! It connects to the sources it is given, tells each that it wants the release and
//! feeds their `Have`s, the units that arrive (runs of chunks, each verified by
//! `starling-peer`; see [`starling_swarm::units`]) and the passing time to the `Fetch`;
//! it carries out what the `Fetch` answers — requests, cancellations, disconnections —
//! and stores each verified chunk, announcing each whole unit to the peers this node
//! serves. It decides nothing itself.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use starling_peer::{FetchError, PeerConn, PeerEndpoint, Stored};
use starling_proto::peer::Refusal;
use starling_proto::release::Manifest;
use starling_proto::{ChunkHash, ReleaseId};
use starling_release::{ChunkStore, ReleaseError};
use starling_swarm::{Action, Fetch, FetchConfig, PeerId, PeerInfo, Source, Unit, Units};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// A peer to fetch from, as the tracker describes it.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    /// Its name: the name in its certificate.
    pub name: String,
    pub addr: SocketAddr,
    pub source: Source,
    /// It is fetching this release too.
    pub fetching: bool,
    /// It is a gateway of its region for this release.
    pub gateway: bool,
}

/// What the trackers said: where to fetch from, whether this node is a gateway of its
/// region (one that brings chunks into it), and whether the gateways named are final
/// (drawn from the repository's nodes).
#[derive(Debug, Clone, Default)]
pub struct TrackerSources {
    pub gateway: bool,
    pub peers: Vec<SourceSpec>,
    pub complete: bool,
}

impl TrackerSources {
    /// If the view is complete: the gateways named, as `known` numbers them.
    fn final_gateways(&self, known: &Sources) -> Option<Vec<PeerId>> {
        self.complete.then(|| {
            self.peers
                .iter()
                .filter(|s| s.gateway)
                .filter_map(|s| known.id(&s.name))
                .collect()
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetcherError {
    #[error("no progress for {0:?}: every source is gone or silent")]
    Stalled(Duration),
    #[error("storing: {0}")]
    Store(#[from] ReleaseError),
    #[error("manifest: {0}")]
    Manifest(#[from] starling_proto::release::ManifestError),
}

/// What a finished fetch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchReport {
    /// Units received from each kind of source.
    pub received: BTreeMap<Source, u64>,
    /// Chunk bytes received (verified) from each kind of source.
    pub received_bytes: BTreeMap<Source, u64>,
    /// Chunks that did not hash to their name (their senders were cut off).
    pub corrupt: u64,
    /// UDP bytes received from each kind of source over its connections (chunks, their
    /// framing, and everything else those connections carried), and packets they lost.
    pub udp_received: BTreeMap<Source, u64>,
    pub lost_packets: u64,
    /// Peers cut off, with why.
    pub dropped: Vec<(String, String)>,
}

enum Event {
    Connected(PeerId, Arc<PeerConn>),
    Have(PeerId, Vec<ChunkHash>),
    Gone(PeerId),
    /// Could not connect: forgotten, so that the tracker's next answer tries it again.
    Unreachable(PeerId),
    /// A unit started arriving.
    Arriving(PeerId, ChunkHash),
    /// A request ended: the unit stored (verified; so many bytes came), corrupt (the
    /// chunks of it that checked are stored), or refused.
    Arrived(PeerId, ChunkHash, u64),
    Corrupt(PeerId, ChunkHash),
    Refused(PeerId, ChunkHash),
    Busy(PeerId, ChunkHash),
    /// A verified chunk could not be stored.
    StoreFailed(ReleaseError),
}

/// The sources given so far, numbered as the `Fetch` knows them.
#[derive(Default)]
struct Sources {
    by_id: HashMap<PeerId, SourceSpec>,
    next: u64,
}

impl Sources {
    /// Number `s` if no source of its name is known; the id it gets.
    fn add(&mut self, s: &SourceSpec) -> Option<PeerId> {
        if self.id(&s.name).is_some() {
            return None;
        }
        let id = PeerId(self.next);
        self.next += 1;
        self.by_id.insert(id, s.clone());
        Some(id)
    }

    fn id(&self, name: &str) -> Option<PeerId> {
        self.by_id
            .iter()
            .find(|(_, s)| s.name == name)
            .map(|(id, _)| *id)
    }

    fn name(&self, id: PeerId) -> &str {
        self.by_id.get(&id).map_or("", |s| s.name.as_str())
    }
}

/// Give `fetch` a tracker answer (the first, or a later one): whether this node is a
/// gateway, the roles of the peers it knows, the peers it does not know yet (numbered in
/// `known` and connected to), and whether the view is complete.
fn take_answer(
    fetch: &mut Fetch,
    known: &mut Sources,
    answer: &TrackerSources,
    now: std::time::Instant,
    connect: &impl Fn(PeerId, SourceSpec),
) {
    fetch.handle_gateway(now, answer.gateway);
    // The roles the answer gives the known peers, by id; the `Fetch` decides what an
    // unnamed one is, and the specs follow for peers not connected yet (their
    // `PeerInfo` is made from the spec).
    let roles: HashMap<&str, (bool, bool)> = answer
        .peers
        .iter()
        .map(|s| (s.name.as_str(), (s.fetching, s.gateway)))
        .collect();
    let mut named = BTreeMap::new();
    for (&id, k) in known
        .by_id
        .iter_mut()
        .filter(|(_, k)| k.source != Source::Origin)
    {
        let (fetching, gateway) = roles.get(k.name.as_str()).copied().unwrap_or_default();
        (k.fetching, k.gateway) = (k.fetching || fetching, gateway);
        named.insert(id, (fetching, gateway));
    }
    fetch.handle_roles(now, &named);
    for s in &answer.peers {
        if let Some(id) = known.add(s) {
            connect(id, s.clone());
        }
    }
    if let Some(gateways) = answer.final_gateways(known) {
        fetch.handle_view_complete(now, gateways);
    }
}

/// Fetch `release` (whose manifest is `manifest`) into `store` from `sources`, and from
/// the peers that arrive on `more` meanwhile (the tracker's later answers: a peer
/// already known can only turn from idle to fetching, and this node may become a gateway
/// or stop being one). Each stored chunk is sent on
/// `stored`, so that the node's server announces it at once. Fails if nothing happens
/// for `stall`.
#[allow(clippy::too_many_arguments)]
pub async fn fetch_release(
    endpoint: Arc<PeerEndpoint>,
    me: &str,
    release: ReleaseId,
    manifest: &Manifest,
    sources: TrackerSources,
    mut more: mpsc::UnboundedReceiver<TrackerSources>,
    store: Arc<dyn ChunkStore>,
    stored: Option<broadcast::Sender<Stored>>,
    cfg: FetchConfig,
    stall: Duration,
) -> Result<FetchReport, FetcherError> {
    // The manifest first: from now on this node can tell others what it holds.
    store.put_manifest(&release, &manifest.encode()?)?;
    let units = Arc::new(Units::of_manifest(manifest));
    let started = Instant::now();
    let mut fetch = {
        let (store, units) = (store.clone(), units.clone());
        let ids: Vec<ChunkHash> = units.ids().collect();
        Fetch::new(
            cfg,
            me,
            &ids,
            move |u| {
                units.get(u).is_some_and(|u| {
                    u.lacking(|c| store.has_chunk(c).unwrap_or(false))
                        .next()
                        .is_none()
                })
            },
            started.into_std(),
        )
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let mut known = Sources::default();
    let connect = |id: PeerId, s: SourceSpec| {
        let (endpoint, tx) = (endpoint.clone(), tx.clone());
        tokio::spawn(async move {
            match endpoint.connect(s.addr, &s.name).await {
                Ok(conn) => {
                    let conn = Arc::new(conn);
                    let _ = tx.send(Event::Connected(id, conn.clone()));
                    if conn.want(&release).await.is_err() {
                        let _ = tx.send(Event::Gone(id));
                        return;
                    }
                    while let Some((r, have)) = conn.next_have().await {
                        if r == release && tx.send(Event::Have(id, have)).is_err() {
                            return;
                        }
                    }
                    let _ = tx.send(Event::Gone(id));
                }
                Err(e) => {
                    tracing::info!(peer = %s.name, error = %e, "cannot connect");
                    let _ = tx.send(Event::Unreachable(id));
                }
            }
        });
    };
    take_answer(
        &mut fetch,
        &mut known,
        &sources,
        started.into_std(),
        &connect,
    );
    let mut conns: HashMap<PeerId, Arc<PeerConn>> = HashMap::new();
    // Per peer, the hold it was last told to have; a task per connection sends each
    // change, in order.
    let mut holds: HashMap<PeerId, watch::Sender<bool>> = HashMap::new();
    let mut requests: HashMap<(PeerId, ChunkHash), AbortHandle> = HashMap::new();
    let mut report = FetchReport::default();
    loop {
        while let Some(action) = fetch.poll_action() {
            match action {
                Action::Request { peer, chunk } => {
                    let Some(conn) = conns.get(&peer).cloned() else {
                        continue;
                    };
                    tracing::debug!(
                        %chunk,
                        to = conn.remote.node.as_str(),
                        holders = fetch.holders(&chunk),
                        after_ms = started.elapsed().as_millis() as u64,
                        "asking"
                    );
                    let (tx, store) = (tx.clone(), store.clone());
                    let unit = units.get(&chunk).cloned();
                    let progress = fetch.progress();
                    let task = tokio::spawn(async move {
                        let event = match unit {
                            Some(unit) => fetch_unit(&conn, peer, unit, progress, store, &tx).await,
                            None => Event::Refused(peer, chunk),
                        };
                        let _ = tx.send(event);
                    });
                    requests.insert((peer, chunk), task.abort_handle());
                }
                Action::Cancel { peer, chunk } => {
                    if let Some(t) = requests.remove(&(peer, chunk)) {
                        t.abort();
                    }
                }
                Action::Hold { peer, hold } => {
                    if let Some(h) = holds.get(&peer) {
                        h.send_replace(hold);
                    }
                }
                Action::Disconnect { peer, reason } => {
                    holds.remove(&peer);
                    if let Some(c) = conns.remove(&peer) {
                        c.close(&reason);
                    }
                    let name = known.name(peer).to_string();
                    tracing::warn!(peer = %name, %reason, "peer dropped for this release");
                    report.dropped.push((name, reason));
                }
                Action::Done => {
                    for t in requests.values() {
                        t.abort();
                    }
                    report.received = [Source::SameRegion, Source::OtherRegion, Source::Origin]
                        .into_iter()
                        .map(|s| (s, fetch.received(s)))
                        .filter(|(_, n)| *n > 0)
                        .collect();
                    for (id, conn) in &conns {
                        let Some(spec) = known.by_id.get(id) else {
                            continue;
                        };
                        let st = conn.stats();
                        tracing::debug!(peer = %spec.name, stats = ?st, "connection carried");
                        *report.udp_received.entry(spec.source).or_default() += st.udp_rx.bytes;
                        report.lost_packets += st.path.lost_packets;
                    }
                    return Ok(report);
                }
            }
        }
        let wake = fetch.poll_timeout().map(Instant::from_std);
        let timer = async {
            match wake {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            e = rx.recv() => e,
            Some(answer) = more.recv() => {
                take_answer(&mut fetch, &mut known, &answer, Instant::now().into_std(), &connect);
                continue;
            }
            _ = timer => {
                fetch.handle_timeout(Instant::now().into_std());
                continue;
            }
            _ = tokio::time::sleep(stall) => return Err(FetcherError::Stalled(stall)),
        };
        let Some(event) = event else {
            return Err(FetcherError::Stalled(stall));
        };
        let now = Instant::now().into_std();
        match event {
            Event::Connected(id, conn) => {
                // Every connection is to a source numbered in `known`.
                let Some(spec) = known.by_id.get(&id) else {
                    continue;
                };
                let info = PeerInfo {
                    id,
                    node: conn.remote.node.clone(),
                    source: spec.source,
                    fetching: spec.fetching,
                    gateway: spec.gateway,
                };
                let (hold, mut told) = watch::channel(false);
                let writer = conn.clone();
                tokio::spawn(async move {
                    while told.changed().await.is_ok() {
                        let hold = *told.borrow_and_update();
                        if writer.hold(hold).await.is_err() {
                            return;
                        }
                    }
                });
                holds.insert(id, hold);
                conns.insert(id, conn);
                fetch.handle_peer(now, info);
            }
            Event::Have(id, have) => fetch.handle_have(now, id, &have),
            Event::Unreachable(id) => {
                known.by_id.remove(&id);
            }
            Event::Arriving(id, chunk) => fetch.handle_arriving(id, &chunk),
            Event::Gone(id) => {
                conns.remove(&id);
                holds.remove(&id);
                fetch.handle_peer_gone(now, id);
            }
            Event::Arrived(id, chunk, bytes) => {
                requests.remove(&(id, chunk));
                if let Some(s) = &stored {
                    let holders = fetch.holders_of(&chunk).map(|p| known.name(p).to_string());
                    let entered_region = known
                        .by_id
                        .get(&id)
                        .is_some_and(|s| s.source != Source::SameRegion);
                    let _ = s.send(Stored {
                        chunk,
                        entered_region,
                        holders: holders.collect(),
                    });
                }
                fetch.handle_chunk(now, id, &chunk, true);
                if let Some(spec) = known.by_id.get(&id) {
                    *report.received_bytes.entry(spec.source).or_default() += bytes;
                }
                tracing::debug!(
                    unit = %chunk,
                    from = known.name(id),
                    after_ms = started.elapsed().as_millis() as u64,
                    missing = fetch.missing(),
                    "unit stored"
                );
            }
            Event::Corrupt(id, chunk) => {
                requests.remove(&(id, chunk));
                fetch.handle_chunk(now, id, &chunk, false);
                report.corrupt += 1;
            }
            Event::Refused(id, chunk) => {
                requests.remove(&(id, chunk));
                fetch.handle_refused(now, id, &chunk);
            }
            Event::Busy(id, chunk) => {
                requests.remove(&(id, chunk));
                fetch.handle_busy(now, id, &chunk);
            }
            Event::StoreFailed(e) => {
                for t in requests.values() {
                    t.abort();
                }
                return Err(FetcherError::Store(e));
            }
        }
    }
}

/// Fetch the chunks of `unit` this node lacks from `conn` and store them: what became
/// of the request, as the fetch loop hears of it.
async fn fetch_unit(
    conn: &PeerConn,
    peer: PeerId,
    unit: Unit,
    progress: u8,
    store: Arc<dyn ChunkStore>,
    tx: &mpsc::UnboundedSender<Event>,
) -> Event {
    let id = unit.id;
    // Those held already (from another release) are not asked for.
    let check = store.clone();
    let need = tokio::task::spawn_blocking(move || {
        unit.lacking(|c| check.has_chunk(c).unwrap_or(false))
            .collect::<Vec<_>>()
    })
    .await;
    let need = match need {
        Ok(need) => need,
        Err(e) => return store_failed("checking", e),
    };
    let mut got: Vec<(ChunkHash, Vec<u8>)> = Vec::with_capacity(need.len());
    let fetched = if need.is_empty() {
        Ok(())
    } else {
        let arriving = || {
            let _ = tx.send(Event::Arriving(peer, id));
        };
        conn.fetch(&id, &need, progress, arriving, |c, bytes| {
            got.push((c, bytes))
        })
        .await
    };
    // What checked is kept, whatever became of the rest.
    let bytes: u64 = got.iter().map(|(_, b)| b.len() as u64).sum();
    let put = tokio::task::spawn_blocking(move || {
        got.iter().try_for_each(|(c, b)| store.put_chunk(c, b))
    })
    .await;
    match put {
        Ok(Ok(())) => {}
        // Another peer would not help a full or failing disk: the fetch ends, and the
        // node reports why.
        Ok(Err(e)) => return Event::StoreFailed(e),
        Err(e) => return store_failed("storing", e),
    }
    match fetched {
        Ok(()) => Event::Arrived(peer, id, bytes),
        Err(FetchError::Corrupt { .. }) => Event::Corrupt(peer, id),
        Err(FetchError::Refused(Refusal::Busy)) => Event::Busy(peer, id),
        Err(FetchError::Refused(_) | FetchError::NoManifest) => Event::Refused(peer, id),
        Err(FetchError::Peer(_)) => Event::Gone(peer),
    }
}

/// A blocking task on the store that did not finish (it panicked or was cancelled).
fn store_failed(what: &str, e: tokio::task::JoinError) -> Event {
    Event::StoreFailed(ReleaseError::Store(format!("the {what} task failed: {e}")))
}
