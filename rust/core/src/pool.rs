//! The block pool of one tier: reference counts and the free queues.
//!
//! Design (vLLM's `BlockPool`, SGLang's evictable/protected split):
//! - `ref_cnt[b]` counts the owners of block `b` (sequences, pins). A block with
//!   `ref_cnt > 0` is *protected* and in no queue.
//! - A block with `ref_cnt == 0` is *free* and sits in exactly one of two intrusive
//!   doubly-linked queues: `blank` (holds nothing reusable) or `evictable` (still holds a
//!   cached, hashed block). The evictable blocks are split into the eviction policy's
//!   classes (`eviction`), one FIFO queue each, least recently released at the head; `lru`
//!   has one class, so its order is exactly vLLM's.
//! - Allocation takes blank blocks first (FIFO), then evicts the head of the lowest
//!   non-empty class; the caller drops the evicted block's hash from the prefix index.
//!
//! Every operation is O(1): queue links are arrays indexed by block id, so removing a block
//! that is hit from the middle of the evictable queue costs two writes.
//! Invariants (checked by `check_invariants`): free == blank + evictable; a block is in a
//! queue iff its ref_cnt is 0; a block is evictable iff it is cached (`cached[b]`), in the
//! class its hit count gives.

use crate::error::Result;
use crate::eviction::EvictionPolicy;
use crate::fallible::vec_of;
use crate::types::BlockId;

const NIL: u32 = u32::MAX;

/// Which queue a block is in: `NONE` (owned), `BLANK`, or `EVICTABLE + class`.
const NONE: u8 = u8::MAX;
const BLANK: u8 = 0;
const EVICTABLE: u8 = 1;

/// Intrusive FIFO queues over the same block ids: the blank queue and one evictable queue
/// per eviction class.
#[derive(Debug, Clone)]
struct Queues {
    prev: Vec<u32>,
    next: Vec<u32>,
    at: Vec<u8>,
    head: Vec<u32>,
    tail: Vec<u32>,
    len: Vec<usize>,
}

impl Queues {
    fn try_new(n: usize, classes: usize) -> Result<Self> {
        let q = 1 + classes;
        Ok(Queues {
            prev: vec_of(n, NIL, "the block pool's queue links")?,
            next: vec_of(n, NIL, "the block pool's queue links")?,
            at: vec_of(n, NONE, "the block pool's queue marks")?,
            head: vec![NIL; q],
            tail: vec![NIL; q],
            len: vec![0; q],
        })
    }

    fn push_back(&mut self, q: u8, b: u32) {
        debug_assert_eq!(self.at[b as usize], NONE);
        let s = q as usize;
        let t = self.tail[s];
        self.prev[b as usize] = t;
        self.next[b as usize] = NIL;
        if t == NIL {
            self.head[s] = b;
        } else {
            self.next[t as usize] = b;
        }
        self.tail[s] = b;
        self.at[b as usize] = q;
        self.len[s] += 1;
    }

    fn remove(&mut self, b: u32) {
        let s = self.at[b as usize] as usize;
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        if p == NIL {
            self.head[s] = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail[s] = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.at[b as usize] = NONE;
        self.len[s] -= 1;
    }

    fn pop_front(&mut self, q: u8) -> Option<u32> {
        let h = self.head[q as usize];
        (h != NIL).then(|| {
            self.remove(h);
            h
        })
    }

    /// The evictable block evicted next: the head of the lowest non-empty class.
    fn pop_victim(&mut self) -> Option<u32> {
        let q = (EVICTABLE as usize..self.head.len()).find(|&q| self.head[q] != NIL)?;
        self.pop_front(q as u8)
    }

    fn num_evictable(&self) -> usize {
        self.len[EVICTABLE as usize..].iter().sum()
    }

    fn is_evictable(&self, b: u32) -> bool {
        let at = self.at[b as usize];
        at != NONE && at >= EVICTABLE
    }

    fn iter(&self, q: u8) -> impl Iterator<Item = u32> + '_ {
        let mut cur = self.head[q as usize];
        std::iter::from_fn(move || {
            (cur != NIL).then(|| {
                let b = cur;
                cur = self.next[b as usize];
                b
            })
        })
    }
}

