//! Client subcommands: talk to any control member, print tables for people or JSON.

use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use serde::Serialize;
use starling_client::{BuildFilter, ControlClient};
use starling_proto::{
    BuildStatus, DeployRequest, DeployStatus, Deployment, ReleaseId, RepoSpec, RollbackRequest,
    RolloutPolicy, Strategy, TriggerRequest,
};

use crate::follow::Follower;
use crate::tables;

#[derive(Subcommand)]
pub enum ClientCmd {
    /// Register and list repositories.
    #[command(subcommand)]
    Repos(ReposCmd),
    /// Queue a build of a repository's branch head (or of --sha).
    Trigger {
        repo: String,
        #[arg(long)]
        sha: Option<String>,
        /// Build even if this commit was built before.
        #[arg(long)]
        force: bool,
    },
    /// Build history.
    #[command(subcommand)]
    Builds(BuildsCmd),
    /// Releases.
    #[command(subcommand)]
    Releases(ReleasesCmd),
    /// Control-plane membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Deploy a release (default: the repository's newest) to the repository's nodes:
    /// every node fetches it at once; waves decide when each runs it.
    Deploy {
        repo: String,
        #[arg(long, value_parser = parse_release)]
        release: Option<ReleaseId>,
        /// waves (a canary, then region by region) or all-at-once; default: the
        /// repository's setting.
        #[arg(long)]
        strategy: Option<Strategy>,
        /// How long each wave runs healthily before the next (e.g. 30s, 5m).
        #[arg(long, value_parser = parse_ttl)]
        soak: Option<Duration>,
        /// The share of a wave's nodes (percent) that may fail before it rolls back.
        #[arg(long)]
        max_failed: Option<u8>,
        /// How long a wave may take to become healthy before the deployment rolls back.
        #[arg(long, value_parser = parse_ttl)]
        wave_timeout: Option<Duration>,
        #[arg(long, default_value = "default")]
        env: String,
        /// Wait for the deployment to finish, showing its progress.
        #[arg(long)]
        wait: bool,
    },
    /// Deployments: list, show, pause, resume.
    #[command(subcommand)]
    Deploys(DeploysCmd),
    /// Return a repository's nodes to the release they ran before (or --to one), all at
    /// once; nodes that still hold it switch without fetching.
    Rollback {
        repo: String,
        #[arg(long, value_parser = parse_release)]
        to: Option<ReleaseId>,
        #[arg(long, default_value = "default")]
        env: String,
        #[arg(long)]
        wait: bool,
    },
    /// The fleet: how many nodes in each region run which release.
    Status,
    /// Tokens new nodes exchange for their certificates.
    #[command(subcommand, name = "join-token")]
    JoinToken(JoinTokenCmd),
    /// Print the event log; --follow keeps waiting for new events.
    Events {
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Subcommand)]
pub enum ReposCmd {
    Add {
        name: String,
        #[arg(long)]
        url: String,
        #[arg(long, default_value = "main")]
        branch: String,
        #[arg(
            long,
            env = "STARLING_WEBHOOK_SECRET",
            hide_env_values = true,
            default_value = ""
        )]
        webhook_secret: String,
        /// Do not deploy successful builds automatically.
        #[arg(long)]
        no_auto_deploy: bool,
        /// Largest release a build may make (`4GiB`, `500MiB`, bytes).
        #[arg(long, default_value = "4GiB", value_parser = parse_size)]
        max_release_size: u64,
        /// How its deployments roll out: waves or all-at-once.
        #[arg(long, default_value = "waves")]
        strategy: Strategy,
        /// How long each wave runs healthily before the next.
        #[arg(long, default_value = "60s", value_parser = parse_ttl)]
        soak: Duration,
        /// The share of a wave's nodes (percent) that may fail before it rolls back.
        #[arg(long, default_value_t = 10)]
        max_failed: u8,
        /// How long a wave may take to become healthy before the deployment rolls back.
        #[arg(long, default_value = "30m", value_parser = parse_ttl)]
        wave_timeout: Duration,
        /// A URL that gets a signed JSON POST when a build or deployment of the
        /// repository ends (Slack-compatible: it has a `text` field); repeatable.
        #[arg(long)]
        notify: Vec<String>,
        /// The HMAC-SHA256 key of those POSTs (default: the webhook secret).
        #[arg(
            long,
            env = "STARLING_NOTIFY_SECRET",
            hide_env_values = true,
            default_value = ""
        )]
        notify_secret: String,
    },
    List,
}

