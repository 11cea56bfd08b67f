//! The engine's bookkeeping: everything that lives under the one engine lock.
//!
//! `State` composes the block pool (free queues, refcounts), the prefix index (hashes),
//! the sequences, the waiters, the counters, pressure and events. Each public operation
//! first checks and plans without changing anything, then commits; so a call that fails
//! leaves the state exactly as it was. No operation touches memory, a file or the eventfd:
//! each records what it implies in `Effects` (block copies inside and between tiers, disk
//! spills, read-aheads, a wake-up), which the engine runs in one place after the call, in
//! recording order and before the lock is released, so a block's bytes never change owner
//! mid-copy. Swaps copy without the lock while their sequence is pinned in a moving `Phase`
//! (see `sequence`).
//!
//! Allocation order: blank blocks first (FIFO), then the policy's victims (`lru`: the least
//! recently released evictable block; a sequence releases its blocks tail first, so children
//! go before parents). A call's victims are popped together and evicted in order while the
//! index entries of those a few places behind are prefetched (`alloc_blocks`): their cache
//! misses overlap, which halved the trace replay's cost per block (BENCHMARKS.md).
//! Submodules add to `State`, each owning one kind of change: `alloc` (a new sequence:
//! plan, reserve, publish), `extend` (growing a sequence, copy-on-write), `effects` (what
//! a call leaves the engine to do), `tickets`
//! (waiters: serve, take, cancel), `tiers` (offload, onboard, disk, swaps), `remote` (blocks
//! staged for the shared store, blocks imported from it), `truncate`
//! (shrinking a sequence), `checks` (the invariants below); two only read: `report`
//! (snapshots, queues, block tables) and `batch` (the attention metadata of one forward step).
//! Invariants (checked by `check_invariants`): every block's refcount equals the number of
//! sequences and granted tickets holding it; an evictable block is referenced by none; every
//! index entry names a block carrying that hash; a block reserved by a grant is in no index;
//! used + free == total; `num_host_seqs` counts the sequences whose blocks are in the host tier.

use std::collections::HashMap;

mod alloc;
mod batch;
mod checks;
mod effects;
mod extend;
mod remote;
mod report;
mod tickets;
mod tiers;
mod truncate;

pub use alloc::{Admission, Fill, PrefixMatch, Staged};
pub use batch::{BatchLayout, NewTokens};
pub use effects::Effects;
pub use remote::Imported;
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
use crate::sequence::{Phase, SeqView, Sequence};
use crate::slots::PREFETCH_AHEAD;
use crate::stats::Counters;
use crate::storage::Memory;
use crate::tier::{DiskTier, HostTier};
use crate::transfer::Runs;
use crate::types::{BlockHash, BlockId, IdMap, RequestId, Tier};
use crate::waiters::Waiters;

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

    /// Records writing a block's bytes (its runs laid end to end, as in the other tiers)
    /// into device block `b`.
    fn write_block(&self, fx: &mut Effects, b: BlockId, bytes: Vec<u8>) {
        fx.write(
            &self.memory,
            self.layout.block_runs(b.idx()).collect(),
            bytes,
        );
    }

    /// Records copying every byte of block `src` into block `dst` (device tier).
    fn copy_block(&self, fx: &mut Effects, src: BlockId, dst: BlockId) {
        for ((s, n), (d, _)) in self
            .layout
            .block_runs(src.idx())
            .zip(self.layout.block_runs(dst.idx()))
        {
            fx.copy(&self.memory, &self.memory, s, d, n);
        }
    }
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

/// The parts of `State` that registering a block touches (borrowed apart from `seqs`, so a
/// sequence can be updated in place while its blocks are registered).
struct Registry<'a> {
    pool: &'a mut BlockPool,
    index: &'a mut PrefixIndex,
    events: &'a mut EventQueue,
}

impl Registry<'_> {
    /// Indexes a full block of a sequence unless another block already holds its hash.
    /// `prev` is the block before it in the sequence, if any: the parent block when it holds
    /// `parent` (no table probe), else the parent is looked up.
    fn register(
        &mut self,
        b: BlockId,
        hash: BlockHash,
        parent: BlockHash,
        root: BlockHash,
        prev: Option<BlockId>,
        tokens: &[u32],
    ) {
        let first = parent == root;
        if crate::tier::index_cached(self.index, self.pool, b, hash, parent, first, prev, tokens) {
            // The first block of a chain has no parent block (the root is a salt, not a block).
            self.events
                .stored(hash, (!first).then_some(parent), tokens, Tier::Device);
        }
    }
}

