//! Exact block ids, eviction orders and counters for the canonical prefix-cache scenarios.

mod common;

use common::*;
use ferrumkv_core::events::KvEvent;
use ferrumkv_core::{Error, Outcome};

fn toks(range: std::ops::Range<u32>) -> Vec<u32> {
    range.collect()
}

#[test]
fn two_requests_share_a_three_block_prefix() {
    let e = engine(16, true);
    let a = alloc(&e, "a", &toks(0..14)); // 3 full blocks + 2 tokens
    assert_eq!(ids(&a), [0, 1, 2, 3]);
    let mut b_tokens = toks(0..12);
    b_tokens.extend([100, 101, 102]);
    let b = alloc(&e, "b", &b_tokens);
    assert_eq!(ids(&b), [0, 1, 2, 4]);
    assert_eq!(b.num_cached_tokens, 12);
    let s = e.stats().unwrap();
    assert_eq!(s.counters.full_reused_blocks, 3);
    assert_eq!(s.counters.missed_blocks, 5);
    assert_eq!(s.device.used_blocks, 5);
    e.check_invariants();
}

#[test]
fn release_then_lru_eviction_tails_first() {
    let e = engine(6, true);
    alloc(&e, "a", &toks(0..12)); // blocks 0,1,2 (all full, cached)
    alloc(&e, "b", &toks(50..58)); // blocks 3,4
    e.deallocate(&rid("a")).unwrap(); // evictable LRU: 2,1,0
    e.deallocate(&rid("b")).unwrap(); // evictable LRU: 2,1,0,4,3
    assert_eq!(e.stats().unwrap().device.evictable_blocks, 5);
    // 4 new blocks: blank 5 first, then evict 2, 1, 0 (a's tail first).
    let c = alloc(&e, "c", &toks(200..216));
    assert_eq!(ids(&c), [5, 2, 1, 0]);
    let ev = e.drain_events().unwrap();
    let removed: Vec<_> = ev
        .iter()
        .filter_map(|x| match x {
            KvEvent::Removed { block_hashes, .. } => Some(block_hashes.len()),
            _ => None,
        })
        .collect();
    assert_eq!(removed, [3]);
    // b's prefix (blocks 3,4) is still cached; c's release queues 0, 1, 2, 5 (tail first),
    // so the one new block evicts c's last block, 0.
    e.deallocate(&rid("c")).unwrap();
    let b2 = alloc(&e, "b2", &toks(50..59));
    assert_eq!(ids(&b2), [3, 4, 0]);
    assert_eq!(b2.num_cached_tokens, 8);
    e.check_invariants();
}

#[test]
fn hit_block_is_never_evicted_for_its_own_request() {
    let e = engine(3, true);
    alloc(&e, "a", &toks(0..8)); // blocks 0,1 cached
    e.deallocate(&rid("a")).unwrap(); // evictable: 1, 0 ; blank: 2
                                      // Same 8-token prefix + 4 more: hits 0 and 1, needs 1 new block: the blank one.
    let b = alloc(&e, "b", &toks(0..12));
    assert_eq!(ids(&b), [0, 1, 2]);
    assert_eq!(b.num_cached_tokens, 8);
    e.deallocate(&rid("b")).unwrap();
    // 16 tokens: 3 hits allowed? cap is 15 -> 3 full hits, 1 new needed, but the tier has 3.
    let r = e.allocate(rid("c"), toks(0..16), None, false);
    assert!(
        matches!(
            r,
            Err(Error::OutOfBlocks {
                never_fits: true,
                ..
            })
        ),
        "{r:?}"
    );
    e.check_invariants();
}

#[test]
fn decode_fills_and_registers_a_block() {
    let e = engine(8, true);
    alloc(&e, "a", &[1, 2, 3]);
    extend(&e, "a", &[4]); // block 0 becomes full -> registered
    extend(&e, "a", &[5, 6]);
    e.deallocate(&rid("a")).unwrap();
    let b = alloc(&e, "b", &[1, 2, 3, 4, 9]);
    assert_eq!(b.block_ids[0], 0);
    assert_eq!(b.num_cached_tokens, 4);
    assert_eq!(e.stats().unwrap().counters.gen_alloc_blocks, 1);
}

