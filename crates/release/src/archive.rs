//! Listing a release directory safely and writing it as a deterministic tar archive.
//!
//! Deterministic: entries sorted by path, mtime 0, uid/gid 0, no user or group names, only
//! permission bits kept. The same directory content always gives the same bytes.
//! Safe: a symlink must be relative and resolve inside the directory; anything else (an
//! absolute target, one that climbs out with `..`, a device or socket) fails the release.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use starling_proto::release::{FileEntry, FileKind};

use crate::ReleaseError;

/// Every entry under `root`, sorted by path, checked.
pub fn list(root: &Path) -> Result<Vec<FileEntry>, ReleaseError> {
    let meta = fs::symlink_metadata(root).map_err(|e| ReleaseError::io(root, e))?;
    if !meta.is_dir() {
        return Err(ReleaseError::Unsafe(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<FileEntry>) -> Result<(), ReleaseError> {
    let dir = root.join(rel);
    let rd = fs::read_dir(&dir).map_err(|e| ReleaseError::io(&dir, e))?;
    for item in rd {
        let item = item.map_err(|e| ReleaseError::io(&dir, e))?;
        let name = item.file_name();
        let name = name.to_str().ok_or_else(|| {
            ReleaseError::Unsafe(format!("non-UTF-8 file name in {}", dir.display()))
        })?;
        let rel_path = rel.join(name);
        let path_str = rel_path
            .to_str()
            .ok_or_else(|| ReleaseError::Unsafe("non-UTF-8 path".into()))?
            .to_string();
        let full = root.join(&rel_path);
        let meta = fs::symlink_metadata(&full).map_err(|e| ReleaseError::io(&full, e))?;
        let mode = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&full).map_err(|e| ReleaseError::io(&full, e))?;
            check_link(rel, &rel_path, &target)?;
            let target = target
                .to_str()
                .ok_or_else(|| ReleaseError::Unsafe("non-UTF-8 link target".into()))?
                .to_string();
            out.push(FileEntry {
                path: path_str,
                kind: FileKind::Symlink,
                mode: 0o777,
                size: 0,
                target: Some(target),
            });
        } else if ft.is_dir() {
            out.push(FileEntry {
                path: path_str,
                kind: FileKind::Dir,
                mode,
                size: 0,
                target: None,
            });
            walk(root, &rel_path, out)?;
        } else if ft.is_file() {
            out.push(FileEntry {
                path: path_str,
                kind: FileKind::File,
                mode,
                size: meta.len(),
                target: None,
            });
        } else {
            return Err(ReleaseError::Unsafe(format!(
                "{path_str} is neither a file, a directory nor a symlink"
            )));
        }
    }
    Ok(())
}

/// A link at `link` (inside directory `parent`) pointing to `target` must be relative and
/// stay inside the release.
pub fn check_link(parent: &Path, link: &Path, target: &Path) -> Result<(), ReleaseError> {
    if target.is_absolute() {
        return Err(ReleaseError::Unsafe(format!(
            "symlink {} points to the absolute path {}",
            link.display(),
            target.display()
        )));
    }
    let mut depth: i64 = parent.components().count() as i64;
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => depth = -1,
        }
        if depth < 0 {
            return Err(ReleaseError::Unsafe(format!(
                "symlink {} points outside the release ({})",
                link.display(),
                target.display()
            )));
        }
    }
    Ok(())
}

/// A path from a manifest or archive must be relative and free of `..`.
pub fn check_entry_path(path: &str) -> Result<PathBuf, ReleaseError> {
    let p = PathBuf::from(path);
    let ok = !path.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !ok {
        return Err(ReleaseError::Unsafe(format!(
            "entry {path:?} would land outside the release"
        )));
    }
    Ok(p)
}

