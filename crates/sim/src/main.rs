//! `starling-sim`: runs the swarm's real decisions over a model network and prints what
//! happened against the fluid lower bound. See the README's "The swarm at scale".

use std::time::Duration;

use clap::{Parser, Subcommand};
use starling_sim::load::{self, Load};
use starling_sim::report::{peak_rss_mib, Row};
use starling_sim::scenario::{mbit, Faults, Scenario};
use starling_sim::world::World;
use starling_swarm::units::unit_bytes;

#[derive(Parser)]
#[command(name = "starling-sim", about = "Simulate a Starling swarm at scale")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// One scenario, shaped by flags.
    Run(Box<Shape>),
    /// The namespace testbed's shapes (3 × 4 and 4 × 5, 48 MiB), to set beside its
    /// measured figures.
    Calibrate,
    /// 1 GiB to 10,000, 100,000 and 200,000 nodes in 10 regions (16 MiB units), 10 GB to
    /// 100,000 (64 MiB units), and a one-chunk change to 100,000. Hours on 2 cores.
    Scale {
        /// Leave out the 200,000-node run.
        #[arg(long)]
        quick: bool,
    },
    /// 100,000 nodes with faults: 5% killed mid-transfer, one region's WAN at a tenth,
    /// 10% of nodes at a tenth of the rate.
    Faults {
        #[arg(long, default_value_t = 10_000)]
        per_region: usize,
    },
    /// What fleets of 1,000 to 200,000 nodes ask of each control member; the tracker's
    /// cost measured with the real tracker.
    Load,
}

#[derive(clap::Args, Clone)]
struct Shape {
    /// `testbed` (40 Mbit/s nodes, 100 Mbit/s WAN, no latency) or `internet` (1 Gbit/s
    /// nodes, 10 Gbit/s WAN and origin, 40 ms between regions).
    #[arg(long, default_value = "internet")]
    preset: String,
    #[arg(long, default_value_t = 10)]
    regions: usize,
    #[arg(long, default_value_t = 1000)]
    per_region: usize,
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// The simulated unit of transfer in KiB; by default the swarm's for the release
    /// (`starling_swarm::units`; with `--preset testbed`, a 256 KiB chunk).
    #[arg(long)]
    chunk_kib: Option<u64>,
    /// Model each unit as a run of the swarm's units of this size, which relays pass on
    /// one by one (see `Scenario::piece_bytes`); 0 passes units on whole.
    #[arg(long)]
    piece_kib: Option<u64>,
    /// Nodes see the goal spread evenly over this long, ms.
    #[arg(long)]
    start_ms: Option<u64>,
    #[arg(long)]
    node_mbit: Option<f64>,
    #[arg(long)]
    origin_mbit: Option<f64>,
    #[arg(long)]
    wan_mbit: Option<f64>,
    /// One-way latency inside a region and between regions, milliseconds.
    #[arg(long)]
    near_ms: Option<f64>,
    #[arg(long)]
    far_ms: Option<f64>,
    /// Every node already holds all chunks but this many.
    #[arg(long)]
    new_chunks: Option<u64>,
    #[arg(long, default_value_t = 0.0)]
    fail_share: f64,
    #[arg(long, default_value_t = 0.0)]
    slow_share: f64,
    #[arg(long)]
    degraded_region: Option<usize>,
    #[arg(long, default_value_t = 0.0)]
    late_share: f64,
    #[arg(long, default_value_t = 0)]
    corrupt: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Experiments with the swarm's settings (see `starling_swarm::FetchConfig`).
    #[arg(long)]
    fanout: Option<usize>,
    #[arg(long)]
    turn_ms: Option<u64>,
    #[arg(long)]
    per_peer: Option<usize>,
    #[arg(long)]
    total: Option<usize>,
    #[arg(long)]
    busy_ms: Option<u64>,
    #[arg(long)]
    cross_ms: Option<u64>,
    #[arg(long)]
    pace_ms: Option<u64>,
    #[arg(long)]
    origin_ms: Option<u64>,
    #[arg(long)]
    settle_ms: Option<u64>,
    #[arg(long)]
    backup_ms: Option<u64>,
    #[arg(long)]
    far_queue_ms: Option<u64>,
    /// Chunks a node takes at once before it holds its other requests.
    #[arg(long)]
    arriving: Option<usize>,
    /// Upload slots of each node and of each control member.
    #[arg(long)]
    node_slots: Option<usize>,
    #[arg(long)]
    origin_slots: Option<usize>,
}

