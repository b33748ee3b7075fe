//! Small runs of the simulator, each a property of the swarm that must hold at any
//! scale: everyone ends with every chunk, each chunk crosses into each region about
//! once and leaves the origin about once, bad and dead peers cost only time, and a
//! release that changes one chunk moves one chunk per node.

use std::time::Duration;

use starling_sim::report::Row;
use starling_sim::scenario::{Scenario, WIRE_OVERHEAD};
use starling_sim::world::{Outcome, World};

fn run(sc: &Scenario) -> (Outcome, Row) {
    let o = World::new(sc.clone()).run(Duration::from_secs(3600));
    let row = Row::new(sc, &o);
    eprintln!("{}", row.line());
    (o, row)
}

/// Every node that was not killed finished, no remote region received much more than
/// one copy (the wire's framing counted), and the origin sent at most `origin` copies.
fn assert_once(row: &Row, origin: f64) {
    let unfinished = row.healthy - row.finished;
    assert_eq!(unfinished, 0, "{unfinished} nodes unfinished");
    let most = 1.1 * WIRE_OVERHEAD;
    assert!(
        row.wan_max <= most,
        "a region received {:.2} copies",
        row.wan_max
    );
    let sent = row.origin_copies;
    assert!(
        sent <= origin * WIRE_OVERHEAD,
        "the origin sent {sent:.2} copies"
    );
}

#[test]
fn the_testbeds_shape_delivers_each_chunk_into_each_region_once() {
    let (_, row) = run(&Scenario::testbed(3, 4, 16));
    assert_once(&row, 1.1);
}

#[test]
fn regions_larger_than_their_gateways_still_take_each_chunk_once() {
    let mut sc = Scenario::internet(3, 30, 64 << 20, 1 << 20);
    sc.name = "3×30".into();
    let (_, row) = run(&sc);
    // While the nodes of a region announce themselves, their views of who its gateways
    // are differ for a moment, and the origin sends some chunks twice (1.20 copies here).
    assert_once(&row, 1.3);
    let (last, bound) = (row.last, row.bound);
    assert!(
        last < 10.0 * bound,
        "{last:.1} s against a bound of {bound:.1} s"
    );
}

#[test]
fn corrupting_nodes_are_cut_off_and_everyone_finishes() {
    let mut sc = Scenario::internet(3, 12, 32 << 20, 1 << 20);
    sc.name = "corrupting".into();
    sc.faults.corrupt_nodes = 3;
    let (o, row) = run(&sc);
    assert!(o.corrupt > 0, "no corrupt chunk was ever sent");
    assert_eq!(row.finished, row.healthy);
}

#[test]
fn nodes_that_die_or_start_late_cost_only_time() {
    let mut sc = Scenario::internet(3, 12, 32 << 20, 1 << 20);
    sc.name = "dying and late".into();
    sc.faults.fail_share = 0.2;
    sc.faults.fail_window = 2_000_000_000;
    sc.faults.late_share = 0.2;
    sc.faults.late_by = 3_000_000_000;
    let (o, row) = run(&sc);
    assert!(o.killed.iter().any(|k| *k), "nobody was killed");
    assert_eq!(row.finished, row.healthy);
}

#[test]
fn a_one_chunk_change_moves_one_chunk_per_node() {
    let mut sc = Scenario::internet(3, 10, 64 << 20, 1 << 20);
    sc.name = "one new chunk".into();
    sc.new_chunks = Some(1);
    let (o, row) = run(&sc);
    assert_eq!(row.finished, row.healthy);
    assert_eq!(
        o.delivered,
        sc.nodes() as u64,
        "chunks stored across the fleet"
    );
}

/// Units modelled as runs of smaller chunks (`Scenario::piece_bytes`): relays pass a
/// unit on before it is whole, every node still ends with every unit, each crossing
/// happens about once, and the relay tree's hops cost a piece rather than a unit.
#[test]
fn relays_that_pass_pieces_on_shorten_the_hops_and_keep_the_crossings() {
    let whole = Scenario {
        name: "whole units".into(),
        ..Scenario::internet(3, 12, 64 << 20, 8 << 20)
    };
    let pieces = Scenario {
        name: "pieces".into(),
        piece_bytes: Some(256 << 10),
        ..whole.clone()
    };
    let (_, a) = run(&whole);
    let (o, b) = run(&pieces);
    assert_once(&b, 1.1);
    assert_eq!(
        o.delivered,
        (pieces.nodes() as u64) * pieces.chunks(),
        "units stored across the fleet"
    );
    assert!(
        b.last < a.last,
        "{:.2} s with pieces against {:.2} s with whole units",
        b.last,
        a.last
    );
}
