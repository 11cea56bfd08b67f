//! Argument conversion: request ids, token ids, salts, byte buffers.
//!
//! Token ids arrive as a list / tuple of ints or a 1-D integer array: anything with the
//! buffer protocol (numpy, array.array) is read in place; anything else that exports DLPack
//! (a torch CPU tensor) is read through `numpy.from_dlpack`, without a copy. Each id must be
//! an integer in `0..=u32::MAX`; a float array is a `TypeError`, a negative or too large id a
//! `ValueError`; a tensor on a GPU is a `TypeError` (move it to the CPU first: the copy
//! would synchronize with the device). Lists are read item by item without building Python
//! objects. Counts (`sizes`) follow the same rules with `0..=i64::MAX`. Batches of request
//! ids go through `IdCache`, which skips the conversion when a call passes the very objects
//! of the previous batch (a decode loop's list, step after step).
//!
//! K/V bytes are staged in buffers of our own (never a Rust slice over the caller's buffer,
//! which may be a view of the cache's own memory): allocated fallibly, so a copy too large
//! for the memory left is a `MemoryError`, not an abort.

use std::sync::Arc;

use ferrumkv_core::fallible::vec_of;
use ferrumkv_core::prefix::Salt;
use ferrumkv_core::types::RequestId;
use pyo3::buffer::{Element, PyBuffer};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyInt, PyList, PyString, PyTuple};

pub fn request_id(obj: &Bound<'_, PyAny>) -> PyResult<RequestId> {
    // Fast path: an exact int (one type pointer compare; bool is a subclass, never exact).
    if obj.is_exact_instance_of::<PyInt>() {
        if let Ok(v) = obj.extract::<i64>() {
            return Ok(RequestId::Int(v));
        }
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(RequestId::Str(s.to_str()?.into()));
    }
    if obj.is_instance_of::<PyInt>() && !obj.is_instance_of::<PyBool>() {
        let v: i64 = obj
            .extract()
            .map_err(|_| PyValueError::new_err("an int request_id must fit in 64 bits"))?;
        return Ok(RequestId::Int(v));
    }
    Err(PyTypeError::new_err(format!(
        "request_id must be str or int, not {}",
        obj.get_type().name()?
    )))
}

/// An integer argument (a Python int or anything with `__index__`, never a bool); one that
/// does not fit in 64 bits is a `ValueError`.
pub fn int_arg(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<i64> {
    if obj.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(format!(
            "{what} must be an int, not bool"
        )));
    }
    match obj.extract::<i64>() {
        Ok(v) => Ok(v),
        Err(e) if e.is_instance_of::<pyo3::exceptions::PyOverflowError>(obj.py()) => Err(
            PyValueError::new_err(format!("{what} is too large (it must fit in 64 bits)")),
        ),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{what} must be an int, not {}",
            obj.get_type().name()?
        ))),
    }
}

/// An optional count of at least 1 (`num_new_tokens`).
pub fn count(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Option<usize>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    match int_arg(obj, what)? {
        n if n >= 1 => Ok(Some(n as usize)),
        n => Err(PyValueError::new_err(format!(
            "{what} must be >= 1, got {n}"
        ))),
    }
}

/// Request ids from a list or tuple (read in place) or any other iterable but a str.
pub fn request_ids(obj: &Bound<'_, PyAny>) -> PyResult<Vec<RequestId>> {
    if let Ok(list) = obj.cast::<PyList>() {
        return list.iter().map(|r| request_id(&r)).collect();
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return t.iter().map(|r| request_id(&r)).collect();
    }
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() {
        return Err(PyTypeError::new_err(
            "request_ids must be a sequence of request ids, not a single str",
        ));
    }
    obj.try_iter()?.map(|r| request_id(&r?)).collect()
}

/// The request ids of the last batch converted, beside the objects they came from.
///
/// A decode loop passes the same list of the same id objects to `extend_batch` and
/// `batch_layout` step after step; converting 256 str ids costs about 11 us (a copy of each),
/// comparing 256 object addresses well under 1 us. The cache holds the objects, so none can be
/// freed and its address reused, and it keeps only exact `str` / `int` objects, which are
/// immutable and refer to nothing (no reference cycle can hide in it). So equal addresses,
/// in order, are the same ids.
#[derive(Default)]
pub struct IdCache {
    last: std::sync::Mutex<LastBatch>,
}

/// The id objects of the last batch (held) and their conversions, in order.
type LastBatch = (Vec<Py<PyAny>>, Arc<[RequestId]>);

