//! The CUDA device tier: the device, its memory, pinned host memory and the copy engine.
//!
//! Design:
//! - [`CudaDevice`] is opened once per engine. It retains the device's **primary** context
//!   through cudarc (the context torch uses, so DLPack views and torch kernels share one
//!   address space) and creates one non-blocking **copy stream** for every block copy of the
//!   engine, so copies run in the order the engine issues them (a stream is FIFO). The
//!   consumer's **compute stream** (a `CUstream` handle, `set_compute_stream`; by default
//!   the legacy default stream, torch's default) is where its kernels read and write K/V.
//! - [`DeviceSlab`] is one `cuMemAlloc` allocation holding a tier's blocks, zeroed at
//!   creation. [`PinnedSlab`] is one `cuMemHostAlloc(PORTABLE)` allocation: page-locked, so
//!   async copies run at full bus speed, and cached (not write-combined like cudarc's
//!   `alloc_pinned`), so the CPU reads it at full speed too.
//! - A copy ([`CudaDevice::copy_d2h`], [`CudaDevice::copy_h2d`], [`CudaDevice::copy_d2d`])
//!   enqueues one async memcpy per byte run through the protocol of `storage::order`: the
//!   copy stream first waits on an event of the compute stream, and the compute stream then
//!   waits on the batch's end event. It returns a [`CopyBatch`] at once; nobody has to wait
//!   for it to order the bytes (swaps wait, off the lock, to time and settle themselves).
//!
//! Ownership: every slab, stream and event holds an `Arc` of the cudarc context, so the
//! context outlives all of them; the slabs are raw memory like `HostSlab` (no Rust reference
//! to their bytes is ever handed out; every CPU access is a bounds-checked raw copy).
//! DLPack views hold an `Arc` of the slab they expose, so the memory outlives every view.
//!
//! Invariants:
//! - A slab's memory is valid from `new` until `Drop`. `Drop` synchronizes the context
//!   before freeing, so no copy or consumer kernel already enqueued can touch freed memory.
//! - Every run of a copy is bounds-checked against both slabs before anything is enqueued;
//!   a rejected batch enqueues nothing. If the driver fails midway, the copy stream is
//!   synchronized before the error returns, so no copy of a failed batch is left running.
//! - A block a copy reads or writes may be handed out again as soon as the copy is enqueued:
//!   a kernel that reuses it runs after the copy (the compute stream waits on its end
//!   event), a later copy runs after it (FIFO), and the CPU touches tier memory only after
//!   `host_access` waited for both streams (`write_sync`, `read_sync`, and
//!   `Memory::read` / `Memory::write` of pinned memory).
//! - External consumers that read device memory on a stream of their own (a DLPack
//!   consumer's `stream`) call [`CudaDevice::make_stream_wait`] first.
//! - An asynchronous copy that failed shows in the latest batch's end event:
//!   [`CudaDevice::poll`] reports it (the engine polls at every commit and stops serving).
//!
//! Errors: without a driver, with an ordinal out of range or when the driver fails, every
//! constructor returns `Error::CudaUnavailable` with the reason and never panics (libcuda is
//! loaded lazily by cudarc, which panics on a missing library or symbol, so `open` runs under
//! `catch_unwind`). A slab the driver cannot allocate for lack of memory is
//! `Error::OutOfMemory` instead. Driver failures after construction (a failed copy, a lost
//! context) are `Error::Cuda`, naming the call; bad runs or offsets are
//! `Error::InvalidArgument`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

use super::order::{self, Streams};
use super::raw::RawBytes;
use crate::error::{Error, Result};

/// One `(src_off, dst_off, len)` byte run of a copy.
pub type Run = (usize, usize, usize);

/// A driver call that failed after construction: a device fault (`Error::Cuda`).
fn driver_err(what: &str, e: DriverError) -> Error {
    Error::Cuda(format!("{what} failed: {e}"))
}

/// A driver call that failed while opening the device: no usable GPU.
fn open_err(what: &str, e: DriverError) -> Error {
    Error::CudaUnavailable(format!("{what} failed: {e}"))
}

