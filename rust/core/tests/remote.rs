//! The remote tier's engine side: what is staged for the store and when, what an import of
//! fetched values makes cached, and that flush waits for the writer. The store itself is
//! exercised from Python against real servers (tests/test_remote.py).

mod common;

use std::time::Duration;

use common::*;
use ferrumkv_core::clock::Clock;
use ferrumkv_core::config::{CacheConfig, ConfigInput, HashAlgo};
use ferrumkv_core::events::KvEvent;
use ferrumkv_core::prefix::Hasher;
use ferrumkv_core::remote::{decode, encode, Write, HEADER};
use ferrumkv_core::types::Tier;
use ferrumkv_core::Engine;

fn remote_engine(num_blocks: i64, host_blocks: i64, mode: &str) -> Engine {
    let mut c = ConfigInput::small(num_blocks);
    c.host_blocks = host_blocks;
    c.remote_url = Some("redis://127.0.0.1:6379".into());
    c.remote_write = mode.into();
    Engine::with_clock(CacheConfig::validate(&c).unwrap(), Clock::manual(0.0)).unwrap()
}

/// Every layer of the first `n` positions of a sequence, K then V.
fn kv_bytes(e: &Engine, id: &str, n: usize) -> Vec<u8> {
    let mut all = vec![];
    for layer in 0..2 {
        let (mut k, mut v) = (vec![0u8; n * 16], vec![0u8; n * 16]);
        e.read_kv(&rid(id), layer, 0, &mut k, &mut v).unwrap();
        all.extend(k);
        all.extend(v);
    }
    all
}

fn fill_all(e: &Engine, id: &str, n: usize, seed: u8) {
    for layer in 0..2 {
        let k: Vec<u8> = (0..n * 16)
            .map(|i| (i as u8) ^ seed ^ layer as u8)
            .collect();
        let v: Vec<u8> = k.iter().map(|b| b.wrapping_add(1)).collect();
        e.write_kv(&rid(id), layer, 0, &k, &v).unwrap();
    }
}

fn take(e: &Engine) -> Vec<Write> {
    e.take_remote_writes(100, Duration::ZERO).unwrap()
}

