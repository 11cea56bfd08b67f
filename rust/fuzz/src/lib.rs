//! Fuzzing of the engine: `run_ops` decodes bytes into a small engine and a program of
//! operations on it, runs the program against a model, and panics on the first divergence.
//!
//! What is decoded (with `arbitrary::Unstructured`; exhausted input reads as zeros, so every
//! byte string is a valid program):
//! - the engine: 1..=12 device blocks of 1, 2, 4 or 8 tokens, 1..=2 layers, 1..=2 heads of
//!   1, 2 or 4 dims, uint8 / float16 / float32, block-major or layer-major layout, the prefix
//!   cache on or off (xxh3 or sha256), a host tier of 0..=8 blocks, a disk tier of 0..=8 slots
//!   (a file in a fresh temporary directory; only with a host tier), swaps copied inline or on
//!   the copy worker, any eviction policy;
//! - up to `MAX_OPS` operations over 6 request ids (3 integer, 3 string) and 3 salts (none, a
//!   string, an integer): `allocate` and `extend` (ids or a bare count) with and without
//!   waiting, `extend_batch`, `deallocate`, `fork`, `swap_out` / `swap_in`, `take_ticket` /
//!   `cancel_ticket` of any ticket ever issued (or one never issued) in whatever state it is,
//!   pausing and resuming the copy worker, inline or worker swaps, injected copy faults and
//!   disk faults (failed write, short read, flipped byte), `write_kv` / `read_kv` of any span
//!   (including bad ones), `gc`, `reset_prefix_cache`, `lookup_prefix`, `block_table`,
//!   `can_allocate`, the stats and event calls, the manual clock, and `close`.
//!
//! What is checked:
//! - after every step: `check_invariants`; every live resident sequence reads back, at every
//!   position and layer, the oracle's K/V, a function of (salt, tokens 0..=p) only (the model
//!   "computes" every position an allocate, extend or taken grant hands out, as a forward pass
//!   would, before anything else runs); `stats()` agrees with the model (sequences, swapped,
//!   waiting, used + free == total, evictable <= free); `get` of every request id agrees with
//!   the model (tokens, tier);
//! - every call's result: an error must be the documented kind for that input and model state
//!   (`UnknownRequest`, `DuplicateRequest`, `InvalidState`, `InvalidArgument`, `OutOfBlocks`
//!   with the right `never_fits`, `CopyFailed` exactly when an injected fault hits that copy,
//!   `Closed`), and a failed call (but for a failed copy, which may have evicted cached blocks
//!   to make room) leaves the device and host gauges, the sequences and the waiters as they
//!   were; a panic is always a failure;
//! - prefix hits: a new sequence's cached positions hold its own oracle K/V before it computes
//!   anything, `num_cached_tokens` is at most `lookup_prefix` just before, and is 0 with the
//!   prefix cache off;
//! - tickets: waiting is first come, first served (no prompt is admitted, or extend granted
//!   blocks, past an earlier waiting call; extends before prompts), every completion is one the
//!   model expects, every ticket a deallocation or a copy fails completes with that error, and
//!   take / cancel behave as documented in every ticket state;
//! - at the end: outstanding tickets are taken or cancelled, every sequence is deallocated,
//!   nothing is left on any tier, and the engine closes (then every call is `Closed`).
//!
//! Bounds: at most `MAX_OPS` operations, prompts of at most 27 tokens, extends of at most 6.
//! Background work is made deterministic: the harness waits for the copy worker and the disk
//! threads after each step (a paused copier holds its jobs before they start, so nothing runs
//! behind the model's back), every wait is bounded, and a watchdog aborts the process if one run
//! takes longer than `RUN_LIMIT` (a hang is a crash). The disk writers are two threads, so with
//! an injected write fault which spilled block fails can vary between runs. `pause_copies`
//! also holds inline copies, so while copies are paused the harness only swaps on the worker.
//!
//! Set `FERRUMKV_FUZZ_TRACE=1` to print each decoded operation and its result.

mod decode;
mod model;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use arbitrary::Unstructured;
use ferrumkv_core::clock::Clock;
use ferrumkv_core::config::{CacheConfig, ConfigInput};
use ferrumkv_core::sequence::{Append, SeqView};
use ferrumkv_core::storage::disk::Fault;
use ferrumkv_core::types::{blocks_for, RequestId, Tier};
use ferrumkv_core::waiters::Ticket;
use ferrumkv_core::{Engine, Error, Outcome};

pub use decode::{Op, Setup, MAX_OPS};
use model::{kind, Kind, Model, PhaseM, SeqM, TKind, TState, NUM_RIDS, NUM_SALTS};

/// Longest one `run_ops` may take before the watchdog aborts the process.
pub const RUN_LIMIT: Duration = Duration::from_secs(30);

/// Longest the harness waits for the disk threads to go idle after a step.
const IDLE_LIMIT: Duration = Duration::from_secs(10);

/// Deadline (ms since `EPOCH`) of the run in progress; 0 when none.
static DEADLINE_MS: AtomicU64 = AtomicU64::new(0);
static WATCHDOG: Once = Once::new();

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

/// Starts (once) the thread that aborts the process when a run passes its deadline.
fn arm_watchdog() {
    WATCHDOG.call_once(|| {
        epoch();
        std::thread::Builder::new()
            .name("ferrumkv-fuzz-watchdog".into())
            .spawn(|| loop {
                std::thread::sleep(Duration::from_millis(100));
                let d = DEADLINE_MS.load(Ordering::SeqCst);
                if d != 0 && now_ms() > d {
                    eprintln!(
                        "ferrumkv-fuzz: a run took longer than {RUN_LIMIT:?}: the engine hangs"
                    );
                    std::process::abort();
                }
            })
            .expect("spawning the watchdog");
    });
}

struct Armed;

