//! The state machine, persisted in the member's redb file beside the Raft log
//! ([`crate::log_store`]); the tables both use are in `tables.rs`.
//!
//! `apply` changes [`ControlState`] in memory, answers, and queues the records the batch
//! touched to a writer thread, which commits them with `last_applied` in one transaction,
//! fsyncing about once a second: if a crash comes first, openraft re-applies the committed
//! entries after the durable `last_applied`.
//! The state file is the snapshot: taking one makes it durable up to the snapshot's last
//! entry, and a follower that needs one is sent an image of it ([`crate::image`]).

use std::io;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, RwLock};

use futures::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use redb::{Database, Durability, ReadableDatabase, TableDefinition};
use starling_proto::{Build, Deployment, Event, Outcome, Release, ReleaseId};
use tokio::sync::{oneshot, watch};

use crate::archive::{Archive, Pending};
use crate::image::StateImage;
use crate::metrics::ControlMetrics;
use crate::tables::*;
use crate::TypeConfig;
use starling_core::state::{ControlState, Records, Touched};

/// The encoding of what a member's files hold: JSON of openraft entries carrying
/// [`starling_proto::Command`]s (pinned by `proto/tests/command_encoding.rs`) and JSON
/// records. Raised only when a file written before could no longer be read as it is;
/// then a member refuses the old file instead of misreading it.
///
/// Format 2 keeps only the working set in the state file's record tables and moves
/// older history to archive tables ([`crate::archive`]). A format 1 file is upgraded on
/// open: loading it brings it within the history window, which moves the rest.
pub const FILE_FORMAT: u32 = 2;

/// A member's redb files, each with its own write lock and fsyncs (the Raft log is not
/// one of them: it is a write-ahead log of its own, [`crate::log_store`]):
/// - `state.redb`: the state machine's records — fsynced about once a second, because a
///   crash only costs re-applying the log from its `last_applied`;
/// - `snapshots.redb`: where starling before format 2 kept snapshots; read on open only.
pub struct Files {
    pub state: Arc<Database>,
    pub snapshots: Arc<Database>,
}

impl Files {
    pub fn open(dir: &Path) -> io::Result<Files> {
        std::fs::create_dir_all(dir)?;
        let files = Files {
            state: open_file(
                &dir.join("state.redb"),
                STATE_CACHE,
                &[BUILDS, EVENTS, REQUESTS, DEPLOYMENTS],
                &[
                    META,
                    REPOS,
                    RELEASES,
                    GOALS,
                    CLUSTER,
                    JOIN_TOKENS,
                    NOTIFIER,
                    HISTORY,
                ],
            )?,
            snapshots: open_file(&dir.join("snapshots.redb"), 1 << 20, &[], &[META])?,
        };
        let txn = files.state.begin_write().map_err(io::Error::other)?;
        crate::archive::create_tables(&txn)?;
        txn.commit().map_err(io::Error::other)?;
        for (name, db) in [
            ("state.redb", &files.state),
            ("snapshots.redb", &files.snapshots),
        ] {
            check_format(db, name)?;
        }
        Ok(files)
    }
}

/// Refuse a file written in another format; mark a file without one (new, or written
/// before formats were recorded, which is format 1) as [`FILE_FORMAT`].
fn check_format(db: &Database, name: &str) -> io::Result<()> {
    match read_meta::<u32>(db, K_FORMAT)? {
        Some(FILE_FORMAT) => Ok(()),
        Some(1) => {
            tracing::info!(file = name, "upgrading from format 1 to {FILE_FORMAT}");
            mark_format(db)
        }
        Some(other) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{name} is in format {other}; this starling reads format {FILE_FORMAT}"),
        )),
        None => mark_format(db),
    }
}

fn mark_format(db: &Database) -> io::Result<()> {
    let txn = db.begin_write().map_err(io::Error::other)?;
    {
        let mut m = txn.open_table(META).map_err(io::Error::other)?;
        m.insert(K_FORMAT, enc(&FILE_FORMAT)?.as_slice())
            .map_err(io::Error::other)?;
    }
    txn.commit().map_err(io::Error::other)
}

/// How much of the state file redb may cache in memory (its default is 1 GiB a file): it
/// is read by history queries, whose indexes keep the pages they touch few.
const STATE_CACHE: usize = 64 << 20;

/// Open or create `path` with the given tables, so that readers never meet a missing one.
fn open_file(
    path: &Path,
    cache: usize,
    by_number: &[TableDefinition<u64, &[u8]>],
    by_name: &[TableDefinition<&str, &[u8]>],
) -> io::Result<Arc<Database>> {
    let db = Database::builder()
        .set_cache_size(cache)
        .create(path)
        .map_err(io::Error::other)?;
    let txn = db.begin_write().map_err(io::Error::other)?;
    for t in by_number {
        txn.open_table(*t).map_err(io::Error::other)?;
    }
    for t in by_name {
        txn.open_table(*t).map_err(io::Error::other)?;
    }
    txn.commit().map_err(io::Error::other)?;
    Ok(Arc::new(db))
}

