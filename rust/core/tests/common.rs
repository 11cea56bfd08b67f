//! Helpers shared by the integration tests.
#![allow(dead_code)]

use ferrumkv_core::clock::Clock;
use ferrumkv_core::config::{CacheConfig, ConfigInput};
use ferrumkv_core::events::KvEvent;
use ferrumkv_core::sequence::{Append, SeqView};
use ferrumkv_core::types::{BlockHash, RequestId, Tier};
use ferrumkv_core::waiters::Ticket;
use ferrumkv_core::{Engine, Outcome};

/// block_size 4, 2 layers, 2 heads, head_dim 4, float16.
pub fn engine(num_blocks: i64, prefix: bool) -> Engine {
    engine_with_host(num_blocks, 0, prefix)
}

/// `engine` with a host tier of `host_blocks` blocks.
pub fn engine_with_host(num_blocks: i64, host_blocks: i64, prefix: bool) -> Engine {
    let mut c = ConfigInput::small(num_blocks);
    c.host_blocks = host_blocks;
    c.enable_prefix_cache = prefix;
    c.residency_sample_rate = 1.0;
    Engine::with_clock(CacheConfig::validate(&c).unwrap(), Clock::manual(0.0)).unwrap()
}

pub fn rid(s: &str) -> RequestId {
    RequestId::from(s)
}

/// The sequence of a call that must not wait.
pub fn ready(o: Outcome) -> SeqView {
    match o {
        Outcome::Ready(v) => v,
        Outcome::Waiting(t) => panic!("unexpected wait (ticket {t})"),
    }
}

/// The ticket of a call that must wait.
pub fn waits(o: Outcome) -> Ticket {
    match o {
        Outcome::Waiting(t) => t,
        Outcome::Ready(v) => panic!("expected a wait, got {v:?}"),
    }
}

pub fn alloc(e: &Engine, id: &str, tokens: &[u32]) -> SeqView {
    ready(e.allocate(rid(id), tokens.to_vec(), None, false).unwrap())
}

pub fn extend(e: &Engine, id: &str, tokens: &[u32]) -> SeqView {
    ready(
        e.extend(rid(id), Append::Ids(tokens.to_vec()), false)
            .unwrap(),
    )
}

pub fn ids(v: &SeqView) -> Vec<u32> {
    v.block_ids.clone()
}

/// Writes a distinct byte pattern for every position of one layer; returns it.
pub fn fill(e: &Engine, id: &str, layer: usize, n: usize, seed: u8) -> Vec<u8> {
    let k: Vec<u8> = (0..n * 16)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    e.write_kv(&rid(id), layer, 0, &k, &k).unwrap();
    k
}

pub fn read(e: &Engine, id: &str, layer: usize, n: usize) -> Vec<u8> {
    let (mut k, mut v) = (vec![0u8; n * 16], vec![0u8; n * 16]);
    e.read_kv(&rid(id), layer, 0, &mut k, &mut v).unwrap();
    assert_eq!(k, v);
    k
}

/// A swap's result, waiting for the worker when it took one.
pub fn settle(e: &Engine, o: Outcome) -> SeqView {
    match o {
        Outcome::Ready(v) => v,
        Outcome::Waiting(t) => {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let (done, _) = e.drain_notifications();
                if done.contains(&t) {
                    return e.take_ticket(t).unwrap();
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "ticket {t} never finished"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}

/// The hashes of the `BlockRemoved` events of `tier` drained from `e`, in order (the other
/// events are drained too).
pub fn removed_from(e: &Engine, tier: Tier) -> Vec<BlockHash> {
    e.drain_events()
        .unwrap()
        .into_iter()
        .filter_map(|ev| match ev {
            KvEvent::Removed {
                block_hashes,
                tier: t,
            } if t == tier => Some(block_hashes),
            _ => None,
        })
        .flatten()
        .collect()
}
