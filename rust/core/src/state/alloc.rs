//! Allocation of a new sequence: plan, reserve, fill, publish.
//!
//! 1. `reserve_allocate` plans the prompt's prefix hits (device, then host, then disk, then a
//!    partial copy), checks that enough blocks are free, and takes them: device hits are
//!    shared (their refcounts rise), the other blocks are taken from the pool (the cached
//!    blocks their eviction displaces are offloaded with the call's own effects, first). The
//!    copies that fill them (onboard from the host tier, disk read-back, the partial copy)
//!    are recorded as the admission's `fill`, with their sources pinned. The result, an `Admission`, holds every block it
//!    took; none of them is in a sequence or an index yet, so no other request can see them.
//! 2. The fill runs: at once if it is empty, else by the engine outside the lock
//!    (`Staged::Fill`) while the admission waits in `filling`.
//! 3. `admit` publishes it: the fill's after-actions apply (host copies indexed, pins
//!    dropped, transfers counted), the sequence is inserted, its full blocks are registered
//!    in the prefix index (KV events), and the allocation counters are counted.
//!
//! Chunked prefill (`AllocOpts::num_new_tokens`): the lookup covers the whole prompt, and
//! slots are reserved for the cached tokens plus one chunk (`AllocOpts::slots`); the sequence
//! keeps the prompt and its hashes (`sequence::Prompt`) for the next chunks (`extend`). NOTE:
//! as in vLLM, the prefix cache is looked up once, here: a later chunk computes its blocks
//! even if another request cached them meanwhile (they register as duplicates and stay
//! unindexed). The lookup is counted once, for the whole prompt, when the allocation is
//! published (hits and misses over all its blocks, `input_tokens` = uncached tokens), so a
//! chunked prompt has the hit rate of the same prompt unchunked; a resumed request
//! (`preempted`) is counted in `preempted_*` instead. `alloc_*_blocks` count blocks as they
//! are taken: this chunk's here, later chunks' in `extend`. A waiting chunked allocation
//! sizes its chunk when it is served, from the hits found then; until its waiter takes it the
//! grant keeps the prompt's tokens and the admission its hashes, and `admit` makes them the
//! sequence's `Prompt`, so a cancel has nothing else to give back.
//!
//! A waiting allocation is reserved when it is served, and filled and admitted when its
//! waiter takes the ticket; a cancelled one, or one whose fill failed, gives its `Admission`
//! back (`release_admission`): the never-published blocks go back blank, the shared hits back
//! to the cache, the pins are dropped, and no counter of it was ever counted (nothing was
//! copied either). Only the cached device blocks its reservation evicted stay evicted.
//! Cost: O(prompt blocks) for hashing and lookups, O(1) per block taken.

use crate::error::{Error, Result};
use crate::prefix::PrefixIndex;
use crate::sequence::{AllocOpts, Phase, Prompt, SeqView, Sequence};
use crate::slots::PREFETCH_AHEAD;
use crate::types::{blocks_for, BlockHash, BlockId, RequestId};
use crate::waiters::{Outcome, WaitOp};

use super::effects::{After, Effects};
use super::{short, Ctx, StagedReads, State};

/// Plan of a prompt allocation, computed without side effects.
pub(super) struct AllocPlan {
    pub hits: Vec<BlockId>,
    /// Host blocks holding the next cached blocks after the device hits (onboarded).
    pub onboard: Vec<BlockId>,
    /// Disk slots holding the cached blocks after those (read back, checksums verified).
    pub from_disk: Vec<BlockId>,
    /// Chained hashes of every full block of the prompt.
    pub hashes: Vec<BlockHash>,
    pub partial: Option<(BlockId, usize)>,
}

impl AllocPlan {
    /// Tokens the plan serves from the cache (full hits of every tier, then the partial copy).
    fn cached_tokens(&self, block_size: usize) -> usize {
        (self.hits.len() + self.onboard.len() + self.from_disk.len()) * block_size
            + self.partial.map_or(0, |p| p.1)
    }
}

/// What `allocate` would reuse now, per tier (`lookup_prefix`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PrefixMatch {
    /// Full device hits plus the tokens of a partly matching device block (copied).
    pub device_tokens: usize,
    /// Full blocks onboarded from the host tier.
    pub host_tokens: usize,
    /// Full blocks read back from the disk tier.
    pub disk_tokens: usize,
}