/// A slab allocation's failure: `Error::OutOfMemory` when the driver is out of memory (the
/// tier is too large for the memory left), else `Error::CudaUnavailable`.
fn alloc_err(what: String, e: DriverError) -> Error {
    if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory(format!("{what}: {e}"))
    } else {
        Error::CudaUnavailable(format!("{what}: {e}"))
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// The engine's handle on one GPU: the primary context, the copy stream and the consumer's
/// compute stream.
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    ordinal: u32,
    name: String,
    /// Every block copy of the engine, in issue order.
    copy: Arc<CudaStream>,
    /// The consumer's compute stream, a `CUstream` handle (0: the legacy default stream).
    compute: AtomicU64,
    /// The end event of the latest copy batch (polled for asynchronous failures).
    last: Mutex<Option<Arc<CudaEvent>>>,
}

/// The protocol's primitives on this device (see `storage::order`), for one call.
struct Fences<'a> {
    dev: &'a CudaDevice,
    /// The compute stream, borrowed.
    compute: Arc<CudaStream>,
}

/// Fence events sleep in the driver when the CPU waits on them (`host_access`).
const FENCE: Option<sys::CUevent_flags> = Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC);

impl Streams for Fences<'_> {
    type Event = CudaEvent;

    fn record_compute(&self) -> Result<CudaEvent> {
        self.compute
            .record_event(FENCE)
            .map_err(|e| driver_err("recording an event on the compute stream", e))
    }

    fn record_copy(&self) -> Result<CudaEvent> {
        self.dev
            .copy
            .record_event(FENCE)
            .map_err(|e| driver_err("recording an event on the copy stream", e))
    }

    fn copy_waits(&self, e: &CudaEvent) -> Result<()> {
        self.dev
            .copy
            .wait(e)
            .map_err(|e| driver_err("cuStreamWaitEvent (copy stream)", e))
    }

    fn compute_waits(&self, e: &CudaEvent) -> Result<()> {
        self.compute
            .wait(e)
            .map_err(|e| driver_err("cuStreamWaitEvent (compute stream)", e))
    }

    fn cpu_waits(&self, e: &CudaEvent) -> Result<()> {
        e.synchronize()
            .map_err(|e| driver_err("cuEventSynchronize", e))
    }
}

impl CudaDevice {
    /// Probes libcuda (catch_unwind), creates the context for `ordinal`; every failure ->
    /// `Error::CudaUnavailable(reason)` (no driver, ordinal out of range with the device
    /// count, init failure).
    pub fn open(ordinal: u32) -> Result<Self> {
        if !crate::cuda::driver_present() {
            return Err(Error::CudaUnavailable(format!(
                "cuda:{ordinal} requested but the CUDA driver library (libcuda.so) cannot be \
                 loaded: no NVIDIA driver is installed on this machine"
            )));
        }
        match catch_unwind(AssertUnwindSafe(|| Self::open_inner(ordinal))) {
            Ok(r) => r,
            Err(p) => Err(Error::CudaUnavailable(format!(
                "cuda:{ordinal}: the CUDA driver could not be used: {}",
                panic_message(p.as_ref())
            ))),
        }
    }

