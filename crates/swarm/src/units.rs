//! The swarm's units of transfer: a release's chunks grouped into runs.
//!
//! Chunks are cut by content to about 256 KiB, which is right for sharing bytes between
//! releases but short for a transfer at fleet speeds: at 1 Gbit/s a chunk takes 2–4 ms,
//! about a round trip inside a region, and a node asking for one chunk at a time spends
//! as long between chunks as on them. In the simulator (10 regions × 20 nodes, 1 GiB,
//! 1 Gbit/s each way, 1 ms inside a region) the uploads ran at about 73% of their
//! capacity with one chunk per request — a receiver takes several flows at once before
//! it can say it is full — and the last node finished at 13.37 s; with 1 MiB units
//! 12.10 s and with 4 MiB units 11.34 s. On the namespace testbed (40 Mbit/s) a 256 KiB
//! chunk already takes 100 ms a slot, and larger units only lengthen every relay hop
//! (48 MiB: 11.86 s with 256 KiB units, 12.33 s with 512 KiB, 13.95 s with 1 MiB).
//!
//! So a unit is a run of consecutive chunks of the manifest of about a
//! [`UNITS_PER_RELEASE`]th of the release, at most [`MAX_UNIT_BYTES`]: a relay's hop then
//! costs the same share of the transfer at any size, and a small release keeps one
//! chunk per unit. Every node works the units out from the manifest alike, so a `Have`
//! names units, and a request names the unit and the chunks of it the asker lacks (a
//! node that holds most of a unit from an older release fetches only the rest). A unit
//! of one chunk is named by the chunk's hash; a longer one by the hash of its chunks'
//! names.

use std::collections::{HashMap, HashSet};

use starling_proto::peer::MAX_GET_CHUNKS;
use starling_proto::release::Manifest;
use starling_proto::ChunkHash;

/// A release is cut into about this many units (fewer if its chunks are larger).
pub const UNITS_PER_RELEASE: u64 = 256;
/// A unit stops growing once it holds this many bytes.
pub const MAX_UNIT_BYTES: u64 = 4 << 20;
/// Most chunks in one unit: as many as one request may ask for.
pub const MAX_UNIT_CHUNKS: usize = MAX_GET_CHUNKS;

/// One unit: its name and its chunks, in manifest order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub id: ChunkHash,
    pub chunks: Vec<ChunkHash>,
    pub bytes: u64,
}

impl Unit {
    /// Its chunks that `has` says are not held, in order.
    pub fn lacking<'a>(
        &'a self,
        has: impl Fn(&ChunkHash) -> bool + 'a,
    ) -> impl Iterator<Item = ChunkHash> + 'a {
        self.chunks.iter().copied().filter(move |c| !has(c))
    }
}

/// A release's units, in manifest order, each found by its name.
#[derive(Debug, Clone, Default)]
pub struct Units {
    units: Vec<Unit>,
    by_id: HashMap<ChunkHash, usize>,
}

impl Units {
    /// The units of a release whose manifest lists `chunks` (hash and size, in order).
    /// A chunk listed twice belongs to the unit of its first place.
    pub fn of(chunks: impl IntoIterator<Item = (ChunkHash, u64)>) -> Units {
        let mut seen = HashSet::new();
        let distinct: Vec<(ChunkHash, u64)> = chunks
            .into_iter()
            .filter(|(c, _)| seen.insert(*c))
            .collect();
        let target = unit_bytes(distinct.iter().map(|(_, n)| n).sum());
        let mut units = Vec::new();
        let mut run: Vec<ChunkHash> = Vec::new();
        let mut bytes = 0;
        for (i, (c, n)) in distinct.iter().enumerate() {
            run.push(*c);
            bytes += n;
            if bytes >= target || run.len() == MAX_UNIT_CHUNKS || i + 1 == distinct.len() {
                let chunks = std::mem::take(&mut run);
                units.push(Unit {
                    id: unit_id(&chunks),
                    chunks,
                    bytes: std::mem::take(&mut bytes),
                });
            }
        }
        let by_id = units.iter().enumerate().map(|(i, u)| (u.id, i)).collect();
        Units { units, by_id }
    }

    /// The units of `manifest`'s chunks.
    pub fn of_manifest(manifest: &Manifest) -> Units {
        Units::of(manifest.chunks.iter().map(|c| (c.hash, u64::from(c.size))))
    }

