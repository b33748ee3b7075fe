//! The Raft log, vote and purge marker in redb, written by one writer thread.
//!
//! `append` hands its entries to the writer and returns at once; the entries are readable
//! from an in-memory tail right away (openraft replicates them to followers while the local
//! fsync runs), and openraft is told they are durable only when the writer's commit — with
//! `Durability::Immediate`, an fsync — has returned. The writer folds every operation
//! queued meanwhile into the same transaction, so concurrent appends share one fsync (group
//! commit). Votes, truncations and purges go through the same queue, so they are ordered
//! with the appends, and their callers wait for their commit.

use std::collections::BTreeMap;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::{LogState, OptionalSend, RaftLogReader};
use redb::{Database, Durability, ReadableDatabase, ReadableTable};
use tokio::sync::oneshot;

use crate::tables::{dec, enc, read_meta, K_COMMITTED, K_PURGED, K_VOTE, LOG, META};
use crate::TypeConfig;

type Entry = EntryOf<TypeConfig>;
type LogId = LogIdOf<TypeConfig>;

/// Most operations one writer transaction takes; the rest wait for the next.
const MAX_GROUP: usize = 4096;

enum LogOp {
    Append {
        rows: Vec<(u64, Vec<u8>)>,
        ids: Vec<LogId>,
        callback: IOFlushed<TypeConfig>,
    },
    PutMeta {
        key: &'static str,
        value: Vec<u8>,
        done: oneshot::Sender<io::Result<()>>,
    },
    /// The committed log id: a recovery hint, so nobody waits for it.
    Committed(Vec<u8>),
    Truncate {
        from: u64,
        done: oneshot::Sender<io::Result<()>>,
    },
    Purge {
        upto: u64,
        marker: Vec<u8>,
        done: oneshot::Sender<io::Result<()>>,
    },
}

/// Entries appended but maybe not yet committed to redb, by index.
type Tail = Arc<Mutex<BTreeMap<u64, Entry>>>;

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    tail: Tail,
    tx: mpsc::Sender<LogOp>,
}

impl LogStore {
    pub fn new(db: Arc<Database>) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let tail: Tail = Arc::default();
        let (wdb, wtail) = (db.clone(), tail.clone());
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer(wdb, rx, wtail))?;
        Ok(LogStore { db, tail, tx })
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
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

fn writer_gone() -> io::Error {
    io::Error::other("the Raft log writer thread has stopped")
}

