//! The prefix cache index: chained block hashes and the cached blocks they name.
//!
//! Hashing: a sequence's root hash comes from its salt (`root_hash`); a full block's hash is
//! `H(parent_hash || token ids)` with `H` = xxh3-128 or the first 16 bytes of SHA-256, so equal
//! token runs share a block only when their whole prefix and salt are equal.
//!
//! Index: `by_hash` maps a hash to the one block that holds it; `siblings` maps (parent hash,
//! first token) to an intrusive list of the cached blocks that follow that parent and start
//! with that token (O(1) insert and remove). That is what partial reuse searches
//! (TensorRT-LLM's partial matching: the child whose first k tokens equal the request's next
//! k tokens; k >= 1 needs the first token to match, so no other sibling can win).
//! Each cached block also keeps its token ids, hash and parent hash, in arrays by block id.
//! Both maps are `slots::SlotTable`s keyed by 64 bits (`ghost::fingerprint` of the hash; of
//! the parent hash mixed with the token): 8-byte slots holding a tag and a block id, sized
//! once for every block of the tier, so an eviction and a registration touch few cache lines
//! and nothing is allocated per block. Every answer is checked against the full 128-bit
//! hashes in the arrays: a fingerprint shared by two hashes makes the later one stay
//! unindexed (a miss), and a sibling list shared by two keys is filtered, so a collision
//! costs a hit, never serves another prefix's block.
//! Invariants: `by_hash[fp(h)] == b` iff block `b` is indexed with hash `h`, and then `b` is
//! in the sibling list of (parent, its first token); a hash is held by at most one block
//! (later duplicates stay unindexed).

use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_128;

use crate::config::HashAlgo;
use crate::error::Result;
use crate::fallible::{out_of_memory, vec_of, zeroed};
use crate::ghost::fingerprint;
use crate::slots::{SlotTable, PREFETCH_AHEAD};
use crate::types::{BlockHash, BlockId};

/// Hashes blocks of token ids under one algorithm.
#[derive(Debug, Clone, Copy)]
pub struct Hasher {
    algo: HashAlgo,
}

/// A request salt, as bytes tagged by their Python type so `"1"`, `b"1"` and `1` differ.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Salt {
    Str(String),
    Bytes(Vec<u8>),
    Int(i64),
}

impl Hasher {
    pub fn new(algo: HashAlgo) -> Self {
        Hasher { algo }
    }

    fn digest(self, bytes: &[u8]) -> BlockHash {
        match self.algo {
            HashAlgo::Xxh3_128 => xxh3_128(bytes),
            HashAlgo::Sha256 => {
                let d = Sha256::digest(bytes);
                u128::from_le_bytes(d[..16].try_into().expect("sha256 has 32 bytes"))
            }
        }
    }

    /// The hash every sequence of this salt chains from (0 without a salt).
    pub fn root_hash(&self, salt: Option<&Salt>) -> BlockHash {
        let Some(salt) = salt else { return 0 };
        let mut buf = b"ferrumkv-salt:".to_vec();
        match salt {
            Salt::Str(s) => {
                buf.push(b's');
                buf.extend_from_slice(s.as_bytes());
            }
            Salt::Bytes(b) => {
                buf.push(b'b');
                buf.extend_from_slice(b);
            }
            Salt::Int(i) => {
                buf.push(b'i');
                buf.extend_from_slice(&i.to_le_bytes());
            }
        }
        self.digest(&buf)
    }

    /// Hash of one full block given its parent's hash. `scratch` is reused between calls.
    pub fn block_hash(
        &self,
        parent: BlockHash,
        tokens: &[u32],
        scratch: &mut Vec<u8>,
    ) -> BlockHash {
        scratch.clear();
        scratch.extend_from_slice(&parent.to_le_bytes());
        scratch.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
        self.digest(scratch)
    }

    /// Chained hashes of every full block of `tokens`.
    pub fn chain(&self, root: BlockHash, tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
        let mut scratch = Vec::with_capacity(16 + 4 * block_size);
        let mut parent = root;
        tokens
            .chunks_exact(block_size)
            .map(|blk| {
                parent = self.block_hash(parent, blk, &mut scratch);
                parent
            })
            .collect()
    }
}

