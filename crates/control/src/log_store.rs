//! The Raft log, vote and purge marker in a write-ahead log ([`crate::wal`]) in
//! `<data-dir>/wal/`, written by one writer thread.
//!
//! `append` hands its entries to the writer and returns at once; the entries are readable
//! from memory right away (openraft replicates them to followers while the local sync
//! runs), and openraft is told they are durable only when the writer's `fdatasync` has
//! returned. The writer folds every operation queued meanwhile into the same write, so
//! concurrent appends share one sync (group commit). Votes, truncations and purges go
//! through the same queue, so they are ordered with the appends, and their callers wait
//! for their sync. A failed write or sync stops the log for good: every later operation
//! fails, and openraft stops this member, since what the page cache holds after a failed
//! sync is unknown.
//!
//! Memory holds every entry not yet purged — about `--snapshot-every` entries, since a
//! snapshot purges all but the last 500 — so reads never touch the disk. The log is
//! replayed from the files at start.
//!
//! Members before this log kept it in `log.redb`; such a file is imported once, into a
//! new `wal/` made beside it and renamed into place, and then removed.

use std::collections::BTreeMap;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::{LogState, OptionalSend, RaftLogReader};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::wal::{self, Wal, WalError};
use crate::TypeConfig;

type Entry = EntryOf<TypeConfig>;
type LogId = LogIdOf<TypeConfig>;
type Vote = VoteOf<TypeConfig>;

/// Most operations one write takes; the rest wait for the next.
const MAX_GROUP: usize = 4096;
/// Entries per record when a `log.redb` is imported.
const IMPORT_BATCH: usize = 1024;

