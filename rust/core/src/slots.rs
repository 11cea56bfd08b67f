//! A fixed-capacity open-addressing table from 64-bit keys to block ids (the prefix index's
//! maps).
//!
//! Design: linear probing over `2^k >= 4 * max_entries` slots of 8 bytes, a 32-bit tag of the
//! key's mixed hash and the block id; the key itself is not stored, the caller derives it from
//! a block id (`key_of`) where the tag matched. So the table is 32 bytes per block at most,
//! never grows or allocates after construction, and at a load of at most one quarter a probe
//! stays in one cache line. Removal shifts the entries after the removed one back (no
//! tombstones), so probe lengths never degrade under churn. (At half load, 16 bytes per
//! block, the shifts made a 512-token allocate + deallocate 30% slower: BENCHMARKS.md.)
//! Invariants: an entry sits at or after its home slot (`tag & mask`) with no empty slot
//! between them; at most `max_entries` entries.
//! Cost: O(1) expected per operation (about 1.2 probes for a hit, 1.4 for a miss at a quarter
//! load).

use crate::error::Result;
use crate::fallible::{zeroed, Zeroable};

/// A slot's `stored` when empty: slots hold `value + 1`, so a zeroed table is an empty one
/// (it comes from the allocator as fresh zero pages, nothing written at setup).
const EMPTY: u32 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    tag: u32,
    /// The value plus one; `EMPTY` for none.
    stored: u32,
}

// SAFETY: two integers; all-zero bits are an empty slot.
unsafe impl Zeroable for Slot {}

impl Slot {
    fn value(self) -> u32 {
        self.stored - 1
    }
}

/// How many items ahead of the one being worked on (a block evicted, registered or looked
/// up) their cache lines are fetched: far enough for a miss to arrive in time, near enough
/// that the lines in flight fit the CPU's miss queue. (4 and 16 were slower on the trace
/// replay: BENCHMARKS.md.)
pub const PREFETCH_AHEAD: usize = 8;

