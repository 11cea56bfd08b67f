//! The one error type of the engine.
//!
//! Every fallible engine call returns `Result<T, Error>`; the bindings map each variant to
//! exactly one Python exception (see `rust/py/src/errors.rs`). Running out of blocks is an
//! ordinary outcome here, turned into an exception only at the Python edge.
//! Invariant: an `Err` from any engine call means the engine state is exactly as before.

use crate::types::RequestId;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A configuration field is out of range (Python `ValueError`).
    #[error("invalid {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// A call argument has a bad value (Python `ValueError`).
    #[error("{0}")]
    InvalidArgument(String),
    /// Not enough free blocks (Python `OutOfBlocksError`).
    /// `never_fits`: the request is larger than the whole tier, so waiting cannot help.
    #[error("out of blocks: {needed} needed, {available} {}", if *never_fits { "in the whole tier" } else { "available" })]
    OutOfBlocks {
        needed: usize,
        available: usize,
        never_fits: bool,
    },
    #[error("unknown request {0}")]
    UnknownRequest(RequestId),
    #[error("request {0} already exists")]
    DuplicateRequest(RequestId),
    /// The call does not fit the sequence's state (e.g. extend of a swapped-out sequence).
    #[error("{0}")]
    InvalidState(String),
    #[error("the cache is closed")]
    Closed,
    #[error("CUDA is unavailable: {0}")]
    CudaUnavailable(String),
    /// The GPU failed after the engine was built (a failed copy, a lost context); the
    /// engine stops serving (Python `CudaError`, a `CopyError`).
    #[error("CUDA error: {0}")]
    Cuda(String),
    /// A block copy failed (a device fault, or a failure on the copy worker); the call that
    /// asked for it was undone (Python `CopyError`).
    #[error("block copy failed: {0}")]
    CopyFailed(String),
    /// An I/O failure of the disk tier (Python `OSError`).
    #[error("{0}")]
    Io(String),
    /// Memory for a tier (its slab or its bookkeeping) cannot be allocated (Python
    /// `MemoryError`). Raised only while building an engine, which then does not exist.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// What every call gets after this copy failure stopped the engine (`CopyFailed` or
    /// `Cuda`, as the failure was).
    pub(crate) fn again(&self) -> Error {
        let why = |m: &str| {
            format!("an earlier block copy failed ({m}): the cache no longer serves; close it")
        };
        match self {
            Error::Cuda(m) => Error::Cuda(why(m)),
            Error::CopyFailed(m) => Error::CopyFailed(why(m)),
            other => Error::CopyFailed(why(&other.to_string())),
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}
