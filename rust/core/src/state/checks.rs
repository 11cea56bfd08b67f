//! The bookkeeping invariants, checked by tests after every step.

use crate::types::{blocks_for, BlockId, Tier};

use crate::sequence::Phase;
use crate::waiters::Grant;

use super::{Ctx, State};

impl State {
    /// Panics with a description if an invariant of the module header is broken.
    pub fn check_invariants(&self, ctx: &Ctx) {
        self.pool.check_invariants();
        self.index.check_invariants();
        let mut owners = vec![0u32; self.pool.num_blocks()];
        let mut host_owners = vec![0u32; self.host.as_ref().map_or(0, |h| h.pool.num_blocks())];
        let admissions = self
            .waiters
            .grants()
            .filter_map(|g| match g {
                Grant::Allocate { adm, .. } => Some(&**adm),
                Grant::Extend { .. } => None,
            })
            .chain(self.filling.values().map(|(adm, ..)| adm));
        for adm in admissions {
            let (device, host) = State::admission_blocks(adm);
            device.iter().for_each(|b| owners[b.idx()] += 1);
            host.iter().for_each(|b| host_owners[b.idx()] += 1);
        }
        for g in self.waiters.grants() {
            if let Grant::Extend { reserved, .. } = g {
                for &b in reserved {
                    owners[b.idx()] += 1;
                }
            }
        }
        for g in self.waiters.grants() {
            if let Grant::Extend { reserved, .. } = g {
                for &b in reserved {
                    assert!(
                        self.index.hash_of(b).is_none(),
                        "reserved block {} is indexed",
                        b.0
                    );
                }
            }
        }
        for (rid, s) in &self.seqs {
            // A moving sequence also owns the blocks its swap fills.
            match &s.phase {
                Phase::SwappingOut { to } => to.iter().for_each(|b| host_owners[b.idx()] += 1),
                Phase::SwappingIn { to } => to.iter().for_each(|b| owners[b.idx()] += 1),
                Phase::Resident | Phase::Swapped => {}
            }
            if s.phase.tier() != Tier::Device {
                for &b in &s.blocks {
                    host_owners[b.idx()] += 1;
                }
                continue;
            }
            assert_eq!(
                s.blocks.len(),
                blocks_for(s.num_tokens, ctx.config.block_size),
                "{rid}: block count"
            );
            if s.cacheable {
                assert_eq!(
                    s.hashes.len(),
                    s.num_tokens / ctx.config.block_size,
                    "{rid}: hash count"
                );
                assert_eq!(
                    s.tail.len(),
                    s.num_tokens % ctx.config.block_size,
                    "{rid}: tail"
                );
            }
            if let Some(p) = &s.prompt {
                let bs = ctx.config.block_size;
                assert!(
                    s.num_tokens < p.tokens.len() && p.tokens.len() == s.num_prompt_tokens,
                    "{rid}: a pending prompt of {} tokens, {} with slots",
                    p.tokens.len(),
                    s.num_tokens
                );
                if s.cacheable {
                    assert_eq!(p.hashes.len(), p.tokens.len() / bs, "{rid}: prompt hashes");
                    assert_eq!(p.hashes[..s.hashes.len()], s.hashes[..], "{rid}: hashes");
                    let full = s.num_tokens / bs * bs;
                    assert_eq!(s.tail, p.tokens[full..s.num_tokens], "{rid}: prompt tail");
                }
            }
            for &b in &s.blocks {
                owners[b.idx()] += 1;
            }
        }
        for (b, &o) in owners.iter().enumerate() {
            assert_eq!(
                self.pool.ref_cnt(BlockId(b as u32)),
                o,
                "block {b}: refcount != owners"
            );
        }
        for (h, b) in self.index.iter() {
            assert_eq!(self.index.hash_of(b), Some(h));
            assert!(
                self.pool.is_cached(b),
                "indexed block {} is not marked cached",
                b.0
            );
        }
        for b in self.pool.evictable_lru() {
            assert!(
                self.index.hash_of(b).is_some(),
                "evictable block {} has no hash",
                b.0
            );
        }
        if let Some(host) = &self.host {
            host.pool.check_invariants();
            host.index.check_invariants();
            for (b, &o) in host_owners.iter().enumerate() {
                assert_eq!(
                    host.pool.ref_cnt(BlockId(b as u32)),
                    o,
                    "host block {b}: refcount != owners"
                );
            }
            // An indexed host block is cached; only fills pin it (counted as owners above).
            for (_, b) in host.index.iter() {
                assert!(
                    host.pool.is_cached(b),
                    "indexed host block {} is not cached",
                    b.0
                );
            }
        }
        assert_eq!(
            self.pool.num_used_blocks() + self.pool.num_free_blocks(),
            self.pool.num_blocks()
        );
        if let Some(d) = &self.disk {
            let in_flight = d.pending.iter().filter(|&&p| p != 0).count();
            assert_eq!(d.num_pending(), in_flight, "disk writes in flight");
        }
        let host_seqs = self.seqs.values().filter(|s| s.phase.tier() == Tier::Host);
        assert_eq!(
            self.num_host_seqs,
            host_seqs.count(),
            "swapped sequence count"
        );
    }
}
