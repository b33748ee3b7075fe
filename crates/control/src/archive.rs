//! The archive: history that left the state machine's memory
//! ([`starling_core::state::HistoryWindow`]), kept in the member's state file and read
//! from there, so that a member's memory follows its working set and not its past.
//!
//! Finished builds go to `build_archive` with five small indexes — by repository, by
//! repository and status, by status, by commit, by creation time — so that each kind of
//! history query walks only rows that can match. Collected releases go to
//! `release_archive`, indexed by repository, and finished deployments no goal names go
//! to `deployment_archive`, indexed by repository. Events never move: the `events` table has
//! them all, and memory only the newest.
//!
//! A record is in one tier at a time: memory, then [`Pending`] (archived by an apply
//! batch the writer has not committed yet), then the tables. Readers look in that order,
//! so a record moving between tiers while they read is seen at least once; answers are
//! merged by id.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use starling_core::state::BuildQuery;
use starling_proto::{Build, Deployment, Event, Release, ReleaseId};

use crate::tables::{dec, EVENTS};

pub(crate) const BUILD_ARCHIVE: TableDefinition<u64, &[u8]> = TableDefinition::new("build_archive");
const BY_REPO: TableDefinition<(&str, u64), ()> = TableDefinition::new("build_archive_by_repo");
const BY_REPO_STATUS: TableDefinition<(&str, &str, u64), ()> =
    TableDefinition::new("build_archive_by_repo_status");
const BY_STATUS: TableDefinition<(&str, u64), ()> = TableDefinition::new("build_archive_by_status");
const BY_SHA: TableDefinition<(&str, u64), ()> = TableDefinition::new("build_archive_by_sha");
/// (created_at, id).
const BY_TIME: TableDefinition<(u64, u64), ()> = TableDefinition::new("build_archive_by_time");
/// By release id (hex).
pub(crate) const RELEASE_ARCHIVE: TableDefinition<&str, &[u8]> =
    TableDefinition::new("release_archive");
/// (repo, created_at, release id).
const RELEASES_BY_REPO: TableDefinition<(&str, u64, &str), ()> =
    TableDefinition::new("release_archive_by_repo");
/// (created_at, release id).
const RELEASES_BY_TIME: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("release_archive_by_time");

/// Insert one row into `table` of `txn`.
macro_rules! put {
    ($txn:expr, $table:expr, $k:expr, $v:expr) => {
        $txn.open_table($table)
            .map_err(io::Error::other)?
            .insert($k, $v)
            .map_err(io::Error::other)?
    };
}

pub(crate) const DEPLOYMENT_ARCHIVE: TableDefinition<u64, &[u8]> =
    TableDefinition::new("deployment_archive");
/// (repo, deployment id).
const DEPLOYMENTS_BY_REPO: TableDefinition<(&str, u64), ()> =
    TableDefinition::new("deployment_archive_by_repo");

/// Do `$op` (`open_table` or `delete_table`) to every archive table in `$txn`.
macro_rules! each_table {
    ($txn:expr, $op:ident) => {
        for_each_table!(
            $txn,
            $op,
            BUILD_ARCHIVE,
            BY_REPO,
            BY_REPO_STATUS,
            BY_STATUS,
            BY_SHA,
            BY_TIME,
            RELEASE_ARCHIVE,
            RELEASES_BY_REPO,
            RELEASES_BY_TIME,
            DEPLOYMENT_ARCHIVE,
            DEPLOYMENTS_BY_REPO
        )
    };
}

macro_rules! for_each_table {
    ($txn:expr, $op:ident, $($table:ident),+) => {
        $( $txn.$op($table).map_err(io::Error::other)?; )+
    };
}

/// Create every archive table, so that readers never meet a missing one.
pub(crate) fn create_tables(txn: &redb::WriteTransaction) -> io::Result<()> {
    each_table!(txn, open_table);
    Ok(())
}

/// Empty every archive table (a snapshot replaces them).
pub(crate) fn delete_tables(txn: &redb::WriteTransaction) -> io::Result<()> {
    each_table!(txn, delete_table);
    create_tables(txn)
}

