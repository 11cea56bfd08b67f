//! Sampled block residency: how long cached blocks live, sit idle and get reused.
//!
//! With probability `rate` a newly allocated block is tracked: its creation time and its
//! last 4 access times (allocation, then each prefix hit). When a tracked block is evicted
//! from the prefix cache, an `EvictionEvent` records its lifetime, idle time and the gaps
//! between its last accesses (at most 3). A tracked block freed blank (never cached) is
//! dropped silently. Sampling uses a seeded SplitMix64, so runs are reproducible.

use std::collections::{HashMap, VecDeque};

use crate::error::Result;
use crate::fallible::vec_of;
use crate::types::BlockId;

const ACCESSES: usize = 4;

#[derive(Debug, Clone, PartialEq)]
pub struct EvictionEvent {
    pub lifetime_seconds: f64,
    pub idle_seconds: f64,
    pub reuse_gaps_seconds: Vec<f64>,
}

#[derive(Debug, Clone)]
struct Track {
    created: f64,
    /// Most recent last.
    accesses: Vec<f64>,
}

#[derive(Debug)]
pub struct Residency {
    threshold: u64,
    rng: u64,
    tracked: HashMap<BlockId, Track>,
    /// `is_tracked[b]` mirrors `tracked.contains_key(b)`: the hot path (untracked blocks,
    /// ~99% at the default rate) costs one load, not a hash lookup.
    is_tracked: Vec<bool>,
    /// Undrained events, oldest first: a ring, so dropping the oldest of a full queue is
    /// O(1) (a `Vec`'s `remove(0)` moved all 65,536 on every sampled eviction).
    events: VecDeque<EvictionEvent>,
    /// Events dropped because `MAX_PENDING` were waiting undrained.
    pub dropped: u64,
}

/// Undrained eviction events kept at most (the oldest are dropped past it).
pub const MAX_PENDING: usize = 1 << 16;

impl Residency {
    /// Sampling of `num_blocks` blocks. Panics where `try_new` fails (tests, benches).
    pub fn new(rate: f64, seed: u64, num_blocks: usize) -> Self {
        Self::try_new(rate, seed, num_blocks).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sampling of `num_blocks` blocks; `Error::OutOfMemory` when its per-block marks do not
    /// fit in memory.
    pub fn try_new(rate: f64, seed: u64, num_blocks: usize) -> Result<Self> {
        let threshold = if rate >= 1.0 {
            u64::MAX
        } else {
            (rate * u64::MAX as f64) as u64
        };
        Ok(Residency {
            threshold,
            rng: seed ^ 0x9E37_79B9_7F4A_7C15,
            tracked: HashMap::new(),
            is_tracked: vec_of(num_blocks, false, "the residency sampler's marks")?,
            events: VecDeque::new(),
            dropped: 0,
        })
    }

    fn untrack(&mut self, b: BlockId) -> Option<Track> {
        if !std::mem::take(&mut self.is_tracked[b.idx()]) {
            return None;
        }
        self.tracked.remove(&b)
    }

    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Starts fetching the mark that `on_evict(b)` reads and clears. Changes nothing.
    pub fn prefetch(&self, b: BlockId) {
        crate::slots::prefetch(&self.is_tracked[b.idx()]);
    }

    /// A block was freshly allocated: maybe start tracking it.
    pub fn on_allocate(&mut self, b: BlockId, now: f64) {
        if self.threshold == u64::MAX || self.next() < self.threshold {
            self.tracked.insert(
                b,
                Track {
                    created: now,
                    accesses: vec![now],
                },
            );
            self.is_tracked[b.idx()] = true;
        } else {
            self.untrack(b);
        }
    }

    /// A cached block was reused.
    pub fn on_access(&mut self, b: BlockId, now: f64) {
        if !self.is_tracked[b.idx()] {
            return;
        }
        if let Some(t) = self.tracked.get_mut(&b) {
            if t.accesses.len() == ACCESSES {
                t.accesses.remove(0);
            }
            t.accesses.push(now);
        }
    }

    /// A cached block was evicted.
    pub fn on_evict(&mut self, b: BlockId, now: f64) {
        if let Some(t) = self.untrack(b) {
            let last = *t.accesses.last().expect("a track has its creation access");
            if self.events.len() >= MAX_PENDING {
                self.events.pop_front();
                self.dropped += 1;
            }
            self.events.push_back(EvictionEvent {
                lifetime_seconds: now - t.created,
                idle_seconds: now - last,
                reuse_gaps_seconds: t.accesses.windows(2).map(|w| w[1] - w[0]).collect(),
            });
        }
    }

    /// A block became blank without being cached.
    pub fn forget(&mut self, b: BlockId) {
        self.untrack(b);
    }

    pub fn drain(&mut self) -> Vec<EvictionEvent> {
        Vec::from(std::mem::take(&mut self.events))
    }

    pub fn num_tracked(&self) -> usize {
        self.tracked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetime_idle_and_last_three_gaps() {
        let mut r = Residency::new(1.0, 0, 8);
        let b = BlockId(7);
        r.on_allocate(b, 1.0);
        for t in [2.0, 4.0, 7.0, 11.0] {
            r.on_access(b, t);
        }
        r.on_evict(b, 20.0);
        let ev = r.drain();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].lifetime_seconds, 19.0);
        assert_eq!(ev[0].idle_seconds, 9.0);
        assert_eq!(ev[0].reuse_gaps_seconds, vec![2.0, 3.0, 4.0]);
        r.on_evict(b, 21.0);
        assert!(
            r.drain().is_empty(),
            "an untracked eviction records nothing"
        );
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_keeps_the_newest_in_order() {
        let mut r = Residency::new(1.0, 0, 1);
        let b = BlockId(0);
        let extra = 3;
        for i in 0..MAX_PENDING + extra {
            r.on_allocate(b, 0.0);
            r.on_evict(b, i as f64);
        }
        assert_eq!(r.dropped, extra as u64);
        let ev = r.drain();
        assert_eq!(ev.len(), MAX_PENDING);
        let lifetimes: Vec<f64> = ev.iter().map(|e| e.lifetime_seconds).collect();
        let expected: Vec<f64> = (extra..MAX_PENDING + extra).map(|i| i as f64).collect();
        assert_eq!(
            lifetimes, expected,
            "oldest first, the first `extra` dropped"
        );
        assert!(r.drain().is_empty());
    }

    #[test]
    fn sampling_rate_is_respected() {
        let mut r = Residency::new(0.25, 42, 10_000);
        for i in 0..10_000 {
            r.on_allocate(BlockId(i), 0.0);
        }
        let n = r.num_tracked();
        assert!((2_200..2_800).contains(&n), "{n}");
    }
}
