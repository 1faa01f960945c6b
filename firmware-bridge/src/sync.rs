//! Clock synchronisation: maps host `CLOCK_MONOTONIC` onto the rig clock.
//!
//! Each ping/pong exchange bounds the clock offset from both sides. With
//! `o(t) = rig(t) - host(t)`, the ping reached the device after the host sent
//! it, so `dev_rx - host_send >= o(host_send) + min_latency`; the pong left the
//! device before the host received it, so `dev_tx - host_recv <= o(host_recv) -
//! min_latency`. The true offset line `o(t) = a + b t` runs between the two
//! point sets. The estimator picks the drift `b` that leaves the widest band
//! between them (a max-margin line, found by golden-section search of a concave
//! function) and puts the line in the middle of that band. Latency spikes only
//! push points away from the band, so they cannot move the estimate; and the
//! band's edges tighten as exchanges accumulate, far faster than averaging
//! midpoints would. Only the extreme points matter, so each short window of
//! host time keeps just its tightest upper and lower point. Pure: the caller
//! passes every time in.

use std::collections::VecDeque;

/// One ping/pong exchange. Device times are unwrapped rig-clock microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncSample {
    pub host_send_ns: u64,
    pub host_recv_ns: u64,
    pub dev_rx_us: u64,
    pub dev_tx_us: u64,
}

impl SyncSample {
    /// Round trip minus the device's own turnaround, in µs.
    pub fn rtt_us(&self) -> f64 {
        let host = self.host_recv_ns.saturating_sub(self.host_send_ns) as f64 / 1000.0;
        let dev = self.dev_tx_us.saturating_sub(self.dev_rx_us) as f64;
        (host - dev).max(0.0)
    }
}

/// The current host -> rig mapping: `rig_us = rig_ref_us + (host_us - host_ref_us) * (1 + drift)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClockFit {
    pub host_ref_us: f64,
    pub rig_ref_us: f64,
    /// Rig microseconds per host microsecond, minus one, in parts per million.
    pub drift_ppm: f64,
    /// Half the width of the band the exchanges leave for the offset line at
    /// the fitted drift, µs. The true mapping lies within this of the estimate
    /// (if the two directions' minimum latencies are equal); it includes the
    /// minimum one-way latency, so it is an upper bound, not a typical error.
    pub half_band_us: f64,
    /// Exchanges that built the fit.
    pub exchanges: usize,
    /// Shortest round trip seen, µs.
    pub min_rtt_us: f64,
}

impl ClockFit {
    /// Map a host `CLOCK_MONOTONIC` time (ns) to rig time (µs).
    pub fn host_to_rig_us(&self, host_ns: u64) -> f64 {
        let dx = host_ns as f64 / 1000.0 - self.host_ref_us;
        self.rig_ref_us + dx * (1.0 + self.drift_ppm * 1e-6)
    }

    /// Map a rig time (µs) to host `CLOCK_MONOTONIC` (ns).
    pub fn rig_to_host_ns(&self, rig_us: f64) -> f64 {
        let dy = rig_us - self.rig_ref_us;
        (self.host_ref_us + dy / (1.0 + self.drift_ppm * 1e-6)) * 1000.0
    }
}

/// The tightest bounds one window of host time contributed: `(host_us, offset_us)`.
#[derive(Debug, Clone, Copy)]
struct WindowBounds {
    index: u64,
    /// Lowest upper bound: from `(host_send, dev_rx - host_send)`.
    upper: (f64, f64),
    /// Highest lower bound: from `(host_recv, dev_tx - host_recv)`.
    lower: (f64, f64),
}

/// The estimator. See the module documentation.
#[derive(Debug, Clone)]
pub struct ClockSync {
    horizon_ns: u64,
    window_ns: u64,
    windows: VecDeque<WindowBounds>,
    fit: Option<ClockFit>,
    exchanges: u64,
    in_fit: usize,
    min_rtt_us: f64,
}

/// Range of `rig rate / host rate - 1` searched for the first estimate: a
/// device clock from 0.1 to 1000 times the host's, which covers real crystals
/// (±100 ppm), ceramic resonators (±5000 ppm) and the virtual rig running
/// faster than real time.
const FULL_BRACKET: (f64, f64) = (-0.9, 999.0);
/// Half-width of the bracket around the previous estimate.
const LOCAL_BRACKET: f64 = 2e-3;

/// Argument of the maximum of a concave function on `[l, r]` (golden section).
fn golden_max(f: &impl Fn(f64) -> f64, mut l: f64, mut r: f64, iterations: usize) -> f64 {
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut m1, mut m2) = (r - g * (r - l), l + g * (r - l));
    let (mut f1, mut f2) = (f(m1), f(m2));
    for _ in 0..iterations {
        if f1 < f2 {
            l = m1;
            m1 = m2;
            f1 = f2;
            m2 = l + g * (r - l);
            f2 = f(m2);
        } else {
            r = m2;
            m2 = m1;
            f2 = f1;
            m1 = r - g * (r - l);
            f1 = f(m1);
        }
    }
    (l + r) / 2.0
}

impl Default for ClockSync {
    fn default() -> Self {
        Self::new(120_000_000_000, 500_000_000)
    }
}

