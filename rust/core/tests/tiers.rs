//! The host tier: swaps, offload on eviction, onboard on prefix hits, byte for byte.

mod common;

use common::*;
use ferrumkv_core::clock::Clock;
use ferrumkv_core::config::{CacheConfig, ConfigInput};
use ferrumkv_core::{Engine, Error, Outcome};

fn toks(r: std::ops::Range<u32>) -> Vec<u32> {
    r.collect()
}

#[test]
fn swap_round_trip_is_byte_for_byte() {
    let e = engine_with_host(8, 8, true);
    alloc(&e, "a", &toks(0..10));
    let data = [fill(&e, "a", 0, 10, 1), fill(&e, "a", 1, 10, 2)];
    let out = settle(&e, e.swap_out(&rid("a")).unwrap());
    assert_eq!(out.tier, ferrumkv_core::types::Tier::Host);
    assert_eq!(out.block_ids, [0, 1, 2], "host blocks");
    let s = e.stats().unwrap();
    assert_eq!(
        (s.device.used_blocks, s.host.used_blocks, s.num_swapped),
        (0, 3, 1)
    );
    // A swapped sequence cannot be read, extended, forked or swapped out again.
    let mut buf = vec![0u8; 16];
    assert!(matches!(
        e.read_kv(&rid("a"), 0, 0, &mut buf.clone(), &mut buf),
        Err(Error::InvalidState(_))
    ));
    assert!(matches!(
        e.extend(rid("a"), ferrumkv_core::sequence::Append::Count(1), false),
        Err(Error::InvalidState(_))
    ));
    assert!(matches!(
        e.fork(&rid("a"), rid("b")),
        Err(Error::InvalidState(_))
    ));
    assert!(matches!(e.swap_out(&rid("a")), Err(Error::InvalidState(_))));
    // Fill the device with someone else, free it, then swap back in.
    alloc(&e, "x", &toks(100..132));
    e.deallocate(&rid("x")).unwrap();
    let back = settle(&e, e.swap_in(&rid("a")).unwrap());
    assert_eq!(back.tier, ferrumkv_core::types::Tier::Device);
    assert_eq!(read(&e, "a", 0, 10), data[0]);
    assert_eq!(read(&e, "a", 1, 10), data[1]);
    assert!(
        matches!(e.swap_in(&rid("a")), Err(Error::InvalidState(_))),
        "swap_in of a resident one"
    );
    let c = e.stats().unwrap().counters;
    assert_eq!(
        (
            c.swap_out_count,
            c.swap_in_count,
            c.d2h_blocks_copied - c.offload_blocks
        ),
        (1, 1, 3)
    );
    e.check_invariants();
}

