//! Eviction policies: which free cached block a tier gives up first.
//!
//! A policy maps a free cached block to one of `classes()` eviction classes when its last
//! owner releases it; the pool keeps one intrusive FIFO queue per class and evicts the head of
//! the lowest non-empty class (O(classes) = O(1) per eviction, O(1) per release and hit).
//! - `Lru` (one class): the least recently released block first, exactly vLLM's order; a
//!   sequence releases its blocks tail first, so leaves go before their parents.
//! - `Lfu` (frequency-aware, five classes): class `min(hits, 4)`, where `hits` counts the
//!   prefix hits the block served since it was cached; within a class, least recently
//!   released first. Leaves still go first: a hit on a block is a hit on every ancestor, so a
//!   parent is never in a lower class than its child, and a sequence releases a child before
//!   its parent.
//!
//! Every policy evicts only free blocks (no sequence or pin holds them).

use crate::error::{Error, Result};

/// The names `CacheConfig(eviction_policy=...)` accepts, in the order of `EvictionPolicy`.
pub const POLICY_NAMES: [&str; 2] = ["lru", "lfu"];

/// Hits beyond this count no more (the top class of `Lfu`).
pub const MAX_HITS: u8 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvictionPolicy {
    #[default]
    Lru,
    Lfu,
}

impl EvictionPolicy {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "lru" => Ok(EvictionPolicy::Lru),
            "lfu" => Ok(EvictionPolicy::Lfu),
            _ => Err(Error::config(
                "eviction_policy",
                format!("{s:?} is not one of {}", POLICY_NAMES.join(", ")),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EvictionPolicy::Lru => "lru",
            EvictionPolicy::Lfu => "lfu",
        }
    }

    /// Number of eviction classes (queues) the policy uses.
    pub fn classes(self) -> usize {
        match self {
            EvictionPolicy::Lru => 1,
            EvictionPolicy::Lfu => MAX_HITS as usize + 1,
        }
    }

    /// The class a released free cached block joins (lower classes are evicted first).
    pub fn class(self, hits: u8) -> usize {
        match self {
            EvictionPolicy::Lru => 0,
            EvictionPolicy::Lfu => hits.min(MAX_HITS) as usize,
        }
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
        let e = EvictionPolicy::parse("mru").unwrap_err();
        assert!(e.to_string().contains("eviction_policy"), "{e}");
    }
}
