//! Requests waiting for blocks, as tickets, and the lifecycle of a ticket.
//!
//! An `allocate` or `extend` that finds too few blocks (and may wait) is queued as a ticket.
//! Whenever blocks come back, the engine serves the queues in order: waiting `extend`s of
//! running sequences first (a decode step must never wait behind a prompt, or the
//! sequences that would free blocks could never finish), then waiting `allocate`s, first come
//! first served (the head blocks the rest, and a new call that needs blocks never overtakes a
//! waiting one of its class or a higher class).
//!
//! Lifecycle of a ticket (`TicketState`):
//! - `Pending`: queued. Cancel: it leaves its queue, nothing else changes.
//! - `Granted`: served. The grant *reserves*: it holds the blocks the call will use (a new
//!   prompt's blocks already filled from the cache tiers), private to the ticket: they are in
//!   no sequence and no prefix index, so no other request can see or share them. Cancel:
//!   exactly what the ticket holds is released, nothing else. Take: the operation is applied
//!   and published (blocks joined to the sequence, full blocks registered, counters counted).
//! - `Failed`: the waiter gets the error (its request was deallocated, the engine closed).
//! - `Moving` / `Moved`: a swap whose copy runs on the worker, and its completion.
//! - `Flushing` / `Flushed`: a `flush` waiting for the disk and remote writes issued before it (queued
//!   in `flushes` by the write number it waits for, so the earliest is answered first), and
//!   its answer. Cancel: it leaves the queue; it holds nothing.
//!
//! A taken or cancelled ticket is removed. At most one ticket of a request is open (pending or
//! granted) at a time, so a ticket's undo can never touch a later call of the same request,
//! and a reused request id never reaches an old ticket. Every finished ticket is listed in
//! `completed` until the event loop drains it.
//! Cost: push, grant and take are O(1); unqueue is O(queue length).

use std::collections::{HashMap, HashSet, VecDeque};

use crate::error::Error;
use crate::sequence::{AllocOpts, Append};
use crate::state::Admission;
use crate::types::{BlockHash, BlockId, IdMap, RequestId};

pub type Ticket = u64;

/// Write numbers of the write-behind tiers (disk, remote), each counted from 1: a flush
/// waits until every write below both has landed. Later flushes have marks at least as high
/// in both, so flushes are answered in issue order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushMark {
    pub disk: u64,
    pub remote: u64,
}

/// What a call that may wait returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ready(crate::sequence::SeqView),
    /// Queued: the ticket finishes later (see `drain_notifications`).
    Waiting(Ticket),
}

#[derive(Debug, Clone)]
pub enum WaitOp {
    Allocate {
        rid: RequestId,
        tokens: Vec<u32>,
        root: BlockHash,
        opts: AllocOpts,
    },
    Extend {
        rid: RequestId,
        append: Append,
    },
}

impl WaitOp {
    pub fn rid(&self) -> &RequestId {
        match self {
            WaitOp::Allocate { rid, .. } | WaitOp::Extend { rid, .. } => rid,
        }
    }
}

/// What a served ticket holds until its waiter takes or cancels it.
#[derive(Debug)]
pub enum Grant {
    /// A new sequence's blocks (for `tokens`), reserved and filled, not yet published.
    Allocate {
        adm: Box<Admission>,
        tokens: Vec<u32>,
    },
    /// Blocks reserved for an extend of a resident sequence (applied when taken).
    Extend {
        rid: RequestId,
        append: Append,
        reserved: Vec<BlockId>,
    },
}

impl Grant {
    pub fn rid(&self) -> &RequestId {
        match self {
            Grant::Allocate { adm, .. } => &adm.rid,
            Grant::Extend { rid, .. } => rid,
        }
    }
}

