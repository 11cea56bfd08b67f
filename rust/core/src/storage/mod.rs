//! Memory of the tiers: host slabs (the `cpu` device tier and the host tier), CUDA device
//! and pinned slabs, and the disk tier's block file.
//!
//! `Memory` is the one type the engine copies through, so bookkeeping never cares where a
//! tier lives. Copies between host slabs are done when `copy_runs` returns. Copies that
//! touch CUDA or pinned memory are DMA copies on the device's copy stream, ordered against
//! the consumer's compute stream (`order`): `copy_runs` returns once they are enqueued, with
//! the batch to wait for where a caller wants to (swaps, to time and settle themselves).
//! Every CPU access to CUDA or pinned memory (`read`, `write`, host-side copies) first waits
//! for the GPU (`CudaDevice::host_access`), so the CPU never sees bytes a copy still moves.

pub mod cuda;
pub mod disk;
pub mod host;
pub mod order;
pub mod raw;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::transfer::Runs;
use cuda::{CopyBatch, CudaDevice, DeviceSlab, PinnedSlab};
use host::HostSlab;

/// Where one tier's bytes live.
#[derive(Clone)]
pub enum Memory {
    /// Plain host memory: the `cpu` device tier, or the host tier beside it.
    Host(Arc<HostSlab>),
    /// Page-locked host memory: the host tier beside a CUDA device tier.
    Pinned(Arc<CudaDevice>, Arc<PinnedSlab>),
    /// GPU memory: the `cuda:N` device tier.
    Cuda(Arc<CudaDevice>, Arc<DeviceSlab>),
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Memory::Host(s) => write!(f, "Memory::Host({} bytes)", s.len()),
            Memory::Pinned(_, s) => write!(f, "Memory::Pinned({} bytes)", s.len()),
            Memory::Cuda(d, s) => {
                write!(f, "Memory::Cuda(cuda:{}, {} bytes)", d.ordinal(), s.len())
            }
        }
    }
}

impl Memory {
    pub fn host(len: usize) -> Result<Self> {
        Ok(Memory::Host(Arc::new(HostSlab::new(len)?)))
    }