/// The snapshot an earlier starling stored beside the state file (JSON of the records).
fn load_snapshot(db: &Database) -> io::Result<Option<(SnapshotMetaOf<TypeConfig>, Vec<u8>)>> {
    let Some(meta) = read_meta(db, K_SNAPSHOT_META)? else {
        return Ok(None);
    };
    let txn = db.begin_read().map_err(io::Error::other)?;
    let t = txn.open_table(META).map_err(io::Error::other)?;
    let data = t
        .get(K_SNAPSHOT_DATA)
        .map_err(io::Error::other)?
        .map(|v| v.value().to_vec())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "snapshot meta without data"))?;
    Ok(Some((meta, data)))
}

/// Builds a snapshot: makes the state file durable up to the snapshot's last entry. The
/// state file is the snapshot ([`crate::image`]), so this costs the same at any history.
pub struct SnapshotBuilder {
    sync: StateSync,
    metrics: Arc<ControlMetrics>,
}

/// Makes the state file durable on demand: for a snapshot, and for a member stopping.
#[derive(Clone)]
pub struct StateSync(mpsc::Sender<SmWrite>);

impl StateSync {
    /// Commit everything applied so far durably; a read transaction of that commit.
    pub async fn durable(&self) -> io::Result<Arc<redb::ReadTransaction>> {
        let stopped = || io::Error::other("the state-machine writer thread has stopped");
        let (done, wait) = oneshot::channel();
        self.0.send(SmWrite::Durable(done)).map_err(|_| stopped())?;
        wait.await.map_err(|_| stopped())
    }
}

/// The first storage failure of this member. Once one is recorded the member must stop
/// (fail-stop, as etcd does when its WAL cannot be written): its state file no longer
/// follows its log, and only a restart — which replays the log from the last durable
/// `last_applied` — makes them agree again.
#[derive(Debug, Default)]
pub struct StorageFault(std::sync::OnceLock<String>);

impl StorageFault {
    pub fn record(&self, what: String) {
        let _ = self.0.set(what);
    }

    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

/// Shared view of the applied state, for the API's reads. Never held across an await.
pub type SharedState = Arc<RwLock<ControlState>>;

/// The state machine: [`ControlState`] in memory, its records in redb.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    snapshots: Arc<Database>,
    state: SharedState,
    last_applied: Option<LogIdOf<TypeConfig>>,
    membership: StoredMembershipOf<TypeConfig>,
    /// The index of the newest event, for long-polls.
    events_tx: Arc<watch::Sender<u64>>,
    writer: mpsc::Sender<SmWrite>,
    fault: Arc<StorageFault>,
    metrics: Arc<ControlMetrics>,
    /// Archived records the writer has not committed yet.
    pending: Arc<Mutex<Pending>>,
}

/// Work for the state machine's writer thread.
enum SmWrite {
    /// Records one apply batch touched, with the `last_applied` and membership after it.
    Rows {
        rows: Box<Rows>,
        applied: Vec<u8>,
        membership: Vec<u8>,
    },
    /// Answered once everything queued before it is committed.
    Barrier(oneshot::Sender<()>),
    /// Commit durably, then answer with a read transaction of exactly that commit.
    Durable(oneshot::Sender<Arc<redb::ReadTransaction>>),
    /// Make everything written so far durable.
    Sync,
}

/// How often the state file is made durable; between those commits a crash costs only a
/// longer log replay.
const STATE_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// How long apply batches' rows gather before they are committed together. One write at a
/// time otherwise costs every member a redb commit per write, a sixth of its CPU, for
/// nothing: memory serves the records, and the log would replay them after a crash.
const ROWS_WINDOW: std::time::Duration = std::time::Duration::from_millis(10);

/// Test-only switch (feature `fault-injection`): state writes fail once this many batches
/// were written (`STARLING_FAULT_STATE_WRITES_AFTER`), read once when the writer starts.
#[cfg(feature = "fault-injection")]
fn writes_fail_after() -> Option<u64> {
    std::env::var("STARLING_FAULT_STATE_WRITES_AFTER")
        .ok()?
        .parse()
        .ok()
}

#[cfg(not(feature = "fault-injection"))]
fn writes_fail_after() -> Option<u64> {
    None
}

/// A commit made durable (fsynced) or only visible to later transactions.
fn fsync_if(durable: bool) -> Durability {
    if durable {
        Durability::Immediate
    } else {
        Durability::None
    }
}

