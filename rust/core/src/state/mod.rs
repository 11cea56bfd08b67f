//! The engine's bookkeeping: everything that lives under the one engine lock.
//!
//! `State` composes the block pool (free queues, refcounts), the prefix index (hashes),
//! the sequences, the waiters, the counters, pressure and events. Each public operation
//! first checks and plans without changing anything, then commits; so a call that fails
//! leaves the state exactly as it was. Block data moves (copy-on-write, partial reuse) are
//! done by the caller-supplied `Memory` while the lock is held, so a block's bytes never
//! change owner mid-copy.
//!
//! Allocation order: blank blocks first (FIFO), then the least recently released evictable
//! block (a sequence releases its blocks tail first, so children go before parents).
//! Submodules add to `State`: `tiers` (offload, onboard, disk, swaps), `tickets` (waiters:
//! serve, take, cancel and undo), `checks` (the invariants below).
//! Invariants (checked by `check_invariants`): every block's refcount equals the number of
//! sequences holding it; an evictable block is referenced by none; every index entry names a
//! block carrying that hash; used + free == total.

use std::collections::HashMap;

mod checks;
mod tickets;
mod tiers;

pub use tiers::Swap;

use crate::clock::Clock;
use crate::config::CacheConfig;
use crate::error::{Error, Result};
use crate::events::EventQueue;
use crate::layout::KvLayout;
use crate::pool::{BlockPool, Released};
use crate::prefix::{Hasher, PrefixIndex};
use crate::pressure::{Level, Pressure, PressureEvent};
use crate::residency::Residency;
use crate::sequence::{Append, SeqView, Sequence};
use crate::stats::Counters;
use crate::storage::{copy_runs, Memory};
use crate::tier::{DiskTier, DiskWrite, HostTier};
use crate::transfer::Runs;
use crate::types::{blocks_for, BlockHash, BlockId, RequestId, Tier};
use crate::waiters::{ExtendUndo, Waiters};

/// Immutable context of the state: config, geometry, memory, hashing, time.
pub struct Ctx {
    pub config: CacheConfig,
    pub layout: KvLayout,
    pub memory: Memory,
    pub hasher: Hasher,
    pub clock: Clock,
    /// The thread that reads disk blocks (only with a disk tier). Its jobs never take the
    /// engine lock, so waiting for them under the lock cannot deadlock.
    pub disk_reader: Option<crate::storage::disk::DiskWorkers>,
}

impl Ctx {
    pub fn bytes_per_block(&self) -> usize {
        self.layout.bytes_per_block()
    }

    /// Adds the runs that copy device block `b` to a host block at `host_off` (the device
    /// block's runs laid end to end).
    pub fn to_host(&self, b: BlockId, host_off: usize, runs: &mut Runs) {
        let mut at = host_off;
        for (off, len) in self.layout.block_runs(b.idx()) {
            runs.push(off, at, len);
            at += len;
        }
    }

    /// Adds the runs that copy the host block at `host_off` into device block `b`.
    pub fn from_host(&self, host_off: usize, b: BlockId, runs: &mut Runs) {
        let mut at = host_off;
        for (off, len) in self.layout.block_runs(b.idx()) {
            runs.push(at, off, len);
            at += len;
        }
    }

    /// Writes a block's bytes (its runs laid end to end, as in the other tiers) into
    /// device block `b`.
    fn write_block(&self, b: BlockId, bytes: &[u8]) {
        let mut at = 0;
        for (off, len) in self.layout.block_runs(b.idx()) {
            device_io(self.memory.write(off, &bytes[at..at + len]));
            at += len;
        }
    }

    /// Copies every byte of block `src` into block `dst` (device tier).
    fn copy_block(&self, src: BlockId, dst: BlockId) {
        let mut runs = Runs::default();
        for ((s, n), (d, _)) in self
            .layout
            .block_runs(src.idx())
            .zip(self.layout.block_runs(dst.idx()))
        {
            runs.push(s, d, n);
        }
        device_io(copy_runs(&self.memory, &self.memory, &runs));
    }
}