/// What became of a block whose last owner let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// Still referenced by another owner.
    Shared,
    /// Free and blank.
    Blank,
    /// Free and still cached (evictable).
    Evictable,
}

#[derive(Debug, Clone)]
pub struct BlockPool {
    ref_cnt: Vec<u32>,
    /// Whether the block holds a registered (hashed) cached block.
    cached: Vec<bool>,
    /// Prefix hits served by the block since it was cached (saturating at `MAX_HITS`).
    hits: Vec<u8>,
    policy: EvictionPolicy,
    queues: Queues,
}

impl BlockPool {
    /// An LRU pool of `num_blocks` blank blocks. Panics where `try_new` fails (tests,
    /// benches).
    pub fn new(num_blocks: usize) -> Self {
        Self::try_new(num_blocks).unwrap_or_else(|e| panic!("{e}"))
    }

    /// An LRU pool of `num_blocks` blank blocks; `Error::OutOfMemory` (nothing allocated
    /// kept) when its arrays do not fit in memory.
    pub fn try_new(num_blocks: usize) -> Result<Self> {
        Self::with_policy(num_blocks, EvictionPolicy::Lru)
    }

    /// `try_new` evicting by `policy`.
    pub fn with_policy(num_blocks: usize, policy: EvictionPolicy) -> Result<Self> {
        let mut queues = Queues::try_new(num_blocks, policy.classes())?;
        let ref_cnt = vec_of(num_blocks, 0, "the block pool's reference counts")?;
        let cached = vec_of(num_blocks, false, "the block pool's cached marks")?;
        let hits = vec_of(num_blocks, 0u8, "the block pool's hit counts")?;
        for b in 0..num_blocks as u32 {
            queues.push_back(BLANK, b);
        }
        Ok(BlockPool {
            ref_cnt,
            cached,
            hits,
            policy,
            queues,
        })
    }

    pub fn policy(&self) -> EvictionPolicy {
        self.policy
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_cnt.len()
    }

    /// Blocks with no owner (blank + evictable).
    pub fn num_free_blocks(&self) -> usize {
        self.queues.len[BLANK as usize] + self.queues.num_evictable()
    }

    pub fn num_blank_blocks(&self) -> usize {
        self.queues.len[BLANK as usize]
    }

    pub fn num_evictable_blocks(&self) -> usize {
        self.queues.num_evictable()
    }

    pub fn num_used_blocks(&self) -> usize {
        self.num_blocks() - self.num_free_blocks()
    }

    pub fn ref_cnt(&self, b: BlockId) -> u32 {
        self.ref_cnt[b.idx()]
    }

    pub fn is_cached(&self, b: BlockId) -> bool {
        self.cached[b.idx()]
    }

    pub fn is_evictable(&self, b: BlockId) -> bool {
        self.queues.is_evictable(b.0)
    }

    /// Takes a blank block (FIFO) and gives it one owner.
    pub fn take_blank(&mut self) -> Option<BlockId> {
        let b = self.queues.pop_front(BLANK)?;
        self.ref_cnt[b as usize] = 1;
        Some(BlockId(b))
    }

    /// Takes the evictable block the policy gives up first (for `Lru`, the least recently
    /// released), gives it one owner and marks it uncached; the caller must drop its hash
    /// from the prefix index.
    pub fn evict_lru(&mut self) -> Option<BlockId> {
        let b = self.queues.pop_victim()?;
        self.ref_cnt[b as usize] = 1;
        self.cached[b as usize] = false;
        self.hits[b as usize] = 0;
        Some(BlockId(b))
    }

    /// Evicts the block `evict_lru` would into the blank queue (for `gc`).
    pub fn evict_lru_to_blank(&mut self) -> Option<BlockId> {
        let b = self.queues.pop_victim()?;
        self.cached[b as usize] = false;
        self.hits[b as usize] = 0;
        self.queues.push_back(BLANK, b);
        Some(BlockId(b))
    }

