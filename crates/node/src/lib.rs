//! The node daemon (`starling node`, [`daemon`]): enrolment, announcing itself to the
//! control members, and for each repository fetching the goal's release from the swarm
//! ([`fetcher`], driving `starling-swarm`'s decisions over `starling-peer`'s QUIC
//! connections), unpacking it and switching to it.
//!
//! It owns the node's side effects (connections, its chunk store, its processes); the
//! decisions stay in `starling-swarm`.

pub mod app;
pub mod daemon;
pub mod fetcher;
pub mod metrics;
