//! `Engine`: the synchronous core that `ferrumkv.KvCache` wraps with its async layer.
//!
//! Every method converts its arguments, calls the engine once and converts the result. A
//! call that must wait returns an int ticket; the Python layer watches `notify_fd`, calls
//! `drain_notifications` on its event loop's thread, then `take_ticket` (or `cancel_ticket`).
//! The GIL is released around block copies that may take long (big `write_kv`/`read_kv`).

use std::sync::Arc;

use ferrumkv_core::clock::Clock;
use ferrumkv_core::config::Device;
use ferrumkv_core::sequence::{AllocOpts, Append, SeqView};
use ferrumkv_core::state::NewTokens;
use ferrumkv_core::{Engine, Error, Outcome};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyByteArray, PyBytes, PyDict, PyInt, PyList};

use crate::batch::PyBatchLayout;
use crate::config::PyCacheConfig;
use crate::convert;
use crate::errors::IntoPy;
use crate::handle::PySequenceHandle;
use crate::remote::PyRemoteValue;
use crate::stats;
use crate::ticket::PyTicket;
use crate::types;
use crate::view::PyKvView;

#[pyclass(frozen, name = "Engine", module = "ferrumkv._core")]
pub struct PyEngine {
    engine: Arc<Engine>,
    /// The last batch's request ids (`extend_batch`, `batch_layout`, `block_table`).
    ids: convert::IdCache,
}

fn handle(py: Python<'_>, view: SeqView) -> PyResult<Py<PyAny>> {
    Ok(Py::new(py, PySequenceHandle { view })?.into_any())
}

fn outcome(py: Python<'_>, o: Outcome) -> PyResult<Py<PyAny>> {
    match o {
        Outcome::Ready(v) => handle(py, v),
        Outcome::Waiting(id) => Ok(Py::new(py, PyTicket { id })?.into_any()),
    }
}

/// Tokens to append: ids (list / array) or an int count of tokens whose ids are unknown.
fn append_of(tokens: &Bound<'_, PyAny>) -> PyResult<Append> {
    if tokens.is_instance_of::<PyInt>() && !tokens.is_instance_of::<pyo3::types::PyBool>() {
        let n: i64 = tokens.extract()?;
        if n < 1 {
            return Err(PyValueError::new_err(format!(
                "a token count must be >= 1, got {n}"
            )));
        }
        return Ok(Append::Count(n as usize));
    }
    let ids = convert::tokens(tokens)?;
    if ids.is_empty() {
        return Err(PyValueError::new_err("tokens must not be empty"));
    }
    Ok(Append::Ids(ids))
}

/// The options of an allocation (`num_new_tokens` >= 1 or None).
fn alloc_opts(num_new_tokens: Option<&Bound<'_, PyAny>>, preempted: bool) -> PyResult<AllocOpts> {
    Ok(AllocOpts {
        num_new_tokens: convert::count(num_new_tokens, "num_new_tokens")?,
        preempted,
    })
}

/// What `extend_batch` was given as `tokens`.
enum BatchTokens {
    /// One id per request (a flat list of ints, a 1-D array or tensor).
    One(Vec<u32>),
    /// An entry per request (a list holding lists or arrays).
    Each(Vec<Append>),
}

/// An int-like batch entry (an int or a numpy integer scalar, never a bool): one token id.
fn one_id(item: &Bound<'_, PyAny>, i: usize) -> Option<PyResult<u32>> {
    if item.is_instance_of::<PyBool>() || item.is_instance_of::<PyList>() {
        return None;
    }
    if item.is_instance_of::<PyInt>() {
        return Some(match item.extract::<i64>() {
            Ok(v) => u32::try_from(v).map_err(|_| {
                PyValueError::new_err(format!("token id {v} at {i} is outside 0..={}", u32::MAX))
            }),
            Err(_) => Err(PyValueError::new_err(format!(
                "token id at {i} is too large (max {})",
                u32::MAX
            ))),
        });
    }
    // A numpy integer scalar: an index, but no buffer of one dimension.
    if item.hasattr("__index__").unwrap_or(false) && !item.hasattr("__len__").unwrap_or(false) {
        return Some(item.extract::<i64>().and_then(|v| {
            u32::try_from(v).map_err(|_| {
                PyValueError::new_err(format!("token id {v} at {i} is outside 0..={}", u32::MAX))
            })
        }));
    }
    None
}

