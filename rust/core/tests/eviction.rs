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

#[test]
fn lru2_evicts_the_block_seen_once_first() {
    assert_eq!(survivor("lru2"), (4, 0));
}

/// 5 blocks of 4 tokens. A (9 tokens: A0, A1 cached, a blank tail) is seen in round 1 and B
/// (5 tokens: B0) in round 2, each once. C takes 3 blocks: the 2 blank ones and one victim,
/// B0: of the blocks seen once, the newest round's go first. C's 3 blocks are cached in
/// round 3; D, 1 block, evicts C's leaf (C2), not its root: a round's blocks go leaf first.
#[test]
fn lru2_evicts_the_newest_blocks_seen_once_first_and_leaf_first() {
    let e = engine_with("lru2");
    let (a, b, c): (Vec<u32>, Vec<u32>, Vec<u32>) =
        ((1..=9).collect(), (11..=15).collect(), (100..112).collect());
    for (id, t) in [("a", &a), ("b", &b), ("c", &c)] {
        alloc(&e, id, t);
        e.deallocate(&rid(id)).unwrap();
        e.check_invariants();
    }
    let m = |t: &[u32]| e.lookup_prefix(t, None).unwrap().num_cached_tokens();
    // (C's last token is always computed: 11 of its 12 are served.)
    assert_eq!(
        (m(&a), m(&b), m(&c)),
        (8, 0, 11),
        "B0 went, A (older) stayed"
    );
    alloc(&e, "d", &[200, 201, 202]);
    e.check_invariants();
    assert_eq!((m(&a), m(&c)), (8, 8), "C2, the newest leaf, went");
}

/// Leaves first, under every policy, checked from the KV events alone: 3,000 prompts drawn
/// from 6 conversations (each turn extends a conversation's chain by 0 to 3 blocks, or a
/// one-off chain) on 12 blocks; whenever the device tier reports a hash removed, no hash it
/// still holds names it as the parent.
#[test]
fn every_policy_evicts_leaves_first() {
    use ferrumkv_core::events::KvEvent;
    use ferrumkv_core::types::{BlockHash, Tier};
    use std::collections::HashMap;
    for policy in ferrumkv_core::eviction::POLICY_NAMES {
        let mut c = ConfigInput::small(12);
        c.eviction_policy = policy.into();
        let e = Engine::with_clock(CacheConfig::validate(&c).unwrap(), Clock::manual(0.0)).unwrap();
        let mut x: u64 = 7;
        let mut next = move |n: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        let mut turns = [0u32; 6];
        // hash -> parent hash, for the hashes the device tier holds
        let mut held: HashMap<BlockHash, Option<BlockHash>> = HashMap::new();
        for i in 0..3000u32 {
            let conv = next(7) as usize;
            let tokens: Vec<u32> = if conv == 6 {
                (0..9).map(|j| 1_000_000 + i * 16 + j).collect()
            } else {
                turns[conv] = (turns[conv] + next(4) as u32).min(10);
                let blocks = turns[conv].max(1);
                (0..=blocks * 4).map(|j| conv as u32 * 1000 + j).collect()
            };
            let id = format!("r{i}");
            alloc(&e, &id, &tokens);
            e.deallocate(&rid(&id)).unwrap();
            for ev in e.drain_events().unwrap() {
                match ev {
                    KvEvent::Stored {
                        block_hashes,
                        parent_block_hash,
                        tier: Tier::Device,
                        ..
                    } => {
                        let mut parent = parent_block_hash;
                        for h in block_hashes {
                            held.insert(h, parent);
                            parent = Some(h);
                        }
                    }
                    KvEvent::Removed {
                        block_hashes,
                        tier: Tier::Device,
                    } => {
                        for h in block_hashes {
                            held.remove(&h);
                            assert!(
                                !held.values().any(|&p| p == Some(h)),
                                "{policy}: prompt {i} evicted a parent before its child"
                            );
                        }
                    }
                    _ => {}
                }
            }
        }
        e.check_invariants();
    }
}