#[derive(Debug)]
pub enum TicketState {
    Pending {
        op: WaitOp,
        needed: usize,
    },
    Granted(Grant),
    Failed(Error),
    /// A swap copy is running on the worker; `abandoned` once its waiter gave up.
    Moving {
        rid: RequestId,
        abandoned: bool,
    },
    /// A swap finished (the move happened and stays).
    Moved {
        rid: RequestId,
    },
    /// A flush waiting until every disk and remote write numbered below `before` has landed.
    Flushing {
        before: FlushMark,
    },
    /// Those writes have landed.
    Flushed,
}

#[derive(Debug, Default)]
pub struct Waiters {
    next: Ticket,
    /// Pending extends, oldest first (served first).
    pub extends: VecDeque<Ticket>,
    /// Pending allocates, oldest first.
    pub allocates: VecDeque<Ticket>,
    tickets: HashMap<Ticket, TicketState>,
    /// The open (pending or granted) ticket of each request that has one.
    open: IdMap<Ticket>,
    /// Finished tickets not yet reported to the event loop.
    pub completed: Vec<Ticket>,
    /// `Flushing` tickets with the write number each waits for, in issue order (so the
    /// numbers never decrease).
    flushes: VecDeque<(Ticket, FlushMark)>,
}

impl Waiters {
    fn next_ticket(&mut self) -> Ticket {
        self.next += 1;
        self.next
    }

    /// Queues a call that waits for `needed` blocks. The caller checked that `op`'s request
    /// has no open ticket.
    pub fn push(&mut self, op: WaitOp, needed: usize) -> Ticket {
        let t = self.next_ticket();
        debug_assert!(
            !self.open.contains_key(op.rid()),
            "one open ticket a request"
        );
        self.open.insert(op.rid().clone(), t);
        match &op {
            WaitOp::Allocate { .. } => self.allocates.push_back(t),
            WaitOp::Extend { .. } => self.extends.push_back(t),
        }
        self.tickets.insert(t, TicketState::Pending { op, needed });
        t
    }

    /// A ticket for a swap whose copy runs on the worker thread.
    pub fn push_moving(&mut self, rid: RequestId) -> Ticket {
        let t = self.next_ticket();
        self.tickets.insert(
            t,
            TicketState::Moving {
                rid,
                abandoned: false,
            },
        );
        t
    }

    /// A flush waiting until every write numbered below `before` has landed, per tier.
    pub fn push_flush(&mut self, before: FlushMark) -> Ticket {
        let t = self.next_ticket();
        self.tickets.insert(t, TicketState::Flushing { before });
        self.flushes.push_back((t, before));
        t
    }

    /// Answers the flushes whose writes have all landed (every write below `landed`);
    /// whether any was.
    pub fn serve_flushes(&mut self, landed: FlushMark) -> bool {
        let mut served = false;
        while let Some(&(t, before)) = self.flushes.front() {
            if before.disk > landed.disk || before.remote > landed.remote {
                break;
            }
            self.flushes.pop_front();
            self.finish(t, TicketState::Flushed);
            served = true;
        }
        served
    }

    /// Withdraws a flush whose waiter gave up, answered or not; whether `t` was a flush.
    pub fn cancel_flush(&mut self, t: Ticket) -> bool {
        match self.tickets.get(&t) {
            Some(TicketState::Flushing { .. }) => self.flushes.retain(|&(x, _)| x != t),
            Some(TicketState::Flushed) => {}
            _ => return false,
        }
        self.remove(t);
        true
    }

    /// The worker finished (or failed) the copy of swap ticket `t`.
    pub fn finish_moving(&mut self, t: Ticket, result: Result<(), Error>) {
        match self.tickets.remove(&t) {
            Some(TicketState::Moving {
                abandoned: true, ..
            }) => {}
            Some(TicketState::Moving { rid, .. }) => self.finish(
                t,
                match result {
                    Ok(()) => TicketState::Moved { rid },
                    Err(e) => TicketState::Failed(e),
                },
            ),
            other => unreachable!("finish_moving of ticket {t} in state {other:?}"),
        }
    }

    pub fn get(&self, t: Ticket) -> Option<&TicketState> {
        self.tickets.get(&t)
    }

