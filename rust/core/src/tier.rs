//! The host tier: pinned-or-plain host memory with its own block pool and prefix index.
//!
//! Host blocks are owned by swapped-out sequences (refcount 1, never cached) or hold cached
//! blocks offloaded from the device tier (free and evictable, LRU, indexed by hash). A host
//! block's bytes are the device block's runs (`KvLayout::block_runs`) laid end to end, so
//! copies work for either device layout.
//! Invariants: the same as `BlockPool` and `PrefixIndex`; an indexed host block is cached.

use std::sync::Arc;

use crate::events::EventQueue;
use crate::pool::BlockPool;
use crate::prefix::PrefixIndex;
use crate::storage::host::HostSlab;
use crate::types::{BlockHash, BlockId, Tier};

pub struct HostTier {
    pub slab: Arc<HostSlab>,
    pub pool: BlockPool,
    pub index: PrefixIndex,
    pub bytes_per_block: usize,
}

impl HostTier {
    pub fn new(
        num_blocks: usize,
        block_size: usize,
        bytes_per_block: usize,
    ) -> crate::error::Result<Self> {
        Ok(HostTier {
            slab: Arc::new(HostSlab::new(num_blocks * bytes_per_block)?),
            pool: BlockPool::new(num_blocks),
            index: PrefixIndex::new(num_blocks, block_size),
            bytes_per_block,
        })
    }

    /// Byte offset of a host block.
    pub fn offset(&self, b: BlockId) -> usize {
        b.idx() * self.bytes_per_block
    }

    /// Takes a host block with one owner: blank first, then the LRU cached one (dropped
    /// from the index and reported). None when every host block is owned.
    pub fn take_block(&mut self, events: &mut EventQueue) -> Option<BlockId> {
        if let Some(b) = self.pool.take_blank() {
            return Some(b);
        }
        let b = self.pool.evict_lru()?;
        if let Some(h) = self.index.remove(b) {
            events.removed(h, Tier::Host);
        }
        Some(b)
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
        let stored = self.index.insert(b, hash, parent, first, tokens);
        if stored {
            self.pool.set_cached(b, true);
        }
        self.pool.release(b);
        stored
    }

    /// Drops every cached host block (reset); owned blocks are untouched.
    pub fn clear_cached(&mut self) {
        while self.pool.evict_lru_to_blank().is_some() {}
        self.index.clear();
    }
}
