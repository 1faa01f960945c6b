//! The simulated two-photon microscope: a synthetic GCaMP calcium movie of
//! layer 2/3 motor-cortex neurons with its ground truth (issue 5, item 3).
//!
//! * [`Microscope`] (this file): the pure, seeded generator. Given a
//!   [`MicroscopeSpec`], the presses of the virtual mouse
//!   ([`Microscope::add_press`]) and a frame time, it renders one frame
//!   (`channels x height x width` uint16, channel-major, as in the frame ring)
//!   and the true dF/F of every neuron at that time.
//! * [`files`]: the ground-truth files (`frames_truth.tsv`, `dff_truth.npy`,
//!   `labels.npy`, `labels.tif`, `neurons.tsv`).
//! * [`live`]: the renderer thread the simulator feeds at each frame-clock
//!   TTL edge, publishing into a frame ring through a [`live::FrameSink`].
//!
//! # The model
//!
//! * **Footprints**: `neurons` elliptical, flat-topped blobs (radius 5-7.5 px
//!   at 512x512, scaled with the frame) placed at random with a minimum
//!   spacing. A pixel's label is the neuron whose footprint covers it most
//!   strongly, within the ellipse (normalised distance <= 1); 0 is
//!   background. Neuron `k` (0-based) has label `k + 1`.
//! * **Fluorescence** of a pixel, photons per frame, before motion and noise:
//!   `neuropil(p) * drift(t) * (1 + 0.4 * mean_k c_k(t))
//!    + sum_k w_k(p) * B_k * drift(t) * (1 + c_k(t))`
//!   where `c_k(t)` is neuron k's calcium signal, which *is* its true dF/F
//!   (`(F - F0) / F0` of the neuron's own noiseless fluorescence, with the
//!   drifting baseline as F0): this is what `dff_truth.npy` holds.
//! * **Kinetics**: each spike adds `A_k * (e^{-dt/tau_d} - e^{-dt/tau_r}) /
//!   peak` (rise ~50 ms, decay 0.5-1 s, peak dF/F per spike `A_k`).
//! * **Activity**: spontaneous Poisson spikes (inhibitory neurons fire more,
//!   with smaller transients); movement-related neurons (any type) fire a burst
//!   of 2-4 spikes at a preferred lag (-0.2..+1.5 s) from each press onset,
//!   with a participation probability and a timing jitter that depend on the
//!   training day: day 1 about 40 % and 0.30 s, day 14 about 90 % and 0.06 s.
//! * **Drift**: a slow global baseline drift (two slow sinusoids and some
//!   photobleaching), `drift` sets its size.
//! * **Motion**: a rigid, subpixel shift of the whole scene (smooth: a sum of
//!   slow sinusoids, plus a small bump after each press), never more than
//!   `motion_px` on either axis. A feature at label-image position `(x, y)`
//!   appears at `(x + shift_x, y + shift_y)` in the frame; bilinear
//!   interpolation.
//! * **Noise**: shot noise on the photon count (Gaussian approximation of
//!   Poisson, `lambda + sqrt(lambda) * z`, clipped at 0), then
//!   `counts = offset + gain * photons`, rounded and clamped to uint16.
//! * **Channel 2** (if `channels == 2`): tdTomato, bright in inhibitory
//!   neurons only, static apart from motion and noise.
//!
//! Everything is a function of the seed, the frame times and the press
//! onsets: the order of [`Microscope::add_press`] and rendering calls does not
//! change the result, as long as each press is added before the first frame
//! later than `onset - lookahead_s()` is rendered.

pub mod files;
pub mod live;

use crate::rng::{Rng, SplitMix64};

pub use files::MicroscopeTruth;
pub use live::{
    FrameSink, FrameTick, LiveMicroscope, MicroscopeError, MicroscopeStats, PublishError,
};

