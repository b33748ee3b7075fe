//! One node fetching one release: the piece picker and its request bookkeeping.
//!
//! Sources are tiered. A chunk is asked of a peer in the node's own region when one has
//! it. Of a peer in another region only by the chunk's *region ingress* — the node that
//! [`crate::ingress_node`] picks among this node and its live peers in the region — or
//! once the chunk has been held somewhere for `cross_region_patience` without reaching
//! the region. Of the origin only when no peer anywhere has it, and only by the chunk's
//! *swarm ingress* (the pick among every live node) or after `origin_patience`. So the
//! origin sends each chunk about once, spread evenly over the regions' nodes, and each
//! chunk crosses into each region about once. Ingress is computed over live peers: when
//! a node goes, the chunks it brought in pass to others by themselves. Those views agree
//! only once every node knows the gateways: a fetch asks no one outside its region for
//! its first `settle`, or until the tracker says the gateways it named are final (drawn
//! from the repository's nodes) and this node is connected to them.
//!
//! Inside the region a new chunk spreads in its rendezvous order: `fanout` more nodes may
//! fetch it per node holding it, so that it travels as a tree and no holder is asked by
//! everyone at once. Among the chunks it may ask for, a node asks for the rarest first
//! (fewest peers hold it), ties broken differently on every node; a peer gets at most
//! `per_peer` requests at once and the node at most `total`, and a peer that said it is
//! busy is left alone for a few of this node's chunk times (`busy_backoff`). When every
//! missing chunk is in flight, the endgame asks a second peer for each, and cancels the
//! loser.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

use starling_proto::ChunkHash;

use crate::topology::{rank_salted, salt, spread};

/// A peer connection, numbered by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(pub u64);

/// Where a peer is, seen from this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    SameRegion,
    OtherRegion,
    /// A control member serving the origin store: holds every chunk, asked last.
    Origin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub id: PeerId,
    /// The peer's node name (for spreading load; the origin's member name).
    pub node: String,
    pub source: Source,
    /// The peer is fetching this release too (the tracker says so): it takes its place
    /// in the order in which a new chunk spreads through the region. A peer that merely
    /// holds some chunks (of an older release, say) is a source, not a partner.
    pub fetching: bool,
    /// The peer is a gateway of its region for this release (the tracker says so): it
    /// shares the work of bringing chunks into its region and out of the origin, from
    /// when it starts to fetch. In a region of a few nodes every node is one.
    pub gateway: bool,
}

/// A busy peer is left alone for this many of this node's chunk times (see
/// [`FetchConfig::busy_backoff`]).
pub const BUSY_CHUNK_TIMES: u32 = 8;

#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Requests in flight to one peer. One, now that the peer queues requests (a few)
    /// and serves the least-sent chunk first: a long queue at one uploader delays chunks
    /// others could be passing on. In the swarm simulation 4 → 2 → 1 took the 3×4 case
    /// from 1.53× to 1.38× to 1.29× of the fluid bound; on the namespace testbed (3×4,
    /// 48 MiB, release build) 2 → 1 took Starling from 24.2–25.7 s to 21.5–22.2 s.
    pub per_peer: usize,
    /// Requests in flight in all.
    pub total: usize,
    /// If set, requests in flight are held to the chunks received over this long, and
    /// at least `pace_floor`: a node with a slow download must not hold the upload slots
    /// of many peers at once, each sending to it at a crawl while faster nodes wait. In
    /// the simulator (10 regions × 50 nodes, 1 GiB, a tenth of the nodes at a tenth of
    /// the rate) 4 s took the last full-rate node from 127 s to 47 s, the slow ones from
    /// 220 s to 97 s and the WAN copies from 2.1 to 1.07, and cost 2.5% without slow
    /// nodes; the testbed's shapes were unchanged there.
    pub pace_window: Option<Duration>,
    pub pace_floor: usize,
    /// A request unanswered this long is cancelled and asked of someone else.
    pub request_timeout: Duration,
    /// How long after a chunk is first held anywhere a node that is not its region
    /// ingress waits for it to reach the region before fetching it across regions.
    pub cross_region_patience: Duration,
    /// How long after the start a node that is not a chunk's swarm ingress waits for a
    /// peer to hold it before asking the origin: a safety net for a stuck ingress node
    /// (one that leaves hands its chunks on at once).
    pub origin_patience: Duration,
    /// How long after the start a node asks no one outside its region: the time for the
    /// nodes that started with it to become known (tracker, connection), so that every
    /// node's view of who brings which chunk in agrees. Without it, a node that looks
    /// alone takes itself for every chunk's ingress and the early chunks cross twice.
    /// The origin idles for as long as this lasts. On the namespace testbed (48 MiB)
    /// 0.3 s instead of 1 s took 3×4 from 13.9–14.2 s to 13.5–13.6 s, but at 3×8 the
    /// origin then sent 1.18–1.29 copies instead of 1.11 (24 nodes' views had not agreed
    /// yet) and the run was no faster (17.4–18.1 s against 16.8 s); so 1 s, and it ends
    /// sooner once the tracker says the view is complete and its gateways are connected
    /// ([`Fetch::handle_view_complete`]): on the testbed (3×4) after about 0.2 s, which
    /// took the run from 13.33–13.54 s to 12.91–13.00 s.
    pub settle: Duration,
    /// How many more nodes of the region may fetch a new chunk per node that holds it
    /// (see `Fetch::my_turn`).
    pub fanout: usize,
    /// How long after a chunk is first held a node waits for its turn at most.
    pub turn_patience: Duration,
    /// How long a peer that said it is busy is left alone at most (and `..._floor` at
    /// least). In between, [`BUSY_CHUNK_TIMES`] times the mean time between this node's
    /// last arrivals (over `pace_window`; the most until two arrived, or without
    /// pacing): a busy peer's queue drains in a few of its chunks' times, which is what
    /// the arrivals measure, and that is 2 ms for a 256 KiB chunk at 1 Gbit/s but 134 ms for 16 MiB or 52 ms at
    /// 40 Mbit/s. In the simulator (10 regions × 50 nodes, 1 GiB in 4 MiB units) 1 s
    /// instead of 200 ms cut the requests a node makes by a third and left the time as
    /// it was (19.2 s against 18.8 s), but with the release format's 256 KiB chunks at
    /// 1 Gbit/s (10 × 20 nodes, 256 MiB) a flat second left refused nodes idle for
    /// hundreds of chunk times: 5.25 s, against 4.05 s with 100 ms.
    pub busy_backoff: Duration,
    pub busy_backoff_floor: Duration,
    /// Timeouts a peer may cause before it is dropped.
    pub max_strikes: u32,
    /// The endgame starts when this few chunks are missing and all of them are asked for.
    pub endgame_chunks: usize,
    /// Chunks this node receives at once before it holds the rest: while this many
    /// arrive (from anyone), the peers of its region where its other requests wait are
    /// told to hold them ([`Action::Hold`]), so that their slots go to nodes that receive
    /// less instead of splitting this node's download further while others receive
    /// nothing. Set to the upload slots a peer has, it pairs senders and receivers evenly
    /// when uploads and downloads run at the same rate (a fleet's machines). In the
    /// simulator (10 regions × 200 nodes, 1 GiB, 1 Gbit/s each way) uploads ran at 70% of
    /// their capacity without it — a fifth of the nodes received nothing at any moment,
    /// waiting in the queues of peers that served nodes receiving from several others —
    /// and at 88–95% with it: 20.29 s → 16.59 s. On the namespace testbed (3 × 4, 48 MiB)
    /// 13.82 s → 13.33–13.52 s. Requests to other regions and the origin are never held.
    /// `None`: no limit.
    pub max_arriving: Option<usize>,
    /// A backup for a region ingress that is slow to bring a chunk in: if the chunk has
    /// not reached the region this long after it was first held somewhere, the next
    /// gateway in the region's rendezvous order for it may fetch it across regions, and
    /// one more each period after (see `cross_wait`). An ingress's request waits in the
    /// queue of a far holder that also serves its own region, and the whole region waits
    /// with it: in the simulator (10 × 200 nodes, 1 GiB) chunks still reached some region
    /// at 12 s of a 16.5 s run, and most nodes then starved for them. With
    /// `far_queue_patience` (1 s) and this at 6 s, 10 × 200 took 15.50, 15.91 and
    /// 16.19 s (three seeds) against 16.51, 16.52 and 16.35 s, but crossed into a region
    /// up to 1.10 times (1.15 at 10,000 nodes, 1.19 with a degraded region, 1.34 with
    /// 5% of nodes killed), where the issue allows 1.1: a backup cannot tell an ingress
    /// that has not started from one whose crossing is under way. At 10 s it costs no
    /// copies (1.07 and 1.06 in the same faults) and gains nothing without faults (16.17
    /// against 16.13 s): a safety net for an ingress that hangs, which `cross_region_patience`
    /// (every gateway at once) is too late and too broad for. At 4 s: 15.49 s, 1.17 copies.
    pub backup_ingress: Duration,
    /// A request across regions that has not started arriving after this long (it waits
    /// in a busy holder's queue) is cancelled and asked of a holder there that is free,
    /// if one is; the peer gets no strike. Alone it took 10 × 200 from 16.51 to 16.13 s
    /// (0.5 s: 16.66 s).
    pub far_queue_patience: Duration,
    /// Requests in flight to the origin (all its members together) across the swarm's
    /// fetching gateways: each asks at most this many divided by the gateways it knows
    /// (itself included), and at least one. The origin serves a few requests at once
    /// (two per member) and queues the rest; if each gateway asked three at once, the
    /// first gateways in the queues took every slot, and the origin's first chunks all
    /// went to two nodes out of 24 while the others waited with nothing to pass on. In
    /// the simulator one at a time took the testbed's shapes from 12.15, 12.32 and
    /// 12.60 s to 12.12, 12.02 and 12.39 s (3 × 4, 4 × 5, 3 × 8), with 416 chunks stored
    /// at 2 s instead of 266 (3 × 8), and left 10 × 200 as it was (16.92 s against
    /// 16.89 s; the origin's copies 1.05 against 1.12). A lone node still keeps several
    /// in flight, so that a far origin's round trips do not idle it.
    pub origin_parallel: usize,
}

impl FetchConfig {
    /// These settings for a release of `bytes`: the waits that guard against a slow or
    /// stuck ingress (`backup_ingress`, `cross_region_patience`, `origin_patience`) are
    /// stretched in proportion to its size past 1 GiB. A region takes a large release in
    /// through its gateways over a long time, and a chunk first held elsewhere at the
    /// start may wait its turn at its ingress for a minute without anything being
    /// wrong: with the 1 GiB waits, 10 GB to 10,000 simulated nodes crossed into a region
    /// up to 1.89 times and the origin sent 1.85 copies (500 nodes: 1.30 copies; 1.06
    /// with the waits stretched, 1.6% slower).
    pub fn for_release(mut self, bytes: u64) -> FetchConfig {
        let scale = (bytes as f64 / (1u64 << 30) as f64).max(1.0);
        for wait in [
            &mut self.backup_ingress,
            &mut self.cross_region_patience,
            &mut self.origin_patience,
        ] {
            *wait = wait.mul_f64(scale);
        }
        self
    }
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            per_peer: 1,
            total: 32,
            pace_window: Some(Duration::from_secs(4)),
            pace_floor: 4,
            request_timeout: Duration::from_secs(20),
            cross_region_patience: Duration::from_secs(30),
            origin_patience: Duration::from_secs(60),
            settle: Duration::from_secs(1),
            fanout: 2,
            turn_patience: Duration::from_secs(3),
            busy_backoff: Duration::from_secs(1),
            busy_backoff_floor: Duration::from_millis(50),
            max_strikes: 3,
            endgame_chunks: 4,
            max_arriving: Some(2),
            origin_parallel: 8,
            backup_ingress: Duration::from_secs(10),
            far_queue_patience: Duration::from_secs(1),
        }
    }
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Request {
        peer: PeerId,
        chunk: ChunkHash,
    },
    Cancel {
        peer: PeerId,
        chunk: ChunkHash,
    },
    /// Stop using this peer for this release (and close the connection if nothing else
    /// uses it).
    Disconnect {
        peer: PeerId,
        reason: String,
    },
    /// Tell `peer` to hold back this node's requests that wait for its upload slots
    /// (`hold`), or that it may send them again.
    Hold {
        peer: PeerId,
        hold: bool,
    },
    /// Every chunk is held and verified.
    Done,
}

