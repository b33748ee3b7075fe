//! Turning a build's output directory into a content-addressed release.
//!
//! This crate owns the release format's producer side: listing the directory safely,
//! planning it as a deterministic archive, cutting the archive into content-defined
//! chunks (FastCDC, several segments at once) named by their BLAKE3 hash, storing the chunks a [`ChunkStore`] does not
//! already hold, and writing the [`Manifest`] whose hash is the release id. It never talks
//! to the network or the control plane; a caller records the release only after
//! [`create_release`] has returned, i.e. after every chunk and the manifest are durable.

pub mod archive;
pub mod cuts;
pub mod in_place;
#[cfg(feature = "s3")]
pub mod s3;
pub mod store;
pub mod unpack;

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use archive::ArchivePlan;
use cuts::CutPlanner;

use starling_proto::release::{ChunkRef, Manifest, RunSpec, MANIFEST_VERSION};
use starling_proto::{ChunkHash, ReleaseId};

pub use in_place::{DirectoryChunks, ManifestsOnly};
#[cfg(feature = "s3")]
pub use s3::S3ChunkStore;
pub use store::{ChunkStore, FsChunkStore, OriginStore, PackStore};

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    /// The store does not hold this chunk or manifest.
    #[error("{0} is not in the store")]
    NotFound(String),
    #[error("unsafe release content: {0}")]
    Unsafe(String),
    /// A bad name or a request the store refuses: the caller's fault.
    #[error("chunk store: {0}")]
    Store(String),
    #[error(transparent)]
    Manifest(#[from] starling_proto::release::ManifestError),
    /// The store's backing service failed (an S3 error, say): not the caller's fault.
    #[error("chunk store backend: {0}")]
    Backend(String),
    /// The release would be larger than its limit; nothing was stored.
    #[error("the release would be {} ({size} bytes), more than the limit of {}", mib(*size), mib(*limit))]
    TooLarge { size: u64, limit: u64 },
    /// The store is at its quota.
    #[error("chunk store full: {0}")]
    Full(String),
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

impl ReleaseError {
    pub fn io(path: &Path, source: io::Error) -> Self {
        ReleaseError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// FastCDC sizes. The defaults (64 KiB / 256 KiB / 1 MiB) are the swarm's unit of
/// transfer: a relay passes a chunk on only once it holds it whole, so every hop costs a
/// chunk's time at a node's upload rate. On the namespace testbed (3 regions × 4 nodes,
/// 40 Mbit/s uploads, 48 MiB) an average of 1 MiB took 22.4 s, 256 KiB 14.2 s and
/// 128 KiB 13.1 s, where the fluid bound is 10.1 s; below 256 KiB the WAN copies per
/// region passed 1.1 (1.10–1.16), and each chunk is a request and an origin-store object.
/// A 1 GiB release is about four thousand chunks, and a one-file change re-ships a
/// quarter of a megabyte.
#[derive(Debug, Clone, Copy)]
pub struct ChunkSizes {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkSizes {
    fn default() -> Self {
        ChunkSizes {
            min: 64 * 1024,
            avg: 256 * 1024,
            max: 1024 * 1024,
        }
    }
}

/// What creating a release did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseStats {
    pub archive_bytes: u64,
    pub chunks: usize,
    /// Chunks (and their bytes) the store did not have before.
    pub new_chunks: usize,
    pub new_bytes: u64,
}

/// Archive bytes one thread chunks at a time. Each thread holds one segment plus `max`
/// bytes of the next (the last chunk of a segment may run into it); larger segments
/// re-read that overlap and resync less often, smaller ones spread a small archive wider.
const SEGMENT: usize = 32 << 20;

/// Pack `dir`, chunk it, store new chunks and the manifest in `store`. Returns the
/// release id, the manifest and stats.
///
/// The archive is planned, not written: each of up to one thread per CPU takes the next
/// 32 MiB segment, reads its bytes straight from the files, finds its chunk cuts, waits
/// for the previous segment to say where its first chunk really starts
/// ([`cuts::CutPlanner::resync`]), then hashes and stores its chunks from the same
/// buffer. Cuts, chunks and the release id are exactly those of one sequential pass.
pub fn create_release(
    dir: &Path,
    store: &dyn ChunkStore,
    sizes: ChunkSizes,
) -> Result<(ReleaseId, Manifest, ReleaseStats), ReleaseError> {
    create_release_with(
        dir,
        store,
        ReleaseOptions {
            sizes,
            ..ReleaseOptions::default()
        },
    )
}

/// How [`create_release_with`] makes a release.
#[derive(Debug, Clone)]
pub struct ReleaseOptions {
    pub sizes: ChunkSizes,
    /// Refused with [`ReleaseError::TooLarge`] before anything is stored when the
    /// archive would be larger (known from the listing, before any read).
    pub max_bytes: u64,
    /// How nodes run it, written into the manifest.
    pub run: Option<RunSpec>,
}

impl Default for ReleaseOptions {
    fn default() -> Self {
        ReleaseOptions {
            sizes: ChunkSizes::default(),
            max_bytes: u64::MAX,
            run: None,
        }
    }
}

/// [`create_release`] with a size limit and run commands.
pub fn create_release_with(
    dir: &Path,
    store: &dyn ChunkStore,
    opts: ReleaseOptions,
) -> Result<(ReleaseId, Manifest, ReleaseStats), ReleaseError> {
    let ReleaseOptions {
        sizes,
        max_bytes,
        run,
    } = opts;
    let files = archive::list(dir)?;
    let plan = ArchivePlan::new(&files)?;
    if plan.len() > max_bytes {
        return Err(ReleaseError::TooLarge {
            size: plan.len(),
            limit: max_bytes,
        });
    }
    let job = Job {
        dir,
        files: &files,
        plan: &plan,
        store,
        planner: CutPlanner::new(sizes),
        max: sizes.max as usize,
        segments: plan.len().div_ceil(SEGMENT as u64) as usize,
        next: AtomicUsize::new(0),
        handoffs: Handoffs::new(),
        done: Mutex::new(BTreeMap::new()),
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8)
        .min(job.segments.max(1));
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads).map(|_| s.spawn(|| job.work())).collect();
        // Every worker's result is taken so that none is left running; the first error
        // explains the failure (the others stopped because of it).
        let mut first = Ok(());
        for w in workers {
            let r = w
                .join()
                .unwrap_or_else(|_| Err(ReleaseError::Store("a chunking thread panicked".into())));
            if first.is_ok() {
                first = r;
            }
        }
        first
    })?;
    let done = job.done.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut stats = ReleaseStats {
        archive_bytes: plan.len(),
        chunks: 0,
        new_chunks: 0,
        new_bytes: 0,
    };
    let mut chunks = Vec::new();
    for seg in done.into_values() {
        stats.new_chunks += seg.new_chunks;
        stats.new_bytes += seg.new_bytes;
        chunks.extend(seg.chunks);
    }
    stats.chunks = chunks.len();
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        archive_size: stats.archive_bytes,
        files,
        chunks,
        run,
    };
    let (id, encoded) = manifest.encode_with_id()?;
    store.put_manifest(&id, &encoded)?;
    Ok((id, manifest, stats))
}

