//! The secondary tiers: host memory and a disk file, each with its own block pool and
//! prefix index.
//!
//! Host tier: pinned-or-plain host memory.
//!
//! Host blocks are owned by swapped-out sequences (refcount 1, never cached) or hold cached
//! blocks offloaded from the device tier (free and evictable, LRU, indexed by hash). A host
//! block's bytes are the device block's runs (`KvLayout::block_runs`) laid end to end, so
//! copies work for either device layout.
//! Invariants: the same as `BlockPool` and `PrefixIndex`; an indexed host block is cached.
//!
//! Construction: a tier whose memory or bookkeeping cannot be allocated is an
//! `Error::OutOfMemory` naming the tier (and nothing of it is kept); the disk tier allocates
//! its bookkeeping before it creates its file, so that failure leaves no file behind.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::events::EventQueue;
use crate::eviction::EvictionPolicy;
use crate::fallible::{out_of_memory, vec_of};
use crate::pool::BlockPool;
use crate::prefix::PrefixIndex;
use crate::storage::disk::DiskFile;
use crate::storage::Memory;
use crate::types::{BlockHash, BlockId, Tier};

/// Indexes owned block `b` of a tier under `hash` and marks it cached in the tier's pool,
/// with its parent block there for the policy's leaves-first caps: `prev` when that block
/// holds `parent` (no probe), else looked up. False, and nothing changed, when another block
/// holds the hash or its fingerprint. Every tier caches a block through here.
#[allow(clippy::too_many_arguments)]
pub fn index_cached(
    index: &mut PrefixIndex,
    pool: &mut BlockPool,
    b: BlockId,
    hash: BlockHash,
    parent: BlockHash,
    first: bool,
    prev: Option<BlockId>,
    tokens: &[u32],
) -> bool {
    if !index.insert(b, hash, parent, first, tokens) {
        return false;
    }
    let parent_block = if first {
        None
    } else {
        prev.filter(|&p| index.hash_of(p) == Some(parent))
            .or_else(|| index.get(parent))
    };
    pool.register(b, hash, parent_block);
    true
}

/// What an evicted cached host block held.
pub struct Spilled {
    pub hash: BlockHash,
    pub parent: BlockHash,
    pub first: bool,
    pub tokens: Vec<u32>,
}

pub struct HostTier {
    pub slab: Memory,
    pub pool: BlockPool,
    pub index: PrefixIndex,
    pub bytes_per_block: usize,
}

/// Prefixes an `OutOfMemory` message with the tier it happened in.
fn in_tier(tier: String, e: Error) -> Error {
    match e {
        Error::OutOfMemory(m) => Error::OutOfMemory(format!("{tier}: {m}")),
        e => e,
    }
}

impl HostTier {
    /// `device`: the device tier's memory (the host tier is pinned beside a GPU).
    pub fn new(
        num_blocks: usize,
        block_size: usize,
        bytes_per_block: usize,
        device: &Memory,
        policy: EvictionPolicy,
    ) -> Result<Self> {
        let build = || {
            let bytes = num_blocks
                .checked_mul(bytes_per_block)
                .ok_or_else(|| out_of_memory("the slab", num_blocks, bytes_per_block))?;
            Ok(HostTier {
                slab: Memory::host_tier_for(device, bytes)?,
                pool: BlockPool::with_policy(num_blocks, policy)?,
                index: PrefixIndex::try_new(num_blocks, block_size)?,
                bytes_per_block,
            })
        };
        build().map_err(|e| in_tier(format!("host tier (host_blocks={num_blocks})"), e))
    }

    /// Byte offset of a host block.
    pub fn offset(&self, b: BlockId) -> usize {
        b.idx() * self.bytes_per_block
    }

    /// Takes a host block with one owner: blank first, then the LRU cached one, which is
    /// dropped from the index and reported. Returns the block and, for an evicted one, what
    /// it held (hash, parent, first, tokens) so the caller can spill its bytes to disk
    /// before reusing the block. None when every host block is owned.
    pub fn take_block(&mut self, events: &mut EventQueue) -> Option<(BlockId, Option<Spilled>)> {
        if let Some(b) = self.pool.take_blank() {
            return Some((b, None));
        }
        let b = self.pool.evict_lru()?;
        let spilled = match (self.index.hash_of(b), self.index.parent_of(b)) {
            (Some(hash), Some(parent)) => Some(Spilled {
                hash,
                parent,
                first: self.index.is_first(b),
                tokens: self.index.tokens_of(b).to_vec(),
            }),
            _ => None,
        };
        if let Some(h) = self.index.remove(b) {
            events.removed(h, Tier::Host);
        }
        Some((b, spilled))
    }

    /// Indexes an owned host block as a cached copy and releases it (evictable, LRU tail).
    pub fn cache_block(
        &mut self,
        b: BlockId,
        hash: BlockHash,
        parent: BlockHash,
        first: bool,
        tokens: &[u32],
    ) -> bool {
        let stored = self.index_block(b, hash, parent, first, tokens);
        self.pool.release(b);
        stored
    }

