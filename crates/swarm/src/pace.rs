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

/// While a node fetches, it asks the trackers for peers again this often (see
/// [`next_tracker_ask`]): peers that start later join the fetch.
pub const TRACKER_ASK_EVERY: Duration = Duration::from_secs(3);

/// How long a fetch that started `elapsed` ago waits before it asks the trackers again:
/// 100 ms, 400 ms and 800 ms after its start and when its settling (`settle`, 1 s) ends,
/// then every [`TRACKER_ASK_EVERY`]. The early asks are how a node that saw the goal
/// among the first meets the nodes of its region that saw it later (its first answer
/// names the gateways, but few others have announced the release yet); four asks per
/// node in the first second. The ask 200 ms before the end was what a large fleet's views
/// agreed by when the gateways were drawn from the release's announcers: in the
/// simulator (10 × 200 nodes seeing the goal over 1 s) the origin sent 1.05–1.17 copies
/// with it and 1.65–1.71 without.
pub fn next_tracker_ask(elapsed: Duration, settle: Duration) -> Duration {
    const SETTLING_ASKS: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(400)];
    // The last in time for its answer's connections to be up when the settling ends.
    let last = settle.saturating_sub(Duration::from_millis(200));
    let next = SETTLING_ASKS
        .into_iter()
        .chain([last, settle])
        .find(|&t| t > elapsed && t <= settle);
    match next {
        Some(t) => t - elapsed,
        None => TRACKER_ASK_EVERY,
    }
}

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

/// A node's upload slots (chunks it sends at once) and the requests it lets wait for
/// them ([`crate::upload::UploadQueue`]); `Hold` pairs senders and receivers by the
/// slot count ([`crate::FetchConfig::max_arriving`]).
pub const NODE_UPLOAD_SLOTS: usize = 2;
pub const NODE_UPLOAD_QUEUE: usize = 4;

/// A control member's upload slots and queue, serving the origin store: every gateway
/// of every region may wait there.
pub const ORIGIN_UPLOAD_SLOTS: usize = 2;
pub const ORIGIN_UPLOAD_QUEUE: usize = 32;

/// A peer connection silent this long is taken for gone (QUIC's idle timeout).
pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_come_early_while_the_start_settles() {
        let ms = Duration::from_millis;
        let settle = Duration::from_secs(1);
        let mut at = Duration::ZERO;
        let mut asks = Vec::new();
        while at < Duration::from_secs(5) {
            at += next_tracker_ask(at, settle);
            asks.push(at);
        }
        assert_eq!(
            asks,
            [ms(100), ms(400), ms(800), ms(1000), ms(4000), ms(7000)]
        );
        // A short settling is not outlived by its own asks.
        assert_eq!(next_tracker_ask(ms(0), ms(50)), ms(50));
    }
}
