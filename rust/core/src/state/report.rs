//! What the state reports: snapshots of gauges and counters, notifications for the event
//! loop, the event queues, and read-only views (block tables, a sequence's blocks).
//!
//! Everything here reads; the only writes are the drains of queues the caller consumes and
//! the iteration mark of `iteration_stats`. Cost: a snapshot is O(1) (the swapped and
//! in-flight disk write counts are kept as they change); the rest is O(what is returned).

use crate::error::{Error, Result};
use crate::events::KvEvent;
use crate::pressure::PressureEvent;
use crate::residency::EvictionEvent;
use crate::sequence::Phase;
use crate::stats::{Counters, Snapshot, TierStats};
use crate::types::{BlockId, RequestId};
use crate::waiters::Ticket;

use super::{Ctx, State};

impl State {
    fn snapshot(&self, ctx: &Ctx, counters: &Counters) -> Snapshot {
        let bpb = ctx.bytes_per_block();
        let tier = |p: &crate::pool::BlockPool| {
            TierStats::new(
                p.num_blocks(),
                p.num_free_blocks(),
                p.num_evictable_blocks(),
                bpb,
            )
        };
        Snapshot {
            device: tier(&self.pool),
            host: self
                .host
                .as_ref()
                .map_or_else(TierStats::default, |h| tier(&h.pool)),
            disk: self
                .disk
                .as_ref()
                .map_or_else(TierStats::default, |d| tier(&d.pool)),
            inflight_disk_ops: self
                .disk
                .as_ref()
                .map_or(0, crate::tier::DiskTier::num_pending),
            block_size: ctx.config.block_size,
            num_sequences: self.seqs.len(),
            num_swapped: self.num_host_seqs,
            num_waiting: self.waiters.num_pending(),
            pressure_level: self.level() as u8,
            callback_errors: self.callback_errors,
            counters: *counters,
        }
    }

    /// Gauges now and cumulative counters since start.
    pub fn stats(&mut self, ctx: &Ctx) -> Snapshot {
        self.sync_dropped_counts();
        self.snapshot(ctx, &self.counters)
    }

    /// Gauges now and counters since the previous call (which this call resets).
    pub fn iteration_stats(&mut self, ctx: &Ctx) -> Snapshot {
        self.sync_dropped_counts();
        let delta = self.counters.since(&self.iter_mark);
        self.iter_mark = self.counters;
        self.snapshot(ctx, &delta)
    }

    /// Pressure transitions since the last drain (the finished tickets stay queued).
    pub fn drain_pressure(&mut self) -> Vec<PressureEvent> {
        std::mem::take(&mut self.pressure_events)
    }

    /// Whether a pressure transition waits to be drained.
    pub fn has_pressure_events(&self) -> bool {
        !self.pressure_events.is_empty()
    }

    /// Finished tickets and pressure transitions since the last call.
    pub fn drain_notifications(&mut self) -> (Vec<Ticket>, Vec<PressureEvent>) {
        (
            std::mem::take(&mut self.waiters.completed),
            std::mem::take(&mut self.pressure_events),
        )
    }

    /// Pressure transitions are queued only while someone listens.
    pub fn set_subscribed(&mut self, on: bool) {
        self.subscribed = on;
    }

    /// A pressure callback raised (counted in the stats).
    pub fn record_callback_error(&mut self) {
        self.callback_errors += 1;
    }

    pub fn drain_events(&mut self) -> Vec<KvEvent> {
        self.events.drain()
    }

    pub fn drain_eviction_events(&mut self) -> Vec<EvictionEvent> {
        self.residency.drain()
    }

    /// Whether a disk write handed to the workers has not finished yet.
    pub fn disk_busy(&self) -> bool {
        self.disk.as_ref().is_some_and(|d| d.num_pending() > 0)
    }

    /// The disk tier's file, when there is one.
    pub fn disk_file(&self) -> Option<&std::sync::Arc<crate::storage::disk::DiskFile>> {
        self.disk.as_ref().map(|d| &d.file)
    }

    /// The blocks of a resident sequence (`what` names the call, for the error).
    pub fn resident_blocks(&self, rid: &RequestId, what: &str) -> Result<&[BlockId]> {
        Ok(&self.resident(rid, what)?.blocks)
    }

    /// Row-major `[rids.len(), max_blocks]` block ids padded with `pad`, and the column count.
    pub fn block_table(&self, rids: &[RequestId], pad: i32) -> Result<(Vec<i32>, usize)> {
        if self.pool.num_blocks() > i32::MAX as usize + 1 {
            return Err(Error::InvalidArgument(format!(
                "block ids up to {} do not fit int32",
                self.pool.num_blocks() - 1
            )));
        }
        let rows = rids
            .iter()
            .map(|r| {
                let s = self.seq(r)?;
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
}