/// What to simulate. [`MicroscopeSpec::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct MicroscopeSpec {
    /// Pixels per row.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// 1 (green GCaMP) or 2 (plus red tdTomato in inhibitory neurons).
    pub channels: u32,
    /// Number of neurons (default 200).
    pub neurons: usize,
    /// Nominal frame rate, Hz (informational; frames are rendered at whatever
    /// times they are asked for).
    pub frame_rate_hz: f64,
    /// Fraction of neurons that are inhibitory (red in channel 2).
    pub inhibitory_fraction: f64,
    /// Fraction of neurons that are movement-related.
    pub movement_fraction: f64,
    pub seed: u64,
    /// Training day 1..=14.
    pub day: u8,
    /// Range of the movement-related neurons' preferred lags from press
    /// onset, s.
    pub lag_range_s: (f64, f64),
    /// Median spontaneous rate of excitatory neurons, Hz.
    pub spontaneous_hz: f64,
    /// Shot noise on (false: noiseless frames, for tests).
    pub noise: bool,
    /// Largest brain shift on either axis, px (0: no motion).
    pub motion_px: f64,
    /// A constant displacement of the whole field of view, px (x, y): the
    /// microscope placed a little differently on another day. Added to the
    /// motion; a feature at label-image `(x, y)` appears at `(x + ox, y + oy)`.
    /// Each axis within +-64. Default (0, 0).
    pub fov_offset_px: (f64, f64),
    /// A constant rotation of the field of view about the frame's centre,
    /// degrees (counter-clockwise as displayed, rows down), applied after
    /// the shift: within +-10. Default 0.
    pub fov_rotation_deg: f64,
    /// Mean neuropil brightness, photons per pixel per frame (0: none).
    pub neuropil: f64,
    /// Size of the slow baseline drift, fraction (0: none).
    pub drift: f64,
    /// Counts per photon.
    pub gain: f64,
    /// Counts at zero photons.
    pub offset: f64,
}

impl MicroscopeSpec {
    /// The defaults for a `width x height` frame: one channel, 200 neurons,
    /// 28.7 Hz, 15 % inhibitory, 30 % movement-related, day 14, noise on,
    /// motion of up to 2 px at 512x512 (scaled with the frame, at least 0.5).
    pub fn new(width: u32, height: u32) -> Self {
        let s = f64::from(width.min(height)) / 512.0;
        Self {
            width,
            height,
            channels: 1,
            neurons: 200,
            frame_rate_hz: 28.7,
            inhibitory_fraction: 0.15,
            movement_fraction: 0.3,
            seed: 1,
            day: 14,
            lag_range_s: (-0.2, 1.5),
            spontaneous_hz: 0.2,
            noise: true,
            motion_px: (2.0 * s).max(0.5),
            fov_offset_px: (0.0, 0.0),
            fov_rotation_deg: 0.0,
            neuropil: 8.0,
            drift: 0.05,
            gain: 20.0,
            offset: 100.0,
        }
    }

    /// Noiseless, motionless, without neuropil or drift: each neuron's
    /// footprint pixels are then an exact affine function of its dF/F.
    pub fn clean(mut self) -> Self {
        self.noise = false;
        self.motion_px = 0.0;
        self.neuropil = 0.0;
        self.drift = 0.0;
        self
    }

    /// Pixels per frame, all channels.
    pub fn frame_pixels(&self) -> usize {
        self.width as usize * self.height as usize * self.channels as usize
    }

    /// How far ahead of a frame the press onsets must be known: activity
    /// before a press (negative lags) is rendered only if the press was added
    /// in time.
    pub fn lookahead_s(&self) -> f64 {
        (-self.lag_range_s.0).max(0.0)
    }

    /// Check the values; the message names the field and the rule.
    pub fn validate(&self) -> Result<(), SpecError> {
        let (width, height) = (self.width, self.height);
        if !(1..=4096).contains(&width) || !(1..=4096).contains(&height) {
            return Err(SpecError::SizeOutOfRange { width, height });
        }
        if width < 8 || height < 8 {
            return Err(SpecError::TooSmall { width, height });
        }
        if self.channels != 1 && self.channels != 2 {
            return Err(SpecError::Channels(self.channels));
        }
        if self.neurons > 65_535 {
            return Err(SpecError::TooManyNeurons(self.neurons));
        }
        for (name, value) in [
            ("inhibitory_fraction", self.inhibitory_fraction),
            ("movement_fraction", self.movement_fraction),
            ("drift", self.drift),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(SpecError::NotAFraction { name, value });
            }
        }
        if !(1..=14).contains(&self.day) {
            return Err(SpecError::Day(self.day));
        }
        let (lo, hi) = self.lag_range_s;
        if !(lo.is_finite() && hi.is_finite() && lo <= hi && lo >= -2.0 && hi <= 10.0) {
            return Err(SpecError::LagRange { lo, hi });
        }
        for (name, value, max) in [
            ("spontaneous_hz", self.spontaneous_hz, 100.0),
            ("motion_px", self.motion_px, 64.0),
            ("fov_offset_px.x", self.fov_offset_px.0.abs(), 64.0),
            ("fov_offset_px.y", self.fov_offset_px.1.abs(), 64.0),
            ("fov_rotation_deg", self.fov_rotation_deg.abs(), 10.0),
            ("neuropil", self.neuropil, 10_000.0),
            ("gain", self.gain, 10_000.0),
            ("offset", self.offset, 60_000.0),
            ("frame_rate_hz", self.frame_rate_hz, 10_000.0),
        ] {
            if !(value.is_finite() && (0.0..=max).contains(&value)) {
                return Err(SpecError::OutOfRange { name, value, max });
            }
        }
        Ok(())
    }
}

