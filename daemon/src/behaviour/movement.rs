//! Lever movement parsing: resample to 1 kHz, low-pass, velocity envelope,
//! threshold, widen and bridge, refine onsets and offsets on the position.
//! The method and its constants are described in `docs/behaviour.md`.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::filter::Butterworth4;

/// The parsing grid: one sample per millisecond.
pub const GRID_US: u64 = 1000;
/// Grid rate, Hz.
pub const GRID_HZ: f64 = 1000.0;
/// Longest trace parsed (24 h, the longest session the configuration allows).
/// The grid is also at most `4 * samples + 1 h` long. Later samples are
/// ignored, which bounds memory whatever the timestamps say.
pub const MAX_GRID_SAMPLES: usize = 24 * 3600 * 1000;

/// A lever trace: `(rig time µs, position mm from rest)` per sample, in time
/// order, at any sample rate (1 kHz and 10 kHz are usual).
pub type LeverTrace = [(u64, f64)];

/// Constants of the movement parsing. The defaults are the documented method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MovementParams {
    /// Low-pass corner, Hz (4th-order Butterworth, zero phase).
    pub lowpass_hz: f64,
    /// Moving-average length applied to the velocity, samples.
    pub velocity_smooth_samples: usize,
    /// Half-width of the moving maximum that makes the envelope, ms.
    pub envelope_half_width_ms: u32,
    /// Velocity threshold as a multiple of the velocity noise (robust σ).
    pub threshold_sigmas: f64,
    /// Lowest velocity threshold, mm/s.
    pub threshold_floor_mm_s: f64,
    /// Each active stretch is widened by this on both sides, ms.
    pub widen_ms: u32,
    /// Gaps shorter than this between active stretches are filled, ms.
    pub fill_gap_ms: u32,
    /// Position cutoff for the onset/offset refinement as a multiple of the
    /// position noise (robust σ).
    pub cutoff_sigmas: f64,
    /// Lowest position cutoff, mm (two counts of the default encoder).
    pub cutoff_floor_mm: f64,
    /// The position must stay beyond the cutoff this long, ms.
    pub settle_ms: u32,
}

impl Default for MovementParams {
    fn default() -> Self {
        Self {
            lowpass_hz: 5.0,
            velocity_smooth_samples: 5,
            envelope_half_width_ms: 25,
            threshold_sigmas: 5.0,
            threshold_floor_mm_s: 2.0,
            widen_ms: 150,
            fill_gap_ms: 500,
            cutoff_sigmas: 4.0,
            cutoff_floor_mm: 0.05,
            settle_ms: 10,
        }
    }
}

/// One movement, rig-clock µs; `offset_us` is the first sample after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Movement {
    pub onset_us: u64,
    pub offset_us: u64,
}

/// The parsed lever: the 1 kHz grid, the traces on it and the movements.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedLever {
    /// Time of grid sample 0, µs; sample `i` is at `t0_us + i * GRID_US`.
    pub t0_us: u64,
    /// Resampled position (bin means), mm.
    pub raw_mm: Vec<f64>,
    /// Low-passed position, mm.
    pub filtered_mm: Vec<f64>,
    /// Movements in time order, not overlapping.
    pub movements: Vec<Movement>,
    /// The velocity-envelope threshold used, mm/s.
    pub velocity_threshold_mm_s: f64,
    /// The position cutoff used for onsets and offsets, mm.
    pub cutoff_mm: f64,
}

impl ParsedLever {
    pub fn len(&self) -> usize {
        self.raw_mm.len()
    }

    pub fn is_empty(&self) -> bool {
        self.raw_mm.is_empty()
    }

    /// Grid time of sample `i`.
    pub fn time_of(&self, i: usize) -> u64 {
        self.t0_us + i as u64 * GRID_US
    }

    /// The grid sample nearest to `t_us`, if inside the trace.
    pub fn index_of(&self, t_us: u64) -> Option<usize> {
        if t_us + GRID_US / 2 < self.t0_us {
            return None;
        }
        let i = (t_us + GRID_US / 2).saturating_sub(self.t0_us) / GRID_US;
        usize::try_from(i).ok().filter(|i| *i < self.len())
    }
}

/// Resample to the 1 kHz grid: the mean of the samples in each 1 ms bin
/// (centred on the grid time), which also anti-aliases a 10 kHz trace, and
/// linear interpolation across bins without samples (gaps). Samples with a
/// non-finite position or a time before the first sample's are skipped.
pub fn resample_1khz(trace: &LeverTrace) -> (u64, Vec<f64>) {
    resample_1khz_from(|| trace.iter().copied())
}