#[test]
fn blocks_leaving_the_device_tier_are_staged_and_import_into_another_engine() {
    let a = remote_engine(3, 0, "on_evict");
    let prompt: Vec<u32> = (1..=9).collect(); // 2 full blocks and 1 token
    alloc(&a, "p", &prompt);
    fill_all(&a, "p", 9, 7);
    let want = kv_bytes(&a, "p", 8);
    a.deallocate(&rid("p")).unwrap();
    assert!(take(&a).is_empty(), "nothing leaves while cached");
    alloc(&a, "q", &(100..112).collect::<Vec<_>>()); // takes all 3 blocks: evicts both
    let writes = take(&a);
    assert_eq!(writes.iter().map(|w| w.seq).collect::<Vec<_>>(), [1, 2]);
    let (start, keys) = a.remote_plan(&prompt, None).unwrap();
    assert_eq!(start, 0);
    // Evicted leaves first: the tail block, then its parent.
    assert_eq!(
        writes.iter().map(|w| w.key.clone()).collect::<Vec<_>>(),
        [keys[1].clone(), keys[0].clone()]
    );
    let bpb = 2 * 2 * 4 * 2 * 4 * 2; // block_size x layers x K,V x heads x head_dim x 2 bytes
    for w in &writes {
        assert_eq!(w.value.len(), HEADER + bpb);
        assert!(decode(&w.key, &w.value, bpb).is_ok());
    }
    a.drain_events().unwrap();
    a.finish_remote_writes(&[1, 2], &[1, 2], 0, 0, Duration::from_millis(1));
    // Announced as stored in the remote tier, in the order they were written (one run
    // each: the tail block's parent is the head block).
    let events = a.drain_events().unwrap();
    let stored: Vec<_> = events
        .iter()
        .map(|e| match e {
            KvEvent::Stored {
                block_hashes,
                parent_block_hash,
                token_ids,
                tier,
                ..
            } => (
                block_hashes.clone(),
                *parent_block_hash,
                token_ids.clone(),
                *tier,
            ),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let hashes = Hasher::new(HashAlgo::Xxh3_128).chain(0, &prompt, 4);
    assert_eq!(
        stored,
        [
            (
                vec![hashes[1]],
                Some(hashes[0]),
                (5..=8).collect(),
                Tier::Remote
            ),
            (vec![hashes[0]], None, (1..=4).collect(), Tier::Remote),
        ]
    );

    // Another engine imports them by key, in chain order, and serves the prefix.
    let b = remote_engine(4, 0, "on_evict");
    let (start, keys_b) = b.remote_plan(&prompt, None).unwrap();
    assert_eq!((start, &keys_b), (0, &keys));
    let by_key = |k: &String| {
        writes
            .iter()
            .find(|w| &w.key == k)
            .map(|w| w.value.as_slice())
    };
    let values: Vec<Option<&[u8]>> = keys_b.iter().map(by_key).collect();
    let got = b
        .import_remote(&prompt, None, 0, &values, 2, Duration::from_millis(2))
        .unwrap();
    assert_eq!((got.blocks, got.refused), (2, 0));
    assert_eq!(b.remote_plan(&prompt, None).unwrap(), (2, vec![]));
    let s = alloc(&b, "p", &prompt);
    assert_eq!(s.num_cached_tokens, 8);
    assert_eq!(kv_bytes(&b, "p", 8), want);
    let c = b.stats().unwrap().counters;
    assert_eq!((c.remote_hit_blocks, c.remote_miss_blocks), (2, 0));
    assert_eq!(
        (c.remote_read_bytes, c.remote_read_ns),
        (2 * bpb as u64, 2_000_000)
    );
    b.check_invariants();
}

#[test]
fn a_refused_or_missing_value_ends_the_chain_and_is_a_miss() {
    let b = remote_engine(8, 0, "on_evict");
    let prompt: Vec<u32> = (1..=13).collect(); // 3 full blocks and 1 token
    let (_, keys) = b.remote_plan(&prompt, None).unwrap();
    assert_eq!(keys.len(), 3);
    let bpb = 256;
    let good0 = encode(&keys[0], &[5u8; 256]);
    // Block 1's bytes under block 0's key: intact, but another key's value.
    let swapped = encode(&keys[0], &[6u8; 256]);
    let good2 = encode(&keys[2], &[7u8; 256]);
    let values = [Some(&good0[..]), Some(&swapped[..]), Some(&good2[..])];
    let got = b
        .import_remote(&prompt, None, 0, &values, 3, Duration::ZERO)
        .unwrap();
    assert_eq!((got.blocks, got.refused), (1, 1));
    let truncated = &encode(&keys[1], &[6u8; 256])[..HEADER + bpb - 1];
    let got = b
        .import_remote(
            &prompt,
            None,
            1,
            &[Some(truncated), None],
            2,
            Duration::ZERO,
        )
        .unwrap();
    assert_eq!((got.blocks, got.refused), (0, 1));
    let got = b
        .import_remote(
            &prompt,
            None,
            1,
            &[None, Some(&good2[..])],
            2,
            Duration::ZERO,
        )
        .unwrap();
    assert_eq!(
        (got.blocks, got.refused),
        (0, 0),
        "block 2 cannot chain past a gap"
    );
    // Values fetched for blocks after a prefix that is no longer local are not imported.
    let fresh = remote_engine(8, 0, "on_evict");
    let block1 = encode(&keys[1], &[6u8; 256]);
    let got = fresh
        .import_remote(&prompt, None, 1, &[Some(&block1[..])], 1, Duration::ZERO)
        .unwrap();
    assert_eq!((got.blocks, got.refused), (0, 0));
    assert_eq!(
        fresh
            .lookup_prefix(&prompt, None)
            .unwrap()
            .num_cached_tokens(),
        0
    );
    let c = b.stats().unwrap().counters;
    assert_eq!(
        (
            c.remote_hit_blocks,
            c.remote_miss_blocks,
            c.remote_corrupt_blocks
        ),
        (1, 2 + 2 + 2, 2)
    );
    assert_eq!(alloc(&b, "p", &prompt).num_cached_tokens, 4);
    b.check_invariants();
}

#[test]
fn with_a_host_tier_blocks_go_to_the_store_when_they_leave_it_and_import_into_it() {
    let a = remote_engine(2, 2, "on_evict");
    let p1: Vec<u32> = (1..=5).collect(); // 1 full block each
    let p2: Vec<u32> = (11..=15).collect();
    let p3: Vec<u32> = (21..=25).collect();
    for (id, p) in [("1", &p1), ("2", &p2), ("3", &p3)] {
        alloc(&a, id, p);
        fill_all(&a, id, 5, id.as_bytes()[0]);
        a.deallocate(&rid(id)).unwrap();
    }
    // 2 device blocks: offloads to the host tier keep everything local so far.
    assert!(take(&a).is_empty());
    alloc(&a, "x", &(40..48).collect::<Vec<_>>()); // 2 blocks: offloads 2 more, evicts p1's host copy
    let writes = take(&a);
    let (_, k1) = a.remote_plan(&p1, None).unwrap();
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].key, k1[0]);

    let b = remote_engine(2, 2, "on_evict");
    let v = [Some(&writes[0].value[..])];
    assert_eq!(
        b.import_remote(&p1, None, 0, &v, 1, Duration::ZERO)
            .unwrap()
            .blocks,
        1
    );
    let m = b.lookup_prefix(&p1, None).unwrap();
    assert_eq!(
        (m.device_tokens, m.host_tokens),
        (0, 4),
        "imported into the host tier"
    );
    alloc(&b, "1", &p1);
    let mut want = vec![];
    for layer in 0..2u8 {
        let k: Vec<u8> = (0..4 * 16).map(|i| (i as u8) ^ b'1' ^ layer).collect();
        want.extend(&k);
        want.extend(k.iter().map(|b| b.wrapping_add(1)));
    }
    assert_eq!(kv_bytes(&b, "1", 4), want);
    b.check_invariants();
}

