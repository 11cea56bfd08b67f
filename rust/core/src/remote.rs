//! The remote tier's engine side: content-addressed keys, self-checking values, and the
//! queue of writes a remote writer drains.
//!
//! The store itself (Mooncake Store, Redis / Valkey) is reached from Python
//! (`ferrumkv.remote`): the Mooncake client is a Python extension, and one backend interface
//! for both keeps every network call off the engine lock and off the event loop. The engine
//! only stages what to write and checks what it is given back.
//!
//! - Key: `ferrumkv/{namespace}/{geometry}/{chained hash as 32 hex digits}`. The geometry
//!   names everything that decides a block's bytes and hash (layers, KV heads, head_dim,
//!   block_size, dtype, layout, hash algorithm), so replicas of another model, shape or
//!   layout never share a key; the salt is already in the chained hash.
//! - Value: `MAGIC` (4 bytes), the xxh3-64 checksum of the key and the payload (8 bytes,
//!   little-endian), then the block's bytes (its runs laid end to end, as in the other
//!   tiers). `decode` accepts a value only if it is exactly one block long and its checksum
//!   matches *this* key: a truncated or corrupted value, or a valid value copied under
//!   another key, is a miss, never data.
//! - A write that landed in the store is announced as a `BlockStored` KV event of the remote
//!   tier (medium `"REMOTE"`), with the block's parent and token ids, so a router knows the
//!   store holds it; the store's own evictions and expiries are not seen, so nothing
//!   announces their removal.
//! - Writes are numbered in the order they are staged (from 1); `landed_before` is the
//!   lowest number still queued or in flight (or the next to issue), so `flush` waits for
//!   exactly the writes staged before it. A full queue drops the write (counted), never
//!   blocks a call.
//!
//! Cost: one key `format!` and one `VecDeque` push per staged write (the bytes are read into
//! the value's buffer by the memory operation, one copy); O(log in-flight) per landed write.

use std::collections::{BTreeMap, VecDeque};

use xxhash_rust::xxh3::Xxh3;

use crate::config::CacheConfig;
use crate::types::BlockHash;

/// The first bytes of every value.
pub const MAGIC: [u8; 4] = *b"FKV1";
/// Bytes before a value's payload: the magic and the checksum.
pub const HEADER: usize = 12;
/// Bytes of staged writes the queue holds before it drops new ones (at least 8 blocks).
pub const QUEUE_BYTES: usize = 256 << 20;

/// When blocks are written to the store (`remote_write`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// When a cached block leaves the local tiers (the host tier, or the device tier when
    /// there is no host tier, or could not take it).
    OnEvict,
    /// When the sequence that computed a block is released (its K/V is complete then).
    OnStore,
}

impl WriteMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "on_evict" => Some(WriteMode::OnEvict),
            "on_store" => Some(WriteMode::OnStore),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WriteMode::OnEvict => "on_evict",
            WriteMode::OnStore => "on_store",
        }
    }
}

/// The key prefix of one engine's blocks (see the module header).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(c: &CacheConfig, namespace: &str) -> Self {
        let geometry = format!(
            "L{}-H{}-D{}-B{}-{}-{}-{}",
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            c.block_size,
            c.dtype.name(),
            c.layout.name(),
            c.hash_algo.name(),
        );
        Keys {
            prefix: format!("ferrumkv/{namespace}/{geometry}/"),
        }
    }

    pub fn key(&self, hash: BlockHash) -> String {
        format!("{}{hash:032x}", self.prefix)
    }
}

fn checksum(key: &str, payload: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(key.as_bytes());
    h.update(payload);
    h.digest()
}

/// A value buffer for `len` payload bytes: the header's magic written, the rest zero (the
/// payload is read into `[HEADER..]`, then `seal` writes the checksum).
pub fn value_buffer(len: usize) -> crate::error::Result<Vec<u8>> {
    let mut v = crate::fallible::vec_of(HEADER + len, 0u8, "a remote block value")?;
    v[..4].copy_from_slice(&MAGIC);
    Ok(v)
}

