//! Stream ordering: how the engine's block copies are ordered against the consumer's kernels.
//!
//! A serving engine runs its attention kernels on a **compute stream** (torch's current
//! stream; by default the legacy default stream) and reads and writes K/V there. The engine
//! copies blocks on its own **copy stream** (swap, offload, onboard, copy-on-write, partial
//! reuse). Two streams run concurrently unless told otherwise, so without fences a copy may
//! read a block before the kernel that writes it has run, or overwrite a block a kernel still
//! reads. The protocol, the only one the CUDA tier uses (`copy_batch`, `host_access`):
//!
//! 1. Before a copy batch: record an event on the compute stream and make the copy stream
//!    wait on it. The batch runs after every kernel enqueued before the call that asked for
//!    it, so it copies the K/V those kernels wrote and overwrites nothing they still read.
//! 2. After the batch: record its end event on the copy stream and make the compute stream
//!    wait on it. Every kernel enqueued afterwards sees the bytes the batch produced, and
//!    writes a block the batch read only after the batch read it (so a freed block may be
//!    handed out at once: its reuse by a kernel is ordered after the copy on the GPU).
//! 3. Copies among themselves run in the order the engine issued them: there is one copy
//!    stream, and a stream is FIFO. (Issue order is the engine's recording order, see
//!    `state::effects`; copies outside the lock touch only blocks no other call reaches.)
//! 4. Before the CPU touches tier memory (a synchronous read or write of device memory, a
//!    spill or read-back of pinned memory): wait, on the CPU, for both streams' work so far.
//!
//! So no CPU thread waits for the GPU to order copies; only CPU access to the bytes waits.
//!
//! [`Streams`] is the four primitives the protocol needs. The CUDA tier implements them with
//! `cuEventRecord` / `cuStreamWaitEvent` / `cuEventSynchronize`; the tests below implement
//! them with a happens-before model (vector clocks over the streams' FIFO order and the
//! event waits) and check, with kernels that write and read blocks around the copies, that
//! every two accesses of one block where one writes are ordered the way they were issued.
//! Cost: two event records and two stream waits per batch (a few microseconds of driver
//! calls, no GPU time); `host_access` adds two CPU waits.

use crate::error::Result;

/// The primitives of the protocol: events recorded on the compute or the copy stream, GPU
/// waits of one stream on an event, and CPU waits.
pub trait Streams {
    type Event;
    /// An event marking all work enqueued on the compute stream so far.
    fn record_compute(&self) -> Result<Self::Event>;
    /// An event marking all work enqueued on the copy stream so far.
    fn record_copy(&self) -> Result<Self::Event>;
    /// Work enqueued on the copy stream from now on runs after `e` (no CPU wait).
    fn copy_waits(&self, e: &Self::Event) -> Result<()>;
    /// Work enqueued on the compute stream from now on runs after `e` (no CPU wait).
    fn compute_waits(&self, e: &Self::Event) -> Result<()>;
    /// Blocks the calling thread until `e` has completed.
    fn cpu_waits(&self, e: &Self::Event) -> Result<()>;
}

/// Enqueues one copy batch between the fences of steps 1 and 2 and returns `enqueue`'s
/// result with the batch's end event. `enqueue` puts the copies on the copy stream.
pub fn copy_batch<S: Streams, T>(
    s: &S,
    enqueue: impl FnOnce() -> Result<T>,
) -> Result<(T, S::Event)> {
    let before = s.record_compute()?;
    s.copy_waits(&before)?;
    let out = enqueue()?;
    let end = s.record_copy()?;
    s.compute_waits(&end)?;
    Ok((out, end))
}

/// Step 4: returns once every kernel and copy enqueued so far has finished, so the CPU may
/// read or write the bytes of any block.
pub fn host_access<S: Streams>(s: &S) -> Result<()> {
    let compute = s.record_compute()?;
    let copy = s.record_copy()?;
    s.cpu_waits(&compute)?;
    s.cpu_waits(&copy)
}