#[derive(Debug)]
struct Peer {
    info: PeerInfo,
    /// Chunk index → when it was asked for.
    in_flight: BTreeMap<usize, Instant>,
    strikes: u32,
    salt: u64,
    /// It said it was busy (its upload queue is full): not asked again before then.
    busy_until: Option<Instant>,
}

/// One release being fetched by one node.
#[derive(Debug)]
pub struct Fetch {
    cfg: FetchConfig,
    started: Instant,
    chunks: Vec<ChunkHash>,
    index: HashMap<ChunkHash, usize, BuildHasherDefault<FastHasher>>,
    /// What this node knows of each chunk, in one place: a `Have` reads and writes
    /// most of it, for a node that is not in any cache.
    per_chunk: Vec<ChunkState>,
    missing: usize,
    /// Every chunk's `ChunkState::place` is worked out; again after the set of peers or
    /// their roles changed.
    places_known: bool,
    /// This node is a gateway of its region (the tracker says so): only gateways bring
    /// chunks into the region or out of the origin.
    gateway: bool,
    my_salt: u64,
    /// When the latest chunks arrived, for `pace_window`.
    arrivals: VecDeque<Instant>,
    /// Requests in flight, to all peers, by when they were made.
    requests: BTreeSet<(Instant, PeerId, usize)>,
    /// Those of `requests` made to peers in other regions.
    across: BTreeSet<(Instant, PeerId, usize)>,
    /// When peers that said they were busy may be asked again.
    busy_ends: BinaryHeap<Reverse<(Instant, PeerId)>>,
    /// When waits for chunks run out (see `wait_ends`), soonest first; entries that no
    /// longer hold are dropped as they come to the top.
    waits: BinaryHeap<Reverse<(Instant, usize)>>,
    peers: Peers,
    /// Which peers hold each chunk (the origin every one).
    holders: Holders,
    /// Peers dropped for this release: never used again.
    dropped: BTreeSet<PeerId>,
    actions: VecDeque<Action>,
    /// Decisions the events since the last `poll_action` call for.
    pending: Pending,
    done_said: bool,
    /// The latest time this fetch was told of.
    seen: Option<Instant>,
    /// When every chunk was last weighed (see `decide`).
    weighed_all: Option<Instant>,
    /// Chunks received, by where they came from.
    received: BTreeMap<Source, u64>,
    /// Requests whose chunk is arriving (the peer started sending it).
    arriving: BTreeSet<(PeerId, usize)>,
    /// Peers told to hold this node's waiting requests.
    holding: BTreeSet<PeerId>,
    /// Requests, arrivals or peers changed since the holds were last worked out.
    holds_changed: bool,
    /// The gateways of a tracker answer that said the view is complete: once each is
    /// connected (or dropped), the start has settled.
    final_gateways: Option<Vec<PeerId>>,
    /// The start settled before `settle` ran out: the view is final.
    settled: bool,
    /// Requests this node may have in flight to the origin (see
    /// `FetchConfig::origin_parallel`), worked out with `ingress`.
    origin_limit: usize,
}

impl Fetch {
    /// Node `me` fetches `chunks` (a release's chunk hashes; repeats are fetched once);
    /// `held` says which are already in its store.
    pub fn new(
        cfg: FetchConfig,
        me: &str,
        chunks: &[ChunkHash],
        held: impl Fn(&ChunkHash) -> bool,
        now: Instant,
    ) -> Fetch {
        let mut distinct = Vec::new();
        let mut index = HashMap::default();
        for c in chunks {
            index.entry(*c).or_insert_with(|| {
                distinct.push(*c);
                distinct.len() - 1
            });
        }
        let per_chunk: Vec<ChunkState> = distinct
            .iter()
            .map(|c| ChunkState {
                have: held(c),
                availability: 0,
                region_holders: 0,
                first_held: None,
                place: Place::UNKNOWN,
                ranked_at: None,
                asked: BTreeSet::new(),
                late: BTreeSet::new(),
            })
            .collect();
        let missing = per_chunk.iter().filter(|c| !c.have).count();
        let n = distinct.len();
        let mut f = Fetch {
            cfg,
            started: now,
            chunks: distinct,
            index,
            per_chunk,
            missing,
            places_known: false,
            gateway: true,
            my_salt: salt(me),
            arrivals: VecDeque::new(),
            requests: BTreeSet::new(),
            across: BTreeSet::new(),
            busy_ends: BinaryHeap::new(),
            waits: BinaryHeap::new(),
            peers: Peers::default(),
            holders: Holders::new(n),
            dropped: BTreeSet::new(),
            actions: VecDeque::new(),
            pending: Pending::Nothing,
            done_said: false,
            seen: None,
            weighed_all: None,
            received: BTreeMap::new(),
            arriving: BTreeSet::new(),
            holding: BTreeSet::new(),
            holds_changed: false,
            final_gateways: None,
            settled: false,
            origin_limit: 1,
        };
        f.schedule(now);
        f
    }

    /// Chunks still missing.
    pub fn missing(&self) -> usize {
        self.missing
    }

    /// How much of the release this node holds, in 256ths: what its requests tell an
    /// uploader, which serves those that hold least first.
    pub fn progress(&self) -> u8 {
        let n = self.chunks.len().max(1);
        ((n - self.missing.min(n)) * 255 / n) as u8
    }

    pub fn is_done(&self) -> bool {
        self.missing == 0
    }

    /// Chunks received from each kind of source.
    pub fn received(&self, from: Source) -> u64 {
        self.received.get(&from).copied().unwrap_or(0)
    }

    /// How many peers (not counting the origin) are known to hold `chunk`.
    pub fn holders(&self, chunk: &ChunkHash) -> u32 {
        self.index
            .get(chunk)
            .map_or(0, |&i| self.per_chunk[i].availability)
    }

