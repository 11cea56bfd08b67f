//! Extension of a resident sequence: reserve, then apply.
//!
//! An extend by `m` tokens needs the blocks its new tokens spill into, plus one when the
//! sequence's partial last block is shared (a fork) or indexed (a full block `truncate` made
//! partial, while others held it): that block is copied first (copy-on-write), so the new
//! tokens are never seen by the other owner, and an indexed block never holds K/V of other
//! tokens than its hash names. Both conditions are stable while a ticket of the sequence is
//! open: nothing can start sharing a tail that is not indexed, and an indexed block held by
//! the sequence is never evicted.
//!
//! Chunked prefill: while the sequence's prompt still has tokens without slots, the only
//! extend is `Append::Prompt(n)`, the next `n` of them (a chunk): its blocks are counted as
//! prompt blocks (`alloc_*_blocks`), and those it completes are registered under the
//! hashes computed at allocation. Generated tokens before that are `InvalidState`, a chunk
//! past the prompt's end `InvalidArgument`. `reserve_extend`
//! checks and takes those blocks; `apply_reserved` joins them to the sequence and registers
//! every block the new ids complete; `take_extend` first gives back any reserved block a
//! granted extend no longer needs (a write may have unshared the tail meanwhile). `extend_now` does both at once; a waiting extend
//! reserves when served and applies when its waiter takes the ticket, so a cancelled one
//! gives back exactly its reservation and the sequence was never touched.
//! Cost: O(new blocks + new tokens) (plus hashing of each completed block). A batch
//! (`extend_batch`, `extend_batch_ids`: one decode step) looks each sequence up twice (check,
//! apply) and sorts the batch's sequence addresses once to refuse a request given twice.

use crate::error::{Error, Result};
use crate::sequence::{Append, AppendRef, SeqView, Sequence};
use crate::types::{blocks_for, BlockHash, BlockId, RequestId};
use crate::waiters::{Outcome, WaitOp};

use super::{short, Ctx, Registry, State};

impl State {
    /// Appends tokens to a resident sequence, now or (with `wait`) through a ticket when
    /// blocks are short. An extend that needs blocks while an earlier one waits queues
    /// behind it (or fails).
    pub fn extend(
        &mut self,
        ctx: &Ctx,
        rid: RequestId,
        append: Append,
        wait: bool,
    ) -> Result<Outcome> {
        if self.waiters.open_ticket(&rid).is_some() {
            return Err(Error::InvalidState(format!(
                "request {rid} already has an extend waiting"
            )));
        }
        let need = self.extend_need(ctx, &rid, &append)?;
        let (new_blocks, cow) = need;
        let needed = new_blocks + usize::from(cow);
        let overtakes = needed > 0 && !self.waiters.extends.is_empty();
        let result = if overtakes {
            Err(Error::OutOfBlocks {
                needed,
                available: 0,
                never_fits: false,
            })
        } else {
            self.extend_with(ctx, &rid, &append, need)
        };
        match result {
            Ok(v) => Ok(Outcome::Ready(v)),
            Err(Error::OutOfBlocks { needed, .. }) if wait => {
                let held = self.seqs.get(&rid).map_or(0, |s| s.blocks.len());
                let never = held + needed - usize::from(cow) > self.pool.num_blocks();
                if never {
                    return Err(Error::OutOfBlocks {
                        needed,
                        available: self.pool.num_blocks(),
                        never_fits: true,
                    });
                }
                self.counters.preempted_waits += 1;
                Ok(Outcome::Waiting(
                    self.waiters.push(WaitOp::Extend { rid, append }, needed),
                ))
            }
            Err(e) => Err(e),
        }
    }

    /// Blocks an extend takes: new blocks, and whether the partial tail must be copied first
    /// (copy-on-write). Refuses an append the sequence's prompt state does not allow (see the
    /// module header).
    pub fn extend_need(
        &self,
        ctx: &Ctx,
        rid: &RequestId,
        append: &Append,
    ) -> Result<(usize, bool)> {
        self.need_ref(ctx, rid, append.as_ref())
    }