/// NOTE: memory accesses inside bookkeeping cannot fail on host memory; on a GPU they fail
/// only when the device is lost, which leaves no state worth keeping, so it is a loud panic
/// (a Python `PanicException`) rather than an error every caller would have to unwind.
fn device_io<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("device memory access failed: {e}"))
}

/// The result of reading one disk block.
pub type DiskReadResult = std::result::Result<Vec<u8>, crate::storage::disk::ReadError>;

/// Disk blocks read ahead for one waiting allocation, by block hash.
pub type StagedReads = HashMap<BlockHash, DiskReadResult>;

/// A read-ahead for the disk reader: the pinned (hash, slot)s of one waiting allocation.
pub struct DiskRead {
    pub ticket: crate::waiters::Ticket,
    pub file: std::sync::Arc<crate::storage::disk::DiskFile>,
    pub reads: Vec<(BlockHash, BlockId)>,
}

/// Plan of a prompt allocation, computed without side effects.
struct AllocPlan {
    hits: Vec<BlockId>,
    /// Host blocks holding the next cached blocks after the device hits (onboarded).
    onboard: Vec<BlockId>,
    /// Disk slots holding the cached blocks after those (read back, checksums verified).
    from_disk: Vec<BlockId>,
    /// Chained hashes of every full block of the prompt.
    hashes: Vec<BlockHash>,
    partial: Option<(BlockId, usize)>,
    num_blocks: usize,
}

/// The parts of `State` that registering a block touches (borrowed apart from `seqs`, so a
/// sequence can be updated in place while its blocks are registered).
struct Registry<'a> {
    pool: &'a mut BlockPool,
    index: &'a mut PrefixIndex,
    events: &'a mut EventQueue,
}

impl Registry<'_> {
    /// Indexes a full block of a sequence unless another block already holds its hash.
    fn register(
        &mut self,
        b: BlockId,
        hash: BlockHash,
        parent: BlockHash,
        root: BlockHash,
        tokens: &[u32],
    ) {
        let first = parent == root;
        if self.index.insert(b, hash, parent, first, tokens) {
            self.pool.set_cached(b, true);
            // The first block of a chain has no parent block (the root is a salt, not a block).
            self.events
                .stored(hash, (!first).then_some(parent), tokens, Tier::Device);
        }
    }
}

pub struct State {
    pub closed: bool,
    /// `close()` has begun: new calls fail while in-flight copies drain.
    pub closing: bool,
    pub pool: BlockPool,
    pub index: PrefixIndex,
    /// The host tier, when `host_blocks > 0`.
    pub host: Option<HostTier>,
    /// The disk tier, when `disk_blocks > 0` (it spills from the host tier).
    pub disk: Option<DiskTier>,
    /// Spilled blocks whose disk writes the engine hands to its disk workers after the call.
    pub disk_writes: Vec<DiskWrite>,
    /// Read-aheads the engine hands to its disk reader after the call.
    pub disk_reads: Vec<DiskRead>,
    /// Waiting allocations whose disk read-ahead is still running (not served before).
    pub loading: std::collections::HashSet<crate::waiters::Ticket>,
    /// Finished read-aheads, per waiting allocation.
    pub staged: HashMap<crate::waiters::Ticket, StagedReads>,
    pub seqs: HashMap<RequestId, Sequence>,
    pub waiters: Waiters,
    pub counters: Counters,
    pub iter_mark: Counters,
    pub pressure: Pressure,
    pub subscribed: bool,
    pub pressure_events: Vec<PressureEvent>,
    pub events: EventQueue,
    pub residency: Residency,
    pub callback_errors: u64,
    /// Set when the event loop must be woken (tickets finished, pressure changed).
    pub needs_signal: bool,
    scratch: Vec<u8>,
}

fn short(needed: usize, available: usize) -> Error {
    Error::OutOfBlocks {
        needed,
        available,
        never_fits: false,
    }
}

