//! `RawBytes`: a region of CPU-addressable memory owned by a slab, accessed only through
//! bounds-checked raw copies.
//!
//! Design: slab memory is shared like a GPU buffer. The engine copies blocks in and out under
//! its lock, but it is not the only writer: a DLPack consumer (a numpy array, a torch tensor,
//! a kernel) holds the slab's address and may write any byte at any time, from any thread,
//! with no lock. Nothing makes engine accesses exclusive. So:
//! - No Rust reference (`&[u8]` / `&mut [u8]`) to slab bytes is ever formed or handed out;
//!   nothing in safe code can produce one (`RawBytes` offers only `as_ptr` and copies), so the
//!   slices given to `read` / `write` are always other memory. Every engine access is one
//!   `ptr::copy_nonoverlapping` (or `ptr::copy` within a slab, `storage::copy_runs`) of plain
//!   bytes through the raw pointer, bounds-checked first.
//! - A consumer that writes a block while the engine copies it (the contract is: write only
//!   blocks your sequences own, not while they are swapped, offloaded or read back) races
//!   that copy: the copy may see torn bytes, exactly like a GPU kernel racing a `cudaMemcpy`.
//!   No Rust reference covers the bytes, and no Rust invariant depends on their values, so
//!   the race cannot break aliasing guarantees or engine state; it can only make the copied
//!   K/V data garbage. (It is still a data race in the language's memory model, as with any
//!   memory shared with foreign code; the engine cannot rule it out and does not try to.)
//!
//! Invariant: `ptr` is valid for `len` bytes for as long as the owning slab lives (the slab
//! frees it in its `Drop`, after which no `RawBytes` of it is reachable).

use std::ptr::NonNull;

#[derive(Debug)]
pub struct RawBytes {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the pointer is to plain memory with no thread affinity, valid until the owning
// slab's `Drop`, wherever the slab lives; moving it to another thread changes nothing.
unsafe impl Send for RawBytes {}
// SAFETY: `&RawBytes` offers only the length, the address and bounds-checked raw copies; no
// method forms a reference to the bytes, so concurrent calls (and concurrent foreign writers)
// can at worst race on byte values, as the module header states, never on Rust references.
unsafe impl Sync for RawBytes {}

impl RawBytes {
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes until the owner frees it, and
    /// neither the owner nor anyone else may form Rust references to those bytes (foreign
    /// code may read and write them through the address).
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> Self {
        RawBytes { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base address, for DLPack views and DMA copies.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    #[inline]
    fn check(&self, off: usize, n: usize) {
        assert!(
            off.checked_add(n).is_some_and(|e| e <= self.len),
            "slab access out of bounds"
        );
    }

    /// Copies `src` into the bytes at `off` (panics if out of bounds).
    pub fn write(&self, off: usize, src: &[u8]) {
        self.check(off, src.len());
        // SAFETY: `off..off + len` is in bounds (checked above) of memory valid until the
        // slab's `Drop`, which cannot run while `&self` lives. `src` is a Rust slice, so it
        // is not slab memory (no reference to slab bytes exists) and cannot overlap. Foreign
        // writers racing this copy can only tear the bytes (module header).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len());
        }
    }

    /// Copies the bytes at `off` into `dst` (panics if out of bounds).
    pub fn read(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len());
        // SAFETY: as in `write`: in bounds of live memory; `dst` is a Rust slice, so not slab
        // memory and not overlapping. A racing foreign write can only tear the bytes read.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len());
        }
    }
}