    fn open_inner(ordinal: u32) -> Result<Self> {
        result::init().map_err(|e| {
            Error::CudaUnavailable(format!(
                "cuda:{ordinal}: cuInit failed: {e} (is the NVIDIA driver loaded and a GPU visible?)"
            ))
        })?;
        let count = result::device::get_count()
            .map_err(|e| open_err(&format!("cuda:{ordinal}: cuDeviceGetCount"), e))?;
        let count = u32::try_from(count).unwrap_or(0);
        if ordinal >= count {
            return Err(Error::CudaUnavailable(format!(
                "cuda:{ordinal}: device ordinal out of range: this machine has {count} CUDA \
                 device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal as usize)
            .map_err(|e| open_err(&format!("cuda:{ordinal}: retaining the primary context"), e))?;
        let name = ctx.name().unwrap_or_else(|_| format!("cuda:{ordinal}"));
        let copy = ctx
            .new_stream()
            .map_err(|e| open_err(&format!("cuda:{ordinal}: creating the copy stream"), e))?;
        Ok(CudaDevice {
            ctx,
            ordinal,
            name,
            copy,
            compute: AtomicU64::new(0),
            last: Mutex::new(None),
        })
    }

    /// Orders every later copy against the consumer's kernels on `stream` (a `CUstream`
    /// handle; 0 or 1: the legacy default stream, 2: the per-thread default stream).
    ///
    /// The handle cannot be checked (querying a bad one is itself undefined): it must be a
    /// stream of this device's primary context that stays alive while it is set (torch's
    /// pooled streams live as long as the process). Set 0 before destroying it.
    pub fn set_compute_stream(&self, stream: u64) {
        self.compute.store(stream, Ordering::SeqCst);
    }

    /// The compute stream's handle (see `set_compute_stream`).
    pub fn compute_stream(&self) -> u64 {
        self.compute.load(Ordering::SeqCst)
    }

    fn fences(&self) -> Fences<'_> {
        let handle = self.compute_stream();
        // SAFETY: the handle is the consumer's compute stream (`set_compute_stream`): by its
        // contract a live stream of this device's primary context, or one of the special
        // handles 0, 1, 2, alive while set. The wrapper is borrowed: dropping it at the end
        // of the call does not destroy the stream.
        let compute = unsafe {
            self.ctx
                .wrap_borrowed_stream(handle as usize as sys::CUstream)
        };
        Fences { dev: self, compute }
    }

    /// Returns once every kernel on the compute stream and every copy enqueued so far has
    /// finished: the CPU may then read or write any block (`storage::order`, step 4).
    pub fn host_access(&self) -> Result<()> {
        self.bind()?;
        order::host_access(&self.fences())
    }

    /// An asynchronous failure of the copies enqueued so far (`Error::Cuda`), if the driver
    /// reports one; `Ok` while they run or once they succeeded. Never blocks.
    pub fn poll(&self) -> Result<()> {
        let mut last = self.last.lock();
        let Some(end) = last.as_ref() else {
            return Ok(());
        };
        match end.try_is_complete() {
            Ok(true) => {
                *last = None;
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => Err(driver_err("an asynchronous block copy", e)),
        }
    }

    /// The device name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> String {
        self.name.clone()
    }

    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_err("binding the CUDA context", e))
    }

    fn check_slab(&self, slab: &DeviceSlab) -> Result<()> {
        if *slab.ctx != *self.ctx {
            return Err(Error::InvalidArgument(format!(
                "device slab belongs to cuda:{}, not cuda:{}",
                slab.ctx.ordinal(),
                self.ordinal
            )));
        }
        Ok(())
    }

    /// Enqueues `cuMemcpyDtoHAsync` for each `(src_off, dst_off, len)` run from `src` to
    /// `dst` on the copy stream, ordered against the compute stream.
    pub fn copy_d2h(&self, src: &DeviceSlab, dst: &PinnedSlab, runs: &[Run]) -> Result<CopyBatch> {
        self.check_slab(src)?;
        check_runs(src.len, dst.len(), runs, false)?;
        let (s, d) = (src.ptr, dst.as_ptr());
        self.enqueue(
            Direction::DeviceToHost,
            runs,
            "cuMemcpyDtoHAsync",
            |stream, (so, doff, n)| {
                // SAFETY: `check_runs` proved both ranges lie inside their allocations,
                // which stay valid until their `Drop`, and `Drop` synchronizes the context
                // before freeing, so the copy never outlives the memory. The DMA writes into
                // pinned memory that Rust reaches only through `RawBytes` raw copies (never
                // a reference), and those run only after `host_access` waited for the copy
                // stream (module invariants); `d.add(doff)` stays in bounds.
                unsafe {
                    sys::cuMemcpyDtoHAsync_v2(d.add(doff).cast(), s + so as u64, n, stream).result()
                }
            },
        )
    }

    /// Enqueues `cuMemcpyHtoDAsync` for each `(src_off, dst_off, len)` run from `src` to
    /// `dst` on the copy stream, ordered against the compute stream.
    pub fn copy_h2d(&self, src: &PinnedSlab, dst: &DeviceSlab, runs: &[Run]) -> Result<CopyBatch> {
        self.check_slab(dst)?;
        check_runs(src.len(), dst.len, runs, false)?;
        let (s, d) = (src.as_ptr(), dst.ptr);
        self.enqueue(
            Direction::HostToDevice,
            runs,
            "cuMemcpyHtoDAsync",
            |stream, (so, doff, n)| {
                // SAFETY: as in `copy_d2h`: both ranges are in bounds of live allocations
                // that are only freed after a context synchronize; the DMA reads pinned
                // memory that no Rust reference covers (`s.add(so)` stays in bounds).
                unsafe {
                    sys::cuMemcpyHtoDAsync_v2(d + doff as u64, s.add(so).cast(), n, stream).result()
                }
            },
        )
    }

    /// Enqueues `cuMemcpyDtoDAsync` for each `(src_off, dst_off, len)` run inside `slab` on
    /// the copy stream, ordered against the compute stream. A run's source and destination
    /// must not overlap.
    pub fn copy_d2d(&self, slab: &DeviceSlab, runs: &[Run]) -> Result<CopyBatch> {
        self.check_slab(slab)?;
        check_runs(slab.len, slab.len, runs, true)?;
        let base = slab.ptr;
        self.enqueue(
            Direction::DeviceToDevice,
            runs,
            "cuMemcpyDtoDAsync",
            |stream, (so, doff, n)| {
                // SAFETY: both ranges are in bounds of the live slab (freed only after a
                // context synchronize) and do not overlap (checked by `check_runs`).
                unsafe {
                    sys::cuMemcpyDtoDAsync_v2(base + doff as u64, base + so as u64, n, stream)
                        .result()
                }
            },
        )
    }

    /// Enqueues every non-empty run with `op` on the copy stream between the fences of
    /// `storage::order` and a start event (for timing). On a failure after the first copy,
    /// synchronizes the copy stream before returning.
    fn enqueue(
        &self,
        direction: Direction,
        runs: &[Run],
        what: &str,
        op: impl Fn(sys::CUstream, Run) -> std::result::Result<(), DriverError>,
    ) -> Result<CopyBatch> {
        self.bind()?;
        let fences = self.fences();
        let enqueued = order::copy_batch(&fences, || {
            let start = self
                .copy
                .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| driver_err("recording a copy start event", e))?;
            let mut bytes = 0usize;
            for &(so, doff, n) in runs {
                if n == 0 {
                    continue;
                }
                op(self.copy.cu_stream(), (so, doff, n)).map_err(|e| driver_err(what, e))?;
                bytes += n;
            }
            Ok((start, bytes))
        });
        match enqueued {
            Ok(((start, bytes), end)) => {
                let end = Arc::new(end);
                *self.last.lock() = Some(end.clone());
                Ok(CopyBatch {
                    start,
                    end,
                    direction,
                    bytes,
                })
            }
            Err(e) => {
                // Leave no copy of a failed batch running: the caller reuses its blocks.
                let _ = self.copy.synchronize();
                Err(e)
            }
        }
    }