/// A record as written (borrowing); read back as a [`Record`] of the same shape.
#[derive(Serialize)]
enum RecordRef<'a> {
    /// The first record of every segment: the log's state where the segment begins, so
    /// that the segments before it can be deleted once their entries are purged.
    Start(&'a Meta),
    Entries(&'a [Entry]),
    Vote(&'a Vote),
    Committed(Option<&'a LogId>),
    /// Entries from this index on are gone (a new leader's entries replace them).
    Truncate(u64),
    /// Entries up to and including this one are gone (a snapshot holds them).
    Purge(&'a LogId),
}

#[derive(Deserialize)]
enum Record {
    Start(Meta),
    Entries(Vec<Entry>),
    Vote(Vote),
    Committed(Option<LogId>),
    Truncate(u64),
    Purge(LogId),
}

/// What the log holds beside its entries.
#[derive(Clone, Default, Serialize, Deserialize)]
struct Meta {
    vote: Option<Vote>,
    /// A recovery hint, so that a restarted member re-applies what it knew committed.
    committed: Option<LogId>,
    purged: Option<LogId>,
}

fn encode(r: &RecordRef<'_>) -> io::Result<Vec<u8>> {
    postcard::to_allocvec(r).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The first frame of a segment that begins where the log's state is `meta`.
fn start_frame(meta: &Meta) -> Result<Vec<u8>, WalError> {
    let mut out = Vec::new();
    wal::frame(&mut out, &encode(&RecordRef::Start(meta))?)?;
    Ok(out)
}

enum LogOp {
    Append {
        record: Vec<u8>,
        last: u64,
        callback: IOFlushed<TypeConfig>,
    },
    Vote {
        vote: Vote,
        done: oneshot::Sender<io::Result<()>>,
    },
    /// Nobody waits for it: it rides without a sync and is durable with the next append.
    Committed(Option<LogId>),
    Truncate {
        from: u64,
        done: oneshot::Sender<io::Result<()>>,
    },
    Purge {
        id: LogId,
        done: oneshot::Sender<io::Result<()>>,
    },
}

/// The entries not yet purged, and the log's state as this member last set it.
#[derive(Default)]
struct Mem {
    entries: BTreeMap<u64, Entry>,
    meta: Meta,
}

impl Mem {
    /// Entries from `from` on are gone.
    fn truncate(&mut self, from: u64) {
        drop(self.entries.split_off(&from));
    }

    /// Entries up to and including `id` are gone, and `id` is the purge marker.
    fn purge(&mut self, id: LogId) {
        self.entries = self.entries.split_off(&(id.index() + 1));
        self.meta.purged = Some(id);
    }
}

#[derive(Clone)]
pub struct LogStore {
    mem: Arc<Mutex<Mem>>,
    tx: mpsc::Sender<LogOp>,
}

impl LogStore {
    /// Open (or create) the log in `dir/wal`, importing `dir/log.redb` if that is what
    /// `dir` holds, and start its writer thread.
    pub fn open(dir: &Path) -> io::Result<Self> {
        Self::open_in(dir, wal::SEGMENT_BYTES)
    }

    fn open_in(dir: &Path, segment_bytes: u64) -> io::Result<Self> {
        let wal_dir = dir.join("wal");
        let old = dir.join("log.redb");
        if !wal_dir.exists() && old.exists() {
            import_redb(&old, dir)?;
        }
        let (mut wal, replay) = Wal::open(&wal_dir, segment_bytes)?;
        if let Some((path, offset)) = &replay.torn {
            tracing::warn!(file = %path.display(), offset, "discarded a Raft log write torn by a crash");
        }
        let mem = replay_records(&replay, &mut wal)?;
        if wal.segment_is_empty() {
            wal.append(&start_frame(&mem.meta)?, None, true, || {
                start_frame(&mem.meta)
            })?;
        }
        let (tx, rx) = mpsc::channel();
        let meta = mem.meta.clone();
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer(wal, meta, rx))?;
        Ok(LogStore {
            mem: Arc::new(Mutex::new(mem)),
            tx,
        })
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn submit(
        &self,
        make: impl FnOnce(oneshot::Sender<io::Result<()>>) -> LogOp,
    ) -> io::Result<()> {
        let (done, wait) = oneshot::channel();
        self.tx.send(make(done)).map_err(|_| writer_gone())?;
        wait.await.map_err(|_| writer_gone())?
    }
}

/// Is `dir` a member's data directory (one that has a Raft log)?
pub fn has_log(dir: &Path) -> bool {
    dir.join("wal").exists() || dir.join("log.redb").exists()
}

fn writer_gone() -> io::Error {
    io::Error::other("the Raft log writer thread has stopped")
}

/// Rebuild the entries and state that `replay`'s records leave, and tell `wal` which
/// entries each segment holds.
fn replay_records(replay: &wal::Replay, wal: &mut Wal) -> io::Result<Mem> {
    let mut mem = Mem::default();
    for (seq, records) in &replay.segments {
        for bytes in records {
            let record: Record = postcard::from_bytes(bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a Raft log record in segment {seq:x} does not decode: {e}"),
                )
            })?;
            match record {
                Record::Start(meta) => {
                    if let Some(p) = meta.purged {
                        mem.purge(p);
                    }
                    mem.meta = meta;
                }
                Record::Entries(entries) => {
                    for e in entries {
                        wal.note_mark(*seq, e.index());
                        mem.entries.insert(e.index(), e);
                    }
                }
                Record::Vote(v) => mem.meta.vote = Some(v),
                Record::Committed(c) => mem.meta.committed = c,
                Record::Truncate(from) => mem.truncate(from),
                Record::Purge(id) => mem.purge(id),
            }
        }
    }
    Ok(mem)
}

fn writer(mut wal: Wal, mut meta: Meta, rx: mpsc::Receiver<LogOp>) {
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut ops = vec![first];
        while ops.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let res = match &failed {
            Some(why) => Err(why.clone()),
            None => write(&mut wal, &mut meta, &ops).map_err(|e| {
                tracing::error!(error = %e, "writing the Raft log failed; the log stops");
                e.to_string()
            }),
        };
        if let Err(why) = &res {
            failed = Some(why.clone());
        }
        for op in ops {
            let r = res
                .clone()
                .map_err(|why| io::Error::other(format!("the Raft log failed: {why}")));
            match op {
                LogOp::Append { callback, .. } => callback.io_completed(r),
                LogOp::Committed(_) => {}
                LogOp::Vote { done, .. }
                | LogOp::Truncate { done, .. }
                | LogOp::Purge { done, .. } => {
                    let _ = done.send(r);
                }
            }
        }
    }
}

/// Write `ops` as one batch, synced unless it only carries the committed hint.
fn write(wal: &mut Wal, meta: &mut Meta, ops: &[LogOp]) -> Result<(), WalError> {
    // A segment opened for this batch starts with the state before it.
    let before = meta.clone();
    let mut frames = Vec::new();
    let mut last = None;
    let mut sync = false;
    let mut purged = None;
    for op in ops {
        let record = match op {
            LogOp::Append {
                record, last: l, ..
            } => {
                last = last.max(Some(*l));
                sync = true;
                wal::frame(&mut frames, record)?;
                continue;
            }
            LogOp::Vote { vote, .. } => {
                meta.vote = Some(*vote);
                sync = true;
                encode(&RecordRef::Vote(vote))?
            }
            LogOp::Committed(c) => {
                meta.committed = *c;
                encode(&RecordRef::Committed(c.as_ref()))?
            }
            LogOp::Truncate { from, .. } => {
                sync = true;
                encode(&RecordRef::Truncate(*from))?
            }
            LogOp::Purge { id, .. } => {
                meta.purged = Some(*id);
                purged = Some(id.index());
                sync = true;
                encode(&RecordRef::Purge(id))?
            }
        };
        wal::frame(&mut frames, &record)?;
    }
    wal.append(&frames, last, sync, || start_frame(&before))?;
    // Only after the purge record is durable may the segments it empties go.
    if let Some(upto) = purged {
        wal.remove_through(upto)?;
    }
    Ok(())
}

/// Copy a `log.redb` (vote, committed hint, purge marker, entries) into a new `wal/`
/// beside it, made in `wal.import/` and renamed into place, then remove the old file.
fn import_redb(old: &Path, dir: &Path) -> io::Result<()> {
    use crate::tables::{dec, read_meta, K_COMMITTED, K_PURGED, K_VOTE, LOG};
    use redb::{ReadableDatabase, ReadableTable};

    let db = redb::Database::open(old).map_err(io::Error::other)?;
    let meta = Meta {
        vote: read_meta(&db, K_VOTE)?,
        committed: read_meta::<Option<LogId>>(&db, K_COMMITTED)?.flatten(),
        purged: read_meta(&db, K_PURGED)?,
    };
    let staging = dir.join("wal.import");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    let (mut wal, _) = Wal::open(&staging, wal::SEGMENT_BYTES)?;
    let txn = db.begin_read().map_err(io::Error::other)?;
    let table = txn.open_table(LOG).map_err(io::Error::other)?;
    // The Start record rides with the first batch; each batch is one Entries record.
    let mut frames = start_frame(&meta)?;
    let mut batch = Vec::with_capacity(IMPORT_BATCH);
    let mut count = 0usize;
    let mut rows = table.iter().map_err(io::Error::other)?.peekable();
    while let Some(row) = rows.next() {
        let (_, v) = row.map_err(io::Error::other)?;
        batch.push(dec::<Entry>(v.value())?);
        if batch.len() == IMPORT_BATCH || rows.peek().is_none() {
            count += batch.len();
            let last = batch.last().map(|e| e.index());
            wal::frame(&mut frames, &encode(&RecordRef::Entries(&batch))?)?;
            wal.append(&frames, last, false, || start_frame(&meta))?;
            frames.clear();
            batch.clear();
        }
    }
    // What is left (the Start record alone, for an empty log), then one sync for all.
    wal.append(&frames, None, true, || start_frame(&meta))?;
    drop(wal);
    let target = dir.join("wal");
    std::fs::rename(&staging, &target)?;
    std::fs::File::open(dir)?.sync_all()?;
    std::fs::remove_file(old)?;
    tracing::info!(entries = count, "imported the Raft log from log.redb");
    Ok(())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        // From the start while inside the range: an empty or reversed range is no panic.
        Ok(self
            .mem()
            .entries
            .range(start..)
            .map_while(|(k, e)| range.contains(k).then(|| e.clone()))
            .collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.mem().meta.vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let mem = self.mem();
        let last_purged_log_id = mem.meta.purged;
        let last = mem.entries.values().next_back().map(|e| e.log_id());
        Ok(LogState {
            last_log_id: last.or(last_purged_log_id),
            last_purged_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let v = *vote;
        self.submit(|done| LogOp::Vote { vote: v, done }).await?;
        self.mem().meta.vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.mem().meta.committed = committed;
        self.tx
            .send(LogOp::Committed(committed))
            .map_err(|_| writer_gone())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.mem().meta.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let record = encode(&RecordRef::Entries(&entries))?;
        let Some(last) = entries.last().map(|e| e.index()) else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        {
            let mut mem = self.mem();
            for e in entries {
                mem.entries.insert(e.index(), e);
            }
        }
        self.tx
            .send(LogOp::Append {
                record,
                last,
                callback,
            })
            .map_err(|_| writer_gone())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index() + 1);
        self.mem().truncate(from);
        self.submit(|done| LogOp::Truncate { from, done }).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.mem().purge(log_id);
        self.submit(|done| LogOp::Purge { id: log_id, done }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::type_config::TypeConfigExt;
    use openraft::vote::RaftLeaderIdExt;
    use openraft::{Entry as RaftLogEntry, EntryPayload, LogId as RaftLogId};
    use starling_proto::Command;

    type LeaderId = <TypeConfig as openraft::RaftTypeConfig>::LeaderId;

    fn entry(term: u64, index: u64) -> Entry {
        RaftLogEntry {
            log_id: RaftLogId::new(LeaderId::new_committed(term, 1), index),
            payload: EntryPayload::Normal(Command::Noop),
        }
    }

    async fn append(store: &mut LogStore, entries: Vec<Entry>) {
        let (tx, rx) = TypeConfig::oneshot();
        store.append(entries, IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
    }

    fn indexes(v: &[Entry]) -> Vec<(u64, u64)> {
        v.iter()
            .map(|e| (e.log_id.leader_id.term, e.index()))
            .collect()
    }

    #[tokio::test]
    async fn appends_truncates_purges_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = LogStore::open(dir.path()).unwrap();
            append(&mut s, (1..=5).map(|i| entry(1, i)).collect()).await;
            // Readable at once, whether from the tail or from redb.
            assert_eq!(
                indexes(&s.try_get_log_entries(2..4).await.unwrap()),
                vec![(1, 2), (1, 3)]
            );
            // A new leader overwrites the tail after 3.
            s.truncate_after(Some(entry(1, 3).log_id)).await.unwrap();
            append(&mut s, vec![entry(2, 4)]).await;
            assert_eq!(
                indexes(&s.try_get_log_entries(1..).await.unwrap()),
                vec![(1, 1), (1, 2), (1, 3), (2, 4)]
            );
            s.purge(entry(1, 2).log_id).await.unwrap();
            let st = s.get_log_state().await.unwrap();
            assert_eq!(st.last_purged_log_id.map(|l| l.index()), Some(2));
            assert_eq!(st.last_log_id.map(|l| l.index()), Some(4));
        }
        // Reopen: everything acknowledged is still there.
        let mut s = LogStore::open(dir.path()).unwrap();
        assert_eq!(
            indexes(&s.try_get_log_entries(0..100).await.unwrap()),
            vec![(1, 3), (2, 4)]
        );
        let st = s.get_log_state().await.unwrap();
        assert_eq!(
            st.last_log_id.map(|l| (l.leader_id.term, l.index())),
            Some((2, 4))
        );
    }

    fn vote(term: u64) -> Vote {
        Vote::new(term, 1)
    }

    fn segment_files(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("wal")).unwrap().count()
    }

    #[tokio::test]
    async fn segments_a_purge_empties_go_and_the_vote_outlives_them() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = LogStore::open_in(dir.path(), 200).unwrap();
            s.save_vote(&vote(7)).await.unwrap();
            for i in 1..=60 {
                append(&mut s, vec![entry(7, i)]).await;
            }
            let before = segment_files(dir.path());
            assert!(before > 3, "200-byte segments must have rolled ({before})");
            s.purge(entry(7, 50).log_id).await.unwrap();
            let after = segment_files(dir.path());
            assert!(after < before && after >= 1, "{before} -> {after}");
        }
        let mut s = LogStore::open_in(dir.path(), 200).unwrap();
        assert_eq!(s.read_vote().await.unwrap(), Some(vote(7)));
        let st = s.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id.map(|l| l.index()), Some(50));
        assert_eq!(
            indexes(&s.try_get_log_entries(0..).await.unwrap()),
            (51..=60).map(|i| (7, i)).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn a_log_redb_is_imported_once_and_removed() {
        use crate::tables::{enc, K_COMMITTED, K_PURGED, K_VOTE, LOG, META};
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("log.redb");
        {
            let db = redb::Database::create(&old).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut log = txn.open_table(LOG).unwrap();
                for i in 3..=2500 {
                    log.insert(i, enc(&entry(2, i)).unwrap().as_slice())
                        .unwrap();
                }
                let mut meta = txn.open_table(META).unwrap();
                meta.insert(K_VOTE, enc(&vote(2)).unwrap().as_slice())
                    .unwrap();
                meta.insert(K_PURGED, enc(&entry(2, 2).log_id).unwrap().as_slice())
                    .unwrap();
                let committed = Some(entry(2, 2400).log_id);
                meta.insert(K_COMMITTED, enc(&committed).unwrap().as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        assert!(has_log(dir.path()));
        let mut s = LogStore::open(dir.path()).unwrap();
        assert!(!old.exists() && dir.path().join("wal").is_dir());
        assert_eq!(s.read_vote().await.unwrap(), Some(vote(2)));
        assert_eq!(
            s.read_committed().await.unwrap().map(|l| l.index()),
            Some(2400)
        );
        let all = s.try_get_log_entries(0..).await.unwrap();
        assert_eq!(
            indexes(&all),
            (3..=2500).map(|i| (2, i)).collect::<Vec<_>>()
        );
        let st = s.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id.map(|l| l.index()), Some(2));
    }

    #[tokio::test]
    async fn concurrent_appends_share_commits_and_stay_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = LogStore::open(dir.path()).unwrap();
        let mut waits = Vec::new();
        for i in 1..=200 {
            let (tx, rx) = TypeConfig::oneshot();
            s.append(vec![entry(1, i)], IOFlushed::signal(tx))
                .await
                .unwrap();
            waits.push(rx);
        }
        for w in waits {
            w.await.unwrap().unwrap();
        }
        let all = s.try_get_log_entries(1..=200).await.unwrap();
        assert_eq!(all.len(), 200);
        assert!(all.windows(2).all(|w| w[0].index() + 1 == w[1].index()));
    }
}
