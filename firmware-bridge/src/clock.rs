//! The rig clock: the device's 32-bit microsecond counter unwrapped to 64 bits,
//! and the estimate that maps host `CLOCK_MONOTONIC` onto it.

/// Unwraps the device's 32-bit microsecond counter (which wraps every
/// 2^32 µs = 71.6 minutes) into a 64-bit count of microseconds.
///
/// Timestamps may arrive slightly out of order (an event queued in an interrupt
/// may carry an earlier time than the last lever sample sent), so each new value
/// is placed at the signed distance, within ±35.8 minutes, from the latest one
/// seen. A device reboot resets its counter; the link calls [`RigClock::reset`]
/// when it sees a new `Hello`, and the next value starts a new epoch.
#[derive(Debug, Clone, Default)]
pub struct RigClock {
    /// The latest unwrapped time, `None` before the first value.
    latest_us: Option<u64>,
    /// Added to every unwrapped time: where the current epoch starts on the
    /// continuous rig clock (non-zero after a device reboot).
    epoch_offset_us: u64,
    wraps: u64,
}

impl RigClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Unwrap one device timestamp. Never goes back by more than 2^31 µs from
    /// the latest value, and never below zero.
    pub fn unwrap(&mut self, t32: u32) -> u64 {
        let t = match self.latest_us {
            None => u64::from(t32),
            Some(latest) => {
                let delta = t32.wrapping_sub(latest as u32) as i32;
                let t = latest.saturating_add_signed(i64::from(delta));
                if (t >> 32) > (latest >> 32) {
                    self.wraps += 1;
                }
                t
            }
        };
        if !self.latest_us.is_some_and(|l| t <= l) {
            self.latest_us = Some(t);
        }
        t + self.epoch_offset_us
    }

    /// Unwrap without remembering the value (for a timestamp that may be older
    /// than everything seen, e.g. a delayed acknowledgement).
    pub fn peek(&self, t32: u32) -> u64 {
        match self.latest_us {
            None => u64::from(t32) + self.epoch_offset_us,
            Some(latest) => {
                let delta = t32.wrapping_sub(latest as u32) as i32;
                latest.saturating_add_signed(i64::from(delta)) + self.epoch_offset_us
            }
        }
    }

    /// The device's counter restarted (reboot). Later times continue after
    /// `resume_at_us` on the rig clock, so rig time never goes backwards within
    /// a session; the gap between is reported by the link.
    pub fn reset(&mut self, resume_at_us: u64) {
        self.epoch_offset_us = resume_at_us;
        self.latest_us = None;
    }

    /// The latest unwrapped time, if any.
    pub fn latest_us(&self) -> Option<u64> {
        self.latest_us.map(|t| t + self.epoch_offset_us)
    }

    /// How many times the 32-bit counter has wrapped in this epoch.
    pub fn wraps(&self) -> u64 {
        self.wraps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwraps_across_the_wrap() {
        let mut c = RigClock::new();
        assert_eq!(c.unwrap(u32::MAX - 10), u64::from(u32::MAX - 10));
        assert_eq!(c.unwrap(5), (1u64 << 32) + 5);
        assert_eq!(c.wraps(), 1);
        // A slightly older timestamp from before the wrap stays before it.
        assert_eq!(c.unwrap(u32::MAX - 3), u64::from(u32::MAX - 3));
        assert_eq!(c.latest_us(), Some((1u64 << 32) + 5));
        // Several wraps in a row, in steps of 20 minutes.
        let step = 20 * 60 * 1_000_000u64;
        let mut t = (1u64 << 32) + 5;
        for _ in 0..20 {
            t += step;
            assert_eq!(c.unwrap(t as u32), t);
        }
        assert_eq!(c.wraps(), t >> 32);
    }

    #[test]
    fn never_negative() {
        let mut c = RigClock::new();
        assert_eq!(c.unwrap(10), 10);
        assert_eq!(c.unwrap(u32::MAX), 0, "a value 'before zero' saturates");
    }

    #[test]
    fn reset_starts_a_new_epoch() {
        let mut c = RigClock::new();
        c.unwrap(3_000_000);
        c.reset(3_000_500);
        assert_eq!(c.unwrap(100), 3_000_600);
        assert_eq!(c.peek(50), 3_000_550);
    }
}