/// Copies a block's token ids. The common block sizes are copied as fixed-size arrays,
/// which compile to a few inline moves: a slice copy of a length known only at run time is a
/// `memcpy` call, which cost more than the 64 bytes it moved (and a loop of fixed-size
/// chunks is turned back into that call).
fn copy_tokens(dst: &mut [u32], src: &[u32]) {
    fn fixed<const N: usize>(dst: &mut [u32], src: &[u32]) -> bool {
        match (<&mut [u32; N]>::try_from(dst), <&[u32; N]>::try_from(src)) {
            (Ok(d), Ok(s)) => {
                *d = *s;
                true
            }
            _ => false,
        }
    }
    assert_eq!(dst.len(), src.len(), "a block's token ids");
    if !(fixed::<16>(dst, src) || fixed::<32>(dst, src)) {
        dst.copy_from_slice(src);
    }
}

/// (parent hash, first token id) of a cached block.
type SiblingKey = (BlockHash, u32);

/// The 64-bit map key of a sibling list.
fn sibling_key((parent, first): SiblingKey) -> u64 {
    fingerprint(parent).rotate_left(29) ^ u64::from(first)
}

const NIL: u32 = u32::MAX;

/// What `state` says of a block.
const UNINDEXED: u8 = 0;
const INDEXED: u8 = 1;
/// Indexed, and its parent is the chain's root (a salt), not a block.
const INDEXED_FIRST: u8 = 2;

/// hash -> block for the cached blocks of one tier.
#[derive(Debug, Clone)]
pub struct PrefixIndex {
    block_size: usize,
    /// Fingerprint of a hash -> the block holding it.
    by_hash: SlotTable,
    /// Head of the sibling list of each (parent hash, first token) key: partial matching
    /// only ever looks at cached children that share the request's next token.
    siblings: SlotTable,
    /// Intrusive doubly-linked sibling lists (`NIL`-terminated), indexed by block id.
    next_sib: Vec<u32>,
    prev_sib: Vec<u32>,
    /// Per block: `UNINDEXED`, `INDEXED` or `INDEXED_FIRST`; its hash and parent hash.
    state: Vec<u8>,
    hash: Vec<BlockHash>,
    parent: Vec<BlockHash>,
    /// Token ids of each cached block (`block_size` per block).
    tokens: Vec<u32>,
}

