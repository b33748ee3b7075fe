//! How often the parts of the swarm talk: the timings that the node daemon, the peer
//! transport and the control members' trackers use, kept here so that the simulator
//! runs with the same ones.

use std::time::Duration;

/// How long newly stored chunks wait to be announced together to a peer in another
/// region. Each `Have` is a packet (and half an acknowledgement back) across the WAN, and
/// with 256 KiB chunks a node stores several a second: on the testbed (3 regions × 8
/// nodes, 48 MiB) the WAN copies per remote region were 1.20 unbatched, 1.16 with 100 ms
/// and 1.14 with 400 ms, the time unchanged (16.3 s; 3×4: 13.9–14.2 s, 1.06 copies). A
/// far peer fetches only the chunks its region brings in, where this little matters.
pub const FAR_HAVE_BATCH: Duration = Duration::from_millis(400);

/// While a node fetches, it asks the trackers for peers again this often (the first time
/// again halfway through the fetch's settling): peers that start later join the fetch.
pub const TRACKER_ASK_EVERY: Duration = Duration::from_secs(3);

/// How long one read of the goals (an HTTP long-poll) waits for a new one; also the
/// longest time between a node's two looks at the members and two announcements.
pub const GOAL_POLL: Duration = Duration::from_secs(5);

/// A node announces itself this often when it is not fetching.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(10);

/// How long a tracker counts an announcement (a node that missed six is forgotten), and
/// how many peers one answer names.
pub const TRACKER_TTL: Duration = Duration::from_secs(60);
pub const TRACKER_PEERS: usize = 50;

/// Nodes per region that bring a release's chunks into the region (see
/// `starling_core::tracker`): in a region of at most this many, every node does.
pub const REGION_GATEWAYS: usize = 8;

/// A peer connection silent this long is taken for gone (QUIC's idle timeout).
pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
