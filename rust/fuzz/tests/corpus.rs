//! The fuzz target's regression tests: every input of the checked-in corpus (seeds and any
//! crash found since) replays through `run_ops`, then seeded random inputs do (a quick,
//! non-coverage-guided smoke run; `FERRUMKV_FUZZ_SECS` makes it a timed run instead).

use std::path::PathBuf;
use std::time::{Duration, Instant};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/ops")
}

#[test]
fn corpus_replays() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("the corpus directory")
        .map(|e| e.expect("a corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the corpus is empty");
    for f in &files {
        let data = std::fs::read(f).expect("a corpus file");
        eprintln!("{}", f.display());
        ferrumkv_fuzz::run_ops(&data);
    }
}

/// xorshift64*: inputs from a seed, the same on every machine.
fn random_input(state: &mut u64) -> Vec<u8> {
    let mut next = || {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let len = (next() % 600) as usize;
    (0..len).map(|_| next() as u8).collect()
}

#[test]
fn random_inputs() {
    let secs: Option<u64> = std::env::var("FERRUMKV_FUZZ_SECS").ok().map(|s| {
        s.parse()
            .expect("FERRUMKV_FUZZ_SECS is a number of seconds")
    });
    let seed: u64 = std::env::var("FERRUMKV_FUZZ_SEED")
        .ok()
        .map_or(0x00C0_FFEE, |s| {
            s.parse().expect("FERRUMKV_FUZZ_SEED is a number")
        });
    let deadline = secs.map(|s| Instant::now() + Duration::from_secs(s));
    let mut state = seed | 1;
    let mut n = 0u64;
    loop {
        match deadline {
            Some(d) if Instant::now() >= d => break,
            None if n >= 200 => break,
            _ => {}
        }
        let input = random_input(&mut state);
        ferrumkv_fuzz::run_ops(&input);
        n += 1;
    }
    eprintln!("{n} random inputs from seed {seed}");
}
