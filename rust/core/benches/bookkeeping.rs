//! Engine bookkeeping without Python: `cargo bench -p ferrumkv-core --bench bookkeeping`.
//!
//! Medians over rounds of allocate + deallocate of 512-token requests (block_size 16), with
//! the prefix cache off and on (half the requests share a 256-token prefix), and of a decode
//! step of 256 sequences of 1,024 to 1,088 tokens (`extend_batch_ids` + `batch_layout`), so
//! the cost of the engine itself can be told apart from the Python edge.
//!
//! Then the engine-only replay of the Mooncake synthetic trace (`benches/data`, prompts only,
//! one request at a time, 60k blocks): nanoseconds per prompt block for hash + lookup +
//! allocate + register + release + evict, beside the floor measured in the same run (hashing
//! the same tokens alone); and the setup of a 1M-block engine with the bytes of bookkeeping
//! per cached block once 1M blocks are cached (resident memory, the untouched slab excluded).

use std::time::Instant;

use ferrumkv_core::clock::Clock;
use ferrumkv_core::config::{CacheConfig, ConfigInput, HashAlgo};
use ferrumkv_core::prefix::Hasher;
use ferrumkv_core::state::NewTokens;
use ferrumkv_core::types::RequestId;
use ferrumkv_core::Engine;

fn engine(prefix: bool) -> Engine {
    engine_of(prefix, 4096)
}

fn engine_of(prefix: bool, num_blocks: i64) -> Engine {
    engine_with(prefix, num_blocks, "lru")
}

fn engine_with(prefix: bool, num_blocks: i64, policy: &str) -> Engine {
    let mut c = ConfigInput::small(num_blocks);
    c.eviction_policy = policy.into();
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
    // `FERRUMKV_BENCH_ONLY=trace` (or `million`, `alloc`) runs that case alone (for a
    // profiler).
    match std::env::var("FERRUMKV_BENCH_ONLY").as_deref() {
        Ok("trace") => return trace_replay(),
        Ok("million") => return million_blocks(),
        Ok("alloc") => {
            let ps = prompts();
            let e = engine(true);
            for _ in 0..200 {
                for (i, p) in ps.iter().enumerate() {
                    let rid = RequestId::Int(i as i64);
                    e.allocate(rid.clone(), p.clone(), None, false).unwrap();
                    e.deallocate(&rid).unwrap();
                }
            }
            return;
        }
        _ => {}
    }
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
    trace_replay();
    // In a process of its own: resident memory is measured from a fresh heap, and the 1M
    // blocks' arrays do not linger in this one.
    let me = std::env::current_exe().expect("the bench binary");
    let status = std::process::Command::new(me)
        .env("FERRUMKV_BENCH_ONLY", "million")
        .status()
        .expect("the 1M-block case runs");
    assert!(status.success());
}

/// The trace's prompts as tokens: each 512-token hash id becomes 512 tokens drawn from the id
/// (equal ids, equal tokens; the last id of a prompt is cut to its `input_length`).
fn trace_prompts() -> Vec<Vec<u32>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../benches/data/mooncake_synthetic_trace.jsonl"
    );
    let text = std::fs::read_to_string(path).expect("benches/data has the synthetic trace");
    let number_after = |line: &str, key: &str| -> usize {
        let at = line.find(key).expect("a trace field") + key.len();
        let digits: String = line[at..]
            .chars()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().expect("a number")
    };
    text.lines()
        .map(|line| {
            let n = number_after(line, "\"input_length\"");
            let ids = &line[line.find("\"hash_ids\"").unwrap()..];
            let ids = &ids[ids.find('[').unwrap() + 1..ids.find(']').unwrap()];
            let mut tokens: Vec<u32> = ids
                .split(',')
                .filter_map(|x| x.trim().parse::<u64>().ok())
                .flat_map(|id| {
                    (0..512u64).map(move |j| {
                        let mut z = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ j;
                        z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                        ((z >> 32) % 128_256) as u32
                    })
                })
                .collect();
            tokens.truncate(n);
            tokens
        })
        .collect()
}

fn trace_replay() {
    let prompts = trace_prompts();
    let blocks: usize = prompts.iter().map(|p| p.len().div_ceil(16)).sum();
    let hasher = Hasher::new(HashAlgo::Xxh3_128);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // Every policy, each beside the floor measured in its own rounds.
    for policy in ferrumkv_core::eviction::POLICY_NAMES {
        let (mut replay, mut floor) = (vec![], vec![]);
        for _ in 0..5 {
            let e = engine_with(true, 60_000, policy);
            let t0 = Instant::now();
            for (i, p) in prompts.iter().enumerate() {
                let rid = RequestId::Int(i as i64);
                e.allocate(rid.clone(), p.clone(), None, false).unwrap();
                e.deallocate(&rid).unwrap();
            }
            replay.push(t0.elapsed().as_secs_f64() * 1e9 / blocks as f64);
            let t0 = Instant::now();
            for p in &prompts {
                std::hint::black_box(hasher.chain(0, p, 16));
            }
            floor.push(t0.elapsed().as_secs_f64() * 1e9 / blocks as f64);
        }
        println!(
            "synthetic trace replay ({} prompts, {blocks} blocks, 60k device blocks, {policy}): \
             {:.0} ns/block; hashing the same tokens alone: {:.0} ns/block",
            prompts.len(),
            median(replay),
            median(floor)
        );
    }
}

/// Resident memory of this process in bytes (Linux).
fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn million_blocks() {
    const N: usize = 1 << 20;
    let before = rss_bytes();
    let t0 = Instant::now();
    let e = engine_of(true, N as i64);
    let setup_ms = t0.elapsed().as_secs_f64() * 1e3;
    let after_setup = rss_bytes();
    // Cache every block: 32,768 prompts of 512 distinct tokens (32 blocks each).
    for i in 0..(N / 32) as u32 {
        let p: Vec<u32> = (0..512).map(|t| i * 512 + t).collect();
        let rid = RequestId::Int(i64::from(i));
        e.allocate(rid.clone(), p, None, false).unwrap();
        e.deallocate(&rid).unwrap();
    }
    let cached = rss_bytes();
    println!(
        "1M blocks: setup {setup_ms:.1} ms, {:.0} bytes/block after setup, {:.0} bytes/block \
         with every block cached (slab pages untouched, not resident)",
        (after_setup - before) as f64 / N as f64,
        (cached - before) as f64 / N as f64
    );
    drop(e);
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
