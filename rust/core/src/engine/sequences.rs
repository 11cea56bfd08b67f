//! Calls on sequences and their blocks: allocate, extend, extend_batch, deallocate, fork,
//! tickets, gc, reset and the cheap lookups.
//!
//! Each is one `mutate` (or one `lock` for reads): `State` decides, `commit` runs the effects.
//! First come, first served: a new prompt overtakes no waiting call, and an extend that needs
//! blocks queues behind a waiting one.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::prefix::Salt;
use crate::sequence::{AllocOpts, Append, SeqView};
use crate::state::{PrefixMatch, Staged};
use crate::stats::GcStats;
use crate::types::RequestId;
use crate::waiters::Ticket;

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
        self.allocate_with(rid, tokens, salt, AllocOpts::default(), wait)
    }

    /// `allocate` of one chunk of the prompt, or of a request resumed after preemption
    /// (see `AllocOpts`).
    pub fn allocate_with(
        &self,
        rid: RequestId,
        tokens: Vec<u32>,
        salt: Option<&Salt>,
        opts: AllocOpts,
        wait: bool,
    ) -> Result<Outcome> {
        if tokens.is_empty() {
            return Err(Error::InvalidArgument("tokens must not be empty".into()));
        }
        check_chunk(opts.num_new_tokens)?;
        let root = self.root_hash(salt);
        match self.mutate(false, |st, ctx| {
            st.allocate(ctx, rid, tokens, root, opts, wait)
        })? {
            Staged::Done(o) => Ok(o),
            Staged::Fill(fill) => Ok(Outcome::Ready(self.run_fill(fill)?)),
        }
    }

    /// Appends tokens to a sequence. `wait`: queue when short (else `OutOfBlocks`). An
    /// extend that needs blocks while an earlier one waits queues behind it (or fails).
    pub fn extend(&self, rid: RequestId, append: Append, wait: bool) -> Result<Outcome> {
        self.mutate(false, |st, ctx| st.extend(ctx, rid, append, wait))
    }

    /// One decode step: extends every sequence in `items`, all or nothing (never waits).
    /// A batch that needs blocks while an extend waits fails (it would overtake it).
    pub fn extend_batch(&self, items: &[(RequestId, Append)]) -> Result<()> {
        self.mutate(false, |st, ctx| st.extend_batch(ctx, items))
    }

    /// A decode step: appends token `ids[i]` to `rids[i]`, all or nothing, as `extend_batch`.
    pub fn extend_batch_ids(&self, rids: &[RequestId], ids: &[u32]) -> Result<()> {
        self.mutate(false, |st, ctx| st.extend_batch_ids(ctx, rids, ids))
    }

    /// Drops the tokens of `rid` past `num_tokens` and frees the blocks past the new end
    /// (see `state::truncate`).
    pub fn truncate(&self, rid: &RequestId, num_tokens: usize) -> Result<SeqView> {
        self.mutate(true, |st, ctx| st.truncate(ctx, rid, num_tokens))
    }

    /// What the prefix cache would serve of `tokens` now, per tier (full hits and a partial
    /// copy), without allocating anything.
    pub fn lookup_prefix(&self, tokens: &[u32], salt: Option<&Salt>) -> Result<PrefixMatch> {
        let root = self.root_hash(salt);
        let st = self.lock()?;
        Ok(st.prefix_match(&self.ctx, tokens, root))
    }

    pub fn deallocate(&self, rid: &RequestId) -> Result<()> {
        self.mutate(true, |st, ctx| st.deallocate(ctx, rid))
    }

    pub fn fork(&self, parent: &RequestId, child: RequestId) -> Result<SeqView> {
        self.mutate(false, |st, _| st.fork(parent, &child))
    }

    /// Hands a finished ticket's result to its waiter; a grant is applied and published.
    pub fn take_ticket(&self, t: Ticket) -> Result<SeqView> {
        match self.mutate(false, |st, ctx| st.take_ticket(ctx, t))? {
            Staged::Done(v) => Ok(v),
            Staged::Fill(fill) => self.run_fill(fill),
        }
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
        Ok(self.lock()?.can_allocate(&self.ctx, num_tokens))
    }

    /// Whether `allocate_with(tokens, salt, opts)` would succeed now without waiting (its
    /// prefix hits count).
    pub fn can_allocate_prompt(
        &self,
        tokens: &[u32],
        salt: Option<&Salt>,
        opts: AllocOpts,
    ) -> Result<bool> {
        if tokens.is_empty() {
            return Err(Error::InvalidArgument("tokens must not be empty".into()));
        }
        check_chunk(opts.num_new_tokens)?;
        let root = self.root_hash(salt);
        Ok(self
            .lock()?
            .can_allocate_prompt(&self.ctx, tokens, root, opts))
    }

    pub fn get(&self, rid: &RequestId) -> Result<Option<SeqView>> {
        Ok(self.lock()?.view(rid))
    }

    pub fn contains(&self, rid: &RequestId) -> Result<bool> {
        Ok(self.lock()?.contains(rid))
    }

    pub fn num_sequences(&self) -> Result<usize> {
        Ok(self.lock()?.num_sequences())
    }
}

/// A chunk reserves at least one token.
fn check_chunk(num_new_tokens: Option<usize>) -> Result<()> {
    match num_new_tokens {
        Some(0) => Err(Error::InvalidArgument(
            "num_new_tokens must be >= 1 (None: the whole prompt)".into(),
        )),
        _ => Ok(()),
    }
}
