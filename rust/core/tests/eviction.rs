//! Eviction policies at the engine level: which cached prompt survives a burst.

mod common;

use common::*;
use ferrumkv_core::clock::Clock;
use ferrumkv_core::config::{CacheConfig, ConfigInput};
use ferrumkv_core::Engine;

fn engine_with(policy: &str) -> Engine {
    let mut c = ConfigInput::small(5);
    c.eviction_policy = policy.into();
    Engine::with_clock(CacheConfig::validate(&c).unwrap(), Clock::manual(0.0)).unwrap()
}

/// A0 is cached and hit once, then B0 is cached (released later); a burst needing one
/// cached block evicts one of them. Returns the cached tokens of a's and b's prompts after.
fn survivor(policy: &str) -> (usize, usize) {
    let e = engine_with(policy);
    let (a, b): (Vec<u32>, Vec<u32>) = ((1..=5).collect(), (11..=15).collect());
    alloc(&e, "a", &a);
    e.deallocate(&rid("a")).unwrap();
    assert_eq!(alloc(&e, "a2", &a).num_cached_tokens, 4); // A0's hit
    e.deallocate(&rid("a2")).unwrap();
    alloc(&e, "b", &b);
    e.deallocate(&rid("b")).unwrap();
    alloc(&e, "c", &(100..116).collect::<Vec<_>>()); // 4 blocks: 3 blank + 1 evicted
    e.check_invariants();
    let m = |t: &[u32]| e.lookup_prefix(t, None).unwrap().num_cached_tokens();
    (m(&a), m(&b))
}

#[test]
fn lru_evicts_the_least_recently_released() {
    assert_eq!(survivor("lru"), (0, 4));
}

#[test]
fn lfu_evicts_the_never_hit_block_first() {
    assert_eq!(survivor("lfu"), (4, 0));
}

#[test]
fn adaptive_starts_as_lru() {
    // Two references are no evidence: the shadows tie, and LRU leads until the other wins.
    assert_eq!(survivor("adaptive"), (0, 4));
}
