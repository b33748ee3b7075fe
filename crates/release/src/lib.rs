//! Turning a build's output directory into a content-addressed release.
//!
//! This crate owns the release format's producer side: listing the directory safely,
//! packing it into a deterministic archive, cutting the archive into content-defined
//! chunks (FastCDC) named by their BLAKE3 hash, storing the chunks a [`ChunkStore`] does not
//! already hold, and writing the [`Manifest`] whose hash is the release id. It never talks
//! to the network or the control plane; a caller records the release only after
//! [`create_release`] has returned, i.e. after every chunk and the manifest are durable.

pub mod archive;
pub mod store;

use std::io;
use std::path::Path;
use std::sync::mpsc;

use starling_proto::release::{ChunkRef, Manifest, MANIFEST_VERSION};

pub use store::{ChunkStore, FsChunkStore};

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("unsafe release content: {0}")]
    Unsafe(String),
    #[error("chunk store: {0}")]
    Store(String),
}

impl ReleaseError {
    pub fn io(path: &Path, source: io::Error) -> Self {
        ReleaseError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// FastCDC sizes. The defaults (256 KiB / 1 MiB / 4 MiB) keep a 1 GiB release to about a
/// thousand chunks — few enough to track per peer, small enough that a one-file change
/// re-ships about a megabyte.
#[derive(Debug, Clone, Copy)]
pub struct ChunkSizes {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkSizes {
    fn default() -> Self {
        ChunkSizes {
            min: 256 * 1024,
            avg: 1024 * 1024,
            max: 4 * 1024 * 1024,
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

/// Pack `dir`, chunk it, store new chunks and the manifest in `store`. Returns the
/// release id, the manifest and stats.
///
/// Three threads work as a pipeline: one packs the archive into a pipe, this one cuts the
/// stream into chunks, and one hashes and stores them — so the archive never touches the
/// disk and packing, chunking and hashing overlap.
pub fn create_release(
    dir: &Path,
    store: &dyn ChunkStore,
    sizes: ChunkSizes,
) -> Result<(String, Manifest, ReleaseStats), ReleaseError> {
    let files = archive::list(dir)?;
    let (reader, writer) = io::pipe().map_err(|e| ReleaseError::io(dir, e))?;
    widen_pipe(&writer);
    let (chunks, stats) = std::thread::scope(|s| {
        let files = &files;
        let packer = s.spawn(move || {
            archive::write_tar(dir, files, io::BufWriter::with_capacity(1 << 20, writer))?
                .into_inner()
                .map(drop)
                .map_err(|e| ReleaseError::io(dir, e.into_error()))
        });
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(4);
        let hasher = s.spawn(
            move || -> Result<(Vec<ChunkRef>, ReleaseStats), ReleaseError> {
                let mut chunks = Vec::new();
                let mut stats = ReleaseStats {
                    archive_bytes: 0,
                    chunks: 0,
                    new_chunks: 0,
                    new_bytes: 0,
                };
                for data in rx {
                    let hash = blake3::hash(&data).to_hex().to_string();
                    if !store.has_chunk(&hash)? {
                        store.put_chunk(&hash, &data)?;
                        stats.new_chunks += 1;
                        stats.new_bytes += data.len() as u64;
                    }
                    stats.archive_bytes += data.len() as u64;
                    chunks.push(ChunkRef {
                        hash,
                        size: data.len() as u32,
                    });
                }
                stats.chunks = chunks.len();
                Ok((chunks, stats))
            },
        );
        let cdc = fastcdc::v2020::StreamCDC::new(
            io::BufReader::with_capacity(1 << 20, reader),
            sizes.min as usize,
            sizes.avg as usize,
            sizes.max as usize,
        );
        let mut cut = Ok(());
        for c in cdc {
            match c {
                // A closed channel means the hasher failed; its error is reported below.
                Ok(c) => {
                    if tx.send(c.data).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    cut = Err(ReleaseError::io(dir, io::Error::other(e.to_string())));
                    break;
                }
            }
        }
        drop(tx);
        // The packer's error (an unsafe entry, a vanished file) explains a short archive
        // best, so it comes first.
        let packed = packer
            .join()
            .unwrap_or_else(|_| Err(ReleaseError::Unsafe("the packer thread panicked".into())));
        let hashed = hasher
            .join()
            .unwrap_or_else(|_| Err(ReleaseError::Unsafe("the hasher thread panicked".into())));
        packed?;
        cut?;
        hashed
    })?;
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        archive_size: stats.archive_bytes,
        files,
        chunks,
    };
    let id = manifest.id();
    store.put_manifest(&id, &manifest.encode())?;
    Ok((id, manifest, stats))
}

/// A 64 KiB pipe (Linux's default) makes the packer and the chunker take turns 16 times
/// per megabyte; 1 MiB lets them overlap. Best effort: a smaller pipe is only slower.
fn widen_pipe(pipe: &impl std::os::fd::AsRawFd) {
    // SAFETY: fcntl(F_SETPIPE_SZ) on a pipe descriptor we own; it reads no memory of ours.
    unsafe {
        libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
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
            assert_eq!(blake3::hash(&bytes).to_hex().to_string(), c.hash);
            total += bytes.len() as u64;
        }
        assert_eq!(total, m.archive_size);
        let stored = Manifest::decode(&store.get_manifest(&id_a).unwrap()).unwrap();
        assert_eq!(stored.id(), id_a);
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
