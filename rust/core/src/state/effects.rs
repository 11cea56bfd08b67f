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
//! onboards into), and recording order is the order those steps assume. Two kinds of copy
//! run without the lock, because nothing they touch is reachable by another call meanwhile:
//! an admission's fill (`split_fill`: the copies into a new sequence's blocks, run before it
//! is published, see `state::alloc`) and swaps (their blocks are held by the sequence's
//! moving `Phase`, see `state::tiers`). What becomes of the blocks a fill touched is an
//! `After` action applied once it ran (or, if it never runs, undone). Offloads and spills
//! always run under the lock, in order: a burst of evictions may push a block through the
//! host tier to disk within one call. Disk I/O runs on the workers, after the lock.
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
    /// Byte runs from `src` to `dst` (the same memory for in-tier copies). `in_lock`: it
    /// stays with the call's own effects, never in a fill (see `split_fill`).
    Copy {
        src: Memory,
        dst: Memory,
        runs: Runs,
        in_lock: bool,
    },
    /// Bytes read back from disk, written at `(offset, len)` runs of `dst`, end to end.
    Write {
        dst: Memory,
        at: Vec<(usize, usize)>,
        bytes: Vec<u8>,
    },
    /// A cached block leaving a tier: its bytes (the runs `at` of `src`, end to end) are
    /// read now and written elsewhere after the call (`Stage`).
    Stage {
        src: Memory,
        at: Vec<(usize, usize)>,
        to: Stage,
    },
}

/// Where a staged block's bytes go.
#[derive(Debug)]
pub(crate) enum Stage {
    /// A host block spilled to disk slot `slot` by a disk worker.
    Disk { slot: BlockId, hash: BlockHash },
    /// Block `hash` written to the remote store under `key` by the remote writer
    /// (`stored`: its event once it landed).
    Remote {
        hash: BlockHash,
        key: String,
        stored: Option<crate::remote::Stored>,
    },
}

/// A sealed value for the remote store (`remote`), staged by `run_memory`.
pub(crate) struct RemoteStaged {
    pub hash: BlockHash,
    pub key: String,
    pub value: Vec<u8>,
    pub stored: Option<crate::remote::Stored>,
}

/// What becomes of a block the memory operations touched once they ran, or if they never
/// run (a cancelled grant, a failed fill): applied by `State::settle_after`, under the lock.
#[derive(Debug)]
pub(crate) enum After {
    /// Host blocks were onboarded (`host`, pinned until now) and `disk` blocks read back
    /// into the device tier: unpin the host blocks, count the transfers.
    Onboarded { host: Vec<BlockId>, disk: usize },
    /// Device block `src` was copied for a partial prefix hit: unpin it, count the copy.
    PartialCopied { src: BlockId },
}

/// Where a call's recording started, to split off what it recorded (`split_fill`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mark {
    mem: usize,
    after: usize,
}

/// The effects recorded by one call (see the module header).
#[derive(Default)]
pub struct Effects {
    mem: Vec<MemOp>,
    /// Applied once `mem` ran (or with `ran = false` if it never will).
    pub(crate) after: Vec<After>,
    /// Read-aheads for the disk reader.
    pub(crate) disk_reads: Vec<DiskRead>,
    /// Spilled blocks read by `run_memory`, for the disk writers.
    pub(crate) disk_writes: Vec<DiskWrite>,
    /// Blocks read by `run_memory` for the remote store, queued by `State::settle_effects`.
    pub(crate) remote_writes: Vec<RemoteStaged>,
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

impl std::fmt::Debug for Effects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Effects")
            .field("memory_ops", &self.mem.len())
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

impl Effects {
    /// Where recording stands now.
    pub(crate) fn mark(&self) -> Mark {
        Mark {
            mem: self.mem.len(),
            after: self.after.len(),
        }
    }

    /// Moves the copies, writes and after-actions recorded since `mark` into a fill of
    /// their own (run later, outside the lock, by whoever publishes the blocks they fill).
    /// Offloads and spills stay: they move cached bytes out of blocks the admission took
    /// (device blocks it reuses, host blocks its offloads reuse), so they must run first,
    /// with the rest of this call's effects, before the fill overwrites those blocks.
    pub(crate) fn split_fill(&mut self, mark: Mark) -> Effects {
        let tail: Vec<MemOp> = self.mem.drain(mark.mem..).collect();
        let mut fill = Effects::default();
        for op in tail {
            match op {
                MemOp::Stage { .. } | MemOp::Copy { in_lock: true, .. } => self.mem.push(op),
                _ => fill.mem.push(op),
            }
        }
        fill.after = self.after.split_off(mark.after);
        fill
    }

    /// Moves the memory operations out, to run them elsewhere; the after-actions stay.
    pub(crate) fn take_memory(&mut self) -> Effects {
        Effects {
            mem: std::mem::take(&mut self.mem),
            ..Effects::default()
        }
    }

    /// Records an after-action (see `After`).
    pub(crate) fn after(&mut self, a: After) {
        self.after.push(a);
    }

