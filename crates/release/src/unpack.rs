//! A release back into a directory, on a node, and switching to it.
//!
//! The archive is rebuilt from the node's chunks in manifest order, each chunk hashed
//! again as it is read (a disk can rot), and checked part by part against the archive
//! plan that the manifest implies: the tar headers must be exactly the planned bytes, so
//! the tree written is the one the release id names. Entries are made from the
//! manifest, not from tar headers, under a fresh directory: directories first, then
//! files (created new, never through an existing path), symbolic links last and only
//! if they resolve inside the release, so no write can pass through a link.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use starling_proto::release::{FileKind, Manifest};
use starling_proto::{ChunkHash, ReleaseId};

use crate::archive::{check_entry_path, check_link, ArchivePlan, Part};
use crate::{ChunkStore, ReleaseError};

/// The archive's bytes, chunk after chunk, each checked against its name.
struct ChunkStream<'a> {
    store: &'a dyn ChunkStore,
    chunks: std::slice::Iter<'a, starling_proto::release::ChunkRef>,
    current: Vec<u8>,
    at: usize,
}

impl ChunkStream<'_> {
    /// The next `len` bytes, handed to `take` piece by piece.
    fn read(
        &mut self,
        mut len: u64,
        mut take: impl FnMut(&[u8]) -> Result<(), ReleaseError>,
    ) -> Result<(), ReleaseError> {
        while len > 0 {
            if self.at == self.current.len() {
                let Some(c) = self.chunks.next() else {
                    return Err(ReleaseError::Unsafe(
                        "the chunks end before the archive does".into(),
                    ));
                };
                let bytes = self.store.get_chunk(&c.hash)?;
                let actual = ChunkHash::of(&bytes);
                if actual != c.hash || bytes.len() != c.size as usize {
                    return Err(ReleaseError::Store(format!(
                        "stored chunk {} is damaged (its bytes hash to {actual})",
                        c.hash
                    )));
                }
                self.current = bytes;
                self.at = 0;
            }
            let n = (self.current.len() - self.at).min(usize::try_from(len).unwrap_or(usize::MAX));
            take(&self.current[self.at..self.at + n])?;
            self.at += n;
            len -= n as u64;
        }
        Ok(())
    }
}

/// What an unpack wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    pub files: usize,
    pub bytes: u64,
}

/// Write release `manifest` (its chunks in `store`) into `dest`, which must not exist
/// yet. The release is written beside it (`.<name>.partial`) and renamed into place
/// whole, so a `dest` that exists is complete even after a crash mid-unpack; on any
/// error nothing is left.
pub fn unpack(
    manifest: &Manifest,
    store: &dyn ChunkStore,
    dest: &Path,
) -> Result<UnpackStats, ReleaseError> {
    let plan = ArchivePlan::new(&manifest.files)?;
    if dest.exists() {
        return Err(ReleaseError::io(
            dest,
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        ));
    }
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dest.with_file_name(format!(".{}.partial", name.unwrap_or_default()));
    // A partial one was left by a crash: it is ours to replace.
    match fs::remove_dir_all(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ReleaseError::io(&tmp, e)),
    }
    fs::create_dir(&tmp).map_err(|e| ReleaseError::io(&tmp, e))?;
    let r = unpack_into(manifest, &plan, store, &tmp).and_then(|stats| {
        fs::rename(&tmp, dest)
            .map(|()| stats)
            .map_err(|e| ReleaseError::io(dest, e))
    });
    if r.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    r
}