#[test]
fn on_store_stages_what_a_sequence_computed_when_it_is_released() {
    let a = remote_engine(8, 0, "on_store");
    let prompt: Vec<u32> = (1..=9).collect();
    alloc(&a, "p", &prompt);
    fill_all(&a, "p", 9, 3);
    assert!(take(&a).is_empty(), "never before release");
    a.deallocate(&rid("p")).unwrap();
    assert_eq!(take(&a).len(), 2);
    // A request that reuses them computed nothing new: nothing is staged again.
    alloc(&a, "again", &prompt);
    a.deallocate(&rid("again")).unwrap();
    assert!(take(&a).is_empty());
}

#[test]
fn flush_waits_for_writes_queued_and_in_flight() {
    let a = remote_engine(2, 0, "on_evict");
    assert_eq!(a.flush().unwrap(), None);
    alloc(&a, "p", &(1..=5).collect::<Vec<_>>());
    a.deallocate(&rid("p")).unwrap();
    alloc(&a, "q", &(10..18).collect::<Vec<_>>()); // evicts p's block
    let t = a.flush().unwrap().expect("a write is queued");
    let writes = take(&a);
    assert_eq!(writes.len(), 1);
    assert!(
        a.take_flush(t).is_err(),
        "not answered while the write is in flight"
    );
    a.finish_remote_writes(&[writes[0].seq], &[], 1, 1, Duration::ZERO);
    a.take_flush(t).unwrap();
    let c = a.stats().unwrap().counters;
    assert_eq!((c.remote_dropped_writes, c.remote_errors), (1, 1));
    assert_eq!(a.flush().unwrap(), None);
}