/// Why a [`MicroscopeSpec`] was refused: the message names the field, the
/// value and the rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("microscope size {width}x{height}: each side must be 1..=4096")]
    SizeOutOfRange { width: u32, height: u32 },
    #[error("microscope size {width}x{height}: at least 8x8")]
    TooSmall { width: u32, height: u32 },
    #[error("channels {0}: must be 1 or 2")]
    Channels(u32),
    #[error("neurons {0}: at most 65535")]
    TooManyNeurons(usize),
    #[error("{name} {value}: must be 0..=1")]
    NotAFraction { name: &'static str, value: f64 },
    #[error("day {0}: must be 1..=14")]
    Day(u8),
    #[error("lag range {lo}..{hi} s: must be within -2..10, lo <= hi")]
    LagRange { lo: f64, hi: f64 },
    #[error("{name} {value}: must be 0..={max}")]
    OutOfRange {
        name: &'static str,
        value: f64,
        max: f64,
    },
}

/// One neuron, as written to `neurons.tsv`.
#[derive(Debug, Clone, PartialEq)]
pub struct NeuronInfo {
    /// Its label in the label image (1-based; row `id - 1` of `dff_truth`).
    pub id: u16,
    /// Centre, frame pixels (column, row), with no motion.
    pub x: f64,
    pub y: f64,
    /// Mean radius of its ellipse, px.
    pub radius: f64,
    pub inhibitory: bool,
    pub movement_related: bool,
    /// Preferred lag from press onset, s (movement-related neurons only).
    pub preferred_lag_s: Option<f64>,
}

/// What a rendered frame really was (besides the dF/F).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameTruth {
    /// Scene displacement, px (see the module docs for the sign).
    pub shift_x_px: f64,
    pub shift_y_px: f64,
}

/// A neuron's private state.
#[derive(Debug, Clone)]
struct Cell {
    /// Footprint box in scene (padded) coordinates, and `w * B` in it.
    bx: usize,
    by: usize,
    bw: usize,
    bh: usize,
    wb: Vec<f32>,
    /// Peak dF/F of one spike, and the kernel.
    amp: f64,
    tau_r: f64,
    tau_d: f64,
    /// 1 / peak of `e^{-t/tau_d} - e^{-t/tau_r}`.
    norm: f64,
    spont_hz: f64,
    next_spont_s: f64,
    spont_rng: Rng,
    /// Spike times, s (unordered; old ones pruned).
    spikes: Vec<f64>,
    /// Per-press participation scale (movement-related only).
    reliability: f64,
    lag_s: Option<f64>,
}

impl Cell {
    fn calcium(&self, t: f64) -> f64 {
        let mut c = 0.0;
        for &s in &self.spikes {
            let dt = t - s;
            if dt > 0.0 {
                c += (-dt / self.tau_d).exp() - (-dt / self.tau_r).exp();
            }
        }
        c * self.amp * self.norm
    }

    /// Generate spontaneous spikes up to `t`, drop spikes whose transient
    /// has faded.
    fn advance(&mut self, t: f64) {
        if self.spont_hz > 0.0 {
            while self.next_spont_s <= t {
                self.spikes.push(self.next_spont_s);
                self.next_spont_s += self.spont_rng.exponential(1.0 / self.spont_hz);
            }
        }
        let horizon = t - 15.0 * self.tau_d;
        self.spikes.retain(|&s| s >= horizon);
    }
}

/// One sinusoid of the motion or drift model.
#[derive(Debug, Clone, Copy)]
struct Wave {
    amp: f64,
    freq_hz: f64,
    phase: f64,
}

fn waves(rng: &mut Rng, n: usize, total: f64, f_lo: f64, f_hi: f64) -> Vec<Wave> {
    let w: Vec<f64> = (0..n).map(|_| rng.range(0.3, 1.0)).collect();
    let sum: f64 = w.iter().sum();
    w.into_iter()
        .map(|a| Wave {
            amp: total * a / sum,
            freq_hz: rng.range(f_lo, f_hi),
            phase: rng.range(0.0, std::f64::consts::TAU),
        })
        .collect()
}

fn wave_sum(ws: &[Wave], t: f64) -> f64 {
    ws.iter()
        .map(|w| w.amp * (std::f64::consts::TAU * w.freq_hz * t + w.phase).sin())
        .sum()
}

/// A press as the motion model sees it.
#[derive(Debug, Clone, Copy)]
struct PressBump {
    onset_s: f64,
    dx: f64,
    dy: f64,
}