    pub fn ids(&self) -> impl Iterator<Item = ChunkHash> + '_ {
        self.units.iter().map(|u| u.id)
    }

    pub fn get(&self, id: &ChunkHash) -> Option<&Unit> {
        self.by_id.get(id).map(|&i| &self.units[i])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Unit> {
        self.units.iter()
    }

    pub fn len(&self) -> usize {
        self.units.len()
    }

    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }
}

/// The bytes a unit of a release of `total` distinct bytes grows to.
pub fn unit_bytes(total: u64) -> u64 {
    (total / UNITS_PER_RELEASE).clamp(1, MAX_UNIT_BYTES)
}

/// A unit's name: its one chunk's, or the hash of its chunks' names.
fn unit_id(chunks: &[ChunkHash]) -> ChunkHash {
    match chunks {
        [one] => *one,
        many => {
            let mut h = blake3::Hasher::new();
            h.update(b"starling unit v1");
            for c in many {
                h.update(c.as_bytes());
            }
            ChunkHash::from_bytes(*h.finalize().as_bytes())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: u32) -> ChunkHash {
        ChunkHash::of(&i.to_le_bytes())
    }

    #[test]
    fn a_small_release_keeps_one_chunk_per_unit() {
        // 48 MiB in 256 KiB chunks: a 256th is 192 KiB, less than a chunk.
        let chunks: Vec<_> = (0..192).map(|i| (chunk(i), 256 << 10)).collect();
        let u = Units::of(chunks.clone());
        assert_eq!(u.len(), 192);
        for (unit, (c, _)) in u.iter().zip(&chunks) {
            assert_eq!(unit.chunks, vec![*c]);
            assert_eq!(unit.id, *c, "a one-chunk unit is named by its chunk");
        }
    }

    #[test]
    fn a_large_release_is_cut_into_runs_of_about_a_256th_up_to_4_mib() {
        // 1 GiB in 256 KiB chunks: 4 MiB units of 16 chunks.
        let chunks: Vec<_> = (0..4096).map(|i| (chunk(i), 256 << 10)).collect();
        let u = Units::of(chunks.clone());
        assert_eq!(u.len(), 256);
        assert!(u.iter().all(|x| x.chunks.len() == 16 && x.bytes == 4 << 20));
        // In manifest order, each chunk once, each unit found by its name.
        let flat: Vec<ChunkHash> = u.iter().flat_map(|x| x.chunks.clone()).collect();
        assert_eq!(flat, chunks.iter().map(|(c, _)| *c).collect::<Vec<_>>());
        for x in u.iter() {
            assert_eq!(u.get(&x.id), Some(x));
        }
        // 10 GB: still 4 MiB.
        let chunks: Vec<_> = (0..40_000).map(|i| (chunk(i), 256 << 10)).collect();
        assert!(Units::of(chunks).iter().all(|x| x.bytes <= MAX_UNIT_BYTES));
    }

    #[test]
    fn repeats_belong_to_their_first_place_and_small_chunks_are_bounded_in_count() {
        let mut chunks: Vec<_> = (0..4096).map(|i| (chunk(i), 256 << 10)).collect();
        chunks.push((chunk(7), 256 << 10));
        let u = Units::of(chunks);
        assert_eq!(u.iter().map(|x| x.chunks.len()).sum::<usize>(), 4096);
        // Tiny chunks: a unit stops at MAX_UNIT_CHUNKS.
        let mut chunks: Vec<_> = (0..10_000).map(|i| (chunk(i), 64)).collect();
        chunks.push((chunk(10_000), 1 << 30));
        assert!(Units::of(chunks)
            .iter()
            .all(|x| x.chunks.len() <= MAX_UNIT_CHUNKS));
    }

    #[test]
    fn every_node_works_out_the_same_units() {
        let chunks: Vec<_> = (0..1000)
            .map(|i| (chunk(i), 100_000 + u64::from(i)))
            .collect();
        let a: Vec<Unit> = Units::of(chunks.clone()).iter().cloned().collect();
        let b: Vec<Unit> = Units::of(chunks).iter().cloned().collect();
        assert_eq!(a, b);
        assert!(a.iter().any(|x| x.chunks.len() > 1));
    }
}
