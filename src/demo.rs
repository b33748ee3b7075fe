//! `starling demo`: the whole system on this machine, as real processes of this binary on
//! loopback — three control members, two build workers and nine fleet nodes in three
//! regions — fed by a real git repository through signed GitHub push webhooks.
//!
//! It walks through: a first commit built and rolled out in waves (a canary, then region
//! by region); a second commit that changes one small file (how few bytes moved), with
//! the leader killed by SIGKILL mid-rollout; a third commit whose health check fails,
//! which stops at the canary and rolls back; a rollback by hand that moves no byte; the
//! killed member restarted from its files. The sample repository's service is
//! `starling demo-app` ([`crate::demo_app`]), so nothing beyond this binary and git is
//! needed. No root, no namespaces.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use starling_client::ControlClient;
use starling_harness::{wait_for, Members, MembersConfig};
use starling_proto::routes::Endpoint;
use starling_proto::{
    Build, DeployStatus, DeploymentView, NodeInfo, ReleaseId, RepoSpec, RollbackRequest,
    RolloutPolicy, Strategy,
};
use tokio::process::{Child, Command};

use crate::follow::Follower;
use crate::tables;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// First of the three loopback ports the members listen on.
    #[arg(long, default_value_t = 7101)]
    base_port: u16,
    /// Where everything keeps its data (default: a fresh temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep everything running after the walk-through until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
}