/// Writes the checksum of `key` and the payload into a value made by `value_buffer`.
pub fn seal(key: &str, value: &mut [u8]) {
    let sum = checksum(key, &value[HEADER..]);
    value[4..HEADER].copy_from_slice(&sum.to_le_bytes());
}

/// A whole value for `payload` under `key` (tests, benchmarks).
pub fn encode(key: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = value_buffer(payload.len()).expect("a small value");
    v[HEADER..].copy_from_slice(payload);
    seal(key, &mut v);
    v
}

/// Why a value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not `HEADER + len` bytes (truncated, padded, or a block of another shape).
    Length,
    /// No magic: not a ferrumkv value.
    Magic,
    /// The checksum of this key and the payload differs (corrupt, or another key's value).
    Checksum,
}

/// The payload of `value` if it is one block of `len` bytes stored under `key`.
pub fn decode<'a>(key: &str, value: &'a [u8], len: usize) -> Result<&'a [u8], Refused> {
    if value.len() != HEADER + len {
        return Err(Refused::Length);
    }
    if value[..4] != MAGIC {
        return Err(Refused::Magic);
    }
    let want = u64::from_le_bytes(value[4..HEADER].try_into().expect("8 bytes"));
    let payload = &value[HEADER..];
    if checksum(key, payload) != want {
        return Err(Refused::Checksum);
    }
    Ok(payload)
}

/// What a `BlockStored` event of a block written to the store says (medium `"REMOTE"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub hash: BlockHash,
    /// None for a chain's first block.
    pub parent: Option<BlockHash>,
    pub tokens: Vec<u32>,
}

/// A staged write: its number, key and sealed value.
#[derive(Debug)]
pub struct Write {
    pub seq: u64,
    pub key: String,
    pub value: Vec<u8>,
}

/// A queued write: the write, its block's hash, and what its event will say once it landed.
#[derive(Debug)]
struct Queued {
    write: Write,
    hash: BlockHash,
    stored: Option<Stored>,
}

/// Blocks this engine wrote to the store or imported from it lately, by the low 64 bits of
/// their hashes (FIFO, bounded): one among them is not written again when it leaves (a
/// block imported and evicted would otherwise go back to the store it came from). A block
/// the store dropped meanwhile, or a shared fingerprint, only costs a write that is skipped.
#[derive(Debug)]
struct Known {
    set: std::collections::HashSet<u64>,
    order: VecDeque<u64>,
    cap: usize,
}

impl Known {
    fn insert(&mut self, h: BlockHash) {
        let f = h as u64;
        if self.cap == 0 || !self.set.insert(f) {
            return;
        }
        self.order.push_back(f);
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    fn contains(&self, h: BlockHash) -> bool {
        self.set.contains(&(h as u64))
    }
}

/// The remote tier's state in the engine: its keys, write mode and write queue.
#[derive(Debug)]
pub struct RemoteTier {
    pub keys: Keys,
    pub mode: WriteMode,
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    limit_bytes: usize,
    /// Writes taken by the writer, by number, with their hashes and events.
    in_flight: BTreeMap<u64, (BlockHash, Option<Stored>)>,
    next: u64,
    known: Known,
}

impl RemoteTier {
    /// `remember`: how many written or imported blocks to remember (see `Known`).
    pub fn new(keys: Keys, mode: WriteMode, bytes_per_block: usize, remember: usize) -> Self {
        RemoteTier {
            keys,
            mode,
            queue: VecDeque::new(),
            queued_bytes: 0,
            limit_bytes: QUEUE_BYTES.max(8 * (HEADER + bytes_per_block)),
            in_flight: BTreeMap::new(),
            next: 1,
            known: Known {
                set: Default::default(),
                order: VecDeque::new(),
                cap: remember,
            },
        }
    }

