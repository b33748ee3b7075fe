//! Real control-plane members on loopback, as child processes of the `starling` binary:
//! the one way `starling demo` and the integration tests start, stop and restart a
//! cluster.
//!
//! It owns the members' processes, data directories, logs and addresses. A member listens
//! on a port the kernel chooses (`--listen 127.0.0.1:0`, read back from the member's
//! `listen.addr`), or on `base_port + id - 1` when the caller wants addresses people can
//! type; a restarted member gets its old address back, since the others know it by that.
//! It never stands in for a member: everything it starts is the real binary, and a kill
//! is a real SIGKILL.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

pub mod testbed;

use starling_client::ControlClient;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The file a member writes its listener's address to (`starling_control::server`).
const LISTEN_ADDR_FILE: &str = "listen.addr";

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("member {id} exited ({status}) before it listened; see {}", log.display())]
    Exited {
        id: u64,
        status: ExitStatus,
        log: PathBuf,
    },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("testbed: {0}")]
    Testbed(String),
    #[error("client: {0}")]
    Client(#[from] starling_client::ClientError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// How to start members.
#[derive(Debug, Clone)]
pub struct MembersConfig {
    /// The `starling` binary.
    pub exe: PathBuf,
    /// Member `n` keeps its data in `dir/m{n}` and its log in `dir/m{n}.log`.
    pub dir: PathBuf,
    pub token: String,
    pub cluster_key: String,
    /// `Some(p)`: member `n` listens on `p + n - 1`; `None`: on a port the kernel chooses.
    pub base_port: Option<u16>,
    /// More arguments of `starling control`, and more environment, for every member.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Run every member on this testbed host (at its address) instead of on loopback.
    pub host: Option<testbed::Host>,
    /// Start every member with `--tls`: HTTPS, trusted by the CA fingerprint member 1
    /// writes once it made the CA.
    pub tls: bool,
}

/// A set of members, numbered from 1; member 1 bootstraps and the others join it.
#[derive(Debug)]
pub struct Members {
    cfg: MembersConfig,
    addrs: Vec<Option<SocketAddr>>,
    children: Vec<Option<Child>>,
    /// The cluster CA's fingerprint, once known (`tls` only).
    fingerprint: Option<String>,
}

impl Members {
    pub fn new(cfg: MembersConfig, n: usize) -> Members {
        Members {
            cfg,
            addrs: vec![None; n],
            children: (0..n).map(|_| None).collect(),
            fingerprint: None,
        }
    }

    pub fn config(&self) -> &MembersConfig {
        &self.cfg
    }

    pub fn len(&self) -> usize {
        self.children.len()
    }

    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.cfg.dir.join(format!("m{id}"))
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.cfg.dir.join(format!("m{id}.log"))
    }

    /// Member `id`'s address. Panics if it never listened: a caller asking for the URL of
    /// a member it did not start has a bug.
    pub fn addr(&self, id: u64) -> SocketAddr {
        self.addrs[id as usize - 1].unwrap_or_else(|| panic!("member {id} has not been started"))
    }

    pub fn url(&self, id: u64) -> String {
        let scheme = if self.cfg.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr(id))
    }

    /// Every started member's URL, separated by commas: what `--control` takes for a
    /// client that outlives any one member.
    pub fn urls(&self) -> String {
        let started =
            (1..=self.addrs.len() as u64).filter(|id| self.addrs[*id as usize - 1].is_some());
        started.map(|id| self.url(id)).collect::<Vec<_>>().join(",")
    }

    /// The cluster CA's fingerprint (`tls` only, once member 1 made the CA).
    pub fn fingerprint(&self) -> Option<&str> {
        self.fingerprint.as_deref()
    }

    pub fn client(&self, id: u64) -> Result<ControlClient, HarnessError> {
        Ok(ControlClient::with_trust(
            &self.url(id),
            Some(self.cfg.token.clone()),
            Some(starling_pki::CaTrust::new(self.fingerprint.clone())),
        )?)
    }

    /// Start `n` members: member 1 bootstraps and leads, the others join as voters.
    pub async fn start(&mut self, within: Duration) -> Result<(), HarnessError> {
        self.spawn(1, &[]).await?;
        if self.cfg.tls {
            let pem = self.data_dir(1).join("cluster-ca.pem");
            let fingerprint = wait_for("member 1 to make the cluster CA", within, || async {
                let text = std::fs::read_to_string(&pem).ok()?;
                starling_pki::fingerprint(&text).ok()
            })
            .await?;
            self.fingerprint = Some(fingerprint);
        }
        let first = self.client(1)?;
        wait_for("member 1 to lead", within, || async {
            first.cluster().await.ok().filter(|s| s.leader == Some(1))
        })
        .await?;
        for id in 2..=self.len() as u64 {
            self.spawn(id, &[]).await?;
        }
        let n = self.len();
        wait_for("every member to be a voter", within, || async {
            first
                .cluster()
                .await
                .ok()
                .filter(|s| s.members.iter().filter(|m| m.voter).count() == n)
        })
        .await?;
        Ok(())
    }

    /// Start (or restart) member `id` with `env` beside the common environment, and wait
    /// until it listens. A member that ran before gets its old address again.
    pub async fn spawn(
        &mut self,
        id: u64,
        env: &[(&str, &str)],
    ) -> Result<SocketAddr, HarnessError> {
        let i = id as usize - 1;
        let dir = self.data_dir(id);
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let ip = match &self.cfg.host {
            Some(h) => h.ip.to_string(),
            None => "127.0.0.1".to_string(),
        };
        let listen = match (self.addrs[i], self.cfg.base_port) {
            (Some(a), _) => a.to_string(),
            (None, Some(base)) => format!("{ip}:{}", base + id as u16 - 1),
            (None, None) => format!("{ip}:0"),
        };
        let addr_file = dir.join(LISTEN_ADDR_FILE);
        match std::fs::remove_file(&addr_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(format!("removing {}", addr_file.display()))(e))
            }
            _ => {}
        }
        let log_path = self.log_path(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let mut cmd = match &self.cfg.host {
            Some(h) => h.command(&self.cfg.exe),
            None => Command::new(&self.cfg.exe),
        };
        cmd.arg("control")
            .args(["--id", &id.to_string()])
            .args(["--listen", &listen])
            .arg("--data-dir")
            .arg(&dir)
            .args(&self.cfg.args)
            .env("STARLING_TOKEN", &self.cfg.token)
            .env("STARLING_CLUSTER_KEY", &self.cfg.cluster_key)
            .envs(self.cfg.env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        if self.cfg.tls {
            cmd.arg("--tls");
        }
        if let Some(f) = &self.fingerprint {
            cmd.args(["--ca-fingerprint", f]);
        }
        if id == 1 {
            cmd.arg("--bootstrap");
        } else {
            cmd.args(["--join", &self.url(1)]);
        }
        let child = cmd
            .spawn()
            .map_err(io(format!("starting {}", self.cfg.exe.display())))?;
        self.children[i] = Some(child);
        let addr = self.listening(id, &addr_file).await?;
        self.addrs[i] = Some(addr);
        Ok(addr)
    }

    /// Wait for member `id` to write the address it listens on.
    async fn listening(&mut self, id: u64, file: &Path) -> Result<SocketAddr, HarnessError> {
        let within = Duration::from_secs(30);
        let deadline = Instant::now() + within;
        loop {
            if let Some(addr) = std::fs::read_to_string(file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return Ok(addr);
            }
            let log = self.log_path(id);
            if let Some(child) = self.children[id as usize - 1].as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.children[id as usize - 1] = None;
                    return Err(HarnessError::Exited { id, status, log });
                }
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout(
                    within,
                    format!("member {id} to listen"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL member `id`: no chance to flush or say goodbye.
    pub async fn kill(&mut self, id: u64) -> Result<(), HarnessError> {
        if let Some(mut c) = self.children[id as usize - 1].take() {
            c.kill().await.map_err(io(format!("killing member {id}")))?;
        }
        Ok(())
    }

    /// Stop member `id` as systemd does: SIGTERM, then SIGKILL if it has not exited
    /// within `within`. Whether it exited by itself.
    pub async fn stop(&mut self, id: u64, within: Duration) -> Result<bool, HarnessError> {
        let Some(mut c) = self.children[id as usize - 1].take() else {
            return Ok(true);
        };
        if let Some(pid) = c.id() {
            // SAFETY: kill(2) with a pid this set spawned and has not reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        match tokio::time::timeout(within, c.wait()).await {
            Ok(_) => Ok(true),
            Err(_) => {
                c.kill().await.map_err(io(format!("killing member {id}")))?;
                Ok(false)
            }
        }
    }

    /// The members whose processes this set started and has not seen end.
    pub fn alive(&self) -> Vec<u64> {
        (1..=self.len() as u64)
            .filter(|id| self.children[*id as usize - 1].is_some())
            .collect()
    }

    pub fn pid(&self, id: u64) -> Option<u32> {
        self.children[id as usize - 1].as_ref()?.id()
    }

    /// Wait up to `within` for member `id` to exit by itself; its exit status if it did.
    pub async fn exits_within(&mut self, id: u64, within: Duration) -> Option<ExitStatus> {
        let child = self.children[id as usize - 1].as_mut()?;
        let status = tokio::time::timeout(within, child.wait())
            .await
            .ok()?
            .ok()?;
        self.children[id as usize - 1] = None;
        Some(status)
    }
}

/// Ask `f` until it answers `Some`, every 50 ms, for at most `within`.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut f: F) -> Result<T, HarnessError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(HarnessError::Timeout(within, what.to_string()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `len` bytes that do not compress, different for every `seed`: the payload of test and
/// benchmark releases (an xorshift generator, so the same seed gives the same bytes).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = 0x2545_F491_4F6C_DD1D ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