#[test]
fn partial_reuse_copies_matching_tokens() {
    let e = engine(8, true);
    alloc(&e, "a", &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
    let k: Vec<u8> = (0..16u8).collect(); // one token of K (2 heads x 4 x f16)
    e.write_kv(&rid("a"), 0, 5, &k, &k).unwrap();
    // Same first block; second block matches 2 tokens (5, 6) then differs.
    let b = alloc(&e, "b", &[1, 2, 3, 4, 5, 6, 0, 0, 0]);
    assert_eq!(b.num_cached_tokens, 6);
    assert_eq!(b.block_ids[0], 0);
    assert_ne!(b.block_ids[1], 1, "partial block is a private copy");
    let (mut ko, mut vo) = (vec![0u8; 16], vec![0u8; 16]);
    e.read_kv(&rid("b"), 0, 5, &mut ko, &mut vo).unwrap();
    assert_eq!(ko, k);
    let c = e.stats().unwrap().counters;
    assert_eq!(
        (
            c.full_reused_blocks,
            c.partial_reused_blocks,
            c.intra_device_copy_blocks
        ),
        (1, 1, 1)
    );
    assert_eq!((c.cache_tokens, c.input_tokens), (6, 9 + 3));
}

#[test]
fn one_token_is_always_left_to_compute() {
    let e = engine(8, true);
    alloc(&e, "a", &toks(0..8));
    let b = alloc(&e, "b", &toks(0..8));
    assert_eq!(b.num_cached_tokens, 7, "1 full block + 3 tokens copied");
    assert_eq!(b.block_ids[0], 0);
    assert_eq!(b.block_ids.len(), 2);
    assert_ne!(b.block_ids[1], 1);
    let c = e.stats().unwrap().counters;
    assert_eq!((c.full_reused_blocks, c.partial_reused_blocks), (1, 1));
    // A one-token prompt can reuse nothing.
    let one = alloc(&e, "one", &[0]);
    assert_eq!(one.num_cached_tokens, 0);
    e.check_invariants();
}

#[test]
fn salts_isolate_tenants() {
    use ferrumkv_core::prefix::Salt;
    let e = engine(8, true);
    let salt = Salt::Str("tenant-a".into());
    let Outcome::Ready(a) = e
        .allocate(rid("a"), toks(0..9), Some(&salt), false)
        .unwrap()
    else {
        panic!()
    };
    let b = alloc(&e, "b", &toks(0..9));
    assert_eq!(b.num_cached_tokens, 0);
    assert!(a.block_ids.iter().all(|x| !b.block_ids.contains(x)));
    let Outcome::Ready(c) = e
        .allocate(rid("c"), toks(0..9), Some(&salt), false)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(c.num_cached_tokens, 8);
}

#[test]
fn fork_copies_a_shared_partial_tail_on_write() {
    let e = engine(8, true);
    alloc(&e, "p", &[1, 2, 3, 4, 5, 6]);
    let c = e.fork(&rid("p"), rid("c")).unwrap();
    assert_eq!(c.block_ids, [0, 1]);
    let p2 = extend(&e, "p", &[7]);
    assert_eq!(p2.block_ids, [0, 2], "parent copied its shared tail");
    let c2 = extend(&e, "c", &[8]);
    assert_eq!(c2.block_ids, [0, 1], "child now owns the old tail alone");
    assert_eq!(e.stats().unwrap().counters.intra_device_copy_blocks, 1);
    e.check_invariants();
}

#[test]
fn waiters_are_served_fifo_and_cancel_gives_back() {
    let e = engine(4, false);
    alloc(&e, "a", &toks(0..16)); // all 4 blocks
    let Outcome::Waiting(t1) = e.allocate(rid("w1"), toks(0..8), None, true).unwrap() else {
        panic!()
    };
    let Outcome::Waiting(t2) = e.allocate(rid("w2"), toks(0..4), None, true).unwrap() else {
        panic!()
    };
    assert_eq!(
        e.pressure_level().unwrap(),
        ferrumkv_core::pressure::Level::Critical
    );
    e.deallocate(&rid("a")).unwrap();
    let (done, _) = e.drain_notifications();
    assert_eq!(done, [t1, t2]);
    // w1 is cancelled after its grant: its blocks come back.
    e.cancel_ticket(t1);
    let w2 = e.take_ticket(t2).unwrap();
    assert_eq!(
        w2.block_ids,
        [1],
        "a released tail first: blank queue 3, 2, 1, 0"
    );
    let s = e.stats().unwrap();
    assert_eq!(s.device.used_blocks, 1);
    assert!(!e.contains(&rid("w1")).unwrap());
    e.check_invariants();
}

#[test]
fn extends_are_served_before_allocates() {
    let e = engine(2, false);
    alloc(&e, "a", &toks(0..4));
    alloc(&e, "b", &toks(0..4));
    let Outcome::Waiting(ta) = e.allocate(rid("new"), toks(0..4), None, true).unwrap() else {
        panic!()
    };
    let Outcome::Waiting(tx) = e
        .extend(rid("a"), ferrumkv_core::sequence::Append::Count(1), true)
        .unwrap()
    else {
        panic!()
    };
    e.deallocate(&rid("b")).unwrap();
    let (done, _) = e.drain_notifications();
    assert_eq!(
        done,
        [tx],
        "the decode step goes first; the allocate keeps waiting"
    );
    assert_eq!(e.take_ticket(tx).unwrap().num_tokens, 5);
    e.deallocate(&rid("a")).unwrap();
    assert_eq!(e.drain_notifications().0, [ta]);
    e.check_invariants();
}

#[test]
fn gc_and_reset() {
    let e = engine(8, true);
    alloc(&e, "a", &toks(0..16));
    assert!(!e.reset_prefix_cache().unwrap());
    e.deallocate(&rid("a")).unwrap();
    let g = e.gc(Some(0.75)).unwrap();
    assert_eq!(g.evicted_blocks, 2, "blank share goes from 4/8 to 6/8");
    assert_eq!(g.freed_bytes, 2 * 256);
    assert!(e.reset_prefix_cache().unwrap());
    let s = e.stats().unwrap();
    assert_eq!((s.device.free_blocks, s.device.evictable_blocks), (8, 0));
    assert_eq!(e.drain_events().unwrap().last(), Some(&KvEvent::AllCleared));
}

#[test]
fn residency_is_exact_with_a_manual_clock() {
    let e = engine(2, true);
    alloc(&e, "a", &toks(0..5)); // block 0 full, created at t=0
    e.deallocate(&rid("a")).unwrap();
    e.clock().set(2.0);
    alloc(&e, "b", &toks(0..5)); // hit at t=2
    e.deallocate(&rid("b")).unwrap();
    e.clock().set(7.0);
    alloc(&e, "c", &toks(100..108)); // needs both blocks: evicts block 0 at t=7
    let ev = e.drain_eviction_events().unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].lifetime_seconds, 7.0);
    assert_eq!(ev[0].idle_seconds, 5.0);
    assert_eq!(ev[0].reuse_gaps_seconds, vec![2.0]);
}

