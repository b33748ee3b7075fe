//! Running a build command: `/bin/sh -c` in the checkout, with a clean environment, a
//! timeout and a cancel signal. A build command is untrusted code, so where the kernel
//! allows it the command runs in a PID namespace of its own (`unshare --pid --fork
//! --kill-child --mount-proc`): it is PID 1 there, sees only its own processes in `/proc`,
//! and when it exits or is killed the kernel kills every process it started, `setsid` or
//! not. When the worker is root the command also runs as an unprivileged build user, so it
//! cannot read the worker's files, environment or memory. Without namespaces (an ordinary
//! user where user namespaces are disabled) it falls back to a process group, which a
//! `setsid` grandchild can leave; the worker says so when it starts.
//!
//! The deadline covers the whole build, including the wait for output pipes to close.
//! Output (stdout and stderr, interleaved as they arrive) goes to a callback as it comes —
//! for streaming to the control plane — and its tail is kept, capped.

pub use starling_core::build_result::RunOutcome;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::watch;

/// How far a build is kept from the worker and from everything else on the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// A PID namespace (and a mount namespace for its `/proc`). `user`: the uid and gid
    /// the command runs as (the worker is root); `None` keeps the worker's own user, in a
    /// user namespace when the worker is not root.
    Namespaces {
        user: Option<(u32, u32)>,
        user_namespace: bool,
    },
    /// Only a process group: what is left where namespaces are not allowed. `user`: the
    /// uid and gid the command still runs as when the worker is root.
    ProcessGroup { user: Option<(u32, u32)> },
}

