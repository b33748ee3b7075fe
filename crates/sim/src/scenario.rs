//! What one run simulates: the fleet, its links, the release and the faults.

use starling_swarm::pace::{NODE_UPLOAD_SLOTS, ORIGIN_UPLOAD_SLOTS};
use starling_swarm::FetchConfig;

/// See [`Scenario::wire_overhead`].
pub const WIRE_OVERHEAD: f64 = 1.055;

/// Bits per second to bytes per second.
pub fn mbit(m: f64) -> f64 {
    m * 1e6 / 8.0
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub regions: usize,
    pub nodes_per_region: usize,
    /// The release's size and the size of its chunks (the release format's average is
    /// 256 KiB; a large run may model bigger transfer units, see the crate doc).
    pub release_bytes: u64,
    pub chunk_bytes: u64,
    /// A simulated unit may stand for a run of the swarm's units of this many bytes,
    /// which a node passes on one by one as each is whole: a relay receiving it from a
    /// node that holds it whole may send it on once this many bytes arrived, and that
    /// copy ends no sooner than this many bytes after the unit is whole at the relay.
    /// Only one relay deep: a relay that served a unit to a peer it then asked for the
    /// same unit (the endgame asks two) would wait on itself, which whole units of the
    /// real swarm never do. `None`: a unit is passed on only once it is whole.
    pub piece_bytes: Option<u64>,
    /// Bytes per second. Download `f64::INFINITY`: unshaped (as on the testbed).
    pub node_up: f64,
    pub node_down: f64,
    /// The origin host's upload, shared by its members.
    pub origin_up: f64,
    /// Control members serving the origin store (all on the origin host, in region 0).
    pub members: usize,
    /// Each region's WAN link, each way.
    pub wan: f64,
    /// Bytes on the wire per byte of chunk: QUIC, UDP, IP and Ethernet headers and the
    /// AEAD tag come to about 76 bytes on a datagram of about 1,400.
    pub wire_overhead: f64,
    /// One-way latency inside a region and between regions, nanoseconds.
    pub near_latency: u64,
    pub far_latency: u64,
    /// Nodes see the new goal spread evenly over this long (goal long-polls, manifest
    /// fetch), nanoseconds.
    pub start_spread: u64,
    /// Every node already holds all of the release's chunks but this many (a one-file
    /// change: one); `None` for a release nobody holds any of.
    pub new_chunks: Option<u64>,
    pub faults: Faults,
    pub seed: u64,
    /// The swarm's settings: the node daemon's unless an experiment changes them.
    pub fetch: FetchConfig,
    /// Upload slots of a node and of a member (the daemons' unless an experiment
    /// changes them).
    pub node_slots: usize,
    pub origin_slots: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Share of nodes killed at a uniformly random time within `fail_window` (ns).
    pub fail_share: f64,
    pub fail_window: u64,
    /// Share of nodes whose upload and download run at `slow_factor` of the rest's.
    pub slow_share: f64,
    pub slow_factor: f64,
    /// Region whose WAN link runs at `degraded_factor` of its rate.
    pub degraded_region: Option<usize>,
    pub degraded_factor: f64,
    /// Share of nodes that start `late_by` (ns) after the rest.
    pub late_share: f64,
    pub late_by: u64,
    /// Nodes that send wrong bytes.
    pub corrupt_nodes: usize,
}

impl Scenario {
    pub fn nodes(&self) -> usize {
        self.regions * self.nodes_per_region
    }

    pub fn chunks(&self) -> u64 {
        self.release_bytes.div_ceil(self.chunk_bytes)
    }

    /// The bytes every node must receive: the release, or its new chunks.
    pub fn payload_bytes(&self) -> u64 {
        match self.new_chunks {
            Some(k) => k * self.chunk_bytes,
            None => self.chunks() * self.chunk_bytes,
        }
    }

    /// The fluid lower bound of the time to the last node, seconds: the origin sends
    /// the payload once, everyone together receives N copies with the origin's and every
    /// node's upload, each remote region receives it once over its WAN link, each node
    /// receives it once over its download.
    pub fn bound(&self) -> f64 {
        let s = self.payload_bytes() as f64;
        let n = self.nodes() as f64;
        let mut b = (s / self.origin_up).max(n * s / (self.origin_up + n * self.node_up));
        if self.regions > 1 {
            b = b.max(s / self.wan);
        }
        b.max(s / self.node_down)
    }

    /// [`Scenario::bound`] for a run whose last node started `last_start` seconds in:
    /// it cannot receive before it sees the goal.
    pub fn bound_from(&self, last_start: f64) -> f64 {
        let s = self.payload_bytes() as f64;
        self.bound().max(last_start + s / self.node_down)
    }

    /// The namespace testbed's shape (`cargo bench --bench distribution`): 40 Mbit/s
    /// node and origin uploads, unshaped downloads, a 100 Mbit/s WAN link per region,
    /// three members on the origin host, no added latency.
    pub fn testbed(regions: usize, per_region: usize, size_mib: u64) -> Scenario {
        let release_bytes = size_mib << 20;
        Scenario {
            name: format!("testbed {regions}×{per_region}"),
            regions,
            nodes_per_region: per_region,
            release_bytes,
            chunk_bytes: 256 << 10,
            piece_bytes: None,
            node_up: mbit(40.0),
            node_down: f64::INFINITY,
            origin_up: mbit(40.0),
            members: 3,
            wan: mbit(100.0),
            wire_overhead: WIRE_OVERHEAD,
            near_latency: 100_000,
            far_latency: 200_000,
            start_spread: 200_000_000,
            new_chunks: None,
            faults: Faults::default(),
            seed: 1,
            fetch: FetchConfig::default().for_release(release_bytes),
            node_slots: NODE_UPLOAD_SLOTS,
            origin_slots: ORIGIN_UPLOAD_SLOTS,
        }
    }

    /// The scale shape: 1 Gbit/s per node, 10 Gbit/s per WAN link, the origin at
    /// 10 Gbit/s, 1 ms inside a region and 40 ms between regions.
    pub fn internet(
        regions: usize,
        per_region: usize,
        release_bytes: u64,
        chunk_bytes: u64,
    ) -> Scenario {
        Scenario {
            name: format!("{regions}×{per_region}"),
            regions,
            nodes_per_region: per_region,
            release_bytes,
            chunk_bytes,
            piece_bytes: None,
            node_up: mbit(1000.0),
            node_down: mbit(1000.0),
            origin_up: mbit(10_000.0),
            members: 3,
            wan: mbit(10_000.0),
            wire_overhead: WIRE_OVERHEAD,
            near_latency: 1_000_000,
            far_latency: 40_000_000,
            start_spread: 1_000_000_000,
            new_chunks: None,
            faults: Faults::default(),
            seed: 1,
            fetch: FetchConfig::default().for_release(release_bytes),
            node_slots: NODE_UPLOAD_SLOTS,
            origin_slots: ORIGIN_UPLOAD_SLOTS,
        }
    }
}
