//! Online dF/F: per-frame ROI fluorescence, neuropil correction and a causal
//! baseline.
//!
//! For every frame (one channel, `height x width` u16, row-major):
//!
//! 1. `F_raw[k]` = mean of ROI `k`'s pixels, `Fneu[k]` = mean of its neuropil
//!    pixels (0 when the neuropil mask is empty). Pixel lists are precompiled
//!    into runs of contiguous flat indices, so each mean is a few contiguous
//!    slice sums (vectorised), no per-pixel index lookups.
//! 2. `F[k] = F_raw[k] - c * Fneu[k]` (c = neuropil coefficient, suite2p 0.7).
//! 3. A causal baseline `F0[k]` over a trailing window of `W` frames:
//!    * smoothing: a Gaussian of `sigma` frames truncated at
//!      `L = ceil(3 * sigma)` frames each side, applied *centred on frame
//!      t - L* (so it uses frames t-2L..=t only: exactly the offline centred
//!      smoothing, delayed by L frames). Before the first 2L frames the history
//!      is padded with the first value; a dropped frame's period holds the F
//!      of the frame before it, so the kernel spans frame periods of rig time;
//!    * `maximin`: trailing minimum over the last `W` smoothed values, then
//!      trailing maximum over the last `W` of those minima (monotone deques,
//!      O(1) amortised per frame per ROI). The offline suite2p filters are
//!      centred (frames t-W..t+W); ours cover frames t-2W-L..t;
//!    * `percentile`: the `p`-th percentile (linear interpolation between
//!      order statistics, as `numpy.percentile`) of the last `W` smoothed
//!      values, kept in a sorted window updated by one binary search and one
//!      memmove per frame.
//!
//!    Warm-up: with `maximin`, until `2W - 1` frame periods have passed each
//!    of the two stages spans half of the periods so far (an expanding
//!    window: F0 is the maximin of everything seen, and follows the data
//!    from the first frames instead of staying at the first value); with
//!    `percentile`, the window holds the frames there are. Windows count
//!    frame periods, dropped ones too ([`OnlineDff::skip`]): a window is `W`
//!    periods of the nominal frame rate, i.e. `window_s` of rig time, however
//!    many frames arrived (the percentile is taken over the frames received
//!    in that time; a value older than the window leaves it, even across a
//!    long gap).
//! 4. `dF/F = (F - F0') / F0'` with `F0' = max(F0, f0_floor)`: a baseline at or
//!    below zero (possible after neuropil subtraction) is replaced by the small
//!    positive floor `f0_floor` (default 1.0, i.e. one ADC count) so dF/F stays
//!    finite; such ROIs give large values and should be judged by eye.
//!
//! No allocation happens per frame: all buffers are sized in [`OnlineDff::new`].

use std::collections::VecDeque;

pub use rig_config::BaselineMethod;
use rig_config::BaselineSection;

use super::rois::RoiSet;

/// Parameters of the causal baseline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaselineParams {
    /// `Maximin` or `Percentile`.
    pub method: BaselineMethod,
    /// Trailing window, frames (>= 1).
    pub window_frames: usize,
    /// Percentile for `Percentile`, 0..100.
    pub percentile: f64,
    /// Gaussian smoothing sigma, frames (0 = none).
    pub sigma_frames: f64,
}

impl BaselineParams {
    /// From `[imaging.baseline]` and the frame rate.
    pub fn from_config(sec: &BaselineSection, frame_rate_hz: f64) -> Self {
        Self {
            method: sec.method,
            window_frames: ((sec.window_s * frame_rate_hz).round() as usize).max(1),
            percentile: sec.percentile,
            sigma_frames: sec.smoothing_sigma_frames,
        }
    }
}

/// Runs of contiguous flat pixel indices, CSR-grouped per ROI.
#[derive(Debug, Clone, Default)]
struct Runs {
    /// (start, len) runs.
    runs: Vec<(u32, u32)>,
    /// ROI k's runs are `runs[start[k]..start[k + 1]]`.
    start: Vec<u32>,
    /// 1 / pixel count (0 when empty).
    inv_n: Vec<f32>,
}