/// Commits batches of touched records with their `last_applied`. On the first failure it
/// records the fault and stops: a later batch must never record a `last_applied` past
/// records that are not on disk.
fn sm_writer(
    db: Arc<Database>,
    rx: mpsc::Receiver<SmWrite>,
    fault: Arc<StorageFault>,
    pending: Arc<Mutex<Pending>>,
) {
    let mut last_sync = std::time::Instant::now();
    let mut last_commit = last_sync;
    let mut unsynced = false;
    let mut batches = 0u64;
    let fail_after = writes_fail_after();
    loop {
        let first = match rx.recv_timeout(STATE_SYNC_INTERVAL) {
            Ok(op) => op,
            // Idle with commits not yet durable: make them so, with an empty commit.
            Err(mpsc::RecvTimeoutError::Timeout) if unsynced => SmWrite::Sync,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut ops = vec![first];
        // Rows alone wait for more until ROWS_WINDOW after the last commit; anything that
        // someone waits for goes at once, with the rows before it.
        let gather_until = last_commit + ROWS_WINDOW;
        let mut awaited = !matches!(ops[0], SmWrite::Rows { .. });
        while ops.len() < 1024 {
            let op = match rx.try_recv() {
                Ok(op) => op,
                Err(_) if awaited => break,
                Err(_) => {
                    let left = gather_until.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match rx.recv_timeout(left) {
                        Ok(op) => op,
                        Err(_) => break,
                    }
                }
            };
            awaited |= !matches!(op, SmWrite::Rows { .. });
            ops.push(op);
        }
        let sync = last_sync.elapsed() >= STATE_SYNC_INTERVAL
            || ops
                .iter()
                .any(|op| matches!(op, SmWrite::Sync | SmWrite::Durable(_)));
        let res = (|| -> io::Result<()> {
            if fail_after.is_some_and(|n| batches >= n) {
                return Err(io::Error::other("injected state-file write failure"));
            }
            let mut txn = db.begin_write().map_err(io::Error::other)?;
            txn.set_durability(fsync_if(sync))
                .map_err(io::Error::other)?;
            let mut last = None;
            for op in &ops {
                if let SmWrite::Rows {
                    rows,
                    applied,
                    membership,
                } = op
                {
                    rows.write(&txn)?;
                    last = Some((applied, membership));
                }
            }
            if let Some((applied, membership)) = last {
                let mut m = txn.open_table(META).map_err(io::Error::other)?;
                m.insert(K_APPLIED, applied.as_slice())
                    .map_err(io::Error::other)?;
                m.insert(K_MEMBERSHIP, membership.as_slice())
                    .map_err(io::Error::other)?;
            }
            txn.commit().map_err(io::Error::other)
        })();
        batches += 1;
        last_commit = std::time::Instant::now();
        match (res, sync) {
            (Ok(()), true) => {
                last_sync = std::time::Instant::now();
                unsynced = false;
            }
            (Ok(()), false) => unsynced = true,
            (Err(e), _) => {
                // Dropping `ops` drops the barriers' senders: their waiters see the end.
                tracing::error!(error = %e, "writing state-machine records failed; this member stops");
                fault.record(format!("writing state-machine records to state.redb: {e}"));
                return;
            }
        }
        {
            let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
            for op in &ops {
                if let SmWrite::Rows { rows, .. } = op {
                    p.committed(
                        &rows.archived_build_ids(),
                        &rows.archived_release_ids(),
                        &rows.archived_deployment_ids(),
                    );
                }
            }
        }
        // Opened before the next commit: it sees exactly this one.
        let mut view = None;
        for op in ops {
            match op {
                SmWrite::Barrier(done) => {
                    let _ = done.send(());
                }
                SmWrite::Durable(done) => {
                    if view.is_none() {
                        match db.begin_read() {
                            Ok(txn) => view = Some(Arc::new(txn)),
                            Err(e) => {
                                fault.record(format!("reading state.redb: {e}"));
                                return;
                            }
                        }
                    }
                    if let Some(txn) = &view {
                        let _ = done.send(txn.clone());
                    }
                }
                _ => {}
            }
        }
    }
}

impl StateMachineStore {
    /// Load the state machine from `db`, preferring the stored snapshot when the records
    /// are older than it.
    pub fn open(
        db: Arc<Database>,
        snapshots: Arc<Database>,
        metrics: Arc<ControlMetrics>,
    ) -> io::Result<Self> {
        let last_applied: Option<LogIdOf<TypeConfig>> = read_meta(&db, K_APPLIED)?;
        let membership: StoredMembershipOf<TypeConfig> =
            read_meta(&db, K_MEMBERSHIP)?.unwrap_or_default();
        let mut state = ControlState::from_records(load_records(&db)?);
        // Records past the history window (a file of format 1) move to the archive now.
        let touched = state.take_touched();
        if !touched.is_empty() {
            tracing::info!(
                builds = touched.archived_builds.len(),
                releases = touched.archived_releases.len(),
                deployments = touched.archived_deployments.len(),
                "moving history past the window to the archive"
            );
            write_touched(&db, &state, &touched, true)?;
        }
        let (tx, _) = watch::channel(state.last_event_index());
        let (writer, rx) = mpsc::channel();
        let wdb = db.clone();
        let fault = Arc::new(StorageFault::default());
        let wfault = fault.clone();
        let pending = Arc::new(Mutex::new(Pending::default()));
        let wpending = pending.clone();
        std::thread::Builder::new()
            .name("state-machine-writer".into())
            .spawn(move || sm_writer(wdb, rx, wfault, wpending))?;
        let mut sm = StateMachineStore {
            db,
            snapshots,
            pending,
            state: Arc::new(RwLock::new(state)),
            last_applied,
            membership,
            events_tx: Arc::new(tx),
            writer,
            fault,
            metrics,
        };
        if let Some((meta, data)) = load_snapshot(&sm.snapshots)? {
            let newer = meta.last_log_id.as_ref().map(|l| l.index())
                > sm.last_applied.as_ref().map(|l| l.index());
            if newer {
                sm.replace_records::<&[u8]>(&meta, dec(&data)?, None, Durability::Immediate)?;
            }
        }
        Ok(sm)
    }

    pub fn shared(&self) -> SharedState {
        self.state.clone()
    }

    pub fn events(&self) -> watch::Receiver<u64> {
        self.events_tx.subscribe()
    }

    pub fn fault(&self) -> Arc<StorageFault> {
        self.fault.clone()
    }

    pub fn state_sync(&self) -> StateSync {
        StateSync(self.writer.clone())
    }

    /// A reader of the history that left memory.
    pub fn archive(&self) -> Archive {
        Archive::new(self.db.clone(), self.pending.clone())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, ControlState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Replace every record and the archive with an image's (snapshot install or load).
    fn replace_records<R: std::io::Read>(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        records: Records,
        archive: Option<&mut crate::image::Reader<R>>,
        durability: Durability,
    ) -> io::Result<()> {
        let mut txn = self.db.begin_write().map_err(io::Error::other)?;
        txn.set_durability(durability).map_err(io::Error::other)?;
        txn.delete_table(HISTORY).map_err(io::Error::other)?;
        crate::archive::delete_tables(&txn)?;
        txn.delete_table(REPOS).map_err(io::Error::other)?;
        txn.delete_table(BUILDS).map_err(io::Error::other)?;
        txn.delete_table(EVENTS).map_err(io::Error::other)?;
        txn.delete_table(RELEASES).map_err(io::Error::other)?;
        txn.delete_table(GOALS).map_err(io::Error::other)?;
        txn.delete_table(REQUESTS).map_err(io::Error::other)?;
        txn.delete_table(CLUSTER).map_err(io::Error::other)?;
        txn.delete_table(JOIN_TOKENS).map_err(io::Error::other)?;
        txn.delete_table(DEPLOYMENTS).map_err(io::Error::other)?;
        txn.delete_table(NOTIFIER).map_err(io::Error::other)?;
        let mut state = ControlState::from_records(records);
        // An image from before the window may hold more than it: that moves too.
        let mut touched = all_touched(state.records());
        let beyond = state.take_touched();
        touched.archived_builds = beyond.archived_builds;
        touched.archived_releases = beyond.archived_releases;
        touched.archived_deployments = beyond.archived_deployments;
        let events = state.events_after(0, usize::MAX);
        Rows::encode(&state, &touched, &events)?.write(&txn)?;
        if let Some(image) = archive {
            copy_archive(image, &txn)?;
        }
        {
            let mut m = txn.open_table(META).map_err(io::Error::other)?;
            m.insert(K_APPLIED, enc(&meta.last_log_id)?.as_slice())
                .map_err(io::Error::other)?;
            m.insert(K_MEMBERSHIP, enc(&meta.last_membership)?.as_slice())
                .map_err(io::Error::other)?;
        }
        txn.commit().map_err(io::Error::other)?;
        let events = state.last_event_index();
        *self.write_state() = state;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.events_tx.send_replace(events);
        Ok(())
    }
}

/// Apply `cmds` to `state` outside Raft and write what they touched to `db` as the
/// state machine's writer would. Only for tools that build a state file directly (the
/// history benchmark): a member's state changes only through its log. Commits without
/// fsync unless `durable`; redb makes earlier commits durable with a durable one.
#[doc(hidden)]
pub fn apply_outside_raft(
    db: &Database,
    state: &mut ControlState,
    cmds: &[starling_proto::Command],
    durable: bool,
) -> io::Result<()> {
    for c in cmds {
        state.apply(c);
    }
    let touched = state.take_touched();
    write_touched(db, state, &touched, durable)
}

/// Write what `touched` names of `state` in one transaction of its own.
fn write_touched(
    db: &Database,
    state: &ControlState,
    touched: &Touched,
    durable: bool,
) -> io::Result<()> {
    let rows = Rows::encode(state, touched, &new_events(state, touched))?;
    let mut txn = db.begin_write().map_err(io::Error::other)?;
    txn.set_durability(fsync_if(durable))
        .map_err(io::Error::other)?;
    rows.write(&txn)?;
    txn.commit().map_err(io::Error::other)
}

/// The state a member would load from `db`.
#[doc(hidden)]
pub fn load_state(db: &Database) -> io::Result<ControlState> {
    Ok(ControlState::from_records(load_records(db)?))
}

fn write_named(
    txn: &redb::WriteTransaction,
    def: TableDefinition<&str, &[u8]>,
    rows: &[(String, Vec<u8>)],
) -> io::Result<()> {
    let mut t = txn.open_table(def).map_err(io::Error::other)?;
    for (k, v) in rows {
        t.insert(k.as_str(), v.as_slice())
            .map_err(io::Error::other)?;
    }
    Ok(())
}

fn write_numbered(
    txn: &redb::WriteTransaction,
    def: TableDefinition<u64, &[u8]>,
    rows: &[(u64, Vec<u8>)],
) -> io::Result<()> {
    let mut t = txn.open_table(def).map_err(io::Error::other)?;
    for (k, v) in rows {
        t.insert(*k, v.as_slice()).map_err(io::Error::other)?;
    }
    Ok(())
}

/// The events a batch appended: those that already left memory, then the rest.
fn new_events(state: &ControlState, touched: &Touched) -> Vec<Event> {
    let mut events = touched.archived_events.clone();
    if let Some(from) = touched.events_from {
        let after = events.last().map_or(from - 1, |e| e.index);
        events.extend(state.events_after(after, usize::MAX));
    }
    events
}

fn all_touched(r: &Records) -> Touched {
    Touched {
        repos: r.repos.keys().cloned().collect(),
        builds: r.builds.keys().copied().collect(),
        events_from: (!r.events.is_empty()).then_some(1),
        releases: r.releases.keys().cloned().collect(),
        goals: r.goals.keys().cloned().collect(),
        requests: r.requests.keys().copied().collect(),
        requests_forgotten: Default::default(),
        ca: r.ca.is_some(),
        join_tokens: r.join_tokens.keys().cloned().collect(),
        join_tokens_forgotten: Default::default(),
        deployments: r.deployments.keys().copied().collect(),
        notified: r.notified_up_to > 0,
        archived_builds: Vec::new(),
        archived_releases: Vec::new(),
        archived_deployments: Vec::new(),
        archived_events: Vec::new(),
        marks: true,
    }
}

/// Write the archived records of `image` (after its working set) into `txn`.
fn copy_archive<R: std::io::Read>(
    image: &mut crate::image::Reader<R>,
    txn: &redb::WriteTransaction,
) -> io::Result<()> {
    use crate::image::Item;
    let mut events = txn.open_table(EVENTS).map_err(io::Error::other)?;
    while let Some(item) = image.next_item()? {
        match item {
            // Each record is stored as the JSON it came in.
            Item::Build(b) => crate::archive::put_build(txn, &b, image.json())?,
            Item::Event(e) => {
                events
                    .insert(e.index, image.json())
                    .map_err(io::Error::other)?;
            }
            Item::Release(r) => crate::archive::put_release(txn, &r, image.json())?,
            Item::Deployment(d) => crate::archive::put_deployment(txn, &d, image.json())?,
            Item::Records(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "state image with two working sets",
                ))
            }
        }
    }
    Ok(())
}

