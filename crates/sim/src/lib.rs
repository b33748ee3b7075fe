//! A discrete-event simulator that runs Starling's swarm at a scale no testbed here can
//! hold: up to hundreds of thousands of nodes in several regions, on one machine.
//!
//! It owns the model network (links, fair sharing, latency), model time and the faults.
//! It never decides anything the swarm decides: every node runs the real
//! [`starling_swarm::Fetch`] (piece picker, sources by region, endgame, bad peers) and the
//! real [`starling_swarm::upload::UploadQueue`], and the members' real
//! [`starling_core::tracker::Tracker`] answers, with the timings of
//! [`starling_swarm::pace`]. What it leaves out is said where it is modelled: connection
//! set-up is a round trip, chunks are all of one size, and a node's `Have`s are the only
//! control traffic it sends.

pub mod load;
pub mod net;
pub mod report;
pub mod rng;
pub mod scenario;
pub mod world;
