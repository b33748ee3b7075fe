//! One run: every node's real [`Fetch`] and [`UploadQueue`], the members' real
//! [`Tracker`], fed by a queue of timed events over the model [`Network`].
//!
//! What each event stands for on a real node: `Start` the node sees the goal and starts
//! fetching (after its manifest); `Ask` it announces itself and reads the tracker's
//! answer (the node daemon does this at once, then as [`next_tracker_ask`] says: early
//! while the start settles, then every few seconds); `Connected` a QUIC connection to a peer is up and the peer's
//! `Have`s of what it holds arrived; `Request` a `Get` reaches the uploader, whose
//! upload queue sends it, queues it or refuses it as busy; `Arriving` its first bytes
//! reached the receiver; `Flow` the chunk's last byte left (the slot goes on: on a real
//! node one round trip later, at the acknowledgement); `Delivered` it arrived and was
//! hashed (wrong bytes from a corrupting node);
//! `HaveNear`/`HaveFar` a stored chunk announced to the peers that want the release, at
//! once inside the region and batched over [`FAR_HAVE_BATCH`] across regions; `Gone` a
//! dead peer's connection timed out; `Timer` the fetch asked to be woken. A `Hold` takes
//! effect at the uploader at once (its frame would take a one-way latency, 1 ms inside
//! a region at scale), which spares an event per frame: tens per chunk.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use starling_core::tracker::{Announce, Tracker};
use starling_proto::{AppReport, ChunkHash, ReleaseId};
use starling_swarm::pace::{
    next_tracker_ask, ANNOUNCE_EVERY, FAR_HAVE_BATCH, NODE_UPLOAD_QUEUE, ORIGIN_UPLOAD_QUEUE,
    PEER_IDLE_TIMEOUT, REGION_GATEWAYS, TRACKER_PEERS, TRACKER_TTL,
};
use starling_swarm::upload::{Asker, Offer, UploadQueue};
use starling_swarm::{Action, Fetch, FetchConfig, PeerId, PeerInfo, Source};

use crate::net::{Finish, FlowId, LinkId, Network};
use crate::rng::Rng;
use crate::scenario::Scenario;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Start(u32),
    Fail(u32),
    Ask(u32),
    Timer(u32, u64),
    /// `from` asks uploader `to` for `chunk`, holding `progress` 256ths of the release.
    Request {
        to: u32,
        from: u32,
        chunk: u32,
        progress: u8,
    },
    Flow(Finish),
    /// The first bytes of `chunk` from `from` reached `to`.
    Arriving {
        to: u32,
        from: u32,
        chunk: u32,
    },
    /// The first piece of `chunk` from `from` reached `to` (see
    /// [`Scenario::piece_bytes`]): `to` may pass it on.
    Piece {
        to: u32,
        from: u32,
        chunk: u32,
    },
    Delivered {
        to: u32,
        from: u32,
        chunk: u32,
    },
    Reply {
        to: u32,
        from: u32,
        chunk: u32,
        answer: Answer,
    },
    HaveNear {
        from: u32,
        chunk: u32,
    },
    HaveFar {
        from: u32,
    },
    /// Connections to the peers of one tracker answer are up (its index in `answers`).
    Connected {
        node: u32,
        answer: u32,
    },
    Gone {
        node: u32,
        peer: u32,
    },
}

/// Why an uploader did not send a requested chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Answer {
    NotHeld,
    Busy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Req {
    receiver: u32,
    chunk: u32,
}

/// A node or a member: whatever serves chunks.
struct Uploader {
    name: String,
    region: usize,
    up: LinkId,
    queue: UploadQueue<Req>,
    /// Receivers that asked it to hold their waiting requests.
    held: BTreeSet<u32>,
    active: Vec<(Req, FlowId)>,
    alive: bool,
    corrupt: bool,
}

struct Node {
    fetch: Option<Fetch>,
    /// Chunks it holds whole, and those it serves: held, or with their first piece
    /// here (see [`Scenario::piece_bytes`]).
    held: Vec<bool>,
    serving: Vec<bool>,
    /// Its sends whose bytes all went out before the chunk was whole here: each ends
    /// (is delivered, and its slot goes on) a piece after the chunk is.
    relaying: Vec<Req>,
    down: LinkId,
    /// Peers that connected to this node and want the release: its `Have`s go to them.
    near_wanting: Vec<u32>,
    far_wanting: Vec<u32>,
    far_pending: Vec<u32>,
    far_flush: bool,
    /// Peers connected or being connected to.
    known: BTreeSet<u32>,
    started: Option<u64>,
    done: Option<u64>,
    timer: Timer,
}

/// A peer as a tracker answer named it (as the node daemon knows it): whether it is
/// fetching the release and whether it is a gateway.
#[derive(Debug, Clone, Copy)]
struct Named {
    peer: u32,
    fetching: bool,
    gateway: bool,
}

