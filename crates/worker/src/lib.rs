//! The build worker's parts: the `starling.toml` spec, the git mirror cache and the
//! command runner.
//!
//! This crate owns what a build worker does on its own machine: reading how a repository
//! builds itself and running that build under a timeout in its own process group. It never
//! decides which build to run (the control plane's lease does) and never records a result
//! (the worker loop reports it). The worker loop itself — leasing, heartbeats, release
//! creation and reporting — is the rest of the build-worker issue and is not written yet.

pub mod runner;
pub mod source;
pub mod spec;
