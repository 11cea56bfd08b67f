//! Requests waiting for blocks, as tickets.
//!
//! An `allocate` or `extend` that finds too few blocks (and may wait) is queued as a ticket.
//! Whenever blocks come back, the engine serves the queues in order: waiting `extend`s of
//! running sequences first (a decode step must never wait behind a prompt, or the
//! sequences that would free blocks could never finish), then waiting `allocate`s, first come
//! first served (the head blocks the rest). Serving applies the operation at once and marks
//! the ticket `Granted` with the record needed to undo it; the caller then `take`s the
//! result, or `cancel`s it, which undoes a granted operation so nothing it took is kept.
//! Every finished ticket is listed in `completed` until the event loop drains it.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::error::Error;
use crate::sequence::Append;
use crate::types::{BlockHash, RequestId};

pub type Ticket = u64;

#[derive(Debug, Clone)]
pub enum WaitOp {
    Allocate {
        rid: RequestId,
        tokens: Vec<u32>,
        root: BlockHash,
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

/// How to give back a granted `extend`.
#[derive(Debug, Clone)]
pub struct ExtendUndo {
    pub num_tokens: usize,
    pub num_blocks: usize,
    pub num_hashes: usize,
    pub tail: Vec<u32>,
    pub cacheable: bool,
}

#[derive(Debug, Clone)]
pub enum Undo {
    /// A finished swap: the move happened and stays.
    Nothing,
    Allocate,
    Extend(ExtendUndo),
}

#[derive(Debug)]
pub enum TicketState {
    Pending {
        op: WaitOp,
        needed: usize,
    },
    Granted {
        rid: RequestId,
        undo: Undo,
    },
    Failed(Error),
    /// A swap copy is running on the worker; `abandoned` once its waiter gave up.
    InFlight {
        abandoned: bool,
    },
}

#[derive(Debug, Default)]
pub struct Waiters {
    next: Ticket,
    /// Pending extends, oldest first (served first).
    pub extends: VecDeque<Ticket>,
    /// Pending allocates, oldest first.
    pub allocates: VecDeque<Ticket>,
    pub tickets: HashMap<Ticket, TicketState>,
    /// Request ids of pending allocates (taken for duplicate checks).
    pub pending_rids: HashSet<RequestId>,
    /// Finished tickets not yet reported to the event loop.
    pub completed: Vec<Ticket>,
}

impl Waiters {
    pub fn push(&mut self, op: WaitOp, needed: usize) -> Ticket {
        self.next += 1;
        let t = self.next;
        match &op {
            WaitOp::Allocate { rid, .. } => {
                self.pending_rids.insert(rid.clone());
                self.allocates.push_back(t);
            }
            WaitOp::Extend { .. } => self.extends.push_back(t),
        }
        self.tickets.insert(t, TicketState::Pending { op, needed });
        t
    }

    /// A ticket for a swap whose copy runs on the worker thread.
    pub fn push_in_flight(&mut self, _rid: RequestId) -> Ticket {
        self.next += 1;
        self.tickets
            .insert(self.next, TicketState::InFlight { abandoned: false });
        self.next
    }

    /// The worker finished the copy of ticket `t`.
    pub fn finish_in_flight(&mut self, t: Ticket, rid: RequestId) {
        match self.tickets.get(&t) {
            Some(TicketState::InFlight { abandoned: true }) => {
                self.tickets.remove(&t);
            }
            _ => self.finish(
                t,
                TicketState::Granted {
                    rid,
                    undo: Undo::Nothing,
                },
            ),
        }
    }

    pub fn num_pending(&self) -> usize {
        self.extends.len() + self.allocates.len()
    }

    /// Blocks the pending tickets asked for, leaving out `except` (those not waiting for
    /// blocks, e.g. still reading their disk hits).
    pub fn needed_blocks(&self, except: &HashSet<Ticket>) -> usize {
        self.tickets
            .iter()
            .filter(|(t, _)| !except.contains(t))
            .map(|(_, s)| match s {
                TicketState::Pending { needed, .. } => *needed,
                _ => 0,
            })
            .sum()
    }

    /// Whether an extend of `rid` is waiting.
    pub fn has_pending_extend(&self, rid: &RequestId) -> bool {
        self.extends.iter().any(|t| {
            matches!(self.tickets.get(t), Some(TicketState::Pending { op, .. }) if op.rid() == rid)
        })
    }

    /// Whether a ticket of `rid` is still open: waiting, or granted and not yet taken by
    /// its waiter (which may still cancel, undoing the grant).
    pub fn has_open(&self, rid: &RequestId) -> bool {
        self.tickets.values().any(|st| match st {
            TicketState::Pending { op, .. } => op.rid() == rid,
            TicketState::Granted { rid: r, undo } => r == rid && !matches!(undo, Undo::Nothing),
            _ => false,
        })
    }

    /// Removes a pending ticket from its queue; returns its operation.
    pub fn unqueue(&mut self, t: Ticket) -> Option<WaitOp> {
        let TicketState::Pending { op, .. } = self.tickets.remove(&t)? else {
            unreachable!("unqueue of a finished ticket")
        };
        self.extends.retain(|&x| x != t);
        self.allocates.retain(|&x| x != t);
        if let WaitOp::Allocate { rid, .. } = &op {
            self.pending_rids.remove(rid);
        }
        Some(op)
    }

    pub fn finish(&mut self, t: Ticket, state: TicketState) {
        self.tickets.insert(t, state);
        self.completed.push(t);
    }
}
