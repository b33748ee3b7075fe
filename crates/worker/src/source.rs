//! Getting the commit to build, with the system `git`: one bare mirror per repository URL
//! on each worker (named by a hash of the URL, so two names can never share one), a fetch
//! of just the wanted commit and the tags when the mirror lacks it, and for each build a
//! fresh git working tree of exactly that commit — so that `git rev-parse HEAD` and
//! `git describe` work in build scripts. The working tree is a new repository that fetched
//! the commit's history from the mirror: it shares no file with the mirror (the build may
//! run as another user, who must not be able to read other builds' sources or alter the
//! mirror) and has no remote, so no URL or credential is in its `.git`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("commit {sha} does not exist in {}", starling_proto::redact::url(url))]
    NoSuchCommit { sha: String, url: String },
    #[error("bad {what} {value:?}")]
    Invalid { what: &'static str, value: String },
    #[error("git {args}: {stderr}")]
    Git { args: String, stderr: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Bare mirrors under one directory, one per repository.
pub struct MirrorCache {
    root: PathBuf,
    /// One fetch per repository at a time; builds of different repositories go in parallel.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl MirrorCache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        MirrorCache {
            root: root.into(),
            locks: Mutex::default(),
        }
    }

    /// Make `dest` (which must not exist yet) a git working tree of commit `sha` of `url`,
    /// with `HEAD` detached at it and the repository's tags.
    pub async fn checkout(&self, url: &str, sha: &str, dest: &Path) -> Result<(), SourceError> {
        let sha = starling_proto::commit_id(sha).map_err(|_| SourceError::Invalid {
            what: "commit id",
            value: sha.into(),
        })?;
        let sha = sha.as_str();
        if url.is_empty() || url.starts_with('-') {
            return Err(SourceError::Invalid {
                what: "repository url",
                value: url.into(),
            });
        }
        let key = blake3::hash(url.as_bytes()).to_hex();
        let mirror = self.root.join(format!("{}.git", &key[..32]));
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(key.to_string()).or_default().clone()
        };
        {
            let _held = lock.lock().await;
            if !mirror.exists() {
                std::fs::create_dir_all(&self.root)?;
                git(&self.root, &["init", "--bare", "-q", path_str(&mirror)?]).await?;
            }
            if !has_commit(&mirror, sha).await {
                let m = path_str(&mirror)?;
                // The wanted commit and the tags (for `git describe`); servers that refuse
                // fetching by id get the branches.
                if fetch(&self.root, m, url, &[sha, TAGS]).await.is_err()
                    || !has_commit(&mirror, sha).await
                {
                    let _ = fetch(&self.root, m, url, &["+refs/heads/*:refs/heads/*", TAGS]).await;
                }
                if !has_commit(&mirror, sha).await {
                    return Err(SourceError::NoSuchCommit {
                        sha: sha.into(),
                        url: url.into(),
                    });
                }
            }
        }
        std::fs::create_dir_all(dest)?;
        let d = path_str(dest)?;
        let m = path_str(&mirror)?;
        git(dest, &["init", "-q", d]).await?;
        // `--no-local` semantics come free with `fetch`: objects are copied, not linked.
        git(
            dest,
            &[
                "-C",
                d,
                "fetch",
                "-q",
                "--no-tags",
                "--end-of-options",
                m,
                sha,
                TAGS,
            ],
        )
        .await?;
        git(dest, &["-C", d, "checkout", "-q", "--detach", sha]).await?;
        Ok(())
    }
}

fn path_str(p: &Path) -> Result<&str, SourceError> {
    p.to_str().ok_or_else(|| SourceError::Invalid {
        what: "path",
        value: p.display().to_string(),
    })
}