impl PrefixIndex {
    /// An empty index of `num_blocks` blocks. Panics where `try_new` fails (tests, benches).
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self::try_new(num_blocks, block_size).unwrap_or_else(|e| panic!("{e}"))
    }

    /// An empty index of `num_blocks` blocks of `block_size` tokens; `Error::OutOfMemory`
    /// when its per-block arrays do not fit in memory (or their size overflows `usize`).
    pub fn try_new(num_blocks: usize, block_size: usize) -> Result<Self> {
        const TOKENS: &str = "the prefix index's token ids";
        const { assert!(UNINDEXED == 0, "a zeroed state is UNINDEXED") };
        let num_tokens = num_blocks
            .checked_mul(block_size)
            .ok_or_else(|| out_of_memory(TOKENS, num_blocks, 4 * block_size))?;
        Ok(PrefixIndex {
            block_size,
            by_hash: SlotTable::try_new(num_blocks, "the prefix index's hash table")?,
            siblings: SlotTable::try_new(num_blocks, "the prefix index's sibling table")?,
            next_sib: vec_of(num_blocks, NIL, "the prefix index's sibling links")?,
            prev_sib: vec_of(num_blocks, NIL, "the prefix index's sibling links")?,
            state: zeroed(num_blocks, "the prefix index's entries")?,
            hash: zeroed(num_blocks, "the prefix index's hashes")?,
            parent: zeroed(num_blocks, "the prefix index's parent hashes")?,
            tokens: zeroed(num_tokens, TOKENS)?,
        })
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    pub fn get(&self, h: BlockHash) -> Option<BlockId> {
        let b = self.by_hash.get(fingerprint(h), |b| self.fp_of(b))?;
        (self.hash[b as usize] == h).then_some(BlockId(b))
    }

    /// The blocks holding the longest run of `hashes` from the first that is all indexed (a
    /// prompt's full hits). Each hash's slot is fetched `PREFETCH_AHEAD` hashes before it is
    /// looked up, so the misses of consecutive hits overlap (and a few are fetched in vain
    /// past the first miss).
    pub fn longest_prefix(&self, hashes: &[BlockHash]) -> Vec<BlockId> {
        for &h in hashes.iter().take(PREFETCH_AHEAD) {
            self.by_hash.prefetch(fingerprint(h));
        }
        let mut hits = Vec::new();
        for (i, &h) in hashes.iter().enumerate() {
            if let Some(&ahead) = hashes.get(i + PREFETCH_AHEAD) {
                self.by_hash.prefetch(fingerprint(ahead));
            }
            let Some(b) = self.get(h) else { break };
            hits.push(b);
        }
        hits
    }

    /// The `by_hash` key of an indexed block.
    fn fp_of(&self, b: u32) -> u64 {
        fingerprint(self.hash[b as usize])
    }

    /// The `siblings` key of an indexed block.
    fn sib_key_of(&self, b: u32) -> u64 {
        sibling_key((self.parent[b as usize], self.tokens_of(BlockId(b))[0]))
    }

    fn indexed(&self, b: BlockId) -> bool {
        self.state[b.idx()] != UNINDEXED
    }

    pub fn hash_of(&self, b: BlockId) -> Option<BlockHash> {
        self.indexed(b).then(|| self.hash[b.idx()])
    }

    pub fn parent_of(&self, b: BlockId) -> Option<BlockHash> {
        self.indexed(b).then(|| self.parent[b.idx()])
    }

    /// The parent block's hash as events report it: None for a chain's first block.
    pub fn parent_block_of(&self, b: BlockId) -> Option<BlockHash> {
        (self.state[b.idx()] == INDEXED).then(|| self.parent[b.idx()])
    }

    pub fn is_first(&self, b: BlockId) -> bool {
        self.state[b.idx()] == INDEXED_FIRST
    }

    pub fn tokens_of(&self, b: BlockId) -> &[u32] {
        &self.tokens[b.idx() * self.block_size..(b.idx() + 1) * self.block_size]
    }

    /// Starts fetching what indexing `b` under `hash` (after `parent`, first token `first`)
    /// touches: its slots in both tables and its entries in the arrays. Registering a
    /// prompt's new blocks prefetches them all first, so their cache misses overlap.
    pub fn prefetch_insert(&self, b: BlockId, hash: BlockHash, parent: BlockHash, first: u32) {
        self.by_hash.prefetch(fingerprint(hash));
        self.siblings.prefetch(sibling_key((parent, first)));
        let i = b.idx();
        crate::slots::prefetch(&self.hash[i]);
        crate::slots::prefetch(&self.parent[i]);
        crate::slots::prefetch(&self.tokens[i * self.block_size]);
    }

    /// Starts fetching block `b`'s entries in the arrays (its hash, parent hash, first token
    /// and sibling links): the first wave of `prefetch_remove`. Changes nothing.
    pub fn prefetch_entry(&self, b: BlockId) {
        let i = b.idx();
        crate::slots::prefetch(&self.state[i]);
        crate::slots::prefetch(&self.hash[i]);
        crate::slots::prefetch(&self.parent[i]);
        crate::slots::prefetch(&self.tokens[i * self.block_size]);
        crate::slots::prefetch(&self.next_sib[i]);
        crate::slots::prefetch(&self.prev_sib[i]);
    }

    /// Starts fetching the table slots that removing `b` touches (it reads the entries
    /// `prefetch_entry` fetched: call that first, for every block of a batch). Changes
    /// nothing.
    pub fn prefetch_remove(&self, b: BlockId) {
        let i = b.idx();
        if self.state[i] == UNINDEXED {
            return;
        }
        self.by_hash.prefetch(fingerprint(self.hash[i]));
        self.siblings.prefetch(sibling_key((
            self.parent[i],
            self.tokens[i * self.block_size],
        )));
    }

    /// Indexes `b` under `hash`; returns false (and indexes nothing) if the hash is already
    /// held by another block.
    pub fn insert(
        &mut self,
        b: BlockId,
        hash: BlockHash,
        parent: BlockHash,
        first: bool,
        tokens: &[u32],
    ) -> bool {
        debug_assert_eq!(tokens.len(), self.block_size);
        debug_assert!(!self.indexed(b), "block {} indexed twice", b.0);
        // Taken: the same hash (a duplicate), or another sharing its fingerprint; either way
        // this block stays unindexed.
        let hashes = &self.hash;
        let taken = self
            .by_hash
            .insert_new(fingerprint(hash), b.0, |x| fingerprint(hashes[x as usize]));
        if taken.is_some() {
            return false;
        }
        let i = b.idx();
        self.state[i] = if first { INDEXED_FIRST } else { INDEXED };
        self.hash[i] = hash;
        self.parent[i] = parent;
        copy_tokens(
            &mut self.tokens[i * self.block_size..(i + 1) * self.block_size],
            tokens,
        );
        self.link(b, (parent, tokens[0]));
        true
    }

    /// Drops `b` from the index; returns its hash.
    pub fn remove(&mut self, b: BlockId) -> Option<BlockHash> {
        let hash = self.hash_of(b)?;
        self.by_hash.remove(fingerprint(hash), b.0);
        let key = (self.parent[b.idx()], self.tokens_of(b)[0]);
        self.unlink(b, key);
        self.state[b.idx()] = UNINDEXED;
        Some(hash)
    }

    fn link(&mut self, b: BlockId, key: SiblingKey) {
        let (parent, tokens, bs) = (&self.parent, &self.tokens, self.block_size);
        let key_of = |x: u32| sibling_key((parent[x as usize], tokens[x as usize * bs]));
        let head = self
            .siblings
            .upsert(sibling_key(key), b.0, key_of)
            .unwrap_or(NIL);
        self.next_sib[b.idx()] = head;
        self.prev_sib[b.idx()] = NIL;
        if head != NIL {
            self.prev_sib[head as usize] = b.0;
        }
    }

    fn unlink(&mut self, b: BlockId, key: SiblingKey) {
        let (p, n) = (self.prev_sib[b.idx()], self.next_sib[b.idx()]);
        if p == NIL {
            if n == NIL {
                self.siblings.remove(sibling_key(key), b.0);
            } else {
                self.siblings.replace(sibling_key(key), b.0, n);
            }
        } else {
            self.next_sib[p as usize] = n;
        }
        if n != NIL {
            self.prev_sib[n as usize] = p;
        }
    }

    /// Every block in the sibling list of `key`'s 64-bit key (another key's blocks too, if
    /// two keys share it).
    fn listed(&self, key: u64) -> impl Iterator<Item = BlockId> + '_ {
        let mut cur = self
            .siblings
            .get(key, |x| self.sib_key_of(x))
            .unwrap_or(NIL);
        std::iter::from_fn(move || {
            (cur != NIL).then(|| {
                let b = cur;
                cur = self.next_sib[b as usize];
                BlockId(b)
            })
        })
    }

    /// Cached children of `parent` whose first token is `first`.
    fn siblings_of(&self, key: SiblingKey) -> impl Iterator<Item = BlockId> + '_ {
        self.listed(sibling_key(key))
            .filter(move |&b| self.parent[b.idx()] == key.0 && self.tokens_of(b)[0] == key.1)
    }

    pub fn clear(&mut self) {
        self.by_hash.clear();
        self.siblings.clear();
        self.state.iter_mut().for_each(|s| *s = UNINDEXED);
    }

    /// The cached child of `parent` sharing the longest run of leading tokens with `window`,
    /// as `(block, matched_tokens)`, if any shares at least one. Ties go to the lowest id.
    pub fn best_partial(
        &self,
        parent: BlockHash,
        window: &[u32],
        usable: impl Fn(BlockId) -> bool,
    ) -> Option<(BlockId, usize)> {
        let first = *window.first()?;
        self.siblings_of((parent, first))
            .filter(|&b| usable(b))
            .map(|b| {
                let m = self
                    .tokens_of(b)
                    .iter()
                    .zip(window)
                    .take_while(|(a, c)| a == c)
                    .count();
                (b, m)
            })
            .filter(|&(_, m)| m > 0)
            .max_by(|x, y| x.1.cmp(&y.1).then(y.0.cmp(&x.0)))
    }

    /// Every indexed (hash, block).
    pub fn iter(&self) -> impl Iterator<Item = (BlockHash, BlockId)> + '_ {
        self.by_hash
            .values()
            .map(|b| (self.hash[b as usize], BlockId(b)))
    }

    /// Panics if the index disagrees with itself.
    pub fn check_invariants(&self) {
        self.by_hash.check_invariants(|x| self.fp_of(x));
        self.siblings.check_invariants(|x| self.sib_key_of(x));
        for b in self.by_hash.values() {
            let b = BlockId(b);
            assert!(self.indexed(b), "mapped block {} is not indexed", b.0);
            let key = (self.parent[b.idx()], self.tokens_of(b)[0]);
            assert!(
                self.siblings_of(key).any(|x| x == b),
                "block {} not among its siblings",
                b.0
            );
        }
        let n = self.state.iter().filter(|&&s| s != UNINDEXED).count();
        assert_eq!(n, self.by_hash.len());
        let heads: Vec<u64> = self.siblings.values().map(|x| self.sib_key_of(x)).collect();
        let listed: usize = heads.iter().map(|&k| self.listed(k).count()).sum();
        assert_eq!(listed, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_hash_digests_the_parent_then_the_tokens_little_endian() {
        let tokens: Vec<u32> = (0..16).map(|i| 0x0102_0304 * (i + 1)).collect();
        let parent: BlockHash = 0x1122_3344_5566_7788_99aa_bbcc_ddee_ff00;
        let mut bytes = parent.to_le_bytes().to_vec();
        for t in &tokens {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        let mut scratch = vec![7u8; 3]; // stale bytes from an earlier, shorter use
        for algo in [HashAlgo::Xxh3_128, HashAlgo::Sha256] {
            let h = Hasher::new(algo);
            assert_eq!(
                h.block_hash(parent, &tokens, &mut scratch),
                h.digest(&bytes)
            );
            assert_eq!(
                h.block_hash(parent, &tokens[..4], &mut scratch),
                h.digest(&bytes[..32])
            );
        }
        assert_eq!(
            xxh3_128(&bytes),
            Hasher::new(HashAlgo::Xxh3_128).digest(&bytes)
        );
    }

    #[test]
    fn chain_depends_on_prefix_and_salt() {
        for algo in [HashAlgo::Xxh3_128, HashAlgo::Sha256] {
            let h = Hasher::new(algo);
            let a = h.chain(0, &[1, 2, 3, 4, 5, 6, 7, 8, 9], 4);
            assert_eq!(a.len(), 2);
            let b = h.chain(0, &[1, 2, 3, 4, 5, 6, 7, 8], 4);
            assert_eq!(a, b);
            let c = h.chain(0, &[0, 2, 3, 4, 5, 6, 7, 8], 4);
            assert_ne!(a[1], c[1], "a different parent changes the child");
            let salted = h.root_hash(Some(&Salt::Str("tenant".into())));
            assert_ne!(h.chain(salted, &[1, 2, 3, 4], 4)[0], a[0]);
            assert_ne!(
                h.root_hash(Some(&Salt::Int(1))),
                h.root_hash(Some(&Salt::Str("1".into())))
            );
        }
    }

    #[test]
    fn partial_match_picks_the_longest() {
        let mut ix = PrefixIndex::new(4, 4);
        assert!(ix.insert(BlockId(0), 10, 0, true, &[1, 2, 3, 4]));
        assert!(ix.insert(BlockId(1), 11, 0, true, &[1, 2, 9, 9]));
        assert!(
            !ix.insert(BlockId(2), 10, 0, true, &[1, 2, 3, 4]),
            "duplicate hash stays unindexed"
        );
        assert_eq!(
            ix.best_partial(0, &[1, 2, 3, 7], |_| true),
            Some((BlockId(0), 3))
        );
        assert_eq!(ix.best_partial(0, &[1, 2], |_| true), Some((BlockId(0), 2)));
        assert_eq!(ix.best_partial(0, &[5], |_| true), None);
        assert_eq!(ix.remove(BlockId(0)), Some(10));
        assert_eq!(
            ix.best_partial(0, &[1, 2, 3, 7], |_| true),
            Some((BlockId(1), 2))
        );
        ix.check_invariants();
    }

    #[test]
    fn a_shared_fingerprint_costs_a_hit_never_another_block() {
        // Two hashes with the same 64-bit fingerprint (the halves swapped fold alike).
        let (a, b) = (1u128 << 64 | 2, 2u128 << 64 | 1);
        assert_eq!(fingerprint(a), fingerprint(b));
        let mut ix = PrefixIndex::new(4, 2);
        assert!(ix.insert(BlockId(0), a, 0, true, &[1, 2]));
        assert!(
            !ix.insert(BlockId(1), b, 0, true, &[1, 3]),
            "b stays unindexed"
        );
        assert_eq!((ix.get(a), ix.get(b)), (Some(BlockId(0)), None));
        // Sibling keys that fold alike: the lists are filtered by the real parent and token.
        let (p, q) = (5u128, 5u128 << 64);
        assert_eq!(sibling_key((p, 7)), sibling_key((q, 7)));
        assert!(ix.insert(BlockId(2), 100, p, false, &[7, 8]));
        assert!(ix.insert(BlockId(3), 101, q, false, &[7, 9]));
        assert_eq!(ix.best_partial(p, &[7, 9], |_| true), Some((BlockId(2), 1)));
        assert_eq!(ix.best_partial(q, &[7, 9], |_| true), Some((BlockId(3), 2)));
        ix.check_invariants();
        assert_eq!(ix.remove(BlockId(2)), Some(100));
        assert_eq!(ix.best_partial(p, &[7, 9], |_| true), None);
        ix.check_invariants();
    }
}
