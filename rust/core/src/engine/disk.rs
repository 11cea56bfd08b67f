//! The disk tier's I/O: spilled blocks handed to the writer threads, read-aheads to the
//! reader thread, and the disk test hooks.
//!
//! Every job catches its own failure (a failed write is an unused slot, a failed read a miss)
//! and ends in `commit`, so a waiter is always answered. Jobs take the engine lock only to
//! record their result, never while doing I/O.

use crate::error::{Error, Result};
use crate::state::DiskRead;
use crate::sync::atomic::Ordering;
use crate::tier::DiskWrite;

use super::{panic_message, EngineCore};

impl EngineCore {
    /// Hands the disk writes staged by the last call to the disk workers.
    pub(super) fn submit_disk_writes(&self, writes: Vec<DiskWrite>) {
        if writes.is_empty() {
            return;
        }
        let (Some(workers), Some(core)) = (&self.disk_workers, self.me.upgrade()) else {
            return;
        };
        for w in writes {
            let core = core.clone();
            workers.submit(Box::new(move || {
                while core.disk_writes_paused.load(Ordering::SeqCst) {
                    crate::sync::poll_sleep(std::time::Duration::from_micros(200));
                }
                let file = core.state.lock().disk_file().cloned();
                let Some(file) = file else { return };
                // A panic inside the write is a failed write, never a lost answer.
                let write =
                    std::panic::AssertUnwindSafe(|| file.write_block(w.slot.idx(), &w.data));
                let ok = matches!(std::panic::catch_unwind(write), Ok(Ok(())));
                let mut st = core.state.lock();
                if !st.is_closed() {
                    st.finish_disk_write(w.slot, w.hash, ok);
                    let _ = core.commit(st, false);
                }
            }));
        }
    }

    /// Hands read-aheads to the disk reader; each finishes by staging its results and
    /// serving the waiters (its ticket may be granted then).
    pub(super) fn submit_disk_reads(&self, reads: Vec<DiskRead>) {
        let (Some(reader), Some(core)) = (&self.ctx.disk_reader, self.me.upgrade()) else {
            return;
        };
        for DiskRead {
            ticket,
            file,
            reads,
        } in reads
        {
            let core = core.clone();
            reader.submit(Box::new(move || {
                let read_all = std::panic::AssertUnwindSafe(|| {
                    reads
                        .iter()
                        .map(|&(hash, slot)| {
                            let mut buf = vec![0u8; file.slot_bytes()];
                            (
                                hash,
                                slot,
                                file.read_block(slot.idx(), &mut buf).map(|()| buf),
                            )
                        })
                        .collect::<Vec<_>>()
                });
                // A panic inside the reads fails each of them (they are misses), so the
                // waiting allocation is still answered.
                let results = std::panic::catch_unwind(read_all).unwrap_or_else(|p| {
                    let why = crate::storage::disk::ReadError::Io(format!(
                        "disk reader failed: {}",
                        panic_message(&*p)
                    ));
                    reads
                        .iter()
                        .map(|&(h, s)| (h, s, Err(why.clone())))
                        .collect()
                });
                let mut st = core.state.lock();
                if st.is_closed() {
                    return;
                }
                st.finish_disk_read(ticket, results);
                let _ = core.commit(st, true);
            }));
        }
    }

    /// Injects a disk fault (tests). `InvalidArgument` without a disk tier or for a bad slot.
    pub fn inject_disk_fault(&self, fault: crate::storage::disk::Fault) -> Result<()> {
        let st = self.lock()?;
        let file = st
            .disk_file()
            .ok_or_else(|| Error::InvalidArgument("there is no disk tier".into()))?;
        if let crate::storage::disk::Fault::FlipByte { slot, offset } = fault {
            if slot >= file.num_slots() || offset >= file.slot_bytes() {
                return Err(Error::InvalidArgument(format!(
                    "no byte {offset} of slot {slot}"
                )));
            }
        }
        file.inject(fault);
        Ok(())
    }

    /// `flush`: `None` when every disk write issued so far has landed, else a ticket the
    /// disk workers answer once they have (`take_flush`; `cancel_ticket` withdraws it).
    /// Never blocks: the waiting is the event loop's.
    pub fn flush(&self) -> Result<Option<crate::waiters::Ticket>> {
        self.mutate(false, |st, _| Ok(st.flush()))
    }

    /// Tickets in any state (tests: nothing is left behind).
    pub fn num_tickets(&self) -> usize {
        self.state.lock().num_tickets()
    }

    /// The answer of a flush ticket (consumed): `Ok` once its writes landed, `Closed` if the
    /// engine closed first.
    pub fn take_flush(&self, t: crate::waiters::Ticket) -> Result<()> {
        self.mutate(false, |st, _| st.take_flush(t))
    }

    /// Blocks until every disk write handed to the workers has finished (tests, benches).
    pub fn wait_disk_idle(&self) -> Result<()> {
        loop {
            if !self.lock()?.disk_busy() {
                return Ok(());
            }
            crate::sync::poll_sleep(std::time::Duration::from_micros(200));
        }
    }
}
