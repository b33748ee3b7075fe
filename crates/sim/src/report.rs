//! What a run prints: the figures of one [`Outcome`] against its [`Scenario`]'s bound.

use crate::scenario::Scenario;
use crate::world::Outcome;

/// One run's figures.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub nodes: usize,
    /// Of the nodes not killed: how many finished, the last and the median, seconds.
    pub finished: usize,
    pub healthy: usize,
    pub last: f64,
    pub median: f64,
    /// The last of the nodes not killed whose links run at full rate.
    pub last_full_rate: f64,
    /// The fluid bound counted from the start of the run, and from the start of the
    /// last node not killed (see [`Scenario::bound_from`]).
    pub bound_at_zero: f64,
    pub bound: f64,
    /// Copies of the payload each remote region received over its WAN link, counting
    /// the bytes on the wire as the testbed's kernel counters do (largest, mean).
    pub wan_max: f64,
    pub wan_mean: f64,
    pub origin_copies: f64,
    pub events: u64,
    pub wall: f64,
}

impl Row {
    pub fn new(sc: &Scenario, o: &Outcome) -> Row {
        let mut times: Vec<u64> = o
            .done
            .iter()
            .zip(&o.killed)
            .filter(|(_, k)| !**k)
            .filter_map(|(d, _)| *d)
            .collect();
        times.sort_unstable();
        let healthy = o.killed.iter().filter(|k| !**k).count();
        let full_rate = o
            .done
            .iter()
            .zip(o.killed.iter().zip(&o.slow))
            .filter(|(_, (k, s))| !**k && !**s)
            .filter_map(|(d, _)| *d)
            .max();
        let secs = |t: u64| t as f64 / 1e9;
        let last_start = o
            .started
            .iter()
            .zip(&o.killed)
            .filter(|(_, k)| !**k)
            .filter_map(|(s, _)| *s)
            .max()
            .map_or(0.0, secs);
        let payload = sc.payload_bytes() as f64;
        let remote: Vec<f64> = o.wan_in.iter().skip(1).map(|b| b / payload).collect();
        Row {
            name: sc.name.clone(),
            nodes: sc.nodes(),
            finished: times.len(),
            healthy,
            last: times.last().map_or(f64::NAN, |t| secs(*t)),
            median: times.get(times.len() / 2).map_or(f64::NAN, |t| secs(*t)),
            last_full_rate: full_rate.map_or(f64::NAN, secs),
            bound_at_zero: sc.bound(),
            bound: sc.bound_from(last_start),
            wan_max: remote.iter().copied().fold(0.0, f64::max),
            wan_mean: if remote.is_empty() {
                0.0
            } else {
                remote.iter().sum::<f64>() / remote.len() as f64
            },
            origin_copies: o.origin_sent / payload,
            events: o.events,
            wall: o.wall.as_secs_f64(),
        }
    }

    pub fn header() -> &'static str {
        "| scenario | nodes | finished | last (s) | median (s) | last at full rate (s) | bound (s), from 0 / from the last start | × bound, from 0 / from the last start | WAN copies per remote region (max / mean) | origin copies | events | wall (s) | events/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    }

    pub fn line(&self) -> String {
        format!(
            "| {} | {} | {}/{} | {:.2} | {:.2} | {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} | {} | {:.1} | {:.0} |",
            self.name,
            self.nodes,
            self.finished,
            self.healthy,
            self.last,
            self.median,
            self.last_full_rate,
            self.bound_at_zero,
            self.bound,
            self.last / self.bound_at_zero,
            self.last / self.bound,
            self.wan_max,
            self.wan_mean,
            self.origin_copies,
            self.events,
            self.wall,
            self.events as f64 / self.wall.max(1e-9),
        )
    }
}

/// The process's peak resident memory in MiB (Linux), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
