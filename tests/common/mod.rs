//! Real control-plane members as child processes of the `starling` binary, for tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use starling_harness::{Members, MembersConfig};
use starling_proto::{Build, ClusterStatus, Event};
use tokio::process::{Child, Command};

pub const TOKEN: &str = "test-token-0123456789";
pub const CLUSTER_KEY: &str = "test-cluster-key-0123456789";
pub const SECRET: &str = "webhook-secret";

/// A temporary directory others may pass through (not list), as a worker's data directory
/// must be when its builds run as another user.
pub fn shared_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    d
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// The member processes, started the way `starling demo` starts them.
    pub members: Members,
    pub http: reqwest::Client,
}

impl Cluster {
    /// Start `n` members: member 1 bootstraps, the others join it.
    pub async fn start(n: usize, extra_args: &[&str]) -> Cluster {
        Self::start_with(n, extra_args, &[]).await
    }

    /// [`Cluster::start`], with more environment for the members.
    pub async fn start_with(n: usize, extra_args: &[&str], env: &[(String, String)]) -> Cluster {
        Self::start_on(n, extra_args, env, None).await
    }

    /// [`Cluster::start_with`], every member on `host` (a testbed's) instead of loopback.
    pub async fn start_on(
        n: usize,
        extra_args: &[&str],
        env: &[(String, String)],
        host: Option<starling_harness::testbed::Host>,
    ) -> Cluster {
        let dir = shared_tempdir();
        let cfg = MembersConfig {
            exe: env!("CARGO_BIN_EXE_starling").into(),
            dir: dir.path().to_path_buf(),
            token: TOKEN.into(),
            cluster_key: CLUSTER_KEY.into(),
            base_port: None,
            // `--tls` is the harness's to pass: it also makes the clients trust the CA.
            args: extra_args
                .iter()
                .filter(|a| **a != "--tls")
                .map(|s| s.to_string())
                .collect(),
            env: env.to_vec(),
            host,
            tls: extra_args.contains(&"--tls"),
        };
        let mut c = Cluster {
            dir,
            members: Members::new(cfg, n),
            // Replaced once the members run (an HTTPS cluster's CA is known then).
            http: starling_client::http_builder(None)
                .expect("an HTTP client")
                .build()
                .expect("http client"),
        };
        if let Err(e) = c.members.start(Duration::from_secs(60)).await {
            c.dump_logs();
            panic!("starting {n} members: {e}");
        }
        let trust = starling_pki::CaTrust::new(c.members.fingerprint().map(str::to_string));
        c.http = starling_client::http_builder(Some(trust))
            .expect("an HTTP client")
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client");
        // The first leader writes the cluster CA soon after it is elected; waiting for it
        // keeps that write out of what tests count.
        c.wait_for_cluster_ca().await;
        c
    }

    pub fn url(&self, id: u64) -> String {
        self.members.url(id)
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.members.data_dir(id)
    }

    /// Start (or restart) member `id`.
    pub async fn spawn(&mut self, id: u64) {
        self.spawn_with(id, &[]).await;
    }

    /// [`Cluster::spawn`] with more environment for this one member.
    pub async fn spawn_with(&mut self, id: u64, env: &[(&str, &str)]) {
        if let Err(e) = self.members.spawn(id, env).await {
            self.dump_logs();
            panic!("starting member {id}: {e}");
        }
    }

    /// SIGKILL member `id`.
    pub async fn kill(&mut self, id: u64) {
        self.members.kill(id).await.expect("kill");
    }

    /// Queue builds of commits `from..to` of `acme/web` by signed webhooks sent to `via`.
    pub async fn queue_builds(&self, via: u64, from: u64, to: u64) {
        for n in from..to {
            self.send_push(via, "acme/web", &sha_of(n), n).await;
        }
    }

