//! The node daemon's parts. Today: fetching one release from the swarm ([`fetcher`]),
//! driving `starling-swarm`'s decisions over `starling-peer`'s QUIC connections. Still to
//! come for the distribution issue: registration, the goal long-poll, unpacking,
//! activation and reports.
//!
//! It owns the node's side effects (connections, its chunk store, its processes); the
//! decisions stay in `starling-swarm`.

pub mod fetcher;
