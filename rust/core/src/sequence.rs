//! A sequence (request) and what the engine knows of it.
//!
//! Invariants: `blocks.len() == ceil(num_tokens / block_size)` (every block holds some of its
//! tokens and every token has a slot); while `cacheable`, `hashes[i]` is the chained hash of
//! full block `i` for `i < hashes.len() == num_tokens / block_size`, and `tail` holds the ids
//! of the tokens after the last full block. A sequence extended by a bare token count is no
//! longer cacheable (its ids are unknown), and neither are blocks after that point.
//!
//! Chunked prefill: `allocate` may give slots to only the first tokens of its prompt (the
//! cached ones plus one chunk). Until every prompt token has a slot the sequence keeps its
//! `Prompt`: the whole prompt's ids and the chained hashes of its full blocks, computed once
//! at allocation (`hashes` is always a prefix of them), so a later chunk
//! (`Append::Prompt`) registers its completed blocks under the right hashes without hashing
//! again. Invariant: while `prompt` is `Some`, `num_tokens < prompt.tokens.len() ==
//! num_prompt_tokens` and (if cacheable) `hashes` is a prefix of `prompt.hashes`; it becomes
//! `None` when the last chunk gets its slots (a truncate keeps it: the next chunk continues
//! from the new end). Generated tokens (`Ids`, `Count`) are refused while it is `Some`.
//!
//! Lifecycle: every sequence is in exactly one `Phase`, and every call matches on it. While a
//! copy moves a sequence between tiers (`SwappingOut`, `SwappingIn`) no call may read, write
//! or change it: its blocks are pinned by it and the copier reads or fills them without the
//! engine lock. `blocks` are device blocks in `Resident` and `SwappingOut`, host blocks in
//! `Swapped` and `SwappingIn` (see `Phase::tier`).

use crate::types::{BlockHash, BlockId, RequestId, Tier};

#[derive(Debug, Clone)]
pub struct Sequence {
    /// Tokens with slots (a block position each).
    pub num_tokens: usize,
    pub num_cached_tokens: usize,
    /// Length of the prompt `allocate` was given (slots or not).
    pub num_prompt_tokens: usize,
    pub blocks: Vec<BlockId>,
    pub hashes: Vec<BlockHash>,
    pub root: BlockHash,
    pub tail: Vec<u32>,
    pub cacheable: bool,
    /// `blocks[own_from..]` were filled by this sequence (not prefix hits, not inherited
    /// from a fork parent): it computes their K/V, in place even once others share them.
    pub own_from: usize,
    pub phase: Phase,
    /// The prompt while some of its tokens have no slot yet (chunked prefill), else None.
    pub prompt: Option<Box<Prompt>>,
}

/// The whole prompt of a sequence whose prefill is chunked (see the module header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub tokens: Vec<u32>,
    /// Chained hashes of every full block of `tokens` (empty without a prefix cache).
    pub hashes: Vec<BlockHash>,
}

/// How much of a prompt `allocate` reserves, and how its lookup is counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocOpts {
    /// Slots for the cached tokens plus this many (>= 1); None: every token of the prompt.
    pub num_new_tokens: Option<usize>,
    /// A request resumed after preemption by recompute: its lookup is counted in the
    /// `preempted_*` counters and in no hit-rate input (as vLLM's `PrefixCacheStats`).
    pub preempted: bool,
}

impl AllocOpts {
    /// Tokens that get slots in a prompt of `n` tokens of which `cached` come from the cache.
    pub fn slots(&self, n: usize, cached: usize) -> usize {
        self.num_new_tokens
            .map_or(n, |k| n.min(cached.saturating_add(k)))
    }
}

/// Where a sequence's blocks are, and whether a copy is moving them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// On the device tier: every call may use it.
    Resident,
    /// Its device blocks are being copied to the host blocks `to`, which the swap holds.
    SwappingOut { to: Vec<BlockId> },
    /// In the host tier.
    Swapped,
    /// Its host blocks are being copied to the device blocks `to`, which the swap holds.
    SwappingIn { to: Vec<BlockId> },
}

impl Phase {
    /// The tier `Sequence::blocks` belong to.
    pub fn tier(&self) -> Tier {
        match self {
            Phase::Resident | Phase::SwappingOut { .. } => Tier::Device,
            Phase::Swapped | Phase::SwappingIn { .. } => Tier::Host,
        }
    }

    /// A copy of the sequence is in flight.
    pub fn is_moving(&self) -> bool {
        matches!(self, Phase::SwappingOut { .. } | Phase::SwappingIn { .. })
    }
}

impl Sequence {
    /// Hash the next full block chains from.
    pub fn last_hash(&self) -> BlockHash {
        self.hashes.last().copied().unwrap_or(self.root)
    }
}

/// Tokens appended by `extend`: generated ids, or only their number (never cached), or the
/// next tokens of the sequence's own prompt (a chunk of a chunked prefill).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Append {
    Ids(Vec<u32>),
    Count(usize),
    Prompt(usize),
}

impl Append {
    pub fn len(&self) -> usize {
        match self {
            Append::Ids(v) => v.len(),
            Append::Count(n) | Append::Prompt(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_ref(&self) -> AppendRef<'_> {
        match self {
            Append::Ids(v) => AppendRef::Ids(v),
            Append::Count(n) => AppendRef::Count(*n),
            Append::Prompt(n) => AppendRef::Prompt(*n),
        }
    }
}

/// A borrowed `Append` (a batch of one new id per sequence needs no vector each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendRef<'a> {
    Ids(&'a [u32]),
    Count(usize),
    Prompt(usize),
}

impl AppendRef<'_> {
    pub fn len(&self) -> usize {
        match self {
            AppendRef::Ids(v) => v.len(),
            AppendRef::Count(n) | AppendRef::Prompt(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a caller sees of a sequence: a copy, never a reference into the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqView {
    pub request_id: RequestId,
    pub num_tokens: usize,
    pub num_cached_tokens: usize,
    pub num_prompt_tokens: usize,
    pub block_ids: Vec<u32>,
    pub tier: Tier,
}

impl SeqView {
    pub fn of(rid: &RequestId, s: &Sequence) -> Self {
        SeqView {
            request_id: rid.clone(),
            num_tokens: s.num_tokens,
            num_cached_tokens: s.num_cached_tokens,
            num_prompt_tokens: s.num_prompt_tokens,
            block_ids: s.blocks.iter().map(|b| b.0).collect(),
            tier: s.phase.tier(),
        }
    }
}