impl Armed {
    fn new() -> Self {
        arm_watchdog();
        DEADLINE_MS.store(now_ms() + RUN_LIMIT.as_millis() as u64, Ordering::SeqCst);
        Armed
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        DEADLINE_MS.store(0, Ordering::SeqCst);
    }
}

fn trace_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FERRUMKV_FUZZ_TRACE").is_some_and(|v| v != "0"))
}

/// Decodes `data` into an engine and a program, runs it against the model and panics on the
/// first divergence (see the crate header).
pub fn run_ops(data: &[u8]) {
    let _armed = Armed::new();
    let mut u = Unstructured::new(data);
    let setup = Setup::decode(&mut u);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let engine = setup.engine(dir.path());
    if trace_on() {
        eprintln!("setup: {setup:?}");
    }
    let mut h = Harness::new(engine, setup);
    let mut closed = false;
    for step in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let op = Op::decode(&mut u);
        if trace_on() {
            eprintln!("#{step}: {op:?}");
        }
        if let Op::Close = op {
            h.close_now();
            closed = true;
            break;
        }
        h.step(&op);
        h.after_step();
    }
    if !closed {
        h.finish();
    }
}

impl Setup {
    fn engine(&self, dir: &std::path::Path) -> Engine {
        let mut c = ConfigInput::small(self.num_blocks as i64);
        c.block_size = self.block_size as i64;
        c.num_layers = self.layers as i64;
        c.num_kv_heads = self.heads as i64;
        c.head_dim = self.head_dim as i64;
        c.dtype = self.dtype.into();
        c.layout = if self.layer_major {
            "layer_major"
        } else {
            "block_major"
        }
        .into();
        c.enable_prefix_cache = self.prefix;
        c.hash_algo = if self.sha256 { "sha256" } else { "xxh3_128" }.into();
        c.host_blocks = self.host_blocks as i64;
        c.disk_blocks = self.disk_blocks as i64;
        if self.disk_blocks > 0 {
            c.disk_path = Some(dir.join("kv.bin").to_string_lossy().into_owned());
        }
        c.enable_kv_events = self.events;
        c.eviction_policy = self.eviction_policy.into();
        c.residency_sample_rate = 1.0;
        let config = CacheConfig::validate(&c).expect("the decoded config is valid");
        let e = Engine::with_clock(config, Clock::manual(0.0)).expect("the engine starts");
        if self.worker_swaps {
            e.set_inline_copy_bytes(0);
        }
        e
    }
}

/// The gauges a failed call must leave as they were.
#[derive(Debug, PartialEq)]
struct Shape {
    device: ferrumkv_core::stats::TierStats,
    host: ferrumkv_core::stats::TierStats,
    seqs: usize,
    waiting: usize,
}

struct Harness {
    e: Engine,
    s: Setup,
    m: Model,
    /// Token bytes (K or V of one position of one layer).
    tb: usize,
    paused: bool,
    clock: f64,
}

impl Harness {
    fn new(e: Engine, s: Setup) -> Self {
        let tb = s.heads * s.head_dim * s.itemsize();
        Harness {
            e,
            m: Model::new(s.worker_swaps),
            tb,
            paused: false,
            clock: 0.0,
            s,
        }
    }

    fn bs(&self) -> usize {
        self.s.block_size
    }

    fn shape(&self) -> Shape {
        let st = self.e.stats().expect("stats of an open engine");
        Shape {
            device: st.device,
            host: st.host,
            seqs: st.num_sequences,
            waiting: st.num_waiting,
        }
    }

    /// Checks a failed call left every gauge as it was.
    fn unchanged<T: std::fmt::Debug>(&self, what: &str, before: &Shape, r: &Result<T, Error>) {
        if r.is_err() {
            assert_eq!(
                &self.shape(),
                before,
                "{what}: a failed call {r:?} changed the state"
            );
        }
    }

    // ----- the oracle ----------------------------------------------------------------------

    /// The K and V a model computes for `rid` at positions `from..to` of `layer`.
    fn oracle(&self, seq: &SeqM, layer: usize, from: usize, to: usize) -> (Vec<u8>, Vec<u8>) {
        let mut k = Vec::with_capacity((to - from) * self.tb);
        let mut v = Vec::with_capacity((to - from) * self.tb);
        for &d in &seq.digests[from..to] {
            model::kv_bytes(d, layer, self.tb, &mut k, &mut v);
        }
        (k, v)
    }

    /// "Computes" positions `from..` of a sequence just handed out: writes the oracle's K/V.
    fn compute(&self, r: usize, from: usize) {
        let seq = self.m.seqs[r].as_ref().expect("a live sequence");
        let n = seq.digests.len();
        if from >= n {
            return;
        }
        for layer in 0..self.s.layers {
            let (k, v) = self.oracle(seq, layer, from, n);
            self.e
                .write_kv(&model::rid(r), layer, from, &k, &v)
                .unwrap_or_else(|e| panic!("computing r{r} {from}..{n}, layer {layer}: {e:?}"));
        }
    }

    /// Checks that positions `from..to` of `layer` of `rid` hold the oracle's K/V.
    fn check_span(&self, r: usize, layer: usize, from: usize, to: usize, why: &str) {
        if from >= to {
            return;
        }
        let seq = self.m.seqs[r].as_ref().expect("a live sequence");
        let (want_k, want_v) = self.oracle(seq, layer, from, to);
        let (mut k, mut v) = (vec![0u8; want_k.len()], vec![0u8; want_v.len()]);
        self.e
            .read_kv(&model::rid(r), layer, from, &mut k, &mut v)
            .unwrap_or_else(|e| panic!("{why}: read_kv of r{r} {from}..{to}: {e:?}"));
        for p in from..to {
            let at = (p - from) * self.tb..(p - from + 1) * self.tb;
            assert!(
                k[at.clone()] == want_k[at.clone()] && v[at.clone()] == want_v[at],
                "{why}: r{r} layer {layer} position {p} holds K/V that are not its own \
                 (tokens {:?}, salt {})",
                &seq.tokens[..=p],
                seq.salt
            );
        }
    }

