//! Where the archive is cut into chunks, worked out segment by segment so that several
//! threads can chunk one archive — and still cut exactly where one FastCDC pass over the
//! whole archive would.
//!
//! FastCDC is sequential: where a chunk ends depends on where it began. A thread given a
//! segment of the archive does not know where the chunk running into its segment began,
//! so it guesses the segment's first byte and records a *speculative* chain of cuts. The
//! gear hash forgets everything older than 64 bytes, so once the true chain (known when
//! the previous segment is done) lands on one of the speculative cuts, the two chains are
//! the same from there on; [`CutPlanner::resync`] follows the true chain only until that
//! happens — usually a chunk or two.
//!
//! Pure functions of bytes: no I/O, no threads, tested against `fastcdc::v2020::FastCDC`.

use fastcdc::v2020::{self, Normalization};

use crate::ChunkSizes;

/// FastCDC 2020 at normalization level 1, the cut points of `fastcdc::v2020::FastCDC`.
pub struct CutPlanner {
    sizes: ChunkSizes,
    mask_s: u64,
    mask_l: u64,
}

impl CutPlanner {
    pub fn new(sizes: ChunkSizes) -> Self {
        let (mask_s, mask_l) = v2020::select_masks(sizes.avg as usize, Normalization::Level1);
        CutPlanner {
            sizes,
            mask_s,
            mask_l,
        }
    }

    /// Length of the chunk starting at `buf[0]`. `buf` must reach at least `max` bytes
    /// on, or to the end of the archive.
    fn chunk_len(&self, buf: &[u8]) -> usize {
        let (_, len) = v2020::cut(
            buf,
            self.sizes.min as usize,
            self.sizes.avg as usize,
            self.sizes.max as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        len
    }

    /// Cuts from `from` on, stopping at the first cut at or past `until`: returns `from`,
    /// every cut after it, and that last cut. Chunk `i` is `chain[i]..chain[i + 1]`.
    /// `buf` must extend `max` bytes past `until`, or end where the archive ends.
    pub fn chain(&self, buf: &[u8], from: usize, until: usize) -> Vec<usize> {
        self.resync(buf, from, &[], until)
    }

    /// The true chain from `from`, given the speculative `chain(buf, 0, until)`: follow
    /// the true cuts until one coincides with a speculative cut, then take the rest of
    /// the speculative chain.
    pub fn resync(
        &self,
        buf: &[u8],
        from: usize,
        speculative: &[usize],
        until: usize,
    ) -> Vec<usize> {
        let mut out = vec![from];
        let mut at = from;
        while at < until && at < buf.len() {
            if let Ok(i) = speculative.binary_search(&at) {
                out.extend_from_slice(&speculative[i + 1..]);
                return out;
            }
            at += self.chunk_len(&buf[at..]).max(1);
            out.push(at);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Runs of a repeated byte, like zero-filled regions, hit the max size.
                if (i / 50_000) % 7 == 3 {
                    0
                } else {
                    (x >> 24) as u8
                }
            })
            .collect()
    }

    const SIZES: ChunkSizes = ChunkSizes {
        min: 2048,
        avg: 8192,
        max: 32768,
    };

    fn reference(data: &[u8]) -> Vec<usize> {
        let mut cuts = vec![0];
        let chunks = v2020::FastCDC::new(data, 2048, 8192, 32768);
        cuts.extend(chunks.map(|c| c.offset + c.length));
        cuts
    }

    /// Chunk `data` in segments as `create_release` does and join the chains.
    fn segmented(data: &[u8], segment: usize) -> Vec<usize> {
        let planner = CutPlanner::new(SIZES);
        let mut all = vec![0usize];
        let mut base = 0;
        while base < data.len() {
            let until = segment.min(data.len() - base);
            let end = (base + segment + SIZES.max as usize).min(data.len());
            let buf = &data[base..end];
            let spec = planner.chain(buf, 0, until);
            let from = all.last().copied().unwrap_or(0) - base;
            let chain = planner.resync(buf, from, &spec, until);
            all.extend(chain[1..].iter().map(|c| c + base));
            base += segment;
        }
        all
    }

    #[test]
    fn one_segment_is_fastcdc() {
        let data = bytes(1 << 20, 7);
        let planner = CutPlanner::new(SIZES);
        assert_eq!(planner.chain(&data, 0, data.len()), reference(&data));
    }

    #[test]
    fn segmented_cuts_equal_one_pass() {
        for (len, segment) in [
            (1 << 20, 65536),
            (1 << 20, 40_000),
            (700_001, 100_000),
            (5000, 4096),
            (100, 4096),
        ] {
            let data = bytes(len, len as u64);
            assert_eq!(
                segmented(&data, segment),
                reference(&data),
                "{len}/{segment}"
            );
        }
    }

    #[test]
    fn resync_finds_the_speculative_chain() {
        let data = bytes(1 << 20, 3);
        let planner = CutPlanner::new(SIZES);
        let spec = planner.chain(&data, 0, 600_000);
        // Starting from a true cut inside the chain gives the chain's tail at once.
        let from = spec[5];
        assert_eq!(
            planner.resync(&data, from, &spec, 600_000),
            spec[5..].to_vec()
        );
        // Starting off the chain converges onto it.
        let off = planner.resync(&data, 1234, &spec, 600_000);
        let meet = off.iter().position(|c| spec.contains(c)).unwrap();
        assert!(
            off[meet] < 600_000,
            "never converged before the segment's end"
        );
        assert_eq!(off.last(), spec.last());
    }
}