impl IdCache {
    /// The request ids of `obj` (as `request_ids`), from the cache when `obj` is a list of
    /// the very objects of the last batch.
    pub fn get(&self, obj: &Bound<'_, PyAny>) -> PyResult<Arc<[RequestId]>> {
        let Ok(list) = obj.cast::<PyList>() else {
            return Ok(request_ids(obj)?.into());
        };
        // A miss only costs a conversion; a poisoned or busy lock is a miss too.
        if let Ok(last) = self.last.try_lock() {
            let same = last.0.len() == list.len()
                && list
                    .iter()
                    .zip(&last.0)
                    .all(|(a, b)| a.as_ptr() == b.as_ptr());
            if same {
                return Ok(last.1.clone());
            }
        }
        let items: Vec<Bound<'_, PyAny>> = list.iter().collect();
        let rids: Arc<[RequestId]> = items
            .iter()
            .map(request_id)
            .collect::<PyResult<Vec<_>>>()?
            .into();
        let cacheable = items
            .iter()
            .all(|o| o.is_exact_instance_of::<PyString>() || o.is_exact_instance_of::<PyInt>());
        if let (true, Ok(mut last)) = (cacheable, self.last.try_lock()) {
            *last = (items.into_iter().map(Bound::unbind).collect(), rids.clone());
        }
        Ok(rids)
    }
}

pub fn request_id_to_py<'py>(py: Python<'py>, rid: &RequestId) -> PyResult<Bound<'py, PyAny>> {
    Ok(match rid {
        RequestId::Int(i) => i.into_pyobject(py)?.into_any(),
        RequestId::Str(s) => PyString::new(py, s).into_any(),
    })
}

pub fn salt(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Salt>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Some(Salt::Str(s.to_str()?.to_owned())));
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Some(Salt::Bytes(b.as_bytes().to_vec())));
    }
    if obj.is_instance_of::<PyInt>() && !obj.is_instance_of::<PyBool>() {
        let v: i64 = obj
            .extract()
            .map_err(|_| PyValueError::new_err("an int salt must fit in 64 bits"))?;
        return Ok(Some(Salt::Int(v)));
    }
    Err(PyTypeError::new_err(format!(
        "salt must be str, bytes, int or None, not {}",
        obj.get_type().name()?
    )))
}

fn token_of(item: &Bound<'_, PyAny>, i: usize) -> PyResult<u32> {
    // Fast path: an int that fits (not a bool: True is no token id); everything else is
    // diagnosed on the slow path.
    if !item.is_instance_of::<PyBool>() {
        if let Ok(v) = item.extract::<i64>() {
            return check_id(v, i);
        }
    }
    if item.is_instance_of::<PyInt>() && !item.is_instance_of::<PyBool>() {
        return Err(PyValueError::new_err(format!(
            "token id at {i} is too large (max {})",
            u32::MAX
        )));
    }
    Err(PyTypeError::new_err(format!(
        "token ids must be integers; item {i} is {}",
        item.get_type().name()?
    )))
}

#[inline]
fn check_id(v: i64, i: usize) -> PyResult<u32> {
    u32::try_from(v).map_err(|_| {
        PyValueError::new_err(format!("token id {v} at {i} is outside 0..={}", u32::MAX))
    })
}

/// Integer element types accepted for token arrays.
trait TokenInt: Element + Copy + std::fmt::Display {
    /// The value, if it lies in `0..=max`.
    fn in_range(self, max: u64) -> Option<u64>;
}

macro_rules! token_int {
    ($($t:ty),*) => {$(impl TokenInt for $t {
        #[inline]
        fn in_range(self, max: u64) -> Option<u64> {
            u64::try_from(self).ok().filter(|&v| v <= max)
        }
    })*};
}
token_int!(i64, i32, u32, u64, i16, u16, u8, i8);

/// What a buffer's checked values become (each fits: `from_buffer` checked it first).
trait FromChecked: Copy {
    fn from_checked(v: u64) -> Self;
}

impl FromChecked for u32 {
    #[inline]
    fn from_checked(v: u64) -> Self {
        v as u32
    }
}

impl FromChecked for usize {
    #[inline]
    fn from_checked(v: u64) -> Self {
        v as usize
    }
}

