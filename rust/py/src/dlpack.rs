//! Hand-written DLPack exporter (no external dlpack crate).
//!
//! Design: the C structs of `dlpack.h` v1.0 are mirrored below with `#[repr(C)]`.
//! [`export_capsule`] moves everything one export needs into one heap block, a
//! `Ctx<M>` (`M` = `DLManagedTensor` or `DLManagedTensorVersioned`), whose first
//! field is the managed tensor itself; the capsule's pointer is that block.
//!
//! Ownership: the block owns the caller's `owner` (which keeps the memory at
//! `data` alive) and the `shape` / `strides` arrays the `DLTensor` points into.
//! It is freed exactly once, by the managed tensor's `deleter`, called either
//! by the consumer (which renamed the capsule to `used_dltensor[_versioned]`
//! and took over the tensor) or by the capsule destructor when the capsule
//! dies unconsumed. If `PyCapsule_New` fails, the block is freed here.
//!
//! Invariants:
//! - `Ctx<M>` is `#[repr(C)]` with `managed` first, so a `*mut M` handed to the
//!   deleter is also the `*mut Ctx<M>` produced by `Box::into_raw`;
//!   `manager_ctx` holds the same address.
//! - `shape` and `strides` have `ndim` entries each (strides in elements),
//!   `byte_offset` is 0, `dtype.lanes` is 1; their heap buffers never move.
//! - The deleter may run on any thread without the GIL (hence `owner: Send`).
//! - No panic crosses the FFI boundary: callbacks catch unwinds, and a
//!   panicking `owner` drop is swallowed (its memory may then leak).
//! - Legacy `DLManagedTensor` has no flags field, so `read_only` only has an
//!   effect on the versioned path.

use std::any::Any;
use std::ffi::{c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::null_mut;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::{ffi, Bound};

/// Device a tensor lives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DlDevice {
    /// Host memory (`kDLCPU = 1`).
    Cpu,
    /// CUDA device memory on the given ordinal (`kDLCUDA = 2`).
    Cuda(i32),
}

/// Element type (`lanes` is always 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DlDtype {
    /// `DLDataTypeCode`.
    pub code: u8,
    /// Bits per element.
    pub bits: u8,
}

impl DlDtype {
    /// `kDLFloat`, 16 bits.
    pub const F16: Self = Self { code: 2, bits: 16 };
    /// `kDLBfloat`, 16 bits.
    pub const BF16: Self = Self { code: 4, bits: 16 };
    /// `kDLFloat`, 32 bits.
    pub const F32: Self = Self { code: 2, bits: 32 };
    /// `kDLUInt`, 8 bits.
    pub const U8: Self = Self { code: 1, bits: 8 };
}

/// One strided view to export.
pub struct TensorDesc {
    /// Address of element `[0, 0, ...]` (already offset); exported with `byte_offset = 0`.
    /// Only carried to the consumer, never dereferenced here (on a GPU it is a device
    /// address, not host memory).
    pub data: *mut u8,
    /// Where `data` lives.
    pub device: DlDevice,
    /// Element type.
    pub dtype: DlDtype,
    /// Extent of each dimension.
    pub shape: Vec<i64>,
    /// In elements, not bytes; same length as `shape`.
    pub strides: Vec<i64>,
}

const DLPACK_FLAG_BITMASK_READ_ONLY: u64 = 1;

#[repr(C)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

/// The two managed-tensor flavours, with their capsule names.
trait Managed: Sized + 'static {
    const NAME: &'static CStr;
    const USED_NAME: &'static CStr;
    fn deleter(&self) -> Option<unsafe extern "C" fn(*mut Self)>;
    fn set_manager_ctx(&mut self, ctx: *mut c_void);
}

impl Managed for DLManagedTensor {
    const NAME: &'static CStr = c"dltensor";
    const USED_NAME: &'static CStr = c"used_dltensor";
    fn deleter(&self) -> Option<unsafe extern "C" fn(*mut Self)> {
        self.deleter
    }
    fn set_manager_ctx(&mut self, ctx: *mut c_void) {
        self.manager_ctx = ctx;
    }
}

impl Managed for DLManagedTensorVersioned {
    const NAME: &'static CStr = c"dltensor_versioned";
    const USED_NAME: &'static CStr = c"used_dltensor_versioned";
    fn deleter(&self) -> Option<unsafe extern "C" fn(*mut Self)> {
        self.deleter
    }
    fn set_manager_ctx(&mut self, ctx: *mut c_void) {
        self.manager_ctx = ctx;
    }
}

/// Heap block behind one export; `managed` must stay the first field.
#[repr(C)]
struct Ctx<M> {
    managed: M,
    _shape: Vec<i64>,
    _strides: Vec<i64>,
    _owner: Box<dyn Any + Send>,
}

/// `deleter` of both managed-tensor flavours: frees the whole `Ctx<M>`.
unsafe extern "C" fn delete_ctx<M: Managed>(managed: *mut M) {
    if managed.is_null() {
        return;
    }
    // SAFETY: a non-null `managed` is the first field of a `Ctx<M>` made by
    // `Box::into_raw` in `export_capsule` (repr(C), so same address), and the
    // DLPack contract calls the deleter at most once.
    let ctx = unsafe { Box::from_raw(managed.cast::<Ctx<M>>()) };
    let _ = catch_unwind(AssertUnwindSafe(move || drop(ctx)));
}

