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
//!
//! Split by the data each part serves: `sequences` (allocation, extension, tickets, gc),
//! `remote` (the shared store's lookups, imports and write queue),
//! `swap` (whole-sequence moves between tiers), `disk` (the disk tier's I/O jobs), `kv` (K/V
//! bytes, block tables, views), `stats` (snapshots, notifications, event queues).

mod disk;
mod kv;
mod remote;
mod sequences;
mod stats;
mod swap;

pub use swap::INLINE_COPY_BYTES;

use crate::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use crate::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use crate::clock::Clock;
use crate::config::{CacheConfig, Device};
use crate::error::{Error, Result};
use crate::layout::KvLayout;
use crate::notify::Notifier;
use crate::prefix::{Hasher, Salt};
use crate::sequence::SeqView;
use crate::state::{Ctx, Fill, State};
use crate::storage::cuda::{CudaDevice, DeviceSlab};
use crate::storage::disk::DiskWorkers;
use crate::storage::Memory;
use crate::transfer::Copier;

pub use crate::waiters::Outcome;

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

    /// Closes the engine: pending waiters fail with `Closed`, copies in flight finish
    /// first (nothing leaks), every later call fails. Memory stays alive while DLPack views
    /// hold it. Idempotent.
    pub fn close(&self) {
        self.core.mark_closing();
        self.core.pause_copies(false);
        self.core.pause_fills(false);
        self.core.pause_disk_writes(false);
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
    /// The remote writer waits here for queued writes (`take_remote_writes`).
    remote_ready: Condvar,
    /// The remote writer is stopping: its waits return at once (`wake_remote_writer`).
    remote_stopping: AtomicBool,
    notifier: Notifier,
    disk_workers: Option<DiskWorkers>,
    /// Swap copies still to fail on purpose (`inject_copy_faults`).
    copy_faults: AtomicU32,
    /// Fills wait before they start while set (`pause_fills`).
    fills_paused: AtomicBool,
    /// The next commit's memory operations fail (`inject_device_fault`).
    device_fault: AtomicBool,
    /// Worker copies wait while set (`pause_copies`).
    copies_paused: AtomicBool,
    /// Disk writes wait before they start while set (`pause_disk_writes`).
    disk_writes_paused: AtomicBool,
    /// Swaps smaller than this copy inline (`set_inline_copy_bytes`).
    inline_copy_bytes: AtomicUsize,
    /// A pressure transition waits to be drained: set by `commit`, cleared by the drains,
    /// both under the lock, so a reader without the lock sees a queued event at once.
    pressure_pending: AtomicBool,
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
        Ok(Err(e @ (Error::CopyFailed(_) | Error::Cuda(_)))) => Err(e),
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
        let disk_workers = match state.lock().disk_file() {
            Some(_) => Some(DiskWorkers::new(DISK_THREADS)?),
            None => None,
        };
        let notifier = Notifier::new()?;
        Ok(Arc::new_cyclic(|me| EngineCore {
            me: me.clone(),
            ctx,
            state,
            remote_ready: Condvar::new(),
            remote_stopping: AtomicBool::new(false),
            notifier,
            disk_workers,
            copy_faults: AtomicU32::new(0),
            device_fault: AtomicBool::new(false),
            fills_paused: AtomicBool::new(false),
            copies_paused: AtomicBool::new(false),
            disk_writes_paused: AtomicBool::new(false),
            inline_copy_bytes: AtomicUsize::new(INLINE_COPY_BYTES),
            pressure_pending: AtomicBool::new(false),
        }))
    }

    /// Holds disk writes on the workers before they start while `on` (tests: writes stay in
    /// flight for as long as a test needs, e.g. to watch `flush` wait). `close` lifts it.
    pub fn pause_disk_writes(&self, on: bool) {
        self.disk_writes_paused.store(on, Ordering::SeqCst);
    }

    /// Holds admissions' fills (run outside the lock) before they start while `on` (tests: a
    /// fill stays in flight while other threads call in). `close` lifts it.
    pub fn pause_fills(&self, on: bool) {
        self.fills_paused.store(on, Ordering::SeqCst);
    }

    /// Makes the memory operations of the next commit (or fill) that has any fail, as a lost device
    /// would (tests: the engine must then stop serving, see `commit`).
    pub fn inject_device_fault(&self) {
        self.device_fault.store(true, Ordering::SeqCst);
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
        // A failed call changes nothing, so it serves nobody either.
        self.commit(st, freed && out.is_ok())?;
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
        if st.has_pressure_events() {
            self.pressure_pending.store(true, Ordering::Release);
        }
        let copied = self.run_copies(&mut st);
        let fx = st.take_effects();
        let remote_queued = st.take_remote_wake();
        drop(st);
        if fx.signal {
            self.notifier.signal();
        }
        if remote_queued {
            self.remote_ready.notify_all();
        }
        copied?;
        self.submit_disk_writes(fx.disk_writes);
        self.submit_disk_reads(fx.disk_reads);
        Ok(())
    }

    /// Runs an admission's fill (see `state::Staged`) without the lock, then publishes the
    /// admission, or gives it back if a copy failed: only this call fails (`CopyFailed`),
    /// since nothing it filled was ever published.
    /// NOTE: safe without the lock because every block the fill touches is unreachable by
    /// other calls until `finish_fill`: its destinations are the admission's own blocks and
    /// the host blocks its offloads took (owned, unindexed), its sources are pinned.
    fn run_fill(&self, fill: Fill) -> Result<SeqView> {
        let Fill { rid, mut fx } = fill;
        while self.fills_paused.load(Ordering::SeqCst) {
            crate::sync::poll_sleep(std::time::Duration::from_micros(200));
        }
        let inject = self.device_fault.swap(false, Ordering::SeqCst);
        let copied = guarded(inject, || fx.run_memory());
        let mut st = self.state.lock();
        if st.is_closed() {
            return Err(Error::Closed);
        }
        let published = st.finish_fill(&self.ctx, &rid, copied);
        self.commit(st, published.is_err())?;
        published
    }

    /// Runs the memory operations recorded so far, in order, under the lock held (`commit`,
    /// and a call that touches bytes after them). A failure stops the engine (see `commit`).
    fn run_copies(&self, st: &mut State) -> Result<()> {
        // A GPU copy enqueued by an earlier call that failed since (they run asynchronously).
        if let Some(dev) = self.ctx.memory.cuda_device() {
            if let Err(e) = dev.poll() {
                st.fail_device(&e);
                st.signal();
                return Err(e);
            }
        }
        let fx = st.effects_mut();
        if fx.is_settled() {
            return Ok(());
        }
        let inject = fx.has_memory_ops() && self.device_fault.swap(false, Ordering::SeqCst);
        let copied = guarded(inject, || fx.run_memory());
        st.settle_effects(copied.is_ok());
        if let Err(e) = &copied {
            st.fail_device(e);
            st.signal();
        }
        copied
    }

    /// Salt -> the root hash its sequences chain from.
    pub fn root_hash(&self, salt: Option<&Salt>) -> crate::types::BlockHash {
        self.ctx.hasher.root_hash(salt)
    }

    /// Refuses new calls from now on (before in-flight copies are drained).
    fn mark_closing(&self) {
        self.state.lock().mark_closing();
    }

    fn close(&self) {
        if self.state.lock().close() {
            self.notifier.signal();
        }
        self.remote_ready.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().is_closed()
    }

    /// Panics if any bookkeeping invariant is broken (tests).
    pub fn check_invariants(&self) {
        self.state.lock().check_invariants(&self.ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_fault_stays_a_gpu_fault() {
        // `guarded` keeps `Cuda` (a device fault after construction) and `CopyFailed`, and
        // turns any other failure of a copy into `CopyFailed`.
        let cuda = guarded(false, || -> Result<()> { Err(Error::Cuda("lost".into())) });
        assert_eq!(cuda, Err(Error::Cuda("lost".into())));
        let io = guarded(false, || -> Result<()> { Err(Error::Io("disk".into())) });
        assert_eq!(io, Err(Error::CopyFailed("disk".into())));
        let panic = guarded(true, || Ok(()));
        assert_eq!(panic, Err(Error::CopyFailed("injected copy fault".into())));
        // What every later call gets once the engine stopped: the same kind of error.
        assert!(matches!(Error::Cuda("lost".into()).again(), Error::Cuda(m) if m.contains("lost")));
        assert!(matches!(
            Error::CopyFailed("x".into()).again(),
            Error::CopyFailed(m) if m.contains("no longer serves")
        ));
    }
}
