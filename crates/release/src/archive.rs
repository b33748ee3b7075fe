//! Listing a release directory safely and writing it as a deterministic tar archive.
//!
//! Deterministic: entries sorted by path, mtime 0, uid/gid 0, no user or group names, only
//! permission bits kept. The same directory content always gives the same bytes.
//! Safe: a symlink must be relative and resolve inside the directory; anything else (an
//! absolute target, one that climbs out with `..`, a device or socket) fails the release.

use std::fs;
use std::io::{self, Write};
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

/// Write `entries` of `root` as a deterministic tar stream to `w`.
pub fn write_tar<W: Write>(root: &Path, entries: &[FileEntry], w: W) -> Result<W, ReleaseError> {
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mode(e.mode);
        let path = check_entry_path(&e.path)?;
        match e.kind {
            FileKind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, &path, io::empty())
                    .map_err(|err| ReleaseError::io(&path, err))?;
            }
            FileKind::Symlink => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                let target = e.target.as_deref().unwrap_or_default();
                b.append_link(&mut h, &path, target)
                    .map_err(|err| ReleaseError::io(&path, err))?;
            }
            FileKind::File => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(e.size);
                let full = root.join(&path);
                let f = fs::File::open(&full).map_err(|err| ReleaseError::io(&full, err))?;
                // A file that changes size while being packed would make the archive
                // disagree with the manifest: read exactly the listed size, no more.
                b.append_data(&mut h, &path, io::Read::take(f, e.size))
                    .map_err(|err| ReleaseError::io(&full, err))?;
            }
        }
    }
    b.into_inner().map_err(|e| ReleaseError::io(root, e))
}

#[cfg(test)]
mod tests {
    use super::*;

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
