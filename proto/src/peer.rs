//! The peer-to-peer wire protocol (version [`PROTOCOL_VERSION`]): what nodes, workers
//! and control members (serving the origin store) say to each other over QUIC.
//! Specified in `PROTOCOL.md`.
//!
//! Every message is a [`Frame`]: a 4-byte big-endian length, then that many bytes of
//! postcard. A length over [`MAX_FRAME`] is refused before anything is buffered; bytes
//! that do not decode are an error for that connection only. Chunk bytes are not framed:
//! a [`Frame::Chunk`] header is followed by exactly `len` raw bytes on the same stream,
//! which the receiver hashes before it keeps or passes on a byte.

use serde::{Deserialize, Serialize};

use crate::{AppReport, ChunkHash, ReleaseId};

/// The TLS application protocol (ALPN) of version 2.
pub const ALPN: &[u8] = b"starling-peer/3";
/// Sent in [`Frame::Hello`]; a peer speaking another version is closed with a reason.
/// Version 2: `Announce` reports each repository (`apps`) instead of one `current`.
/// Version 5: `Hold`. Version 6: `Peers` says whether the view is `complete`, and each
/// `AppReport` which release it is `fetching`. Version 7: `Get` says how much of its
/// release the asker holds. Version 8: `Have` and `Get` name units (runs of chunks,
/// `starling_swarm::units`), and `Get` lists the unit's chunks the asker lacks.
pub const PROTOCOL_VERSION: u32 = 8;
/// Largest frame body.
pub const MAX_FRAME: usize = 1024 * 1024;
/// Most chunk names one [`Frame::Have`] carries (about 530 KiB encoded).
pub const MAX_HAVE: usize = 16 * 1024;
/// Most chunks one [`Frame::Get`] asks for.
pub const MAX_GET_CHUNKS: usize = 64;
/// Largest chunk a peer sends or accepts: the FastCDC maximum with room to spare, as the
/// origin store accepts.
pub const MAX_CHUNK_BYTES: u32 = 8 * 1024 * 1024;
/// Longest node, region or reason string.
pub const MAX_NAME: usize = 256;
/// Largest manifest a peer sends or accepts, as the origin store accepts.
pub const MAX_MANIFEST_BYTES: u32 = 64 * 1024 * 1024;
/// Most releases one `Announce` names, and most peers one `Peers` carries.
pub const MAX_LIST: usize = 256;
/// Longest error a node reports for one repository.
pub const MAX_REASON: usize = 1024;

/// Why a peer will not send a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// It does not hold it (any more).
    NotHeld,
    /// Its upload slots are taken; ask someone else or later.
    Busy,
}

/// One message. On a connection's first bidirectional stream (the *control stream*)
/// each side first sends `Hello`, then `Want`/`Have`/`Goodbye` as they come. Every other
/// bidirectional stream carries one request: `Get` from the asker, answered by `Chunk`
/// (and the bytes) or `Refuse`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    Hello {
        version: u32,
        /// The sender's node name and region (a control member says its member name and
        /// the region it serves from).
        node: String,
        region: String,
    },
    /// The sender is fetching `release`: the receiver answers with what it holds of it.
    Want {
        release: ReleaseId,
    },
    /// The sender holds these units of `release` whole (all of them at first, then as
    /// they arrive), at most [`MAX_HAVE`] per frame.
    Have {
        release: ReleaseId,
        chunks: Vec<ChunkHash>,
    },
    /// Send `chunks` (at most [`MAX_GET_CHUNKS`], in this order), which are of the unit
    /// named `chunk`. `progress`: how much of the release being fetched the sender
    /// holds, in 256ths; an uploader serves those that hold least first.
    Get {
        chunk: ChunkHash,
        chunks: Vec<ChunkHash>,
        progress: u8,
    },
    /// `len` bytes of `chunk` follow.
    Chunk {
        chunk: ChunkHash,
        len: u32,
    },
    Refuse {
        chunk: ChunkHash,
        why: Refusal,
    },
    /// The sender closes the connection, and says why.
    Goodbye {
        reason: String,
    },
    /// On a request stream: the manifest of `release`, answered by `Manifest` (and the
    /// bytes) or `Refuse`.
    GetManifest {
        release: ReleaseId,
    },
    /// `len` bytes of `release`'s encoded manifest follow; they hash to the release id.
    Manifest {
        release: ReleaseId,
        len: u32,
    },
    /// The answer to `GetManifest` when the sender does not hold it.
    NoManifest {
        release: ReleaseId,
    },
    /// On the control stream, to a control member: where this node serves chunks, and
    /// which releases it holds or is fetching. The member answers `Peers` for each
    /// release in `fetching`.
    Announce {
        addr: String,
        holds: Vec<ReleaseId>,
        fetching: Vec<ReleaseId>,
        /// What it does with each of its repositories.
        apps: Vec<AppReport>,
    },
    /// Peers to fetch `release` from: the asker's region first. `gateway`: the asker
    /// is one of its region's gateways for the release. `complete`: every node that runs
    /// the asker's repository has announced the release, so the gateways named are the
    /// release's for good.
    Peers {
        release: ReleaseId,
        peers: Vec<PeerAddr>,
        gateway: bool,
        complete: bool,
    },
    /// On the control stream, from a fetching node: `hold` its requests that wait for
    /// the receiver's upload slots (it receives as many chunks at once as it takes), or
    /// send them again (`false`). Held requests keep their places in the queue.
    Hold {
        hold: bool,
    },
}