    /// `extend_need` of a borrowed append.
    fn need_ref(&self, ctx: &Ctx, rid: &RequestId, append: AppendRef<'_>) -> Result<(usize, bool)> {
        self.need_of(ctx, rid, self.resident(rid, "extend")?, append)
    }

    /// `extend_need` of the resident sequence `s` of `rid`.
    fn need_of(
        &self,
        ctx: &Ctx,
        rid: &RequestId,
        s: &Sequence,
        append: AppendRef<'_>,
    ) -> Result<(usize, bool)> {
        let bs = ctx.config.block_size;
        let n = s.num_tokens;
        let m = append.len();
        match (append, &s.prompt) {
            (AppendRef::Prompt(_), None) => {
                return Err(Error::InvalidArgument(format!(
                    "request {rid} has no prompt tokens left to reserve: a chunk of {m} \
                     tokens goes past the end of its prompt"
                )))
            }
            (AppendRef::Prompt(_), Some(p)) if m > p.tokens.len() - n => {
                return Err(Error::InvalidArgument(format!(
                    "a chunk of {m} tokens goes past the end of request {rid}'s prompt \
                     ({} of its {} tokens are left)",
                    p.tokens.len() - n,
                    p.tokens.len()
                )))
            }
            (AppendRef::Ids(_) | AppendRef::Count(_), Some(p)) => {
                return Err(Error::InvalidState(format!(
                    "cannot append generated tokens to request {rid}: {} of its {} prompt \
                     tokens have no slots yet (reserve them with num_new_tokens first)",
                    p.tokens.len() - n,
                    p.tokens.len()
                )))
            }
            _ => {}
        }
        let total = n.checked_add(m).ok_or_else(|| {
            Error::InvalidArgument(format!("extending request {rid} by {m} tokens overflows"))
        })?;
        let new_blocks = blocks_for(total, bs) - s.blocks.len();
        let tail_copied = n % bs != 0 && m > 0 && {
            let last = *s.blocks.last().expect("n > 0");
            self.pool.ref_cnt(last) > 1 || self.index.hash_of(last).is_some()
        };
        Ok((new_blocks, tail_copied))
    }

    /// Takes `n` blocks (blank first, then evicting). The caller checked availability.
    fn reserve_blocks(&mut self, ctx: &Ctx, n: usize) -> Vec<BlockId> {
        if n == 0 {
            return Vec::new(); // most items of a decode batch: no clock read
        }
        let now = ctx.clock.now();
        let mut blocks = Vec::new();
        self.alloc_blocks(ctx, n, now, &mut blocks);
        blocks
    }

    /// Gives back reserved blocks that were never joined to a sequence.
    pub(super) fn release_reserved(&mut self, blocks: Vec<BlockId>) {
        for b in blocks.into_iter().rev() {
            self.release_block(b);
        }
    }

    /// Takes the blocks `need` (from `extend_need`) asks for, or fails with nothing changed.
    fn reserve_for(&mut self, ctx: &Ctx, (new_blocks, cow): (usize, bool)) -> Result<Vec<BlockId>> {
        let needed = new_blocks + usize::from(cow);
        let available = self.pool.num_free_blocks();
        if needed > available {
            return Err(short(needed, available));
        }
        Ok(self.reserve_blocks(ctx, needed))
    }

    /// Checks an extend of a resident sequence and takes the blocks it needs, or fails with
    /// nothing changed.
    pub(super) fn reserve_extend(
        &mut self,
        ctx: &Ctx,
        rid: &RequestId,
        append: &Append,
    ) -> Result<Vec<BlockId>> {
        let need = self.extend_need(ctx, rid, append)?;
        self.reserve_for(ctx, need)
    }

    /// Appends tokens to a resident sequence now, or fails with nothing changed.
    pub fn extend_now(&mut self, ctx: &Ctx, rid: &RequestId, append: &Append) -> Result<SeqView> {
        let need = self.extend_need(ctx, rid, append)?;
        self.extend_with(ctx, rid, append, need)
    }