    /// Whether block `hash` is known to be in the store (written or imported lately).
    pub fn is_known(&self, hash: BlockHash) -> bool {
        self.known.contains(hash)
    }

    /// Remembers that block `hash` is in the store (imported from it).
    pub fn remember(&mut self, hash: BlockHash) {
        self.known.insert(hash);
    }

    /// Queues a sealed write (with its event); false (dropped, nothing queued) when the
    /// queue is full.
    pub fn push(
        &mut self,
        hash: BlockHash,
        key: String,
        value: Vec<u8>,
        stored: Option<Stored>,
    ) -> bool {
        if self.queued_bytes + value.len() > self.limit_bytes {
            return false;
        }
        self.queued_bytes += value.len();
        let seq = self.next;
        self.next += 1;
        let write = Write { seq, key, value };
        self.queue.push_back(Queued {
            write,
            hash,
            stored,
        });
        true
    }

    /// Up to `max` queued writes, oldest first, now in flight until `finish`.
    pub fn take(&mut self, max: usize) -> Vec<Write> {
        let n = max.min(self.queue.len());
        let mut out = Vec::with_capacity(n);
        for q in self.queue.drain(..n) {
            self.queued_bytes -= q.write.value.len();
            self.in_flight.insert(q.write.seq, (q.hash, q.stored));
            out.push(q.write);
        }
        out
    }

    /// Writes landed (stored, refused by the store, or failed): no longer in flight. Those
    /// in `stored` landed in the store: they are remembered, and their events returned, in
    /// `seqs` order.
    pub fn finish(&mut self, seqs: &[u64], stored: &[u64]) -> Vec<Stored> {
        let mut events = vec![];
        for s in seqs {
            let Some((hash, event)) = self.in_flight.remove(s) else {
                continue;
            };
            if stored.contains(s) {
                self.known.insert(hash);
                events.extend(event);
            }
        }
        events
    }

    /// Writes queued, not yet taken by the writer.
    pub fn num_queued(&self) -> usize {
        self.queue.len()
    }

    /// Writes taken by the writer, not yet finished.
    pub fn num_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The number the next write will get: `flush` waits until `landed_before` reaches it.
    pub fn next_write(&self) -> u64 {
        self.next
    }

    /// Every write numbered below this has landed: the lowest queued or in flight, or the
    /// next to issue when none is.
    pub fn landed_before(&self) -> u64 {
        let queued = self.queue.front().map(|q| q.write.seq);
        let flying = self.in_flight.keys().next().copied();
        match (queued, flying) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => self.next,
        }
    }

