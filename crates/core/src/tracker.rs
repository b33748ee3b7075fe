//! The tracker: which node holds or fetches which release, as soft state.
//!
//! Nodes announce themselves (name, region, peer address) with the releases they hold or
//! are fetching; the answer is the peers to fetch a release from. An announcement is
//! forgotten after [`Tracker::ttl`]: a node that stops announcing drops out by itself.
//! Nothing here goes through Raft; after a restart the tracker fills again within one
//! announce interval.
//!
//! **Gateways.** Of each region's nodes that announce a release, the [`Tracker::gateways`]
//! with the highest rendezvous weight for the release are its *gateways*: they alone
//! bring the release's chunks into the region (across the WAN, or from the origin), and
//! the region's other nodes fetch from each other and from them. Every node of the region
//! computes the same gateways' shares of the chunks only if it sees the same gateways,
//! so every answer names all of its region's gateways, and a gateway's answer names every
//! region's gateways too; the rest of an answer is a sample of the asker's region (then
//! of the others, when its region is small), different for every asker, so that no node
//! is everyone's first choice. With at most `gateways` nodes per region every node is a
//! gateway and every answer names everyone (up to [`Tracker::max_peers`]).
//!
//! Cost: an answer takes O(log N + peers) with N nodes announcing the release: nodes are
//! kept per release and region in rendezvous order, and the sample is a run of that
//! order from a point that depends on the asker.
//!
//! Load: a node announces once per interval (the node daemon uses 10 s, 3 s while it
//! fetches), one small request per node, so 1,000 nodes cost a member 100 to 333
//! requests a second.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
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
    /// It is a gateway of its region for the release: it takes a share of bringing the
    /// release's chunks into its region.
    pub gateway: bool,
}

/// The tracker's answer to one node about one release.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Answer {
    /// The asker is one of its region's gateways for the release.
    pub gateway: bool,
    pub peers: Vec<PeerEntry>,
    /// Every node that runs the repository the asker fetches the release for announces
    /// the release (fetching or holding it): the gateways are final, and so is every
    /// node's view of who brings which chunk in. A fetch waits for this, or a while,
    /// before it crosses regions.
    pub complete: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    announce: Announce,
    at: Instant,
}

/// A node's place in a release's rendezvous order: (weight, name), highest first.
type Place = (u64, String);

#[derive(Debug, Clone)]
pub struct Tracker {
    /// How long an announcement counts.
    pub ttl: Duration,
    /// Most peers handed out per answer, besides the gateways.
    pub max_peers: usize,
    /// Gateways per region and release.
    pub gateways: usize,
    nodes: BTreeMap<String, Entry>,
    /// Per release, per region: the nodes announcing it, in rendezvous order.
    order: HashMap<ReleaseId, BTreeMap<String, BTreeSet<Place>>>,
    /// Per repository, how many nodes run it: what a release's announcers are counted
    /// against.
    repos: HashMap<String, usize>,
}

impl Tracker {
    pub fn new(ttl: Duration, max_peers: usize, gateways: usize) -> Tracker {
        Tracker {
            ttl,
            max_peers,
            gateways: gateways.max(1),
            nodes: BTreeMap::new(),
            order: HashMap::new(),
            repos: HashMap::new(),
        }
    }

    /// Record `a` at `now`, replacing the node's previous announcement.
    pub fn announce(&mut self, a: Announce, now: Instant) {
        let same = self.nodes.get(&a.node).is_some_and(|e| {
            e.announce.region == a.region
                && e.announce.holds == a.holds
                && e.announce.fetching == a.fetching
        });
        // Most announcements repeat the node's repositories: nothing to count then.
        let old = self.nodes.get(&a.node).map(|e| &e.announce);
        if !old.is_some_and(|o| repos(o).eq(repos(&a))) {
            if let Some(o) = old {
                count_repos(&mut self.repos, o, false);
            }
            count_repos(&mut self.repos, &a, true);
        }
        if !same {
            self.unindex(&a.node);
            for r in a.holds.iter().chain(&a.fetching) {
                self.order
                    .entry(*r)
                    .or_default()
                    .entry(a.region.clone())
                    .or_default()
                    .insert((weight(r, &a.node), a.node.clone()));
            }
        }
        self.nodes.insert(
            a.node.clone(),
            Entry {
                announce: a,
                at: now,
            },
        );
    }