impl Runs {
    fn build<'a>(lists: impl Iterator<Item = &'a [u32]>) -> Runs {
        // Cap a run at 65536 pixels so a u32 sum of u16 values cannot overflow.
        const MAX_RUN: u32 = 1 << 16;
        let mut r = Runs {
            start: vec![0],
            ..Runs::default()
        };
        for list in lists {
            let mut sorted = list.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            let mut mine = 0usize;
            for &p in &sorted {
                match r.runs.last_mut() {
                    Some((s, l)) if mine > 0 && *s + *l == p && *l < MAX_RUN => *l += 1,
                    _ => {
                        r.runs.push((p, 1));
                        mine += 1;
                    }
                }
            }
            r.start.push(r.runs.len() as u32);
            r.inv_n.push(if sorted.is_empty() {
                0.0
            } else {
                1.0 / sorted.len() as f32
            });
        }
        r
    }

    #[inline]
    fn mean(&self, k: usize, frame: &[u16]) -> f32 {
        let (a, b) = (self.start[k] as usize, self.start[k + 1] as usize);
        let mut acc = 0u64;
        for &(s, l) in &self.runs[a..b] {
            let sl = &frame[s as usize..(s + l) as usize];
            acc += u64::from(sl.iter().map(|&v| u32::from(v)).sum::<u32>());
        }
        (acc as f64 * f64::from(self.inv_n[k])) as f32
    }
}

/// The per-ROI baseline state.
#[derive(Debug)]
enum BaselineState {
    Maximin {
        /// Monotone (frame, value) deques: trailing min of smoothed values.
        min_q: Vec<VecDeque<(u64, f32)>>,
        /// Trailing max of the minima.
        max_q: Vec<VecDeque<(u64, f32)>>,
    },
    Percentile {
        /// The window's smoothed values in arrival order, a FIFO of up to
        /// W slots: `[slot * n + k]`, oldest at `head`.
        ring: Vec<f32>,
        /// Frame period (`slot_t`) of each FIFO slot.
        times: Vec<u64>,
        head: usize,
        len: usize,
        /// Sorted window per ROI, `[k * W ..][..len]`.
        sorted: Vec<f32>,
        /// Fractional rank of the percentile, 0..=1.
        q: f64,
    },
}

/// Online fluorescence and dF/F for a set of ROIs.
#[derive(Debug)]
pub struct OnlineDff {
    n: usize,
    npix: usize,
    roi: Runs,
    neu: Runs,
    coef: f32,
    f0_floor: f32,
    window: usize,
    /// Gaussian kernel (length 2L+1).
    kernel: Vec<f32>,
    /// History of F for smoothing, `[slot * n + k]`, K = kernel.len() slots.
    hist: Vec<f32>,
    smooth: Vec<f32>,
    state: BaselineState,
    raw_f: Vec<f32>,
    fneu: Vec<f32>,
    fcorr: Vec<f32>,
    f0: Vec<f32>,
    /// Frame periods so far, received or dropped ([`Self::skip`]): the
    /// maximin windows' clock, so they span time, not received frames.
    slot_t: u64,
    /// Frames pushed so far.
    t: u64,
}

impl OnlineDff {
    /// Prepare for `rois` with the given baseline and neuropil coefficient.
    /// Use `neuropil_coefficient = 0` to disable neuropil subtraction.
    pub fn new(rois: &RoiSet, params: &BaselineParams, neuropil_coefficient: f64) -> OnlineDff {
        let mut d = OnlineDff::for_traces(rois.rois.len(), params);
        d.npix = rois.width * rois.height;
        d.roi = Runs::build(rois.rois.iter().map(|r| r.pixels.as_slice()));
        d.neu = Runs::build(rois.rois.iter().map(|r| r.neuropil.as_slice()));
        d.coef = neuropil_coefficient as f32;
        if let Some(&(s, l)) = d
            .roi
            .runs
            .iter()
            .chain(d.neu.runs.iter())
            .max_by_key(|r| r.0 + r.1)
        {
            assert!(
                (s + l) as usize <= d.npix,
                "ROI pixel index {} outside a {}x{} frame",
                s + l - 1,
                rois.width,
                rois.height
            );
        }
        d
    }