impl Isolation {
    /// The strongest isolation this process can set up: namespaces and `build_user` as
    /// root; a user and PID namespace otherwise if the kernel allows them (checked by
    /// running one); else a process group (still as `build_user` when root).
    pub fn detect(build_user: (u32, u32)) -> Isolation {
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let candidate = if root {
            Isolation::Namespaces {
                user: Some(build_user),
                user_namespace: false,
            }
        } else {
            Isolation::Namespaces {
                user: None,
                user_namespace: true,
            }
        };
        let works = std::process::Command::new("unshare")
            .args(candidate.unshare_args())
            .args(["/bin/sh", "-c", "exit 0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if works {
            candidate
        } else {
            Isolation::ProcessGroup {
                user: root.then_some(build_user),
            }
        }
    }

    /// `unshare` arguments up to and including `--`.
    fn unshare_args(&self) -> Vec<String> {
        let Isolation::Namespaces {
            user,
            user_namespace,
        } = self
        else {
            return Vec::new();
        };
        let mut a: Vec<String> = ["--pid", "--fork", "--kill-child", "--mount-proc"]
            .map(String::from)
            .to_vec();
        if *user_namespace {
            a.push("--map-root-user".into());
        }
        if let Some((uid, gid)) = user {
            a.extend([
                "--setgid".into(),
                gid.to_string(),
                "--setuid".into(),
                uid.to_string(),
            ]);
        }
        a.push("--".into());
        a
    }

    /// The uid and gid a build's files must belong to, when it runs as another user.
    pub fn build_user(&self) -> Option<(u32, u32)> {
        match self {
            Isolation::Namespaces { user, .. } | Isolation::ProcessGroup { user } => *user,
        }
    }
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Isolation::Namespaces {
                user: Some((uid, gid)),
                ..
            } => write!(f, "PID namespace, as uid {uid} gid {gid}"),
            Isolation::Namespaces { .. } => write!(f, "user and PID namespace"),
            Isolation::ProcessGroup {
                user: Some((uid, gid)),
            } => write!(f, "process group only, as uid {uid} gid {gid}"),
            Isolation::ProcessGroup { user: None } => write!(f, "process group only"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunRequest {
    pub command: String,
    pub dir: PathBuf,
    /// The whole environment besides the worker's PATH: nothing else of the worker's.
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    /// Bytes of output tail kept in [`RunResult::tail`].
    pub tail_cap: usize,
    pub isolation: Isolation,
}

/// After the command exits, how long output pipes held open by a process that escaped
/// it may delay the end of the build.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct RunResult {
    pub outcome: RunOutcome,
    /// The last `tail_cap` bytes of output, after a note of how much was dropped.
    pub tail: Vec<u8>,
    pub total_bytes: u64,
}

/// Run `req`; stop early when `cancel` becomes true.
pub async fn run(
    req: &RunRequest,
    mut cancel: watch::Receiver<bool>,
    mut on_output: impl FnMut(&[u8]),
) -> std::io::Result<RunResult> {
    let mut cmd = match req.isolation {
        Isolation::ProcessGroup { user } => {
            let mut c = Command::new("/bin/sh");
            // std drops the supplementary groups too when it changes the uid as root.
            if let Some((uid, gid)) = user {
                c.uid(uid).gid(gid);
            }
            c
        }
        ns => {
            let mut c = Command::new("unshare");
            c.args(ns.unshare_args()).arg("/bin/sh");
            c
        }
    };
    cmd.arg("-c")
        .arg(&req.command)
        .current_dir(&req.dir)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(v) = std::env::var_os("PATH") {
        cmd.env("PATH", v);
    }
    cmd.envs(req.env.iter().map(|(k, v)| (k, v)));
    let mut child = cmd.spawn()?;
    let pgid = child.id().map(|p| p as i32);
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();

    let mut tail = Tail::new(req.tail_cap);
    let deadline = tokio::time::Instant::now() + req.timeout;
    // Moved up to `DRAIN_GRACE` after the command exits, never past the deadline.
    let stop_draining = tokio::time::sleep_until(deadline);
    tokio::pin!(stop_draining);
    let (mut out_buf, mut err_buf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let mut status: Option<std::process::ExitStatus> = None;
    let exited = |st: std::process::ExitStatus| {
        use std::os::unix::process::ExitStatusExt;
        RunOutcome::Exited {
            code: st.code(),
            signal: st.signal(),
        }
    };
    let outcome = loop {
        if let Some(st) = status {
            if stdout.is_none() && stderr.is_none() {
                break exited(st);
            }
        }
        tokio::select! {
            n = read_some(&mut stdout, &mut out_buf) => {
                if let Some(n) = n { tail.push(&out_buf[..n]); on_output(&out_buf[..n]); }
            }
            n = read_some(&mut stderr, &mut err_buf) => {
                if let Some(n) = n { tail.push(&err_buf[..n]); on_output(&err_buf[..n]); }
            }
            st = child.wait(), if status.is_none() => {
                status = Some(st?);
                // Whatever the command left behind goes with it; a process that escaped
                // the group may still hold the pipes, but only for a short while.
                kill_group(pgid);
                let grace = (tokio::time::Instant::now() + DRAIN_GRACE).min(deadline);
                stop_draining.as_mut().reset(grace);
            }
            _ = &mut stop_draining => {
                match status {
                    Some(st) => {
                        tracing::warn!("a process the build started still holds its output open; not waiting for it");
                        break exited(st);
                    }
                    None => {
                        kill_group(pgid);
                        let _ = child.wait().await;
                        break RunOutcome::TimedOut;
                    }
                }
            }
            changed = cancel.changed() => {
                if changed.is_err() || *cancel.borrow() {
                    kill_group(pgid);
                    let _ = child.wait().await;
                    break RunOutcome::Cancelled;
                }
            }
        }
    };
    Ok(RunResult {
        outcome,
        total_bytes: tail.total,
        tail: tail.into_bytes(),
    })
}

/// Read from a pipe; `None` once it is closed (and then the pipe is dropped, so that the
/// select above stops polling it).
async fn read_some<R: tokio::io::AsyncRead + Unpin>(
    pipe: &mut Option<R>,
    buf: &mut [u8],
) -> Option<usize> {
    let Some(p) = pipe.as_mut() else {
        return std::future::pending().await;
    };
    match p.read(buf).await {
        Ok(0) | Err(_) => {
            *pipe = None;
            None
        }
        Ok(n) => Some(n),
    }
}

fn kill_group(pgid: Option<i32>) {
    if let Some(pgid) = pgid.filter(|p| *p > 0) {
        // SAFETY: kill(2) with a negative pid signals that process group; it has no
        // memory-safety preconditions. ESRCH (group already gone) is fine.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// The last `cap` bytes of a stream, and how many came in all.
struct Tail {
    cap: usize,
    buf: VecDeque<u8>,
    total: u64,
}

impl Tail {
    fn new(cap: usize) -> Self {
        Tail {
            cap,
            buf: VecDeque::new(),
            total: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        self.buf.extend(bytes);
        let excess = self.buf.len().saturating_sub(self.cap);
        self.buf.drain(..excess);
    }

    fn into_bytes(self) -> Vec<u8> {
        let dropped = self.total - self.buf.len() as u64;
        let mut out = Vec::new();
        if dropped > 0 {
            out.extend_from_slice(
                format!(
                    "[starling: {dropped} earlier bytes of output not kept; the log keeps the last {} bytes]\n",
                    self.cap
                )
                .as_bytes(),
            );
        }
        out.extend(self.buf);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn req(command: &str, timeout_ms: u64) -> RunRequest {
        RunRequest {
            command: command.into(),
            dir: std::env::temp_dir(),
            env: vec![("GREETING".into(), "hello".into())],
            timeout: Duration::from_millis(timeout_ms),
            tail_cap: 64,
            isolation: Isolation::detect((65534, 65534)),
        }
    }

    /// Host pids of processes whose command line contains `needle`.
    fn processes_with(needle: &str) -> Vec<u32> {
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .contains(needle)
            {
                found.push(pid);
            }
        }
        found
    }

    /// Wait (up to 10 s) until no process's command line contains `needle`.
    async fn all_gone(needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if processes_with(needle).is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    #[tokio::test]
    async fn detached_processes_die_with_the_build() {
        let r = req("", 0);
        if matches!(r.isolation, Isolation::ProcessGroup { .. }) {
            eprintln!("skipped: no namespaces here, so setsid can escape (documented)");
            return;
        }
        // Exits at once, leaving a detached sleeper behind.
        let needle = format!("sleep 61.{}", std::process::id());
        let cmd = format!("setsid {needle} & echo started");
        let start = Instant::now();
        let r = run(&req(&cmd, 60_000), no_cancel(), |_| {}).await.unwrap();
        assert!(r.outcome.success(), "{:?}", r.outcome);
        assert!(start.elapsed() < Duration::from_secs(30));
        assert!(
            all_gone(&needle).await,
            "a setsid process outlived its build"
        );

        // Killed at the deadline, with the detached sleeper.
        let needle = format!("sleep 62.{}", std::process::id());
        let cmd = format!("setsid {needle} & sleep 60");
        let r = run(&req(&cmd, 300), no_cancel(), |_| {}).await.unwrap();
        assert_eq!(r.outcome, RunOutcome::TimedOut);
        assert!(
            all_gone(&needle).await,
            "a setsid process outlived the timeout"
        );
    }

    #[tokio::test]
    async fn escaped_pipe_holders_do_not_stall_the_build() {
        // Without namespaces a setsid process escapes the group and keeps the output
        // pipes open; the build still ends soon after its shell.
        let needle = format!("sleep 63.{}", std::process::id());
        let mut r = req(&format!("setsid {needle} & echo started"), 60_000);
        r.isolation = Isolation::ProcessGroup { user: None };
        let start = Instant::now();
        let out = run(&r, no_cancel(), |_| {}).await.unwrap();
        assert!(out.outcome.success(), "{:?}", out.outcome);
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "waited for the escaped process"
        );
        for pid in processes_with(&needle) {
            // SAFETY: kill(2) on a pid we found; it has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }

    #[tokio::test]
    async fn without_namespaces_a_root_worker_still_drops_to_the_build_user() {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let mut r = req("id -u; id -G", 10_000);
        r.isolation = Isolation::ProcessGroup {
            user: Some((65534, 65534)),
        };
        let out = run(&r, no_cancel(), |_| {}).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.tail), "65534\n65534\n");
    }

    #[tokio::test]
    async fn builds_see_none_of_the_worker() {
        let r = req("", 0);
        let Isolation::Namespaces { user, .. } = r.isolation else {
            eprintln!("skipped: no namespaces here");
            return;
        };
        std::env::set_var("STARLING_RUNNER_PROBE", "worker-secret-value");
        let probe =
            "echo ppid=$PPID; cat /proc/$PPID/environ; ps axe; ls /proc | grep -c '^[0-9]'; id -u";
        let mut r = req(probe, 10_000);
        r.tail_cap = 1 << 20;
        let out = run(&r, no_cancel(), |_| {}).await.unwrap();
        let text = String::from_utf8_lossy(&out.tail);
        assert!(!text.contains("worker-secret-value"), "{text}");
        assert!(text.contains("ppid=0"), "{text}");
        if let Some((uid, _)) = user {
            assert!(text.trim_end().ends_with(&uid.to_string()), "{text}");
        }
    }

    fn no_cancel() -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        std::mem::forget(tx);
        rx
    }

    #[tokio::test]
    async fn exit_code_env_and_output() {
        let mut seen = Vec::new();
        let r = run(
            &req("echo $GREETING; echo oops >&2; exit 3", 5000),
            no_cancel(),
            |b| seen.extend_from_slice(b),
        )
        .await
        .unwrap();
        assert_eq!(
            r.outcome,
            RunOutcome::Exited {
                code: Some(3),
                signal: None
            }
        );
        let text = String::from_utf8_lossy(&r.tail);
        assert!(text.contains("hello") && text.contains("oops"), "{text}");
        assert_eq!(seen.len() as u64, r.total_bytes);
    }

    #[tokio::test]
    async fn worker_environment_does_not_leak() {
        std::env::set_var("STARLING_SECRET_TEST", "leak");
        let r = run(
            &req("echo ${STARLING_SECRET_TEST:-clean}", 5000),
            no_cancel(),
            |_| {},
        )
        .await
        .unwrap();
        assert!(String::from_utf8_lossy(&r.tail).contains("clean"));
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        // Even without namespaces: a background grandchild is in the group.
        let needle = format!("sleep 65.{}", std::process::id());
        let mut r = req(&format!("({needle}) & sleep 30"), 300);
        r.isolation = Isolation::ProcessGroup { user: None };
        let start = Instant::now();
        let out = run(&r, no_cancel(), |_| {}).await.unwrap();
        assert_eq!(out.outcome, RunOutcome::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(all_gone(&needle).await, "a grandchild outlived the timeout");
    }

    #[tokio::test]
    async fn cancel_stops_it() {
        let (tx, rx) = watch::channel(false);
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let h = tokio::spawn(async move {
            let mut started = Some(started_tx);
            run(&req("echo up; sleep 30", 60_000), rx, |_| {
                if let Some(s) = started.take() {
                    let _ = s.send(());
                }
            })
            .await
        });
        // Cancel once the command is surely running.
        started_rx.await.unwrap();
        let start = Instant::now();
        tx.send(true).unwrap();
        let r = h.await.unwrap().unwrap();
        assert_eq!(r.outcome, RunOutcome::Cancelled);
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn long_output_is_capped_with_a_note() {
        let r = run(&req("seq 1 10000", 5000), no_cancel(), |_| {})
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&r.tail);
        assert!(text.starts_with("[starling: "), "{text}");
        assert!(text.ends_with("10000\n"));
        assert!(r.total_bytes > 40_000);
    }
}