impl ClockSync {
    /// Fit over the last `horizon_ns` of host time, keeping the extreme points
    /// of each `window_ns`.
    pub fn new(horizon_ns: u64, window_ns: u64) -> Self {
        Self {
            horizon_ns: horizon_ns.max(1),
            window_ns: window_ns.max(1),
            windows: VecDeque::new(),
            fit: None,
            exchanges: 0,
            in_fit: 0,
            min_rtt_us: f64::INFINITY,
        }
    }

    /// Forget everything (the device rebooted and its clock restarted).
    pub fn clear(&mut self) {
        self.windows.clear();
        self.fit = None;
        self.in_fit = 0;
        self.min_rtt_us = f64::INFINITY;
    }

    /// Exchanges accepted since creation.
    pub fn exchanges(&self) -> u64 {
        self.exchanges
    }

    /// Add one exchange; returns the updated fit (`None` if the exchange was
    /// impossible: a reply before its request, or a negative turnaround).
    pub fn add(&mut self, s: SyncSample) -> Option<ClockFit> {
        if s.host_recv_ns < s.host_send_ns || s.dev_tx_us < s.dev_rx_us {
            return None;
        }
        self.exchanges += 1;
        self.in_fit += 1;
        self.min_rtt_us = self.min_rtt_us.min(s.rtt_us());
        let send_us = s.host_send_ns as f64 / 1000.0;
        let recv_us = s.host_recv_ns as f64 / 1000.0;
        let upper = (send_us, s.dev_rx_us as f64 - send_us);
        let lower = (recv_us, s.dev_tx_us as f64 - recv_us);
        let index = s.host_send_ns / self.window_ns;
        match self.windows.back_mut() {
            Some(w) if w.index == index => {
                // Tighter means closer to the offset line, so compare after
                // removing the current drift estimate (with a device clock
                // running at another rate, the raw offsets move fast).
                let b = self.fit.map_or(0.0, |f| f.drift_ppm * 1e-6);
                let detrend = |p: (f64, f64)| p.1 - b * p.0;
                if detrend(upper) < detrend(w.upper) {
                    w.upper = upper;
                }
                if detrend(lower) > detrend(w.lower) {
                    w.lower = lower;
                }
            }
            _ => self.windows.push_back(WindowBounds {
                index,
                upper,
                lower,
            }),
        }
        let oldest = s.host_send_ns.saturating_sub(self.horizon_ns) / self.window_ns;
        while self.windows.front().is_some_and(|w| w.index < oldest) {
            self.windows.pop_front();
        }
        self.refit(send_us);
        self.fit
    }

    /// The current fit, if any exchange has been seen.
    pub fn fit(&self) -> Option<ClockFit> {
        self.fit
    }

    fn refit(&mut self, now_us: f64) {
        if self.windows.is_empty() {
            self.fit = None;
            return;
        }
        // x relative to now keeps the arithmetic exact enough in f64.
        let uppers: Vec<(f64, f64)> = self
            .windows
            .iter()
            .map(|w| (w.upper.0 - now_us, w.upper.1))
            .collect();
        let lowers: Vec<(f64, f64)> = self
            .windows
            .iter()
            .map(|w| (w.lower.0 - now_us, w.lower.1))
            .collect();
        let band = |b: f64| {
            let hi = uppers
                .iter()
                .map(|&(x, y)| y - b * x)
                .fold(f64::INFINITY, f64::min);
            let lo = lowers
                .iter()
                .map(|&(x, y)| y - b * x)
                .fold(f64::NEG_INFINITY, f64::max);
            (hi, lo)
        };
        let width = |b: f64| {
            let (hi, lo) = band(b);
            hi - lo
        };
        let b = match (self.windows.len(), self.fit) {
            (0..=1, prev) => prev.map_or(0.0, |f| f.drift_ppm * 1e-6),
            // Near the previous estimate; widen the bracket if the optimum
            // sits on its edge (a changed clock, or a poor early estimate).
            (_, Some(prev)) if prev.exchanges > 1 => {
                let centre = prev.drift_ppm * 1e-6;
                let mut half = LOCAL_BRACKET;
                loop {
                    let (l, r) = (centre - half, centre + half);
                    let b = golden_max(&width, l, r, 48);
                    if (b - l).min(r - b) > half * 0.01 || half >= FULL_BRACKET.1 {
                        break b;
                    }
                    half *= 8.0;
                }
            }
            _ => golden_max(&width, FULL_BRACKET.0, FULL_BRACKET.1, 110),
        };
        let (hi, lo) = band(b);
        let offset = (hi + lo) / 2.0;
        self.fit = Some(ClockFit {
            host_ref_us: now_us,
            rig_ref_us: now_us + offset,
            drift_ppm: b * 1e6,
            half_band_us: (hi - lo) / 2.0,
            exchanges: self.in_fit,
            min_rtt_us: self.min_rtt_us,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The estimator against a randomly jittered link is tested in
    // `rig-sim/tests/clock_sync.rs`, beside the simulator's random numbers.

    #[test]
    fn ignores_impossible_samples() {
        let mut sync = ClockSync::default();
        let bad = SyncSample {
            host_send_ns: 10,
            host_recv_ns: 5,
            dev_rx_us: 0,
            dev_tx_us: 0,
        };
        assert!(sync.add(bad).is_none());
        assert!(sync.fit().is_none());
    }
}
