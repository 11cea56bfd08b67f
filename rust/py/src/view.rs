//! `KvView`: a zero-copy DLPack view of one layer of the device tier.
//!
//! The view holds the tier's `Memory` (an `Arc` of its slab), and every exported capsule
//! holds another, so the memory outlives the cache, the view and every consumer tensor.
//! On a GPU the view is `kDLCUDA`; a consumer's `stream` is made to wait on every copy the
//! engine enqueued, so it never reads a block whose onboard copy is still running.
//!
//! Addresses: a view only ever computes and hands out addresses; Rust never reads or writes
//! through them (consumers do). A device address is a `u64` in the GPU's address space, not
//! host memory, so it is offset with integer arithmetic and exported as a pointer without
//! provenance; a host address is offset with `wrapping_add` on the slab's pointer. Neither
//! needs `unsafe`. Invariant (checked by `PyKvView::new`): every byte the view describes lies
//! inside the tier's memory.

use ferrumkv_core::config::DType;
use ferrumkv_core::layout::LayerView;
use ferrumkv_core::storage::Memory;
use pyo3::exceptions::{PyBufferError, PyRuntimeError};
use pyo3::prelude::*;

use crate::dlpack::{export_capsule, wants_versioned, DlDevice, DlDtype, TensorDesc};

const KDL_CPU: i32 = 1;
const KDL_CUDA: i32 = 2;

/// A zero-copy view of one layer's K/V memory (`KvCache.kv_view(layer)`): DLPack
/// (`torch.from_dlpack`, `np.from_dlpack`) over the engine's own memory, kept alive while
/// the view is.
#[pyclass(frozen, name = "KvView", module = "ferrumkv._core")]
pub struct PyKvView {
    memory: Memory,
    view: LayerView,
    dtype: DType,
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
    /// A view of `view` in `memory`; refuses (an internal error) a view that reaches past
    /// the end of the memory, so no export can describe bytes outside the tier.
    pub fn new(memory: Memory, view: LayerView, dtype: DType) -> PyResult<Self> {
        match view.end_byte(dtype.itemsize()) {
            Some(end) if end <= memory.len() => Ok(PyKvView {
                memory,
                view,
                dtype,
            }),
            end => Err(PyRuntimeError::new_err(format!(
                "internal error: a layer view ending at byte {end:?} of a {}-byte tier",
                memory.len()
            ))),
        }
    }

    /// Address of element `[0, 0, 0, 0, 0]` as an integer (a device address on a GPU).
    fn data_addr(&self) -> usize {
        let off = self.view.byte_offset;
        match &self.memory {
            Memory::Host(s) => s.as_ptr() as usize + off,
            Memory::Pinned(_, s) => s.as_ptr() as usize + off,
            // CUDA device addresses are 64-bit, as is every supported host.
            Memory::Cuda(_, s) => (s.device_ptr() + off as u64) as usize,
        }
    }

    /// The pointer a DLPack consumer gets for element `[0, 0, 0, 0, 0]`; never dereferenced
    /// here. `byte_offset` is inside the memory (`new`), so the host pointers stay inside
    /// their slab.
    fn data_ptr_for_export(&self) -> *mut u8 {
        let off = self.view.byte_offset;
        match &self.memory {
            Memory::Host(s) => s.as_ptr().wrapping_add(off),
            Memory::Pinned(_, s) => s.as_ptr().wrapping_add(off),
            Memory::Cuda(..) => std::ptr::without_provenance_mut(self.data_addr()),
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

    /// Element type, as `CacheConfig.dtype`.
    #[getter]
    fn dtype(&self) -> &'static str {
        self.dtype.name()
    }

    /// Address of element `[0, 0, 0, 0, 0]` (a device pointer on a GPU).
    #[getter]
    fn data_ptr(&self) -> usize {
        self.data_addr()
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
            // The capsule keeps the memory alive through the owner below.
            data: self.data_ptr_for_export(),
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