#[cfg(test)]
mod tests {
    //! A happens-before model of CUDA streams. Operations are issued in one global order
    //! (the order host code calls the driver). On a stream they run in FIFO order; an event
    //! records the state of its stream at the time it is recorded; a wait makes later work of
    //! the waiting stream (or the CPU) run after the event. Vector clocks computed in issue
    //! order are then exactly the happens-before relation. Correct ordering: any two accesses
    //! of one location, at least one a write, are ordered by happens-before as they were
    //! issued (else the GPU may run them the other way round: a data race). Work enqueued
    //! after a CPU access runs after it (host program order).

    use super::*;
    use std::cell::RefCell;

    const COMPUTE: usize = 0;
    const COPY: usize = 1;
    const CPU: usize = 2;
    const AGENTS: usize = 3;

    type Clock = [u32; AGENTS];

    /// A block: which tier and which index.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Loc {
        Device(u32),
        Host(u32),
    }

    #[derive(Debug, Clone)]
    struct Access {
        loc: Loc,
        write: bool,
        agent: usize,
        /// The agent's clock when the access ran (its own component is its position).
        clock: Clock,
        what: String,
    }

    #[derive(Default)]
    struct Model {
        clocks: [Clock; AGENTS],
        accesses: Vec<Access>,
    }

    /// The model behind `Streams`; `fenced = false` enqueues the same copies without the
    /// protocol (asynchronous copies ordered neither after nor before the compute stream).
    struct Gpu {
        m: RefCell<Model>,
        fenced: bool,
    }

    impl Gpu {
        fn new(fenced: bool) -> Self {
            Gpu {
                m: RefCell::new(Model::default()),
                fenced,
            }
        }

        fn tick(&self, agent: usize) -> Clock {
            let mut m = self.m.borrow_mut();
            // Host program order: work enqueued after a CPU access runs after it.
            let cpu = m.clocks[CPU];
            for (c, o) in m.clocks[agent].iter_mut().zip(cpu) {
                *c = (*c).max(o);
            }
            m.clocks[agent][agent] += 1;
            m.clocks[agent]
        }

        fn join(&self, agent: usize, e: &Clock) {
            let mut m = self.m.borrow_mut();
            for (c, &o) in m.clocks[agent].iter_mut().zip(e) {
                *c = (*c).max(o);
            }
        }

        fn access(&self, agent: usize, accesses: &[(Loc, bool)], what: &str) {
            let clock = self.tick(agent);
            let mut m = self.m.borrow_mut();
            for &(loc, write) in accesses {
                m.accesses.push(Access {
                    loc,
                    write,
                    agent,
                    clock,
                    what: what.to_string(),
                });
            }
        }

        /// A consumer kernel on the compute stream.
        fn kernel(&self, accesses: &[(Loc, bool)], what: &str) {
            self.access(COMPUTE, accesses, what);
        }

        /// One engine copy batch from `src` to `dst`, through the protocol when fenced.
        fn copy(&self, src: Loc, dst: Loc) {
            let what = format!("copy {src:?} -> {dst:?}");
            let run = || {
                self.access(COPY, &[(src, false), (dst, true)], &what);
                Ok(())
            };
            if self.fenced {
                copy_batch(self, run).unwrap();
            } else {
                run().unwrap();
            }
        }

        /// The CPU reads or writes a block (a spill, a disk read-back, `read_kv`).
        fn cpu(&self, loc: Loc, write: bool, what: &str) {
            if self.fenced {
                host_access(self).unwrap();
            }
            self.access(CPU, &[(loc, write)], what);
        }

        /// Conflicting accesses not ordered by happens-before as issued.
        fn races(&self) -> Vec<String> {
            let m = self.m.borrow();
            let mut out = Vec::new();
            for (i, a) in m.accesses.iter().enumerate() {
                for b in &m.accesses[i + 1..] {
                    let conflict = a.loc == b.loc && (a.write || b.write);
                    let ordered = a.clock[a.agent] <= b.clock[a.agent];
                    if conflict && a.agent != b.agent && !ordered {
                        out.push(format!("{} / {} on {:?}", a.what, b.what, a.loc));
                    }
                }
            }
            out
        }
    }

    impl Streams for Gpu {
        type Event = Clock;

        fn record_compute(&self) -> Result<Clock> {
            Ok(self.m.borrow().clocks[COMPUTE])
        }

        fn record_copy(&self) -> Result<Clock> {
            Ok(self.m.borrow().clocks[COPY])
        }

        fn copy_waits(&self, e: &Clock) -> Result<()> {
            self.join(COPY, e);
            Ok(())
        }

        fn compute_waits(&self, e: &Clock) -> Result<()> {
            self.join(COMPUTE, e);
            Ok(())
        }

        fn cpu_waits(&self, e: &Clock) -> Result<()> {
            self.join(CPU, e);
            Ok(())
        }
    }

    use Loc::{Device, Host};

    /// A serving step around the engine's copies: a prefill writes block 3, the engine
    /// offloads it (eviction), reuses device block 3 for an onboard from the host tier,
    /// a decode kernel reads it, a copy-on-write copies it to block 4 which the next kernel
    /// writes, the CPU spills the offloaded host block to disk, and a swap-in reads it back.
    fn serving_step(g: &Gpu) {
        g.kernel(&[(Device(3), true)], "prefill writes K/V of block 3");
        g.copy(Device(3), Host(0)); // offload on eviction
        g.copy(Host(5), Device(3)); // onboard into the freed block
        g.kernel(&[(Device(3), false)], "decode reads block 3");
        g.copy(Device(3), Device(4)); // copy-on-write before an append
        g.kernel(&[(Device(4), true)], "decode appends into block 4");
        g.cpu(Host(0), false, "spill reads host block 0");
        g.copy(Host(0), Device(7)); // swap in
        g.kernel(&[(Device(7), false)], "attention reads block 7");
        g.cpu(Device(7), true, "write_kv writes block 7");
        g.kernel(&[(Device(7), false)], "attention reads block 7 again");
    }

    #[test]
    fn the_protocol_orders_every_conflicting_access_as_issued() {
        let g = Gpu::new(true);
        serving_step(&g);
        assert_eq!(g.races(), Vec::<String>::new());
    }

    #[test]
    fn without_the_fences_the_same_step_races() {
        // The same copies without the protocol. The model must find these races, or the test
        // above proves nothing. (The engine before stream ordering waited on the CPU after
        // each batch, which orders later kernels after it, but ordered no copy after the
        // kernels enqueued before it: the first race below.)
        let g = Gpu::new(false);
        serving_step(&g);
        let races = g.races();
        for expected in [
            "prefill writes K/V of block 3 / copy Device(3) -> Host(0)",
            "copy Host(5) -> Device(3) / decode reads block 3",
            "copy Host(0) -> Device(7) / write_kv writes block 7",
            "copy Device(3) -> Device(4) / decode appends into block 4",
            "copy Device(3) -> Host(0) / spill reads host block 0",
        ] {
            assert!(
                races.iter().any(|r| r.starts_with(expected)),
                "{expected} missing from {races:#?}"
            );
        }
    }

    #[test]
    fn each_fence_is_needed() {
        // Dropping either half of `copy_batch` leaves a race in the step above.
        struct Half<'a>(&'a Gpu, bool);
        impl Streams for Half<'_> {
            type Event = Clock;
            fn record_compute(&self) -> Result<Clock> {
                self.0.record_compute()
            }
            fn record_copy(&self) -> Result<Clock> {
                self.0.record_copy()
            }
            fn copy_waits(&self, e: &Clock) -> Result<()> {
                if self.1 {
                    self.0.copy_waits(e)?;
                }
                Ok(())
            }
            fn compute_waits(&self, e: &Clock) -> Result<()> {
                if !self.1 {
                    self.0.compute_waits(e)?;
                }
                Ok(())
            }
            fn cpu_waits(&self, e: &Clock) -> Result<()> {
                self.0.cpu_waits(e)
            }
        }
        for before_only in [true, false] {
            let g = Gpu::new(false);
            let h = Half(&g, before_only);
            g.kernel(&[(Device(1), true)], "kernel writes block 1");
            copy_batch(&h, || {
                g.access(
                    COPY,
                    &[(Device(1), false), (Device(2), true)],
                    "copy 1 -> 2",
                );
                Ok(())
            })
            .unwrap();
            g.kernel(&[(Device(2), false)], "kernel reads block 2");
            assert_eq!(g.races().len(), 1, "{:?}", g.races());
        }
    }
}