    fn unindex(&mut self, node: &str) {
        let Some(old) = self.nodes.get(node) else {
            return;
        };
        let a = &old.announce;
        for r in a.holds.iter().chain(&a.fetching) {
            let Some(regions) = self.order.get_mut(r) else {
                continue;
            };
            if let Some(set) = regions.get_mut(&a.region) {
                set.remove(&(weight(r, node), node.to_string()));
                if set.is_empty() {
                    regions.remove(&a.region);
                }
            }
            if regions.is_empty() {
                self.order.remove(r);
            }
        }
    }

    /// Forget announcements older than the TTL; how many were forgotten.
    pub fn expire(&mut self, now: Instant) -> usize {
        let ttl = self.ttl;
        let stale: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.at) >= ttl)
            .map(|(n, _)| n.clone())
            .collect();
        for n in &stale {
            self.unindex(n);
            if let Some(e) = self.nodes.remove(n) {
                count_repos(&mut self.repos, &e.announce, false);
            }
        }
        stale.len()
    }

    /// The live announcements, by node name.
    pub fn nodes(&self, now: Instant) -> impl Iterator<Item = (&Announce, Instant)> {
        self.nodes
            .values()
            .filter(move |e| self.live(e, now))
            .map(|e| (&e.announce, e.at))
    }

    fn live(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.at) < self.ttl
    }

    /// The live announcement of `node`, if it names `release`.
    fn entry(&self, node: &str, now: Instant) -> Option<&Announce> {
        self.nodes
            .get(node)
            .filter(|e| self.live(e, now))
            .map(|e| &e.announce)
    }

    /// `region`'s gateways for `release`, highest weight first.
    fn gateways_of<'a>(
        &'a self,
        order: &'a BTreeSet<Place>,
        now: Instant,
    ) -> impl Iterator<Item = &'a Announce> + 'a {
        order
            .iter()
            .rev()
            .filter_map(move |(_, n)| self.entry(n, now))
            .take(self.gateways)
    }

    /// Peers for `asker` (in `region`) to fetch `release` from, never the asker itself:
    /// its region's gateways (every region's, if it is one), then a sample of its region,
    /// then of the others, up to `max_peers` besides the gateways.
    pub fn peers(&self, asker: &str, region: &str, release: &ReleaseId, now: Instant) -> Answer {
        let Some(regions) = self.order.get(release) else {
            return Answer::default();
        };
        let entry = |a: &Announce, gateway: bool| PeerEntry {
            node: a.node.clone(),
            region: a.region.clone(),
            addr: a.addr.clone(),
            fetching: a.fetching.contains(release) && !a.holds.contains(release),
            gateway,
        };
        let announcing: usize = regions.values().map(BTreeSet::len).sum();
        let repo = self.nodes.get(asker).and_then(|e| {
            e.announce
                .apps
                .iter()
                .find(|a| a.fetching == Some(*release))
        });
        let mut answer = Answer {
            complete: repo
                .and_then(|a| self.repos.get(&a.repo))
                .is_some_and(|&n| announcing >= n),
            ..Answer::default()
        };
        let mut named: BTreeSet<&str> = BTreeSet::from([asker]);
        let own = regions.get(region);
        if let Some(order) = own {
            for a in self.gateways_of(order, now) {
                if a.node == asker {
                    answer.gateway = true;
                } else if named.insert(&a.node) {
                    answer.peers.push(entry(a, true));
                }
            }
        }
        if answer.gateway {
            for (_, order) in regions.iter().filter(|(r, _)| r.as_str() != region) {
                for a in self.gateways_of(order, now) {
                    if named.insert(&a.node) {
                        answer.peers.push(entry(a, true));
                    }
                }
            }
        }
        let mut room = self.max_peers;
        let from = spread(asker, release);
        let others = regions.iter().filter(|(r, _)| r.as_str() != region);
        for (_, order) in own
            .into_iter()
            .map(|o| (region, o))
            .chain(others.map(|(r, o)| (r.as_str(), o)))
        {
            // A run of the rendezvous order from a point of the asker's own.
            let start = (from, String::new());
            let run = order
                .range((Bound::Included(&start), Bound::Unbounded))
                .chain(order.range((Bound::Unbounded, Bound::Excluded(&start))));
            for (_, n) in run {
                if room == 0 {
                    return answer;
                }
                let Some(a) = self.entry(n, now) else {
                    continue;
                };
                if named.insert(&a.node) {
                    answer.peers.push(entry(a, false));
                    room -= 1;
                }
            }
        }
        answer
    }
}

