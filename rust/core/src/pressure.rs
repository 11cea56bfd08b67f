//! Memory pressure levels from watermarks.
//!
//! The level comes from the device tier's reclaimable ratio `free / total` (free includes
//! evictable blocks): `>= low_watermark` LOW, below it HIGH, below `high_watermark`
//! CRITICAL; a request waiting for blocks also makes it CRITICAL. `update` reports a change
//! of level only, so subscribers hear each transition once.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    Low = 0,
    High = 1,
    Critical = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PressureEvent {
    pub level: Level,
    pub previous: Level,
    pub free_blocks: usize,
    pub evictable_blocks: usize,
    pub total_blocks: usize,
    pub needed_blocks: usize,
}

#[derive(Debug)]
pub struct Pressure {
    low_watermark: f64,
    high_watermark: f64,
    pub level: Level,
}

impl Pressure {
    pub fn new(low_watermark: f64, high_watermark: f64) -> Self {
        Pressure {
            low_watermark,
            high_watermark,
            level: Level::Low,
        }
    }

    pub fn level_for(&self, free: usize, total: usize, waiting: bool) -> Level {
        let ratio = free as f64 / total as f64;
        if waiting || ratio < self.high_watermark {
            Level::Critical
        } else if ratio < self.low_watermark {
            Level::High
        } else {
            Level::Low
        }
    }

    /// Recomputes the level; returns the transition if it changed.
    pub fn update(
        &mut self,
        free: usize,
        evictable: usize,
        total: usize,
        needed: usize,
    ) -> Option<PressureEvent> {
        let level = self.level_for(free, total, needed > 0);
        if level == self.level {
            return None;
        }
        let previous = std::mem::replace(&mut self.level, level);
        Some(PressureEvent {
            level,
            previous,
            free_blocks: free,
            evictable_blocks: evictable,
            total_blocks: total,
            needed_blocks: needed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_transitions() {
        let mut p = Pressure::new(0.3, 0.1);
        assert_eq!(p.update(30, 0, 100, 0), None);
        let e = p.update(29, 5, 100, 0).unwrap();
        assert_eq!(
            (e.previous, e.level, e.evictable_blocks),
            (Level::Low, Level::High, 5)
        );
        assert_eq!(p.update(10, 0, 100, 0), None, "10% is still HIGH");
        assert_eq!(p.update(9, 0, 100, 0).unwrap().level, Level::Critical);
        assert_eq!(
            p.update(50, 0, 100, 3).map(|e| e.level),
            None,
            "waiting keeps it CRITICAL"
        );
        assert_eq!(p.update(50, 0, 100, 0).unwrap().level, Level::Low);
    }
}
