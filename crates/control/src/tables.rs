//! The tables of a member's redb files, the JSON their records are kept in, and reading
//! the working set back: what the state machine's store, its archive and the state image
//! share, and the tables of a `log.redb` that an older starling kept its Raft log in
//! (imported once by the log store).

use std::io;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::de::DeserializeOwned;
use serde::Serialize;
use starling_core::state::{Goal, GoalKey, HistoryMarks, Records};
use starling_proto::{CaRecord, Release};

pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const REPOS: TableDefinition<&str, &[u8]> = TableDefinition::new("repos");
pub(crate) const BUILDS: TableDefinition<u64, &[u8]> = TableDefinition::new("builds");
pub(crate) const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
pub(crate) const RELEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("releases");
pub(crate) const GOALS: TableDefinition<&str, &[u8]> = TableDefinition::new("goals");
pub(crate) const REQUESTS: TableDefinition<u64, &[u8]> = TableDefinition::new("requests");
/// Cluster-wide singletons: the CA under "ca".
pub(crate) const CLUSTER: TableDefinition<&str, &[u8]> = TableDefinition::new("cluster");
pub(crate) const JOIN_TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("join_tokens");
pub(crate) const DEPLOYMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("deployments");
/// The notifier's progress, under "up_to".
pub(crate) const NOTIFIER: TableDefinition<&str, &[u8]> = TableDefinition::new("notifier");
pub(crate) const K_NOTIFIED: &str = "up_to";
/// The history window's counters ([`starling_core::state::HistoryMarks`]), under "marks".
pub(crate) const HISTORY: TableDefinition<&str, &[u8]> = TableDefinition::new("history");
pub(crate) const K_MARKS: &str = "marks";
pub(crate) const K_CA: &str = "ca";

pub(crate) const K_VOTE: &str = "vote";
pub(crate) const K_PURGED: &str = "last_purged";
pub(crate) const K_COMMITTED: &str = "committed";
pub(crate) const K_APPLIED: &str = "sm_last_applied";
pub(crate) const K_MEMBERSHIP: &str = "sm_membership";
pub(crate) const K_SNAPSHOT_META: &str = "snapshot_meta";
pub(crate) const K_SNAPSHOT_DATA: &str = "snapshot_data";
pub(crate) const K_FORMAT: &str = "format";

pub(crate) fn enc<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub(crate) fn dec<T: DeserializeOwned>(b: &[u8]) -> io::Result<T> {
    serde_json::from_slice(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub(crate) fn read_meta<T: DeserializeOwned>(db: &Database, key: &str) -> io::Result<Option<T>> {
    let txn = db.begin_read().map_err(io::Error::other)?;
    let t = txn.open_table(META).map_err(io::Error::other)?;
    match t.get(key).map_err(io::Error::other)? {
        Some(v) => Ok(Some(dec(v.value())?)),
        None => Ok(None),
    }
}

// ---------------------------------------------------------------------------------------
// State machine

pub(crate) fn load_records(db: &Database) -> io::Result<Records> {
    load_records_in(&db.begin_read().map_err(io::Error::other)?)
}

/// The working set as `txn` sees it.
pub(crate) fn load_records_in(txn: &redb::ReadTransaction) -> io::Result<Records> {
    let marks: HistoryMarks = read_named(txn, HISTORY)?
        .into_iter()
        .find_map(|(k, v)| (k == K_MARKS).then_some(v))
        .unwrap_or_default();
    Ok(Records {
        marks,
        repos: read_named(txn, REPOS)?.into_iter().collect(),
        builds: read_numbered(txn, BUILDS)?.into_iter().collect(),
        events: read_numbered_from(txn, EVENTS, marks.events_archived + 1)?
            .into_iter()
            .map(|(_, e)| e)
            .collect(),
        // Keyed by the record's own id, as goals are by their own fields.
        releases: read_named::<Release>(txn, RELEASES)?
            .into_iter()
            .map(|(_, r)| (r.id, r))
            .collect(),
        goals: read_named::<Goal>(txn, GOALS)?
            .into_iter()
            .map(|(_, g)| (GoalKey::of(&g), g))
            .collect(),
        requests: read_numbered(txn, REQUESTS)?.into_iter().collect(),
        ca: read_named::<CaRecord>(txn, CLUSTER)?
            .into_iter()
            .find_map(|(k, v)| (k == K_CA).then_some(v)),
        join_tokens: read_named(txn, JOIN_TOKENS)?.into_iter().collect(),
        deployments: read_numbered(txn, DEPLOYMENTS)?.into_iter().collect(),
        notified_up_to: read_named::<u64>(txn, NOTIFIER)?
            .into_iter()
            .find_map(|(k, v)| (k == K_NOTIFIED).then_some(v))
            .unwrap_or(0),
    })
}

/// A record that does not decode, named so that an operator can find it.
pub(crate) fn unreadable(table: &str, key: &dyn std::fmt::Display, e: io::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("record {key} of table {table} is unreadable: {e}"),
    )
}

pub(crate) fn read_named<T: DeserializeOwned>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<&str, &[u8]>,
) -> io::Result<Vec<(String, T)>> {
    let t = txn.open_table(def).map_err(io::Error::other)?;
    let mut out = Vec::new();
    for item in t.iter().map_err(io::Error::other)? {
        let (k, v) = item.map_err(io::Error::other)?;
        let key = k.value().to_string();
        let record = dec(v.value()).map_err(|e| unreadable(def.name(), &key, e))?;
        out.push((key, record));
    }
    Ok(out)
}

pub(crate) fn read_numbered<T: DeserializeOwned>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<u64, &[u8]>,
) -> io::Result<Vec<(u64, T)>> {
    read_numbered_from(txn, def, 0)
}

/// The records of `def` numbered `from` or more.
pub(crate) fn read_numbered_from<T: DeserializeOwned>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<u64, &[u8]>,
    from: u64,
) -> io::Result<Vec<(u64, T)>> {
    let t = txn.open_table(def).map_err(io::Error::other)?;
    let mut out = Vec::new();
    for item in t.range(from..).map_err(io::Error::other)? {
        let (k, v) = item.map_err(io::Error::other)?;
        let key = k.value();
        let record = dec(v.value()).map_err(|e| unreadable(def.name(), &key, e))?;
        out.push((key, record));
    }
    Ok(out)
}