/// What `State::gauges` reads: device-tier blocks and waiting calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gauges {
    pub num_free_blocks: usize,
    pub num_evictable_blocks: usize,
    pub num_used_blocks: usize,
    pub num_waiting: usize,
}

pub struct State {
    closed: bool,
    /// `close()` has begun: new calls fail while in-flight copies drain.
    closing: bool,
    /// A block copy failed: why. Every later call fails (see `fail_device`).
    broken: Option<Error>,
    pool: BlockPool,
    index: PrefixIndex,
    /// The host tier, when `host_blocks > 0`.
    host: Option<HostTier>,
    /// The disk tier, when `disk_blocks > 0` (it spills from the host tier).
    disk: Option<DiskTier>,
    /// The remote tier's keys and write queue, when `remote_url` is set.
    remote: Option<crate::remote::RemoteTier>,
    /// Writes were queued since the engine last woke the remote writer.
    remote_wake: bool,
    /// What the calls since the last commit left the engine to do (copies, disk I/O, wake).
    fx: Effects,
    /// Waiting allocations whose disk read-ahead is still running (not served before).
    loading: std::collections::HashSet<crate::waiters::Ticket>,
    /// Admissions whose fill the engine runs outside the lock, by request (see `Staged`),
    /// with whether `deallocate` withdrew the request meanwhile.
    filling: IdMap<(Admission, Vec<u32>, bool)>,
    /// Bytes of one block (in every tier).
    bytes_per_block: u64,
    /// Finished read-aheads, per waiting allocation.
    staged: HashMap<crate::waiters::Ticket, StagedReads>,
    seqs: IdMap<Sequence>,
    /// Sequences of `seqs` whose blocks are in the host tier (`Swapped`, `SwappingIn`):
    /// kept by `end_swap` and `free_sequence`, so the snapshot's `num_swapped` is O(1).
    num_host_seqs: usize,
    waiters: Waiters,
    counters: Counters,
    iter_mark: Counters,
    pressure: Pressure,
    subscribed: bool,
    pressure_events: Vec<PressureEvent>,
    events: EventQueue,
    residency: Residency,
    /// Failures got over (disk checksum, disk I/O, dropped events), for the log.
    incidents: crate::incidents::Incidents,
    /// Dropped KV events already reported as an incident.
    reported_dropped_events: u64,
    callback_errors: u64,
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
        // Bookkeeping first, fallibly (a MemoryError, never an abort), before any file exists.
        let pool = BlockPool::for_device(c.num_blocks, c.eviction_policy)?;
        let index = PrefixIndex::try_new(c.num_blocks, c.block_size)?;
        let residency = Residency::try_new(c.residency_sample_rate, c.seed, c.num_blocks)?;
        let host = match c.host_blocks {
            0 => None,
            n => Some(HostTier::new(
                n,
                c.block_size,
                ctx.bytes_per_block(),
                &ctx.memory,
                c.eviction_policy,
            )?),
        };
        let disk = match (c.disk_blocks, &c.disk_path) {
            (0, _) | (_, None) => None,
            (n, Some(path)) => Some(DiskTier::new(
                std::path::Path::new(path),
                n,
                c.block_size,
                ctx.bytes_per_block(),
                c.eviction_policy,
            )?),
        };
        let remote = c.remote_url.as_ref().map(|_| {
            // Remember about twice the blocks the local tiers hold (at most 2^20).
            let local = c.num_blocks + c.host_blocks + c.disk_blocks;
            crate::remote::RemoteTier::new(
                crate::remote::Keys::new(c, &c.remote_namespace),
                c.remote_write,
                ctx.bytes_per_block(),
                local.saturating_mul(2).min(1 << 20),
            )
        });
        Ok(State {
            closed: false,
            closing: false,
            broken: None,
            pool,
            index,
            host,
            disk,
            remote,
            remote_wake: false,
            fx: Effects::default(),
            loading: Default::default(),
            staged: HashMap::new(),
            filling: IdMap::default(),
            bytes_per_block: ctx.bytes_per_block() as u64,
            seqs: IdMap::default(),
            num_host_seqs: 0,
            waiters: Waiters::default(),
            counters: Counters::default(),
            iter_mark: Counters::default(),
            pressure: Pressure::new(c.low_watermark, c.high_watermark),
            subscribed: false,
            pressure_events: Vec::new(),
            events: EventQueue::new(c.enable_kv_events),
            residency,
            incidents: Default::default(),
            reported_dropped_events: 0,
            callback_errors: 0,
            scratch: Vec::new(),
        })
    }

    /// The effects recorded since the last call of this (the engine commits them).
    pub fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.fx)
    }

    /// Applies the after-actions of the memory operations just run (`ran`) or failed.
    pub fn settle_effects(&mut self, ran: bool) {
        let after = std::mem::take(&mut self.fx.after);
        self.settle_after(after, ran);
        self.queue_remote();
    }

    /// The effects recorded so far, to run their memory operations now (a call that
    /// touches bytes itself after them: `write_kv` after copy-on-write).
    pub fn effects_mut(&mut self) -> &mut Effects {
        &mut self.fx
    }

    /// Asks the engine to wake the event loop when it commits this call.
    pub fn signal(&mut self) {
        self.fx.signal = true;
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// `close()` has begun: new calls fail while in-flight copies drain.
    pub fn mark_closing(&mut self) {
        self.closing = true;
    }

    /// Closes the state: every open ticket fails with `Closed` (a grant gives back what it
    /// holds), every sequence is freed, the disk file's lock is given up (the disk threads
    /// were joined). Returns false if it was closed already.
    pub fn close(&mut self) -> bool {
        if self.closed {
            return false;
        }
        for (t, ticket) in self.waiters.drain_all() {
            if let crate::waiters::TicketState::Granted(g) = ticket {
                self.release_grant(g);
            }
            self.waiters.fail(t, Error::Closed);
        }
        let filling: Vec<_> = self.filling.drain().map(|(_, (a, ..))| a).collect();
        for adm in filling {
            self.release_admission(adm);
        }
        let seqs: Vec<_> = self.seqs.drain().map(|(_, s)| s).collect();
        for s in seqs {
            self.free_sequence(s);
        }
        if let Some(d) = &self.disk {
            d.file.release();
        }
        self.closed = true;
        true
    }

    /// The token count of a resident sequence (`what` names the call, for the error).
    pub fn view_tokens(&self, rid: &RequestId, what: &str) -> Result<usize> {
        Ok(self.resident(rid, what)?.num_tokens)
    }

    pub fn check_open(&self) -> Result<()> {
        if self.closed || self.closing {
            return Err(Error::Closed);
        }
        match &self.broken {
            Some(e) => Err(e.again()),
            None => Ok(()),
        }
    }

    /// A recorded block copy failed (a device fault): blocks whose bytes are unknown may be
    /// published, so nothing is served from now on. Every open ticket fails with
    /// `CopyFailed` and gives back what it holds; later calls fail in `check_open`.
    pub fn fail_device(&mut self, e: &Error) {
        let e = match e {
            Error::CopyFailed(_) | Error::Cuda(_) => e.clone(),
            other => Error::CopyFailed(other.to_string()),
        };
        for t in self.waiters.open_tickets() {
            self.withdraw(t);
            self.waiters.fail(t, e.clone());
        }
        self.broken = Some(e);
    }

    fn seq(&self, rid: &RequestId) -> Result<&Sequence> {
        self.seqs
            .get(rid)
            .ok_or_else(|| Error::UnknownRequest(rid.clone()))
    }

    /// The sequence, if it is on the device tier and no copy moves it.
    pub(crate) fn resident(&self, rid: &RequestId, what: &str) -> Result<&Sequence> {
        let s = self.seq(rid)?;
        match s.phase {
            Phase::Resident => Ok(s),
            Phase::SwappingOut { .. } | Phase::SwappingIn { .. } => Err(Error::InvalidState(
                format!("cannot {what} request {rid}: a swap is in progress"),
            )),
            Phase::Swapped => Err(Error::InvalidState(format!(
                "cannot {what} request {rid}: it is swapped out"
            ))),
        }
    }

    /// Refuses a call that changes the shape of `rid` while a call of it waits for blocks or
    /// holds a grant not yet taken (the grant is applied to the sequence as it is now).
    pub(crate) fn check_no_open_ticket(&self, rid: &RequestId, what: &str) -> Result<()> {
        if self.waiters.open_ticket(rid).is_some() {
            return Err(Error::InvalidState(format!(
                "cannot {what} request {rid}: a call of it is still waiting for blocks"
            )));
        }
        Ok(())
    }

    // ----- blocks -------------------------------------------------------------------------

    /// An allocation begins: every tier's pool starts its next round (`Lru2`'s clock).
    fn next_round(&mut self) {
        self.pool.next_round();
        if let Some(h) = self.host.as_mut() {
            h.pool.next_round();
        }
        if let Some(d) = self.disk.as_mut() {
            d.pool.next_round();
        }
    }

    /// Takes one block (blank first, then the policy's victim). The caller checked
    /// availability.
    fn alloc_block(&mut self, ctx: &Ctx, now: f64) -> BlockId {
        let mut one = Vec::with_capacity(1);
        self.alloc_blocks(ctx, 1, now, &mut one);
        one[0]
    }

    /// Takes `n` blocks onto `out`: blank ones first (FIFO), then the policy's victims in
    /// its order, each evicted (offloaded or dropped from the index) before it is handed out.
    /// The caller checked availability.
    ///
    /// The victims are popped from the policy's queues first (evicting one never moves
    /// another in them), then evicted in order while the index entries of those a few places
    /// behind are fetched in two stages (their array entries `2 * AHEAD` victims ahead, the
    /// table slots their hashes name `AHEAD` ahead): the cache misses of several victims are
    /// in flight together instead of stalling each eviction in turn. (Fetching a whole
    /// prompt's victims up front overflows the CPU's miss queue on long prompts.)
    fn alloc_blocks(&mut self, ctx: &Ctx, n: usize, now: f64, out: &mut Vec<BlockId>) {
        out.reserve(n);
        let mut left = n;
        while left > 0 {
            let Some(b) = self.pool.take_blank() else {
                break;
            };
            self.residency.on_allocate(b, now);
            out.push(b);
            left -= 1;
        }
        if left == 0 {
            return;
        }
        let first = out.len();
        out.extend((0..left).map(|_| self.pool.evict_lru().expect("availability was checked")));
        for &b in out[first..].iter().take(2 * PREFETCH_AHEAD) {
            self.index.prefetch_entry(b);
            self.residency.prefetch(b);
        }
        for &b in out[first..].iter().take(PREFETCH_AHEAD) {
            self.index.prefetch_remove(b);
        }
        for i in first..out.len() {
            if let Some(&b) = out.get(i + 2 * PREFETCH_AHEAD) {
                self.index.prefetch_entry(b);
                self.residency.prefetch(b);
            }
            if let Some(&b) = out.get(i + PREFETCH_AHEAD) {
                self.index.prefetch_remove(b);
            }
            let b = out[i];
            self.evict_cached(ctx, b, now);
            self.residency.on_allocate(b, now);
        }
    }

    /// Evicts a cached device block: its data and hash move to the host tier when one
    /// exists (offload), its hash leaves the device index. Returns whether it was offloaded.
    /// A block no host block took leaves the local tiers (staged for the store on evict).
    fn evict_cached(&mut self, ctx: &Ctx, b: BlockId, now: f64) -> bool {
        let offloaded = self.offload(ctx, b);
        if let (false, Some(h)) = (offloaded, self.index.hash_of(b)) {
            self.stage_evicted_device(ctx, b, h);
        }
        if let Some(h) = self.index.remove(b) {
            self.events.removed(h, Tier::Device);
        }
        self.counters.evicted_blocks += 1;
        self.residency.on_evict(b, now);
        offloaded
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

    // ----- release ------------------------------------------------------------------------

    /// Releases every block of a sequence, tail first (one leaving `seqs`, or an
    /// admission's that never joined it).
    pub fn free_sequence(&mut self, s: Sequence) {
        if s.phase.tier() == Tier::Host {
            self.num_host_seqs -= 1;
        }
        // A moving sequence is freed only by `close`, after its copy was drained, or when the
        // copy never ran: a swap whose ticket or worker job was refused because the engine
        // started closing stays moving. Then the blocks it took on the target tier go too.
        match &s.phase {
            Phase::SwappingOut { to } => self.release_in(Tier::Host, to.clone()),
            Phase::SwappingIn { to } => self.release_in(Tier::Device, to.clone()),
            Phase::Resident | Phase::Swapped => {}
        }
        self.release_in(s.phase.tier(), s.blocks);
    }

    /// Releases blocks of one tier, last first (a sequence's tail goes first).
    pub(super) fn release_in(&mut self, tier: Tier, blocks: Vec<BlockId>) {
        if tier == Tier::Host {
            let host = self.host.as_mut().expect("host blocks imply a host tier");
            for &b in blocks.iter().rev() {
                host.pool.release(b);
            }
            return;
        }
        for &b in blocks.iter().rev() {
            self.release_block(b);
        }
    }

    /// Frees a sequence's blocks; a call of it still waiting (or granted, not taken) fails
    /// and gives back what it held. A request that only waits for its allocation is
    /// withdrawn the same way.
    pub fn deallocate(&mut self, ctx: &Ctx, rid: &RequestId) -> Result<()> {
        if self.seqs.get(rid).is_some_and(|s| s.phase.is_moving()) {
            return Err(Error::InvalidState(format!(
                "cannot deallocate request {rid}: a swap is in progress"
            )));
        }
        if let Some((_, _, withdrawn)) = self.filling.get_mut(rid) {
            *withdrawn = true; // its fill is running: `finish_fill` gives it back
            return Ok(());
        }
        let failed = self.fail_ticket_of(rid, "it was deallocated while waiting");
        match self.seqs.remove(rid) {
            Some(s) => {
                self.stage_released(ctx, &s);
                self.free_sequence(s);
            }
            None if failed => {}
            None => return Err(Error::UnknownRequest(rid.clone())),
        }
        Ok(())
    }

    // ----- fork ---------------------------------------------------------------------------

    pub fn fork(&mut self, parent: &RequestId, child: &RequestId) -> Result<SeqView> {
        let p = self.resident(parent, "fork")?.clone();
        self.check_no_open_ticket(parent, "fork")?;
        self.check_new_rid(child)?;
        for &b in &p.blocks {
            self.pool.acquire(b);
        }
        let view = SeqView::of(child, &p);
        let own_from = p.blocks.len(); // the child computes only what it appends
        self.seqs.insert(child.clone(), Sequence { own_from, ..p });
        Ok(view)
    }

    // ----- gc / reset ---------------------------------------------------------------------

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
        if !self.seqs.is_empty()
            || !self.filling.is_empty()
            || self.waiters.num_pending() > 0
            || self.waiters.grants().next().is_some()
        {
            return false;
        }
        while let Some(b) = self.pool.evict_lru_to_blank() {
            self.residency.forget(b);
        }
        self.pool.forget_evicted();
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

    /// Records a failure the engine got over, for the log (and wakes the event loop).
    pub(super) fn incident(&mut self, kind: &'static str, message: String) {
        self.incidents.push(kind, message);
        self.fx.signal = true;
    }

    /// The incidents since the last drain (KV events dropped meanwhile become one), and how
    /// many did not fit the bounded queue.
    pub fn drain_incidents(&mut self) -> (Vec<crate::incidents::Incident>, u64) {
        let dropped = self.events.dropped;
        if dropped > self.reported_dropped_events {
            let n = dropped - self.reported_dropped_events;
            self.reported_dropped_events = dropped;
            self.incidents.push(
                "dropped_events",
                format!(
                    "{n} KV events dropped ({dropped} in all): drain_events() fell behind \
                     the bounded queue (or set enable_kv_events=False)"
                ),
            );
        }
        self.incidents.drain()
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
                self.fx.signal = true;
            }
        }
    }

    /// Whether `num_tokens` new tokens fit now and nothing waits ahead of them.
    pub fn can_allocate(&self, ctx: &Ctx, num_tokens: usize) -> bool {
        let need = self.blocks_needed(ctx, num_tokens);
        self.waiters.num_pending() == 0 && need <= self.pool.num_free_blocks()
    }

    pub fn view(&self, rid: &RequestId) -> Option<SeqView> {
        self.seqs.get(rid).map(|s| SeqView::of(rid, s))
    }

    pub fn contains(&self, rid: &RequestId) -> bool {
        self.seqs.contains_key(rid)
    }

    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    pub fn level(&self) -> Level {
        self.pressure.level
    }

    /// The device tier's occupancy and the number of waiting calls, in O(1).
    pub fn gauges(&self) -> Gauges {
        Gauges {
            num_free_blocks: self.pool.num_free_blocks(),
            num_evictable_blocks: self.pool.num_evictable_blocks(),
            num_used_blocks: self.pool.num_used_blocks(),
            num_waiting: self.waiters.num_pending(),
        }
    }
}