/// Archive build `b` (encoded as `json`) with its index rows.
pub(crate) fn put_build(txn: &redb::WriteTransaction, b: &Build, json: &[u8]) -> io::Result<()> {
    let status = b.status.as_str();
    put!(txn, BUILD_ARCHIVE, b.id, json);
    put!(txn, BY_REPO, (b.repo.as_str(), b.id), ());
    put!(txn, BY_REPO_STATUS, (b.repo.as_str(), status, b.id), ());
    put!(txn, BY_STATUS, (status, b.id), ());
    put!(txn, BY_SHA, (b.sha.as_str(), b.id), ());
    put!(txn, BY_TIME, (b.created_at, b.id), ());
    Ok(())
}

/// Archive release `r` (encoded as `json`) with its index row.
pub(crate) fn put_release(
    txn: &redb::WriteTransaction,
    r: &Release,
    json: &[u8],
) -> io::Result<()> {
    let id = r.id.to_hex();
    put!(txn, RELEASE_ARCHIVE, id.as_str(), json);
    put!(
        txn,
        RELEASES_BY_REPO,
        (r.repo.as_str(), r.created_at, id.as_str()),
        ()
    );
    put!(txn, RELEASES_BY_TIME, (r.created_at, id.as_str()), ());
    Ok(())
}

/// Archive deployment `d` (encoded as `json`) with its index row.
pub(crate) fn put_deployment(
    txn: &redb::WriteTransaction,
    d: &Deployment,
    json: &[u8],
) -> io::Result<()> {
    put!(txn, DEPLOYMENT_ARCHIVE, d.id, json);
    put!(txn, DEPLOYMENTS_BY_REPO, (d.repo.as_str(), d.id), ());
    Ok(())
}

/// Records archived by apply batches that the writer has not committed yet.
#[derive(Debug, Default)]
pub struct Pending {
    builds: BTreeMap<u64, Build>,
    releases: BTreeMap<ReleaseId, Release>,
    deployments: BTreeMap<u64, Deployment>,
}

impl Pending {
    pub(crate) fn add(
        &mut self,
        builds: Vec<Build>,
        releases: Vec<Release>,
        deployments: Vec<Deployment>,
    ) {
        self.builds.extend(builds.into_iter().map(|b| (b.id, b)));
        self.releases
            .extend(releases.into_iter().map(|r| (r.id, r)));
        self.deployments
            .extend(deployments.into_iter().map(|d| (d.id, d)));
    }

    /// Forget what a commit made readable from the tables.
    pub(crate) fn committed(
        &mut self,
        builds: &[u64],
        releases: &[ReleaseId],
        deployments: &[u64],
    ) {
        for id in deployments {
            self.deployments.remove(id);
        }
        for id in builds {
            self.builds.remove(id);
        }
        for id in releases {
            self.releases.remove(id);
        }
    }
}

/// Reads the archive of one member's state file.
#[derive(Clone)]
pub struct Archive {
    db: Arc<Database>,
    pending: Arc<Mutex<Pending>>,
}

/// An index walked newest first, yielding build ids.
type Ids<'a> = Box<dyn Iterator<Item = io::Result<u64>> + 'a>;

