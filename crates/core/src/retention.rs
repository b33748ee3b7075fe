//! Retention's two decisions: which releases to let go, and which origin-store chunks no
//! kept release needs any more. The collector feeds them what it read and deletes what
//! they return.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, SystemTime};

use starling_proto::release::Manifest;
use starling_proto::Release;

use crate::state::Records;

/// Releases retention lets go: all but the newest `keep` of each repository, except any
/// that a goal names. Already collected ones are not listed again.
pub fn releases_to_collect(records: &Records, keep: usize) -> Vec<String> {
    let goals: BTreeSet<&str> = records.goals.values().map(|g| g.release.as_str()).collect();
    let mut by_repo: BTreeMap<&str, Vec<&Release>> = BTreeMap::new();
    for r in records.releases.values() {
        by_repo.entry(r.repo.as_str()).or_default().push(r);
    }
    let mut out = Vec::new();
    for rels in by_repo.values_mut() {
        rels.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.build.cmp(&a.build)));
        for r in rels.iter().skip(keep) {
            if r.collected_at.is_none() && !goals.contains(r.id.as_str()) {
                out.push(r.id.clone());
            }
        }
    }
    out
}

/// Every chunk the `kept` manifests name, plus those `spared` (confirmed to a worker
/// lately, for a release that may not be recorded yet).
pub fn referenced_chunks<'a>(
    kept: impl IntoIterator<Item = &'a Manifest>,
    spared: HashSet<String>,
) -> HashSet<String> {
    let mut referenced = spared;
    for m in kept {
        referenced.extend(m.chunks.iter().map(|c| c.hash.clone()));
    }
    referenced
}

/// The chunks a collector may delete: held, referenced by no kept release, and older than
/// `grace` — a worker may be publishing chunks of a release not recorded yet.
pub fn garbage(
    held: &[(String, SystemTime)],
    referenced: &HashSet<String>,
    now: SystemTime,
    grace: Duration,
) -> Vec<String> {
    held.iter()
        .filter(|(h, _)| !referenced.contains(h))
        .filter(|(_, t)| now.duration_since(*t).is_ok_and(|age| age >= grace))
        .map(|(h, _)| h.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_spares_referenced_and_young_chunks() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let old = now - Duration::from_secs(7200);
        let held = vec![
            ("a".repeat(64), old),
            ("b".repeat(64), old),
            ("c".repeat(64), now),
        ];
        let referenced = ["a".repeat(64)].into_iter().collect();
        assert_eq!(
            garbage(&held, &referenced, now, Duration::from_secs(3600)),
            vec!["b".repeat(64)]
        );
    }
}