/// The values of a 1-D integer buffer `obj` of element type `T`, each checked to lie in
/// `0..=max` (`what` names them in errors), or None if `obj` is no buffer of `T`. A
/// contiguous buffer is read in place, a strided one copied into order once.
fn from_buffer<T: TokenInt, O: FromChecked>(
    obj: &Bound<'_, PyAny>,
    max: u64,
    what: &str,
) -> Option<PyResult<Vec<O>>> {
    let buf = PyBuffer::<T>::get(obj).ok()?;
    if buf.dimensions() != 1 {
        return Some(Err(PyValueError::new_err(format!(
            "{what}: expected a 1-D array, got {} dimensions",
            buf.dimensions()
        ))));
    }
    Some(match buf.as_slice(obj.py()) {
        Some(cells) => checked(cells.iter().map(pyo3::buffer::ReadOnlyCell::get), max, what),
        None => buf
            .to_vec(obj.py())
            .and_then(|v| checked(v.iter().copied(), max, what)),
    })
}

/// `vals`, each checked to lie in `0..=max`, in two branch-free passes (check, then
/// convert) so that both vectorize: about 0.2 ns a value, against 2 through a copy and
/// `i128`s (BENCHMARKS.md).
fn checked<T: TokenInt, O: FromChecked>(
    vals: impl ExactSizeIterator<Item = T> + Clone,
    max: u64,
    what: &str,
) -> PyResult<Vec<O>> {
    let ok = |v: T| v.in_range(max).is_some();
    if vals.clone().fold(false, |bad, v| bad | !ok(v)) {
        let (i, v) = vals
            .enumerate()
            .find(|&(_, v)| !ok(v))
            .expect("a value out of range");
        return Err(PyValueError::new_err(format!(
            "{what}: {v} at {i} is outside 0..={max}"
        )));
    }
    Ok(vals
        .map(|v| O::from_checked(v.in_range(max).unwrap_or(0)))
        .collect())
}

/// The integers of a 1-D buffer of any integer type (see `from_buffer`), or None.
fn ints_of_buffer<O: FromChecked>(
    obj: &Bound<'_, PyAny>,
    max: u64,
    what: &str,
) -> Option<PyResult<Vec<O>>> {
    from_buffer::<i64, O>(obj, max, what)
        .or_else(|| from_buffer::<i32, O>(obj, max, what))
        .or_else(|| from_buffer::<u32, O>(obj, max, what))
        .or_else(|| from_buffer::<u64, O>(obj, max, what))
        .or_else(|| from_buffer::<i16, O>(obj, max, what))
        .or_else(|| from_buffer::<u16, O>(obj, max, what))
        .or_else(|| from_buffer::<u8, O>(obj, max, what))
        .or_else(|| from_buffer::<i8, O>(obj, max, what))
}

/// A numpy view of an object that exports DLPack but no buffer (a torch tensor), or None.
/// A tensor numpy cannot read in place (on a GPU) is a `TypeError`.
fn via_dlpack<'py>(obj: &Bound<'py, PyAny>, what: &str) -> Option<PyResult<Bound<'py, PyAny>>> {
    static FROM_DLPACK: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    // SAFETY: `obj` is a live object; the call only reads its type's buffer slot.
    let has_buffer = unsafe { pyo3::ffi::PyObject_CheckBuffer(obj.as_ptr()) } != 0;
    if has_buffer || !obj.hasattr("__dlpack__").unwrap_or(false) {
        return None; // a buffer of another element type is diagnosed by the caller
    }
    let py = obj.py();
    let view = FROM_DLPACK
        .import(py, "numpy", "from_dlpack")
        .and_then(|f| f.call1((obj,)));
    Some(view.map_err(|e| {
        PyTypeError::new_err(format!(
            "{what} must be on the CPU ({} cannot be read in place: {e}); move it with .cpu()",
            describe(obj)
        ))
    }))
}

/// Token ids of a list: exact `int` items in range are read straight from the list (a
/// borrowed item, one `PyLong_AsLongLong`: a few ns a token); any other item goes through
/// `token_of`, which converts it or says what is wrong with it.
fn list_tokens(list: &Bound<'_, PyList>) -> PyResult<Vec<u32>> {
    use pyo3::ffi;
    let n = list.len();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: `list` is a live list and we hold the GIL. `PyList_GetItem` checks the
        // index (a list shrunk by an item's `__index__` on the slow path gives NULL and an
        // IndexError) and returns a borrowed reference, used only before any Python code can
        // run again; an exact int's `PyLong_AsLongLong` runs none.
        let fast = unsafe {
            let item = ffi::PyList_GetItem(list.as_ptr(), i as ffi::Py_ssize_t);
            if item.is_null() {
                return Err(PyErr::fetch(list.py()));
            }
            if ffi::PyLong_CheckExact(item) != 0 {
                let v = ffi::PyLong_AsLongLong(item);
                if v == -1 && !ffi::PyErr_Occurred().is_null() {
                    ffi::PyErr_Clear(); // too large: the slow path says so
                    None
                } else {
                    u32::try_from(v).ok()
                }
            } else {
                None
            }
        };
        match fast {
            Some(t) => out.push(t),
            None => out.push(token_of(&list.get_item(i)?, i)?),
        }
    }
    Ok(out)
}

