//! Property tests: random allocate / extend / fork / deallocate / gc / swap workloads, with
//! waiting calls granted and then taken, cancelled, refused a second extend or withdrawn,
//! with the prefix cache on and off.
//!
//! Data model: the K/V a sequence holds at position p is a function of its tokens 0..=p
//! (as a model computes it). After every allocate or extend the test "computes" the new
//! positions by writing that function's value; then every live sequence must read back
//! exactly that value at every position. So a wrong prefix hit, a bad partial copy or a
//! missed copy-on-write shows up as wrong bytes. After every step the engine's
//! bookkeeping invariants must hold, and a failed call must change nothing.

mod common;

use std::collections::HashMap;

use common::*;
use ferrumkv_core::sequence::Append;
use ferrumkv_core::{Engine, Error, Outcome};
use proptest::prelude::*;

const TB: usize = 16; // token bytes of the small config: 2 heads x 4 dims x f16
const LAYERS: usize = 2;

#[derive(Debug, Clone)]
enum Op {
    Alloc {
        rid: u8,
        base: u8,
        plen: u8,
        suffix: Vec<u32>,
    },
    Extend {
        rid: u8,
        tokens: Vec<u32>,
        by_count: bool,
    },
    Dealloc {
        rid: u8,
    },
    Fork {
        src: u8,
        dst: u8,
    },
    Gc {
        ratio: u8,
    },
    WaitThenCancel {
        rid: u8,
        len: u8,
    },
    SwapOut {
        rid: u8,
    },
    SwapIn {
        rid: u8,
    },
    /// An extend that may wait; blocks come back (a victim is freed); then the waiter takes,
    /// cancels, is refused a second extend and cancels, or its request is deallocated.
    GrantThen {
        rid: u8,
        tokens: Vec<u32>,
        victim: u8,
        then: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..6u8, 0..3u8, 0..24u8, prop::collection::vec(0..3u32, 0..6))
            .prop_map(|(rid, base, plen, suffix)| Op::Alloc { rid, base, plen, suffix }),
        4 => (0..6u8, prop::collection::vec(0..3u32, 1..7), prop::bool::weighted(0.15))
            .prop_map(|(rid, tokens, by_count)| Op::Extend { rid, tokens, by_count }),
        2 => (0..6u8).prop_map(|rid| Op::Dealloc { rid }),
        1 => (0..6u8, 0..6u8).prop_map(|(src, dst)| Op::Fork { src, dst }),
        1 => (0..5u8).prop_map(|ratio| Op::Gc { ratio }),
        1 => (6..8u8, 1..60u8).prop_map(|(rid, len)| Op::WaitThenCancel { rid, len }),
        2 => (0..6u8).prop_map(|rid| Op::SwapOut { rid }),
        2 => (0..6u8).prop_map(|rid| Op::SwapIn { rid }),
        3 => (0..6u8, prop::collection::vec(0..3u32, 1..80), 0..6u8, 0..4u8)
            .prop_map(|(rid, tokens, victim, then)| Op::GrantThen { rid, tokens, victim, then }),
    ]
}

/// The value a model writes at a position: a rolling hash of the prefix.
fn mix(prev: u64, token: u32, layer: usize) -> u64 {
    let mut z = prev
        ^ u64::from(token).wrapping_add(0x9E37_79B9_7F4A_7C15u64.wrapping_mul(layer as u64 + 1));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 27)
}

fn kv_bytes(h: u64) -> (Vec<u8>, Vec<u8>) {
    let k: Vec<u8> = h
        .to_le_bytes()
        .iter()
        .chain(h.to_be_bytes().iter())
        .copied()
        .collect();
    let v: Vec<u8> = k.iter().map(|b| !b).collect();
    (k, v)
}

#[derive(Debug, Clone, Default)]
struct Model {
    /// Per live sequence: the rolling prefix hash at each position, per layer.
    seqs: HashMap<String, Vec<[u64; LAYERS]>>,
    /// Sequences now in the host tier (their data is checked when they come back).
    swapped: std::collections::HashSet<String>,
    /// A sequence extended by count has unknown ids from that position: unique fake ids.
    next_fake: u32,
}

impl Model {
    fn push(hist: &mut Vec<[u64; LAYERS]>, token: u32) {
        let prev = hist.last().copied().unwrap_or([0; LAYERS]);
        hist.push(std::array::from_fn(|l| mix(prev[l], token, l)));
    }
}

fn write_positions(e: &Engine, id: &str, hist: &[[u64; LAYERS]], from: usize) {
    for (p, hs) in hist.iter().enumerate().skip(from) {
        for (layer, &h) in hs.iter().enumerate() {
            let (k, v) = kv_bytes(h);
            e.write_kv(&rid(id), layer, p, &k, &v)
                .expect("write_kv of a live position");
        }
    }
}

