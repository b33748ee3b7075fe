//! The state image: what a member sends a follower that is too far behind for the log.
//!
//! A member's snapshot is its state file, as etcd's is its bbolt file: building one for
//! the log's sake only makes the state file durable up to the snapshot's last entry
//! (its cost does not grow with history). The image is made from a read transaction
//! only when a follower needs it, off the state machine's task, and streamed: neither
//! side ever holds more than one record of it in memory beyond the working set.
//!
//! Layout: [`MAGIC`], then frames of a tag byte, a 4-byte big-endian length and that many
//! bytes of JSON — first the working set ([`Records`]), then archived builds, events,
//! releases and deployments.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use redb::{ReadTransaction, ReadableTable};
use serde::de::DeserializeOwned;
use starling_core::state::Records;
use starling_proto::{Build, Deployment, Event, Release};

use crate::archive::{BUILD_ARCHIVE, DEPLOYMENT_ARCHIVE, RELEASE_ARCHIVE};
use crate::tables::{dec, enc, EVENTS};

const MAGIC: &[u8] = b"STARLING-STATE-IMAGE-1\n";
const RECORDS: u8 = 0;
const BUILD: u8 = 1;
const EVENT: u8 = 2;
const RELEASE: u8 = 3;
const DEPLOYMENT: u8 = 4;

/// Largest working set a frame may carry (it is bounded by the history window).
const MAX_RECORDS_FRAME: usize = 1 << 30;
/// Largest archived record.
const MAX_RECORD_FRAME: usize = 64 << 20;

/// A snapshot's data: the state file at a read transaction (encoded when sent), or an
/// image received into a file.
pub enum StateImage {
    Txn(Arc<ReadTransaction>),
    File(PathBuf),
}

/// One record of an image, in the order they come.
pub enum Item {
    Records(Box<Records>),
    Build(Build),
    Event(Event),
    Release(Release),
    Deployment(Deployment),
}

fn frame(out: &mut impl Write, tag: u8, json: &[u8]) -> io::Result<()> {
    let len = u32::try_from(json.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "record over 4 GiB"))?;
    out.write_all(&[tag])?;
    out.write_all(&len.to_be_bytes())?;
    out.write_all(json)
}

/// Write the image of the state file as `txn` sees it to `out`.
pub fn write(txn: &ReadTransaction, out: &mut impl Write) -> io::Result<()> {
    let records = crate::tables::load_records_in(txn)?;
    out.write_all(MAGIC)?;
    frame(out, RECORDS, &enc(&records)?)?;
    let t = txn.open_table(BUILD_ARCHIVE).map_err(io::Error::other)?;
    for row in t.iter().map_err(io::Error::other)? {
        frame(out, BUILD, row.map_err(io::Error::other)?.1.value())?;
    }
    let t = txn.open_table(EVENTS).map_err(io::Error::other)?;
    let archived = records.marks.events_archived;
    for row in t.range(..=archived).map_err(io::Error::other)? {
        frame(out, EVENT, row.map_err(io::Error::other)?.1.value())?;
    }
    let t = txn.open_table(RELEASE_ARCHIVE).map_err(io::Error::other)?;
    for row in t.iter().map_err(io::Error::other)? {
        frame(out, RELEASE, row.map_err(io::Error::other)?.1.value())?;
    }
    let t = txn
        .open_table(DEPLOYMENT_ARCHIVE)
        .map_err(io::Error::other)?;
    for row in t.iter().map_err(io::Error::other)? {
        frame(out, DEPLOYMENT, row.map_err(io::Error::other)?.1.value())?;
    }
    out.flush()
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Reads an image's records one at a time, the working set first.
pub struct Reader<R> {
    input: R,
    buf: Vec<u8>,
    started: bool,
}

impl<R: Read> Reader<R> {
    pub fn new(input: R) -> Reader<R> {
        Reader {
            input,
            buf: Vec::new(),
            started: false,
        }
    }

    /// The next record; `None` at the end of the image.
    pub fn next_item(&mut self) -> io::Result<Option<Item>> {
        if !self.started {
            let mut magic = vec![0; MAGIC.len()];
            self.input.read_exact(&mut magic)?;
            if magic != MAGIC {
                return Err(bad("not a state image"));
            }
            self.started = true;
        }
        let mut head = [0u8; 5];
        match self.input.read(&mut head[..1])? {
            0 => return Ok(None),
            _ => self.input.read_exact(&mut head[1..])?,
        }
        let tag = head[0];
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let limit = if tag == RECORDS {
            MAX_RECORDS_FRAME
        } else {
            MAX_RECORD_FRAME
        };
        if len > limit {
            return Err(bad(format!("state image frame of {len} bytes")));
        }
        self.buf.resize(len, 0);
        self.input
            .read_exact(&mut self.buf)
            .map_err(|e| bad(format!("state image cut inside a record: {e}")))?;
        fn json<T: DeserializeOwned>(b: &[u8]) -> io::Result<T> {
            dec(b)
        }
        Ok(Some(match tag {
            RECORDS => Item::Records(Box::new(json(&self.buf)?)),
            BUILD => Item::Build(json(&self.buf)?),
            EVENT => Item::Event(json(&self.buf)?),
            RELEASE => Item::Release(json(&self.buf)?),
            DEPLOYMENT => Item::Deployment(json(&self.buf)?),
            other => return Err(bad(format!("state image frame of unknown kind {other}"))),
        }))
    }

    /// The JSON of the record [`Reader::next_item`] returned last.
    pub fn json(&self) -> &[u8] {
        &self.buf
    }

    /// The working set, which comes first.
    pub fn records(&mut self) -> io::Result<Records> {
        match self.next_item()? {
            Some(Item::Records(r)) => Ok(*r),
            _ => Err(bad("state image without its records first")),
        }
    }
}
