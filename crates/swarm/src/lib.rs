//! The swarm's decisions, without I/O: which chunk a node asks which peer for, how many
//! requests it keeps in flight, when it crosses into another region or goes to the
//! origin, the endgame, and which peers it stops using; and on the uploading side, which
//! waiting request gets a free upload slot ([`upload::UploadQueue`]).
//!
//! As `quinn-proto` is to `quinn`: a [`Fetch`] is fed events with the current time
//! (`handle_*`), answers with [`Action`]s (`poll_action`) and says when it wants to be
//! woken (`poll_timeout`). It never opens a socket, never reads a clock, never spawns or
//! sleeps and never touches a file, so the node daemon's driver runs it over QUIC and a
//! simulator can run a hundred thousand of them in one process against a model network.
//! Verifying a chunk's bytes is the driver's job (BLAKE3 of what arrived); this crate is
//! only told whether it matched.

pub mod fetch;
pub mod pace;
pub mod topology;
pub mod units;
pub mod upload;

pub use fetch::{Action, Fetch, FetchConfig, PeerId, PeerInfo, Source};
pub use topology::ingress_node;
pub use units::{Unit, Units};