    /// Makes an external stream (a `CUstream` handle given as `u64` by a DLPack consumer
    /// such as torch; 0, 1 = legacy default and 2 = per-thread default are valid) wait on
    /// every copy enqueued so far (`cuStreamWaitEvent`), so a consumer on a stream other
    /// than the compute stream never reads a block whose copy is still running. Does not
    /// block the CPU.
    pub fn make_stream_wait(&self, stream: u64) -> Result<()> {
        self.bind()?;
        // SAFETY: the handle is whatever the DLPack consumer passed as `stream`; a raw
        // `CUstream` cannot be validated (querying a bad one is itself undefined), so this
        // relies on the DLPack contract, as every producer does (torch, cupy): the consumer
        // passes 0, 1 (legacy default), 2 (per-thread default) or a live stream of this
        // device's context (torch passes its current stream of the primary context, ours),
        // alive for this call. The wrapper is borrowed, not owned: dropping it, before this
        // function returns, does not destroy the stream.
        let foreign = unsafe {
            self.ctx
                .wrap_borrowed_stream(stream as usize as sys::CUstream)
        };
        let ev = self
            .copy
            .record_event(None)
            .map_err(|e| driver_err("recording a stream-wait event", e))?;
        // The wait captures the event's state now; destroying `ev` afterwards is allowed.
        foreign
            .wait(&ev)
            .map_err(|e| driver_err("cuStreamWaitEvent", e))
    }