fn batch_tokens(tokens: &Bound<'_, PyAny>) -> PyResult<BatchTokens> {
    let Ok(list) = tokens.cast::<PyList>() else {
        return Ok(BatchTokens::One(convert::tokens(tokens)?));
    };
    let mut ids = Vec::with_capacity(list.len());
    let mut each: Option<Vec<Append>> = None;
    for (i, item) in list.iter().enumerate() {
        let one = one_id(&item, i).transpose()?;
        match (&mut each, one) {
            (None, Some(id)) => ids.push(id),
            (Some(v), Some(id)) => v.push(Append::Ids(vec![id])),
            (_, None) => {
                let more = convert::tokens(&item)?;
                if more.is_empty() {
                    return Err(PyValueError::new_err(format!(
                        "the token list at {i} is empty"
                    )));
                }
                let v = each
                    .get_or_insert_with(|| ids.drain(..).map(|id| Append::Ids(vec![id])).collect());
                v.push(Append::Ids(more));
            }
        }
    }
    Ok(match each {
        Some(v) => BatchTokens::Each(v),
        None => BatchTokens::One(ids),
    })
}

/// Copies above this size release the GIL while they run.
const DETACH_BYTES: usize = 1 << 20;

impl PyEngine {
    /// Runs an engine call that copies `bytes` bytes between Python and the cache without
    /// the GIL when the copy is large, or when the cache is on a GPU: the CPU then waits
    /// for the kernels and copies enqueued before (`storage::order`), for as long as those
    /// take, and other Python threads keep running meanwhile.
    fn detach_if_large<T: Send>(
        &self,
        py: Python<'_>,
        bytes: usize,
        f: impl FnOnce() -> T + Send,
    ) -> T {
        if bytes >= DETACH_BYTES || self.engine.config().device != Device::Cpu {
            py.detach(f)
        } else {
            f()
        }
    }

    /// An allocation may read disk blocks (a prefix hit on the disk tier): with a disk tier
    /// the GIL is released around it so other Python threads keep running.
    fn without_gil_if_disk<T: Send>(&self, py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
        if self.engine.config().disk_blocks > 0 {
            py.detach(f)
        } else {
            f()
        }
    }
}

#[pymethods]
impl PyEngine {
    #[new]
    fn new(config: &Bound<'_, PyCacheConfig>) -> PyResult<Self> {
        let engine = Engine::new(config.get().config.clone()).py_err()?;
        Ok(PyEngine {
            engine: Arc::new(engine),
            ids: convert::IdCache::default(),
        })
    }

    /// Switches to a manual clock starting at `now_s` (tests); later `set_time` moves it.
    #[staticmethod]
    fn with_manual_clock(config: &Bound<'_, PyCacheConfig>, now_s: f64) -> PyResult<Self> {
        let engine =
            Engine::with_clock(config.get().config.clone(), Clock::manual(now_s)).py_err()?;
        Ok(PyEngine {
            engine: Arc::new(engine),
            ids: convert::IdCache::default(),
        })
    }

    fn set_time(&self, now_s: f64) -> PyResult<()> {
        if self.engine.clock().set(now_s) {
            Ok(())
        } else {
            Err(PyValueError::new_err(
                "this cache runs on the monotonic clock",
            ))
        }
    }

    #[getter]
    fn notify_fd(&self) -> i32 {
        self.engine.notify_fd()
    }