/// [`resample_1khz`] of a trace that `samples` can read more than once (it
/// is read twice: its extent, then the bins), e.g. straight from the
/// session's lever files, so the trace itself is never held in memory.
/// Same arithmetic in the same order, so the same result.
pub fn resample_1khz_from<I, F>(samples: F) -> (u64, Vec<f64>)
where
    F: Fn() -> I,
    I: Iterator<Item = (u64, f64)>,
{
    // Pass 1: the number of samples, the first valid one, the last bin.
    let mut n = 0usize;
    let mut first: Option<(usize, u64)> = None;
    let mut last_bin = 0usize;
    for (i, (t, mm)) in samples().enumerate() {
        n = i + 1;
        if !mm.is_finite() {
            continue;
        }
        let t0 = match first {
            Some((_, t0)) => t0,
            None => {
                first = Some((i, t));
                t
            }
        };
        if t >= t0 {
            last_bin = last_bin.max(((t - t0 + GRID_US / 2) / GRID_US) as usize);
        }
    }
    let Some((first, t0)) = first else {
        return (0, Vec::new());
    };
    let bin_of = |t: u64| ((t - t0 + GRID_US / 2) / GRID_US) as usize;
    // Bound the grid by what the samples can plausibly span (gaps included),
    // so one corrupt timestamp cannot make it huge.
    let len = (last_bin + 1).min(MAX_GRID_SAMPLES.min(4 * n + 3_600_000));
    let mut sum = vec![0.0f64; len];
    let mut count = vec![0u32; len];
    for (t, mm) in samples().skip(first) {
        if !mm.is_finite() || t < t0 {
            continue;
        }
        let b = bin_of(t);
        if b < len {
            sum[b] += mm;
            count[b] += 1;
        }
    }
    // Means, then linear interpolation over empty bins (bin 0 is never empty).
    let mut prev: Option<usize> = None;
    for b in 0..len {
        if count[b] == 0 {
            continue;
        }
        sum[b] /= f64::from(count[b]);
        if let Some(p) = prev {
            let gap = b - p;
            for k in 1..gap {
                let f = k as f64 / gap as f64;
                sum[p + k] = sum[p] + (sum[b] - sum[p]) * f;
            }
        }
        prev = Some(b);
    }
    // Empty bins after the last filled one (only when the grid was capped)
    // hold the last value.
    if let Some(p) = prev {
        let v = sum[p];
        for s in &mut sum[p + 1..] {
            *s = v;
        }
    }
    (t0, sum)
}

/// Median of `|v|` over at most ~1 million evenly spaced values.
fn median_abs(values: impl ExactSizeIterator<Item = f64>) -> f64 {
    let stride = (values.len() / 1_000_000).max(1);
    let mut v: Vec<f64> = values
        .step_by(stride)
        .map(f64::abs)
        .filter(|x| x.is_finite())
        .collect();
    if v.is_empty() {
        return 0.0;
    }
    let mid = v.len() / 2;
    let (_, m, _) = v.select_nth_unstable_by(mid, f64::total_cmp);
    *m
}

/// Centred moving average of odd length `len` (shorter at the edges).
fn moving_average(x: &[f64], len: usize) -> Vec<f64> {
    let half = len / 2;
    let n = x.len();
    let mut prefix = Vec::with_capacity(n + 1);
    prefix.push(0.0);
    let mut acc = 0.0;
    for v in x {
        acc += v;
        prefix.push(acc);
    }
    (0..n)
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(n);
            (prefix[hi] - prefix[lo]) / (hi - lo) as f64
        })
        .collect()
}

/// Centred moving maximum over `2 * half + 1` samples, in place.
fn moving_max(x: &mut [f64], half: usize) {
    let n = x.len();
    let src = x.to_vec();
    let mut window: VecDeque<usize> = VecDeque::new();
    let mut next = 0; // next index to enter the window
    for (i, out) in x.iter_mut().enumerate() {
        let hi = (i + half).min(n.saturating_sub(1));
        while next <= hi {
            while window.back().is_some_and(|&b| src[b] <= src[next]) {
                window.pop_back();
            }
            window.push_back(next);
            next += 1;
        }
        let lo = i.saturating_sub(half);
        while window.front().is_some_and(|&f| f < lo) {
            window.pop_front();
        }
        if let Some(&f) = window.front() {
            *out = src[f];
        }
    }
}

