//! Where chunks and manifests live: the origin store ("blob storage" in the problem
//! statement). [`FsChunkStore`] is the embedded default, a directory on a control member's
//! disk; other stores (S3-compatible) implement the same trait. [`PackStore`] holds a
//! build's chunks in one file.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use starling_proto::{ChunkHash, ReleaseId};

use crate::ReleaseError;

pub trait ChunkStore: Send + Sync {
    fn has_chunk(&self, hash: &ChunkHash) -> Result<bool, ReleaseError>;
    /// Store durably; the caller has checked that `hash` is the BLAKE3 of `bytes`.
    fn put_chunk(&self, hash: &ChunkHash, bytes: &[u8]) -> Result<(), ReleaseError>;
    fn get_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, ReleaseError>;
    fn put_manifest(&self, id: &ReleaseId, bytes: &[u8]) -> Result<(), ReleaseError>;
    fn get_manifest(&self, id: &ReleaseId) -> Result<Vec<u8>, ReleaseError>;
}

/// What a control member needs beyond [`ChunkStore`]: the collector lists and deletes.
pub trait OriginStore: ChunkStore {
    /// Every chunk held, with when it was written.
    fn list_chunks(&self) -> Result<Vec<(ChunkHash, std::time::SystemTime)>, ReleaseError>;
    /// Deleting what is not there succeeds: members sharing one store collect at once.
    fn delete_chunk(&self, hash: &ChunkHash) -> Result<(), ReleaseError>;
    fn delete_manifest(&self, id: &ReleaseId) -> Result<(), ReleaseError>;
    /// Bytes of chunks held, where the store can tell cheaply (a shared bucket cannot).
    fn used_bytes(&self) -> Option<u64> {
        None
    }
}

/// Chunks at `chunks/<h[0..2]>/<h>`, manifests at `manifests/<id>`; each written to a
/// temporary name, fsynced (unless staging) and renamed, so a reader never sees half a chunk.
pub struct FsChunkStore {
    root: PathBuf,
    /// fsync every write: the origin store must; a worker's staging copy need not, since
    /// the release counts only once the origin store has it.
    durable: bool,
    /// Bytes of chunks held: counted when the store opens, then kept up to date.
    used: AtomicU64,
}

impl FsChunkStore {
    /// A durable store: every write is fsynced before it is acknowledged.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, ReleaseError> {
        Self::open(root.into(), true)
    }

    /// A staging store (a worker's copy before publishing): no fsync.
    pub fn staging(root: impl Into<PathBuf>) -> Result<Self, ReleaseError> {
        Self::open(root.into(), false)
    }

    fn open(root: PathBuf, durable: bool) -> Result<Self, ReleaseError> {
        for sub in ["chunks", "manifests", "tmp"] {
            let d = root.join(sub);
            fs::create_dir_all(&d).map_err(|e| ReleaseError::io(&d, e))?;
        }
        // Temp files left by a process that died mid-write; a store has one owner.
        if let Ok(stale) = fs::read_dir(root.join("tmp")) {
            for e in stale.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let store = FsChunkStore {
            root,
            durable,
            used: AtomicU64::new(0),
        };
        let mut used = 0;
        for (hash, _) in store.list_chunks()? {
            used += fs::metadata(store.chunk_path(&hash)).map_or(0, |m| m.len());
        }
        store.used.store(used, Ordering::Relaxed);
        Ok(store)
    }

    // Digests are hex by construction: a name can never leave its directory.
    fn chunk_path(&self, hash: &ChunkHash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    fn manifest_path(&self, id: &ReleaseId) -> PathBuf {
        self.root.join("manifests").join(id.to_hex())
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), ReleaseError> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| ReleaseError::io(dir, e))?;
        }
        // Unique per write, not just per process: two threads may store the same chunk
        // at once (a release with two identical files), and must not share a temp file.
        static WRITES: AtomicU64 = AtomicU64::new(0);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("x");
        let tmp = self.root.join("tmp").join(format!(
            "{name}.{}.{}",
            std::process::id(),
            WRITES.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = fs::File::create(&tmp).map_err(|e| ReleaseError::io(&tmp, e))?;
        f.write_all(bytes)
            .and_then(|_| if self.durable { f.sync_data() } else { Ok(()) })
            .map_err(|e| ReleaseError::io(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| ReleaseError::io(path, e))?;
        if self.durable {
            // The rename is durable only once the directory holding the new name is.
            if let Some(dir) = path.parent() {
                fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| ReleaseError::io(dir, e))?;
            }
        }
        Ok(())
    }

    /// A chunk of `old` bytes became one of `new` bytes (0 for none).
    fn adjust_used(&self, old: u64, new: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(old) + new)
            });
    }

    fn read(path: &Path) -> Result<Vec<u8>, ReleaseError> {
        fs::read(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ReleaseError::NotFound(path.display().to_string()),
            _ => ReleaseError::io(path, e),
        })
    }
}

