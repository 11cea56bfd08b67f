//! The remote tier's calls: what a lookup asks the store for, importing what it found, and
//! the write queue the remote writer drains (`ferrumkv.remote` runs the network calls, on
//! its own threads, never under this lock).
//!
//! The writer blocks in `take_remote_writes` on a condition variable of the engine lock:
//! `commit` wakes it when a call queued writes, `close` when the engine closes. Each batch
//! it takes is in flight until `finish_remote_writes`, so `flush` waits for it. A stopping
//! writer (`wake_remote_writer`) drains what is queued without waiting for more.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::prefix::Salt;
use crate::remote::Write;
use crate::state::Imported;
use crate::sync::atomic::Ordering;

use super::EngineCore;

impl EngineCore {
    /// The index of the first prompt block not cached locally, and the store keys of it and
    /// the full blocks after it (empty without a remote tier).
    pub fn remote_plan(&self, tokens: &[u32], salt: Option<&Salt>) -> Result<(usize, Vec<String>)> {
        let root = self.root_hash(salt);
        Ok(self.lock()?.remote_plan(&self.ctx, tokens, root))
    }

    /// Imports the values a lookup fetched for blocks `start..` (see `State::import_remote`).
    #[allow(clippy::too_many_arguments)]
    pub fn import_remote(
        &self,
        tokens: &[u32],
        salt: Option<&Salt>,
        start: usize,
        values: &[Option<&[u8]>],
        looked_up: usize,
        elapsed: Duration,
    ) -> Result<Imported> {
        let root = self.root_hash(salt);
        let ns = elapsed.as_nanos() as u64;
        self.mutate(false, |st, ctx| {
            Ok(st.import_remote(ctx, tokens, root, start, values, looked_up, ns))
        })
    }

    /// Counts a lookup whose remote calls failed (`errors` of them; its blocks are misses).
    pub fn remote_lookup_failed(&self, errors: u64, missed: u64, elapsed: Duration) -> Result<()> {
        let ns = elapsed.as_nanos() as u64;
        self.mutate(false, |st, _| {
            st.remote_lookup_failed(errors, missed, ns);
            Ok(())
        })
    }

    /// Up to `max` queued writes, waiting at most `timeout` for one; empty when none came.
    /// `Closed` once the engine closed (and nothing is left queued).
    pub fn take_remote_writes(&self, max: usize, timeout: Duration) -> Result<Vec<Write>> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        loop {
            let writes = st.take_remote_writes(max.max(1));
            if !writes.is_empty() {
                return Ok(writes);
            }
            if st.is_closed() {
                return Err(Error::Closed);
            }
            let now = Instant::now();
            if now >= deadline || self.remote_stopping.load(Ordering::SeqCst) {
                return Ok(writes);
            }
            // Woken by `commit` (writes queued) or `close`; a spurious wakeup loops.
            let _ = self.remote_ready.wait_for(&mut st, deadline - now);
        }
    }

    /// The writer finished writes `seqs`, of which `stored` landed (see
    /// `State::finish_remote_writes`); answers the flushes that waited for them.
    pub fn finish_remote_writes(
        &self,
        seqs: &[u64],
        stored: &[u64],
        dropped: u64,
        errors: u64,
        elapsed: Duration,
    ) {
        let mut st = self.state.lock();
        st.finish_remote_writes(seqs, stored, dropped, errors, elapsed.as_nanos() as u64);
        let _ = self.commit(st, false);
    }

    /// Makes the writer's waits return at once when nothing is queued (it is stopping: it
    /// drains what is queued, then exits).
    pub fn wake_remote_writer(&self) {
        self.remote_stopping.store(true, Ordering::SeqCst);
        let _guard = self.state.lock(); // a writer between its check and its wait sees it
        self.remote_ready.notify_all();
    }

    /// Remote writes queued and in flight (tests, stats).
    pub fn remote_writes_pending(&self) -> (usize, usize) {
        self.state.lock().remote_pending()
    }
}