/// Hints the CPU to bring the cache line of `value` in (a no-op off x86-64).
#[inline]
pub fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` is a hint: it reads nothing the program can observe, cannot
    // fault, and is given the address of a live reference.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(value).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

#[derive(Debug, Clone)]
pub struct SlotTable {
    slots: Vec<Slot>,
    mask: usize,
    len: usize,
}

/// The tag of a key: the high half of a Fibonacci multiply (well mixed even for small keys).
fn tag_of(key: u64) -> u32 {
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32
}

impl SlotTable {
    /// A table for up to `max_entries` entries (a quarter of its slots, at most half
    /// filled even if an owner miscounts); `Error::OutOfMemory` naming `what` when its
    /// slots do not fit in memory.
    pub fn try_new(max_entries: usize, what: &str) -> Result<Self> {
        let cap = max_entries.saturating_mul(4).max(2).next_power_of_two();
        Ok(SlotTable {
            slots: zeroed(cap, what)?,
            mask: cap - 1,
            len: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The values stored under `key` (several when keys of different values collide in
    /// their tag and `key_of`), in probe order.
    pub fn find<'a>(
        &'a self,
        key: u64,
        key_of: impl Fn(u32) -> u64 + 'a,
    ) -> impl Iterator<Item = u32> + 'a {
        let tag = tag_of(key);
        let mut i = tag as usize & self.mask;
        std::iter::from_fn(move || loop {
            let s = self.slots[i];
            if s.stored == EMPTY {
                return None;
            }
            i = (i + 1) & self.mask;
            if s.tag == tag && key_of(s.value()) == key {
                return Some(s.value());
            }
        })
    }

    /// The first value stored under `key`.
    pub fn get(&self, key: u64, key_of: impl Fn(u32) -> u64) -> Option<u32> {
        self.find(key, key_of).next()
    }

    /// Stores `value` under `key` (the caller keeps values unique). Panics when full: the
    /// owner never holds more than `max_entries`.
    pub fn insert(&mut self, key: u64, value: u32) {
        assert!(value < u32::MAX, "value {value} out of range");
        assert!(
            2 * (self.len + 1) <= self.slots.len(),
            "slot table over capacity"
        );
        let tag = tag_of(key);
        let mut i = tag as usize & self.mask;
        while self.slots[i].stored != EMPTY {
            i = (i + 1) & self.mask;
        }
        self.slots[i] = Slot {
            tag,
            stored: value + 1,
        };
        self.len += 1;
    }

    /// Stores `value` under `key` unless a value is stored under it already: then returns
    /// that value and stores nothing (one probe sequence for both). Panics when full.
    pub fn insert_new(&mut self, key: u64, value: u32, key_of: impl Fn(u32) -> u64) -> Option<u32> {
        self.put(key, value, key_of, false)
    }

    /// Stores `value` under `key`, in place of the value stored under it if any, which it
    /// returns (one probe sequence). Panics when full.
    pub fn upsert(&mut self, key: u64, value: u32, key_of: impl Fn(u32) -> u64) -> Option<u32> {
        self.put(key, value, key_of, true)
    }

    fn put(
        &mut self,
        key: u64,
        value: u32,
        key_of: impl Fn(u32) -> u64,
        replace: bool,
    ) -> Option<u32> {
        assert!(value < u32::MAX, "value {value} out of range");
        let tag = tag_of(key);
        let mut i = tag as usize & self.mask;
        loop {
            let s = self.slots[i];
            if s.stored == EMPTY {
                break;
            }
            if s.tag == tag && key_of(s.value()) == key {
                if replace {
                    self.slots[i].stored = value + 1;
                }
                return Some(s.value());
            }
            i = (i + 1) & self.mask;
        }
        assert!(
            2 * (self.len + 1) <= self.slots.len(),
            "slot table over capacity"
        );
        self.slots[i] = Slot {
            tag,
            stored: value + 1,
        };
        self.len += 1;
        None
    }

    /// Where `value`, stored under `key`, sits.
    /// Hints the CPU to bring `key`'s home slot into cache: an insert or a lookup of `key`
    /// follows, and starting the fetches of many keys before the first of them overlaps their
    /// cache misses. Changes nothing.
    pub fn prefetch(&self, key: u64) {
        prefetch(&self.slots[tag_of(key) as usize & self.mask]);
    }

    fn slot_of(&self, key: u64, value: u32) -> usize {
        let mut i = tag_of(key) as usize & self.mask;
        loop {
            let s = self.slots[i];
            assert_ne!(s.stored, EMPTY, "value {value} is not in the table");
            if s.value() == value {
                return i;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Stores `new` in place of `old` under the same `key`.
    pub fn replace(&mut self, key: u64, old: u32, new: u32) {
        assert!(new < u32::MAX, "value {new} out of range");
        let i = self.slot_of(key, old);
        self.slots[i].stored = new + 1;
    }

    /// Removes `value`, stored under `key`, shifting the entries after it back so that every
    /// entry stays reachable from its home slot.
    pub fn remove(&mut self, key: u64, value: u32) {
        let mut hole = self.slot_of(key, value);
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let s = self.slots[j];
            if s.stored == EMPTY {
                break;
            }
            let home = s.tag as usize & self.mask;
            // `s` may move into the hole iff the hole lies between its home and `j`.
            if (j.wrapping_sub(home) & self.mask) >= (j.wrapping_sub(hole) & self.mask) {
                self.slots[hole] = s;
                hole = j;
            }
        }
        self.slots[hole].stored = EMPTY;
        self.len -= 1;
    }

    pub fn clear(&mut self) {
        for s in &mut self.slots {
            s.stored = EMPTY;
        }
        self.len = 0;
    }

    /// Every stored value, in slot order.
    pub fn values(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots
            .iter()
            .filter(|s| s.stored != EMPTY)
            .map(|s| s.value())
    }

    /// Panics unless every entry is reachable from its home slot and `len` counts them.
    pub fn check_invariants(&self, key_of: impl Fn(u32) -> u64) {
        let mut n = 0;
        for (i, s) in self.slots.iter().enumerate() {
            if s.stored == EMPTY {
                continue;
            }
            n += 1;
            let key = key_of(s.value());
            assert_eq!(s.tag, tag_of(key), "slot {i}: tag of another key");
            let mut k = s.tag as usize & self.mask;
            while k != i {
                assert_ne!(
                    self.slots[k].stored, EMPTY,
                    "slot {i}: a gap after its home"
                );
                k = (k + 1) & self.mask;
            }
        }
        assert_eq!(n, self.len, "entries counted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn agrees_with_a_hash_map_under_churn() {
        // Keys collide on purpose (key = value % 97 over small values): `find` returns every
        // value of a key; removal keeps the others reachable.
        let key_of = |v: u32| u64::from(v % 97);
        let mut t = SlotTable::try_new(300, "test").unwrap();
        let mut model: HashMap<u32, ()> = HashMap::new();
        let mut x: u64 = 7;
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = (x >> 40) as u32 % 600;
            if model.contains_key(&v) {
                t.remove(key_of(v), v);
                model.remove(&v);
            } else if model.len() < 300 {
                t.insert(key_of(v), v);
                model.insert(v, ());
            }
            if x % 64 == 0 {
                t.check_invariants(key_of);
            }
        }
        t.check_invariants(key_of);
        assert_eq!(t.len(), model.len());
        for k in 0..97u64 {
            let mut got: Vec<u32> = t.find(k, key_of).collect();
            got.sort_unstable();
            let mut want: Vec<u32> = model.keys().copied().filter(|&v| key_of(v) == k).collect();
            want.sort_unstable();
            assert_eq!(got, want, "key {k}");
        }
        // insert_new refuses a key that has a value; upsert replaces it.
        let key_of_mod = |v: u32| u64::from(v % 1000 % 97);
        let mut u = SlotTable::try_new(8, "test").unwrap();
        assert_eq!(u.insert_new(5, 5, key_of_mod), None);
        assert_eq!(
            u.insert_new(5, 102, key_of_mod),
            Some(5),
            "102 % 97 == 5: taken"
        );
        assert_eq!(u.upsert(5, 1005, key_of_mod), Some(5));
        assert_eq!(u.get(5, key_of_mod), Some(1005));
        assert_eq!(u.upsert(6, 6, key_of_mod), None);
        assert_eq!(u.len(), 2);
        u.check_invariants(key_of_mod);
        let first = *model.keys().next().unwrap();
        t.replace(key_of(first), first, 1000 + first);
        assert!(t
            .find(key_of(first), |v| key_of(v % 1000))
            .any(|v| v == 1000 + first));
        t.clear();
        assert!(t.is_empty() && t.values().next().is_none());
    }

    #[test]
    #[should_panic(expected = "over capacity")]
    fn more_than_max_entries_is_loud() {
        let mut t = SlotTable::try_new(2, "test").unwrap();
        for v in 0..5 {
            t.insert(u64::from(v), v);
        }
    }
}
