//! `batch_layout`: exact block tables, lengths, query offsets and slot mappings for mixed
//! prefill / decode / prefix-hit batches; every bad input fails with the documented error
//! and leaves the engine as it was; and, over random batches, every slot equals
//! `block_id * block_size + offset` of the sequence's own blocks.

mod common;

use common::*;
use ferrumkv_core::sequence::Append;
use ferrumkv_core::state::{BatchLayout, NewTokens};
use ferrumkv_core::types::RequestId;
use ferrumkv_core::Error;

fn rids(ids: &[&str]) -> Vec<RequestId> {
    ids.iter().map(|s| rid(s)).collect()
}

/// "d": 5 tokens (blocks 0, 1) then one decode token; "p": a 10-token prompt (blocks 2, 3,
/// 4); "c": p's first 8 tokens and 3 more (blocks 2, 3 shared, 5 new; 8 cached).
fn mixed() -> ferrumkv_core::Engine {
    let e = engine(16, true);
    alloc(&e, "d", &[100, 101, 102, 103, 104]);
    assert_eq!(
        ids(&alloc(&e, "p", &(0..10).collect::<Vec<_>>())),
        [2, 3, 4]
    );
    e.extend_batch_ids(&rids(&["d"]), &[7]).unwrap();
    let c = alloc(&e, "c", &[0, 1, 2, 3, 4, 5, 6, 7, 50, 51, 52]);
    assert_eq!((ids(&c), c.num_cached_tokens), (vec![2, 3, 5], 8));
    e
}

#[test]
fn mixed_prefill_decode_and_prefix_hit_batch() {
    let e = mixed();
    let l = e
        .batch_layout(
            &rids(&["p", "d", "c"]),
            NewTokens::PerRequest(&[10, 1, 3]),
            0,
        )
        .unwrap();
    assert_eq!(
        l,
        BatchLayout {
            num_seqs: 3,
            max_blocks: 3,
            block_table: vec![2, 3, 4, 0, 1, 0, 2, 3, 5],
            seq_lens: vec![10, 6, 11],
            query_start_loc: vec![0, 10, 11, 14],
            // p: positions 0..10 over blocks 2, 3, 4; d: position 5 in block 1;
            // c: positions 8..11 in block 5.
            slot_mapping: vec![8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 5, 20, 21, 22],
            max_query_len: 10,
            max_seq_len: 11,
        }
    );
    // A chunk of p's prompt and one token of the others, padded with -1.
    let l = e
        .batch_layout(&rids(&["d", "p"]), NewTokens::PerRequest(&[1, 2]), -1)
        .unwrap();
    assert_eq!(l.block_table, [0, 1, -1, 2, 3, 4]);
    assert_eq!(l.slot_mapping, [5, 16, 17]);
    assert_eq!(l.query_start_loc, [0, 1, 3]);
    e.check_invariants();
}

#[test]
fn decode_steps_follow_new_blocks() {
    let e = mixed();
    let batch = rids(&["d", "p"]);
    // d has 6 tokens (blocks 0, 1), p 10 (blocks 2, 3, 4): two steps fill d's block 1 and
    // p's block 4; the third takes a new block for each, in batch order (6, then 7).
    let mut slots = vec![];
    for step in 0..3u32 {
        e.extend_batch_ids(&batch, &[40 + step, 60 + step]).unwrap();
        let l = e.batch_layout(&batch, NewTokens::Each(1), 0).unwrap();
        slots.push(l.slot_mapping.clone());
        if step == 2 {
            assert_eq!(l.block_table, [0, 1, 6, 0, 2, 3, 4, 7]);
            assert_eq!(l.seq_lens, [9, 13]);
        }
    }
    assert_eq!(slots, [vec![6, 18], vec![7, 19], vec![24, 28]]);
    e.check_invariants();
}

#[test]
fn empty_batches_and_zero_new_tokens() {
    let e = mixed();
    let l = e.batch_layout(&[], NewTokens::Each(1), 0).unwrap();
    assert_eq!(
        (l.num_seqs, l.max_blocks, l.query_start_loc, l.slot_mapping),
        (0, 0, vec![0], vec![])
    );
    let l = e
        .batch_layout(&rids(&["d"]), NewTokens::Each(0), 0)
        .unwrap();
    assert_eq!((l.query_start_loc, l.slot_mapping), (vec![0, 0], vec![]));
    assert_eq!(l.seq_lens, [6]);
}