    /// A new sequence was handed out: its cached prefix must already hold its own K/V; the
    /// rest is computed now.
    fn admitted(&mut self, r: usize, salt: usize, tokens: &[u32], v: &SeqView, lookup: usize) {
        let bs = self.bs();
        assert_eq!(v.num_tokens, tokens.len(), "admitted r{r}: tokens");
        assert_eq!(v.tier, Tier::Device, "admitted r{r}: tier");
        assert_eq!(
            v.block_ids.len(),
            blocks_for(tokens.len(), bs),
            "admitted r{r}: blocks"
        );
        assert!(
            v.num_cached_tokens < tokens.len(),
            "admitted r{r}: {} of {} tokens cached (one is always computed)",
            v.num_cached_tokens,
            tokens.len()
        );
        assert!(
            v.num_cached_tokens <= lookup,
            "admitted r{r}: {} cached tokens, lookup_prefix said {lookup}",
            v.num_cached_tokens
        );
        if !self.s.prefix {
            assert_eq!(v.num_cached_tokens, 0, "a hit with the prefix cache off");
        }
        self.m.seqs[r] = Some(SeqM::new(salt, tokens));
        for layer in 0..self.s.layers {
            self.check_span(r, layer, 0, v.num_cached_tokens, "a prefix hit");
        }
        self.compute(r, v.num_cached_tokens);
    }

    /// A sequence grew by `tokens` (model ids): they are computed now.
    fn extended(&mut self, r: usize, tokens: &[u32], v: &SeqView) {
        let seq = self.m.seqs[r].as_mut().expect("a live sequence");
        let from = seq.tokens.len();
        seq.grow(tokens);
        assert_eq!(v.num_tokens, seq.tokens.len(), "extended r{r}: tokens");
        assert_eq!(
            v.block_ids.len(),
            blocks_for(seq.tokens.len(), self.s.block_size),
            "extended r{r}: blocks"
        );
        self.compute(r, from);
    }

    fn lookup(&self, salt: usize, tokens: &[u32]) -> usize {
        let n = self
            .e
            .lookup_prefix(tokens, model::salt(salt).as_ref())
            .expect("lookup_prefix of an open engine")
            .num_cached_tokens();
        if tokens.is_empty() || !self.s.prefix {
            assert_eq!(n, 0, "lookup_prefix of {tokens:?}");
        } else {
            assert!(
                n < tokens.len(),
                "lookup_prefix {n} of {} tokens",
                tokens.len()
            );
        }
        n
    }

    // ----- one step ------------------------------------------------------------------------

    fn step(&mut self, op: &Op) {
        match op {
            Op::Allocate {
                rid,
                salt,
                tokens,
                wait,
            } => self.allocate(*rid, *salt, tokens, *wait),
            Op::Extend {
                rid,
                tokens,
                by_count,
                wait,
            } => self.extend(*rid, tokens, *by_count, *wait),
            Op::ExtendBatch { items } => self.extend_batch(items),
            Op::Deallocate { rid } => self.deallocate(*rid),
            Op::Fork { parent, child } => self.fork(*parent, *child),
            Op::Swap { rid, out } => self.swap(*rid, *out),
            Op::Take { pick } => self.take(*pick),
            Op::Cancel { pick } => self.cancel(*pick),
            Op::PauseCopies(on) => self.pause(*on),
            Op::InlineSwaps(on) => {
                self.e.set_inline_copy_bytes(if *on {
                    ferrumkv_core::engine::INLINE_COPY_BYTES
                } else {
                    0
                });
                self.m.worker_swaps = !on;
            }
            Op::CopyFaults(n) => {
                self.e.inject_copy_faults(u32::from(*n));
                self.m.copy_faults = u32::from(*n);
            }
            Op::DiskFault { kind, slot, offset } => self.disk_fault(*kind, *slot, *offset),
            Op::WriteKv {
                rid,
                layer,
                start,
                n,
                bad_len,
            } => self.write_kv(*rid, *layer, *start, *n, *bad_len),
            Op::ReadKv {
                rid,
                layer,
                start,
                n,
            } => self.read_kv(*rid, *layer, *start, *n),
            Op::Gc { ratio } => self.gc(*ratio),
            Op::Reset => self.reset(),
            Op::Lookup { salt, tokens } => {
                self.lookup(*salt, tokens);
            }
            Op::BlockTable { rids } => self.block_table(rids),
            Op::CanAllocate { n } => self.can_allocate(*n),
            Op::Stats { subscribe } => self.stats_calls(*subscribe),
            Op::Clock { dt } => {
                self.clock += f64::from(*dt) * 0.25;
                self.e.clock().set(self.clock);
            }
            Op::Close => unreachable!("handled by run_ops"),
        }
    }

    fn allocate(&mut self, r: usize, salt: usize, tokens: &[u32], wait: bool) {
        let what = format!("allocate r{r} {tokens:?} salt {salt} wait={wait}");
        let lookup = self.lookup(salt, tokens);
        let before = self.shape();
        let pending = self.m.num_pending();
        let res = self.e.allocate(
            model::rid(r),
            tokens.to_vec(),
            model::salt(salt).as_ref(),
            wait,
        );
        self.trace(&what, &res);
        let taken = self.m.seqs[r].is_some() || self.m.open_ticket(r).is_some();
        let never = blocks_for(tokens.len(), self.bs()) > self.s.num_blocks;
        match &res {
            Err(e) => {
                let want = if tokens.is_empty() {
                    Kind::InvalidArgument
                } else if taken {
                    Kind::Duplicate
                } else if never {
                    Kind::NeverFits
                } else {
                    assert!(
                        !wait,
                        "{what}: a waiting allocate that fits the tier failed: {e:?}"
                    );
                    Kind::Short
                };
                assert_eq!(kind(e), want, "{what}: {e:?}");
                self.unchanged(&what, &before, &res);
            }
            Ok(o) => {
                assert!(
                    !tokens.is_empty() && !taken && !never,
                    "{what}: succeeded with {o:?}"
                );
                match o {
                    Outcome::Ready(v) => {
                        assert_eq!(pending, 0, "{what}: a new prompt overtook a waiting call");
                        let v = v.clone();
                        self.admitted(r, salt, tokens, &v, lookup);
                    }
                    Outcome::Waiting(t) => {
                        assert!(wait, "{what}: waits though wait=false");
                        self.m.push_ticket(
                            *t,
                            TKind::Alloc {
                                rid: r,
                                salt,
                                tokens: tokens.to_vec(),
                            },
                            TState::Pending,
                        );
                    }
                }
            }
        }
    }

