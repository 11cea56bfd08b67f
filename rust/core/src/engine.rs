//! The engine: one lock around `State`, the memory it manages, and the notifier.
//!
//! State plans, the engine executes. Every public method takes the lock once, lets `State`
//! do the bookkeeping, and ends in `commit`, the one epilogue (also of every worker's
//! completion): serve waiters, update the pressure level, run the block copies the call
//! recorded (`state::effects`) in order, then, after the lock, wake the event loop and hand
//! disk I/O to the workers. None of them calls Python or blocks on anything but the lock.
//!
//! Worker threads (the swap copier, the disk writers and the disk reader) never let a failure
//! escape: a copy that fails or panics is caught (`guarded`, the one copy policy), the swap it
//! served is undone and its ticket fails with `CopyFailed`; a failed disk read or write is a
//! miss or an unused slot. So every waiter is answered. A failed bookkeeping copy (only a
//! lost device can fail one) stops the engine instead: every waiter and later call gets
//! `CopyFailed`. Test hooks (`inject_copy_faults`, `inject_device_fault`, `pause_copies`,
//! `set_inline_copy_bytes`, `wait_copies_idle`) hold a swap in flight or fail a copy.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::{Mutex, MutexGuard};

use crate::clock::Clock;
use crate::config::{CacheConfig, Device};
use crate::error::{Error, Result};
use crate::events::KvEvent;
use crate::layout::{KvLayout, LayerView};
use crate::notify::Notifier;
use crate::prefix::{Hasher, Salt};
use crate::pressure::{Level, PressureEvent};
use crate::residency::EvictionEvent;
use crate::sequence::{Append, Phase, SeqView};
use crate::state::{Ctx, DiskRead, State, Swap};
use crate::stats::{Counters, GcStats, Snapshot, TierStats};
use crate::storage::cuda::{CudaDevice, DeviceSlab};
use crate::storage::disk::DiskWorkers;
use crate::storage::{copy_runs, Memory};
use crate::tier::DiskWrite;
use crate::transfer::Copier;
use crate::types::{RequestId, Tier};
use crate::waiters::{Ticket, WaitOp};

/// What a call that may wait returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ready(SeqView),
    /// Queued: the ticket finishes later (see `drain_notifications`).
    Waiting(Ticket),
}

/// The engine: its bookkeeping core, shared with the copy worker, and that worker.
/// Every bookkeeping call is a method of `EngineCore`, reached through `Deref`; calls that
/// move bytes between tiers (swaps) live here because they may hand work to the worker.
pub struct Engine {
    core: Arc<EngineCore>,
    copier: Copier,
}

impl std::ops::Deref for Engine {
    type Target = EngineCore;

    fn deref(&self) -> &EngineCore {
        &self.core
    }
}

/// Swaps moving fewer bytes than this are copied inline (cheaper than a thread hop).
pub const INLINE_COPY_BYTES: usize = 1 << 20;

/// The direction of a swap, and how its end is recorded.
#[derive(Debug, Clone, Copy)]
enum SwapDir {
    Out,
    In,
}

impl SwapDir {
    /// Records the end of a swap's copy: done, or undone (the sequence stays where it was
    /// and the blocks the swap took go back) with the copy's error returned.
    fn settle(self, st: &mut State, rid: &RequestId, ns: u64, copied: Result<()>) -> Result<()> {
        let out = matches!(self, SwapDir::Out);
        st.end_swap(rid, out, copied.is_ok());
        copied?;
        let c = &mut st.counters;
        if out {
            c.d2h_transfers += 1;
            c.d2h_transfer_ns += ns;
        } else {
            c.h2d_transfers += 1;
            c.h2d_transfer_ns += ns;
        }
        Ok(())
    }
}

impl Engine {
    pub fn new(config: CacheConfig) -> Result<Self> {
        Self::with_clock(config, Clock::default())
    }

    pub fn with_clock(config: CacheConfig, clock: Clock) -> Result<Self> {
        let core = EngineCore::new(config, clock)?;
        Ok(Engine {
            core,
            copier: Copier::new(),
        })
    }

