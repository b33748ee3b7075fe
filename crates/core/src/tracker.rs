//! The tracker: which node holds or fetches which release, as soft state.
//!
//! Nodes announce themselves (name, region, peer address) with the releases they hold or
//! are fetching; the answer is the peers to fetch a release from. An announcement is
//! forgotten after [`Tracker::ttl`]: a node that stops announcing drops out by itself.
//! Nothing here goes through Raft; after a restart the tracker fills again within one
//! announce interval.
//!
//! **Gateways.** Of each region's nodes that run a release's repository, the
//! [`Tracker::gateways`] with the highest rendezvous weight for the release are its
//! *gateways*: they alone bring the release's chunks into the region (across the WAN, or
//! from the origin), and the region's other nodes fetch from each other and from them.
//! Every node of the region computes the same gateways' shares of the chunks only if it
//! sees the same gateways, so every answer names all of its region's gateways, and a
//! gateway's answer names every region's gateways too; the rest of an answer is a sample
//! of the nodes announcing the release in the asker's region (then in the others, when
//! its region is small), different for every asker, so that no node is everyone's first
//! choice. With at most `gateways` nodes per region every node is a gateway and every
//! answer names everyone (up to [`Tracker::max_peers`]).
//!
//! The gateways come from the repository's nodes, not from those that announced the
//! release so far, so that they are known from the first answer: every node of the
//! repository fetches its goal's release, and nodes see a new goal up to a second or so
//! apart. When the gateways were drawn from the announcers, no answer was final until the
//! last node had announced, and until then no node crossed regions and the origin idled
//! (about 1.1 s of every run at scale). A node of the repository that has not announced
//! the release [`Tracker::start_grace`] after the first node did is passed over: it may
//! be stuck, and a gateway that never fetches holds its region's share back. An asker
//! that does not say which repository it fetches the release for gets the gateways among
//! the release's announcers, and no final view.
//!
//! Cost: an answer takes O(log N + peers) with N nodes announcing the release: nodes are
//! kept per release and region in rendezvous order, and the sample is a run of that
//! order from a point that depends on the asker. A region's gateways among a repository's
//! nodes take O(M) for its M nodes once per release, then again only when they change.
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
    /// The gateways named are final (drawn from the nodes of the repository the asker
    /// fetches the release for; they change only as nodes join, leave or fail to start),
    /// and so is every node's view of who brings which chunk in. A fetch waits for this,
    /// or a while, before it crosses regions.
    pub complete: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    announce: Announce,
    at: Instant,
}

/// A node's place in a release's rendezvous order: (weight, name), highest first.
type Place = (u64, String);

/// The nodes announcing one release, per region in rendezvous order, and when the
/// first of them did.
#[derive(Debug, Clone)]
struct Announcers {
    since: Instant,
    regions: BTreeMap<String, BTreeSet<Place>>,
}

/// The nodes of one region that run one repository.
#[derive(Debug, Clone, Default)]
struct Members {
    nodes: BTreeSet<String>,
    /// Drawn anew from `Tracker::changes` whenever `nodes` changes: cached rankings of an
    /// older one are stale.
    version: u64,
}

/// The first of a region's `Members` in a release's rendezvous order, highest first.
#[derive(Debug, Clone)]
struct Ranked {
    version: u64,
    nodes: Vec<String>,
}

/// How many of a region's nodes a cached ranking keeps, per gateway: enough to pass over
/// the few that have not started without ranking the region again.
const RANKED_PER_GATEWAY: usize = 4;

/// Releases whose rankings are cached at most; past it the cache starts over.
const RANKED_MAX: usize = 256;

#[derive(Debug, Clone)]
pub struct Tracker {
    /// How long an announcement counts.
    pub ttl: Duration,
    /// Most peers handed out per answer, besides the gateways.
    pub max_peers: usize,
    /// Gateways per region and release.
    pub gateways: usize,
    /// How long after a release's first announcement a node of its repository that has
    /// not announced it may still be one of its gateways.
    pub start_grace: Duration,
    nodes: BTreeMap<String, Entry>,
    /// Per release: the nodes announcing it.
    order: HashMap<ReleaseId, Announcers>,
    /// Per repository, per region: the nodes that run it.
    members: HashMap<String, BTreeMap<String, Members>>,
    /// Membership changes so far (what `Members::version` is drawn from).
    changes: u64,
    /// Per release and region: its repository's nodes there, ranked.
    ranked: HashMap<ReleaseId, HashMap<String, Ranked>>,
}

