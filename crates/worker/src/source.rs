//! Getting the commit to build, with the system `git`: one bare mirror per repository on
//! each worker, a fetch of just the wanted commit when the mirror lacks it, and a fresh
//! checkout per build (`git archive`, so the build never sees a `.git` it could dirty).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("commit {sha} does not exist in {url}")]
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

    /// Put the tree of `sha` of `url` into `dest` (which must not exist yet).
    pub async fn checkout(
        &self,
        repo: &str,
        url: &str,
        sha: &str,
        dest: &Path,
    ) -> Result<(), SourceError> {
        if sha.len() < 7 || sha.len() > 64 || !sha.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(SourceError::Invalid {
                what: "commit id",
                value: sha.into(),
            });
        }
        if url.is_empty() || url.starts_with('-') {
            return Err(SourceError::Invalid {
                what: "repository url",
                value: url.into(),
            });
        }
        let mirror = self.root.join(format!("{}.git", repo.replace('/', "__")));
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(repo.to_string()).or_default().clone()
        };
        {
            let _held = lock.lock().await;
            if !mirror.exists() {
                std::fs::create_dir_all(&self.root)?;
                git(&self.root, &["init", "--bare", "-q", path_str(&mirror)?]).await?;
            }
            if !has_commit(&mirror, sha).await {
                let m = path_str(&mirror)?;
                // Just the wanted commit; servers that refuse fetching by id get the branches.
                if fetch(&self.root, m, url, sha).await.is_err() || !has_commit(&mirror, sha).await
                {
                    let _ = fetch(&self.root, m, url, "+refs/heads/*:refs/heads/*").await;
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
        let m = path_str(&mirror)?;
        let tarball = git(
            &self.root,
            &["--git-dir", m, "archive", "--format=tar", sha],
        )
        .await?;
        // tar refuses entries that would land outside `dest`.
        tar::Archive::new(tarball.as_slice()).unpack(dest)?;
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

async fn fetch(cwd: &Path, mirror: &str, url: &str, refspec: &str) -> Result<Vec<u8>, SourceError> {
    let args = [
        "--git-dir",
        mirror,
        "fetch",
        "--no-tags",
        "-q",
        "--end-of-options",
        url,
        refspec,
    ];
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
        Err(SourceError::Git {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
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

        let cache = MirrorCache::new(t.path().join("mirrors"));
        cache
            .checkout("acme/web", &url, &second, &t.path().join("b2"))
            .await
            .unwrap();
        cache
            .checkout("acme/web", &url, &first, &t.path().join("b1"))
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
        assert!(!t.path().join("b1/.git").exists());

        let missing = "0123456789abcdef0123456789abcdef01234567";
        let err = cache
            .checkout("acme/web", &url, missing, &t.path().join("b3"))
            .await
            .unwrap_err();
        assert!(matches!(err, SourceError::NoSuchCommit { .. }), "{err}");
        assert!(cache
            .checkout("acme/web", "--upload-pack=x", &first, &t.path().join("b4"))
            .await
            .is_err());
    }
}