impl PrefixMatch {
    pub fn num_cached_tokens(&self) -> usize {
        self.device_tokens + self.host_tokens + self.disk_tokens
    }
}

/// A new sequence's blocks, reserved and filled, not yet published (see the module header).
#[derive(Debug)]
pub struct Admission {
    pub rid: RequestId,
    seq: Sequence,
    /// The first `device_hits` blocks were device prefix hits (already indexed, shared).
    device_hits: usize,
    /// Full blocks served from any tier (device, host, disk).
    full_hits: usize,
    partial: bool,
    /// Counted apart from the hit rates (see the module header).
    preempted: bool,
    /// The hashes of every full block of the prompt, when only a chunk of it has slots: the
    /// sequence's `Prompt` is made of them and the tokens at `admit`.
    prompt_hashes: Option<Vec<BlockHash>>,
    /// The copies that fill the new blocks (onboard, disk read-back, partial copy), with
    /// their after-actions.
    /// They run outside the lock before the admission is published (`Staged::Fill`).
    fill: Effects,
}

/// A call's answer, or an admission whose fill the engine runs first, outside the lock,
/// before `finish_fill` publishes it.
#[must_use]
pub enum Staged<T> {
    Done(T),
    Fill(Fill),
}

/// The memory operations of one admission, carried out of the lock (see `Staged`). The
/// admission itself stays in the state (`filling`), so nothing it holds is ever unowned.
#[must_use]
pub struct Fill {
    pub rid: RequestId,
    pub fx: Effects,
}

