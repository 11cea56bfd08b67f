//! Swaps: moving a whole sequence between the device and host tiers.
//!
//! `begin_swap_*` (state) takes the target blocks and pins the sequence in a moving `Phase`;
//! the copy runs inline when small (`INLINE_COPY_BYTES`), else on the copier thread without
//! the lock, and `SwapDir::settle` records its end (done, or undone on a failed copy).
//! Cost: O(blocks) bookkeeping under the lock; the bytes move outside it when big.

use crate::sync::atomic::Ordering;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::state::{State, Swap};
use crate::storage::{copy_runs, Memory};
use crate::types::RequestId;

use super::{guarded, Engine, EngineCore, Outcome};

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
        st.end_swap(rid, out, copied.is_ok(), ns);
        copied
    }
}

impl Engine {
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
                Ok(Outcome::Ready(
                    st.view(rid).expect("a swapped sequence stays live"),
                ))
            });
        }
        let ticket = self.core.mutate(false, |st, _| Ok(st.push_moving(rid)))?;
        let core = self.core.clone();
        let rid = rid.clone();
        // NOTE: the copy runs without the lock: it touches only blocks the sequence owns
        // while its phase is moving, and no other call may use a moving sequence.
        let job = Box::new(move || {
            let t0 = Instant::now();
            let copied = core.guarded_copy(&src, &dst, &runs);
            let mut st = core.state.lock();
            if st.is_closed() {
                return;
            }
            let settled = dir.settle(&mut st, &rid, t0.elapsed().as_nanos() as u64, copied);
            st.finish_moving(ticket, settled);
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
}

impl EngineCore {
    /// Runs a swap's block copy under `guarded` (the test hooks apply: `pause_copies`,
    /// `inject_copy_faults`).
    pub(super) fn guarded_copy(
        &self,
        src: &Memory,
        dst: &Memory,
        runs: &crate::transfer::Runs,
    ) -> Result<()> {
        while self.copies_paused.load(Ordering::SeqCst) {
            crate::sync::poll_sleep(std::time::Duration::from_micros(200));
        }
        let inject = self
            .copy_faults
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        // A swap waits for its copy (off the lock, on the worker or a thread without the
        // GIL): its end is recorded, timed and settled only once the bytes are in place.
        guarded(inject, || copy_runs(src, dst, runs)?.wait())
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
}