    /// Copies host bytes into device memory synchronously (for `write_kv`), after every
    /// kernel and copy enqueued so far (`host_access`).
    pub fn write_sync(&self, dst: &DeviceSlab, off: usize, src: &[u8]) -> Result<()> {
        self.check_slab(dst)?;
        check_range(dst.len, off, src.len(), "write")?;
        if src.is_empty() {
            return Ok(());
        }
        self.host_access()?;
        // SAFETY: the destination range is in bounds of the live slab; `src` is a valid
        // slice for the whole (synchronous) call.
        unsafe {
            sys::cuMemcpyHtoD_v2(dst.ptr + off as u64, src.as_ptr().cast(), src.len()).result()
        }
        .map_err(|e| driver_err("cuMemcpyHtoD", e))
    }

    /// Copies device bytes out synchronously (for `read_kv`), after every kernel and copy
    /// enqueued so far (`host_access`).
    pub fn read_sync(&self, src: &DeviceSlab, off: usize, dst: &mut [u8]) -> Result<()> {
        self.check_slab(src)?;
        check_range(src.len, off, dst.len(), "read")?;
        if dst.is_empty() {
            return Ok(());
        }
        self.host_access()?;
        // SAFETY: the source range is in bounds of the live slab; `dst` is a valid, exclusive
        // slice for the whole (synchronous) call.
        unsafe {
            sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), src.ptr + off as u64, dst.len()).result()
        }
        .map_err(|e| driver_err("cuMemcpyDtoH", e))
    }
}

fn check_range(len: usize, off: usize, n: usize, what: &str) -> Result<()> {
    if off.checked_add(n).is_some_and(|e| e <= len) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "device slab {what} out of bounds: {n} bytes at offset {off} of a {len}-byte slab"
        )))
    }
}

/// Checks every run against both slab lengths (and, within one slab, that a run's source
/// and destination do not overlap) before anything is enqueued.
fn check_runs(src_len: usize, dst_len: usize, runs: &[Run], same_slab: bool) -> Result<()> {
    for &(s, d, n) in runs {
        let src_ok = s.checked_add(n).is_some_and(|e| e <= src_len);
        let dst_ok = d.checked_add(n).is_some_and(|e| e <= dst_len);
        if !src_ok || !dst_ok {
            return Err(Error::InvalidArgument(format!(
                "copy run ({s}, {d}, {n}) out of bounds: source {src_len} bytes, destination \
                 {dst_len} bytes"
            )));
        }
        if same_slab && n > 0 && s < d + n && d < s + n {
            return Err(Error::InvalidArgument(format!(
                "copy run ({s}, {d}, {n}): source and destination overlap"
            )));
        }
    }
    Ok(())
}

/// Device memory of one tier: `len` bytes allocated with `cuMemAlloc`, zeroed at creation.
#[derive(Debug)]
pub struct DeviceSlab {
    ptr: sys::CUdeviceptr,
    len: usize,
    /// Keeps the context (and so the allocation's address space) alive.
    ctx: Arc<CudaContext>,
}

// Send + Sync come from the fields: a `CUdeviceptr` is a plain u64 address and the context
// is thread safe. The slab offers no Rust reference to its bytes.