const NORMAL_TABLE_BITS: u32 = 16;
/// Time constant of the press-related brain-motion bump, s.
const BUMP_TAU_S: f64 = 0.3;
/// Neuropil brightening per unit of mean dF/F.
const NEUROPIL_COUPLING: f64 = 0.4;

/// The generator. See the module docs.
#[derive(Debug, Clone)]
pub struct Microscope {
    spec: MicroscopeSpec,
    w: usize,
    h: usize,
    /// Margin around the field of view in the scene, px.
    margin: usize,
    pw: usize,
    info: Vec<NeuronInfo>,
    cells: Vec<Cell>,
    labels: Vec<u16>,
    /// Static scene parts, padded: neuropil, neuron baselines, red channel.
    np_static: Vec<f32>,
    nb_static: Vec<f32>,
    red_static: Vec<f32>,
    scene: Vec<f32>,
    motion_x: Vec<Wave>,
    motion_y: Vec<Wave>,
    drift_waves: Vec<Wave>,
    presses: Vec<PressBump>,
    press_count: u64,
    normal: Vec<f32>,
    calcium: Vec<f64>,
    /// Latest time asked for, s.
    latest_s: f64,
}

fn mix(seed: u64, salt: u64) -> u64 {
    let mut r = Rng::new(seed ^ salt.wrapping_mul(SplitMix64::GAMMA));
    r.next_u64()
}

/// Day 1 -> 0, day 14 -> 1.
fn expertise(day: u8) -> f64 {
    (f64::from(day.clamp(1, 14)) - 1.0) / 13.0
}

/// Probability scale that a movement-related neuron joins a press's sequence.
fn participation(day: u8) -> f64 {
    0.4 + 0.5 * expertise(day)
}

/// Timing jitter of a movement-related neuron's first spike, s (sd).
fn jitter_s(day: u8) -> f64 {
    0.30 - 0.24 * expertise(day)
}