    /// Moves a resident sequence's blocks to the host tier (byte for byte) and frees its
    /// device blocks. Small swaps finish at once; big ones copy on the worker thread and
    /// finish through a ticket (`Outcome::Waiting`), so the caller's thread never blocks.
    pub fn swap_out(&self, rid: &RequestId) -> Result<Outcome> {
        let swap = self
            .core
            .mutate(false, |st, ctx| st.begin_swap_out(ctx, rid))?;
        self.run_swap(rid, swap, SwapDir::Out)
    }

    /// Moves a swapped-out sequence back to the device tier (block ids may change).
    pub fn swap_in(&self, rid: &RequestId) -> Result<Outcome> {
        let swap = self
            .core
            .mutate(false, |st, ctx| st.begin_swap_in(ctx, rid))?;
        self.run_swap(rid, swap, SwapDir::In)
    }

    fn run_swap(&self, rid: &RequestId, swap: Swap, dir: SwapDir) -> Result<Outcome> {
        let Swap { runs, src, dst } = swap;
        if runs.bytes() < self.core.inline_copy_bytes.load(Ordering::Relaxed) {
            let t0 = Instant::now();
            let copied = self.core.guarded_copy(&src, &dst, &runs);
            let ns = t0.elapsed().as_nanos() as u64;
            return self.core.mutate(true, |st, _| {
                dir.settle(st, rid, ns, copied)?;
                Ok(Outcome::Ready(SeqView::of(rid, &st.seqs[rid])))
            });
        }
        let ticket = self
            .core
            .mutate(false, |st, _| Ok(st.waiters.push_moving(rid.clone())))?;
        let core = self.core.clone();
        let rid = rid.clone();
        // NOTE: the copy runs without the lock: it touches only blocks the sequence owns
        // while its phase is moving, and no other call may use a moving sequence.
        let job = Box::new(move || {
            let t0 = Instant::now();
            let copied = core.guarded_copy(&src, &dst, &runs);
            let mut st = core.state.lock();
            if st.closed {
                return;
            }
            let settled = dir.settle(&mut st, &rid, t0.elapsed().as_nanos() as u64, copied);
            st.waiters.finish_moving(ticket, settled);
            let _ = core.commit(st, true);
        });
        if !self.copier.submit(job) {
            // Closing: `close` fails the ticket and frees the sequence.
            return Err(Error::Closed);
        }
        Ok(Outcome::Waiting(ticket))
    }

    /// Blocks until every swap copy handed to the worker so far has finished (tests, benches;
    /// never from an event loop). A paused copier (`pause_copies`) must be resumed first.
    pub fn wait_copies_idle(&self) {
        self.copier.flush();
    }

    /// Closes the engine: pending waiters fail with `Closed`, copies in flight finish
    /// first (nothing leaks), every later call fails. Memory stays alive while DLPack views
    /// hold it. Idempotent.
    pub fn close(&self) {
        self.core.mark_closing();
        self.core.pause_copies(false);
        self.copier.shutdown();
        if let Some(w) = &self.core.disk_workers {
            w.shutdown();
        }
        if let Some(r) = &self.core.ctx.disk_reader {
            r.shutdown();
        }
        self.core.close();
    }
}

/// The bookkeeping half of the engine (see `Engine`).
pub struct EngineCore {
    /// Itself, for jobs handed to worker threads.
    me: Weak<EngineCore>,
    ctx: Ctx,
    state: Mutex<State>,
    notifier: Notifier,
    disk_workers: Option<DiskWorkers>,
    /// Swap copies still to fail on purpose (`inject_copy_faults`).
    copy_faults: AtomicU32,
    /// The next commit's memory operations fail (`inject_device_fault`).
    device_fault: AtomicBool,
    /// Worker copies wait while set (`pause_copies`).
    copies_paused: AtomicBool,
    /// Swaps smaller than this copy inline (`set_inline_copy_bytes`).
    inline_copy_bytes: AtomicUsize,
}

/// The message of a caught panic.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    match (p.downcast_ref::<&str>(), p.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a block copy panicked".to_string(),
    }
}

