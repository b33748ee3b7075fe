//! The names every path agrees on: a repository's, a commit's and an environment's. Each has one parse
//! function, used by the API, the webhooks, the CLI and the worker, so that `Acme/Web` and
//! `acme/web`, or an uppercase and a lowercase commit id, are never two different things.

/// Why a name was refused; the message says what the rule is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("bad repository name {0:?}: use owner/name, each part made of letters, digits, '.', '_', '-' and not starting with '.' or '-'")]
    Repo(String),
    #[error("bad commit id {0:?}: expected 40 or 64 hexadecimal digits")]
    Commit(String),
    #[error("bad worker name {0:?}: use 1 to 200 bytes without control characters")]
    Worker(String),
    #[error("bad environment name {0:?}: use 1 to 63 letters, digits, '.', '_', '-', not starting with '.' or '-'")]
    Env(String),
}

/// At most this many `/`-separated parts (GitLab nests groups).
const MAX_REPO_PARTS: usize = 8;
const MAX_REPO_LEN: usize = 200;

/// A repository name in its canonical form: lowercase (GitHub and GitLab compare names
/// without regard to case), parts of `[a-z0-9._-]` that do not start with `.` or `-`,
/// joined by single `/`. `.`, `.git`, `-rf`, `a//b` and `a/b/` are refused.
pub fn repo_name(name: &str) -> Result<String, NameError> {
    let bad = || NameError::Repo(name.to_string());
    if name.is_empty() || name.len() > MAX_REPO_LEN {
        return Err(bad());
    }
    let parts: Vec<&str> = name.split('/').collect();
    if parts.len() > MAX_REPO_PARTS {
        return Err(bad());
    }
    for part in &parts {
        let ok = !part.is_empty()
            && !part.starts_with(['.', '-'])
            && part
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
        if !ok {
            return Err(bad());
        }
    }
    Ok(name.to_ascii_lowercase())
}

/// A full commit id in its canonical form: 40 (SHA-1) or 64 (SHA-256) lowercase hex digits.
/// Branch names, `HEAD` and abbreviations are not commit ids; the control plane resolves
/// those against the remote before anything is queued.
pub fn commit_id(sha: &str) -> Result<String, NameError> {
    let ok = matches!(sha.len(), 40 | 64) && sha.bytes().all(|c| c.is_ascii_hexdigit());
    if ok {
        Ok(sha.to_ascii_lowercase())
    } else {
        Err(NameError::Commit(sha.to_string()))
    }
}

/// An environment name in its canonical form: lowercase, one part of `[a-z0-9._-]` (no
/// `/`, so that `{repo}/{env}` names one goal), not starting with `.` or `-`.
pub fn env_name(env: &str) -> Result<String, NameError> {
    let ok = (1..=63).contains(&env.len())
        && !env.starts_with(['.', '-'])
        && env
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
    if ok {
        Ok(env.to_ascii_lowercase())
    } else {
        Err(NameError::Env(env.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_names() {
        assert_eq!(env_name("Prod").unwrap(), "prod");
        assert_eq!(env_name("eu-west.canary_2").unwrap(), "eu-west.canary_2");
        for bad in ["", "a/b", ".x", "-x", "a b", &"x".repeat(64)] {
            assert!(env_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn repository_names() {
        for good in ["acme/web", "a", "group/sub/project", "x_y/a.b-c", "r2/d2"] {
            assert_eq!(repo_name(good).unwrap(), good);
        }
        assert_eq!(repo_name("Acme/Web").unwrap(), "acme/web");
        for bad in [
            "",
            ".",
            "..",
            ".git",
            "-rf",
            "a//b",
            "a/b/",
            "/a",
            "a/.hidden",
            "a/-x",
            "a b",
            "a/b\n",
            "col/a%2f",
            "a/../b",
            "ä/b",
        ] {
            assert!(repo_name(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(repo_name("a/".repeat(8).trim_end_matches('/')).is_ok());
        assert!(repo_name("a/".repeat(9).trim_end_matches('/')).is_err());
    }

    #[test]
    fn commit_ids() {
        let sha1 = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(commit_id(sha1).unwrap(), sha1);
        assert_eq!(commit_id(&sha1.to_uppercase()).unwrap(), sha1);
        let sha256 = "ab".repeat(32);
        assert_eq!(commit_id(&sha256).unwrap(), sha256);
        for bad in [
            "main",
            "HEAD",
            "zz",
            "0123456",
            &sha1[..39],
            &format!("{sha1}0"),
            "",
        ] {
            assert!(commit_id(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
