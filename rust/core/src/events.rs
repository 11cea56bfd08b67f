//! KV cache events (the vLLM / Dynamo event vocabulary), queued in the order they happen.
//!
//! A `Stored` run is extended in place while consecutive blocks of one chain are registered
//! in one operation, so a prompt of 64 new blocks yields one event, not 64.
//! The queue is bounded by bytes, not by count: each event is charged its estimated heap
//! size (`event_bytes`: the queue slot plus the capacity of its hash and token vectors), and
//! while the undrained total exceeds the cap (`MAX_PENDING_BYTES`, 64 MiB) the oldest events
//! are dropped and counted (`dropped_events`); an event that alone exceeds the cap (a run
//! extended past it) is dropped too. So a consumer that never drains costs at most the cap,
//! whatever the prompt lengths.
//! Invariant: `bytes` is the sum of `event_bytes` over the queue and is at most `max_bytes`
//! after every call; `dropped` counts exactly the events removed without being drained.

use std::collections::VecDeque;

use crate::types::{BlockHash, Tier};

/// Undrained events are kept up to this many (estimated) heap bytes.
pub const MAX_PENDING_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    Stored {
        block_hashes: Vec<BlockHash>,
        parent_block_hash: Option<BlockHash>,
        token_ids: Vec<u32>,
        block_size: usize,
        tier: Tier,
    },
    Removed {
        block_hashes: Vec<BlockHash>,
        tier: Tier,
    },
    AllCleared,
}

/// The heap bytes an event holds while queued: its slot in the queue plus its vectors.
fn event_bytes(e: &KvEvent) -> usize {
    use std::mem::size_of;
    let vectors = match e {
        KvEvent::Stored {
            block_hashes,
            token_ids,
            ..
        } => block_hashes.capacity() * size_of::<BlockHash>() + token_ids.capacity() * 4,
        KvEvent::Removed { block_hashes, .. } => block_hashes.capacity() * size_of::<BlockHash>(),
        KvEvent::AllCleared => 0,
    };
    size_of::<KvEvent>() + vectors
}

#[derive(Debug)]
pub struct EventQueue {
    enabled: bool,
    queue: VecDeque<KvEvent>,
    /// Whether the last `Stored` may still be extended (same operation).
    open_run: bool,
    /// Sum of `event_bytes` over `queue`.
    bytes: usize,
    max_bytes: usize,
    pub dropped: u64,
}

impl EventQueue {
    pub fn new(enabled: bool) -> Self {
        Self::with_max_bytes(enabled, MAX_PENDING_BYTES)
    }

    /// A queue holding at most `max_bytes` of undrained events.
    pub fn with_max_bytes(enabled: bool, max_bytes: usize) -> Self {
        EventQueue {
            enabled,
            queue: VecDeque::new(),
            open_run: false,
            bytes: 0,
            max_bytes,
            dropped: 0,
        }
    }

    /// Estimated heap bytes of the undrained events (at most `max_bytes`).
    pub fn pending_bytes(&self) -> usize {
        self.bytes
    }

    fn push(&mut self, e: KvEvent) {
        self.bytes += event_bytes(&e);
        self.queue.push_back(e);
        self.trim();
    }

    /// Charges the newest event's growth (its size was `before`), then trims.
    fn grew_back(&mut self, before: usize) {
        let after = self.queue.back().map_or(0, event_bytes);
        self.bytes = self.bytes - before + after;
        self.trim();
    }

    /// Drops the oldest events while the queue holds more than `max_bytes`.
    fn trim(&mut self) {
        while self.bytes > self.max_bytes {
            let e = self
                .queue
                .pop_front()
                .expect("bytes > 0 with an empty queue");
            self.bytes -= event_bytes(&e);
            self.dropped += 1;
        }
    }

    /// Ends the current operation: the next `stored` starts a new event.
    pub fn end_op(&mut self) {
        self.open_run = false;
    }