impl Tracker {
    pub fn new(ttl: Duration, max_peers: usize, gateways: usize) -> Tracker {
        Tracker {
            ttl,
            max_peers,
            gateways: gateways.max(1),
            start_grace: Duration::from_secs(3),
            nodes: BTreeMap::new(),
            order: HashMap::new(),
            members: HashMap::new(),
            changes: 0,
            ranked: HashMap::new(),
        }
    }

    /// Record `a` at `now`, replacing the node's previous announcement.
    pub fn announce(&mut self, a: Announce, now: Instant) {
        let same = self.nodes.get(&a.node).is_some_and(|e| {
            e.announce.region == a.region
                && e.announce.holds == a.holds
                && e.announce.fetching == a.fetching
        });
        // Most announcements repeat the node's region and repositories: nothing to change.
        let moved = !self
            .nodes
            .get(&a.node)
            .is_some_and(|e| e.announce.region == a.region && repos(&e.announce).eq(repos(&a)));
        if moved {
            if let Some(old) = self.nodes.get(&a.node).map(|e| e.announce.clone()) {
                self.enrol(&old, false);
            }
            self.enrol(&a, true);
        }
        if !same {
            self.unindex(&a.node);
            for r in a.holds.iter().chain(&a.fetching) {
                self.order
                    .entry(*r)
                    .or_insert_with(|| Announcers {
                        since: now,
                        regions: BTreeMap::new(),
                    })
                    .regions
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
            let Some(regions) = self.order.get_mut(r).map(|o| &mut o.regions) else {
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

    /// Count `a`'s node among the members of its repositories (each once), or (`add`
    /// false) take it out.
    fn enrol(&mut self, a: &Announce, add: bool) {
        for (k, repo) in repos(a).enumerate() {
            if repos(a).take(k).any(|n| n == repo) {
                continue;
            }
            self.changes += 1;
            let version = self.changes;
            if add {
                let m = self
                    .members
                    .entry(repo.to_string())
                    .or_default()
                    .entry(a.region.clone())
                    .or_default();
                m.nodes.insert(a.node.clone());
                m.version = version;
            } else if let Some(regions) = self.members.get_mut(repo) {
                if let Some(m) = regions.get_mut(&a.region) {
                    m.nodes.remove(&a.node);
                    m.version = version;
                    if m.nodes.is_empty() {
                        regions.remove(&a.region);
                    }
                }
                if regions.is_empty() {
                    self.members.remove(repo);
                }
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
                self.enrol(&e.announce, false);
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

    /// The live announcement of `node`.
    fn entry(&self, node: &str, now: Instant) -> Option<&Announce> {
        self.nodes
            .get(node)
            .filter(|e| self.live(e, now))
            .map(|e| &e.announce)
    }

    /// The names of `region`'s gateways for `release`, highest weight first: among the
    /// region's nodes of `repo` when it is known (passing over those that have not
    /// announced the release after `start_grace`), else among the release's announcers.
    fn gateways_of(
        &mut self,
        repo: Option<&str>,
        release: &ReleaseId,
        region: &str,
        now: Instant,
    ) -> Vec<String> {
        let Some(members) = repo
            .and_then(|r| self.members.get(r))
            .and_then(|m| m.get(region))
        else {
            let order = self.order.get(release).and_then(|o| o.regions.get(region));
            return order
                .into_iter()
                .flat_map(|o| o.iter().rev())
                .filter(|(_, n)| self.entry(n, now).is_some())
                .take(self.gateways)
                .map(|(_, n)| n.clone())
                .collect();
        };
        let cached = self.ranked.get(release).and_then(|m| m.get(region));
        if cached.is_none_or(|r| r.version != members.version) {
            if self.ranked.len() >= RANKED_MAX {
                self.ranked.clear();
            }
            let nodes = ranked(release, &members.nodes, self.gateways * RANKED_PER_GATEWAY);
            let version = members.version;
            let by_region = self.ranked.entry(*release).or_default();
            by_region.insert(region.to_string(), Ranked { version, nodes });
        }
        let in_grace = self
            .order
            .get(release)
            .is_none_or(|o| now.saturating_duration_since(o.since) < self.start_grace);
        let eligible = |n: &String| {
            self.entry(n, now).is_some_and(|a| {
                in_grace || a.holds.contains(release) || a.fetching.contains(release)
            })
        };
        let cached = &self.ranked[release][region].nodes;
        let found: Vec<String> = cached
            .iter()
            .filter(|n| eligible(n))
            .take(self.gateways)
            .cloned()
            .collect();
        if found.len() == self.gateways || cached.len() == members.nodes.len() {
            return found;
        }
        // More of the first nodes have not started than the cache holds: rank them all.
        ranked(release, &members.nodes, members.nodes.len())
            .into_iter()
            .filter(|n| eligible(n))
            .take(self.gateways)
            .collect()
    }

    /// Peers for `asker` (in `region`) to fetch `release` from, never the asker itself:
    /// its region's gateways (every region's, if it is one), then a sample of its region,
    /// then of the others, up to `max_peers` besides the gateways.
    pub fn peers(
        &mut self,
        asker: &str,
        region: &str,
        release: &ReleaseId,
        now: Instant,
    ) -> Answer {
        let repo = self.nodes.get(asker).and_then(|e| {
            e.announce
                .apps
                .iter()
                .find(|a| a.fetching == Some(*release))
                .map(|a| a.repo.clone())
        });
        let repo = repo.filter(|r| self.members.contains_key(r));
        let own = self.gateways_of(repo.as_deref(), release, region, now);
        let is_gateway = own.iter().any(|n| n == asker);
        let mut gateways = Vec::new();
        if is_gateway {
            let regions: Vec<String> = match &repo {
                Some(r) => self.members[r].keys().cloned().collect(),
                None => self
                    .order
                    .get(release)
                    .map(|o| o.regions.keys().cloned().collect())
                    .unwrap_or_default(),
            };
            for r in regions.iter().filter(|r| r.as_str() != region) {
                gateways.extend(self.gateways_of(repo.as_deref(), release, r, now));
            }
        }
        let mut answer = Answer {
            gateway: is_gateway,
            complete: repo.is_some(),
            ..Answer::default()
        };
        let entry = |a: &Announce, gateway: bool| PeerEntry {
            node: a.node.clone(),
            region: a.region.clone(),
            addr: a.addr.clone(),
            fetching: a.fetching.contains(release) && !a.holds.contains(release),
            gateway,
        };
        let mut named: BTreeSet<&str> = BTreeSet::from([asker]);
        for n in own.iter().chain(&gateways) {
            if let Some(a) = self.entry(n, now).filter(|_| named.insert(n)) {
                answer.peers.push(entry(a, true));
            }
        }
        let Some(regions) = self.order.get(release).map(|o| &o.regions) else {
            return answer;
        };
        let mut room = self.max_peers;
        let from = spread(asker, release);
        let own = regions.get(region);
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

/// The first `n` of `nodes` in `release`'s rendezvous order, highest weight first.
fn ranked(release: &ReleaseId, nodes: &BTreeSet<String>, n: usize) -> Vec<String> {
    let mut by_weight: Vec<(u64, &String)> =
        nodes.iter().map(|x| (weight(release, x), x)).collect();
    if n < by_weight.len() {
        by_weight.select_nth_unstable_by(n, |a, b| b.cmp(a));
        by_weight.truncate(n);
    }
    by_weight.sort_unstable_by(|a, b| b.cmp(a));
    by_weight.into_iter().map(|(_, x)| x.clone()).collect()
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
        let mut sample = |n: &str| -> Vec<PeerEntry> {
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
        let gateways = |t: &mut Tracker, region: &str| -> Vec<String> {
            (0..100)
                .map(|i| format!("{region}-{i}"))
                .filter(|n| t.peers(n, region, &r, t0).gateway)
                .collect()
        };
        let (eu, us) = (gateways(&mut t, "eu"), gateways(&mut t, "us"));
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
        let now = gateways(&mut t, "eu");
        assert_eq!(now.len(), 3);
        assert!(!now.contains(&eu[0]) && now.contains(&eu[1]) && now.contains(&eu[2]));
    }

    /// Nodes of `acme/web` holding `old`, in `eu` and `us`, announced at `t0`.
    fn fleet(t: &mut Tracker, nodes: &[&str], old: ReleaseId, t0: Instant) {
        for n in nodes {
            t.announce(
                Announce {
                    apps: vec![web(old, None)],
                    ..a(n, &n[..2], &[old], &[])
                },
                t0,
            );
        }
    }

    fn web(old: ReleaseId, fetching: Option<ReleaseId>) -> AppReport {
        AppReport {
            release: Some(old),
            state: starling_proto::AppState::Running,
            fetching,
            ..AppReport::idle("acme/web")
        }
    }

    fn fetching(n: &str, old: ReleaseId, r: ReleaseId) -> Announce {
        Announce {
            apps: vec![web(old, Some(r))],
            ..a(n, &n[..2], &[old], &[r])
        }
    }

    fn gateway_names(answer: &Answer) -> BTreeSet<String> {
        let named = answer.peers.iter().filter(|p| p.gateway);
        named.map(|p| p.node.clone()).collect()
    }

    #[test]
    fn the_gateways_are_final_from_the_first_answer_drawn_from_the_repositorys_nodes() {
        let t0 = Instant::now();
        let (old, r) = (ReleaseId::of(b"old"), ReleaseId::of(b"r"));
        let mut t = Tracker::new(Duration::from_secs(30), 10, 2);
        let eu: Vec<String> = (0..6).map(|i| format!("eu-{i}")).collect();
        let us: Vec<String> = (0..6).map(|i| format!("us-{i}")).collect();
        let all: Vec<&str> = eu.iter().chain(&us).map(String::as_str).collect();
        fleet(&mut t, &all, old, t0);
        t.announce(a("eu-other", "eu", &[], &[r]), t0);
        // The first node to see the goal hears of its region's final gateways at once.
        t.announce(fetching("eu-0", old, r), t0);
        let first = t.peers("eu-0", "eu", &r, t0);
        assert!(first.complete, "the repository's nodes are known");
        // Every node of the region gets the same gateways, whenever it asks.
        let mut want = gateway_names(&first);
        if first.gateway {
            want.retain(|n| n.starts_with("eu"));
            want.insert("eu-0".into());
        }
        assert_eq!(want.len(), 2, "{want:?}");
        assert!(!want.contains("eu-other"), "it does not run the repository");
        for n in &eu {
            t.announce(fetching(n, old, r), t0);
            let answer = t.peers(n, "eu", &r, t0);
            let mut got: BTreeSet<String> = gateway_names(&answer)
                .into_iter()
                .filter(|g| g.starts_with("eu"))
                .collect();
            if answer.gateway {
                got.insert(n.clone());
            }
            assert_eq!(got, want, "{n}");
            assert!(answer.complete);
        }
        // An asker that does not say what it fetches the release for is never told so,
        // and gets the gateways among those announcing the release.
        let other = t.peers("eu-other", "eu", &r, t0);
        assert!(!other.complete);
    }

    #[test]
    fn a_node_that_has_not_started_after_the_grace_is_passed_over_until_it_does() {
        let t0 = Instant::now();
        let (old, r) = (ReleaseId::of(b"old"), ReleaseId::of(b"r"));
        let mut t = Tracker::new(Duration::from_secs(30), 10, 1);
        let nodes: Vec<String> = (0..20).map(|i| format!("eu-{i}")).collect();
        let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
        fleet(&mut t, &names, old, t0);
        // The region's gateway by weight, and a node that starts at once.
        let top = ranked(&r, &nodes.iter().cloned().collect(), 1)[0].clone();
        let asker = nodes.iter().find(|n| **n != top).unwrap().clone();
        t.announce(fetching(&asker, old, r), t0);
        let gateways = |t: &mut Tracker, now: Instant| {
            let answer = t.peers(&asker, "eu", &r, now);
            let mut g = gateway_names(&answer);
            if answer.gateway {
                g.insert(asker.clone());
            }
            g
        };
        assert_eq!(gateways(&mut t, t0), BTreeSet::from([top.clone()]));
        // The top node has not started when the grace ends: the next one takes its place.
        let late = t0 + t.start_grace;
        t.announce(fetching(&asker, old, r), late);
        let next = gateways(&mut t, late);
        assert_eq!(next.len(), 1);
        assert!(!next.contains(&top));
        // Once it starts, it is the gateway again.
        t.announce(fetching(&top, old, r), late);
        assert_eq!(gateways(&mut t, late), BTreeSet::from([top.clone()]));
        // A node of the repository that stops announcing is forgotten with its place.
        let (renewed, gone) = (
            late + Duration::from_secs(20),
            late + Duration::from_secs(31),
        );
        for n in nodes.iter().filter(|n| **n != top) {
            let again = t.nodes.get(n.as_str()).map(|e| e.announce.clone()).unwrap();
            t.announce(again, renewed);
        }
        assert_eq!(t.expire(gone), 1);
        let after = gateways(&mut t, gone);
        assert_eq!(after.len(), 1);
        assert!(!after.contains(&top));
    }
}
