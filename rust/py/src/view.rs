//! `KvView`: a zero-copy DLPack view of one layer of the device tier.
//!
//! The view holds an `Arc` of the slab, and every exported capsule holds another, so the
//! memory outlives the cache, the view and every consumer tensor made from it.

use std::sync::Arc;

use ferrumkv_core::config::DType;
use ferrumkv_core::layout::LayerView;
use ferrumkv_core::storage::host::HostSlab;
use pyo3::exceptions::PyBufferError;
use pyo3::prelude::*;

use crate::dlpack::{export_capsule, wants_versioned, DlDevice, DlDtype, TensorDesc};

const KDL_CPU: i32 = 1;

#[pyclass(frozen, name = "KvView", module = "ferrumkv._core")]
pub struct PyKvView {
    pub slab: Arc<HostSlab>,
    pub view: LayerView,
    pub dtype: DType,
}

fn dl_dtype(d: DType) -> DlDtype {
    match d {
        DType::Float16 => DlDtype::F16,
        DType::BFloat16 => DlDtype::BF16,
        DType::Float32 => DlDtype::F32,
        DType::Uint8 => DlDtype::U8,
    }
}

#[pymethods]
impl PyKvView {
    /// `[num_blocks, 2, block_size, num_kv_heads, head_dim]`.
    #[getter]
    fn shape(&self) -> (i64, i64, i64, i64, i64) {
        let s = self.view.shape;
        (s[0], s[1], s[2], s[3], s[4])
    }

    /// Strides in elements.
    #[getter]
    fn strides(&self) -> (i64, i64, i64, i64, i64) {
        let s = self.view.strides;
        (s[0], s[1], s[2], s[3], s[4])
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.dtype.name()
    }

    #[getter]
    fn data_ptr(&self) -> usize {
        self.slab.as_ptr() as usize + self.view.byte_offset
    }

    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<Bound<'_, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        if stream.as_ref().is_some_and(|s| !s.is_none()) {
            return Err(PyBufferError::new_err("a CPU view takes no stream"));
        }
        if let Some(dev) = dl_device {
            if dev != (KDL_CPU, 0) {
                return Err(PyBufferError::new_err(format!(
                    "the view lives on (1, 0), not {dev:?}"
                )));
            }
        }
        if copy == Some(true) {
            return Err(PyBufferError::new_err(
                "KvView exports zero-copy views only (copy=True)",
            ));
        }
        let desc = TensorDesc {
            // SAFETY: `byte_offset` is inside the slab (the layout computed it for a valid
            // layer), and the capsule keeps the slab alive through the `Arc` owner below.
            data: unsafe { self.slab.as_ptr().add(self.view.byte_offset) },
            device: DlDevice::Cpu,
            dtype: dl_dtype(self.dtype),
            shape: self.view.shape.to_vec(),
            strides: self.view.strides.to_vec(),
        };
        export_capsule(
            py,
            desc,
            Box::new(self.slab.clone()),
            wants_versioned(max_version),
            false,
        )
    }

    fn __dlpack_device__(&self) -> (i32, i32) {
        (KDL_CPU, 0)
    }

    fn __repr__(&self) -> String {
        format!(
            "KvView(shape={:?}, strides={:?}, dtype={:?})",
            self.view.shape,
            self.view.strides,
            self.dtype.name()
        )
    }
}