    /// Baseline/dF/F only, for `n` traces fed through [`OnlineDff::push_f`].
    pub fn for_traces(n: usize, params: &BaselineParams) -> OnlineDff {
        let window = params.window_frames.max(1);
        let sigma = params.sigma_frames.max(0.0);
        let half = (3.0 * sigma).ceil() as usize;
        let mut kernel: Vec<f32> = (0..=2 * half)
            .map(|i| {
                let x = i as f64 - half as f64;
                if sigma > 0.0 {
                    (-0.5 * x * x / (sigma * sigma)).exp() as f32
                } else {
                    1.0
                }
            })
            .collect();
        let s: f32 = kernel.iter().sum();
        for k in &mut kernel {
            *k /= s;
        }
        let state = match params.method {
            BaselineMethod::Maximin => BaselineState::Maximin {
                min_q: (0..n)
                    .map(|_| VecDeque::with_capacity(window + 2))
                    .collect(),
                max_q: (0..n)
                    .map(|_| VecDeque::with_capacity(window + 2))
                    .collect(),
            },
            BaselineMethod::Percentile => BaselineState::Percentile {
                ring: vec![0.0; window * n],
                times: vec![0; window],
                head: 0,
                len: 0,
                sorted: vec![0.0; window * n],
                q: (params.percentile / 100.0).clamp(0.0, 1.0),
            },
        };
        OnlineDff {
            n,
            npix: 0,
            roi: Runs::default(),
            neu: Runs::default(),
            coef: 0.0,
            f0_floor: 1.0,
            window,
            hist: vec![0.0; kernel.len() * n],
            kernel,
            smooth: vec![0.0; n],
            state,
            raw_f: vec![0.0; n],
            fneu: vec![0.0; n],
            fcorr: vec![0.0; n],
            f0: vec![0.0; n],
            slot_t: 0,
            t: 0,
        }
    }

    /// Set the F0 floor used in dF/F (default 1.0, same units as F).
    pub fn set_f0_floor(&mut self, floor: f32) {
        self.f0_floor = floor;
    }

    /// Number of ROIs.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True when there are no ROIs.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Frames pushed so far.
    pub fn frames(&self) -> u64 {
        self.t
    }

    /// Latency of the smoothing, frames (L = ceil(3 sigma)).
    pub fn smoothing_delay_frames(&self) -> usize {
        self.kernel.len() / 2
    }

    /// Last frame's raw ROI means (before neuropil subtraction).
    pub fn raw_f(&self) -> &[f32] {
        &self.raw_f
    }

    /// Last frame's neuropil means.
    pub fn neuropil(&self) -> &[f32] {
        &self.fneu
    }

    /// Last frame's baseline F0 (before the floor).
    pub fn baseline(&self) -> &[f32] {
        &self.f0
    }

    /// One frame (one channel, row-major `height x width`). Writes the
    /// neuropil-corrected F (`F_raw - c * Fneu`) to `f_out` and dF/F to
    /// `dff_out`, one value per ROI.
    ///
    /// # Panics
    /// If `frame` is not `width * height` long or the outputs are not one
    /// value per ROI.
    pub fn push(&mut self, frame: &[u16], f_out: &mut [f32], dff_out: &mut [f32]) {
        assert_eq!(
            frame.len(),
            self.npix,
            "frame size does not match the ROI set"
        );
        assert_eq!(f_out.len(), self.n, "f_out must hold one value per ROI");
        for (k, out) in f_out.iter_mut().enumerate() {
            let f = self.roi.mean(k, frame);
            let fn_ = self.neu.mean(k, frame);
            self.raw_f[k] = f;
            self.fneu[k] = fn_;
            *out = f - self.coef * fn_;
        }
        self.fcorr.copy_from_slice(f_out);
        let mut fc = std::mem::take(&mut self.fcorr);
        self.push_f(&fc, dff_out);
        std::mem::swap(&mut self.fcorr, &mut fc);
    }

