//! What the engine reports: tickets and pressure transitions for the event loop, stats
//! snapshots (cumulative and per iteration) and the KV / eviction event queues.

use crate::error::Result;
use crate::events::KvEvent;
use crate::pressure::{Level, PressureEvent};
use crate::residency::EvictionEvent;
use crate::state::State;
use crate::stats::{Counters, Snapshot, TierStats};
use crate::types::Tier;
use crate::waiters::Ticket;

use super::EngineCore;

impl EngineCore {
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

    pub fn pressure_level(&self) -> Result<Level> {
        Ok(self.lock()?.level())
    }

    pub(super) fn snapshot(&self, st: &State, counters: Counters) -> Snapshot {
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

    pub fn drain_events(&self) -> Result<Vec<KvEvent>> {
        Ok(self.lock()?.events.drain())
    }

    pub fn drain_eviction_events(&self) -> Result<Vec<EvictionEvent>> {
        Ok(self.lock()?.residency.drain())
    }
}