    /// A handle, an int ticket (queued; only when `wait`), or OutOfBlocksError.
    /// `num_new_tokens`: slots for the cached tokens plus that many (one chunk).
    #[pyo3(signature = (request_id, tokens, salt=None, wait=true, num_new_tokens=None, preempted=false))]
    #[allow(clippy::too_many_arguments)]
    fn allocate(
        &self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        tokens: &Bound<'_, PyAny>,
        salt: Option<&Bound<'_, PyAny>>,
        wait: bool,
        num_new_tokens: Option<&Bound<'_, PyAny>>,
        preempted: bool,
    ) -> PyResult<Py<PyAny>> {
        let rid = convert::request_id(request_id)?;
        let salt = convert::salt(salt)?;
        let tokens = convert::tokens(tokens)?;
        let opts = alloc_opts(num_new_tokens, preempted)?;
        let run = || {
            self.engine
                .allocate_with(rid, tokens, salt.as_ref(), opts, wait)
        };
        outcome(py, self.without_gil_if_disk(py, run).py_err()?)
    }

    /// A handle, or None when blocks are short (never waits).
    #[pyo3(signature = (request_id, tokens, salt=None, num_new_tokens=None, preempted=false))]
    fn try_allocate(
        &self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        tokens: &Bound<'_, PyAny>,
        salt: Option<&Bound<'_, PyAny>>,
        num_new_tokens: Option<&Bound<'_, PyAny>>,
        preempted: bool,
    ) -> PyResult<Option<Py<PyAny>>> {
        let rid = convert::request_id(request_id)?;
        let salt = convert::salt(salt)?;
        let tokens = convert::tokens(tokens)?;
        let opts = alloc_opts(num_new_tokens, preempted)?;
        let run = || {
            self.engine
                .allocate_with(rid, tokens, salt.as_ref(), opts, false)
        };
        match self.without_gil_if_disk(py, run) {
            Ok(o) => outcome(py, o).map(Some),
            Err(Error::OutOfBlocks {
                never_fits: false, ..
            }) => Ok(None),
            Err(e) => Err(crate::errors::to_py(e)),
        }
    }

    /// `tokens`: generated ids (list / array) or an int count of tokens whose ids are
    /// unknown; or `num_new_tokens`: the next chunk of the prompt. Exactly one of them.
    #[pyo3(signature = (request_id, tokens=None, wait=true, num_new_tokens=None))]
    fn extend(
        &self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        tokens: Option<&Bound<'_, PyAny>>,
        wait: bool,
        num_new_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let rid = convert::request_id(request_id)?;
        let chunk = convert::count(num_new_tokens, "num_new_tokens")?;
        let append = match (tokens.filter(|t| !t.is_none()), chunk) {
            (Some(_), Some(_)) => {
                return Err(PyTypeError::new_err(
                    "extend takes tokens or num_new_tokens, not both",
                ))
            }
            (None, None) => {
                return Err(PyTypeError::new_err(
                    "extend needs tokens (generated ids or a count) or num_new_tokens \
                     (the next chunk of the prompt)",
                ))
            }
            (Some(t), None) => append_of(t)?,
            (None, Some(n)) => Append::Prompt(n),
        };
        outcome(py, self.engine.extend(rid, append, wait).py_err()?)
    }

    /// Drops the tokens past `num_tokens` (1 ..= the sequence's tokens); returns the handle.
    fn truncate(
        &self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        num_tokens: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let rid = convert::request_id(request_id)?;
        let n = convert::int_arg(num_tokens, "num_tokens")?;
        if n < 1 {
            return Err(PyValueError::new_err(format!(
                "num_tokens must be >= 1, got {n}"
            )));
        }
        handle(py, self.engine.truncate(&rid, n as usize).py_err()?)
    }