impl Archive {
    pub(crate) fn new(db: Arc<Database>, pending: Arc<Mutex<Pending>>) -> Archive {
        Archive { db, pending }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn build(&self, id: u64) -> io::Result<Option<Build>> {
        if let Some(b) = self.pending().builds.get(&id) {
            return Ok(Some(b.clone()));
        }
        let txn = self.db.begin_read().map_err(io::Error::other)?;
        let t = txn.open_table(BUILD_ARCHIVE).map_err(io::Error::other)?;
        let got = t.get(id).map_err(io::Error::other)?;
        got.map(|v| dec(v.value())).transpose()
    }

    /// Archived builds matching `q`, newest first, at most `q.limit()`. Walks the index
    /// that narrows the query most: commit prefix, then repository and status,
    /// repository, status, time range; all of them when nothing narrows it.
    pub fn builds(&self, q: &BuildQuery) -> io::Result<Vec<Build>> {
        let limit = q.limit();
        let mut found: Vec<Build> = self
            .pending()
            .builds
            .values()
            .rev()
            .filter(|b| q.matches(b))
            .take(limit)
            .cloned()
            .collect();
        let txn = self.db.begin_read().map_err(io::Error::other)?;
        let builds = txn.open_table(BUILD_ARCHIVE).map_err(io::Error::other)?;
        let by_repo_status;
        let by_repo;
        let by_status;
        let by_time;
        let ids: Ids = if let Some(prefix) = &q.sha {
            // Commit order is not id order: gather the ids, then walk them newest first.
            let t = txn.open_table(BY_SHA).map_err(io::Error::other)?;
            let mut ids = Vec::new();
            for row in t.range((prefix.as_str(), 0)..).map_err(io::Error::other)? {
                let (k, _) = row.map_err(io::Error::other)?;
                let (sha, id) = k.value();
                if !sha.starts_with(prefix.as_str()) {
                    break;
                }
                ids.push(id);
            }
            ids.sort_unstable_by(|a, b| b.cmp(a));
            Box::new(ids.into_iter().map(Ok))
        } else if let (Some(repo), Some(status)) = (&q.repo, q.status) {
            by_repo_status = txn.open_table(BY_REPO_STATUS).map_err(io::Error::other)?;
            let (r, s) = (repo.as_str(), status.as_str());
            let rows = by_repo_status
                .range((r, s, 0)..=(r, s, u64::MAX))
                .map_err(io::Error::other)?;
            Box::new(
                rows.rev()
                    .map(|row| row.map(|(k, _)| k.value().2).map_err(io::Error::other)),
            )
        } else if let Some(repo) = &q.repo {
            by_repo = txn.open_table(BY_REPO).map_err(io::Error::other)?;
            let r = repo.as_str();
            let rows = by_repo
                .range((r, 0)..=(r, u64::MAX))
                .map_err(io::Error::other)?;
            Box::new(
                rows.rev()
                    .map(|row| row.map(|(k, _)| k.value().1).map_err(io::Error::other)),
            )
        } else if let Some(status) = q.status {
            by_status = txn.open_table(BY_STATUS).map_err(io::Error::other)?;
            let s = status.as_str();
            let rows = by_status
                .range((s, 0)..=(s, u64::MAX))
                .map_err(io::Error::other)?;
            Box::new(
                rows.rev()
                    .map(|row| row.map(|(k, _)| k.value().1).map_err(io::Error::other)),
            )
        } else if q.since.is_some() || q.until.is_some() {
            by_time = txn.open_table(BY_TIME).map_err(io::Error::other)?;
            let from = (q.since.unwrap_or(0), 0);
            let to = (q.until.unwrap_or(u64::MAX), 0);
            let rows = by_time.range(from..to).map_err(io::Error::other)?;
            Box::new(
                rows.rev()
                    .map(|row| row.map(|(k, _)| k.value().1).map_err(io::Error::other)),
            )
        } else {
            let rows = builds.iter().map_err(io::Error::other)?;
            Box::new(
                rows.rev()
                    .map(|row| row.map(|(k, _)| k.value()).map_err(io::Error::other)),
            )
        };
        let mut matched = 0;
        for id in ids {
            if matched == limit {
                break;
            }
            let Some(row) = builds.get(id?).map_err(io::Error::other)? else {
                continue;
            };
            let b: Build = dec(row.value())?;
            if q.matches(&b) {
                matched += 1;
                found.push(b);
            }
        }
        found.sort_unstable_by_key(|b| std::cmp::Reverse(b.id));
        found.dedup_by_key(|b| b.id);
        found.truncate(limit);
        Ok(found)
    }

    pub fn deployment(&self, id: u64) -> io::Result<Option<Deployment>> {
        if let Some(d) = self.pending().deployments.get(&id) {
            return Ok(Some(d.clone()));
        }
        let txn = self.db.begin_read().map_err(io::Error::other)?;
        let t = txn
            .open_table(DEPLOYMENT_ARCHIVE)
            .map_err(io::Error::other)?;
        let got = t.get(id).map_err(io::Error::other)?;
        got.map(|v| dec(v.value())).transpose()
    }

    /// Archived deployments of `repo` (all when `None`), newest first, at most `limit`.
    pub fn deployments(&self, repo: Option<&str>, limit: usize) -> io::Result<Vec<Deployment>> {
        let mut found: Vec<Deployment> = self
            .pending()
            .deployments
            .values()
            .rev()
            .filter(|d| repo.is_none_or(|r| d.repo == r))
            .take(limit)
            .cloned()
            .collect();
        let txn = self.db.begin_read().map_err(io::Error::other)?;
        let t = txn
            .open_table(DEPLOYMENT_ARCHIVE)
            .map_err(io::Error::other)?;
        let ids: Vec<u64> = if let Some(r) = repo {
            let ix = txn
                .open_table(DEPLOYMENTS_BY_REPO)
                .map_err(io::Error::other)?;
            let rows = ix.range((r, 0)..=(r, u64::MAX)).map_err(io::Error::other)?;
            rows.rev()
                .take(limit)
                .map(|row| row.map(|(k, _)| k.value().1))
                .collect::<Result<_, _>>()
                .map_err(io::Error::other)?
        } else {
            let rows = t.iter().map_err(io::Error::other)?;
            rows.rev()
                .take(limit)
                .map(|row| row.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()
                .map_err(io::Error::other)?
        };
        for id in ids {
            if let Some(v) = t.get(id).map_err(io::Error::other)? {
                found.push(dec(v.value())?);
            }
        }
        found.sort_unstable_by_key(|d| std::cmp::Reverse(d.id));
        found.dedup_by_key(|d| d.id);
        found.truncate(limit);
        Ok(found)
    }

    /// Events with an index above `after` and below `before`, at most `limit`.
    pub fn events(&self, after: u64, before: u64, limit: usize) -> io::Result<Vec<Event>> {
        let txn = self.db.begin_read().map_err(io::Error::other)?;
        let t = txn.open_table(EVENTS).map_err(io::Error::other)?;
        let mut out = Vec::new();
        if after.saturating_add(1) >= before {
            return Ok(out);
        }
        for row in t.range(after + 1..before).map_err(io::Error::other)? {
            if out.len() == limit {
                break;
            }
            let (_, v) = row.map_err(io::Error::other)?;
            out.push(dec(v.value())?);
        }
        Ok(out)
    }

    /// Archived (collected) releases of `repo`, or of every repository, newest first, at
    /// most `limit`.
    pub fn releases(&self, repo: Option<&str>, limit: usize) -> io::Result<Vec<Release>> {
        let mut found: Vec<Release> = self
            .pending()
            .releases
            .values()
            .filter(|r| repo.is_none_or(|name| r.repo == name))
            .cloned()
            .collect();
        let txn = self.db.begin_read().map_err(io::Error::other)?;
        let t = txn.open_table(RELEASE_ARCHIVE).map_err(io::Error::other)?;
        let ids: Vec<String> = if let Some(name) = repo {
            let ix = txn.open_table(RELEASES_BY_REPO).map_err(io::Error::other)?;
            let range = ix
                .range((name, 0, "")..=(name, u64::MAX, "~"))
                .map_err(io::Error::other)?;
            range
                .rev()
                .take(limit)
                .map(|row| row.map(|(k, _)| k.value().2.to_string()))
                .collect::<Result<_, _>>()
                .map_err(io::Error::other)?
        } else {
            let ix = txn.open_table(RELEASES_BY_TIME).map_err(io::Error::other)?;
            let rows = ix.iter().map_err(io::Error::other)?;
            rows.rev()
                .take(limit)
                .map(|row| row.map(|(k, _)| k.value().1.to_string()))
                .collect::<Result<_, _>>()
                .map_err(io::Error::other)?
        };
        let mut rows = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(v) = t.get(id.as_str()).map_err(io::Error::other)? {
                rows.push(dec::<Release>(v.value())?);
            }
        }
        found.extend(rows);
        found.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.build.cmp(&a.build)));
        found.dedup_by_key(|r| r.id);
        found.truncate(limit);
        Ok(found)
    }
}
