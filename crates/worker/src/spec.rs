//! `starling.toml`: how a repository builds and runs itself. Language-agnostic — a shell
//! command and an output directory — and strict: an unknown key is an error that names it
//! and its line, so that a typo never silently changes a build.
//!
//! ```toml
//! [build]
//! command = "make release"      # run by /bin/sh -c in a clean checkout of the commit
//! output  = "dist"              # the directory that becomes the release
//! timeout = "20m"               # default 30m
//! env     = { PROFILE = "release" }
//!
//! [deploy]
//! start  = "bin/server --port 8080"
//! health = "curl -fsS http://127.0.0.1:8080/healthz"
//! ```

use std::collections::BTreeMap;
use std::path::{Component, Path};
use std::time::Duration;

use serde::Deserialize;
use starling_proto::parse_duration;
use starling_proto::release::RunSpec;

pub const SPEC_FILE: &str = "starling.toml";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// A build may not ask for more than a day.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSpec {
    pub command: String,
    /// Relative to the checkout; never absolute, never containing `..`.
    pub output: String,
    pub timeout: Duration,
    pub env: BTreeMap<String, String>,
    /// `[deploy]`: carried in the release's manifest for the nodes to run.
    pub deploy: Option<RunSpec>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("starling.toml: {0}")]
    Parse(String),
    #[error("starling.toml: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    build: RawBuild,
    deploy: Option<RunSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuild {
    command: String,
    output: String,
    timeout: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

/// Parse the text of a `starling.toml`.
pub fn parse(text: &str) -> Result<BuildSpec, SpecError> {
    // toml's messages carry the line and column and name the unknown key.
    let f: File = toml::from_str(text).map_err(|e| SpecError::Parse(e.to_string()))?;
    let b = f.build;
    if b.command.trim().is_empty() {
        return Err(SpecError::Invalid("build.command is empty".into()));
    }
    let out = Path::new(&b.output);
    let safe = !b.output.is_empty()
        && out
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !safe {
        return Err(SpecError::Invalid(format!(
            "build.output {:?} must be a relative path inside the checkout",
            b.output
        )));
    }
    let timeout = match b.timeout.as_deref() {
        None => DEFAULT_TIMEOUT,
        Some(t) => parse_duration(t).ok_or_else(|| {
            SpecError::Invalid(format!(
                "build.timeout {t:?} is not a duration like 90s, 20m or 2h"
            ))
        })?,
    };
    if timeout.is_zero() || timeout > MAX_TIMEOUT {
        return Err(SpecError::Invalid(format!(
            "build.timeout must be between 1s and 24h, not {timeout:?}"
        )));
    }
    for k in b.env.keys() {
        let ok = !k.is_empty()
            && k.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
            && !k.starts_with("STARLING_");
        if !ok {
            return Err(SpecError::Invalid(format!(
                "build.env key {k:?}: use letters, digits and '_', not starting with STARLING_"
            )));
        }
    }
    Ok(BuildSpec {
        command: b.command,
        output: b.output,
        timeout,
        env: b.env,
        deploy: f.deploy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_spec() {
        let s = parse(
            r#"
[build]
command = "make release"
output  = "dist"
timeout = "20m"
env     = { PROFILE = "release" }

[deploy]
start  = "bin/server --port 8080"
health = "curl -fsS http://127.0.0.1:8080/healthz"
"#,
        )
        .unwrap();
        assert_eq!(s.command, "make release");
        assert_eq!(s.timeout, Duration::from_secs(1200));
        assert_eq!(s.env.get("PROFILE").map(String::as_str), Some("release"));
        assert_eq!(
            s.deploy.unwrap().start.as_deref(),
            Some("bin/server --port 8080")
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err =
            parse("[build]\ncommand = \"x\"\noutput = \"d\"\ntimeuot = \"1m\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("timeuot"), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
    }

    #[test]
    fn bad_values() {
        let bad = |t: &str| parse(t).is_err();
        assert!(bad("[build]\ncommand = \"x\"\noutput = \"../etc\"\n"));
        assert!(bad("[build]\ncommand = \"x\"\noutput = \"/abs\"\n"));
        assert!(bad("[build]\ncommand = \" \"\noutput = \"d\"\n"));
        assert!(bad(
            "[build]\ncommand = \"x\"\noutput = \"d\"\ntimeout = \"soon\"\n"
        ));
        assert!(bad(
            "[build]\ncommand = \"x\"\noutput = \"d\"\ntimeout = \"48h\"\n"
        ));
        assert!(bad(
            "[build]\ncommand = \"x\"\noutput = \"d\"\nenv = { STARLING_SHA = \"1\" }\n"
        ));
        assert!(bad("[deploy]\nstart = \"x\"\n"));
        assert!(bad(
            "[build]\ncommand = \"x\"\noutput = \"d\"\n[deploy]\nstrat = \"x\"\n"
        ));
        assert!(bad("not toml at all ["));
    }
}
