//! This member's Prometheus metrics, kept with `prometheus-client`: counters and
//! histograms updated where things happen, gauges read from the state at scrape time.
//!
//! Build and lease figures are counted where commands are applied, so every member
//! reports the same history (each since its own start); proposal and webhook figures are
//! counted where the request was handled.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use starling_core::state::ControlState;
use starling_proto::{BuildStatus, Event, EventKind};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    forge: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProposalLabels {
    command: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// The registry and every metric in it.
#[derive(Debug)]
pub struct ControlMetrics {
    registry: Registry,
    webhooks: Family<WebhookLabels, Counter>,
    proposals: Family<ProposalLabels, Counter>,
    proposal_seconds: Histogram,
    apply_seconds: Histogram,
    snapshot_seconds: Histogram,
    applied_entries: Counter,
    lease_expiries: Counter,
    builds_finished: Family<StatusLabels, Counter>,
    build_seconds: Histogram,
    origin_chunk_bytes: Counter,
    origin_chunks: Counter,
    deployments_finished: Family<StatusLabels, Counter>,
    deploy_seconds: Histogram,
    wave_seconds: Histogram,
    rollbacks: Family<KindLabels, Counter>,
    // Read from the state at scrape time.
    raft_term: Gauge,
    raft_is_leader: Gauge,
    raft_last_applied: Gauge,
    raft_members: Gauge,
    queue_depth: Gauge,
    running: Gauge,
    events: Gauge<u64, AtomicU64>,
    lease_waiters: Gauge,
}

/// Holds a gauge one higher for as long as it lives.
#[derive(Debug)]
pub struct Raised(Gauge);

impl Drop for Raised {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the scrape reads from Raft's metrics.
#[derive(Debug, Clone, Copy)]
pub struct RaftFigures {
    pub term: u64,
    pub is_leader: bool,
    pub last_applied: u64,
    pub members: usize,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControlMetrics {
    pub fn new() -> Self {
        // 1 ms .. ~65 s: proposals and applies are milliseconds, stalls are seconds.
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 17));
        // 1 s .. ~4.5 h.
        let build_seconds = Histogram::new(exponential_buckets(1.0, 2.0, 15));
        let mut m = ControlMetrics {
            registry: Registry::with_prefix("starling"),
            webhooks: Family::default(),
            proposals: Family::default(),
            proposal_seconds: latency(),
            apply_seconds: latency(),
            snapshot_seconds: latency(),
            applied_entries: Counter::default(),
            lease_expiries: Counter::default(),
            builds_finished: Family::default(),
            build_seconds,
            origin_chunk_bytes: Counter::default(),
            origin_chunks: Counter::default(),
            deployments_finished: Family::default(),
            deploy_seconds: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            wave_seconds: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            rollbacks: Family::default(),
            raft_term: Gauge::default(),
            raft_is_leader: Gauge::default(),
            raft_last_applied: Gauge::default(),
            raft_members: Gauge::default(),
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            events: Gauge::default(),
            lease_waiters: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register(
            "webhooks",
            "Webhook deliveries by forge and outcome",
            m.webhooks.clone(),
        );
        r.register(
            "proposals",
            "Commands proposed by this member, by command and result",
            m.proposals.clone(),
        );
        r.register(
            "proposal_seconds",
            "Time from proposing a command to its outcome (commit and apply)",
            m.proposal_seconds.clone(),
        );
        r.register(
            "apply_seconds",
            "Time to apply one batch of committed entries and hand its rows to the writer",
            m.apply_seconds.clone(),
        );
        r.register(
            "snapshot_seconds",
            "Time to take a snapshot: making the state file durable up to its last entry",
            m.snapshot_seconds.clone(),
        );
        r.register(
            "applied_entries",
            "Log entries applied to the state machine",
            m.applied_entries.clone(),
        );
        r.register(
            "lease_expiries",
            "Build leases that lapsed (the build was requeued or failed)",
            m.lease_expiries.clone(),
        );
        r.register(
            "builds_finished",
            "Builds that reached a final status, by status",
            m.builds_finished.clone(),
        );
        r.register(
            "build_seconds",
            "Time from a build's lease to its final status",
            m.build_seconds.clone(),
        );
        r.register(
            "origin_chunk_bytes",
            "Chunk bytes newly stored in this member's origin store",
            m.origin_chunk_bytes.clone(),
        );
        r.register(
            "origin_chunks",
            "Chunks newly stored in this member's origin store",
            m.origin_chunks.clone(),
        );
        r.register(
            "deployments_finished",
            "Deployments that reached a final status, by status",
            m.deployments_finished.clone(),
        );
        r.register(
            "deploy_seconds",
            "Time from a deployment's start to its final status",
            m.deploy_seconds.clone(),
        );
        r.register(
            "wave_seconds",
            "Time from a wave's start to its end (soak included)",
            m.wave_seconds.clone(),
        );
        r.register(
            "rollbacks",
            "Rollbacks: automatic (a wave failed) or manual (starling rollback)",
            m.rollbacks.clone(),
        );
        r.register("raft_term", "Current Raft term", m.raft_term.clone());
        r.register(
            "raft_is_leader",
            "1 if this member leads",
            m.raft_is_leader.clone(),
        );
        r.register(
            "raft_last_applied",
            "Index of the last applied log entry",
            m.raft_last_applied.clone(),
        );
        r.register(
            "raft_members",
            "Members in the configuration",
            m.raft_members.clone(),
        );
        r.register(
            "build_queue_depth",
            "Builds waiting for a worker",
            m.queue_depth.clone(),
        );
        r.register(
            "builds_running",
            "Builds a worker holds a lease on",
            m.running.clone(),
        );
        r.register("events", "Entries in the event log", m.events.clone());
        r.register(
            "lease_waiters",
            "Lease requests waiting here for a build to be queued (idle worker slots)",
            m.lease_waiters.clone(),
        );
        m
    }

    /// A webhook delivery was answered with `status`.
    pub fn webhook(&self, forge: &'static str, status: u16) {
        let outcome = match status {
            201 => "queued",
            200 => "duplicate_or_ping",
            202 => "ignored",
            401 => "bad_signature",
            404 => "unknown_repo",
            400 | 413 | 415 | 422 => "malformed",
            _ => "error",
        };
        self.webhooks
            .get_or_create(&WebhookLabels { forge, outcome })
            .inc();
    }

    /// A proposal of `command` ended after `took`.
    pub fn proposal(&self, command: &'static str, result: &'static str, took: Duration) {
        self.proposals
            .get_or_create(&ProposalLabels { command, result })
            .inc();
        self.proposal_seconds.observe(took.as_secs_f64());
    }

    pub fn snapshot_built(&self, took: Duration) {
        self.snapshot_seconds.observe(took.as_secs_f64());
    }

    /// A batch of `entries` was applied in `took`, expiring `leases_expired` leases and
    /// adding `new_events` to `state`.
    pub fn applied(
        &self,
        entries: usize,
        leases_expired: usize,
        state: &ControlState,
        new_events: &[Event],
        took: Duration,
    ) {
        self.apply_seconds.observe(took.as_secs_f64());
        self.applied_entries.inc_by(entries as u64);
        self.lease_expiries.inc_by(leases_expired as u64);
        for e in new_events
            .iter()
            .filter(|e| e.kind == EventKind::BuildCompleted)
        {
            let status = e.status.unwrap_or(BuildStatus::Failed);
            self.builds_finished
                .get_or_create(&StatusLabels {
                    status: status.as_str(),
                })
                .inc();
            let b = e.build.and_then(|id| state.build(id));
            if let Some((start, end)) = b.and_then(|b| b.started_at.zip(b.finished_at)) {
                self.build_seconds
                    .observe(end.saturating_sub(start) as f64 / 1000.0);
            }
        }
        for e in new_events {
            let Some(d) = e.deployment.and_then(|id| state.deployment(id)) else {
                continue;
            };
            let secs = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1000.0;
            match e.kind {
                EventKind::DeployStarted if d.trigger == "rollback" => {
                    self.rollbacks
                        .get_or_create(&KindLabels { kind: "manual" })
                        .inc();
                }
                EventKind::DeployCompleted => {
                    let status = d.status.as_str();
                    self.deployments_finished
                        .get_or_create(&StatusLabels { status })
                        .inc();
                    self.deploy_seconds.observe(secs(d.created_at, e.at));
                    if d.status == starling_proto::DeployStatus::RolledBack {
                        self.rollbacks
                            .get_or_create(&KindLabels { kind: "automatic" })
                            .inc();
                    }
                }
                EventKind::WaveCompleted => {
                    let mut started = d.waves.iter().filter_map(|w| w.started_at.zip(w.done_at));
                    if let Some((from, _)) = started.rfind(|(_, done)| *done == e.at) {
                        self.wave_seconds.observe(secs(from, e.at));
                    }
                }
                _ => {}
            }
        }
    }

    /// A lease request waits here until the returned guard is dropped.
    pub fn lease_waiting(&self) -> Raised {
        self.lease_waiters.inc();
        Raised(self.lease_waiters.clone())
    }

    /// A chunk of `bytes` was newly stored in this member's origin store.
    pub fn chunk_stored(&self, bytes: usize) {
        self.origin_chunks.inc();
        self.origin_chunk_bytes.inc_by(bytes as u64);
    }

    /// The text exposition, with the gauges read from `raft` and `state` now.
    pub fn render(
        &self,
        raft: RaftFigures,
        state: &ControlState,
    ) -> Result<String, std::fmt::Error> {
        self.raft_term.set(raft.term as i64);
        self.raft_is_leader.set(i64::from(raft.is_leader));
        self.raft_last_applied.set(raft.last_applied as i64);
        self.raft_members.set(raft.members as i64);
        self.queue_depth.set(state.queued_len() as i64);
        self.running.set(state.running().count() as i64);
        self.events.set(state.last_event_index());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_render() {
        let m = ControlMetrics::new();
        m.webhook("github", 201);
        m.webhook("github", 401);
        m.proposal("queue_build", "ok", Duration::from_millis(3));
        m.chunk_stored(100);
        let figures = RaftFigures {
            term: 3,
            is_leader: true,
            last_applied: 9,
            members: 3,
        };
        let text = m.render(figures, &ControlState::default()).unwrap();
        for want in [
            "starling_webhooks_total{forge=\"github\",outcome=\"queued\"} 1",
            "starling_webhooks_total{forge=\"github\",outcome=\"bad_signature\"} 1",
            "starling_proposals_total{command=\"queue_build\",result=\"ok\"} 1",
            "starling_proposal_seconds_count 1",
            "starling_origin_chunk_bytes_total 100",
            "starling_raft_term 3",
            "starling_raft_is_leader 1",
            "starling_build_queue_depth 0",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }
}