    /// The peers known to hold `chunk`, the origin's members among them.
    pub fn holders_of(&self, chunk: &ChunkHash) -> impl Iterator<Item = PeerId> + '_ {
        self.index
            .get(chunk)
            .into_iter()
            .flat_map(|&i| self.holders.all(i))
            .filter_map(|slot| self.peers.at(slot).map(|p| p.info.id))
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }

    /// How long a peer that said it is busy is left alone (see
    /// [`FetchConfig::busy_backoff`]).
    fn busy_backoff(&self) -> Duration {
        let (Some(first), Some(last)) = (self.arrivals.front(), self.arrivals.back()) else {
            return self.cfg.busy_backoff;
        };
        let gaps = self.arrivals.len() as u32 - 1;
        let Some(chunk_time) = last.saturating_duration_since(*first).checked_div(gaps) else {
            return self.cfg.busy_backoff;
        };
        (chunk_time * BUSY_CHUNK_TIMES).clamp(self.cfg.busy_backoff_floor, self.cfg.busy_backoff)
    }

    /// How many requests may be in flight now.
    fn limit(&self) -> usize {
        match self.cfg.pace_window {
            None => self.cfg.total,
            Some(_) => self
                .arrivals
                .len()
                .clamp(self.cfg.pace_floor.min(self.cfg.total), self.cfg.total),
        }
    }

    /// Whether this node is a gateway of its region for this release (the tracker's
    /// answer; a fetch starts as one).
    pub fn handle_gateway(&mut self, now: Instant, gateway: bool) {
        if self.gateway != gateway {
            self.gateway = gateway;
            self.places_known = false;
            self.schedule(now);
        }
    }

    pub fn handle_peer(&mut self, now: Instant, info: PeerInfo) {
        if self.dropped.contains(&info.id) || self.peers.contains_key(&info.id) {
            return;
        }
        let (source, origin) = (info.source, info.source == Source::Origin);
        let peer_salt = salt(&info.node);
        let slot = self.peers.insert(Peer {
            info,
            in_flight: BTreeMap::new(),
            strikes: 0,
            salt: peer_salt,
            busy_until: None,
        });
        self.holders.make_room(slot);
        self.holders.mark(Mark::Tier(source), slot, true);
        if origin {
            for i in 0..self.chunks.len() {
                self.holders.insert(i, slot);
            }
        }
        self.places_known = false;
        self.check_settled();
        self.schedule(now);
    }

    /// The tracker says these are the final gateways (of this node's region, and of every
    /// region if this node is one), drawn from the repository's nodes whether or not they
    /// have seen the goal yet. Once each of them is connected, every node's view of who
    /// brings which chunk in agrees, and the start has settled: the origin need not idle
    /// for the whole of `settle`.
    pub fn handle_view_complete(&mut self, now: Instant, gateways: Vec<PeerId>) {
        if self.settled {
            return;
        }
        self.final_gateways = Some(gateways);
        self.check_settled();
        if self.settled {
            self.schedule(now);
        }
    }

    fn check_settled(&mut self) {
        self.settled |= self.final_gateways.as_ref().is_some_and(|g| {
            g.iter()
                .all(|p| self.peers.contains_key(p) || self.dropped.contains(p))
        });
    }

    /// Whether this node may look beyond its region yet (see `FetchConfig::settle`).
    fn has_settled(&self, now: Instant) -> bool {
        self.settled || now >= self.started + self.cfg.settle
    }

    /// The tracker's latest answer: the peers it `named`, each with whether it is
    /// fetching this release and whether it is a gateway of its region. Every answer
    /// names the gateways this node needs to know of, so a known peer it does not name
    /// as one is none (any more). A peer first known as idle that started to fetch takes
    /// its place in the region's order from now on; one that finished stays a partner.
    /// (The gateways change only as nodes join, leave or fail to start; until every
    /// node's view agrees again, views of who is a chunk's ingress differ, and a chunk
    /// may cross twice, or wait.)
    pub fn handle_roles(&mut self, now: Instant, named: &BTreeMap<PeerId, (bool, bool)>) {
        let mut changed = false;
        for p in self
            .peers
            .values_mut()
            .filter(|p| p.info.source != Source::Origin)
        {
            let (fetching, gateway) = named.get(&p.info.id).copied().unwrap_or_default();
            let role = (p.info.fetching || fetching, gateway);
            if (p.info.fetching, p.info.gateway) != role {
                (p.info.fetching, p.info.gateway) = role;
                changed = true;
            }
        }
        if changed {
            self.places_known = false;
            self.schedule(now);
        }
    }

    /// `peer` says it holds `chunks` (all it holds, or newly stored ones).
    pub fn handle_have(&mut self, now: Instant, peer: PeerId, chunks: &[ChunkHash]) {
        let Some((slot, p)) = self.peers.get_with_slot(&peer) else {
            return;
        };
        let mut news = Vec::new();
        for c in chunks {
            if let Some(&i) = self.index.get(c) {
                if self.holders.insert(i, slot) && p.info.source != Source::Origin {
                    self.per_chunk[i].availability += 1;
                    self.per_chunk[i].first_held.get_or_insert(now);
                    if p.info.source == Source::SameRegion {
                        self.per_chunk[i].region_holders += 1;
                    }
                    // Only the chunks it names that this node lacks can have become
                    // worth asking for: the rest were weighed at the last event or
                    // timer, and nothing they depend on changed. (Near the end, the
                    // endgame looks at every chunk.)
                    if !self.per_chunk[i].have {
                        news.push(i);
                    }
                }
            }
        }
        if news.is_empty() {
            return;
        }
        for &i in &news {
            self.wait_changed(i, now);
        }
        if self.missing <= self.cfg.endgame_chunks {
            self.schedule(now);
        } else {
            self.schedule_among(now, news);
        }
    }

    /// `chunk` arrived from `peer`; `verified` says whether its bytes hash to its name
    /// (the driver checked and, if so, stored it).
    pub fn handle_chunk(&mut self, now: Instant, peer: PeerId, chunk: &ChunkHash, verified: bool) {
        let Some(i) = self.end_request(peer, chunk) else {
            return;
        };
        if !verified {
            // Other requests to a dropped peer may still answer; it is dropped once.
            if self.peers.contains_key(&peer) {
                self.drop_peer(
                    now,
                    peer,
                    format!("sent chunk {chunk} with the wrong bytes"),
                );
            }
            self.schedule(now);
            return;
        }
        if !self.per_chunk[i].have {
            self.per_chunk[i].have = true;
            self.missing -= 1;
            if let Some(w) = self.cfg.pace_window {
                self.arrivals.push_back(now);
                while self
                    .arrivals
                    .front()
                    .is_some_and(|t| now.saturating_duration_since(*t) > w)
                {
                    self.arrivals.pop_front();
                }
            }
            if let Some(p) = self.peers.get(&peer) {
                *self.received.entry(p.info.source).or_default() += 1;
            }
            // The endgame's other copies are no longer wanted.
            for other in self.per_chunk[i].asked.clone() {
                self.end_request(other, chunk);
                self.actions.push_back(Action::Cancel {
                    peer: other,
                    chunk: *chunk,
                });
            }
        }
        self.schedule(now);
    }

    /// `peer` started sending `chunk` (its first bytes came).
    pub fn handle_arriving(&mut self, peer: PeerId, chunk: &ChunkHash) {
        let Some(&i) = self.index.get(chunk) else {
            return;
        };
        if self
            .peers
            .get(&peer)
            .is_some_and(|p| p.in_flight.contains_key(&i))
        {
            self.arriving.insert((peer, i));
            self.holds_changed = true;
        }
    }

    /// `peer` will not send `chunk` (it does not hold it after all, or is too busy).
    pub fn handle_refused(&mut self, now: Instant, peer: PeerId, chunk: &ChunkHash) {
        let was_full = self.requests.len() >= self.limit();
        let Some(i) = self.end_request(peer, chunk) else {
            return;
        };
        let mut freed = vec![i];
        if let Some((slot, p)) = self.peers.get_with_slot(&peer) {
            if p.info.source != Source::Origin && self.holders.remove(i, slot) {
                self.per_chunk[i].availability -= 1;
                if p.info.source == Source::SameRegion {
                    self.per_chunk[i].region_holders -= 1;
                }
            }
            // The peer is free to be asked for what else it holds.
            freed.extend(self.holders.held_by(slot));
        }
        self.wait_changed(i, now);
        self.schedule_after_request(now, was_full, freed);
    }

    /// `peer` holds `chunk` but has no upload slot free: ask someone else first, and this
    /// peer again only if nobody else can.
    pub fn handle_busy(&mut self, now: Instant, peer: PeerId, chunk: &ChunkHash) {
        let was_full = self.requests.len() >= self.limit();
        let Some(i) = self.end_request(peer, chunk) else {
            return;
        };
        self.per_chunk[i].late.insert(peer);
        if let Some(slot) = self.peers.slot(&peer) {
            let until = now + self.busy_backoff();
            if let Some(p) = self.peers.slots[slot].as_mut() {
                p.busy_until = Some(until);
            }
            self.busy_ends.push(Reverse((until, peer)));
            self.holders.mark(Mark::Busy, slot, true);
        }
        self.schedule_after_request(now, was_full, vec![i]);
    }

    /// A request ended without its chunk. If the node had no room for requests, any
    /// chunk may be asked for now; if it had, only `freed` can have become worth asking
    /// for (the chunk, and what a peer that is free again holds). Near the end, the
    /// endgame looks at every chunk.
    fn schedule_after_request(&mut self, now: Instant, was_full: bool, freed: Vec<usize>) {
        if was_full || self.missing <= self.cfg.endgame_chunks {
            self.schedule(now);
        } else {
            self.schedule_among(now, freed);
        }
    }

    /// The request for `chunk` to `peer` is over, however it ended; the chunk's index.
    fn end_request(&mut self, peer: PeerId, chunk: &ChunkHash) -> Option<usize> {
        let i = *self.index.get(chunk)?;
        if let Some(p) = self.peers.get_mut(&peer) {
            if let Some(at) = p.in_flight.remove(&i) {
                self.requests.remove(&(at, peer, i));
                self.across.remove(&(at, peer, i));
            }
            self.note_load(peer);
        }
        self.per_chunk[i].asked.remove(&peer);
        self.arriving.remove(&(peer, i));
        self.holds_changed = true;
        Some(i)
    }

    /// The connection to `peer` ended: what it was asked is asked of others.
    pub fn handle_peer_gone(&mut self, now: Instant, peer: PeerId) {
        self.forget(now, peer);
        self.schedule(now);
    }

    /// Time passed: requests that took too long go to someone else, and waits for a
    /// chunk to appear in the region may have run out.
    pub fn handle_timeout(&mut self, now: Instant) {
        let (timeout, patience) = (self.cfg.request_timeout, self.cfg.far_queue_patience);
        // The requests that end now, each once, and whether its peer gets a strike: one
        // that timed out (unless held at this node's word: its clock starts again when
        // the hold ends), or — no strike — a crossing still queued after
        // `far_queue_patience` that a free holder there can take instead.
        let ended: Vec<(PeerId, usize, bool)> = self
            .requests
            .iter()
            .take_while(|(at, _, _)| now.saturating_duration_since(*at) >= timeout.min(patience))
            .filter_map(|&(at, peer, i)| {
                let waited = now.saturating_duration_since(at);
                if waited >= timeout && !self.holding.contains(&peer) {
                    Some((peer, i, true))
                } else {
                    let movable = waited >= patience
                        && self.queued_across(peer, i)
                        && self.holders.of(i, Source::OtherRegion, false).any(|slot| {
                            self.peers
                                .at(slot)
                                .is_some_and(|q| q.info.id != peer && self.is_free(q, now))
                        });
                    movable.then_some((peer, i, false))
                }
            })
            .collect();
        for (peer, i, strike) in ended {
            let chunk = self.chunks[i];
            self.end_request(peer, &chunk);
            self.per_chunk[i].late.insert(peer);
            let Some(p) = self.peers.get_mut(&peer) else {
                continue;
            };
            p.strikes += u32::from(strike);
            let strikes = p.strikes;
            self.actions.push_back(Action::Cancel { peer, chunk });
            if strike && strikes >= self.cfg.max_strikes {
                self.drop_peer(now, peer, format!("{strikes} requests timed out"));
            }
        }
        self.schedule(now);
    }

    /// The next thing to do. Call it until it returns `None` after every event: the
    /// decisions the events call for are made here.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.decide();
        if std::mem::take(&mut self.holds_changed) {
            self.update_holds();
        }
        self.actions.pop_front()
    }

    /// Tell the peers of the region where requests wait to hold them while
    /// `max_arriving` chunks arrive, and to send again once fewer do.
    fn update_holds(&mut self) {
        let full = self
            .cfg
            .max_arriving
            .is_some_and(|m| self.arriving.len() >= m && !self.is_done());
        if !full {
            let now = self.seen.unwrap_or(self.started);
            for peer in std::mem::take(&mut self.holding) {
                self.actions.push_back(Action::Hold { peer, hold: false });
                self.restart_waiting_clocks(peer, now);
            }
            return;
        }
        for &(_, peer, i) in &self.requests {
            if self.arriving.contains(&(peer, i)) || self.holding.contains(&peer) {
                continue;
            }
            if self
                .peers
                .get(&peer)
                .is_some_and(|p| p.info.source == Source::SameRegion)
            {
                self.holding.insert(peer);
                self.actions.push_back(Action::Hold { peer, hold: true });
            }
        }
    }

    /// The requests waiting at `peer` (not arriving) count their time from `now`.
    fn restart_waiting_clocks(&mut self, peer: PeerId, now: Instant) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        for (&i, at) in p.in_flight.iter_mut() {
            if !self.arriving.contains(&(peer, i)) && self.requests.remove(&(*at, peer, i)) {
                if self.across.remove(&(*at, peer, i)) {
                    self.across.insert((now, peer, i));
                }
                *at = now;
                self.requests.insert((now, peer, i));
            }
        }
    }

    /// When to call [`Fetch::handle_timeout`] next, if ever (valid once `poll_action`
    /// returned `None`): when the oldest request
    /// times out, the start's settling ends, a busy peer may be asked again, or a wait
    /// for a chunk to reach the region runs out.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_done() {
            return None;
        }
        let oldest_request = self
            .requests
            .iter()
            .find(|(_, peer, _)| !self.holding.contains(peer))
            .map(|(at, _, _)| *at + self.cfg.request_timeout);
        let oldest_queued_across = self
            .across
            .iter()
            .find(|(_, peer, i)| !self.arriving.contains(&(*peer, *i)))
            .map(|(at, _, _)| *at + self.cfg.far_queue_patience);
        // A chunk held somewhere: its wait for a turn in the region (if the region has
        // it) or for the region to get it runs out. (The soonest may be of a chunk asked
        // for meanwhile: waking for it does no harm.)
        let cross = self.waits.peek().map(|Reverse((t, _))| *t);
        let busy = self.busy_ends.peek().map(|Reverse((t, _))| *t);
        let waits = cross
            .into_iter()
            .chain(busy)
            .chain(oldest_queued_across)
            .chain([
                self.started + self.cfg.settle,
                self.started + self.cfg.origin_patience,
            ]);
        // Waits already over were acted on when they ended.
        let open = waits.filter(|t| Some(*t) > self.seen);
        oldest_request.into_iter().chain(open).min()
    }

    /// The request for chunk `i` at `peer` crosses regions and waits in the peer's queue
    /// (nothing of it has arrived).
    fn queued_across(&self, peer: PeerId, i: usize) -> bool {
        !self.arriving.contains(&(peer, i))
            && self
                .peers
                .get(&peer)
                .is_some_and(|p| p.info.source == Source::OtherRegion)
    }

    fn drop_peer(&mut self, now: Instant, peer: PeerId, reason: String) {
        self.forget(now, peer);
        self.dropped.insert(peer);
        self.actions.push_back(Action::Disconnect { peer, reason });
    }

    fn forget(&mut self, now: Instant, peer: PeerId) {
        let Some((slot, p)) = self.peers.remove(&peer) else {
            return;
        };
        self.places_known = false;
        self.holders.clear_marks(slot);
        let held: Vec<usize> = self.holders.held_by(slot).collect();
        for i in held {
            // The slot goes to the next peer empty.
            self.holders.remove(i, slot);
            if p.info.source != Source::Origin {
                self.per_chunk[i].availability -= 1;
                if p.info.source == Source::SameRegion {
                    self.per_chunk[i].region_holders -= 1;
                    self.wait_changed(i, now);
                }
            }
        }
        for (&i, &at) in &p.in_flight {
            self.requests.remove(&(at, peer, i));
            self.across.remove(&(at, peer, i));
            self.per_chunk[i].asked.remove(&peer);
            self.arriving.remove(&(peer, i));
        }
        self.holding.remove(&peer);
        self.holds_changed = true;
    }

    /// For every chunk: this node's rank among itself and its fetching peers in the
    /// region, and whether it is the rendezvous pick among itself and the region's
    /// gateways, and among itself and every gateway (the swarm's). A gateway counts
    /// before it starts to fetch: the tracker names the final gateways from the first
    /// answer, and a view of who brings which chunk in that waited for each of them to
    /// start would change as they did.
    fn work_out_ingress(&self) -> Vec<Place> {
        let salts = |keep: &dyn Fn(&Peer) -> bool| -> Vec<u64> {
            self.peers
                .values()
                .filter(|p| keep(p))
                .map(|p| p.salt)
                .collect()
        };
        let near = |p: &Peer| p.info.source == Source::SameRegion;
        let region = salts(&|p| near(p) && p.info.fetching);
        let gateways = salts(&|p| near(p) && p.info.gateway);
        let swarm = salts(&|p| p.info.source != Source::Origin && p.info.gateway);
        let me = self.my_salt;
        self.chunks
            .iter()
            .map(|c| Place {
                turn: rank_salted(c, me, &region),
                region_rank: if self.gateway {
                    rank_salted(c, me, &gateways)
                } else {
                    usize::MAX
                },
                swarm_ingress: self.gateway && rank_salted(c, me, &swarm) == 0,
            })
            .collect()
    }

    /// After the set of peers or their roles changed: this node's places, its share of
    /// the origin, and the waits that depend on its place.
    fn work_out_places(&mut self, now: Instant) {
        let places = self.work_out_ingress();
        for (c, place) in self.per_chunk.iter_mut().zip(places) {
            if c.place.region_rank != place.region_rank {
                c.ranked_at = Some(now);
            }
            c.place = place;
        }
        self.places_known = true;
        let gateways = self
            .peers
            .values()
            .filter(|p| p.info.source != Source::Origin && p.info.gateway && p.info.fetching)
            .count()
            + usize::from(self.gateway);
        self.origin_limit = self.cfg.origin_parallel.div_ceil(gateways.max(1)).max(1);
        // How long a chunk held elsewhere waits to reach the region depends on this
        // node's rank among the region's gateways.
        for i in 0..self.chunks.len() {
            if self.per_chunk[i].region_holders == 0 && self.per_chunk[i].first_held.is_some() {
                self.wait_changed(i, now);
            }
        }
    }

    fn is_ingress(&self, i: usize) -> (bool, bool) {
        let p = self.place(i);
        (p.region_rank == 0, p.swarm_ingress)
    }

    fn place(&self, i: usize) -> Place {
        if self.places_known {
            self.per_chunk[i].place
        } else {
            Place::UNKNOWN
        }
    }

    /// When this node stops waiting for chunk `i`, held somewhere: for its turn in the
    /// region if the region has it, for the region to get it if not.
    fn wait_ends(&self, i: usize) -> Option<Instant> {
        let held = self.per_chunk[i].first_held?;
        if self.per_chunk[i].region_holders > 0 {
            Some(held + self.cfg.turn_patience)
        } else {
            self.cross_wait_ends(i)
        }
    }

    /// When this node may fetch chunk `i`, held somewhere, across regions itself. A
    /// backup counts from when the gateways above it took their ranks: when the ingress
    /// dies the next one takes over at once, and the one after it waits a period from
    /// then, not from when the chunk was first held (with 5% of 2,000 simulated nodes
    /// killed, both crossed at the same instant, as every peer notices a death at once).
    fn cross_wait_ends(&self, i: usize) -> Option<Instant> {
        let c = &self.per_chunk[i];
        let held = c.first_held?;
        Some(held.max(c.ranked_at.unwrap_or(held)) + self.cross_wait(i))
    }

    /// How long this node waits for chunk `i`, held somewhere, to reach the region
    /// before fetching it across regions itself (see `wait_ends`): not at all if it is
    /// the region's ingress for it, `backup_ingress` times its rank among the region's
    /// gateways if it is another gateway, `cross_region_patience` at most.
    fn cross_wait(&self, i: usize) -> Duration {
        let rank = u32::try_from(self.place(i).region_rank).unwrap_or(u32::MAX);
        self.cfg
            .backup_ingress
            .saturating_mul(rank)
            .min(self.cfg.cross_region_patience)
    }

    /// Chunk `i`'s wait may have changed: its new end goes on the heap, unless it is
    /// over already (then the chunk is weighed at the coming decision: every caller
    /// schedules it).
    fn wait_changed(&mut self, i: usize, now: Instant) {
        if let Some(t) = self
            .wait_ends(i)
            .filter(|t| !self.per_chunk[i].have && *t > now)
        {
            self.waits.push(Reverse((t, i)));
        }
    }

    /// Whether chunk `i` has reached enough of the region for this node to fetch it
    /// there: the region takes a new chunk in its rendezvous order, `fanout` more nodes
    /// per holder, so that each holder serves a few at full speed and the chunk spreads
    /// as a tree, instead of every node queueing at its first holder. A node whose turn
    /// has not come fetches other chunks meanwhile; after `turn_patience` anyone may.
    fn my_turn(&self, i: usize, now: Instant) -> bool {
        let holders = self.per_chunk[i].region_holders as usize;
        self.place(i).turn < holders.saturating_mul(self.cfg.fanout + 1)
            || self.per_chunk[i]
                .first_held
                .is_some_and(|t| now.saturating_duration_since(t) >= self.cfg.turn_patience)
    }

    /// Whether this node may ask a peer of `source` for chunk `i` now.
    fn may_ask(&self, i: usize, source: Source, now: Instant) -> bool {
        if source != Source::SameRegion && !self.has_settled(now) {
            return false;
        }
        match source {
            Source::SameRegion => self.my_turn(i, now),
            Source::OtherRegion => {
                self.is_ingress(i).0 || self.cross_wait_ends(i).is_some_and(|t| now >= t)
            }
            // The origin only for what no peer anywhere has.
            Source::Origin => {
                self.per_chunk[i].availability == 0
                    && (self.is_ingress(i).1
                        || now.saturating_duration_since(self.started) >= self.cfg.origin_patience)
            }
        }
    }

    /// Whether any peer may be asked for chunk `i`, asked of nobody yet: a quick answer
    /// for most chunks, without looking at every peer. The nearest tier that holds it
    /// is the only one `choose_peer` would take (a busy holder nearer is waited for), so
    /// that tier must be allowed.
    fn may_ask_anyone(&self, i: usize, now: Instant) -> bool {
        let tier = if self.per_chunk[i].region_holders > 0 {
            Source::SameRegion
        } else if self.per_chunk[i].availability > 0 {
            Source::OtherRegion
        } else {
            Source::Origin
        };
        self.may_ask(i, tier, now)
    }

    /// The peer to ask for chunk `i`: the nearest tier allowed, then the least loaded,
    /// then a per-chunk spread; never one already asked for it. A nearer peer that has
    /// it but is busy is worth waiting for: only the nearest tier where a peer holds it
    /// (busy or not) and was not asked for it is looked at. Most calls find every holder
    /// of that tier busy, which the masks tell without visiting one.
    fn choose_peer(&self, i: usize, now: Instant) -> Option<PeerId> {
        let chunk = &self.chunks[i];
        let (asked, late) = (&self.per_chunk[i].asked, &self.per_chunk[i].late);
        let not_asked = |slot: usize| {
            asked.is_empty()
                || self
                    .peers
                    .at(slot)
                    .is_some_and(|p| !asked.contains(&p.info.id))
        };
        let tier = [Source::SameRegion, Source::OtherRegion, Source::Origin]
            .into_iter()
            .find(|&t| self.holders.of(i, t, false).any(not_asked))?;
        let mut best: Option<(bool, usize, u64, PeerId)> = None;
        for p in self
            .holders
            .of(i, tier, true)
            .filter_map(|slot| self.peers.at(slot))
        {
            let id = &p.info.id;
            // The masks left out the peers that may not be asked now.
            debug_assert!(self.is_free(p, now));
            if asked.contains(id) {
                continue;
            }
            let key = (
                late.contains(id),
                p.in_flight.len(),
                spread(chunk, p.salt),
                *id,
            );
            if best.as_ref().is_none_or(|b| key < *b) {
                best = Some(key);
            }
        }
        let (_, _, _, id) = best?;
        if !self.may_ask(i, tier, now) {
            return None;
        }
        // The origin is the farthest tier: counted only when it is the choice.
        if tier == Source::Origin && self.origin_requests() >= self.origin_limit {
            return None;
        }
        Some(id)
    }

    /// Whether `peer` has as many requests as it may take from this node, for the masks.
    fn note_load(&mut self, peer: PeerId) {
        if let Some((slot, p)) = self.peers.get_with_slot(&peer) {
            let full = p.in_flight.len() >= self.cfg.per_peer;
            self.holders.mark(Mark::Full, slot, full);
        }
    }

    /// Whether `p` may be asked now: it has room for a request and did not just say it
    /// is busy.
    fn is_free(&self, p: &Peer, now: Instant) -> bool {
        p.in_flight.len() < self.cfg.per_peer && p.busy_until.is_none_or(|t| t <= now)
    }

    /// Requests in flight to the origin's members.
    fn origin_requests(&self) -> usize {
        self.peers
            .values()
            .filter(|p| p.info.source == Source::Origin)
            .map(|p| p.in_flight.len())
            .sum()
    }

    fn ask(&mut self, i: usize, peer: PeerId, now: Instant) {
        if let Some(p) = self.peers.get_mut(&peer) {
            if let Some(before) = p.in_flight.insert(i, now) {
                self.requests.remove(&(before, peer, i));
                self.across.remove(&(before, peer, i));
            }
            self.requests.insert((now, peer, i));
            if p.info.source == Source::OtherRegion {
                self.across.insert((now, peer, i));
            }
            self.note_load(peer);
        }
        self.per_chunk[i].asked.insert(peer);
        self.holds_changed = true;
        self.actions.push_back(Action::Request {
            peer,
            chunk: self.chunks[i],
        });
    }

    /// Decide again at the next `poll_action`, over every chunk.
    fn schedule(&mut self, now: Instant) {
        self.seen = self.seen.max(Some(now));
        self.pending = Pending::Every;
    }

    /// Decide again at the next `poll_action`, over `chunks` (unless over every chunk).
    fn schedule_among(&mut self, now: Instant, chunks: Vec<usize>) {
        self.seen = self.seen.max(Some(now));
        match &mut self.pending {
            Pending::Every => {}
            Pending::Among(v) => v.extend(chunks),
            Pending::Nothing => self.pending = Pending::Among(chunks),
        }
    }

    /// Make the decisions that events since the last ones call for: ask for whatever may
    /// be asked for now, rarest first, then (over every chunk) the endgame's second
    /// copies. Deciding once after a burst of events (a tracker answer's peers, a batch
    /// of `Have`s) costs one pass instead of one per event.
    fn decide(&mut self) {
        let Some(now) = self.seen else {
            return;
        };
        let mut pending = std::mem::replace(&mut self.pending, Pending::Nothing);
        // A wait that ran out makes any chunk worth weighing again. Its timer may not
        // have come first: a real timer fires late, and an event of the same instant
        // may come before it.
        if matches!(pending, Pending::Among(_)) && self.a_wait_ended(now) {
            pending = Pending::Every;
        }
        let candidates = match pending {
            Pending::Nothing => return,
            Pending::Among(v) => v,
            Pending::Every => {
                self.weighed_all = Some(now);
                let every = (0..self.chunks.len()).collect();
                if let Some(room) = self.ask_among(now, every) {
                    self.endgame(now, room);
                }
                return;
            }
        };
        self.ask_among(now, candidates);
    }

    /// Ask for whatever of `candidates` may be asked for now, rarest first; the room for
    /// requests left, if any.
    fn ask_among(&mut self, now: Instant, mut candidates: Vec<usize>) -> Option<usize> {
        if !self.places_known {
            self.work_out_places(now);
        }
        self.drop_stale_waits();
        if self.missing == 0 {
            if !self.done_said {
                self.done_said = true;
                self.actions.push_back(Action::Done);
            }
            return None;
        }
        let mut room = self.limit().saturating_sub(self.requests.len());
        if room == 0 {
            return None;
        }
        // Rarest first; the spread makes nodes with the same view choose differently.
        candidates.sort_unstable();
        candidates.dedup();
        candidates.retain(|&i| !self.per_chunk[i].have && self.per_chunk[i].asked.is_empty());
        let me = self.my_salt;
        candidates
            .sort_by_cached_key(|&i| (self.per_chunk[i].availability, spread(&self.chunks[i], me)));
        for i in candidates {
            if room == 0 {
                return None;
            }
            if !self.may_ask_anyone(i, now) {
                continue;
            }
            if let Some(peer) = self.choose_peer(i, now) {
                self.ask(i, peer, now);
                room -= 1;
            }
        }
        Some(room)
    }

    /// Whether a wait ran out by `now` since every chunk was last weighed: a chunk's
    /// (its entries that no longer hold leave the heap), a busy peer's, the start's
    /// settling or the origin's patience.
    fn a_wait_ended(&mut self, now: Instant) -> bool {
        while let Some(Reverse((t, i))) = self.waits.peek().copied() {
            if self.wait_holds(t, i) {
                break;
            }
            self.waits.pop();
        }
        let crossed = |t: Instant| t <= now && self.weighed_all.is_none_or(|w| t > w);
        self.waits.peek().is_some_and(|Reverse((t, _))| *t <= now)
            || self
                .busy_ends
                .peek()
                .is_some_and(|Reverse((t, _))| *t <= now)
            || crossed(self.started + self.cfg.settle)
            || crossed(self.started + self.cfg.origin_patience)
    }

    /// Whether the wait for chunk `i` that ends at `t` still holds: the chunk has not
    /// arrived and the wait's end has not moved.
    fn wait_holds(&self, t: Instant, i: usize) -> bool {
        !self.per_chunk[i].have && self.wait_ends(i) == Some(t)
    }

    /// Waits that ended, or whose chunk arrived or whose end moved, leave the heaps.
    fn drop_stale_waits(&mut self) {
        while let Some(Reverse((t, peer))) = self.busy_ends.peek().copied() {
            if Some(t) > self.seen {
                break;
            }
            self.busy_ends.pop();
            if let Some((slot, p)) = self.peers.get_with_slot(&peer) {
                if p.busy_until.is_none_or(|t| Some(t) <= self.seen) {
                    self.holders.mark(Mark::Busy, slot, false);
                }
            }
        }
        while let Some(Reverse((t, i))) = self.waits.peek().copied() {
            if Some(t) > self.seen && self.wait_holds(t, i) {
                return;
            }
            self.waits.pop();
        }
    }

    /// The last few chunks are all in flight: ask a second peer in the region for each
    /// (never a second copy across regions or from the origin).
    fn endgame(&mut self, now: Instant, mut room: usize) {
        let all_asked = (0..self.chunks.len())
            .all(|i| self.per_chunk[i].have || !self.per_chunk[i].asked.is_empty());
        if !all_asked || self.missing > self.cfg.endgame_chunks {
            return;
        }
        let pending: Vec<usize> = (0..self.chunks.len())
            .filter(|&i| !self.per_chunk[i].have && self.per_chunk[i].asked.len() == 1)
            .collect();
        for i in pending {
            if room == 0 {
                return;
            }
            let second = self.choose_peer(i, now).filter(|p| {
                self.peers
                    .get(p)
                    .is_some_and(|p| p.info.source == Source::SameRegion)
            });
            if let Some(peer) = second {
                self.ask(i, peer, now);
                room -= 1;
            }
        }
    }
}