/// A node's timer: when its fetch wants waking, and the one timer event queued for it
/// (`version` tells it from stale ones).
#[derive(Debug, Default)]
struct Timer {
    version: u64,
    queued: Option<u64>,
    wanted: Option<u64>,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Per node: when it held every chunk, ns from the start; `None` if it never did.
    pub done: Vec<Option<u64>>,
    /// Per node: when it saw the goal and started fetching; `None` if it never did.
    pub started: Vec<Option<u64>>,
    /// Per node: whether it was killed.
    pub killed: Vec<bool>,
    /// Per node: whether its links run slow (a fault).
    pub slow: Vec<bool>,
    /// Bytes each region received over its WAN link.
    pub wan_in: Vec<f64>,
    /// Bytes the origin host sent.
    pub origin_sent: f64,
    pub events: u64,
    pub wall: Duration,
    /// Chunks that failed verification.
    pub corrupt: u64,
    /// Chunks stored (verified, new to their node) across the fleet.
    pub delivered: u64,
}

pub struct World {
    sc: Scenario,
    cfg: FetchConfig,
    t0: Instant,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    net: Network<(u32, Req)>,
    up: Vec<Uploader>,
    nodes: Vec<Node>,
    names: HashMap<String, u32>,
    chunks: Arc<Vec<ChunkHash>>,
    index: HashMap<ChunkHash, u32>,
    release: ReleaseId,
    tracker: Tracker,
    wan_in: Vec<LinkId>,
    wan_out: Vec<LinkId>,
    origin_link: LinkId,
    killed: Vec<bool>,
    slow: Vec<bool>,
    /// Peers to connect to, per pending `Connected`: (peer, it is a gateway).
    answers: Vec<Vec<Named>>,
    free_answers: Vec<u32>,
    events: u64,
    /// Live nodes that do not hold the release yet.
    unfinished: usize,
    /// Requests refused as busy (for the trace).
    busy: u64,
    corrupt: u64,
    delivered: u64,
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

impl World {
    pub fn new(sc: Scenario) -> World {
        let mut rng = Rng::new(sc.seed);
        let n = sc.nodes();
        let chunks: Vec<ChunkHash> = (0..sc.chunks())
            .map(|i| ChunkHash::of(&i.to_le_bytes()))
            .collect();
        let index = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| (*c, i as u32))
            .collect();
        let mut net = Network::default();
        let f = &sc.faults;
        let wan_rate = |r: usize| {
            if f.degraded_region == Some(r) {
                sc.wan * f.degraded_factor
            } else {
                sc.wan
            }
        };
        let wan_in = (0..sc.regions).map(|r| net.add_link(wan_rate(r))).collect();
        let wan_out = (0..sc.regions).map(|r| net.add_link(wan_rate(r))).collect();
        let origin_link = net.add_link(sc.origin_up);
        let held_before = sc
            .new_chunks
            .map(|k| chunks.len().saturating_sub(k as usize));
        let mut up = Vec::with_capacity(n + sc.members);
        let mut nodes = Vec::with_capacity(n);
        let mut names = HashMap::with_capacity(n + sc.members);
        let mut slow_nodes = Vec::with_capacity(n);
        for k in 0..n {
            let region = k / sc.nodes_per_region;
            let slow = rng.chance(f.slow_share);
            slow_nodes.push(slow);
            let factor = if slow { f.slow_factor } else { 1.0 };
            let name = format!("r{region}-n{k}");
            names.insert(name.clone(), k as u32);
            up.push(Uploader {
                name,
                region,
                up: net.add_link(sc.node_up * factor),
                queue: UploadQueue::new(sc.node_slots, NODE_UPLOAD_QUEUE),
                held: BTreeSet::new(),
                active: Vec::new(),
                alive: true,
                corrupt: false,
            });
            let held: Vec<bool> = (0..chunks.len())
                .map(|i| held_before.is_some_and(|h| i < h))
                .collect();
            nodes.push(Node {
                fetch: None,
                serving: held.clone(),
                held,
                relaying: Vec::new(),
                down: net.add_link(sc.node_down * factor),
                near_wanting: Vec::new(),
                far_wanting: Vec::new(),
                far_pending: Vec::new(),
                far_flush: false,
                known: BTreeSet::new(),
                started: None,
                done: None,
                timer: Timer::default(),
            });
        }
        for m in 0..sc.members {
            let name = format!("origin-{m}");
            names.insert(name.clone(), (n + m) as u32);
            up.push(Uploader {
                name,
                region: 0,
                up: origin_link,
                queue: UploadQueue::new(sc.origin_slots, ORIGIN_UPLOAD_QUEUE),
                held: BTreeSet::new(),
                active: Vec::new(),
                alive: true,
                corrupt: false,
            });
        }
        let mut w = World {
            cfg: sc.fetch.clone(),
            t0: Instant::now(),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            net,
            up,
            nodes,
            names,
            chunks: Arc::new(chunks),
            index,
            release: ReleaseId::of(sc.name.as_bytes()),
            tracker: Tracker::new(TRACKER_TTL, TRACKER_PEERS, REGION_GATEWAYS),
            wan_in,
            wan_out,
            origin_link,
            killed: vec![false; n],
            slow: slow_nodes,
            answers: Vec::new(),
            free_answers: Vec::new(),
            events: 0,
            unfinished: n,
            busy: 0,
            corrupt: 0,
            delivered: 0,
            sc,
        };
        let before = w.instant();
        for k in 0..n {
            let mut at = rng.below(w.sc.start_spread.max(1));
            if rng.chance(w.sc.faults.late_share) {
                at += w.sc.faults.late_by;
            } else {
                // In the fleet when the goal is set: the tracker counts it as a node of
                // the repository from the start.
                let a = w.announcement(k as u32, false);
                w.tracker.announce(a, before);
            }
            w.push(at, Ev::Start(k as u32));
            if rng.chance(w.sc.faults.fail_share) {
                let at = rng.below(w.sc.faults.fail_window.max(1));
                w.push(at, Ev::Fail(k as u32));
            }
        }
        for _ in 0..w.sc.faults.corrupt_nodes.min(n) {
            let k = rng.below(n as u64) as usize;
            w.up[k].corrupt = true;
        }
        w
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, ev)));
    }

    fn instant(&self) -> Instant {
        self.t0 + Duration::from_nanos(self.now)
    }

    fn latency(&self, a: u32, b: u32) -> u64 {
        if self.up[a as usize].region == self.up[b as usize].region {
            self.sc.near_latency
        } else {
            self.sc.far_latency
        }
    }

    fn alive_node(&self, k: u32) -> bool {
        (k as usize) < self.nodes.len() && self.up[k as usize].alive
    }

    /// Run until every live node holds the release, nothing is left to happen, or
    /// `limit` of model time passed.
    pub fn run(mut self, limit: Duration) -> Outcome {
        let wall = Instant::now();
        let limit = ns(limit);
        // `STARLING_SIM_TRACE=1`: a line a second; `=0.1`: ten.
        let trace_every = std::env::var("STARLING_SIM_TRACE").ok().map(|v| {
            let s = v.parse::<f64>().ok().filter(|s| *s >= 0.001).unwrap_or(1.0);
            (s * 1e9) as u64
        });
        let mut next_trace = 0;
        let count_kinds = std::env::var_os("STARLING_SIM_KINDS").is_some();
        let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
        while let Some(Reverse((at, _, ev))) = self.queue.pop() {
            if at > limit {
                break;
            }
            if let Some(every) = trace_every.filter(|_| at >= next_trace) {
                self.trace();
                next_trace = at - at % every + every;
            }
            self.now = at;
            self.events += 1;
            if count_kinds {
                let name = format!("{ev:?}");
                let name = name.split([' ', '(']).next().unwrap_or("").to_string();
                *kinds.entry(name).or_insert(0u64) += 1;
            }
            self.handle(ev);
            if self.unfinished == 0 {
                break;
            }
        }
        if count_kinds {
            eprintln!("events by kind: {kinds:?}");
        }
        let done = self.nodes.iter().map(|x| x.done).collect();
        Outcome {
            done,
            started: self.nodes.iter().map(|x| x.started).collect(),
            killed: self.killed.clone(),
            slow: self.slow.clone(),
            wan_in: self.wan_in.iter().map(|&l| self.net.carried(l)).collect(),
            origin_sent: self.net.carried(self.origin_link),
            events: self.events,
            wall: wall.elapsed(),
            corrupt: self.corrupt,
            delivered: self.delivered,
        }
    }

    /// One line of progress on standard error (`STARLING_SIM_TRACE` set): chunks stored,
    /// nodes done, uploads running at nodes and at the origin, requests refused as busy;
    /// with `STARLING_SIM_REGIONS` set, the chunks each region holds; with
    /// `STARLING_SIM_SPREAD`, how many the nodes hold (percentiles).
    fn trace(&self) {
        let n = self.nodes.len();
        let sending = self.up[..n].iter().filter(|u| !u.active.is_empty()).count();
        let origin: usize = self.up[n..].iter().map(|u| u.active.len()).sum();
        // Utilisation: of the live nodes' uploads, and of the downloads of live nodes that
        // started and have not finished; and how many of those receive nothing.
        let (mut up_used, mut up_cap, mut down_used, mut down_cap, mut starved) =
            (0.0, 0.0, 0.0, 0.0, 0);
        let mut starved_waiting = 0;
        for k in 0..n {
            if !self.up[k].alive {
                continue;
            }
            let (u, c) = self.net.load(self.up[k].up);
            up_used += u;
            up_cap += c;
            let node = &self.nodes[k];
            if node.started.is_some() && node.done.is_none() {
                let (u, c) = self.net.load(node.down);
                down_used += u;
                down_cap += c;
                if u == 0.0 {
                    starved += 1;
                    if node.fetch.as_ref().is_some_and(|f| f.in_flight() > 0) {
                        starved_waiting += 1;
                    }
                }
            }
        }
        if std::env::var_os("STARLING_SIM_REGIONS").is_some() {
            // How many chunks have reached each region, and the swarm at all.
            let mut present = vec![vec![false; self.chunks.len()]; self.sc.regions];
            for (node, up) in self.nodes.iter().zip(&self.up) {
                for (p, held) in present[up.region].iter_mut().zip(&node.held) {
                    *p |= *held;
                }
            }
            let count = |r: &Vec<bool>| r.iter().filter(|p| **p).count();
            let anywhere = (0..self.chunks.len())
                .filter(|&i| present.iter().any(|r| r[i]))
                .count();
            let per: Vec<usize> = present.iter().map(count).collect();
            eprintln!("  chunks in the swarm {anywhere}, in each region {per:?}");
        }
        if std::env::var_os("STARLING_SIM_SPREAD").is_some() {
            // How far behind the laggards are: chunks held by the nodes that started.
            let mut held: Vec<usize> = self
                .nodes
                .iter()
                .filter(|x| x.started.is_some())
                .map(|x| x.held.iter().filter(|h| **h).count())
                .collect();
            held.sort_unstable();
            if let Some(last) = held.len().checked_sub(1) {
                let q = |f: f64| held[(last as f64 * f) as usize];
                eprintln!(
                    "  chunks held: min {} p1 {} p10 {} median {} p90 {} max {}",
                    q(0.0),
                    q(0.01),
                    q(0.1),
                    q(0.5),
                    q(0.9),
                    q(1.0)
                );
            }
        }
        if std::env::var_os("STARLING_SIM_MAXMIN").is_some() {
            let (exact, model) = self.net.max_min_total();
            eprintln!("  max-min exact / model: {:.3}", exact / model);
        }
        eprintln!(
            "t={:>6.2}s stored {:>9} done {:>7} nodes sending {:>7} origin flows {:>3} busy {:>9} up {:>5.1}% down {:>5.1}% starved {:>6} of which waiting {:>6}",
            self.now as f64 / 1e9,
            self.delivered,
            n - self.unfinished,
            sending,
            origin,
            self.busy,
            100.0 * up_used / up_cap,
            100.0 * down_used / down_cap,
            starved,
            starved_waiting
        );
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Start(k) => self.start(k),
            Ev::Fail(k) => self.fail(k),
            Ev::Ask(k) => self.ask(k),
            Ev::Timer(k, version) => {
                let now = self.instant();
                let t = &mut self.nodes[k as usize].timer;
                if t.version != version || !self.up[k as usize].alive {
                    return;
                }
                t.queued = None;
                match t.wanted {
                    Some(w) if w <= self.now => {
                        t.wanted = None;
                        if let Some(f) = self.nodes[k as usize].fetch.as_mut() {
                            f.handle_timeout(now);
                        }
                        self.act(k);
                    }
                    // The fetch wants waking later than this event, queued for an
                    // earlier want.
                    Some(w) => self.arm(k, w),
                    None => {}
                }
            }
            Ev::Request {
                to,
                from,
                chunk,
                progress,
            } => self.request(to, from, chunk, progress),
            Ev::Flow(finish) => self.flow_done(finish),
            Ev::Arriving { to, from, chunk } => {
                if !self.alive_node(to) {
                    return;
                }
                if let Some(piece) = self.sc.piece_bytes.filter(|p| *p < self.sc.chunk_bytes) {
                    let rate = self.flow(from, to, chunk).and_then(|f| self.net.rate(f));
                    if let Some(rate) = rate.filter(|r| *r > 0.0) {
                        let wire = piece as f64 * self.sc.wire_overhead;
                        let at = self.now + (wire / rate * 1e9) as u64;
                        self.push(at, Ev::Piece { to, from, chunk });
                    }
                }
                let hash = self.chunks[chunk as usize];
                if let Some(f) = self.nodes[to as usize].fetch.as_mut() {
                    f.handle_arriving(PeerId(from.into()), &hash);
                }
                self.act(to);
            }
            Ev::Piece { to, from, chunk } => self.piece(to, from, chunk),
            Ev::Delivered { to, from, chunk } => self.delivered(to, from, chunk),
            Ev::Reply {
                to,
                from,
                chunk,
                answer,
            } => {
                if !self.alive_node(to) {
                    return;
                }
                let (now, hash) = (self.instant(), self.chunks[chunk as usize]);
                if let Some(f) = self.nodes[to as usize].fetch.as_mut() {
                    let peer = PeerId(from.into());
                    match answer {
                        Answer::Busy => f.handle_busy(now, peer, &hash),
                        Answer::NotHeld => f.handle_refused(now, peer, &hash),
                    }
                }
                self.act(to);
            }
            Ev::HaveNear { from, chunk } => {
                let wanting = std::mem::take(&mut self.nodes[from as usize].near_wanting);
                self.tell(from, &wanting, &[chunk]);
                self.nodes[from as usize].near_wanting = wanting;
            }
            Ev::HaveFar { from } => {
                let node = &mut self.nodes[from as usize];
                node.far_flush = false;
                let pending = std::mem::take(&mut node.far_pending);
                if pending.is_empty() {
                    return;
                }
                let wanting = std::mem::take(&mut node.far_wanting);
                self.tell(from, &wanting, &pending);
                self.nodes[from as usize].far_wanting = wanting;
            }
            Ev::Connected { node, answer } => {
                let peers = std::mem::take(&mut self.answers[answer as usize]);
                self.free_answers.push(answer);
                for &named in &peers {
                    self.connected(node, named);
                }
                self.act(node);
            }
            Ev::Gone { node, peer } => {
                if !self.alive_node(node) {
                    return;
                }
                // As its server: the dead peer's waiting requests, held or not, go (on a
                // real node they fail once the connection has timed out).
                self.up[node as usize].queue.retain(|r| r.receiver != peer);
                self.hold(node, peer, false);
                let now = self.instant();
                let x = &mut self.nodes[node as usize];
                x.known.remove(&peer);
                if let Some(f) = x.fetch.as_mut() {
                    f.handle_peer_gone(now, PeerId(peer.into()));
                }
                self.act(node);
            }
        }
    }

    fn start(&mut self, k: u32) {
        if !self.up[k as usize].alive {
            return;
        }
        let now = self.instant();
        let me = self.up[k as usize].name.clone();
        let node = &mut self.nodes[k as usize];
        node.started = Some(self.now);
        let held = &node.held;
        let chunks = &self.chunks;
        let fetch = Fetch::new(
            self.cfg.clone(),
            &me,
            chunks,
            |c| self.index.get(c).is_some_and(|&i| held[i as usize]),
            now,
        );
        node.fetch = Some(fetch);
        // The origins: every member, known from the start.
        let n = self.nodes.len() as u32;
        let members: Vec<Named> = (0..self.sc.members as u32)
            .map(|m| Named {
                peer: n + m,
                fetching: false,
                gateway: false,
            })
            .collect();
        self.nodes[k as usize]
            .known
            .extend(members.iter().map(|m| m.peer));
        let at = self.now + 2 * self.latency(k, n);
        self.connect(at, k, members);
        self.push(self.now, Ev::Ask(k));
        self.act(k);
    }

    /// The node announces itself; while it fetches, it connects to the peers the
    /// tracker names.
    fn ask(&mut self, k: u32) {
        if !self.up[k as usize].alive {
            return;
        }
        let now = self.instant();
        let fetching = self.nodes[k as usize].done.is_none();
        let announce = self.announcement(k, fetching);
        let (name, region) = (announce.node.clone(), announce.region.clone());
        self.tracker.announce(announce, now);
        if !fetching {
            self.push(self.now + ns(ANNOUNCE_EVERY), Ev::Ask(k));
            return;
        }
        let answer = self.tracker.peers(&name, &region, &self.release, now);
        let named: BTreeMap<PeerId, (bool, bool)> = answer
            .peers
            .iter()
            .filter_map(|p| {
                let peer = *self.names.get(&p.node)?;
                Some((PeerId(peer.into()), (p.fetching, p.gateway)))
            })
            .collect();
        let x = &mut self.nodes[k as usize];
        if let Some(f) = x.fetch.as_mut() {
            f.handle_gateway(now, answer.gateway);
            f.handle_roles(now, &named);
            if answer.complete {
                let gateways = named.iter().filter(|(_, r)| r.1).map(|(p, _)| *p);
                f.handle_view_complete(now, gateways.collect());
            }
        }
        let mut new = Vec::new();
        let mut far = false;
        for (&PeerId(peer), &(fetching, gateway)) in &named {
            let peer = peer as u32;
            if x.known.insert(peer) {
                far |= self.up[peer as usize].region != self.up[k as usize].region;
                new.push(Named {
                    peer,
                    fetching,
                    gateway,
                });
            }
        }
        if !new.is_empty() {
            let rtt = 2 * if far {
                self.sc.far_latency
            } else {
                self.sc.near_latency
            };
            self.connect(self.now + rtt, k, new);
        }
        // As the node daemon.
        let x = &self.nodes[k as usize];
        let elapsed = Duration::from_nanos(self.now - x.started.unwrap_or(self.now));
        let pause = next_tracker_ask(elapsed, self.cfg.settle);
        self.push(self.now + ns(pause), Ev::Ask(k));
        self.act(k);
    }

    /// What node `k` tells the trackers: that it runs the repository, and fetches the
    /// release or holds it.
    fn announcement(&self, k: u32, fetching: bool) -> Announce {
        let u = &self.up[k as usize];
        let (holds, fetching) = match (fetching, self.nodes[k as usize].done) {
            (true, _) => (vec![], vec![self.release]),
            (false, Some(_)) => (vec![self.release], vec![]),
            (false, None) => (vec![], vec![]),
        };
        Announce {
            node: u.name.clone(),
            region: format!("r{}", u.region),
            addr: String::new(),
            apps: vec![AppReport {
                fetching: fetching.first().copied(),
                ..AppReport::idle("sim/app")
            }],
            holds,
            fetching,
        }
    }

    /// Connections from `k` to `peers` come up at `at` (one event for the lot).
    fn connect(&mut self, at: u64, k: u32, peers: Vec<Named>) {
        let answer = match self.free_answers.pop() {
            Some(i) => {
                self.answers[i as usize] = peers;
                i
            }
            None => {
                self.answers.push(peers);
                (self.answers.len() - 1) as u32
            }
        };
        self.push(at, Ev::Connected { node: k, answer });
    }

    fn connected(&mut self, k: u32, named: Named) {
        let Named {
            peer,
            fetching,
            gateway,
        } = named;
        if !self.alive_node(k) {
            return;
        }
        if !self.up[peer as usize].alive {
            // Unreachable: forgotten, so that a later answer tries again.
            self.nodes[k as usize].known.remove(&peer);
            return;
        }
        let now = self.instant();
        let is_origin = peer as usize >= self.nodes.len();
        let source = if is_origin {
            Source::Origin
        } else if self.up[peer as usize].region == self.up[k as usize].region {
            Source::SameRegion
        } else {
            Source::OtherRegion
        };
        let info = PeerInfo {
            id: PeerId(peer.into()),
            node: self.up[peer as usize].name.clone(),
            source,
            fetching,
            gateway,
        };
        let holds: Vec<ChunkHash> = if is_origin {
            Vec::new()
        } else {
            let p = &mut self.nodes[peer as usize];
            if source == Source::SameRegion {
                p.near_wanting.push(k);
            } else {
                p.far_wanting.push(k);
            }
            p.serving
                .iter()
                .enumerate()
                .filter(|(_, h)| **h)
                .map(|(i, _)| self.chunks[i])
                .collect()
        };
        if let Some(f) = self.nodes[k as usize].fetch.as_mut() {
            f.handle_peer(now, info);
            if !holds.is_empty() {
                f.handle_have(now, PeerId(peer.into()), &holds);
            }
        }
    }

    /// `to` tells the peers in `wanting` that it stored `chunks`.
    fn tell(&mut self, from: u32, wanting: &[u32], chunks: &[u32]) {
        let now = self.instant();
        let hashes: Vec<ChunkHash> = chunks.iter().map(|&i| self.chunks[i as usize]).collect();
        for &s in wanting {
            // A `Have` of chunks a node holds changes none of its decisions
            // (`Fetch::handle_have` passes over them), and a real node leaves out those
            // it knows the peer holds (`Stored::holders`): spare the call, most of the
            // time at scale.
            if !self.alive_node(s)
                || chunks
                    .iter()
                    .all(|&c| self.nodes[s as usize].held[c as usize])
            {
                continue;
            }
            if let Some(f) = self.nodes[s as usize].fetch.as_mut() {
                f.handle_have(now, PeerId(from.into()), &hashes);
            }
            self.act(s);
        }
    }

    /// Carry out what node `k`'s fetch asks for, and set its timer.
    fn act(&mut self, k: u32) {
        while let Some(action) = self.nodes[k as usize]
            .fetch
            .as_mut()
            .and_then(Fetch::poll_action)
        {
            match action {
                Action::Request { peer, chunk } => {
                    let (to, chunk) = (peer.0 as u32, self.index[&chunk]);
                    let at = self.now + self.latency(k, to);
                    let progress = self.nodes[k as usize]
                        .fetch
                        .as_ref()
                        .map_or(0, Fetch::progress);
                    self.push(
                        at,
                        Ev::Request {
                            to,
                            from: k,
                            chunk,
                            progress,
                        },
                    );
                }
                Action::Cancel { peer, chunk } => {
                    let chunk = self.index[&chunk];
                    self.cancel(peer.0 as u32, k, chunk);
                }
                Action::Disconnect { peer, .. } => {
                    let p = peer.0 as u32;
                    if (p as usize) < self.nodes.len() {
                        let x = &mut self.nodes[p as usize];
                        x.near_wanting.retain(|&s| s != k);
                        x.far_wanting.retain(|&s| s != k);
                    }
                    let reqs: Vec<u32> = self.up[p as usize]
                        .active
                        .iter()
                        .filter(|(r, _)| r.receiver == k)
                        .map(|(r, _)| r.chunk)
                        .collect();
                    for c in reqs {
                        self.cancel(p, k, c);
                    }
                    self.up[p as usize].queue.retain(|r| r.receiver != k);
                }
                Action::Hold { peer, hold } => self.hold(peer.0 as u32, k, hold),
                Action::Done => {
                    self.nodes[k as usize].done = Some(self.now);
                    self.unfinished -= 1;
                }
            }
        }
        let wake = self.nodes[k as usize]
            .fetch
            .as_ref()
            .and_then(Fetch::poll_timeout)
            .map(|t| ns(t.saturating_duration_since(self.t0)).max(self.now));
        let t = &mut self.nodes[k as usize].timer;
        t.wanted = wake;
        // A timer queued for earlier stays: it is armed again for the want when it
        // comes. (Most wants move later — the oldest request's timeout, each time it
        // ends — and a timer event for each filled the queue with millions.)
        if let Some(w) = wake.filter(|&w| t.queued.is_none_or(|q| w < q)) {
            self.arm(k, w);
        }
    }

    /// Queue node `k`'s timer event for `at`; any queued before goes stale.
    fn arm(&mut self, k: u32, at: u64) {
        let t = &mut self.nodes[k as usize].timer;
        t.version += 1;
        t.queued = Some(at);
        let v = t.version;
        self.push(at, Ev::Timer(k, v));
    }

    fn request(&mut self, to: u32, from: u32, chunk: u32, progress: u8) {
        if !self.up[to as usize].alive || !self.alive_node(from) {
            return;
        }
        let is_node = (to as usize) < self.nodes.len();
        if is_node && !self.nodes[to as usize].serving[chunk as usize] {
            let at = self.now + self.latency(to, from);
            self.push(
                at,
                Ev::Reply {
                    to: from,
                    from: to,
                    chunk,
                    answer: Answer::NotHeld,
                },
            );
            return;
        }
        let req = Req {
            receiver: from,
            chunk,
        };
        let hash = self.chunks[chunk as usize];
        let far = !is_node || self.up[to as usize].region != self.up[from as usize].region;
        let x = &mut self.up[to as usize];
        let asker = Asker { far, progress };
        let held = &x.held;
        let offer = x
            .queue
            .offer(&hash, req, asker, |w| !held.contains(&w.receiver));
        let refused = match offer {
            Offer::Send(req) => {
                self.send(to, req);
                return;
            }
            Offer::Queued => return,
            Offer::Bumped(req) | Offer::Busy(req) => req,
        };
        self.busy += 1;
        let at = self.now + self.latency(to, refused.receiver);
        self.push(
            at,
            Ev::Reply {
                to: refused.receiver,
                from: to,
                chunk: refused.chunk,
                answer: Answer::Busy,
            },
        );
    }

    fn send(&mut self, u: u32, req: Req) {
        let (sr, rr) = (
            self.up[u as usize].region,
            self.up[req.receiver as usize].region,
        );
        let mut links = vec![
            self.up[u as usize].up,
            self.nodes[req.receiver as usize].down,
        ];
        if sr != rr {
            links.push(self.wan_out[sr]);
            links.push(self.wan_in[rr]);
        }
        let bytes = (self.sc.chunk_bytes as f64 * self.sc.wire_overhead) as u64;
        let (flow, changed) = self.net.start(self.now, links, bytes, (u, req));
        self.up[u as usize].active.push((req, flow));
        self.reschedule(changed);
        let at = self.now + self.latency(u, req.receiver);
        self.push(
            at,
            Ev::Arriving {
                to: req.receiver,
                from: u,
                chunk: req.chunk,
            },
        );
    }

    fn reschedule(&mut self, changed: Vec<Finish>) {
        for f in changed {
            self.push(f.at, Ev::Flow(f));
        }
    }

    /// The uploader's send of a chunk ended (or was cut short): its slot goes on.
    fn next_send(&mut self, u: u32) {
        loop {
            let Uploader { queue, held, .. } = &mut self.up[u as usize];
            let Some(req) = queue.sent(|r| !held.contains(&r.receiver)) else {
                return;
            };
            if self.alive_node(req.receiver) {
                self.send(u, req);
                return;
            }
        }
    }

    /// `receiver` tells uploader `u` to hold its waiting requests, or to send them again.
    /// (The `Hold` frame would take a one-way latency; it takes none here.)
    fn hold(&mut self, u: u32, receiver: u32, hold: bool) {
        let Uploader {
            queue, held, alive, ..
        } = &mut self.up[u as usize];
        if hold {
            held.insert(receiver);
            return;
        }
        held.remove(&receiver);
        if *alive {
            if let Some(req) = queue.resume(|r| !held.contains(&r.receiver)) {
                self.send(u, req);
            }
        }
    }

    fn flow_done(&mut self, finish: Finish) {
        if !self.net.is_current(&finish) {
            return;
        }
        let Some(((u, req), _, changed)) = self.net.end(self.now, finish.flow) else {
            return;
        };
        self.reschedule(changed);
        self.up[u as usize]
            .active
            .retain(|(_, f)| *f != finish.flow);
        if let Some(relay) = self.nodes.get_mut(u as usize) {
            if !relay.held[req.chunk as usize] {
                relay.relaying.push(req);
                return;
            }
        }
        let at = self.now + self.latency(u, req.receiver);
        self.push(
            at,
            Ev::Delivered {
                to: req.receiver,
                from: u,
                chunk: req.chunk,
            },
        );
        self.next_send(u);
    }

    /// `receiver` no longer wants `chunk` from uploader `u`.
    fn cancel(&mut self, u: u32, receiver: u32, chunk: u32) {
        let hash = self.chunks[chunk as usize];
        if self.up[u as usize]
            .queue
            .withdraw(&hash, |r| r.receiver == receiver)
        {
            return;
        }
        let req = Req { receiver, chunk };
        if let Some(relay) = self.nodes.get_mut(u as usize) {
            if let Some(pos) = relay.relaying.iter().position(|r| *r == req) {
                relay.relaying.swap_remove(pos);
                self.next_send(u);
                return;
            }
        }
        let Some(pos) = self.up[u as usize]
            .active
            .iter()
            .position(|(r, _)| r.receiver == receiver && r.chunk == chunk)
        else {
            return;
        };
        let (_, flow) = self.up[u as usize].active.swap_remove(pos);
        if let Some((_, _, changed)) = self.net.end(self.now, flow) {
            self.reschedule(changed);
        }
        self.next_send(u);
    }

    fn delivered(&mut self, to: u32, from: u32, chunk: u32) {
        if !self.alive_node(to) {
            return;
        }
        let now = self.instant();
        let verified = !self.up[from as usize].corrupt;
        if !verified {
            self.corrupt += 1;
        }
        let x = &mut self.nodes[to as usize];
        if verified && !x.held[chunk as usize] {
            self.delivered += 1;
            x.held[chunk as usize] = true;
            self.serve(to, from, chunk);
            self.relay(to, chunk);
        }
        let hash = self.chunks[chunk as usize];
        if let Some(f) = self.nodes[to as usize].fetch.as_mut() {
            f.handle_chunk(now, PeerId(from.into()), &hash, verified);
        }
        self.act(to);
    }

    /// The first piece of `chunk` from `from` reached `to`, which serves it from now on
    /// if it checks and `from` holds it whole (see [`Scenario::piece_bytes`]).
    fn piece(&mut self, to: u32, from: u32, chunk: u32) {
        let sending = self.flow(from, to, chunk).is_some();
        let whole = self
            .nodes
            .get(from as usize)
            .is_none_or(|x| x.held[chunk as usize]);
        if self.alive_node(to) && sending && whole && !self.up[from as usize].corrupt {
            self.serve(to, from, chunk);
        }
    }

    /// `k` serves `chunk` (received from `from`) from now on: a `Have` to the peers
    /// that want the release.
    fn serve(&mut self, k: u32, from: u32, chunk: u32) {
        let x = &mut self.nodes[k as usize];
        if std::mem::replace(&mut x.serving[chunk as usize], true) {
            return;
        }
        if !x.near_wanting.is_empty() {
            let at = self.now + self.sc.near_latency;
            self.push(at, Ev::HaveNear { from: k, chunk });
        }
        // As the node's server: at once if the chunk entered the region here (a later
        // batch's event then finds less or nothing pending).
        let entered_region = from as usize >= self.nodes.len()
            || self.up[from as usize].region != self.up[k as usize].region;
        let x = &mut self.nodes[k as usize];
        x.far_pending.push(chunk);
        if !x.far_wanting.is_empty() && (entered_region || !x.far_flush) {
            x.far_flush = true;
            let batch = if entered_region {
                0
            } else {
                ns(FAR_HAVE_BATCH)
            };
            self.push(
                self.now + batch + self.sc.far_latency,
                Ev::HaveFar { from: k },
            );
        }
    }

    /// Uploader `from`'s flow of `chunk` to `to`, if one runs.
    fn flow(&self, from: u32, to: u32, chunk: u32) -> Option<FlowId> {
        self.up[from as usize]
            .active
            .iter()
            .find(|(r, _)| r.receiver == to && r.chunk == chunk)
            .map(|(_, f)| *f)
    }

    /// `chunk` is whole at `k`: the sends of it that went out ahead end a piece later.
    fn relay(&mut self, k: u32, chunk: u32) {
        if self.nodes[k as usize].relaying.is_empty() {
            return;
        }
        let relaying = std::mem::take(&mut self.nodes[k as usize].relaying);
        let (ended, waiting): (Vec<Req>, Vec<Req>) =
            relaying.into_iter().partition(|r| r.chunk == chunk);
        self.nodes[k as usize].relaying = waiting;
        let piece = self.sc.piece_bytes.unwrap_or(0) as f64 * self.sc.wire_overhead;
        let slot_rate = self.net.rate_of(self.up[k as usize].up) / self.sc.node_slots as f64;
        for req in ended {
            let at = self.now + (piece / slot_rate * 1e9) as u64 + self.latency(k, req.receiver);
            let to = req.receiver;
            self.push(at, Ev::Delivered { to, from: k, chunk });
            self.next_send(k);
        }
    }

    fn fail(&mut self, k: u32) {
        if !self.up[k as usize].alive {
            return;
        }
        self.up[k as usize].alive = false;
        self.killed[k as usize] = true;
        if self.nodes[k as usize].done.is_none() {
            self.unfinished -= 1;
        }
        let active = std::mem::take(&mut self.up[k as usize].active);
        for (_, flow) in active {
            if let Some((_, _, changed)) = self.net.end(self.now, flow) {
                self.reschedule(changed);
            }
        }
        self.up[k as usize].queue.retain(|_| false);
        // Flows into it stop too.
        let into: Vec<(u32, Req)> = self
            .up
            .iter()
            .enumerate()
            .flat_map(|(u, x)| x.active.iter().map(move |(r, _)| (u as u32, *r)))
            .filter(|(_, r)| r.receiver == k)
            .collect();
        for (u, r) in into {
            self.cancel(u, k, r.chunk);
        }
        // Its peers notice when the connections time out.
        let x = &mut self.nodes[k as usize];
        x.fetch = None;
        let mut peers = std::mem::take(&mut x.near_wanting);
        peers.append(&mut x.far_wanting);
        peers.extend(x.known.iter().copied());
        let at = self.now + ns(PEER_IDLE_TIMEOUT);
        for p in peers {
            if (p as usize) < self.nodes.len() {
                self.push(at, Ev::Gone { node: p, peer: k });
            }
        }
    }
}
