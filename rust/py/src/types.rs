//! The engine's values as `ferrumkv.types` objects, made here so no positional tuple crosses
//! into Python: KV events (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`), pressure
//! events (`PressureEvent` with `PressureLevel` members) and sampled eviction events
//! (`EvictionEvent`); `stats.rs` makes the stats objects from the same imported classes.
//!
//! Design: the classes are imported once per interpreter (`PyOnceLock`) and called with
//! keyword arguments whose names are interned once, so a field renamed or reordered in
//! `types.py` fails loudly (a `TypeError`), never by swapping values. Cost: one keyword
//! dict and one frozen-dataclass `__init__` per event (about a microsecond), paid when a
//! consumer drains, not on the engine's hot path.

use ferrumkv_core::events::KvEvent;
use ferrumkv_core::pressure::PressureEvent;
use ferrumkv_core::residency::EvictionEvent;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple};

/// `ferrumkv.types`' classes and the pressure levels, imported once.
pub struct Types {
    pub object_new: Py<PyAny>,
    pub cache_stats: Py<PyAny>,
    pub tier_stats: Py<PyAny>,
    block_stored: Py<PyAny>,
    block_removed: Py<PyAny>,
    all_cleared: Py<PyAny>,
    pressure_event: Py<PyAny>,
    eviction_event: Py<PyAny>,
    /// `PressureLevel` members, by value.
    pub levels: Vec<Py<PyAny>>,
}

/// The imported classes (the first call imports `ferrumkv.types`).
pub fn types(py: Python<'_>) -> PyResult<&'static Types> {
    static TYPES: PyOnceLock<Types> = PyOnceLock::new();
    TYPES.get_or_try_init(py, || {
        let t = py.import("ferrumkv.types")?;
        let class = |name: &str| t.getattr(name).map(Bound::unbind);
        let level = t.getattr("PressureLevel")?;
        Ok(Types {
            object_new: py
                .import("builtins")?
                .getattr("object")?
                .getattr("__new__")?
                .unbind(),
            cache_stats: class("CacheStats")?,
            tier_stats: class("TierStats")?,
            block_stored: class("BlockStored")?,
            block_removed: class("BlockRemoved")?,
            all_cleared: class("AllBlocksCleared")?,
            pressure_event: class("PressureEvent")?,
            eviction_event: class("EvictionEvent")?,
            levels: (0..3u8)
                .map(|v| level.call1((v,)).map(Bound::unbind))
                .collect::<PyResult<_>>()?,
        })
    })
}

/// `cls(**kwargs)`.
fn make<'py>(cls: &Py<PyAny>, kwargs: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyAny>> {
    cls.bind(kwargs.py()).call((), Some(kwargs))
}

/// A KV event as `BlockStored`, `BlockRemoved` or `AllBlocksCleared`.
pub fn kv_event(py: Python<'_>, e: KvEvent) -> PyResult<Bound<'_, PyAny>> {
    let t = types(py)?;
    let kw = PyDict::new(py);
    match e {
        KvEvent::Stored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            tier,
        } => {
            kw.set_item(
                pyo3::intern!(py, "block_hashes"),
                PyTuple::new(py, block_hashes)?,
            )?;
            kw.set_item(pyo3::intern!(py, "parent_block_hash"), parent_block_hash)?;
            kw.set_item(pyo3::intern!(py, "token_ids"), PyTuple::new(py, token_ids)?)?;
            kw.set_item(pyo3::intern!(py, "block_size"), block_size)?;
            kw.set_item(pyo3::intern!(py, "tier"), tier.as_str())?;
            make(&t.block_stored, &kw)
        }
        KvEvent::Removed { block_hashes, tier } => {
            kw.set_item(
                pyo3::intern!(py, "block_hashes"),
                PyTuple::new(py, block_hashes)?,
            )?;
            kw.set_item(pyo3::intern!(py, "tier"), tier.as_str())?;
            make(&t.block_removed, &kw)
        }
        KvEvent::AllCleared => make(&t.all_cleared, &kw),
    }
}

/// The `PressureLevel` member of `level` (the engine's `Level` as its value).
pub fn level(py: Python<'_>, level: u8) -> PyResult<Bound<'_, PyAny>> {
    Ok(types(py)?.levels[usize::from(level).min(2)]
        .bind(py)
        .clone())
}

/// A pressure transition as `PressureEvent`.
pub fn pressure_event<'py>(py: Python<'py>, e: &PressureEvent) -> PyResult<Bound<'py, PyAny>> {
    let kw = PyDict::new(py);
    kw.set_item(pyo3::intern!(py, "level"), level(py, e.level as u8)?)?;
    kw.set_item(pyo3::intern!(py, "previous"), level(py, e.previous as u8)?)?;
    kw.set_item(pyo3::intern!(py, "free_blocks"), e.free_blocks)?;
    kw.set_item(pyo3::intern!(py, "evictable_blocks"), e.evictable_blocks)?;
    kw.set_item(pyo3::intern!(py, "total_blocks"), e.total_blocks)?;
    kw.set_item(pyo3::intern!(py, "needed_blocks"), e.needed_blocks)?;
    make(&types(py)?.pressure_event, &kw)
}

/// A sampled block's residency at eviction as `EvictionEvent`.
pub fn eviction_event(py: Python<'_>, e: EvictionEvent) -> PyResult<Bound<'_, PyAny>> {
    let kw = PyDict::new(py);
    kw.set_item(pyo3::intern!(py, "lifetime_seconds"), e.lifetime_seconds)?;
    kw.set_item(pyo3::intern!(py, "idle_seconds"), e.idle_seconds)?;
    kw.set_item(
        pyo3::intern!(py, "reuse_gaps_seconds"),
        PyTuple::new(py, e.reuse_gaps_seconds)?,
    )?;
    make(&types(py)?.eviction_event, &kw)
}