    /// Feed already-extracted (neuropil-corrected) F, one value per ROI, and
    /// get dF/F. `f` must be finite.
    ///
    /// # Panics
    /// If `f` or `dff_out` is not one value per ROI.
    pub fn push_f(&mut self, f: &[f32], dff_out: &mut [f32]) {
        let n = self.n;
        assert_eq!(f.len(), n, "f must hold one value per ROI");
        assert_eq!(dff_out.len(), n, "dff_out must hold one value per ROI");
        let kl = self.kernel.len();
        // 1. History and smoothing (frame-major so the inner loop vectorises).
        // The history is indexed by frame period, so a dropped frame's slot
        // holds the frame before it (see `skip`) and the kernel spans
        // `2L + 1` periods of rig time.
        if self.t == 0 {
            for slot in 0..kl {
                self.hist[slot * n..(slot + 1) * n].copy_from_slice(f);
            }
        } else {
            let slot = (self.slot_t % kl as u64) as usize;
            self.hist[slot * n..(slot + 1) * n].copy_from_slice(f);
        }
        self.smooth.iter_mut().for_each(|s| *s = 0.0);
        for (j, &w) in self.kernel.iter().enumerate() {
            let row = &self.hist[j * n..(j + 1) * n];
            for (s, &v) in self.smooth.iter_mut().zip(row) {
                *s += w * v;
            }
        }
        // 2. Baseline over the trailing window.
        let w = self.window as u64;
        match &mut self.state {
            BaselineState::Maximin { min_q, max_q } => {
                // Frame periods (dropped ones too), and the window: while
                // fewer than 2W - 1 periods have passed, each of the two
                // stages covers half of what there is (an expanding window
                // over all the data so far, rather than a baseline held at
                // the first value until the window fills).
                let t = self.slot_t;
                let w = w.min(t / 2 + 1);
                for k in 0..n {
                    let s = self.smooth[k];
                    let q = &mut min_q[k];
                    while q.back().is_some_and(|b| b.1 >= s) {
                        q.pop_back();
                    }
                    q.push_back((t, s));
                    while q.front().is_some_and(|f| f.0 + w <= t) {
                        q.pop_front();
                    }
                    let m = q.front().map_or(s, |f| f.1);
                    let q = &mut max_q[k];
                    while q.back().is_some_and(|b| b.1 <= m) {
                        q.pop_back();
                    }
                    q.push_back((t, m));
                    while q.front().is_some_and(|f| f.0 + w <= t) {
                        q.pop_front();
                    }
                    self.f0[k] = q.front().map_or(m, |f| f.1);
                }
            }
            BaselineState::Percentile {
                ring,
                times,
                head,
                len,
                sorted,
                q,
            } => {
                // The window is the last W frame periods: values older than
                // that (before a run of dropped frames, too) leave it first.
                let wn = self.window;
                let t = self.slot_t;
                while *len > 0 && times[*head] + w <= t {
                    for k in 0..n {
                        let win = &mut sorted[k * wn..k * wn + *len];
                        let old = ring[*head * n + k];
                        let i = win.partition_point(|&v| v < old);
                        win.copy_within(i + 1.., i);
                    }
                    *head = (*head + 1) % wn;
                    *len -= 1;
                }
                // At most W - 1 values are left, all within W - 1 periods.
                let slot = (*head + *len) % wn;
                times[slot] = t;
                let filled = *len + 1;
                let rank = *q * (filled - 1) as f64;
                let lo = rank.floor() as usize;
                let frac = (rank - lo as f64) as f32;
                for k in 0..n {
                    let s = self.smooth[k];
                    let win = &mut sorted[k * wn..k * wn + filled];
                    let j = win[..filled - 1].partition_point(|&v| v < s);
                    win.copy_within(j..filled - 1, j + 1);
                    win[j] = s;
                    ring[slot * n + k] = s;
                    let a = win[lo];
                    let b = if lo + 1 < filled { win[lo + 1] } else { a };
                    self.f0[k] = a + frac * (b - a);
                }
                *len = filled;
            }
        }
        // 3. dF/F against the current (undelayed) F.
        let floor = self.f0_floor;
        for ((d, &fv), &f0) in dff_out.iter_mut().zip(f).zip(&self.f0) {
            let f0 = if f0 > floor { f0 } else { floor };
            *d = (fv - f0) / f0;
        }
        self.t += 1;
        self.slot_t += 1;
    }