/// Hashes a key by its first eight bytes, mixed by a multiply. A BLAKE3 digest is
/// uniform already, and finding many chunks that share 64 bits is out of reach, so
/// SipHash (a third of the time of a `Have`) buys nothing; peer ids are small counters,
/// which the multiply spreads over both ends of the hash, as a hash table files keys.
#[derive(Default)]
struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut first = [0u8; 8];
        let n = bytes.len().min(8);
        first[..n].copy_from_slice(&bytes[..n]);
        self.write_u64(u64::from_le_bytes(first));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The peers of a fetch, each in a slot of its own while it is known (a slot is reused
/// once its peer is forgotten), so that the holders of a chunk can be a row of bits
/// over the slots ([`Holders`]). Ids find their slots through a hash table: a `Have`
/// looks its sender up, and a binary search touched a cache line per step.
#[derive(Debug, Default)]
struct Peers {
    slots: Vec<Option<Peer>>,
    ids: HashMap<PeerId, usize, BuildHasherDefault<FastHasher>>,
}

impl Peers {
    fn slot(&self, id: &PeerId) -> Option<usize> {
        self.ids.get(id).copied()
    }

    fn contains_key(&self, id: &PeerId) -> bool {
        self.slot(id).is_some()
    }

    fn at(&self, slot: usize) -> Option<&Peer> {
        self.slots.get(slot)?.as_ref()
    }

    fn get(&self, id: &PeerId) -> Option<&Peer> {
        self.at(self.slot(id)?)
    }

    fn get_mut(&mut self, id: &PeerId) -> Option<&mut Peer> {
        let slot = self.slot(id)?;
        self.slots[slot].as_mut()
    }

    fn get_with_slot(&self, id: &PeerId) -> Option<(usize, &Peer)> {
        let slot = self.slot(id)?;
        Some((slot, self.at(slot)?))
    }

    /// Add `peer` (whose id is not known yet); its slot.
    fn insert(&mut self, peer: Peer) -> usize {
        let id = peer.info.id;
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(free) => {
                self.slots[free] = Some(peer);
                free
            }
            None => {
                self.slots.push(Some(peer));
                self.slots.len() - 1
            }
        };
        self.ids.insert(id, slot);
        slot
    }

    fn remove(&mut self, id: &PeerId) -> Option<(usize, Peer)> {
        let slot = self.ids.remove(id)?;
        Some((slot, self.slots[slot].take()?))
    }

    fn values(&self) -> impl Iterator<Item = &Peer> {
        self.slots.iter().flatten()
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut Peer> {
        self.slots.iter_mut().flatten()
    }
}

/// Which peer slots hold each chunk: a row of bits per chunk; and masks over the slots:
/// each tier's, and the slots that may not be asked now (full of this node's requests,
/// or busy). Choosing a peer for a chunk visits its free holders of one tier only, not
/// every peer (a node knows a hundred or more).
#[derive(Debug)]
struct Holders {
    /// Words per chunk's row, and per mask.
    words: usize,
    bits: Vec<u64>,
    chunks: usize,
    /// `MARKS` masks of `words` each, by `Mark::index`.
    masks: Vec<u64>,
}

/// A mask over the peer slots (see `Holders`).
#[derive(Debug, Clone, Copy)]
enum Mark {
    Tier(Source),
    Full,
    Busy,
}

const MARKS: usize = 5;

impl Mark {
    fn index(self) -> usize {
        match self {
            Mark::Tier(t) => t as usize,
            Mark::Full => 3,
            Mark::Busy => 4,
        }
    }
}

impl Holders {
    fn new(chunks: usize) -> Holders {
        Holders {
            words: 1,
            bits: vec![0; chunks],
            chunks,
            masks: vec![0; MARKS],
        }
    }

    /// Widen the rows, if need be, to hold `slot`.
    fn make_room(&mut self, slot: usize) {
        let words = (slot + 1).div_ceil(64);
        if words <= self.words {
            return;
        }
        let widen = |old: &[u64], rows: usize| {
            let mut new = vec![0; rows * words];
            for (i, row) in old.chunks(self.words).enumerate() {
                new[i * words..i * words + self.words].copy_from_slice(row);
            }
            new
        };
        (self.bits, self.masks) = (widen(&self.bits, self.chunks), widen(&self.masks, MARKS));
        self.words = words;
    }

    fn mark(&mut self, mark: Mark, slot: usize, on: bool) {
        let word = &mut self.masks[mark.index() * self.words + slot / 64];
        if on {
            *word |= 1 << (slot % 64);
        } else {
            *word &= !(1 << (slot % 64));
        }
    }

    fn clear_marks(&mut self, slot: usize) {
        for mark in 0..MARKS {
            self.masks[mark * self.words + slot / 64] &= !(1 << (slot % 64));
        }
    }

    /// Word `w` of chunk `i`'s holders in `tier`, only those free to be asked if `free`.
    fn word(&self, i: usize, w: usize, tier: Source, free: bool) -> u64 {
        let m = |mark: Mark| self.masks[mark.index() * self.words + w];
        let mut word = self.bits[i * self.words + w] & m(Mark::Tier(tier));
        if free {
            word &= !(m(Mark::Full) | m(Mark::Busy));
        }
        word
    }

    fn contains(&self, i: usize, slot: usize) -> bool {
        self.bits[i * self.words + slot / 64] & (1 << (slot % 64)) != 0
    }

    /// Whether `slot` did not hold `i` before.
    fn insert(&mut self, i: usize, slot: usize) -> bool {
        let had = self.contains(i, slot);
        self.bits[i * self.words + slot / 64] |= 1 << (slot % 64);
        !had
    }

    /// Whether `slot` held `i`.
    fn remove(&mut self, i: usize, slot: usize) -> bool {
        let had = self.contains(i, slot);
        self.bits[i * self.words + slot / 64] &= !(1 << (slot % 64));
        had
    }

    /// The slots of `tier` that hold chunk `i`, only those free to be asked if `free`.
    fn of(&self, i: usize, tier: Source, free: bool) -> impl Iterator<Item = usize> + '_ {
        set_bits((0..self.words).map(move |w| self.word(i, w, tier, free)))
    }

    /// The slots that hold chunk `i`.
    fn all(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        set_bits(
            self.bits[i * self.words..(i + 1) * self.words]
                .iter()
                .copied(),
        )
    }

    /// The chunks `slot` holds.
    fn held_by(&self, slot: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.chunks).filter(move |&i| self.contains(i, slot))
    }
}

