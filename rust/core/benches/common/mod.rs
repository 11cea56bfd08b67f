//! What the bench binaries share: the engine they measure.

use ferrumkv_core::clock::Clock;
use ferrumkv_core::config::{CacheConfig, ConfigInput};
use ferrumkv_core::Engine;

/// Tokens a block holds in every bench.
pub const BLOCK_SIZE: usize = 16;

/// An engine of `num_blocks` blocks of a tiny model shape (1 layer, 1 KV head, head_dim 8,
/// `BLOCK_SIZE` tokens a block) with KV events off, so the figures are bookkeeping alone.
pub fn engine_with(prefix: bool, num_blocks: i64, policy: &str) -> Engine {
    let mut c = ConfigInput::small(num_blocks);
    c.eviction_policy = policy.into();
    c.num_layers = 1;
    c.num_kv_heads = 1;
    c.head_dim = 8;
    c.block_size = BLOCK_SIZE as i64;
    c.enable_prefix_cache = prefix;
    c.enable_kv_events = false;
    Engine::with_clock(CacheConfig::validate(&c).unwrap(), Clock::default()).unwrap()
}
