//! Engine bookkeeping without Python: `cargo bench -p ferrumkv-core --bench bookkeeping`.
//!
//! Medians over rounds of allocate + deallocate of 512-token requests (block_size 16), with
//! the prefix cache off and on (half the requests share a 256-token prefix), so the cost of
//! the engine itself can be told apart from the Python edge.

use std::time::Instant;

use ferrumkv_core::clock::Clock;
use ferrumkv_core::config::{CacheConfig, ConfigInput};
use ferrumkv_core::types::RequestId;
use ferrumkv_core::Engine;

fn engine(prefix: bool) -> Engine {
    let mut c = ConfigInput::small(4096);
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
}
