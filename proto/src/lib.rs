//! Starling's wire vocabulary.
//!
//! This crate owns every type that crosses a process boundary: the records the public
//! HTTP API returns (`Build`, `Repo`, `Event`, …), the requests it accepts, and the
//! commands that the control plane replicates through Raft. It is pure data — no I/O,
//! no clocks, no policy — so that every process (control member, worker, node, CLI)
//! agrees on one spelling of each field. Field names are part of the public interface
//! (`SPEC.md` beside this crate); renaming one is a breaking change.

pub mod api;
pub mod command;
pub mod deploy;
mod duration;
pub mod ids;
pub mod join_token;
pub mod kinds;
pub mod names;
pub mod peer;
pub mod redact;
pub mod routes;

pub use api::*;
pub use command::*;
pub use deploy::*;
pub use duration::{parse_duration, parse_size};
pub use ids::{short, ChunkHash, DigestError, ReleaseId, WorkerId};
pub use kinds::{EventKind, QueueResult};
pub use names::{commit_id, env_name, repo_name, NameError};

/// Milliseconds since the Unix epoch. Every timestamp in Starling is one of these,
/// chosen by the Raft leader when it proposes a command so that applying the log is
/// deterministic on every member.
pub type Millis = u64;
pub mod release;
