//! Fallible allocation of bookkeeping arrays.
//!
//! The arrays sized from a config (a few entries per block of a tier: pool queues, prefix
//! index, residency marks, disk-slot flags) are allocated with `try_reserve_exact`, so a tier
//! whose bookkeeping does not fit in memory is an `Error::OutOfMemory` naming the array, not
//! an aborted process (`vec![x; n]` aborts when the allocator says no).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_n_copies() {
        assert_eq!(vec_of(3, 7u32, "test").unwrap(), [7, 7, 7]);
        assert!(vec_of(0, 7u32, "test").unwrap().is_empty());
    }

    #[test]
    fn an_impossible_size_is_an_error_not_an_abort() {
        // More bytes than the address space (capacity overflow) and more than any allocator
        // grants (alloc failure): both are `OutOfMemory` naming the array.
        for n in [usize::MAX, isize::MAX as usize / 8] {
            match vec_of(n, 0u64, "the test array") {
                Err(Error::OutOfMemory(msg)) => {
                    assert!(msg.contains("the test array"), "{msg}");
                }
                other => panic!("expected OutOfMemory, got {:?}", other.map(|v| v.len())),
            }
        }
    }
}