fn writer(db: Arc<Database>, rx: mpsc::Receiver<LogOp>, tail: Tail) {
    while let Ok(first) = rx.recv() {
        let mut ops = vec![first];
        while ops.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let res = commit(&db, &ops);
        if res.is_ok() {
            // Committed entries are readable from redb now; drop them from the tail unless a
            // truncation replaced them meanwhile.
            let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
            for op in &ops {
                if let LogOp::Append { ids, .. } = op {
                    for id in ids {
                        if t.get(&id.index()).is_some_and(|e| e.log_id() == *id) {
                            t.remove(&id.index());
                        }
                    }
                }
            }
        }
        for op in ops {
            let r = match &res {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            match op {
                LogOp::Append { callback, .. } => callback.io_completed(r),
                LogOp::Committed(_) => {}
                LogOp::PutMeta { done, .. }
                | LogOp::Truncate { done, .. }
                | LogOp::Purge { done, .. } => {
                    let _ = done.send(r);
                }
            }
        }
    }
}

fn commit(db: &Database, ops: &[LogOp]) -> io::Result<()> {
    let mut txn = db.begin_write().map_err(io::Error::other)?;
    // The committed log id is a hint nobody waits for: alone, it rides without an fsync
    // and becomes durable with the next append. Forcing one here put a second fsync on
    // every write's path — the next append queued behind it.
    let hint_only = ops.iter().all(|op| matches!(op, LogOp::Committed(_)));
    let durability = if hint_only {
        Durability::None
    } else {
        Durability::Immediate
    };
    txn.set_durability(durability).map_err(io::Error::other)?;
    {
        let mut log = txn.open_table(LOG).map_err(io::Error::other)?;
        let mut meta = txn.open_table(META).map_err(io::Error::other)?;
        for op in ops {
            match op {
                LogOp::Append { rows, .. } => {
                    for (k, v) in rows {
                        log.insert(*k, v.as_slice()).map_err(io::Error::other)?;
                    }
                }
                LogOp::PutMeta { key, value, .. } => {
                    meta.insert(*key, value.as_slice())
                        .map_err(io::Error::other)?;
                }
                LogOp::Committed(value) => {
                    meta.insert(K_COMMITTED, value.as_slice())
                        .map_err(io::Error::other)?;
                }
                LogOp::Truncate { from, .. } => {
                    log.retain_in(*from.., |_, _| false)
                        .map_err(io::Error::other)?;
                }
                LogOp::Purge { upto, marker, .. } => {
                    meta.insert(K_PURGED, marker.as_slice())
                        .map_err(io::Error::other)?;
                    log.retain_in(..=*upto, |_, _| false)
                        .map_err(io::Error::other)?;
                }
            }
        }
    }
    txn.commit().map_err(io::Error::other)
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
        let end = match range.end_bound() {
            Bound::Included(e) => e.saturating_add(1),
            Bound::Excluded(e) => *e,
            Bound::Unbounded => u64::MAX,
        };
        if start >= end {
            return Ok(Vec::new());
        }
        // The tail first, then redb: an entry leaves the tail only after it is in redb.
        let cached: BTreeMap<u64, Entry> = self
            .tail()
            .range(start..end)
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        // Keys are distinct and inside [start, end): as many as the range is long means all.
        if end != u64::MAX && cached.len() as u64 == end - start {
            return Ok(cached.into_values().collect());
        }
        let db = self.db.clone();
        let mut entries =
            tokio::task::spawn_blocking(move || -> io::Result<BTreeMap<u64, Entry>> {
                let txn = db.begin_read().map_err(io::Error::other)?;
                let t = txn.open_table(LOG).map_err(io::Error::other)?;
                let mut out = BTreeMap::new();
                for item in t.range(start..end).map_err(io::Error::other)? {
                    let (k, v) = item.map_err(io::Error::other)?;
                    out.insert(k.value(), dec(v.value())?);
                }
                Ok(out)
            })
            .await
            .map_err(io::Error::other)??;
        entries.extend(cached);
        Ok(entries.into_values().collect())
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
        read_meta(&self.db, K_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogId> = read_meta(&self.db, K_PURGED)?;
        let cached = self.tail().values().next_back().map(|e| e.log_id());
        let last = match cached {
            Some(id) => Some(id),
            None => {
                let txn = self.db.begin_read().map_err(io::Error::other)?;
                let t = txn.open_table(LOG).map_err(io::Error::other)?;
                let last = t.last().map_err(io::Error::other)?;
                match last {
                    Some((_, v)) => Some(dec::<Entry>(v.value())?.log_id()),
                    None => None,
                }
            }
        };
        Ok(LogState {
            last_log_id: last.or(last_purged_log_id),
            last_purged_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
        let value = enc(vote)?;
        self.submit(|done| LogOp::PutMeta {
            key: K_VOTE,
            value,
            done,
        })
        .await
    }

    /// Kept so that a restarted member can re-apply what was committed before it stopped
    /// without waiting to hear from a leader.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let value = enc(&committed)?;
        self.tx
            .send(LogOp::Committed(value))
            .map_err(|_| writer_gone())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(read_meta::<Option<LogId>>(&self.db, K_COMMITTED)?.flatten())
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
        let mut rows = Vec::new();
        let mut ids = Vec::new();
        {
            let mut tail = self.tail();
            for e in entries {
                rows.push((e.index(), enc(&e)?));
                ids.push(e.log_id());
                tail.insert(e.index(), e);
            }
        }
        self.tx
            .send(LogOp::Append {
                rows,
                ids,
                callback,
            })
            .map_err(|_| writer_gone())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index() + 1);
        drop(self.tail().split_off(&from));
        self.submit(|done| LogOp::Truncate { from, done }).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let marker = enc(&log_id)?;
        let upto = log_id.index();
        {
            let mut tail = self.tail();
            let keep = tail.split_off(&(upto + 1));
            *tail = keep;
        }
        self.submit(|done| LogOp::Purge { upto, marker, done })
            .await
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
            let db = crate::store::Files::open(dir.path())
                .map(|f| f.log)
                .unwrap();
            let mut s = LogStore::new(db).unwrap();
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
        // Reopen (once the writer thread has let go of the file): everything acknowledged
        // is still there.
        let mut db = crate::store::Files::open(dir.path()).map(|f| f.log);
        for _ in 0..100 {
            if db.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            db = crate::store::Files::open(dir.path()).map(|f| f.log);
        }
        let db = db.unwrap();
        let mut s = LogStore::new(db).unwrap();
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

    #[tokio::test]
    async fn concurrent_appends_share_commits_and_stay_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::Files::open(dir.path())
            .map(|f| f.log)
            .unwrap();
        let mut s = LogStore::new(db).unwrap();
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
        assert!(s.tail().is_empty(), "flushed entries left in the tail");
    }
}
