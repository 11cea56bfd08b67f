//! The one mapping from the engine's `Error` to Python exceptions.
//!
//! The exception classes live in `ferrumkv/errors.py` (they need multiple inheritance:
//! `UnknownRequestError` is also a `KeyError`, `DuplicateRequestError` a `ValueError`), and
//! are imported once, on first use.

use ferrumkv_core::Error;
use pyo3::exceptions::{PyMemoryError, PyOSError, PyValueError};
use pyo3::PyErr;

pyo3::import_exception!(ferrumkv.errors, OutOfBlocksError);
pyo3::import_exception!(ferrumkv.errors, UnknownRequestError);
pyo3::import_exception!(ferrumkv.errors, DuplicateRequestError);
pyo3::import_exception!(ferrumkv.errors, InvalidStateError);
pyo3::import_exception!(ferrumkv.errors, CacheClosedError);
pyo3::import_exception!(ferrumkv.errors, CudaUnavailableError);
pyo3::import_exception!(ferrumkv.errors, CopyError);
pyo3::import_exception!(ferrumkv.errors, CudaError);

/// Maps an engine error to its Python exception (exhaustive: a new variant must be mapped).
pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::InvalidConfig { .. } | Error::InvalidArgument(_) => PyValueError::new_err(msg),
        Error::OutOfBlocks { .. } => OutOfBlocksError::new_err(msg),
        Error::UnknownRequest(_) => UnknownRequestError::new_err(msg),
        Error::DuplicateRequest(_) => DuplicateRequestError::new_err(msg),
        Error::InvalidState(_) => InvalidStateError::new_err(msg),
        Error::Closed => CacheClosedError::new_err(msg),
        Error::CudaUnavailable(_) => CudaUnavailableError::new_err(msg),
        Error::CopyFailed(_) => CopyError::new_err(msg),
        Error::Cuda(_) => CudaError::new_err(msg),
        Error::Io(_) => PyOSError::new_err(msg),
        Error::OutOfMemory(_) => PyMemoryError::new_err(msg),
    }
}

/// `result.map_err(to_py)` as a method.
pub trait IntoPy<T> {
    fn py_err(self) -> pyo3::PyResult<T>;
}

impl<T> IntoPy<T> for Result<T, Error> {
    fn py_err(self) -> pyo3::PyResult<T> {
        self.map_err(to_py)
    }
}
