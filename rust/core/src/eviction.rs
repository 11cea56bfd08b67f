//! Eviction policies: which free cached block a tier gives up first.
//!
//! A policy maps a free cached block to one of `classes()` eviction classes when its last
//! owner releases it; the pool keeps one intrusive FIFO queue per class (`pool`) and a ghost
//! of recently evicted hashes (`ghost`). All are O(1) per release, hit and eviction, but
//! `Lru2`, whose order is a heap (`lru2`): O(log n).
//!
//! Leaves first, under every policy (README, "Eviction policies"): a block goes only after every cached block
//! that extends it (in the same tier). Under `Lru` because a sequence releases its tail first
//! and a hit on a child is a hit on its parent. Under `Lfu` (and `Lecar`'s LFU expert) also
//! because a block's count never exceeds its parent's: a hit on a child is a hit on every
//! ancestor, and a count brought back from the ghost is capped at the parent's when the block
//! is registered (the parent block is cached then: the registering sequence holds it). Under
//! `Lru2` likewise for the second-to-last access (`lru2`). Every
//! path that hands a tier several blocks of one chain releases them leaf first (a sequence's
//! deallocate, an onboard's host blocks, a disk read-ahead's slots, a remote import). Known
//! gap: in the host and disk tiers a chain's blocks need not arrive or be touched together. A
//! block there can be onboarded (so it moves to the recent end) while its parent's copy there
//! is not (the parent was a device hit), and under `Lfu` / `Lecar` / `Adaptive` a child whose
//! parent is not in that tier can bring back a count from the ghost, or gain hits, that the
//! parent offloaded later lacks. Either lets a parent there go before its child, which may then
//! be unreachable until it is evicted in turn (space, never wrong data). The device tier keeps the
//! rule under every policy. S3-FIFO
//! was measured and withdrawn: its FIFO order evicts a parent before a child that entered the
//! main queue later (BENCHMARKS.md, "Eviction policies").
//! - `Lru` (one class): the least recently released block first, exactly vLLM's order; a
//!   sequence releases its blocks tail first, so leaves go before their parents. No ghost.
//! - `Lfu` (frequency-aware, five classes): class `min(hits, 4)`, the lowest class first,
//!   least recently released first within it. `hits` counts the prefix hits the block
//!   served while cached, plus, when the same hash is cached again after an eviction, the
//!   count it had then and one for the lookup that missed it (the ghost remembers
//!   `LFU_GHOST_PER_BLOCK` evicted hashes per block of the tier, and never above the
//!   parent's count): a conversation's history that keeps coming back climbs even when it
//!   was evicted between turns.
//! - `Lecar` (adaptive; Vietri et al., HotStorage 2018): two experts, LRU (the least recently
//!   released block) and `Lfu`'s rule, and a weight for each. Each eviction follows one
//!   expert, drawn by weight (a seeded generator: runs repeat exactly), and the ghost notes
//!   which one chose it. When a hash the ghost remembers is cached again, the expert that
//!   evicted it pays: its weight is multiplied by `exp(-LECAR_LEARNING_RATE * d^age)`
//!   (`age`: evictions since; `d = 0.005^(1 / num_blocks)`, so recent regrets weigh most)
//!   and the weights are normalized. Traffic where recency wins (short reuse distances) drives
//!   it to LRU, traffic where frequency wins to `Lfu`. Each evictable block is in its class
//!   queue and in a release-order queue; the ghost holds `LECAR_GHOST_PER_BLOCK` entries per
//!   block. Leaves first as under either expert.
//! - `Adaptive` (set dueling): two experts, LRU and `Lru2`'s rule, and every eviction follows
//!   the one whose sampled simulation (`shadow`: LRU and `Lru2` run on one in `rate` block
//!   lookups, at the tier's capacity scaled down alike) has hit more lately; LRU until the
//!   other leads. No draws, so it is one rule or the other at any time, never a mix, and it
//!   switches within a few cache turnovers when the traffic changes. Data: a release-order
//!   queue, `Lru2`'s order and ghost, and the two shadows (about `SHADOW_SLOTS` entries each,
//!   whatever the tier's size). Leaves first as under either expert. (Its second expert was
//!   `Lfu`'s rule until `Lru2` did better on every workload of the policy table:
//!   BENCHMARKS.md.)
//! - `Lru2` (LRU-2, with blocks seen once evicted newest first in the device tier): a round
//!   is one allocation, and a block is accessed when it is cached or hit. Blocks seen in one
//!   round only go first: in the device tier the newest round's first (a request re-read
//!   after a long gap then still finds its blocks; one re-read soon is the loser), in the
//!   host and disk tiers the oldest first (their blocks arrive as the tier above evicts them,
//!   children before parents). Then the blocks seen twice, by their second-to-last access.
//!   The ghost (`LFU_GHOST_PER_BLOCK` per block) remembers an evicted block's last access,
//!   which becomes its second-to-last when the same hash is cached again (never later than
//!   the parent's). Ties go to the earlier release (leaf first). Built from the simulation of
//!   `benches/policy_sim.py` ("lru2-new-last": 2.05x LRU's hit rate on the conversation trace
//!   at 60k blocks, below LRU on the synthetic chats). O(log n): an indexed heap (`lru2`).
//!
//! Every policy evicts only free blocks (no sequence or pin holds them).