    fn extend(&mut self, r: usize, tokens: &[u32], by_count: bool, wait: bool) {
        let what = format!("extend r{r} {tokens:?} by_count={by_count} wait={wait}");
        let append = if by_count {
            Append::Count(tokens.len())
        } else {
            Append::Ids(tokens.to_vec())
        };
        let before = self.shape();
        let res = self.e.extend(model::rid(r), append.clone(), wait);
        self.trace(&what, &res);
        let bs = self.bs();
        let expected = if self.m.open_ticket(r).is_some() {
            Some(Kind::InvalidState)
        } else {
            match &self.m.seqs[r] {
                None => Some(Kind::Unknown),
                Some(s) if s.phase != PhaseM::Resident => Some(Kind::InvalidState),
                Some(_) => None,
            }
        };
        let Some(seq) = self.m.seqs[r].as_ref().filter(|_| expected.is_none()) else {
            let want = expected.expect("checked");
            match &res {
                Err(e) => assert_eq!(kind(e), want, "{what}: {e:?}"),
                Ok(o) => panic!("{what}: succeeded with {o:?}, expected {want:?}"),
            }
            self.unchanged(&what, &before, &res);
            return;
        };
        let len = seq.tokens.len();
        let grows = blocks_for(len + tokens.len(), bs) > blocks_for(len, bs);
        let never = blocks_for(len + tokens.len(), bs) > self.s.num_blocks;
        let extend_waits = self.m.pending_extends() > 0;
        match &res {
            Err(e) => {
                let want = if wait && never {
                    Kind::NeverFits
                } else {
                    assert!(!wait, "{what}: a waiting extend that fits failed: {e:?}");
                    Kind::Short
                };
                assert_eq!(kind(e), want, "{what}: {e:?}");
                self.unchanged(&what, &before, &res);
            }
            Ok(Outcome::Ready(v)) => {
                assert!(
                    !(grows && extend_waits),
                    "{what}: an extend needing blocks overtook a waiting extend"
                );
                assert!(!(wait && never), "{what}: ready though it never fits");
                let ids = self.m.ids_for(tokens, by_count);
                let v = v.clone();
                self.extended(r, &ids, &v);
            }
            Ok(Outcome::Waiting(t)) => {
                assert!(wait, "{what}: waits though wait=false");
                assert!(!never, "{what}: waits though it never fits");
                let ids = self.m.ids_for(tokens, by_count);
                self.m.push_ticket(
                    *t,
                    TKind::Extend {
                        rid: r,
                        tokens: ids,
                    },
                    TState::Pending,
                );
            }
        }
    }

    fn extend_batch(&mut self, items: &[(usize, Vec<u32>, bool)]) {
        let what = format!("extend_batch {items:?}");
        let batch: Vec<(RequestId, Append)> = items
            .iter()
            .map(|(r, t, c)| {
                let a = if *c {
                    Append::Count(t.len())
                } else {
                    Append::Ids(t.clone())
                };
                (model::rid(*r), a)
            })
            .collect();
        let before = self.shape();
        let res = self.e.extend_batch(&batch);
        self.trace(&what, &res);
        let mut expected = None;
        let mut seen = [false; NUM_RIDS];
        let mut grows = false;
        for (r, t, _) in items {
            let r = *r;
            let e = if std::mem::replace(&mut seen[r], true) {
                Some(Kind::InvalidArgument)
            } else if self.m.open_ticket(r).is_some() {
                Some(Kind::InvalidState)
            } else {
                match &self.m.seqs[r] {
                    None => Some(Kind::Unknown),
                    Some(s) if s.phase != PhaseM::Resident => Some(Kind::InvalidState),
                    Some(s) => {
                        let len = s.tokens.len();
                        grows |= blocks_for(len + t.len(), self.bs()) > blocks_for(len, self.bs());
                        None
                    }
                }
            };
            if e.is_some() {
                expected = e;
                break;
            }
        }
        match (&res, expected) {
            (Err(e), Some(want)) => assert_eq!(kind(e), want, "{what}: {e:?}"),
            (Ok(()), Some(want)) => panic!("{what}: succeeded, expected {want:?}"),
            (Err(e), None) => assert_eq!(kind(e), Kind::Short, "{what}: {e:?}"),
            (Ok(()), None) => {
                assert!(
                    !(grows && self.m.pending_extends() > 0),
                    "{what}: a batch needing blocks overtook a waiting extend"
                );
                for (r, t, c) in items {
                    let ids = self.m.ids_for(t, *c);
                    let v = self
                        .e
                        .get(&model::rid(*r))
                        .expect("get")
                        .expect("a batch member is live");
                    self.extended(*r, &ids, &v);
                }
            }
        }
        self.unchanged(&what, &before, &res);
    }