    /// Indexes an owned host block as a cached copy and keeps it owned: the caller releases
    /// it, so a chain of such blocks can be released leaf first (an import). False (nothing
    /// indexed) when another block holds the hash.
    pub fn index_block(
        &mut self,
        b: BlockId,
        hash: BlockHash,
        parent: BlockHash,
        first: bool,
        tokens: &[u32],
    ) -> bool {
        index_cached(
            &mut self.index,
            &mut self.pool,
            b,
            hash,
            parent,
            first,
            None,
            tokens,
        )
    }

    /// Drops every cached host block (reset); owned blocks are untouched.
    pub fn clear_cached(&mut self) {
        while self.pool.evict_lru_to_blank().is_some() {}
        self.pool.forget_evicted();
        self.index.clear();
    }
}

/// The disk tier: a block file with its own pool and prefix index.
///
/// Disk slots hold cached blocks spilled from the host tier. A slot is written by a disk
/// worker; until its write finishes it is `pending`, owned (refcount 1) by the write, and
/// not readable. Then it is evictable and indexed, or, if the write failed, blank again.
/// Writes are numbered in the order they are issued (from 1), so `flush` can wait for
/// exactly the writes issued before it: `landed_before` is the lowest number still in
/// flight (or the next to issue), and every write numbered below it has landed.
pub struct DiskTier {
    pub file: Arc<DiskFile>,
    pub pool: BlockPool,
    pub index: PrefixIndex,
    /// The number of the write in flight to each slot (0: none).
    pub pending: Vec<u64>,
    /// The numbers of the writes in flight, kept by `reserve` / `finish_write`.
    in_flight: BTreeSet<u64>,
    /// The number the next write gets.
    next_write: u64,
}

/// A spilled block on its way to the disk: written by a worker, then `finish_disk_write`.
pub struct DiskWrite {
    pub slot: BlockId,
    pub hash: BlockHash,
    pub data: Vec<u8>,
}

impl DiskTier {
    pub fn new(
        path: &std::path::Path,
        num_slots: usize,
        block_size: usize,
        bytes_per_block: usize,
        policy: EvictionPolicy,
    ) -> Result<Self> {
        let tier = || format!("disk tier (disk_blocks={num_slots})");
        // Bookkeeping first: running out of memory must not leave a preallocated file.
        let pool = BlockPool::with_policy(num_slots, policy).map_err(|e| in_tier(tier(), e))?;
        let index = PrefixIndex::try_new(num_slots, block_size).map_err(|e| in_tier(tier(), e))?;
        let pending =
            vec_of(num_slots, 0, "the pending-write marks").map_err(|e| in_tier(tier(), e))?;
        Ok(DiskTier {
            file: Arc::new(DiskFile::create(path, num_slots, bytes_per_block)?),
            pool,
            index,
            pending,
            in_flight: BTreeSet::new(),
            next_write: 1,
        })
    }

    /// Disk writes in flight (O(1)).
    pub fn num_pending(&self) -> usize {
        self.in_flight.len()
    }

    /// The number the next write will get: `flush` waits until `landed_before` reaches it.
    pub fn next_write(&self) -> u64 {
        self.next_write
    }

    /// Every write numbered below this has landed (or failed): the lowest number in flight,
    /// or the next to issue when none is (O(log writes in flight)).
    pub fn landed_before(&self) -> u64 {
        self.in_flight.first().copied().unwrap_or(self.next_write)
    }

    /// An indexed slot whose write has finished.
    pub fn readable(&self, hash: BlockHash) -> Option<BlockId> {
        self.index.get(hash).filter(|s| self.pending[s.idx()] == 0)
    }

    /// Reserves a slot for `hash` and indexes it as pending; None if the hash is already
    /// on disk or every slot is busy. The LRU cached slot is evicted when none is blank.
    pub fn reserve(
        &mut self,
        hash: BlockHash,
        parent: BlockHash,
        first: bool,
        tokens: &[u32],
        events: &mut EventQueue,
    ) -> Option<BlockId> {
        if self.index.get(hash).is_some() {
            return None;
        }
        let slot = if let Some(s) = self.pool.take_blank() {
            s
        } else {
            let s = self.pool.evict_lru()?;
            if let Some(h) = self.index.remove(s) {
                events.removed(h, Tier::Disk);
            }
            s
        };
        if !index_cached(
            &mut self.index,
            &mut self.pool,
            slot,
            hash,
            parent,
            first,
            None,
            tokens,
        ) {
            // Another hash holds its fingerprint (1 in 2^64): no write, the slot goes blank.
            self.pool.release(slot);
            return None;
        }
        self.pending[slot.idx()] = self.next_write;
        self.in_flight.insert(self.next_write);
        self.next_write += 1;
        events.stored(hash, (!first).then_some(parent), tokens, Tier::Disk);
        Some(slot)
    }

