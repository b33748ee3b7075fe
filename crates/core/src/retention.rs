//! Retention's two decisions: which releases to let go, and which origin-store chunks no
//! kept release needs any more. The collector feeds them what it read and deletes what
//! they return.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use starling_proto::release::Manifest;
use starling_proto::{ChunkHash, Release, ReleaseId};

/// Releases retention lets go: all but the newest `keep` of each repository, except any
/// in `goals` (which a goal names). Already collected ones are not listed again.
pub fn releases_to_collect<'a>(
    releases: impl IntoIterator<Item = &'a Release>,
    goals: &BTreeSet<ReleaseId>,
    keep: usize,
) -> Vec<ReleaseId> {
    let mut by_repo: BTreeMap<&str, Vec<&Release>> = BTreeMap::new();
    for r in releases {
        by_repo.entry(r.repo.as_str()).or_default().push(r);
    }
    let mut out = Vec::new();
    for rels in by_repo.values_mut() {
        rels.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.build.cmp(&a.build)));
        for r in rels.iter().skip(keep) {
            if r.collected_at.is_none() && !goals.contains(&r.id) {
                out.push(r.id);
            }
        }
    }
    out
}

/// Every chunk the `kept` manifests name, plus those `spared` (confirmed to a worker
/// lately, for a release that may not be recorded yet).
pub fn referenced_chunks<'a>(
    kept: impl IntoIterator<Item = &'a Manifest>,
    spared: HashSet<ChunkHash>,
) -> HashSet<ChunkHash> {
    let mut referenced = spared;
    for m in kept {
        referenced.extend(m.chunks.iter().map(|c| c.hash));
    }
    referenced
}

/// Chunks confirmed to a worker lately (it was told a member holds them, or it put a
/// manifest naming them), with when: the collector spares them for a grace period, since
/// the release they belong to may not be recorded yet. Soft state, lost on restart, which
/// is why a member collects nothing until one grace period after it starts.
#[derive(Debug, Default, Clone)]
pub struct RecentChunks(HashMap<ChunkHash, Instant>);

impl RecentChunks {
    pub fn mark(&mut self, hashes: &[ChunkHash], now: Instant) {
        for h in hashes {
            self.0.insert(*h, now);
        }
    }

    /// The chunks marked within `grace` of `now`; older marks are forgotten.
    pub fn within(&mut self, now: Instant, grace: Duration) -> HashSet<ChunkHash> {
        self.0
            .retain(|_, at| now.saturating_duration_since(*at) < grace);
        self.0.keys().copied().collect()
    }
}

/// The chunks a collector may delete: held, referenced by no kept release, and older than
/// `grace` — a worker may be publishing chunks of a release not recorded yet.
pub fn garbage(
    held: &[(ChunkHash, SystemTime)],
    referenced: &HashSet<ChunkHash>,
    now: SystemTime,
    grace: Duration,
) -> Vec<ChunkHash> {
    held.iter()
        .filter(|(h, _)| !referenced.contains(h))
        .filter(|(_, t)| now.duration_since(*t).is_ok_and(|age| age >= grace))
        .map(|(h, _)| *h)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_chunks_are_forgotten_after_the_grace_period() {
        let mut r = RecentChunks::default();
        let t0 = Instant::now();
        let (a, b) = (ChunkHash::of(b"a"), ChunkHash::of(b"b"));
        r.mark(&[a, b], t0);
        r.mark(&[b], t0 + Duration::from_secs(5));
        let at = t0 + Duration::from_secs(8);
        let kept = r.within(at, Duration::from_secs(6));
        assert_eq!(kept, HashSet::from([b]));
        assert!(r
            .within(at + Duration::from_secs(10), Duration::from_secs(6))
            .is_empty());
    }

    #[test]
    fn garbage_spares_referenced_and_young_chunks() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let old = now - Duration::from_secs(7200);
        let [a, b, c] = [b"a", b"b", b"c"].map(|x| ChunkHash::of(x));
        let held = vec![(a, old), (b, old), (c, now)];
        let referenced = [a].into_iter().collect();
        assert_eq!(
            garbage(&held, &referenced, now, Duration::from_secs(3600)),
            vec![b]
        );
    }
}