    /// A signed GitHub push of `sha` to `repo` through member `via`, delivery `d-<n>`,
    /// which must queue a build.
    pub async fn send_push(&self, via: u64, repo: &str, sha: &str, n: u64) {
        let (body, sig) = github_push(repo, "main", sha, SECRET);
        let delivery = format!("d-{n}");
        let r = send_github(&self.http, &self.url(via), "push", &delivery, body, &sig)
            .await
            .expect("webhook");
        let status = r.status().as_u16();
        if status != 201 {
            self.dump_logs();
            panic!(
                "webhook {n}: {status} {}",
                r.text().await.unwrap_or_default()
            );
        }
    }

    /// Wait until member `id` has applied everything `leader` had logged when asked.
    pub async fn wait_caught_up(&self, id: u64, leader: u64) {
        let want = self.status(leader).await.and_then(|s| s.last_log_index);
        self.wait_until(
            "the member caught up",
            Duration::from_secs(60),
            async move |c| c.status(id).await.is_some_and(|s| s.last_applied >= want),
        )
        .await;
    }

    /// Members `a` and `b` hold the same builds (some, none lost) and the same events.
    pub async fn assert_same_history(&self, a: u64, b: u64) {
        let (ba, bb) = (self.builds_local(a).await, self.builds_local(b).await);
        assert!(!ba.is_empty());
        assert_eq!(
            ba.len(),
            bb.len(),
            "members {a} and {b} hold different numbers of builds"
        );
        assert_eq!(ba, bb, "builds of members {a} and {b} differ");
        let (ea, eb) = (self.events_local(a).await, self.events_local(b).await);
        assert_eq!(ea, eb, "events of members {a} and {b} differ");
    }

    /// PUT a chunk with the API token; the answer's status.
    pub async fn put_chunk(&self, id: u64, bytes: Vec<u8>) -> u16 {
        let hash = blake3::hash(&bytes).to_hex().to_string();
        self.http
            .put(format!("{}/v1/chunks/{hash}", self.url(id)))
            .bearer_auth(TOKEN)
            .body(bytes)
            .send()
            .await
            .expect("chunk put")
            .status()
            .as_u16()
    }

    /// Wait up to `within` for member `id` to exit by itself; its exit status if it did.
    pub async fn exits_within(
        &mut self,
        id: u64,
        within: Duration,
    ) -> Option<std::process::ExitStatus> {
        self.members.exits_within(id, within).await
    }

    pub fn alive(&self) -> Vec<u64> {
        self.members.alive()
    }

