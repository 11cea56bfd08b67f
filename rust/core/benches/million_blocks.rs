//! The bookkeeping's memory at 1M blocks: `cargo bench -p ferrumkv-core --bench million_blocks`.
//!
//! Design: a one-shot measurement, not a criterion fit. Resident memory (`/proc/self/statm`) is
//! read in a process of its own, so the heap is fresh and nothing of another case lingers:
//! before the engine, after its setup, and once every one of its 1M blocks is cached (32,768
//! prompts of 512 distinct tokens allocated and released, 32 blocks each). The host slab is an
//! anonymous mapping whose pages are never touched here, so it is not resident and the figures
//! are the bookkeeping's bytes per block. The setup time printed is that one setup; the fitted
//! setup time is `bookkeeping`'s `setup/engine_1m_blocks`.
//!
//! Cost: under a second in a release build (`cargo bench`); `cargo test --benches` runs it
//! unoptimized, in a few seconds.

mod common;

use std::time::Instant;

use ferrumkv_core::types::RequestId;

use common::{engine_with, BLOCK_SIZE};

/// Resident memory of this process in bytes (Linux; 0 elsewhere).
fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    const NUM_BLOCKS: usize = 1 << 20;
    const PROMPT_TOKENS: usize = 512;
    let before = rss_bytes();
    let t0 = Instant::now();
    let e = engine_with(true, NUM_BLOCKS as i64, "lru");
    let setup_ms = t0.elapsed().as_secs_f64() * 1e3;
    let after_setup = rss_bytes();
    let num_prompts = NUM_BLOCKS * BLOCK_SIZE / PROMPT_TOKENS;
    for i in 0..num_prompts as u32 {
        let p: Vec<u32> = (0..PROMPT_TOKENS as u32)
            .map(|t| i * PROMPT_TOKENS as u32 + t)
            .collect();
        let rid = RequestId::Int(i64::from(i));
        e.allocate(rid.clone(), p, None, false).unwrap();
        e.deallocate(&rid).unwrap();
    }
    let cached = rss_bytes();
    println!(
        "1M blocks: setup {setup_ms:.1} ms (one shot), {:.0} bytes/block after setup, {:.0} \
         bytes/block with every block cached (slab pages untouched, not resident)",
        (after_setup - before) as f64 / NUM_BLOCKS as f64,
        (cached - before) as f64 / NUM_BLOCKS as f64
    );
}
