//! Calls on sequences and their blocks: allocate, extend, extend_batch, deallocate, fork,
//! tickets, gc, reset and the cheap lookups.
//!
//! Each is one `mutate` (or one `lock` for reads): `State` decides, `commit` runs the effects.
//! First come, first served: a new prompt overtakes no waiting call, and an extend that needs
//! blocks queues behind a waiting one.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::prefix::Salt;
use crate::sequence::{Append, SeqView};
use crate::stats::GcStats;
use crate::types::RequestId;
use crate::waiters::{Ticket, WaitOp};

use super::{EngineCore, Outcome};

impl EngineCore {
    /// Reserves KV space for a new sequence. `wait`: queue when short (else `OutOfBlocks`).
    pub fn allocate(
        &self,
        rid: RequestId,
        tokens: Vec<u32>,
        salt: Option<&Salt>,
        wait: bool,
    ) -> Result<Outcome> {
        if tokens.is_empty() {
            return Err(Error::InvalidArgument("tokens must not be empty".into()));
        }
        let root = self.root_hash(salt);
        self.mutate(false, |st, ctx| {
            st.check_new_rid(&rid)?;
            let total = st.pool.num_blocks();
            let need = st.blocks_needed(ctx, tokens.len());
            if need > total {
                return Err(Error::OutOfBlocks {
                    needed: need,
                    available: total,
                    never_fits: true,
                });
            }
            // A prefix hit on disk is read ahead by the disk reader while the call waits, so
            // the caller's thread never blocks on disk I/O (`try_allocate` reads inline).
            let reads = if wait {
                st.planned_disk_reads(ctx, &tokens, root)
            } else {
                vec![]
            };
            if !reads.is_empty() {
                let t = st
                    .waiters
                    .push(WaitOp::Allocate { rid, tokens, root }, need);
                st.start_disk_read(t, reads);
                return Ok(Outcome::Waiting(t));
            }
            // First come, first served: a new prompt overtakes no waiting call.
            if st.waiters.num_pending() == 0 {
                match st.allocate_now(ctx, &rid, &tokens, root, &mut Default::default()) {
                    Ok(v) => return Ok(Outcome::Ready(v)),
                    Err(Error::OutOfBlocks {
                        never_fits: false, ..
                    }) if wait => {}
                    Err(e) => return Err(e),
                }
            } else if !wait {
                let free = st.pool.num_free_blocks();
                return Err(Error::OutOfBlocks {
                    needed: need,
                    available: free,
                    never_fits: false,
                });
            }
            st.counters.preempted_waits += 1;
            Ok(Outcome::Waiting(
                st.waiters
                    .push(WaitOp::Allocate { rid, tokens, root }, need),
            ))
        })
    }

    /// Appends tokens to a sequence. `wait`: queue when short (else `OutOfBlocks`). An
    /// extend that needs blocks while an earlier one waits queues behind it (or fails).
    pub fn extend(&self, rid: RequestId, append: Append, wait: bool) -> Result<Outcome> {
        self.mutate(false, |st, ctx| {
            if st.waiters.open_ticket(&rid).is_some() {
                return Err(Error::InvalidState(format!(
                    "request {rid} already has an extend waiting"
                )));
            }
            let need = st.extend_need(ctx, &rid, append.len())?;
            let (new_blocks, cow) = need;
            let needed = new_blocks + usize::from(cow);
            let overtakes = needed > 0 && !st.waiters.extends.is_empty();
            let result = if overtakes {
                Err(Error::OutOfBlocks {
                    needed,
                    available: 0,
                    never_fits: false,
                })
            } else {
                st.extend_with(ctx, &rid, &append, need)
            };
            match result {
                Ok(v) => Ok(Outcome::Ready(v)),
                Err(Error::OutOfBlocks { needed, .. }) if wait => {
                    let held = st.seqs.get(&rid).map_or(0, |s| s.blocks.len());
                    let never = held + needed - usize::from(cow) > st.pool.num_blocks();
                    if never {
                        return Err(Error::OutOfBlocks {
                            needed,
                            available: st.pool.num_blocks(),
                            never_fits: true,
                        });
                    }
                    st.counters.preempted_waits += 1;
                    Ok(Outcome::Waiting(
                        st.waiters.push(WaitOp::Extend { rid, append }, needed),
                    ))
                }
                Err(e) => Err(e),
            }
        })
    }

