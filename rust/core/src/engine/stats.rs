//! What the engine reports: tickets and pressure transitions for the event loop, stats
//! snapshots (cumulative and per iteration) and the KV / eviction event queues.

use crate::error::Result;
use crate::events::KvEvent;
use crate::pressure::{Level, PressureEvent};
use crate::residency::EvictionEvent;
use crate::state::Gauges;
use crate::stats::Snapshot;
use crate::sync::atomic::Ordering;
use crate::waiters::Ticket;

use super::EngineCore;

impl EngineCore {
    /// Finished tickets and pressure transitions since the last call; clears the eventfd.
    pub fn drain_notifications(&self) -> (Vec<Ticket>, Vec<PressureEvent>) {
        self.notifier.clear();
        let mut st = self.state.lock();
        self.pressure_pending.store(false, Ordering::Release);
        st.drain_notifications()
    }

    /// Failures the engine got over since the last drain (see `incidents`), and how many
    /// did not fit its bounded queue.
    pub fn drain_incidents(&self) -> (Vec<crate::incidents::Incident>, u64) {
        self.state.lock().drain_incidents()
    }

    /// Pressure transitions since the last drain, for the caller to deliver now (the
    /// finished tickets and the eventfd are left to the event loop).
    pub fn drain_pressure(&self) -> Vec<PressureEvent> {
        let mut st = self.state.lock();
        self.pressure_pending.store(false, Ordering::Release);
        st.drain_pressure()
    }

    /// Whether a pressure transition waits to be drained (no lock: one atomic load).
    pub fn pressure_pending(&self) -> bool {
        self.pressure_pending.load(Ordering::Acquire)
    }

    /// Device-tier blocks and waiting calls, in O(1) (no snapshot).
    pub fn gauges(&self) -> Result<Gauges> {
        Ok(self.lock()?.gauges())
    }

    pub fn set_subscribed(&self, on: bool) {
        self.state.lock().set_subscribed(on);
    }

    pub fn record_callback_error(&self) {
        self.state.lock().record_callback_error();
    }

    pub fn pressure_level(&self) -> Result<Level> {
        Ok(self.lock()?.level())
    }

    /// Gauges now and cumulative counters since start.
    pub fn stats(&self) -> Result<Snapshot> {
        Ok(self.lock()?.stats(&self.ctx))
    }

    /// Gauges now and counters since the previous call (which this call resets).
    pub fn iteration_stats(&self) -> Result<Snapshot> {
        Ok(self.lock()?.iteration_stats(&self.ctx))
    }

    pub fn drain_events(&self) -> Result<Vec<KvEvent>> {
        Ok(self.lock()?.drain_events())
    }

    pub fn drain_eviction_events(&self) -> Result<Vec<EvictionEvent>> {
        Ok(self.lock()?.drain_eviction_events())
    }
}
