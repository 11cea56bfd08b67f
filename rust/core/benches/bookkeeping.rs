//! Engine bookkeeping without Python: `cargo bench -p ferrumkv-core --bench bookkeeping`.
//!
//! Medians over rounds of allocate + deallocate of 512-token requests (block_size 16), with
//! the prefix cache off and on (half the requests share a 256-token prefix), and of a decode
//! step of 256 sequences of 1,024 to 1,088 tokens (`extend_batch_ids` + `batch_layout`), so
//! the cost of the engine itself can be told apart from the Python edge.

use std::time::Instant;

use ferrumkv_core::clock::Clock;
use ferrumkv_core::config::{CacheConfig, ConfigInput};
use ferrumkv_core::state::NewTokens;
use ferrumkv_core::types::RequestId;
use ferrumkv_core::Engine;

fn engine(prefix: bool) -> Engine {
    engine_of(prefix, 4096)
}

fn engine_of(prefix: bool, num_blocks: i64) -> Engine {
    let mut c = ConfigInput::small(num_blocks);
    c.num_layers = 1;
    c.num_kv_heads = 1;
    c.head_dim = 8;
    c.block_size = 16;
    c.enable_prefix_cache = prefix;
    c.enable_kv_events = false;
    Engine::with_clock(CacheConfig::validate(&c).unwrap(), Clock::default()).unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    let mut x: u64 = 42;
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as u32 % 32000
    };
    let shared: Vec<u32> = (0..256).map(|_| next()).collect();
    (0..1000)
        .map(|i| {
            if i % 2 == 0 {
                shared
                    .iter()
                    .copied()
                    .chain((0..256).map(|_| next()))
                    .collect()
            } else {
                (0..512).map(|_| next()).collect()
            }
        })
        .collect()
}

fn median_us(mut round: impl FnMut(), ops: usize, rounds: usize) -> f64 {
    let mut t: Vec<f64> = (0..rounds)
        .map(|_| {
            let t0 = Instant::now();
            round();
            t0.elapsed().as_secs_f64() * 1e6 / ops as f64
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let ps = prompts();
    for prefix in [false, true] {
        let e = engine(prefix);
        let us = median_us(
            || {
                for (i, p) in ps.iter().enumerate() {
                    let rid = RequestId::Int(i as i64);
                    e.allocate(rid.clone(), p.clone(), None, false).unwrap();
                    e.deallocate(&rid).unwrap();
                }
            },
            ps.len(),
            15,
        );
        println!(
            "allocate+deallocate 512 tokens, prefix cache {}: {us:.2} us/request",
            if prefix { "on " } else { "off" }
        );
    }
    let e = engine(true);
    let long: Vec<u32> = (0..32768u32)
        .map(|i| i.wrapping_mul(2654435761) % 32000)
        .collect();
    let us = median_us(
        || {
            e.lookup_prefix(&long, None).unwrap();
        },
        1,
        31,
    );
    println!("hash + lookup of a 32k-token prompt (miss): {us:.1} us");
    decode_step();
}

/// 256 sequences of 1,024 prompt tokens, 64 decode steps a round; each round starts from
/// the same lengths (the sequences are freed and allocated again, untimed).
fn decode_step() {
    const SEQS: usize = 256;
    const STEPS: usize = 64;
    let e = engine_of(true, 2 * SEQS as i64 * 70);
    let rids: Vec<RequestId> = (0..SEQS as i64).map(RequestId::Int).collect();
    let ids: Vec<u32> = (0..SEQS as u32).collect();
    let reset = || {
        for (i, r) in rids.iter().enumerate() {
            let _ = e.deallocate(r);
            let prompt: Vec<u32> = (0..1024).map(|t| t + 10_000 * i as u32).collect();
            e.allocate(r.clone(), prompt, None, false).unwrap();
        }
    };
    let (mut extend, mut both) = (vec![], vec![]);
    for _ in 0..15 {
        reset();
        let t0 = Instant::now();
        for _ in 0..STEPS {
            e.extend_batch_ids(&rids, &ids).unwrap();
        }
        extend.push(t0.elapsed().as_secs_f64() * 1e6 / STEPS as f64);
        reset();
        let t0 = Instant::now();
        for _ in 0..STEPS {
            e.extend_batch_ids(&rids, &ids).unwrap();
            std::hint::black_box(e.batch_layout(&rids, NewTokens::Each(1), 0).unwrap());
        }
        both.push(t0.elapsed().as_secs_f64() * 1e6 / STEPS as f64);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "decode step, 256 sequences: extend_batch_ids {:.1} us, + batch_layout {:.1} us",
        median(extend),
        median(both)
    );
}
