//! The build worker: the `starling.toml` spec, the git mirror cache, the command runner and
//! the loop that ties them to the control plane's lease API.
//!
//! This crate owns what a build worker does on its own machine: reading how a repository
//! builds itself, running that build — untrusted code — under a deadline, isolated from the
//! worker (its own PID namespace, an unprivileged user), and turning its output into a
//! release pushed to the origin store. It never decides which build runs (the control
//! plane's lease does), never writes history itself (it reports through the API, and the
//! control plane records), and never lets a build see its credentials.

pub mod metrics;
pub mod runner;
pub mod source;
pub mod spec;
pub mod worker;
