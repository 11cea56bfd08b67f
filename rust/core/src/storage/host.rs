//! A host memory slab: one zeroed, page-aligned allocation holding a tier's blocks (its bytes
//! are reached through `RawBytes`, see there for the access rules). An allocation the system
//! refuses is `Error::OutOfMemory`, never an abort.
//! Slabs of `HUGE` bytes or more are an anonymous private mapping (`mmap`): the kernel zeroes
//! pages on first touch, so building a tier costs no memset and its untouched blocks no
//! resident memory (what `calloc` gives numpy and torch for large arrays; a page-aligned
//! `alloc_zeroed` would write every byte). The cost of that, as with any lazily backed
//! memory under Linux overcommit: a mapping the system cannot back later fails at first touch
//! (the OOM killer), not at construction. Smaller slabs come from the allocator.
//! Invariant: the allocation lives from `new` until `Drop`; views hold an `Arc<HostSlab>`,
//! so the memory outlives every view.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use super::raw::RawBytes;
use crate::error::{Error, Result};

const ALIGN: usize = 4096;
/// Slabs of at least this size are mapped and asked to use transparent huge pages: fewer TLB
/// misses on block copies (numpy does the same for large arrays).
const HUGE: usize = 2 << 20;

#[derive(Debug)]
pub struct HostSlab {
    raw: RawBytes,
    /// `Some(bytes)` for a mapping of that length, `None` for an allocator allocation.
    mapped: Option<usize>,
}

impl std::ops::Deref for HostSlab {
    type Target = RawBytes;

    fn deref(&self) -> &RawBytes {
        &self.raw
    }
}

impl HostSlab {
    pub fn new(len: usize) -> Result<Self> {
        let size = len.max(1);
        let oom = || Error::OutOfMemory(format!("cannot allocate {len} bytes of host memory"));
        if size >= HUGE {
            return Self::mapped(len, size).ok_or_else(oom);
        }
        // Too large for a `Layout` (near `isize::MAX`) is out of memory as well.
        let layout = Layout::from_size_align(size, ALIGN).map_err(|_| oom())?;
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        // A null return is the allocator's refusal; `handle_alloc_error` is never called.
        let ptr = NonNull::new(raw).ok_or_else(oom)?;
        // SAFETY: `ptr` is valid for `size >= len` bytes until `Drop`; no references are
        // handed out.
        let raw = unsafe { RawBytes::new(ptr, len) };
        Ok(HostSlab { raw, mapped: None })
    }

    /// An anonymous mapping of `size >= len` bytes; `None` when the system refuses it.
    fn mapped(len: usize, size: usize) -> Option<Self> {
        // SAFETY: a fresh anonymous private mapping; no existing memory is touched.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: advisory call on the mapping just made (`size` bytes from `raw`); failure
        // (e.g. THP disabled) changes nothing and is ignored.
        unsafe { libc::madvise(raw, size, libc::MADV_HUGEPAGE) };
        let ptr = NonNull::new(raw.cast::<u8>())?;
        // SAFETY: the mapping is readable and writable for `size >= len` bytes, zero-filled,
        // until `Drop` unmaps it; no references are handed out.
        let raw = unsafe { RawBytes::new(ptr, len) };
        Some(HostSlab {
            raw,
            mapped: Some(size),
        })
    }
}

impl Drop for HostSlab {
    fn drop(&mut self) {
        if let Some(size) = self.mapped {
            // SAFETY: mapped in `mapped` with this length and not yet unmapped; every view
            // is gone (they hold the `Arc` this slab lives in).
            unsafe { libc::munmap(self.raw.as_ptr().cast(), size) };
            return;
        }
        let size = self.raw.len().max(1);
        let layout = Layout::from_size_align(size, ALIGN).expect("layout was valid at new");
        // SAFETY: allocated in `new` with this exact layout and not yet freed.
        unsafe { dealloc(self.raw.as_ptr(), layout) }
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
        s.write(32, &[1, 2, 3, 4]);
        s.read(30, &mut out);
        assert_eq!(out, [0, 0, 1, 2, 3, 4, 0, 0]);
        assert_eq!(s.as_ptr() as usize % ALIGN, 0);
    }

    #[test]
    fn a_large_slab_is_a_zeroed_mapping() {
        let s = HostSlab::new(3 * HUGE + 5).unwrap();
        assert!(s.mapped.is_some());
        let mut out = [9u8; 8];
        s.read(3 * HUGE - 3, &mut out);
        assert_eq!(out, [0; 8]);
        s.write(3 * HUGE, &[7; 5]);
        s.read(3 * HUGE - 3, &mut out);
        assert_eq!(out, [0, 0, 0, 7, 7, 7, 7, 7]);
        assert_eq!(s.as_ptr() as usize % ALIGN, 0);
    }

    #[test]
    fn a_refused_allocation_is_out_of_memory() {
        // Past what `Layout` takes, and past any address space (the allocator says no).
        for len in [usize::MAX, isize::MAX as usize / 2] {
            match HostSlab::new(len) {
                Err(Error::OutOfMemory(msg)) => assert!(msg.contains(&len.to_string()), "{msg}"),
                other => panic!("expected OutOfMemory, got {other:?}"),
            }
        }
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn out_of_bounds_is_loud() {
        HostSlab::new(16).unwrap().write(10, &[0; 8]);
    }
}
