//! Tickets of calls that waited for blocks: serving the queues when blocks come back
//! (a grant reserves), handing results to waiters (a take applies and publishes), and
//! withdrawing a ticket whose waiter gave up (a cancel releases exactly what the ticket
//! holds). See `waiters` for the lifecycle.

use crate::error::{Error, Result};
use crate::sequence::SeqView;
use crate::types::RequestId;
use crate::waiters::{Grant, Ticket, TicketState, WaitOp};

use super::{Ctx, Staged, State};

impl State {
    /// Gives back what a grant holds (it was never applied, so nothing else changes).
    pub fn release_grant(&mut self, g: Grant) {
        match g {
            Grant::Allocate { adm, .. } => self.release_admission(*adm),
            Grant::Extend { reserved, .. } => self.release_reserved(reserved),
        }
    }

    /// Fails the open ticket of `rid` (pending: it leaves its queue; granted: what it holds
    /// is given back). Returns whether there was one.
    pub(super) fn fail_ticket_of(&mut self, rid: &RequestId, why: &str) -> bool {
        let Some(t) = self.waiters.open_ticket(rid) else {
            return false;
        };
        self.withdraw(t);
        self.waiters
            .fail(t, Error::InvalidState(format!("request {rid}: {why}")));
        self.fx.signal = true;
        true
    }

    /// Removes an open ticket and gives back what it holds; true if it was open.
    pub(super) fn withdraw(&mut self, t: Ticket) -> bool {
        match self.waiters.get(t) {
            Some(TicketState::Pending { .. }) => {
                self.waiters.unqueue(t);
                // A read-ahead still running drops its results when it finds no ticket.
                self.loading.remove(&t);
                self.staged.remove(&t);
                true
            }
            Some(TicketState::Granted(_)) => {
                let Some(TicketState::Granted(g)) = self.waiters.remove(t) else {
                    unreachable!()
                };
                self.release_grant(g);
                true
            }
            _ => false,
        }
    }

    /// Serves waiting tickets in order while blocks last: extends first, and allocates only
    /// once no extend waits.
    /// Serving reserves; nothing is applied or published before the waiter takes it.
    pub fn serve_waiters(&mut self, ctx: &Ctx) {
        for allocates in [false, true] {
            if allocates && !self.waiters.extends.is_empty() {
                break; // a waiting decode step is ahead of every prompt
            }
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
                let op = self
                    .waiters
                    .pending_op(t)
                    .expect("queued tickets are pending")
                    .clone();
                let result = match op {
                    WaitOp::Allocate {
                        rid,
                        tokens,
                        root,
                        opts,
                    } => {
                        let mut staged = self.staged.remove(&t).unwrap_or_default();
                        let r = self.reserve_allocate(ctx, &rid, &tokens, root, opts, &mut staged);
                        if is_short(&r) && !staged.is_empty() {
                            self.staged.insert(t, staged); // still waiting: keep its reads
                        }
                        r.map(|adm| Grant::Allocate {
                            adm: Box::new(adm),
                            tokens,
                        })
                    }
                    WaitOp::Extend { rid, append } => {
                        self.reserve_extend(ctx, &rid, &append)
                            .map(|reserved| Grant::Extend {
                                rid,
                                append,
                                reserved,
                            })
                    }
                };
                if is_short(&result) {
                    break;
                }
                self.waiters.unqueue(t);
                match result {
                    Ok(g) => self.waiters.grant(t, g),
                    Err(e) => self.waiters.fail(t, e),
                }
                self.fx.signal = true;
            }
        }
    }

    /// The result of a finished ticket, handed to its waiter (the ticket is consumed). A
    /// grant is applied and published here, and nothing is served after it in the same call:
    /// the waiter computes the K/V of its new blocks before any other call can hit them.
    /// A granted allocation with bytes to copy comes back as a fill the engine runs outside
    /// the lock before publishing it (`Staged::Fill`).
    pub fn take_ticket(&mut self, ctx: &Ctx, t: Ticket) -> Result<Staged<SeqView>> {
        match self.waiters.remove(t) {
            Some(TicketState::Granted(Grant::Allocate { adm, tokens })) => {
                Ok(self.publish_or_fill(ctx, *adm, tokens))
            }
            Some(TicketState::Granted(Grant::Extend {
                rid,
                append,
                reserved,
            })) => {
                // Blocks it no longer needs go to the waiters before the publish, never after
                // it, so no waiter is granted a hit on blocks whose K/V is not computed yet.
                self.take_extend(ctx, &rid, &append, reserved, |st| st.serve_waiters(ctx))?;
                Ok(Staged::Done(SeqView::of(&rid, self.seq(&rid)?)))
            }
            Some(TicketState::Moved { rid }) => {
                Ok(Staged::Done(SeqView::of(&rid, self.seq(&rid)?)))
            }
            Some(TicketState::Failed(e)) => Err(e),
            Some(waiting) => {
                self.waiters.restore(t, waiting);
                Err(Error::InvalidState(format!("ticket {t} is still waiting")))
            }
            None => Err(Error::InvalidState(format!(
                "ticket {t} is unknown or already taken"
            ))),
        }
    }

    /// Withdraws a ticket: a pending one leaves its queue, a granted one gives back what it
    /// holds, a swap in flight finishes anyway (its result is dropped).
    pub fn cancel_ticket(&mut self, ctx: &Ctx, t: Ticket) {
        if self.waiters.cancel_flush(t) {
            return;
        }
        if !self.withdraw(t) {
            if let Some(TicketState::Moving { rid, .. }) = self.waiters.remove(t) {
                let abandoned = TicketState::Moving {
                    rid,
                    abandoned: true,
                };
                self.waiters.restore(t, abandoned);
            }
        }
        self.serve_waiters(ctx);
    }
}

fn is_short<T>(r: &Result<T>) -> bool {
    matches!(
        r,
        Err(Error::OutOfBlocks {
            never_fits: false,
            ..
        })
    )
}