    fn deallocate(&mut self, r: usize) {
        let what = format!("deallocate r{r}");
        let before = self.shape();
        let res = self.e.deallocate(&model::rid(r));
        self.trace(&what, &res);
        let moving = matches!(
            self.m.seqs[r].as_ref().map(|s| &s.phase),
            Some(PhaseM::Moving { .. })
        );
        let open = self.m.open_ticket(r);
        if moving {
            match &res {
                Err(e) => assert_eq!(kind(e), Kind::InvalidState, "{what}: {e:?}"),
                Ok(()) => panic!("{what}: a moving sequence was deallocated"),
            }
        } else if self.m.seqs[r].is_none() && open.is_none() {
            match &res {
                Err(e) => assert_eq!(kind(e), Kind::Unknown, "{what}: {e:?}"),
                Ok(()) => panic!("{what}: an unknown request was deallocated"),
            }
        } else {
            res.as_ref().unwrap_or_else(|e| panic!("{what}: {e:?}"));
            self.m.seqs[r] = None;
            if let Some(t) = open {
                self.m.fail(t, Kind::InvalidState);
            }
        }
        self.unchanged(&what, &before, &res);
    }

    fn fork(&mut self, p: usize, c: usize) {
        let what = format!("fork r{p} -> r{c}");
        let before = self.shape();
        let res = self.e.fork(&model::rid(p), model::rid(c));
        self.trace(&what, &res);
        let want = match &self.m.seqs[p] {
            None => Some(Kind::Unknown),
            Some(s) if s.phase != PhaseM::Resident => Some(Kind::InvalidState),
            Some(_) if self.m.open_ticket(p).is_some() => Some(Kind::InvalidState),
            Some(_) if self.m.seqs[c].is_some() || self.m.open_ticket(c).is_some() => {
                Some(Kind::Duplicate)
            }
            Some(_) => None,
        };
        match (&res, want) {
            (Err(e), Some(w)) => assert_eq!(kind(e), w, "{what}: {e:?}"),
            (Ok(v), Some(w)) => panic!("{what}: succeeded with {v:?}, expected {w:?}"),
            (Err(e), None) => panic!("{what}: {e:?}"),
            (Ok(v), None) => {
                let gen = self.m.next_gen();
                let parent = self.m.seqs[p].as_ref().expect("checked");
                assert_eq!(v.num_tokens, parent.tokens.len(), "{what}");
                let child = SeqM {
                    gen,
                    ..parent.clone()
                };
                self.m.seqs[c] = Some(child);
            }
        }
        self.unchanged(&what, &before, &res);
    }

    fn swap(&mut self, r: usize, out: bool) {
        let what = format!("swap_{} r{r}", if out { "out" } else { "in" });
        if self.paused && !self.m.worker_swaps {
            // `pause_copies` holds inline copies too: the call would wait for a resume that
            // this (single) thread would never make.
            if trace_on() {
                eprintln!("  {what}: skipped (an inline copy waits while copies are paused)");
            }
            return;
        }
        let before = self.shape();
        let res = if out {
            self.e.swap_out(&model::rid(r))
        } else {
            self.e.swap_in(&model::rid(r))
        };
        self.trace(&what, &res);
        let bs = self.bs();
        let want = match &self.m.seqs[r] {
            None => Some(Kind::Unknown),
            Some(s) => match (&s.phase, out) {
                (PhaseM::Moving { .. }, _)
                | (PhaseM::Swapped, true)
                | (PhaseM::Resident, false) => Some(Kind::InvalidState),
                (PhaseM::Resident, true) if self.m.open_ticket(r).is_some() => {
                    Some(Kind::InvalidState)
                }
                (PhaseM::Resident, true) if self.s.host_blocks == 0 => Some(Kind::InvalidState),
                _ => {
                    let need = blocks_for(s.tokens.len(), bs);
                    let total = if out {
                        self.s.host_blocks
                    } else {
                        self.s.num_blocks
                    };
                    (need > total).then_some(Kind::NeverFits)
                }
            },
        };
        match (&res, want) {
            (Err(e), Some(w)) => {
                assert_eq!(kind(e), w, "{what}: {e:?}");
                self.unchanged(&what, &before, &res);
            }
            (Ok(o), Some(w)) => panic!("{what}: succeeded with {o:?}, expected {w:?}"),
            (Err(e), None) => match kind(e) {
                Kind::Short => self.unchanged(&what, &before, &res),
                Kind::CopyFailed => {
                    assert!(
                        !self.m.worker_swaps && self.m.copy_faults > 0,
                        "{what}: a copy failed with no fault injected: {e:?}"
                    );
                    self.m.copy_faults -= 1;
                }
                k => panic!("{what}: {e:?} ({k:?})"),
            },
            (Ok(Outcome::Ready(v)), None) => {
                assert!(!self.m.worker_swaps, "{what}: copied inline");
                assert!(
                    self.m.copy_faults == 0,
                    "{what}: an injected copy fault did not fail the copy"
                );
                let tier = if out { Tier::Host } else { Tier::Device };
                assert_eq!(v.tier, tier, "{what}");
                let gen = self.m.next_gen();
                let s = self.m.seqs[r].as_mut().expect("checked");
                s.phase = if out {
                    PhaseM::Swapped
                } else {
                    PhaseM::Resident
                };
                s.gen = gen;
            }
            (Ok(Outcome::Waiting(t)), None) => {
                assert!(self.m.worker_swaps, "{what}: handed to the worker");
                let gen = self.m.next_gen();
                let s = self.m.seqs[r].as_mut().expect("checked");
                s.phase = PhaseM::Moving { out };
                s.gen = gen;
                self.m.push_ticket(
                    *t,
                    TKind::Swap { rid: r, out },
                    TState::Moving { abandoned: false },
                );
                self.m.jobs.push(*t);
                if !self.paused {
                    self.e.wait_copies_idle();
                    self.m.run_jobs();
                }
            }
        }
    }

    fn pause(&mut self, on: bool) {
        self.e.pause_copies(on);
        self.paused = on;
        if !on {
            self.e.wait_copies_idle();
            self.m.run_jobs();
        }
    }

    /// Picks a ticket ever issued, or (past the end) one never issued.
    fn pick(&self, pick: usize) -> Ticket {
        let n = self.m.tickets.len();
        match pick % (n + 1) {
            i if i < n => self.m.tickets[i].id,
            _ => 1_000_000 + pick as Ticket,
        }
    }