impl State {
    pub fn new(ctx: &Ctx) -> Result<Self> {
        let c = &ctx.config;
        let host = match c.host_blocks {
            0 => None,
            n => Some(HostTier::new(
                n,
                c.block_size,
                ctx.bytes_per_block(),
                &ctx.memory,
            )?),
        };
        let disk = match (c.disk_blocks, &c.disk_path) {
            (0, _) | (_, None) => None,
            (n, Some(path)) => Some(DiskTier::new(
                std::path::Path::new(path),
                n,
                c.block_size,
                ctx.bytes_per_block(),
            )?),
        };
        Ok(State {
            closed: false,
            closing: false,
            pool: BlockPool::new(c.num_blocks),
            index: PrefixIndex::new(c.num_blocks, c.block_size),
            host,
            disk,
            disk_writes: Vec::new(),
            disk_reads: Vec::new(),
            loading: Default::default(),
            staged: HashMap::new(),
            seqs: HashMap::new(),
            waiters: Waiters::default(),
            counters: Counters::default(),
            iter_mark: Counters::default(),
            pressure: Pressure::new(c.low_watermark, c.high_watermark),
            subscribed: false,
            pressure_events: Vec::new(),
            events: EventQueue::new(c.enable_kv_events),
            residency: Residency::new(c.residency_sample_rate, c.seed, c.num_blocks),
            callback_errors: 0,
            needs_signal: false,
            scratch: Vec::new(),
        })
    }