    pub async fn status(&self, id: u64) -> Option<ClusterStatus> {
        let r = self
            .http
            .get(format!("{}/v1/cluster", self.url(id)))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    pub async fn leader(&self) -> Option<u64> {
        for id in self.alive() {
            if let Some(s) = self.status(id).await {
                if let Some(l) = s.leader {
                    if self.alive().contains(&l) {
                        return Some(l);
                    }
                }
            }
        }
        None
    }

    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        f: impl AsyncFn(&Cluster) -> bool,
    ) {
        let start = Instant::now();
        while !f(self).await {
            if start.elapsed() > timeout {
                self.dump_logs();
                panic!("timed out after {timeout:?} waiting until {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Print the tail of every member's log and keep full copies for a post-mortem.
    pub fn dump_logs(&self) {
        let keep = std::env::temp_dir().join(format!("starling-failed-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&keep);
        for id in 1..=self.members.len() as u64 {
            let _ = std::fs::copy(self.members.log_path(id), keep.join(format!("m{id}.log")));
        }
        // The logs of the other processes the test started (workers, nodes) too.
        for entry in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let _ = std::fs::copy(&path, keep.join(entry.file_name()));
            }
        }
        eprintln!("full logs kept in {}", keep.display());
        for id in 1..=self.members.len() as u64 {
            let text = std::fs::read_to_string(self.members.log_path(id)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            eprintln!("--- member {id} log (last 30 lines) ---");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }

    pub async fn post(&self, id: u64, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.url(id)))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// GET with the API token (logs, manifests and chunks need one).
    pub async fn get(&self, url: &str) -> reqwest::Response {
        self.http
            .get(url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET")
    }

    /// Run `starling --control <every member> ARGS` in the cluster's directory, its standard
    /// error in `log` there; killed when dropped.
    pub fn spawn_starling(&self, args: &[&str], log: &str, env: &[(&str, &str)]) -> Child {
        self.spawn_starling_on(None, args, log, env)
    }

    /// A build worker named `name`, its data directory given relative to its working
    /// directory (as in the README).
    pub fn spawn_worker(&self, name: &str) -> Child {
        self.spawn_worker_with(name, &[])
    }

    /// [`Cluster::spawn_worker`] with more environment (the caller's wins).
    pub fn spawn_worker_with(&self, name: &str, env: &[(&str, &str)]) -> Child {
        let env: Vec<(&str, &str)> = [("STARLING_TOKEN", TOKEN)]
            .into_iter()
            .chain(env.iter().copied())
            .collect();
        self.spawn_starling(
            &["worker", "--name", name, "--data-dir", name],
            &format!("{name}.log"),
            &env,
        )
    }

    /// A `starling node` on loopback named `name` in `region`, keeping its data in
    /// `name` (in the cluster's directory) and its log in `log`, running `repo`.
    pub fn spawn_node(
        &self,
        name: &str,
        region: &str,
        repo: &str,
        log: &str,
        env: &[(&str, &str)],
    ) -> Child {
        self.spawn_starling(
            &[
                "node",
                "--name",
                name,
                "--region",
                region,
                "--data-dir",
                name,
                "--repo",
                repo,
                "--listen",
                "127.0.0.1:0",
            ],
            log,
            env,
        )
    }

    /// Run `starling --control <member> ARGS` with the API token, to its end.
    pub async fn cli(&self, member: u64, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_starling"))
            .args(["--control", &self.url(member)])
            .args(args)
            .env("STARLING_TOKEN", TOKEN)
            .output()
            .await
            .expect("run starling")
    }

    /// [`Cluster::spawn_starling`] on a testbed's host.
    pub fn spawn_starling_on(
        &self,
        host: Option<&starling_harness::testbed::Host>,
        args: &[&str],
        log: &str,
        env: &[(&str, &str)],
    ) -> Child {
        let log = std::fs::File::create(self.dir.path().join(log)).expect("log file");
        let exe = env!("CARGO_BIN_EXE_starling");
        match host {
            Some(h) => h.command(exe),
            None => Command::new(exe),
        }
        .args(["--control", &self.members.urls()])
        .args(args)
        .current_dir(self.dir.path())
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn starling")
    }

    /// A fresh git repository (branch `main`, nothing committed) at `work` in the
    /// cluster's directory.
    pub fn work_tree(&self) -> PathBuf {
        let work = self.dir.path().join("work");
        std::fs::create_dir_all(&work).expect("the work tree");
        git(&work, &["init", "-q", "-b", "main"]);
        work
    }

    /// Commit `files` in `work`, send `repo` a signed push webhook for it through member
    /// `via` (delivery `d-<n>`), and wait for build `n`, which must succeed; its release.
    pub async fn push(
        &self,
        repo: &str,
        work: &std::path::Path,
        via: u64,
        n: u64,
        files: &[(&str, &str)],
    ) -> starling_proto::ReleaseId {
        for (name, text) in files {
            std::fs::write(work.join(name), text).unwrap();
        }
        git(work, &["add", "."]);
        git(work, &["commit", "-q", "-m", &format!("change {n}")]);
        let sha = git(work, &["rev-parse", "HEAD"]);
        self.send_push(via, repo, &sha, n).await;
        let b: Build = self
            .wait_for_json(via, &format!("/v1/builds/{n}"), |b: &Build| {
                b.status.is_terminal()
            })
            .await;
        assert_eq!(b.status, starling_proto::BuildStatus::Succeeded, "{b:?}");
        b.release.expect("a release")
    }

    /// A new join token (default lifetime), made through member 1.
    pub async fn join_token(&self) -> String {
        let v: serde_json::Value = self
            .post(1, "/v1/join-tokens", &serde_json::json!({}))
            .await
            .json()
            .await
            .expect("a join token's JSON");
        v["token"].as_str().expect("a token").to_string()
    }

    /// Wait until the first leader has made the cluster CA (member 1 shows its fingerprint).
    pub async fn wait_for_cluster_ca(&self) {
        self.wait_until(
            "the cluster CA exists",
            Duration::from_secs(30),
            async |c| c.status(1).await.is_some_and(|s| s.cluster_ca.is_some()),
        )
        .await;
    }

    /// GET `path` on member `id` until its JSON satisfies `ok` (at most 90 s).
    pub async fn wait_for_json<T: serde::de::DeserializeOwned>(
        &self,
        id: u64,
        path: &str,
        ok: impl Fn(&T) -> bool,
    ) -> T {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let r = self.get(&format!("{}{path}", self.url(id))).await;
            if let Ok(v) = r.json::<T>().await {
                if ok(&v) {
                    return v;
                }
            }
            if Instant::now() > deadline {
                self.dump_logs();
                panic!("{path} on member {id} did not become what was waited for");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET without any token.
    pub async fn get_anon(&self, url: &str) -> reqwest::Response {
        self.http.get(url).send().await.expect("GET")
    }

    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> T {
        self.get(url).await.json().await.expect("JSON answer")
    }

    pub async fn get_bytes(&self, url: &str) -> Vec<u8> {
        self.get(url).await.bytes().await.expect("body").to_vec()
    }

    /// Build `id` as member `via` answers it.
    pub async fn build(&self, via: u64, id: u64) -> Build {
        self.get_json(&format!("{}/v1/builds/{id}", self.url(via)))
            .await
    }

    pub async fn add_repo(&self, id: u64, name: &str) {
        self.add_repo_from(id, name, "file:///nonexistent").await;
    }

    /// Add repository `name` (branch `main`) cloned from `url`, by member `id`; its
    /// deployments switch every node at once.
    pub async fn add_repo_from(&self, id: u64, name: &str, url: &str) {
        let all_at_once = serde_json::json!({"strategy": "all-at-once", "soak_ms": 1000});
        self.add_repo_rolling(id, name, url, all_at_once).await;
    }

    /// Add repository `name` cloned from `url` with the rollout policy `rollout`.
    pub async fn add_repo_rolling(
        &self,
        id: u64,
        name: &str,
        url: &str,
        rollout: serde_json::Value,
    ) {
        let r = self
            .post(
                id,
                "/v1/repos",
                &serde_json::json!({
                    "name": name, "url": url, "branch": "main", "webhook_secret": SECRET,
                    "rollout": rollout,
                }),
            )
            .await;
        assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
    }

    /// All builds as member `id` has applied them (a stale, local read).
    pub async fn builds_local(&self, id: u64) -> Vec<Build> {
        self.http
            .get(format!(
                "{}/v1/builds?stale=true&limit=100000",
                self.url(id)
            ))
            .send()
            .await
            .expect("builds")
            .json()
            .await
            .expect("builds json")
    }

    pub async fn events_local(&self, id: u64) -> Vec<Event> {
        self.http
            .get(format!("{}/v1/events?after=0&limit=10000", self.url(id)))
            .send()
            .await
            .expect("events")
            .json()
            .await
            .expect("events json")
    }

    pub async fn force_snapshot(&self, id: u64) -> Value {
        let r = self
            .http
            .post(format!("{}/internal/snapshot", self.url(id)))
            .header("x-starling-cluster-key", CLUSTER_KEY)
            .send()
            .await
            .expect("snapshot");
        assert!(r.status().is_success(), "snapshot: {}", r.status());
        r.json().await.expect("snapshot json")
    }
}

/// A build's history as (status, attempt, worker), for comparing with what is expected.
pub fn trail(b: &Build) -> Vec<(starling_proto::BuildStatus, u32, Option<String>)> {
    b.history
        .iter()
        .map(|t| {
            (
                t.status,
                t.attempt,
                t.worker.as_ref().map(|w| w.to_string()),
            )
        })
        .collect()
}

/// Run git in `dir` with a fixed identity; its trimmed standard output.
pub fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t")
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A GitHub push payload and its signature.
pub fn github_push(repo: &str, branch: &str, sha: &str, secret: &str) -> (Vec<u8>, String) {
    let body = serde_json::json!({
        "ref": format!("refs/heads/{branch}"),
        "after": sha,
        "deleted": false,
        "repository": { "full_name": repo },
        "head_commit": { "id": sha },
    })
    .to_string()
    .into_bytes();
    let sig = sign(secret, &body);
    (body, sig)
}

pub fn sign(secret: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("hmac key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub async fn send_github(
    http: &reqwest::Client,
    url: &str,
    event: &str,
    delivery: &str,
    body: Vec<u8>,
    sig: &str,
) -> Result<reqwest::Response, reqwest::Error> {
    http.post(format!("{url}/hooks/github"))
        .header("X-GitHub-Event", event)
        .header("X-GitHub-Delivery", delivery)
        .header("X-Hub-Signature-256", sig)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
}

/// A 40-hex-digit commit id made from `n`, never the all-zero id of a deleted branch.
pub fn sha_of(n: u64) -> String {
    format!(
        "{:08x}{:032x}",
        n + 1,
        (n as u128 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    )
}

/// An S3-compatible server on loopback (moto's, `pip install 'moto[server]'`) with one
/// empty bucket, for the `s3` origin store. Killed when dropped.
pub struct S3Server {
    pub url: String,
    pub bucket: String,
    http: reqwest::Client,
    _child: Child,
}

impl S3Server {
    pub async fn start(bucket: &str) -> S3Server {
        // Port 0: the kernel chooses, and the server says which on its standard error.
        let mut child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 to run moto's S3-compatible server");
        let stderr = child.stderr.take().expect("moto's stderr");
        // Its standard error is read to the end (a closed pipe would fail its request
        // logging); the first line naming the address tells the URL.
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut tx = Some(tx);
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(at) = line.find("http://127.0.0.1:") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line[at..].trim().to_string());
                    }
                }
            }
        });
        let url = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .expect("moto_server to say where it listens within 30 s")
            .expect("moto_server to say where it listens before it ends");
        let http = starling_client::http_builder(None)
            .expect("an HTTP client")
            .no_proxy()
            .build()
            .expect("client");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if http
                .put(format!("{url}/{bucket}"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "moto_server did not start"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        S3Server {
            url,
            bucket: bucket.to_string(),
            http,
            _child: child,
        }
    }

    /// What `object_store` reads to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", self.url.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "starling-test"),
            ("AWS_SECRET_ACCESS_KEY", "starling-test-secret"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Every key in the bucket under `prefix`, read over plain S3 (ListObjectsV2).
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let xml = self
            .http
            .get(format!(
                "{}/{}?list-type=2&max-keys=10000&prefix={prefix}",
                self.url, self.bucket
            ))
            .send()
            .await
            .expect("list the bucket")
            .text()
            .await
            .expect("listing");
        xml.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }
}

/// A small tmpfs mounted for a test (a disk that fills up), unmounted on drop even when
/// the test fails.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Whether this process may mount one (root); says why not when it may not.
    pub fn possible() -> bool {
        // SAFETY: geteuid(2) has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("skipped: mounting a small tmpfs needs root");
        }
        root
    }

    /// Mount a tmpfs of `size` (`mount -o size=`) at `dir`, made if missing; `None` (and
    /// a note) where this machine does not allow it.
    pub fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).ok()?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: this machine does not let tests mount a tmpfs");
            return None;
        }
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