impl Microscope {
    /// Build the field of view: neuron placement, footprints, labels, static
    /// images. Deterministic in `spec`.
    pub fn new(spec: MicroscopeSpec) -> Result<Self, SpecError> {
        spec.validate()?;
        let w = spec.width as usize;
        let h = spec.height as usize;
        // The scene is padded for the motion and the offset; the random
        // draws use the motion's padding alone, so an offset moves the same
        // field of view (the same seed gives the same neurons and neuropil).
        let base_margin = spec.motion_px.ceil() as usize + 2;
        let (ox, oy) = spec.fov_offset_px;
        // A rotation moves the frame's corners by up to sin(angle) x the
        // half-diagonal.
        let turn = spec.fov_rotation_deg.to_radians().sin().abs() * (w + h) as f64 / 2.0;
        let margin = (spec.motion_px + ox.abs().max(oy.abs()) + turn).ceil() as usize + 2;
        let extra = (margin - base_margin) as f64;
        let (base_pw, base_ph) = (w + 2 * base_margin, h + 2 * base_margin);
        let pw = w + 2 * margin;
        let ph = h + 2 * margin;
        let scale = (w.min(h) as f64 / 512.0).max(0.0);
        let mut rng = Rng::new(mix(spec.seed, 1));

        // ---- placement ---------------------------------------------------
        let n = spec.neurons;
        let mut centres: Vec<(f64, f64, f64)> = Vec::with_capacity(n); // x, y, r
        let mut spacing = 1.15;
        while centres.len() < n {
            let r = (rng.range(5.0, 7.5) * scale).max(1.2);
            let lo_x = r.min(w as f64 / 2.0);
            let lo_y = r.min(h as f64 / 2.0);
            let mut placed = false;
            for _ in 0..500 {
                let x = rng.range(lo_x, w as f64 - lo_x);
                let y = rng.range(lo_y, h as f64 - lo_y);
                let ok = centres.iter().all(|&(cx, cy, cr)| {
                    let d = spacing * 1.25 * (r + cr);
                    (x - cx).powi(2) + (y - cy).powi(2) >= d * d
                });
                if ok {
                    centres.push((x, y, r));
                    placed = true;
                    break;
                }
            }
            if !placed {
                spacing *= 0.9; // crowded: pack tighter
            }
        }

        // ---- neuron properties and footprints ----------------------------
        let (lag_lo, lag_hi) = spec.lag_range_s;
        let mut info = Vec::with_capacity(n);
        let mut cells = Vec::with_capacity(n);
        let mut labels = vec![0u16; w * h];
        let mut best = vec![0f32; w * h];
        let mut nb_static = vec![0f32; pw * ph];
        let mut red_static = vec![0f32; if spec.channels == 2 { pw * ph } else { 0 }];
        // Exact counts of each kind, at random places.
        let pick = |rng: &mut Rng, frac: f64| -> Vec<bool> {
            let mut v: Vec<bool> = (0..n)
                .map(|i| i < (frac * n as f64).round() as usize)
                .collect();
            for i in (1..n).rev() {
                let j = (rng.uniform() * (i + 1) as f64) as usize;
                v.swap(i, j.min(i));
            }
            v
        };
        let inhibitory_set = pick(&mut rng, spec.inhibitory_fraction);
        let movement_set = pick(&mut rng, spec.movement_fraction);
        for (k, &(cx, cy, r)) in centres.iter().enumerate() {
            let inhibitory = inhibitory_set[k];
            let movement = movement_set[k];
            let lag = rng.range(lag_lo, lag_hi);
            let ecc = rng.range(0.0, 0.25);
            let theta = rng.range(0.0, std::f64::consts::PI);
            let baseline = rng.lognormal(if inhibitory { 24.0 } else { 18.0 }, 0.25);
            let red = rng.lognormal(15.0, 0.2);
            let amp = if inhibitory {
                rng.lognormal(0.12, 0.3)
            } else {
                rng.lognormal(0.3, 0.3)
            };
            let tau_d = rng.range(0.5, 1.0);
            let tau_r = rng.range(0.04, 0.06);
            let spont_hz =
                spec.spontaneous_hz * if inhibitory { 5.0 } else { 1.0 } * rng.lognormal(1.0, 0.6);
            let reliability = rng.range(0.8, 1.0);
            let spont_seed = rng.next_u64();

            let a = r * (1.0 + ecc);
            let b = r * (1.0 - ecc);
            let (sin, cos) = theta.sin_cos();
            let reach = 1.5 * a;
            let sx = cx + margin as f64;
            let sy = cy + margin as f64;
            let x0 = (sx - reach).floor().max(0.0) as usize;
            let y0 = (sy - reach).floor().max(0.0) as usize;
            let x1 = ((sx + reach).ceil() as usize).min(pw - 1);
            let y1 = ((sy + reach).ceil() as usize).min(ph - 1);
            let (bw, bh) = (x1 - x0 + 1, y1 - y0 + 1);
            let mut wb = vec![0f32; bw * bh];
            for yy in 0..bh {
                for xx in 0..bw {
                    let dx = (x0 + xx) as f64 - sx;
                    let dy = (y0 + yy) as f64 - sy;
                    let u = (dx * cos + dy * sin) / a;
                    let v = (-dx * sin + dy * cos) / b;
                    let d2 = u * u + v * v;
                    if d2 > 2.25 {
                        continue;
                    }
                    let wgt = (-0.9 * d2 * d2).exp();
                    wb[yy * bw + xx] = (wgt * baseline) as f32;
                    let i = (y0 + yy) * pw + x0 + xx;
                    nb_static[i] += (wgt * baseline) as f32;
                    if inhibitory && !red_static.is_empty() {
                        red_static[i] += (wgt * red) as f32;
                    }
                    // The label image is in field-of-view coordinates.
                    let (fx, fy) = (
                        (x0 + xx) as isize - margin as isize,
                        (y0 + yy) as isize - margin as isize,
                    );
                    if d2 <= 1.0 && fx >= 0 && fy >= 0 && (fx as usize) < w && (fy as usize) < h {
                        let p = fy as usize * w + fx as usize;
                        if wgt as f32 > best[p] {
                            best[p] = wgt as f32;
                            labels[p] = (k + 1) as u16;
                        }
                    }
                }
            }
            // Kernel peak.
            let t_peak = (tau_d / tau_r).ln() * tau_d * tau_r / (tau_d - tau_r);
            let peak = (-t_peak / tau_d).exp() - (-t_peak / tau_r).exp();
            let mut spont_rng = Rng::new(spont_seed);
            let next_spont_s = if spont_hz > 0.0 {
                spont_rng.exponential(1.0 / spont_hz)
            } else {
                f64::INFINITY
            };
            info.push(NeuronInfo {
                id: (k + 1) as u16,
                x: cx,
                y: cy,
                radius: r,
                inhibitory,
                movement_related: movement,
                preferred_lag_s: movement.then_some(lag),
            });
            cells.push(Cell {
                bx: x0,
                by: y0,
                bw,
                bh,
                wb,
                amp,
                tau_r,
                tau_d,
                norm: 1.0 / peak,
                spont_hz,
                next_spont_s,
                spont_rng,
                spikes: Vec::new(),
                reliability,
                lag_s: movement.then_some(lag),
            });
        }

        // ---- neuropil: smooth blobs on a floor ---------------------------
        let mut np_static = vec![0f32; pw * ph];
        if spec.neuropil > 0.0 {
            let blobs: Vec<(f64, f64, f64, f64)> = (0..6)
                .map(|_| {
                    (
                        rng.range(0.0, base_pw as f64) + extra,
                        rng.range(0.0, base_ph as f64) + extra,
                        rng.range(0.15, 0.3) * base_pw.max(base_ph) as f64,
                        rng.range(0.5, 1.0),
                    )
                })
                .collect();
            let mut raw = vec![0f64; pw * ph];
            let mut max = f64::MIN_POSITIVE;
            for y in 0..ph {
                for x in 0..pw {
                    let v: f64 = blobs
                        .iter()
                        .map(|&(bx, by, s, a)| {
                            a * (-((x as f64 - bx).powi(2) + (y as f64 - by).powi(2))
                                / (2.0 * s * s))
                                .exp()
                        })
                        .sum();
                    raw[y * pw + x] = v;
                    max = max.max(v);
                }
            }
            for (o, v) in np_static.iter_mut().zip(&raw) {
                // Mean about `neuropil`: 0.6..1.4 of it.
                *o = (spec.neuropil * (0.6 + 0.8 * v / max)) as f32;
            }
            if !red_static.is_empty() {
                for (r, n) in red_static.iter_mut().zip(&np_static) {
                    *r += 0.25 * n; // red autofluorescence
                }
            }
        }

        let motion_x = waves(&mut rng, 4, 0.8 * spec.motion_px, 0.01, 0.2);
        let motion_y = waves(&mut rng, 4, 0.8 * spec.motion_px, 0.01, 0.2);
        let drift_waves = waves(&mut rng, 2, 0.7 * spec.drift, 1.0 / 600.0, 1.0 / 120.0);
        let mut nrng = Rng::new(mix(spec.seed, 2));
        let normal = (0..1usize << NORMAL_TABLE_BITS)
            .map(|_| nrng.normal() as f32)
            .collect();

        Ok(Self {
            w,
            h,
            margin,
            pw,
            info,
            calcium: vec![0.0; cells.len()],
            cells,
            labels,
            np_static,
            nb_static,
            red_static,
            scene: vec![0f32; pw * ph],
            motion_x,
            motion_y,
            drift_waves,
            presses: Vec::new(),
            press_count: 0,
            normal,
            latest_s: f64::NEG_INFINITY,
            spec,
        })
    }