    /// Adds an owner; a free cached block leaves its evictable queue.
    pub fn acquire(&mut self, b: BlockId) {
        if self.ref_cnt[b.idx()] == 0 {
            assert!(self.is_evictable(b), "acquire of a blank block");
            self.queues.remove(b.0);
        }
        self.ref_cnt[b.idx()] += 1;
    }

    /// `acquire` for a prefix hit: the block also counts one more hit (see `eviction`).
    pub fn acquire_hit(&mut self, b: BlockId) {
        self.acquire(b);
        let h = &mut self.hits[b.idx()];
        *h = h.saturating_add(1).min(crate::eviction::MAX_HITS);
    }

    /// Prefix hits the block served since it was cached (saturating).
    pub fn hits(&self, b: BlockId) -> u8 {
        self.hits[b.idx()]
    }

    /// Drops an owner; the last owner's release queues the block at the LRU tail.
    pub fn release(&mut self, b: BlockId) -> Released {
        let r = &mut self.ref_cnt[b.idx()];
        assert!(*r > 0, "release of free block {}", b.0);
        *r -= 1;
        if *r > 0 {
            return Released::Shared;
        }
        if self.cached[b.idx()] {
            let class = self.policy.class(self.hits[b.idx()]);
            self.queues.push_back(EVICTABLE + class as u8, b.0);
            Released::Evictable
        } else {
            self.queues.push_back(BLANK, b.0);
            Released::Blank
        }
    }

    /// Marks an owned block as holding a registered cached block.
    pub fn set_cached(&mut self, b: BlockId, cached: bool) {
        let at = self.queues.at[b.idx()];
        assert!(at == NONE, "set_cached on a free block");
        self.cached[b.idx()] = cached;
        self.hits[b.idx()] = 0;
    }

    /// Drops the cached mark of an evictable block, moving it to the blank queue.
    pub fn uncache_free(&mut self, b: BlockId) {
        assert!(self.is_evictable(b));
        self.queues.remove(b.0);
        self.cached[b.idx()] = false;
        self.hits[b.idx()] = 0;
        self.queues.push_back(BLANK, b.0);
    }