    /// `extend_now` with the `need` the caller already computed for this very state.
    pub fn extend_with(
        &mut self,
        ctx: &Ctx,
        rid: &RequestId,
        append: &Append,
        need: (usize, bool),
    ) -> Result<SeqView> {
        let reserved = self.reserve_for(ctx, need)?;
        self.apply_reserved(ctx, rid, append.as_ref(), reserved, need);
        Ok(SeqView::of(rid, &self.seqs[rid]))
    }

    /// Applies a granted extend whose waiter takes it. The sequence is as it was when the
    /// blocks were reserved, except that a write may have unshared its tail meanwhile: the
    /// blocks it no longer needs go back first, and `serve` then runs, before anything of
    /// the extend is published. Fails, giving the reservation back, only if it needs more
    /// than was reserved (it cannot: nothing can share the tail while the ticket is open).
    pub(super) fn take_extend(
        &mut self,
        ctx: &Ctx,
        rid: &RequestId,
        append: &Append,
        mut reserved: Vec<BlockId>,
        serve: impl FnOnce(&mut Self),
    ) -> Result<()> {
        let need = match self.extend_need(ctx, rid, append) {
            Ok((n, cow)) if n + usize::from(cow) <= reserved.len() => (n, cow),
            Ok((n, cow)) => {
                let have = reserved.len();
                self.release_reserved(reserved);
                return Err(short(n + usize::from(cow), have));
            }
            Err(e) => {
                self.release_reserved(reserved);
                return Err(e);
            }
        };
        let spare = reserved.split_off(need.0 + usize::from(need.1));
        if !spare.is_empty() {
            self.release_reserved(spare);
            serve(self);
        }
        self.apply_reserved(ctx, rid, append.as_ref(), reserved, need);
        Ok(())
    }

    /// Appends tokens using exactly the blocks `need` asked for (the copy-on-write block
    /// first). Infallible.
    fn apply_reserved(
        &mut self,
        ctx: &Ctx,
        rid: &RequestId,
        append: AppendRef<'_>,
        mut reserved: Vec<BlockId>,
        (new_blocks, tail_shared): (usize, bool),
    ) {
        let bs = ctx.config.block_size;
        debug_assert_eq!(reserved.len(), new_blocks + usize::from(tail_shared));
        if tail_shared {
            let copy = reserved.remove(0); // taken first, as by a direct extend
            let s = self.seqs.get_mut(rid).expect("checked");
            let old = std::mem::replace(s.blocks.last_mut().expect("n > 0"), copy);
            ctx.copy_block(&mut self.fx, old, copy);
            self.release_block(old);
            self.counters.intra_device_copy_blocks += 1;
            self.counters.intra_device_copy_bytes += ctx.bytes_per_block() as u64;
        }
        if let AppendRef::Prompt(_) = append {
            self.counters.alloc_total_blocks += new_blocks as u64;
            self.counters.alloc_new_blocks += new_blocks as u64;
        } else {
            self.counters.gen_alloc_blocks += new_blocks as u64;
        }
        // One lookup: the parts registering touches are borrowed apart from `seqs`.
        let State {
            seqs,
            pool,
            index,
            events,
            scratch,
            ..
        } = self;
        let s = seqs.get_mut(rid).expect("checked");
        s.blocks.extend(reserved);
        let mut reg = Registry {
            pool,
            index,
            events: &mut *events,
        };
        match append {
            AppendRef::Ids(ids) if s.cacheable => {
                let mut hash =
                    |parent: BlockHash, tail: &[u32]| ctx.hasher.block_hash(parent, tail, scratch);
                fill_tail(&mut reg, bs, s, ids, &mut hash);
            }
            AppendRef::Ids(_) => {}
            AppendRef::Count(_) => {
                s.cacheable = false;
                s.tail.clear();
            }
            AppendRef::Prompt(m) => {
                let p = s.prompt.take().expect("checked by extend_need");
                let (start, end) = (s.num_tokens, s.num_tokens + m);
                if s.cacheable {
                    // The hashes computed once at allocation (the next one completes first).
                    let mut next = s.hashes.len();
                    let mut hash = |parent: BlockHash, tail: &[u32]| {
                        debug_assert_eq!(
                            Some(&ctx.hasher.block_hash(parent, tail, &mut Vec::new())),
                            p.hashes.get(next),
                            "a chunk's block hash differs from the prompt's"
                        );
                        next += 1;
                        p.hashes[next - 1]
                    };
                    fill_tail(&mut reg, bs, s, &p.tokens[start..end], &mut hash);
                }
                if end < p.tokens.len() {
                    s.prompt = Some(p); // more chunks to come; else the prompt is done
                }
            }
        }
        s.num_tokens += append.len();
        events.end_op();
    }