    /// Records that `hash` was stored in `tier` (appended to the open run of stored blocks
    /// if one is open). Inline, so that with events off it costs one test, not a call.
    #[inline]
    pub fn stored(
        &mut self,
        hash: BlockHash,
        parent: Option<BlockHash>,
        tokens: &[u32],
        tier: Tier,
    ) {
        if self.enabled {
            self.push_stored(hash, parent, tokens, tier);
        }
    }

    fn push_stored(
        &mut self,
        hash: BlockHash,
        parent: Option<BlockHash>,
        tokens: &[u32],
        tier: Tier,
    ) {
        if self.open_run {
            if let Some(back) = self.queue.back_mut() {
                let before = event_bytes(back);
                if let KvEvent::Stored {
                    block_hashes,
                    token_ids,
                    tier: t,
                    ..
                } = back
                {
                    if *t == tier && block_hashes.last().copied() == parent {
                        block_hashes.push(hash);
                        token_ids.extend_from_slice(tokens);
                        self.grew_back(before);
                        return;
                    }
                }
            }
        }
        self.push(KvEvent::Stored {
            block_hashes: vec![hash],
            parent_block_hash: parent,
            token_ids: tokens.to_vec(),
            block_size: tokens.len(),
            tier,
        });
        self.open_run = true;
    }

    /// Records that `hash` left `tier`. Inline for the same reason as `stored`.
    #[inline]
    pub fn removed(&mut self, hash: BlockHash, tier: Tier) {
        if self.enabled {
            self.push_removed(hash, tier);
        }
    }

    fn push_removed(&mut self, hash: BlockHash, tier: Tier) {
        self.open_run = false;
        if let Some(back) = self.queue.back_mut() {
            let before = event_bytes(back);
            if let KvEvent::Removed {
                block_hashes,
                tier: t,
            } = back
            {
                if *t == tier {
                    block_hashes.push(hash);
                    self.grew_back(before);
                    return;
                }
            }
        }
        self.push(KvEvent::Removed {
            block_hashes: vec![hash],
            tier,
        });
    }

    pub fn all_cleared(&mut self) {
        if self.enabled {
            self.open_run = false;
            self.push(KvEvent::AllCleared);
        }
    }

