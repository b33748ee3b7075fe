//! The release format: a manifest that lists a release's files and the ordered,
//! content-defined chunks of its archive. The BLAKE3 hash of the manifest's canonical
//! encoding is the release id; each chunk is named by the BLAKE3 hash of its bytes.
//! See `SPEC.md` ("Release format").

use serde::{Deserialize, Serialize};

use crate::{ChunkHash, ReleaseId};

/// Version of the manifest layout; a reader refuses any other.
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
}

/// One entry of the release directory, in archive order (sorted by path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative, `/`-separated, never absolute, never containing `..`.
    pub path: String,
    pub kind: FileKind,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    /// Bytes, for files; 0 otherwise.
    pub size: u64,
    /// For symlinks: the target, relative, resolving inside the release.
    pub target: Option<String>,
}

/// A chunk of the archive: its BLAKE3 hash and length.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    pub hash: ChunkHash,
    pub size: u32,
}

/// Everything needed to fetch, verify and unpack a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// Length of the archive the chunks concatenate to.
    pub archive_size: u64,
    pub files: Vec<FileEntry>,
    pub chunks: Vec<ChunkRef>,
}

/// Why a manifest could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("malformed manifest: {0}")]
    Malformed(String),
    #[error("manifest version {0} (this build reads {MANIFEST_VERSION})")]
    Version(u32),
    #[error("encoding the manifest: {0}")]
    Encode(String),
}

impl Manifest {
    /// The canonical encoding (postcard: deterministic, positional).
    pub fn encode(&self) -> Result<Vec<u8>, ManifestError> {
        postcard::to_allocvec(self).map_err(|e| ManifestError::Encode(e.to_string()))
    }

    /// Decode and check the version; bad input is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let m: Manifest =
            postcard::from_bytes(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        if m.version != MANIFEST_VERSION {
            return Err(ManifestError::Version(m.version));
        }
        Ok(m)
    }

    /// The release id: BLAKE3 of the canonical encoding.
    pub fn id(&self) -> Result<ReleaseId, ManifestError> {
        self.encode_with_id().map(|(id, _)| id)
    }

    /// The release id and the canonical encoding it is the hash of, encoded once.
    pub fn encode_with_id(&self) -> Result<(ReleaseId, Vec<u8>), ManifestError> {
        let bytes = self.encode()?;
        Ok((ReleaseId::of(&bytes), bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_stable_and_content_bound() {
        let m = Manifest {
            version: MANIFEST_VERSION,
            archive_size: 3,
            files: vec![FileEntry {
                path: "a".into(),
                kind: FileKind::File,
                mode: 0o644,
                size: 3,
                target: None,
            }],
            chunks: vec![ChunkRef {
                hash: ChunkHash::of(b"abc"),
                size: 3,
            }],
        };
        assert_eq!(m.id(), m.clone().id());
        assert_eq!(Manifest::decode(&m.encode().unwrap()), Ok(m.clone()));
        let mut other = m.clone();
        other.files[0].mode = 0o755;
        assert_ne!(m.id(), other.id());
        let mut future = m;
        future.version = 2;
        assert_eq!(
            Manifest::decode(&future.encode().unwrap()),
            Err(ManifestError::Version(future.version))
        );
        assert!(Manifest::decode(b"\xff\xff").is_err());
    }
}