impl Shape {
    fn scenario(&self) -> Scenario {
        let mut sc = if self.preset == "testbed" {
            Scenario::testbed(self.regions, self.per_region, self.size_mib)
        } else {
            // The swarm's unit for the release (whole chunks of 256 KiB at least).
            let bytes = self.size_mib << 20;
            let unit = unit_bytes(bytes).max(256 << 10);
            Scenario::internet(self.regions, self.per_region, bytes, unit)
        };
        if let Some(k) = self.chunk_kib {
            sc.chunk_bytes = k << 10;
        }
        if let Some(k) = self.piece_kib {
            sc.piece_bytes = (k > 0).then_some(k << 10);
        }
        if let Some(ms) = self.start_ms {
            sc.start_spread = ms * 1_000_000;
        }
        if let Some(m) = self.node_mbit {
            sc.node_up = mbit(m);
            if sc.node_down.is_finite() {
                sc.node_down = mbit(m);
            }
        }
        if let Some(m) = self.origin_mbit {
            sc.origin_up = mbit(m);
        }
        if let Some(m) = self.wan_mbit {
            sc.wan = mbit(m);
        }
        if let Some(ms) = self.near_ms {
            sc.near_latency = (ms * 1e6) as u64;
        }
        if let Some(ms) = self.far_ms {
            sc.far_latency = (ms * 1e6) as u64;
        }
        sc.new_chunks = self.new_chunks;
        sc.faults = Faults {
            fail_share: self.fail_share,
            fail_window: 10_000_000_000,
            slow_share: self.slow_share,
            slow_factor: 0.1,
            degraded_region: self.degraded_region,
            degraded_factor: 0.1,
            late_share: self.late_share,
            late_by: 5_000_000_000,
            corrupt_nodes: self.corrupt,
        };
        sc.seed = self.seed;
        let f = &mut sc.fetch;
        f.fanout = self.fanout.unwrap_or(f.fanout);
        f.per_peer = self.per_peer.unwrap_or(f.per_peer);
        f.total = self.total.unwrap_or(f.total);
        if let Some(ms) = self.turn_ms {
            f.turn_patience = Duration::from_millis(ms);
        }
        if let Some(ms) = self.pace_ms {
            f.pace_window = Some(Duration::from_millis(ms));
        }
        if let Some(ms) = self.cross_ms {
            f.cross_region_patience = Duration::from_millis(ms);
        }
        if let Some(ms) = self.origin_ms {
            f.origin_patience = Duration::from_millis(ms);
        }
        if let Some(ms) = self.busy_ms {
            f.busy_backoff = Duration::from_millis(ms);
        }
        if let Some(ms) = self.settle_ms {
            f.settle = Duration::from_millis(ms);
        }
        if let Some(ms) = self.backup_ms {
            f.backup_ingress = Duration::from_millis(ms);
        }
        if let Some(ms) = self.far_queue_ms {
            f.far_queue_patience = Duration::from_millis(ms);
        }
        if let Some(n) = self.arriving {
            f.max_arriving = Some(n);
        }
        sc.node_slots = self.node_slots.unwrap_or(sc.node_slots);
        sc.origin_slots = self.origin_slots.unwrap_or(sc.origin_slots);
        sc
    }
}

fn run(sc: Scenario) -> Row {
    eprintln!(
        "running {}: {} nodes, {} chunks of {} KiB",
        sc.name,
        sc.nodes(),
        sc.chunks(),
        sc.chunk_bytes >> 10
    );
    let o = World::new(sc.clone()).run(Duration::from_secs(4 * 3600));
    let row = Row::new(&sc, &o);
    println!("{}", row.line());
    row
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    println!(
        "starling-sim: {} cores; fluid links, max-min at each sender and equal shares elsewhere; times in model seconds",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    if let What::Load = cli.what {
        println!("{}", Load::header());
        for nodes in [1_000, 10_000, 100_000, 200_000] {
            println!("{}", load::measure(nodes, 10, 20_000).line());
        }
        return Ok(());
    }
    println!("{}", Row::header());
    match cli.what {
        What::Run(shape) => {
            let mut sc = shape.scenario();
            sc.name = format!("{} {}×{}", shape.preset, shape.regions, shape.per_region);
            run(sc);
        }
        What::Calibrate => {
            for (r, n) in [(3, 4), (4, 5)] {
                run(Scenario::testbed(r, n, 48));
            }
        }
        What::Scale { quick } => {
            let gib = 1u64 << 30;
            let mut sizes = vec![1_000, 10_000];
            if !quick {
                sizes.push(20_000);
            }
            for per_region in sizes {
                let mut sc = Scenario::internet(10, per_region, gib, 16 << 20);
                sc.name = format!("1 GiB to {}", 10 * per_region);
                run(sc);
            }
            let mut sc = Scenario::internet(10, 10_000, 10_000_000_000, 64 << 20);
            sc.name = "10 GB to 100000".into();
            run(sc);
            let mut sc = Scenario::internet(10, 10_000, gib, 16 << 20);
            sc.new_chunks = Some(1);
            sc.name = "one new chunk to 100000".into();
            run(sc);
        }
        What::Load => {}
        What::Faults { per_region } => {
            let gib = 1u64 << 30;
            let base = || Scenario::internet(10, per_region, gib, 16 << 20);
            let mut a = base();
            a.name = "5% killed mid-transfer".into();
            a.faults.fail_share = 0.05;
            a.faults.fail_window = 10_000_000_000;
            run(a);
            let mut b = base();
            b.name = "region 3's WAN at a tenth".into();
            b.faults.degraded_region = Some(3);
            b.faults.degraded_factor = 0.1;
            run(b);
            let mut c = base();
            c.name = "10% of nodes at a tenth".into();
            c.faults.slow_share = 0.1;
            c.faults.slow_factor = 0.1;
            run(c);
        }
    }
    if let Some(rss) = peak_rss_mib() {
        println!("peak RSS {rss:.0} MiB");
    }
    Ok(())
}