#[test]
fn bad_batches_fail_and_change_nothing() {
    let e = engine_with_host(16, 8, true);
    alloc(&e, "a", &[1, 2, 3, 4, 5]);
    alloc(&e, "s", &[9, 9, 9]);
    settle(&e, e.swap_out(&rid("s")).unwrap());
    let before = e.stats().unwrap();
    let cases: Vec<(Vec<RequestId>, Vec<usize>, &str)> = vec![
        (rids(&["a", "zz"]), vec![1, 1], "unknown"),
        (rids(&["a", "s"]), vec![1, 1], "swapped"),
        (rids(&["a"]), vec![6], "past the end"),
        (rids(&["a"]), vec![1, 1], "length"),
        (rids(&["a", "a"]), vec![1, 1], "twice"),
    ];
    for (batch, q, what) in cases {
        let r = e.batch_layout(&batch, NewTokens::PerRequest(&q), 0);
        match (what, r) {
            ("unknown", Err(Error::UnknownRequest(r))) => assert_eq!(r, rid("zz")),
            ("swapped", Err(Error::InvalidState(m))) => assert!(m.contains("swapped out"), "{m}"),
            ("past the end", Err(Error::InvalidArgument(m))) => {
                assert!(m.contains("exceeds its 5 tokens"), "{m}");
            }
            ("length", Err(Error::InvalidArgument(m))) => assert!(m.contains("2 num_new"), "{m}"),
            ("twice", Err(Error::InvalidArgument(m))) => assert!(m.contains("twice"), "{m}"),
            (what, r) => panic!("{what}: {r:?}"),
        }
        let after = e.stats().unwrap();
        assert_eq!(
            (after.counters, after.device, after.num_swapped),
            (before.counters, before.device, before.num_swapped)
        );
    }
    let l = e
        .batch_layout(&rids(&["a"]), NewTokens::Each(5), 0)
        .unwrap();
    assert_eq!(l.slot_mapping, [0, 1, 2, 3, 4]);
    e.check_invariants();
}

#[test]
fn extend_batch_ids_is_all_or_nothing() {
    let e = mixed();
    let before = e.stats().unwrap();
    for (batch, toks) in [
        (rids(&["d", "zz"]), vec![1, 2]),
        (rids(&["d", "d"]), vec![1, 2]),
        (rids(&["d", "p"]), vec![1]),
    ] {
        assert!(e.extend_batch_ids(&batch, &toks).is_err());
        assert_eq!(e.get(&rid("d")).unwrap().unwrap().num_tokens, 6);
        assert_eq!(e.stats().unwrap().counters, before.counters);
    }
    // Two forks sharing a partial tail in one batch: the first copies it, the second then
    // owns the original alone and writes it in place (one copy, not two).
    e.fork(&rid("d"), rid("d2")).unwrap();
    e.extend_batch(&[
        (rid("d"), Append::Ids(vec![1])),
        (rid("d2"), Append::Ids(vec![2])),
    ])
    .unwrap();
    assert_eq!(e.stats().unwrap().counters.intra_device_copy_blocks, 1);
    let l = e
        .batch_layout(&rids(&["d", "d2"]), NewTokens::Each(1), 0)
        .unwrap();
    assert_eq!(l.block_table, [0, 6, 0, 1]);
    assert_eq!(l.slot_mapping, [26, 6]);
    e.check_invariants();
}

#[test]
fn random_batches_map_every_new_token_to_its_own_slot() {
    let mut x: u64 = 7;
    let mut next = move |m: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % m
    };
    let e = engine(512, true);
    let names: Vec<String> = (0..24).map(|i| format!("r{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        let len = 1 + next(40) as u32;
        alloc(
            &e,
            n,
            &(0..len).map(|t| t + 1000 * i as u32).collect::<Vec<_>>(),
        );
    }
    for _ in 0..50 {
        let k = 1 + next(names.len() as u64) as usize;
        let mut batch: Vec<&String> = names.iter().collect();
        for i in 0..k {
            batch.swap(i, i + next((names.len() - i) as u64) as usize);
        }
        batch.truncate(k);
        let ids: Vec<u32> = (0..k).map(|_| next(50_000) as u32).collect();
        let b: Vec<RequestId> = batch.iter().map(|n| rid(n)).collect();
        e.extend_batch_ids(&b, &ids).unwrap();
        let views: Vec<_> = b.iter().map(|r| e.get(r).unwrap().unwrap()).collect();
        let q: Vec<usize> = views
            .iter()
            .map(|v| 1 + next(v.num_tokens as u64) as usize)
            .collect();
        let l = e.batch_layout(&b, NewTokens::PerRequest(&q), -7).unwrap();
        let cols = views.iter().map(|v| v.block_ids.len()).max().unwrap();
        assert_eq!(l.max_blocks, cols);
        let mut want_slots = vec![];
        let mut at = 0;
        for (i, v) in views.iter().enumerate() {
            let row = &l.block_table[i * cols..(i + 1) * cols];
            let mut want_row: Vec<i32> = v.block_ids.iter().map(|&b| b as i32).collect();
            want_row.resize(cols, -7);
            assert_eq!(row, want_row);
            assert_eq!(l.seq_lens[i] as usize, v.num_tokens);
            assert_eq!(l.query_start_loc[i], at);
            at += q[i] as i32;
            for p in v.num_tokens - q[i]..v.num_tokens {
                want_slots.push(i64::from(v.block_ids[p / 4]) * 4 + (p % 4) as i64);
            }
        }
        assert_eq!(l.query_start_loc[k], at);
        assert_eq!(l.slot_mapping, want_slots);
    }
    e.check_invariants();
}
