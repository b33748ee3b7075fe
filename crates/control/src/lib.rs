//! One control-plane member: the Raft log (a write-ahead log of its own) and the state
//! machine (redb) under openraft, the HTTP API every member serves, the webhooks, the lease
//! reaper and retention, and this member's copy of the origin store and build logs — the
//! I/O around the decisions of `starling-core`.
//!
//! It remembers and serves; it never runs a build, never trusts a body before the
//! caller's credentials are checked, and never serves on once its storage has failed.

pub mod api;
pub mod archive;
pub mod collector;
pub mod image;
pub mod log_store;
pub mod member;
pub mod metrics;
pub mod network;
pub mod notifier;
pub mod serve;
pub mod server;
pub mod store;
mod tables;
pub mod wal;

use starling_proto::{Command, Outcome};

openraft::declare_raft_types!(
    /// Raft types of the control plane: commands in, outcomes out, members addressed by
    /// their HTTP address.
    pub TypeConfig:
        D = Command,
        R = Outcome,
);

/// A member's Raft id.
pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig, store::StateMachineStore>;