/// The positions of the bits set in `words`, 64 a word.
fn set_bits(words: impl Iterator<Item = u64>) -> impl Iterator<Item = usize> {
    words.enumerate().flat_map(|(w, mut word)| {
        std::iter::from_fn(move || {
            (word != 0).then(|| {
                let bit = word.trailing_zeros() as usize;
                word &= word - 1;
                w * 64 + bit
            })
        })
    })
}

/// What the next `poll_action` must decide about.
#[derive(Debug)]
enum Pending {
    Nothing,
    /// These chunks only: a `Have` can make no other chunk worth asking for.
    Among(Vec<usize>),
    Every,
}

/// What a fetch knows of one chunk.
#[derive(Debug)]
struct ChunkState {
    have: bool,
    /// Non-origin peers holding it.
    availability: u32,
    /// Peers in this node's region holding it.
    region_holders: u32,
    /// When it was first known to be held by a peer.
    first_held: Option<Instant>,
    /// This node's place in the region's order for it, and whether it is the region's
    /// and the swarm's ingress (see `Fetch::places_known`).
    place: Place,
    /// When its rank among the region's gateways last changed.
    ranked_at: Option<Instant>,
    /// Peers it is asked of now.
    asked: BTreeSet<PeerId>,
    /// Peers a request for it timed out at: asked again only if nobody else can.
    late: BTreeSet<PeerId>,
}

/// This node's place for one chunk (see `Fetch::work_out_ingress`).
#[derive(Debug, Clone, Copy)]
struct Place {
    turn: usize,
    /// This node's rank among the region's fetching gateways for the chunk (0: its
    /// region ingress); `usize::MAX` if this node is no gateway.
    region_rank: usize,
    swarm_ingress: bool,
}