/// The one copy policy: runs a block copy, turning its failure, or a panic inside it, into
/// `CopyFailed` (a worker that died would leave its ticket unanswered forever). `inject`
/// fails it on purpose (test hooks), as a panic would.
fn guarded<T>(inject: bool, copy: impl FnOnce() -> Result<T>) -> Result<T> {
    let run = std::panic::AssertUnwindSafe(|| {
        if inject {
            // `resume_unwind` unwinds like a panic without running the panic hook.
            std::panic::resume_unwind(Box::new("injected copy fault"));
        }
        copy()
    });
    match std::panic::catch_unwind(run) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(Error::CopyFailed(m))) => Err(Error::CopyFailed(m)),
        Ok(Err(e)) => Err(Error::CopyFailed(e.to_string())),
        Err(panic) => Err(Error::CopyFailed(panic_message(&*panic))),
    }
}

/// Threads writing spilled blocks to the disk tier.
const DISK_THREADS: usize = 2;

impl EngineCore {
    fn new(config: CacheConfig, clock: Clock) -> Result<Arc<Self>> {
        let layout = KvLayout::new(&config, config.num_blocks);
        let memory = match config.device {
            Device::Cpu => Memory::host(layout.total_bytes())?,
            Device::Cuda(n) => {
                let dev = Arc::new(CudaDevice::open(n)?);
                let slab = Arc::new(DeviceSlab::new(&dev, layout.total_bytes())?);
                Memory::Cuda(dev, slab)
            }
        };
        let hasher = Hasher::new(config.hash_algo);
        let disk_reader = match config.disk_blocks {
            0 => None,
            _ => Some(DiskWorkers::new(1)?),
        };
        let ctx = Ctx {
            config,
            layout,
            memory,
            hasher,
            clock,
            disk_reader,
        };
        let state = Mutex::new(State::new(&ctx)?);
        let disk_workers = match state.lock().disk {
            Some(_) => Some(DiskWorkers::new(DISK_THREADS)?),
            None => None,
        };
        let notifier = Notifier::new()?;
        Ok(Arc::new_cyclic(|me| EngineCore {
            me: me.clone(),
            ctx,
            state,
            notifier,
            disk_workers,
            copy_faults: AtomicU32::new(0),
            device_fault: AtomicBool::new(false),
            copies_paused: AtomicBool::new(false),
            inline_copy_bytes: AtomicUsize::new(INLINE_COPY_BYTES),
        }))
    }

    /// Runs a swap's block copy under `guarded` (the test hooks apply: `pause_copies`,
    /// `inject_copy_faults`).
    fn guarded_copy(&self, src: &Memory, dst: &Memory, runs: &crate::transfer::Runs) -> Result<()> {
        while self.copies_paused.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        let inject = self
            .copy_faults
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        guarded(inject, || copy_runs(src, dst, runs))
    }

    /// Makes the memory operations of the next commit that has any fail, as a lost device
    /// would (tests: the engine must then stop serving, see `commit`).
    pub fn inject_device_fault(&self) {
        self.device_fault.store(true, Ordering::SeqCst);
    }

    /// Makes the next `n` swap copies fail as if the copy panicked (tests).
    pub fn inject_copy_faults(&self, n: u32) {
        self.copy_faults.store(n, Ordering::SeqCst);
    }

    /// Holds swap copies on the worker before they start while `on` (tests: a swap stays in
    /// flight for as long as a test needs). `close` lifts it.
    pub fn pause_copies(&self, on: bool) {
        self.copies_paused.store(on, Ordering::SeqCst);
    }

    /// Swaps of fewer bytes than this copy inline, bigger ones on the worker (tests; the
    /// default is `INLINE_COPY_BYTES`).
    pub fn set_inline_copy_bytes(&self, n: usize) {
        self.inline_copy_bytes.store(n, Ordering::Relaxed);
    }