#[derive(Subcommand)]
pub enum DeploysCmd {
    List {
        #[arg(long)]
        repo: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// A deployment's waves, history and progress.
    Show {
        id: u64,
    },
    /// Start no new wave until resumed.
    Pause {
        id: u64,
    },
    Resume {
        id: u64,
    },
}

fn parse_release(s: &str) -> Result<ReleaseId, String> {
    ReleaseId::parse(s).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
pub enum BuildsCmd {
    List {
        #[arg(long)]
        repo: Option<String>,
        #[arg(long)]
        status: Option<BuildStatus>,
        #[arg(long)]
        sha: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    Show {
        id: u64,
    },
    Cancel {
        id: u64,
    },
    /// Print a build's log; --follow keeps printing until the build ends.
    Logs {
        id: u64,
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Subcommand)]
pub enum ReleasesCmd {
    List { repo: Option<String> },
}

#[derive(Subcommand)]
pub enum JoinTokenCmd {
    /// Make a token; it is printed as the last word. Give it to nodes as
    /// STARLING_JOIN_TOKEN.
    Create {
        /// How long it is valid (e.g. 24h, 30m; at most 30 days).
        #[arg(long, default_value = "24h", value_parser = parse_ttl)]
        ttl: Duration,
    },
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    starling_proto::parse_duration(s).ok_or_else(|| format!("bad duration {s:?} (try 24h, 30m)"))
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    Status,
    /// Remove member N from the voters.
    Remove {
        id: u64,
    },
}

async fn paused(c: &ControlClient, id: u64, paused: bool, json: bool) -> Result<()> {
    let d = c.pause_deployment(id, paused).await?;
    if json {
        return print_json(&d);
    }
    println!("deployment {} is {}", d.id, d.status);
    Ok(())
}

/// Print a deployment just started; with `wait`, follow it until it ends (exit status
/// 1 unless it succeeded).
async fn started(c: &ControlClient, d: Deployment, wait: bool, json: bool) -> Result<()> {
    if !wait {
        if json {
            return print_json(&d);
        }
        println!(
            "deployment {} of {} to {} started ({}); follow it with `starling deploys show {}`",
            d.id, d.release, d.repo, d.policy.strategy, d.id
        );
        return Ok(());
    }
    let say = |line: String| {
        if !json {
            println!("{line}");
        }
    };
    let mut f = Follower::new(c, d.id, &say)?;
    loop {
        let v = f.poll().await?;
        if v.deployment.status.is_final() {
            if json {
                print_json(&v)?;
            } else {
                println!("{}", tables::deployment_summary(&v));
            }
            if v.deployment.status != DeployStatus::Succeeded {
                anyhow::bail!(
                    "deployment {} {}: {}",
                    d.id,
                    v.deployment.status,
                    v.deployment.reason.as_deref().unwrap_or("")
                );
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn parse_size(s: &str) -> Result<u64, String> {
    starling_proto::parse_size(s).ok_or_else(|| format!("bad size {s:?} (try 4GiB, 500MiB)"))
}

pub async fn run(c: &ControlClient, cmd: ClientCmd, json: bool) -> Result<()> {
    match cmd {
        ClientCmd::Repos(ReposCmd::Add {
            name,
            url,
            branch,
            webhook_secret,
            no_auto_deploy,
            max_release_size,
            strategy,
            soak,
            max_failed,
            wave_timeout,
            notify,
            notify_secret,
        }) => {
            let spec = RepoSpec {
                name,
                url,
                branch,
                webhook_secret,
                auto_deploy: !no_auto_deploy,
                max_release_bytes: max_release_size,
                notify,
                notify_secret,
                rollout: RolloutPolicy {
                    strategy,
                    soak_ms: soak.as_millis() as u64,
                    max_failed_pct: max_failed,
                    wave_timeout_ms: wave_timeout.as_millis() as u64,
                },
            };
            let repo = c.put_repo(&spec).await?;
            if json {
                print_json(&repo)?;
            } else {
                println!(
                    "repository {} registered (branch {})",
                    spec.name, spec.branch
                );
            }
        }
        ClientCmd::Repos(ReposCmd::List) => {
            let repos = c.repos().await?;
            if json {
                return print_json(&repos);
            }
            println!("{}", tables::repos(&repos).trim_fmt());
        }
        ClientCmd::Trigger { repo, sha, force } => {
            let out = c.trigger(&TriggerRequest { repo, sha, force }).await?;
            if json {
                return print_json(&out);
            }
            println!(
                "{}: build {} of {} at {}",
                out.outcome,
                out.build.id,
                out.build.repo,
                starling_proto::short(&out.build.sha)
            );
        }
        ClientCmd::Builds(BuildsCmd::List {
            repo,
            status,
            sha,
            limit,
        }) => {
            let f = BuildFilter {
                repo,
                status,
                sha,
                limit: Some(limit),
                stale: false,
            };
            let builds = c.builds(&f).await?;
            if json {
                return print_json(&builds);
            }
            println!("{}", tables::builds(&builds).trim_fmt());
        }
        ClientCmd::Builds(BuildsCmd::Show { id }) => {
            let b = c.build(id).await?;
            if json {
                return print_json(&b);
            }
            println!("{}", tables::builds(std::slice::from_ref(&b)).trim_fmt());
            println!("\nhistory:\n{}", tables::history(&b).trim_fmt());
            // A failed build's output lives in its log, which needs a token to read.
            if matches!(b.status, BuildStatus::Failed | BuildStatus::TimedOut) {
                if let Ok(log) = c.log(id, 0).await {
                    let text = String::from_utf8_lossy(&log);
                    let tail: Vec<&str> = text.lines().rev().take(20).collect();
                    println!(
                        "
last lines of its output:"
                    );
                    for l in tail.into_iter().rev() {
                        println!("  {l}");
                    }
                }
            }
        }
        ClientCmd::Builds(BuildsCmd::Cancel { id }) => {
            let b = c.cancel(id).await?;
            if json {
                return print_json(&b);
            }
            let what = if b.status == BuildStatus::Cancelled {
                "cancelled"
            } else {
                "cancel requested (the worker stops it at its next heartbeat)"
            };
            println!("build {id}: {what}");
        }
        ClientCmd::Builds(BuildsCmd::Logs { id, follow }) => {
            use std::io::Write;
            let mut offset = 0u64;
            loop {
                // Read the status first: bytes read after it include all output of an
                // ended build, since workers ship the log before reporting the end.
                let done = !follow || c.build(id).await?.status.is_terminal();
                let bytes = c.log(id, offset).await?;
                offset += bytes.len() as u64;
                std::io::stdout().write_all(&bytes)?;
                std::io::stdout().flush()?;
                if done {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        ClientCmd::Releases(ReleasesCmd::List { repo }) => {
            let rels = c.releases(repo.as_deref()).await?;
            if json {
                return print_json(&rels);
            }
            println!("{}", tables::releases(&rels).trim_fmt());
        }
        ClientCmd::Deploy {
            repo,
            release,
            strategy,
            soak,
            max_failed,
            wave_timeout,
            env,
            wait,
        } => {
            let req = DeployRequest {
                repo,
                release,
                env,
                strategy,
                soak_ms: soak.map(|d| d.as_millis() as u64),
                max_failed_pct: max_failed,
                wave_timeout_ms: wave_timeout.map(|d| d.as_millis() as u64),
            };
            let d = c.deploy(&req).await?;
            return started(c, d, wait, json).await;
        }
        ClientCmd::Rollback {
            repo,
            to,
            env,
            wait,
        } => {
            let d = c.rollback(&RollbackRequest { repo, env, to }).await?;
            return started(c, d, wait, json).await;
        }
        ClientCmd::Deploys(DeploysCmd::List { repo, limit }) => {
            let ds = c.deployments(repo.as_deref(), limit).await?;
            if json {
                return print_json(&ds);
            }
            println!("{}", tables::deployments(&ds).trim_fmt());
        }
        ClientCmd::Deploys(DeploysCmd::Show { id }) => {
            let v = c.deployment(id).await?;
            if json {
                return print_json(&v);
            }
            println!("{}", tables::deployment_summary(&v));
            println!("\n{}", tables::waves(&v).trim_fmt());
            println!("\n{}", tables::deploy_history(&v.deployment).trim_fmt());
        }
        ClientCmd::Deploys(DeploysCmd::Pause { id }) => paused(c, id, true, json).await?,
        ClientCmd::Deploys(DeploysCmd::Resume { id }) => paused(c, id, false, json).await?,
        ClientCmd::Status => {
            let nodes = c.nodes().await?;
            if json {
                return print_json(&nodes);
            }
            println!("{}", tables::fleet(&nodes).trim_fmt());
            if let Some(failed) = tables::failures(&nodes) {
                println!("\n{}", failed.trim_fmt());
            }
        }
        ClientCmd::JoinToken(JoinTokenCmd::Create { ttl }) => {
            let reply = c.create_join_token(ttl).await?;
            if json {
                return print_json(&serde_json::json!({
                    "token": reply.token,
                    "expires_at": reply.expires_at,
                }));
            }
            println!(
                "join token, valid until {}: {}",
                tables::time(Some(reply.expires_at)),
                reply.token
            );
        }
        ClientCmd::Cluster(cmd) => {
            let st = match cmd {
                ClusterCmd::Status => c.cluster().await?,
                ClusterCmd::Remove { id } => c.remove_member(id).await?,
            };
            if json {
                return print_json(&st);
            }
            let leader = st.leader.map_or_else(
                || "none (an election is under way)".into(),
                |l| format!("member {l}"),
            );
            let applied = st
                .last_applied
                .map_or_else(|| "nothing".into(), |i| format!("entry {i}"));
            println!(
                "member {} answering; leader {leader}, term {}, applied up to {applied}",
                st.id, st.term
            );
            println!("{}", tables::members(&st).trim_fmt());
        }
        ClientCmd::Events { mut after, follow } => loop {
            let wait = if follow {
                Duration::from_secs(30)
            } else {
                Duration::ZERO
            };
            let evs = c.events(after, wait).await?;
            for e in &evs {
                if json {
                    println!("{}", serde_json::to_string(e)?);
                } else {
                    println!(
                        "{:>6} {} {:<22} {} {} {}",
                        e.index,
                        tables::time(Some(e.at)),
                        e.kind,
                        e.repo.as_deref().unwrap_or("-"),
                        e.build.map(|b| format!("build {b}")).unwrap_or_default(),
                        e.detail.as_deref().unwrap_or("")
                    );
                }
                after = e.index;
            }
            if !follow {
                return Ok(());
            }
        },
    }
    Ok(())
}
