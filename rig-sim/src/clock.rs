//! The virtual rig's clocks and its link latency.
//!
//! Three times meet in the simulator. **Host time** is `CLOCK_MONOTONIC` on the
//! PC running it. **True time** is the simulated world's time: host time since
//! the simulator started, multiplied by `speed` (so `--speed 10` runs the world
//! ten times faster than the wall clock). The **device clock** is the
//! microcontroller's free-running microsecond counter: it starts at an offset and
//! runs at `1 + drift_ppm * 1e-6` device microseconds per true microsecond, and
//! the wire carries it truncated to 32 bits. The ground-truth log records true
//! time and device time side by side, which is what a clock-sync estimate is
//! checked against.

use std::time::Duration;

use crate::rng::Rng;

/// Maps the simulator's true time onto host time and onto the device clock.
///
/// `device_us(true_us) = offset_us + floor(true_us * (1 + drift_ppm * 1e-6))`
/// and `true_us = host_elapsed * speed`. The device counter on the wire is
/// `device_us as u32`, so it wraps every 2^32 µs (71.6 minutes); start it near
/// the wrap with `offset_us = 2^32 - 5_000_000` to test the host's unwrapping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimClock {
    /// Device counter (µs) at true time zero.
    pub offset_us: u64,
    /// Device oscillator error: device µs per true µs, minus one, in parts per
    /// million. Positive means the device clock runs fast.
    pub drift_ppm: f64,
    /// True seconds per host second (1 = real time).
    pub speed: f64,
}

impl Default for SimClock {
    fn default() -> Self {
        Self {
            offset_us: 0,
            drift_ppm: 0.0,
            speed: 1.0,
        }
    }
}

impl SimClock {
    pub fn new(offset_us: u64, drift_ppm: f64, speed: f64) -> Self {
        Self {
            offset_us,
            drift_ppm,
            speed,
        }
    }

    /// Device µs per true µs.
    pub fn rate(&self) -> f64 {
        1.0 + self.drift_ppm * 1e-6
    }

    /// True time (µs since the simulator started) after `host_elapsed` of host
    /// time.
    pub fn true_us(&self, host_elapsed: Duration) -> f64 {
        host_elapsed.as_secs_f64() * 1e6 * self.speed
    }

    /// True time (µs) at host `CLOCK_MONOTONIC` time `host_ns`, for a
    /// simulator that started at `start_host_ns` (see
    /// `SimHandle::start_host_ns` and the truth log's `sim_start` row).
    pub fn true_us_at_host_ns(&self, host_ns: u64, start_host_ns: u64) -> f64 {
        (i128::from(host_ns) - i128::from(start_host_ns)) as f64 / 1e3 * self.speed
    }

    /// Host time elapsed since the start when true time reaches `true_us`.
    pub fn host_elapsed(&self, true_us: f64) -> Duration {
        Duration::from_secs_f64((true_us / 1e6 / self.speed).max(0.0))
    }

    /// The device counter, unwrapped to 64 bits, at true time `true_us`
    /// (which must be >= 0). The counter reads whole microseconds: it is the
    /// floor of the exact value.
    pub fn device_us(&self, true_us: f64) -> u64 {
        // The tiny epsilon makes `device_us(true_at_device(d)) == d` despite
        // rounding in the division.
        let ticks = (true_us.max(0.0) * self.rate() + 1e-6).floor();
        self.offset_us.saturating_add(ticks as u64)
    }

    /// The device counter as it goes on the wire (truncated to 32 bits).
    pub fn device_u32(&self, true_us: f64) -> u32 {
        self.device_us(true_us) as u32
    }

    /// The true time (µs) at which the unwrapped device counter reaches
    /// `device_us`. Negative if that is before true time zero.
    pub fn true_at_device(&self, device_us: u64) -> f64 {
        let ticks = i128::from(device_us) - i128::from(self.offset_us);
        ticks as f64 / self.rate()
    }
}

/// One-way latency of the serial link, in host microseconds: a base, a uniform
/// jitter on top of it, and an occasional spike (a USB hiccup, a busy host).
///
/// `sample = base_us + jitter_us * U[0, 1)`, plus, with probability
/// `spike_prob`, `spike_us * U[0.5, 1.5)`. So the minimum latency is exactly
/// `base_us`, the jitter is bounded, and spikes are of the order of `spike_us`.
/// The simulator draws one sample per device frame and per chunk of host bytes,
/// and never lets a later frame overtake an earlier one (a serial line does not
/// reorder).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LatencyModel {
    pub base_us: f64,
    pub jitter_us: f64,
    /// Probability per sample of a spike, 0..=1.
    pub spike_prob: f64,
    pub spike_us: f64,
}

impl LatencyModel {
    /// No latency at all.
    pub const ZERO: Self = Self {
        base_us: 0.0,
        jitter_us: 0.0,
        spike_prob: 0.0,
        spike_us: 0.0,
    };

    /// Draw one latency, µs (never negative).
    pub fn sample(&self, rng: &mut Rng) -> f64 {
        let mut l = self.base_us;
        if self.jitter_us > 0.0 {
            l += self.jitter_us * rng.uniform();
        }
        if self.spike_prob > 0.0 && self.spike_us > 0.0 && rng.chance(self.spike_prob) {
            l += self.spike_us * rng.range(0.5, 1.5);
        }
        l.max(0.0)
    }

    /// True when every sample is zero.
    pub fn is_zero(&self) -> bool {
        self.base_us <= 0.0
            && self.jitter_us <= 0.0
            && (self.spike_prob <= 0.0 || self.spike_us <= 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_clock_offset_drift_and_inverse() {
        let c = SimClock::new(1_000, 100.0, 2.0);
        assert_eq!(c.true_us(Duration::from_secs(1)), 2_000_000.0);
        assert_eq!(c.device_us(0.0), 1_000);
        // 100 ppm fast: 1 s of true time is 1_000_100 device µs.
        assert_eq!(c.device_us(1_000_000.0), 1_000 + 1_000_100);
        for d in [1_000u64, 1_001, 123_456, 9_876_543_210] {
            assert_eq!(c.device_us(c.true_at_device(d)), d);
        }
        assert!(c.true_at_device(0) < 0.0);
        assert_eq!(c.host_elapsed(2_000_000.0), Duration::from_secs(1));
        let start = 5_000_000_000_000_000u64;
        assert_eq!(c.true_us_at_host_ns(start + 1_500_000, start), 3_000.0);
    }

    #[test]
    fn counter_wraps_on_the_wire() {
        let c = SimClock::new((1u64 << 32) - 5_000_000, 0.0, 1.0);
        assert_eq!(c.device_u32(4_000_000.0), u32::MAX - 999_999);
        assert_eq!(c.device_u32(6_000_000.0), 1_000_000);
        assert_eq!(c.device_us(6_000_000.0), (1u64 << 32) + 1_000_000);
    }

    #[test]
    fn latency_bounds() {
        let m = LatencyModel {
            base_us: 200.0,
            jitter_us: 50.0,
            spike_prob: 0.1,
            spike_us: 5_000.0,
        };
        let mut rng = Rng::new(3);
        let samples: Vec<f64> = (0..10_000).map(|_| m.sample(&mut rng)).collect();
        assert!(samples.iter().all(|l| (200.0..7_750.0).contains(l)));
        let spikes = samples.iter().filter(|&&l| l >= 250.0).count();
        assert!((800..1200).contains(&spikes), "{spikes}");
        assert_eq!(LatencyModel::ZERO.sample(&mut rng), 0.0);
        assert!(LatencyModel::ZERO.is_zero() && !m.is_zero());
    }
}
