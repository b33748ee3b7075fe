//! The worker loop: lease a build, keep the lease alive, check out the commit, run the
//! build, turn its output into a release, push the release's chunks and manifest to a
//! majority of the control members' origin stores, and report the result.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use futures::FutureExt;
use starling_client::{ClientError, ControlClient};
use starling_core::build_result::{release_stored, Finish};
use starling_core::retry::backoff;
use starling_proto::{ChunkHash, CompleteRequest, HeartbeatRequest, Lease, ReleaseId, WorkerId};
use starling_release::{
    create_release_with, DirectoryChunks, ManifestsOnly, ReleaseError, ReleaseOptions,
};
use tokio::sync::watch;

use crate::runner::{run, Isolation, RunRequest};
use crate::source::{MirrorCache, SourceError};
use crate::spec::{self, SPEC_FILE};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub slots: usize,
    /// The uid and gid builds run as when the worker is root (default: `nobody`).
    pub build_user: (u32, u32),
    pub metrics: Arc<crate::metrics::WorkerMetrics>,
}

struct Shared {
    cfg: WorkerConfig,
    control: ControlClient,
    mirrors: MirrorCache,
    isolation: Isolation,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("data directory {}: {source}", dir.display())]
    DataDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} build slots ended abnormally")]
    SlotsLost(usize),
    #[error("worker name: {0}")]
    Name(#[from] starling_proto::NameError),
}

/// Why a build's output directory cannot be packed.
#[derive(Debug, thiserror::Error)]
enum OutputError {
    #[error("checkout {}: {source}", dir.display())]
    Checkout {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("output directory {output:?}: {source}")]
    Missing {
        output: String,
        source: std::io::Error,
    },
    #[error("output directory {output:?} resolves to {}, outside the checkout", resolved.display())]
    Outside { output: String, resolved: PathBuf },
}

/// Run `cfg.slots` build slots until `stop` turns true; running builds finish first.
pub async fn run_worker(
    mut cfg: WorkerConfig,
    control: ControlClient,
    stop: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    // git and the builds run in other directories: every path must be absolute.
    cfg.data_dir = std::path::absolute(&cfg.data_dir).map_err(|e| WorkerError::DataDir {
        dir: cfg.data_dir.clone(),
        source: e,
    })?;
    // Slots are named `<name>/<slot>`.
    WorkerId::new(&format!("{}/{}", cfg.name, cfg.slots))?;
    let isolation = Isolation::detect(cfg.build_user);
    prepare_data_dir(&cfg.data_dir, isolation).map_err(|e| WorkerError::DataDir {
        dir: cfg.data_dir.clone(),
        source: e,
    })?;
    match isolation {
        Isolation::ProcessGroup { user: None } => tracing::warn!(
            "builds run in a process group only: this kernel allows no namespaces to this user, so a build can read what the worker's user can read and a setsid process can outlive it; run the worker as root to isolate builds"
        ),
        Isolation::ProcessGroup { user: Some(_) } => tracing::warn!(
            %isolation,
            "no PID namespace here: builds run as the build user, but a setsid process can outlive its build"
        ),
        _ => tracing::info!(%isolation, "builds are isolated"),
    }
    let shared = Arc::new(Shared {
        mirrors: MirrorCache::new(cfg.data_dir.join("mirrors")),
        control,
        cfg,
        isolation,
    });
    let mut slots = Vec::new();
    for slot in 0..shared.cfg.slots.max(1) {
        let (shared, stop) = (shared.clone(), stop.clone());
        slots.push(tokio::spawn(
            async move { slot_loop(shared, slot, stop).await },
        ));
    }
    let mut lost = 0;
    for s in slots {
        if let Err(e) = s.await {
            tracing::error!(error = %e, "a build slot ended abnormally");
            lost += 1;
        }
    }
    if lost > 0 {
        return Err(WorkerError::SlotsLost(lost));
    }
    Ok(())
}