/// A peer as the tracker hands it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddr {
    pub node: String,
    pub region: String,
    pub addr: String,
    /// It is fetching the release too, rather than holding it whole.
    pub fetching: bool,
    /// It is a gateway of its region for the release: it takes a share of bringing the
    /// release's chunks into its region.
    pub gateway: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("frame breaks a limit: {0}")]
    Limit(&'static str),
}

impl Frame {
    /// Check the limits a decoded frame must keep.
    fn check(&self) -> Result<(), WireError> {
        let long = |s: &str| s.len() > MAX_NAME;
        match self {
            Frame::Hello { node, region, .. } if long(node) || long(region) => {
                Err(WireError::Limit("node or region name over 256 bytes"))
            }
            Frame::Have { chunks, .. } if chunks.len() > MAX_HAVE => {
                Err(WireError::Limit("more than 16384 chunks in one Have"))
            }
            Frame::Get { chunks, .. } if chunks.is_empty() || chunks.len() > MAX_GET_CHUNKS => {
                Err(WireError::Limit("a Get of no chunk or of more than 64"))
            }
            Frame::Chunk { len, .. } if *len > MAX_CHUNK_BYTES => {
                Err(WireError::Limit("chunk over 8 MiB"))
            }
            Frame::Goodbye { reason } if long(reason) => {
                Err(WireError::Limit("reason over 256 bytes"))
            }
            Frame::Manifest { len, .. } if *len > MAX_MANIFEST_BYTES => {
                Err(WireError::Limit("manifest over 64 MiB"))
            }
            Frame::Announce {
                addr,
                holds,
                fetching,
                apps,
            } if long(addr)
                || holds.len() > MAX_LIST
                || fetching.len() > MAX_LIST
                || apps.len() > MAX_LIST
                || apps.iter().any(|a| {
                    long(&a.repo) || a.error.as_ref().is_some_and(|e| e.len() > MAX_REASON)
                }) =>
            {
                Err(WireError::Limit("announce over its limits"))
            }
            Frame::Peers { peers, .. }
                if peers.len() > MAX_LIST
                    || peers
                        .iter()
                        .any(|p| long(&p.node) || long(&p.region) || long(&p.addr)) =>
            {
                Err(WireError::Limit("peer list over its limits"))
            }
            _ => Ok(()),
        }
    }

    /// The frame as it goes on the wire: length prefix and body.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        self.check()?;
        let body = postcard::to_allocvec(self).map_err(|e| WireError::Malformed(e.to_string()))?;
        if body.len() > MAX_FRAME {
            return Err(WireError::TooLarge(body.len()));
        }
        let mut out = Vec::with_capacity(4 + body.len());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// The body length a 4-byte prefix announces, refused if over the limit: read the
    /// prefix, check it with this, then read exactly that many bytes.
    pub fn body_len(prefix: [u8; 4]) -> Result<usize, WireError> {
        let len = u32::from_be_bytes(prefix) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        Ok(len)
    }

    /// Decode a body read after its prefix.
    pub fn decode_body(body: &[u8]) -> Result<Frame, WireError> {
        let frame: Frame =
            postcard::from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))?;
        frame.check()?;
        Ok(frame)
    }
}