#[test]
fn the_writer_wakes_when_writes_are_queued_and_when_the_engine_closes() {
    let a = std::sync::Arc::new(remote_engine(2, 0, "on_evict"));
    let w = {
        let a = a.clone();
        std::thread::spawn(move || a.take_remote_writes(8, Duration::from_secs(30)))
    };
    std::thread::sleep(Duration::from_millis(50));
    alloc(&a, "p", &(1..=5).collect::<Vec<_>>());
    a.deallocate(&rid("p")).unwrap();
    alloc(&a, "q", &(10..18).collect::<Vec<_>>());
    assert_eq!(w.join().unwrap().unwrap().len(), 1);
    let w = {
        let a = a.clone();
        std::thread::spawn(move || a.take_remote_writes(8, Duration::from_secs(30)))
    };
    std::thread::sleep(Duration::from_millis(50));
    a.close();
    assert!(w.join().unwrap().is_err());
}

#[test]
fn on_store_writes_a_swapped_out_sequence_from_its_host_blocks_byte_for_byte() {
    let a = remote_engine(4, 4, "on_store");
    let prompt: Vec<u32> = (1..=9).collect();
    alloc(&a, "p", &prompt);
    fill_all(&a, "p", 9, 5);
    let want = kv_bytes(&a, "p", 8);
    let out = a.swap_out(&rid("p")).unwrap();
    assert_eq!(settle(&a, out).tier, Tier::Host);
    assert!(take(&a).is_empty(), "never before release");
    a.deallocate(&rid("p")).unwrap();
    let writes = take(&a);
    assert_eq!(writes.len(), 2);
    // The values hold the blocks' runs end to end; the device tier's block-major runs are
    // [layer][K|V][positions] per block, so compare by importing into another engine.
    let b = remote_engine(4, 0, "on_evict");
    let (start, keys) = b.remote_plan(&prompt, None).unwrap();
    let values: Vec<Option<&[u8]>> = keys
        .iter()
        .map(|k| {
            writes
                .iter()
                .find(|w| &w.key == k)
                .map(|w| w.value.as_slice())
        })
        .collect();
    let got = b
        .import_remote(&prompt, None, start, &values, 2, Duration::ZERO)
        .unwrap();
    assert_eq!(got.blocks, 2);
    alloc(&b, "p", &prompt);
    assert_eq!(kv_bytes(&b, "p", 8), want);
}

#[test]
fn an_imported_chain_leaves_the_host_tier_leaf_first() {
    // Leaves first: the tier must give up the chain's last block before its parents, as
    // it does for a chain a sequence released (tail first), under every policy.
    for policy in ferrumkv_core::eviction::POLICY_NAMES {
        let mut c = ConfigInput::small(2);
        c.host_blocks = 3;
        c.eviction_policy = policy.into();
        c.remote_url = Some("redis://127.0.0.1:6379".into());
        let e = Engine::with_clock(CacheConfig::validate(&c).unwrap(), Clock::manual(0.0)).unwrap();
        let chain: Vec<u32> = (1..=13).collect(); // 3 full blocks and 1 token
        let (start, keys) = e.remote_plan(&chain, None).unwrap();
        assert_eq!((start, keys.len()), (0, 3));
        let values: Vec<Vec<u8>> = keys.iter().map(|k| encode(k, &[9u8; 256])).collect();
        let v: Vec<Option<&[u8]>> = values.iter().map(|x| Some(&x[..])).collect();
        let done = e
            .import_remote(&chain, None, 0, &v, 3, Duration::ZERO)
            .unwrap();
        assert_eq!(done.blocks, 3, "{policy}");
        let hashes = Hasher::new(HashAlgo::Xxh3_128).chain(0, &chain, 4);
        removed_from(&e, Tier::Host);
        // One more block wanted in the full host tier: the chain's leaf makes room.
        let other: Vec<u32> = (100..=104).collect();
        let (_, k2) = e.remote_plan(&other, None).unwrap();
        let v2 = encode(&k2[0], &[3u8; 256]);
        let done = e
            .import_remote(&other, None, 0, &[Some(&v2[..])], 1, Duration::ZERO)
            .unwrap();
        assert_eq!(done.blocks, 1, "{policy}");
        assert_eq!(
            removed_from(&e, Tier::Host),
            vec![hashes[2]],
            "{policy}: the leaf goes first"
        );
        let m = e.lookup_prefix(&chain, None).unwrap();
        assert_eq!(
            m.host_tokens, 8,
            "{policy}: the first two blocks still serve"
        );
        e.check_invariants();
    }
}