/// Encoded records ready to be written: the rows an `apply` batch touched.
#[derive(Default)]
struct Rows {
    repos: Vec<(String, Vec<u8>)>,
    builds: Vec<(u64, Vec<u8>)>,
    events: Vec<(u64, Vec<u8>)>,
    releases: Vec<(String, Vec<u8>)>,
    goals: Vec<(String, Vec<u8>)>,
    requests: Vec<(u64, Vec<u8>)>,
    requests_forgotten: Vec<u64>,
    cluster: Vec<(String, Vec<u8>)>,
    join_tokens: Vec<(String, Vec<u8>)>,
    join_tokens_forgotten: Vec<String>,
    deployments: Vec<(u64, Vec<u8>)>,
    notifier: Vec<(String, Vec<u8>)>,
    marks: Option<Vec<u8>>,
    archived_builds: Vec<(Build, Vec<u8>)>,
    archived_releases: Vec<(Release, Vec<u8>)>,
    archived_deployments: Vec<(Deployment, Vec<u8>)>,
}

impl Rows {
    /// Encode the records named in `touched`. Runs under the state lock, so it only
    /// serializes; the write happens later without the lock.
    /// `new_events` are the events from `touched.events_from` on.
    fn encode(state: &ControlState, touched: &Touched, new_events: &[Event]) -> io::Result<Rows> {
        let r = state.records();
        let mut rows = Rows::default();
        for k in &touched.repos {
            if let Some(v) = r.repos.get(k) {
                rows.repos.push((k.clone(), enc(v)?));
            }
        }
        for k in &touched.builds {
            if let Some(v) = r.builds.get(k) {
                rows.builds.push((*k, enc(v)?));
            }
        }
        for e in new_events {
            rows.events.push((e.index, enc(e)?));
        }
        for k in &touched.releases {
            if let Some(v) = r.releases.get(k) {
                rows.releases.push((k.to_hex(), enc(v)?));
            }
        }
        for k in &touched.goals {
            if let Some(v) = r.goals.get(k) {
                rows.goals.push((k.as_str().to_string(), enc(v)?));
            }
        }
        for k in &touched.requests {
            if let Some(v) = r.requests.get(k) {
                rows.requests.push((*k, enc(v)?));
            }
        }
        rows.requests_forgotten = touched.requests_forgotten.iter().copied().collect();
        if let Some(ca) = r.ca.as_ref().filter(|_| touched.ca) {
            rows.cluster.push((K_CA.to_string(), enc(ca)?));
        }
        for k in &touched.join_tokens {
            if let Some(v) = r.join_tokens.get(k) {
                rows.join_tokens.push((k.clone(), enc(v)?));
            }
        }
        rows.join_tokens_forgotten = touched.join_tokens_forgotten.iter().cloned().collect();
        for k in &touched.deployments {
            if let Some(v) = r.deployments.get(k) {
                rows.deployments.push((*k, enc(v)?));
            }
        }
        if touched.notified {
            rows.notifier
                .push((K_NOTIFIED.to_string(), enc(&r.notified_up_to)?));
        }
        if touched.marks {
            rows.marks = Some(enc(&r.marks)?);
        }
        for b in &touched.archived_builds {
            rows.archived_builds.push((b.clone(), enc(b)?));
        }
        for r in &touched.archived_releases {
            rows.archived_releases.push((r.clone(), enc(r)?));
        }
        for d in &touched.archived_deployments {
            rows.archived_deployments.push((d.clone(), enc(d)?));
        }
        Ok(rows)
    }

