//! `starling demo`: a three-member control plane on loopback, as real processes of this
//! binary, fed by a real git repository and a signed GitHub push webhook; then the leader is
//! killed with SIGKILL to show that nothing is lost and a new leader takes over.
//!
//! A real `starling worker` then builds the commit into a content-addressed release.
//! Fleet nodes are not part of the demo yet (a later issue).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use starling_client::BuildFilter;
use starling_harness::{wait_for, Members, MembersConfig};
use starling_proto::routes::Endpoint;
use starling_proto::RepoSpec;
use tokio::process::Command;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// First of the three loopback ports the members listen on.
    #[arg(long, default_value_t = 7101)]
    base_port: u16,
    /// Where members keep their data (default: a fresh temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep the cluster running after the walk-through until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
}

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

/// A bare repository with one commit on `main` holding a `starling.toml`.
fn make_repo(dir: &Path) -> Result<(String, String)> {
    let work = dir.join("src-repo");
    let bare = dir.join("acme-web.git");
    std::fs::create_dir_all(&work)?;
    git(&work, &["init", "-q", "-b", "main"])?;
    std::fs::write(
        work.join("starling.toml"),
        "[build]\ncommand = \"mkdir -p dist && cp index.html dist/\"\noutput = \"dist\"\n",
    )?;
    std::fs::write(work.join("index.html"), "<h1>hello from starling</h1>\n")?;
    git(&work, &["add", "."])?;
    git(&work, &["commit", "-q", "-m", "first"])?;
    let sha = git(&work, &["rev-parse", "HEAD"])?;
    git(
        dir,
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap_or_default(),
            bare.to_str().unwrap_or_default(),
        ],
    )?;
    Ok((format!("file://{}", bare.display()), sha))
}

async fn send_webhook(url: &str, secret: &str, delivery: &str, sha: &str) -> Result<(u16, String)> {
    let body = serde_json::json!({
        "ref": "refs/heads/main",
        "after": sha,
        "repository": { "full_name": "acme/web" },
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

fn random_hex(bytes: usize) -> String {
    let v: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(v)
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let dir = match args.data_dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("starling-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let token = random_hex(16);
    let mut c = Members::new(
        MembersConfig {
            exe: std::env::current_exe()?,
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
        "== Starling demo: data and member logs in {}",
        dir.display()
    );

    c.start(Duration::from_secs(30)).await?;
    let st = c.client(1)?.cluster().await?;
    println!(
        "== 3 members up; leader is member {:?}, term {}",
        st.leader, st.term
    );

    let (url, sha) = make_repo(&dir)?;
    let secret = random_hex(12);
    c.client(2)?
        .put_repo(&RepoSpec {
            name: "acme/web".into(),
            url: url.clone(),
            branch: "main".into(),
            webhook_secret: secret.clone(),
            auto_deploy: true,
            max_release_bytes: starling_proto::DEFAULT_MAX_RELEASE_BYTES,
            rollout: Default::default(),
        })
        .await?;
    println!(
        "== registered acme/web ({url}) through member 2 (a follower; it forwarded to the leader)"
    );

    let (status, body) = send_webhook(&c.url(3), &secret, "demo-delivery-1", &sha).await?;
    let outcome: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    println!(
        "== signed push webhook to member 3: HTTP {status}, {} build {}",
        outcome["outcome"].as_str().unwrap_or("?"),
        outcome["build"]["id"]
    );
    let (status, _) = send_webhook(&c.url(2), &secret, "demo-delivery-1", &sha).await?;
    println!("== the same delivery again (GitHub redelivery) to member 2: HTTP {status}, no second build");
    let (status, _) = send_webhook(&c.url(1), "wrong-secret", "demo-delivery-2", &sha).await?;
    println!("== a webhook signed with the wrong secret: HTTP {status}, nothing queued");

    let worker_log = std::fs::File::create(dir.join("worker.log"))?;
    let mut worker = Command::new(&c.config().exe)
        .args([
            "--control",
            &c.url(2),
            "worker",
            "--name",
            "demo-worker",
            "--data-dir",
        ])
        .arg(dir.join("worker"))
        .env("STARLING_TOKEN", &token)
        .stdout(Stdio::null())
        .stderr(worker_log)
        .kill_on_drop(true)
        .spawn()
        .context("starting the worker")?;
    let wc = c.client(2)?;
    let built = wait_for(
        "the worker to build the commit",
        Duration::from_secs(60),
        || async { wc.build(1).await.ok().filter(|b| b.status.is_terminal()) },
    )
    .await?;
    println!(
        "== a worker leased build 1, ran its starling.toml and ended it {}: release {}",
        built.status,
        built.release.map_or_else(|| "-".into(), |r| r.to_string())
    );
    worker.kill().await?;
    if built.status != starling_proto::BuildStatus::Succeeded {
        bail!(
            "the demo build ended {}: {} (see {})",
            built.status,
            built.reason.unwrap_or_default(),
            dir.join("worker.log").display()
        );
    }

    let leader = c.client(1)?.cluster().await?.leader.context("no leader")?;
    println!("== killing the leader (member {leader}) with SIGKILL");
    let killed_at = Instant::now();
    c.kill(leader).await?;
    let survivor = if leader == 1 { 2 } else { 1 };
    let sc = c.client(survivor)?;
    let new = wait_for("a new leader", Duration::from_secs(15), || async {
        sc.cluster()
            .await
            .ok()
            .and_then(|s| s.leader.filter(|l| *l != leader))
    })
    .await?;
    println!(
        "== member {new} leads after {} ms; the build history on the survivors:",
        killed_at.elapsed().as_millis()
    );
    let builds = sc.builds(&BuildFilter::default()).await?;
    for b in &builds {
        println!(
            "   build {} {} {} {} (attempt {})",
            b.id,
            b.repo,
            b.sha.get(..12).unwrap_or(&b.sha),
            b.status,
            b.attempt
        );
    }
    c.spawn(leader, &[]).await?;
    let back = c.client(leader)?;
    let want = sc.cluster().await?.last_applied;
    wait_for(
        "the killed member to catch up",
        Duration::from_secs(30),
        || async { back.cluster().await.ok().filter(|s| s.last_applied >= want) },
    )
    .await?;
    println!("== member {leader} restarted from its redb files and caught up");

    println!("\nTry it yourself:");
    println!(
        "  export STARLING_CONTROL={} STARLING_TOKEN={}",
        c.url(1),
        token
    );
    println!("  starling cluster status");
    println!("  starling builds list");
    println!("  starling trigger acme/web --force");
    if args.keep_running {
        println!("\nRunning until Ctrl-C.");
        tokio::signal::ctrl_c().await?;
    }
    for id in 1..=3 {
        c.kill(id).await?;
    }
    if !args.keep_running {
        std::fs::remove_dir_all(&dir).ok();
    }
    println!("== demo finished");
    Ok(())
}
