//! Shadow caches: sampled simulations of LRU and LRU-2 beside a tier, for the `adaptive` policy.
//!
//! Design (set dueling, with the spatial hash sampling of SHARDS, Waldspurger et al., FAST
//! 2015): every block lookup the tier serves or misses (`reference`) is offered to two
//! simulated caches of hash fingerprints, one run by `lru`'s rule and one by `lru2`'s (the
//! same `lru2::Lru2Order` as the tier, by the tier's rounds, last accesses kept across
//! evictions by a ghost of `LFU_GHOST_PER_BLOCK` entries per slot). Only fingerprints below a
//! threshold are offered, one in `rate`, and each shadow holds `capacity / rate` entries, so
//! the pair costs about `SHADOW_SLOTS` entries whatever the tier's size, and its hit rates
//! estimate what either rule would get on the whole tier. Each shadow's hits feed a score
//! that decays by half every `HALF_LIFE_TURNS` shadow capacities of references; the
//! `leader` is the rule with the higher score (LRU while they tie, and a challenger must
//! beat it by `SWITCH_MARGIN`, so one noisy window does not flip it).
//!
//! The shadows see block fingerprints only: they decide which rule the tier follows, never
//! which bytes are served. Cost: a multiply and a compare per reference; one in `rate`
//! also does a hash-map lookup and a list move in the LRU shadow (O(1)) and a heap update in
//! the LRU-2 one (O(log capacity)).

use crate::error::Result;
use crate::eviction::{LFU_GHOST_PER_BLOCK, LRU2_EXPERT, LRU_EXPERT};
use crate::ghost::{FingerprintMap, Ghost, Remembered};
use crate::lru2::{self, Lru2Order};

/// About how many entries each shadow holds: enough for a stable estimate, few enough to
/// cost nothing next to the tier.
pub const SHADOW_SLOTS: usize = 4096;

/// The scores halve every this many shadow capacities of sampled references.
pub const HALF_LIFE_TURNS: f64 = 8.0;

/// A challenger leads once its score exceeds the leader's by this fraction.
pub const SWITCH_MARGIN: f64 = 0.05;

const NIL: u32 = u32::MAX;

/// One simulated cache of fingerprints under `lru`'s or `lru2`'s rule.
#[derive(Debug, Clone)]
struct Shadow {
    capacity: usize,
    /// Fingerprint -> slot.
    at: FingerprintMap<u32>,
    fp: Vec<u64>,
    /// `lru`: slots least recent first.
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    /// `lru2`: the rule's order over slots (absent under `lru`).
    lru2: Option<Lru2Order>,
    /// Slots never used yet.
    unused: u32,
    /// `lru2`: the last access of evicted entries.
    ghost: Ghost,
}

impl Shadow {
    /// `lru2_newest_first`: None for an LRU shadow, else an `lru2` one whose entries seen
    /// once go newest first (as the device tier's) or oldest first.
    fn try_new(capacity: usize, lru2_newest_first: Option<bool>) -> Result<Self> {
        let mut at = FingerprintMap::default();
        at.try_reserve(capacity).map_err(|_| {
            crate::fallible::out_of_memory("the adaptive policy's shadows", capacity, 16)
        })?;
        let lru2 = lru2_newest_first
            .map(|newest| Lru2Order::try_new(capacity, newest))
            .transpose()?;
        let ghost = Ghost::try_new(if lru2.is_some() {
            capacity * LFU_GHOST_PER_BLOCK
        } else {
            0
        })?;
        Ok(Shadow {
            capacity,
            at,
            fp: vec![0; capacity],
            prev: vec![NIL; capacity],
            next: vec![NIL; capacity],
            head: NIL,
            tail: NIL,
            lru2,
            unused: 0,
            ghost,
        })
    }

    fn clear(&mut self) {
        self.at.clear();
        self.head = NIL;
        self.tail = NIL;
        if let Some(o) = self.lru2.as_mut() {
            while let Some(s) = o.pop() {
                o.forget(s);
            }
        }
        self.unused = 0;
        self.ghost.clear();
    }

    /// Queues slot `s` as the most recent (`lru`) or by the rule's key (`lru2`).
    fn push(&mut self, s: u32) {
        if let Some(o) = self.lru2.as_mut() {
            o.push(s);
            return;
        }
        let i = s as usize;
        self.prev[i] = self.tail;
        self.next[i] = NIL;
        match self.tail {
            NIL => self.head = s,
            t => self.next[t as usize] = s,
        }
        self.tail = s;
    }