fn unpack_into(
    manifest: &Manifest,
    plan: &ArchivePlan,
    store: &dyn ChunkStore,
    dest: &Path,
) -> Result<UnpackStats, ReleaseError> {
    let listed: u64 = manifest.chunks.iter().map(|c| u64::from(c.size)).sum();
    if plan.len() != manifest.archive_size || listed != manifest.archive_size {
        return Err(ReleaseError::Unsafe(format!(
            "the manifest's archive is {} bytes, its chunks {listed}, its entries plan {}",
            manifest.archive_size,
            plan.len()
        )));
    }
    let paths: Vec<PathBuf> = manifest
        .files
        .iter()
        .map(|f| check_entry_path(&f.path).map(|p| dest.join(p)))
        .collect::<Result<_, _>>()?;
    for (f, p) in manifest.files.iter().zip(&paths) {
        if f.kind == FileKind::Dir {
            fs::create_dir_all(p).map_err(|e| ReleaseError::io(p, e))?;
        }
    }
    let mut stream = ChunkStream {
        store,
        chunks: manifest.chunks.iter(),
        current: Vec::new(),
        at: 0,
    };
    let mut stats = UnpackStats::default();
    let mut written = vec![false; manifest.files.len()];
    for part in plan.parts() {
        match part {
            Part::Header(expected) => {
                let mut at = 0;
                stream.read(expected.len() as u64, |got| {
                    if got != &expected[at..at + got.len()] {
                        return Err(ReleaseError::Unsafe(
                            "the archive's headers differ from its manifest".into(),
                        ));
                    }
                    at += got.len();
                    Ok(())
                })?;
            }
            Part::Contents { entry, len } => {
                let p = &paths[entry];
                let mut file = new_file(p)?;
                stream.read(len, |bytes| {
                    file.write_all(bytes).map_err(|e| ReleaseError::io(p, e))
                })?;
                file.sync_all().map_err(|e| ReleaseError::io(p, e))?;
                written[entry] = true;
                stats.bytes += len;
            }
        }
    }
    for (i, (f, p)) in manifest.files.iter().zip(&paths).enumerate() {
        match f.kind {
            FileKind::File => {
                if !written[i] {
                    new_file(p)?; // empty
                }
                fs::set_permissions(p, fs::Permissions::from_mode(f.mode & 0o7777))
                    .map_err(|e| ReleaseError::io(p, e))?;
                stats.files += 1;
            }
            FileKind::Dir | FileKind::Symlink => {}
        }
    }
    // Links last: nothing is written through one.
    for (f, p) in manifest.files.iter().zip(&paths) {
        if f.kind == FileKind::Symlink {
            let target = Path::new(f.target.as_deref().unwrap_or_default());
            let rel = Path::new(&f.path);
            check_link(rel.parent().unwrap_or(Path::new("")), rel, target)?;
            std::os::unix::fs::symlink(target, p).map_err(|e| ReleaseError::io(p, e))?;
        }
    }
    // Directory modes last, so that a read-only directory did not stop its files.
    for (f, p) in manifest.files.iter().zip(&paths).rev() {
        if f.kind == FileKind::Dir {
            fs::set_permissions(p, fs::Permissions::from_mode(f.mode & 0o7777))
                .map_err(|e| ReleaseError::io(p, e))?;
        }
    }
    Ok(stats)
}

fn new_file(p: &Path) -> Result<fs::File, ReleaseError> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        // A final component that is a link fails rather than being followed.
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(p)
        .map_err(|e| ReleaseError::io(p, e))
}

/// Make `<root>/releases/<id>` the release `<root>/current` points to, atomically: a new
/// link is made beside it and renamed over it, so a reader sees the old or the new one.
pub fn activate(root: &Path, id: &ReleaseId) -> Result<(), ReleaseError> {
    let target = Path::new("releases").join(id.to_hex());
    if !root.join(&target).is_dir() {
        return Err(ReleaseError::NotFound(format!(
            "release {id} is not unpacked"
        )));
    }
    let tmp = root.join(format!(".current.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp).map_err(|e| ReleaseError::io(&tmp, e))?;
    let current = root.join("current");
    fs::rename(&tmp, &current).map_err(|e| ReleaseError::io(&current, e))?;
    fs::File::open(root)
        .and_then(|d| d.sync_all())
        .map_err(|e| ReleaseError::io(root, e))
}

/// Remove unpacked releases under `<root>/releases` beyond the `keep` newest (by when they
/// were unpacked), never the one `current` points to. The ids removed.
pub fn prune(root: &Path, keep: usize) -> Result<Vec<ReleaseId>, ReleaseError> {
    let dir = root.join("releases");
    let active = current(root);
    let mut all = unpacked(root)?;
    all.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut removed = Vec::new();
    for (_, id) in all.into_iter().skip(keep) {
        if Some(id) == active {
            continue;
        }
        let path = dir.join(id.to_hex());
        fs::remove_dir_all(&path).map_err(|e| ReleaseError::io(&path, e))?;
        removed.push(id);
    }
    Ok(removed)
}

/// The releases unpacked under `root` (`releases/<id>`), with when each was unpacked;
/// none if nothing ever was.
pub fn unpacked(root: &Path) -> Result<Vec<(std::time::SystemTime, ReleaseId)>, ReleaseError> {
    let dir = root.join("releases");
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ReleaseError::io(&dir, e)),
    };
    let mut all = Vec::new();
    for e in entries {
        let e = e.map_err(|e| ReleaseError::io(&dir, e))?;
        let Some(id) = e
            .file_name()
            .to_str()
            .and_then(|n| ReleaseId::parse(n).ok())
        else {
            continue;
        };
        let at = e
            .metadata()
            .and_then(|m| m.modified())
            .map_err(|err| ReleaseError::io(&e.path(), err))?;
        all.push((at, id));
    }
    Ok(all)
}

