//! Moving blocks between tiers: offload on eviction, onboard on prefix hits, disk spill and
//! read-back, and swaps.
//!
//! These are the `State` operations that copy bytes across tiers. Each keeps the bookkeeping
//! rule of `state`: check and plan first, then commit; the copies it makes are complete
//! (events waited on a GPU) before the blocks they touch can be reused.

use crate::error::{Error, Result};
use crate::sequence::Phase;
use crate::storage::disk::ReadError;
use crate::storage::Memory;
use crate::transfer::Runs;
use crate::types::{BlockHash, BlockId, RequestId, Tier};
use crate::waiters::Ticket;

use super::alloc::AllocPlan;
use super::effects::After;
use super::{short, Ctx, DiskRead, DiskReadResult, StagedReads, State};

/// A swap's copies, planned under the lock and executed with or without it (the blocks
/// they fill are held by the sequence's moving `Phase`).
pub struct Swap {
    pub runs: Runs,
    pub src: Memory,
    pub dst: Memory,
}

impl State {
    /// Records copying cached device block `b` into a host block indexed under the same hash
    /// (an offload: it runs under the lock, see `Effects::copy_runs`).
    pub(super) fn offload(&mut self, ctx: &Ctx, b: BlockId) -> bool {
        let (Some(hash), Some(parent)) = (self.index.hash_of(b), self.index.parent_of(b)) else {
            return false;
        };
        if self
            .host
            .as_ref()
            .is_none_or(|h| h.index.get(hash).is_some())
        {
            return false;
        }
        let Some(hb) = self.take_host_block() else {
            return false;
        };
        let host = self.host.as_mut().expect("checked above");
        let mut runs = Runs::default();
        ctx.to_host(b, host.offset(hb), &mut runs);
        self.fx.copy_runs(&ctx.memory, &host.slab, &runs, true);
        // Indexed at once: the copy runs, in order, before the lock is released.
        let tokens = self.index.tokens_of(b).to_vec();
        let first = self.index.is_first(b);
        if host.cache_block(hb, hash, parent, first, &tokens) {
            self.events
                .stored(hash, (!first).then_some(parent), &tokens, Tier::Host);
        }
        let bpb = self.bytes_per_block;
        self.counters.offload_blocks += 1;
        self.counters.offload_bytes += bpb;
        self.counters.d2h_blocks_copied += 1;
        true
    }

    /// Applies after-actions once their memory operations ran (`ran`), or gives back what
    /// they hold if those never run (a cancelled grant, a failed fill).
    pub(super) fn settle_after(&mut self, after: Vec<After>, ran: bool) {
        let bpb = self.bytes_per_block;
        for a in after {
            match a {
                After::Onboarded { host, disk } => {
                    if let Some(h) = self.host.as_mut() {
                        // Leaf first, as a sequence releases: the chain's root stays the
                        // most recent, so the tier keeps its rule (leaves first).
                        for &hb in host.iter().rev() {
                            h.pool.release(hb);
                        }
                    }
                    if ran {
                        let n = (host.len() + disk) as u64;
                        let c = &mut self.counters;
                        c.onboard_blocks += n;
                        c.onboard_bytes += n * bpb;
                        c.h2d_blocks_copied += n;
                        c.disk_blocks_read += disk as u64;
                    }
                }
                After::PartialCopied { src } => {
                    self.release_block(src);
                    if ran {
                        self.counters.intra_device_copy_blocks += 1;
                        self.counters.intra_device_copy_bytes += bpb;
                    }
                }
            }
        }
        self.events.end_op();
    }

    /// Takes a host block (see `HostTier::take_block`); an evicted cached host block is
    /// spilled to the disk tier first: its bytes are staged here and written by a worker.
    pub(super) fn take_host_block(&mut self) -> Option<BlockId> {
        let host = self.host.as_mut()?;
        let (b, spilled) = host.take_block(&mut self.events)?;
        if let Some(sp) = &spilled {
            self.stage_evicted_host(b, sp);
        }
        let host = self.host.as_mut().expect("checked above");
        if let (Some(sp), Some(disk)) = (spilled, self.disk.as_mut()) {
            if let Some(slot) =
                disk.reserve(sp.hash, sp.parent, sp.first, &sp.tokens, &mut self.events)
            {
                // Read when the effects run, after any copy into `b` recorded before.
                let (off, len) = (host.offset(b), host.bytes_per_block);
                self.fx.spill(&host.slab, off, len, slot, sp.hash);
            }
        }
        Some(b)
    }

