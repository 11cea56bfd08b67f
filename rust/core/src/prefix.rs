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
//! Each cached block also keeps its token ids and parent hash.
//! Invariants: `by_hash[h] == b` iff `entry[b] == Some((h, parent))` and `b` is in the
//! sibling list of (parent, its first token); a hash is held by at most one block (later
//! duplicates stay unindexed).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher as StdHasher};

use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_128;

use crate::config::HashAlgo;
use crate::error::Result;
use crate::fallible::{out_of_memory, vec_of};
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

    fn digest(&self, bytes: &[u8]) -> BlockHash {
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

/// Block hashes are already uniform 128-bit digests: hashing them again (SipHash) only
/// costs time, so the index maps fold the key into 64 bits and mix it with one multiply.
#[derive(Default, Clone, Copy)]
pub struct PassThrough(u64);

impl StdHasher for PassThrough {
    fn finish(&self) -> u64 {
        // One multiply spreads keys that are not digests (sibling keys: a first token id
        // under the root) over the high bits hashbrown probes with.
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 ^= v as u64;
    }
}

type HashKeyed<V> = HashMap<BlockHash, V, BuildHasherDefault<PassThrough>>;

/// (parent hash, first token id) of a cached block.
type SiblingKey = (BlockHash, u32);

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Entry {
    hash: BlockHash,
    parent: BlockHash,
    /// The parent is the chain's root (a salt), not a block.
    first: bool,
}

/// hash -> block for the cached blocks of one tier.
#[derive(Debug, Clone)]
pub struct PrefixIndex {
    block_size: usize,
    by_hash: HashKeyed<BlockId>,
    /// Head of the sibling list of each (parent hash, first token): partial matching only
    /// ever looks at cached children that share the request's next token.
    siblings: HashMap<SiblingKey, u32, BuildHasherDefault<PassThrough>>,
    /// Intrusive doubly-linked sibling lists (`NIL`-terminated), indexed by block id.
    next_sib: Vec<u32>,
    prev_sib: Vec<u32>,
    entry: Vec<Option<Entry>>,
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
        let num_tokens = num_blocks
            .checked_mul(block_size)
            .ok_or_else(|| out_of_memory(TOKENS, num_blocks, 4 * block_size))?;
        Ok(PrefixIndex {
            block_size,
            by_hash: HashKeyed::default(),
            siblings: HashMap::default(),
            next_sib: vec_of(num_blocks, NIL, "the prefix index's sibling links")?,
            prev_sib: vec_of(num_blocks, NIL, "the prefix index's sibling links")?,
            entry: vec_of(num_blocks, None, "the prefix index's entries")?,
            tokens: vec_of(num_tokens, 0, TOKENS)?,
        })
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    pub fn get(&self, h: BlockHash) -> Option<BlockId> {
        self.by_hash.get(&h).copied()
    }

    pub fn hash_of(&self, b: BlockId) -> Option<BlockHash> {
        self.entry[b.idx()].as_ref().map(|e| e.hash)
    }

    pub fn parent_of(&self, b: BlockId) -> Option<BlockHash> {
        self.entry[b.idx()].as_ref().map(|e| e.parent)
    }

    /// The parent block's hash as events report it: None for a chain's first block.
    pub fn parent_block_of(&self, b: BlockId) -> Option<BlockHash> {
        self.entry[b.idx()]
            .as_ref()
            .and_then(|e| (!e.first).then_some(e.parent))
    }

    pub fn is_first(&self, b: BlockId) -> bool {
        self.entry[b.idx()].as_ref().is_some_and(|e| e.first)
    }

    pub fn tokens_of(&self, b: BlockId) -> &[u32] {
        &self.tokens[b.idx() * self.block_size..(b.idx() + 1) * self.block_size]
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
        debug_assert!(self.entry[b.idx()].is_none(), "block {} indexed twice", b.0);
        match self.by_hash.entry(hash) {
            std::collections::hash_map::Entry::Occupied(_) => return false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(b);
            }
        }
        self.link(b, (parent, tokens[0]));
        self.entry[b.idx()] = Some(Entry {
            hash,
            parent,
            first,
        });
        self.tokens[b.idx() * self.block_size..(b.idx() + 1) * self.block_size]
            .copy_from_slice(tokens);
        true
    }

    /// Drops `b` from the index; returns its hash.
    pub fn remove(&mut self, b: BlockId) -> Option<BlockHash> {
        let e = self.entry[b.idx()].take()?;
        self.by_hash.remove(&e.hash);
        let key = (e.parent, self.tokens_of(b)[0]);
        self.unlink(b, key);
        Some(e.hash)
    }

    fn link(&mut self, b: BlockId, key: SiblingKey) {
        let head = self.siblings.insert(key, b.0).unwrap_or(NIL);
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
                self.siblings.remove(&key);
            } else {
                self.siblings.insert(key, n);
            }
        } else {
            self.next_sib[p as usize] = n;
        }
        if n != NIL {
            self.prev_sib[n as usize] = p;
        }
    }

    /// Cached children of `parent` whose first token is `first`.
    fn siblings_of(&self, key: SiblingKey) -> impl Iterator<Item = BlockId> + '_ {
        let mut cur = self.siblings.get(&key).copied().unwrap_or(NIL);
        std::iter::from_fn(move || {
            (cur != NIL).then(|| {
                let b = cur;
                cur = self.next_sib[b as usize];
                BlockId(b)
            })
        })
    }

    pub fn clear(&mut self) {
        self.by_hash.clear();
        self.siblings.clear();
        self.entry.iter_mut().for_each(|e| *e = None);
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
        self.by_hash.iter().map(|(&h, &b)| (h, b))
    }

    /// Panics if the index disagrees with itself.
    pub fn check_invariants(&self) {
        for (&h, &b) in &self.by_hash {
            let e = self.entry[b.idx()]
                .as_ref()
                .expect("indexed block has an entry");
            assert_eq!(e.hash, h, "block {} carries another hash", b.0);
            let key = (e.parent, self.tokens_of(b)[0]);
            assert!(
                self.siblings_of(key).any(|x| x == b),
                "block {} not among its siblings",
                b.0
            );
        }
        let n = self.entry.iter().filter(|e| e.is_some()).count();
        assert_eq!(n, self.by_hash.len());
        let listed: usize = self
            .siblings
            .keys()
            .map(|&k| self.siblings_of(k).count())
            .sum();
        assert_eq!(listed, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