    /// Host-tier memory for a device tier in `device_memory`: pinned next to a GPU.
    pub fn host_tier_for(device_memory: &Memory, len: usize) -> Result<Self> {
        match device_memory {
            Memory::Cuda(dev, _) => Ok(Memory::Pinned(
                dev.clone(),
                Arc::new(PinnedSlab::new(dev, len)?),
            )),
            _ => Memory::host(len),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Memory::Host(s) => s.len(),
            Memory::Pinned(_, s) => s.len(),
            Memory::Cuda(_, s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// CPU-addressable base of host memory (None for GPU memory).
    fn host_ptr(&self) -> Option<*mut u8> {
        match self {
            Memory::Host(s) => Some(s.as_ptr()),
            Memory::Pinned(_, s) => Some(s.as_ptr()),
            Memory::Cuda(..) => None,
        }
    }

    /// The GPU this memory belongs to (device memory, or pinned memory beside it).
    pub fn cuda_device(&self) -> Option<&Arc<CudaDevice>> {
        match self {
            Memory::Host(_) => None,
            Memory::Pinned(dev, _) | Memory::Cuda(dev, _) => Some(dev),
        }
    }

    /// Copies `src` into the memory at `off`; on a GPU or in pinned memory, after every
    /// kernel and copy enqueued so far, and synchronously.
    pub fn write(&self, off: usize, src: &[u8]) -> Result<()> {
        match self {
            Memory::Host(s) => s.write(off, src),
            Memory::Pinned(dev, s) => {
                dev.host_access()?;
                s.write(off, src);
            }
            Memory::Cuda(dev, s) => dev.write_sync(s, off, src)?,
        }
        Ok(())
    }

    /// Copies bytes at `off` out into `dst`; on a GPU or in pinned memory, after every
    /// kernel and copy enqueued so far.
    pub fn read(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        match self {
            Memory::Host(s) => s.read(off, dst),
            Memory::Pinned(dev, s) => {
                dev.host_access()?;
                s.read(off, dst);
            }
            Memory::Cuda(dev, s) => dev.read_sync(s, off, dst)?,
        }
        Ok(())
    }
}

/// What `copy_runs` leaves running: nothing (host copies, done), or a batch of DMA copies
/// already ordered against the compute stream.
#[must_use = "a copy on the GPU may still run: wait for it or let the stream order it"]
#[derive(Debug, Default)]
pub struct Copied(Option<CopyBatch>);

impl Copied {
    /// Blocks until the copies are done (never under the engine lock or the GIL).
    pub fn wait(self) -> Result<()> {
        match self.0 {
            Some(batch) => batch.wait(),
            None => Ok(()),
        }
    }
}

fn check(mem: &Memory, off: usize, n: usize) {
    assert!(
        off.checked_add(n).is_some_and(|e| e <= mem.len()),
        "copy out of bounds"
    );
}

/// Copies every run of `runs` from `src` into `dst` (the same memory for in-tier copies):
/// done on return between host slabs, enqueued in stream order on a GPU (see the module
/// header).
pub fn copy_runs(src: &Memory, dst: &Memory, runs: &Runs) -> Result<Copied> {
    if runs.runs.is_empty() {
        return Ok(Copied(None));
    }
    let batch = match (src, dst) {
        (Memory::Cuda(dev, s), Memory::Pinned(_, d)) => dev.copy_d2h(s, d, &runs.runs)?,
        (Memory::Pinned(_, s), Memory::Cuda(dev, d)) => dev.copy_h2d(s, d, &runs.runs)?,
        (Memory::Cuda(dev, s), Memory::Cuda(_, d)) if Arc::ptr_eq(s, d) => {
            dev.copy_d2d(s, &runs.runs)?
        }
        (Memory::Cuda(..), _) | (_, Memory::Cuda(..)) => {
            // Plain host memory cannot be a DMA target: stage through synchronous copies.
            let mut buf = Vec::new();
            for &(s, d, n) in &runs.runs {
                buf.resize(n, 0);
                src.read(s, &mut buf)?;
                dst.write(d, &buf)?;
            }
            return Ok(Copied(None));
        }
        _ => {
            let (Some(sp), Some(dp)) = (src.host_ptr(), dst.host_ptr()) else {
                return Err(Error::InvalidArgument(
                    "copy between unsupported memories".into(),
                ));
            };
            for dev in [src.cuda_device(), dst.cuda_device()].into_iter().flatten() {
                dev.host_access()?;
            }
            for &(s, d, n) in &runs.runs {
                check(src, s, n);
                check(dst, d, n);
                // SAFETY: both ranges are in bounds (checked above) of live host slabs kept
                // alive by `src` and `dst`, reached only through raw pointers (no reference
                // to their bytes exists; see `raw`); `copy` allows overlap (in-tier copies).
                // A consumer writing these blocks meanwhile can only tear the copied bytes.
                unsafe { std::ptr::copy(sp.add(s), dp.add(d), n) };
            }
            return Ok(Copied(None));
        }
    };
    Ok(Copied(Some(batch)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_copies_between_and_within_memories() {
        let a = Memory::host(64).unwrap();
        let b = Memory::host(64).unwrap();
        a.write(0, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let mut r = Runs::default();
        r.push(0, 16, 8);
        copy_runs(&a, &b, &r).unwrap().wait().unwrap();
        copy_runs(&b, &b, &r).unwrap().wait().unwrap(); // within: 0..8 (zeros) -> 16..24
        let mut out = [9u8; 8];
        b.read(16, &mut out).unwrap();
        assert_eq!(out, [0; 8]);
        copy_runs(&a, &a, &r).unwrap().wait().unwrap();
        a.read(16, &mut out).unwrap();
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn out_of_bounds_copies_are_loud() {
        let a = Memory::host(8).unwrap();
        let mut r = Runs::default();
        r.push(4, 0, 8);
        let _ = copy_runs(&a, &a, &r);
    }
}
