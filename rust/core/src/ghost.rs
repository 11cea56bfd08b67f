//! Ghost entries: what an eviction policy remembers about blocks it evicted.
//!
//! A bounded FIFO of evicted blocks' hash fingerprints, each with what the policy noted at
//! the eviction (`Remembered`). `take` finds and removes an entry in O(1) when a block with that hash is
//! cached again (a miss that would have been a hit had the block stayed); once `capacity`
//! entries are held, each new one forgets the oldest (O(1): a ring of fingerprints beside a
//! hash map from fingerprint to its ring slot and value, hashed by passing the fingerprint
//! through; a slot whose entry was taken or rewritten is skipped when the ring comes round
//! to it).
//!
//! Fingerprints are 64 bits of the 128-bit block hash: two hashes sharing them only make the
//! policy misjudge one block's history, never serve wrong data (the prefix index, not the
//! ghost, decides hits). Cost: about 40 bytes per entry; a policy sizes it from the tier's
//! block count (`eviction`).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::error::Result;
use crate::fallible::{out_of_memory, vec_of};
use crate::types::BlockHash;

/// 64 bits of a block hash (the hash is already uniformly mixed).
pub fn fingerprint(h: BlockHash) -> u64 {
    (h as u64) ^ ((h >> 64) as u64)
}

/// A `Hasher` for keys that are already uniformly mixed 64-bit fingerprints: it passes a
/// `u64` through. (std's SipHash cost more than the rest of a ghost lookup: the `lfu` trace
/// replay spent about half its time there. BENCHMARKS.md.)
#[derive(Debug, Default, Clone, Copy)]
pub struct FingerprintHasher(u64);

impl Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; any other bytes are still mixed in, in full.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// A map keyed by fingerprints (`fingerprint`), hashed by passing them through.
pub type FingerprintMap<V> = HashMap<u64, V, BuildHasherDefault<FingerprintHasher>>;

/// What a policy notes about a block it evicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Remembered {
    /// The block's hit count then.
    pub hits: u8,
    /// `Lecar`: the expert whose choice it was.
    pub expert: u8,
    /// `Lecar`: the pool's eviction count then (ages wrap; an entry outlives at most
    /// `capacity` evictions).
    pub at: u32,
}

#[derive(Debug, Clone, Default)]
pub struct Ghost {
    ring: Vec<u64>,
    /// Fingerprint -> (ring slot, what was noted).
    map: FingerprintMap<(u32, Remembered)>,
    next: usize,
}

impl Ghost {
    /// A ghost of at most `capacity` entries (0: remembers nothing).
    pub fn try_new(capacity: usize) -> Result<Self> {
        let mut map = FingerprintMap::default();
        map.try_reserve(capacity)
            .map_err(|_| out_of_memory("the eviction policy's ghost entries", capacity, 24))?;
        Ok(Ghost {
            ring: vec_of(capacity, 0, "the eviction policy's ghost ring")?,
            map,
            next: 0,
        })
    }

    pub fn capacity(&self) -> usize {
        self.ring.len()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Remembers the block hash whose fingerprint is `fp` with `value` (replacing an entry
    /// it has), forgetting the oldest entry when full.
    pub fn insert(&mut self, fp: u64, value: Remembered) {
        if self.ring.is_empty() {
            return;
        }
        let slot = self.next;
        let old = self.ring[slot];
        if self.map.get(&old).is_some_and(|&(s, _)| s as usize == slot) {
            self.map.remove(&old);
        }
        self.ring[slot] = fp;
        self.map.insert(fp, (slot as u32, value));
        self.next = (slot + 1) % self.ring.len();
    }

    /// What was remembered for fingerprint `fp`, forgetting it.
    pub fn take(&mut self, fp: u64) -> Option<Remembered> {
        if self.map.is_empty() {
            return None; // `Lru`'s ghost, always: no hashing on its registrations
        }
        self.map.remove(&fp).map(|(_, v)| v)
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(hits: u8) -> Remembered {
        Remembered {
            hits,
            ..Default::default()
        }
    }

    fn take(g: &mut Ghost, fp: u64) -> Option<u8> {
        g.take(fp).map(|r| r.hits)
    }

    #[test]
    fn remembers_until_taken_or_pushed_out() {
        let mut g = Ghost::try_new(3).unwrap();
        for h in 1..=3u64 {
            g.insert(h, r(h as u8));
        }
        assert_eq!(take(&mut g, 2), Some(2));
        assert_eq!(take(&mut g, 2), None);
        g.insert(4, r(4)); // overwrites the oldest slot (1's)
        assert_eq!((take(&mut g, 1), g.len()), (None, 2));
        g.insert(5, r(5)); // the slot 2 had is free already: 3 stays
        assert_eq!(take(&mut g, 3), Some(3));
        // A re-inserted hash moves to the newest slot; its old slot is skipped later.
        g.insert(4, r(9));
        g.insert(6, r(6));
        g.insert(7, r(7));
        let got = (take(&mut g, 4), take(&mut g, 5), take(&mut g, 6));
        assert_eq!(got, (Some(9), None, Some(6)));
    }

    #[test]
    fn fingerprints_fold_both_halves() {
        assert_ne!(fingerprint(1), fingerprint(1 << 64 | 2));
        assert_eq!(fingerprint(3 << 64), 3);
    }

    #[test]
    fn zero_capacity_remembers_nothing() {
        let mut g = Ghost::try_new(0).unwrap();
        g.insert(1, r(1));
        assert_eq!((g.take(1), g.len()), (None, 0));
    }
}
