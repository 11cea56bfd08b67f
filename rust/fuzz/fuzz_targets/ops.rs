//! The coverage-guided fuzz target over engine operation sequences (see `ferrumkv_fuzz`).
//!
//! Built with `--cfg fuzzing` and sanitizer-coverage flags (`scripts/fuzz.sh`, or
//! `cargo fuzz run ops --fuzz-dir rust/fuzz`, with `-s none` on stable) it is a libFuzzer
//! binary. Built
//! plainly it replays the files (or directories of files) given as arguments through
//! `run_ops`, e.g. a crash libFuzzer found:
//! `cargo run -p ferrumkv-fuzz --bin ops -- crash-…` (add `FERRUMKV_FUZZ_TRACE=1` to see
//! the decoded program).
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferrumkv_fuzz::run_ops(data));

#[cfg(not(fuzzing))]
fn main() {
    let mut files = vec![];
    for arg in std::env::args_os().skip(1) {
        let path = std::path::PathBuf::from(arg);
        if path.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(&path)
                .expect("a readable directory")
                .map(|e| e.expect("a directory entry").path())
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(path);
        }
    }
    if files.is_empty() {
        eprintln!("usage: ops FILE_OR_DIR...  (replays each input through run_ops)");
        std::process::exit(2);
    }
    for f in &files {
        let data = std::fs::read(f).expect("a readable input");
        eprintln!("replaying {} ({} bytes)", f.display(), data.len());
        ferrumkv_fuzz::run_ops(&data);
    }
    eprintln!("{} inputs replayed, no failure", files.len());
}
