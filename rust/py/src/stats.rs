//! Stats snapshots for Python: as a dict (`Engine.stats`, `iteration_stats`) or as the
//! finished `ferrumkv.CacheStats` (`Engine.stats_object`, what `KvCache.stats()` returns).
//!
//! Both set the same keys in the same order, as Python strings interned once. The object is
//! made without running the frozen dataclass's `__init__` (43 `object.__setattr__` calls,
//! most of `stats()`'s cost): `object.__new__(cls)`, then its instance `__dict__` is filled
//! directly; the dataclasses keep their fields there (no `__slots__`, see `types.py`), and a
//! test checks the keys are exactly the fields.

use ferrumkv_core::stats::{Counters, Snapshot, TierStats};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString};

use crate::types::{types, Types};

const TIER_KEYS: [&str; 6] = [
    "total_blocks",
    "free_blocks",
    "used_blocks",
    "evictable_blocks",
    "total_bytes",
    "used_bytes",
];

const GAUGE_KEYS: [&str; 12] = [
    "device",
    "host",
    "disk",
    "total_tokens",
    "used_tokens",
    "free_tokens",
    "num_sequences",
    "num_swapped",
    "num_waiting",
    "inflight_disk_ops",
    "pressure_level",
    "callback_errors",
];

/// The keys as Python strings, made once: the tier fields, the gauges, then the counters in
/// `Counters::NAMES` order.
fn keys(py: Python<'_>) -> &'static [Py<PyString>] {
    static KEYS: PyOnceLock<Vec<Py<PyString>>> = PyOnceLock::new();
    KEYS.get_or_init(py, || {
        TIER_KEYS
            .iter()
            .chain(&GAUGE_KEYS)
            .chain(Counters::NAMES)
            .map(|k| PyString::intern(py, k).unbind())
            .collect()
    })
}

/// A new instance of `cls` (no `__init__` run) and its instance dict.
fn bare<'py>(
    py: Python<'py>,
    t: &Types,
    cls: &Py<PyAny>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyDict>)> {
    let obj = t.object_new.bind(py).call1((cls.bind(py),))?;
    let dict = obj
        .getattr(pyo3::intern!(py, "__dict__"))?
        .cast_into::<PyDict>()?;
    Ok((obj, dict))
}

fn fill_tier(py: Python<'_>, d: &Bound<'_, PyDict>, t: &TierStats) -> PyResult<()> {
    let vals = [
        t.total_blocks,
        t.free_blocks,
        t.used_blocks,
        t.evictable_blocks,
        t.total_bytes,
        t.used_bytes,
    ];
    for (k, v) in keys(py).iter().zip(vals) {
        d.set_item(k.bind(py), v)?;
    }
    Ok(())
}

/// Sets every key of the snapshot in `d`: the tiers as `tier(t)`, the level as `level`.
fn fill<'py>(
    py: Python<'py>,
    d: &Bound<'py, PyDict>,
    s: &Snapshot,
    tier: impl Fn(&TierStats) -> PyResult<Bound<'py, PyAny>>,
    level: Bound<'py, PyAny>,
) -> PyResult<()> {
    let keys = &keys(py)[TIER_KEYS.len()..];
    for (k, t) in keys.iter().zip([&s.device, &s.host, &s.disk]) {
        d.set_item(k.bind(py), tier(t)?)?;
    }
    let gauges = [
        s.total_tokens() as u64,
        s.used_tokens() as u64,
        s.free_tokens() as u64,
        s.num_sequences as u64,
        s.num_swapped as u64,
        s.num_waiting as u64,
        s.inflight_disk_ops as u64,
    ];
    for (k, v) in keys[3..].iter().zip(gauges) {
        d.set_item(k.bind(py), v)?;
    }
    d.set_item(keys[10].bind(py), level)?;
    d.set_item(keys[11].bind(py), s.callback_errors)?;
    for (k, v) in keys[GAUGE_KEYS.len()..].iter().zip(s.counters.values()) {
        d.set_item(k.bind(py), v)?;
    }
    Ok(())
}

/// The snapshot as a dict; the tiers as dicts, the level as an int.
pub fn snapshot_dict<'py>(py: Python<'py>, s: &Snapshot) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let tier = |t: &TierStats| {
        let td = PyDict::new(py);
        fill_tier(py, &td, t)?;
        Ok(td.into_any())
    };
    let level = s.pressure_level.into_pyobject(py)?.into_any();
    fill(py, &d, s, tier, level)?;
    Ok(d)
}

/// The snapshot as a `ferrumkv.CacheStats` (tiers as `TierStats`, the level a
/// `PressureLevel`).
pub fn snapshot_object<'py>(py: Python<'py>, s: &Snapshot) -> PyResult<Bound<'py, PyAny>> {
    let t = types(py)?;
    let (obj, d) = bare(py, t, &t.cache_stats)?;
    let tier = |ts: &TierStats| {
        let (o, td) = bare(py, t, &t.tier_stats)?;
        fill_tier(py, &td, ts)?;
        Ok(o)
    };
    let level = t.levels[usize::from(s.pressure_level).min(2)]
        .bind(py)
        .clone();
    fill(py, &d, s, tier, level)?;
    Ok(obj)
}
