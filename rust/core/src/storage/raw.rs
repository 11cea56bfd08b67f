//! `RawBytes`: a region of CPU-addressable memory owned by a slab, accessed only through
//! bounds-checked raw copies.
//!
//! Design: slab memory is shared like a GPU buffer: the engine reads and writes blocks it owns
//! under its lock, and DLPack consumers may write at any time. So no Rust reference to the bytes
//! is ever handed out, and every access is a bounds-checked copy through the raw pointer.
//! Invariant: `ptr` is valid for `len` bytes for as long as the owning slab lives (the slab
//! frees it in its `Drop`, after which no `RawBytes` of it is reachable).

use std::ptr::NonNull;

#[derive(Debug)]
pub struct RawBytes {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain memory with no thread affinity; every access goes through bounds-checked raw
// copies whose exclusivity the engine provides.
unsafe impl Send for RawBytes {}
// SAFETY: as above; `&RawBytes` only offers raw, bounds-checked copies.
unsafe impl Sync for RawBytes {}

impl RawBytes {
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes until the owner frees it, and
    /// the owner must not hand out Rust references to those bytes.
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

    pub fn write(&self, off: usize, src: &[u8]) {
        self.check(off, src.len());
        // SAFETY: bounds checked above; `src` is a distinct allocation (no Rust reference to
        // these bytes exists, so a slice cannot alias them).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len())
        }
    }

    pub fn read(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len());
        // SAFETY: bounds checked above; `dst` is a distinct allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len())
        }
    }
}
