//! The remote tier's bookkeeping: staging blocks for the store, and importing the blocks a
//! lookup found there (see `crate::remote` for keys, values and the write queue).
//!
//! A block known to be in the store (written or imported lately, see `remote::Known`) is not
//! staged again. Writes are staged as memory operations (`Stage::Remote`), so a block's bytes are read in
//! recording order, before the call that evicted it reuses it; `settle_effects` queues them
//! (`queue_remote`). `remote_write="on_evict"` stages a cached block when it leaves the local
//! tiers: evicted from the host tier, or from the device tier when no host block took it.
//! `"on_store"` stages the blocks a sequence computed (`own_from..`, full and hashed) when it
//! is released, never before (its K/V is complete then).
//!
//! Import (`import_remote`): the values a lookup fetched for the blocks after the local
//! prefix become cached blocks of the host tier (or of the device tier without one), in
//! chain order, each checked against its own key first; the first value refused or missing
//! ends the import (a chain is only usable up to its first gap). The local prefix's blocks
//! of the tier being filled, and the blocks imported so far, are held meanwhile, so making
//! room never evicts the parent an imported block chains from; at the end they are released
//! leaf first, as a sequence releases its blocks, so the tier gives up the chain's last block
//! first (leaves first). Nothing is taken from a live sequence, and a failed import
//! changes nothing but the cache's contents. Cost: O(prompt blocks) hashing (as `allocate`),
//! one block write per imported value.

use crate::remote::Write;
use crate::sequence::{Phase, Sequence};
use crate::types::{BlockHash, BlockId, Tier};

use super::effects::Stage;
use super::{Ctx, State};

/// What an import did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    /// Blocks that became cached locally.
    pub blocks: usize,
    /// Values refused: truncated, corrupted, another key's or another shape's.
    pub refused: usize,
}

impl State {
    /// Whether block `hash` is written to the store now, in write mode `mode`: there is a
    /// store, it is written in that mode, and the store does not have the block lately. The
    /// one check every staging site makes first, before it copies anything.
    fn writes(&self, hash: BlockHash, mode: crate::remote::WriteMode) -> bool {
        self.remote
            .as_ref()
            .is_some_and(|r| r.mode == mode && !r.is_known(hash))
    }

    /// Stages device block `b` (cached under `hash`, still indexed) for the store, if
    /// blocks go there on evict.
    pub(super) fn stage_evicted_device(&mut self, ctx: &Ctx, b: BlockId, hash: BlockHash) {
        if self.writes(hash, crate::remote::WriteMode::OnEvict) {
            let stored = self.stored_of(b, hash);
            self.stage_device(ctx, b, hash, stored);
        }
    }

    /// Stages host block `hb`, just evicted from the host tier with what it held, for the
    /// store, if blocks go there on evict.
    pub(super) fn stage_evicted_host(&mut self, hb: BlockId, sp: &crate::tier::Spilled) {
        if self.writes(sp.hash, crate::remote::WriteMode::OnEvict) {
            let stored = crate::remote::Stored {
                hash: sp.hash,
                parent: (!sp.first).then_some(sp.parent),
                tokens: sp.tokens.clone(),
            };
            self.stage_host(hb, sp.hash, Some(stored));
        }
    }

    /// The event of device block `b` cached under `hash` (or of the block the device index
    /// holds under it), from the device index.
    fn stored_of(&self, b: BlockId, hash: BlockHash) -> Option<crate::remote::Stored> {
        let b = if self.index.hash_of(b) == Some(hash) {
            b
        } else {
            self.index.get(hash)?
        };
        Some(crate::remote::Stored {
            hash,
            parent: (!self.index.is_first(b))
                .then(|| self.index.parent_of(b))
                .flatten(),
            tokens: self.index.tokens_of(b).to_vec(),
        })
    }

    fn stage_device(
        &mut self,
        ctx: &Ctx,
        b: BlockId,
        hash: BlockHash,
        stored: Option<crate::remote::Stored>,
    ) {
        let Some(r) = &self.remote else { return };
        let key = r.keys.key(hash);
        let at = ctx.layout.block_runs(b.idx()).collect();
        self.fx
            .stage(&ctx.memory, at, Stage::Remote { hash, key, stored });
    }

    fn stage_host(&mut self, hb: BlockId, hash: BlockHash, stored: Option<crate::remote::Stored>) {
        let (Some(r), Some(host)) = (&self.remote, &self.host) else {
            return;
        };
        let key = r.keys.key(hash);
        let at = vec![(host.offset(hb), host.bytes_per_block)];
        self.fx
            .stage(&host.slab, at, Stage::Remote { hash, key, stored });
    }

