//! Where chunks and manifests live: the origin store ("blob storage" in the problem
//! statement). [`FsChunkStore`] is the embedded default, a directory on a control member's
//! disk; other stores (S3-compatible) implement the same trait.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::ReleaseError;

pub trait ChunkStore: Send + Sync {
    fn has_chunk(&self, hash: &str) -> Result<bool, ReleaseError>;
    /// Store durably; the caller has checked that `hash` is the BLAKE3 of `bytes`.
    fn put_chunk(&self, hash: &str, bytes: &[u8]) -> Result<(), ReleaseError>;
    fn get_chunk(&self, hash: &str) -> Result<Vec<u8>, ReleaseError>;
    fn put_manifest(&self, id: &str, bytes: &[u8]) -> Result<(), ReleaseError>;
    fn get_manifest(&self, id: &str) -> Result<Vec<u8>, ReleaseError>;
}

/// Chunks at `chunks/<h[0..2]>/<h>`, manifests at `manifests/<id>`; each written to a
/// temporary name, fsynced (unless staging) and renamed, so a reader never sees half a chunk.
pub struct FsChunkStore {
    root: PathBuf,
    /// fsync every write: the origin store must; a worker's staging copy need not, since
    /// the release counts only once the origin store has it.
    durable: bool,
}

/// A name must be 64 lower-case hex digits: it becomes part of a path.
fn check_name(name: &str) -> Result<(), ReleaseError> {
    let ok = name.len() == 64 && name.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    if ok {
        Ok(())
    } else {
        Err(ReleaseError::Store(format!("bad content name {name:?}")))
    }
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
        Ok(FsChunkStore { root, durable })
    }

    fn chunk_path(&self, hash: &str) -> Result<PathBuf, ReleaseError> {
        check_name(hash)?;
        Ok(self.root.join("chunks").join(&hash[..2]).join(hash))
    }

    fn manifest_path(&self, id: &str) -> Result<PathBuf, ReleaseError> {
        check_name(id)?;
        Ok(self.root.join("manifests").join(id))
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), ReleaseError> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| ReleaseError::io(dir, e))?;
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("x");
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{name}.{}", std::process::id()));
        let mut f = fs::File::create(&tmp).map_err(|e| ReleaseError::io(&tmp, e))?;
        f.write_all(bytes)
            .and_then(|_| if self.durable { f.sync_data() } else { Ok(()) })
            .map_err(|e| ReleaseError::io(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| ReleaseError::io(path, e))
    }

    fn read(path: &Path) -> Result<Vec<u8>, ReleaseError> {
        fs::read(path).map_err(|e| ReleaseError::io(path, e))
    }

    /// Every chunk held, with when it was written.
    pub fn list_chunks(&self) -> Result<Vec<(String, std::time::SystemTime)>, ReleaseError> {
        let mut out = Vec::new();
        let root = self.root.join("chunks");
        for dir in fs::read_dir(&root).map_err(|e| ReleaseError::io(&root, e))? {
            let dir = dir.map_err(|e| ReleaseError::io(&root, e))?.path();
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if check_name(&name).is_err() {
                    continue;
                }
                if let Ok(modified) = e.metadata().and_then(|m| m.modified()) {
                    out.push((name, modified));
                }
            }
        }
        Ok(out)
    }

    pub fn delete_chunk(&self, hash: &str) -> Result<(), ReleaseError> {
        let p = self.chunk_path(hash)?;
        remove_if_present(&p)
    }

    pub fn delete_manifest(&self, id: &str) -> Result<(), ReleaseError> {
        let p = self.manifest_path(id)?;
        remove_if_present(&p)
    }
}

fn remove_if_present(p: &Path) -> Result<(), ReleaseError> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ReleaseError::io(p, e)),
    }
}

/// The chunks a collector may delete: held, referenced by no kept release, and older than
/// `grace` — a worker may be publishing chunks of a release not recorded yet.
pub fn garbage(
    held: &[(String, std::time::SystemTime)],
    referenced: &std::collections::HashSet<String>,
    now: std::time::SystemTime,
    grace: std::time::Duration,
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
    use std::time::{Duration, SystemTime};

    #[test]
    fn garbage_spares_referenced_and_young_chunks() {
        let now = SystemTime::now();
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

impl ChunkStore for FsChunkStore {
    fn has_chunk(&self, hash: &str) -> Result<bool, ReleaseError> {
        let p = self.chunk_path(hash)?;
        match fs::metadata(&p) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ReleaseError::io(&p, e)),
        }
    }

    fn put_chunk(&self, hash: &str, bytes: &[u8]) -> Result<(), ReleaseError> {
        let p = self.chunk_path(hash)?;
        self.write_atomic(&p, bytes)
    }

    fn get_chunk(&self, hash: &str) -> Result<Vec<u8>, ReleaseError> {
        Self::read(&self.chunk_path(hash)?)
    }

    fn put_manifest(&self, id: &str, bytes: &[u8]) -> Result<(), ReleaseError> {
        let p = self.manifest_path(id)?;
        self.write_atomic(&p, bytes)
    }

    fn get_manifest(&self, id: &str) -> Result<Vec<u8>, ReleaseError> {
        Self::read(&self.manifest_path(id)?)
    }
}
