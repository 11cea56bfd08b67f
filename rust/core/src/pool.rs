//! The block pool of one tier: reference counts and the free queues.
//!
//! Design (vLLM's `BlockPool`, SGLang's evictable/protected split):
//! - `ref_cnt[b]` counts the owners of block `b` (sequences, pins). A block with
//!   `ref_cnt > 0` is *protected* and in no queue.
//! - A block with `ref_cnt == 0` is *free* and sits in exactly one of two intrusive
//!   doubly-linked queues: `blank` (holds nothing reusable) or `evictable` (still holds a
//!   cached, hashed block; LRU order, least recently released at the head).
//! - Allocation takes blank blocks first (FIFO), then evicts from the evictable head; the
//!   caller drops the evicted block's hash from the prefix index.
//!
//! Every operation is O(1): queue links are arrays indexed by block id, so removing a block
//! that is hit from the middle of the evictable queue costs two writes.
//! Invariants (checked by `check_invariants`): free == blank + evictable; a block is in a
//! queue iff its ref_cnt is 0; a block is evictable iff it is cached (`cached[b]`).

use crate::error::Result;
use crate::fallible::vec_of;
use crate::types::BlockId;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    None,
    Blank,
    Evictable,
}

/// Two intrusive FIFO queues over the same block ids.
#[derive(Debug, Clone)]
struct Queues {
    prev: Vec<u32>,
    next: Vec<u32>,
    at: Vec<Queue>,
    head: [u32; 2],
    tail: [u32; 2],
    len: [usize; 2],
}

impl Queues {
    fn try_new(n: usize) -> Result<Self> {
        Ok(Queues {
            prev: vec_of(n, NIL, "the block pool's queue links")?,
            next: vec_of(n, NIL, "the block pool's queue links")?,
            at: vec_of(n, Queue::None, "the block pool's queue marks")?,
            head: [NIL; 2],
            tail: [NIL; 2],
            len: [0; 2],
        })
    }

    fn slot(q: Queue) -> usize {
        match q {
            Queue::Blank => 0,
            Queue::Evictable => 1,
            Queue::None => unreachable!("no queue slot"),
        }
    }

    fn push_back(&mut self, q: Queue, b: u32) {
        debug_assert_eq!(self.at[b as usize], Queue::None);
        let s = Self::slot(q);
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
        let q = self.at[b as usize];
        let s = Self::slot(q);
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
        self.at[b as usize] = Queue::None;
        self.len[s] -= 1;
    }

    fn pop_front(&mut self, q: Queue) -> Option<u32> {
        let h = self.head[Self::slot(q)];
        (h != NIL).then(|| {
            self.remove(h);
            h
        })
    }

    fn iter(&self, q: Queue) -> impl Iterator<Item = u32> + '_ {
        let mut cur = self.head[Self::slot(q)];
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
    queues: Queues,
}