    /// `on_store`: stages the full blocks sequence `s` computed, as it is released.
    pub(super) fn stage_released(&mut self, ctx: &Ctx, s: &Sequence) {
        if self.remote.is_none() || self.closing || !s.cacheable {
            return;
        }
        let tier = match s.phase {
            Phase::Resident => Tier::Device,
            Phase::Swapped => Tier::Host,
            // A moving sequence is freed only when its copy never ran or was drained at close.
            Phase::SwappingOut { .. } | Phase::SwappingIn { .. } => return,
        };
        let end = s.hashes.len().min(s.blocks.len());
        for i in s.own_from.min(end)..end {
            let (b, hash) = (s.blocks[i], s.hashes[i]);
            if !self.writes(hash, crate::remote::WriteMode::OnStore) {
                continue;
            }
            if tier == Tier::Device {
                let stored = self.stored_of(b, hash);
                self.stage_device(ctx, b, hash, stored);
            } else {
                // A swapped-out sequence's blocks are in no index: its parents and
                // tokens are its own.
                let parent = if i == 0 { None } else { Some(s.hashes[i - 1]) };
                let stored = self.index.get(hash).map(|d| crate::remote::Stored {
                    hash,
                    parent,
                    tokens: self.index.tokens_of(d).to_vec(),
                });
                self.stage_host(b, hash, stored);
            }
        }
    }

    /// Queues the values the last memory operations staged (dropping, counted, what a full
    /// queue cannot take).
    pub(super) fn queue_remote(&mut self) {
        let staged = std::mem::take(&mut self.fx.remote_writes);
        let Some(r) = self.remote.as_mut() else {
            return;
        };
        for w in staged {
            if r.push(w.hash, w.key, w.value, w.stored) {
                self.remote_wake = true;
            } else {
                self.counters.remote_dropped_writes += 1;
            }
        }
    }

    /// Writes queued, and taken by the writer but not finished.
    pub fn remote_pending(&self) -> (usize, usize) {
        self.remote
            .as_ref()
            .map_or((0, 0), |r| (r.num_queued(), r.num_in_flight()))
    }

    /// Whether writes were queued since the last call (the engine then wakes the writer).
    pub fn take_remote_wake(&mut self) -> bool {
        std::mem::take(&mut self.remote_wake)
    }

    /// Up to `max` queued writes for the remote writer, oldest first (in flight until
    /// `finish_remote_writes`).
    pub fn take_remote_writes(&mut self, max: usize) -> Vec<Write> {
        self.remote.as_mut().map_or_else(Vec::new, |r| r.take(max))
    }

    /// The writer finished writes `seqs` in `ns` nanoseconds: those in `stored` landed in
    /// the store (announced as `BlockStored` events of the remote tier), `dropped` did not
    /// (the store refused them, or it failed: `errors` failed calls).
    pub fn finish_remote_writes(
        &mut self,
        seqs: &[u64],
        stored_seqs: &[u64],
        dropped: u64,
        errors: u64,
        ns: u64,
    ) {
        let stored = stored_seqs.len() as u64;
        let bytes = stored * self.bytes_per_block;
        let Some(r) = self.remote.as_mut() else {
            return;
        };
        for e in r.finish(seqs, stored_seqs) {
            self.events
                .stored(e.hash, e.parent, &e.tokens, Tier::Remote);
        }
        self.events.end_op();
        let c = &mut self.counters;
        c.remote_write_blocks += stored;
        c.remote_write_bytes += bytes;
        c.remote_dropped_writes += dropped;
        c.remote_errors += errors;
        c.remote_write_ns += ns;
        self.serve_flushes();
    }

    /// Counts remote calls of a lookup that failed (unreachable store, timeout): their
    /// blocks are misses.
    pub fn remote_lookup_failed(&mut self, errors: u64, missed_blocks: u64, ns: u64) {
        let c = &mut self.counters;
        c.remote_errors += errors;
        c.remote_miss_blocks += missed_blocks;
        c.remote_read_ns += ns;
    }

    /// The keys of the prompt's full blocks after its locally cached prefix (what a
    /// remote lookup asks the store for), and the index of the first: `allocate` keeps
    /// one token to compute, so the last block of a prompt that fills it is not asked for.
    pub fn remote_plan(&self, ctx: &Ctx, tokens: &[u32], root: BlockHash) -> (usize, Vec<String>) {
        let Some(r) = &self.remote else {
            return (0, vec![]);
        };
        if tokens.is_empty() {
            return (0, vec![]);
        }
        let plan = self.plan_allocate(ctx, tokens, root);
        let local = plan.hits.len() + plan.onboard.len() + plan.from_disk.len();
        let max_full = (tokens.len() - 1) / ctx.config.block_size;
        let keys = plan.hashes[local..max_full]
            .iter()
            .map(|&h| r.keys.key(h))
            .collect();
        (local, keys)
    }