    /// Removes ticket `t` (taken or cancelled) and returns its state.
    pub fn remove(&mut self, t: Ticket) -> Option<TicketState> {
        let st = self.tickets.remove(&t)?;
        if let TicketState::Granted(g) = &st {
            self.open.remove(g.rid());
        }
        self.completed.retain(|&x| x != t);
        Some(st)
    }

    /// Puts back a ticket that `remove` took but that stays (not yet finished).
    pub fn restore(&mut self, t: Ticket, st: TicketState) {
        if let TicketState::Granted(g) = &st {
            self.open.insert(g.rid().clone(), t);
        }
        self.tickets.insert(t, st);
    }

    /// The open (pending or granted) tickets, oldest first.
    pub fn open_tickets(&self) -> Vec<Ticket> {
        let mut v: Vec<Ticket> = self.open.values().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn num_pending(&self) -> usize {
        self.extends.len() + self.allocates.len()
    }

    /// Number of tickets in any state (tests: nothing is left behind).
    pub fn num_tickets(&self) -> usize {
        self.tickets.len()
    }

    /// Blocks the pending tickets asked for, leaving out `except` (those not waiting for
    /// blocks, e.g. still reading their disk hits).
    pub fn needed_blocks(&self, except: &HashSet<Ticket>) -> usize {
        self.extends
            .iter()
            .chain(&self.allocates)
            .filter(|t| !except.contains(t))
            .map(|t| match self.tickets.get(t) {
                Some(TicketState::Pending { needed, .. }) => *needed,
                _ => 0,
            })
            .sum()
    }

    /// Whether any request has an open ticket (O(1)).
    pub fn has_open(&self) -> bool {
        !self.open.is_empty()
    }

    /// The open (pending or granted, not yet taken) ticket of `rid`.
    pub fn open_ticket(&self, rid: &RequestId) -> Option<Ticket> {
        self.open.get(rid).copied()
    }

    /// The operation of pending ticket `t`.
    pub fn pending_op(&self, t: Ticket) -> Option<&WaitOp> {
        match self.tickets.get(&t) {
            Some(TicketState::Pending { op, .. }) => Some(op),
            _ => None,
        }
    }

    /// Removes a pending ticket from its queue; returns its operation. The ticket stays
    /// unknown until the caller finishes it (`grant` / `fail`) or drops it (a cancel).
    pub fn unqueue(&mut self, t: Ticket) -> Option<WaitOp> {
        let TicketState::Pending { op, .. } = self.tickets.remove(&t)? else {
            unreachable!("unqueue of a finished ticket")
        };
        self.extends.retain(|&x| x != t);
        self.allocates.retain(|&x| x != t);
        self.open.remove(op.rid());
        Some(op)
    }

    /// Marks an unqueued ticket granted (its request's open ticket again, until taken).
    pub fn grant(&mut self, t: Ticket, g: Grant) {
        self.open.insert(g.rid().clone(), t);
        self.finish(t, TicketState::Granted(g));
    }

    /// Marks an unqueued (or removed) ticket failed: its waiter gets `e`.
    pub fn fail(&mut self, t: Ticket, e: Error) {
        self.finish(t, TicketState::Failed(e));
    }

    fn finish(&mut self, t: Ticket, state: TicketState) {
        self.tickets.insert(t, state);
        self.completed.push(t);
    }

    /// Every ticket, for `close` (which fails them all).
    pub fn drain_all(&mut self) -> Vec<(Ticket, TicketState)> {
        self.extends.clear();
        self.allocates.clear();
        self.open.clear();
        self.flushes.clear();
        self.tickets.drain().collect()
    }

    /// Granted tickets' reserved device blocks, and admissions (for the invariant checks).
    pub fn grants(&self) -> impl Iterator<Item = &Grant> {
        self.tickets.values().filter_map(|s| match s {
            TicketState::Granted(g) => Some(g),
            _ => None,
        })
    }
}
