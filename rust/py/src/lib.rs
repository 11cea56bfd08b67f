//! PyO3 glue of ferrumkv: argument conversion, error mapping, DLPack. No engine logic here;
//! the engine is `ferrumkv-core`. Python imports this as `ferrumkv._core`.

mod batch;
mod config;
mod convert;
mod dlpack;
mod engine;
mod errors;
mod handle;
mod remote;
mod stats;
mod ticket;
mod types;
mod view;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<config::PyCacheConfig>()?;
    m.add_class::<batch::PyBatchLayout>()?;
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<handle::PySequenceHandle>()?;
    m.add_class::<view::PyKvView>()?;
    m.add_class::<remote::PyRemoteValue>()?;
    m.add_class::<ticket::PyTicket>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("cuda_driver_present", ferrumkv_core::cuda::driver_present())?;
    m.add(
        "EVICTION_POLICIES",
        pyo3::types::PyTuple::new(m.py(), ferrumkv_core::eviction::POLICY_NAMES)?,
    )?;
    Ok(())
}