    /// `flush`: None when every disk and remote write issued so far has landed (or there is
    /// no write-behind tier), else a ticket answered once they have (`Flushed`).
    pub fn flush(&mut self) -> Option<crate::waiters::Ticket> {
        let before = self.write_marks(
            super::super::tier::DiskTier::next_write,
            super::super::remote::RemoteTier::next_write,
        );
        let landed = self.landed_marks();
        (landed.disk < before.disk || landed.remote < before.remote)
            .then(|| self.waiters.push_flush(before))
    }

    /// One number per write-behind tier (1 without the tier: nothing to wait for).
    fn write_marks(
        &self,
        disk: impl Fn(&crate::tier::DiskTier) -> u64,
        remote: impl Fn(&crate::remote::RemoteTier) -> u64,
    ) -> crate::waiters::FlushMark {
        crate::waiters::FlushMark {
            disk: self.disk.as_ref().map_or(1, disk),
            remote: self.remote.as_ref().map_or(1, remote),
        }
    }

    /// Every write below these numbers has landed, per tier.
    fn landed_marks(&self) -> crate::waiters::FlushMark {
        self.write_marks(
            super::super::tier::DiskTier::landed_before,
            super::super::remote::RemoteTier::landed_before,
        )
    }

    /// Answers the flushes whose writes have all landed.
    pub(super) fn serve_flushes(&mut self) {
        let landed = self.landed_marks();
        if self.waiters.serve_flushes(landed) {
            self.fx.signal = true;
        }
    }

    /// Tickets in any state (tests).
    pub fn num_tickets(&self) -> usize {
        self.waiters.num_tickets()
    }

    /// Hands a flush's answer to its waiter (the ticket is consumed).
    pub fn take_flush(&mut self, t: crate::waiters::Ticket) -> Result<()> {
        use crate::waiters::TicketState;
        match self.waiters.remove(t) {
            Some(TicketState::Flushed) => Ok(()),
            Some(TicketState::Failed(e)) => Err(e),
            Some(other) => {
                self.waiters.restore(t, other);
                Err(Error::InvalidState(format!(
                    "ticket {t} is not an answered flush"
                )))
            }
            None => Err(Error::InvalidState(format!(
                "ticket {t} is unknown or already taken"
            ))),
        }
    }

    /// A disk worker finished writing a spilled block.
    pub fn finish_disk_write(&mut self, slot: BlockId, hash: BlockHash, ok: bool) {
        let Some(disk) = self.disk.as_mut() else {
            return;
        };
        disk.finish_write(slot, hash, ok, &mut self.events);
        self.serve_flushes();
        self.events.end_op();
        if ok {
            self.counters.disk_blocks_written += 1;
        } else {
            self.counters.disk_write_errors += 1;
            self.incident(
                "disk_write_error",
                format!(
                    "disk tier: the write of slot {} failed; the block is not kept on disk",
                    slot.0
                ),
            );
        }
    }

    /// The planned disk hits' bytes, in order: taken from `staged` (read ahead by the
    /// reader thread while the call waited) or read here (positioned reads). Checksums are
    /// verified either way. The chain stops at the first block that fails: a corrupt block
    /// is a miss, dropped from the disk index and counted, never returned as data.
    pub(super) fn read_disk_hits(
        &mut self,
        plan: &mut AllocPlan,
        staged: &mut StagedReads,
    ) -> Vec<Vec<u8>> {
        let Some(disk) = self.disk.as_mut() else {
            return vec![];
        };
        let first = plan.hits.len() + plan.onboard.len();
        let mut out = Vec::with_capacity(plan.from_disk.len());
        for (i, &slot) in plan.from_disk.iter().enumerate() {
            let hash = plan.hashes[first + i];
            let read = staged.remove(&hash).unwrap_or_else(|| {
                let mut buf = vec![0u8; disk.file.slot_bytes()];
                disk.file.read_block(slot.idx(), &mut buf).map(|()| buf)
            });
            match read {
                Ok(buf) => out.push(buf),
                Err(e) => {
                    let (kind, what) = if matches!(e, ReadError::Corrupt { .. }) {
                        self.counters.disk_checksum_failures += 1;
                        ("disk_checksum_failure", "failed its checksum")
                    } else {
                        self.counters.disk_read_errors += 1;
                        ("disk_read_error", "could not be read")
                    };
                    let message = format!(
                        "disk tier: slot {} {what} ({e}); it is a miss, recomputed, and \
                         dropped from the disk tier",
                        slot.0
                    );
                    if disk.index.hash_of(slot) == Some(hash) {
                        disk.drop_corrupt(slot, &mut self.events);
                    }
                    plan.from_disk.truncate(i);
                    plan.partial = None; // it was planned after the lost blocks
                    self.incident(kind, message);
                    break;
                }
            }
        }
        out
    }

