//! The release format: a manifest that lists a release's files and the ordered,
//! content-defined chunks of its archive. The BLAKE3 hash of the manifest's canonical
//! encoding is the release id; each chunk is named by the BLAKE3 hash of its bytes.
//! See `SPEC.md` ("Release format").

use serde::{Deserialize, Serialize};

use crate::{ChunkHash, ReleaseId};

/// Version of the manifest layout written now. A reader takes this one and version 1
/// (the same layout without [`Manifest::run`]) and refuses any other.
pub const MANIFEST_VERSION: u32 = 2;

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
    /// How a node runs the release (`starling.toml`'s `[deploy]`), if it says. It is part
    /// of the manifest, so the release id vouches for the commands a node runs.
    pub run: Option<RunSpec>,
}

/// The commands a node runs for a release, each by `/bin/sh -c` in the release's
/// directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Started after the switch, after the previous release's process is stopped; it
    /// keeps running as the release's process.
    pub start: Option<String>,
    /// Run until it exits 0 (or the node gives up): the release is healthy.
    pub health: Option<String>,
}

/// Version 1: a manifest without `run`.
#[derive(Deserialize)]
struct ManifestV1 {
    version: u32,
    archive_size: u64,
    files: Vec<FileEntry>,
    chunks: Vec<ChunkRef>,
}

#[derive(Serialize)]
struct ManifestV1Ref<'a> {
    version: u32,
    archive_size: u64,
    files: &'a [FileEntry],
    chunks: &'a [ChunkRef],
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
    /// The canonical encoding (postcard: deterministic, positional), in the layout of its
    /// version, so that a version 1 manifest read back still hashes to its id.
    pub fn encode(&self) -> Result<Vec<u8>, ManifestError> {
        let encoded = match (self.version, &self.run) {
            (1, None) => postcard::to_allocvec(&ManifestV1Ref {
                version: 1,
                archive_size: self.archive_size,
                files: &self.files,
                chunks: &self.chunks,
            }),
            (1, Some(_)) => {
                return Err(ManifestError::Encode(
                    "a version 1 manifest has no run section".into(),
                ))
            }
            _ => postcard::to_allocvec(self),
        };
        encoded.map_err(|e| ManifestError::Encode(e.to_string()))
    }

    /// Decode and check the version; bad input is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let malformed = |e: postcard::Error| ManifestError::Malformed(e.to_string());
        // The version leads every layout.
        let (version, _) = postcard::take_from_bytes::<u32>(bytes).map_err(malformed)?;
        match version {
            1 => {
                let m: ManifestV1 = postcard::from_bytes(bytes).map_err(malformed)?;
                Ok(Manifest {
                    version: m.version,
                    archive_size: m.archive_size,
                    files: m.files,
                    chunks: m.chunks,
                    run: None,
                })
            }
            MANIFEST_VERSION => postcard::from_bytes(bytes).map_err(malformed),
            v => Err(ManifestError::Version(v)),
        }
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
            run: Some(RunSpec {
                start: Some("bin/server".into()),
                health: None,
            }),
        };
        assert_eq!(m.id(), m.clone().id());
        let mut no_start = m.clone();
        no_start.run = None;
        assert_ne!(m.id(), no_start.id(), "the id vouches for the commands");
        assert_eq!(Manifest::decode(&m.encode().unwrap()), Ok(m.clone()));
        let mut other = m.clone();
        other.files[0].mode = 0o755;
        assert_ne!(m.id(), other.id());
        let mut future = m;
        future.version = 3;
        assert_eq!(
            Manifest::decode(&future.encode().unwrap()),
            Err(ManifestError::Version(future.version))
        );
        assert!(Manifest::decode(b"\xff\xff").is_err());
    }

    #[test]
    fn version_1_manifests_still_read() {
        // Version 1's layout, written out independently of the reader's types.
        #[derive(Serialize)]
        struct V1 {
            version: u32,
            archive_size: u64,
            files: Vec<FileEntry>,
            chunks: Vec<ChunkRef>,
        }
        let chunks = vec![ChunkRef {
            hash: ChunkHash::of(b"abc"),
            size: 3,
        }];
        let old = postcard::to_allocvec(&V1 {
            version: 1,
            archive_size: 3,
            files: Vec::new(),
            chunks: chunks.clone(),
        })
        .unwrap();
        let m = Manifest::decode(&old).unwrap();
        assert_eq!(m.encode().unwrap(), old, "read back, it hashes to its id");
        assert_eq!((m.version, m.chunks, m.run), (1, chunks, None));
    }
}
