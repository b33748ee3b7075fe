//! The uploading side's one decision: which request gets a free upload slot.
//!
//! A peer sends a few chunks at once (each at the link's full speed, whole early and
//! ready to be passed on) and lets a few more requests wait. A freed slot goes to a
//! request from another region first: it brings a chunk into a region, which waits for
//! it as a whole. Then to the waiting request whose chunk this peer has been asked for
//! the fewest times, then the oldest: a chunk it alone holds, just fetched, goes out
//! before one it has already given to many, so that new chunks start spreading at once
//! instead of waiting behind common ones. A request beyond the queue is refused as busy
//! and asked of someone else; one from another region takes the place of the last
//! waiting request of this region instead, which is refused.
//!
//! In the simulator (10 regions × 200 nodes, 1 GiB), once every node started fetching
//! within a few milliseconds of seeing the goal, the holders' queues were full of their
//! own regions' requests, and a region's ingress was refused as busy by every holder of
//! a chunk for seconds: one chunk reached the last region 11 s after the origin sent it.
//!
//! Sans-IO like [`crate::Fetch`]: the driver says a request came (`offer`) and a send
//! ended (`sent`); what waits is the driver's own token `W` (a channel to the waiting
//! task over QUIC, a request record in the simulator).

use std::collections::{BTreeMap, HashMap};

use starling_proto::ChunkHash;

/// Chunks whose requests are counted; the count starts over beyond that (a node serves a
/// few releases at a time, far fewer chunks).
const MAX_COUNTED: usize = 1 << 16;

/// What became of a request offered to the [`UploadQueue`].
#[derive(Debug, PartialEq, Eq)]
pub enum Offer<W> {
    /// A slot was free: send now.
    Send(W),
    /// It waits for a slot.
    Queued,
    /// It waits for a slot, in the place of this waiter of this node's region, refused.
    Bumped(W),
    /// Every slot is taken and the queue is full.
    Busy(W),
}

#[derive(Debug)]
pub struct UploadQueue<W> {
    free: usize,
    max_waiting: usize,
    /// (near, times asked, arrival, chunk) → who waits; `near`: from this node's region.
    waiting: BTreeMap<(bool, u64, u64, ChunkHash), W>,
    arrivals: u64,
    asked: HashMap<ChunkHash, u64>,
}

impl<W> UploadQueue<W> {
    /// `slots` sends at once (at least one), `max_waiting` requests waiting for them.
    pub fn new(slots: usize, max_waiting: usize) -> UploadQueue<W> {
        UploadQueue {
            free: slots.max(1),
            max_waiting,
            waiting: BTreeMap::new(),
            arrivals: 0,
            asked: HashMap::new(),
        }
    }

    /// A request for `chunk` came; `waiter` is what to hand the slot to; `ready`: its
    /// receiver takes chunks now (see [`UploadQueue::sent`]); one that does not waits
    /// even for a free slot. `far`: the asker is in another region.
    pub fn offer(&mut self, chunk: &ChunkHash, waiter: W, ready: bool, far: bool) -> Offer<W> {
        if self.asked.len() >= MAX_COUNTED {
            self.asked.clear();
        }
        let asked = self.asked.entry(*chunk).or_insert(0);
        let before = *asked;
        *asked += 1;
        if self.free > 0 && ready {
            self.free -= 1;
            return Offer::Send(waiter);
        }
        let mut bumped = None;
        if self.waiting.len() >= self.max_waiting {
            let last_near = self
                .waiting
                .last_key_value()
                .map(|(k, _)| *k)
                .filter(|k| k.0);
            match last_near.filter(|_| far) {
                Some(k) => bumped = self.waiting.remove(&k),
                None => return Offer::Busy(waiter),
            }
        }
        self.arrivals += 1;
        self.waiting
            .insert((!far, before, self.arrivals, *chunk), waiter);
        match bumped {
            Some(w) => Offer::Bumped(w),
            None => Offer::Queued,
        }
    }

    /// A send ended and its slot is free: the waiter it goes to, or `None` (the slot is
    /// free again). A driver whose waiter has gone calls this again for the next.
    /// Waiters whose receiver is not `ready` (it asked to hold them: it receives as much
    /// as it takes from others) are passed over and keep their places. In the simulator
    /// (10 regions × 200 nodes, 1 GiB) a slot left free rather than given to a held
    /// waiter finished the release in 16.6 s against 17.5 s.
    pub fn sent(&mut self, ready: impl FnMut(&W) -> bool) -> Option<W> {
        self.free += 1;
        self.resume(ready)
    }

