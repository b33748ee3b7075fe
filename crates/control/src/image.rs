//! The state image: what a member sends a follower that is too far behind for the log.
//!
//! A member's snapshot is its state file, as etcd's is its bbolt file: building one for
//! the log's sake only makes the state file durable up to the snapshot's last entry
//! (its cost does not grow with history). The image is made from a read transaction
//! only when a follower needs it, off the state machine's task, and holds the working
//! set and the archive as it was at that transaction.
//!
//! Layout: [`MAGIC`], then frames of a tag byte, a 4-byte big-endian length and that many
//! bytes of JSON — first the working set ([`Records`]), then archived builds, events,
//! releases and deployments. A snapshot from before images (plain JSON of [`Records`]) still reads.

use std::io;
use std::sync::Arc;

use redb::{ReadTransaction, ReadableTable};
use starling_core::state::Records;
use starling_proto::{Build, Deployment, Event, Release};

use crate::archive::{BUILD_ARCHIVE, DEPLOYMENT_ARCHIVE, RELEASE_ARCHIVE};
use crate::store::{dec, enc, EVENTS};

const MAGIC: &[u8] = b"STARLING-STATE-IMAGE-1\n";
const RECORDS: u8 = 0;
const BUILD: u8 = 1;
const EVENT: u8 = 2;
const RELEASE: u8 = 3;
const DEPLOYMENT: u8 = 4;

/// A snapshot's data: the state file at a read transaction (encoded when sent) or
/// received bytes.
pub enum StateImage {
    File(Arc<ReadTransaction>),
    Bytes(Vec<u8>),
}

impl StateImage {
    /// The image's bytes; reads the whole state file for [`StateImage::File`]: call it
    /// off the async threads.
    pub fn into_bytes(self) -> io::Result<Vec<u8>> {
        match self {
            StateImage::Bytes(b) => Ok(b),
            StateImage::File(txn) => encode(&txn),
        }
    }
}

/// Everything an image holds.
pub struct Decoded {
    pub records: Records,
    pub builds: Vec<Build>,
    /// Events that left memory (the working set has the rest).
    pub events: Vec<Event>,
    pub releases: Vec<Release>,
    pub deployments: Vec<Deployment>,
}

fn frame(out: &mut Vec<u8>, tag: u8, json: &[u8]) -> io::Result<()> {
    let len = u32::try_from(json.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "record over 4 GiB"))?;
    out.push(tag);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(json);
    Ok(())
}

fn encode(txn: &ReadTransaction) -> io::Result<Vec<u8>> {
    let records = crate::store::load_records_in(txn)?;
    let mut out = MAGIC.to_vec();
    frame(&mut out, RECORDS, &enc(&records)?)?;
    let t = txn.open_table(BUILD_ARCHIVE).map_err(io::Error::other)?;
    for row in t.iter().map_err(io::Error::other)? {
        let (_, v) = row.map_err(io::Error::other)?;
        frame(&mut out, BUILD, v.value())?;
    }
    let t = txn.open_table(EVENTS).map_err(io::Error::other)?;
    let archived = records.marks.events_archived;
    for row in t.range(..=archived).map_err(io::Error::other)? {
        let (_, v) = row.map_err(io::Error::other)?;
        frame(&mut out, EVENT, v.value())?;
    }
    let t = txn.open_table(RELEASE_ARCHIVE).map_err(io::Error::other)?;
    for row in t.iter().map_err(io::Error::other)? {
        let (_, v) = row.map_err(io::Error::other)?;
        frame(&mut out, RELEASE, v.value())?;
    }
    let t = txn
        .open_table(DEPLOYMENT_ARCHIVE)
        .map_err(io::Error::other)?;
    for row in t.iter().map_err(io::Error::other)? {
        let (_, v) = row.map_err(io::Error::other)?;
        frame(&mut out, DEPLOYMENT, v.value())?;
    }
    Ok(out)
}

pub fn decode(bytes: &[u8]) -> io::Result<Decoded> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let Some(mut rest) = bytes.strip_prefix(MAGIC) else {
        return Ok(Decoded {
            records: dec(bytes)?,
            builds: Vec::new(),
            events: Vec::new(),
            releases: Vec::new(),
            deployments: Vec::new(),
        });
    };
    let mut records = None;
    let mut out = Decoded {
        records: Records::default(),
        builds: Vec::new(),
        events: Vec::new(),
        releases: Vec::new(),
        deployments: Vec::new(),
    };
    while let Some((&tag, after)) = rest.split_first() {
        let (len, after) = after
            .split_first_chunk::<4>()
            .ok_or_else(|| bad("state image cut inside a frame header".into()))?;
        let len = u32::from_be_bytes(*len) as usize;
        if after.len() < len {
            return Err(bad("state image cut inside a record".into()));
        }
        let (json, after) = after.split_at(len);
        rest = after;
        match tag {
            RECORDS if records.is_none() => records = Some(dec(json)?),
            BUILD => out.builds.push(dec(json)?),
            EVENT => out.events.push(dec(json)?),
            RELEASE => out.releases.push(dec(json)?),
            DEPLOYMENT => out.deployments.push(dec(json)?),
            other => return Err(bad(format!("state image frame of unknown kind {other}"))),
        }
    }
    out.records = records.ok_or_else(|| bad("state image without its records".into()))?;
    Ok(out)
}
