//! The worker loop: lease a build, keep the lease alive, check out the commit, run the
//! build, turn its output into a release, push the release's chunks and manifest to a
//! majority of the control members' origin stores, and report the result.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use starling_client::ControlClient;
use starling_proto::{Build, BuildStatus, CompleteRequest, HeartbeatRequest, Lease};
use starling_release::{create_release, ChunkSizes, ChunkStore, PackStore};
use tokio::sync::watch;

use crate::runner::{run, RunOutcome, RunRequest};
use crate::source::{MirrorCache, SourceError};
use crate::spec::{self, SPEC_FILE};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub slots: usize,
}

/// Bytes of build output kept with a failed build's reason.
const TAIL_IN_REASON: usize = 2048;

struct Shared {
    cfg: WorkerConfig,
    control: ControlClient,
    mirrors: MirrorCache,
    /// Where each build's chunks wait in a [`PackStore`] until they are published.
    staging: PathBuf,
}

/// Run `cfg.slots` build slots until `stop` turns true; running builds finish first.
pub async fn run_worker(
    cfg: WorkerConfig,
    control: ControlClient,
    stop: watch::Receiver<bool>,
) -> Result<(), String> {
    // Packs of builds a killed worker left behind: their leases have lapsed or will.
    let staging = cfg.data_dir.join("staging");
    let _ = std::fs::remove_dir_all(&staging);
    let shared = Arc::new(Shared {
        mirrors: MirrorCache::new(cfg.data_dir.join("mirrors")),
        staging,
        control,
        cfg,
    });
    let mut slots = Vec::new();
    for slot in 0..shared.cfg.slots.max(1) {
        let (shared, stop) = (shared.clone(), stop.clone());
        slots.push(tokio::spawn(
            async move { slot_loop(shared, slot, stop).await },
        ));
    }
    for s in slots {
        let _ = s.await;
    }
    Ok(())
}