    /// Hands the disk writes staged by the last call to the disk workers.
    fn submit_disk_writes(&self, writes: Vec<DiskWrite>) {
        if writes.is_empty() {
            return;
        }
        let (Some(workers), Some(core)) = (&self.disk_workers, self.me.upgrade()) else {
            return;
        };
        for w in writes {
            let core = core.clone();
            workers.submit(Box::new(move || {
                let file = core.state.lock().disk.as_ref().map(|d| d.file.clone());
                let Some(file) = file else { return };
                // A panic inside the write is a failed write, never a lost answer.
                let write =
                    std::panic::AssertUnwindSafe(|| file.write_block(w.slot.idx(), &w.data));
                let ok = matches!(std::panic::catch_unwind(write), Ok(Ok(())));
                let mut st = core.state.lock();
                if !st.closed {
                    st.finish_disk_write(w.slot, w.hash, ok);
                    let _ = core.commit(st, false);
                }
            }));
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.ctx.config
    }

    pub fn layout(&self) -> &KvLayout {
        &self.ctx.layout
    }

    pub fn clock(&self) -> &Clock {
        &self.ctx.clock
    }

    /// The eventfd the event loop watches.
    pub fn notify_fd(&self) -> i32 {
        self.notifier.fd()
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        let st = self.state.lock();
        st.check_open()?;
        Ok(st)
    }

    /// Runs a mutating operation, then commits its effects (serving waiters if `freed`).
    /// The operation's result is returned unless its block copies failed.
    fn mutate<T>(&self, freed: bool, f: impl FnOnce(&mut State, &Ctx) -> Result<T>) -> Result<T> {
        let mut st = self.lock()?;
        let out = f(&mut st, &self.ctx);
        self.commit(st, freed)?;
        out
    }

    /// The epilogue of every call and of every worker's completion, the one place effects
    /// run (see `state::effects`): serves waiters (if `freed`), updates pressure, runs the
    /// recorded block copies in order under the lock, then, without it, wakes the event
    /// loop and hands disk I/O to the workers.
    /// A failed copy (only device memory can fail) leaves blocks whose bytes are unknown
    /// already published, so the engine stops serving: every waiter and every later call
    /// fails with `CopyFailed` (`State::fail_device`), and the error is returned.
    fn commit(&self, mut st: MutexGuard<'_, State>, freed: bool) -> Result<()> {
        if freed {
            st.serve_waiters(&self.ctx);
        }
        st.update_pressure();
        let mut fx = st.take_effects();
        let copied = if fx.has_memory_ops() {
            let inject = self.device_fault.swap(false, Ordering::SeqCst);
            guarded(inject, || fx.run_memory())
        } else {
            Ok(vec![])
        };
        if let Err(e) = &copied {
            st.fail_device(e);
            fx.signal = true;
        }
        drop(st);
        if fx.signal {
            self.notifier.signal();
        }
        let writes = copied?;
        self.submit_disk_writes(writes);
        self.submit_disk_reads(fx.disk_reads);
        Ok(())
    }

    /// Hands read-aheads to the disk reader; each finishes by staging its results and
    /// serving the waiters (its ticket may be granted then).
    fn submit_disk_reads(&self, reads: Vec<DiskRead>) {
        let (Some(reader), Some(core)) = (&self.ctx.disk_reader, self.me.upgrade()) else {
            return;
        };
        for DiskRead {
            ticket,
            file,
            reads,
        } in reads
        {
            let core = core.clone();
            reader.submit(Box::new(move || {
                let read_all = std::panic::AssertUnwindSafe(|| {
                    reads
                        .iter()
                        .map(|&(hash, slot)| {
                            let mut buf = vec![0u8; file.slot_bytes()];
                            (
                                hash,
                                slot,
                                file.read_block(slot.idx(), &mut buf).map(|()| buf),
                            )
                        })
                        .collect::<Vec<_>>()
                });
                // A panic inside the reads fails each of them (they are misses), so the
                // waiting allocation is still answered.
                let results = std::panic::catch_unwind(read_all).unwrap_or_else(|p| {
                    let why = crate::storage::disk::ReadError::Io(format!(
                        "disk reader failed: {}",
                        panic_message(&*p)
                    ));
                    reads
                        .iter()
                        .map(|&(h, s)| (h, s, Err(why.clone())))
                        .collect()
                });
                let mut st = core.state.lock();
                if st.closed {
                    return;
                }
                st.finish_disk_read(ticket, results);
                st.signal();
                let _ = core.commit(st, true);
            }));
        }
    }

    /// Salt -> the root hash its sequences chain from.
    pub fn root_hash(&self, salt: Option<&Salt>) -> crate::types::BlockHash {
        self.ctx.hasher.root_hash(salt)
    }

    /// Reserves KV space for a new sequence. `wait`: queue when short (else `OutOfBlocks`).
    pub fn allocate(
        &self,
        rid: RequestId,
        tokens: Vec<u32>,
        salt: Option<&Salt>,
        wait: bool,
    ) -> Result<Outcome> {
        if tokens.is_empty() {
            return Err(Error::InvalidArgument("tokens must not be empty".into()));
        }
        let root = self.root_hash(salt);
        self.mutate(false, |st, ctx| {
            st.check_new_rid(&rid)?;
            let total = st.pool.num_blocks();
            let need = st.blocks_needed(ctx, tokens.len());
            if need > total {
                return Err(Error::OutOfBlocks {
                    needed: need,
                    available: total,
                    never_fits: true,
                });
            }
            // A prefix hit on disk is read ahead by the disk reader while the call waits, so
            // the caller's thread never blocks on disk I/O (`try_allocate` reads inline).
            let reads = if wait {
                st.planned_disk_reads(ctx, &tokens, root)
            } else {
                vec![]
            };
            if !reads.is_empty() {
                let t = st
                    .waiters
                    .push(WaitOp::Allocate { rid, tokens, root }, need);
                st.start_disk_read(t, reads);
                return Ok(Outcome::Waiting(t));
            }
            // First come, first served: a new prompt overtakes no waiting call.
            if st.waiters.num_pending() == 0 {
                match st.allocate_now(ctx, &rid, &tokens, root, &mut Default::default()) {
                    Ok(v) => return Ok(Outcome::Ready(v)),
                    Err(Error::OutOfBlocks {
                        never_fits: false, ..
                    }) if wait => {}
                    Err(e) => return Err(e),
                }
            } else if !wait {
                let free = st.pool.num_free_blocks();
                return Err(Error::OutOfBlocks {
                    needed: need,
                    available: free,
                    never_fits: false,
                });
            }
            st.counters.preempted_waits += 1;
            Ok(Outcome::Waiting(
                st.waiters
                    .push(WaitOp::Allocate { rid, tokens, root }, need),
            ))
        })
    }

    /// Appends tokens to a sequence. `wait`: queue when short (else `OutOfBlocks`). An
    /// extend that needs blocks while an earlier one waits queues behind it (or fails).
    pub fn extend(&self, rid: RequestId, append: Append, wait: bool) -> Result<Outcome> {
        self.mutate(false, |st, ctx| {
            if st.waiters.open_ticket(&rid).is_some() {
                return Err(Error::InvalidState(format!(
                    "request {rid} already has an extend waiting"
                )));
            }
            let need = st.extend_need(ctx, &rid, append.len())?;
            let (new_blocks, cow) = need;
            let needed = new_blocks + usize::from(cow);
            let overtakes = needed > 0 && !st.waiters.extends.is_empty();
            let result = if overtakes {
                Err(Error::OutOfBlocks {
                    needed,
                    available: 0,
                    never_fits: false,
                })
            } else {
                st.extend_with(ctx, &rid, &append, need)
            };
            match result {
                Ok(v) => Ok(Outcome::Ready(v)),
                Err(Error::OutOfBlocks { needed, .. }) if wait => {
                    let held = st.seqs.get(&rid).map_or(0, |s| s.blocks.len());
                    let never = held + needed - usize::from(cow) > st.pool.num_blocks();
                    if never {
                        return Err(Error::OutOfBlocks {
                            needed,
                            available: st.pool.num_blocks(),
                            never_fits: true,
                        });
                    }
                    st.counters.preempted_waits += 1;
                    Ok(Outcome::Waiting(
                        st.waiters.push(WaitOp::Extend { rid, append }, needed),
                    ))
                }
                Err(e) => Err(e),
            }
        })
    }

    /// One decode step: extends every sequence in `items`, all or nothing (never waits).
    /// A batch that needs blocks while an extend waits fails (it would overtake it).
    pub fn extend_batch(&self, items: &[(RequestId, Append)]) -> Result<()> {
        self.mutate(false, |st, ctx| {
            let blocked = !st.waiters.extends.is_empty();
            st.extend_batch(ctx, items, blocked)
        })
    }

    /// Tokens of `tokens` the prefix cache would serve now (full hits and a partial copy),
    /// without allocating anything.
    pub fn lookup_prefix(&self, tokens: &[u32], salt: Option<&Salt>) -> Result<usize> {
        let root = self.root_hash(salt);
        let st = self.lock()?;
        Ok(st.cached_prefix_len(&self.ctx, tokens, root))
    }

    pub fn deallocate(&self, rid: &RequestId) -> Result<()> {
        self.mutate(true, |st, _| st.deallocate(rid))
    }

    pub fn fork(&self, parent: &RequestId, child: RequestId) -> Result<SeqView> {
        self.mutate(false, |st, _| st.fork(parent, &child))
    }

    /// Hands a finished ticket's result to its waiter; a grant is applied and published.
    pub fn take_ticket(&self, t: Ticket) -> Result<SeqView> {
        self.mutate(false, |st, ctx| st.take_ticket(ctx, t))
    }

    /// Withdraws a ticket (a cancelled or timed-out waiter): nothing it took is kept.
    /// On a closed engine there is nothing left to give back, so this never fails.
    pub fn cancel_ticket(&self, t: Ticket) {
        let _ = self.mutate(true, |st, ctx| {
            st.cancel_ticket(ctx, t);
            Ok(())
        });
    }

    /// Finished tickets and pressure transitions since the last call; clears the eventfd.
    pub fn drain_notifications(&self) -> (Vec<Ticket>, Vec<PressureEvent>) {
        self.notifier.clear();
        let mut st = self.state.lock();
        (
            std::mem::take(&mut st.waiters.completed),
            std::mem::take(&mut st.pressure_events),
        )
    }

    pub fn set_subscribed(&self, on: bool) {
        self.state.lock().subscribed = on;
    }

    pub fn record_callback_error(&self) {
        self.state.lock().callback_errors += 1;
    }

    pub fn gc(&self, target_free_ratio: Option<f64>) -> Result<GcStats> {
        let target = target_free_ratio.unwrap_or(self.ctx.config.low_watermark);
        if !(0.0..=1.0).contains(&target) {
            return Err(Error::InvalidArgument(format!(
                "target_free_ratio {target} is outside [0, 1]"
            )));
        }
        let t0 = Instant::now();
        let (evicted, offloaded) = self.mutate(false, |st, ctx| Ok(st.gc(ctx, target)))?;
        Ok(GcStats {
            evicted_blocks: evicted,
            offloaded_blocks: offloaded,
            freed_bytes: evicted * self.ctx.bytes_per_block(),
            duration_s: t0.elapsed().as_secs_f64(),
        })
    }

    pub fn reset_prefix_cache(&self) -> Result<bool> {
        self.mutate(false, |st, _| Ok(st.reset_prefix_cache()))
    }

    pub fn can_allocate(&self, num_tokens: usize) -> Result<bool> {
        let st = self.lock()?;
        let need = st.blocks_needed(&self.ctx, num_tokens);
        Ok(st.waiters.num_pending() == 0 && need <= st.pool.num_free_blocks())
    }

    pub fn get(&self, rid: &RequestId) -> Result<Option<SeqView>> {
        let st = self.lock()?;
        Ok(st.seqs.get(rid).map(|s| SeqView::of(rid, s)))
    }

    pub fn contains(&self, rid: &RequestId) -> Result<bool> {
        Ok(self.lock()?.seqs.contains_key(rid))
    }

    pub fn num_sequences(&self) -> Result<usize> {
        Ok(self.lock()?.seqs.len())
    }

    pub fn pressure_level(&self) -> Result<Level> {
        Ok(self.lock()?.level())
    }

    /// Row-major `[rids.len(), max_blocks]` block ids padded with `pad`, and the column count.
    pub fn block_table(&self, rids: &[RequestId], pad: i32) -> Result<(Vec<i32>, usize)> {
        let st = self.lock()?;
        let rows = rids
            .iter()
            .map(|r| {
                let s = st
                    .seqs
                    .get(r)
                    .ok_or_else(|| Error::UnknownRequest(r.clone()))?;
                if s.phase != Phase::Resident {
                    return Err(Error::InvalidState(format!(
                        "request {r} is not resident on the device: it has no block table"
                    )));
                }
                Ok(s)
            })
            .collect::<Result<Vec<_>>>()?;
        let cols = rows.iter().map(|s| s.blocks.len()).max().unwrap_or(0);
        let mut out = vec![pad; rows.len() * cols];
        for (row, s) in out.chunks_mut(cols.max(1)).zip(&rows) {
            for (o, b) in row.iter_mut().zip(&s.blocks) {
                *o = b.0 as i32;
            }
        }
        Ok((out, cols))
    }

    fn kv_span(
        &self,
        st: &State,
        rid: &RequestId,
        layer: usize,
        start: usize,
        n: usize,
        what: &str,
    ) -> Result<()> {
        let s = st.resident(rid, what)?;
        if layer >= self.ctx.config.num_layers {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} is outside 0..{}",
                self.ctx.config.num_layers
            )));
        }
        if start.checked_add(n).is_none_or(|e| e > s.num_tokens) {
            return Err(Error::InvalidArgument(format!(
                "positions {start}..{} are past the end of request {rid} ({} tokens)",
                start.saturating_add(n),
                s.num_tokens
            )));
        }
        Ok(())
    }

    /// Visits the contiguous runs of token positions `start..start+n` of one layer:
    /// `(byte offset of K in the slab, byte offset of V, bytes, offset in the caller's array)`.
    fn for_each_run(
        &self,
        blocks: &[crate::types::BlockId],
        layer: usize,
        start: usize,
        n: usize,
        mut f: impl FnMut(usize, usize, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let bs = self.ctx.config.block_size;
        let tb = self.ctx.layout.token_bytes();
        let mut pos = start;
        while pos < start + n {
            let slot = pos % bs;
            let run = (bs - slot).min(start + n - pos);
            let b = blocks[pos / bs].idx();
            let k = self.ctx.layout.offset(b, layer, 0, slot);
            let v = self.ctx.layout.offset(b, layer, 1, slot);
            f(k, v, run * tb, (pos - start) * tb)?;
            pos += run;
        }
        Ok(())
    }

    /// Copies K and V (`n x heads x head_dim` elements each, as bytes) into positions
    /// `start..start+n` of one layer. A shared block is copied first (copy-on-write).
    pub fn write_kv(
        &self,
        rid: &RequestId,
        layer: usize,
        start: usize,
        k: &[u8],
        v: &[u8],
    ) -> Result<()> {
        let tb = self.ctx.layout.token_bytes();
        if k.len() != v.len() || k.len() % tb != 0 {
            return Err(Error::InvalidArgument(format!(
                "k and v must both hold n x {tb} bytes (got {} and {})",
                k.len(),
                v.len()
            )));
        }
        let n = k.len() / tb;
        self.mutate(false, |st, ctx| {
            self.kv_span(st, rid, layer, start, n, "write_kv")?;
            st.unshare_span(ctx, rid, start, n)?;
            let blocks = &st.seqs[rid].blocks;
            self.for_each_run(blocks, layer, start, n, |ko, vo, len, at| {
                ctx.memory.write(ko, &k[at..at + len])?;
                ctx.memory.write(vo, &v[at..at + len])
            })
        })
    }

    /// Copies K and V of positions `start..start+n` of one layer out into `k` and `v`.
    pub fn read_kv(
        &self,
        rid: &RequestId,
        layer: usize,
        start: usize,
        k: &mut [u8],
        v: &mut [u8],
    ) -> Result<()> {
        let tb = self.ctx.layout.token_bytes();
        if k.len() != v.len() || k.len() % tb != 0 {
            return Err(Error::InvalidArgument(format!(
                "k and v must both hold n x {tb} bytes"
            )));
        }
        let n = k.len() / tb;
        let st = self.lock()?;
        self.kv_span(&st, rid, layer, start, n, "read_kv")?;
        self.for_each_run(&st.seqs[rid].blocks, layer, start, n, |ko, vo, len, at| {
            self.ctx.memory.read(ko, &mut k[at..at + len])?;
            self.ctx.memory.read(vo, &mut v[at..at + len])
        })
    }

    /// The device tier's memory and one layer's view of it (for DLPack).
    pub fn layer_view(&self, layer: usize) -> Result<(Memory, LayerView)> {
        drop(self.lock()?);
        if layer >= self.ctx.config.num_layers {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} is outside 0..{}",
                self.ctx.config.num_layers
            )));
        }
        Ok((self.ctx.memory.clone(), self.ctx.layout.layer_view(layer)))
    }

    fn snapshot(&self, st: &State, counters: Counters) -> Snapshot {
        let bpb = self.ctx.bytes_per_block();
        let p = &st.pool;
        Snapshot {
            device: TierStats::new(
                p.num_blocks(),
                p.num_free_blocks(),
                p.num_evictable_blocks(),
                bpb,
            ),
            host: st.host.as_ref().map_or_else(TierStats::default, |h| {
                TierStats::new(
                    h.pool.num_blocks(),
                    h.pool.num_free_blocks(),
                    h.pool.num_evictable_blocks(),
                    bpb,
                )
            }),
            disk: st.disk.as_ref().map_or_else(TierStats::default, |d| {
                TierStats::new(
                    d.pool.num_blocks(),
                    d.pool.num_free_blocks(),
                    d.pool.num_evictable_blocks(),
                    bpb,
                )
            }),
            inflight_disk_ops: st
                .disk
                .as_ref()
                .map_or(0, |d| d.pending.iter().filter(|&&p| p).count()),
            block_size: self.ctx.config.block_size,
            num_sequences: st.seqs.len(),
            num_swapped: st
                .seqs
                .values()
                .filter(|s| s.phase.tier() != Tier::Device)
                .count(),
            num_waiting: st.waiters.num_pending(),
            pressure_level: st.level() as u8,
            callback_errors: st.callback_errors,
            counters,
        }
    }

    /// Gauges now and cumulative counters since start.
    pub fn stats(&self) -> Result<Snapshot> {
        let mut st = self.lock()?;
        st.sync_dropped_counts();
        Ok(self.snapshot(&st, st.counters))
    }

    /// Gauges now and counters since the previous call (which this call resets).
    pub fn iteration_stats(&self) -> Result<Snapshot> {
        let mut st = self.lock()?;
        st.sync_dropped_counts();
        let delta = st.counters.since(&st.iter_mark);
        st.iter_mark = st.counters;
        Ok(self.snapshot(&st, delta))
    }

    /// Injects a disk fault (tests). `InvalidArgument` without a disk tier or for a bad slot.
    pub fn inject_disk_fault(&self, fault: crate::storage::disk::Fault) -> Result<()> {
        let st = self.lock()?;
        let disk = st
            .disk
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("there is no disk tier".into()))?;
        if let crate::storage::disk::Fault::FlipByte { slot, offset } = fault {
            if slot >= disk.file.num_slots() || offset >= disk.file.slot_bytes() {
                return Err(Error::InvalidArgument(format!(
                    "no byte {offset} of slot {slot}"
                )));
            }
        }
        disk.file.inject(fault);
        Ok(())
    }

    /// Blocks until every disk write handed to the workers has finished (tests, benches).
    pub fn wait_disk_idle(&self) -> Result<()> {
        loop {
            let busy = self
                .lock()?
                .disk
                .as_ref()
                .is_some_and(|d| d.pending.iter().any(|&p| p));
            if !busy {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    pub fn drain_events(&self) -> Result<Vec<KvEvent>> {
        Ok(self.lock()?.events.drain())
    }

    pub fn drain_eviction_events(&self) -> Result<Vec<EvictionEvent>> {
        Ok(self.lock()?.residency.drain())
    }

    /// Refuses new calls from now on (before in-flight copies are drained).
    fn mark_closing(&self) {
        self.state.lock().closing = true;
    }

    fn close(&self) {
        let mut st = self.state.lock();
        if st.closed {
            return;
        }
        for (t, ticket) in st.waiters.drain_all() {
            if let crate::waiters::TicketState::Granted(g) = ticket {
                st.release_grant(g);
            }
            st.waiters.fail(t, Error::Closed);
        }
        let seqs: Vec<_> = st.seqs.drain().map(|(_, s)| s).collect();
        for s in seqs {
            st.free_sequence(s);
        }
        // The disk threads are joined: give the file's lock up for the next cache.
        if let Some(d) = &st.disk {
            d.file.release();
        }
        st.closed = true;
        self.notifier.signal();
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    /// Panics if any bookkeeping invariant is broken (tests).
    pub fn check_invariants(&self) {
        self.state.lock().check_invariants(&self.ctx);
    }
}
