//! Running a build command: `/bin/sh -c` in the checkout, in a process group of its own,
//! with a clean environment, a timeout and a cancel signal. On timeout or cancel the whole
//! group gets SIGKILL, so no grandchild outlives the build. Output (stdout and stderr,
//! interleaved as they arrive) goes to a callback as it comes — for streaming to the
//! control plane — and its tail is kept, capped, for the build's record.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct RunRequest {
    pub command: String,
    pub dir: PathBuf,
    /// Added to a clean environment that holds only PATH and HOME of the worker.
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    /// Bytes of output tail kept in [`RunResult::tail`].
    pub tail_cap: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The command ended by itself: its exit code, or the signal that ended it.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    TimedOut,
    Cancelled,
}

impl RunOutcome {
    pub fn success(&self) -> bool {
        matches!(self, RunOutcome::Exited { code: Some(0), .. })
    }
}

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
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(&req.command)
        .current_dir(&req.dir)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for key in ["PATH", "HOME"] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    cmd.envs(req.env.iter().map(|(k, v)| (k, v)));
    let mut child = cmd.spawn()?;
    let pgid = child.id().map(|p| p as i32);
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();

    let mut tail = Tail::new(req.tail_cap);
    let deadline = tokio::time::sleep(req.timeout);
    tokio::pin!(deadline);
    let (mut out_buf, mut err_buf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let mut status = None;
    let outcome = loop {
        tokio::select! {
            n = read_some(&mut stdout, &mut out_buf) => {
                if let Some(n) = n { tail.push(&out_buf[..n]); on_output(&out_buf[..n]); }
            }
            n = read_some(&mut stderr, &mut err_buf) => {
                if let Some(n) = n { tail.push(&err_buf[..n]); on_output(&err_buf[..n]); }
            }
            st = child.wait(), if status.is_none() => {
                status = Some(st?);
                // Grandchildren may still hold the pipes: end the group, then drain.
                kill_group(pgid);
            }
            _ = &mut deadline, if status.is_none() => {
                kill_group(pgid);
                let _ = child.wait().await;
                break RunOutcome::TimedOut;
            }
            changed = cancel.changed(), if status.is_none() => {
                if changed.is_err() || *cancel.borrow() {
                    kill_group(pgid);
                    let _ = child.wait().await;
                    break RunOutcome::Cancelled;
                }
            }
        }
        if let Some(st) = status {
            if stdout.is_none() && stderr.is_none() {
                use std::os::unix::process::ExitStatusExt;
                break RunOutcome::Exited {
                    code: st.code(),
                    signal: st.signal(),
                };
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
        let marker = std::env::temp_dir().join(format!("starling-runner-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        // A grandchild in the background would write the marker after 2 s if it survived.
        let cmd = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let start = Instant::now();
        let r = run(&req(&cmd, 300), no_cancel(), |_| {}).await.unwrap();
        assert_eq!(r.outcome, RunOutcome::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!marker.exists(), "a grandchild outlived the timeout");
    }

    #[tokio::test]
    async fn cancel_stops_it() {
        let (tx, rx) = watch::channel(false);
        let h = tokio::spawn(async move { run(&req("sleep 30", 60_000), rx, |_| {}).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
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