    /// One decode step, all or nothing. `tokens`: a flat list / 1-D array / tensor of one new
    /// token id per request, or a list with one entry per request (an int: one id; a list
    /// or array: ids appended). `counts`: instead of `tokens`, one count per request of
    /// tokens whose ids are unknown.
    #[pyo3(signature = (request_ids, tokens=None, *, counts=None))]
    fn extend_batch(
        &self,
        request_ids: &Bound<'_, PyAny>,
        tokens: Option<&Bound<'_, PyAny>>,
        counts: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let rids = self.ids.get(request_ids)?;
        let entries = |n: usize| {
            if n == rids.len() {
                Ok(())
            } else {
                Err(PyValueError::new_err(format!(
                    "{} request ids but {n} token entries",
                    rids.len()
                )))
            }
        };
        let tokens = tokens.filter(|t| !t.is_none());
        let counts = counts.filter(|c| !c.is_none());
        let appends: Vec<Append> = match (tokens, counts) {
            (Some(_), Some(_)) => {
                return Err(PyTypeError::new_err("pass tokens or counts=, not both"))
            }
            (None, None) => return Err(PyTypeError::new_err("pass tokens or counts=")),
            (None, Some(c)) => {
                let counts = convert::sizes(c, "counts")?;
                entries(counts.len())?;
                if let Some(i) = counts.iter().position(|&n| n == 0) {
                    return Err(PyValueError::new_err(format!(
                        "counts must be >= 1, got 0 at {i}"
                    )));
                }
                counts.into_iter().map(Append::Count).collect()
            }
            (Some(t), None) => match batch_tokens(t)? {
                BatchTokens::One(ids) => {
                    entries(ids.len())?;
                    return self.engine.extend_batch_ids(&rids, &ids).py_err();
                }
                BatchTokens::Each(appends) => {
                    entries(appends.len())?;
                    appends
                }
            },
        };
        let items: Vec<_> = rids.iter().cloned().zip(appends).collect();
        self.engine.extend_batch(&items).py_err()
    }

    /// The attention metadata of one forward step over `request_ids`, whose last
    /// `num_new_tokens` (an int, or one per request) tokens are computed now.
    #[pyo3(signature = (request_ids, num_new_tokens, pad=0))]
    fn batch_layout(
        &self,
        py: Python<'_>,
        request_ids: &Bound<'_, PyAny>,
        num_new_tokens: &Bound<'_, PyAny>,
        pad: i32,
    ) -> PyResult<PyBatchLayout> {
        let rids = self.ids.get(request_ids)?;
        let per: Vec<usize>;
        let new = if num_new_tokens.is_instance_of::<PyInt>()
            && !num_new_tokens.is_instance_of::<PyBool>()
        {
            let n: i64 = num_new_tokens
                .extract()
                .map_err(|_| PyValueError::new_err("num_new_tokens is too large"))?;
            NewTokens::Each(usize::try_from(n).map_err(|_| {
                PyValueError::new_err(format!("num_new_tokens must be >= 0, got {n}"))
            })?)
        } else {
            per = convert::sizes(num_new_tokens, "num_new_tokens")?;
            NewTokens::PerRequest(&per)
        };
        let layout = self.engine.batch_layout(&rids, new, pad).py_err()?;
        PyBatchLayout::new(py, &layout)
    }