    /// Drops every queued write (close): they count as landed.
    pub fn clear(&mut self) -> usize {
        let n = self.queue.len();
        self.queue.clear();
        self.queued_bytes = 0;
        self.in_flight.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_decodes_only_under_its_own_key_and_length() {
        let v = encode("k/1", &[1, 2, 3, 4]);
        assert_eq!(decode("k/1", &v, 4), Ok(&[1u8, 2, 3, 4][..]));
        // Another key: a miss even though the bytes are intact.
        assert_eq!(decode("k/2", &v, 4), Err(Refused::Checksum));
        // Truncated, padded, or another block size.
        assert_eq!(decode("k/1", &v[..v.len() - 1], 4), Err(Refused::Length));
        assert_eq!(decode("k/1", &v, 5), Err(Refused::Length));
        // One flipped payload bit, or a flipped checksum byte.
        for i in [HEADER, 5] {
            let mut bad = v.clone();
            bad[i] ^= 1;
            assert_eq!(decode("k/1", &bad, 4), Err(Refused::Checksum));
        }
        let mut bad = v.clone();
        bad[0] = b'X';
        assert_eq!(decode("k/1", &bad, 4), Err(Refused::Magic));
    }

    #[test]
    fn keys_name_the_geometry_namespace_and_hash() {
        let c = CacheConfig::validate(&crate::config::ConfigInput::small(8)).unwrap();
        let k = Keys::new(&c, "ns");
        assert_eq!(
            k.key(0xab),
            "ferrumkv/ns/L2-H2-D4-B4-float16-block_major-xxh3_128/000000000000000000000000000000ab"
        );
        let mut other = crate::config::ConfigInput::small(8);
        other.head_dim = 8;
        let c2 = CacheConfig::validate(&other).unwrap();
        assert_ne!(Keys::new(&c2, "ns").key(0xab), k.key(0xab));
        assert_ne!(Keys::new(&c, "other").key(0xab), k.key(0xab));
    }

    #[test]
    fn flush_sees_the_lowest_write_queued_or_in_flight() {
        let c = CacheConfig::validate(&crate::config::ConfigInput::small(8)).unwrap();
        let mut r = RemoteTier::new(Keys::new(&c, "ns"), WriteMode::OnEvict, 4, 8);
        assert_eq!(r.landed_before(), 1);
        for i in 0..3 {
            assert!(r.push(i, format!("k{i}"), vec![0; 16], None));
        }
        assert_eq!((r.landed_before(), r.next_write()), (1, 4));
        let taken = r.take(2);
        assert_eq!(taken.iter().map(|w| w.seq).collect::<Vec<_>>(), [1, 2]);
        r.finish(&[2], &[]);
        assert_eq!(r.landed_before(), 1); // write 1 is still in flight
        r.finish(&[1], &[]);
        assert_eq!(r.landed_before(), 3); // write 3 is still queued
        let rest = r.take(10);
        r.finish(&[rest[0].seq], &[]);
        assert_eq!(r.landed_before(), 4);
    }

    #[test]
    fn only_writes_that_landed_in_the_store_have_events() {
        let c = CacheConfig::validate(&crate::config::ConfigInput::small(8)).unwrap();
        let mut r = RemoteTier::new(Keys::new(&c, "ns"), WriteMode::OnEvict, 4, 8);
        let ev = |h| Stored {
            hash: h,
            parent: None,
            tokens: vec![1, 2, 3, 4],
        };
        r.push(1, "a".into(), vec![0; 16], Some(ev(1)));
        r.push(2, "b".into(), vec![0; 16], Some(ev(2)));
        r.push(3, "c".into(), vec![0; 16], None);
        let w = r.take(3);
        assert_eq!(
            r.finish(&[w[0].seq, w[1].seq, w[2].seq], &[w[1].seq, w[2].seq]),
            [ev(2)]
        );
        assert_eq!(r.num_in_flight(), 0);
        // What landed is remembered; what did not is written again when it leaves again.
        assert_eq!(
            (r.is_known(1), r.is_known(2), r.is_known(3)),
            (false, true, true)
        );
    }

    #[test]
    fn the_known_blocks_are_bounded_oldest_forgotten_first() {
        let c = CacheConfig::validate(&crate::config::ConfigInput::small(8)).unwrap();
        let mut r = RemoteTier::new(Keys::new(&c, "ns"), WriteMode::OnEvict, 4, 2);
        for h in [1, 2, 2, 3] {
            r.remember(h);
        }
        assert_eq!(
            (r.is_known(1), r.is_known(2), r.is_known(3)),
            (false, true, true)
        );
    }

    #[test]
    fn a_full_queue_drops_new_writes() {
        let c = CacheConfig::validate(&crate::config::ConfigInput::small(8)).unwrap();
        let mut r = RemoteTier::new(Keys::new(&c, "ns"), WriteMode::OnEvict, 4, 8);
        r.limit_bytes = 40;
        assert!(r.push(1, "a".into(), vec![0; 20], None));
        assert!(r.push(2, "b".into(), vec![0; 20], None));
        assert!(!r.push(3, "c".into(), vec![0; 1], None));
        assert_eq!((r.num_queued(), r.next_write()), (2, 3));
        r.take(1);
        assert!(r.push(3, "c".into(), vec![0; 20], None));
    }
}