    fn archived_build_ids(&self) -> Vec<u64> {
        self.archived_builds.iter().map(|(b, _)| b.id).collect()
    }

    fn archived_release_ids(&self) -> Vec<ReleaseId> {
        self.archived_releases.iter().map(|(r, _)| r.id).collect()
    }

    fn archived_deployment_ids(&self) -> Vec<u64> {
        self.archived_deployments
            .iter()
            .map(|(d, _)| d.id)
            .collect()
    }

    fn archives_anything(&self) -> bool {
        !self.archived_builds.is_empty()
            || !self.archived_releases.is_empty()
            || !self.archived_deployments.is_empty()
    }

    fn write(&self, txn: &redb::WriteTransaction) -> io::Result<()> {
        write_named(txn, REPOS, &self.repos)?;
        write_numbered(txn, BUILDS, &self.builds)?;
        write_numbered(txn, EVENTS, &self.events)?;
        write_named(txn, RELEASES, &self.releases)?;
        write_named(txn, GOALS, &self.goals)?;
        write_numbered(txn, REQUESTS, &self.requests)?;
        let mut t = txn.open_table(REQUESTS).map_err(io::Error::other)?;
        for k in &self.requests_forgotten {
            t.remove(*k).map_err(io::Error::other)?;
        }
        write_named(txn, CLUSTER, &self.cluster)?;
        write_named(txn, JOIN_TOKENS, &self.join_tokens)?;
        let mut t = txn.open_table(JOIN_TOKENS).map_err(io::Error::other)?;
        for k in &self.join_tokens_forgotten {
            t.remove(k.as_str()).map_err(io::Error::other)?;
        }
        write_numbered(txn, DEPLOYMENTS, &self.deployments)?;
        write_named(txn, NOTIFIER, &self.notifier)?;
        if let Some(marks) = &self.marks {
            txn.open_table(HISTORY)
                .map_err(io::Error::other)?
                .insert(K_MARKS, marks.as_slice())
                .map_err(io::Error::other)?;
        }
        let mut builds = txn.open_table(BUILDS).map_err(io::Error::other)?;
        for (b, json) in &self.archived_builds {
            builds.remove(b.id).map_err(io::Error::other)?;
            crate::archive::put_build(txn, b, json)?;
        }
        let mut releases = txn.open_table(RELEASES).map_err(io::Error::other)?;
        for (r, json) in &self.archived_releases {
            releases
                .remove(r.id.to_hex().as_str())
                .map_err(io::Error::other)?;
            crate::archive::put_release(txn, r, json)?;
        }
        let mut deployments = txn.open_table(DEPLOYMENTS).map_err(io::Error::other)?;
        for (d, json) in &self.archived_deployments {
            deployments.remove(d.id).map_err(io::Error::other)?;
            crate::archive::put_deployment(txn, d, json)?;
        }
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = StateImage;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, StateImage>, io::Error> {
        let started = std::time::Instant::now();
        let txn = self.sync.durable().await?;
        let meta = snapshot_meta(&txn)?.ok_or_else(|| {
            io::Error::other("a snapshot was asked for before anything was applied")
        })?;
        self.metrics.snapshot_built(started.elapsed());
        tracing::info!(last = ?meta.last_log_id, "snapshot taken (state file durable)");
        Ok(SnapshotOf::<TypeConfig, StateImage> {
            meta,
            snapshot: StateImage::Txn(txn),
        })
    }
}

/// The snapshot meta of the state file as `txn` sees it; `None` before anything applied.
fn snapshot_meta(txn: &redb::ReadTransaction) -> io::Result<Option<SnapshotMetaOf<TypeConfig>>> {
    let t = txn.open_table(META).map_err(io::Error::other)?;
    let get = |k: &str| -> io::Result<Option<Vec<u8>>> {
        Ok(t.get(k)
            .map_err(io::Error::other)?
            .map(|v| v.value().to_vec()))
    };
    let Some(applied) = get(K_APPLIED)? else {
        return Ok(None);
    };
    let last_log_id: Option<LogIdOf<TypeConfig>> = dec(&applied)?;
    if last_log_id.is_none() {
        return Ok(None);
    }
    let last_membership = match get(K_MEMBERSHIP)? {
        Some(m) => dec(&m)?,
        None => Default::default(),
    };
    Ok(Some(SnapshotMetaOf::<TypeConfig> {
        last_log_id,
        last_membership,
    }))
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = StateImage;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>), io::Error> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        if let Some(f) = self.fault.get() {
            return Err(io::Error::other(f.to_string()));
        }
        let started = std::time::Instant::now();
        let mut responders = Vec::new();
        let mut entries_applied = 0;
        let mut leases_expired = 0;
        while let Some((entry, responder)) = entries.try_next().await? {
            entries_applied += 1;
            let log_id = entry.log_id();
            let outcome = match entry.payload {
                EntryPayload::Blank => Outcome::Done,
                EntryPayload::Normal(cmd) => self.write_state().apply(&cmd),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembershipOf::<TypeConfig>::new(Some(log_id), m);
                    Outcome::Done
                }
            };
            self.last_applied = Some(log_id);
            if let Outcome::Expired(ids) = &outcome {
                leases_expired += ids.len();
            }
            if let Some(r) = responder {
                responders.push((r, outcome));
            }
        }
        let (rows, last_event) = {
            let mut st = self.write_state();
            let touched = st.take_touched();
            // Read once, for the rows and for the metrics.
            let new_events = new_events(&st, &touched);
            let rows = Rows::encode(&st, &touched, &new_events)?;
            if rows.archives_anything() {
                self.pending.lock().unwrap_or_else(|p| p.into_inner()).add(
                    touched.archived_builds,
                    touched.archived_releases,
                    touched.archived_deployments,
                );
            }
            self.metrics.applied(
                entries_applied,
                leases_expired,
                &st,
                &new_events,
                started.elapsed(),
            );
            (rows, new_events.last().map(|e| e.index))
        };
        let write = SmWrite::Rows {
            rows: Box::new(rows),
            applied: enc(&self.last_applied)?,
            membership: enc(&self.membership)?,
        };
        self.writer
            .send(write)
            .map_err(|_| io::Error::other("the state-machine writer thread has stopped"))?;
        if let Some(last) = last_event {
            self.events_tx.send_replace(last);
        }
        for (r, outcome) in responders {
            r.send(outcome);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            sync: self.state_sync(),
            metrics: self.metrics.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: StateImage,
    ) -> Result<(), io::Error> {
        let StateImage::File(path) = snapshot else {
            return Err(io::Error::other(
                "a snapshot to install is a received image, not a state file",
            ));
        };
        // Let queued row writes land first so that they cannot overwrite the snapshot's.
        let (done, wait) = oneshot::channel();
        if self.writer.send(SmWrite::Barrier(done)).is_ok() {
            let _ = wait.await;
        }
        let mut this = self.clone();
        let meta = meta.clone();
        let this = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path)?;
            let mut image =
                crate::image::Reader::new(std::io::BufReader::with_capacity(1 << 20, file));
            let records = image.records()?;
            this.replace_records(&meta, records, Some(&mut image), Durability::Immediate)
                .map(|_| this)
        })
        .await
        .map_err(io::Error::other)??;
        self.last_applied = this.last_applied;
        self.membership = this.membership;
        tracing::info!(last = ?self.last_applied, "snapshot installed");
        Ok(())
    }

    /// The state file as it is now: its meta and a read transaction to make the image
    /// from, which happens only if it is sent.
    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, StateImage>>, io::Error> {
        let txn = Arc::new(self.db.begin_read().map_err(io::Error::other)?);
        Ok(
            snapshot_meta(&txn)?.map(|meta| SnapshotOf::<TypeConfig, StateImage> {
                meta,
                snapshot: StateImage::Txn(txn),
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_of_another_format_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let files = Files::open(t.path()).unwrap();
        assert_eq!(
            read_meta::<u32>(&files.state, K_FORMAT).unwrap(),
            Some(FILE_FORMAT)
        );
        // A file from a later starling:
        let txn = files.state.begin_write().unwrap();
        {
            let mut m = txn.open_table(META).unwrap();
            m.insert(K_FORMAT, enc(&(FILE_FORMAT + 1)).unwrap().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
        drop(files);
        let e = Files::open(t.path())
            .err()
            .expect("opened a file of another format");
        let later = format!("state.redb is in format {}", FILE_FORMAT + 1);
        assert!(e.to_string().contains(&later), "{e}");
    }

    #[test]
    fn an_unreadable_record_is_named_not_skipped() {
        let t = tempfile::tempdir().unwrap();
        let files = Files::open(t.path()).unwrap();
        let txn = files.state.begin_write().unwrap();
        {
            let mut releases = txn.open_table(RELEASES).unwrap();
            let bad = br#"{"id":"rel-1","repo":"a/b","sha":"00","build":1,"created_at":0,"collected_at":null}"#;
            releases.insert("rel-1", bad.as_slice()).unwrap();
        }
        txn.commit().unwrap();
        let metrics = Arc::new(ControlMetrics::new());
        let e = StateMachineStore::open(files.state, files.snapshots, metrics)
            .err()
            .expect("loaded a state with an unreadable record");
        let said = e.to_string();
        assert!(
            said.contains("record rel-1 of table releases") && said.contains("release id"),
            "{said}"
        );
    }

    fn build_cmds(i: u64) -> Vec<starling_proto::Command> {
        use starling_proto::{BuildStatus, Command};
        let sha = format!("{i:040x}");
        vec![
            Command::QueueBuild {
                repo: if i.is_multiple_of(3) {
                    "acme/api"
                } else {
                    "acme/web"
                }
                .into(),
                sha: sha.clone(),
                trigger: "manual".into(),
                delivery: None,
                force: false,
                at: 1000 + i,
            },
            Command::LeaseBuild {
                worker: "w".into(),
                ttl_ms: 60_000,
                at: 1000 + i,
            },
            Command::CompleteBuild {
                build: i,
                worker: "w".into(),
                attempt: 1,
                status: if i.is_multiple_of(5) {
                    BuildStatus::Failed
                } else {
                    BuildStatus::Succeeded
                },
                release: Some(ReleaseId::of(sha.as_bytes())),
                reason: None,
                at: 1001 + i,
            },
        ]
    }

    /// History past the window is written to the archive, read back by every kind of
    /// query, carried by a state image to a fresh member, and not loaded into memory.
    #[test]
    fn history_past_the_window_is_archived_queried_and_carried_by_images() {
        use starling_core::state::{BuildQuery, HistoryWindow};
        use starling_proto::{BuildStatus, Command, RepoSpec};
        let window = HistoryWindow {
            finished_builds: 5,
            events: 20,
            collected_releases: 2,
            finished_deployments: 2,
        };
        let t = tempfile::tempdir().unwrap();
        let files = Files::open(t.path()).unwrap();
        let mut state = ControlState::with_window(Records::default(), window);
        let repos: Vec<Command> = ["acme/web", "acme/api"]
            .iter()
            .map(|name| Command::PutRepo {
                spec: RepoSpec {
                    name: name.to_string(),
                    url: "file:///x".into(),
                    branch: "main".into(),
                    webhook_secret: "s".into(),
                    auto_deploy: false,
                    max_release_bytes: starling_proto::DEFAULT_MAX_RELEASE_BYTES,
                    notify: Vec::new(),
                    notify_secret: String::new(),
                    rollout: Default::default(),
                },
                at: 1,
            })
            .collect();
        apply_outside_raft(&files.state, &mut state, &repos, false).unwrap();
        for i in 1..=40 {
            apply_outside_raft(&files.state, &mut state, &build_cmds(i), false).unwrap();
        }
        assert_eq!(state.records().builds.len(), 5);
        let archive = Archive::new(files.state.clone(), Default::default());
        let q = |f: &dyn Fn(&mut BuildQuery)| {
            let mut q = BuildQuery::default();
            f(&mut q);
            archive
                .builds(&q)
                .unwrap()
                .iter()
                .map(|b| b.id)
                .collect::<Vec<u64>>()
        };
        assert_eq!(q(&|q| q.limit = Some(3)), vec![35, 34, 33]);
        assert_eq!(
            q(&|q| {
                q.repo = Some("acme/api".into());
                q.status = Some(BuildStatus::Failed);
            }),
            vec![30, 15]
        );
        assert_eq!(q(&|q| q.repo = Some("acme/api".into())).len(), 11);
        assert_eq!(
            q(&|q| q.status = Some(BuildStatus::Failed)),
            vec![35, 30, 25, 20, 15, 10, 5]
        );
        assert_eq!(
            q(&|q| q.sha = Some(format!("{:038x}", 0) + "1")),
            vec![31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16]
        );
        assert_eq!(
            q(&|q| {
                q.since = Some(1010);
                q.until = Some(1013);
            }),
            vec![12, 11, 10]
        );
        assert_eq!(archive.build(7).unwrap().map(|b| b.id), Some(7));
        assert!(
            archive.build(38).unwrap().is_none(),
            "in memory, not archived"
        );
        let first = state.first_event_in_memory();
        let old = archive.events(0, first, 1000).unwrap();
        assert_eq!(old.len() as u64, first - 1);
        assert!(old.iter().enumerate().all(|(i, e)| e.index == i as u64 + 1));

        // Collect releases: all but the newest two leave memory.
        let due = state.releases_to_collect(1);
        apply_outside_raft(
            &files.state,
            &mut state,
            &[Command::CollectReleases {
                releases: due,
                keep: 1,
                at: 5000,
            }],
            true,
        )
        .unwrap();
        let web = archive.releases(Some("acme/web"), 100).unwrap();
        assert!(!web.is_empty() && web.iter().all(|r| r.repo == "acme/web"));

        // Loading reads the working set only.
        let loaded = load_records(&files.state).unwrap();
        assert_eq!(loaded.builds.len(), 5);
        assert_eq!(loaded.events.len(), 20);
        assert_eq!(&loaded, state.records());

        // An image carries everything to another member's empty file.
        let mut bytes = Vec::new();
        crate::image::write(&files.state.begin_read().unwrap(), &mut bytes).unwrap();
        let (mut builds, mut events) = (0, 0);
        let mut reader = crate::image::Reader::new(bytes.as_slice());
        while let Some(item) = reader.next_item().unwrap() {
            match item {
                crate::image::Item::Build(_) => builds += 1,
                crate::image::Item::Event(_) => events += 1,
                _ => {}
            }
        }
        assert_eq!(builds, 35);
        assert_eq!(events, state.first_event_in_memory() - 1);
        let mut image = crate::image::Reader::new(bytes.as_slice());
        let records = image.records().unwrap();
        let t2 = tempfile::tempdir().unwrap();
        let other = Files::open(t2.path()).unwrap();
        let metrics = Arc::new(ControlMetrics::new());
        let mut sm =
            StateMachineStore::open(other.state.clone(), other.snapshots, metrics).unwrap();
        let meta = SnapshotMetaOf::<TypeConfig>::default();
        sm.replace_records(&meta, records, Some(&mut image), Durability::Immediate)
            .unwrap();
        let theirs = Archive::new(other.state.clone(), Default::default());
        let all = BuildQuery {
            limit: Some(1000),
            ..Default::default()
        };
        assert_eq!(theirs.builds(&all).unwrap(), archive.builds(&all).unwrap());
        assert_eq!(
            theirs.events(0, 1000, 1000).unwrap(),
            archive.events(0, 1000, 1000).unwrap()
        );
    }
}
