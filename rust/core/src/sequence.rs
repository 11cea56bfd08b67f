//! A sequence (request) and what the engine knows of it.
//!
//! Invariants: `blocks.len() == ceil(num_tokens / block_size)` (every block holds some of its
//! tokens and every token has a slot); while `cacheable`, `hashes[i]` is the chained hash of
//! full block `i` for `i < hashes.len() == num_tokens / block_size`, and `tail` holds the ids
//! of the tokens after the last full block. A sequence extended by a bare token count is no
//! longer cacheable (its ids are unknown), and neither are blocks after that point.
//!
//! Lifecycle: every sequence is in exactly one `Phase`, and every call matches on it. While a
//! copy moves a sequence between tiers (`SwappingOut`, `SwappingIn`) no call may read, write
//! or change it: its blocks are pinned by it and the copier reads or fills them without the
//! engine lock. `blocks` are device blocks in `Resident` and `SwappingOut`, host blocks in
//! `Swapped` and `SwappingIn` (see `Phase::tier`).

use crate::types::{BlockHash, BlockId, RequestId, Tier};

#[derive(Debug, Clone)]
pub struct Sequence {
    pub num_tokens: usize,
    pub num_cached_tokens: usize,
    pub blocks: Vec<BlockId>,
    pub hashes: Vec<BlockHash>,
    pub root: BlockHash,
    pub tail: Vec<u32>,
    pub cacheable: bool,
    /// `blocks[own_from..]` were filled by this sequence (not prefix hits, not inherited
    /// from a fork parent): it computes their K/V, in place even once others share them.
    pub own_from: usize,
    pub phase: Phase,
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

/// Tokens appended by `extend`: their ids, or only their number (never cached).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Append {
    Ids(Vec<u32>),
    Count(usize),
}

impl Append {
    pub fn len(&self) -> usize {
        match self {
            Append::Ids(v) => v.len(),
            Append::Count(n) => *n,
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
    pub block_ids: Vec<u32>,
    pub tier: Tier,
}

impl SeqView {
    pub fn of(rid: &RequestId, s: &Sequence) -> Self {
        SeqView {
            request_id: rid.clone(),
            num_tokens: s.num_tokens,
            num_cached_tokens: s.num_cached_tokens,
            block_ids: s.blocks.iter().map(|b| b.0).collect(),
            tier: s.phase.tier(),
        }
    }
}