    /// The disk hits an allocation of `tokens` would read now, as (hash, slot); empty
    /// without a disk tier (and then nothing is hashed).
    pub fn planned_disk_reads(
        &self,
        ctx: &Ctx,
        tokens: &[u32],
        root: BlockHash,
    ) -> Vec<(BlockHash, BlockId)> {
        if self.disk.is_none() || tokens.is_empty() {
            return vec![];
        }
        let plan = self.plan_allocate(ctx, tokens, root);
        let first = plan.hits.len() + plan.onboard.len();
        plan.from_disk
            .iter()
            .enumerate()
            .map(|(i, &slot)| (plan.hashes[first + i], slot))
            .collect()
    }

    /// Starts reading ahead the disk blocks a waiting allocation (`ticket`) will need: the
    /// slots are pinned (never evicted or rewritten meanwhile) and the read is handed to the
    /// reader thread after the call; the ticket is not served before the read finished.
    pub fn start_disk_read(&mut self, ticket: Ticket, reads: Vec<(BlockHash, BlockId)>) {
        let disk = self.disk.as_mut().expect("disk reads imply a disk tier");
        for &(_, slot) in &reads {
            disk.pool.acquire(slot);
        }
        self.loading.insert(ticket);
        self.fx.disk_reads.push(DiskRead {
            ticket,
            file: disk.file.clone(),
            reads,
        });
    }

    /// The reader finished a read-ahead: unpin its slots and stage its results for the ticket
    /// (or drop them if the ticket is gone).
    pub fn finish_disk_read(
        &mut self,
        ticket: Ticket,
        results: Vec<(BlockHash, BlockId, DiskReadResult)>,
    ) {
        let disk = self.disk.as_mut().expect("disk reads imply a disk tier");
        let mut staged = StagedReads::default();
        // Leaf first (the reads come in chain order), as a sequence releases its blocks:
        // the chain's first slot stays the most recent, so the tier keeps leaves first.
        for (hash, slot, result) in results.into_iter().rev() {
            if disk.index.hash_of(slot).is_none() {
                disk.pool.unregister(slot); // dropped from the index meanwhile (reset)
            }
            disk.pool.release(slot);
            staged.insert(hash, result);
        }
        if self.loading.remove(&ticket) {
            self.staged.insert(ticket, staged);
        }
        self.fx.signal = true;
    }

    /// Records copying cached host blocks into fresh device blocks (a prefix hit in the host
    /// tier). The host blocks stay pinned until the copies ran (`After::Onboarded`).
    pub(super) fn onboard(&mut self, ctx: &Ctx, from: &[BlockId], to: &[BlockId]) {
        let host = self.host.as_mut().expect("onboard implies a host tier");
        let mut runs = Runs::default();
        for (&hb, &db) in from.iter().zip(to) {
            ctx.from_host(host.offset(hb), db, &mut runs);
        }
        self.fx.copy_runs(&host.slab, &ctx.memory, &runs, false);
    }

    // ----- swap -------------------------------------------------------------------------

    /// Starts moving a resident sequence to the host tier: takes host blocks and returns
    /// the copies to make (device -> host). The sequence is `swapping` until
    /// `finish_swap_out`; nothing changes if this fails.
    pub fn begin_swap_out(&mut self, ctx: &Ctx, rid: &RequestId) -> Result<Swap> {
        let need = self.resident(rid, "swap out")?.blocks.len();
        self.check_no_open_ticket(rid, "swap out")?;
        let Some(host) = self.host.as_mut() else {
            return Err(Error::InvalidState(
                "there is no host tier (host_blocks=0)".into(),
            ));
        };
        if need > host.pool.num_blocks() {
            return Err(Error::OutOfBlocks {
                needed: need,
                available: host.pool.num_blocks(),
                never_fits: true,
            });
        }
        if need > host.pool.num_free_blocks() {
            return Err(short(need, host.pool.num_free_blocks()));
        }
        let to: Vec<BlockId> = (0..need)
            .map(|_| self.take_host_block().expect("availability was checked"))
            .collect();
        let host = self.host.as_ref().expect("checked above");
        let s = self.seqs.get_mut(rid).expect("checked above");
        let mut runs = Runs::default();
        for (&db, &hb) in s.blocks.iter().zip(&to) {
            ctx.to_host(db, host.offset(hb), &mut runs);
        }
        s.phase = Phase::SwappingOut { to };
        self.events.end_op();
        Ok(Swap {
            runs,
            src: ctx.memory.clone(),
            dst: host.slab.clone(),
        })
    }