    /// Evictable blocks in eviction order (for `Lru`, least to most recently released).
    pub fn evictable_lru(&self) -> impl Iterator<Item = BlockId> + '_ {
        (EVICTABLE..self.queues.head.len() as u8)
            .flat_map(|q| self.queues.iter(q))
            .map(BlockId)
    }

    pub fn blank_fifo(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.queues.iter(BLANK).map(BlockId)
    }

    /// Panics with a description if any invariant of the module header is broken.
    pub fn check_invariants(&self) {
        let mut counted = vec![0usize; self.queues.len.len()];
        for b in 0..self.num_blocks() {
            let at = self.queues.at[b];
            assert_eq!(
                at == NONE,
                self.ref_cnt[b] > 0,
                "block {b}: queued iff unowned"
            );
            if at == NONE {
                continue;
            }
            if at == BLANK {
                assert!(!self.cached[b], "blank block {b} is cached");
            } else {
                assert!(self.cached[b], "evictable block {b} is not cached");
                let class = self.policy.class(self.hits[b]);
                assert_eq!(at - EVICTABLE, class as u8, "block {b}: eviction class");
            }
            counted[at as usize] += 1;
        }
        assert_eq!(counted, self.queues.len, "queue lengths");
        for q in 0..self.queues.len.len() as u8 {
            assert_eq!(self.queues.iter(q).count(), self.queues.len[q as usize]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_fifo_then_lru_eviction() {
        let mut p = BlockPool::new(4);
        let got: Vec<_> = (0..4).map(|_| p.take_blank().unwrap().0).collect();
        assert_eq!(got, [0, 1, 2, 3]);
        assert!(p.take_blank().is_none());
        for b in [3, 1] {
            p.set_cached(BlockId(b), true);
        }
        // release order: 3 (cached), 2, 1 (cached), 0
        assert_eq!(p.release(BlockId(3)), Released::Evictable);
        assert_eq!(p.release(BlockId(2)), Released::Blank);
        assert_eq!(p.release(BlockId(1)), Released::Evictable);
        assert_eq!(p.release(BlockId(0)), Released::Blank);
        p.check_invariants();
        assert_eq!(p.num_free_blocks(), 4);
        assert_eq!(p.num_evictable_blocks(), 2);
        assert_eq!(p.take_blank(), Some(BlockId(2)));
        assert_eq!(p.take_blank(), Some(BlockId(0)));
        assert_eq!(p.take_blank(), None);
        assert_eq!(p.evict_lru(), Some(BlockId(3)));
        assert!(!p.is_cached(BlockId(3)));
        p.check_invariants();
    }

    #[test]
    fn hit_removes_from_middle() {
        let mut p = BlockPool::new(3);
        for _ in 0..3 {
            let b = p.take_blank().unwrap();
            p.set_cached(b, true);
        }
        for b in [0, 1, 2] {
            p.release(BlockId(b));
        }
        p.acquire(BlockId(1));
        assert_eq!(p.evictable_lru().map(|b| b.0).collect::<Vec<_>>(), [0, 2]);
        p.acquire(BlockId(1));
        assert_eq!(p.release(BlockId(1)), Released::Shared);
        assert_eq!(p.release(BlockId(1)), Released::Evictable);
        assert_eq!(
            p.evictable_lru().map(|b| b.0).collect::<Vec<_>>(),
            [0, 2, 1]
        );
        p.check_invariants();
    }

    #[test]
    fn lfu_evicts_the_least_hit_class_first_then_the_least_recent() {
        let mut p = BlockPool::with_policy(4, EvictionPolicy::Lfu).unwrap();
        for _ in 0..4 {
            let b = p.take_blank().unwrap();
            p.set_cached(b, true);
        }
        // Hits: block 0 twice, block 1 once, 2 and 3 none (6 hits on 3 saturate at 4: later).
        for b in [0, 0, 1] {
            p.acquire_hit(BlockId(b));
        }
        for b in [0, 1, 2, 3, 0, 0, 1] {
            p.release(BlockId(b));
        }
        p.check_invariants();
        // Class 0 (2, 3 in release order), class 1 (1), class 2 (0).
        let order: Vec<u32> = p.evictable_lru().map(|b| b.0).collect();
        assert_eq!(order, [2, 3, 1, 0]);
        assert_eq!(p.evict_lru(), Some(BlockId(2)));
        assert_eq!(p.hits(BlockId(2)), 0);
        // A hit moves a block up: 3 is hit 5 times and saturates in the top class.
        for _ in 0..5 {
            p.acquire_hit(BlockId(3));
            p.release(BlockId(3));
        }
        assert_eq!(p.hits(BlockId(3)), crate::eviction::MAX_HITS);
        assert_eq!(
            p.evictable_lru().map(|b| b.0).collect::<Vec<_>>(),
            [1, 0, 3]
        );
        assert_eq!(p.evict_lru_to_blank(), Some(BlockId(1)));
        p.check_invariants();
    }

    #[test]
    fn lru_ignores_hits() {
        let mut p = BlockPool::new(2);
        for _ in 0..2 {
            let b = p.take_blank().unwrap();
            p.set_cached(b, true);
        }
        p.acquire_hit(BlockId(0));
        p.release(BlockId(1));
        p.release(BlockId(0));
        p.release(BlockId(0));
        assert_eq!(p.evictable_lru().map(|b| b.0).collect::<Vec<_>>(), [1, 0]);
        p.check_invariants();
    }

    #[test]
    #[should_panic(expected = "release of free block")]
    fn double_release_is_loud() {
        let mut p = BlockPool::new(1);
        let b = p.take_blank().unwrap();
        p.release(b);
        p.release(b);
    }
}
