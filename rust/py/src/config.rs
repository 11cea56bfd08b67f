//! `CacheConfig`: keyword-only construction, validated by the core (one place for ranges).

use ferrumkv_core::config::{CacheConfig, ConfigInput};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyInt};

use crate::errors::IntoPy;

/// An int setting: a bool or non-int is a `TypeError`, an int beyond 64 bits a
/// `ValueError` naming the field (ranges are checked by the core).
fn int_field(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<i64> {
    if obj.is_instance_of::<PyBool>() || !obj.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "{name} must be an int, not {}",
            obj.get_type().name()?
        )));
    }
    obj.extract::<i64>().map_err(|_| {
        PyValueError::new_err(format!(
            "invalid {name}: {} is out of range",
            obj.repr().map(|r| r.to_string()).unwrap_or_default()
        ))
    })
}

/// The cache's settings, validated when made (keyword-only; a bad value raises ValueError
/// naming the field). Frozen; compare with `==`, copy with `CacheConfig(**c.to_dict())`.
#[pyclass(frozen, name = "CacheConfig", module = "ferrumkv._core")]
pub struct PyCacheConfig {
    pub input: ConfigInput,
    pub config: CacheConfig,
}

#[pymethods]
impl PyCacheConfig {
    #[new]
    #[pyo3(signature = (*, num_layers, num_kv_heads, head_dim, block_size=None, dtype="float16".to_string(),
        device="cpu".to_string(), num_blocks=None, memory_bytes=None, host_blocks=None, disk_path=None,
        disk_blocks=None, enable_prefix_cache=true, hash_algo="xxh3_128".to_string(), low_watermark=0.3,
        high_watermark=0.1, residency_sample_rate=0.01, layout="block_major".to_string(),
        enable_kv_events=true, seed=None, eviction_policy="lru".to_string(), kv_events_endpoint=None,
        kv_events_replay_endpoint=None, kv_events_topic="kv-events".to_string(),
        kv_events_format="array".to_string(), remote_url=None, remote_namespace=None,
        remote_write="on_evict".to_string(), remote_required=true, remote_timeout_s=5.0), text_signature = "(*, num_layers, num_kv_heads, head_dim, block_size=16, dtype='float16', device='cpu', num_blocks=None, memory_bytes=None, host_blocks=0, disk_path=None, disk_blocks=0, enable_prefix_cache=True, hash_algo='xxh3_128', low_watermark=0.3, high_watermark=0.1, residency_sample_rate=0.01, layout='block_major', enable_kv_events=True, seed=0, eviction_policy='lru', kv_events_endpoint=None, kv_events_replay_endpoint=None, kv_events_topic='kv-events', kv_events_format='array', remote_url=None, remote_namespace=None, remote_write='on_evict', remote_required=True, remote_timeout_s=5.0)")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        num_layers: &Bound<'_, PyAny>,
        num_kv_heads: &Bound<'_, PyAny>,
        head_dim: &Bound<'_, PyAny>,
        block_size: Option<&Bound<'_, PyAny>>,
        dtype: String,
        device: String,
        num_blocks: Option<&Bound<'_, PyAny>>,
        memory_bytes: Option<&Bound<'_, PyAny>>,
        host_blocks: Option<&Bound<'_, PyAny>>,
        disk_path: Option<std::path::PathBuf>,
        disk_blocks: Option<&Bound<'_, PyAny>>,
        enable_prefix_cache: bool,
        hash_algo: String,
        low_watermark: f64,
        high_watermark: f64,
        residency_sample_rate: f64,
        layout: String,
        enable_kv_events: bool,
        seed: Option<&Bound<'_, PyAny>>,
        eviction_policy: String,
        kv_events_endpoint: Option<String>,
        kv_events_replay_endpoint: Option<String>,
        kv_events_topic: String,
        kv_events_format: String,
        remote_url: Option<String>,
        remote_namespace: Option<String>,
        remote_write: String,
        remote_required: bool,
        remote_timeout_s: f64,
    ) -> PyResult<Self> {
        let opt = |name, v: Option<&Bound<'_, PyAny>>| {
            v.filter(|o| !o.is_none())
                .map(|o| int_field(name, o))
                .transpose()
        };
        let input = ConfigInput {
            num_layers: int_field("num_layers", num_layers)?,
            num_kv_heads: int_field("num_kv_heads", num_kv_heads)?,
            head_dim: int_field("head_dim", head_dim)?,
            block_size: opt("block_size", block_size)?.unwrap_or(16),
            dtype,
            device,
            num_blocks: opt("num_blocks", num_blocks)?,
            memory_bytes: opt("memory_bytes", memory_bytes)?,
            host_blocks: opt("host_blocks", host_blocks)?.unwrap_or(0),
            disk_path: disk_path.map(|p| p.to_string_lossy().into_owned()),
            disk_blocks: opt("disk_blocks", disk_blocks)?.unwrap_or(0),
            enable_prefix_cache,
            hash_algo,
            eviction_policy,
            low_watermark,
            high_watermark,
            residency_sample_rate,
            layout,
            enable_kv_events,
            seed: u64::try_from(opt("seed", seed)?.unwrap_or(0))
                .map_err(|_| PyValueError::new_err("invalid seed: must be >= 0"))?,
            kv_events_endpoint,
            kv_events_replay_endpoint,
            kv_events_topic,
            kv_events_format,
            remote_url,
            remote_namespace,
            remote_write,
            remote_required,
            remote_timeout_s,
        };
        let config = CacheConfig::validate(&input).py_err()?;
        Ok(PyCacheConfig { input, config })
    }

    /// Transformer layers whose K/V the cache holds.
    #[getter]
    fn num_layers(&self) -> usize {
        self.config.num_layers
    }
    /// KV heads per layer (after grouped-query sharing).
    #[getter]
    fn num_kv_heads(&self) -> usize {
        self.config.num_kv_heads
    }
    /// Elements of one head of one token.
    #[getter]
    fn head_dim(&self) -> usize {
        self.config.head_dim
    }
    /// Tokens per block (a page of the paged cache).
    #[getter]
    fn block_size(&self) -> usize {
        self.config.block_size
    }
    /// Element type of K and V: "float16", "bfloat16", "float32" or "uint8".
    #[getter]
    fn dtype(&self) -> &'static str {
        self.config.dtype.name()
    }
    /// Bytes of one element of `dtype`.
    #[getter]
    fn itemsize(&self) -> usize {
        self.config.dtype.itemsize()
    }
    /// "cpu" (host memory) or "cuda:N" (GPU memory from the CUDA driver).
    #[getter]
    fn device(&self) -> String {
        self.config.device.name()
    }
    /// Blocks of the device tier (from `num_blocks`, or `memory_bytes // bytes_per_block`).
    #[getter]
    fn num_blocks(&self) -> usize {
        self.config.num_blocks
    }
    /// The device tier's budget in bytes when it sized `num_blocks`, else None.
    #[getter]
    fn memory_bytes(&self) -> Option<i64> {
        self.input.memory_bytes
    }
    /// Blocks of the host tier (swap-outs and offloaded cached blocks); 0: none.
    #[getter]
    fn host_blocks(&self) -> usize {
        self.config.host_blocks
    }
    /// The disk tier's file (spills of evicted host blocks), or None.
    #[getter]
    fn disk_path(&self) -> Option<String> {
        self.config.disk_path.clone()
    }
    /// Blocks of the disk tier; 0: none.
    #[getter]
    fn disk_blocks(&self) -> usize {
        self.config.disk_blocks
    }
    /// Whether full blocks are cached under chained hashes and reused.
    #[getter]
    fn enable_prefix_cache(&self) -> bool {
        self.config.enable_prefix_cache
    }
    /// "xxh3_128" (default) or "sha256": the chained block hash.
    #[getter]
    fn hash_algo(&self) -> &'static str {
        self.config.hash_algo.name()
    }
    /// Which free cached block every tier gives up first: one of `EVICTION_POLICIES`
    /// ("lru", "lfu", "lecar", "adaptive", "lru2"; README, "Eviction policies").
    #[getter]
    fn eviction_policy(&self) -> &'static str {
        self.config.eviction_policy.name()
    }
    /// Blank share of the device tier under which pressure is HIGH (and gc's default target).
    #[getter]
    fn low_watermark(&self) -> f64 {
        self.config.low_watermark
    }
    /// Blank share under which pressure is CRITICAL (below `low_watermark`).
    #[getter]
    fn high_watermark(&self) -> f64 {
        self.config.high_watermark
    }
    /// Share of blocks whose residency (lifetime, idle time, reuse gaps) is sampled.
    #[getter]
    fn residency_sample_rate(&self) -> f64 {
        self.config.residency_sample_rate
    }
    /// "block_major" (each block's K/V contiguous) or "layer_major" (vLLM's per-layer tensors).
    #[getter]
    fn layout(&self) -> &'static str {
        self.config.layout.name()
    }
    /// Whether BlockStored / BlockRemoved events are queued (`drain_events`).
    #[getter]
    fn enable_kv_events(&self) -> bool {
        self.config.enable_kv_events
    }
    /// Seed of the sampled statistics (residency, the adaptive policy's shadows).
    #[getter]
    fn seed(&self) -> u64 {
        self.config.seed
    }
    /// ZMQ PUB endpoint the KV events are published on in vLLM's wire format (None: not
    /// published; `drain_events` returns them instead). README, "KV events on the wire".
    #[getter]
    fn kv_events_endpoint(&self) -> Option<String> {
        self.config.kv_events_endpoint.clone()
    }
    /// ZMQ ROUTER endpoint that replays buffered batches from a sequence number.
    #[getter]
    fn kv_events_replay_endpoint(&self) -> Option<String> {
        self.config.kv_events_replay_endpoint.clone()
    }
    /// The first frame of every published message.
    #[getter]
    fn kv_events_topic(&self) -> String {
        self.config.kv_events_topic.clone()
    }
    /// "array" (vLLM's array-like structs) or "map" (tagged maps).
    #[getter]
    fn kv_events_format(&self) -> &'static str {
        self.config.kv_events_format.name()
    }
    /// The shared store (`mooncake://...`, `redis://...`, `redis+cluster://...`), or None.
    #[getter]
    fn remote_url(&self) -> Option<String> {
        self.config.remote_url.clone()
    }
    /// Namespace of this cache's keys in the store ("default" when not given).
    #[getter]
    fn remote_namespace(&self) -> String {
        self.config.remote_namespace.clone()
    }
    /// "on_evict" (a block is written when it leaves the local tiers) or "on_store" (when
    /// the sequence that computed it is released).
    #[getter]
    fn remote_write(&self) -> &'static str {
        self.config.remote_write.name()
    }
    /// An unreachable store at construction raises RemoteUnavailableError (else the cache
    /// runs local-only and keeps trying to reconnect).
    #[getter]
    fn remote_required(&self) -> bool {
        self.config.remote_required
    }
    /// Seconds one remote call may take before it counts as failed (a lookup's blocks are
    /// then misses).
    #[getter]
    fn remote_timeout_s(&self) -> f64 {
        self.config.remote_timeout_s
    }
    /// block_size x num_layers x 2 x num_kv_heads x head_dim x itemsize.
    #[getter]
    fn bytes_per_block(&self) -> usize {
        self.config.bytes_per_block()
    }

    /// Every setting by name, as `CacheConfig(**d)` takes them.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.config;
        let d = PyDict::new(py);
        d.set_item("num_layers", c.num_layers)?;
        d.set_item("num_kv_heads", c.num_kv_heads)?;
        d.set_item("head_dim", c.head_dim)?;
        d.set_item("block_size", c.block_size)?;
        d.set_item("dtype", c.dtype.name())?;
        d.set_item("device", c.device.name())?;
        d.set_item("num_blocks", c.num_blocks)?;
        d.set_item("memory_bytes", self.input.memory_bytes)?;
        d.set_item("host_blocks", c.host_blocks)?;
        d.set_item("disk_path", c.disk_path.clone())?;
        d.set_item("disk_blocks", c.disk_blocks)?;
        d.set_item("enable_prefix_cache", c.enable_prefix_cache)?;
        d.set_item("hash_algo", c.hash_algo.name())?;
        d.set_item("low_watermark", c.low_watermark)?;
        d.set_item("high_watermark", c.high_watermark)?;
        d.set_item("residency_sample_rate", c.residency_sample_rate)?;
        d.set_item("layout", c.layout.name())?;
        d.set_item("enable_kv_events", c.enable_kv_events)?;
        d.set_item("seed", c.seed)?;
        d.set_item("eviction_policy", c.eviction_policy.name())?;
        d.set_item("kv_events_endpoint", c.kv_events_endpoint.clone())?;
        d.set_item(
            "kv_events_replay_endpoint",
            c.kv_events_replay_endpoint.clone(),
        )?;
        d.set_item("kv_events_topic", c.kv_events_topic.clone())?;
        d.set_item("kv_events_format", c.kv_events_format.name())?;
        d.set_item("remote_url", c.remote_url.clone())?;
        d.set_item("remote_namespace", c.remote_namespace.clone())?;
        d.set_item("remote_write", c.remote_write.name())?;
        d.set_item("remote_required", c.remote_required)?;
        d.set_item("remote_timeout_s", c.remote_timeout_s)?;
        Ok(d)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let d = self.to_dict(py)?;
        let parts = d
            .iter()
            .map(|(k, v)| Ok(format!("{}={}", k.str()?, v.repr()?)))
            .collect::<PyResult<Vec<_>>>()?;
        Ok(format!("CacheConfig({})", parts.join(", ")))
    }

    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<bool> {
        match other.cast::<PyCacheConfig>() {
            Ok(o) => self.to_dict(py)?.eq(o.get().to_dict(py)?),
            Err(_) => Ok(false),
        }
    }
}