/// Refine a widened active stretch `s..e` on the position `x`: the onset is
/// the first sample from which the position stays more than `cutoff` away
/// from its level at the start of the stretch for `settle` samples; the
/// offset is the end of the last such run measured from its level at the
/// end. `None` when the position never leaves the band.
fn refine(x: &[f64], s: usize, e: usize, cutoff: f64, settle: usize) -> Option<(usize, usize)> {
    let settle = settle.max(1);
    let mean = |a: usize, b: usize| x[a..b].iter().sum::<f64>() / (b - a) as f64;
    let base_on = mean(s, (s + settle).min(e));
    let mut run = 0;
    let mut onset = None;
    for (i, v) in x.iter().enumerate().take(e).skip(s) {
        if (v - base_on).abs() > cutoff {
            run += 1;
            if run >= settle {
                onset = Some(i + 1 - settle);
                break;
            }
        } else {
            run = 0;
        }
    }
    let onset = onset?;
    let base_off = mean(e.saturating_sub(settle).max(onset), e);
    let mut run = 0;
    let mut offset = None;
    for i in (onset..e).rev() {
        if (x[i] - base_off).abs() > cutoff {
            run += 1;
            if run >= settle {
                offset = Some(i + settle);
                break;
            }
        } else {
            run = 0;
        }
    }
    let offset = offset
        .unwrap_or(onset + settle)
        .clamp(onset + 1, e.max(onset + 1));
    Some((onset, offset))
}

/// Parse the lever trace into movements (see `docs/behaviour.md`).
pub fn parse_lever(trace: &LeverTrace, p: &MovementParams) -> ParsedLever {
    let (t0_us, raw_mm) = resample_1khz(trace);
    parse_resampled(t0_us, raw_mm, p)
}

/// [`parse_lever`] of a trace already resampled with [`resample_1khz`] or
/// [`resample_1khz_from`] (grid sample 0 at `t0_us`).
pub fn parse_resampled(t0_us: u64, raw_mm: Vec<f64>, p: &MovementParams) -> ParsedLever {
    let n = raw_mm.len();
    if n == 0 {
        return ParsedLever::default();
    }
    let fc = p.lowpass_hz.clamp(0.01, GRID_HZ * 0.45);
    let filtered_mm = Butterworth4::lowpass(fc, GRID_HZ).filtfilt(&raw_mm);

    // Velocity (mm/s): first difference, smoothed.
    let mut vel = vec![0.0; n];
    for i in 1..n {
        vel[i] = (filtered_mm[i] - filtered_mm[i - 1]) * GRID_HZ;
    }
    if n > 1 {
        vel[0] = vel[1];
    }
    let vel = moving_average(&vel, p.velocity_smooth_samples.max(1) | 1);
    let sigma_v = median_abs(vel.iter().copied()) / 0.6745;
    let velocity_threshold_mm_s = (p.threshold_sigmas * sigma_v).max(p.threshold_floor_mm_s);
    let mut env: Vec<f64> = vel.iter().map(|v| v.abs()).collect();
    drop(vel);
    moving_max(&mut env, p.envelope_half_width_ms as usize);

    // Active stretches, widened, gaps filled.
    let widen = p.widen_ms as usize;
    let fill = p.fill_gap_ms as usize;
    let mut segments: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < n {
        if env[i] > velocity_threshold_mm_s {
            let s = i;
            while i < n && env[i] > velocity_threshold_mm_s {
                i += 1;
            }
            let (ws, we) = (s.saturating_sub(widen), (i + widen).min(n));
            match segments.last_mut() {
                Some(last) if ws < last.1 + fill => last.1 = last.1.max(we),
                _ => segments.push((ws, we)),
            }
        } else {
            i += 1;
        }
    }
    drop(env);

    // Position noise from sample-to-sample differences of the raw trace.
    let sigma_x =
        median_abs((1..n).map(|i| raw_mm[i] - raw_mm[i - 1])) / (0.6745 * std::f64::consts::SQRT_2);
    let cutoff_mm = (p.cutoff_sigmas * sigma_x).max(p.cutoff_floor_mm);
    let settle = p.settle_ms as usize;
    let mut movements: Vec<Movement> = Vec::with_capacity(segments.len());
    for (s, e) in segments {
        if let Some((on, off)) = refine(&raw_mm, s, e, cutoff_mm, settle) {
            let m = Movement {
                onset_us: t0_us + on as u64 * GRID_US,
                offset_us: t0_us + off as u64 * GRID_US,
            };
            // Refinement only shrinks a stretch, so order is kept; guard
            // against touching neighbours anyway.
            match movements.last_mut() {
                Some(last) if m.onset_us < last.offset_us => {
                    last.offset_us = last.offset_us.max(m.offset_us)
                }
                _ => movements.push(m),
            }
        }
    }
    ParsedLever {
        t0_us,
        raw_mm,
        filtered_mm,
        movements,
        velocity_threshold_mm_s,
        cutoff_mm,
    }
}