/// The release `<root>/current` points to, if any.
pub fn current(root: &Path) -> Option<ReleaseId> {
    let link = fs::read_link(root.join("current")).ok()?;
    ReleaseId::parse(link.file_name()?.to_str()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{create_release, ChunkSizes, FsChunkStore};
    use starling_proto::release::FileEntry;

    fn sample(dir: &Path) {
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::create_dir_all(dir.join("empty")).unwrap();
        fs::write(dir.join("index.html"), b"<h1>hi</h1>\n").unwrap();
        fs::write(dir.join("zero"), b"").unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        fs::write(dir.join("bin/app"), &big).unwrap();
        fs::set_permissions(dir.join("bin/app"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("app", dir.join("bin/current")).unwrap();
        std::os::unix::fs::symlink("../index.html", dir.join("bin/index")).unwrap();
    }

    fn small() -> ChunkSizes {
        ChunkSizes {
            min: 4096,
            avg: 16384,
            max: 65536,
        }
    }

    #[test]
    fn a_release_unpacks_to_the_tree_it_was_made_from_and_switches_atomically() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        sample(&src);
        let store = FsChunkStore::new(t.path().join("store")).unwrap();
        let (id, manifest, _) = create_release(&src, &store, small()).unwrap();
        let root = t.path().join("node");
        let dest = root.join("releases").join(id.to_hex());
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let stats = unpack(&manifest, &store, &dest).unwrap();
        assert_eq!(stats.files, 3);
        // The oracle: listing the unpacked tree gives the manifest's entries, and every
        // file holds the same bytes.
        assert_eq!(crate::archive::list(&dest).unwrap(), manifest.files);
        for f in &manifest.files {
            if f.kind == FileKind::File {
                assert_eq!(
                    fs::read(dest.join(&f.path)).unwrap(),
                    fs::read(src.join(&f.path)).unwrap()
                );
            }
        }
        assert_eq!(current(&root), None);
        activate(&root, &id).unwrap();
        assert_eq!(current(&root), Some(id));
        assert_eq!(
            fs::read(root.join("current/index.html")).unwrap(),
            b"<h1>hi</h1>\n"
        );
        // Unpacking into an existing directory is refused, and leaves it alone.
        assert!(unpack(&manifest, &store, &dest).is_err());
        assert!(dest.join("index.html").exists());

        // Pruning keeps the newest and the active one.
        let others: Vec<ReleaseId> = (0..4u8).map(|i| ReleaseId::of(&[i])).collect();
        for (n, id) in others.iter().enumerate() {
            let d = root.join("releases").join(id.to_hex());
            fs::create_dir_all(&d).unwrap();
            let at =
                std::time::SystemTime::now() + std::time::Duration::from_secs(10 * (n as u64 + 1));
            fs::File::open(&d).unwrap().set_modified(at).unwrap();
        }
        let removed = prune(&root, 2).unwrap();
        // Newest first: others[3], others[2] kept; the active release stays too.
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(removed.contains(&others[0]) && removed.contains(&others[1]));
        assert!(dest.exists(), "the active release was pruned");
    }

    #[test]
    fn escaping_entries_and_damaged_chunks_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        sample(&src);
        let store = FsChunkStore::new(t.path().join("store")).unwrap();
        let (_, manifest, _) = create_release(&src, &store, small()).unwrap();
        let dest = |n: &str| t.path().join(n);

        let mut evil = manifest.clone();
        evil.files.push(FileEntry {
            path: "../escaped".into(),
            kind: FileKind::File,
            mode: 0o644,
            size: 0,
            target: None,
        });
        assert!(unpack(&evil, &store, &dest("a")).is_err());
        assert!(!dest("a").exists() && !t.path().join("escaped").exists());

        let mut link = manifest.clone();
        let i = link
            .files
            .iter()
            .position(|f| f.kind == FileKind::Symlink)
            .unwrap();
        link.files[i].target = Some("../../../etc".into());
        assert!(unpack(&link, &store, &dest("b")).is_err());
        assert!(!dest("b").exists());

        // A chunk whose bytes rotted on disk.
        let victim = manifest.chunks[0].hash;
        let hex = victim.to_hex();
        let path = t.path().join("store/chunks").join(&hex[..2]).join(&hex);
        let mut bytes = fs::read(&path).unwrap();
        bytes[0] ^= 1;
        fs::write(&path, bytes).unwrap();
        let e = unpack(&manifest, &store, &dest("c")).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        assert!(!dest("c").exists());
    }
}
