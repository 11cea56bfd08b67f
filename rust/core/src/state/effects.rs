//! Effects: what a bookkeeping call leaves the engine to do. State plans, the engine executes.
//!
//! No `State` operation touches tier memory, a disk file or the eventfd. Each records what
//! it implies here instead: block copies (offload on eviction, onboard of host hits, disk
//! read-back, copy-on-write, partial reuse), the reads of host blocks spilled to disk, the
//! disk writes and read-aheads to hand to the workers, and whether the event loop must be
//! woken. The engine takes them with `State::take_effects` and runs them in one place
//! (`EngineCore::commit`), the epilogue of every call and of every worker's completion.
//!
//! Memory operations run in the order they were recorded, before the lock that planned
//! them is released: the blocks they read or write may be published, evicted or reused by
//! the very next step of the same call (an offload reads a block the same allocation then
//! onboards into), and recording order is the order those steps assume. Swaps are the one
//! copy that runs without the lock: their blocks are held by the sequence's moving
//! `Phase` instead (see `state::tiers`). Disk I/O runs on the workers, after the lock.
//!
//! Cost: one `Vec` push per copy run (contiguous runs between the same memories merge).

use crate::error::Result;
use crate::storage::{copy_runs, Memory};
use crate::tier::DiskWrite;
use crate::transfer::Runs;
use crate::types::{BlockHash, BlockId};

use super::DiskRead;

/// One memory operation, run by the engine in recording order.
enum MemOp {
    /// Byte runs from `src` to `dst` (the same memory for in-tier copies).
    Copy {
        src: Memory,
        dst: Memory,
        runs: Runs,
    },
    /// Bytes read back from disk, written at `(offset, len)` runs of `dst`, end to end.
    Write {
        dst: Memory,
        at: Vec<(usize, usize)>,
        bytes: Vec<u8>,
    },
    /// A host block evicted to the disk tier: its bytes are read now and written to `slot`
    /// by a disk worker after the call.
    Spill {
        src: Memory,
        offset: usize,
        len: usize,
        slot: BlockId,
        hash: BlockHash,
    },
}

/// The effects recorded by one call (see the module header).
#[derive(Default)]
pub struct Effects {
    mem: Vec<MemOp>,
    /// Read-aheads for the disk reader.
    pub(crate) disk_reads: Vec<DiskRead>,
    /// Spilled blocks read by `run_memory`, for the disk writers.
    pub(crate) disk_writes: Vec<DiskWrite>,
    /// Wake the event loop: a ticket finished or the pressure level changed.
    pub(crate) signal: bool,
}

fn same(a: &Memory, b: &Memory) -> bool {
    match (a, b) {
        (Memory::Host(x), Memory::Host(y)) => std::sync::Arc::ptr_eq(x, y),
        (Memory::Pinned(_, x), Memory::Pinned(_, y)) => std::sync::Arc::ptr_eq(x, y),
        (Memory::Cuda(_, x), Memory::Cuda(_, y)) => std::sync::Arc::ptr_eq(x, y),
        _ => false,
    }
}

impl Effects {
    /// Records a copy of `len` bytes from `src` at `s` to `dst` at `d`; it continues the
    /// previous copy when that one was between the same memories.
    pub(crate) fn copy(&mut self, src: &Memory, dst: &Memory, s: usize, d: usize, len: usize) {
        if let Some(MemOp::Copy {
            src: ls,
            dst: ld,
            runs,
        }) = self.mem.last_mut()
        {
            if same(ls, src) && same(ld, dst) {
                runs.push(s, d, len);
                return;
            }
        }
        let mut runs = Runs::default();
        runs.push(s, d, len);
        self.mem.push(MemOp::Copy {
            src: src.clone(),
            dst: dst.clone(),
            runs,
        });
    }

    /// Records writing `bytes` (laid end to end) at the runs `at` of `dst`.
    pub(crate) fn write(&mut self, dst: &Memory, at: Vec<(usize, usize)>, bytes: Vec<u8>) {
        debug_assert_eq!(at.iter().map(|r| r.1).sum::<usize>(), bytes.len());
        self.mem.push(MemOp::Write {
            dst: dst.clone(),
            at,
            bytes,
        });
    }

    /// Records spilling the `len` bytes at `offset` of `src` to disk slot `slot`.
    pub(crate) fn spill(
        &mut self,
        src: &Memory,
        offset: usize,
        len: usize,
        slot: BlockId,
        hash: BlockHash,
    ) {
        self.mem.push(MemOp::Spill {
            src: src.clone(),
            offset,
            len,
            slot,
            hash,
        });
    }

    /// Whether any memory operation is recorded.
    pub fn has_memory_ops(&self) -> bool {
        !self.mem.is_empty()
    }

    /// Runs the memory operations in order (spills become `disk_writes`). Stops at the
    /// first failure (only device memory can fail: a lost GPU context).
    pub(crate) fn run_memory(&mut self) -> Result<()> {
        let writes = &mut self.disk_writes;
        for op in self.mem.drain(..) {
            match op {
                MemOp::Copy { src, dst, runs } => copy_runs(&src, &dst, &runs)?,
                MemOp::Write { dst, at, bytes } => {
                    let mut from = 0;
                    for (off, len) in at {
                        dst.write(off, &bytes[from..from + len])?;
                        from += len;
                    }
                }
                MemOp::Spill {
                    src,
                    offset,
                    len,
                    slot,
                    hash,
                } => {
                    let mut data = crate::fallible::vec_of(len, 0u8, "a spilled block")?;
                    src.read(offset, &mut data)?;
                    writes.push(DiskWrite { slot, hash, data });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_between_the_same_memories_merge_and_run_in_order() {
        let a = Memory::host(64).unwrap();
        let b = Memory::host(64).unwrap();
        a.write(0, &[1, 2, 3, 4]).unwrap();
        let mut fx = Effects::default();
        fx.copy(&a, &b, 0, 8, 2);
        fx.copy(&a, &b, 2, 10, 2); // continues the run above
        fx.copy(&b, &b, 8, 32, 4); // must see the copy above
        assert_eq!(fx.mem.len(), 2);
        fx.spill(&b, 32, 4, BlockId(3), 7);
        fx.run_memory().unwrap();
        let writes = &fx.disk_writes;
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].data, [1, 2, 3, 4]);
        assert_eq!((writes[0].slot, writes[0].hash), (BlockId(3), 7));
        assert!(!fx.has_memory_ops());
    }

    #[test]
    fn writes_land_at_their_runs() {
        let a = Memory::host(16).unwrap();
        let mut fx = Effects::default();
        fx.write(&a, vec![(0, 2), (8, 2)], vec![5, 6, 7, 8]);
        fx.run_memory().unwrap();
        let mut out = [0u8; 10];
        a.read(0, &mut out).unwrap();
        assert_eq!(out, [5, 6, 0, 0, 0, 0, 0, 0, 7, 8]);
    }
}