/// One release being chunked: what the segment workers share.
struct Job<'a> {
    dir: &'a Path,
    files: &'a [starling_proto::release::FileEntry],
    plan: &'a ArchivePlan,
    store: &'a dyn ChunkStore,
    planner: CutPlanner,
    max: usize,
    segments: usize,
    /// The next segment nobody has taken.
    next: AtomicUsize,
    handoffs: Handoffs,
    done: Mutex<BTreeMap<usize, SegmentChunks>>,
}

/// The chunks that start in one segment.
struct SegmentChunks {
    chunks: Vec<ChunkRef>,
    new_chunks: usize,
    new_bytes: u64,
}

impl Job<'_> {
    fn work(&self) -> Result<(), ReleaseError> {
        // A worker that stops early (an error, a panic) must wake the others waiting on
        // its hand-off: unless it finished, dropping the guard fails the job.
        struct Unfinished<'h>(&'h Handoffs, bool);
        impl Drop for Unfinished<'_> {
            fn drop(&mut self) {
                if self.1 {
                    self.0.fail();
                }
            }
        }
        let mut guard = Unfinished(&self.handoffs, true);
        let r = self.work_segments();
        guard.1 = r.is_err();
        r
    }

    fn work_segments(&self) -> Result<(), ReleaseError> {
        let total = self.plan.len();
        let mut buf = vec![0u8; total.min((SEGMENT + self.max) as u64) as usize];
        loop {
            let k = self.next.fetch_add(1, Ordering::Relaxed);
            if k >= self.segments {
                return Ok(());
            }
            let base = k as u64 * SEGMENT as u64;
            let until = (total - base).min(SEGMENT as u64) as usize;
            let end = (total - base).min((SEGMENT + self.max) as u64) as usize;
            let buf = &mut buf[..end];
            self.plan.read_at(self.dir, self.files, base, buf)?;
            let speculative = self.planner.chain(buf, 0, until);
            let Some(from) = self.handoffs.wait(k) else {
                return Ok(()); // another worker failed; its error is the one reported
            };
            let cuts = self
                .planner
                .resync(buf, (from - base) as usize, &speculative, until);
            if let Some(last) = cuts.last() {
                self.handoffs.publish(k + 1, base + *last as u64);
            }
            let mut seg = SegmentChunks {
                chunks: Vec::with_capacity(cuts.len()),
                new_chunks: 0,
                new_bytes: 0,
            };
            for w in cuts.windows(2) {
                let data = &buf[w[0]..w[1]];
                let hash = ChunkHash::of(data);
                if !self.store.has_chunk(&hash)? {
                    self.store.put_chunk(&hash, data)?;
                    seg.new_chunks += 1;
                    seg.new_bytes += data.len() as u64;
                }
                seg.chunks.push(ChunkRef {
                    hash,
                    size: data.len() as u32,
                });
            }
            self.done
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(k, seg);
        }
    }
}

