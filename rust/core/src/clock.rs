//! The engine's clock: monotonic seconds, or a manual clock that tests set exactly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone)]
pub enum Clock {
    Monotonic(Instant),
    /// Seconds as `f64` bits, set by `set`.
    Manual(Arc<AtomicU64>),
}

impl Default for Clock {
    fn default() -> Self {
        Clock::Monotonic(Instant::now())
    }
}

impl Clock {
    pub fn manual(start_s: f64) -> Self {
        Clock::Manual(Arc::new(AtomicU64::new(start_s.to_bits())))
    }

    pub fn now(&self) -> f64 {
        match self {
            Clock::Monotonic(t0) => t0.elapsed().as_secs_f64(),
            Clock::Manual(t) => f64::from_bits(t.load(Ordering::Relaxed)),
        }
    }

    /// Sets a manual clock; returns false for a monotonic one.
    pub fn set(&self, now_s: f64) -> bool {
        match self {
            Clock::Monotonic(_) => false,
            Clock::Manual(t) => {
                t.store(now_s.to_bits(), Ordering::Relaxed);
                true
            }
        }
    }
}
