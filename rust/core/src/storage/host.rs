//! A host memory slab: one zeroed, page-aligned allocation holding a tier's blocks.
//!
//! Design: the slab is raw shared memory, like a GPU buffer. The engine reads and writes it
//! only for blocks it owns under the engine lock; consumers of a DLPack view may write to it
//! at any time (that is the point of a zero-copy view). So no Rust reference to its bytes is
//! ever kept: every access is a bounds-checked `copy` through raw pointers.
//! Invariant: `ptr` is valid for `len` bytes from `new` until `Drop`; views hold an
//! `Arc<HostSlab>`, so the memory outlives every view.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use crate::error::{Error, Result};

const ALIGN: usize = 4096;
/// Slabs of at least this size are aligned to it and asked to use transparent huge pages:
/// fewer TLB misses on block copies (numpy does the same for large arrays).
const HUGE: usize = 2 << 20;

fn align_for(len: usize) -> usize {
    if len >= HUGE {
        HUGE
    } else {
        ALIGN
    }
}

#[derive(Debug)]
pub struct HostSlab {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the slab is plain memory with no thread affinity; every access goes through
// bounds-checked raw copies whose exclusivity the engine lock provides.
unsafe impl Send for HostSlab {}
// SAFETY: as above; `&HostSlab` only offers raw, bounds-checked copies.
unsafe impl Sync for HostSlab {}

impl HostSlab {
    pub fn new(len: usize) -> Result<Self> {
        let size = len.max(1);
        let layout = Layout::from_size_align(size, align_for(size))
            .map_err(|_| Error::config("num_blocks", format!("{len} bytes is too large")))?;
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw)
            .ok_or_else(|| Error::config("num_blocks", format!("cannot allocate {len} bytes")))?;
        if size >= HUGE {
            // SAFETY: advisory call on memory we own (`size` bytes from `raw`); failure (e.g.
            // THP disabled) changes nothing and is ignored.
            unsafe { libc::madvise(raw.cast(), size, libc::MADV_HUGEPAGE) };
        }
        Ok(HostSlab { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base address, for DLPack views.
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
        // SAFETY: bounds checked above; `src` is a distinct allocation (a Rust slice cannot
        // alias the slab, to which no references are ever handed out).
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

    /// Copies `n` bytes from `src` to `dst` inside the slab (ranges may overlap).
    pub fn copy_within(&self, src: usize, dst: usize, n: usize) {
        self.check(src, n);
        self.check(dst, n);
        // SAFETY: both ranges are in bounds; `copy` handles overlap.
        unsafe { std::ptr::copy(self.ptr.as_ptr().add(src), self.ptr.as_ptr().add(dst), n) }
    }

    /// Copies `n` bytes from `src_off` of `src` to `dst_off` of `self` (another slab).
    pub fn copy_from(&self, dst_off: usize, src: &HostSlab, src_off: usize, n: usize) {
        self.check(dst_off, n);
        src.check(src_off, n);
        // SAFETY: both ranges are in bounds of their own slab; two slabs never overlap
        // (when `src` is `self`, the caller uses `copy_within`; `copy` is overlap-safe anyway).
        unsafe {
            std::ptr::copy(
                src.ptr.as_ptr().add(src_off),
                self.ptr.as_ptr().add(dst_off),
                n,
            )
        }
    }
}

impl Drop for HostSlab {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len.max(1), align_for(self.len.max(1)))
            .expect("layout was valid at new");
        // SAFETY: allocated in `new` with this exact layout and not yet freed.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_copy() {
        let s = HostSlab::new(64).unwrap();
        let mut out = [9u8; 8];
        s.read(0, &mut out);
        assert_eq!(out, [0; 8], "slab starts zeroed");
        s.write(8, &[1, 2, 3, 4]);
        s.copy_within(8, 32, 4);
        s.read(30, &mut out);
        assert_eq!(out, [0, 0, 1, 2, 3, 4, 0, 0]);
        assert_eq!(s.as_ptr() as usize % ALIGN, 0);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn out_of_bounds_is_loud() {
        HostSlab::new(16).unwrap().write(10, &[0; 8]);
    }
}
