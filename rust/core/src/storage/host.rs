//! A host memory slab: one zeroed, page-aligned allocation holding a tier's blocks (its bytes
//! are reached through `RawBytes`, see there for the access rules). An allocation the system
//! refuses is `Error::OutOfMemory`, never an abort.
//! Invariant: the allocation lives from `new` until `Drop`; views hold an `Arc<HostSlab>`,
//! so the memory outlives every view.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use super::raw::RawBytes;
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
    raw: RawBytes,
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
        // Too large for a `Layout` (near `isize::MAX`) is out of memory as well.
        let layout = Layout::from_size_align(size, align_for(size)).map_err(|_| oom())?;
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        // A null return is the allocator's refusal; `handle_alloc_error` is never called.
        let ptr = NonNull::new(raw).ok_or_else(oom)?;
        if size >= HUGE {
            // SAFETY: advisory call on memory we own (`size` bytes from `raw`); failure (e.g.
            // THP disabled) changes nothing and is ignored.
            unsafe { libc::madvise(raw.cast(), size, libc::MADV_HUGEPAGE) };
        }
        // SAFETY: `ptr` is valid for `size >= len` bytes until `Drop`; no references are
        // handed out.
        let raw = unsafe { RawBytes::new(ptr, len) };
        Ok(HostSlab { raw })
    }
}

impl Drop for HostSlab {
    fn drop(&mut self) {
        let size = self.raw.len().max(1);
        let layout =
            Layout::from_size_align(size, align_for(size)).expect("layout was valid at new");
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