#[test]
fn failed_calls_change_nothing() {
    let e = engine(4, true);
    alloc(&e, "a", &toks(0..6));
    let before = (e.stats().unwrap().device, e.stats().unwrap().counters);
    assert!(matches!(
        e.allocate(rid("a"), toks(0..3), None, false),
        Err(Error::DuplicateRequest(_))
    ));
    assert!(matches!(
        e.allocate(rid("x"), vec![], None, false),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        e.allocate(rid("x"), toks(0..17), None, true),
        Err(Error::OutOfBlocks {
            never_fits: true,
            ..
        })
    ));
    assert!(matches!(
        e.allocate(rid("x"), toks(50..60), None, false),
        Err(Error::OutOfBlocks {
            never_fits: false,
            ..
        })
    ));
    assert!(matches!(
        e.deallocate(&rid("zz")),
        Err(Error::UnknownRequest(_))
    ));
    assert!(e
        .read_kv(&rid("a"), 0, 5, &mut [0; 32], &mut [0; 32])
        .is_err());
    assert!(e.write_kv(&rid("a"), 2, 0, &[0; 16], &[0; 16]).is_err());
    assert!(e.fork(&rid("a"), rid("a")).is_err());
    assert_eq!(
        (e.stats().unwrap().device, e.stats().unwrap().counters),
        before
    );
    e.close();
    e.close();
    assert_eq!(e.stats().unwrap_err(), Error::Closed);
}

#[test]
fn a_prompt_that_fits_only_without_its_partial_copy_still_fits() {
    let e = engine(4, true);
    alloc(&e, "a", &toks(0..16));
    e.deallocate(&rid("a")).unwrap();
    // 15 tokens: 3 full hits + a partial copy of block 3 would need a 5th block.
    let b = alloc(&e, "b", &toks(0..15));
    assert_eq!(b.num_cached_tokens, 12);
    assert_eq!(b.block_ids.len(), 4);
    e.check_invariants();
}

#[test]
fn an_extend_past_the_whole_tier_fails_at_once() {
    let e = engine(2, false);
    alloc(&e, "a", &toks(0..8));
    let r = e.extend(rid("a"), ferrumkv_core::sequence::Append::Count(1), true);
    assert!(
        matches!(
            r,
            Err(Error::OutOfBlocks {
                never_fits: true,
                ..
            })
        ),
        "{r:?}"
    );
}