const REPO: &str = "acme/web";
const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];
const NODES_PER_REGION: usize = 3;

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Starling Demo")
        .env("GIT_AUTHOR_EMAIL", "demo@starling.invalid")
        .env("GIT_COMMITTER_NAME", "Starling Demo")
        .env("GIT_COMMITTER_EMAIL", "demo@starling.invalid")
        .output()
        .context("running git (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The sample repository: a working copy and the bare repository the workers clone.
struct SampleRepo {
    work: PathBuf,
    url: String,
}

impl SampleRepo {
    /// Its first commit: `starling.toml` (build: copy the files; deploy: run and check
    /// `starling demo-app`), a version and 2 MiB of assets that never change.
    fn create(dir: &Path, exe: &Path) -> Result<SampleRepo> {
        let work = dir.join("src-repo");
        let bare = dir.join("acme-web.git");
        std::fs::create_dir_all(&work)?;
        git(&work, &["init", "-q", "-b", "main"])?;
        let exe = exe.display();
        std::fs::write(
            work.join("starling.toml"),
            format!(
                "[build]\ncommand = \"mkdir -p dist && cp version assets.bin dist/\"\n\
                 output = \"dist\"\n\n[deploy]\nstart = \"exec '{exe}' demo-app serve\"\n\
                 health = \"'{exe}' demo-app check\"\n"
            ),
        )?;
        std::fs::write(work.join("assets.bin"), starling_harness::noise(7, 2 << 20))?;
        std::fs::write(work.join("version"), "1\n")?;
        git(&work, &["add", "."])?;
        git(&work, &["commit", "-q", "-m", "first"])?;
        let (w, b) = (work.display().to_string(), bare.display().to_string());
        git(dir, &["clone", "-q", "--bare", &w, &b])?;
        git(&work, &["remote", "add", "origin", &b])?;
        Ok(SampleRepo {
            work,
            url: format!("file://{b}"),
        })
    }

    /// Commit a new `version` and push it; the commit id.
    fn commit_version(&self, version: &str) -> Result<String> {
        std::fs::write(self.work.join("version"), format!("{version}\n"))?;
        git(
            &self.work,
            &["commit", "-q", "-am", &format!("version {version}")],
        )?;
        git(&self.work, &["push", "-q", "origin", "main"])?;
        git(&self.work, &["rev-parse", "HEAD"])
    }

    fn head(&self) -> Result<String> {
        git(&self.work, &["rev-parse", "HEAD"])
    }
}

async fn send_webhook(url: &str, secret: &str, delivery: &str, sha: &str) -> Result<(u16, String)> {
    let body = serde_json::json!({
        "ref": "refs/heads/main",
        "after": sha,
        "repository": { "full_name": REPO },
        "head_commit": { "id": sha },
    })
    .to_string();
    let sig = starling_core::webhook::github_signature(secret, body.as_bytes());
    let resp = starling_client::http_builder(None)?
        .build()?
        .post(format!("{url}{}", Endpoint::GithubHook.path(&[])))
        .header("X-GitHub-Event", "push")
        .header("X-GitHub-Delivery", delivery)
        .header("X-Hub-Signature-256", sig)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await?;
    Ok((
        resp.status().as_u16(),
        resp.text().await.unwrap_or_default(),
    ))
}

/// Print `what` after the seconds since `started`.
fn stamped(started: Instant, what: impl std::fmt::Display) {
    println!("[{:>5.1}s] {what}", started.elapsed().as_secs_f64());
}

fn random_hex(bytes: usize) -> String {
    let v: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(v)
}

/// Everything the demo started, stopped in order when it ends.
struct Demo {
    dir: PathBuf,
    members: Members,
    token: String,
    secret: String,
    repo: SampleRepo,
    workers: Vec<Child>,
    nodes: Vec<(String, Child)>,
    started: Instant,
    /// The member killed mid-rollout, and when.
    killed: Option<(u64, Instant)>,
}

impl Demo {
    /// A client that names every member: it outlives any one of them.
    fn client(&self) -> Result<ControlClient> {
        let urls: Vec<String> = (1..=3).map(|id| self.members.url(id)).collect();
        Ok(ControlClient::new(
            &urls.join(","),
            Some(self.token.clone()),
        )?)
    }

    fn say(&self, what: impl std::fmt::Display) {
        stamped(self.started, what);
    }

    fn spawn(&self, args: &[&str], log: &str, env: &[(&str, &str)]) -> Result<Child> {
        let urls: Vec<String> = (1..=3).map(|id| self.members.url(id)).collect();
        let log = std::fs::File::create(self.dir.join(log))?;
        Command::new(&self.members.config().exe)
            .arg("--control")
            .arg(urls.join(","))
            .args(args)
            .current_dir(&self.dir)
            .env("STARLING_TOKEN", &self.token)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting a starling process")
    }

    /// Push the next commit by a signed webhook and wait for its build; its release.
    async fn push(&self, build: u64, version: &str, via: u64) -> Result<ReleaseId> {
        let sha = if build == 1 {
            self.repo.head()?
        } else {
            self.repo.commit_version(version)?
        };
        let (status, _) = send_webhook(
            &self.members.url(via),
            &self.secret,
            &format!("delivery-{build}"),
            &sha,
        )
        .await?;
        self.say(format!(
            "push of version {version} ({}): signed webhook to member {via}, HTTP {status}",
            &sha[..12]
        ));
        let c = self.client()?;
        let b: Build = wait_for("the build", Duration::from_secs(90), || async {
            c.build(build).await.ok().filter(|b| b.status.is_terminal())
        })
        .await?;
        let Some(release) = b
            .release
            .filter(|_| b.status == starling_proto::BuildStatus::Succeeded)
        else {
            bail!(
                "build {build} ended {}: {} (see {})",
                b.status,
                b.reason.unwrap_or_default(),
                self.dir.join("w1.log").display()
            );
        };
        self.say(format!(
            "build {build} {} on {}: release {}",
            b.status,
            b.worker.map_or_else(|| "?".into(), |w| w.to_string()),
            starling_proto::short(&release.to_hex())
        ));
        Ok(release)
    }

    /// Follow deployment `id` with progress bars until it ends. With `kill_at`, kill the
    /// leader with SIGKILL once that wave has started.
    async fn follow(&mut self, id: u64, mut kill_at: Option<usize>) -> Result<DeploymentView> {
        let c = self.client()?;
        let started = self.started;
        let say =
            move |line: String| println!("[{:>5.1}s] {line}", started.elapsed().as_secs_f64());
        let mut f = Follower::new(&c, id, &say)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let v = f.poll().await?;
            let d = &v.deployment;
            let reached =
                kill_at.is_some_and(|w| d.waves.get(w).is_some_and(|w| w.started_at.is_some()));
            if reached {
                kill_at = None;
                let leader = c.cluster().await?.leader.context("no leader to kill")?;
                f.say(format!(
                    "killing the leader, member {leader}, with SIGKILL mid-rollout"
                ));
                self.members.kill(leader).await?;
                self.killed = Some((leader, Instant::now()));
            }
            if d.status.is_final() {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("deployment {id} did not end within two minutes");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Bytes held in every node's chunk store.
    fn chunk_bytes(&self) -> u64 {
        fn size(p: &Path) -> u64 {
            std::fs::read_dir(p).map_or(0, |d| {
                d.flatten()
                    .map(|e| match e.metadata() {
                        Ok(m) if m.is_dir() => size(&e.path()),
                        Ok(m) => m.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
        }
        self.nodes
            .iter()
            .map(|(n, _)| size(&self.dir.join(n).join("chunks")))
            .sum()
    }

    /// What a node's running service answers at `/`.
    fn ask_service(&self, node: &str) -> String {
        let dir = self.dir.join(node).join("apps/acme__web/current");
        match crate::demo_app::get(&dir, "/") {
            Ok((_, body)) => body.trim().to_string(),
            Err(e) => format!("(no answer: {e})"),
        }
    }

    /// Wait until every node runs `release`.
    async fn all_running(&self, release: ReleaseId) -> Result<Vec<NodeInfo>> {
        let c = self.client()?;
        let n = self.nodes.len();
        Ok(wait_for(
            "every node to run the release",
            Duration::from_secs(60),
            || async {
                let v = c.nodes().await.ok()?;
                let ok = v.len() == n
                    && v.iter().all(|x| {
                        x.apps.iter().any(|a| {
                            a.release == Some(release)
                                && a.state == starling_proto::AppState::Running
                        })
                    });
                ok.then_some(v)
            },
        )
        .await?)
    }

    /// Stop the nodes, the services they started, the workers and the members.
    async fn stop(mut self, keep: bool) -> Result<()> {
        for (_, mut child) in self.nodes.drain(..) {
            let _ = child.kill().await;
        }
        for w in &mut self.workers {
            let _ = w.kill().await;
        }
        for region in REGIONS {
            for i in 1..=NODES_PER_REGION {
                let root = self
                    .dir
                    .join(format!("{region}-{i}"))
                    .join("apps/acme__web");
                if let Some(p) = starling_node::app::AppProcess::adopt(&root) {
                    p.stop(&root, Duration::from_secs(2)).await;
                }
            }
        }
        for id in 1..=3 {
            let _ = self.members.kill(id).await;
        }
        if !keep {
            std::fs::remove_dir_all(&self.dir).ok();
        }
        Ok(())
    }
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let keep_dir = args.data_dir.is_some();
    let dir = match args.data_dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("starling-demo-{}", std::process::id())),
    };
    // Say so plainly when another demo (or anything) holds the members' ports.
    for port in args.base_port..args.base_port.saturating_add(3) {
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            bail!(
                "port {port} on 127.0.0.1 is taken ({e}): is another `starling demo` running? \
                 Stop it, or give this one other ports with --base-port"
            );
        }
    }
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?;
    let token = random_hex(16);
    let mut members = Members::new(
        MembersConfig {
            exe: exe.clone(),
            dir: dir.clone(),
            token: token.clone(),
            cluster_key: random_hex(16),
            base_port: Some(args.base_port),
            args: Vec::new(),
            env: Vec::new(),
            host: None,
            tls: false,
        },
        3,
    );
    println!(
        "Starling demo: 3 control members, 2 build workers and 9 nodes in 3 regions, on loopback."
    );
    println!("Data and logs: {}", dir.display());
    members.start(Duration::from_secs(30)).await.context(
        "starting the control members (is another demo running on these ports? try --base-port)",
    )?;
    let repo = SampleRepo::create(&dir, &exe)?;
    let mut demo = Demo {
        dir: dir.clone(),
        members,
        token,
        secret: random_hex(12),
        repo,
        workers: Vec::new(),
        nodes: Vec::new(),
        started: Instant::now(),
        killed: None,
    };
    let result = walk_through(&mut demo).await;
    if let Err(e) = &result {
        eprintln!("the demo failed: {e:#}\nlogs are in {}", dir.display());
    }
    if result.is_ok() && args.keep_running {
        println!("\nRunning until Ctrl-C.");
        tokio::signal::ctrl_c().await?;
    }
    demo.stop(result.is_err() || keep_dir).await?;
    result?;
    println!("demo finished");
    Ok(())
}

async fn walk_through(d: &mut Demo) -> Result<()> {
    let c = d.client()?;
    let st = c.cluster().await?;
    d.say(format!(
        "control plane up: members 1-3, leader member {1}, term {2}; the web page: {0}/",
        d.members.url(1),
        st.leader.map_or_else(|| "?".into(), |l| l.to_string()),
        st.term
    ));
    d.members
        .client(2)?
        .put_repo(&RepoSpec {
            name: REPO.into(),
            url: d.repo.url.clone(),
            branch: "main".into(),
            webhook_secret: d.secret.clone(),
            auto_deploy: true,
            max_release_bytes: starling_proto::DEFAULT_MAX_RELEASE_BYTES,
            notify: Vec::new(),
            notify_secret: String::new(),
            rollout: RolloutPolicy {
                strategy: Strategy::Waves,
                soak_ms: 2_000,
                max_failed_pct: 0,
                wave_timeout_ms: 60_000,
            },
        })
        .await?;
    d.say(format!(
        "registered {REPO}: rolls out in waves (a canary, then region by region), 2 s soak each"
    ));
    // The first leader makes the cluster CA a moment after it is elected.
    let join = wait_for("the cluster CA", Duration::from_secs(30), || async {
        c.create_join_token(Duration::from_secs(3600)).await.ok()
    })
    .await?
    .token;
    for w in ["w1", "w2"] {
        let child = d.spawn(
            &["worker", "--name", w, "--data-dir", w],
            &format!("{w}.log"),
            &[],
        )?;
        d.workers.push(child);
    }
    for region in REGIONS {
        for i in 1..=NODES_PER_REGION {
            let name = format!("{region}-{i}");
            let args = [
                "node",
                "--name",
                &name,
                "--region",
                region,
                "--data-dir",
                &name,
                "--repo",
                REPO,
                "--listen",
                "127.0.0.1:0",
                "--health-timeout",
                "5s",
            ];
            let child = d.spawn(
                &args,
                &format!("{name}.log"),
                &[("STARLING_JOIN_TOKEN", &join)],
            )?;
            d.nodes.push((name, child));
        }
    }
    let n = d.nodes.len();
    wait_for("the nodes to enrol", Duration::from_secs(60), || async {
        c.nodes().await.ok().filter(|v| v.len() == n)
    })
    .await?;
    d.say(format!(
        "2 workers and {n} nodes enrolled with a join token (certificates from the cluster CA)"
    ));

    // 1. The first commit, its webhook checked, built and rolled out in waves.
    let first = d.push(1, "1", 3).await?;
    let sha = d.repo.head()?;
    let (status, _) = send_webhook(&d.members.url(2), &d.secret, "delivery-1", &sha).await?;
    d.say(format!(
        "the same delivery again (a GitHub redelivery): HTTP {status}, no second build"
    ));
    let (status, _) = send_webhook(&d.members.url(1), "wrong-secret", "delivery-x", &sha).await?;
    d.say(format!(
        "a webhook signed with the wrong secret: HTTP {status}, nothing queued"
    ));
    let v = d.follow(1, None).await?;
    if v.deployment.status != DeployStatus::Succeeded {
        bail!("the first rollout ended {}", v.deployment.status);
    }
    d.all_running(first).await?;
    d.say(format!(
        "{} answers: {}",
        d.nodes[0].0,
        d.ask_service(&d.nodes[0].0)
    ));

    // 2. One small file changes: each node fetches about one chunk. The leader dies
    //    mid-rollout; the next leader carries it on.
    let before = d.chunk_bytes();
    let second = d.push(2, "2", 1).await?;
    let v = d.follow(2, Some(1)).await?;
    if v.deployment.status != DeployStatus::Succeeded {
        bail!("the second rollout ended {}", v.deployment.status);
    }
    d.all_running(second).await?;
    let moved = d.chunk_bytes() - before;
    d.say(format!(
        "version 2 reached all {n} nodes moving {} KiB in all ({} KiB per node) of a {} KiB release",
        moved / 1024,
        moved / 1024 / n as u64,
        (2 << 20) / 1024
    ));
    d.say(format!(
        "{} answers: {}",
        d.nodes[4].0,
        d.ask_service(&d.nodes[4].0)
    ));

    // 3. A release whose health check fails stops at the canary and rolls back.
    let third = d.push(3, "3-broken", 2).await?;
    let v = d.follow(3, None).await?;
    d.say(format!(
        "deployment 3 ended {}: {}",
        v.deployment.status,
        v.deployment.reason.as_deref().unwrap_or("")
    ));
    if v.deployment.status != DeployStatus::RolledBack {
        bail!("the broken release was not rolled back");
    }
    d.all_running(second).await?;
    d.say(format!(
        "every node runs version 2 again; release {} stays off the fleet",
        starling_proto::short(&third.to_hex())
    ));

    // 4. A rollback by hand, to version 1, which the nodes still hold: no byte moves.
    let before = d.chunk_bytes();
    let back = c
        .rollback(&RollbackRequest {
            repo: REPO.into(),
            env: "default".into(),
            to: None,
        })
        .await?;
    d.say(format!(
        "starling rollback {REPO}: deployment {} to release {}",
        back.id,
        starling_proto::short(&back.release.to_hex())
    ));
    let v = d.follow(back.id, None).await?;
    if v.deployment.status != DeployStatus::Succeeded || back.release != first {
        bail!("the rollback ended {}", v.deployment.status);
    }
    d.all_running(first).await?;
    d.say(format!(
        "every node runs version 1 again; {} bytes moved; {} answers: {}",
        d.chunk_bytes() - before,
        d.nodes[8].0,
        d.ask_service(&d.nodes[8].0)
    ));

    // The killed member comes back from its files and catches up.
    if let Some((id, at)) = d.killed {
        d.members.spawn(id, &[]).await?;
        let want = c.cluster().await?.last_applied;
        let back = d.members.client(id)?;
        wait_for(
            "the killed member to catch up",
            Duration::from_secs(30),
            || async { back.cluster().await.ok().filter(|s| s.last_applied >= want) },
        )
        .await?;
        d.say(format!(
            "member {id}, killed {:.0} s ago, restarted from its redb files and caught up",
            at.elapsed().as_secs_f64()
        ));
    }
    println!();
    println!(
        "{}",
        tables::deployments(&c.deployments(Some(REPO), 10).await?).trim_fmt()
    );
    println!();
    println!("{}", tables::fleet(&c.nodes().await?).trim_fmt());
    println!("\nTry it yourself (with --keep-running):");
    println!(
        "  export STARLING_CONTROL={} STARLING_TOKEN={}",
        d.members.url(1),
        d.token
    );
    println!(
        "  starling status; starling deploys list; starling deploy {REPO} --release <id> --wait"
    );
    Ok(())
}
