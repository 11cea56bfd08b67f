//! `Lru2`'s bookkeeping: each block's last two access rounds, and the free cached blocks in
//! the rule's order.
//!
//! Design: a round is one allocation (the pool's `next_round`); a block is accessed when it
//! is cached or hit, at most once a round. The free cached blocks sit in an indexed binary
//! min-heap of 128-bit keys, fixed at release: blocks seen in one round only (no
//! second-to-last access) come first, newest first where `newest_first` (the device tier:
//! a request re-read after a long gap then still finds its blocks, one re-read soon is the
//! loser), else oldest first; then the blocks seen twice, by their second-to-last access
//! (LRU-2). Ties go to the earlier release, so a chain released tail first goes leaf first.
//! Invariants (`check`): `pos[heap[i]] == i`; every heap entry's key is at least its
//! parent's; `pos[b] == NIL` for a block not in the heap.
//! Leaves first: a hit on a child is a hit on its parent in the same round, and a history
//! brought back from the ghost is capped at the parent's (`pool`), so a child's
//! second-to-last access is never later than its parent's; blocks seen once in the same
//! round tie on it and go by release.
//! Cost: O(log n) a release, hit (removal) and eviction; 28 bytes a block.

use crate::error::Result;
use crate::fallible::vec_of;

/// No access (or no second one).
pub const NEVER: u32 = u32::MAX;
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
pub struct Lru2Order {
    newest_first: bool,
    /// Last and second-to-last access round of each block (`NEVER` for none).
    pub last: Vec<u32>,
    pub second: Vec<u32>,
    key: Vec<u128>,
    heap: Vec<u32>,
    pos: Vec<u32>,
    releases: u64,
}

impl Lru2Order {
    pub fn try_new(num_blocks: usize, newest_first: bool) -> Result<Self> {
        let mut heap = Vec::new();
        heap.try_reserve_exact(num_blocks)
            .map_err(|_| crate::fallible::out_of_memory("the lru2 order's heap", num_blocks, 4))?;
        Ok(Lru2Order {
            newest_first,
            last: vec_of(num_blocks, NEVER, "the lru2 order's access rounds")?,
            second: vec_of(num_blocks, NEVER, "the lru2 order's access rounds")?,
            key: vec_of(num_blocks, 0, "the lru2 order's keys")?,
            heap,
            pos: vec_of(num_blocks, NIL, "the lru2 order's heap positions")?,
            releases: 0,
        })
    }

    /// Block `b` is accessed in `round` (a second access in the same round counts once).
    pub fn access(&mut self, b: u32, round: u32) {
        let i = b as usize;
        if self.last[i] != round {
            self.second[i] = self.last[i];
            self.last[i] = round;
        }
    }

    /// Block `b` is cached in `round`, with `second` as its second-to-last access (`NEVER`:
    /// seen now only).
    pub fn cache(&mut self, b: u32, round: u32, second: u32) {
        self.last[b as usize] = round;
        self.second[b as usize] = second;
    }

    /// Block `b` no longer holds a cached block.
    pub fn forget(&mut self, b: u32) {
        self.last[b as usize] = NEVER;
        self.second[b as usize] = NEVER;
    }

    fn key_of(&self, b: u32) -> u128 {
        let i = b as usize;
        let (class, primary) = match self.second[i] {
            NEVER if self.newest_first => (0u128, u32::MAX - self.last[i]),
            NEVER => (0, self.last[i]),
            s => (1, s),
        };
        (class << 127) | (u128::from(primary) << 64) | u128::from(self.releases)
    }

    /// Queues a block its last owner released.
    pub fn push(&mut self, b: u32) {
        debug_assert_eq!(self.pos[b as usize], NIL, "block {b} queued twice");
        self.releases += 1;
        self.key[b as usize] = self.key_of(b);
        self.heap.push(b);
        self.pos[b as usize] = (self.heap.len() - 1) as u32;
        self.sift_up(self.heap.len() - 1);
    }

    /// Takes a queued block out (a hit, or a free block uncached).
    pub fn remove(&mut self, b: u32) {
        let at = self.pos[b as usize];
        assert_ne!(at, NIL, "block {b} is not queued");
        let at = at as usize;
        let last = self.heap.pop().expect("a queued block");
        self.pos[b as usize] = NIL;
        if at < self.heap.len() {
            self.heap[at] = last;
            self.pos[last as usize] = at as u32;
            self.sift_down(at);
            self.sift_up(at);
        }
    }

    /// The block the rule gives up first.
    pub fn peek(&self) -> Option<u32> {
        self.heap.first().copied()
    }

    /// The block the rule gives up first, taken out.
    pub fn pop(&mut self) -> Option<u32> {
        let b = *self.heap.first()?;
        self.remove(b);
        Some(b)
    }

    fn less(&self, x: usize, y: usize) -> bool {
        self.key[self.heap[x] as usize] < self.key[self.heap[y] as usize]
    }

    fn swap(&mut self, x: usize, y: usize) {
        self.heap.swap(x, y);
        self.pos[self.heap[x] as usize] = x as u32;
        self.pos[self.heap[y] as usize] = y as u32;
    }

    fn sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let p = (i - 1) / 2;
            if !self.less(i, p) {
                break;
            }
            self.swap(i, p);
            i = p;
        }
    }

    fn sift_down(&mut self, mut i: usize) {
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut m = i;
            if l < self.heap.len() && self.less(l, m) {
                m = l;
            }
            if r < self.heap.len() && self.less(r, m) {
                m = r;
            }
            if m == i {
                return;
            }
            self.swap(i, m);
            i = m;
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    pub fn contains(&self, b: u32) -> bool {
        self.pos[b as usize] != NIL
    }

    /// Panics unless the heap and its positions agree.
    pub fn check(&self) {
        for (i, &b) in self.heap.iter().enumerate() {
            assert_eq!(self.pos[b as usize] as usize, i, "position of block {b}");
            if i > 0 {
                assert!(!self.less(i, (i - 1) / 2), "heap order at {i}");
            }
        }
        let queued = self.pos.iter().filter(|&&p| p != NIL).count();
        assert_eq!(queued, self.heap.len(), "positions of blocks not queued");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_once_newest_first_then_by_second_to_last_access() {
        let mut o = Lru2Order::try_new(6, true).unwrap();
        // Blocks 0, 1 cached in round 1 (0 the parent of 1), 2 in round 2; 3 and 4 seen in
        // rounds 1 and 3 (3's second-to-last is 1), and 4 in rounds 2 and 3.
        o.cache(0, 1, NEVER);
        o.cache(1, 1, NEVER);
        o.cache(2, 2, NEVER);
        o.cache(3, 1, NEVER);
        o.access(3, 3);
        o.access(3, 3); // twice in a round counts once
        o.cache(4, 2, NEVER);
        o.access(4, 3);
        for b in [1, 0, 4, 3, 2] {
            o.push(b); // released tail first: 1 before 0
        }
        o.check();
        assert_eq!(
            std::iter::from_fn(|| o.pop()).collect::<Vec<_>>(),
            [2, 1, 0, 3, 4],
            "round 2 (newest) first, then round 1 leaf first, then by second-to-last"
        );
        let mut fifo = Lru2Order::try_new(3, false).unwrap();
        for (b, round) in [(0, 2), (1, 1), (2, 3)] {
            fifo.cache(b, round, NEVER);
            fifo.push(b);
        }
        fifo.remove(1);
        fifo.check();
        assert_eq!(
            std::iter::from_fn(|| fifo.pop()).collect::<Vec<_>>(),
            [0, 2]
        );
    }
}