    fn take(&mut self, pick: usize) {
        let t = self.pick(pick);
        let what = format!("take ticket {t}");
        let res = self.e.take_ticket(t);
        self.trace(&what, &res);
        let Some(i) = self.m.find(t) else {
            match &res {
                Err(e) => assert_eq!(kind(e), Kind::InvalidState, "{what}: {e:?}"),
                Ok(v) => panic!("{what}: a never-issued ticket gave {v:?}"),
            }
            return;
        };
        let tm = self.m.tickets[i].clone();
        match (&tm.state, &res) {
            (TState::Pending | TState::Moving { .. } | TState::Gone, Err(e)) => {
                assert_eq!(kind(e), Kind::InvalidState, "{what} ({tm:?}): {e:?}");
            }
            (TState::Failed(k), Err(e)) => {
                assert_eq!(kind(e), *k, "{what} ({tm:?}): {e:?}");
                self.m.tickets[i].state = TState::Gone;
            }
            (TState::Granted, Ok(v)) => {
                self.m.tickets[i].state = TState::Gone;
                let v = v.clone();
                match &tm.kind {
                    TKind::Alloc { rid, salt, tokens } => {
                        // Granted blocks were reserved when served; bound the hit by what a
                        // lookup would find now plus what the grant may have kept.
                        let lookup = tokens.len();
                        self.admitted(*rid, *salt, tokens, &v, lookup);
                    }
                    TKind::Extend { rid, tokens } => self.extended(*rid, tokens, &v),
                    TKind::Swap { .. } => unreachable!("swaps are never granted"),
                }
            }
            (TState::Moved { rid, gen, out }, r) => {
                self.m.tickets[i].state = TState::Gone;
                match (&self.m.seqs[*rid], r) {
                    (Some(s), Ok(v)) if s.gen == *gen => {
                        let tier = if *out { Tier::Host } else { Tier::Device };
                        assert_eq!(v.tier, tier, "{what} ({tm:?})");
                        assert_eq!(v.num_tokens, s.tokens.len(), "{what} ({tm:?})");
                    }
                    (Some(_), Ok(_)) => {} // the request moved again or was reused since
                    (None, Err(e)) => assert_eq!(kind(e), Kind::Unknown, "{what}: {e:?}"),
                    (_, r) => panic!("{what} ({tm:?}): {r:?}"),
                }
            }
            (_, r) => panic!("{what} ({tm:?}): {r:?}"),
        }
    }

    fn cancel(&mut self, pick: usize) {
        let t = self.pick(pick);
        if trace_on() {
            eprintln!("  cancel ticket {t}");
        }
        self.e.cancel_ticket(t);
        if let Some(i) = self.m.find(t) {
            let st = &mut self.m.tickets[i].state;
            *st = match st {
                TState::Moving { .. } => TState::Moving { abandoned: true },
                _ => TState::Gone,
            };
        }
    }

    fn disk_fault(&mut self, which: u8, slot: u8, offset: u16) {
        let bpb = self.s.layers * 2 * self.s.block_size * self.tb;
        let slots = self.s.disk_blocks.max(1);
        let slot = match slot {
            0..=239 => usize::from(slot) % slots,
            s => slots + usize::from(s % 3),
        };
        let offset = match offset {
            0..=0xEFFF => usize::from(offset) % bpb,
            o => bpb + usize::from(o % 7),
        };
        let fault = match which {
            0 => Fault::FailNextWrite,
            1 => Fault::ShortNextRead,
            _ => Fault::FlipByte { slot, offset },
        };
        let what = format!("inject_disk_fault {fault:?}");
        let res = self.e.inject_disk_fault(fault);
        self.trace(&what, &res);
        let bad = self.s.disk_blocks == 0
            || (which >= 2 && (slot >= self.s.disk_blocks || offset >= bpb));
        match &res {
            Err(e) => {
                assert!(bad, "{what}: {e:?}");
                assert_eq!(kind(e), Kind::InvalidArgument, "{what}: {e:?}");
            }
            Ok(()) => assert!(!bad, "{what}: accepted"),
        }
    }

    /// The error `write_kv` / `read_kv` must give for this span, if any.
    fn kv_span_error(
        &self,
        r: usize,
        layer: usize,
        start: usize,
        n: usize,
        bad_len: bool,
    ) -> Option<Kind> {
        if bad_len {
            return Some(Kind::InvalidArgument);
        }
        match &self.m.seqs[r] {
            None => Some(Kind::Unknown),
            Some(s) if s.phase != PhaseM::Resident => Some(Kind::InvalidState),
            Some(_) if layer >= self.s.layers => Some(Kind::InvalidArgument),
            Some(s) if start + n > s.tokens.len() => Some(Kind::InvalidArgument),
            Some(_) => None,
        }
    }

    /// A span of `rid`'s positions: mostly inside the sequence, sometimes past its end.
    fn span(&self, r: usize, start: usize, n: usize) -> (usize, usize) {
        let len = self.m.seqs[r].as_ref().map_or(0, |s| s.tokens.len());
        if len == 0 || start >= 200 {
            return (start % 40, n);
        }
        let start = start % len;
        (start, 1 + n % (len - start))
    }

    fn write_kv(&mut self, r: usize, layer: usize, start: usize, n: usize, bad_len: bool) {
        let (start, n) = self.span(r, start, n);
        let what = format!("write_kv r{r} layer {layer} {start}+{n} bad_len={bad_len}");
        let want = self.kv_span_error(r, layer, start, n, bad_len);
        let (k, v) = match (&self.m.seqs[r], want) {
            (Some(s), None) => self.oracle(s, layer, start, start + n),
            _ => (vec![7u8; n * self.tb], vec![7u8; n * self.tb]),
        };
        let mut k = k;
        if bad_len {
            k.push(0); // k and v differ in length, and k is no whole number of positions
        }
        let before = self.shape();
        let res = self.e.write_kv(&model::rid(r), layer, start, &k, &v);
        self.trace(&what, &res);
        match (&res, want) {
            (Err(e), Some(w)) => assert_eq!(kind(e), w, "{what}: {e:?}"),
            (Ok(()), Some(w)) => panic!("{what}: accepted, expected {w:?}"),
            (Err(e), None) => assert_eq!(kind(e), Kind::Short, "{what}: {e:?}"),
            (Ok(()), None) => {}
        }
        self.unchanged(&what, &before, &res);
    }