/// Token ids from a list, tuple, 1-D integer buffer or DLPack tensor.
pub fn tokens(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if let Ok(list) = obj.cast::<PyList>() {
        return list_tokens(list);
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return t.iter().enumerate().map(|(i, x)| token_of(&x, i)).collect();
    }
    if obj.is_instance_of::<PyString>()
        || obj.is_instance_of::<PyBytes>()
        || obj.is_instance_of::<PyInt>()
    {
        return Err(PyTypeError::new_err(
            "tokens must be a list of ints or a 1-D integer array",
        ));
    }
    if let Some(r) = ints_of_buffer(obj, u64::from(u32::MAX), "token ids") {
        return r;
    }
    if let Some(view) = via_dlpack(obj, "tokens") {
        let view = view?;
        if let Some(r) = ints_of_buffer(&view, u64::from(u32::MAX), "token ids") {
            return r;
        }
    }
    Err(PyTypeError::new_err(format!(
        "tokens must be a list of ints or a 1-D integer array, not {}",
        describe(obj)
    )))
}

/// Non-negative counts (`what` names them) from a list, tuple, 1-D integer buffer or DLPack
/// tensor.
pub fn sizes(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<usize>> {
    let item = |(i, x): (usize, Bound<'_, PyAny>)| -> PyResult<usize> {
        if !x.is_instance_of::<PyBool>() {
            if let Ok(v) = x.extract::<i64>() {
                return usize::try_from(v).map_err(|_| {
                    PyValueError::new_err(format!("{what} must be >= 0, got {v} at {i}"))
                });
            }
        }
        if x.is_instance_of::<PyInt>() && !x.is_instance_of::<PyBool>() {
            return Err(PyValueError::new_err(format!("{what} at {i} is too large")));
        }
        Err(PyTypeError::new_err(format!(
            "{what} must be integers; item {i} is {}",
            x.get_type().name()?
        )))
    };
    if let Ok(list) = obj.cast::<PyList>() {
        return list.iter().enumerate().map(item).collect();
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return t.iter().enumerate().map(item).collect();
    }
    let max = i64::MAX as u64;
    if !obj.is_instance_of::<PyString>() && !obj.is_instance_of::<PyBytes>() {
        if let Some(r) = ints_of_buffer(obj, max, what) {
            return r;
        }
        if let Some(view) = via_dlpack(obj, what) {
            if let Some(r) = ints_of_buffer(&view?, max, what) {
                return r;
            }
        }
    }
    Err(PyTypeError::new_err(format!(
        "{what} must be an int, a list of ints or a 1-D integer array, not {}",
        describe(obj)
    )))
}

fn describe(obj: &Bound<'_, PyAny>) -> String {
    let ty = obj
        .get_type()
        .name()
        .map_or_else(|_| "?".into(), |n| n.to_string());
    match obj.getattr("dtype") {
        Ok(d) => format!(
            "{ty} of dtype {}",
            d.str().map(|s| s.to_string()).unwrap_or_default()
        ),
        Err(_) => ty,
    }
}

/// A zeroed staging buffer of `n` bytes for `what`; `MemoryError` if it cannot be allocated.
pub fn staging(n: usize, what: &str) -> PyResult<Vec<u8>> {
    vec_of(n, 0, &format!("the {what} buffer")).map_err(crate::errors::to_py)
}

/// A copy of the bytes of a C-contiguous uint8 buffer.
pub fn bytes_of(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u8>> {
    let buf = PyBuffer::<u8>::get(obj)
        .map_err(|_| PyTypeError::new_err(format!("{what} must be a contiguous byte buffer")))?;
    let mut out = staging(buf.len_bytes(), what)?;
    buf.copy_to_slice(obj.py(), &mut out)?;
    Ok(out)
}

/// Copies `data` into a writable C-contiguous uint8 buffer of the same length.
pub fn fill(obj: &Bound<'_, PyAny>, data: &[u8], what: &str) -> PyResult<()> {
    let buf = PyBuffer::<u8>::get(obj)
        .map_err(|_| PyTypeError::new_err(format!("{what} must be a writable byte buffer")))?;
    buf.copy_from_slice(obj.py(), data)
}
