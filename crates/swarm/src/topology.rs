//! Which node of a region brings a chunk into it across the WAN.
//!
//! Every node of a region computes the same answer from the same list, with no
//! coordination: rendezvous (highest-random-weight) hashing of the chunk with each node's
//! name. Each chunk gets one ingress node per region, spread evenly over the region's
//! nodes; the others wait for it inside the region. When a node joins or leaves, only
//! the chunks whose winner it is (or becomes) move.

use starling_proto::ChunkHash;

/// The weight of the node whose [`salt`] is `node` for `chunk`. A splitmix64 mix of the
/// chunk's hash and the name's salt: as good a spread as hashing both with BLAKE3, and
/// cheap enough to run for every chunk and peer whenever a node's peers change.
fn weight(chunk: &ChunkHash, node: u64) -> (u64, std::cmp::Reverse<u64>) {
    (spread(chunk, node), std::cmp::Reverse(node))
}

/// The node among `region_nodes` that fetches `chunk` into the region; `None` for an
/// empty list. The answer never depends on the order of the list.
pub fn ingress_node<'a>(chunk: &ChunkHash, region_nodes: &'a [String]) -> Option<&'a str> {
    region_nodes
        .iter()
        .max_by_key(|n| weight(chunk, salt(n)))
        .map(String::as_str)
}

/// How many of `region_nodes` come before `node` in `chunk`'s rendezvous order (the
/// [`ingress_node`] is 0): the order in which a new chunk spreads through the region.
pub fn rank(chunk: &ChunkHash, node: &str, region_nodes: &[String]) -> usize {
    let salts: Vec<u64> = region_nodes.iter().map(|n| salt(n)).collect();
    rank_salted(chunk, salt(node), &salts)
}

/// [`rank`], with every name given by its [`salt`].
pub(crate) fn rank_salted(chunk: &ChunkHash, node: u64, region_nodes: &[u64]) -> usize {
    let mine = weight(chunk, node);
    region_nodes
        .iter()
        .filter(|n| weight(chunk, **n) > mine)
        .count()
}

/// A number per name, to mix with chunks in [`spread`].
pub(crate) fn salt(name: &str) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&blake3::hash(name.as_bytes()).as_bytes()[..8]);
    u64::from_be_bytes(first)
}

/// A tie-break that differs from name to name (by its [`salt`]) and chunk to chunk, so
/// that nodes holding the same set of candidates do not all choose the same one. Cheap
/// (a splitmix64 finalizer), since it runs for every candidate of every decision.
pub(crate) fn spread(chunk: &ChunkHash, salt: u64) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&chunk.as_bytes()[..8]);
    let mut z = u64::from_le_bytes(first) ^ salt;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("eu-{i}")).collect()
    }

    #[test]
    fn every_node_agrees_and_the_order_does_not_matter() {
        let list = nodes(7);
        let mut reversed = list.clone();
        reversed.reverse();
        for i in 0..200u32 {
            let c = ChunkHash::of(&i.to_le_bytes());
            assert_eq!(ingress_node(&c, &list), ingress_node(&c, &reversed));
        }
        assert_eq!(ingress_node(&ChunkHash::of(b"x"), &[]), None);
    }

    #[test]
    fn the_ingress_ranks_first_and_every_rank_is_taken_once() {
        let list = nodes(9);
        for i in 0..100u32 {
            let c = ChunkHash::of(&i.to_le_bytes());
            let mut ranks: Vec<usize> = list.iter().map(|n| rank(&c, n, &list)).collect();
            let first = ingress_node(&c, &list).unwrap();
            assert_eq!(rank(&c, first, &list), 0);
            ranks.sort();
            assert_eq!(ranks, (0..9).collect::<Vec<_>>());
        }
    }

    #[test]
    fn chunks_spread_evenly_and_few_move_when_a_node_leaves() {
        let list = nodes(8);
        let chunks: Vec<ChunkHash> = (0..8000u32)
            .map(|i| ChunkHash::of(&i.to_le_bytes()))
            .collect();
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &chunks {
            *per_node.entry(ingress_node(c, &list).unwrap()).or_default() += 1;
        }
        // 1,000 each on average; binomial spread is about ±30.
        for (n, k) in &per_node {
            assert!((850..=1150).contains(k), "{n} is ingress for {k} of 8000");
        }
        let fewer: Vec<String> = list[1..].to_vec();
        let moved = chunks
            .iter()
            .filter(|c| ingress_node(c, &list) != ingress_node(c, &fewer))
            .count();
        // Only the chunks of the node that left move.
        assert_eq!(moved, per_node[list[0].as_str()]);
    }
}