impl BlockPool {
    /// A pool of `num_blocks` blank blocks. Panics where `try_new` fails (tests, benches).
    pub fn new(num_blocks: usize) -> Self {
        Self::try_new(num_blocks).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A pool of `num_blocks` blank blocks; `Error::OutOfMemory` (nothing allocated kept)
    /// when its arrays do not fit in memory.
    pub fn try_new(num_blocks: usize) -> Result<Self> {
        let mut queues = Queues::try_new(num_blocks)?;
        let ref_cnt = vec_of(num_blocks, 0, "the block pool's reference counts")?;
        let cached = vec_of(num_blocks, false, "the block pool's cached marks")?;
        for b in 0..num_blocks as u32 {
            queues.push_back(Queue::Blank, b);
        }
        Ok(BlockPool {
            ref_cnt,
            cached,
            queues,
        })
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_cnt.len()
    }

    /// Blocks with no owner (blank + evictable).
    pub fn num_free_blocks(&self) -> usize {
        self.queues.len[0] + self.queues.len[1]
    }

    pub fn num_blank_blocks(&self) -> usize {
        self.queues.len[0]
    }

    pub fn num_evictable_blocks(&self) -> usize {
        self.queues.len[1]
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
        self.queues.at[b.idx()] == Queue::Evictable
    }

    /// Takes a blank block (FIFO) and gives it one owner.
    pub fn take_blank(&mut self) -> Option<BlockId> {
        let b = self.queues.pop_front(Queue::Blank)?;
        self.ref_cnt[b as usize] = 1;
        Some(BlockId(b))
    }

    /// Takes the least recently released evictable block, gives it one owner and marks it
    /// uncached; the caller must drop its hash from the prefix index.
    pub fn evict_lru(&mut self) -> Option<BlockId> {
        let b = self.queues.pop_front(Queue::Evictable)?;
        self.ref_cnt[b as usize] = 1;
        self.cached[b as usize] = false;
        Some(BlockId(b))
    }

    /// Evicts the least recently released evictable block into the blank queue (for `gc`).
    pub fn evict_lru_to_blank(&mut self) -> Option<BlockId> {
        let b = self.queues.pop_front(Queue::Evictable)?;
        self.cached[b as usize] = false;
        self.queues.push_back(Queue::Blank, b);
        Some(BlockId(b))
    }

    /// Adds an owner; a free cached block leaves the evictable queue (a prefix hit).
    pub fn acquire(&mut self, b: BlockId) {
        if self.ref_cnt[b.idx()] == 0 {
            assert_eq!(
                self.queues.at[b.idx()],
                Queue::Evictable,
                "acquire of a blank block"
            );
            self.queues.remove(b.0);
        }
        self.ref_cnt[b.idx()] += 1;
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
            self.queues.push_back(Queue::Evictable, b.0);
            Released::Evictable
        } else {
            self.queues.push_back(Queue::Blank, b.0);
            Released::Blank
        }
    }

    /// Marks an owned block as holding a registered cached block.
    pub fn set_cached(&mut self, b: BlockId, cached: bool) {
        let at = self.queues.at[b.idx()];
        assert!(at == Queue::None, "set_cached on a free block");
        self.cached[b.idx()] = cached;
    }

    /// Drops the cached mark of an evictable block, moving it to the blank queue.
    pub fn uncache_free(&mut self, b: BlockId) {
        assert!(self.is_evictable(b));
        self.queues.remove(b.0);
        self.cached[b.idx()] = false;
        self.queues.push_back(Queue::Blank, b.0);
    }

    /// Evictable blocks from least to most recently released.
    pub fn evictable_lru(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.queues.iter(Queue::Evictable).map(BlockId)
    }

    pub fn blank_fifo(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.queues.iter(Queue::Blank).map(BlockId)
    }

    /// Panics with a description if any invariant of the module header is broken.
    pub fn check_invariants(&self) {
        let mut counted = [0usize; 2];
        for b in 0..self.num_blocks() {
            let at = self.queues.at[b];
            assert_eq!(
                at == Queue::None,
                self.ref_cnt[b] > 0,
                "block {b}: queued iff unowned"
            );
            if at == Queue::Evictable {
                assert!(self.cached[b], "evictable block {b} is not cached");
                counted[1] += 1;
            }
            if at == Queue::Blank {
                assert!(!self.cached[b], "blank block {b} is cached");
                counted[0] += 1;
            }
        }
        assert_eq!(counted, self.queues.len, "queue lengths");
        assert_eq!(self.queues.iter(Queue::Blank).count(), self.queues.len[0]);
        assert_eq!(
            self.queues.iter(Queue::Evictable).count(),
            self.queues.len[1]
        );
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
    #[should_panic(expected = "release of free block")]
    fn double_release_is_loud() {
        let mut p = BlockPool::new(1);
        let b = p.take_blank().unwrap();
        p.release(b);
        p.release(b);
    }
}