/// The archive as a plan rather than bytes: the tar headers (and padding) held in memory,
/// file contents referenced by entry. Since every size is known from the listing, the
/// byte at any archive offset can be produced without producing what comes before it —
/// which is what lets [`crate::create_release`] cut the archive into segments and work
/// on several at once.
pub struct ArchivePlan {
    /// Headers, GNU long-name records, padding and the closing zero blocks, in order.
    meta: Vec<u8>,
    pieces: Vec<Piece>,
    len: u64,
}

/// One part of a planned archive, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part<'a> {
    /// Tar headers, long-name records and padding: exactly these bytes.
    Header(&'a [u8]),
    /// The `len` bytes of `entries[entry]`'s contents.
    Contents { entry: usize, len: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Piece {
    /// Where the piece starts in the archive.
    offset: u64,
    len: u64,
    source: Source,
}

#[derive(Debug, Clone, Copy)]
enum Source {
    /// `meta[at..at + len]`.
    Meta { at: usize },
    /// The contents of `entries[entry]`.
    File { entry: usize },
}

impl ArchivePlan {
    /// Plan the deterministic tar archive of `entries` (as [`list`] returned them): entries
    /// in order, mtime 0, uid/gid 0, no owner names, permission bits only.
    pub fn new(entries: &[FileEntry]) -> Result<Self, ReleaseError> {
        // The tar crate writes the headers (including long-name records); contents are
        // left out and recorded as pieces instead.
        let mut b = tar::Builder::new(Vec::new());
        let mut pieces = Vec::new();
        let mut offset = 0u64;
        let mut mark = 0usize;
        for (i, e) in entries.iter().enumerate() {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mode(e.mode);
            let path = check_entry_path(&e.path)?;
            let written = match e.kind {
                FileKind::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, &path, io::empty())
                }
                FileKind::Symlink => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    let target = e.target.as_deref().unwrap_or_default();
                    b.append_link(&mut h, &path, target)
                }
                FileKind::File => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(e.size);
                    b.append_data(&mut h, &path, io::empty())
                }
            };
            written.map_err(|err| ReleaseError::io(&path, err))?;
            if e.kind == FileKind::File && e.size > 0 {
                let meta = b.get_ref().len();
                let len = (meta - mark) as u64;
                pieces.push(Piece {
                    offset,
                    len,
                    source: Source::Meta { at: mark },
                });
                offset += len;
                pieces.push(Piece {
                    offset,
                    len: e.size,
                    source: Source::File { entry: i },
                });
                offset += e.size;
                mark = meta;
                // Contents are padded to a whole 512-byte block.
                let pad = (512 - e.size % 512) % 512;
                b.get_mut().resize(meta + pad as usize, 0);
            }
        }
        let meta = b
            .into_inner()
            .map_err(|e| ReleaseError::io(Path::new(""), e))?;
        let len = (meta.len() - mark) as u64;
        pieces.push(Piece {
            offset,
            len,
            source: Source::Meta { at: mark },
        });
        Ok(ArchivePlan {
            meta,
            pieces,
            len: offset + len,
        })
    }

    /// The archive's parts in order: header bytes as they must appear, and the places
    /// where each file's contents go. What an unpacker checks a rebuilt archive against.
    pub fn parts(&self) -> impl Iterator<Item = Part<'_>> + '_ {
        self.pieces.iter().map(|p| match p.source {
            Source::Meta { at } => Part::Header(&self.meta[at..at + p.len as usize]),
            Source::File { entry } => Part::Contents { entry, len: p.len },
        })
    }

    /// Length of the whole archive in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fill `buf` with the archive's bytes from `offset`, reading file contents under
    /// `root`. A file shorter than listed (changed since [`list`]) is an error; bytes past
    /// its listed size are never read, so the archive always agrees with the manifest.
    pub fn read_at(
        &self,
        root: &Path,
        entries: &[FileEntry],
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ReleaseError> {
        let end = offset + buf.len() as u64;
        if end > self.len {
            return Err(ReleaseError::Store(format!(
                "archive read past its end ({end} > {})",
                self.len
            )));
        }
        let first = self.pieces.partition_point(|p| p.offset + p.len <= offset);
        for p in &self.pieces[first..] {
            if p.offset >= end {
                break;
            }
            let from = offset.max(p.offset);
            let to = end.min(p.offset + p.len);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            let skip = from - p.offset;
            match p.source {
                Source::Meta { at } => {
                    let at = at + skip as usize;
                    dst.copy_from_slice(&self.meta[at..at + dst.len()]);
                }
                Source::File { entry } => read_file_at(root, &entries[entry].path, skip, dst)?,
            }
        }
        Ok(())
    }
}

