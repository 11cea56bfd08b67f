//! `BatchLayout`: the attention metadata of one forward step, as numpy arrays.
//!
//! Each of the engine's four vectors is copied once (a memcpy) into a `bytearray`, which a
//! numpy array views (`numpy.ndarray(shape, dtype, buffer)`: one call each, no per-element
//! objects). The arrays are writable and hold nothing but their buffer. `to_torch` imports torch only when called (`torch.from_numpy` shares the memory;
//! a `device` copies there).

use ferrumkv_core::state::BatchLayout;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyDict};

/// The attention metadata of one forward step over a batch of sequences
/// (`KvCache.batch_layout`), as numpy arrays (`to_torch()` for tensors): the block table,
/// sequence lengths, query start offsets and each new token's slot.
#[pyclass(frozen, name = "BatchLayout", module = "ferrumkv._core")]
pub struct PyBatchLayout {
    /// int32 `[num_seqs, max_blocks]`, padded with the pad (0 by default).
    #[pyo3(get)]
    block_table: Py<PyAny>,
    /// int32 `[num_seqs]`.
    #[pyo3(get)]
    seq_lens: Py<PyAny>,
    /// int32 `[num_seqs + 1]`.
    #[pyo3(get)]
    query_start_loc: Py<PyAny>,
    /// int64 `[num_tokens]`.
    #[pyo3(get)]
    slot_mapping: Py<PyAny>,
    /// Sequences in the batch (rows of `block_table`).
    #[pyo3(get)]
    num_seqs: usize,
    /// Columns of `block_table`: the most blocks any sequence of the batch has.
    #[pyo3(get)]
    max_blocks: usize,
    /// New tokens of the step (`len(slot_mapping)`).
    #[pyo3(get)]
    num_tokens: usize,
    /// The most new tokens any sequence of the step computes.
    #[pyo3(get)]
    max_query_len: usize,
    /// The longest sequence of the batch, in tokens.
    #[pyo3(get)]
    max_seq_len: usize,
}

const FIELDS: [&str; 4] = ["block_table", "seq_lens", "query_start_loc", "slot_mapping"];

struct Numpy {
    ndarray: Py<PyAny>,
    int32: Py<PyAny>,
    int64: Py<PyAny>,
}

fn numpy(py: Python<'_>) -> PyResult<&'static Numpy> {
    static NUMPY: PyOnceLock<Numpy> = PyOnceLock::new();
    NUMPY.get_or_try_init(py, || {
        let np = py.import("numpy")?;
        let dtype = np.getattr("dtype")?;
        Ok(Numpy {
            ndarray: np.getattr("ndarray")?.unbind(),
            int32: dtype.call1(("int32",))?.unbind(),
            int64: dtype.call1(("int64",))?.unbind(),
        })
    })
}

/// The bytes of a slice of plain integers, in memory order (native endian).
fn bytes_of<T: Int>(v: &[T]) -> &[u8] {
    // SAFETY: `T` is a primitive integer (`Int` is sealed to i32 / i64): no padding, every
    // byte initialized; u8 has alignment 1, and the length is the slice's size in bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The element types `bytes_of` may view.
trait Int: Copy {}
impl Int for i32 {}
impl Int for i64 {}

impl PyBatchLayout {
    pub fn new(py: Python<'_>, l: &BatchLayout) -> PyResult<Self> {
        let np = numpy(py)?;
        let array = |shape: Bound<'_, PyAny>, dtype: &Py<PyAny>, bytes: &[u8]| {
            let buf = PyByteArray::new(py, bytes);
            np.ndarray
                .bind(py)
                .call1((shape, dtype.bind(py), buf))
                .map(Bound::unbind)
        };
        let (b, cols) = (l.num_seqs, l.max_blocks);
        let shape1 = |n: usize| (n,).into_pyobject(py).map(Bound::into_any);
        Ok(PyBatchLayout {
            block_table: array(
                (b, cols).into_pyobject(py)?.into_any(),
                &np.int32,
                bytes_of(&l.block_table),
            )?,
            seq_lens: array(shape1(b)?, &np.int32, bytes_of(&l.seq_lens))?,
            query_start_loc: array(shape1(b + 1)?, &np.int32, bytes_of(&l.query_start_loc))?,
            slot_mapping: array(
                shape1(l.slot_mapping.len())?,
                &np.int64,
                bytes_of(&l.slot_mapping),
            )?,
            num_seqs: b,
            max_blocks: cols,
            num_tokens: l.slot_mapping.len(),
            max_query_len: l.max_query_len,
            max_seq_len: l.max_seq_len,
        })
    }

    fn arrays(&self) -> [&Py<PyAny>; 4] {
        [
            &self.block_table,
            &self.seq_lens,
            &self.query_start_loc,
            &self.slot_mapping,
        ]
    }

    /// The same layout with other arrays (`f` maps each of the four).
    fn map(
        &self,
        py: Python<'_>,
        f: impl Fn(&Bound<'_, PyAny>) -> PyResult<Py<PyAny>>,
    ) -> PyResult<Self> {
        let [t, l, q, s] = self.arrays().map(|a| f(a.bind(py)));
        Ok(PyBatchLayout {
            block_table: t?,
            seq_lens: l?,
            query_start_loc: q?,
            slot_mapping: s?,
            ..*self
        })
    }
}

#[pymethods]
impl PyBatchLayout {
    /// The same layout as torch tensors (`torch.from_numpy`: the memory is shared), moved
    /// to `device` when one is given. Imports torch on first use.
    #[pyo3(signature = (device=None, *, non_blocking=false))]
    fn to_torch(
        &self,
        py: Python<'_>,
        device: Option<&Bound<'_, PyAny>>,
        non_blocking: bool,
    ) -> PyResult<Self> {
        let torch = py.import("torch")?;
        let from_numpy = torch.getattr("from_numpy")?;
        self.map(py, |a| {
            let t = from_numpy.call1((a,))?;
            let t = match device {
                Some(d) if !d.is_none() => {
                    let kw = PyDict::new(py);
                    kw.set_item("non_blocking", non_blocking)?;
                    t.call_method("to", (d,), Some(&kw))?
                }
                _ => t,
            };
            Ok(t.unbind())
        })
    }

    /// Every field by name.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (name, a) in FIELDS.iter().zip(self.arrays()) {
            d.set_item(name, a.bind(py))?;
        }
        d.set_item("max_query_len", self.max_query_len)?;
        d.set_item("max_seq_len", self.max_seq_len)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "BatchLayout(num_seqs={}, max_blocks={}, num_tokens={}, max_query_len={}, max_seq_len={})",
            self.num_seqs, self.max_blocks, self.num_tokens, self.max_query_len, self.max_seq_len
        )
    }
}