use crate::error::{Error, Result};

/// The names `CacheConfig(eviction_policy=...)` accepts, in the order of `EvictionPolicy`.
pub const POLICY_NAMES: [&str; 5] = ["lru", "lfu", "lecar", "adaptive", "lru2"];

/// Hits beyond this count no more (the top class of `Lfu`).
pub const MAX_HITS: u8 = 4;

/// Ghost entries per block of the tier under `Lfu`.
pub const LFU_GHOST_PER_BLOCK: usize = 4;

/// Ghost entries per block of the tier under `Lecar` (one history per expert).
pub const LECAR_GHOST_PER_BLOCK: usize = 2;

/// How much one regret moves `Lecar`'s weights (LeCaR's lambda).
pub const LECAR_LEARNING_RATE: f64 = 0.45;

/// `Lecar`'s experts.
pub const LRU_EXPERT: u8 = 0;
pub const LFU_EXPERT: u8 = 1;
/// `Adaptive`'s experts: `LRU_EXPERT` and this, `Lru2`'s rule.
pub const LRU2_EXPERT: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvictionPolicy {
    #[default]
    Lru,
    Lfu,
    Lecar,
    Adaptive,
    Lru2,
}

impl EvictionPolicy {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "lru" => Ok(EvictionPolicy::Lru),
            "lfu" => Ok(EvictionPolicy::Lfu),
            "lecar" => Ok(EvictionPolicy::Lecar),
            "adaptive" => Ok(EvictionPolicy::Adaptive),
            "lru2" => Ok(EvictionPolicy::Lru2),
            _ => Err(Error::config(
                "eviction_policy",
                format!("{s:?} is not one of {}", POLICY_NAMES.join(", ")),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        POLICY_NAMES[self as usize]
    }

    /// Number of eviction classes (queues) the policy uses.
    pub fn classes(self) -> usize {
        match self {
            EvictionPolicy::Lru | EvictionPolicy::Lru2 | EvictionPolicy::Adaptive => 1,
            EvictionPolicy::Lfu | EvictionPolicy::Lecar => MAX_HITS as usize + 1,
        }
    }

    /// Ghost entries for a tier of `num_blocks` blocks.
    pub fn ghost_capacity(self, num_blocks: usize) -> usize {
        match self {
            EvictionPolicy::Lru => 0,
            EvictionPolicy::Lfu | EvictionPolicy::Adaptive | EvictionPolicy::Lru2 => {
                num_blocks.saturating_mul(LFU_GHOST_PER_BLOCK)
            }
            EvictionPolicy::Lecar => num_blocks.saturating_mul(LECAR_GHOST_PER_BLOCK),
        }
    }

    /// Whether evictable blocks also sit in a release-order queue (the LRU expert).
    pub fn keeps_release_order(self) -> bool {
        matches!(self, EvictionPolicy::Lecar | EvictionPolicy::Adaptive)
    }

    /// Whether a block's hits count (its class), and come back from the ghost.
    pub fn counts_hits(self) -> bool {
        matches!(self, EvictionPolicy::Lfu | EvictionPolicy::Lecar)
    }

    /// The most a block's hit count reaches.
    pub fn max_hits(self) -> u8 {
        MAX_HITS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_are_config_errors() {
        for n in POLICY_NAMES {
            assert_eq!(EvictionPolicy::parse(n).unwrap().name(), n);
        }
        assert_eq!(POLICY_NAMES.len(), EvictionPolicy::Lru2 as usize + 1);
        let e = EvictionPolicy::parse("mru").unwrap_err();
        assert!(e.to_string().contains("eviction_policy"), "{e}");
    }
}