/// Where each segment's first chunk starts, published by the worker of the segment
/// before it. Segment 0 starts at 0.
struct Handoffs {
    state: Mutex<(BTreeMap<usize, u64>, bool)>,
    changed: Condvar,
}

impl Handoffs {
    fn new() -> Self {
        Handoffs {
            state: Mutex::new((BTreeMap::from([(0, 0)]), false)),
            changed: Condvar::new(),
        }
    }

    /// The archive offset where segment `k`'s first chunk starts, or `None` once a
    /// worker has failed. A worker only waits for a segment taken before its own, so
    /// the wait always ends.
    fn wait(&self, k: usize) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if st.1 {
                return None;
            }
            if let Some(at) = st.0.remove(&k) {
                return Some(at);
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn publish(&self, k: usize, at: u64) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .insert(k, at);
        self.changed.notify_all();
    }

    fn fail(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn tree(root: &Path) {
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("lib")).unwrap();
        fs::write(root.join("bin/server"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::write(root.join("lib/data.txt"), vec![b'x'; 100_000]).unwrap();
        symlink("../lib/data.txt", root.join("bin/data")).unwrap();
    }

    #[test]
    fn same_content_same_id_and_chunks_round_trip() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        tree(&a);
        tree(&b);
        let store = FsChunkStore::new(t.path().join("store")).unwrap();
        let sizes = ChunkSizes {
            min: 4096,
            avg: 16384,
            max: 65536,
        };
        let (id_a, m, s1) = create_release(&a, &store, sizes).unwrap();
        let (id_b, _, s2) = create_release(&b, &store, sizes).unwrap();
        assert_eq!(id_a, id_b);
        assert!(s1.new_chunks > 0);
        assert_eq!(s2.new_chunks, 0, "identical content stored twice");
        // Chunks read back re-hash to their names and concatenate to the archive.
        let mut total = 0u64;
        for c in &m.chunks {
            let bytes = store.get_chunk(&c.hash).unwrap();
            assert_eq!(ChunkHash::of(&bytes), c.hash);
            total += bytes.len() as u64;
        }
        assert_eq!(total, m.archive_size);
        let stored = Manifest::decode(&store.get_manifest(&id_a).unwrap()).unwrap();
        assert_eq!(stored.id().unwrap(), id_a);
    }

    #[test]
    fn escaping_symlinks_fail() {
        let t = tempfile::tempdir().unwrap();
        let store = FsChunkStore::new(t.path().join("store")).unwrap();
        for target in ["/etc", "../../etc/passwd"] {
            let d = t.path().join(format!("out{}", target.len()));
            fs::create_dir_all(&d).unwrap();
            symlink(target, d.join("evil")).unwrap();
            let err = create_release(&d, &store, ChunkSizes::default()).unwrap_err();
            assert!(matches!(err, ReleaseError::Unsafe(_)), "{target}: {err}");
        }
    }
}