impl Place {
    /// Before the peers are known: last in every order.
    const UNKNOWN: Place = Place {
        turn: usize::MAX,
        region_rank: usize::MAX,
        swarm_ingress: false,
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{ingress_node, rank};

    /// The defaults, without the start's settling and the pacing by arrivals (their
    /// own tests cover them).
    fn immediate() -> FetchConfig {
        FetchConfig {
            settle: Duration::ZERO,
            pace_window: None,
            ..FetchConfig::default()
        }
    }

    /// `immediate`, and every chunk this node may ask for is asked for at once, from the
    /// origin too.
    fn all_at_once() -> FetchConfig {
        FetchConfig {
            per_peer: 100,
            total: 100,
            origin_parallel: 1000,
            ..immediate()
        }
    }

    #[test]
    fn requests_in_flight_follow_the_chunks_that_arrive() {
        let t0 = Instant::now();
        let cs = chunks(40);
        let cfg = FetchConfig {
            settle: Duration::ZERO,
            ..FetchConfig::default()
        };
        let window = cfg.pace_window.expect("pacing is on by default");
        let mut f = Fetch::new(cfg.clone(), "me", &cs, |_| false, t0);
        for id in 1..=20 {
            f.handle_peer(t0, peer(id, Source::SameRegion));
            f.handle_have(t0, PeerId(id), &cs);
        }
        // Nothing arrived yet: the floor.
        assert_eq!(requests(&drain(&mut f)).len(), cfg.pace_floor);
        let flying = |f: &Fetch| -> Vec<(PeerId, ChunkHash)> {
            f.peers
                .values()
                .flat_map(|p| p.in_flight.keys().map(|&i| (p.info.id, f.chunks[i])))
                .collect()
        };
        // Each arrival within the window lets one more be in flight.
        let mut t = t0;
        for arrived in 1..=12 {
            t += Duration::from_millis(10);
            let (peer, chunk) = flying(&f)[0];
            f.handle_chunk(t, peer, &chunk, true);
            drain(&mut f);
            assert_eq!(
                f.in_flight(),
                arrived.max(cfg.pace_floor),
                "after {arrived}"
            );
        }
        // Once they have left the window, requests end without new ones down to the floor.
        t += window + Duration::from_secs(1);
        let (peer, chunk) = flying(&f)[0];
        f.handle_chunk(t, peer, &chunk, true);
        drain(&mut f);
        assert_eq!(f.in_flight(), 11);
    }

    #[test]
    fn while_enough_arrives_the_region_holds_the_waiting_requests() {
        let t0 = Instant::now();
        let cs = chunks(40);
        let cfg = immediate();
        let max = cfg.max_arriving.expect("a limit by default");
        let mut f = Fetch::new(cfg, "me", &cs, |_| false, t0);
        for id in 1..=6 {
            f.handle_peer(t0, peer(id, Source::SameRegion));
            f.handle_have(t0, PeerId(id), &cs);
        }
        f.handle_peer(t0, peer(7, Source::OtherRegion));
        let asked = requests(&drain(&mut f));
        assert_eq!(asked.len(), 6, "one request per peer of the region");
        // One chunk arriving: nothing held yet.
        f.handle_arriving(asked[0].0, &asked[0].1);
        assert!(holds(&drain(&mut f)).is_empty());
        // The limit reached: every other peer where a request waits is told to hold it.
        f.handle_arriving(asked[1].0, &asked[1].1);
        assert_eq!(max, 2);
        let held = holds(&drain(&mut f));
        let mut waiting: Vec<(PeerId, bool)> = asked[2..].iter().map(|(p, _)| (*p, true)).collect();
        waiting.sort();
        assert_eq!(held, waiting);
        // Said once: another event changes nothing.
        f.handle_arriving(asked[1].0, &asked[1].1);
        assert!(holds(&drain(&mut f)).is_empty());
        // A chunk arrives whole: fewer arrive now, and the held peers may send again.
        f.handle_chunk(t0, asked[0].0, &asked[0].1, true);
        let released = holds(&drain(&mut f));
        let mut again: Vec<(PeerId, bool)> = asked[2..].iter().map(|(p, _)| (*p, false)).collect();
        again.sort();
        assert_eq!(released, again);
        // A chunk that starts arriving from a peer that was not asked for it is no
        // arrival of this node's.
        f.handle_arriving(PeerId(7), &cs[39]);
        f.handle_arriving(PeerId(1), &cs[39]);
        assert!(holds(&drain(&mut f)).is_empty());
    }

    #[test]
    fn a_held_request_does_not_time_out_and_its_clock_starts_when_let_go() {
        let t0 = Instant::now();
        let cs = chunks(10);
        let cfg = immediate();
        let timeout = cfg.request_timeout;
        let mut f = Fetch::new(cfg, "me", &cs, |_| false, t0);
        for id in 1..=3 {
            f.handle_peer(t0, peer(id, Source::SameRegion));
            f.handle_have(t0, PeerId(id), &cs);
        }
        let asked = requests(&drain(&mut f));
        f.handle_arriving(asked[0].0, &asked[0].1);
        f.handle_arriving(asked[1].0, &asked[1].1);
        let held = asked[2].0;
        assert!(drain(&mut f).contains(&Action::Hold {
            peer: held,
            hold: true
        }));
        // Long after: the arriving requests time out, the held one does not.
        let late = t0 + timeout * 2;
        f.handle_timeout(late);
        let actions = drain(&mut f);
        let cancelled: Vec<PeerId> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Cancel { peer, .. } => Some(*peer),
                _ => None,
            })
            .collect();
        assert!(!cancelled.contains(&held), "{actions:?}");
        // Fewer arrive now: it is let go, and its clock starts then.
        assert!(actions.contains(&Action::Hold {
            peer: held,
            hold: false
        }));
        f.handle_timeout(late + timeout - Duration::from_millis(1));
        let cancels_held = |a: &Action| matches!(a, Action::Cancel { peer, .. } if *peer == held);
        assert!(!drain(&mut f).iter().any(cancels_held));
        f.handle_timeout(late + timeout);
        assert!(drain(&mut f).iter().any(cancels_held));
    }

    /// `immediate` without the endgame (one request shows that this node asks), and a
    /// region of nine: n1 to n8 and this node.
    fn region_of_nine() -> (FetchConfig, Vec<String>) {
        let cfg = FetchConfig {
            endgame_chunks: 0,
            ..immediate()
        };
        let mut region: Vec<String> = (1..=8).map(|i| format!("n{i}")).collect();
        region.push("me".into());
        (cfg, region)
    }

    #[test]
    fn a_new_chunk_spreads_through_the_region_as_a_tree() {
        let t0 = Instant::now();
        let (cfg, region) = region_of_nine();
        // A chunk for which this node comes late in the region's order.
        let c = *chunks(100)
            .iter()
            .find(|c| rank(c, "me", &region) >= 6)
            .expect("some chunk ranks this node late");
        let place = rank(&c, "me", &region);
        let mut f = Fetch::new(cfg.clone(), "me", &[c], |_| false, t0);
        for id in 1..=8 {
            f.handle_peer(t0, peer(id, Source::SameRegion));
        }
        // Each holder lets `fanout` more nodes in: not yet this one.
        let mut holders = 0;
        while (holders + 1) * (cfg.fanout + 1) <= place {
            holders += 1;
            f.handle_have(t0, PeerId(holders as u64), &[c]);
            assert!(drain(&mut f).is_empty(), "asked with {holders} holders");
        }
        holders += 1;
        f.handle_have(t0, PeerId(holders as u64), &[c]);
        assert_eq!(
            requests(&drain(&mut f)).len(),
            1,
            "not asked with {holders}"
        );

        // Without enough holders, the turn comes after the patience.
        let mut f = Fetch::new(cfg.clone(), "me", &[c], |_| false, t0);
        for id in 1..=8 {
            f.handle_peer(t0, peer(id, Source::SameRegion));
        }
        f.handle_have(t0, PeerId(1), &[c]);
        assert!(drain(&mut f).is_empty());
        assert_eq!(f.poll_timeout(), Some(t0 + cfg.turn_patience));
        f.handle_timeout(t0 + cfg.turn_patience);
        assert_eq!(requests(&drain(&mut f)).len(), 1);
    }

    #[test]
    fn a_wait_that_ran_out_is_acted_on_even_if_another_event_comes_before_its_timer() {
        let t0 = Instant::now();
        let (cfg, region) = region_of_nine();
        let cs = chunks(100);
        let late = *cs
            .iter()
            .find(|c| rank(c, "me", &region) >= 6)
            .expect("some chunk ranks this node late");
        let other = *cs
            .iter()
            .find(|c| rank(c, "me", &region) == 0)
            .expect("some chunk ranks this node first");
        let mut f = Fetch::new(cfg.clone(), "me", &[late, other], |_| false, t0);
        for id in 1..=8 {
            f.handle_peer(t0, peer(id, Source::SameRegion));
        }
        f.handle_have(t0, PeerId(1), &[late]);
        assert!(requests(&drain(&mut f)).is_empty());
        // A real timer fires late: a `Have` of another chunk comes first.
        let after = t0 + cfg.turn_patience + Duration::from_millis(1);
        f.handle_have(after, PeerId(2), &[other]);
        let asked: Vec<ChunkHash> = requests(&drain(&mut f)).iter().map(|r| r.1).collect();
        assert!(asked.contains(&late), "the turn's wait ran out: {asked:?}");
        assert!(asked.contains(&other));
    }

    /// A fetch that has just started, knowing the origin and a peer of another region
    /// (2) that holds half of `cs`.
    fn settling(cs: &[ChunkHash], t0: Instant) -> Fetch {
        let mut f = Fetch::new(FetchConfig::default(), "me", cs, |_| false, t0);
        f.handle_peer(t0, peer(ORIGIN.0, Source::Origin));
        f.handle_peer(t0, peer(2, Source::OtherRegion));
        f.handle_have(t0, PeerId(2), &cs[..cs.len() / 2]);
        f
    }

    #[test]
    fn nothing_crosses_regions_while_the_start_settles() {
        let t0 = Instant::now();
        let cs = chunks(40);
        let cfg = FetchConfig::default();
        let mut f = settling(&cs, t0);
        assert!(drain(&mut f).is_empty(), "asked before the start settled");
        assert_eq!(f.poll_timeout(), Some(t0 + cfg.settle));
        // A peer in the region may be asked at once.
        f.handle_peer(t0, peer(3, Source::SameRegion));
        f.handle_have(t0, PeerId(3), &cs[..1]);
        assert_eq!(requests(&drain(&mut f)), vec![(PeerId(3), cs[0])]);
        f.handle_timeout(t0 + cfg.settle);
        let asked = requests(&drain(&mut f));
        assert!(!asked.is_empty());
        assert!(asked.iter().all(|(p, _)| *p == PeerId(2) || *p == ORIGIN));
    }

    #[test]
    fn a_complete_view_ends_the_settling_once_its_gateways_are_connected() {
        let t0 = Instant::now();
        let cs = chunks(40);
        let mut f = settling(&cs, t0);
        let t1 = t0 + Duration::from_millis(100);
        // The tracker names gateway 3 too, not connected yet: still settling.
        f.handle_view_complete(t1, vec![PeerId(2), PeerId(3)]);
        assert!(drain(&mut f).is_empty(), "asked before gateway 3 was known");
        let t2 = t0 + Duration::from_millis(150);
        f.handle_peer(t2, peer(3, Source::OtherRegion));
        let asked = requests(&drain(&mut f));
        assert!(!asked.is_empty(), "the view is complete: no need to wait");
        assert!(asked
            .iter()
            .all(|(p, _)| [PeerId(2), PeerId(3), ORIGIN].contains(p)));
    }

    const ORIGIN: PeerId = PeerId(100);

    fn chunks(n: u32) -> Vec<ChunkHash> {
        (0..n).map(|i| ChunkHash::of(&i.to_le_bytes())).collect()
    }

    fn peer(id: u64, source: Source) -> PeerInfo {
        PeerInfo {
            id: PeerId(id),
            node: format!("n{id}"),
            source,
            fetching: true,
            gateway: true,
        }
    }

    fn drain(f: &mut Fetch) -> Vec<Action> {
        std::iter::from_fn(|| f.poll_action()).collect()
    }

    fn requests(actions: &[Action]) -> Vec<(PeerId, ChunkHash)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Request { peer, chunk } => Some((*peer, *chunk)),
                _ => None,
            })
            .collect()
    }

    /// The holds among `actions`, by peer.
    fn holds(actions: &[Action]) -> Vec<(PeerId, bool)> {
        let mut out: Vec<(PeerId, bool)> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Hold { peer, hold } => Some((*peer, *hold)),
                _ => None,
            })
            .collect();
        out.sort();
        out
    }

    /// A node that knows no other node yet: the ingress node for every chunk.
    fn alone(cs: &[ChunkHash], cfg: FetchConfig, t0: Instant) -> Fetch {
        Fetch::new(cfg, "me", cs, |_| false, t0)
    }

    #[test]
    fn from_the_origin_within_the_limits_then_done() {
        let t0 = Instant::now();
        let cs = chunks(10);
        let cfg = FetchConfig {
            per_peer: 3,
            ..immediate()
        };
        let mut f = alone(&cs, cfg, t0);
        f.handle_peer(t0, peer(ORIGIN.0, Source::Origin));
        let asked = requests(&drain(&mut f));
        assert_eq!(asked.len(), 3, "at most per_peer requests to one peer");
        assert!(asked.iter().all(|(p, _)| *p == ORIGIN));
        let mut served = 0;
        let mut queue = asked;
        while let Some((p, c)) = queue.pop() {
            f.handle_chunk(t0, p, &c, true);
            served += 1;
            let next = drain(&mut f);
            queue.extend(requests(&next));
            if next.contains(&Action::Done) {
                break;
            }
        }
        assert_eq!(served, 10);
        assert!(f.is_done());
        assert_eq!(f.received(Source::Origin), 10);
    }

    #[test]
    fn the_origin_is_shared_among_the_gateways() {
        let t0 = Instant::now();
        let cs = chunks(40);
        let cfg = FetchConfig {
            origin_parallel: 4,
            ..immediate()
        };
        let members = [100, 101, 102];
        let at_origin = |f: &mut Fetch| requests(&drain(f)).len();
        // Alone, a node keeps one request at each member.
        let mut f = alone(&cs, cfg.clone(), t0);
        for m in members {
            f.handle_peer(t0, peer(m, Source::Origin));
        }
        assert_eq!(at_origin(&mut f), 3);
        // One of four gateways: one request at the origin in all.
        let mut f = alone(&cs, cfg, t0);
        for p in 2..5 {
            f.handle_peer(t0, peer(p, Source::OtherRegion));
        }
        for m in members {
            f.handle_peer(t0, peer(m, Source::Origin));
        }
        let asked = requests(&drain(&mut f));
        assert_eq!(asked.len(), 1, "{asked:?}");
        // The next goes out when it is answered.
        f.handle_chunk(t0, asked[0].0, &asked[0].1, true);
        assert_eq!(at_origin(&mut f), 1);
    }

    /// A gateway ("me") of a region of three gateways (n1, n2), with a backup period of
    /// 4 s (two within the request timeout), whose 60 chunks a peer of another region
    /// (7) holds; the chunks for which this node has `rank` in the region's order.
    fn three_gateways(t0: Instant) -> (FetchConfig, Fetch, impl Fn(usize) -> BTreeSet<ChunkHash>) {
        let cs = chunks(60);
        let cfg = FetchConfig {
            per_peer: 100,
            total: 100,
            backup_ingress: Duration::from_secs(4),
            ..immediate()
        };
        let mut f = Fetch::new(cfg.clone(), "me", &cs, |_| false, t0);
        f.handle_peer(t0, peer(1, Source::SameRegion));
        f.handle_peer(t0, peer(2, Source::SameRegion));
        f.handle_peer(t0, peer(7, Source::OtherRegion));
        f.handle_have(t0, PeerId(7), &cs);
        let region: Vec<String> = ["me", "n1", "n2"].map(String::from).to_vec();
        let by_rank = move |r: usize| -> BTreeSet<ChunkHash> {
            cs.iter()
                .filter(|c| crate::topology::rank(c, "me", &region) == r)
                .copied()
                .collect()
        };
        (cfg, f, by_rank)
    }

    /// The chunks asked for since the last call.
    fn crossed(f: &mut Fetch) -> BTreeSet<ChunkHash> {
        requests(&drain(f)).into_iter().map(|(_, c)| c).collect()
    }

    #[test]
    fn the_backups_of_a_slow_ingress_come_one_at_a_time_and_a_non_gateway_waits_longest() {
        let t0 = Instant::now();
        let (cfg, mut f, by_rank) = three_gateways(t0);
        let cs = chunks(60);
        assert_eq!(crossed(&mut f), by_rank(0));
        f.handle_timeout(t0 + cfg.backup_ingress);
        assert_eq!(
            crossed(&mut f),
            by_rank(1),
            "second in line, after one period"
        );
        f.handle_timeout(t0 + 2 * cfg.backup_ingress);
        assert_eq!(crossed(&mut f), by_rank(2));
        // A node that is no gateway waits the whole patience.
        let mut f = Fetch::new(cfg.clone(), "me", &cs, |_| false, t0);
        f.handle_gateway(t0, false);
        f.handle_peer(t0, peer(7, Source::OtherRegion));
        f.handle_have(t0, PeerId(7), &cs);
        f.handle_timeout(t0 + 2 * cfg.backup_ingress);
        assert!(crossed(&mut f).is_empty());
        f.handle_timeout(t0 + cfg.cross_region_patience);
        assert_eq!(crossed(&mut f).len(), cs.len());
    }

    #[test]
    fn when_the_ingress_dies_the_next_backup_waits_a_period_from_then() {
        let t0 = Instant::now();
        let (cfg, mut f, by_rank) = three_gateways(t0);
        crossed(&mut f);
        f.handle_timeout(t0 + cfg.backup_ingress);
        crossed(&mut f);
        // n1 dies: this node moves up to second in line for the chunks it was last for,
        // and the first in line (n2) takes them over now.
        let gone = t0 + cfg.backup_ingress * 3 / 2;
        f.handle_peer_gone(gone, PeerId(1));
        assert!(crossed(&mut f).is_disjoint(&by_rank(2)), "a backup at once");
        f.handle_timeout(gone + cfg.backup_ingress);
        assert_eq!(crossed(&mut f), by_rank(2), "a period after n2 took over");
    }

    #[test]
    fn a_crossing_stuck_in_a_queue_moves_to_a_free_holder() {
        let t0 = Instant::now();
        let cs = chunks(1);
        let mut f = alone(&cs, immediate(), t0);
        f.handle_peer(t0, peer(7, Source::OtherRegion));
        f.handle_have(t0, PeerId(7), &cs);
        assert_eq!(requests(&drain(&mut f)), vec![(PeerId(7), cs[0])]);
        f.handle_peer(t0, peer(8, Source::OtherRegion));
        f.handle_have(t0, PeerId(8), &cs);
        let patience = FetchConfig::default().far_queue_patience;
        assert_eq!(f.poll_timeout(), Some(t0 + patience));
        f.handle_timeout(t0 + patience);
        let moved = drain(&mut f);
        assert!(moved.contains(&Action::Cancel {
            peer: PeerId(7),
            chunk: cs[0]
        }));
        assert_eq!(requests(&moved), vec![(PeerId(8), cs[0])]);
        // One that has started arriving stays where it is.
        let mut f = alone(&cs, immediate(), t0);
        f.handle_peer(t0, peer(7, Source::OtherRegion));
        f.handle_peer(t0, peer(8, Source::OtherRegion));
        f.handle_have(t0, PeerId(7), &cs);
        let first = requests(&drain(&mut f))[0].0;
        f.handle_have(t0, PeerId(if first == PeerId(7) { 8 } else { 7 }), &cs);
        f.handle_arriving(first, &cs[0]);
        f.handle_timeout(t0 + patience);
        assert!(drain(&mut f).is_empty());
    }

    #[test]
    fn held_and_repeated_chunks_are_not_fetched() {
        let t0 = Instant::now();
        let mut cs = chunks(4);
        cs.push(cs[0]);
        let held = cs[1];
        let cfg = FetchConfig {
            per_peer: 8,
            ..immediate()
        };
        let mut f = Fetch::new(cfg, "me", &cs, |c| *c == held, t0);
        assert_eq!(f.missing(), 3);
        f.handle_peer(t0, peer(ORIGIN.0, Source::Origin));
        let asked = requests(&drain(&mut f));
        assert_eq!(asked.len(), 3);
        assert!(!asked.iter().any(|(_, c)| *c == held));
    }

    #[test]
    fn a_peer_in_the_region_comes_before_the_origin() {
        let t0 = Instant::now();
        let cs = chunks(2);
        let mut f = alone(&cs, immediate(), t0);
        f.handle_peer(t0, peer(1, Source::SameRegion));
        f.handle_have(t0, PeerId(1), &cs[..1]);
        f.handle_peer(t0, peer(ORIGIN.0, Source::Origin));
        let asked = requests(&drain(&mut f));
        assert!(asked.contains(&(PeerId(1), cs[0])), "{asked:?}");
        assert!(!asked.contains(&(ORIGIN, cs[0])), "{asked:?}");
        // The chunk no peer has comes from the origin, if this node is the one (of it and
        // n1) to bring it in.
        let mine = ingress_node(&cs[1], &["me".into(), "n1".into()]) == Some("me");
        assert_eq!(asked.contains(&(ORIGIN, cs[1])), mine, "{asked:?}");
    }

    #[test]
    fn the_rarest_chunk_is_asked_for_first() {
        let t0 = Instant::now();
        let cs = chunks(3);
        let (a, b, x) = (cs[0], cs[1], cs[2]);
        let cfg = FetchConfig {
            total: 1,
            ..immediate()
        };
        let mut f = alone(&cs, cfg, t0);
        f.handle_peer(t0, peer(1, Source::SameRegion));
        f.handle_peer(t0, peer(2, Source::SameRegion));
        f.handle_have(t0, PeerId(1), &[x]);
        assert_eq!(requests(&drain(&mut f)), vec![(PeerId(1), x)]);
        // While the one slot is taken: a is held by two peers, b by one.
        f.handle_have(t0, PeerId(1), &[a, b]);
        f.handle_have(t0, PeerId(2), &[a]);
        assert!(drain(&mut f).is_empty());
        f.handle_chunk(t0, PeerId(1), &x, true);
        assert_eq!(requests(&drain(&mut f)), vec![(PeerId(1), b)]);
    }

    #[test]
    fn only_the_ingress_node_crosses_regions_until_patience_runs_out() {
        let t0 = Instant::now();
        let cs = chunks(40);
        let cfg = all_at_once();
        let mut f = Fetch::new(cfg.clone(), "me", &cs, |_| false, t0);
        // A neighbour in the region ("n1") and a holder of everything elsewhere.
        f.handle_peer(t0, peer(1, Source::SameRegion));
        f.handle_peer(t0, peer(7, Source::OtherRegion));
        f.handle_have(t0, PeerId(7), &cs);
        let region: Vec<String> = vec!["me".into(), "n1".into()];
        let mine: BTreeSet<ChunkHash> = cs
            .iter()
            .filter(|c| ingress_node(c, &region) == Some("me"))
            .copied()
            .collect();
        assert!(!mine.is_empty() && mine.len() < cs.len());
        let asked: BTreeSet<ChunkHash> = requests(&drain(&mut f))
            .into_iter()
            .map(|(_, c)| c)
            .collect();
        assert_eq!(
            asked, mine,
            "crossed regions for exactly the chunks it brings in"
        );
        // The rest arrive in the region from n1 — or, if n1 is slow, this node, the next
        // gateway in their order, fetches them itself once they have been held elsewhere
        // for `backup_ingress`.
        for c in &asked {
            f.handle_chunk(t0, PeerId(7), c, true);
        }
        drain(&mut f);
        let wake = f.poll_timeout().expect("a wake-up for the wait");
        assert_eq!(wake, t0 + cfg.backup_ingress);
        f.handle_timeout(wake);
        let later: BTreeSet<ChunkHash> = requests(&drain(&mut f))
            .into_iter()
            .map(|(_, c)| c)
            .collect();
        assert_eq!(later.len(), cs.len() - mine.len());
        // When the neighbour leaves, its chunks are this node's to bring in at once.
        let mut f = Fetch::new(cfg, "me", &cs, |_| false, t0);
        f.handle_peer(t0, peer(1, Source::SameRegion));
        f.handle_peer(t0, peer(7, Source::OtherRegion));
        f.handle_have(t0, PeerId(7), &cs);
        drain(&mut f);
        f.handle_peer_gone(t0, PeerId(1));
        assert_eq!(requests(&drain(&mut f)).len(), cs.len() - mine.len());
    }

    #[test]
    fn a_gateway_takes_its_share_of_the_ingress_even_before_it_fetches() {
        let t0 = Instant::now();
        let cs = chunks(30);
        let cfg = all_at_once();
        let idle = PeerInfo {
            fetching: false,
            gateway: false,
            ..peer(1, Source::SameRegion)
        };
        let mut f = Fetch::new(cfg.clone(), "me", &cs, |_| false, t0);
        // A neighbour that holds an older release's chunks and is no gateway.
        f.handle_peer(t0, idle.clone());
        f.handle_peer(t0, peer(ORIGIN.0, Source::Origin));
        let asked = requests(&drain(&mut f));
        assert_eq!(asked.len(), cs.len(), "this node brings in every chunk");

        // Named a gateway, it brings in its share from when it starts, and this node
        // only the rest from now on.
        let mut f = Fetch::new(cfg, "me", &cs, |_| false, t0);
        f.handle_peer(t0, idle);
        f.handle_peer(t0, peer(2, Source::OtherRegion));
        let named = BTreeMap::from([(PeerId(1), (false, true)), (PeerId(2), (true, true))]);
        f.handle_roles(t0, &named);
        f.handle_have(t0, PeerId(2), &cs);
        let region = ["me".to_string(), "n1".to_string()];
        let mine: Vec<_> = cs
            .iter()
            .filter(|c| ingress_node(c, &region) == Some("me"))
            .collect();
        assert!(!mine.is_empty() && mine.len() < cs.len());
        let asked = requests(&drain(&mut f));
        assert!(asked.iter().all(|(_, c)| mine.contains(&c)), "{asked:?}");
        assert_eq!(asked.len(), mine.len());
    }

    #[test]
    fn only_gateways_cross_regions_or_ask_the_origin() {
        let t0 = Instant::now();
        let cs = chunks(30);
        let cfg = FetchConfig {
            per_peer: 100,
            total: 100,
            request_timeout: Duration::from_secs(3600),
            ..immediate()
        };
        // A gateway of this region, one of another region holding every chunk, the
        // origin; this node is not a gateway.
        let mut f = Fetch::new(cfg.clone(), "me", &cs, |_| false, t0);
        f.handle_gateway(t0, false);
        f.handle_peer(t0, peer(1, Source::SameRegion));
        f.handle_peer(t0, peer(2, Source::OtherRegion));
        f.handle_peer(t0, peer(ORIGIN.0, Source::Origin));
        f.handle_have(t0, PeerId(2), &cs);
        assert!(
            requests(&drain(&mut f)).is_empty(),
            "it waits for its gateway"
        );
        // What the gateway brings in, it fetches at once.
        f.handle_have(t0, PeerId(1), &cs[..3]);
        let asked = requests(&drain(&mut f));
        assert_eq!(asked.len(), 3);
        assert!(asked.iter().all(|(p, _)| *p == PeerId(1)));
        // A gateway that stalls costs the patience, not the release.
        f.handle_timeout(t0 + cfg.cross_region_patience);
        let asked = requests(&drain(&mut f));
        assert_eq!(asked.len(), cs.len() - 3);
        assert!(asked.iter().all(|(p, _)| *p == PeerId(2)));

        // Made a gateway, it brings in its share across regions at once.
        let mut f = Fetch::new(cfg, "me", &cs, |_| false, t0);
        f.handle_gateway(t0, false);
        f.handle_peer(t0, peer(1, Source::SameRegion));
        f.handle_peer(t0, peer(2, Source::OtherRegion));
        f.handle_have(t0, PeerId(2), &cs);
        assert!(requests(&drain(&mut f)).is_empty());
        f.handle_gateway(t0, true);
        let region = ["me".to_string(), "n1".to_string()];
        let mine = cs
            .iter()
            .filter(|c| ingress_node(c, &region) == Some("me"))
            .count();
        let asked = requests(&drain(&mut f));
        assert!(mine > 0 && asked.len() == mine, "{mine} {asked:?}");
    }

    #[test]
    fn the_origin_is_asked_once_per_chunk_across_the_swarm() {
        let t0 = Instant::now();
        let cs = chunks(30);
        let cfg = all_at_once();
        let mut f = Fetch::new(cfg, "me", &cs, |_| false, t0);
        f.handle_peer(t0, peer(1, Source::SameRegion));
        f.handle_peer(t0, peer(2, Source::OtherRegion));
        f.handle_peer(t0, peer(ORIGIN.0, Source::Origin));
        let everyone: Vec<String> = vec!["me".into(), "n1".into(), "n2".into()];
        let asked: BTreeSet<ChunkHash> = requests(&drain(&mut f))
            .into_iter()
            .map(|(_, c)| c)
            .collect();
        let mine: BTreeSet<ChunkHash> = cs
            .iter()
            .filter(|c| ingress_node(c, &everyone) == Some("me"))
            .copied()
            .collect();
        assert_eq!(asked, mine);
    }

    #[test]
    fn a_corrupting_peer_is_dropped_and_its_chunk_fetched_elsewhere() {
        let t0 = Instant::now();
        let cs = chunks(1);
        let mut f = alone(&cs, immediate(), t0);
        f.handle_peer(t0, peer(1, Source::SameRegion));
        f.handle_have(t0, PeerId(1), &cs);
        let mut asked = requests(&drain(&mut f));
        assert_eq!(asked, vec![(PeerId(1), cs[0])]);
        f.handle_peer(t0, peer(2, Source::SameRegion));
        f.handle_have(t0, PeerId(2), &cs);
        f.handle_chunk(t0, PeerId(1), &cs[0], false);
        let next = drain(&mut f);
        assert!(next.contains(&Action::Disconnect {
            peer: PeerId(1),
            reason: format!("sent chunk {} with the wrong bytes", cs[0]),
        }));
        asked.extend(requests(&next));
        assert!(asked.contains(&(PeerId(2), cs[0])), "{asked:?}");
        // A dropped peer is not taken back for this release.
        f.handle_peer_gone(t0, PeerId(2));
        f.handle_peer(t0, peer(1, Source::SameRegion));
        f.handle_have(t0, PeerId(1), &cs);
        assert!(requests(&drain(&mut f)).is_empty());
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn the_endgame_never_doubles_a_copy_across_regions() {
        let t0 = Instant::now();
        let cs = chunks(1);
        let mut f = alone(&cs, immediate(), t0);
        f.handle_peer(t0, peer(1, Source::OtherRegion));
        f.handle_peer(t0, peer(2, Source::OtherRegion));
        f.handle_have(t0, PeerId(1), &cs);
        f.handle_have(t0, PeerId(2), &cs);
        f.handle_peer(t0, peer(ORIGIN.0, Source::Origin));
        assert_eq!(requests(&drain(&mut f)).len(), 1);
        // Many chunks missing: no endgame either.
        let cs = chunks(10);
        let cfg = FetchConfig {
            total: 10,
            per_peer: 4,
            ..immediate()
        };
        let mut f = alone(&cs, cfg, t0);
        for id in [1, 2, 3] {
            f.handle_peer(t0, peer(id, Source::SameRegion));
            f.handle_have(t0, PeerId(id), &cs);
        }
        assert_eq!(requests(&drain(&mut f)).len(), 10);
    }

    fn cfg_backoff() -> Duration {
        FetchConfig::default().busy_backoff
    }

    #[test]
    fn a_busy_peer_keeps_its_chunks_and_others_are_asked_first() {
        let t0 = Instant::now();
        let cs = chunks(1);
        // No endgame: one request at a time shows who is asked.
        let cfg = FetchConfig {
            endgame_chunks: 0,
            ..immediate()
        };
        let mut f = alone(&cs, cfg, t0);
        f.handle_peer(t0, peer(1, Source::SameRegion));
        f.handle_have(t0, PeerId(1), &cs);
        assert_eq!(requests(&drain(&mut f)), vec![(PeerId(1), cs[0])]);
        // Busy: left alone for the backoff, then asked again (nobody else has it), not
        // forgotten as a holder.
        f.handle_busy(t0, PeerId(1), &cs[0]);
        assert!(drain(&mut f).is_empty());
        let later = t0 + cfg_backoff();
        assert_eq!(f.poll_timeout(), Some(later));
        f.handle_timeout(later);
        assert_eq!(requests(&drain(&mut f)), vec![(PeerId(1), cs[0])]);
        f.handle_peer(later, peer(2, Source::SameRegion));
        f.handle_have(later, PeerId(2), &cs);
        drain(&mut f);
        f.handle_busy(later, PeerId(1), &cs[0]);
        let next = requests(&drain(&mut f));
        assert!(
            !next.is_empty() && next.iter().all(|(p, _)| *p == PeerId(2)),
            "{next:?}"
        );
    }

    /// A busy peer is left alone for a few of this node's chunk times: the floor when
    /// chunks come every 2 ms, the most when they come every 200 ms.
    #[test]
    fn a_busy_peer_is_left_alone_for_a_few_chunk_times() {
        let t0 = Instant::now();
        // The arrivals are measured over the pacing window.
        let cfg = FetchConfig {
            endgame_chunks: 0,
            pace_window: FetchConfig::default().pace_window,
            ..immediate()
        };
        for (every, backoff) in [
            (Duration::from_millis(2), cfg.busy_backoff_floor),
            (
                Duration::from_millis(50),
                Duration::from_millis(50) * BUSY_CHUNK_TIMES,
            ),
            (Duration::from_millis(200), cfg.busy_backoff),
        ] {
            let cs = chunks(6);
            let mut f = alone(&cs, cfg.clone(), t0);
            f.handle_peer(t0, peer(1, Source::SameRegion));
            f.handle_have(t0, PeerId(1), &cs);
            let mut now = t0;
            let mut asked = requests(&drain(&mut f));
            for _ in 0..4 {
                let &(_, c) = asked.first().expect("a chunk is asked for");
                now += every;
                f.handle_chunk(now, PeerId(1), &c, true);
                asked = requests(&drain(&mut f));
            }
            let &(_, c) = asked.first().expect("a chunk is asked for");
            f.handle_busy(now, PeerId(1), &c);
            assert!(requests(&drain(&mut f)).is_empty());
            assert_eq!(
                f.poll_timeout(),
                Some(now + backoff),
                "chunks every {every:?}"
            );
        }
    }

    #[test]
    fn a_vanished_peer_costs_only_its_requests() {
        let t0 = Instant::now();
        let cs = chunks(2);
        // Two requests per peer, so that the endgame can ask each peer for both chunks.
        let cfg = FetchConfig {
            per_peer: 2,
            ..immediate()
        };
        let mut f = alone(&cs, cfg, t0);
        for id in [1, 2] {
            f.handle_peer(t0, peer(id, Source::SameRegion));
            f.handle_have(t0, PeerId(id), &cs);
        }
        // Both chunks are asked of both peers (the endgame, with two chunks left).
        assert_eq!(requests(&drain(&mut f)).len(), 4);
        f.handle_peer_gone(t0, PeerId(1));
        assert!(requests(&drain(&mut f)).is_empty());
        assert_eq!(f.in_flight(), 2, "peer 2's requests stand");
        f.handle_chunk(t0, PeerId(2), &cs[0], true);
        f.handle_chunk(t0, PeerId(2), &cs[1], true);
        assert!(drain(&mut f).contains(&Action::Done));
    }

    #[test]
    fn late_requests_go_elsewhere_and_the_endgame_takes_the_first_copy() {
        let t0 = Instant::now();
        let cs = chunks(1);
        let cfg = immediate();
        let mut f = alone(&cs, cfg.clone(), t0);
        f.handle_peer(t0, peer(1, Source::SameRegion));
        f.handle_peer(t0, peer(2, Source::SameRegion));
        f.handle_have(t0, PeerId(1), &cs);
        f.handle_have(t0, PeerId(2), &cs);
        // The endgame asks both at once for the last chunk.
        let asked = requests(&drain(&mut f));
        assert_eq!(asked.len(), 2, "{asked:?}");
        f.handle_chunk(t0, PeerId(2), &cs[0], true);
        let next = drain(&mut f);
        assert!(next.contains(&Action::Cancel {
            peer: PeerId(1),
            chunk: cs[0]
        }));
        assert!(next.contains(&Action::Done));
        assert_eq!(f.poll_timeout(), None);

        // A request that times out is cancelled and asked of someone else.
        let cs = chunks(2);
        let mut f = alone(
            &cs,
            FetchConfig {
                per_peer: 1,
                ..cfg.clone()
            },
            t0,
        );
        f.handle_peer(t0, peer(1, Source::SameRegion));
        f.handle_have(t0, PeerId(1), &cs);
        let first = requests(&drain(&mut f));
        assert_eq!(first.len(), 1);
        f.handle_peer(t0, peer(2, Source::SameRegion));
        f.handle_have(t0, PeerId(2), &cs);
        drain(&mut f);
        let late = t0 + cfg.request_timeout;
        assert!(f.poll_timeout().is_some_and(|t| t <= late));
        f.handle_timeout(late);
        let next = drain(&mut f);
        assert!(next.contains(&Action::Cancel {
            peer: first[0].0,
            chunk: first[0].1
        }));
        assert!(requests(&next)
            .iter()
            .any(|(p, c)| *p != first[0].0 && *c == first[0].1));
    }
}
