//! Fallible allocation of bookkeeping arrays.
//!
//! The arrays sized from a config (a few entries per block of a tier: pool queues, prefix
//! index, residency marks, disk-slot flags) are allocated with `try_reserve_exact`, so a tier
//! whose bookkeeping does not fit in memory is an `Error::OutOfMemory` naming the array, not
//! an aborted process (`vec![x; n]` aborts when the allocator says no).
//! Arrays whose initial value is all zero bits (`zeroed`) are asked of the allocator zeroed
//! (`calloc`): a large one then arrives as fresh zero pages, so building a tier writes none
//! of it and it costs resident memory only as blocks are used.
//! Limit: this catches what the allocator refuses. Under Linux overcommit, a request that
//! fits the address space may be granted and only fail when touched (the OOM killer); the
//! arrays are filled at once, so that happens at construction, not later.

use crate::error::{Error, Result};

/// The `Error::OutOfMemory` of `n` elements of `elem` bytes each for `what`.
pub fn out_of_memory(what: &str, n: usize, elem: usize) -> Error {
    Error::OutOfMemory(match n.checked_mul(elem) {
        Some(bytes) => format!("cannot allocate {bytes} bytes for {what}"),
        None => format!("cannot allocate {n} x {elem} bytes for {what}"),
    })
}

/// A `Vec` of `n` copies of `value`, or `Error::OutOfMemory` naming `what`.
pub fn vec_of<T: Clone>(n: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| out_of_memory(what, n, std::mem::size_of::<T>()))?;
    v.resize(n, value);
    Ok(v)
}

/// Element types for which all-zero bits are a valid value (`zeroed`).
///
/// # Safety
/// Implement only for types whose every field is an integer or `bool` (zero bits: `0`,
/// `false`).
pub unsafe trait Zeroable: Copy {}
// SAFETY: integers and `bool` are valid as all-zero bits.
unsafe impl Zeroable for u8 {}
// SAFETY: as above.
unsafe impl Zeroable for bool {}
// SAFETY: as above.
unsafe impl Zeroable for u32 {}
// SAFETY: as above.
unsafe impl Zeroable for u64 {}
// SAFETY: as above.
unsafe impl Zeroable for u128 {}

/// A `Vec` of `n` zeros (`false` for `bool`) from the allocator's zeroed memory, or
/// `Error::OutOfMemory` naming `what`.
pub fn zeroed<T: Zeroable>(n: usize, what: &str) -> Result<Vec<T>> {
    let oom = || out_of_memory(what, n, std::mem::size_of::<T>());
    if n == 0 || std::mem::size_of::<T>() == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(n).map_err(|_| oom())?;
    // SAFETY: `layout` has a non-zero size (n > 0 elements of a non-zero-sized `T`).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        return Err(oom());
    }
    // Length and capacity are both `n`: exactly `n` were allocated, all initialized.
    #[allow(clippy::same_length_and_capacity)]
    // SAFETY: `ptr` was allocated by the global allocator with `T`'s alignment and
    // `n * size_of::<T>()` bytes (exactly `layout`, which is what `Vec` deallocates with); its
    // `n` elements are initialized, all-zero bits being a valid `T` (`Zeroable`).
    let v = unsafe { Vec::from_raw_parts(ptr, n, n) };
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_n_copies() {
        assert_eq!(vec_of(3, 7u32, "test").unwrap(), [7, 7, 7]);
        assert!(vec_of(0, 7u32, "test").unwrap().is_empty());
    }

    #[test]
    fn zeroed_arrays_are_zero_and_growable() {
        let mut v: Vec<u128> = zeroed(5, "test").unwrap();
        assert_eq!(v, [0; 5]);
        v.push(3);
        assert_eq!(v.len(), 6);
        assert_eq!(zeroed::<bool>(3, "test").unwrap(), [false; 3]);
        assert!(zeroed::<u32>(0, "test").unwrap().is_empty());
        for n in [usize::MAX, isize::MAX as usize / 8] {
            assert!(matches!(
                zeroed::<u64>(n, "the test array"),
                Err(Error::OutOfMemory(_))
            ));
        }
    }

    #[test]
    fn an_impossible_size_is_an_error_not_an_abort() {
        // More bytes than the address space (capacity overflow) and more than any allocator
        // grants (alloc failure): both are `OutOfMemory` naming the array.
        for n in [usize::MAX, isize::MAX as usize / 8] {
            // `black_box`: an optimized build may drop an allocation nothing reads, and then
            // a request of 2^60 bytes would "succeed".
            match std::hint::black_box(vec_of(n, 0u64, "the test array")) {
                Err(Error::OutOfMemory(msg)) => {
                    assert!(msg.contains("the test array"), "{msg}");
                }
                other => panic!("expected OutOfMemory, got {:?}", other.map(|v| v.len())),
            }
        }
    }
}