    pub fn check_open(&self) -> Result<()> {
        if self.closed || self.closing {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    fn seq(&self, rid: &RequestId) -> Result<&Sequence> {
        self.seqs
            .get(rid)
            .ok_or_else(|| Error::UnknownRequest(rid.clone()))
    }

    fn resident(&self, rid: &RequestId, what: &str) -> Result<&Sequence> {
        let s = self.seq(rid)?;
        if s.swapping {
            return Err(Error::InvalidState(format!(
                "cannot {what} request {rid}: a swap is in progress"
            )));
        }
        if s.tier != Tier::Device {
            return Err(Error::InvalidState(format!(
                "cannot {what} request {rid}: it is swapped out"
            )));
        }
        Ok(s)
    }

    // ----- blocks -------------------------------------------------------------------------

    /// Takes one block (blank first, then LRU eviction). The caller checked availability.
    fn alloc_block(&mut self, ctx: &Ctx, now: f64) -> BlockId {
        let b = match self.pool.take_blank() {
            Some(b) => b,
            None => {
                let b = self.pool.evict_lru().expect("availability was checked");
                self.evict_cached(ctx, b, now);
                b
            }
        };
        self.residency.on_allocate(b, now);
        b
    }

    /// Evicts a cached device block: its data and hash move to the host tier when one
    /// exists (offload), its hash leaves the device index. Returns whether it was offloaded.
    fn evict_cached(&mut self, ctx: &Ctx, b: BlockId, now: f64) -> bool {
        let offloaded = self.offload(ctx, b);
        if let Some(h) = self.index.remove(b) {
            self.events.removed(h, Tier::Device);
        }
        self.counters.evicted_blocks += 1;
        self.residency.on_evict(b, now);
        offloaded
    }

    /// Drops a block's hash from the device index without evicting it (an undo).
    fn forget_cached(&mut self, b: BlockId) {
        if let Some(h) = self.index.remove(b) {
            self.events.removed(h, Tier::Device);
        }
        self.residency.forget(b);
    }

    fn release_block(&mut self, b: BlockId) {
        if self.pool.release(b) == Released::Blank {
            self.residency.forget(b);
        }
    }

    /// The parts that registering a block touches, borrowed apart from `seqs`.
    fn registry(&mut self) -> Registry<'_> {
        Registry {
            pool: &mut self.pool,
            index: &mut self.index,
            events: &mut self.events,
        }
    }

    /// Blocks a new allocation may take: free ones, minus the given cached blocks it pins.
    fn available_excluding(&self, pinned: impl Iterator<Item = BlockId>) -> usize {
        let pinned_free = pinned.filter(|&b| self.pool.is_evictable(b)).count();
        self.pool.num_free_blocks() - pinned_free
    }

    // ----- allocate -----------------------------------------------------------------------

    fn plan_allocate(&self, ctx: &Ctx, tokens: &[u32], root: BlockHash) -> AllocPlan {
        let bs = ctx.config.block_size;
        let n = tokens.len();
        let num_blocks = blocks_for(n, bs);
        if !ctx.config.enable_prefix_cache {
            return AllocPlan {
                hits: vec![],
                onboard: vec![],
                from_disk: vec![],
                hashes: vec![],
                partial: None,
                num_blocks,
            };
        }
        let hashes = ctx.hasher.chain(root, tokens, bs);
        // A full hit must end before the last token: one token is always left to compute.
        let hits: Vec<BlockId> = hashes
            .iter()
            .take((n - 1) / bs)
            .map_while(|&h| self.index.get(h))
            .collect();
        let max_full = (n - 1) / bs;
        let onboard: Vec<BlockId> = match &self.host {
            Some(host) => hashes[hits.len()..max_full]
                .iter()
                .map_while(|&h| host.index.get(h))
                .collect(),
            None => vec![],
        };
        let after_host = hits.len() + onboard.len();
        let from_disk: Vec<BlockId> = match &self.disk {
            Some(disk) => hashes[after_host..max_full]
                .iter()
                .map_while(|&h| disk.readable(h))
                .collect(),
            None => vec![],
        };
        let k = after_host + from_disk.len();
        let parent = if k == 0 { root } else { hashes[k - 1] };
        let window = &tokens[k * bs..(n - 1).min((k + 1) * bs)];
        let partial = if window.is_empty() {
            None
        } else {
            self.index.best_partial(parent, window)
        };
        AllocPlan {
            hits,
            onboard,
            from_disk,
            hashes,
            partial,
            num_blocks,
        }
    }

    /// Allocates `tokens` for a new sequence now, or fails with nothing changed.
    pub fn allocate_now(
        &mut self,
        ctx: &Ctx,
        rid: &RequestId,
        tokens: &[u32],
        root: BlockHash,
        staged: &mut StagedReads,
    ) -> Result<SeqView> {
        let bs = ctx.config.block_size;
        let plan = self.plan_allocate(ctx, tokens, root);
        if plan.num_blocks > self.pool.num_blocks() {
            return Err(Error::OutOfBlocks {
                needed: plan.num_blocks,
                available: self.pool.num_blocks(),
                never_fits: true,
            });
        }
        let mut plan = plan;
        let k = plan.hits.len();
        let j = plan.onboard.len();
        let new = plan.num_blocks - k;
        let mut available =
            self.available_excluding(plan.hits.iter().copied().chain(plan.partial.map(|p| p.0)));
        if new > available && plan.partial.is_some() {
            // Pinning the partial source is what makes it short: skip the partial copy.
            plan.partial = None;
            available = self.available_excluding(plan.hits.iter().copied());
        }
        if new > available {
            return Err(short(new, available));
        }
        let disk_data = self.read_disk_hits(&mut plan, staged);
        // Commit.
        let now = ctx.clock.now();
        for &b in &plan.hits {
            self.pool.acquire(b);
            self.residency.on_access(b, now);
        }
        if let Some((src, _)) = plan.partial {
            self.pool.acquire(src); // pinned so the allocation below cannot evict it
        }
        if let Some(host) = self.host.as_mut() {
            // Pinned too: offloads made by the allocation below must not evict them.
            for &hb in &plan.onboard {
                host.pool.acquire(hb);
            }
        }
        let mut blocks = plan.hits;
        blocks.extend((0..new).map(|_| self.alloc_block(ctx, now)));
        if j > 0 {
            self.onboard(ctx, &plan.onboard, &blocks[k..k + j]);
        }
        let d = disk_data.len();
        for (bytes, &db) in disk_data.iter().zip(&blocks[k + j..k + j + d]) {
            ctx.write_block(db, bytes);
        }
        let bpb = ctx.bytes_per_block() as u64;
        self.counters.onboard_blocks += d as u64;
        self.counters.onboard_bytes += d as u64 * bpb;
        self.counters.h2d_blocks_copied += d as u64;
        let device_hits = k;
        let k = k + j + d; // onboarded blocks count as full hits from here on
        let mut cached_tokens = k * bs;
        if let Some((src, m)) = plan.partial {
            ctx.copy_block(src, blocks[k]);
            self.release_block(src);
            self.residency.on_access(src, now);
            self.counters.intra_device_copy_blocks += 1;
            self.counters.intra_device_copy_bytes += ctx.bytes_per_block() as u64;
            cached_tokens += m;
        }
        let cacheable = ctx.config.enable_prefix_cache;
        let n_full = tokens.len() / bs;
        if cacheable {
            // Onboarded blocks are registered too: their device copies are new.
            for i in device_hits..n_full {
                let parent = if i == 0 { root } else { plan.hashes[i - 1] };
                self.registry().register(
                    blocks[i],
                    plan.hashes[i],
                    parent,
                    root,
                    &tokens[i * bs..(i + 1) * bs],
                );
            }
        }
        self.events.end_op();
        let partial = usize::from(plan.partial.is_some());
        let c = &mut self.counters;
        c.alloc_total_blocks += plan.num_blocks as u64;
        c.alloc_new_blocks += new as u64;
        c.full_reused_blocks += k as u64;
        c.partial_reused_blocks += partial as u64;
        c.missed_blocks += (plan.num_blocks - k - partial) as u64;
        c.cache_tokens += cached_tokens as u64;
        c.input_tokens += (tokens.len() - cached_tokens) as u64;
        let seq = Sequence {
            num_tokens: tokens.len(),
            num_cached_tokens: cached_tokens,
            blocks,
            hashes: if cacheable { plan.hashes } else { vec![] },
            root,
            tail: if cacheable {
                tokens[n_full * bs..].to_vec()
            } else {
                vec![]
            },
            cacheable,
            tier: Tier::Device,
            swapping: false,
        };
        let view = SeqView::of(rid, &seq);
        self.seqs.insert(rid.clone(), seq);
        Ok(view)
    }

    /// Checks that `rid` may be used for a new sequence.
    pub fn check_new_rid(&self, rid: &RequestId) -> Result<()> {
        if self.seqs.contains_key(rid) || self.waiters.pending_rids.contains(rid) {
            return Err(Error::DuplicateRequest(rid.clone()));
        }
        Ok(())
    }

    /// Blocks a prompt of `n` tokens needs if nothing is cached.
    pub fn blocks_needed(&self, ctx: &Ctx, n: usize) -> usize {
        blocks_for(n, ctx.config.block_size)
    }

    // ----- extend -------------------------------------------------------------------------

    /// Blocks an extend by `m` tokens takes: new blocks, and whether the shared partial tail
    /// must be copied first (copy-on-write).
    fn extend_need(&self, ctx: &Ctx, rid: &RequestId, m: usize) -> Result<(usize, bool)> {
        let bs = ctx.config.block_size;
        let s = self.resident(rid, "extend")?;
        let n = s.num_tokens;
        let new_blocks = blocks_for(n + m, bs) - s.blocks.len();
        let tail_shared =
            n % bs != 0 && m > 0 && self.pool.ref_cnt(*s.blocks.last().expect("n > 0")) > 1;
        Ok((new_blocks, tail_shared))
    }

    /// Appends tokens to a resident sequence now, or fails with nothing changed.
    pub fn extend_now(
        &mut self,
        ctx: &Ctx,
        rid: &RequestId,
        append: &Append,
    ) -> Result<(SeqView, ExtendUndo)> {
        let undo = self
            .extend_apply(ctx, rid, append, true)?
            .expect("asked for an undo record");
        Ok((SeqView::of(rid, &self.seqs[rid]), undo))
    }

    /// Appends tokens; returns the record that undoes it when `want_undo`.
    fn extend_apply(
        &mut self,
        ctx: &Ctx,
        rid: &RequestId,
        append: &Append,
        want_undo: bool,
    ) -> Result<Option<ExtendUndo>> {
        let bs = ctx.config.block_size;
        let (new_blocks, tail_shared) = self.extend_need(ctx, rid, append.len())?;
        let needed = new_blocks + usize::from(tail_shared);
        let available = self.pool.num_free_blocks();
        if needed > available {
            return Err(short(needed, available));
        }
        let s = &self.seqs[rid];
        let undo = want_undo.then(|| ExtendUndo {
            num_tokens: s.num_tokens,
            num_blocks: s.blocks.len(),
            num_hashes: s.hashes.len(),
            tail: s.tail.clone(),
            cacheable: s.cacheable,
        });
        // Commit: take blocks first, then update the sequence in place.
        let now = ctx.clock.now();
        if tail_shared {
            let old = *s.blocks.last().expect("n > 0");
            let copy = self.alloc_block(ctx, now);
            ctx.copy_block(old, copy);
            self.release_block(old);
            *self
                .seqs
                .get_mut(rid)
                .expect("checked")
                .blocks
                .last_mut()
                .expect("n > 0") = copy;
            self.counters.intra_device_copy_blocks += 1;
            self.counters.intra_device_copy_bytes += ctx.bytes_per_block() as u64;
        }
        for _ in 0..new_blocks {
            let b = self.alloc_block(ctx, now);
            self.seqs.get_mut(rid).expect("checked").blocks.push(b);
        }
        self.counters.gen_alloc_blocks += new_blocks as u64;
        let s = self.seqs.get_mut(rid).expect("checked");
        match append {
            Append::Ids(ids) if s.cacheable => {
                let mut rest = &ids[..];
                while !rest.is_empty() {
                    let take = (bs - s.tail.len()).min(rest.len());
                    s.tail.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if s.tail.len() == bs {
                        let parent = s.last_hash();
                        let h = ctx.hasher.block_hash(parent, &s.tail, &mut self.scratch);
                        let b = s.blocks[s.hashes.len()];
                        // Field by field, not `self.registry()`: `s` still borrows `self.seqs`.
                        let mut reg = Registry {
                            pool: &mut self.pool,
                            index: &mut self.index,
                            events: &mut self.events,
                        };
                        reg.register(b, h, parent, s.root, &s.tail);
                        s.tail.clear();
                        s.hashes.push(h);
                    }
                }
            }
            Append::Ids(_) => {}
            Append::Count(_) => {
                s.cacheable = false;
                s.tail.clear();
            }
        }
        s.num_tokens += append.len();
        self.events.end_op();
        Ok(undo)
    }

    /// Extends every sequence of `items` or none (see `Engine::extend_batch`): everything
    /// is checked before anything changes, so a failure leaves the state as it was.
    pub fn extend_batch(&mut self, ctx: &Ctx, items: &[(RequestId, Append)]) -> Result<()> {
        let mut seen = std::collections::HashSet::with_capacity(items.len());
        let mut needed = 0;
        for (rid, append) in items {
            if !seen.insert(rid) {
                return Err(Error::InvalidArgument(format!(
                    "request {rid} appears twice in one batch"
                )));
            }
            let (new_blocks, cow) = self.extend_need(ctx, rid, append.len())?;
            needed += new_blocks + usize::from(cow);
        }
        let available = self.pool.num_free_blocks();
        if needed > available {
            return Err(short(needed, available));
        }
        for (rid, append) in items {
            let applied = self.extend_apply(ctx, rid, append, false);
            debug_assert!(applied.is_ok(), "checked above: {applied:?}");
            applied?;
        }
        Ok(())
    }

    /// Tokens a prompt would get from the cache now (see `plan_allocate`).
    pub fn cached_prefix_len(&self, ctx: &Ctx, tokens: &[u32], root: BlockHash) -> usize {
        if tokens.is_empty() {
            return 0;
        }
        let plan = self.plan_allocate(ctx, tokens, root);
        (plan.hits.len() + plan.onboard.len() + plan.from_disk.len()) * ctx.config.block_size
            + plan.partial.map_or(0, |p| p.1)
    }

    /// Copy-on-write: gives `rid` private copies of the shared blocks that hold positions
    /// `start..start+n`, so a write there is never seen by another sequence.
    pub fn unshare_span(
        &mut self,
        ctx: &Ctx,
        rid: &RequestId,
        start: usize,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let bs = ctx.config.block_size;
        let span = start / bs..=(start + n - 1) / bs;
        let s = self.seq(rid)?;
        let shared: Vec<usize> = span
            .filter(|&i| self.pool.ref_cnt(s.blocks[i]) > 1)
            .collect();
        if shared.len() > self.pool.num_free_blocks() {
            return Err(short(shared.len(), self.pool.num_free_blocks()));
        }
        let now = ctx.clock.now();
        for i in shared {
            let old = self.seqs[rid].blocks[i];
            let copy = self.alloc_block(ctx, now);
            ctx.copy_block(old, copy);
            self.release_block(old);
            self.seqs.get_mut(rid).expect("checked above").blocks[i] = copy;
            self.counters.intra_device_copy_blocks += 1;
            self.counters.intra_device_copy_bytes += ctx.bytes_per_block() as u64;
        }
        self.events.end_op();
        Ok(())
    }

    // ----- release ------------------------------------------------------------------------

    /// Releases every block of a sequence, tail first.
    pub fn free_sequence(&mut self, s: Sequence) {
        if s.tier == Tier::Host {
            let host = self
                .host
                .as_mut()
                .expect("a swapped sequence implies a host tier");
            for &b in s.blocks.iter().rev() {
                host.pool.release(b);
            }
            return;
        }
        for &b in s.blocks.iter().rev() {
            self.release_block(b);
        }
    }

    pub fn deallocate(&mut self, rid: &RequestId) -> Result<()> {
        if self.seqs.get(rid).is_some_and(|s| s.swapping) {
            return Err(Error::InvalidState(format!(
                "cannot deallocate request {rid}: a swap is in progress"
            )));
        }
        let s = self
            .seqs
            .remove(rid)
            .ok_or_else(|| Error::UnknownRequest(rid.clone()))?;
        self.free_sequence(s);
        self.fail_tickets_of(rid, "it was deallocated while waiting");
        Ok(())
    }

    // ----- fork ---------------------------------------------------------------------------

    pub fn fork(&mut self, parent: &RequestId, child: &RequestId) -> Result<SeqView> {
        let p = self.resident(parent, "fork")?.clone();
        self.check_new_rid(child)?;
        for &b in &p.blocks {
            self.pool.acquire(b);
        }
        let view = SeqView::of(child, &p);
        self.seqs.insert(child.clone(), p);
        Ok(view)
    }

    // ----- gc / reset ---------------------------------------------------------------------

    /// Evicts LRU cached blocks until the blank share of the device tier reaches `target`.
    /// Evicts LRU cached blocks until the blank share of the device tier reaches `target`;
    /// returns (evicted, offloaded to the host tier).
    pub fn gc(&mut self, ctx: &Ctx, target: f64) -> (usize, usize) {
        let total = self.pool.num_blocks();
        let now = ctx.clock.now();
        let (mut evicted, mut offloaded) = (0, 0);
        while (self.pool.num_blank_blocks() as f64) < target * total as f64 {
            let Some(b) = self.pool.evict_lru_to_blank() else {
                break;
            };
            offloaded += usize::from(self.evict_cached(ctx, b, now));
            evicted += 1;
        }
        self.events.end_op();
        (evicted, offloaded)
    }

    pub fn reset_prefix_cache(&mut self) -> bool {
        if !self.seqs.is_empty() || self.waiters.num_pending() > 0 {
            return false;
        }
        while let Some(b) = self.pool.evict_lru_to_blank() {
            self.residency.forget(b);
        }
        self.index.clear();
        if let Some(host) = self.host.as_mut() {
            host.clear_cached();
        }
        if let Some(disk) = self.disk.as_mut() {
            disk.clear_cached();
        }
        self.events.all_cleared();
        true
    }

    /// Copies the drop counts kept by the bounded queues into the counters.
    pub fn sync_dropped_counts(&mut self) {
        self.counters.dropped_events = self.events.dropped;
        self.counters.dropped_eviction_events = self.residency.dropped;
    }

    // ----- pressure -----------------------------------------------------------------------

    pub fn update_pressure(&mut self) {
        // A request reading its disk hits ahead is not waiting for blocks (yet).
        let waiting = self.waiters.num_pending() > self.loading.len();
        let needed = if waiting {
            self.waiters.needed_blocks(&self.loading).max(1)
        } else {
            0
        };
        let ev = self.pressure.update(
            self.pool.num_free_blocks(),
            self.pool.num_evictable_blocks(),
            self.pool.num_blocks(),
            needed,
        );
        if let Some(e) = ev {
            if self.subscribed {
                self.pressure_events.push(e);
                self.needs_signal = true;
            }
        }
    }

    pub fn level(&self) -> Level {
        self.pressure.level
    }
}