fn read_file_at(root: &Path, path: &str, at: u64, dst: &mut [u8]) -> Result<(), ReleaseError> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let full = root.join(check_entry_path(path)?);
    // The listing saw a regular file here; refuse a symlink swapped in since.
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&full)
        .map_err(|e| ReleaseError::io(&full, e))?;
    f.read_exact_at(dst, at).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ReleaseError::Unsafe(format!("{path} shrank while the release was packed"))
        } else {
            ReleaseError::io(&full, e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// The archive as the tar crate writes it in one pass: what the plan must reproduce.
    fn reference_tar(root: &Path, entries: &[FileEntry]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mode(e.mode);
            match e.kind {
                FileKind::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, &e.path, io::empty()).unwrap();
                }
                FileKind::Symlink => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, &e.path, e.target.as_deref().unwrap())
                        .unwrap();
                }
                FileKind::File => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(e.size);
                    let f = fs::File::open(root.join(&e.path)).unwrap();
                    b.append_data(&mut h, &e.path, f).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn plan_reads_back_the_reference_archive_from_any_offset() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let long = "d/".to_string() + &"n".repeat(150);
        fs::create_dir_all(root.join(&long)).unwrap();
        fs::write(root.join(&long).join("f"), vec![7u8; 1000]).unwrap();
        fs::write(root.join("empty"), b"").unwrap();
        fs::write(root.join("exact"), vec![1u8; 512]).unwrap();
        fs::write(root.join("odd"), b"abc").unwrap();
        symlink("odd", root.join("link")).unwrap();
        let entries = list(root).unwrap();
        let want = reference_tar(root, &entries);
        let plan = ArchivePlan::new(&entries).unwrap();
        assert_eq!(plan.len(), want.len() as u64);
        let mut whole = vec![0u8; want.len()];
        plan.read_at(root, &entries, 0, &mut whole).unwrap();
        assert!(
            whole == want,
            "planned archive differs from the tar crate's"
        );
        for (at, n) in [(0, 1), (511, 2), (700, 3000), (want.len() - 5, 5)] {
            let mut part = vec![0u8; n];
            plan.read_at(root, &entries, at as u64, &mut part).unwrap();
            assert_eq!(part, want[at..at + n], "at {at}");
        }
        let mut past = vec![0u8; 2];
        assert!(plan
            .read_at(root, &entries, want.len() as u64 - 1, &mut past)
            .is_err());
        fs::write(root.join("exact"), b"short").unwrap();
        let err = plan.read_at(root, &entries, 0, &mut whole).unwrap_err();
        assert!(err.to_string().contains("exact shrank"), "{err}");
    }

    #[test]
    fn link_checks() {
        let ok = |parent: &str, target: &str| {
            check_link(Path::new(parent), Path::new("l"), Path::new(target)).is_ok()
        };
        assert!(ok("", "a/b"));
        assert!(ok("bin", "../lib/x"));
        assert!(ok("a/b", "../../c"));
        assert!(!ok("", "../etc/passwd"));
        assert!(!ok("a", "../../x"));
        assert!(!ok("", "/etc"));
        assert!(!ok("a", "b/../../../x"));
    }

    #[test]
    fn entry_paths() {
        assert!(check_entry_path("a/b").is_ok());
        assert!(check_entry_path("../a").is_err());
        assert!(check_entry_path("/a").is_err());
        assert!(check_entry_path("a/../../b").is_err());
        assert!(check_entry_path("").is_err());
    }
}