/// The repositories an announcement runs (one report each).
fn repos(a: &Announce) -> impl Iterator<Item = &str> {
    a.apps.iter().map(|r| r.repo.as_str())
}

/// Count `a`'s repositories in `counts`, each once, or (`add` false) take them out.
fn count_repos(counts: &mut HashMap<String, usize>, a: &Announce, add: bool) {
    for (k, name) in repos(a).enumerate() {
        if repos(a).take(k).any(|n| n == name) {
            continue;
        }
        if add {
            *counts.entry(name.to_string()).or_default() += 1;
        } else if let Some(n) = counts.get_mut(name) {
            *n -= 1;
            if *n == 0 {
                counts.remove(name);
            }
        }
    }
}

/// A node's rendezvous weight for a release (FNV-1a over both): stable, cheap, and
/// different for every release, so that each release has gateways of its own.
fn weight(release: &ReleaseId, node: &str) -> u64 {
    fnv(release
        .as_bytes()
        .iter()
        .copied()
        .chain([0])
        .chain(node.bytes()))
}

/// Where an asker's sample of a release's order starts.
fn spread(asker: &str, release: &ReleaseId) -> u64 {
    fnv(asker
        .bytes()
        .chain([0])
        .chain(release.as_bytes().iter().copied()))
}

fn fnv(bytes: impl Iterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// FNV's high bits are weak for short inputs: a splitmix64 finalizer spreads them.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
        let mut t = Tracker::new(Duration::from_secs(30), 10, 8);
        t.announce(a("eu-1", "eu", &[r], &[]), t0);
        t.announce(a("eu-2", "eu", &[], &[r]), t0);
        t.announce(a("us-1", "us", &[r], &[]), t0);
        t.announce(a("us-2", "us", &[other], &[]), t0);
        t.announce(a("eu-me", "eu", &[], &[r]), t0);
        let got = t.peers("eu-me", "eu", &r, t0).peers;
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
            .peers
            .into_iter()
            .map(|p| p.node)
            .collect();
        assert_eq!(names, ["eu-2", "us-1"]);
    }

    #[test]
    fn answers_are_bounded_and_differ_per_asker() {
        let t0 = Instant::now();
        let r = ReleaseId::of(b"r");
        let mut t = Tracker::new(Duration::from_secs(30), 5, 8);
        for i in 0..50 {
            t.announce(a(&format!("n{i}"), "eu", &[r], &[]), t0);
        }
        // Besides the region's gateways, five.
        let sample = |n: &str| -> Vec<PeerEntry> {
            let a = t.peers(n, "eu", &r, t0);
            a.peers.into_iter().filter(|p| !p.gateway).collect()
        };
        let (x, y) = (sample("n0"), sample("n1"));
        assert_eq!((x.len(), y.len()), (5, 5));
        assert_ne!(x, y, "every asker got the same peers");
    }

    #[test]
    fn every_answer_names_the_regions_gateways_and_a_gateway_sees_all_regions() {
        let t0 = Instant::now();
        let r = ReleaseId::of(b"r");
        let mut t = Tracker::new(Duration::from_secs(30), 10, 3);
        for i in 0..100 {
            t.announce(a(&format!("eu-{i}"), "eu", &[], &[r]), t0);
            t.announce(a(&format!("us-{i}"), "us", &[], &[r]), t0);
        }
        let gateways = |t: &Tracker, region: &str| -> Vec<String> {
            (0..100)
                .map(|i| format!("{region}-{i}"))
                .filter(|n| t.peers(n, region, &r, t0).gateway)
                .collect()
        };
        let (eu, us) = (gateways(&t, "eu"), gateways(&t, "us"));
        assert_eq!((eu.len(), us.len()), (3, 3));
        for i in 0..100 {
            let n = format!("eu-{i}");
            let answer = t.peers(&n, "eu", &r, t0);
            let partners: Vec<&str> = answer
                .peers
                .iter()
                .filter(|p| p.gateway)
                .map(|p| p.node.as_str())
                .collect();
            if answer.gateway {
                // The two other gateways of its region and all of the other region's.
                assert_eq!(partners.len(), 5, "{n}: {partners:?}");
                assert!(us.iter().all(|g| partners.contains(&g.as_str())));
            } else {
                let mut sorted = partners.clone();
                sorted.sort();
                let mut want: Vec<&str> = eu.iter().map(String::as_str).collect();
                want.sort();
                assert_eq!(sorted, want, "{n}");
                // Besides the gateways, a sample of its own region.
                let rest = &answer.peers[3..];
                assert_eq!(rest.len(), 10);
                assert!(rest
                    .iter()
                    .all(|p| p.region == "eu" && !p.gateway && p.node != n));
            }
        }
        // A gateway that leaves is replaced by the next in the order.
        t.announce(a(&eu[0], "eu", &[], &[]), t0);
        let now = gateways(&t, "eu");
        assert_eq!(now.len(), 3);
        assert!(!now.contains(&eu[0]) && now.contains(&eu[1]) && now.contains(&eu[2]));
    }

    #[test]
    fn the_view_is_complete_once_every_node_of_the_repository_announces_the_release() {
        let t0 = Instant::now();
        let (old, r) = (ReleaseId::of(b"old"), ReleaseId::of(b"r"));
        let app = |fetching: Option<ReleaseId>| AppReport {
            release: Some(old),
            state: starling_proto::AppState::Running,
            fetching,
            ..AppReport::idle("acme/web")
        };
        let mut t = Tracker::new(Duration::from_secs(30), 10, 2);
        // Three nodes run the repository; one more runs something else.
        for n in ["eu-1", "eu-2", "us-1"] {
            let region = &n[..2];
            t.announce(
                Announce {
                    apps: vec![app(None)],
                    ..a(n, region, &[old], &[])
                },
                t0,
            );
        }
        t.announce(a("us-other", "us", &[], &[]), t0);
        let fetching = |n: &str| Announce {
            apps: vec![app(Some(r))],
            ..a(n, &n[..2], &[old], &[r])
        };
        t.announce(fetching("eu-1"), t0);
        t.announce(fetching("us-1"), t0);
        assert!(
            !t.peers("eu-1", "eu", &r, t0).complete,
            "eu-2 has not announced r"
        );
        t.announce(fetching("eu-2"), t0);
        assert!(t.peers("eu-1", "eu", &r, t0).complete);
        // A node that finished still counts; one that left no longer needs to.
        t.announce(
            Announce {
                apps: vec![app(None)],
                ..a("us-1", "us", &[r], &[])
            },
            t0,
        );
        assert!(t.peers("eu-2", "eu", &r, t0).complete);
        // An asker that does not say what it fetches the release for is never told so.
        assert!(!t.peers("us-other", "us", &r, t0).complete);
        // A node of the repository that stops announcing is forgotten with its count.
        t.announce(
            Announce {
                apps: vec![app(None)],
                ..a("eu-3", "eu", &[old], &[])
            },
            t0,
        );
        assert!(!t.peers("eu-1", "eu", &r, t0).complete);
        let later = t0 + Duration::from_secs(20);
        for n in ["eu-1", "eu-2", "us-1", "us-other"] {
            let again = t.nodes.get(n).map(|e| e.announce.clone()).unwrap();
            t.announce(again, later);
        }
        t.expire(later + Duration::from_secs(15));
        assert!(t.peers("eu-1", "eu", &r, later).complete);
    }
}