    /// A write finished: the slot becomes an evictable cached block, or blank on failure
    /// (or when the index moved on meanwhile, e.g. a reset).
    pub fn finish_write(
        &mut self,
        slot: BlockId,
        hash: BlockHash,
        ok: bool,
        events: &mut EventQueue,
    ) {
        let write = std::mem::take(&mut self.pending[slot.idx()]);
        debug_assert!(write != 0, "slot {} had no write in flight", slot.0);
        self.in_flight.remove(&write);
        let indexed = self.index.hash_of(slot) == Some(hash);
        if !(ok && indexed) {
            if indexed {
                self.index.remove(slot);
                events.removed(hash, Tier::Disk);
            }
            self.pool.unregister(slot);
        }
        self.pool.release(slot);
    }

    /// Drops a slot whose data failed its checksum (it is evictable, so free).
    pub fn drop_corrupt(&mut self, slot: BlockId, events: &mut EventQueue) {
        if let Some(h) = self.index.remove(slot) {
            events.removed(h, Tier::Disk);
        }
        if self.pool.is_evictable(slot) {
            self.pool.uncache_free(slot);
        }
    }

    pub fn clear_cached(&mut self) {
        while self.pool.evict_lru_to_blank().is_some() {}
        self.pool.forget_evicted();
        // Pending slots stay owned by their writes; `finish_write` sees them unindexed.
        self.index.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2^46 blocks: 2^48 bytes for one u32 per block, past any 47-bit address space, so the
    /// allocation is refused whatever the overcommit policy.
    const TOO_MANY: usize = 1 << 46;

    fn oom_message(r: Result<impl Sized>) -> String {
        match r {
            Err(Error::OutOfMemory(msg)) => msg,
            Err(e) => panic!("expected OutOfMemory, got {e:?}"),
            Ok(_) => panic!("expected OutOfMemory, got a tier"),
        }
    }

    #[test]
    fn a_host_tier_too_large_for_memory_is_out_of_memory() {
        let device = Memory::host(64).unwrap();
        let msg = oom_message(HostTier::new(TOO_MANY, 1, 4, &device, Default::default()));
        assert!(
            msg.contains(&format!("host tier (host_blocks={TOO_MANY})")),
            "{msg}"
        );
        let msg = oom_message(HostTier::new(usize::MAX, 1, 2, &device, Default::default()));
        assert!(msg.contains("host tier"), "{msg}");
    }

    #[test]
    fn writes_land_in_any_order_and_flush_sees_the_lowest_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = DiskTier::new(&dir.path().join("b"), 4, 1, 8, Default::default()).unwrap();
        let mut ev = EventQueue::new(false);
        assert_eq!((d.next_write(), d.landed_before()), (1, 1));
        let slots: Vec<BlockId> = (0..3u128)
            .map(|h| d.reserve(h + 1, 0, true, &[h as u32], &mut ev).unwrap())
            .collect();
        // Writes 1, 2, 3 in flight; a flush issued now waits for landed_before >= 4.
        assert_eq!(
            (d.next_write(), d.landed_before(), d.num_pending()),
            (4, 1, 3)
        );
        d.finish_write(slots[1], 2, true, &mut ev); // write 2 lands first
        assert_eq!(d.landed_before(), 1, "write 1 is still in flight");
        d.finish_write(slots[0], 1, false, &mut ev); // write 1 fails: it landed, as a miss
        assert_eq!(d.landed_before(), 3);
        let late = d.reserve(9, 0, true, &[9], &mut ev).unwrap(); // write 4, after the flush
        d.finish_write(slots[2], 3, true, &mut ev);
        assert_eq!(d.landed_before(), 4, "a flush of writes 1..=3 is answered");
        d.finish_write(late, 9, true, &mut ev);
        assert_eq!((d.landed_before(), d.num_pending()), (5, 0));
        assert!(d.readable(2).is_some() && d.readable(1).is_none());
    }

    #[test]
    fn a_hash_whose_fingerprint_is_taken_is_not_written_to_disk() {
        // Two hashes with the same 64-bit fingerprint (the halves swapped fold alike): the
        // second cannot be indexed, so no slot may be taken or reported for it.
        let (a, b) = (1u128 << 64 | 2, 2u128 << 64 | 1);
        let dir = tempfile::tempdir().unwrap();
        let mut d = DiskTier::new(&dir.path().join("b"), 4, 1, 8, Default::default()).unwrap();
        let mut ev = EventQueue::new(true);
        assert!(d.reserve(a, 0, true, &[1], &mut ev).is_some());
        let (blank, stored) = (d.pool.num_blank_blocks(), ev.drain().len());
        assert_eq!(d.reserve(b, 0, true, &[2], &mut ev), None);
        assert_eq!(
            (
                d.num_pending(),
                d.pool.num_blank_blocks(),
                ev.drain().len(),
                stored
            ),
            (1, blank, 0, 1),
            "nothing taken, written or reported for b"
        );
        d.pool.check_invariants();
        d.index.check_invariants();
    }

    #[test]
    fn a_disk_tier_too_large_for_memory_is_out_of_memory_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocks.bin");
        let msg = oom_message(DiskTier::new(&path, TOO_MANY, 1, 1, Default::default()));
        assert!(
            msg.contains(&format!("disk tier (disk_blocks={TOO_MANY})")),
            "{msg}"
        );
        assert!(
            !path.exists(),
            "the bookkeeping is allocated before the file"
        );
    }
}
