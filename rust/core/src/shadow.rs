//! Shadow caches: sampled simulations of LRU and LFU beside a tier, for the `adaptive` policy.
//!
//! Design (set dueling, with the spatial hash sampling of SHARDS, Waldspurger et al., FAST
//! 2015): every block lookup the tier serves or misses (`reference`) is offered to two
//! simulated caches of hash fingerprints, one run by `lru`'s rule and one by `lfu`'s
//! (classes `min(hits, MAX_HITS)`, least recent first within a class, hit counts kept across
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
//! also does a hash-map lookup and a list move in each shadow (O(1)).

use crate::error::Result;
use crate::eviction::{LFU_EXPERT, LFU_GHOST_PER_BLOCK, LRU_EXPERT, MAX_HITS};
use crate::ghost::{FingerprintMap, Ghost, Remembered};

/// About how many entries each shadow holds: enough for a stable estimate, few enough to
/// cost nothing next to the tier.
pub const SHADOW_SLOTS: usize = 4096;

/// The scores halve every this many shadow capacities of sampled references.
pub const HALF_LIFE_TURNS: f64 = 8.0;

/// A challenger leads once its score exceeds the leader's by this fraction.
pub const SWITCH_MARGIN: f64 = 0.05;

const NIL: u32 = u32::MAX;

/// One simulated cache of fingerprints under `lru`'s or `lfu`'s rule.
#[derive(Debug, Clone)]
struct Shadow {
    lfu: bool,
    capacity: usize,
    /// Fingerprint -> slot.
    at: FingerprintMap<u32>,
    fp: Vec<u64>,
    hits: Vec<u8>,
    prev: Vec<u32>,
    next: Vec<u32>,
    /// One FIFO list per class (one for LRU), least recent at the head.
    head: Vec<u32>,
    tail: Vec<u32>,
    /// Slots never used yet.
    unused: u32,
    /// `lfu`: what evicted entries had.
    ghost: Ghost,
}

impl Shadow {
    fn try_new(capacity: usize, lfu: bool) -> Result<Self> {
        let classes = if lfu { MAX_HITS as usize + 1 } else { 1 };
        let mut at = FingerprintMap::default();
        at.try_reserve(capacity).map_err(|_| {
            crate::fallible::out_of_memory("the adaptive policy's shadows", capacity, 16)
        })?;
        let ghost = Ghost::try_new(if lfu {
            capacity * LFU_GHOST_PER_BLOCK
        } else {
            0
        })?;
        Ok(Shadow {
            lfu,
            capacity,
            at,
            fp: vec![0; capacity],
            hits: vec![0; capacity],
            prev: vec![NIL; capacity],
            next: vec![NIL; capacity],
            head: vec![NIL; classes],
            tail: vec![NIL; classes],
            unused: 0,
            ghost,
        })
    }

    fn clear(&mut self) {
        self.at.clear();
        self.head.fill(NIL);
        self.tail.fill(NIL);
        self.unused = 0;
        self.ghost.clear();
    }

    fn class(&self, s: u32) -> usize {
        if self.lfu {
            self.hits[s as usize] as usize
        } else {
            0
        }
    }

    fn push_back(&mut self, s: u32) {
        let c = self.class(s);
        let i = s as usize;
        self.prev[i] = self.tail[c];
        self.next[i] = NIL;
        match self.tail[c] {
            NIL => self.head[c] = s,
            t => self.next[t as usize] = s,
        }
        self.tail[c] = s;
    }

    fn unlink(&mut self, s: u32) {
        let c = self.class(s);
        let (p, n) = (self.prev[s as usize], self.next[s as usize]);
        match p {
            NIL => self.head[c] = n,
            p => self.next[p as usize] = n,
        }
        match n {
            NIL => self.tail[c] = p,
            n => self.prev[n as usize] = p,
        }
    }

    /// A lookup of `fp`: whether the shadow holds it (a hit, which refreshes it), else it
    /// is cached now, evicting by the shadow's rule when full.
    fn reference(&mut self, fp: u64) -> bool {
        if self.capacity == 0 {
            return false;
        }
        if let Some(&s) = self.at.get(&fp) {
            self.unlink(s);
            let h = &mut self.hits[s as usize];
            *h = h.saturating_add(1).min(MAX_HITS);
            self.push_back(s);
            return true;
        }
        let s = if (self.unused as usize) < self.capacity {
            self.unused += 1;
            self.unused - 1
        } else {
            let c = (0..self.head.len())
                .find(|&c| self.head[c] != NIL)
                .expect("a full shadow has entries");
            let victim = self.head[c];
            self.unlink(victim);
            let old = self.fp[victim as usize];
            self.at.remove(&old);
            if self.lfu {
                let noted = Remembered {
                    hits: self.hits[victim as usize],
                    ..Remembered::default()
                };
                self.ghost.insert(old, noted);
            }
            victim
        };
        self.fp[s as usize] = fp;
        self.hits[s as usize] = match self.ghost.take(fp) {
            Some(r) => r.hits.saturating_add(1).min(MAX_HITS),
            None => 0,
        };
        self.at.insert(fp, s);
        self.push_back(s);
        false
    }
}