    /// A receiver became ready again: the waiter a free slot goes to, if any.
    pub fn resume(&mut self, mut ready: impl FnMut(&W) -> bool) -> Option<W> {
        if self.free == 0 {
            return None;
        }
        let key = *self.waiting.iter().find(|(_, w)| ready(w))?.0;
        self.free -= 1;
        self.waiting.remove(&key)
    }

    /// Forget waiters that gave up (for which `keep` is false), so that they do not hold
    /// places in the queue.
    pub fn retain(&mut self, mut keep: impl FnMut(&W) -> bool) {
        self.waiting.retain(|_, w| keep(w));
    }

    /// Forget one waiting request for `chunk` chosen by `is`; whether there was one.
    pub fn withdraw(&mut self, chunk: &ChunkHash, mut is: impl FnMut(&W) -> bool) -> bool {
        let key = self
            .waiting
            .iter()
            .find(|((_, _, _, c), w)| c == chunk && is(w))
            .map(|(k, _)| *k);
        key.is_some_and(|k| self.waiting.remove(&k).is_some())
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_slot_goes_to_the_chunk_asked_for_least_then_the_oldest() {
        let mut q = UploadQueue::new(1, 2);
        let (common, fresh, other) = (
            ChunkHash::of(b"a"),
            ChunkHash::of(b"b"),
            ChunkHash::of(b"c"),
        );
        assert_eq!(q.offer(&common, 1, true, false), Offer::Send(1));
        assert_eq!(q.offer(&common, 2, true, false), Offer::Queued);
        assert_eq!(q.offer(&fresh, 3, true, false), Offer::Queued);
        assert_eq!(
            q.offer(&other, 4, true, false),
            Offer::Busy(4),
            "the queue is full"
        );
        // `fresh` was never asked before: it goes first though it came later.
        assert_eq!(q.sent(|_| true), Some(3));
        assert_eq!(q.sent(|_| true), Some(2));
        assert_eq!(q.sent(|_| true), None);
        // The slot is free again.
        assert_eq!(q.offer(&other, 5, true, false), Offer::Send(5));
        assert_eq!(q.offer(&other, 6, true, false), Offer::Queued);
        assert_eq!(q.offer(&fresh, 7, true, false), Offer::Queued);
        // `fresh` was asked once before, `other` once: the older goes first.
        q.retain(|w| *w != 6);
        assert_eq!(q.waiting(), 1);
        assert!(q.withdraw(&fresh, |w| *w == 7));
        assert_eq!(q.sent(|_| true), None);
    }

    #[test]
    fn held_waiters_keep_their_places_and_a_slot_waits_for_a_ready_one() {
        let mut q = UploadQueue::new(1, 4);
        let (a, b) = (ChunkHash::of(b"a"), ChunkHash::of(b"b"));
        // A held receiver waits even for a free slot.
        assert_eq!(q.offer(&a, "held", false, false), Offer::Queued);
        assert_eq!(q.offer(&a, "ready", true, false), Offer::Send("ready"));
        assert_eq!(q.offer(&b, "held-too", false, false), Offer::Queued);
        // The slot comes free: nobody is ready, so it stays free.
        assert_eq!(q.sent(|w| !w.starts_with("held")), None);
        assert_eq!(q.waiting(), 2);
        // One receiver may take chunks again: the free slot goes to it.
        assert_eq!(q.resume(|w| *w == "held-too"), Some("held-too"));
        assert_eq!(q.resume(|_| true), None, "no slot is free");
        assert_eq!(q.sent(|_| true), Some("held"));
    }

    #[test]
    fn a_request_from_another_region_goes_first_and_takes_a_full_queues_last_place() {
        let mut q = UploadQueue::new(1, 2);
        let (a, b, c) = (
            ChunkHash::of(b"a"),
            ChunkHash::of(b"b"),
            ChunkHash::of(b"c"),
        );
        assert_eq!(q.offer(&a, "sending", true, false), Offer::Send("sending"));
        assert_eq!(q.offer(&b, "near", true, false), Offer::Queued);
        assert_eq!(q.offer(&c, "near-later", true, false), Offer::Queued);
        // The queue is full: a request of this region is refused, one from another
        // region takes the last place (and goes first, though its chunk is common).
        assert_eq!(
            q.offer(&a, "near-refused", true, false),
            Offer::Busy("near-refused")
        );
        assert_eq!(q.offer(&a, "far", true, true), Offer::Bumped("near-later"));
        assert_eq!(q.offer(&a, "far-2", true, true), Offer::Bumped("near"));
        // Only far requests wait now: a third is refused.
        assert_eq!(q.offer(&b, "far-3", true, true), Offer::Busy("far-3"));
        assert_eq!(q.sent(|_| true), Some("far"));
        assert_eq!(q.sent(|_| true), Some("far-2"));
        assert_eq!(q.sent(|_| true), None);
    }
}
