//! Incidents: failures the engine gets over by itself, kept for the Python layer to log.
//!
//! A disk block that fails its checksum is a miss, a failed disk write an unused slot, KV
//! events nobody drained are dropped: each is counted in the stats and the call goes on. An
//! operator also wants a line in the log when it happens, so the engine records an
//! `Incident` here (and wakes the event loop); `ferrumkv` drains them and logs them through
//! `logging.getLogger("ferrumkv")`, rate-limited per kind. Nothing is recorded on a path that
//! did not fail.
//!
//! Bounded: at most `CAP` incidents wait; past that they are counted (`dropped`), never
//! kept. Cost: one `String` per failure.

use std::collections::VecDeque;

/// Incidents kept until drained.
pub const CAP: usize = 64;

/// One failure: its kind (a stable name, the log's rate-limit key) and what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incident {
    pub kind: &'static str,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct Incidents {
    queue: VecDeque<Incident>,
    dropped: u64,
}

impl Incidents {
    pub fn push(&mut self, kind: &'static str, message: String) {
        if self.queue.len() >= CAP {
            self.dropped += 1;
            return;
        }
        self.queue.push_back(Incident { kind, message });
    }

    /// The incidents since the last drain, oldest first, and how many did not fit.
    pub fn drain(&mut self) -> (Vec<Incident>, u64) {
        (
            self.queue.drain(..).collect(),
            std::mem::take(&mut self.dropped),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incidents_past_the_cap_are_counted_not_kept() {
        let mut i = Incidents::default();
        for n in 0..CAP + 3 {
            i.push("disk_write_error", format!("write {n}"));
        }
        let (kept, dropped) = i.drain();
        assert_eq!((kept.len(), dropped), (CAP, 3));
        assert_eq!(kept[0].message, "write 0");
        assert_eq!(i.drain(), (vec![], 0));
    }
}