    fn unlink(&mut self, s: u32) {
        if let Some(o) = self.lru2.as_mut() {
            o.remove(s);
            return;
        }
        let (p, n) = (self.prev[s as usize], self.next[s as usize]);
        match p {
            NIL => self.head = n,
            p => self.next[p as usize] = n,
        }
        match n {
            NIL => self.tail = p,
            n => self.prev[n as usize] = p,
        }
    }

    /// A lookup of `fp` in `round`: whether the shadow holds it (a hit, which refreshes it),
    /// else it is cached now, evicting by the shadow's rule when full.
    fn reference(&mut self, fp: u64, round: u32) -> bool {
        if self.capacity == 0 {
            return false;
        }
        if let Some(&s) = self.at.get(&fp) {
            self.unlink(s);
            if let Some(o) = self.lru2.as_mut() {
                o.access(s, round);
            }
            self.push(s);
            return true;
        }
        let s = if (self.unused as usize) < self.capacity {
            self.unused += 1;
            self.unused - 1
        } else {
            let victim = match self.lru2.as_ref() {
                Some(o) => o.peek().expect("a full shadow has entries"),
                None => self.head,
            };
            self.unlink(victim);
            let old = self.fp[victim as usize];
            self.at.remove(&old);
            if let Some(o) = self.lru2.as_mut() {
                let noted = Remembered {
                    at: o.last[victim as usize],
                    ..Remembered::default()
                };
                o.forget(victim);
                self.ghost.insert(old, noted);
            }
            victim
        };
        self.fp[s as usize] = fp;
        if let Some(o) = self.lru2.as_mut() {
            let second = self.ghost.take(fp).map_or(lru2::NEVER, |r| r.at);
            o.cache(s, round, second);
        }
        self.at.insert(fp, s);
        self.push(s);
        false
    }
}

/// The two shadows of one tier and the rule that leads.
#[derive(Debug, Clone)]
pub struct Shadows {
    /// A fingerprint is sampled when `fp % rate == 0` (`rate` a power of two: `fp & mask`).
    mask: u64,
    shadows: [Shadow; 2],
    /// Decayed hits of each shadow (`LRU_EXPERT`, `LRU2_EXPERT`).
    score: [f64; 2],
    decay: f64,
    leader: u8,
    sampled: u64,
}

impl Shadows {
    /// Shadows for a tier of `num_blocks` blocks (`device`: its `lru2` evicts blocks seen
    /// once newest first).
    pub fn try_new(num_blocks: usize, device: bool) -> Result<Self> {
        let rate = num_blocks.div_ceil(SHADOW_SLOTS).max(1).next_power_of_two();
        let capacity = num_blocks.div_ceil(rate);
        let half_life = (HALF_LIFE_TURNS * capacity as f64).max(1.0);
        Ok(Shadows {
            mask: rate as u64 - 1,
            shadows: [
                Shadow::try_new(capacity, None)?,
                Shadow::try_new(capacity, Some(device))?,
            ],
            score: [0.0; 2],
            decay: 0.5f64.powf(1.0 / half_life),
            leader: LRU_EXPERT,
            sampled: 0,
        })
    }

    /// A lookup of the block with fingerprint `fp` in `round` (hit or miss in the tier
    /// itself).
    pub fn reference(&mut self, fp: u64, round: u32) {
        // The fingerprint's low bits are uniform (a mixed hash), so this samples one in
        // `rate` blocks by content: a sampled block is always sampled.
        if fp & self.mask != 0 {
            return;
        }
        self.sampled += 1;
        for e in [LRU_EXPERT, LRU2_EXPERT] {
            let hit = self.shadows[e as usize].reference(fp, round);
            let s = &mut self.score[e as usize];
            *s = *s * self.decay + f64::from(u8::from(hit));
        }
        let (lead, other) = (self.leader as usize, 1 - self.leader as usize);
        if self.score[other] > self.score[lead] * (1.0 + SWITCH_MARGIN) {
            self.leader = other as u8;
        }
    }

    /// The rule the tier follows now: `LRU_EXPERT` or `LRU2_EXPERT`.
    pub fn leader(&self) -> u8 {
        self.leader
    }

    /// References the shadows took (sampled ones).
    pub fn sampled(&self) -> u64 {
        self.sampled
    }

    /// One in how many blocks the shadows see.
    pub fn rate(&self) -> u64 {
        self.mask + 1
    }