/// Frames out of a byte stream that arrives in pieces.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `None` until one has arrived. After an error the stream is
    /// unusable: close the connection.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        let Some(prefix) = self.buf.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = Frame::body_len(*prefix)?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = Frame::decode_body(&self.buf[4..4 + len])?;
        self.buf.drain(..4 + len);
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_frame() -> Vec<Frame> {
        let c = ChunkHash::of(b"c");
        let r = ReleaseId::of(b"r");
        vec![
            Frame::Hello {
                version: PROTOCOL_VERSION,
                node: "eu-1-n3".into(),
                region: "eu-1".into(),
            },
            Frame::Want { release: r },
            Frame::Have {
                release: r,
                chunks: vec![c, ChunkHash::of(b"d")],
            },
            Frame::Get {
                chunk: c,
                chunks: vec![c, ChunkHash::of(b"e")],
                progress: 7,
            },
            Frame::Chunk {
                chunk: c,
                len: 1 << 20,
            },
            Frame::Refuse {
                chunk: c,
                why: Refusal::Busy,
            },
            Frame::Goodbye {
                reason: "bye".into(),
            },
            Frame::GetManifest { release: r },
            Frame::NoManifest { release: r },
            Frame::Manifest {
                release: r,
                len: 1000,
            },
            Frame::Announce {
                addr: "10.0.0.1:7000".into(),
                holds: vec![r],
                fetching: vec![],
                apps: vec![AppReport {
                    release: Some(r),
                    activated_at: Some(1),
                    state: crate::AppState::Failed,
                    error: Some("health: exit status 1".into()),
                    ..AppReport::idle("acme/web")
                }],
            },
            Frame::Peers {
                release: r,
                peers: vec![PeerAddr {
                    node: "n".into(),
                    region: "eu".into(),
                    addr: "10.0.0.2:7000".into(),
                    fetching: true,
                    gateway: true,
                }],
                gateway: false,
                complete: true,
            },
            Frame::Hold { hold: true },
        ]
    }

    #[test]
    fn frames_round_trip_whole_and_in_pieces() {
        let mut wire = Vec::new();
        for f in every_frame() {
            wire.extend(f.encode().unwrap());
        }
        let mut d = FrameDecoder::default();
        let mut got = Vec::new();
        // One byte at a time: a frame is returned only once all of it is there.
        for b in &wire {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, every_frame());
    }

    #[test]
    fn limits_hold_both_ways() {
        let huge = (MAX_FRAME as u32 + 1).to_be_bytes();
        assert_eq!(
            Frame::body_len(huge),
            Err(WireError::TooLarge(MAX_FRAME + 1))
        );
        let mut d = FrameDecoder::default();
        d.push(&u32::MAX.to_be_bytes());
        assert!(d.next_frame().is_err(), "refused from the prefix alone");
        let too_many = Frame::Have {
            release: ReleaseId::of(b"r"),
            chunks: vec![ChunkHash::of(b"c"); MAX_HAVE + 1],
        };
        assert!(too_many.encode().is_err());
        for n in [0, MAX_GET_CHUNKS + 1] {
            let get = Frame::Get {
                chunk: ChunkHash::of(b"u"),
                chunks: vec![ChunkHash::of(b"c"); n],
                progress: 0,
            };
            assert!(get.encode().is_err(), "a Get of {n} chunks");
        }
        let big = Frame::Chunk {
            chunk: ChunkHash::of(b"c"),
            len: MAX_CHUNK_BYTES + 1,
        };
        assert!(big.encode().is_err());
        // Made by hand, as a hostile peer would: still refused when decoded.
        let body = postcard::to_allocvec(&big).unwrap();
        assert!(matches!(
            Frame::decode_body(&body),
            Err(WireError::Limit(_))
        ));
        let long_error = Frame::Announce {
            addr: "a".into(),
            holds: vec![],
            fetching: vec![],
            apps: vec![AppReport {
                state: crate::AppState::Failed,
                error: Some("e".repeat(MAX_REASON + 1)),
                ..AppReport::idle("r")
            }],
        };
        assert!(long_error.encode().is_err());
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        // A fixed-seed generator: the same bytes on every run.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = Frame::decode_body(&body);
            let mut d = FrameDecoder::default();
            d.push(&(len as u32).to_be_bytes());
            d.push(&body);
            let _ = d.next_frame();
        }
        // Every frame cut short is "need more", not an error or a wrong frame.
        for f in every_frame() {
            let wire = f.encode().unwrap();
            let mut d = FrameDecoder::default();
            d.push(&wire[..wire.len() - 1]);
            assert_eq!(d.next_frame(), Ok(None));
        }
    }
}
