//! CUDA availability.
//!
//! cudarc is built with dynamic loading, so the engine builds and runs without a CUDA
//! toolkit or driver. Loading libcuda panics inside cudarc when the library is missing, so
//! the probe runs under `catch_unwind` and turns every failure into
//! `Error::CudaUnavailable` with the reason.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::Error;

/// Whether the CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library; a failure to load
    // it is reported as `false` or as a panic, which `catch_unwind` turns into `false`.
    catch_unwind(AssertUnwindSafe(|| unsafe {
        cudarc::driver::sys::is_culib_present()
    }))
    .unwrap_or(false)
}

/// Why `device="cuda:N"` cannot be used by this build.
pub fn unavailable_reason(ordinal: u32) -> Error {
    if !driver_present() {
        return Error::CudaUnavailable(format!(
            "cuda:{ordinal} requested but the CUDA driver library (libcuda.so) cannot be loaded: \
             no NVIDIA driver is installed on this machine"
        ));
    }
    Error::CudaUnavailable(format!(
        "cuda:{ordinal}: a CUDA driver is present, but this build's device tier supports \
         device=\"cpu\" only"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics() {
        let e = unavailable_reason(0);
        assert!(matches!(e, Error::CudaUnavailable(_)), "{e:?}");
    }
}
