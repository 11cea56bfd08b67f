//! `KvView`: a zero-copy DLPack view of one layer of the device tier.
//!
//! The view holds the tier's `Memory` (an `Arc` of its slab), and every exported capsule
//! holds another, so the memory outlives the cache, the view and every consumer tensor.
//! On a GPU the view is `kDLCUDA`; a consumer's `stream` is made to wait on every copy the
//! engine enqueued, so it never reads a block whose onboard copy is still running.

use ferrumkv_core::config::DType;
use ferrumkv_core::layout::LayerView;
use ferrumkv_core::storage::Memory;
use pyo3::exceptions::PyBufferError;
use pyo3::prelude::*;

use crate::dlpack::{export_capsule, wants_versioned, DlDevice, DlDtype, TensorDesc};

const KDL_CPU: i32 = 1;
const KDL_CUDA: i32 = 2;

#[pyclass(frozen, name = "KvView", module = "ferrumkv._core")]
pub struct PyKvView {
    pub memory: Memory,
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

impl PyKvView {
    /// Base address of the tier's memory (a device address on a GPU).
    fn base(&self) -> *mut u8 {
        match &self.memory {
            Memory::Host(s) => s.as_ptr(),
            Memory::Pinned(_, s) => s.as_ptr(),
            Memory::Cuda(_, s) => s.device_ptr() as *mut u8,
        }
    }

    /// The DLPack device of the view; on a GPU, makes `stream` wait on pending copies.
    fn prepare_device(&self, stream: Option<i64>) -> PyResult<DlDevice> {
        match &self.memory {
            Memory::Cuda(dev, _) => {
                // -1: the consumer asks for no synchronization (DLPack); else wait on our copies.
                if let Some(st) = stream.filter(|&s| s != -1) {
                    dev.make_stream_wait(st as u64)
                        .map_err(crate::errors::to_py)?;
                }
                Ok(DlDevice::Cuda(dev.ordinal() as i32))
            }
            _ if stream.is_some() => Err(PyBufferError::new_err("a CPU view takes no stream")),
            _ => Ok(DlDevice::Cpu),
        }
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

    /// Address of element `[0, 0, 0, 0, 0]` (a device pointer on a GPU).
    #[getter]
    fn data_ptr(&self) -> usize {
        self.base() as usize + self.view.byte_offset
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
        let here = self.__dlpack_device__();
        if let Some(dev) = dl_device {
            if dev != here {
                return Err(PyBufferError::new_err(format!(
                    "the view lives on {here:?}, not {dev:?}"
                )));
            }
        }
        if copy == Some(true) {
            return Err(PyBufferError::new_err(
                "KvView exports zero-copy views only (copy=True)",
            ));
        }
        let stream = match stream.filter(|s| !s.is_none()) {
            None => None,
            Some(s) => Some(
                s.extract::<i64>()
                    .map_err(|_| PyBufferError::new_err("stream must be an int"))?,
            ),
        };
        let desc = TensorDesc {
            // SAFETY: `byte_offset` is inside the slab (the layout computed it for a valid
            // layer); the capsule keeps the slab alive through the owner below. On a GPU the
            // address is only carried, never dereferenced here.
            data: unsafe { self.base().add(self.view.byte_offset) },
            device: self.prepare_device(stream)?,
            dtype: dl_dtype(self.dtype),
            shape: self.view.shape.to_vec(),
            strides: self.view.strides.to_vec(),
        };
        export_capsule(
            py,
            desc,
            Box::new(self.memory.clone()),
            wants_versioned(max_version),
            false,
        )
    }

    fn __dlpack_device__(&self) -> (i32, i32) {
        match &self.memory {
            Memory::Cuda(dev, _) => (KDL_CUDA, dev.ordinal() as i32),
            _ => (KDL_CPU, 0),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "KvView(shape={:?}, strides={:?}, dtype={:?}, device={:?})",
            self.view.shape,
            self.view.strides,
            self.dtype.name(),
            self.__dlpack_device__()
        )
    }
}
