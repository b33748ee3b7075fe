//! Every member's chunk collector: deletes the manifests of releases retention let go and
//! the origin-store chunks that no kept release references.
//!
//! A chunk may be needed by a release that is not recorded yet: a worker asks which chunks
//! a member lacks, sends the others, puts the manifest, and only then reports the build.
//! Chunks it was told are here (or sent, or listed by a manifest it put) are remembered in
//! [`starling_core::retention::RecentChunks`] for the grace period, so an old chunk that a new release reuses is not
//! deleted under it; and no pass runs within one grace period of the member's start, when
//! that memory is empty. A manifest that cannot be read stops the pass: "unreadable" must
//! never count as "references nothing".

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use starling_core::retention;
use starling_proto::release::Manifest;
use starling_proto::{ChunkHash, ReleaseId};
use starling_release::{OriginStore, ReleaseError};

use crate::member::Member;

/// One collection pass over `origin`: delete the manifests of `collected` releases, then
/// every chunk that neither a `kept` release's manifest nor `spared` names and that is
/// older than `grace`. The number of chunks deleted.
pub fn collect_pass(
    origin: &dyn OriginStore,
    kept: &[ReleaseId],
    collected: &[ReleaseId],
    spared: HashSet<ChunkHash>,
    now: SystemTime,
    grace: Duration,
) -> Result<usize, ReleaseError> {
    let mut manifests = Vec::with_capacity(kept.len());
    for id in kept {
        let bytes = match origin.get_manifest(id) {
            Ok(b) => b,
            // A release this member never took references nothing here.
            Err(ReleaseError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        manifests.push(
            Manifest::decode(&bytes)
                .map_err(|e| ReleaseError::Store(format!("manifest {id} is unreadable: {e}")))?,
        );
    }
    let referenced = retention::referenced_chunks(&manifests, spared);
    for id in collected {
        origin.delete_manifest(id)?;
    }
    let held = origin.list_chunks()?;
    let doomed = retention::garbage(&held, &referenced, now, grace);
    for h in &doomed {
        origin.delete_chunk(h)?;
    }
    Ok(doomed.len())
}

/// Run collection passes on this member for as long as it lives.
pub async fn collect_chunks(member: Arc<Member>) {
    let grace = member.cfg.collect_grace;
    // What was confirmed to workers before a restart is not remembered: wait that out.
    tokio::time::sleep(grace).await;
    // Each pass reads every kept manifest; nothing can be collected sooner than the grace
    // period anyway, so pass at that pace (between 1 s and a minute).
    let mut tick =
        tokio::time::interval(grace.clamp(Duration::from_secs(1), Duration::from_secs(60)));
    loop {
        tick.tick().await;
        let (kept, collected): (Vec<ReleaseId>, Vec<ReleaseId>) = {
            let st = member.read();
            let (k, c): (Vec<_>, Vec<_>) = st
                .list_releases(None)
                .into_iter()
                .partition(|r| r.collected_at.is_none());
            (
                k.into_iter().map(|r| r.id).collect(),
                c.into_iter().map(|r| r.id).collect(),
            )
        };
        let spared = member
            .recent_chunks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .within(Instant::now(), grace);
        let origin = member.origin.clone();
        let res = tokio::task::spawn_blocking(move || {
            collect_pass(
                origin.as_ref(),
                &kept,
                &collected,
                spared,
                SystemTime::now(),
                grace,
            )
        })
        .await;
        match res {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(chunks = n, "unreferenced chunks collected"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "chunk collection pass stopped; nothing more deleted")
            }
            Err(e) => tracing::warn!(error = %e, "chunk collection task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_release::{create_release, ChunkSizes, ChunkStore, FsChunkStore};

    /// A store with one old release `id` in it, and an old stray chunk.
    fn store_with_release() -> (tempfile::TempDir, FsChunkStore, ReleaseId, ChunkHash) {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("f"), vec![9u8; 100_000]).unwrap();
        let store = FsChunkStore::new(t.path().join("origin")).unwrap();
        let (id, _, _) = create_release(&out, &store, ChunkSizes::default()).unwrap();
        let stray = vec![1u8; 10];
        let stray_hash = ChunkHash::of(&stray);
        store.put_chunk(&stray_hash, &stray).unwrap();
        (t, store, id, stray_hash)
    }

    #[test]
    fn a_pass_spares_kept_and_recently_confirmed_chunks() {
        let (_t, store, id, stray) = store_with_release();
        let later = SystemTime::now() + Duration::from_secs(3600);
        let grace = Duration::from_secs(60);
        // Confirmed lately: spared though old and unreferenced.
        let spared = HashSet::from([stray]);
        let n = collect_pass(&store, std::slice::from_ref(&id), &[], spared, later, grace).unwrap();
        assert_eq!(n, 0);
        assert!(store.has_chunk(&stray).unwrap());
        let n = collect_pass(
            &store,
            std::slice::from_ref(&id),
            &[],
            HashSet::new(),
            later,
            grace,
        )
        .unwrap();
        assert_eq!(n, 1);
        assert!(!store.has_chunk(&stray).unwrap());
    }

    #[test]
    fn an_unreadable_manifest_stops_the_pass() {
        let (t, store, id, stray) = store_with_release();
        let manifest = t.path().join("origin/manifests").join(id.to_hex());
        assert!(manifest.exists(), "manifest file layout changed");
        std::fs::write(&manifest, b"\xffgarbage").unwrap();
        let later = SystemTime::now() + Duration::from_secs(3600);
        let res = collect_pass(
            &store,
            &[id],
            &[],
            HashSet::new(),
            later,
            Duration::from_secs(60),
        );
        assert!(res.is_err());
        // Nothing was deleted: not the stray chunk, not the release's chunks.
        assert!(store.has_chunk(&stray).unwrap());
        assert!(store.list_chunks().unwrap().len() > 1);
    }
}
