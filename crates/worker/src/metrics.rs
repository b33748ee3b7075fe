//! This worker's Prometheus metrics (`starling worker --metrics-listen`): builds by how
//! they ended, how long they took, and the chunk bytes it pushed to the members.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use starling_proto::BuildStatus;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Debug)]
pub struct WorkerMetrics {
    registry: Registry,
    builds: Family<StatusLabels, Counter>,
    build_seconds: Histogram,
    running: Gauge,
    pushed_bytes: Counter,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let mut m = WorkerMetrics {
            registry: Registry::with_prefix("starling_worker"),
            builds: Family::default(),
            // 1 s .. ~4.5 h.
            build_seconds: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            running: Gauge::default(),
            pushed_bytes: Counter::default(),
        };
        let r = &mut m.registry;
        r.register(
            "builds",
            "Builds this worker ended, by status",
            m.builds.clone(),
        );
        r.register(
            "build_seconds",
            "Time from a lease to the build's end (checkout, command, release, push)",
            m.build_seconds.clone(),
        );
        r.register("builds_running", "Builds running now", m.running.clone());
        r.register(
            "pushed_chunk_bytes",
            "Chunk bytes sent to members' origin stores",
            m.pushed_bytes.clone(),
        );
        m
    }
}

/// Holds the running gauge one higher while it lives.
pub struct Running<'a>(&'a Gauge);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl WorkerMetrics {
    pub fn running(&self) -> Running<'_> {
        self.running.inc();
        Running(&self.running)
    }

    pub fn finished(&self, status: BuildStatus, took: Duration) {
        self.builds
            .get_or_create(&StatusLabels {
                status: status.as_str(),
            })
            .inc();
        self.build_seconds.observe(took.as_secs_f64());
    }

    pub fn pushed(&self, bytes: usize) {
        self.pushed_bytes.inc_by(bytes as u64);
    }

    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_render_by_status() {
        let m = WorkerMetrics::default();
        {
            let _r = m.running();
            m.finished(BuildStatus::Succeeded, Duration::from_secs(3));
        }
        m.pushed(4096);
        let text = m.render().unwrap();
        for want in [
            "starling_worker_builds_total{status=\"succeeded\"} 1",
            "starling_worker_build_seconds_count 1",
            "starling_worker_builds_running 0",
            "starling_worker_pushed_chunk_bytes_total 4096",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }
}