/// Capsule destructor: frees the tensor unless a consumer took it over.
unsafe extern "C" fn capsule_destructor<M: Managed>(capsule: *mut ffi::PyObject) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: CPython calls capsule destructors with the GIL held and a
        // live capsule; the names are static NUL-terminated strings. This
        // destructor is installed only on capsules made by `into_capsule`, so a
        // non-null pointer under `M::NAME` is the `Ctx<M>` made there; the name
        // is still `M::NAME` (not `USED_NAME`), so no consumer took the tensor
        // over and its deleter has not run: calling it here is the only free.
        unsafe {
            if ffi::PyCapsule_IsValid(capsule, M::USED_NAME.as_ptr()) == 1 {
                return; // consumed: the consumer owns it and calls the deleter
            }
            let (mut ty, mut val, mut tb) = (null_mut(), null_mut(), null_mut());
            #[allow(deprecated)] // PyErr_GetRaisedException is not in the 3.11 limited API
            ffi::PyErr_Fetch(&raw mut ty, &raw mut val, &raw mut tb);
            let managed = ffi::PyCapsule_GetPointer(capsule, M::NAME.as_ptr()).cast::<M>();
            if managed.is_null() {
                ffi::PyErr_WriteUnraisable(capsule);
            } else if let Some(deleter) = (*managed).deleter() {
                deleter(managed);
            }
            #[allow(deprecated)]
            ffi::PyErr_Restore(ty, val, tb);
        }
    }));
}

/// Boxes `managed` with its arrays and owner, wraps it in a capsule named `M::NAME`.
fn into_capsule<M: Managed>(
    py: Python<'_>,
    managed: M,
    shape: Vec<i64>,
    strides: Vec<i64>,
    owner: Box<dyn Any + Send>,
) -> PyResult<Py<PyAny>> {
    let (_shape, _strides, _owner) = (shape, strides, owner);
    let ctx = Box::into_raw(Box::new(Ctx {
        managed,
        _shape,
        _strides,
        _owner,
    }));
    // SAFETY: `ctx` is a valid, uniquely owned pointer from `Box::into_raw`;
    // the name is static and the destructor matches the pointee type `M`.
    let capsule = unsafe {
        (*ctx).managed.set_manager_ctx(ctx.cast());
        ffi::PyCapsule_New(ctx.cast(), M::NAME.as_ptr(), Some(capsule_destructor::<M>))
    };
    if capsule.is_null() {
        // SAFETY: the capsule was not created, so nobody else holds `ctx`.
        unsafe { delete_ctx::<M>(ctx.cast::<M>()) };
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `capsule` is a new, non-null, owned reference.
    Ok(unsafe { Bound::from_owned_ptr(py, capsule) }.unbind())
}

/// Builds a `PyCapsule` that owns `owner` until the consumer's deleter runs (or the
/// capsule is dropped unconsumed). `versioned = true` -> `DLManagedTensorVersioned`
/// (capsule `"dltensor_versioned"`, version {1, 0}, flags 0 or `READ_ONLY` if `read_only`);
/// false -> legacy `DLManagedTensor` (capsule `"dltensor"`; `read_only` cannot be expressed).
pub fn export_capsule(
    py: Python<'_>,
    desc: TensorDesc,
    owner: Box<dyn Any + Send>,
    versioned: bool,
    read_only: bool,
) -> PyResult<Py<PyAny>> {
    let TensorDesc {
        data,
        device,
        dtype,
        mut shape,
        mut strides,
    } = desc;
    if shape.len() != strides.len() {
        return Err(PyValueError::new_err(
            "dlpack: shape/strides length mismatch",
        ));
    }
    let ndim = i32::try_from(shape.len())
        .map_err(|_| PyValueError::new_err("dlpack: too many dimensions"))?;
    let (device_type, device_id) = match device {
        DlDevice::Cpu => (1, 0),       // kDLCPU
        DlDevice::Cuda(id) => (2, id), // kDLCUDA
    };
    // Vec heap buffers do not move when the Vecs are moved into the Ctx.
    let dl_tensor = DLTensor {
        data: data.cast::<c_void>(),
        device: DLDevice {
            device_type,
            device_id,
        },
        ndim,
        dtype: DLDataType {
            code: dtype.code,
            bits: dtype.bits,
            lanes: 1,
        },
        shape: shape.as_mut_ptr(),
        strides: strides.as_mut_ptr(),
        byte_offset: 0,
    };
    if versioned {
        let managed = DLManagedTensorVersioned {
            version: DLPackVersion { major: 1, minor: 0 },
            manager_ctx: null_mut(),
            deleter: Some(delete_ctx::<DLManagedTensorVersioned>),
            flags: DLPACK_FLAG_BITMASK_READ_ONLY * u64::from(read_only),
            dl_tensor,
        };
        into_capsule(py, managed, shape, strides, owner)
    } else {
        let managed = DLManagedTensor {
            dl_tensor,
            manager_ctx: null_mut(),
            deleter: Some(delete_ctx::<DLManagedTensor>),
        };
        into_capsule(py, managed, shape, strides, owner)
    }
}

/// Chooses `versioned` from the consumer's `max_version` argument of `__dlpack__`:
/// `Some((major, _))` with `major >= 1` -> true, else false.
pub fn wants_versioned(max_version: Option<(u32, u32)>) -> bool {
    matches!(max_version, Some((major, _)) if major >= 1)
}
