//! Block copies between tiers: coalesced byte runs, and a worker that runs big copies.
//!
//! `Runs` collects `(src_offset, dst_offset, len)` copies and merges a run that continues the
//! previous one in both source and destination, so contiguous block runs become one copy (executed by `storage::copy_runs`).
//! `Copier` is one worker thread that executes copy jobs off the caller's thread (so an
//! event loop never blocks on a large swap); a job reports completion through the engine's
//! eventfd, never by calling Python. Dropping the `Copier` finishes queued jobs and joins.

use crate::sync::mpsc::{channel, Sender};
use crate::sync::thread::JoinHandle;
use crate::sync::Mutex;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Runs {
    pub runs: Vec<(usize, usize, usize)>,
}

impl Runs {
    pub fn push(&mut self, src: usize, dst: usize, len: usize) {
        if let Some(last) = self.runs.last_mut() {
            if last.0 + last.2 == src && last.1 + last.2 == dst {
                last.2 += len;
                return;
            }
        }
        self.runs.push((src, dst, len));
    }

    pub fn bytes(&self) -> usize {
        self.runs.iter().map(|r| r.2).sum()
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// One background thread executing copy jobs in submission order.
pub struct Copier {
    tx: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Default for Copier {
    fn default() -> Self {
        Self::new()
    }
}

impl Copier {
    pub fn new() -> Self {
        let (tx, rx) = channel::<Job>();
        let thread = crate::sync::thread::Builder::new()
            .name("ferrumkv-copy".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .expect("spawning the copy thread");
        Copier {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Queues a job; false if the copier was shut down.
    pub fn submit(&self, job: Job) -> bool {
        let tx = self.tx.lock();
        match tx.as_ref() {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        }
    }

    /// Waits until every job queued before this call has finished (false if shut down).
    pub fn flush(&self) -> bool {
        let (tx, rx) = channel::<()>();
        self.submit(Box::new(move || {
            let _ = tx.send(());
        })) && rx.recv().is_ok()
    }

    /// Finishes every queued job and joins the thread (idempotent).
    pub fn shutdown(&self) {
        drop(self.tx.lock().take());
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn adjacent_runs_coalesce() {
        let mut r = Runs::default();
        r.push(0, 100, 10);
        r.push(10, 110, 10);
        r.push(30, 120, 10);
        r.push(40, 130, 5);
        assert_eq!(r.runs, vec![(0, 100, 20), (30, 120, 15)]);
        assert_eq!(r.bytes(), 35);
    }

    #[test]
    fn runs_jobs_in_order() {
        let c = Copier::new();
        let n = Arc::new(AtomicUsize::new(0));
        for i in 0..100 {
            let n = n.clone();
            assert!(c.submit(Box::new(move || assert_eq!(
                n.fetch_add(1, Ordering::SeqCst),
                i
            ))));
        }
        c.shutdown();
        assert_eq!(n.load(Ordering::SeqCst), 100);
        assert!(!c.submit(Box::new(|| {})));
    }
}