    /// What the prefix cache would serve of `tokens` now, per tier, without allocating:
    /// `{num_cached_tokens, device_tokens, host_tokens, disk_tokens}`.
    #[pyo3(signature = (tokens, salt=None))]
    fn lookup_prefix<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'_, PyAny>,
        salt: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let salt = convert::salt(salt)?;
        let m = self
            .engine
            .lookup_prefix(&convert::tokens(tokens)?, salt.as_ref())
            .py_err()?;
        let d = PyDict::new(py);
        d.set_item("num_cached_tokens", m.num_cached_tokens())?;
        d.set_item("device_tokens", m.device_tokens)?;
        d.set_item("host_tokens", m.host_tokens)?;
        d.set_item("disk_tokens", m.disk_tokens)?;
        Ok(d)
    }

    /// A handle (tier "host"), or an int ticket when the copy runs on the worker.
    fn swap_out(&self, py: Python<'_>, request_id: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let rid = convert::request_id(request_id)?;
        outcome(py, py.detach(|| self.engine.swap_out(&rid)).py_err()?)
    }

    /// A handle (tier "device"), or an int ticket when the copy runs on the worker.
    fn swap_in(&self, py: Python<'_>, request_id: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let rid = convert::request_id(request_id)?;
        outcome(py, py.detach(|| self.engine.swap_in(&rid)).py_err()?)
    }

    fn deallocate(&self, request_id: &Bound<'_, PyAny>) -> PyResult<()> {
        self.engine
            .deallocate(&convert::request_id(request_id)?)
            .py_err()
    }

    fn fork(
        &self,
        py: Python<'_>,
        parent_id: &Bound<'_, PyAny>,
        child_id: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let p = convert::request_id(parent_id)?;
        let c = convert::request_id(child_id)?;
        handle(py, self.engine.fork(&p, c).py_err()?)
    }

    fn take_ticket(&self, py: Python<'_>, ticket: PyTicket) -> PyResult<Py<PyAny>> {
        handle(py, self.engine.take_ticket(ticket.id).py_err()?)
    }

    fn cancel_ticket(&self, ticket: PyTicket) {
        self.engine.cancel_ticket(ticket.id);
    }

    // ----- the remote tier (driven by ferrumkv.remote) -------------------------------------

    /// `(start, keys)`: the index of the prompt's first block not cached locally, and the
    /// store keys of it and the full blocks after it (`[]` without a remote tier).
    #[pyo3(signature = (tokens, salt=None))]
    fn remote_plan(
        &self,
        tokens: &Bound<'_, PyAny>,
        salt: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(usize, Vec<String>)> {
        let salt = convert::salt(salt)?;
        self.engine
            .remote_plan(&convert::tokens(tokens)?, salt.as_ref())
            .py_err()
    }

    /// Imports the values fetched for blocks `start..` (None: absent), in chain order;
    /// `(imported, refused)`. `looked_up`: blocks asked for; `seconds`: the lookup's time.
    #[pyo3(signature = (tokens, salt, start, values, looked_up, seconds))]
    #[allow(clippy::too_many_arguments)]
    fn import_remote(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        salt: Option<&Bound<'_, PyAny>>,
        start: usize,
        values: Vec<Option<Bound<'_, PyBytes>>>,
        looked_up: usize,
        seconds: f64,
    ) -> PyResult<(usize, usize)> {
        let salt = convert::salt(salt)?;
        let tokens = convert::tokens(tokens)?;
        // Borrowed, not copied: bytes are immutable and `values` outlives the call.
        let views: Vec<Option<&[u8]>> = values
            .iter()
            .map(|v| v.as_ref().map(pyo3::types::PyBytesMethods::as_bytes))
            .collect();
        let elapsed = std::time::Duration::from_secs_f64(seconds.max(0.0));
        let got = py
            .detach(|| {
                self.engine
                    .import_remote(&tokens, salt.as_ref(), start, &views, looked_up, elapsed)
            })
            .py_err()?;
        Ok((got.blocks, got.refused))
    }

    /// Counts a lookup whose remote calls failed: `errors` calls, `missed` blocks.
    fn remote_lookup_failed(&self, errors: u64, missed: u64, seconds: f64) -> PyResult<()> {
        let elapsed = std::time::Duration::from_secs_f64(seconds.max(0.0));
        self.engine
            .remote_lookup_failed(errors, missed, elapsed)
            .py_err()
    }

    /// Up to `max` queued writes `(seq, key, value)` (a `RemoteValue`: pass
    /// `memoryview(value)`, no copy), waiting at most `timeout` seconds (without the GIL) for
    /// one; raises CacheClosedError once closed and drained.
    fn take_remote_writes(
        &self,
        py: Python<'_>,
        max: usize,
        timeout: f64,
    ) -> PyResult<Vec<(u64, String, PyRemoteValue)>> {
        let timeout = std::time::Duration::from_secs_f64(timeout.clamp(0.0, 3600.0));
        let writes = py
            .detach(|| self.engine.take_remote_writes(max, timeout))
            .py_err()?;
        Ok(writes
            .into_iter()
            .map(|w| (w.seq, w.key, PyRemoteValue::new(w.value)))
            .collect())
    }

    /// The writer finished writes `seqs`: those in `stored` landed, `dropped` did not
    /// (`errors` failed calls), in `seconds`.
    fn finish_remote_writes(
        &self,
        seqs: Vec<u64>,
        stored: Vec<u64>,
        dropped: u64,
        errors: u64,
        seconds: f64,
    ) {
        let elapsed = std::time::Duration::from_secs_f64(seconds.max(0.0));
        self.engine
            .finish_remote_writes(&seqs, &stored, dropped, errors, elapsed);
    }

    /// The remote writer is stopping: its waits return at once once nothing is queued.
    fn wake_remote_writer(&self) {
        self.engine.wake_remote_writer();
    }

    /// `(queued, in flight)` remote writes.
    fn remote_writes_pending(&self) -> (usize, usize) {
        self.engine.remote_writes_pending()
    }

    /// None when every disk and remote write issued so far has landed, else a ticket to
    /// wait for.
    fn flush(&self) -> PyResult<Option<PyTicket>> {
        Ok(self.engine.flush().py_err()?.map(|id| PyTicket { id }))
    }

    fn take_flush(&self, ticket: PyTicket) -> PyResult<()> {
        self.engine.take_flush(ticket.id).py_err()
    }

    /// `([(kind, message)], dropped)`: failures the engine got over since the last call
    /// (disk checksum failures, disk I/O errors, dropped KV events), for the log.
    fn drain_incidents(&self) -> (Vec<(&'static str, String)>, u64) {
        let (incidents, dropped) = self.engine.drain_incidents();
        (
            incidents.into_iter().map(|i| (i.kind, i.message)).collect(),
            dropped,
        )
    }

    /// `(finished tickets, pressure events)`: the tickets as `Ticket`s, the events as
    /// `ferrumkv.PressureEvent`s, oldest first.
    fn drain_notifications<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Vec<PyTicket>, Vec<Bound<'py, PyAny>>)> {
        let (tickets, events) = self.engine.drain_notifications();
        let tickets = tickets.into_iter().map(|id| PyTicket { id }).collect();
        let events = events
            .iter()
            .map(|e| types::pressure_event(py, e))
            .collect::<PyResult<_>>()?;
        Ok((tickets, events))
    }

    /// Pressure events since the last drain, as `drain_notifications` gives them, for the
    /// caller to deliver at once (tickets stay queued for the event loop).
    fn drain_pressure<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        self.engine
            .drain_pressure()
            .iter()
            .map(|e| types::pressure_event(py, e))
            .collect()
    }

    /// Whether a pressure event waits to be drained (one atomic load, no lock).
    #[getter]
    fn pressure_pending(&self) -> bool {
        self.engine.pressure_pending()
    }

    #[getter]
    fn num_free_blocks(&self) -> PyResult<usize> {
        Ok(self.engine.gauges().py_err()?.num_free_blocks)
    }

    #[getter]
    fn num_evictable_blocks(&self) -> PyResult<usize> {
        Ok(self.engine.gauges().py_err()?.num_evictable_blocks)
    }

    #[getter]
    fn num_used_blocks(&self) -> PyResult<usize> {
        Ok(self.engine.gauges().py_err()?.num_used_blocks)
    }

    #[getter]
    fn num_waiting(&self) -> PyResult<usize> {
        Ok(self.engine.gauges().py_err()?.num_waiting)
    }

    fn set_subscribed(&self, on: bool) {
        self.engine.set_subscribed(on);
    }

    fn record_callback_error(&self) {
        self.engine.record_callback_error();
    }

    #[pyo3(signature = (target_free_ratio=None))]
    fn gc<'py>(
        &self,
        py: Python<'py>,
        target_free_ratio: Option<f64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let g = self.engine.gc(target_free_ratio).py_err()?;
        let d = PyDict::new(py);
        d.set_item("evicted_blocks", g.evicted_blocks)?;
        d.set_item("offloaded_blocks", g.offloaded_blocks)?;
        d.set_item("freed_bytes", g.freed_bytes)?;
        d.set_item("duration_s", g.duration_s)?;
        Ok(d)
    }

    fn reset_prefix_cache(&self) -> PyResult<bool> {
        self.engine.reset_prefix_cache().py_err()
    }

    /// With an int: whether that many tokens fit now (nothing cached). With a prompt's
    /// tokens: whether `allocate(tokens, salt=..., num_new_tokens=...)` would succeed now
    /// without waiting (its prefix hits count).
    #[pyo3(signature = (tokens_or_count, salt=None, num_new_tokens=None))]
    fn can_allocate(
        &self,
        tokens_or_count: &Bound<'_, PyAny>,
        salt: Option<&Bound<'_, PyAny>>,
        num_new_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let opts = alloc_opts(num_new_tokens, false)?;
        let salt = convert::salt(salt)?;
        let is_count = tokens_or_count.is_instance_of::<PyInt>()
            || (tokens_or_count.hasattr("__index__")? && !tokens_or_count.hasattr("__len__")?);
        if !is_count {
            let tokens = convert::tokens(tokens_or_count)?;
            return self
                .engine
                .can_allocate_prompt(&tokens, salt.as_ref(), opts)
                .py_err();
        }
        let n = convert::int_arg(tokens_or_count, "num_tokens")?;
        if n < 0 {
            return Err(PyValueError::new_err(format!(
                "num_tokens must be >= 0, got {n}"
            )));
        }
        if salt.is_some() || opts.num_new_tokens.is_some() {
            return Err(PyValueError::new_err(
                "salt and num_new_tokens need the prompt's tokens, not a token count",
            ));
        }
        self.engine.can_allocate(n as usize).py_err()
    }

    fn get(&self, py: Python<'_>, request_id: &Bound<'_, PyAny>) -> PyResult<Option<Py<PyAny>>> {
        let rid = convert::request_id(request_id)?;
        self.engine
            .get(&rid)
            .py_err()?
            .map(|v| handle(py, v))
            .transpose()
    }

    fn __contains__(&self, request_id: &Bound<'_, PyAny>) -> PyResult<bool> {
        match convert::request_id(request_id) {
            Ok(rid) => self.engine.contains(&rid).py_err(),
            Err(_) => Ok(false),
        }
    }

    fn __len__(&self) -> PyResult<usize> {
        self.engine.num_sequences().py_err()
    }

    fn pressure_level(&self) -> PyResult<u8> {
        Ok(self.engine.pressure_level().py_err()? as u8)
    }

    /// `(int32 bytes as a bytearray, rows, cols)`.
    fn block_table<'py>(
        &self,
        py: Python<'py>,
        request_ids: &Bound<'py, PyAny>,
        pad: i32,
    ) -> PyResult<(Bound<'py, PyByteArray>, usize, usize)> {
        let rids = self.ids.get(request_ids)?;
        let (ids, cols) = self.engine.block_table(&rids, pad).py_err()?;
        let bytes = PyByteArray::new_with(py, ids.len() * 4, |dst| {
            for (d, v) in dst.chunks_exact_mut(4).zip(&ids) {
                d.copy_from_slice(&v.to_ne_bytes());
            }
            Ok(())
        })?;
        Ok((bytes, rids.len(), cols))
    }

    /// `k`, `v`: C-contiguous uint8 views of `[n, heads, head_dim]` arrays of the cache dtype.
    fn write_kv(
        &self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        layer: usize,
        start: usize,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let rid = convert::request_id(request_id)?;
        let k = convert::bytes_of(k, "k")?;
        let v = convert::bytes_of(v, "v")?;
        self.detach_if_large(py, k.len(), || {
            self.engine.write_kv(&rid, layer, start, &k, &v)
        })
        .py_err()
    }

    #[allow(clippy::too_many_arguments)]
    /// Fills `k_out`, `v_out` (writable uint8 views of `[n, heads, head_dim]` arrays).
    fn read_kv(
        &self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        layer: usize,
        start: usize,
        k_out: &Bound<'_, PyAny>,
        v_out: &Bound<'_, PyAny>,
        nbytes: usize,
    ) -> PyResult<()> {
        let rid = convert::request_id(request_id)?;
        let mut k = convert::staging(nbytes, "k_out")?;
        let mut v = convert::staging(nbytes, "v_out")?;
        self.detach_if_large(py, nbytes, || {
            self.engine.read_kv(&rid, layer, start, &mut k, &mut v)
        })
        .py_err()?;
        convert::fill(k_out, &k, "k_out")?;
        convert::fill(v_out, &v, "v_out")
    }

    fn set_compute_stream(&self, stream: u64) -> PyResult<()> {
        self.engine.set_compute_stream(stream).py_err()
    }

    #[getter]
    fn compute_stream(&self) -> u64 {
        self.engine.compute_stream()
    }

    fn kv_view(&self, layer: usize) -> PyResult<PyKvView> {
        let (memory, view) = self.engine.layer_view(layer).py_err()?;
        PyKvView::new(memory, view, self.engine.config().dtype)
    }

    /// The snapshot as a dict (its keys are `CacheStats`' fields, tiers as dicts).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats::snapshot_dict(py, &self.engine.stats().py_err()?)
    }

    /// The snapshot as a finished `ferrumkv.CacheStats`.
    fn stats_object<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        stats::snapshot_object(py, &self.engine.stats().py_err()?)
    }

    fn iteration_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats::snapshot_dict(py, &self.engine.iteration_stats().py_err()?)
    }

    /// The KV events since the last drain, as `ferrumkv.BlockStored` / `BlockRemoved` /
    /// `AllBlocksCleared`, oldest first.
    fn drain_events<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        self.engine
            .drain_events()
            .py_err()?
            .into_iter()
            .map(|e| types::kv_event(py, e))
            .collect()
    }

    /// The sampled evictions since the last drain, as `ferrumkv.EvictionEvent`s.
    fn drain_eviction_events<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        self.engine
            .drain_eviction_events()
            .py_err()?
            .into_iter()
            .map(|e| types::eviction_event(py, e))
            .collect()
    }

    /// Test hook: injects a disk fault ("fail_next_write", "short_next_read", or "flip"
    /// with a slot and byte offset).
    #[pyo3(signature = (kind, slot=0, offset=0))]
    fn inject_disk_fault(&self, kind: &str, slot: usize, offset: usize) -> PyResult<()> {
        use ferrumkv_core::storage::disk::Fault;
        let fault = match kind {
            "fail_next_write" => Fault::FailNextWrite,
            "short_next_read" => Fault::ShortNextRead,
            "flip" => Fault::FlipByte { slot, offset },
            _ => {
                return Err(PyValueError::new_err(format!(
                    "unknown disk fault {kind:?}"
                )))
            }
        };
        self.engine.inject_disk_fault(fault).py_err()
    }

    /// Test hook: the next `n` swap copies fail as if the copy panicked.
    fn inject_copy_faults(&self, n: u32) {
        self.engine.inject_copy_faults(n);
    }

    /// Test hook: holds swap copies on the worker before they start while `on`.
    fn pause_copies(&self, on: bool) {
        self.engine.pause_copies(on);
    }

    /// Test hook: holds disk writes on the workers before they start while `on`.
    fn pause_disk_writes(&self, on: bool) {
        self.engine.pause_disk_writes(on);
    }

    /// Test hook: tickets in any state (nothing left behind).
    fn num_tickets(&self) -> usize {
        self.engine.num_tickets()
    }

    /// Test hook: waits until every swap copy handed to the worker so far has finished.
    fn wait_copies_idle(&self, py: Python<'_>) {
        py.detach(|| self.engine.wait_copies_idle());
    }

    /// Test hook: swaps of fewer bytes than `n` copy inline, bigger ones on the worker.
    fn set_inline_copy_bytes(&self, n: usize) {
        self.engine.set_inline_copy_bytes(n);
    }

    /// Waits until no disk write is in flight (tests; never call it from an event loop).
    fn wait_disk_idle(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.engine.wait_disk_idle()).py_err()
    }

    fn close(&self) {
        self.engine.close();
    }

    #[getter]
    fn closed(&self) -> bool {
        self.engine.is_closed()
    }

    /// Raises AssertionError-like PanicException if bookkeeping is inconsistent (tests).
    fn check_invariants(&self) {
        self.engine.check_invariants();
    }
}
