//! Engine configuration and its validation.
//!
//! `CacheConfig::validate` is the single place where field ranges are checked; every
//! violation names the field and the allowed range. A validated config is immutable.
//! Invariant: in a validated config, `bytes_per_block` and each tier's byte size
//! (`num_blocks`, `host_blocks`, `disk_blocks` x `bytes_per_block`) are at most
//! `MAX_TIER_BYTES`, so the layout's size and offset arithmetic cannot overflow; and a disk
//! tier comes with a host tier (it only ever holds blocks spilled from the host tier).

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    Float16,
    BFloat16,
    Float32,
    /// fp8 storage (e4m3 / e5m2 are the same bytes to the cache).
    Uint8,
}

impl DType {
    pub const NAMES: &'static str = "float16, bfloat16, float32, uint8";

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "float16" | "half" => DType::Float16,
            "bfloat16" => DType::BFloat16,
            "float32" | "float" => DType::Float32,
            "uint8" | "fp8" => DType::Uint8,
            _ => {
                return Err(Error::config(
                    "dtype",
                    format!("{s:?} is not one of {}", Self::NAMES),
                ))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::Float16 => "float16",
            DType::BFloat16 => "bfloat16",
            DType::Float32 => "float32",
            DType::Uint8 => "uint8",
        }
    }

    pub fn itemsize(self) -> usize {
        match self {
            DType::Float16 | DType::BFloat16 => 2,
            DType::Float32 => 4,
            DType::Uint8 => 1,
        }
    }
}

/// Where the device (primary) tier lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(u32),
}

