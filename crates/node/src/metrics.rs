//! This node's Prometheus metrics (`starling node --metrics-listen`): what it fetched
//! from which kind of source, chunks that failed their hash, releases staged and
//! activated, failures, and the state of each repository's release at scrape time.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use starling_proto::AppReport;
use starling_swarm::Source;

use crate::fetcher::FetchReport;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabels {
    repo: String,
    state: &'static str,
}

#[derive(Debug)]
pub struct NodeMetrics {
    registry: Registry,
    fetched_bytes: Family<SourceLabels, Counter>,
    fetched_chunks: Family<SourceLabels, Counter>,
    udp_bytes: Family<SourceLabels, Counter>,
    verification_failures: Counter,
    fetch_seconds: Histogram,
    fetch_failures: Counter,
    activations: Counter,
    start_failures: Counter,
    apps: Family<AppLabels, Gauge>,
    /// The reports as last announced, for the `app` gauge at scrape time.
    reports: Mutex<Vec<AppReport>>,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        let mut m = NodeMetrics {
            registry: Registry::with_prefix("starling_node"),
            fetched_bytes: Family::default(),
            fetched_chunks: Family::default(),
            udp_bytes: Family::default(),
            verification_failures: Counter::default(),
            // 100 ms .. ~55 min.
            fetch_seconds: Histogram::new(exponential_buckets(0.1, 2.0, 16)),
            fetch_failures: Counter::default(),
            activations: Counter::default(),
            start_failures: Counter::default(),
            apps: Family::default(),
            reports: Mutex::default(),
        };
        let r = &mut m.registry;
        r.register(
            "fetched_bytes",
            "Verified chunk bytes fetched, by source: same_region, other_region, origin",
            m.fetched_bytes.clone(),
        );
        r.register(
            "fetched_chunks",
            "Verified chunks fetched, by source",
            m.fetched_chunks.clone(),
        );
        r.register(
            "udp_received_bytes",
            "UDP bytes received on fetch connections, by source (chunks and everything else)",
            m.udp_bytes.clone(),
        );
        r.register(
            "verification_failures",
            "Chunks whose bytes did not hash to their name (the sender is cut off)",
            m.verification_failures.clone(),
        );
        r.register(
            "fetch_seconds",
            "Time to fetch a release's missing chunks",
            m.fetch_seconds.clone(),
        );
        r.register(
            "fetch_failures",
            "Fetches or unpacks that failed (tried again)",
            m.fetch_failures.clone(),
        );
        r.register(
            "activations",
            "Switches to another release",
            m.activations.clone(),
        );
        r.register(
            "start_failures",
            "Releases whose start or health command failed, or whose process ended",
            m.start_failures.clone(),
        );
        r.register(
            "app",
            "1 for each repository's state on this node",
            m.apps.clone(),
        );
        m
    }
}

fn source_label(s: Source) -> &'static str {
    match s {
        Source::SameRegion => "same_region",
        Source::OtherRegion => "other_region",
        Source::Origin => "origin",
    }
}

impl NodeMetrics {
    pub fn fetched(&self, report: &FetchReport, took: Duration) {
        self.fetch_seconds.observe(took.as_secs_f64());
        self.verification_failures.inc_by(report.corrupt);
        let label = |s: &Source| SourceLabels {
            source: source_label(*s),
        };
        for (s, n) in &report.received_bytes {
            self.fetched_bytes.get_or_create(&label(s)).inc_by(*n);
        }
        for (s, n) in &report.received {
            self.fetched_chunks.get_or_create(&label(s)).inc_by(*n);
        }
        for (s, n) in &report.udp_received {
            self.udp_bytes.get_or_create(&label(s)).inc_by(*n);
        }
    }

    pub fn fetch_failed(&self) {
        self.fetch_failures.inc();
    }

    pub fn activated(&self) {
        self.activations.inc();
    }

    pub fn start_failed(&self) {
        self.start_failures.inc();
    }

    /// The node's reports as it announces them.
    pub fn reports(&self, apps: &[AppReport]) {
        *self.reports.lock().unwrap_or_else(|p| p.into_inner()) = apps.to_vec();
    }

    /// The text exposition.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        self.apps.clear();
        for a in self
            .reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let labels = AppLabels {
                repo: a.repo.clone(),
                state: a.state.as_str(),
            };
            self.apps.get_or_create(&labels).set(1);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_by_source_and_app_states_render() {
        let m = NodeMetrics::default();
        let mut report = FetchReport::default();
        report.received_bytes.insert(Source::SameRegion, 1000);
        report.received_bytes.insert(Source::Origin, 10);
        report.corrupt = 2;
        m.fetched(&report, Duration::from_millis(300));
        m.reports(&[AppReport {
            state: starling_proto::AppState::Running,
            ..AppReport::idle("acme/web")
        }]);
        let text = m.render().unwrap();
        for want in [
            "starling_node_fetched_bytes_total{source=\"same_region\"} 1000",
            "starling_node_fetched_bytes_total{source=\"origin\"} 10",
            "starling_node_verification_failures_total 2",
            "starling_node_app{repo=\"acme/web\",state=\"running\"} 1",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }
}
