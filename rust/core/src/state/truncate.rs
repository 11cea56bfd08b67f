//! Shrinking a resident sequence: `truncate` drops the tokens past a new end (rejected
//! speculative tokens, a rollback).
//!
//! The blocks past the new end are released, last first (counted in `truncated_blocks`):
//! a full, registered one stays cached as evictable, since its bytes are still the K/V its
//! hash names. The new last block may be a block that was full and is now partial; its next
//! appends overwrite positions that its hash still names, so it must not stay in the index
//! under that hash for this sequence's writes:
//! - held only by this sequence, it leaves the index now (a `BlockRemoved` event);
//! - shared (another sequence holds it full, or a fill copies from it), it stays indexed for
//!   the others, and the next append copies it first (`extend_need`: an indexed partial tail
//!   is copied even once the others let go of it).
//!
//! The sequence's hashes are cut to its full blocks, and its tail gets the ids of the kept
//! part of the new last block: from the prompt while a chunked prefill is unfinished, else
//! from the index entry (device, host or disk) of the block's hash. When no tier holds
//! that hash any more the ids are unknown and the sequence stops being cacheable, as after
//! a count append. `num_cached_tokens` is capped at the new length; a pending prompt stays,
//! so the next chunk continues from the new end.
//! Refused while a swap moves the sequence, while it is swapped out, or while a call of it
//! waits or holds a grant. Cost: O(released blocks + block_size).

use crate::error::{Error, Result};
use crate::sequence::SeqView;
use crate::types::{blocks_for, BlockHash, RequestId, Tier};

use super::{Ctx, State};

impl State {
    /// Keeps the first `num_tokens` tokens of `rid` (see the module header), or fails with
    /// nothing changed.
    pub fn truncate(&mut self, ctx: &Ctx, rid: &RequestId, num_tokens: usize) -> Result<SeqView> {
        let bs = ctx.config.block_size;
        let s = self.resident(rid, "truncate")?;
        self.check_no_open_ticket(rid, "truncate")?;
        let n = s.num_tokens;
        if num_tokens == 0 || num_tokens > n {
            return Err(Error::InvalidArgument(format!(
                "num_tokens must be in 1..={n} (the tokens of request {rid}), got {num_tokens}"
            )));
        }
        let (full, kept) = (num_tokens / bs, num_tokens % bs);
        // The ids of the kept part of the new last block (None: unknown). A sequence that
        // is not cacheable keeps no ids.
        let tail: Option<Vec<u32>> = if kept == 0 || !s.cacheable {
            Some(vec![])
        } else if let Some(p) = &s.prompt {
            Some(p.tokens[full * bs..num_tokens].to_vec())
        } else if full < s.hashes.len() {
            self.tokens_of_hash(s.hashes[full])
                .map(|t| t[..kept].to_vec())
        } else {
            Some(s.tail[..kept].to_vec())
        };
        // Commit.
        let keep = blocks_for(num_tokens, bs);
        let s = self.seqs.get_mut(rid).expect("checked above");
        let freed = s.blocks.split_off(keep);
        let last = s.blocks[keep - 1];
        s.num_tokens = num_tokens;
        s.num_cached_tokens = s.num_cached_tokens.min(num_tokens);
        s.own_from = s.own_from.min(keep);
        s.hashes.truncate(full);
        match tail {
            Some(t) if s.cacheable => s.tail = t,
            Some(_) => {}
            None => {
                s.cacheable = false;
                s.tail.clear();
            }
        }
        self.counters.truncated_blocks += freed.len() as u64;
        self.release_reserved(freed);
        if kept > 0 && self.pool.ref_cnt(last) == 1 {
            if let Some(h) = self.index.remove(last) {
                self.pool.unregister(last);
                self.events.removed(h, Tier::Device);
            }
        }
        self.events.end_op();
        Ok(SeqView::of(rid, &self.seqs[rid]))
    }

    /// The token ids a cached block of hash `h` holds, from any tier that indexes it.
    fn tokens_of_hash(&self, h: BlockHash) -> Option<&[u32]> {
        if let Some(b) = self.index.get(h) {
            return Some(self.index.tokens_of(b));
        }
        if let Some(b) = self.host.as_ref().and_then(|t| t.index.get(h)) {
            return self.host.as_ref().map(|t| t.index.tokens_of(b));
        }
        let disk = self.disk.as_ref()?;
        disk.index.get(h).map(|b| disk.index.tokens_of(b))
    }
}