    fn read_kv(&mut self, r: usize, layer: usize, start: usize, n: usize) {
        let (start, n) = self.span(r, start, n);
        let what = format!("read_kv r{r} layer {layer} {start}+{n}");
        let want = self.kv_span_error(r, layer, start, n, false);
        match want {
            None => self.check_span(r, layer, start, start + n, &what),
            Some(w) => {
                let (mut k, mut v) = (vec![0u8; n * self.tb], vec![0u8; n * self.tb]);
                let res = self.e.read_kv(&model::rid(r), layer, start, &mut k, &mut v);
                self.trace(&what, &res);
                match &res {
                    Err(e) => assert_eq!(kind(e), w, "{what}: {e:?}"),
                    Ok(()) => panic!("{what}: read, expected {w:?}"),
                }
            }
        }
    }

    fn gc(&mut self, ratio: u8) {
        let target = match ratio {
            0 => None,
            r => Some(f64::from(r - 1) / 4.0), // 1..=5: 0.0 ..= 1.0; 6: 1.25 (invalid)
        };
        let what = format!("gc {target:?}");
        let before = self.shape();
        let res = self.e.gc(target);
        self.trace(&what, &res);
        let bad = target.is_some_and(|t| t > 1.0);
        match &res {
            Err(e) => {
                assert!(bad, "{what}: {e:?}");
                assert_eq!(kind(e), Kind::InvalidArgument, "{what}");
                self.unchanged(&what, &before, &res);
            }
            Ok(g) => {
                assert!(!bad, "{what}: accepted");
                let bpb = self.s.layers * 2 * self.s.block_size * self.tb;
                assert_eq!(g.freed_bytes, g.evicted_blocks * bpb, "{what}");
                assert!(g.offloaded_blocks <= g.evicted_blocks, "{what}: {g:?}");
                let after = self.shape();
                assert_eq!(
                    (after.device.free_blocks, after.seqs, after.waiting),
                    (before.device.free_blocks, before.seqs, before.waiting),
                    "{what}: gc changed more than cached blocks"
                );
            }
        }
    }

    fn reset(&mut self) {
        let res = self.e.reset_prefix_cache();
        self.trace("reset_prefix_cache", &res);
        let idle = self.m.seqs.iter().all(Option::is_none)
            && (0..NUM_RIDS).all(|r| self.m.open_ticket(r).is_none());
        let done = res.expect("reset_prefix_cache of an open engine");
        assert_eq!(done, idle, "reset_prefix_cache with the model idle={idle}");
        if done {
            for salt in 0..NUM_SALTS {
                let tokens = decode::prompt_of(&[0, 1, 2, 3], &[1]);
                assert_eq!(self.lookup(salt, &tokens), 0, "a hit after a reset");
            }
            let st = self.e.stats().expect("stats");
            assert_eq!(
                st.device.evictable_blocks, 0,
                "evictable blocks after a reset"
            );
            assert_eq!(
                st.host.evictable_blocks, 0,
                "evictable host blocks after a reset"
            );
        }
    }

    fn block_table(&mut self, rids: &[usize]) {
        let ids: Vec<RequestId> = rids.iter().map(|&r| model::rid(r)).collect();
        let what = format!("block_table {rids:?}");
        let res = self.e.block_table(&ids, -1);
        self.trace(&what, &res);
        let want = rids.iter().find_map(|&r| match &self.m.seqs[r] {
            None => Some(Kind::Unknown),
            Some(s) if s.phase != PhaseM::Resident => Some(Kind::InvalidState),
            Some(_) => None,
        });
        match (&res, want) {
            (Err(e), Some(w)) => assert_eq!(kind(e), w, "{what}: {e:?}"),
            (Ok(_), Some(w)) => panic!("{what}: gave a table, expected {w:?}"),
            (Err(e), None) => panic!("{what}: {e:?}"),
            (Ok((table, cols)), None) => {
                let views: Vec<SeqView> = ids
                    .iter()
                    .map(|id| self.e.get(id).expect("get").expect("live"))
                    .collect();
                let max = views.iter().map(|v| v.block_ids.len()).max().unwrap_or(0);
                assert_eq!(*cols, max, "{what}: columns");
                assert_eq!(table.len(), rids.len() * max, "{what}: size");
                for (row, v) in views.iter().enumerate() {
                    for c in 0..max {
                        let want = v.block_ids.get(c).map_or(-1, |&b| b as i32);
                        assert_eq!(table[row * max + c], want, "{what}: row {row} col {c}");
                    }
                }
            }
        }
    }

    fn can_allocate(&mut self, n: usize) {
        let ok = self
            .e
            .can_allocate(n)
            .expect("can_allocate of an open engine");
        let st = self.e.stats().expect("stats");
        let want = self.m.num_pending() == 0 && blocks_for(n, self.bs()) <= st.device.free_blocks;
        assert_eq!(ok, want, "can_allocate({n})");
    }

    fn stats_calls(&mut self, subscribe: bool) {
        self.e.set_subscribed(subscribe);
        let it = self.e.iteration_stats().expect("iteration_stats");
        assert!(it.device.used_blocks + it.device.free_blocks == it.device.total_blocks);
        let _ = self.e.drain_events().expect("drain_events");
        let _ = self
            .e
            .drain_eviction_events()
            .expect("drain_eviction_events");
        let _ = self.e.pressure_level().expect("pressure_level");
        let live = self.m.seqs.iter().filter(|s| s.is_some()).count();
        assert_eq!(self.e.num_sequences().expect("num_sequences"), live);
    }

