//! Small value types shared by every module: block ids, hashes, request ids, tiers.

use std::fmt;

/// Index of a block inside one tier's pool. Newtype so block ids, token counts and slots
/// never mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl BlockId {
    #[inline]
    pub fn idx(self) -> usize {
        self.0 as usize
    }
}

/// A chained block hash (parent hash, salt and token ids of one full block).
pub type BlockHash = u128;

/// A sequence's id as the user gave it: a Python `int` (fitting in i64) or `str`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RequestId {
    Int(i64),
    Str(Box<str>),
}

/// A map keyed by request id (hashed with `IdHasher`).
pub type IdMap<V> = std::collections::HashMap<RequestId, V, IdHashState>;

/// Builds the `IdHasher`s of one map, keyed by a random seed drawn when the map is made.
///
/// NOTE: a decode step looks every sequence of its batch up twice (the extend, the batch
/// layout), so the hash of a request id is on the hot path; std's SipHash costs about
/// 20 ns a short key, this one a few. Request ids may come from clients, so the hash is
/// still keyed: no caller sees the seed, so none can precompute ids that collide.
#[derive(Debug, Clone)]
pub struct IdHashState {
    seed: u64,
}

impl Default for IdHashState {
    fn default() -> Self {
        use std::hash::BuildHasher;
        // std's RandomState draws fresh random keys; one hash of them is our seed.
        IdHashState {
            seed: std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64),
        }
    }
}

impl std::hash::BuildHasher for IdHashState {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher {
            seed: self.seed,
            h: self.seed,
        }
    }
}

/// A keyed hasher for request ids: integers through a folded 64x64->128 multiply (as
/// wyhash and foldhash do), strings through XXH3 with the seed.
#[derive(Debug, Clone)]
pub struct IdHasher {
    seed: u64,
    h: u64,
}

impl IdHasher {
    #[inline]
    fn mix(&mut self, v: u64) {
        const K: u64 = 0x9E37_79B9_7F4A_7C15;
        let m = u128::from(self.h ^ v) * u128::from(K ^ self.seed.rotate_left(32));
        self.h = (m as u64) ^ ((m >> 64) as u64);
    }
}

impl std::hash::Hasher for IdHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, self.seed ^ self.h);
        self.mix(h);
    }

    #[inline]
    fn write_u8(&mut self, v: u8) {
        self.mix(u64::from(v));
    }

    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.mix(v);
    }

    #[inline]
    fn write_i64(&mut self, v: i64) {
        self.mix(v as u64);
    }

    #[inline]
    fn write_usize(&mut self, v: usize) {
        self.mix(v as u64);
    }

    #[inline]
    fn write_isize(&mut self, v: isize) {
        self.mix(v as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.h
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestId::Int(i) => write!(f, "{i}"),
            RequestId::Str(s) => write!(f, "{s:?}"),
        }
    }
}

impl From<i64> for RequestId {
    fn from(v: i64) -> Self {
        RequestId::Int(v)
    }
}

impl From<&str> for RequestId {
    fn from(v: &str) -> Self {
        RequestId::Str(v.into())
    }
}

/// Where a block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Device,
    Host,
    Disk,
    /// The shared store (`remote`): only KV events name it; no sequence lives there.
    Remote,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Device => "device",
            Tier::Host => "host",
            Tier::Disk => "disk",
            Tier::Remote => "remote",
        }
    }
}

/// Number of blocks needed to hold `tokens` tokens.
#[inline]
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}
