//! The synchronization primitives the engine and its worker threads use, from one place, so
//! a model checker can take them over.
//!
//! Design: every lock, condition variable, atomic, channel and thread that takes part in a
//! handshake between the caller's thread and a worker (the engine's state lock and test
//! hooks, the swap `Copier`, the `DiskWorkers` pool and the disk file's per-slot checksum
//! records) is imported from here, never from `std::sync`, `std::thread` or `parking_lot`.
//! - Normally this module re-exports `parking_lot`'s `Mutex`, `MutexGuard` and `Condvar`
//!   (no poisoning: `lock()` returns the guard) and `std`'s atomics, `mpsc`, `Arc`, `Weak`
//!   and threads: zero cost, the exact types used before this module existed.
//! - With the cargo feature `shuttle` they are `shuttle::sync` / `shuttle::thread`, whose
//!   every operation is a point where shuttle's scheduler may switch threads, so a test under
//!   `shuttle::check_random` / `check_pct` (`tests/shuttle_handshake.rs`) explores the
//!   interleavings of the real engine code and reports the schedule of any failure or
//!   deadlock. shuttle's `Mutex` poisons like std's; the thin wrappers below keep
//!   `parking_lot`'s API (`lock()` returns a guard, a poisoned lock is taken anyway, and
//!   `Condvar::wait` takes `&mut MutexGuard`), so call sites are the same in both builds.
//! - `poll_sleep` is the pause of a polling loop (a flag another thread clears): a real
//!   sleep normally, a `yield_now` under shuttle, which does not model time, and whose PCT
//!   scheduler lowers a yielding thread's priority so a spinning poller cannot starve the
//!   thread it waits for.
//!
//! Not covered: `Arc`/`Weak` are std's in both builds (shuttle re-exports them); the
//! manual `Clock`'s atomic (read-only under the lock), CUDA stream polling, and the eventfd
//! (`notify`: plain syscalls on a non-blocking fd, which nothing waits on inside the engine)
//! stay as they are. With `shuttle` on, the engine must run inside a shuttle test: shuttle's
//! primitives panic outside one, so the crate's ordinary unit tests are not run with it.

#[cfg(not(feature = "shuttle"))]
pub use parking_lot::{Condvar, Mutex, MutexGuard};
#[cfg(not(feature = "shuttle"))]
pub use std::sync::{atomic, mpsc, Arc, Weak};

/// Threads: `spawn`, `Builder`, `JoinHandle`, `current`, `yield_now`, `sleep`.
#[cfg(not(feature = "shuttle"))]
pub mod thread {
    pub use std::thread::{current, sleep, spawn, yield_now, Builder, JoinHandle};
}

/// The pause between two polls of a flag another thread will change.
#[cfg(not(feature = "shuttle"))]
pub fn poll_sleep(d: std::time::Duration) {
    std::thread::sleep(d);
}

#[cfg(feature = "shuttle")]
pub use self::model::{Condvar, Mutex, MutexGuard};
#[cfg(feature = "shuttle")]
pub use shuttle::sync::{atomic, mpsc, Arc, Weak};

/// Threads: `spawn`, `Builder`, `JoinHandle`, `current`, `yield_now`, `sleep` (shuttle's).
#[cfg(feature = "shuttle")]
pub mod thread {
    pub use shuttle::thread::{current, sleep, spawn, yield_now, Builder, JoinHandle};
}

/// The pause between two polls of a flag another thread will change: a yield, so the
/// scheduler runs another thread (shuttle does not model time).
#[cfg(feature = "shuttle")]
pub fn poll_sleep(_d: std::time::Duration) {
    shuttle::thread::yield_now();
}

/// `parking_lot`-shaped wrappers around shuttle's poisoning `Mutex` and `Condvar`.
#[cfg(feature = "shuttle")]
mod model {
    use std::fmt;
    use std::ops::{Deref, DerefMut};
    use std::sync::PoisonError;

    /// A mutex whose `lock()` returns the guard (a lock poisoned by a panicking holder is
    /// taken anyway, as `parking_lot` does; the panic itself already fails the test).
    #[derive(Default)]
    pub struct Mutex<T>(shuttle::sync::Mutex<T>);

    /// The guard of a locked `Mutex`. It holds shuttle's guard except while a
    /// `Condvar::wait` has lent it out (and then nothing can reach this guard).
    pub struct MutexGuard<'a, T>(Option<shuttle::sync::MutexGuard<'a, T>>);

    impl<T> Mutex<T> {
        #[track_caller]
        pub const fn new(value: T) -> Self {
            Mutex(shuttle::sync::Mutex::new(value))
        }

        pub fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard(Some(self.0.lock().unwrap_or_else(PoisonError::into_inner)))
        }
    }

    impl<T: fmt::Debug> fmt::Debug for Mutex<T> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.0.fmt(f)
        }
    }

    const LENT: &str = "a guard is lent out only during Condvar::wait";

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;

        fn deref(&self) -> &T {
            self.0.as_ref().expect(LENT)
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.0.as_mut().expect(LENT)
        }
    }

    /// A condition variable whose `wait` takes the guard by `&mut` (as `parking_lot`'s).
    #[derive(Default)]
    pub struct Condvar(shuttle::sync::Condvar);

    impl Condvar {
        pub fn new() -> Self {
            Condvar(shuttle::sync::Condvar::new())
        }

        /// Unlocks, waits for a notification, and locks again (spurious wakeups allowed).
        pub fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            let inner = guard.0.take().expect(LENT);
            let inner = self.0.wait(inner).unwrap_or_else(PoisonError::into_inner);
            guard.0 = Some(inner);
        }

        /// `wait` for at most `timeout` (shuttle may also time out at once); whether it
        /// timed out.
        pub fn wait_for<T>(
            &self,
            guard: &mut MutexGuard<'_, T>,
            timeout: std::time::Duration,
        ) -> bool {
            let inner = guard.0.take().expect(LENT);
            let (inner, result) = self
                .0
                .wait_timeout(inner, timeout)
                .unwrap_or_else(PoisonError::into_inner);
            guard.0 = Some(inner);
            result.timed_out()
        }

        pub fn notify_one(&self) {
            self.0.notify_one();
        }

        pub fn notify_all(&self) {
            self.0.notify_all();
        }
    }
}
