//! A release's process on a node: what `[deploy] start` runs, and the `health` command
//! that says it is ready.
//!
//! The start command runs by `/bin/sh -c` in the release's directory, in a process group
//! of its own, with an environment made from scratch (`PATH`, `HOME` and the
//! `STARLING_RELEASE*` variables: none of the node's, whose join token is a secret). Its
//! output is appended to `<repo>/logs/<release>.log`. It is stopped by SIGTERM to its
//! group, then SIGKILL after a grace period. Its pid and kernel start time are kept in
//! `<repo>/process`, so that a node that restarts finds the process it started (the
//! process outlives the daemon, as a service should) instead of starting a second one;
//! the start time tells a reused pid from it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use starling_proto::ReleaseId;
use tokio::process::{Child, Command};

/// How long a stopped process has between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the health command has to pass, tried once a second.
/// The default of `starling node --health-timeout`.
pub const HEALTH_DEADLINE: Duration = Duration::from_secs(60);
/// How long one run of the health command may take.
const HEALTH_TRY: Duration = Duration::from_secs(10);

/// The process a release's start command became.
#[derive(Debug)]
pub struct AppProcess {
    pid: i32,
    /// Clock ticks after boot at which it started (`/proc/<pid>/stat`, field 22).
    started: u64,
    /// Present when this daemon started it (and so must reap it); absent when adopted.
    child: Option<Child>,
}

/// Where a repository's process record is kept.
fn record(root: &Path) -> PathBuf {
    root.join("process")
}

/// The kernel's start time of `pid`, if it lives.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything; count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether any process of group `pgid` is left.
fn group_alive(pgid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks; it has no memory-safety preconditions.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) on a process group this node started; no memory-safety
    // preconditions.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

impl AppProcess {
    /// Run `command` for `release` in `dir`; the record under `root` names it.
    pub fn start(
        root: &Path,
        dir: &Path,
        repo: &str,
        release: &ReleaseId,
        command: &str,
    ) -> std::io::Result<AppProcess> {
        let logs = root.join("logs");
        std::fs::create_dir_all(&logs)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("{}.log", release.to_hex())))?;
        let child = environment(Command::new("/bin/sh"), dir, repo, release)
            .arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| std::io::Error::other("the start command has no pid"))?;
        let started = start_time(pid).unwrap_or(0);
        std::fs::write(record(root), format!("{pid} {started}\n"))?;
        Ok(AppProcess {
            pid,
            started,
            child: Some(child),
        })
    }

    /// The process a previous run of this node started for `root`, if it still runs.
    pub fn adopt(root: &Path) -> Option<AppProcess> {
        let text = std::fs::read_to_string(record(root)).ok()?;
        let mut words = text.split_whitespace();
        let pid: i32 = words.next()?.parse().ok()?;
        let started: u64 = words.next()?.parse().ok()?;
        (pid > 0 && start_time(pid) == Some(started)).then_some(AppProcess {
            pid,
            started,
            child: None,
        })
    }

    /// `Some(why)` once the process has ended.
    pub fn ended(&mut self) -> Option<String> {
        match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(format!("the start command ended: {status}")),
                Ok(None) => None,
                Err(e) => Some(format!("the start command cannot be watched: {e}")),
            },
            None => (start_time(self.pid) != Some(self.started))
                .then(|| "the start command ended".to_string()),
        }
    }

    /// Stop the whole group: SIGTERM, then SIGKILL after `grace`; returns once none of
    /// it is left (or, for a group that ignores even SIGKILL, after 5 more seconds).
    pub async fn stop(mut self, root: &Path, grace: Duration) {
        signal_group(self.pid, libc::SIGTERM);
        if !self.wait_gone(grace).await {
            tracing::warn!(
                pid = self.pid,
                "the release's process ignored SIGTERM; killing it"
            );
            signal_group(self.pid, libc::SIGKILL);
            self.wait_gone(Duration::from_secs(5)).await;
        }
        let _ = std::fs::remove_file(record(root));
    }

    async fn wait_gone(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // The group leader is reaped first: a zombie still counts as in the group.
            if let Some(c) = &mut self.child {
                let _ = c.try_wait();
            }
            if !group_alive(self.pid) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Remove the process logs of releases no longer kept under `root`.
pub fn forget_logs(root: &Path, gone: &[ReleaseId]) {
    for id in gone {
        let log = root.join("logs").join(format!("{}.log", id.to_hex()));
        match std::fs::remove_file(&log) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %log.display(), error = %e, "cannot remove a release's log")
            }
            _ => {}
        }
    }
}

