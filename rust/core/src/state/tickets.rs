//! Tickets of calls that waited for blocks: serving the queues when blocks come back,
//! handing results to waiters, and undoing a grant whose waiter gave up (cancelled or timed
//! out), so nothing a waiter took is kept.

use crate::error::{Error, Result};
use crate::sequence::SeqView;
use crate::types::RequestId;
use crate::waiters::{ExtendUndo, TicketState, Undo, WaitOp};

use super::{Ctx, State};

impl State {
    /// Gives back what a granted `extend` took (the sequence keeps its earlier tokens).
    fn undo_extend(&mut self, rid: &RequestId, u: &ExtendUndo) {
        let Some(mut s) = self.seqs.remove(rid) else {
            return;
        };
        for i in u.num_hashes..s.hashes.len() {
            let b = s.blocks[i];
            if self.index.hash_of(b) == Some(s.hashes[i]) && self.pool.ref_cnt(b) == 1 {
                self.forget_cached(b);
                self.pool.set_cached(b, false);
            }
        }
        for b in s.blocks.drain(u.num_blocks..).rev().collect::<Vec<_>>() {
            self.release_block(b);
        }
        s.hashes.truncate(u.num_hashes);
        s.num_tokens = u.num_tokens;
        s.tail.clone_from(&u.tail);
        s.cacheable = u.cacheable;
        self.events.end_op();
        self.seqs.insert(rid.clone(), s);
    }

    /// Gives back a granted `allocate`: blocks it registered are uncached, not kept. Its
    /// first `num_cached_tokens / block_size` blocks were full hits (a partial copy is never
    /// a whole block), so every later block was filled, and registered, by this call.
    fn undo_allocate(&mut self, ctx: &Ctx, rid: &RequestId) {
        let Some(s) = self.seqs.remove(rid) else {
            return;
        };
        for (i, &b) in s.blocks.iter().enumerate() {
            let registered_here = s
                .hashes
                .get(i)
                .is_some_and(|&h| self.index.get(h) == Some(b));
            if registered_here
                && self.pool.ref_cnt(b) == 1
                && i >= s.num_cached_tokens / ctx.config.block_size
            {
                self.forget_cached(b);
                self.pool.set_cached(b, false);
            }
        }
        self.events.end_op();
        self.free_sequence(s);
    }

    /// Fails pending tickets of `rid` and drops granted ones (their sequence is gone).
    pub(super) fn fail_tickets_of(&mut self, rid: &RequestId, why: &str) {
        let pending: Vec<_> = self
            .waiters
            .extends
            .iter()
            .copied()
            .filter(|t| matches!(self.waiters.tickets.get(t), Some(TicketState::Pending { op, .. }) if op.rid() == rid))
            .collect();
        for t in pending {
            self.waiters.unqueue(t);
            self.waiters.finish(
                t,
                TicketState::Failed(Error::InvalidState(format!("request {rid}: {why}"))),
            );
            self.needs_signal = true;
        }
        self.waiters.tickets.retain(|_, st| !matches!(st, TicketState::Granted { rid: r, undo: Undo::Extend(_) } if r == rid));
    }

    /// Serves waiting tickets in order while blocks last (extends first, then allocates).
    pub fn serve_waiters(&mut self, ctx: &Ctx) {
        for allocates in [false, true] {
            loop {
                let queue = if allocates {
                    &self.waiters.allocates
                } else {
                    &self.waiters.extends
                };
                let Some(&t) = queue.front() else { break };
                if self.loading.contains(&t) {
                    break; // its disk read-ahead is still running; nobody overtakes it
                }
                let Some(TicketState::Pending { op, .. }) = self.waiters.tickets.get(&t) else {
                    unreachable!("queued tickets are pending")
                };
                let result = match op.clone() {
                    WaitOp::Allocate { rid, tokens, root } => {
                        let mut staged = self.staged.remove(&t).unwrap_or_default();
                        let r = self.allocate_now(ctx, &rid, &tokens, root, &mut staged);
                        let short = matches!(
                            r,
                            Err(Error::OutOfBlocks {
                                never_fits: false,
                                ..
                            })
                        );
                        if short && !staged.is_empty() {
                            self.staged.insert(t, staged); // still waiting: keep its reads
                        }
                        r.map(|_| (rid, Undo::Allocate))
                    }
                    WaitOp::Extend { rid, append } => self
                        .extend_now(ctx, &rid, &append)
                        .map(|(_, u)| (rid, Undo::Extend(u))),
                };
                let state = match result {
                    Err(Error::OutOfBlocks {
                        never_fits: false, ..
                    }) => break,
                    Ok((rid, undo)) => TicketState::Granted { rid, undo },
                    Err(e) => TicketState::Failed(e),
                };
                self.waiters.unqueue(t);
                self.waiters.finish(t, state);
                self.needs_signal = true;
            }
        }
    }

    /// The result of a finished ticket, handed to its waiter (the ticket is consumed).
    pub fn take_ticket(&mut self, t: crate::waiters::Ticket) -> Result<SeqView> {
        match self.waiters.tickets.remove(&t) {
            Some(TicketState::Granted { rid, .. }) => Ok(SeqView::of(&rid, self.seq(&rid)?)),
            Some(TicketState::Failed(e)) => Err(e),
            Some(pending) => {
                self.waiters.tickets.insert(t, pending);
                Err(Error::InvalidState(format!("ticket {t} is still waiting")))
            }
            None => Err(Error::InvalidState(format!(
                "ticket {t} is unknown or already taken"
            ))),
        }
    }

    /// Withdraws a ticket: a pending one leaves its queue, a granted one is undone.
    pub fn cancel_ticket(&mut self, ctx: &Ctx, t: crate::waiters::Ticket) {
        match self.waiters.tickets.get(&t) {
            Some(TicketState::Pending { .. }) => {
                self.waiters.unqueue(t);
                // A read-ahead still running drops its results when it finds no ticket.
                self.loading.remove(&t);
                self.staged.remove(&t);
            }
            Some(TicketState::Granted { .. }) => {
                let Some(TicketState::Granted { rid, undo }) = self.waiters.tickets.remove(&t)
                else {
                    unreachable!()
                };
                match undo {
                    Undo::Nothing => {}
                    Undo::Allocate => self.undo_allocate(ctx, &rid),
                    Undo::Extend(u) => self.undo_extend(&rid, &u),
                }
            }
            Some(TicketState::Failed(_)) => {
                self.waiters.tickets.remove(&t);
            }
            Some(TicketState::InFlight { .. }) => {
                // The copy finishes anyway (the swap happens); its result is dropped.
                self.waiters
                    .tickets
                    .insert(t, TicketState::InFlight { abandoned: true });
            }
            None => {}
        }
        self.waiters.completed.retain(|&x| x != t);
        self.serve_waiters(ctx);
    }
}
