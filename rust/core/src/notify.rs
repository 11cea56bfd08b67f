//! Completion signalling without touching Python: an eventfd that the Python layer watches.
//!
//! Any thread that completes a waiter or queues a pressure event calls `signal()`, which adds
//! 1 to the eventfd counter. The event loop (asyncio `add_reader`, trio `wait_readable`) sees
//! the fd readable, calls `clear()` and drains the engine's notifications on its own thread.
//! No Rust thread ever calls into Python.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::error::{Error, Result};

#[derive(Debug)]
pub struct Notifier {
    fd: OwnedFd,
}

impl Notifier {
    pub fn new() -> Result<Self> {
        // SAFETY: plain syscall; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Io(format!(
                "eventfd: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Notifier { fd })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Makes the fd readable (cheap; coalesces with earlier signals).
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. A full counter
        // (EAGAIN) still leaves the fd readable, which is all a signal needs.
        unsafe { libc::write(self.fd(), (&raw const one).cast(), 8) };
    }

    /// Resets the fd to not readable.
    pub fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our own non-blocking eventfd; EAGAIN
        // (nothing pending) is fine.
        unsafe { libc::read(self.fd(), (&raw mut v).cast(), 8) };
    }

    /// Whether a signal is pending (for tests).
    pub fn is_signalled(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd without blocking.
        unsafe { libc::poll(&raw mut p, 1, 0) == 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_and_clear() {
        let n = Notifier::new().unwrap();
        assert!(!n.is_signalled());
        n.signal();
        n.signal();
        assert!(n.is_signalled());
        n.clear();
        assert!(!n.is_signalled());
    }
}