    pub fn spec(&self) -> &MicroscopeSpec {
        &self.spec
    }

    /// The neurons, in label order (`neurons()[k].id == k + 1`).
    pub fn neurons(&self) -> &[NeuronInfo] {
        &self.info
    }

    /// The label image, `height x width`, row-major: 0 background, `k + 1`
    /// for neuron `k`.
    pub fn labels(&self) -> &[u16] {
        &self.labels
    }

    /// Pixels per frame, all channels.
    pub fn frame_pixels(&self) -> usize {
        self.spec.frame_pixels()
    }

    /// Presses added so far.
    pub fn presses(&self) -> u64 {
        self.press_count
    }

    /// A press of the virtual mouse began at `onset_s` (true time, s). Draws
    /// the movement-related neurons' spikes for it (from the press's own
    /// random stream: the n-th press always gets the same draws).
    pub fn add_press(&mut self, onset_s: f64) {
        let mut rng = Rng::new(mix(self.spec.seed, 1000 + self.press_count));
        self.press_count += 1;
        let bump = 0.2 * self.spec.motion_px;
        let angle = rng.range(0.0, std::f64::consts::TAU);
        self.presses.push(PressBump {
            onset_s,
            dx: bump * angle.cos(),
            dy: bump * angle.sin(),
        });
        let p = participation(self.spec.day);
        let jitter = jitter_s(self.spec.day);
        let earliest = onset_s - self.spec.lookahead_s();
        for c in &mut self.cells {
            let Some(lag) = c.lag_s else { continue };
            let joins = rng.uniform() < p * c.reliability;
            let first = onset_s + lag + jitter * rng.normal();
            let count = 2 + (rng.uniform() * 3.0) as usize;
            let mut t = first.max(earliest);
            for i in 0..count {
                if i > 0 {
                    t += rng.exponential(0.04);
                }
                if joins {
                    c.spikes.push(t);
                }
            }
        }
    }