    pub fn drain(&mut self) -> Vec<KvEvent> {
        self.open_run = false;
        self.bytes = 0;
        // Hands the buffer over (no copy) and starts afresh, so a burst's capacity is not kept.
        Vec::from(std::mem::take(&mut self.queue))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_within_an_operation_only() {
        let mut q = EventQueue::new(true);
        q.stored(1, None, &[1, 2], Tier::Device);
        q.stored(2, Some(1), &[3, 4], Tier::Device);
        q.stored(9, Some(5), &[7, 7], Tier::Device);
        q.end_op();
        q.stored(3, Some(2), &[5, 6], Tier::Device);
        q.removed(3, Tier::Device);
        q.removed(2, Tier::Device);
        let ev = q.drain();
        assert_eq!(ev.len(), 4);
        assert_eq!(
            ev[0],
            KvEvent::Stored {
                block_hashes: vec![1, 2],
                parent_block_hash: None,
                token_ids: vec![1, 2, 3, 4],
                block_size: 2,
                tier: Tier::Device
            }
        );
        assert_eq!(
            ev[3],
            KvEvent::Removed {
                block_hashes: vec![3, 2],
                tier: Tier::Device
            }
        );
    }

    /// `bytes` equals the sum over the queue, and stays within the cap.
    fn assert_accounted(q: &EventQueue) {
        assert_eq!(q.bytes, q.queue.iter().map(event_bytes).sum::<usize>());
        assert!(q.bytes <= q.max_bytes, "{} > {}", q.bytes, q.max_bytes);
    }

    #[test]
    fn bounded_by_bytes_dropping_exactly_the_oldest() {
        let slot = std::mem::size_of::<KvEvent>();
        let hash = std::mem::size_of::<BlockHash>();
        let cap = 8 * 1024;
        let mut q = EventQueue::with_max_bytes(true, cap);
        // Model: the sizes of the events kept, oldest first (a one-block `Stored` holds
        // exactly one hash and its tokens: `to_vec` allocates exactly their length).
        let mut model: VecDeque<(u128, usize)> = VecDeque::new();
        let mut dropped = 0u64;
        for i in 0..500u128 {
            let n = 1 + (i as usize * 37) % 300;
            q.stored(i, None, &vec![7; n], Tier::Host);
            q.end_op();
            model.push_back((i, slot + hash + 4 * n));
            while model.iter().map(|m| m.1).sum::<usize>() > cap {
                model.pop_front();
                dropped += 1;
            }
            assert_accounted(&q);
            assert_eq!(q.dropped, dropped, "after event {i}");
        }
        assert!(dropped > 400, "the cap was reached: {dropped}");
        // A removal, merged in place, is charged too.
        q.removed(1000, Tier::Disk);
        q.removed(1001, Tier::Disk);
        assert_accounted(&q);
        let kept = q.queue.len() as u64;
        let events = q.drain();
        assert_eq!(
            q.dropped + events.len() as u64,
            502 - 1,
            "two removals merged into one"
        );
        assert_eq!(events.len() as u64, kept);
        let stored: Vec<u128> = events
            .iter()
            .filter_map(|e| match e {
                KvEvent::Stored { block_hashes, .. } => Some(block_hashes[0]),
                _ => None,
            })
            .collect();
        assert_eq!(stored.last(), Some(&499), "the newest are kept");
        assert!(
            stored.windows(2).all(|w| w[1] == w[0] + 1),
            "a suffix, in order"
        );
        assert_eq!(q.pending_bytes(), 0);
    }

    #[test]
    fn a_run_extended_past_the_cap_is_dropped_whole() {
        let cap = 4 * 1024;
        let mut q = EventQueue::with_max_bytes(true, cap);
        q.stored(100, None, &[1; 16], Tier::Device);
        q.end_op();
        q.removed(100, Tier::Device);
        for b in 0..200u128 {
            q.stored(
                b + 1,
                if b == 0 { None } else { Some(b) },
                &[2; 16],
                Tier::Device,
            );
            assert_accounted(&q);
        }
        // The two older events went first, then the run itself once it alone passed the
        // cap; the blocks after it started a new run.
        assert!(q.dropped >= 3, "{}", q.dropped);
        let events = q.drain();
        assert_eq!(events.len(), 1);
        let KvEvent::Stored {
            block_hashes,
            parent_block_hash,
            token_ids,
            ..
        } = &events[0]
        else {
            panic!("{events:?}")
        };
        assert_eq!(block_hashes.last(), Some(&200));
        assert_eq!(*parent_block_hash, Some(block_hashes[0] - 1));
        assert_eq!(token_ids.len(), 16 * block_hashes.len());
    }

    #[test]
    fn long_prompts_never_drained_stay_under_the_default_cap() {
        // The reported case: many 2k-token prompts (128 blocks of 16) with nobody draining.
        let mut q = EventQueue::new(true);
        let tokens = [3u32; 16];
        for p in 0..10_000u128 {
            for b in 0..128u128 {
                let h = (p << 8) | (b + 1);
                q.stored(h, (b > 0).then(|| h - 1), &tokens, Tier::Device);
            }
            q.end_op();
        }
        assert_accounted(&q);
        assert!(q.pending_bytes() > MAX_PENDING_BYTES / 2);
        let kept = q.queue.len() as u64;
        assert_eq!(q.dropped + kept, 10_000);
        assert!(q.dropped > 0);
    }

    #[test]
    fn disabled_queue_records_nothing() {
        let mut q = EventQueue::new(false);
        q.stored(1, None, &[1], Tier::Device);
        q.all_cleared();
        assert!(q.drain().is_empty());
    }
}