/// A command's environment: nothing of the node's but `PATH`.
fn environment(mut cmd: Command, dir: &Path, repo: &str, release: &ReleaseId) -> Command {
    cmd.env_clear()
        .current_dir(dir)
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        )
        .env("HOME", dir)
        .env("STARLING_REPO", repo)
        .env("STARLING_RELEASE", release.to_hex())
        .env("STARLING_RELEASE_DIR", dir)
        .kill_on_drop(true);
    cmd
}

/// Run `command` in `dir` once a second until it exits 0, for at most `deadline`; fail
/// early if `process` (the release's start command) ends meanwhile.
pub async fn wait_healthy(
    dir: &Path,
    repo: &str,
    release: &ReleaseId,
    command: &str,
    mut process: Option<&mut AppProcess>,
    deadline: Duration,
) -> Result<(), String> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(why) = process.as_mut().and_then(|p| p.ended()) {
            return Err(why);
        }
        let run = environment(Command::new("/bin/sh"), dir, repo, release)
            .arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        let last = match tokio::time::timeout(HEALTH_TRY, run).await {
            Ok(Ok(out)) if out.status.success() => return Ok(()),
            Ok(Ok(out)) => {
                let err = String::from_utf8_lossy(&out.stderr);
                format!("{}: {}", out.status, err.trim())
            }
            Ok(Err(e)) => format!("cannot run: {e}"),
            Err(_) => format!("took over {HEALTH_TRY:?}"),
        };
        if tokio::time::Instant::now() >= until {
            return Err(format!(
                "the health command did not pass in {deadline:?}: {last}"
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(std::time::Instant::now() < until, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn started_adopted_and_stopped_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let (root, rel) = (dir.path(), dir.path().join("rel"));
        std::fs::create_dir_all(&rel).unwrap();
        let id = ReleaseId::of(b"r");
        // A child that ignores SIGTERM, and a parent that writes its environment.
        let cmd = "env > seen; (trap '' TERM; sleep 300) & echo $! > child; sleep 300";
        let mut p = AppProcess::start(root, &rel, "acme/web", &id, cmd).unwrap();
        let leader = p.pid;
        wait_for("the child pid", || rel.join("child").exists()).await;
        let seen = std::fs::read_to_string(rel.join("seen")).unwrap();
        assert!(seen.contains(&format!("STARLING_RELEASE={}", id.to_hex())));
        assert!(
            !seen.contains("CARGO"),
            "the node's environment leaked: {seen}"
        );
        assert_eq!(p.ended(), None);
        // A node restarted finds it; a stale record finds nothing.
        let adopted = AppProcess::adopt(root).expect("adopted");
        assert_eq!((adopted.pid, adopted.started), (p.pid, p.started));
        let child: i32 = std::fs::read_to_string(rel.join("child"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        drop(adopted);
        // (Stopped through the handle that reaps it: in a test, this process is its
        // parent, where after a node restart init is.)
        p.stop(root, Duration::from_millis(300)).await;
        assert!(start_time(child).is_none(), "the TERM-proof child survived");
        assert!(start_time(leader).is_none());
        assert!(AppProcess::adopt(root).is_none());
        // Its log goes with its release.
        let log = root.join("logs").join(format!("{}.log", id.to_hex()));
        assert!(log.exists());
        forget_logs(root, &[ReleaseId::of(b"other"), id]);
        assert!(!log.exists());
    }

    #[tokio::test]
    async fn health_passes_fails_and_sees_the_process_end() {
        let dir = tempfile::tempdir().unwrap();
        let id = ReleaseId::of(b"r");
        let d = dir.path();
        // Passes on the third try.
        let flaky = "n=$(cat tries 2>/dev/null || echo 0); echo $((n+1)) > tries; [ $n -ge 2 ]";
        wait_healthy(d, "r", &id, flaky, None, Duration::from_secs(20))
            .await
            .unwrap();
        let err = wait_healthy(d, "r", &id, "echo nope >&2; false", None, Duration::ZERO)
            .await
            .unwrap_err();
        assert!(err.contains("nope"), "{err}");
        let mut quick = AppProcess::start(d, d, "r", &id, "exit 3").unwrap();
        let err = wait_healthy(
            d,
            "r",
            &id,
            "false",
            Some(&mut quick),
            Duration::from_secs(20),
        )
        .await
        .unwrap_err();
        assert!(err.contains("ended"), "{err}");
    }
}