impl DeviceSlab {
    pub fn new(dev: &CudaDevice, len: usize) -> Result<Self> {
        let size = len.max(1);
        dev.bind()?;
        // SAFETY: the device's context is current on this thread; the memory is zeroed below
        // before anyone can read it.
        let ptr = unsafe { result::malloc_sync(size) }.map_err(|e| {
            alloc_err(
                format!(
                    "cannot allocate {len} bytes on cuda:{}: cuMemAlloc failed",
                    dev.ordinal
                ),
                e,
            )
        })?;
        // SAFETY: `ptr` was just allocated with `size` bytes in the current context.
        if let Err(e) = unsafe { result::memset_d8_sync(ptr, 0, size) } {
            // SAFETY: allocated above with `cuMemAlloc`, freed once, never handed out.
            let _ = unsafe { result::free_sync(ptr) };
            return Err(open_err("zeroing a device slab (cuMemsetD8)", e));
        }
        Ok(DeviceSlab {
            ptr,
            len,
            ctx: dev.ctx.clone(),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `CUdeviceptr` of byte 0 (for DLPack `kDLCUDA` views).
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for DeviceSlab {
    fn drop(&mut self) {
        // Wait for every copy and consumer kernel that may still touch the memory.
        self.ctx.record_err(self.ctx.synchronize());
        // SAFETY: allocated in `new` with `cuMemAlloc` and not yet freed; the context is
        // current (bound by `synchronize`) and idle.
        self.ctx.record_err(unsafe { result::free_sync(self.ptr) });
    }
}

/// Pinned host memory (`cuMemHostAlloc` with `CU_MEMHOSTALLOC_PORTABLE`): page-locked,
/// cached, so CPU reads run at full speed; zeroed at creation.
#[derive(Debug)]
pub struct PinnedSlab {
    /// Page-locked, portable across contexts; CPU access through bounds-checked raw copies,
    /// device access ordered by copy batches' events.
    raw: RawBytes,
    /// Keeps the driver context alive until the memory is freed.
    ctx: Arc<CudaContext>,
}

impl std::ops::Deref for PinnedSlab {
    type Target = RawBytes;

    fn deref(&self) -> &RawBytes {
        &self.raw
    }
}

impl PinnedSlab {
    pub fn new(dev: &CudaDevice, len: usize) -> Result<Self> {
        let size = len.max(1);
        dev.bind()?;
        // SAFETY: the device's context is current on this thread; the memory is zeroed below
        // before anyone can read it.
        let raw =
            unsafe { result::malloc_host(size, sys::CU_MEMHOSTALLOC_PORTABLE) }.map_err(|e| {
                alloc_err(
                    format!(
                        "cannot allocate {len} bytes of pinned host memory: cuMemHostAlloc failed"
                    ),
                    e,
                )
            })?;
        let Some(ptr) = NonNull::new(raw.cast::<u8>()) else {
            return Err(Error::OutOfMemory(format!(
                "cannot allocate {len} bytes of pinned host memory: cuMemHostAlloc returned null"
            )));
        };
        // SAFETY: `ptr` is valid for `size` freshly allocated bytes that nothing else sees.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, size) };
        Ok(PinnedSlab {
            // SAFETY: `ptr` is valid for `size >= len` bytes until `Drop` frees it; no
            // references to them are handed out.
            raw: unsafe { RawBytes::new(ptr, len) },
            ctx: dev.ctx.clone(),
        })
    }
}

impl Drop for PinnedSlab {
    fn drop(&mut self) {
        // Wait for every async copy that may still read or write the memory.
        self.ctx.record_err(self.ctx.synchronize());
        // SAFETY: allocated in `new` with `cuMemHostAlloc`, non-null, not yet freed, and no
        // copy is pending after the synchronize above.
        self.ctx
            .record_err(unsafe { result::free_host(self.raw.as_ptr().cast()) });
    }
}

/// Direction of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    DeviceToHost,
    HostToDevice,
    DeviceToDevice,
}

/// A batch of byte runs copied asynchronously on the copy stream, bracketed by a start and
/// an end event (both with timing). Dropping the batch does not cancel or wait for its
/// copies: they are ordered already (see the module header).
#[derive(Debug)]
pub struct CopyBatch {
    start: CudaEvent,
    end: Arc<CudaEvent>,
    direction: Direction,
    bytes: usize,
}

impl CopyBatch {
    /// Whether every copy of the batch has finished (`cuEventQuery`). Also true when the
    /// driver reports an error for them (they will never finish); `wait` returns that error.
    pub fn is_done(&self) -> bool {
        !matches!(self.end.try_is_complete(), Ok(false))
    }

    /// Blocks until every copy of the batch has finished (`cuEventSynchronize`; the event
    /// sleeps rather than spins). Called on engine worker threads, never the event loop.
    pub fn wait(&self) -> Result<()> {
        self.end
            .synchronize()
            .map_err(|e| driver_err("cuEventSynchronize on a copy batch", e))
    }

    /// Seconds the GPU spent between the batch's start and end events, once done; `None`
    /// while the copies run or if the driver cannot time them.
    pub fn seconds(&self) -> Option<f64> {
        if !matches!(self.end.try_is_complete(), Ok(true)) {
            return None;
        }
        self.start
            .elapsed_ms(&self.end)
            .ok()
            .map(|ms| f64::from(ms) / 1e3)
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// Bytes the batch copies (sum of its runs).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_without_driver_fails_cleanly() {
        if crate::cuda::driver_present() {
            let e = CudaDevice::open(9999).unwrap_err();
            match e {
                Error::CudaUnavailable(msg) => {
                    assert!(msg.contains("9999"), "{msg}");
                    // Either the ordinal check or cuInit (driver without a usable GPU).
                    assert!(
                        msg.contains("out of range") || msg.contains("cuInit"),
                        "{msg}"
                    );
                }
                other => panic!("expected CudaUnavailable, got {other:?}"),
            }
        } else {
            match CudaDevice::open(0) {
                Err(Error::CudaUnavailable(msg)) => {
                    assert!(msg.contains("cuda:0"), "{msg}");
                    assert!(msg.contains("libcuda"), "{msg}");
                }
                Err(other) => panic!("expected CudaUnavailable, got {other:?}"),
                Ok(_) => panic!("open succeeded without a driver"),
            }
        }
    }

    #[test]
    fn runs_are_checked_before_enqueueing() {
        assert!(check_runs(64, 32, &[(0, 0, 32), (32, 0, 32), (10, 5, 0)], false).is_ok());
        let oob = check_runs(64, 32, &[(0, 0, 16), (40, 0, 32)], false);
        assert!(matches!(oob, Err(Error::InvalidArgument(_))), "{oob:?}");
        let oob = check_runs(64, 32, &[(0, 1, 32)], false);
        assert!(matches!(oob, Err(Error::InvalidArgument(_))), "{oob:?}");
        let wrap = check_runs(64, 64, &[(usize::MAX, 0, 2)], false);
        assert!(matches!(wrap, Err(Error::InvalidArgument(_))), "{wrap:?}");
        // Within one slab: disjoint runs pass, overlapping ones are refused.
        assert!(check_runs(64, 64, &[(0, 32, 32), (32, 0, 16)], true).is_ok());
        let overlap = check_runs(64, 64, &[(0, 16, 32)], true);
        assert!(
            matches!(overlap, Err(Error::InvalidArgument(_))),
            "{overlap:?}"
        );
        assert!(check_range(8, 4, 4, "read").is_ok());
        assert!(check_range(8, 5, 4, "read").is_err());
    }

    /// Deterministic pseudo-random bytes (xorshift64*), no extra dependency.
    fn random_bytes(n: usize, mut seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            out.extend_from_slice(&seed.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        out.truncate(n);
        out
    }

    fn gpu() -> CudaDevice {
        CudaDevice::open(0).expect("this test needs a CUDA GPU")
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_slabs_allocate_zeroed() {
        let dev = gpu();
        assert_eq!(dev.ordinal(), 0);
        assert!(!dev.name().is_empty());
        let d = DeviceSlab::new(&dev, 1 << 20).unwrap();
        assert_eq!(d.len(), 1 << 20);
        assert_ne!(d.device_ptr(), 0);
        let mut out = vec![7u8; 1 << 20];
        dev.read_sync(&d, 0, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0), "device slab starts zeroed");
        let p = PinnedSlab::new(&dev, 1 << 20).unwrap();
        assert_eq!(p.len(), 1 << 20);
        assert!(!p.as_ptr().is_null());
        let mut out = vec![7u8; 4096];
        p.read((1 << 20) - 4096, &mut out);
        assert!(out.iter().all(|&b| b == 0), "pinned slab starts zeroed");
        // Zero-length slabs are valid too.
        assert!(DeviceSlab::new(&dev, 0).unwrap().is_empty());
        assert!(PinnedSlab::new(&dev, 0).unwrap().is_empty());
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_sync_round_trip_and_bounds() {
        let dev = gpu();
        let d = DeviceSlab::new(&dev, 8192).unwrap();
        let data = random_bytes(3000, 1);
        dev.write_sync(&d, 1000, &data).unwrap();
        let mut out = vec![0u8; 3000];
        dev.read_sync(&d, 1000, &mut out).unwrap();
        assert_eq!(out, data);
        let mut edge = [9u8; 4];
        dev.read_sync(&d, 996, &mut edge).unwrap();
        assert_eq!(edge, [0; 4], "bytes before the write are untouched");
        assert!(matches!(
            dev.write_sync(&d, 8000, &data),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            dev.read_sync(&d, 8192, &mut out),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_d2h_then_h2d_round_trip() {
        let dev = gpu();
        let block = 64 << 10;
        let blocks = 16;
        let src = DeviceSlab::new(&dev, block * blocks).unwrap();
        let host = PinnedSlab::new(&dev, block * blocks).unwrap();
        let dst = DeviceSlab::new(&dev, block * blocks).unwrap();
        let data = random_bytes(block * blocks, 42);
        dev.write_sync(&src, 0, &data).unwrap();

        // Offload: a coalesced run of blocks 0..4 to host 8..12, and block 9 to host 0.
        let runs = [(0, 8 * block, 4 * block), (9 * block, 0, block)];
        let b = dev.copy_d2h(&src, &host, &runs).unwrap();
        assert_eq!(b.direction(), Direction::DeviceToHost);
        assert_eq!(b.bytes(), 5 * block);
        while !b.is_done() {
            std::thread::yield_now();
        }
        b.wait().unwrap();
        let secs = b.seconds().expect("a finished batch is timed");
        assert!(secs >= 0.0, "{secs}");
        let mut out = vec![0u8; 4 * block];
        host.read(8 * block, &mut out);
        assert_eq!(out, data[..4 * block]);
        let mut one = vec![0u8; block];
        host.read(0, &mut one);
        assert_eq!(one, data[9 * block..10 * block]);

        // Onboard: bring both back into another device slab at new places.
        let runs = [(8 * block, 2 * block, 4 * block), (0, 12 * block, block)];
        let b = dev.copy_h2d(&host, &dst, &runs).unwrap();
        assert_eq!(b.direction(), Direction::HostToDevice);
        b.wait().unwrap();
        assert!(b.is_done());
        assert!(b.seconds().is_some());
        let mut back = vec![0u8; block * blocks];
        dev.read_sync(&dst, 0, &mut back).unwrap();
        assert_eq!(back[2 * block..6 * block], data[..4 * block]);
        assert_eq!(back[12 * block..13 * block], data[9 * block..10 * block]);
        assert!(back[..2 * block].iter().all(|&x| x == 0));

        // A whole-slab round trip of random bytes equals the input.
        let all = [(0, 0, block * blocks)];
        dev.copy_d2h(&src, &host, &all).unwrap().wait().unwrap();
        dev.copy_h2d(&host, &dst, &all).unwrap().wait().unwrap();
        dev.read_sync(&dst, 0, &mut back).unwrap();
        assert_eq!(back, data);

        // Consumers can wait on the copies (null, legacy and per-thread default streams).
        for s in [0u64, 1, 2] {
            dev.make_stream_wait(s).unwrap();
        }

        // A bad run is refused before anything is enqueued.
        let bad = dev.copy_h2d(&host, &dst, &[(0, block * blocks - 1, 2)]);
        assert!(matches!(bad, Err(Error::InvalidArgument(_))), "{bad:?}");
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_d2d_copies() {
        let dev = gpu();
        let block = 4096;
        let slab = DeviceSlab::new(&dev, block * 8).unwrap();
        let data = random_bytes(2 * block, 7);
        dev.write_sync(&slab, 0, &data).unwrap();
        let b = dev
            .copy_d2d(&slab, &[(0, 5 * block, block), (block, 3 * block, block)])
            .unwrap();
        assert_eq!(b.direction(), Direction::DeviceToDevice);
        b.wait().unwrap();
        assert!(b.is_done());
        assert!(b.seconds().is_some());
        let mut out = vec![0u8; block];
        dev.read_sync(&slab, 5 * block, &mut out).unwrap();
        assert_eq!(out, data[..block]);
        dev.read_sync(&slab, 3 * block, &mut out).unwrap();
        assert_eq!(out, data[block..]);
        let overlap = dev.copy_d2d(&slab, &[(0, block / 2, block)]);
        assert!(
            matches!(overlap, Err(Error::InvalidArgument(_))),
            "{overlap:?}"
        );
    }
}