fn remove_if_present(p: &Path) -> Result<(), ReleaseError> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ReleaseError::io(p, e)),
    }
}

/// A build's chunks in one file, with the index in memory.
///
/// Workers staged builds here before they learnt to publish from the output directory
/// (`crate::in_place`); the creation benchmark keeps it as the baseline that change is
/// measured against. One pre-opened file written at reserved offsets costs a copy into
/// the page cache, where a file per chunk costs more than chunking and hashing. Dropping
/// the value removes the file.
pub struct PackStore {
    path: PathBuf,
    file: fs::File,
    index: std::sync::Mutex<PackIndex>,
}

#[derive(Default)]
struct PackIndex {
    end: u64,
    chunks: std::collections::HashMap<ChunkHash, (u64, u32)>,
    manifests: std::collections::HashMap<ReleaseId, Vec<u8>>,
}

impl PackStore {
    /// A new, empty pack at `path` (replacing a stale one left by a crash).
    pub fn create(path: impl Into<PathBuf>) -> Result<Self, ReleaseError> {
        let path = path.into();
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| ReleaseError::io(dir, e))?;
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| ReleaseError::io(&path, e))?;
        Ok(PackStore {
            path,
            file,
            index: Default::default(),
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, PackIndex> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for PackStore {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl ChunkStore for PackStore {
    fn has_chunk(&self, hash: &ChunkHash) -> Result<bool, ReleaseError> {
        Ok(self.index().chunks.contains_key(hash))
    }

    fn put_chunk(&self, hash: &ChunkHash, bytes: &[u8]) -> Result<(), ReleaseError> {
        use std::os::unix::fs::FileExt;
        let len = u32::try_from(bytes.len())
            .map_err(|_| ReleaseError::Store(format!("chunk {hash} is over 4 GiB")))?;
        let at = {
            let mut ix = self.index();
            let at = ix.end;
            ix.end += u64::from(len);
            at
        };
        self.file
            .write_all_at(bytes, at)
            .map_err(|e| ReleaseError::io(&self.path, e))?;
        // Listed only once written, so a reader never sees the bytes before they are there.
        self.index().chunks.insert(*hash, (at, len));
        Ok(())
    }

    fn get_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, ReleaseError> {
        use std::os::unix::fs::FileExt;
        let Some(&(at, len)) = self.index().chunks.get(hash) else {
            return Err(ReleaseError::NotFound(format!("chunk {hash}")));
        };
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, at)
            .map_err(|e| ReleaseError::io(&self.path, e))?;
        Ok(buf)
    }

    fn put_manifest(&self, id: &ReleaseId, bytes: &[u8]) -> Result<(), ReleaseError> {
        self.index().manifests.insert(*id, bytes.to_vec());
        Ok(())
    }

    fn get_manifest(&self, id: &ReleaseId) -> Result<Vec<u8>, ReleaseError> {
        let manifest = self.index().manifests.get(id).cloned();
        manifest.ok_or_else(|| ReleaseError::NotFound(format!("manifest {id}")))
    }
}

impl ChunkStore for FsChunkStore {
    fn has_chunk(&self, hash: &ChunkHash) -> Result<bool, ReleaseError> {
        let p = self.chunk_path(hash);
        match fs::metadata(&p) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ReleaseError::io(&p, e)),
        }
    }

    fn put_chunk(&self, hash: &ChunkHash, bytes: &[u8]) -> Result<(), ReleaseError> {
        let p = self.chunk_path(hash);
        let before = fs::metadata(&p).map_or(0, |m| m.len());
        self.write_atomic(&p, bytes)?;
        self.adjust_used(before, bytes.len() as u64);
        Ok(())
    }

    fn get_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, ReleaseError> {
        Self::read(&self.chunk_path(hash))
    }

    fn put_manifest(&self, id: &ReleaseId, bytes: &[u8]) -> Result<(), ReleaseError> {
        let p = self.manifest_path(id);
        self.write_atomic(&p, bytes)
    }

    fn get_manifest(&self, id: &ReleaseId) -> Result<Vec<u8>, ReleaseError> {
        Self::read(&self.manifest_path(id))
    }
}

