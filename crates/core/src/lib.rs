//! Starling's decisions, as plain data in and data out: the replicated state machine and
//! its `apply`, the lease reaper, what a webhook delivery means, what retention lets go,
//! where build output goes in a log, how a build's end is reported, the rollout
//! planner (which wave to start, when a wave is done or failed), and the tracker's
//! soft state (which node serves which release). The swarm's own decisions live in
//! `starling-swarm`, on the same terms.
//!
//! This crate owns no I/O: it never opens a file or a socket, never reads a clock (the
//! time is an argument), never spawns or sleeps, and does not depend on tokio. That is
//! what lets every member apply the same commands to the same result, and what lets each
//! decision be tested without a cluster. `quinn-proto` is the model; the crates around
//! it (`starling-control`, `starling-worker`) do the I/O and call in here.

pub mod build_log;
pub mod build_result;
pub mod notify;
pub mod reaper;
pub mod retention;
pub mod retry;
pub mod rollout;
pub mod state;
pub mod tracker;
pub mod webhook;
