//! KV cache events (the vLLM / Dynamo event vocabulary), queued in the order they happen.
//!
//! A `Stored` run is extended in place while consecutive blocks of one chain are registered
//! in one operation, so a prompt of 64 new blocks yields one event, not 64.
//! The queue is bounded: past `MAX_PENDING` undrained events the oldest are dropped and
//! counted (`dropped_events`), so a consumer that never drains cannot exhaust memory.

use std::collections::VecDeque;

use crate::types::{BlockHash, Tier};

pub const MAX_PENDING: usize = 1 << 20;

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

#[derive(Debug, Default)]
pub struct EventQueue {
    enabled: bool,
    queue: VecDeque<KvEvent>,
    /// Whether the last `Stored` may still be extended (same operation).
    open_run: bool,
    pub dropped: u64,
}

impl EventQueue {
    pub fn new(enabled: bool) -> Self {
        EventQueue {
            enabled,
            ..Default::default()
        }
    }

    fn push(&mut self, e: KvEvent) {
        if self.queue.len() >= MAX_PENDING {
            self.queue.pop_front();
            self.dropped += 1;
        }
        self.queue.push_back(e);
    }

    /// Ends the current operation: the next `stored` starts a new event.
    pub fn end_op(&mut self) {
        self.open_run = false;
    }

    pub fn stored(
        &mut self,
        hash: BlockHash,
        parent: Option<BlockHash>,
        tokens: &[u32],
        tier: Tier,
    ) {
        if !self.enabled {
            return;
        }
        if self.open_run {
            if let Some(KvEvent::Stored {
                block_hashes,
                token_ids,
                tier: t,
                ..
            }) = self.queue.back_mut()
            {
                if *t == tier && block_hashes.last().copied() == parent {
                    block_hashes.push(hash);
                    token_ids.extend_from_slice(tokens);
                    return;
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

    pub fn removed(&mut self, hash: BlockHash, tier: Tier) {
        if !self.enabled {
            return;
        }
        self.open_run = false;
        if let Some(KvEvent::Removed {
            block_hashes,
            tier: t,
        }) = self.queue.back_mut()
        {
            if *t == tier {
                block_hashes.push(hash);
                return;
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
        self.queue.drain(..).collect()
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

    #[test]
    fn disabled_queue_records_nothing() {
        let mut q = EventQueue::new(false);
        q.stored(1, None, &[1], Tier::Device);
        q.all_cleared();
        assert!(q.drain().is_empty());
    }
}