impl OriginStore for FsChunkStore {
    fn list_chunks(&self) -> Result<Vec<(ChunkHash, std::time::SystemTime)>, ReleaseError> {
        let mut out = Vec::new();
        let root = self.root.join("chunks");
        for dir in fs::read_dir(&root).map_err(|e| ReleaseError::io(&root, e))? {
            let dir = dir.map_err(|e| ReleaseError::io(&root, e))?.path();
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                // Temp files and strays are not chunks.
                let Ok(hash) = ChunkHash::parse(&e.file_name().to_string_lossy()) else {
                    continue;
                };
                if let Ok(modified) = e.metadata().and_then(|m| m.modified()) {
                    out.push((hash, modified));
                }
            }
        }
        Ok(out)
    }

    fn delete_chunk(&self, hash: &ChunkHash) -> Result<(), ReleaseError> {
        let p = self.chunk_path(hash);
        let size = fs::metadata(&p).map_or(0, |m| m.len());
        remove_if_present(&p)?;
        self.adjust_used(size, 0);
        Ok(())
    }

    fn delete_manifest(&self, id: &ReleaseId) -> Result<(), ReleaseError> {
        let p = self.manifest_path(id);
        remove_if_present(&p)
    }

    fn used_bytes(&self) -> Option<u64> {
        Some(self.used.load(Ordering::Relaxed))
    }
}

/// A store that hands out every chunk with its first byte flipped: the peer that serves
/// corrupt data in the swarm's tests. Only in test builds (feature `fault-injection`).
#[cfg(feature = "fault-injection")]
pub struct Corrupting<S>(pub S);

#[cfg(feature = "fault-injection")]
impl<S: ChunkStore> ChunkStore for Corrupting<S> {
    fn has_chunk(&self, h: &ChunkHash) -> Result<bool, ReleaseError> {
        self.0.has_chunk(h)
    }
    fn put_chunk(&self, h: &ChunkHash, b: &[u8]) -> Result<(), ReleaseError> {
        self.0.put_chunk(h, b)
    }
    fn get_chunk(&self, h: &ChunkHash) -> Result<Vec<u8>, ReleaseError> {
        let mut b = self.0.get_chunk(h)?;
        if let Some(first) = b.first_mut() {
            *first ^= 0xff;
        }
        Ok(b)
    }
    fn put_manifest(&self, id: &ReleaseId, b: &[u8]) -> Result<(), ReleaseError> {
        self.0.put_manifest(id, b)
    }
    fn get_manifest(&self, id: &ReleaseId) -> Result<Vec<u8>, ReleaseError> {
        self.0.get_manifest(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips_and_removes_its_file() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("staging/b1.pack");
        let pack = PackStore::create(&path).unwrap();
        let (a, b) = (ChunkHash::of(b"first"), ChunkHash::of(b"second chunk"));
        assert!(!pack.has_chunk(&a).unwrap());
        pack.put_chunk(&a, b"first").unwrap();
        pack.put_chunk(&b, b"second chunk").unwrap();
        assert!(pack.has_chunk(&a).unwrap());
        assert_eq!(pack.get_chunk(&b).unwrap(), b"second chunk");
        assert_eq!(pack.get_chunk(&a).unwrap(), b"first");
        assert!(pack.get_chunk(&ChunkHash::of(b"absent")).is_err());
        let m = ReleaseId::of(b"m");
        pack.put_manifest(&m, b"m").unwrap();
        assert_eq!(pack.get_manifest(&m).unwrap(), b"m");
        assert!(path.exists());
        drop(pack);
        assert!(!path.exists(), "a dropped pack leaves its file behind");
    }
}