    /// Forgets everything (a prefix-cache reset): back to LRU. Allocates nothing.
    pub fn clear(&mut self) {
        for s in &mut self.shadows {
            s.clear();
        }
        self.score = [0.0; 2];
        self.leader = LRU_EXPERT;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An independent LRU of `cap` keys: a hit moves the key to the back.
    fn lru_sim(refs: &[u64], cap: usize) -> usize {
        let mut q: Vec<u64> = Vec::new();
        let mut hits = 0;
        for &r in refs {
            if let Some(i) = q.iter().position(|&x| x == r) {
                q.remove(i);
                hits += 1;
            } else if q.len() == cap {
                q.remove(0);
            }
            q.push(r);
        }
        hits
    }

    fn splitmix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[test]
    fn the_lru_shadow_is_exactly_lru() {
        let mut s = Shadow::try_new(5, None).unwrap();
        let refs: Vec<u64> = (0..400).map(|i| splitmix(i) % 9).collect();
        let hits = (0u32..)
            .zip(&refs)
            .filter(|&(round, &r)| s.reference(r, round))
            .count();
        assert_eq!(hits, lru_sim(&refs, 5));
        assert_eq!(s.at.len(), 5);
    }

    #[test]
    fn the_lru2_shadow_keeps_what_is_seen_twice_and_remembers_it() {
        let mut s = Shadow::try_new(2, Some(true)).unwrap();
        // 1 is seen in rounds 0 and 1, then a scan of new keys goes through: LRU would lose
        // 1; `lru2` evicts the newest key seen once each time and keeps 1.
        for (round, k) in [(0, 1), (1, 1), (2, 10), (3, 11), (4, 12), (5, 13)] {
            s.reference(k, round);
        }
        assert!(s.reference(1, 6), "the key seen twice survived the scan");
        assert!(!s.reference(12, 7), "12 was evicted by 13");
        // Evicted, a key's last access comes back from the ghost: seen twice again at once.
        let mut s = Shadow::try_new(1, Some(true)).unwrap();
        for (round, k) in [(0, 7), (1, 8)] {
            s.reference(k, round);
        }
        assert!(!s.reference(7, 2), "capacity 1: 8 evicted 7");
        let o = s.lru2.as_ref().unwrap();
        let slot = s.at[&7];
        assert_eq!((o.second[slot as usize], o.last[slot as usize]), (0, 2));
    }

    #[test]
    fn the_leader_follows_the_rule_that_hits_more() {
        let n = 256; // tier blocks; rate 1 below SHADOW_SLOTS
        let mut sh = Shadows::try_new(n, true).unwrap();
        assert_eq!((sh.rate(), sh.leader()), (1, LRU_EXPERT));
        // Recency wins: phases of a new working set of 200 keys, each cycled 10 times. LRU
        // hits all but the first pass; `lru2` keeps the last phase's keys (seen many times)
        // and evicts the new ones seen once, until their second pass makes them the more
        // recent: it loses most of the second pass too.
        for phase in 0..20u64 {
            for i in 0..2000u64 {
                sh.reference(splitmix(phase * 1000 + i % 200), (phase * 2000 + i) as u32);
            }
        }
        assert_eq!(sh.leader(), LRU_EXPERT, "scores {:?}", sh.score);
        assert!(
            sh.score[0] > (1.0 + SWITCH_MARGIN) * sh.score[1],
            "scores {:?}",
            sh.score
        );
        // Frequency wins: a hot set of 100 keys between scans of one-time keys.
        for i in 0..40_000u64 {
            let k = if i % 3 == 0 { i % 100 } else { 1_000_000 + i };
            sh.reference(splitmix(k), 40_000 + i as u32);
        }
        assert_eq!(sh.leader(), LRU2_EXPERT, "scores {:?}", sh.score);
        sh.clear();
        assert_eq!(sh.leader(), LRU_EXPERT);
    }

    #[test]
    fn big_tiers_sample_by_fingerprint() {
        let sh = Shadows::try_new(1_000_000, true).unwrap();
        assert_eq!(sh.rate(), 256);
        assert!(sh.shadows[0].capacity <= SHADOW_SLOTS);
        let mut sh = sh;
        for i in 0..100_000u64 {
            sh.reference(splitmix(i), i as u32);
        }
        let expected = 100_000 / 256;
        assert!(
            sh.sampled().abs_diff(expected) < expected / 4,
            "{}",
            sh.sampled()
        );
    }
}