    /// The brain's shift at true time `t_s`, px.
    pub fn shift_at(&self, t_s: f64) -> (f64, f64) {
        let m = self.spec.motion_px;
        if m <= 0.0 {
            return (0.0, 0.0);
        }
        let mut x = wave_sum(&self.motion_x, t_s);
        let mut y = wave_sum(&self.motion_y, t_s);
        for p in &self.presses {
            let dt = t_s - p.onset_s;
            if dt > 0.0 && dt < 20.0 * BUMP_TAU_S {
                let g = dt / BUMP_TAU_S * (1.0 - dt / BUMP_TAU_S).exp();
                x += p.dx * g;
                y += p.dy * g;
            }
        }
        (x.clamp(-m, m), y.clamp(-m, m))
    }

    /// Slow multiplicative baseline drift at `t_s` (1 when `drift == 0`).
    pub fn drift_at(&self, t_s: f64) -> f64 {
        let d = self.spec.drift;
        if d <= 0.0 {
            return 1.0;
        }
        let bleach = 1.0 - 0.3 * d * (1.0 - (-t_s.max(0.0) / 1200.0).exp());
        (1.0 + wave_sum(&self.drift_waves, t_s)) * bleach
    }

    /// Advance the neurons to `t_s` and compute the truth without rendering
    /// pixels (cheap: for frames that are dropped). `dff` gets each neuron's
    /// true dF/F.
    pub fn truth_at(&mut self, t_s: f64, dff: &mut [f32]) -> FrameTruth {
        self.latest_s = self.latest_s.max(t_s);
        let latest = self.latest_s;
        for (c, out) in self.cells.iter_mut().zip(self.calcium.iter_mut()) {
            c.advance(latest);
            *out = c.calcium(t_s);
        }
        for (d, c) in dff.iter_mut().zip(&self.calcium) {
            *d = *c as f32;
        }
        let horizon = latest - 20.0 * BUMP_TAU_S - self.spec.lookahead_s() - 1.0;
        self.presses.retain(|p| p.onset_s >= horizon);
        let (mx, my) = self.shift_at(t_s);
        let (ox, oy) = self.spec.fov_offset_px;
        let (shift_x_px, shift_y_px) = (mx + ox, my + oy);
        FrameTruth {
            shift_x_px,
            shift_y_px,
        }
    }

    /// Render the frame at true time `t_s` into `out` (`channels x height x
    /// width`, channel-major), and the true dF/F into `dff` (one per neuron).
    /// `frame_index` seeds the noise.
    pub fn render(
        &mut self,
        frame_index: u64,
        t_s: f64,
        out: &mut [u16],
        dff: &mut [f32],
    ) -> FrameTruth {
        assert_eq!(out.len(), self.frame_pixels(), "frame buffer size");
        let truth = self.truth_at(t_s, dff);
        let drift = self.drift_at(t_s) as f32;
        let n = self.calcium.len().max(1) as f64;
        let mean_c = self.calcium.iter().sum::<f64>() / n;
        let npf = drift * (1.0 + NEUROPIL_COUPLING * mean_c) as f32;

        // Green scene, padded.
        for ((s, np), nb) in self
            .scene
            .iter_mut()
            .zip(&self.np_static)
            .zip(&self.nb_static)
        {
            *s = np * npf + nb * drift;
        }
        for (c, &ca) in self.cells.iter().zip(&self.calcium) {
            if ca.abs() < 1e-5 {
                continue;
            }
            let g = (ca as f32) * drift;
            for yy in 0..c.bh {
                let row = (c.by + yy) * self.pw + c.bx;
                let dst = &mut self.scene[row..row + c.bw];
                let src = &c.wb[yy * c.bw..(yy + 1) * c.bw];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += s * g;
                }
            }
        }

        let plane = self.w * self.h;
        let mut rng = Rng::new(mix(self.spec.seed, 0x1_0000_0000 + frame_index));
        let (sx, sy) = (truth.shift_x_px, truth.shift_y_px);
        let (green, red) = out.split_at_mut(plane);
        sample_plane(
            &self.scene,
            self.pw,
            self.margin,
            self.w,
            self.h,
            sx,
            sy,
            self.spec.fov_rotation_deg,
            &self.spec,
            &self.normal,
            &mut rng,
            green,
        );
        if self.spec.channels == 2 {
            sample_plane(
                &self.red_static,
                self.pw,
                self.margin,
                self.w,
                self.h,
                sx,
                sy,
                self.spec.fov_rotation_deg,
                &self.spec,
                &self.normal,
                &mut rng,
                &mut red[..plane],
            );
        }
        truth
    }
}