    /// Extends every sequence of `items` or none (see `Engine::extend_batch`): everything
    /// is checked before anything changes, so a failure leaves the state as it was.
    /// A batch that needs blocks while an extend waits fails (it would overtake it).
    pub fn extend_batch(&mut self, ctx: &Ctx, items: &[(RequestId, Append)]) -> Result<()> {
        self.extend_each(ctx, items.len(), |i| (&items[i].0, items[i].1.as_ref()))
    }

    /// A decode step: appends token `ids[i]` to `rids[i]`, for every `i` or none (as
    /// `extend_batch`, without a vector per sequence).
    pub fn extend_batch_ids(&mut self, ctx: &Ctx, rids: &[RequestId], ids: &[u32]) -> Result<()> {
        if rids.len() != ids.len() {
            return Err(Error::InvalidArgument(format!(
                "{} request ids but {} token ids",
                rids.len(),
                ids.len()
            )));
        }
        self.extend_each(ctx, rids.len(), |i| {
            (&rids[i], AppendRef::Ids(std::slice::from_ref(&ids[i])))
        })
    }

    /// The batch extend of the `n` items `item(i)`. The check pass looks each sequence up
    /// once; when no tail is shared (the usual decode step) the blocks of the whole batch are
    /// taken at once, in item order, and each item is applied with one more lookup.
    /// NOTE: an earlier item's copy-on-write may unshare a later item's tail (forks in one
    /// batch), so a batch with a shared tail takes blocks item by item, each need
    /// recomputed, as one extend after another would.
    fn extend_each<'a>(
        &mut self,
        ctx: &Ctx,
        n: usize,
        item: impl Fn(usize) -> (&'a RequestId, AppendRef<'a>),
    ) -> Result<()> {
        let blocked = !self.waiters.extends.is_empty();
        let tickets = self.waiters.has_open();
        let mut new_blocks = Vec::with_capacity(n);
        let mut seen: Vec<*const Sequence> = Vec::with_capacity(n);
        let (mut needed, mut any_cow) = (0usize, false);
        // The first item (in order) that repeats an earlier one: the cold path of a failure.
        let first_repeat = |upto: usize| {
            let mut ids = std::collections::HashSet::with_capacity(upto);
            (0..upto).map(|i| item(i).0).find(|r| !ids.insert(*r))
        };
        let twice = |rid: &RequestId| {
            Error::InvalidArgument(format!("request {rid} appears twice in one batch"))
        };
        for i in 0..n {
            let (rid, append) = item(i);
            let checked = (|| {
                if tickets {
                    self.check_no_open_ticket(rid, "extend")?;
                }
                let s = self.resident(rid, "extend")?;
                let need = self.need_of(ctx, rid, s, append)?;
                Ok((std::ptr::from_ref::<Sequence>(s), need))
            })();
            // A failure reports the first bad item in order, a repeat being bad where it
            // repeats (as one check per item in turn would).
            let (s, (blocks, cow)) = match checked {
                Ok(c) => c,
                Err(e) => return Err(first_repeat(i + 1).map_or(e, twice)),
            };
            seen.push(s);
            any_cow |= cow;
            new_blocks.push(blocks);
            needed = if let Some(k) = needed.checked_add(blocks + usize::from(cow)) {
                k
            } else {
                let e = Error::InvalidArgument("the batch's block count overflows".into());
                return Err(first_repeat(i + 1).map_or(e, twice));
            };
        }
        // A sequence twice would be extended twice; compared by address (one per request).
        seen.sort_unstable();
        if seen.windows(2).any(|w| w[0] == w[1]) {
            return Err(twice(first_repeat(n).expect("a repeated id")));
        }
        let available = if blocked && needed > 0 {
            0
        } else {
            self.pool.num_free_blocks()
        };
        if needed > available {
            return Err(short(needed, available));
        }
        if any_cow {
            for i in 0..n {
                let (rid, append) = item(i);
                let need = self.need_ref(ctx, rid, append)?;
                let reserved = self.reserve_for(ctx, need)?;
                self.apply_reserved(ctx, rid, append, reserved, need);
            }
            return Ok(());
        }
        let mut blocks = self.reserve_blocks(ctx, needed).into_iter();
        for (i, &k) in new_blocks.iter().enumerate() {
            let (rid, append) = item(i);
            let reserved: Vec<BlockId> = blocks.by_ref().take(k).collect();
            self.apply_reserved(ctx, rid, append, reserved, (k, false));
        }
        Ok(())
    }

    /// Copy-on-write: gives `rid` private copies of the shared blocks that hold positions
    /// `start..start+n`, so a write there is never seen by another sequence, except blocks
    /// the sequence computes itself (see below).
    pub fn unshare_span(
        &mut self,
        ctx: &Ctx,
        rid: &RequestId,
        start: usize,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let bs = ctx.config.block_size;
        let span = start / bs..=(start + n - 1) / bs;
        let s = self.resident(rid, "write_kv")?;
        // A full block this sequence computes (past its cached prefix) and registered under
        // its own chain is written in place even when shared: its K/V is defined by its
        // tokens, and whoever got it as a prefix hit is waiting for exactly these bytes.
        let computes_in_place = |i: usize| {
            i >= s.own_from
                && s.hashes
                    .get(i)
                    .is_some_and(|&h| self.index.hash_of(s.blocks[i]) == Some(h))
        };
        let shared: Vec<usize> = span
            .filter(|&i| self.pool.ref_cnt(s.blocks[i]) > 1 && !computes_in_place(i))
            .collect();
        if shared.len() > self.pool.num_free_blocks() {
            return Err(short(shared.len(), self.pool.num_free_blocks()));
        }
        let now = ctx.clock.now();
        for i in shared {
            let old = self.seqs[rid].blocks[i];
            let copy = self.alloc_block(ctx, now);
            ctx.copy_block(&mut self.fx, old, copy);
            self.release_block(old);
            self.seqs.get_mut(rid).expect("checked above").blocks[i] = copy;
            self.counters.intra_device_copy_blocks += 1;
            self.counters.intra_device_copy_bytes += ctx.bytes_per_block() as u64;
        }
        self.events.end_op();
        Ok(())
    }
}

/// Appends `ids` to the tail of `s`, registering every block they complete; `hash` gives a
/// completed block's hash from its parent's and its ids.
fn fill_tail(
    reg: &mut Registry<'_>,
    bs: usize,
    s: &mut Sequence,
    ids: &[u32],
    hash: &mut impl FnMut(BlockHash, &[u32]) -> BlockHash,
) {
    let mut rest = ids;
    while !rest.is_empty() {
        let take = (bs - s.tail.len()).min(rest.len());
        s.tail.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        if s.tail.len() == bs {
            let parent = s.last_hash();
            let h = hash(parent, &s.tail);
            let i = s.hashes.len();
            let prev = i.checked_sub(1).map(|p| s.blocks[p]);
            reg.register(s.blocks[i], h, parent, s.root, prev, &s.tail);
            s.tail.clear();
            s.hashes.push(h);
        }
    }
}