/// The data directory's layout and modes. Builds may run as another user: they can pass
/// through the data directory to their own build directory but list nothing, and the
/// mirrors (other repositories' sources) stay the worker's alone.
fn prepare_data_dir(dir: &Path, isolation: Isolation) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // Build directories a killed worker left behind (their leases have lapsed), and the
    // staging packs of versions that copied chunks before publishing them.
    for leftover in ["staging", "builds"] {
        match std::fs::remove_dir_all(dir.join(leftover)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    if isolation.build_user().is_some() {
        // The build user must be able to reach its build directory by its path.
        for a in dir.ancestors().skip(1) {
            use std::os::unix::fs::MetadataExt;
            if a.metadata().is_ok_and(|m| m.mode() & 0o001 == 0) {
                return Err(std::io::Error::other(format!(
                    "builds run as another user, who cannot pass through {} (chmod o+x it, or choose another --data-dir)",
                    a.display()
                )));
            }
        }
    }
    let traverse = if isolation.build_user().is_some() {
        0o711
    } else {
        0o700
    };
    for (sub, mode) in [("", traverse), ("builds", traverse), ("mirrors", 0o700)] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d)?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

async fn slot_loop(shared: Arc<Shared>, slot: usize, stop: watch::Receiver<bool>) {
    use backon::BackoffBuilder;
    // The name was checked when the worker started.
    let worker = WorkerId::from(format!("{}/{slot}", shared.cfg.name).as_str());
    let mut delays = backoff().build();
    while !*stop.borrow() {
        let leased = shared.control.lease(&worker, Duration::from_secs(20)).await;
        if leased.is_ok() {
            delays = backoff().build();
        }
        match leased {
            Ok(Some(lease)) => {
                // A bug in a build's handling must not take the slot with it: the build
                // fails with what happened, and the slot takes the next one.
                let ran = std::panic::AssertUnwindSafe(build_one(&shared, &worker, lease.clone()))
                    .catch_unwind()
                    .await;
                if let Err(panic) = ran {
                    let what = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("a panic");
                    tracing::error!(
                        build = lease.build.id,
                        panic = what,
                        "build slot panicked; the slot goes on"
                    );
                    let finish = Finish::failed(format!("worker error: {what}"));
                    complete(&shared, &worker, &lease, finish, &AtomicBool::new(false)).await;
                }
            }
            Ok(None) => {}
            Err(e) => {
                let after = delays.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(%worker, error = %e, ?after, "lease failed; retrying");
                tokio::time::sleep(after).await;
            }
        }
    }
}

/// Why a build stopped before it ended by its own doing.
enum Abandon {
    /// The lease went to someone else (it lapsed while the control plane was unreachable):
    /// the build is theirs now, or back in the queue.
    LeaseLost,
}

/// Errors worth retrying: the control plane was unreachable, busy or mid-election.
/// 507 (an origin store over its quota) is final.
fn transient(e: &ClientError) -> bool {
    match e {
        ClientError::Unreachable { .. } | ClientError::Decode { .. } => true,
        ClientError::Api { status, .. } => *status >= 500 && *status != 507,
        ClientError::Setup(_) | ClientError::Tls(_) | ClientError::NoMember => false,
    }
}

#[tracing::instrument(skip_all, fields(build = lease.build.id, repo = %lease.build.repo, sha = %lease.build.sha, attempt = lease.attempt))]
async fn build_one(shared: &Shared, worker: &WorkerId, lease: Lease) {
    let build = lease.build.clone();
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let lost = Arc::new(AtomicBool::new(false));
    // Heartbeats well inside the lease; a cancel or a lost lease stops the run.
    let beat = {
        let control = shared.control.clone();
        let lost = lost.clone();
        let req = HeartbeatRequest {
            worker: worker.clone(),
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
                    Err(ClientError::Api { status: 409, .. }) => {
                        tracing::warn!("lease lost; stopping the build");
                        lost.store(true, Ordering::SeqCst);
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
    let started = std::time::Instant::now();
    let finish = {
        let _running = shared.cfg.metrics.running();
        execute(shared, &lease, &dir, cancel_rx, &lost).await
    };
    let _ = std::fs::remove_dir_all(&dir);
    match finish {
        Ok(finish) => {
            tracing::info!(status = %finish.status, release = ?finish.release, "build finished");
            shared
                .cfg
                .metrics
                .finished(finish.status, started.elapsed());
            complete(shared, worker, &lease, finish, &lost).await;
        }
        Err(Abandon::LeaseLost) => tracing::warn!("build abandoned: its lease was lost"),
    }
    beat.abort();
}

/// Report the end of a build, retrying while the control plane is unreachable and the
/// lease holds; a refusal (the lease was lost) is final.
async fn complete(
    shared: &Shared,
    worker: &WorkerId,
    lease: &Lease,
    finish: Finish,
    lost: &AtomicBool,
) {
    let req = CompleteRequest {
        worker: worker.clone(),
        attempt: lease.attempt,
        status: finish.status,
        release: finish.release,
        reason: finish.reason.map(|r| starling_proto::redact::text(&r)),
    };
    let sent = (|| shared.control.complete(lease.build.id, &req))
        .retry(backoff())
        .when(|e| transient(e) && !lost.load(Ordering::SeqCst))
        .notify(|e, after| tracing::warn!(error = %e, ?after, "completion failed; retrying"))
        .await;
    if let Err(e) = sent {
        tracing::warn!(error = %e, "completion not recorded");
    }
}

async fn execute(
    shared: &Shared,
    lease: &Lease,
    dir: &Path,
    cancel: watch::Receiver<bool>,
    lost: &AtomicBool,
) -> Result<Finish, Abandon> {
    let b = &lease.build;
    inject_panic(&b.repo);
    let src = dir.join("src");
    let home = dir.join("home");
    if lease.url.is_empty() {
        return Ok(Finish::failed(
            "the lease names no repository URL (a control member older than this worker?)",
        ));
    }
    if let Err(e) = shared.mirrors.checkout(&lease.url, &b.sha, &src).await {
        return Ok(Finish::failed(match e {
            SourceError::NoSuchCommit { .. } => e.to_string(),
            other => format!("checkout: {other}"),
        }));
    }
    if let Err(e) = hand_over(dir, &home, shared.isolation.build_user()) {
        return Ok(Finish::failed(format!(
            "preparing the build directory: {e}"
        )));
    }
    let spec_text = match std::fs::read_to_string(src.join(SPEC_FILE)) {
        Ok(t) => t,
        Err(e) => return Ok(Finish::failed(format!("{SPEC_FILE}: {e}"))),
    };
    let spec = match spec::parse(&spec_text) {
        Ok(s) => s,
        Err(e) => return Ok(Finish::failed(e.to_string())),
    };
    let mut env: Vec<(String, String)> = spec.env.clone().into_iter().collect();
    env.push(("HOME".into(), home.display().to_string()));
    env.push(("STARLING_REPO".into(), b.repo.clone()));
    env.push(("STARLING_SHA".into(), b.sha.clone()));
    env.push(("STARLING_BUILD_ID".into(), b.id.to_string()));
    let req = RunRequest {
        command: spec.command.clone(),
        dir: src.clone(),
        env,
        timeout: spec.timeout,
        tail_cap: 64 * 1024,
        isolation: shared.isolation,
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
    if lost.load(Ordering::SeqCst) {
        return Err(Abandon::LeaseLost);
    }
    let result = match ran {
        Ok(r) => r,
        Err(e) => return Ok(Finish::failed(format!("starting the build command: {e}"))),
    };
    if let Some(finish) = Finish::of_run(&result.outcome, spec.timeout, b.id) {
        return Ok(finish);
    }
    let output = match resolve_output(&src, &spec.output) {
        Ok(o) => o,
        Err(e) => return Ok(Finish::failed(e.to_string())),
    };
    // The chunks stay in the output directory: the release is planned and hashed there,
    // and each chunk a member lacks is read back from it (and checked) as it is sent.
    // The size limit is checked before anything is read: an oversized release leaves no
    // trace.
    let opts = ReleaseOptions {
        max_bytes: lease.max_release_bytes,
        run: spec.deploy.clone(),
        ..ReleaseOptions::default()
    };
    let made = {
        let output = output.clone();
        tokio::task::spawn_blocking(move || {
            create_release_with(&output, &ManifestsOnly::default(), opts)
        })
        .await
    };
    let (id, manifest, _) = match made {
        Ok(Ok(m)) => m,
        Ok(Err(e @ ReleaseError::TooLarge { .. })) => {
            return Ok(Finish::failed(format!(
                "{e}: over this repository's limit; raise it with starling repos add --max-release-size"
            )))
        }
        Ok(Err(e)) => return Ok(Finish::failed(format!("making the release: {e}"))),
        Err(e) => return Ok(Finish::failed(format!("making the release: {e}"))),
    };
    let chunks = match DirectoryChunks::new(&output, &manifest) {
        Ok(c) => Arc::new(c),
        Err(e) => return Ok(Finish::failed(format!("reading the release back: {e}"))),
    };
    // Publishing is retried while the lease holds: a control-plane election or a member
    // restart is not the build's fault.
    let published = (|| publish(shared, &chunks, &id, &manifest))
        .retry(backoff())
        .when(|e| e.transient && !lost.load(Ordering::SeqCst))
        .notify(
            |e, after| tracing::warn!(error = %e.message, ?after, "publishing failed; retrying"),
        )
        .await;
    if lost.load(Ordering::SeqCst) {
        return Err(Abandon::LeaseLost);
    }
    if let Err(e) = published {
        return Ok(Finish::failed(format!(
            "storing the release in the origin store: {}",
            e.message
        )));
    }
    Ok(Finish::succeeded(id))
}

/// Test-only switch (feature `fault-injection`): builds of the repository named by
/// `STARLING_FAULT_PANIC_IN_BUILD` panic, to show that a slot survives its build's panic.
#[cfg(feature = "fault-injection")]
fn inject_panic(repo: &str) {
    if std::env::var("STARLING_FAULT_PANIC_IN_BUILD").is_ok_and(|r| r == repo) {
        panic!("injected panic in a build of {repo}");
    }
}

#[cfg(not(feature = "fault-injection"))]
fn inject_panic(_repo: &str) {}

/// The output directory, resolved through any symbolic links, which must lie inside the
/// checkout: `ln -s / root` with `output = "root/etc"` must not pack the host's files.
/// If it is the checkout itself, the build's `.git` is left out.
fn resolve_output(src: &Path, output: &str) -> Result<PathBuf, OutputError> {
    let root = src.canonicalize().map_err(|source| OutputError::Checkout {
        dir: src.to_path_buf(),
        source,
    })?;
    let out = src
        .join(output)
        .canonicalize()
        .map_err(|source| OutputError::Missing {
            output: output.to_string(),
            source,
        })?;
    if !out.starts_with(&root) {
        return Err(OutputError::Outside {
            output: output.to_string(),
            resolved: out,
        });
    }
    if out == root {
        let _ = std::fs::remove_dir_all(root.join(".git"));
    }
    Ok(out)
}

/// Give the build directory to the build user (when builds run as one): the checkout and
/// a home directory, nothing else.
fn hand_over(dir: &Path, home: &Path, user: Option<(u32, u32)>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(home)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    if let Some((uid, gid)) = user {
        chown_tree(dir, uid, gid)?;
    }
    Ok(())
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// A failed publication, and whether trying again may help.
#[derive(Debug)]
struct PublishError {
    message: String,
    transient: bool,
}

impl From<ClientError> for PublishError {
    fn from(e: ClientError) -> Self {
        PublishError {
            transient: transient(&e),
            message: e.to_string(),
        }
    }
}

/// Push the chunks each control member lacks, then the manifest; a majority must take it.
async fn publish(
    shared: &Shared,
    chunks: &Arc<DirectoryChunks>,
    id: &ReleaseId,
    manifest: &starling_proto::release::Manifest,
) -> Result<(), PublishError> {
    let cluster = shared.control.cluster().await?;
    let members = cluster.members.len();
    let mut ok = 0;
    let mut last: Option<(u64, PublishError)> = None;
    for m in &cluster.members {
        let client = shared.control.member(&m.addr);
        match push_to(chunks, &client, id, manifest, &shared.cfg.metrics).await {
            Ok(()) => ok += 1,
            Err(e) => last = Some((m.id, e)),
        }
    }
    if release_stored(ok, members) {
        return Ok(());
    }
    let (member, e) = last.unwrap_or((
        0,
        PublishError {
            message: "no members".into(),
            transient: true,
        },
    ));
    Err(PublishError {
        message: format!(
            "only {ok} of {members} members took the release; member {member}: {}",
            e.message
        ),
        transient: e.transient,
    })
}

async fn push_to(
    chunks: &Arc<DirectoryChunks>,
    client: &ControlClient,
    id: &ReleaseId,
    manifest: &starling_proto::release::Manifest,
    metrics: &crate::metrics::WorkerMetrics,
) -> Result<(), PublishError> {
    // Each distinct chunk once, even if the release repeats it.
    let mut names: Vec<ChunkHash> = manifest.chunks.iter().map(|c| c.hash).collect();
    names.sort_unstable();
    names.dedup();
    let missing = client.missing_chunks(&names).await?;
    for hash in &missing {
        let bytes = read_chunk(chunks, hash).await?;
        let len = bytes.len();
        client.put_chunk(hash, bytes).await?;
        metrics.pushed(len);
    }
    tracing::info!(
        release = %id,
        chunks = names.len(),
        sent = missing.len(),
        member = client.base(),
        "published"
    );
    let encoded = manifest.encode().map_err(|e| PublishError {
        message: e.to_string(),
        transient: false,
    })?;
    client.put_manifest(id, encoded).await?;
    Ok(())
}

/// A chunk from the output directory, read off the async threads.
async fn read_chunk(
    chunks: &Arc<DirectoryChunks>,
    hash: &ChunkHash,
) -> Result<Vec<u8>, PublishError> {
    let (chunks, h) = (chunks.clone(), *hash);
    let read = tokio::task::spawn_blocking(move || chunks.get_chunk(&h))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    read.map_err(|e| PublishError {
        message: format!("reading chunk {hash} from the output: {e}"),
        transient: false,
    })
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
            let client = control.member(addr);
            match client
                .append_log(build, from as u64, log[from..].to_vec())
                .await
            {
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