fn check_data(e: &Engine, m: &Model) {
    for (id, hist) in m.seqs.iter().filter(|(id, _)| !m.swapped.contains(*id)) {
        let n = hist.len();
        for layer in 0..LAYERS {
            let (mut k, mut v) = (vec![0u8; n * TB], vec![0u8; n * TB]);
            e.read_kv(&rid(id), layer, 0, &mut k, &mut v).unwrap();
            for (p, hs) in hist.iter().enumerate() {
                let (ek, ev) = kv_bytes(hs[layer]);
                assert_eq!(
                    &k[p * TB..(p + 1) * TB],
                    &ek[..],
                    "{id}: K at {p}, layer {layer}"
                );
                assert_eq!(
                    &v[p * TB..(p + 1) * TB],
                    &ev[..],
                    "{id}: V at {p}, layer {layer}"
                );
            }
        }
    }
}

fn snapshot(e: &Engine) -> (ferrumkv_core::stats::TierStats, usize) {
    let s = e.stats().unwrap();
    (s.device, s.num_sequences)
}

fn run(ops: Vec<Op>, prefix: bool) {
    let e = engine_with_host(24, 16, prefix);
    let mut m = Model {
        next_fake: 1_000_000,
        ..Default::default()
    };
    let bases: Vec<Vec<u32>> = (0..3)
        .map(|b| (0..24).map(|i| 100 * b + i).collect())
        .collect();
    for op in ops {
        let before = snapshot(&e);
        match op {
            Op::Alloc {
                rid: r,
                base,
                plen,
                suffix,
            } => {
                let id = format!("r{r}");
                let mut tokens = bases[base as usize][..plen as usize].to_vec();
                tokens.extend(&suffix);
                match e.allocate(rid(&id), tokens.clone(), None, false) {
                    Ok(Outcome::Ready(v)) => {
                        assert!(v.num_cached_tokens < tokens.len());
                        let mut hist = Vec::new();
                        tokens.iter().for_each(|&t| Model::push(&mut hist, t));
                        write_positions(&e, &id, &hist, v.num_cached_tokens);
                        m.seqs.insert(id, hist);
                    }
                    Ok(Outcome::Waiting(_)) => unreachable!("wait=false"),
                    Err(Error::DuplicateRequest(_)) => assert!(m.seqs.contains_key(&id)),
                    Err(Error::InvalidArgument(_)) => assert!(tokens.is_empty()),
                    Err(Error::OutOfBlocks { .. }) => {}
                    Err(other) => panic!("allocate: {other:?}"),
                }
            }
            Op::Extend {
                rid: r,
                tokens,
                by_count,
            } => {
                let id = format!("r{r}");
                let append = if by_count {
                    Append::Count(tokens.len())
                } else {
                    Append::Ids(tokens.clone())
                };
                match e.extend(rid(&id), append, false) {
                    Ok(Outcome::Ready(_)) => {
                        let hist = m.seqs.get_mut(&id).expect("extend succeeded on a live id");
                        let from = hist.len();
                        for &t in &tokens {
                            let t = if by_count {
                                m.next_fake += 1;
                                m.next_fake
                            } else {
                                t
                            };
                            Model::push(hist, t);
                        }
                        let hist = hist.clone();
                        write_positions(&e, &id, &hist, from);
                    }
                    Err(Error::UnknownRequest(_)) => assert!(!m.seqs.contains_key(&id)),
                    Err(Error::InvalidState(_)) => assert!(m.swapped.contains(&id)),
                    Err(Error::OutOfBlocks { .. }) => {}
                    other => panic!("extend: {other:?}"),
                }
            }
            Op::Dealloc { rid: r } => {
                let id = format!("r{r}");
                match e.deallocate(&rid(&id)) {
                    Ok(()) => {
                        assert!(m.seqs.remove(&id).is_some());
                        m.swapped.remove(&id);
                    }
                    Err(Error::UnknownRequest(_)) => assert!(!m.seqs.contains_key(&id)),
                    Err(other) => panic!("deallocate: {other:?}"),
                }
            }
            Op::Fork { src, dst } => {
                let (s, d) = (format!("r{src}"), format!("r{dst}"));
                match e.fork(&rid(&s), rid(&d)) {
                    Ok(_) => {
                        let h = m.seqs[&s].clone();
                        m.seqs.insert(d, h);
                    }
                    Err(Error::UnknownRequest(_)) => assert!(!m.seqs.contains_key(&s)),
                    Err(Error::InvalidState(_)) => assert!(m.swapped.contains(&s)),
                    Err(Error::DuplicateRequest(_)) => assert!(m.seqs.contains_key(&d)),
                    Err(other) => panic!("fork: {other:?}"),
                }
            }
            Op::SwapOut { rid: r } => {
                let id = format!("r{r}");
                match e.swap_out(&rid(&id)) {
                    Ok(o) => {
                        settle(&e, o);
                        assert!(m.swapped.insert(id));
                    }
                    Err(Error::UnknownRequest(_)) => assert!(!m.seqs.contains_key(&id)),
                    Err(Error::InvalidState(_)) => assert!(m.swapped.contains(&id)),
                    Err(Error::OutOfBlocks { .. }) => assert_eq!(snapshot(&e), before),
                    Err(other) => panic!("swap_out: {other:?}"),
                }
            }
            Op::SwapIn { rid: r } => {
                let id = format!("r{r}");
                match e.swap_in(&rid(&id)) {
                    Ok(o) => {
                        settle(&e, o);
                        assert!(m.swapped.remove(&id));
                    }
                    Err(Error::UnknownRequest(_)) => assert!(!m.seqs.contains_key(&id)),
                    Err(Error::InvalidState(_)) => {
                        assert!(m.seqs.contains_key(&id) && !m.swapped.contains(&id));
                    }
                    Err(Error::OutOfBlocks { .. }) => assert_eq!(snapshot(&e), before),
                    Err(other) => panic!("swap_in: {other:?}"),
                }
            }
            Op::Gc { ratio } => {
                e.gc(Some(f64::from(ratio) / 4.0)).unwrap();
            }
            Op::GrantThen {
                rid: r,
                tokens,
                victim,
                then,
            } => {
                let id = format!("r{r}");
                let grow = |m: &mut Model, id: &str| {
                    let hist = m.seqs.get_mut(id).expect("live");
                    let from = hist.len();
                    tokens.iter().for_each(|&t| Model::push(hist, t));
                    let hist = hist.clone();
                    write_positions(&e, id, &hist, from);
                };
                match e.extend(rid(&id), Append::Ids(tokens.clone()), true) {
                    Ok(Outcome::Ready(_)) => grow(&mut m, &id),
                    Ok(Outcome::Waiting(t)) => {
                        let vid = format!("r{victim}");
                        if vid != id && e.deallocate(&rid(&vid)).is_ok() {
                            m.seqs.remove(&vid);
                            m.swapped.remove(&vid);
                        }
                        let len_before = m.seqs[&id].len();
                        match then {
                            0 => match e.take_ticket(t) {
                                Ok(v) => {
                                    assert_eq!(v.num_tokens, len_before + tokens.len());
                                    grow(&mut m, &id);
                                }
                                Err(Error::InvalidState(_)) => e.cancel_ticket(t), // not granted
                                Err(other) => panic!("take: {other:?}"),
                            },
                            1 => e.cancel_ticket(t),
                            2 => {
                                let again = e.extend(rid(&id), Append::Ids(vec![1]), false);
                                assert!(matches!(again, Err(Error::InvalidState(_))), "{again:?}");
                                e.cancel_ticket(t);
                            }
                            _ => {
                                e.deallocate(&rid(&id)).unwrap();
                                m.seqs.remove(&id);
                                assert!(matches!(e.take_ticket(t), Err(Error::InvalidState(_))));
                            }
                        }
                        if let Some(v) = e.get(&rid(&id)).unwrap() {
                            assert_eq!(v.num_tokens, m.seqs[&id].len(), "a cancel undid more");
                        }
                    }
                    Err(Error::UnknownRequest(_)) => assert!(!m.seqs.contains_key(&id)),
                    Err(Error::InvalidState(_)) => assert!(m.swapped.contains(&id)),
                    Err(Error::OutOfBlocks {
                        never_fits: true, ..
                    }) => {}
                    other => panic!("waiting extend: {other:?}"),
                }
            }
            Op::WaitThenCancel { rid: r, len } => {
                // A waiter that is granted (or not) and then cancelled leaves nothing behind.
                let id = format!("w{r}");
                let tokens: Vec<u32> = (0..u32::from(len)).collect();
                match e.allocate(rid(&id), tokens.clone(), None, true) {
                    Ok(Outcome::Waiting(t)) => {
                        e.cancel_ticket(t);
                        assert_eq!(
                            snapshot(&e),
                            before,
                            "a cancelled waiter gives back everything"
                        );
                    }
                    Ok(Outcome::Ready(v)) => {
                        // Its blocks were registered: compute them, as a model would.
                        let mut hist = Vec::new();
                        tokens.iter().for_each(|&t| Model::push(&mut hist, t));
                        write_positions(&e, &id, &hist, v.num_cached_tokens);
                        e.deallocate(&rid(&id)).unwrap();
                    }
                    Err(Error::OutOfBlocks {
                        never_fits: true, ..
                    }) => {}
                    other => panic!("waiting allocate: {other:?}"),
                }
                assert!(!e.contains(&rid(&id)).unwrap());
            }
        }
        e.check_invariants();
        let s = e.stats().unwrap();
        assert_eq!(
            s.device.used_blocks + s.device.free_blocks,
            s.device.total_blocks
        );
        assert_eq!(s.num_sequences, m.seqs.len());
        check_data(&e, &m);
    }
    let ids: Vec<String> = m.seqs.keys().cloned().collect();
    for id in ids {
        e.deallocate(&rid(&id)).unwrap();
    }
    let s = e.stats().unwrap();
    assert_eq!(s.device.used_blocks, 0, "no block leaked");
    assert_eq!(s.host.used_blocks, 0, "no host block leaked");
    e.check_invariants();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_workloads_with_prefix_cache(ops in prop::collection::vec(op(), 1..40)) {
        run(ops, true);
    }

    #[test]
    fn random_workloads_without_prefix_cache(ops in prop::collection::vec(op(), 1..40)) {
        run(ops, false);
    }
}