    /// Starts moving a swapped-out sequence back: takes device blocks (which may evict and
    /// offload cached ones) and returns the copies to make (host -> device).
    pub fn begin_swap_in(&mut self, ctx: &Ctx, rid: &RequestId) -> Result<Swap> {
        let s = self.seq(rid)?;
        match s.phase {
            Phase::Swapped => {}
            Phase::SwappingOut { .. } | Phase::SwappingIn { .. } => {
                return Err(Error::InvalidState(format!(
                    "cannot swap in request {rid}: a swap is in progress"
                )))
            }
            Phase::Resident => {
                return Err(Error::InvalidState(format!(
                    "cannot swap in request {rid}: it is resident"
                )))
            }
        }
        let need = s.blocks.len();
        if need > self.pool.num_blocks() {
            return Err(Error::OutOfBlocks {
                needed: need,
                available: self.pool.num_blocks(),
                never_fits: true,
            });
        }
        if need > self.pool.num_free_blocks() {
            return Err(short(need, self.pool.num_free_blocks()));
        }
        let now = ctx.clock.now();
        let mut to = Vec::new();
        self.alloc_blocks(ctx, need, now, &mut to);
        let host = self
            .host
            .as_ref()
            .expect("a swapped sequence implies a host tier");
        let s = self.seqs.get_mut(rid).expect("checked above");
        let mut runs = Runs::default();
        for (&hb, &db) in s.blocks.iter().zip(&to) {
            ctx.from_host(host.offset(hb), db, &mut runs);
        }
        s.phase = Phase::SwappingIn { to };
        self.events.end_op();
        Ok(Swap {
            runs,
            src: host.slab.clone(),
            dst: ctx.memory.clone(),
        })
    }

    /// The ticket a swap copying on the worker finishes through.
    pub fn push_moving(&mut self, rid: &RequestId) -> Ticket {
        self.waiters.push_moving(rid.clone())
    }

    /// The worker's swap copy ended: its ticket is answered (`settled`).
    pub fn finish_moving(&mut self, t: Ticket, settled: Result<()>) {
        self.waiters.finish_moving(t, settled);
        self.fx.signal = true;
    }

    /// Ends the swap of `rid` once its copy finished (`done`, in `ns`) or failed. Done: the sequence
    /// takes the blocks the copy filled and the ones it left go back. Failed: it keeps its
    /// blocks (they were only read) and the ones the swap took go back. NOTE: blocks swapped
    /// in are not registered in the device prefix cache again; the copies registered before
    /// the swap-out stay cached (on the device while not evicted, then in the host tier).
    pub fn end_swap(&mut self, rid: &RequestId, out: bool, done: bool, ns: u64) {
        let next = if out == done {
            Phase::Swapped
        } else {
            Phase::Resident
        };
        let s = self
            .seqs
            .get_mut(rid)
            .expect("a swapping sequence stays live");
        let (before, after) = (s.phase.tier(), next.tier());
        let to = match (std::mem::replace(&mut s.phase, next), out) {
            (Phase::SwappingOut { to }, true) | (Phase::SwappingIn { to }, false) => to,
            (other, _) => unreachable!("request {rid} ends a swap it is not in ({other:?})"),
        };
        let give_back = if done {
            std::mem::replace(&mut s.blocks, to)
        } else {
            to
        };
        match (before, after) {
            (Tier::Device, Tier::Host) => self.num_host_seqs += 1,
            (Tier::Host, Tier::Device) => self.num_host_seqs -= 1,
            _ => {}
        }
        let n = give_back.len() as u64;
        // The blocks left behind are on the source tier, the ones taken on the target tier.
        let tier = if out == done {
            Tier::Device
        } else {
            Tier::Host
        };
        self.release_in(tier, give_back);
        self.events.end_op();
        match (done, out) {
            (true, true) => {
                let c = &mut self.counters;
                c.d2h_blocks_copied += n;
                c.swap_out_count += 1;
                c.d2h_transfers += 1;
                c.d2h_transfer_ns += ns;
            }
            (true, false) => {
                let c = &mut self.counters;
                c.h2d_blocks_copied += n;
                c.swap_in_count += 1;
                c.h2d_transfers += 1;
                c.h2d_transfer_ns += ns;
            }
            (false, _) => {}
        }
    }
}