/// Shift a padded scene by (sx, sy) with bilinear interpolation, add shot
/// noise, convert to counts.
#[allow(clippy::too_many_arguments)]
fn sample_plane(
    scene: &[f32],
    pw: usize,
    margin: usize,
    w: usize,
    h: usize,
    sx: f64,
    sy: f64,
    rotation_deg: f64,
    spec: &MicroscopeSpec,
    normal: &[f32],
    rng: &mut Rng,
    out: &mut [u16],
) {
    if rotation_deg != 0.0 {
        return sample_rotated(
            scene,
            pw,
            margin,
            w,
            h,
            (sx, sy),
            rotation_deg,
            spec,
            normal,
            rng,
            out,
        );
    }
    // out(x, y) = scene(x + margin - sx, y + margin - sy)
    let fx = margin as f64 - sx;
    let fy = margin as f64 - sy;
    let ix = fx.floor() as usize;
    let iy = fy.floor() as usize;
    let ax = (fx - fx.floor()) as f32;
    let ay = (fy - fy.floor()) as f32;
    let (w00, w01, w10, w11) = (
        (1.0 - ax) * (1.0 - ay),
        ax * (1.0 - ay),
        (1.0 - ax) * ay,
        ax * ay,
    );
    let gain = spec.gain as f32;
    let offset = spec.offset as f32 + 0.5; // + 0.5: round on truncation
    let mask = (1usize << NORMAL_TABLE_BITS) - 1;
    let mut bits = 0u64;
    let mut left = 0u32;
    for y in 0..h {
        let r0 = &scene[(y + iy) * pw + ix..(y + iy) * pw + ix + w + 1];
        let r1 = &scene[(y + iy + 1) * pw + ix..(y + iy + 1) * pw + ix + w + 1];
        let dst = &mut out[y * w..(y + 1) * w];
        for x in 0..w {
            let lam = w00 * r0[x] + w01 * r0[x + 1] + w10 * r1[x] + w11 * r1[x + 1];
            let photons = if spec.noise {
                if left == 0 {
                    bits = rng.next_u64();
                    left = 4;
                }
                let z = normal[(bits as usize) & mask];
                bits >>= 16;
                left -= 1;
                (lam + lam.max(0.0).sqrt() * z).max(0.0)
            } else {
                lam.max(0.0)
            };
            dst[x] = (offset + gain * photons).clamp(0.0, 65535.0) as u16;
        }
    }
}

/// [`sample_plane`] with the field rotated by `rotation_deg` about the
/// frame's centre after the shift:
/// `out(p) = scene(R(-a) (p - c) + c + margin - shift)`, bilinear, zero
/// outside the scene. The noise draws are made in the same order as the
/// unrotated path.
#[allow(clippy::too_many_arguments)]
fn sample_rotated(
    scene: &[f32],
    pw: usize,
    margin: usize,
    w: usize,
    h: usize,
    (sx, sy): (f64, f64),
    rotation_deg: f64,
    spec: &MicroscopeSpec,
    normal: &[f32],
    rng: &mut Rng,
    out: &mut [u16],
) {
    let ph = scene.len() / pw.max(1);
    let (sin, cos) = rotation_deg.to_radians().sin_cos();
    let (cx, cy) = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
    let at = |x: usize, y: usize| scene.get(y * pw + x).copied().unwrap_or(0.0);
    let gain = spec.gain as f32;
    let offset = spec.offset as f32 + 0.5;
    let mask = (1usize << NORMAL_TABLE_BITS) - 1;
    let mut bits = 0u64;
    let mut left = 0u32;
    for y in 0..h {
        for x in 0..w {
            let (px, py) = (x as f64 - cx, y as f64 - cy);
            let fx = cos * px + sin * py + cx + margin as f64 - sx;
            let fy = -sin * px + cos * py + cy + margin as f64 - sy;
            let lam = if fx >= 0.0 && fy >= 0.0 && fx < (pw - 1) as f64 && fy < (ph - 1) as f64 {
                let (ix, iy) = (fx.floor() as usize, fy.floor() as usize);
                let (ax, ay) = ((fx - fx.floor()) as f32, (fy - fy.floor()) as f32);
                (1.0 - ax) * (1.0 - ay) * at(ix, iy)
                    + ax * (1.0 - ay) * at(ix + 1, iy)
                    + (1.0 - ax) * ay * at(ix, iy + 1)
                    + ax * ay * at(ix + 1, iy + 1)
            } else {
                0.0
            };
            let photons = if spec.noise {
                if left == 0 {
                    bits = rng.next_u64();
                    left = 4;
                }
                let z = normal[(bits as usize) & mask];
                bits >>= 16;
                left -= 1;
                (lam + lam.max(0.0).sqrt() * z).max(0.0)
            } else {
                lam.max(0.0)
            };
            out[y * w + x] = (offset + gain * photons).clamp(0.0, 65535.0) as u16;
        }
    }
}

#[cfg(test)]
mod tests;
