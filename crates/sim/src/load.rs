//! What a fleet of N nodes asks of each control member, against what a member is
//! measured to sustain.
//!
//! Rates follow from the node daemon's timings ([`starling_swarm::pace`]): every node
//! announces itself to every member every [`ANNOUNCE_EVERY`], and while it fetches asks
//! every member's tracker at once, 0.1, 0.4, 0.8 and 1 s later, then every
//! [`TRACKER_ASK_EVERY`]; it keeps one QUIC connection to each member and one goal
//! long-poll (HTTP) to one member, renewed every [`GOAL_POLL`]. Reports ride on the
//! announcements (soft state): nothing a node does is a Raft write. The tracker's cost
//! is measured here, on this machine, with the real [`Tracker`] holding N nodes.

use std::time::{Duration, Instant};

use starling_core::tracker::{Announce, Tracker};
use starling_proto::{AppReport, ReleaseId};
use starling_swarm::pace::{
    ANNOUNCE_EVERY, GOAL_POLL, REGION_GATEWAYS, TRACKER_ASK_EVERY, TRACKER_PEERS, TRACKER_TTL,
};

/// One fleet size's load on one member.
#[derive(Debug, Clone)]
pub struct Load {
    pub nodes: usize,
    /// Announcements per second when nothing is deployed.
    pub announces_idle: f64,
    /// Tracker answers per second while the whole fleet fetches (after the first second).
    pub asks_fetching: f64,
    /// Measured: one announcement and its answer on a tracker holding every node, µs.
    pub answer_us: f64,
    /// Tracker work per second while the fleet fetches, in cores.
    pub tracker_cores: f64,
    /// Goal long-polls answered per second, if every node polls this member.
    pub polls: f64,
}

/// Build a tracker holding `nodes` nodes in `regions` regions, all fetching one release,
/// and time `asks` announcements with their answers.
pub fn measure(nodes: usize, regions: usize, asks: usize) -> Load {
    let mut t = Tracker::new(TRACKER_TTL, TRACKER_PEERS, REGION_GATEWAYS);
    let release = ReleaseId::of(b"load");
    let t0 = Instant::now();
    let announce = |k: usize| Announce {
        node: format!("r{}-n{k}", k % regions),
        region: format!("r{}", k % regions),
        addr: format!("10.{}.{}.{}:7000", k >> 16, (k >> 8) & 255, k & 255),
        holds: Vec::new(),
        fetching: vec![release],
        apps: vec![AppReport {
            fetching: Some(release),
            ..AppReport::idle("load/app")
        }],
    };
    for k in 0..nodes {
        t.announce(announce(k), t0);
    }
    let clock = Instant::now();
    let mut named = 0usize;
    for i in 0..asks {
        let k = (i * 7919) % nodes;
        let a = announce(k);
        let (node, region) = (a.node.clone(), a.region.clone());
        t.announce(a, t0);
        named += t.peers(&node, &region, &release, t0).peers.len();
    }
    let answer = clock.elapsed().as_secs_f64() / asks.max(1) as f64;
    assert!(named > 0 || nodes < 2, "the tracker named no peers");
    let n = nodes as f64;
    let per = |d: Duration| n / d.as_secs_f64();
    let asks_fetching = per(TRACKER_ASK_EVERY);
    Load {
        nodes,
        announces_idle: per(ANNOUNCE_EVERY),
        asks_fetching,
        answer_us: answer * 1e6,
        tracker_cores: asks_fetching * answer,
        polls: per(GOAL_POLL),
    }
}

impl Load {
    pub fn header() -> &'static str {
        "| nodes | announces/s (idle) | tracker asks/s (fetching) | µs per ask (measured) | tracker cores | goal polls/s | QUIC connections | HTTP connections (one member polled) |\n|---|---|---|---|---|---|---|---|"
    }

    pub fn line(&self) -> String {
        format!(
            "| {} | {:.0} | {:.0} | {:.1} | {:.3} | {:.0} | {} | {} |",
            self.nodes,
            self.announces_idle,
            self.asks_fetching,
            self.answer_us,
            self.tracker_cores,
            self.polls,
            // Every node holds a QUIC connection to every member, and an HTTP one to
            // the member it polls (all of them, if they all poll this one).
            self.nodes,
            self.nodes,
        )
    }
}