    fn trace<T: std::fmt::Debug>(&self, what: &str, r: &Result<T, Error>) {
        if trace_on() {
            eprintln!("  {what} -> {r:?}");
        }
    }

    // ----- after every step ----------------------------------------------------------------

    /// Waits until no background work is left: the copy worker (unless paused, when it holds
    /// its jobs before they start) and the disk threads (no write pending, no read pinned).
    fn quiesce(&self) {
        if !self.paused {
            self.e.wait_copies_idle();
        }
        let deadline = Instant::now() + IDLE_LIMIT;
        loop {
            let st = self.e.stats().expect("stats of an open engine");
            if st.disk.used_blocks == 0 && st.inflight_disk_ops == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the disk tier stayed busy for {IDLE_LIMIT:?}: {:?}",
                st.disk
            );
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Collects finished tickets and checks them against the model.
    fn collect(&mut self) {
        let (done, _) = self.e.drain_notifications();
        if trace_on() && !done.is_empty() {
            eprintln!("  completed: {done:?}");
        }
        self.m.completed(&done);
    }

    fn after_step(&mut self) {
        self.quiesce();
        self.collect();
        self.e.check_invariants();
        let st = self.e.stats().expect("stats of an open engine");
        for (name, t) in [
            ("device", &st.device),
            ("host", &st.host),
            ("disk", &st.disk),
        ] {
            assert_eq!(
                t.used_blocks + t.free_blocks,
                t.total_blocks,
                "{name}: used + free"
            );
            assert!(
                t.evictable_blocks <= t.free_blocks,
                "{name}: evictable <= free"
            );
        }
        let live = self.m.seqs.iter().flatten().count();
        assert_eq!(st.num_sequences, live, "sequences");
        let swapped = self
            .m
            .seqs
            .iter()
            .flatten()
            .filter(|s| matches!(s.phase, PhaseM::Swapped | PhaseM::Moving { out: false }))
            .count();
        assert_eq!(st.num_swapped, swapped, "swapped sequences");
        assert_eq!(
            st.num_waiting,
            self.m.num_pending(),
            "waiting calls (a finished call did not complete its ticket?)"
        );
        for r in 0..NUM_RIDS {
            let got = self.e.get(&model::rid(r)).expect("get");
            match (&self.m.seqs[r], got) {
                (None, None) => {}
                (Some(s), Some(v)) => {
                    assert_eq!(v.num_tokens, s.tokens.len(), "r{r}: tokens");
                    let tier = match s.phase {
                        PhaseM::Resident | PhaseM::Moving { out: true } => Tier::Device,
                        PhaseM::Swapped | PhaseM::Moving { out: false } => Tier::Host,
                    };
                    assert_eq!(v.tier, tier, "r{r}: tier");
                    if s.phase == PhaseM::Resident {
                        for layer in 0..self.s.layers {
                            self.check_span(r, layer, 0, s.tokens.len(), "after the step");
                        }
                    }
                }
                (m, e) => panic!("r{r}: the model has {m:?}, the engine {e:?}"),
            }
        }
    }

    // ----- the end -------------------------------------------------------------------------

    /// Takes granted tickets and cancels the rest, deallocates everything, checks that no
    /// block is left on any tier and closes.
    fn finish(&mut self) {
        if self.paused {
            self.pause(false);
        }
        self.after_step();
        for _round in 0..64 {
            let open: Vec<(usize, TState)> = self
                .m
                .tickets
                .iter()
                .enumerate()
                .filter(|(_, t)| t.state != TState::Gone)
                .map(|(i, t)| (i, t.state.clone()))
                .collect();
            let Some(&(i, ref state)) = open.first() else {
                break;
            };
            let t = self.m.tickets[i].id;
            match state {
                TState::Granted | TState::Moved { .. } | TState::Failed(_) => {
                    self.take(i);
                }
                _ => self.cancel(i),
            }
            let _ = t;
            self.after_step();
        }
        assert!(
            self.m.tickets.iter().all(|t| t.state == TState::Gone),
            "tickets left open: {:?}",
            self.m.tickets
        );
        for r in 0..NUM_RIDS {
            if self.m.seqs[r].is_some() {
                self.e
                    .deallocate(&model::rid(r))
                    .unwrap_or_else(|e| panic!("final deallocate r{r}: {e:?}"));
                self.m.seqs[r] = None;
            }
        }
        self.after_step();
        let st = self.e.stats().expect("stats");
        assert_eq!(st.device.used_blocks, 0, "device blocks leaked");
        assert_eq!(st.host.used_blocks, 0, "host blocks leaked");
        assert_eq!(st.disk.used_blocks, 0, "disk slots leaked");
        assert_eq!((st.num_sequences, st.num_waiting), (0, 0));
        self.e.close();
        self.check_closed();
    }

    /// `close` in the middle of a program: waiters fail, every later call is `Closed`.
    fn close_now(&mut self) {
        self.e.close();
        self.check_closed();
    }

    fn check_closed(&self) {
        assert!(self.e.is_closed());
        self.e.close(); // idempotent
        let closed = |what: &str, r: Result<(), Error>| match r {
            Err(Error::Closed) => {}
            other => panic!("{what} after close: {other:?}"),
        };
        closed(
            "allocate",
            self.e
                .allocate(model::rid(0), vec![1], None, true)
                .map(|_| ()),
        );
        closed(
            "extend",
            self.e
                .extend(model::rid(0), Append::Count(1), true)
                .map(|_| ()),
        );
        closed("deallocate", self.e.deallocate(&model::rid(0)));
        closed("stats", self.e.stats().map(|_| ()));
        closed("swap_in", self.e.swap_in(&model::rid(0)).map(|_| ()));
        for t in &self.m.tickets {
            closed("take_ticket", self.e.take_ticket(t.id).map(|_| ()));
            self.e.cancel_ticket(t.id); // never fails
        }
    }
}