    /// Bytes the memory operations move (copies and writes).
    pub fn bytes(&self) -> usize {
        self.mem
            .iter()
            .map(|op| match op {
                MemOp::Copy { runs, .. } => runs.bytes(),
                MemOp::Write { bytes, .. } => bytes.len(),
                MemOp::Stage { at, .. } => at.iter().map(|r| r.1).sum(),
            })
            .sum()
    }

    /// Records a copy of `len` bytes from `src` at `s` to `dst` at `d`; it continues the
    /// previous copy when that one was between the same memories.
    pub(crate) fn copy(&mut self, src: &Memory, dst: &Memory, s: usize, d: usize, len: usize) {
        self.push_copy(src, dst, s, d, len, false);
    }

    /// Records every run of `runs` as `copy` does. `offload`: the copies run with this call's
    /// effects, under the lock, even when recorded inside an admission (the host block an
    /// offload fills is indexed at once, so a later step of the same call may evict or spill
    /// it again: recording order must hold).
    pub(crate) fn copy_runs(&mut self, src: &Memory, dst: &Memory, runs: &Runs, offload: bool) {
        for &(s, d, n) in &runs.runs {
            self.push_copy(src, dst, s, d, n, offload);
        }
    }

    fn push_copy(
        &mut self,
        src: &Memory,
        dst: &Memory,
        s: usize,
        d: usize,
        len: usize,
        lock: bool,
    ) {
        if let Some(MemOp::Copy {
            src: ls,
            dst: ld,
            runs,
            in_lock,
        }) = self.mem.last_mut()
        {
            if same(ls, src) && same(ld, dst) && *in_lock == lock {
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
            in_lock: lock,
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
        self.stage(src, vec![(offset, len)], Stage::Disk { slot, hash });
    }

    /// Records reading the runs `at` of `src` (end to end) for `to` (see `Stage`).
    pub(crate) fn stage(&mut self, src: &Memory, at: Vec<(usize, usize)>, to: Stage) {
        self.mem.push(MemOp::Stage {
            src: src.clone(),
            at,
            to,
        });
    }

    /// Whether any memory operation is recorded.
    pub fn has_memory_ops(&self) -> bool {
        !self.mem.is_empty()
    }

    /// Whether nothing at all is recorded for the memory (no operation, no after-action).
    pub fn is_settled(&self) -> bool {
        self.mem.is_empty() && self.after.is_empty()
    }

    /// Runs the memory operations in order (spills become `disk_writes`). Stops at the
    /// first failure (only device memory can fail: a lost GPU context).
    pub(crate) fn run_memory(&mut self) -> Result<()> {
        for op in std::mem::take(&mut self.mem) {
            match op {
                // Not waited for: on a GPU the stream orders it (`storage::order`).
                MemOp::Copy { src, dst, runs, .. } => drop(copy_runs(&src, &dst, &runs)?),
                MemOp::Write { dst, at, bytes } => {
                    let mut from = 0;
                    for (off, len) in at {
                        dst.write(off, &bytes[from..from + len])?;
                        from += len;
                    }
                }
                MemOp::Stage { src, at, to } => {
                    let len: usize = at.iter().map(|r| r.1).sum();
                    match to {
                        Stage::Disk { slot, hash } => {
                            let mut data = crate::fallible::vec_of(len, 0u8, "a spilled block")?;
                            read_runs(&src, &at, &mut data)?;
                            self.disk_writes.push(DiskWrite { slot, hash, data });
                        }
                        Stage::Remote { hash, key, stored } => {
                            let mut value = crate::remote::value_buffer(len)?;
                            read_runs(&src, &at, &mut value[crate::remote::HEADER..])?;
                            crate::remote::seal(&key, &mut value);
                            self.remote_writes.push(RemoteStaged {
                                hash,
                                key,
                                value,
                                stored,
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Reads the runs `at` of `src` into `dst`, end to end.
fn read_runs(src: &Memory, at: &[(usize, usize)], dst: &mut [u8]) -> Result<()> {
    let mut from = 0;
    for &(off, len) in at {
        src.read(off, &mut dst[from..from + len])?;
        from += len;
    }
    Ok(())
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
    fn a_fill_takes_what_was_recorded_since_its_mark_except_spills() {
        let a = Memory::host(64).unwrap();
        let mut fx = Effects::default();
        fx.copy(&a, &a, 0, 8, 4); // before the mark: stays
        let m = fx.mark();
        fx.spill(&a, 16, 4, BlockId(1), 2);
        let mut offload = Runs::default();
        offload.push(40, 48, 4);
        fx.copy_runs(&a, &a, &offload, true);
        fx.write(&a, vec![(32, 2)], vec![1, 2]);
        fx.after(After::PartialCopied { src: BlockId(5) });
        let fill = fx.split_fill(m);
        assert_eq!((fx.mem.len(), fill.mem.len()), (3, 1));
        assert!(matches!(fx.mem[1], MemOp::Stage { .. }));
        assert!(matches!(fx.mem[2], MemOp::Copy { in_lock: true, .. }));
        assert_eq!((fx.after.len(), fill.after.len()), (0, 1));
        assert_eq!(fill.bytes(), 2);
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
