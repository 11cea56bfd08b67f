//! `SequenceHandle`: a frozen copy of what the engine knows of a sequence.

use ferrumkv_core::sequence::SeqView;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::convert::request_id_to_py;

/// A sequence as a call left it (frozen: later calls return new handles): its request id,
/// tokens, the prefix it got from the cache, its blocks and the tier they are in.
#[pyclass(frozen, name = "SequenceHandle", module = "ferrumkv._core")]
pub struct PySequenceHandle {
    pub view: SeqView,
}

#[pymethods]
impl PySequenceHandle {
    /// The id given to `allocate` (a str or an int).
    #[getter]
    fn request_id<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        request_id_to_py(py, &self.view.request_id)
    }

    /// Tokens with slots (prompt and generated).
    #[getter]
    fn num_tokens(&self) -> usize {
        self.view.num_tokens
    }

    /// Prompt tokens served from the cache at allocation (their K/V is already there).
    #[getter]
    fn num_cached_tokens(&self) -> usize {
        self.view.num_cached_tokens
    }

    /// Tokens of the prompt given to `allocate` (with slots or not: `num_tokens` counts
    /// those with slots).
    #[getter]
    fn num_prompt_tokens(&self) -> usize {
        self.view.num_prompt_tokens
    }

    /// Block ids in order, as a tuple of ints.
    #[getter]
    fn block_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.view.block_ids)
    }

    /// Blocks the sequence holds (`len(block_ids)`).
    #[getter]
    fn num_blocks(&self) -> usize {
        self.view.block_ids.len()
    }

    /// "device", or "host" while swapped out.
    #[getter]
    fn tier(&self) -> &'static str {
        self.view.tier.as_str()
    }

    /// Every field by name.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("request_id", self.request_id(py)?)?;
        d.set_item("num_tokens", self.view.num_tokens)?;
        d.set_item("num_cached_tokens", self.view.num_cached_tokens)?;
        d.set_item("num_prompt_tokens", self.view.num_prompt_tokens)?;
        d.set_item("block_ids", self.block_ids(py)?)?;
        d.set_item("tier", self.tier())?;
        Ok(d)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "SequenceHandle(request_id={}, num_tokens={}, num_cached_tokens={}, num_prompt_tokens={}, block_ids={}, tier={:?})",
            self.request_id(py)?.repr()?,
            self.view.num_tokens,
            self.view.num_cached_tokens,
            self.view.num_prompt_tokens,
            self.block_ids(py)?.repr()?,
            self.tier()
        ))
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<PySequenceHandle>()
            .is_ok_and(|o| o.get().view == self.view)
    }

    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.view.request_id.hash(&mut h);
        self.view.num_tokens.hash(&mut h);
        self.view.block_ids.hash(&mut h);
        h.finish()
    }
}
