//! The tracker: which node holds or fetches which release, as soft state.
//!
//! Nodes announce themselves (name, region, peer address) with the releases they hold or
//! are fetching; the answer is the peers to fetch a release from — the asker's region
//! first, then the others, each group spread differently for every asker so that no
//! node is everyone's first choice — and the origins last. An announcement is forgotten
//! after [`Tracker::ttl`]: a node that stops announcing drops out by itself. Nothing
//! here goes through Raft; after a restart the tracker fills again within one announce
//! interval.
//!
//! Load: a node announces once per interval (the node daemon uses 10 s), one small
//! request per node, so 1,000 nodes cost a member 100 requests a second.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use starling_proto::{AppReport, ReleaseId};

/// One node's announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    pub node: String,
    pub region: String,
    /// Where it serves chunks (QUIC).
    pub addr: String,
    /// Releases it holds whole.
    pub holds: Vec<ReleaseId>,
    /// Releases it is fetching now.
    pub fetching: Vec<ReleaseId>,
    /// What it does with each of its repositories.
    pub apps: Vec<AppReport>,
}

/// A peer handed out for a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEntry {
    pub node: String,
    pub region: String,
    pub addr: String,
    /// It is fetching the release too (rather than holding it whole).
    pub fetching: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    announce: Announce,
    at: Instant,
}

#[derive(Debug, Clone)]
pub struct Tracker {
    /// How long an announcement counts.
    pub ttl: Duration,
    /// Most peers handed out per answer.
    pub max_peers: usize,
    nodes: BTreeMap<String, Entry>,
}

impl Tracker {
    pub fn new(ttl: Duration, max_peers: usize) -> Tracker {
        Tracker {
            ttl,
            max_peers,
            nodes: BTreeMap::new(),
        }
    }

    /// Record `a` at `now`, replacing the node's previous announcement.
    pub fn announce(&mut self, a: Announce, now: Instant) {
        self.nodes.insert(
            a.node.clone(),
            Entry {
                announce: a,
                at: now,
            },
        );
    }

    /// Forget announcements older than the TTL; how many were forgotten.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.nodes.len();
        let ttl = self.ttl;
        self.nodes
            .retain(|_, e| now.saturating_duration_since(e.at) < ttl);
        before - self.nodes.len()
    }

    /// The live announcements, by node name.
    pub fn nodes(&self, now: Instant) -> impl Iterator<Item = (&Announce, Instant)> {
        let ttl = self.ttl;
        self.nodes
            .values()
            .filter(move |e| now.saturating_duration_since(e.at) < ttl)
            .map(|e| (&e.announce, e.at))
    }

    /// Peers for `asker` (in `region`) to fetch `release` from: its region first, then
    /// the rest, at most `max_peers`, never the asker itself.
    pub fn peers(
        &self,
        asker: &str,
        region: &str,
        release: &ReleaseId,
        now: Instant,
    ) -> Vec<PeerEntry> {
        let mut found: Vec<(bool, u64, PeerEntry)> = self
            .nodes(now)
            .filter(|(a, _)| a.node != asker)
            .filter_map(|(a, _)| {
                let holds = a.holds.contains(release);
                let fetching = a.fetching.contains(release);
                (holds || fetching).then(|| {
                    let entry = PeerEntry {
                        node: a.node.clone(),
                        region: a.region.clone(),
                        addr: a.addr.clone(),
                        fetching: fetching && !holds,
                    };
                    (a.region != region, spread(asker, &a.node), entry)
                })
            })
            .collect();
        found.sort_by_key(|x| (x.0, x.1));
        found
            .into_iter()
            .take(self.max_peers)
            .map(|(_, _, e)| e)
            .collect()
    }
}

/// A per-(asker, peer) order: every asker sees the peers in a different order.
fn spread(asker: &str, peer: &str) -> u64 {
    // FNV-1a over both names: cheap, stable, and good enough to shuffle a list.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in asker.bytes().chain([0]).chain(peer.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(node: &str, region: &str, holds: &[ReleaseId], fetching: &[ReleaseId]) -> Announce {
        Announce {
            node: node.into(),
            region: region.into(),
            addr: format!("{node}:7000"),
            holds: holds.to_vec(),
            fetching: fetching.to_vec(),
            apps: Vec::new(),
        }
    }

    #[test]
    fn same_region_first_never_the_asker_and_stale_nodes_go() {
        let t0 = Instant::now();
        let r = ReleaseId::of(b"r");
        let other = ReleaseId::of(b"other");
        let mut t = Tracker::new(Duration::from_secs(30), 10);
        t.announce(a("eu-1", "eu", &[r], &[]), t0);
        t.announce(a("eu-2", "eu", &[], &[r]), t0);
        t.announce(a("us-1", "us", &[r], &[]), t0);
        t.announce(a("us-2", "us", &[other], &[]), t0);
        t.announce(a("eu-me", "eu", &[], &[r]), t0);
        let got = t.peers("eu-me", "eu", &r, t0);
        let names: Vec<&str> = got.iter().map(|p| p.node.as_str()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names[..2].contains(&"eu-1") && names[..2].contains(&"eu-2"));
        assert_eq!(names[2], "us-1");
        assert!(got.iter().any(|p| p.node == "eu-2" && p.fetching));
        // eu-1 stops announcing; the others go on.
        let later = t0 + Duration::from_secs(20);
        for n in ["eu-2", "us-1", "eu-me"] {
            let region = if n.starts_with("us") { "us" } else { "eu" };
            let holds = if n == "us-1" { vec![r] } else { vec![] };
            let fetching = if n == "us-1" { vec![] } else { vec![r] };
            t.announce(a(n, region, &holds, &fetching), later);
        }
        let much_later = t0 + Duration::from_secs(40);
        assert_eq!(t.expire(much_later), 2, "eu-1 and us-2 are forgotten");
        let names: Vec<String> = t
            .peers("eu-me", "eu", &r, much_later)
            .into_iter()
            .map(|p| p.node)
            .collect();
        assert_eq!(names, ["eu-2", "us-1"]);
    }

    #[test]
    fn answers_are_bounded_and_differ_per_asker() {
        let t0 = Instant::now();
        let r = ReleaseId::of(b"r");
        let mut t = Tracker::new(Duration::from_secs(30), 5);
        for i in 0..50 {
            t.announce(a(&format!("n{i}"), "eu", &[r], &[]), t0);
        }
        let x = t.peers("n0", "eu", &r, t0);
        let y = t.peers("n1", "eu", &r, t0);
        assert_eq!((x.len(), y.len()), (5, 5));
        assert_ne!(x, y, "every asker got the same peers");
    }
}