    /// One decode step: extends every sequence in `items`, all or nothing (never waits).
    /// A batch that needs blocks while an extend waits fails (it would overtake it).
    pub fn extend_batch(&self, items: &[(RequestId, Append)]) -> Result<()> {
        self.mutate(false, |st, ctx| {
            let blocked = !st.waiters.extends.is_empty();
            st.extend_batch(ctx, items, blocked)
        })
    }

    /// Tokens of `tokens` the prefix cache would serve now (full hits and a partial copy),
    /// without allocating anything.
    pub fn lookup_prefix(&self, tokens: &[u32], salt: Option<&Salt>) -> Result<usize> {
        let root = self.root_hash(salt);
        let st = self.lock()?;
        Ok(st.cached_prefix_len(&self.ctx, tokens, root))
    }

    pub fn deallocate(&self, rid: &RequestId) -> Result<()> {
        self.mutate(true, |st, _| st.deallocate(rid))
    }

    pub fn fork(&self, parent: &RequestId, child: RequestId) -> Result<SeqView> {
        self.mutate(false, |st, _| st.fork(parent, &child))
    }

    /// Hands a finished ticket's result to its waiter; a grant is applied and published.
    pub fn take_ticket(&self, t: Ticket) -> Result<SeqView> {
        self.mutate(false, |st, ctx| st.take_ticket(ctx, t))
    }

    /// Withdraws a ticket (a cancelled or timed-out waiter): nothing it took is kept.
    /// On a closed engine there is nothing left to give back, so this never fails.
    pub fn cancel_ticket(&self, t: Ticket) {
        let _ = self.mutate(true, |st, ctx| {
            st.cancel_ticket(ctx, t);
            Ok(())
        });
    }

    pub fn gc(&self, target_free_ratio: Option<f64>) -> Result<GcStats> {
        let target = target_free_ratio.unwrap_or(self.ctx.config.low_watermark);
        if !(0.0..=1.0).contains(&target) {
            return Err(Error::InvalidArgument(format!(
                "target_free_ratio {target} is outside [0, 1]"
            )));
        }
        let t0 = Instant::now();
        let (evicted, offloaded) = self.mutate(false, |st, ctx| Ok(st.gc(ctx, target)))?;
        Ok(GcStats {
            evicted_blocks: evicted,
            offloaded_blocks: offloaded,
            freed_bytes: evicted * self.ctx.bytes_per_block(),
            duration_s: t0.elapsed().as_secs_f64(),
        })
    }

    pub fn reset_prefix_cache(&self) -> Result<bool> {
        self.mutate(false, |st, _| Ok(st.reset_prefix_cache()))
    }

    pub fn can_allocate(&self, num_tokens: usize) -> Result<bool> {
        let st = self.lock()?;
        let need = st.blocks_needed(&self.ctx, num_tokens);
        Ok(st.waiters.num_pending() == 0 && need <= st.pool.num_free_blocks())
    }

    pub fn get(&self, rid: &RequestId) -> Result<Option<SeqView>> {
        let st = self.lock()?;
        Ok(st.seqs.get(rid).map(|s| SeqView::of(rid, s)))
    }

    pub fn contains(&self, rid: &RequestId) -> Result<bool> {
        Ok(self.lock()?.seqs.contains_key(rid))
    }

    pub fn num_sequences(&self) -> Result<usize> {
        Ok(self.lock()?.seqs.len())
    }
}