async fn slot_loop(shared: Arc<Shared>, slot: usize, stop: watch::Receiver<bool>) {
    let worker = format!("{}/{slot}", shared.cfg.name);
    while !*stop.borrow() {
        match shared.control.lease(&worker, Duration::from_secs(20)).await {
            Ok(Some(lease)) => build_one(&shared, &worker, lease).await,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(%worker, error = %e, "lease failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The result a build ends with.
struct Finish {
    status: BuildStatus,
    release: Option<String>,
    reason: Option<String>,
}

impl Finish {
    fn failed(reason: impl Into<String>) -> Self {
        Finish {
            status: BuildStatus::Failed,
            release: None,
            reason: Some(reason.into()),
        }
    }
}

#[tracing::instrument(skip_all, fields(build = lease.build.id, repo = %lease.build.repo, sha = %lease.build.sha, attempt = lease.attempt))]
async fn build_one(shared: &Shared, worker: &str, lease: Lease) {
    let build = lease.build.clone();
    let (cancel_tx, cancel_rx) = watch::channel(false);
    // Heartbeats well inside the lease; a cancel or a lost lease stops the run.
    let beat = {
        let control = shared.control.clone();
        let req = HeartbeatRequest {
            worker: worker.to_string(),
            attempt: lease.attempt,
        };
        // At most every 2 s, so that a cancel reaches the build within a few seconds.
        let every = Duration::from_millis((lease.lease_ttl_ms / 3).clamp(100, 2000));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match control.heartbeat(build.id, &req).await {
                    Ok(r) if r.cancel => {
                        let _ = cancel_tx.send(true);
                    }
                    Ok(_) => {}
                    Err(starling_client::ClientError::Api { status: 409, .. }) => {
                        tracing::warn!("lease lost; stopping the build");
                        let _ = cancel_tx.send(true);
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
        })
    };
    let name = format!("{}-{}", build.id, lease.attempt);
    let dir = shared.cfg.data_dir.join("builds").join(&name);
    let pack = shared.staging.join(format!("{name}.pack"));
    let finish = execute(shared, &lease.build, &dir, &pack, cancel_rx).await;
    beat.abort();
    let _ = std::fs::remove_dir_all(&dir);
    tracing::info!(status = %finish.status, release = ?finish.release, "build finished");
    let req = CompleteRequest {
        worker: worker.to_string(),
        attempt: lease.attempt,
        status: finish.status,
        release: finish.release,
        reason: finish.reason,
    };
    // Retry a completion the control plane did not hear; a refusal (lease lost) is final.
    for _ in 0..10 {
        match shared.control.complete(lease.build.id, &req).await {
            Ok(_) => return,
            Err(starling_client::ClientError::Api { status, message }) if status < 500 => {
                tracing::warn!(status, %message, "completion refused");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "completion failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn execute(
    shared: &Shared,
    b: &Build,
    dir: &std::path::Path,
    pack: &std::path::Path,
    cancel: watch::Receiver<bool>,
) -> Finish {
    let repos = match shared.control.repos().await {
        Ok(r) => r,
        Err(e) => return Finish::failed(format!("cannot read repository settings: {e}")),
    };
    let Some(repo) = repos.into_iter().find(|r| r.name == b.repo) else {
        return Finish::failed(format!("repository {} is no longer registered", b.repo));
    };
    let src = dir.join("src");
    if let Err(e) = shared
        .mirrors
        .checkout(&b.repo, &repo.url, &b.sha, &src)
        .await
    {
        return Finish::failed(match e {
            SourceError::NoSuchCommit { .. } => e.to_string(),
            other => format!("checkout: {other}"),
        });
    }
    let spec_text = match std::fs::read_to_string(src.join(SPEC_FILE)) {
        Ok(t) => t,
        Err(e) => return Finish::failed(format!("{SPEC_FILE}: {e}")),
    };
    let spec = match spec::parse(&spec_text) {
        Ok(s) => s,
        Err(e) => return Finish::failed(e.to_string()),
    };
    let mut env: Vec<(String, String)> = spec.env.clone().into_iter().collect();
    env.push(("STARLING_REPO".into(), b.repo.clone()));
    env.push(("STARLING_SHA".into(), b.sha.clone()));
    env.push(("STARLING_BUILD_ID".into(), b.id.to_string()));
    let req = RunRequest {
        command: spec.command.clone(),
        dir: src.clone(),
        env,
        timeout: spec.timeout,
        tail_cap: 64 * 1024,
    };
    let (out_tx, out_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let shipper = tokio::spawn(ship_log(shared.control.clone(), b.id, out_rx));
    let ran = run(&req, cancel, |bytes| {
        let _ = out_tx.send(bytes.to_vec());
    })
    .await;
    drop(out_tx);
    // The log is complete on the members before the build is reported finished.
    let _ = shipper.await;
    let result = match ran {
        Ok(r) => r,
        Err(e) => return Finish::failed(format!("starting the build command: {e}")),
    };
    let tail = String::from_utf8_lossy(&result.tail);
    let tail = &tail[tail.len().saturating_sub(TAIL_IN_REASON)..];
    match result.outcome {
        RunOutcome::TimedOut => {
            return Finish {
                status: BuildStatus::TimedOut,
                release: None,
                reason: Some(format!("timed out after {:?}", spec.timeout)),
            }
        }
        RunOutcome::Cancelled => {
            return Finish {
                status: BuildStatus::Cancelled,
                release: None,
                reason: Some("cancelled".into()),
            }
        }
        RunOutcome::Exited { code, signal } if !result.outcome.success() => {
            let how = match (code, signal) {
                (Some(c), _) => format!("exit code {c}"),
                (None, Some(s)) => format!("killed by signal {s}"),
                _ => "ended abnormally".into(),
            };
            return Finish::failed(format!("build command failed ({how}); log tail:\n{tail}"));
        }
        RunOutcome::Exited { .. } => {}
    }
    let output = src.join(&spec.output);
    // Dropped (and its file removed) when this build is done, published or not.
    let pack = match PackStore::create(pack) {
        Ok(p) => p,
        Err(e) => return Finish::failed(format!("staging the release: {e}")),
    };
    let made =
        tokio::task::block_in_place(|| create_release(&output, &pack, ChunkSizes::default()));
    let (id, manifest, _) = match made {
        Ok(m) => m,
        Err(e) => return Finish::failed(format!("making the release: {e}")),
    };
    if let Err(e) = publish(shared, &pack, &id, &manifest).await {
        return Finish::failed(format!("storing the release in the origin store: {e}"));
    }
    Finish {
        status: BuildStatus::Succeeded,
        release: Some(id),
        reason: None,
    }
}

/// Push the chunks each control member lacks, then the manifest; a majority must take it.
async fn publish(
    shared: &Shared,
    pack: &PackStore,
    id: &str,
    manifest: &starling_proto::release::Manifest,
) -> Result<(), String> {
    let cluster = shared.control.cluster().await.map_err(|e| e.to_string())?;
    let members = cluster.members.len();
    let mut ok = 0;
    let mut last_err = String::new();
    for m in &cluster.members {
        let client = shared.control.with_base(&format!("http://{}", m.addr));
        match push_to(pack, &client, id, manifest).await {
            Ok(()) => ok += 1,
            Err(e) => last_err = format!("member {}: {e}", m.id),
        }
    }
    if ok * 2 > members {
        Ok(())
    } else {
        Err(format!(
            "only {ok} of {members} members took the release; {last_err}"
        ))
    }
}

async fn push_to(
    pack: &PackStore,
    client: &ControlClient,
    id: &str,
    manifest: &starling_proto::release::Manifest,
) -> Result<(), String> {
    // Each distinct chunk once, even if the release repeats it.
    let mut names: Vec<String> = manifest.chunks.iter().map(|c| c.hash.clone()).collect();
    names.sort_unstable();
    names.dedup();
    let missing = client
        .missing_chunks(&names)
        .await
        .map_err(|e| e.to_string())?;
    for hash in &missing {
        let bytes = pack.get_chunk(hash).map_err(|e| e.to_string())?;
        client
            .put_bytes(&format!("/v1/chunks/{hash}"), bytes)
            .await
            .map_err(|e| e.to_string())?;
    }
    tracing::info!(
        release = id,
        chunks = names.len(),
        sent = missing.len(),
        member = client.base(),
        "published"
    );
    client
        .put_bytes(&format!("/v1/manifests/{id}"), manifest.encode())
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Log bytes a worker keeps to ship: one more than the members keep, so that they see the
/// cap is passed and say so.
const SHIP_CAP: usize = 1024 * 1024 + 1;

/// Stream build output to every member twice a second until the output ends; each member
/// gets the bytes from where it is, so one that missed a round catches up on the next.
async fn ship_log(
    control: ControlClient,
    build: u64,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let mut log: Vec<u8> = Vec::new();
    let mut acked: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut members: Vec<String> = Vec::new();
    let mut open = true;
    while open {
        let tick = tokio::time::sleep(Duration::from_millis(500));
        tokio::pin!(tick);
        loop {
            tokio::select! {
                more = rx.recv() => match more {
                    Some(bytes) => {
                        let room = SHIP_CAP.saturating_sub(log.len());
                        log.extend_from_slice(&bytes[..bytes.len().min(room)]);
                    }
                    None => { open = false; break; }
                },
                _ = &mut tick => break,
            }
        }
        // Membership is asked once, and again only after a member failed to take bytes.
        if members.is_empty() {
            if let Ok(cluster) = control.cluster().await {
                members = cluster.members.into_iter().map(|m| m.addr).collect();
            }
        }
        let mut failed = false;
        for addr in &members {
            let from = acked.get(addr).copied().unwrap_or(0);
            if from >= log.len() {
                continue;
            }
            let client = control.with_base(&format!("http://{addr}"));
            let path = format!("/v1/builds/{build}/logs?offset={from}");
            match client.put_bytes(&path, log[from..].to_vec()).await {
                Ok(_) => {
                    acked.insert(addr.clone(), log.len());
                }
                Err(_) => failed = true,
            }
        }
        if failed {
            members.clear();
        }
    }
}
