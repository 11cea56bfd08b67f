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
//! - Allocation takes blank blocks first (FIFO), then evicts the policy's victim (`Lru`,
//!   `Lfu`: the head of the lowest non-empty class; `Lecar`: see `eviction`); the caller
//!   drops the evicted block's hash from the prefix index. Under the policies that remember
//!   evicted blocks (all but `lru`) the pool keeps each cached block's hash fingerprint, so
//!   the policy's ghost remembers what it evicted and a block cached again under a
//!   remembered hash starts with its history.
//!
//! Every operation is O(1): queue links are arrays indexed by block id, so removing a block
//! that is hit from the middle of the evictable queue costs two writes.
//! Invariants (checked by `check_invariants`): free == blank + evictable; a block is in a
//! queue iff its ref_cnt is 0; a block is evictable iff it is cached (`cached[b]`), in the
//! class its hit count gives.

use crate::error::Result;
use crate::eviction::{EvictionPolicy, LECAR_LEARNING_RATE, LFU_EXPERT, LRU_EXPERT};
use crate::fallible::{vec_of, zeroed};
use crate::ghost::{fingerprint, Ghost, Remembered};
use crate::lru2::{self, Lru2Order};
use crate::shadow::Shadows;
use crate::types::{BlockHash, BlockId};

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

    /// The head of the lowest non-empty evictable class.
    fn pop_lowest(&mut self) -> Option<u32> {
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
    /// Prefix hits served by the block since it was cached, plus what its ghost entry
    /// carried (saturating at `MAX_HITS`).
    hits: Vec<u8>,
    /// Fingerprint of a cached block's hash (what the ghost and the shadows see); empty
    /// under `Lru`, which remembers nothing (8 bytes a block saved).
    fp: Vec<u64>,
    policy: EvictionPolicy,
    queues: Queues,
    ghost: Ghost,
    /// `Lecar`, `Adaptive`: the evictable blocks in release order (empty under other
    /// policies). `Lecar`: the experts' weights, evictions so far, the regret discount and
    /// the draw's generator.
    order: Queues,
    weights: [f64; 2],
    evictions: u32,
    discount: f64,
    rng: u64,
    /// `Adaptive`: the sampled simulations that pick the expert (boxed: absent elsewhere).
    shadows: Option<Box<Shadows>>,
    /// `Lru2`: access rounds and the eviction order (boxed: absent elsewhere).
    lru2: Option<Box<Lru2Order>>,
    /// The current round (one allocation; `next_round`).
    round: u32,
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

    /// `try_new` evicting by `policy`, as a lower tier (host, disk) does: under `Lru2` its
    /// blocks seen once go oldest first (they arrive as the tier above evicts them, children
    /// before parents).
    pub fn with_policy(num_blocks: usize, policy: EvictionPolicy) -> Result<Self> {
        Self::build(num_blocks, policy, false)
    }

    /// `with_policy` for the device tier: under `Lru2` its blocks seen once go newest first
    /// (`lru2`).
    pub fn for_device(num_blocks: usize, policy: EvictionPolicy) -> Result<Self> {
        Self::build(num_blocks, policy, true)
    }

    fn build(num_blocks: usize, policy: EvictionPolicy, device: bool) -> Result<Self> {
        let mut queues = Queues::try_new(num_blocks, policy.classes())?;
        let ref_cnt = zeroed(num_blocks, "the block pool's reference counts")?;
        let cached = zeroed(num_blocks, "the block pool's cached marks")?;
        let hits = zeroed(num_blocks, "the block pool's hit counts")?;
        let remembers = policy != EvictionPolicy::Lru;
        let fp = zeroed(
            if remembers { num_blocks } else { 0 },
            "the block pool's hash fingerprints",
        )?;
        let ghost = Ghost::try_new(policy.ghost_capacity(num_blocks))?;
        let ordered = policy.keeps_release_order();
        let order = Queues::try_new(if ordered { num_blocks } else { 0 }, 1)?;
        let shadows = match policy {
            EvictionPolicy::Adaptive => Some(Box::new(Shadows::try_new(num_blocks, device)?)),
            _ => None,
        };
        let lru2 = match policy {
            EvictionPolicy::Lru2 | EvictionPolicy::Adaptive => {
                Some(Box::new(Lru2Order::try_new(num_blocks, device)?))
            }
            _ => None,
        };
        for b in 0..num_blocks as u32 {
            queues.push_back(BLANK, b);
        }
        Ok(BlockPool {
            ref_cnt,
            cached,
            hits,
            fp,
            policy,
            queues,
            ghost,
            order,
            weights: [0.5, 0.5],
            evictions: 0,
            discount: 0.005f64.powf(1.0 / num_blocks.max(1) as f64),
            rng: 0x9E37_79B9_7F4A_7C15,
            shadows,
            lru2,
            round: 0,
        })
    }

    /// Queues a free cached block (its class queue, and the release order under `Lecar`
    /// and `Adaptive`).
    fn enqueue_evictable(&mut self, b: u32) {
        let class = self.class_of(b);
        self.queues.push_back(EVICTABLE + class as u8, b);
        if self.policy.keeps_release_order() {
            self.order.push_back(EVICTABLE, b);
        }
        if let Some(o) = self.lru2.as_deref_mut() {
            o.push(b);
        }
    }

    /// Takes a free block out of its queue(s).
    fn unqueue(&mut self, b: u32) {
        let evictable = self.queues.is_evictable(b);
        self.queues.remove(b);
        if evictable && self.policy.keeps_release_order() {
            self.order.remove(b);
        }
        if let (true, Some(o)) = (evictable, self.lru2.as_deref_mut()) {
            o.remove(b);
        }
    }

    /// A uniform draw in [0, 1) (splitmix64: deterministic, so runs repeat).
    fn draw(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) as f64 / (u64::MAX as f64 + 1.0)
    }

    /// `Lecar`'s victim: the expert drawn by weight picks it; the ghost notes who.
    fn pop_lecar(&mut self) -> Option<u32> {
        if self.queues.num_evictable() == 0 {
            return None;
        }
        let expert = if self.draw() < self.weights[LRU_EXPERT as usize] {
            LRU_EXPERT
        } else {
            LFU_EXPERT
        };
        let b = self.pop_expert(expert)?;
        self.evictions = self.evictions.wrapping_add(1);
        let noted = Remembered {
            hits: self.hits[b as usize],
            expert,
            at: self.evictions,
        };
        self.ghost.insert(self.fp[b as usize], noted);
        Some(b)
    }

    /// Takes the victim of `expert` out of its queues: the least recently released block
    /// (LRU), or the head of the lowest class (`Lfu`'s rule).
    fn pop_expert(&mut self, expert: u8) -> Option<u32> {
        let b = if expert == LRU_EXPERT {
            self.order.head[EVICTABLE as usize]
        } else {
            let q = (EVICTABLE as usize..self.queues.head.len())
                .find(|&q| self.queues.head[q] != NIL)?;
            self.queues.head[q]
        };
        if b == NIL {
            return None;
        }
        self.unqueue(b);
        Some(b)
    }

    /// `Adaptive`'s victim: the leading expert picks it (the least recently released block,
    /// or `Lru2`'s); the ghost keeps its last access.
    fn pop_adaptive(&mut self) -> Option<u32> {
        let expert = self.shadows.as_ref().map_or(LRU_EXPERT, |s| s.leader());
        let o = self.lru2.as_deref().expect("Adaptive keeps the lru2 order");
        let b = if expert == LRU_EXPERT {
            self.order.head[EVICTABLE as usize]
        } else {
            o.peek().unwrap_or(NIL)
        };
        (b != NIL).then(|| self.evict_remembering_last_access(b))
    }

    /// Takes free block `b` out of its queues, its last access noted in the ghost (`Lru2`'s
    /// history, which `Adaptive` keeps too).
    fn evict_remembering_last_access(&mut self, b: u32) -> u32 {
        let o = self.lru2.as_deref().expect("a policy with the lru2 order");
        let noted = Remembered {
            at: o.last[b as usize],
            ..Default::default()
        };
        self.unqueue(b);
        self.ghost.insert(self.fp[b as usize], noted);
        b
    }

    /// `Adaptive`: which expert evictions follow now (None under other policies).
    pub fn adaptive_leader(&self) -> Option<u8> {
        self.shadows.as_ref().map(|s| s.leader())
    }

    /// `Lecar`: the expert that evicted a block now cached again pays for it.
    fn regret(&mut self, noted: Remembered) {
        let age = self.evictions.wrapping_sub(noted.at);
        let loss = self.discount.powf(f64::from(age));
        self.weights[noted.expert as usize] *= (-LECAR_LEARNING_RATE * loss).exp();
        let total = self.weights[0] + self.weights[1];
        self.weights = [self.weights[0] / total, self.weights[1] / total];
    }

    /// `Lecar`'s weight of the LRU expert (the LFU expert's is 1 minus it).
    pub fn lru_weight(&self) -> f64 {
        self.weights[LRU_EXPERT as usize]
    }

    /// The class a free cached block joins when released.
    fn class_of(&self, b: u32) -> usize {
        let b = b as usize;
        match self.policy {
            EvictionPolicy::Lru | EvictionPolicy::Lru2 | EvictionPolicy::Adaptive => 0,
            EvictionPolicy::Lfu | EvictionPolicy::Lecar => self.hits[b] as usize,
        }
    }

    /// Takes the policy's victim out of its queue and lets the ghost remember it.
    fn pop_victim(&mut self) -> Option<u32> {
        match self.policy {
            EvictionPolicy::Lru => self.queues.pop_lowest(),
            EvictionPolicy::Lfu => {
                let b = self.queues.pop_lowest()?;
                let noted = Remembered {
                    hits: self.hits[b as usize],
                    ..Default::default()
                };
                self.ghost.insert(self.fp[b as usize], noted);
                Some(b)
            }
            EvictionPolicy::Lecar => self.pop_lecar(),
            EvictionPolicy::Adaptive => self.pop_adaptive(),
            EvictionPolicy::Lru2 => {
                let b = self.lru2.as_deref().expect("Lru2 keeps its order").peek()?;
                Some(self.evict_remembering_last_access(b))
            }
        }
    }

    /// Starts the next round (one allocation): `Lru2` counts accesses by round.
    pub fn next_round(&mut self) {
        self.round = self.round.wrapping_add(1);
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

    /// Starts fetching what `acquire_hit(b)` reads first (its count, mark and queue links).
    /// Changes nothing.
    pub fn prefetch(&self, b: BlockId) {
        let i = b.idx();
        crate::slots::prefetch(&self.ref_cnt[i]);
        crate::slots::prefetch(&self.hits[i]);
        crate::slots::prefetch(&self.queues.at[i]);
        crate::slots::prefetch(&self.queues.prev[i]);
        crate::slots::prefetch(&self.queues.next[i]);
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
        let b = self.pop_victim()?;
        self.forget_history(b);
        self.ref_cnt[b as usize] = 1;
        self.cached[b as usize] = false;
        self.hits[b as usize] = 0;
        Some(BlockId(b))
    }

    /// Evicts the block `evict_lru` would into the blank queue (for `gc`).
    pub fn evict_lru_to_blank(&mut self) -> Option<BlockId> {
        let b = self.pop_victim()?;
        self.forget_history(b);
        self.cached[b as usize] = false;
        self.hits[b as usize] = 0;
        self.queues.push_back(BLANK, b);
        Some(BlockId(b))
    }

    /// Adds an owner; a free cached block leaves its evictable queue.
    pub fn acquire(&mut self, b: BlockId) {
        if self.ref_cnt[b.idx()] == 0 {
            assert!(self.is_evictable(b), "acquire of a blank block");
            self.unqueue(b.0);
        }
        self.ref_cnt[b.idx()] += 1;
    }

    /// `acquire` for a prefix hit: the block also counts one more hit (see `eviction`),
    /// and `Adaptive`'s shadows see the lookup.
    pub fn acquire_hit(&mut self, b: BlockId) {
        self.acquire(b);
        let h = &mut self.hits[b.idx()];
        *h = h.saturating_add(1).min(self.policy.max_hits());
        if let Some(s) = self.shadows.as_deref_mut() {
            s.reference(self.fp[b.idx()], self.round);
        }
        if let Some(o) = self.lru2.as_deref_mut() {
            o.access(b.0, self.round);
        }
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
            self.enqueue_evictable(b.0);
            Released::Evictable
        } else {
            self.queues.push_back(BLANK, b.0);
            Released::Blank
        }
    }

    /// Marks an owned block as holding the registered cached block `hash`, whose parent
    /// block in this tier is `parent` (None for a chain's first block, or a parent not in
    /// this tier). A hash the policy's ghost remembers brings its history back (`Lfu`,
    /// `Lecar`: its hits plus one for the miss, at most the parent's: leaves first).
    pub fn register(&mut self, b: BlockId, hash: BlockHash, parent: Option<BlockId>) {
        assert!(self.queues.at[b.idx()] == NONE, "register of a free block");
        let fp = fingerprint(hash);
        let remembered = self.ghost.take(fp);
        let i = b.idx();
        self.cached[i] = true;
        if let Some(slot) = self.fp.get_mut(i) {
            *slot = fp;
        }
        let cap = parent.map_or(self.policy.max_hits(), |p| self.hits[p.idx()]);
        self.hits[i] = match remembered {
            Some(r) if self.policy.counts_hits() => r
                .hits
                .saturating_add(1)
                .min(self.policy.max_hits())
                .min(cap),
            _ => 0,
        };
        // A block computed and cached now is a lookup that missed.
        if let Some(s) = self.shadows.as_deref_mut() {
            s.reference(fp, self.round);
        }
        if let (EvictionPolicy::Lecar, Some(r)) = (self.policy, remembered) {
            self.regret(r);
        }
        if let Some(o) = self.lru2.as_deref_mut() {
            // The last access the ghost remembers becomes the second-to-last, never later
            // than the parent's (leaves first; a parent seen once makes its child so too).
            let second = match (remembered, parent) {
                (None, _) => lru2::NEVER,
                (Some(r), None) => r.at,
                (Some(r), Some(p)) => match o.second[p.idx()] {
                    lru2::NEVER => lru2::NEVER,
                    s => r.at.min(s),
                },
            };
            o.cache(b.0, self.round, second);
        }
    }

    /// Drops the cached mark of an owned block (its hash left the index).
    pub fn unregister(&mut self, b: BlockId) {
        assert!(
            self.queues.at[b.idx()] == NONE,
            "unregister of a free block"
        );
        self.cached[b.idx()] = false;
        self.hits[b.idx()] = 0;
        self.forget_history(b.0);
    }

    /// `Lru2`: drops the access rounds of a block that no longer holds a cached block.
    fn forget_history(&mut self, b: u32) {
        if let Some(o) = self.lru2.as_deref_mut() {
            o.forget(b);
        }
    }

    /// Forgets what the policy remembers of evicted blocks (a prefix-cache reset).
    pub fn forget_evicted(&mut self) {
        self.ghost.clear();
        if let Some(s) = self.shadows.as_deref_mut() {
            s.clear();
        }
    }

    /// Entries the policy's ghost holds (evicted hashes it remembers).
    pub fn num_ghosts(&self) -> usize {
        self.ghost.len()
    }

    /// Drops the cached mark of an evictable block, moving it to the blank queue.
    pub fn uncache_free(&mut self, b: BlockId) {
        assert!(self.is_evictable(b));
        self.unqueue(b.0);
        self.cached[b.idx()] = false;
        self.hits[b.idx()] = 0;
        self.forget_history(b.0);
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
                let class = self.class_of(b as u32);
                assert_eq!(at - EVICTABLE, class as u8, "block {b}: eviction class");
            }
            counted[at as usize] += 1;
        }
        assert_eq!(counted, self.queues.len, "queue lengths");
        if self.policy.keeps_release_order() {
            let n = self.order.iter(EVICTABLE).count();
            assert_eq!(
                n,
                self.num_evictable_blocks(),
                "release order holds the evictable"
            );
            assert!(self
                .order
                .iter(EVICTABLE)
                .all(|b| self.queues.is_evictable(b)));
        }
        for q in 0..self.queues.len.len() as u8 {
            assert_eq!(self.queues.iter(q).count(), self.queues.len[q as usize]);
        }
        if let Some(o) = self.lru2.as_deref() {
            o.check();
            for b in 0..self.num_blocks() as u32 {
                assert_eq!(
                    o.contains(b),
                    self.queues.is_evictable(b),
                    "block {b}: in the lru2 order iff evictable"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eviction::LRU2_EXPERT;

    #[test]
    fn blank_fifo_then_lru_eviction() {
        let mut p = BlockPool::new(4);
        let got: Vec<_> = (0..4).map(|_| p.take_blank().unwrap().0).collect();
        assert_eq!(got, [0, 1, 2, 3]);
        assert!(p.take_blank().is_none());
        for b in [3, 1] {
            p.register(BlockId(b), u128::from(b), None);
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
            p.register(b, u128::from(b.0), None);
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
            p.register(b, u128::from(b.0), None);
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

    /// A pool of `n` cached blocks (hash = id), released in id order.
    fn cached_pool(n: u32, policy: EvictionPolicy) -> BlockPool {
        let mut p = BlockPool::with_policy(n as usize, policy).unwrap();
        for _ in 0..n {
            let b = p.take_blank().unwrap();
            p.register(b, u128::from(b.0), None);
        }
        for b in 0..n {
            p.release(BlockId(b));
        }
        p
    }

    fn evict_all(p: &mut BlockPool) -> Vec<u32> {
        std::iter::from_fn(|| p.evict_lru_to_blank().map(|b| b.0)).collect()
    }

    #[test]
    fn lfu_remembers_the_hits_of_an_evicted_hash() {
        let mut p = cached_pool(3, EvictionPolicy::Lfu);
        p.acquire_hit(BlockId(0));
        p.release(BlockId(0)); // class 1; 1 and 2 in class 0
        assert_eq!(p.evict_lru(), Some(BlockId(1)));
        assert_eq!(p.num_ghosts(), 1);
        assert_eq!(p.evict_lru(), Some(BlockId(2)));
        assert_eq!(p.evict_lru(), Some(BlockId(0)));
        assert_eq!(p.num_ghosts(), 3);
        // Block 0's hash comes back (a miss: one more) with its hit: class 2. Hash 1 comes
        // back with class 1, and a new hash starts at 0.
        for (b, hash) in [(0, 0u128), (1, 1), (2, 7)] {
            p.register(BlockId(b), hash, None);
        }
        assert_eq!(
            (p.hits(BlockId(0)), p.hits(BlockId(1)), p.hits(BlockId(2))),
            (2, 1, 0)
        );
        assert_eq!(p.num_ghosts(), 1); // only hash 2 still remembered
        for b in [0, 1, 2] {
            p.release(BlockId(b));
        }
        assert_eq!(evict_all(&mut p), [2, 1, 0]);
        p.forget_evicted();
        assert_eq!(p.num_ghosts(), 0);
        p.check_invariants();
    }

    #[test]
    fn a_count_from_the_ghost_never_exceeds_the_parents() {
        // Block 1 (hash 1) was evicted after 3 hits; it comes back under a parent hit once:
        // capped at the parent's count, so the parent is never evicted before it.
        let mut p = cached_pool(3, EvictionPolicy::Lfu);
        for _ in 0..3 {
            p.acquire_hit(BlockId(1));
            p.release(BlockId(1));
        }
        p.acquire_hit(BlockId(0));
        p.release(BlockId(0));
        let order = evict_all(&mut p); // 2 (class 0), 0 (class 1), 1 (class 3)
        assert_eq!(order, [2, 0, 1]);
        let parent = p.take_blank().unwrap();
        p.register(parent, 0, None); // hash 0 back: 1 hit + 1 for the miss = 2
        let child = p.take_blank().unwrap();
        p.register(child, 1, Some(parent)); // 3 + 1, capped at the parent's 2
        assert_eq!((p.hits(parent), p.hits(child)), (2, 2));
        p.release(child);
        p.release(parent);
        assert_eq!(evict_all(&mut p), [child.0, parent.0]);
        p.check_invariants();
    }

    #[test]
    fn lecar_makes_the_expert_that_was_wrong_pay() {
        // Block 0 was hit (LFU keeps it) but released first (LRU evicts it); block 1 the
        // other way round: the two experts disagree.
        let run = || {
            let mut p = BlockPool::with_policy(2, EvictionPolicy::Lecar).unwrap();
            for _ in 0..2 {
                let b = p.take_blank().unwrap();
                p.register(b, u128::from(b.0), None);
            }
            p.acquire_hit(BlockId(0));
            p.release(BlockId(0));
            p.release(BlockId(0));
            p.release(BlockId(1));
            p.check_invariants();
            let victim = p.evict_lru().unwrap();
            p.check_invariants();
            assert_eq!(p.lru_weight(), 0.5);
            p.register(victim, u128::from(victim.0), None); // the evicted hash was needed after all
            (victim, p.lru_weight())
        };
        let (victim, w) = run();
        if victim == BlockId(0) {
            assert!(w < 0.5, "LRU chose block 0 and pays: {w}");
        } else {
            assert!(w > 0.5, "LFU chose block 1 and pays: {w}");
        }
        // The draw is seeded: the same operations give the same choices.
        assert_eq!(run(), (victim, w));
    }

    #[test]
    fn lecar_follows_a_decided_expert() {
        // Once the weights favour LRU, evictions follow release order, hits or not.
        let mut p = cached_pool(8, EvictionPolicy::Lecar);
        p.weights = [1.0, 0.0];
        p.acquire_hit(BlockId(0));
        p.release(BlockId(0)); // LFU would keep 0 longest; LRU evicts it last (released last)
        assert_eq!(evict_all(&mut p), [1, 2, 3, 4, 5, 6, 7, 0]);
        let mut p = cached_pool(8, EvictionPolicy::Lecar);
        p.weights = [0.0, 1.0];
        p.acquire_hit(BlockId(7));
        p.release(BlockId(7));
        p.acquire_hit(BlockId(3));
        p.release(BlockId(3));
        assert_eq!(evict_all(&mut p), [0, 1, 2, 4, 5, 6, 7, 3]);
        p.check_invariants();
    }

    #[test]
    fn adaptive_evicts_by_the_leading_shadow() {
        // Fresh, the shadows tie and LRU leads: release order, hits or not.
        let mut p = cached_pool(8, EvictionPolicy::Adaptive);
        assert_eq!(p.adaptive_leader(), Some(LRU_EXPERT));
        p.acquire_hit(BlockId(0));
        p.release(BlockId(0));
        assert_eq!(evict_all(&mut p), [1, 2, 3, 4, 5, 6, 7, 0]);
        // Traffic where frequency wins (4 hot blocks between scans longer than the tier)
        // makes the `lru2` shadow lead.
        let mut p = cached_pool(8, EvictionPolicy::Adaptive);
        let shadows = p.shadows.as_deref_mut().unwrap();
        for i in 0..4000u64 {
            let k = if i % 3 == 0 { i % 4 } else { 1000 + i };
            let fp = fingerprint(u128::from(k).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            shadows.reference(fp, i as u32);
        }
        assert_eq!(p.adaptive_leader(), Some(LRU2_EXPERT));
        // Under `lru2`'s rule: 7 and 3, hit in a later round, are seen twice and go last;
        // the rest were seen in one round and go by release (a lower tier's pool: oldest
        // first).
        p.next_round();
        p.acquire_hit(BlockId(7));
        p.release(BlockId(7));
        p.acquire_hit(BlockId(3));
        p.release(BlockId(3));
        assert_eq!(evict_all(&mut p), [0, 1, 2, 4, 5, 6, 7, 3]);
        p.check_invariants();
        // A prefix-cache reset forgets the shadows too: LRU again.
        p.forget_evicted();
        assert_eq!(p.adaptive_leader(), Some(LRU_EXPERT));
    }

    #[test]
    fn lru_ignores_hits() {
        let mut p = BlockPool::new(2);
        for _ in 0..2 {
            let b = p.take_blank().unwrap();
            p.register(b, u128::from(b.0), None);
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
