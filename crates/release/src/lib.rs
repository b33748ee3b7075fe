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

use std::fs;
use std::io::{self, Seek, SeekFrom};
use std::path::Path;

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

/// Pack `dir`, chunk it, store new chunks and the manifest in `store`. `scratch` is a
/// directory for the temporary archive. Returns the release id, the manifest and stats.
pub fn create_release(
    dir: &Path,
    scratch: &Path,
    store: &dyn ChunkStore,
    sizes: ChunkSizes,
) -> Result<(String, Manifest, ReleaseStats), ReleaseError> {
    let files = archive::list(dir)?;
    fs::create_dir_all(scratch).map_err(|e| ReleaseError::io(scratch, e))?;
    let tmp = tempfile_in(scratch)?;
    let mut tmp = archive::write_tar(dir, &files, io::BufWriter::with_capacity(1 << 20, tmp))?
        .into_inner()
        .map_err(|e| ReleaseError::io(scratch, e.into_error()))?;
    let archive_bytes = tmp
        .stream_position()
        .map_err(|e| ReleaseError::io(scratch, e))?;
    tmp.seek(SeekFrom::Start(0))
        .map_err(|e| ReleaseError::io(scratch, e))?;

    let mut chunks = Vec::new();
    let mut stats = ReleaseStats {
        archive_bytes,
        chunks: 0,
        new_chunks: 0,
        new_bytes: 0,
    };
    let cdc = fastcdc::v2020::StreamCDC::new(
        io::BufReader::with_capacity(1 << 20, tmp),
        sizes.min as usize,
        sizes.avg as usize,
        sizes.max as usize,
    );
    for c in cdc {
        let c = c.map_err(|e| ReleaseError::io(scratch, io::Error::other(e.to_string())))?;
        let hash = blake3::hash(&c.data).to_hex().to_string();
        if !store.has_chunk(&hash)? {
            store.put_chunk(&hash, &c.data)?;
            stats.new_chunks += 1;
            stats.new_bytes += c.data.len() as u64;
        }
        chunks.push(ChunkRef {
            hash,
            size: c.length as u32,
        });
    }
    stats.chunks = chunks.len();
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        archive_size: archive_bytes,
        files,
        chunks,
    };
    let id = manifest.id();
    store.put_manifest(&id, &manifest.encode())?;
    Ok((id, manifest, stats))
}

/// An anonymous temporary file in `dir` (unlinked at once, so nothing is left behind).
fn tempfile_in(dir: &Path) -> Result<fs::File, ReleaseError> {
    for attempt in 0..100u32 {
        let p = dir.join(format!(
            ".archive-{}-{}-{attempt}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ));
        match fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(f) => {
                let _ = fs::remove_file(&p);
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(ReleaseError::io(&p, e)),
        }
    }
    Err(ReleaseError::Unsafe(format!(
        "could not create a temporary file in {}",
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let (id_a, m, s1) = create_release(&a, t.path(), &store, sizes).unwrap();
        let (id_b, _, s2) = create_release(&b, t.path(), &store, sizes).unwrap();
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
            let err = create_release(&d, t.path(), &store, ChunkSizes::default()).unwrap_err();
            assert!(matches!(err, ReleaseError::Unsafe(_)), "{target}: {err}");
        }
    }
}
