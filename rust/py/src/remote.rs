//! `RemoteValue`: a value staged for the remote store, handed to Python without a copy.
//!
//! The engine staged the value's bytes (header and block) into a `Vec` under its lock; the
//! writer thread passes them to the store client as `memoryview(value)`. The object exposes
//! that `Vec` through the buffer protocol, read-only, and never changes it, so a view stays
//! valid for as long as it holds the object (the buffer protocol keeps a reference).

use std::ffi::c_int;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

#[pyclass(frozen, name = "RemoteValue", module = "ferrumkv._core")]
pub struct PyRemoteValue {
    bytes: Vec<u8>,
}

impl PyRemoteValue {
    pub fn new(bytes: Vec<u8>) -> Self {
        PyRemoteValue { bytes }
    }
}

#[pymethods]
impl PyRemoteValue {
    fn __len__(&self) -> usize {
        self.bytes.len()
    }

    /// # Safety
    /// Called by Python with a valid `view` (the buffer protocol's contract).
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err("a remote value is read-only"));
        }
        let bytes = &slf.get().bytes;
        // SAFETY: `view` is valid (the caller's contract); the pointer and length describe
        // `bytes`, which lives in the object `PyBuffer_FillInfo` takes a reference to (so it
        // outlives the view) and is never written after construction (frozen, no mutator).
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                bytes.as_ptr() as *mut std::ffi::c_void,
                bytes.len() as ffi::Py_ssize_t,
                1,
                flags,
            )
        };
        if rc != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    /// Nothing to release: the bytes are the object's own.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}