impl State {
    /// A new sequence of `tokens`, now or (with `wait`) through a ticket when blocks are
    /// short or its disk hits must be read ahead. First come, first served: a new prompt
    /// overtakes no waiting call.
    pub fn allocate(
        &mut self,
        ctx: &Ctx,
        rid: RequestId,
        tokens: Vec<u32>,
        root: BlockHash,
        opts: AllocOpts,
        wait: bool,
    ) -> Result<Staged<Outcome>> {
        self.check_new_rid(&rid)?;
        let total = self.pool.num_blocks();
        // What it needs with nothing cached (hits only ever lower it, see `reserve_allocate`).
        let need = self.blocks_needed(ctx, opts.slots(tokens.len(), 0));
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
            self.planned_disk_reads(ctx, &tokens, root)
        } else {
            vec![]
        };
        if !reads.is_empty() {
            let op = WaitOp::Allocate {
                rid,
                tokens,
                root,
                opts,
            };
            let t = self.waiters.push(op, need);
            self.start_disk_read(t, reads);
            return Ok(Staged::Done(Outcome::Waiting(t)));
        }
        // First come, first served: a new prompt overtakes no waiting call.
        if self.waiters.num_pending() == 0 {
            // Reserve, then admit (or fill) with the prompt moved in, not copied; a failed
            // reservation changed nothing.
            match self.reserve_allocate(ctx, &rid, &tokens, root, opts, &mut Default::default()) {
                Ok(adm) => {
                    return Ok(match self.publish_or_fill(ctx, adm, tokens) {
                        Staged::Done(v) => Staged::Done(Outcome::Ready(v)),
                        Staged::Fill(f) => Staged::Fill(f),
                    })
                }
                Err(Error::OutOfBlocks {
                    never_fits: false, ..
                }) if wait => {}
                Err(e) => return Err(e),
            }
        } else if !wait {
            let free = self.pool.num_free_blocks();
            return Err(Error::OutOfBlocks {
                needed: need,
                available: free,
                never_fits: false,
            });
        }
        self.counters.preempted_waits += 1;
        let op = WaitOp::Allocate {
            rid,
            tokens,
            root,
            opts,
        };
        Ok(Staged::Done(Outcome::Waiting(self.waiters.push(op, need))))
    }

    pub(super) fn plan_allocate(&self, ctx: &Ctx, tokens: &[u32], root: BlockHash) -> AllocPlan {
        let bs = ctx.config.block_size;
        let n = tokens.len();
        if !ctx.config.enable_prefix_cache {
            return AllocPlan {
                hits: vec![],
                onboard: vec![],
                from_disk: vec![],
                hashes: vec![],
                partial: None,
            };
        }
        let hashes = ctx.hasher.chain(root, tokens, bs);
        // A full hit must end before the last token: one token is always left to compute.
        let max_full = (n - 1) / bs;
        let hits = self.index.longest_prefix(&hashes[..max_full]);
        let onboard: Vec<BlockId> = match &self.host {
            Some(host) => host.index.longest_prefix(&hashes[hits.len()..max_full]),
            None => vec![],
        };
        let after_host = hits.len() + onboard.len();
        let from_disk: Vec<BlockId> = match &self.disk {
            Some(disk) => hashes[after_host..max_full]
                .iter()
                .map_while(|&h| disk.readable(h))
                .collect(),
            None => vec![],
        };
        let k = after_host + from_disk.len();
        let parent = if k == 0 { root } else { hashes[k - 1] };
        let window = &tokens[k * bs..(n - 1).min((k + 1) * bs)];
        let partial = if window.is_empty() {
            None
        } else {
            // NOTE: the source may be a live sequence's block: its K/V must have been computed
            // (written) before this call, since the copy is taken now (README, "Guarantees").
            self.index.best_partial(parent, window, |_| true)
        };
        AllocPlan {
            hits,
            onboard,
            from_disk,
            hashes,
            partial,
        }
    }

    /// Takes and fills the blocks of a new sequence (step 1 of the module header), or fails
    /// with nothing changed.
    pub(super) fn reserve_allocate(
        &mut self,
        ctx: &Ctx,
        rid: &RequestId,
        tokens: &[u32],
        root: BlockHash,
        opts: AllocOpts,
        staged: &mut StagedReads,
    ) -> Result<Admission> {
        let bs = ctx.config.block_size;
        let n = tokens.len();
        let total = self.pool.num_blocks();
        let mut plan = self.plan_allocate(ctx, tokens, root);
        let k = plan.hits.len();
        // Every hit lies inside the slots: they cover the cached tokens plus at least one.
        let blocks_of = |plan: &AllocPlan| blocks_for(opts.slots(n, plan.cached_tokens(bs)), bs);
        let mut num_blocks = blocks_of(&plan);
        let mut available =
            self.available_excluding(plan.hits.iter().copied().chain(plan.partial.map(|p| p.0)));
        if (num_blocks > total || num_blocks - k > available) && plan.partial.is_some() {
            // Pinning the partial source (or the chunk it lengthens) is what makes it short:
            // skip the partial copy.
            plan.partial = None;
            num_blocks = blocks_of(&plan);
            available = self.available_excluding(plan.hits.iter().copied());
        }
        if num_blocks > total {
            return Err(Error::OutOfBlocks {
                needed: num_blocks,
                available: total,
                never_fits: true,
            });
        }
        if num_blocks - k > available {
            return Err(short(num_blocks - k, available));
        }
        let disk_data = self.read_disk_hits(&mut plan, staged);
        // A disk block that failed its read shortens the hits, and so a chunk's slots: never
        // more blocks than were checked above.
        let slots = opts.slots(n, plan.cached_tokens(bs));
        let new = blocks_for(slots, bs) - k;
        // Commit. What this records from here on is the admission's fill.
        let mark = self.fx.mark();
        let now = ctx.clock.now();
        self.next_round();
        for &b in plan.hits.iter().take(PREFETCH_AHEAD) {
            self.pool.prefetch(b);
        }
        for (i, &b) in plan.hits.iter().enumerate() {
            if let Some(&ahead) = plan.hits.get(i + PREFETCH_AHEAD) {
                self.pool.prefetch(ahead);
            }
            self.pool.acquire_hit(b);
            self.residency.on_access(b, now);
        }
        if let Some((src, _)) = plan.partial {
            self.pool.acquire_hit(src); // pinned so the allocation below cannot evict it
        }
        if let Some(host) = self.host.as_mut() {
            // Pinned too: offloads made by the allocation below must not evict them.
            for &hb in &plan.onboard {
                host.pool.acquire_hit(hb);
            }
        }
        let j = plan.onboard.len();
        let mut blocks = plan.hits;
        self.alloc_blocks(ctx, new, now, &mut blocks);
        if j > 0 {
            self.onboard(ctx, &plan.onboard, &blocks[k..k + j]);
        }
        let d = disk_data.len();
        for (bytes, &db) in disk_data.into_iter().zip(&blocks[k + j..k + j + d]) {
            ctx.write_block(&mut self.fx, db, bytes);
        }
        if j + d > 0 {
            let host = plan.onboard;
            self.fx.after(After::Onboarded { host, disk: d });
        }
        let full_hits = k + j + d;
        let mut cached_tokens = full_hits * bs;
        if let Some((src, m)) = plan.partial {
            ctx.copy_block(&mut self.fx, src, blocks[full_hits]);
            self.fx.after(After::PartialCopied { src });
            self.residency.on_access(src, now);
            cached_tokens += m;
        }
        self.events.end_op();
        let fill = self.fx.split_fill(mark);
        let cacheable = ctx.config.enable_prefix_cache;
        let n_full = slots / bs;
        let mut hashes = if cacheable { plan.hashes } else { vec![] };
        let prompt_hashes = (slots < n).then(|| hashes.clone());
        hashes.truncate(n_full);
        let seq = Sequence {
            num_tokens: slots,
            num_cached_tokens: cached_tokens,
            num_prompt_tokens: n,
            blocks,
            hashes,
            root,
            tail: if cacheable {
                tokens[n_full * bs..slots].to_vec()
            } else {
                vec![]
            },
            cacheable,
            own_from: full_hits,
            phase: Phase::Resident,
            prompt: None, // made at `admit`, from `prompt_hashes` and the tokens
        };
        Ok(Admission {
            rid: rid.clone(),
            seq,
            device_hits: k,
            full_hits,
            partial: plan.partial.is_some(),
            preempted: opts.preempted,
            prompt_hashes,
            fill,
        })
    }

    /// Publishes a reserved allocation of `tokens` (step 3 of the module header). Infallible.
    pub(super) fn admit(&mut self, ctx: &Ctx, adm: Admission, tokens: Vec<u32>) -> SeqView {
        let bs = ctx.config.block_size;
        let Admission {
            rid,
            mut seq,
            device_hits,
            full_hits,
            partial,
            preempted,
            prompt_hashes,
            fill,
        } = adm;
        debug_assert!(!self.seqs.contains_key(&rid), "admitted twice: {rid}");
        debug_assert!(
            !fill.has_memory_ops(),
            "admitted before its fill ran: {rid}"
        );
        self.settle_after(fill.after, true);
        // The pins just dropped may free a block: waiters are served now, before the
        // publish, so none of them is granted a hit on blocks whose K/V is not computed yet.
        self.serve_waiters(ctx);
        if seq.cacheable {
            // Blocks after the device hits (onboarded, read back or computed) are new. Each
            // is fetched `PREFETCH_AHEAD` blocks before it is registered.
            let full = seq.num_tokens / bs;
            let fetch = |index: &PrefixIndex, i: usize| {
                let parent = if i == 0 { seq.root } else { seq.hashes[i - 1] };
                index.prefetch_insert(seq.blocks[i], seq.hashes[i], parent, tokens[i * bs]);
            };
            for i in (device_hits..full).take(PREFETCH_AHEAD) {
                fetch(&self.index, i);
            }
            for i in device_hits..full {
                if i + PREFETCH_AHEAD < full {
                    fetch(&self.index, i + PREFETCH_AHEAD);
                }
                let parent = if i == 0 { seq.root } else { seq.hashes[i - 1] };
                self.registry().register(
                    seq.blocks[i],
                    seq.hashes[i],
                    parent,
                    seq.root,
                    i.checked_sub(1).map(|p| seq.blocks[p]),
                    &tokens[i * bs..(i + 1) * bs],
                );
            }
        }
        self.events.end_op();
        let num_blocks = seq.blocks.len();
        let num_prompt_blocks = blocks_for(seq.num_prompt_tokens, bs);
        let partial = usize::from(partial);
        let c = &mut self.counters;
        c.alloc_total_blocks += num_blocks as u64;
        c.alloc_new_blocks += (num_blocks - device_hits) as u64;
        let (n, cached) = (seq.num_prompt_tokens as u64, seq.num_cached_tokens as u64);
        if preempted {
            c.preempted_requests += 1;
            c.preempted_prompt_tokens += n;
            c.preempted_cache_tokens += cached;
        } else {
            c.full_reused_blocks += full_hits as u64;
            c.partial_reused_blocks += partial as u64;
            c.missed_blocks += (num_prompt_blocks - full_hits - partial) as u64;
            c.cache_tokens += cached;
            c.input_tokens += n - cached;
        }
        seq.prompt = prompt_hashes.map(|hashes| Box::new(Prompt { tokens, hashes }));
        let view = SeqView::of(&rid, &seq);
        self.seqs.insert(rid, seq);
        view
    }

    /// Gives back a reservation that is never admitted: its new blocks were never
    /// published, so they go back blank; the shared hits go back to the cache.
    pub(super) fn release_admission(&mut self, adm: Admission) {
        self.settle_after(adm.fill.after, false);
        self.free_sequence(adm.seq);
    }

    /// Blocks an admission holds: (device, host), each once per reference it holds (the
    /// invariant checks count them as owners).
    pub(super) fn admission_blocks(adm: &Admission) -> (Vec<BlockId>, Vec<BlockId>) {
        let mut device = adm.seq.blocks.clone();
        let mut host = vec![];
        for a in &adm.fill.after {
            match a {
                After::Onboarded { host: h, .. } => host.extend(h),
                After::PartialCopied { src } => device.push(*src),
            }
        }
        (device, host)
    }

    /// Publishes `adm` now if it has nothing to copy, else keeps it in `filling` and hands
    /// its fill to the engine.
    pub(super) fn publish_or_fill(
        &mut self,
        ctx: &Ctx,
        mut adm: Admission,
        tokens: Vec<u32>,
    ) -> Staged<SeqView> {
        if !adm.fill.has_memory_ops() {
            return Staged::Done(self.admit(ctx, adm, tokens));
        }
        let fx = adm.fill.take_memory();
        let rid = adm.rid.clone();
        self.filling.insert(rid.clone(), (adm, tokens, false));
        Staged::Fill(Fill { rid, fx })
    }

    /// Publishes an admission once the engine ran its fill (`copied`), or gives it back if
    /// the copies failed, the engine stopped or the request was deallocated meanwhile.
    pub fn finish_fill(
        &mut self,
        ctx: &Ctx,
        rid: &RequestId,
        copied: Result<()>,
    ) -> Result<SeqView> {
        let Some((adm, tokens, withdrawn)) = self.filling.remove(rid) else {
            return Err(Error::Closed); // `close` gave it back
        };
        let withdrawn = || {
            if withdrawn {
                Err(Error::InvalidState(format!(
                    "request {rid}: it was deallocated while waiting"
                )))
            } else {
                Ok(())
            }
        };
        if let Err(e) = copied
            .and_then(|()| self.check_open())
            .and_then(|()| withdrawn())
        {
            self.release_admission(adm);
            self.fx.signal = true; // waiters may fit now
            return Err(e);
        }
        Ok(self.admit(ctx, adm, tokens))
    }

    /// Checks that `rid` may be used for a new sequence.
    pub fn check_new_rid(&self, rid: &RequestId) -> Result<()> {
        if self.seqs.contains_key(rid)
            || self.waiters.open_ticket(rid).is_some()
            || self.filling.contains_key(rid)
        {
            return Err(Error::DuplicateRequest(rid.clone()));
        }
        Ok(())
    }

    /// Blocks a prompt of `n` tokens needs if nothing is cached.
    pub fn blocks_needed(&self, ctx: &Ctx, n: usize) -> usize {
        blocks_for(n, ctx.config.block_size)
    }

    /// What a prompt would get from the cache now, per tier (see `plan_allocate`).
    pub fn prefix_match(&self, ctx: &Ctx, tokens: &[u32], root: BlockHash) -> PrefixMatch {
        if tokens.is_empty() {
            return PrefixMatch::default();
        }
        let bs = ctx.config.block_size;
        let plan = self.plan_allocate(ctx, tokens, root);
        PrefixMatch {
            device_tokens: plan.hits.len() * bs + plan.partial.map_or(0, |p| p.1),
            host_tokens: plan.onboard.len() * bs,
            disk_tokens: plan.from_disk.len() * bs,
        }
    }

    /// Whether `allocate(tokens, opts)` would succeed now without waiting: nothing waits
    /// ahead of it and the blocks it takes beyond its device hits are free (the test
    /// `reserve_allocate` makes, with the partial copy it drops when short).
    pub fn can_allocate_prompt(
        &self,
        ctx: &Ctx,
        tokens: &[u32],
        root: BlockHash,
        opts: AllocOpts,
    ) -> bool {
        if tokens.is_empty() || self.waiters.num_pending() > 0 {
            return false;
        }
        let bs = ctx.config.block_size;
        let mut plan = self.plan_allocate(ctx, tokens, root);
        plan.partial = None;
        let num_blocks = blocks_for(opts.slots(tokens.len(), plan.cached_tokens(bs)), bs);
        num_blocks <= self.pool.num_blocks()
            && num_blocks - plan.hits.len() <= self.available_excluding(plan.hits.iter().copied())
    }
}
