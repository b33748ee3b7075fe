//! A release whose chunks stay in the directory it was made from: what a worker makes and
//! publishes, so that no chunk is copied to its disk in between.
//!
//! [`ManifestsOnly`] is the store [`crate::create_release_with`] writes into: it keeps the
//! manifest and lets the chunks go. [`DirectoryChunks`] reads a chunk back from the
//! directory through the archive plan, from the chunk's offset in the archive, and checks
//! it against its name: a file changed since the release was made is an error, never a
//! wrong chunk sent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use starling_proto::release::{FileEntry, Manifest};
use starling_proto::{ChunkHash, ReleaseId};

use crate::archive::ArchivePlan;
use crate::{ChunkStore, ReleaseError};

/// A [`ChunkStore`] that keeps manifests in memory and no chunk.
#[derive(Default)]
pub struct ManifestsOnly {
    manifests: Mutex<HashMap<ReleaseId, Vec<u8>>>,
}

impl ChunkStore for ManifestsOnly {
    fn has_chunk(&self, _: &ChunkHash) -> Result<bool, ReleaseError> {
        Ok(false)
    }

    fn put_chunk(&self, _: &ChunkHash, _: &[u8]) -> Result<(), ReleaseError> {
        Ok(())
    }

    fn get_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, ReleaseError> {
        Err(ReleaseError::NotFound(format!("chunk {hash}")))
    }

    fn put_manifest(&self, id: &ReleaseId, bytes: &[u8]) -> Result<(), ReleaseError> {
        let mut m = self.manifests.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(*id, bytes.to_vec());
        Ok(())
    }

    fn get_manifest(&self, id: &ReleaseId) -> Result<Vec<u8>, ReleaseError> {
        let m = self.manifests.lock().unwrap_or_else(|p| p.into_inner());
        m.get(id)
            .cloned()
            .ok_or_else(|| ReleaseError::NotFound(format!("manifest {id}")))
    }
}

/// The chunks of a release, read from the directory it was made from.
pub struct DirectoryChunks {
    root: PathBuf,
    files: Vec<FileEntry>,
    plan: ArchivePlan,
    /// Where each chunk starts in the archive, and its length.
    at: HashMap<ChunkHash, (u64, u32)>,
}

impl DirectoryChunks {
    /// `manifest`'s chunks under `root`, the directory it was made from.
    pub fn new(root: &Path, manifest: &Manifest) -> Result<DirectoryChunks, ReleaseError> {
        let plan = ArchivePlan::new(&manifest.files)?;
        let mut at = HashMap::with_capacity(manifest.chunks.len());
        let mut offset = 0u64;
        for c in &manifest.chunks {
            at.entry(c.hash).or_insert((offset, c.size));
            offset += u64::from(c.size);
        }
        if offset != plan.len() {
            return Err(ReleaseError::Store(format!(
                "the chunks cover {offset} bytes, the archive {}",
                plan.len()
            )));
        }
        Ok(DirectoryChunks {
            root: root.to_path_buf(),
            files: manifest.files.clone(),
            plan,
            at,
        })
    }

    /// The bytes of chunk `hash`, checked against it.
    pub fn get_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, ReleaseError> {
        let &(offset, size) = self
            .at
            .get(hash)
            .ok_or_else(|| ReleaseError::NotFound(format!("chunk {hash} in this release")))?;
        let mut bytes = vec![0u8; size as usize];
        self.plan
            .read_at(&self.root, &self.files, offset, &mut bytes)?;
        if ChunkHash::of(&bytes) != *hash {
            return Err(ReleaseError::Store(format!(
                "chunk {hash} no longer matches {}: a file changed after the release was made",
                self.root.display()
            )));
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{create_release, create_release_with, ChunkSizes, FsChunkStore, ReleaseOptions};

    #[test]
    fn chunks_read_back_in_place_equal_the_stored_ones() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("out");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        let mut x = 7u64;
        let noise: Vec<u8> = (0..3_000_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(src.join("big"), &noise).unwrap();
        std::fs::write(src.join("sub/small"), b"hello").unwrap();
        let sizes = ChunkSizes {
            min: 64 * 1024,
            avg: 256 * 1024,
            max: 1024 * 1024,
        };
        let stored = FsChunkStore::new(dir.path().join("store")).unwrap();
        let (id, manifest, _) = create_release(&src, &stored, sizes).unwrap();
        let none = ManifestsOnly::default();
        let opts = ReleaseOptions {
            sizes,
            ..ReleaseOptions::default()
        };
        let (same, _, _) = create_release_with(&src, &none, opts).unwrap();
        assert_eq!(same, id);
        assert!(none.get_manifest(&id).is_ok());
        assert!(manifest.chunks.len() > 4);
        let chunks = DirectoryChunks::new(&src, &manifest).unwrap();
        for c in &manifest.chunks {
            assert_eq!(
                chunks.get_chunk(&c.hash).unwrap(),
                stored.get_chunk(&c.hash).unwrap()
            );
        }
        // A file changed afterwards: the chunks over it are refused, not sent.
        let mut changed = noise.clone();
        changed[10] ^= 1;
        std::fs::write(src.join("big"), &changed).unwrap();
        assert!(chunks.get_chunk(&manifest.chunks[0].hash).is_err());
        assert!(chunks.get_chunk(&ChunkHash::of(b"other")).is_err());
    }
}