    /// `frames` frame periods passed without a frame (dropped frames): the
    /// baseline windows move on in time (values older than the window leave
    /// it), and each missing period holds the last frame's F in the
    /// smoothing history, so the kernel spans periods, not frames received.
    pub fn skip(&mut self, frames: u64) {
        if self.t > 0 {
            let kl = self.kernel.len() as u64;
            let n = self.n;
            // Only the last `kl` periods can still be in the history.
            for j in 0..frames.min(kl) {
                let from = ((self.slot_t + j + kl - 1) % kl) as usize;
                let to = ((self.slot_t + j) % kl) as usize;
                if from != to {
                    self.hist.copy_within(from * n..(from + 1) * n, to * n);
                }
            }
        }
        self.slot_t = self.slot_t.saturating_add(frames);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imaging::rois::{LabelImage, NeuropilParams};
    use std::path::{Path, PathBuf};
    use std::process::Command;

    fn params(method: BaselineMethod, window: usize, sigma: f64) -> BaselineParams {
        BaselineParams {
            method,
            window_frames: window,
            percentile: 8.0,
            sigma_frames: sigma,
        }
    }

    /// xorshift64* plus Box-Muller: deterministic test noise.
    struct Rng(u64);
    impl Rng {
        fn next_f64(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let u1 = self.next_f64().max(1e-300);
            let u2 = self.next_f64();
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        }
    }

    #[test]
    fn constant_trace_has_zero_dff() {
        for method in [BaselineMethod::Maximin, BaselineMethod::Percentile] {
            let mut d = OnlineDff::for_traces(3, &params(method, 50, 10.0));
            let f = [100.0f32, 2500.0, 7.5];
            let mut out = [1.0f32; 3];
            for _ in 0..200 {
                d.push_f(&f, &mut out);
                for &v in &out {
                    assert!(v.abs() < 1e-5, "{method:?}: {v}");
                }
            }
        }
    }

    #[test]
    fn baseline_tracks_slow_drift() {
        // Linear drift 1000 -> 1500 over 6000 frames, plus sparse transients.
        for method in [BaselineMethod::Maximin, BaselineMethod::Percentile] {
            let w = 600;
            let mut d = OnlineDff::for_traces(1, &params(method, w, 10.0));
            let mut out = [0.0f32];
            let mut rng = Rng(7);
            for t in 0..6000 {
                let base = 1000.0 + 500.0 * t as f64 / 6000.0;
                let tr = if t % 300 < 20 { 0.8 * base } else { 0.0 };
                let f = base + tr + 5.0 * rng.normal();
                d.push_f(&[f as f32], &mut out);
                if t > 2 * w + 100 && t % 300 > 100 {
                    // Off-transient: dF/F near 0. The causal window lags the
                    // drift by about one window, i.e. ~50 counts ~ 4%.
                    assert!(out[0].abs() < 0.08, "{method:?} t={t}: dff {}", out[0]);
                    let f0 = f64::from(d.baseline()[0]);
                    assert!(
                        (f0 - base).abs() / base < 0.08,
                        "{method:?} t={t}: F0 {f0} vs {base}"
                    );
                }
            }
        }
    }

    #[test]
    fn percentile_matches_sorting() {
        let w = 37;
        let mut d = OnlineDff::for_traces(2, &params(BaselineMethod::Percentile, w, 0.0));
        let mut rng = Rng(99);
        let mut hist: Vec<[f32; 2]> = Vec::new();
        let mut out = [0.0f32; 2];
        for _ in 0..300 {
            let f = [
                100.0 + 10.0 * rng.normal() as f32,
                50.0 + (rng.next_f64() * 5.0).floor() as f32,
            ];
            hist.push(f);
            d.push_f(&f, &mut out);
            for k in 0..2 {
                let start = hist.len().saturating_sub(w);
                let mut v: Vec<f32> = hist[start..].iter().map(|h| h[k]).collect();
                v.sort_by(f32::total_cmp);
                let rank = 0.08 * (v.len() - 1) as f64;
                let lo = rank.floor() as usize;
                let hi = (lo + 1).min(v.len() - 1);
                let want = v[lo] + (rank - lo as f64) as f32 * (v[hi] - v[lo]);
                assert!(
                    (d.baseline()[k] - want).abs() < 1e-3,
                    "{} vs {want}",
                    d.baseline()[k]
                );
            }
        }
    }

    #[test]
    fn the_maximin_baseline_follows_the_data_before_its_window_fills() {
        // F steps from 100 to 200 at frame 5; the window is 60 frames.
        let mut d = OnlineDff::for_traces(1, &params(BaselineMethod::Maximin, 60, 0.0));
        let mut out = [0.0f32];
        for t in 0..30 {
            let f = if t < 5 { 100.0 } else { 200.0 };
            d.push_f(&[f], &mut out);
        }
        // Not held at the first value until frame 60 (or 119).
        assert_eq!(d.baseline()[0], 200.0);
        assert_eq!(out[0], 0.0);
    }

    #[test]
    fn dropped_frames_count_as_time_in_the_maximin_window() {
        // Window 10 frames. F steps down from 100 to 10; 30 frame periods
        // are dropped right after: the next frame's baseline has only the
        // new level in its windows.
        let run = |skip: u64| {
            let mut d = OnlineDff::for_traces(1, &params(BaselineMethod::Maximin, 10, 0.0));
            let mut out = [0.0f32];
            for _ in 0..40 {
                d.push_f(&[100.0], &mut out);
            }
            d.push_f(&[10.0], &mut out);
            d.skip(skip);
            d.push_f(&[10.0], &mut out);
            d.baseline()[0]
        };
        assert_eq!(run(30), 10.0, "30 periods later the old level is gone");
        assert_eq!(run(0), 100.0, "one period later it is not");
    }

    #[test]
    fn the_percentile_window_spans_frame_periods_not_frames_received() {
        // Window 10 periods, median. 10 frames at 100, then 20 periods
        // dropped, then frames at 200: the old level left the window in
        // time, so the first frame after the gap has a baseline of 200.
        let mut p = params(BaselineMethod::Percentile, 10, 0.0);
        p.percentile = 50.0;
        let run = |skip: u64| {
            let mut d = OnlineDff::for_traces(1, &p);
            let mut out = [0.0f32];
            for _ in 0..10 {
                d.push_f(&[100.0], &mut out);
            }
            d.skip(skip);
            let mut f0 = Vec::new();
            for _ in 0..4 {
                d.push_f(&[200.0], &mut out);
                f0.push(d.baseline()[0]);
            }
            f0
        };
        assert_eq!(run(20), vec![200.0; 4], "the gap emptied the window");
        // Without the gap the window holds the 100s and the new values.
        assert_eq!(run(0), vec![100.0, 100.0, 100.0, 100.0]);
        // A gap of 2 periods: 4 frames later the window (10 periods) holds
        // the 100s of the last 4 periods before the gap and the 4 new
        // frames: the median is between them.
        assert_eq!(run(2)[3], 150.0);
        // Never more values than W, however the pushes and skips mix.
        let mut d = OnlineDff::for_traces(1, &p);
        let mut out = [0.0f32];
        for i in 0..500u64 {
            d.push_f(&[(i % 17) as f32], &mut out);
            d.skip(i % 3);
            assert!(d.baseline()[0].is_finite());
        }
    }

    #[test]
    fn a_dropped_frame_holds_the_last_f_in_the_smoothing() {
        // sigma 1 frame (kernel 7 periods). Dropping 3 frames is, for the
        // baseline, the same as receiving the last frame's F 3 more times
        // (the windows count periods; the smoothing holds the value).
        {
            let run = |dropped: bool| {
                let mut d = OnlineDff::for_traces(1, &params(BaselineMethod::Maximin, 20, 1.0));
                let mut out = [0.0f32];
                let mut f0 = Vec::new();
                for i in 0..30 {
                    d.push_f(&[100.0 + (i % 5) as f32], &mut out);
                }
                if dropped {
                    d.skip(3);
                } else {
                    for _ in 0..3 {
                        d.push_f(&[104.0], &mut out);
                    }
                }
                for i in 0..10 {
                    d.push_f(&[300.0 - i as f32], &mut out);
                    f0.push((d.smooth[0], d.baseline()[0]));
                }
                f0
            };
            // The smoothed values after the gap are the same (a kernel over
            // frames received would reach 3 frames further back, to other
            // values), and so are the baselines: the held periods' own
            // smoothed values were no minimum the windows missed.
            let (a, b) = (run(true), run(false));
            assert_eq!(a, b);
        }
    }

    #[test]
    fn maximin_matches_brute_force() {
        let w = 20;
        let mut d = OnlineDff::for_traces(1, &params(BaselineMethod::Maximin, w, 0.0));
        let mut rng = Rng(3);
        let mut xs = Vec::new();
        let mut mins = Vec::new();
        let mut out = [0.0f32];
        for t in 0..400 {
            let x = rng.normal() as f32;
            xs.push(x);
            // Each stage spans min(W, t/2 + 1) frames (expanding warm-up).
            let s = t + 1 - w.min(t / 2 + 1);
            mins.push(xs[s..].iter().copied().fold(f32::INFINITY, f32::min));
            let want = mins[s..].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            d.push_f(&[x], &mut out);
            assert_eq!(d.baseline()[0], want, "t={t}");
        }
    }

    #[test]
    fn push_frames_computes_means_and_neuropil() {
        let (w, h) = (40usize, 30usize);
        let mut labels = vec![0u32; w * h];
        for y in 10..14 {
            for x in 10..14 {
                labels[y * w + x] = 1;
            }
        }
        let img = LabelImage {
            width: w,
            height: h,
            labels,
        };
        let set = RoiSet::from_labels(
            &img,
            &NeuropilParams {
                min_pixels: 50,
                ..NeuropilParams::default()
            },
        );
        let mut frame = vec![100u16; w * h];
        for &p in &set.rois[0].pixels {
            frame[p as usize] = 300;
        }
        let mut d = OnlineDff::new(&set, &params(BaselineMethod::Maximin, 10, 1.0), 0.7);
        let (mut f, mut dff) = ([0.0f32], [0.0f32]);
        d.push(&frame, &mut f, &mut dff);
        assert_eq!(d.raw_f()[0], 300.0);
        assert_eq!(d.neuropil()[0], 100.0);
        assert!((f[0] - 230.0).abs() < 1e-4);
        assert_eq!(dff[0], 0.0);
        // A transient doubles the ROI's F above neuropil.
        for &p in &set.rois[0].pixels {
            frame[p as usize] = 530;
        }
        d.push(&frame, &mut f, &mut dff);
        assert!((f[0] - 460.0).abs() < 1e-3);
        assert!(dff[0] > 0.5, "{}", dff[0]);
        // Grid ROIs: no neuropil.
        let g = RoiSet::grid(w, h, 4);
        let mut d = OnlineDff::new(&g, &params(BaselineMethod::Percentile, 10, 0.0), 0.7);
        let (mut f, mut dff) = (vec![0.0f32; 16], vec![0.0f32; 16]);
        d.push(&vec![42u16; w * h], &mut f, &mut dff);
        assert!(f.iter().all(|&v| v == 42.0));
    }

    #[test]
    fn nonpositive_baseline_uses_floor() {
        let mut d = OnlineDff::for_traces(1, &params(BaselineMethod::Maximin, 10, 0.0));
        let mut out = [0.0f32];
        d.push_f(&[-5.0], &mut out);
        assert!(out[0].is_finite());
        assert_eq!(out[0], -6.0); // (-5 - 1) / 1
    }

    fn write_npy_f32(path: &Path, rows: usize, cols: usize, data: &[f32]) {
        assert_eq!(data.len(), rows * cols);
        let _ = std::fs::remove_file(path);
        let mut npy =
            session_format::NpyAppender::create(path, session_format::NpyDtype::F4, &[cols])
                .expect("create npy");
        npy.append(data).expect("rows");
        npy.sync().expect("sync npy");
    }

    /// Synthetic calcium traces: baseline + slow drift + GCaMP-like transients
    /// (rise ~50 ms, decay ~0.7 s) + Gaussian noise. Returns frames x ROIs.
    fn synthetic_traces(n: usize, frames: usize, fps: f64, seed: u64) -> Vec<f32> {
        let mut rng = Rng(seed);
        let mut out = vec![0.0f32; n * frames];
        let a_rise = (-1.0 / (0.05 * fps)).exp();
        let a_decay = (-1.0 / (0.7 * fps)).exp();
        for k in 0..n {
            let base = 300.0 + 500.0 * rng.next_f64();
            let period = frames as f64 * (0.8 + 0.8 * rng.next_f64());
            let phase = std::f64::consts::TAU * rng.next_f64();
            let drift_amp = 0.08 * rng.next_f64();
            let rate = (0.05 + 0.15 * rng.next_f64()) / fps; // events per frame
            let (mut rise, mut decay) = (0.0f64, 0.0f64);
            for t in 0..frames {
                if rng.next_f64() < rate {
                    let amp = 0.3 + 1.2 * rng.next_f64();
                    rise += amp;
                    decay += amp;
                }
                rise *= a_rise;
                decay *= a_decay;
                let c = decay - rise;
                let drift =
                    1.0 + drift_amp * (std::f64::consts::TAU * t as f64 / period + phase).sin();
                let b = base * drift;
                let f = b * (1.0 + c) + 0.03 * base * rng.normal();
                out[t * n + k] = f as f32;
            }
        }
        out
    }

    fn python() -> String {
        std::env::var("RIG_PYTHON").unwrap_or_else(|_| "python3".to_string())
    }

    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/offline_dff.py")
    }