async fn has_commit(mirror: &Path, sha: &str) -> bool {
    let Ok(m) = path_str(mirror) else {
        return false;
    };
    Command::new("git")
        .args([
            "--git-dir",
            m,
            "cat-file",
            "-e",
            &format!("{sha}^{{commit}}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// Every tag, kept up to date (a moved tag is moved here too).
const TAGS: &str = "+refs/tags/*:refs/tags/*";

async fn fetch(
    cwd: &Path,
    mirror: &str,
    url: &str,
    refspecs: &[&str],
) -> Result<Vec<u8>, SourceError> {
    let mut args = vec![
        "--git-dir",
        mirror,
        "fetch",
        "--no-tags",
        "-q",
        "--end-of-options",
        url,
    ];
    args.extend_from_slice(refspecs);
    git(cwd, &args).await
}

/// Run git; its standard output, or its standard error as the error.
async fn git(cwd: &Path, args: &[&str]) -> Result<Vec<u8>, SourceError> {
    let out = Command::new("git")
        .current_dir(cwd)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .output()
        .await?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        // git repeats the URL it was given, credentials and all.
        Err(SourceError::Git {
            args: starling_proto::redact::text(&args.join(" ")),
            stderr: starling_proto::redact::text(String::from_utf8_lossy(&out.stderr).trim()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh_git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .current_dir(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .output()
            .unwrap();
        assert!(out.status.success(), "{:?}", out);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[tokio::test]
    async fn checks_out_commits_and_refuses_unknown_ones() {
        let t = tempfile::tempdir().unwrap();
        let work = t.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        sh_git(&work, &["init", "-q", "-b", "main"]);
        std::fs::write(work.join("a.txt"), "one").unwrap();
        sh_git(&work, &["add", "."]);
        sh_git(&work, &["commit", "-q", "-m", "1"]);
        let first = sh_git(&work, &["rev-parse", "HEAD"]);
        std::fs::write(work.join("a.txt"), "two").unwrap();
        sh_git(&work, &["commit", "-q", "-am", "2"]);
        let second = sh_git(&work, &["rev-parse", "HEAD"]);
        let url = format!("file://{}", work.display());

        sh_git(&work, &["tag", "-a", "v1", "-m", "v1", &first]);
        let cache = MirrorCache::new(t.path().join("mirrors"));
        cache
            .checkout(&url, &second, &t.path().join("b2"))
            .await
            .unwrap();
        cache
            .checkout(&url, &first, &t.path().join("b1"))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(t.path().join("b2/a.txt")).unwrap(),
            "two"
        );
        assert_eq!(
            std::fs::read_to_string(t.path().join("b1/a.txt")).unwrap(),
            "one"
        );
        // Real working trees: HEAD is the commit, describe finds the tag.
        assert_eq!(sh_git(&t.path().join("b2"), &["rev-parse", "HEAD"]), second);
        assert_eq!(sh_git(&t.path().join("b1"), &["describe", "--tags"]), "v1");
        assert!(sh_git(&t.path().join("b2"), &["describe", "--tags"]).starts_with("v1-1-g"));
        // No remote, so no URL, in the build's repository.
        assert_eq!(sh_git(&t.path().join("b2"), &["remote"]), "");

        let missing = "0123456789abcdef0123456789abcdef01234567";
        let err = cache
            .checkout(&url, missing, &t.path().join("b3"))
            .await
            .unwrap_err();
        assert!(matches!(err, SourceError::NoSuchCommit { .. }), "{err}");
        assert!(cache
            .checkout("--upload-pack=x", &first, &t.path().join("b4"))
            .await
            .is_err());
        for bad in ["main", "abc1234", &first.to_uppercase()[..39]] {
            assert!(cache
                .checkout(&url, bad, &t.path().join("b5"))
                .await
                .is_err());
        }
    }

    #[tokio::test]
    async fn mirrors_are_per_url_not_per_name() {
        // `col/a` and `col__a` once shared a mirror; now two URLs never do.
        let t = tempfile::tempdir().unwrap();
        let mut shas = Vec::new();
        for name in ["one", "two"] {
            let work = t.path().join(name);
            std::fs::create_dir_all(&work).unwrap();
            sh_git(&work, &["init", "-q", "-b", "main"]);
            std::fs::write(work.join("who"), name).unwrap();
            sh_git(&work, &["add", "."]);
            sh_git(&work, &["commit", "-q", "-m", name]);
            shas.push(sh_git(&work, &["rev-parse", "HEAD"]));
        }
        let cache = MirrorCache::new(t.path().join("mirrors"));
        let url = |n: &str| format!("file://{}", t.path().join(n).display());
        cache
            .checkout(&url("one"), &shas[0], &t.path().join("c1"))
            .await
            .unwrap();
        // The commit of `one` is not in `two`'s mirror, however the repositories are named.
        let err = cache
            .checkout(&url("two"), &shas[0], &t.path().join("c2"))
            .await
            .unwrap_err();
        assert!(matches!(err, SourceError::NoSuchCommit { .. }), "{err}");
        assert_eq!(
            std::fs::read_dir(t.path().join("mirrors")).unwrap().count(),
            2
        );
    }
}
