//! Batch layout: the metadata a paged-attention kernel takes for one forward step.
//!
//! For requests `r_0 .. r_{B-1}` that compute their last `q_i` tokens in this step (a decode
//! step: 1 each; a prefill chunk or speculative tokens: more), `batch_layout` returns, in
//! batch order:
//! - `block_table` `[B, max_blocks]` (row-major): each sequence's device block ids, padded
//!   with `pad` (0 by default: a real block, so a kernel may gather from it; the padded
//!   entries must be masked by `seq_lens`);
//! - `seq_lens` `[B]`: every token with a slot (`num_tokens`), the new ones included;
//! - `query_start_loc` `[B + 1]`: the prefix sums of `q_i` (0 first);
//! - `slot_mapping` `[sum q_i]`: for position `p` in `seq_len - q_i .. seq_len`,
//!   `block_table[i][p / block_size] * block_size + p % block_size`.
//!
//! Read-only: one pass checks every request (known, resident, `q_i <= seq_len`, no request
//! twice, every figure fits int32) before anything is built, so a failure returns an error
//! and nothing else. Cost: O(B log B) for the duplicate check (a sort of B pointers) plus
//! O(B * max_blocks + sum q_i) to fill, in four allocations and no per-element objects.

use crate::error::{Error, Result};
use crate::sequence::Sequence;
use crate::types::RequestId;

use super::{Ctx, State};

/// How many of each sequence's last tokens a forward step computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewTokens<'a> {
    /// The same count for every request (1: a decode step).
    Each(usize),
    /// One count per request, in batch order.
    PerRequest(&'a [usize]),
}

impl NewTokens<'_> {
    fn get(&self, i: usize) -> usize {
        match self {
            NewTokens::Each(q) => *q,
            NewTokens::PerRequest(q) => q[i],
        }
    }
}

/// What paged-attention kernels take for one forward step (see the module header).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchLayout {
    pub num_seqs: usize,
    /// Columns of `block_table`: the most blocks any sequence of the batch holds.
    pub max_blocks: usize,
    /// Row-major `[num_seqs, max_blocks]`.
    pub block_table: Vec<i32>,
    pub seq_lens: Vec<i32>,
    pub query_start_loc: Vec<i32>,
    pub slot_mapping: Vec<i64>,
    /// The largest `q_i` and the largest `seq_len` (0 for an empty batch).
    pub max_query_len: usize,
    pub max_seq_len: usize,
}

fn too_big(what: &str, v: usize) -> Error {
    Error::InvalidArgument(format!("{what} {v} does not fit int32"))
}

impl State {
    /// The layout of one forward step over `rids` (see the module header).
    pub fn batch_layout(
        &self,
        ctx: &Ctx,
        rids: &[RequestId],
        new: NewTokens<'_>,
        pad: i32,
    ) -> Result<BatchLayout> {
        if let NewTokens::PerRequest(q) = new {
            if q.len() != rids.len() {
                return Err(Error::InvalidArgument(format!(
                    "{} request ids but {} num_new_tokens",
                    rids.len(),
                    q.len()
                )));
            }
        }
        let bs = ctx.config.block_size;
        if ctx.config.num_blocks > i32::MAX as usize + 1 {
            return Err(Error::InvalidArgument(format!(
                "block ids up to {} do not fit int32",
                ctx.config.num_blocks - 1
            )));
        }
        let mut seqs: Vec<&Sequence> = Vec::with_capacity(rids.len());
        let (mut cols, mut total, mut max_q, mut max_len) = (0usize, 0usize, 0usize, 0usize);
        for (i, rid) in rids.iter().enumerate() {
            let s = self.resident(rid, "lay out")?;
            let q = new.get(i);
            if q > s.num_tokens {
                return Err(Error::InvalidArgument(format!(
                    "num_new_tokens {q} of request {rid} exceeds its {} tokens",
                    s.num_tokens
                )));
            }
            if s.num_tokens > i32::MAX as usize {
                return Err(too_big("the token count", s.num_tokens));
            }
            total += q; // no overflow: each q <= num_tokens <= i32::MAX, checked below
            if total > i32::MAX as usize {
                return Err(too_big("the batch's new token count", total));
            }
            cols = cols.max(s.blocks.len());
            max_q = max_q.max(q);
            max_len = max_len.max(s.num_tokens);
            seqs.push(s);
        }
        if seqs.len() > 1 {
            // Two rows of one sequence would write its new slots twice.
            let mut ptrs: Vec<*const Sequence> =
                seqs.iter().map(|s| std::ptr::from_ref(*s)).collect();
            ptrs.sort_unstable();
            if ptrs.windows(2).any(|w| w[0] == w[1]) {
                let mut seen = std::collections::HashSet::with_capacity(rids.len());
                let rid = rids
                    .iter()
                    .find(|r| !seen.insert(*r))
                    .expect("a repeated id");
                return Err(Error::InvalidArgument(format!(
                    "request {rid} appears twice in one batch"
                )));
            }
        }
        let mut block_table = Vec::with_capacity(seqs.len() * cols);
        let mut seq_lens = Vec::with_capacity(seqs.len());
        let mut query_start_loc = Vec::with_capacity(seqs.len() + 1);
        let mut slot_mapping = Vec::with_capacity(total);
        query_start_loc.push(0);
        let mut at = 0i32;
        for (i, s) in seqs.iter().enumerate() {
            // One pass: the row's ids, then its pad.
            block_table.extend(s.blocks.iter().map(|b| b.0 as i32));
            block_table.resize((i + 1) * cols, pad);
            let n = s.num_tokens;
            let q = new.get(i);
            seq_lens.push(n as i32);
            at += q as i32;
            query_start_loc.push(at);
            // Positions n - q .. n, one block's run at a time.
            let mut p = n - q;
            while p < n {
                let base = i64::from(s.blocks[p / bs].0) * bs as i64;
                let end = n.min((p / bs + 1) * bs);
                slot_mapping.extend((p % bs..p % bs + (end - p)).map(|off| base + off as i64));
                p = end;
            }
        }
        Ok(BatchLayout {
            num_seqs: seqs.len(),
            max_blocks: cols,
            block_table,
            seq_lens,
            query_start_loc,
            slot_mapping,
            max_query_len: max_q,
            max_seq_len: max_len,
        })
    }
}