    #[test]
    fn online_dff_correlates_with_offline_suite2p_maximin() {
        let py = python();
        let has_numpy = Command::new(&py)
            .args(["-c", "import numpy"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !has_numpy {
            if std::env::var("RIG_REQUIRE_NUMPY").as_deref() == Ok("1") {
                panic!("{py} with numpy is required (RIG_REQUIRE_NUMPY=1); set RIG_PYTHON");
            }
            eprintln!(
                "note: skipping the offline dF/F comparison: `{py}` has no numpy \
                 (set RIG_PYTHON, e.g. /work/.rig-venv/bin/python3)"
            );
            return;
        }
        let (n, frames, fps) = (100usize, 5000usize, 28.7224f64);
        let f = synthetic_traces(n, frames, fps, 0x5EED);
        let p = BaselineParams::from_config(&BaselineSection::default(), fps);
        let mut d = OnlineDff::for_traces(n, &p);
        let mut dff = vec![0.0f32; n * frames];
        for t in 0..frames {
            d.push_f(&f[t * n..(t + 1) * n], &mut dff[t * n..(t + 1) * n]);
        }
        let dir = std::env::temp_dir().join(format!("rigd-dff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let (fp, dp) = (dir.join("f.npy"), dir.join("dff.npy"));
        write_npy_f32(&fp, frames, n, &f);
        write_npy_f32(&dp, frames, n, &dff);
        let out = Command::new(&py)
            .arg(script())
            .arg(&fp)
            .arg(&dp)
            .arg(fps.to_string())
            .output()
            .expect("run offline_dff.py");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "offline_dff.py failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_dir_all(&dir);
        let r: f64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("median_r "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no median_r in output: {stdout}"));
        eprintln!("offline_dff.py: {stdout}");
        assert!(r >= 0.9, "median per-ROI correlation {r} < 0.9\n{stdout}");
    }
}
