//! Counters and gauges.
//!
//! One `Counters` value holds every cumulative counter since start; `iteration_stats` is the
//! difference from the snapshot taken at the previous call, so the two can never disagree
//! and nothing is counted twice. Derived figures (hit rates, `reused_blocks`, usage) are
//! computed by the readers, never stored.

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Cumulative event counts (every field is a monotonic counter).
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct Counters { $($(#[$doc])* pub $name: u64,)* }

        impl Counters {
            pub const NAMES: &'static [&'static str] = &[$(stringify!($name)),*];

            /// Every counter's value, in declaration order (the order of `NAMES`).
            pub fn values(&self) -> [u64; Self::NAMES.len()] {
                [$(self.$name),*]
            }

            /// `(name, value)` for every counter, in declaration order.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name)),*]
            }

            /// `self - earlier`, field by field.
            #[must_use]
            pub fn since(&self, earlier: &Counters) -> Counters {
                Counters { $($name: self.$name - earlier.$name,)* }
            }
        }
    };
}

counters! {
    /// Blocks of prompts allocated (hits + new), chunks of a chunked prefill included.
    alloc_total_blocks,
    /// Blocks of prompts taken from the free pool.
    alloc_new_blocks,
    /// Prompt blocks shared whole from the prefix cache.
    full_reused_blocks,
    /// Prompt blocks reused by copying a partly matching cached block.
    partial_reused_blocks,
    /// Prompt blocks computed from scratch.
    missed_blocks,
    /// Blocks allocated while decoding (`extend`).
    gen_alloc_blocks,
    onboard_blocks,
    onboard_bytes,
    offload_blocks,
    offload_bytes,
    intra_device_copy_blocks,
    intra_device_copy_bytes,
    h2d_blocks_copied,
    d2h_blocks_copied,
    disk_blocks_written,
    disk_blocks_read,
    disk_checksum_failures,
    disk_read_errors,
    disk_write_errors,
    /// Cached blocks dropped from the device tier's prefix cache.
    evicted_blocks,
    /// Prompt tokens that must be computed (cache misses).
    input_tokens,
    /// Prompt tokens served from the cache.
    cache_tokens,
    /// Requests resumed after preemption by recompute (`allocate(preempted=true)`), whose
    /// lookups are kept out of every hit-rate input above.
    preempted_requests,
    /// Prompt tokens of those requests.
    preempted_prompt_tokens,
    /// Prompt tokens of those requests served from the cache.
    preempted_cache_tokens,
    /// Blocks released by `truncate` (past a sequence's new end).
    truncated_blocks,
    swap_out_count,
    /// Device -> host copies (swap-outs): count and nanoseconds.
    d2h_transfers,
    d2h_transfer_ns,
    /// Host -> device copies (swap-ins): count and nanoseconds.
    h2d_transfers,
    h2d_transfer_ns,
    /// Sampled eviction events dropped because nobody drained them.
    dropped_eviction_events,
    swap_in_count,
    preempted_waits,
    dropped_events,
    /// Blocks a remote lookup found in the store and imported (checksums verified).
    remote_hit_blocks,
    /// Blocks a remote lookup asked for and did not import (absent, refused, failed).
    remote_miss_blocks,
    /// Of those, values refused: truncated, corrupted, or another key's or shape's.
    remote_corrupt_blocks,
    /// Bytes of the blocks imported from the store.
    remote_read_bytes,
    /// Blocks written to the store, and their bytes (the block's bytes, not the framing).
    remote_write_blocks,
    remote_write_bytes,
    /// Writes dropped: the write queue was full, the store refused them (full), or it was
    /// unreachable.
    remote_dropped_writes,
    /// Remote calls that failed or timed out.
    remote_errors,
    /// Nanoseconds spent in remote lookups and in remote writes.
    remote_read_ns,
    remote_write_ns,
}

/// Gauges of one tier.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TierStats {
    pub total_blocks: usize,
    pub free_blocks: usize,
    pub used_blocks: usize,
    pub evictable_blocks: usize,
    pub total_bytes: usize,
    pub used_bytes: usize,
}

impl TierStats {
    pub fn new(total: usize, free: usize, evictable: usize, bytes_per_block: usize) -> Self {
        TierStats {
            total_blocks: total,
            free_blocks: free,
            used_blocks: total - free,
            evictable_blocks: evictable,
            total_bytes: total * bytes_per_block,
            used_bytes: (total - free) * bytes_per_block,
        }
    }
}

/// A consistent snapshot of the engine, taken under its lock.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub device: TierStats,
    pub host: TierStats,
    pub disk: TierStats,
    pub block_size: usize,
    pub num_sequences: usize,
    pub num_swapped: usize,
    pub num_waiting: usize,
    /// Disk writes still running.
    pub inflight_disk_ops: usize,
    pub pressure_level: u8,
    pub callback_errors: u64,
    pub counters: Counters,
}

impl Snapshot {
    pub fn total_tokens(&self) -> usize {
        self.device.total_blocks * self.block_size
    }

    pub fn used_tokens(&self) -> usize {
        self.device.used_blocks * self.block_size
    }

    pub fn free_tokens(&self) -> usize {
        self.device.free_blocks * self.block_size
    }
}

/// What `gc()` did.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct GcStats {
    pub evicted_blocks: usize,
    pub offloaded_blocks: usize,
    pub freed_bytes: usize,
    pub duration_s: f64,
}