#[test]
fn a_full_host_tier_refuses_the_swap_and_keeps_the_sequence() {
    let e = engine_with_host(8, 2, false);
    alloc(&e, "a", &toks(0..10));
    let data = fill(&e, "a", 0, 10, 7);
    let r = e.swap_out(&rid("a"));
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
    alloc(&e, "small", &toks(0..4));
    let e2 = engine_with_host(8, 3, false);
    alloc(&e2, "h", &toks(0..8));
    alloc(&e2, "a", &toks(0..10));
    settle(&e2, e2.swap_out(&rid("h")).unwrap());
    let r = e2.swap_out(&rid("a"));
    assert!(
        matches!(
            r,
            Err(Error::OutOfBlocks {
                never_fits: false,
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(
        read(&e, "a", 0, 10),
        data,
        "the sequence stays resident and intact"
    );
    assert!(e2.get(&rid("a")).unwrap().unwrap().tier == ferrumkv_core::types::Tier::Device);
    e.check_invariants();
    e2.check_invariants();
}

#[test]
fn deallocating_a_swapped_sequence_frees_its_host_blocks() {
    let e = engine_with_host(8, 8, false);
    alloc(&e, "a", &toks(0..10));
    settle(&e, e.swap_out(&rid("a")).unwrap());
    e.deallocate(&rid("a")).unwrap();
    let s = e.stats().unwrap();
    assert_eq!(
        (s.host.used_blocks, s.host.free_blocks, s.num_sequences),
        (0, 8, 0)
    );
    e.check_invariants();
}

#[test]
fn evicted_cached_blocks_are_offloaded_and_onboarded_on_a_hit() {
    let e = engine_with_host(3, 4, true);
    alloc(&e, "a", &toks(0..9)); // blocks 0, 1 cached; 2 holds the tail
    let data = fill(&e, "a", 0, 9, 3);
    e.deallocate(&rid("a")).unwrap();
    // A different 12-token prompt needs all 3 blocks: evicts 1 then 0, offloading both.
    alloc(&e, "b", &toks(500..512));
    let c = e.stats().unwrap().counters;
    assert_eq!(
        (c.evicted_blocks, c.offload_blocks, c.offload_bytes),
        (2, 2, 2 * 256)
    );
    assert_eq!(e.stats().unwrap().host.evictable_blocks, 2);
    e.deallocate(&rid("b")).unwrap();
    // "a"'s prefix is gone from the device but found in the host tier.
    assert_eq!(
        e.lookup_prefix(&toks(0..9), None)
            .unwrap()
            .num_cached_tokens(),
        8
    );
    let a2 = alloc(&e, "a2", &toks(0..9));
    assert_eq!(a2.num_cached_tokens, 8);
    let c = e.stats().unwrap().counters;
    assert_eq!((c.onboard_blocks, c.onboard_bytes), (2, 2 * 256));
    assert_eq!(c.full_reused_blocks, 2);
    assert_eq!(
        read(&e, "a2", 0, 8),
        data[..8 * 16],
        "onboarded bytes are the offloaded ones"
    );
    let g = e.gc(Some(1.0)).unwrap();
    assert_eq!(g.evicted_blocks, 0, "a2's blocks are in use");
    e.deallocate(&rid("a2")).unwrap();
    let g = e.gc(Some(1.0)).unwrap();
    assert_eq!(
        (g.evicted_blocks, g.offloaded_blocks),
        (2, 0),
        "already on the host"
    );
    e.check_invariants();
}

fn big_engine() -> Engine {
    let mut c = ConfigInput::small(2048);
    c.num_layers = 4;
    c.num_kv_heads = 8;
    c.head_dim = 64;
    c.block_size = 16;
    c.host_blocks = 2048;
    Engine::with_clock(CacheConfig::validate(&c).unwrap(), Clock::manual(0.0)).unwrap()
}

#[test]
fn big_swaps_run_on_the_worker_and_finish_through_a_ticket() {
    let e = big_engine(); // 64 KiB blocks
    let n = 64 * 16; // 64 blocks = 4 MiB: above the inline threshold
    alloc(&e, "a", &(0..n as u32).collect::<Vec<_>>());
    let tb = 8 * 64 * 2;
    let k: Vec<u8> = (0..n * tb).map(|i| (i * 7 % 251) as u8).collect();
    e.write_kv(&rid("a"), 3, 0, &k, &k).unwrap();
    let o = e.swap_out(&rid("a")).unwrap();
    assert!(matches!(o, Outcome::Waiting(_)), "{o:?}");
    settle(&e, o);
    let o = e.swap_in(&rid("a")).unwrap();
    assert!(matches!(o, Outcome::Waiting(_)));
    settle(&e, o);
    let (mut ko, mut vo) = (vec![0u8; n * tb], vec![0u8; n * tb]);
    e.read_kv(&rid("a"), 3, 0, &mut ko, &mut vo).unwrap();
    assert!(ko == k && vo == k);
    let c = e.stats().unwrap().counters;
    assert!(c.d2h_transfer_ns > 0 && c.h2d_transfer_ns > 0);
    assert_eq!((c.d2h_transfers, c.h2d_transfers), (1, 1));
    e.check_invariants();
}

#[test]
fn close_with_copies_in_flight_drains_them() {
    let e = big_engine();
    for i in 0..8 {
        alloc(&e, &format!("s{i}"), &(0..1024).collect::<Vec<_>>());
    }
    let tickets: Vec<_> = (0..8)
        .map(|i| e.swap_out(&rid(&format!("s{i}"))).unwrap())
        .collect();
    assert!(tickets.iter().all(|o| matches!(o, Outcome::Waiting(_))));
    e.close();
    assert_eq!(e.stats().unwrap_err(), Error::Closed);
    assert!(matches!(e.swap_out(&rid("s0")), Err(Error::Closed)));
}

#[test]
fn a_sequence_with_an_open_ticket_cannot_be_swapped() {
    let e = engine_with_host(2, 8, false);
    alloc(&e, "a", &toks(0..4));
    alloc(&e, "b", &toks(0..4));
    // "a" waits to grow; "b" leaves, which grants a's extend, not yet taken.
    let Outcome::Waiting(t) = e
        .extend(rid("a"), ferrumkv_core::sequence::Append::Count(4), true)
        .unwrap()
    else {
        panic!()
    };
    assert!(matches!(e.swap_out(&rid("a")), Err(Error::InvalidState(_))));
    e.deallocate(&rid("b")).unwrap();
    assert!(
        matches!(e.swap_out(&rid("a")), Err(Error::InvalidState(_))),
        "granted, not taken"
    );
    e.cancel_ticket(t);
    settle(&e, e.swap_out(&rid("a")).unwrap());
    e.check_invariants();
}

#[test]
fn blocks_onboarded_from_the_host_tier_go_back_to_it_leaf_first() {
    use ferrumkv_core::config::HashAlgo;
    use ferrumkv_core::prefix::Hasher;
    use ferrumkv_core::types::Tier;
    let host_removed = |e: &Engine| removed_from(e, Tier::Host);
    let e = engine_with_host(4, 3, true);
    let a = toks(0..13); // 3 full blocks and 1 token
    let hashes = Hasher::new(HashAlgo::Xxh3_128).chain(0, &a, 4);
    alloc(&e, "a", &a);
    e.deallocate(&rid("a")).unwrap();
    alloc(&e, "b", &toks(100..116)); // 4 blocks: "a"'s 3 cached blocks go to the host tier
    e.deallocate(&rid("b")).unwrap();
    let a2 = alloc(&e, "a2", &a); // all 3 onboarded: the host tier holds them meanwhile
    assert_eq!(a2.num_cached_tokens, 12);
    assert_eq!(e.stats().unwrap().counters.onboard_blocks, 3);
    e.deallocate(&rid("a2")).unwrap();
    assert!(host_removed(&e).is_empty());
    // A swap-out needs one host block of the full host tier, which gives up one of "a"'s:
    // the chain's leaf, as when a sequence releases its blocks.
    alloc(&e, "c", &toks(200..202));
    settle(&e, e.swap_out(&rid("c")).unwrap());
    assert_eq!(host_removed(&e), vec![hashes[2]], "the leaf leaves first");
    e.check_invariants();
}
