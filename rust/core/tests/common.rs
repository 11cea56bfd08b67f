//! Helpers shared by the integration tests.
#![allow(dead_code)]

use ferrumkv_core::clock::Clock;
use ferrumkv_core::config::{CacheConfig, ConfigInput};
use ferrumkv_core::sequence::{Append, SeqView};
use ferrumkv_core::types::RequestId;
use ferrumkv_core::{Engine, Outcome};

/// block_size 4, 2 layers, 2 heads, head_dim 4, float16.
pub fn engine(num_blocks: i64, prefix: bool) -> Engine {
    let mut c = ConfigInput::small(num_blocks);
    c.enable_prefix_cache = prefix;
    c.residency_sample_rate = 1.0;
    Engine::with_clock(CacheConfig::validate(&c).unwrap(), Clock::manual(0.0)).unwrap()
}

pub fn rid(s: &str) -> RequestId {
    RequestId::from(s)
}

pub fn alloc(e: &Engine, id: &str, tokens: &[u32]) -> SeqView {
    match e.allocate(rid(id), tokens.to_vec(), None, false).unwrap() {
        Outcome::Ready(v) => v,
        Outcome::Waiting(t) => panic!("unexpected wait (ticket {t})"),
    }
}

pub fn extend(e: &Engine, id: &str, tokens: &[u32]) -> SeqView {
    match e
        .extend(rid(id), Append::Ids(tokens.to_vec()), false)
        .unwrap()
    {
        Outcome::Ready(v) => v,
        Outcome::Waiting(t) => panic!("unexpected wait (ticket {t})"),
    }
}

pub fn ids(v: &SeqView) -> Vec<u32> {
    v.block_ids.clone()
}
