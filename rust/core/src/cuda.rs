//! CUDA availability.
//!
//! cudarc is built with dynamic loading, so the engine builds and runs without a CUDA
//! toolkit or driver. Loading libcuda panics inside cudarc when the library is missing, so
//! the probe runs under `catch_unwind` and turns every failure into
//! `Error::CudaUnavailable` with the reason (see `storage::cuda::CudaDevice::open`).

use std::panic::{catch_unwind, AssertUnwindSafe};

/// Whether the CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: `is_culib_present` dlopens the driver library (unsafe because loading runs the
    // library's initializers) and drops it again. That library is the system's NVIDIA driver
    // (libcuda), built to be loaded into any process, and the one cudarc loads for every
    // driver call anyway. A failure to load it is `false` or a panic, which `catch_unwind`
    // turns into `false`.
    catch_unwind(AssertUnwindSafe(|| unsafe {
        cudarc::driver::sys::is_culib_present()
    }))
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics() {
        // Either answer is fine; the probe itself must not panic.
        let _ = driver_present();
    }
}