    /// Imports the values fetched for blocks `start..` of the prompt (None: absent), in
    /// chain order (see the module header). `looked_up` blocks were asked for; those not
    /// imported count as misses. `ns`: the lookup's time.
    #[allow(clippy::too_many_arguments)]
    pub fn import_remote(
        &mut self,
        ctx: &Ctx,
        tokens: &[u32],
        root: BlockHash,
        start: usize,
        values: &[Option<&[u8]>],
        looked_up: usize,
        ns: u64,
    ) -> Imported {
        let mut done = Imported::default();
        if self.remote.is_some() && !tokens.is_empty() {
            done = self.import_chain(ctx, tokens, root, start, values);
        }
        let c = &mut self.counters;
        c.remote_hit_blocks += done.blocks as u64;
        c.remote_miss_blocks += looked_up.saturating_sub(done.blocks) as u64;
        c.remote_corrupt_blocks += done.refused as u64;
        c.remote_read_bytes += (done.blocks as u64) * self.bytes_per_block;
        c.remote_read_ns += ns;
        self.events.end_op();
        done
    }

    fn import_chain(
        &mut self,
        ctx: &Ctx,
        tokens: &[u32],
        root: BlockHash,
        start: usize,
        values: &[Option<&[u8]>],
    ) -> Imported {
        let bs = ctx.config.block_size;
        let bpb = ctx.bytes_per_block();
        let plan = self.plan_allocate(ctx, tokens, root);
        let max_full = (tokens.len() - 1) / bs;
        let local = plan.hits.len() + plan.onboard.len() + plan.from_disk.len();
        let mut done = Imported::default();
        if local < start {
            // The local prefix shrank since the lookup planned (an eviction meanwhile): the
            // fetched blocks would chain from a block no tier holds.
            return done;
        }
        // The tier's own prefix blocks, pinned while room is made (see the module header).
        let pinned: Vec<BlockId> = if let Some(h) = self.host.as_mut() {
            for &b in &plan.onboard {
                h.pool.acquire(b);
            }
            plan.onboard.clone()
        } else {
            for &b in &plan.hits {
                self.pool.acquire(b);
            }
            plan.hits.clone()
        };
        // The blocks imported so far, held (so making room for the next cannot evict them)
        // and released below.
        let mut imported: Vec<BlockId> = Vec::new();
        let key_of = |st: &State, h: BlockHash| st.remote.as_ref().expect("checked").keys.key(h);
        for i in local.max(start)..max_full {
            let Some(Some(value)) = values.get(i - start) else {
                break; // absent: the chain ends here
            };
            let hash = plan.hashes[i];
            let Ok(payload) = crate::remote::decode(&key_of(self, hash), value, bpb) else {
                done.refused += 1;
                break;
            };
            let parent = if i == 0 { root } else { plan.hashes[i - 1] };
            let block_tokens = &tokens[i * bs..(i + 1) * bs];
            let Some(b) = self.cache_imported(ctx, hash, parent, root, block_tokens, payload)
            else {
                break;
            };
            imported.push(b);
            self.remote.as_mut().expect("checked").remember(hash);
            done.blocks += 1;
        }
        // Released leaf first, the imported blocks then the prefix they extend, as a
        // sequence releases its blocks: the chain's last block is the first to be evicted
        // and no parent goes before its child (leaves first).
        let held = pinned.iter().chain(&imported).rev();
        match self.host.as_mut() {
            Some(h) => {
                for &b in held {
                    h.pool.release(b);
                }
            }
            None => {
                for &b in held {
                    self.release_block(b);
                }
            }
        }
        done
    }

    /// Makes `payload` a cached block under `hash`: in the host tier when there is one, else
    /// in the device tier; the block stays held, for the caller to release. None when no
    /// block can be had (every one is held). `root`: the hash the chain starts from (the
    /// block is a chain's first when `parent == root`).
    fn cache_imported(
        &mut self,
        ctx: &Ctx,
        hash: BlockHash,
        parent: BlockHash,
        root: BlockHash,
        tokens: &[u32],
        payload: &[u8],
    ) -> Option<BlockId> {
        let first = parent == root;
        if self.host.is_some() {
            let hb = self.take_host_block()?;
            let host = self.host.as_mut().expect("checked above");
            // Recorded after the spill of what `hb` held: effects run in order.
            self.fx.write(
                &host.slab,
                vec![(host.offset(hb), host.bytes_per_block)],
                payload.to_vec(),
            );
            if host.index_block(hb, hash, parent, first, tokens) {
                self.events
                    .stored(hash, (!first).then_some(parent), tokens, Tier::Host);
            }
            return Some(hb);
        }
        if self.pool.num_free_blocks() == 0 {
            return None;
        }
        let now = ctx.clock.now();
        let b = self.alloc_block(ctx, now);
        ctx.write_block(&mut self.fx, b, payload.to_vec());
        self.registry()
            .register(b, hash, parent, root, None, tokens);
        Some(b)
    }
}