impl Device {
    /// Parses `"cpu"`, `"cuda"` (= `cuda:0`) or `"cuda:N"`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            Error::config(
                "device",
                format!("{s:?} is not \"cpu\", \"cuda\" or \"cuda:N\""),
            )
        };
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(bad)?;
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                n.parse().map(Device::Cuda).map_err(|_| bad())
            }
        }
    }

    pub fn name(self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda(n) => format!("cuda:{n}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutKind {
    /// `[num_blocks][num_layers][2][block_size][heads][head_dim]`: a block is one run.
    BlockMajor,
    /// `[num_layers][num_blocks][2][block_size][heads][head_dim]`: vLLM's per-layer tensors.
    LayerMajor,
}

impl LayoutKind {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "block_major" => Ok(LayoutKind::BlockMajor),
            "layer_major" => Ok(LayoutKind::LayerMajor),
            _ => Err(Error::config(
                "layout",
                format!("{s:?} is not one of block_major, layer_major"),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LayoutKind::BlockMajor => "block_major",
            LayoutKind::LayerMajor => "layer_major",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgo {
    Xxh3_128,
    Sha256,
}

impl HashAlgo {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "xxh3_128" => Ok(HashAlgo::Xxh3_128),
            "sha256" => Ok(HashAlgo::Sha256),
            _ => Err(Error::config(
                "hash_algo",
                format!("{s:?} is not one of xxh3_128, sha256"),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Xxh3_128 => "xxh3_128",
            HashAlgo::Sha256 => "sha256",
        }
    }
}

/// Raw, unvalidated settings as the user gave them (sizes are signed so that a negative
/// value is reported as a range error, not a conversion error).
#[derive(Debug, Clone)]
pub struct ConfigInput {
    pub num_layers: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub block_size: i64,
    pub dtype: String,
    pub device: String,
    pub num_blocks: Option<i64>,
    pub memory_bytes: Option<i64>,
    pub host_blocks: i64,
    pub disk_path: Option<String>,
    pub disk_blocks: i64,
    pub enable_prefix_cache: bool,
    pub hash_algo: String,
    /// `eviction::POLICY_NAMES`.
    pub eviction_policy: String,
    pub low_watermark: f64,
    pub high_watermark: f64,
    pub residency_sample_rate: f64,
    pub layout: String,
    pub enable_kv_events: bool,
    pub seed: u64,
    /// ZMQ PUB endpoint of KV events in vLLM's wire format (`tcp://`, `ipc://`, `inproc://`).
    pub kv_events_endpoint: Option<String>,
    /// ZMQ ROUTER endpoint answering replay requests (needs `kv_events_endpoint`).
    pub kv_events_replay_endpoint: Option<String>,
    pub kv_events_topic: String,
    /// `"array"` (vLLM's array-like structs) or `"map"` (the tagged-map form).
    pub kv_events_format: String,
    /// The shared store: `mooncake://HOST:PORT?...`, `redis://HOST:PORT`,
    /// `redis+cluster://HOST:PORT[,HOST:PORT...]` (reached from Python, `ferrumkv.remote`).
    pub remote_url: Option<String>,
    /// Namespace of this engine's keys in the store (default `"default"`).
    pub remote_namespace: Option<String>,
    /// `"on_evict"` or `"on_store"` (`remote::WriteMode`).
    pub remote_write: String,
    /// An unreachable store at construction is an error (else the cache runs local-only).
    pub remote_required: bool,
    /// Seconds any one remote call may take before it counts as failed.
    pub remote_timeout_s: f64,
}

impl ConfigInput {
    /// A small valid config for tests: 2 layers, 2 heads, head_dim 4, block_size 4.
    pub fn small(num_blocks: i64) -> Self {
        ConfigInput {
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 4,
            block_size: 4,
            dtype: "float16".into(),
            device: "cpu".into(),
            num_blocks: Some(num_blocks),
            memory_bytes: None,
            host_blocks: 0,
            disk_path: None,
            disk_blocks: 0,
            enable_prefix_cache: true,
            hash_algo: "xxh3_128".into(),
            eviction_policy: "lru".into(),
            low_watermark: 0.3,
            high_watermark: 0.1,
            residency_sample_rate: 0.01,
            layout: "block_major".into(),
            enable_kv_events: true,
            seed: 0,
            kv_events_endpoint: None,
            kv_events_replay_endpoint: None,
            kv_events_topic: "kv-events".into(),
            kv_events_format: "array".into(),
            remote_url: None,
            remote_namespace: None,
            remote_write: "on_evict".into(),
            remote_required: true,
            remote_timeout_s: 5.0,
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub dtype: DType,
    pub device: Device,
    pub num_blocks: usize,
    pub host_blocks: usize,
    pub disk_path: Option<String>,
    pub disk_blocks: usize,
    pub enable_prefix_cache: bool,
    pub hash_algo: HashAlgo,
    pub eviction_policy: crate::eviction::EvictionPolicy,
    pub low_watermark: f64,
    pub high_watermark: f64,
    pub residency_sample_rate: f64,
    pub layout: LayoutKind,
    pub enable_kv_events: bool,
    pub seed: u64,
    pub kv_events_endpoint: Option<String>,
    pub kv_events_replay_endpoint: Option<String>,
    pub kv_events_topic: String,
    pub kv_events_format: KvEventsFormat,
    pub remote_url: Option<String>,
    pub remote_namespace: String,
    pub remote_write: crate::remote::WriteMode,
    pub remote_required: bool,
    pub remote_timeout_s: f64,
}

/// How KV events are encoded on the wire (vLLM's msgspec structs, see `ferrumkv.kv_events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvEventsFormat {
    /// `KVEventBatch` and each event as arrays, the tag first (vLLM's `array_like` form).
    Array,
    /// Maps with a `"type"` tag (the newer vLLM form).
    Map,
}

impl KvEventsFormat {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "array" => Ok(KvEventsFormat::Array),
            "map" => Ok(KvEventsFormat::Map),
            _ => Err(Error::config(
                "kv_events_format",
                format!("{s:?} is not \"array\" or \"map\""),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvEventsFormat::Array => "array",
            KvEventsFormat::Map => "map",
        }
    }
}

/// A ZMQ endpoint: `tcp://HOST:PORT`, `ipc://PATH` or `inproc://NAME`, nothing empty.
fn zmq_endpoint(field: &'static str, e: &str) -> Result<String> {
    let ok = match e.split_once("://") {
        Some(("tcp", rest)) => rest
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok()),
        Some(("ipc" | "inproc", rest)) => !rest.is_empty(),
        _ => false,
    };
    if ok {
        Ok(e.to_string())
    } else {
        Err(Error::config(
            field,
            format!("{e:?} is not a ZMQ endpoint (tcp://HOST:PORT, ipc://PATH, inproc://NAME)"),
        ))
    }
}

/// A store URL: `mooncake://HOST:PORT[?...]`, `redis://HOST:PORT[?...]` or
/// `redis+cluster://HOST:PORT[,HOST:PORT...][?...]`; the backend reads the query.
fn remote_url(u: &str) -> Result<String> {
    let bad = |why: &str| {
        Error::config(
            "remote_url",
            format!("{u:?} {why} (mooncake://HOST:PORT?metadata=URL, redis://HOST:PORT, redis+cluster://HOST:PORT[,HOST:PORT...])"),
        )
    };
    let (scheme, rest) = u.split_once("://").ok_or_else(|| bad("has no scheme"))?;
    if !matches!(scheme, "mooncake" | "redis" | "redis+cluster") {
        return Err(bad("names no supported store"));
    }
    let hosts = rest.split(['?', '/']).next().unwrap_or_default();
    let ok = !hosts.is_empty()
        && (scheme == "redis+cluster" || !hosts.contains(','))
        && hosts.split(',').all(|hp| {
            hp.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
        });
    if !ok {
        return Err(bad("has no valid HOST:PORT"));
    }
    Ok(u.to_string())
}

/// Largest block count of one tier (block ids are u32; keep clear of the list sentinel).
pub const MAX_BLOCKS: i64 = (u32::MAX - 1) as i64;

/// Largest byte size of one tier's memory (a slab, or the disk tier's file), and so of one
/// block: half of `isize::MAX`, so a slab's size rounded up to its alignment is a valid
/// allocation size and every byte offset into a tier fits in `isize`, `i64` and `off_t`.
pub const MAX_TIER_BYTES: usize = isize::MAX as usize / 2;

/// `blocks x bytes_per_block`, the byte size of a tier, checked against `MAX_TIER_BYTES`;
/// an error names `field` (the setting that sized the tier) and both factors.
fn tier_bytes(
    field: &'static str,
    name: &str,
    blocks: usize,
    bytes_per_block: usize,
) -> Result<usize> {
    blocks
        .checked_mul(bytes_per_block)
        .filter(|&t| t <= MAX_TIER_BYTES)
        .ok_or_else(|| {
            Error::config(
                field,
                format!(
                    "{name} x bytes_per_block = {blocks} x {bytes_per_block} bytes is more than \
                     the largest tier ({MAX_TIER_BYTES} bytes)"
                ),
            )
        })
}

fn positive(field: &'static str, v: i64, max: i64) -> Result<usize> {
    if v < 1 || v > max {
        return Err(Error::config(field, format!("{v} is outside 1..={max}")));
    }
    Ok(v as usize)
}

fn non_negative(field: &'static str, v: i64, max: i64) -> Result<usize> {
    if v < 0 || v > max {
        return Err(Error::config(field, format!("{v} is outside 0..={max}")));
    }
    Ok(v as usize)
}

impl CacheConfig {
    pub fn validate(c: &ConfigInput) -> Result<Self> {
        let num_layers = positive("num_layers", c.num_layers, 4096)?;
        let num_kv_heads = positive("num_kv_heads", c.num_kv_heads, 4096)?;
        let head_dim = positive("head_dim", c.head_dim, 65536)?;
        let block_size = positive("block_size", c.block_size, 65536)?;
        let dtype = DType::parse(&c.dtype)?;
        let device = Device::parse(&c.device)?;
        let layout = LayoutKind::parse(&c.layout)?;
        let hash_algo = HashAlgo::parse(&c.hash_algo)?;
        let eviction_policy = crate::eviction::EvictionPolicy::parse(&c.eviction_policy)?;
        let bytes_per_block = [num_layers, 2, num_kv_heads, head_dim, dtype.itemsize()]
            .into_iter()
            .try_fold(block_size, usize::checked_mul)
            .filter(|&b| b <= MAX_TIER_BYTES)
            .ok_or_else(|| {
                Error::config(
                    "block_size",
                    format!(
                        "bytes_per_block = block_size x num_layers x 2 x num_kv_heads x head_dim \
                         x itemsize = {block_size} x {num_layers} x 2 x {num_kv_heads} x \
                         {head_dim} x {} is more than {MAX_TIER_BYTES} bytes",
                        dtype.itemsize()
                    ),
                )
            })?;
        let num_blocks = match (c.num_blocks, c.memory_bytes) {
            (Some(n), None) => positive("num_blocks", n, MAX_BLOCKS)?,
            (None, Some(m)) => {
                if m < 1 {
                    return Err(Error::config("memory_bytes", format!("{m} is outside 1..")));
                }
                let n = m as usize / bytes_per_block;
                if n == 0 {
                    return Err(Error::config(
                        "memory_bytes",
                        format!("{m} holds no block of {bytes_per_block} bytes"),
                    ));
                }
                n.min(MAX_BLOCKS as usize)
            }
            _ => {
                return Err(Error::config(
                    "num_blocks",
                    "exactly one of num_blocks and memory_bytes must be given",
                ))
            }
        };
        let device_field = match c.memory_bytes {
            Some(_) => "memory_bytes",
            None => "num_blocks",
        };
        tier_bytes(device_field, "num_blocks", num_blocks, bytes_per_block)?;
        let host_blocks = non_negative("host_blocks", c.host_blocks, MAX_BLOCKS)?;
        tier_bytes("host_blocks", "host_blocks", host_blocks, bytes_per_block)?;
        let disk_blocks = non_negative("disk_blocks", c.disk_blocks, MAX_BLOCKS)?;
        tier_bytes("disk_blocks", "disk_blocks", disk_blocks, bytes_per_block)?;
        if disk_blocks > 0 && c.disk_path.as_deref().is_none_or(str::is_empty) {
            return Err(Error::config(
                "disk_path",
                "a path is required when disk_blocks > 0",
            ));
        }
        if disk_blocks > 0 && host_blocks == 0 {
            return Err(Error::config(
                "disk_blocks",
                "the disk tier spills from the host tier, so disk_blocks > 0 needs \
                 host_blocks > 0",
            ));
        }
        let unit = |field: &'static str, v: f64| {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::config(field, format!("{v} is outside [0, 1]")));
            }
            Ok(v)
        };
        let low_watermark = unit("low_watermark", c.low_watermark)?;
        let high_watermark = unit("high_watermark", c.high_watermark)?;
        if high_watermark >= low_watermark {
            return Err(Error::config(
                "high_watermark",
                format!("{high_watermark} must be below low_watermark ({low_watermark})"),
            ));
        }
        let kv_events_endpoint = c
            .kv_events_endpoint
            .as_deref()
            .map(|e| zmq_endpoint("kv_events_endpoint", e))
            .transpose()?;
        let kv_events_replay_endpoint = c
            .kv_events_replay_endpoint
            .as_deref()
            .map(|e| zmq_endpoint("kv_events_replay_endpoint", e))
            .transpose()?;
        if kv_events_replay_endpoint.is_some() && kv_events_endpoint.is_none() {
            return Err(Error::config(
                "kv_events_replay_endpoint",
                "replays the batches of kv_events_endpoint, which is not set",
            ));
        }
        if kv_events_endpoint.is_some() && !c.enable_kv_events {
            return Err(Error::config(
                "kv_events_endpoint",
                "publishes KV events, so it needs enable_kv_events=True",
            ));
        }
        let kv_events_format = KvEventsFormat::parse(&c.kv_events_format)?;
        let remote_url = c.remote_url.as_deref().map(remote_url).transpose()?;
        if remote_url.is_some() && !c.enable_prefix_cache {
            return Err(Error::config(
                "remote_url",
                "shares blocks by their chained hashes, so it needs enable_prefix_cache=True",
            ));
        }
        let remote_namespace = c
            .remote_namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        if remote_namespace.is_empty()
            || !remote_namespace
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        {
            return Err(Error::config(
                "remote_namespace",
                format!("{remote_namespace:?} is not a non-empty name of letters, digits, '-', '_', '.'"),
            ));
        }
        let remote_write = crate::remote::WriteMode::parse(&c.remote_write).ok_or_else(|| {
            Error::config(
                "remote_write",
                format!("{:?} is not \"on_evict\" or \"on_store\"", c.remote_write),
            )
        })?;
        let t = c.remote_timeout_s;
        if !(t > 0.0 && t <= 3600.0) {
            return Err(Error::config(
                "remote_timeout_s",
                format!("{t} is outside (0, 3600]"),
            ));
        }
        let rate = c.residency_sample_rate;
        if !(rate > 0.0 && rate <= 1.0) {
            return Err(Error::config(
                "residency_sample_rate",
                format!("{rate} is outside (0, 1]"),
            ));
        }
        Ok(CacheConfig {
            num_layers,
            num_kv_heads,
            head_dim,
            block_size,
            dtype,
            device,
            num_blocks,
            host_blocks,
            disk_path: c.disk_path.clone(),
            disk_blocks,
            enable_prefix_cache: c.enable_prefix_cache,
            hash_algo,
            eviction_policy,
            low_watermark,
            high_watermark,
            residency_sample_rate: rate,
            layout,
            enable_kv_events: c.enable_kv_events,
            seed: c.seed,
            kv_events_endpoint,
            kv_events_replay_endpoint,
            kv_events_topic: c.kv_events_topic.clone(),
            kv_events_format,
            remote_url,
            remote_namespace,
            remote_write,
            remote_required: c.remote_required,
            remote_timeout_s: t,
        })
    }

    /// block_size x num_layers x 2 x num_kv_heads x head_dim x itemsize (cannot overflow:
    /// `validate` checked it, and every tier's `blocks x bytes_per_block`, against
    /// `MAX_TIER_BYTES`).
    pub fn bytes_per_block(&self) -> usize {
        self.block_size
            * self.num_layers
            * 2
            * self.num_kv_heads
            * self.head_dim
            * self.dtype.itemsize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_field(c: &ConfigInput) -> &'static str {
        match CacheConfig::validate(c) {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn zmq_endpoints_are_checked() {
        for ok in [
            "tcp://127.0.0.1:5557",
            "tcp://*:5557",
            "tcp://[::1]:1",
            "ipc:///tmp/x",
            "inproc://k",
        ] {
            assert_eq!(zmq_endpoint("e", ok).unwrap(), ok);
        }
        for bad in [
            "",
            "tcp://",
            "tcp://host",
            "tcp://:1",
            "tcp://h:70000",
            "ipc://",
            "udp://h:1",
        ] {
            assert!(zmq_endpoint("e", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bytes_per_block_formula() {
        let c = CacheConfig::validate(&ConfigInput::small(8)).unwrap();
        assert_eq!(c.bytes_per_block(), 4 * 2 * 2 * 2 * 4 * 2);
    }

    #[test]
    fn memory_bytes_sizes_the_tier() {
        let mut c = ConfigInput::small(1);
        c.num_blocks = None;
        c.memory_bytes = Some(256 * 10 + 7);
        assert_eq!(CacheConfig::validate(&c).unwrap().num_blocks, 10);
        c.memory_bytes = Some(255);
        assert_eq!(err_field(&c), "memory_bytes");
        c.num_blocks = Some(3);
        assert_eq!(err_field(&c), "num_blocks");
    }

    #[test]
    fn each_bad_field_is_named() {
        type Case = (fn(&mut ConfigInput), &'static str);
        let cases: Vec<Case> = vec![
            (|c| c.num_layers = 0, "num_layers"),
            (|c| c.num_kv_heads = -1, "num_kv_heads"),
            (|c| c.head_dim = 0, "head_dim"),
            (|c| c.block_size = -16, "block_size"),
            (|c| c.num_blocks = Some(0), "num_blocks"),
            (|c| c.dtype = "int4".into(), "dtype"),
            (|c| c.layout = "weird".into(), "layout"),
            (|c| c.device = "cuda:x".into(), "device"),
            (|c| c.device = "gpu".into(), "device"),
            (|c| c.hash_algo = "md5".into(), "hash_algo"),
            (|c| c.eviction_policy = "mru".into(), "eviction_policy"),
            (|c| c.high_watermark = 0.3, "high_watermark"),
            (|c| c.low_watermark = 1.5, "low_watermark"),
            (|c| c.residency_sample_rate = 0.0, "residency_sample_rate"),
            (|c| c.host_blocks = -1, "host_blocks"),
            (|c| c.disk_blocks = 4, "disk_path"),
            (
                |c| c.kv_events_endpoint = Some("localhost:1".into()),
                "kv_events_endpoint",
            ),
            (
                |c| c.kv_events_replay_endpoint = Some("ipc:///tmp/r".into()),
                "kv_events_replay_endpoint",
            ),
            (|c| c.kv_events_format = "json".into(), "kv_events_format"),
            (
                |c| c.remote_url = Some("memcached://h:1".into()),
                "remote_url",
            ),
            (|c| c.remote_url = Some("redis://h".into()), "remote_url"),
            (
                |c| c.remote_url = Some("redis://a:1,b:2".into()),
                "remote_url",
            ),
            (
                |c| {
                    c.remote_url = Some("redis://h:1".into());
                    c.enable_prefix_cache = false;
                },
                "remote_url",
            ),
            (
                |c| c.remote_namespace = Some("a/b".into()),
                "remote_namespace",
            ),
            (|c| c.remote_write = "never".into(), "remote_write"),
            (|c| c.remote_timeout_s = 0.0, "remote_timeout_s"),
            (|c| c.remote_timeout_s = f64::NAN, "remote_timeout_s"),
        ];
        for (mutate, field) in cases {
            let mut c = ConfigInput::small(8);
            mutate(&mut c);
            assert_eq!(err_field(&c), field);
        }
    }

    #[test]
    fn store_urls() {
        for ok in [
            "redis://127.0.0.1:6379",
            "redis://127.0.0.1:6379?ttl_s=60",
            "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
            "mooncake://127.0.0.1:50051?metadata=http://127.0.0.1:8080/metadata",
        ] {
            assert_eq!(remote_url(ok).as_deref(), Ok(ok));
        }
        for bad in [
            "redis://:1",
            "redis://h:0",
            "redis://h:x",
            "mooncake://",
            "h:1",
        ] {
            assert!(remote_url(bad).is_err(), "{bad}");
        }
    }

    /// The largest block: 2^59 bytes (every size field at its maximum, float32).
    fn huge_blocks(num_blocks: i64) -> ConfigInput {
        let mut c = ConfigInput::small(num_blocks);
        (c.num_layers, c.num_kv_heads, c.head_dim, c.block_size) = (4096, 4096, 65536, 65536);
        c.dtype = "float32".into();
        c
    }

    #[test]
    fn tier_sizes_are_checked_products() {
        let c = CacheConfig::validate(&huge_blocks(1)).unwrap();
        assert_eq!(c.bytes_per_block(), 1 << 59);
        // 7 x 2^59 bytes fit under MAX_TIER_BYTES (2^62 - 1); 8 x 2^59 = 2^62 do not.
        assert!(CacheConfig::validate(&huge_blocks(7)).is_ok());
        assert_eq!(err_field(&huge_blocks(8)), "num_blocks");
        // A product that overflows usize altogether is the same clean error.
        assert_eq!(err_field(&huge_blocks(MAX_BLOCKS)), "num_blocks");
        let mut c = huge_blocks(1);
        c.num_blocks = None;
        c.memory_bytes = Some(i64::MAX); // 15 blocks of 2^59 bytes
        assert_eq!(err_field(&c), "memory_bytes");
        let mut c = huge_blocks(1);
        c.host_blocks = 8;
        assert_eq!(err_field(&c), "host_blocks");
        c.host_blocks = MAX_BLOCKS;
        assert_eq!(err_field(&c), "host_blocks");
        let mut c = huge_blocks(1);
        (c.host_blocks, c.disk_blocks, c.disk_path) = (1, MAX_BLOCKS, Some("/tmp/d".into()));
        assert_eq!(err_field(&c), "disk_blocks");
        match CacheConfig::validate(&huge_blocks(8)) {
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("num_blocks x bytes_per_block"), "{msg}");
                assert!(msg.contains(&format!("8 x {}", 1u64 << 59)), "{msg}");
            }
            Ok(_) => panic!("8 blocks of 2^59 bytes validated"),
        }
    }

    #[test]
    fn a_disk_tier_needs_a_host_tier() {
        let mut c = ConfigInput::small(8);
        (c.disk_blocks, c.disk_path) = (4, Some("/tmp/ferrumkv-disk".into()));
        match CacheConfig::validate(&c) {
            Err(Error::InvalidConfig { field, reason }) => {
                assert_eq!(field, "disk_blocks");
                assert!(reason.contains("host_blocks > 0"), "{reason}");
            }
            other => panic!("expected a config error, got {other:?}"),
        }
        c.host_blocks = 1;
        assert!(CacheConfig::validate(&c).is_ok());
    }

    #[test]
    fn devices_parse() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(0));
        assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
        assert!(Device::parse("cuda:").is_err());
        assert!(Device::parse("cuda:-1").is_err());
        assert!(Device::parse("CPU").is_err());
    }
}