/// The two shadows of one tier and the rule that leads.
#[derive(Debug, Clone)]
pub struct Shadows {
    /// A fingerprint is sampled when `fp % rate == 0` (`rate` a power of two: `fp & mask`).
    mask: u64,
    shadows: [Shadow; 2],
    /// Decayed hits of each shadow (`LRU_EXPERT`, `LFU_EXPERT`).
    score: [f64; 2],
    decay: f64,
    leader: u8,
    sampled: u64,
}

impl Shadows {
    /// Shadows for a tier of `num_blocks` blocks.
    pub fn try_new(num_blocks: usize) -> Result<Self> {
        let rate = num_blocks.div_ceil(SHADOW_SLOTS).max(1).next_power_of_two();
        let capacity = num_blocks.div_ceil(rate);
        let half_life = (HALF_LIFE_TURNS * capacity as f64).max(1.0);
        Ok(Shadows {
            mask: rate as u64 - 1,
            shadows: [
                Shadow::try_new(capacity, false)?,
                Shadow::try_new(capacity, true)?,
            ],
            score: [0.0; 2],
            decay: 0.5f64.powf(1.0 / half_life),
            leader: LRU_EXPERT,
            sampled: 0,
        })
    }

    /// A lookup of the block with fingerprint `fp` (hit or miss in the tier itself).
    pub fn reference(&mut self, fp: u64) {
        // The fingerprint's low bits are uniform (a mixed hash), so this samples one in
        // `rate` blocks by content: a sampled block is always sampled.
        if fp & self.mask != 0 {
            return;
        }
        self.sampled += 1;
        for e in [LRU_EXPERT, LFU_EXPERT] {
            let hit = self.shadows[e as usize].reference(fp);
            let s = &mut self.score[e as usize];
            *s = *s * self.decay + f64::from(u8::from(hit));
        }
        let (lead, other) = (self.leader as usize, 1 - self.leader as usize);
        if self.score[other] > self.score[lead] * (1.0 + SWITCH_MARGIN) {
            self.leader = other as u8;
        }
    }

    /// The rule the tier follows now: `LRU_EXPERT` or `LFU_EXPERT`.
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
        let mut s = Shadow::try_new(5, false).unwrap();
        let refs: Vec<u64> = (0..400).map(|i| splitmix(i) % 9).collect();
        let hits = refs.iter().filter(|&&r| s.reference(r)).count();
        assert_eq!(hits, lru_sim(&refs, 5));
        assert_eq!(s.at.len(), 5);
    }

    #[test]
    fn the_lfu_shadow_keeps_what_is_hit_and_remembers_it() {
        let mut s = Shadow::try_new(2, true).unwrap();
        // 1 is hit twice, then a scan of new keys goes through: LRU would lose 1, LFU keeps it.
        for k in [1, 1, 1, 10, 11, 12, 13] {
            s.reference(k);
        }
        assert!(s.reference(1), "the frequent key survived the scan");
        // Evicted, its count comes back from the ghost: 2 evicts 1's scan-mates first.
        let mut s = Shadow::try_new(1, true).unwrap();
        for k in [7, 7, 8] {
            s.reference(k);
        }
        assert!(!s.reference(7), "capacity 1: 8 evicted 7");
        assert_eq!(
            s.hits[s.at[&7] as usize], 2,
            "hits 1, plus one for the miss"
        );
    }

    #[test]
    fn the_leader_follows_the_rule_that_hits_more() {
        let n = 256; // tier blocks; rate 1 below SHADOW_SLOTS
        let mut sh = Shadows::try_new(n).unwrap();
        assert_eq!((sh.rate(), sh.leader()), (1, LRU_EXPERT));
        // Recency wins: phases of a new working set of 200 keys, each cycled 10 times. LRU
        // hits all but the first pass; LFU keeps the last phase's counted keys until the new
        // ones' counts (climbing through its ghost) pass them.
        for phase in 0..20u64 {
            for i in 0..2000u64 {
                sh.reference(splitmix(phase * 1000 + i % 200));
            }
        }
        assert_eq!(sh.leader(), LRU_EXPERT, "scores {:?}", sh.score);
        assert!(sh.score[0] > 1.3 * sh.score[1], "scores {:?}", sh.score);
        // Frequency wins: a hot set of 100 keys between scans of one-time keys.
        for i in 0..40_000u64 {
            let k = if i % 3 == 0 { i % 100 } else { 1_000_000 + i };
            sh.reference(splitmix(k));
        }
        assert_eq!(sh.leader(), LFU_EXPERT, "scores {:?}", sh.score);
        sh.clear();
        assert_eq!(sh.leader(), LRU_EXPERT);
    }

    #[test]
    fn big_tiers_sample_by_fingerprint() {
        let sh = Shadows::try_new(1_000_000).unwrap();
        assert_eq!(sh.rate(), 256);
        assert!(sh.shadows[0].capacity <= SHADOW_SLOTS);
        let mut sh = sh;
        for i in 0..100_000u64 {
            sh.reference(splitmix(i));
        }
        let expected = 100_000 / 256;
        assert!(
            sh.sampled().abs_diff(expected) < expected / 4,
            "{}",
            sh.sampled()
        );
    }
}
