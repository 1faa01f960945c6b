//! The field-of-view check at a session's start: is the microscope looking
//! at the neurons of the imaging reference (the mouse's day-1 mean image)?
//!
//! Before the task starts, the mean of the first frames
//! ([`collect_mean`], from the same shared-memory ring the ingest reads, as
//! a second reader) is registered against the reference ([`measure`]):
//! - rotation: the mean image is rotated about its centre by each angle of a
//!   coarse grid (every [`ROTATION_STEP_DEG`] within +-[`ROTATION_SEARCH_DEG`])
//!   and registered by phase correlation; the angle with the strongest peak,
//!   refined by a parabola through its neighbours, is the estimate;
//! - shift: phase correlation (the motion corrector's, with a search window
//!   of a quarter of the frame) of the mean image rotated by that angle:
//!   subpixel, in the motion corrector's sign convention (the content of the
//!   frame is the reference's moved by `(dx, dy)`);
//! - correlation: Pearson's r between the reference and the mean image with
//!   the rotation and the shift undone, over the pixels both cover.
//!
//! [`FovLimits::problems`] says what is beyond the configured limits; the
//! supervisor warns or refuses (`[imaging.fov_check]`, docs/configuration.md).

use std::time::{Duration, Instant};

use super::motion::{apply_shift, MotionCorrector, MotionError, MotionParams, Reference};

/// The rotation search spans +-this many degrees.
pub const ROTATION_SEARCH_DEG: f64 = 4.0;
/// The coarse grid's step, degrees.
pub const ROTATION_STEP_DEG: f64 = 1.0;

/// What the check measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FovMeasure {
    /// Shift of the field of view along x (columns), px: the image content
    /// appears this far right of where it is in the reference.
    pub dx_px: f64,
    /// Shift along y (rows), px: positive = further down the image.
    pub dy_px: f64,
    /// Rotation of the content about the image centre, degrees,
    /// counter-clockwise as the image is displayed (rows down).
    pub rotation_deg: f64,
    /// Pearson's r with the reference, rotation and shift undone.
    pub correlation: f64,
    /// Phase-correlation peak (1: identical up to a shift; ~0.01: no match).
    pub peak: f64,
    /// The shift estimate is unreliable (on the search window's edge, or a
    /// weak peak): the fields of view probably do not overlap.
    pub flagged: bool,
}

impl FovMeasure {
    /// Length of the shift, px.
    pub fn shift_px(&self) -> f64 {
        self.dx_px.hypot(self.dy_px)
    }
}

/// The limits of `[imaging.fov_check]`, in pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FovLimits {
    pub max_shift_px: f64,
    pub max_rotation_deg: f64,
    pub min_correlation: f64,
    /// µm per pixel, when known (for the messages).
    pub pixel_size_um: Option<f64>,
}

impl FovLimits {
    /// The limits of a configuration (`max_shift_um` converted to pixels).
    pub fn from_config(im: &rig_config::ImagingSection) -> Self {
        let fc = &im.fov_check;
        let max_shift_px = match (fc.max_shift_um, im.pixel_size_um) {
            (Some(um), Some(px)) => um / px,
            _ => fc.max_shift_px,
        };
        Self {
            max_shift_px,
            max_rotation_deg: fc.max_rotation_deg,
            min_correlation: fc.min_correlation,
            pixel_size_um: im.pixel_size_um,
        }
    }

    /// `px` pixels as text, with µm when the pixel size is known.
    pub fn length(&self, px: f64) -> String {
        match self.pixel_size_um {
            Some(s) => format!("{px:.1} px ({:.1} µm)", px * s),
            None => format!("{px:.1} px"),
        }
    }

    /// What is beyond the limits, one phrase each (empty: within them).
    pub fn problems(&self, m: &FovMeasure) -> Vec<String> {
        let mut out = Vec::new();
        if m.flagged {
            out.push(format!(
                "no reliable match with the reference (phase-correlation peak {:.3}): the field \
                 of view is probably elsewhere, or the image is dark",
                m.peak
            ));
        }
        if m.shift_px() > self.max_shift_px {
            out.push(format!(
                "shifted {} (dx {:+.1} px, dy {:+.1} px), more than the {} allowed",
                self.length(m.shift_px()),
                m.dx_px,
                m.dy_px,
                self.length(self.max_shift_px)
            ));
        }
        if m.rotation_deg.abs() > self.max_rotation_deg {
            out.push(format!(
                "rotated {:+.1}°, more than the {:.1}° allowed",
                m.rotation_deg, self.max_rotation_deg
            ));
        }
        if m.correlation < self.min_correlation {
            out.push(format!(
                "correlation with the reference {:.2}, below the {:.2} required",
                m.correlation, self.min_correlation
            ));
        }
        out
    }
}

/// `image` rotated by `deg` about its centre into `out` (bilinear; pixels
/// from outside are the image's mean): `out(p) = image(R(-deg) (p - c) + c)`,
/// so content at `q` in `image` appears at `R(deg) (q - c) + c`.
pub fn rotate(image: &[f32], w: usize, h: usize, deg: f64, out: &mut [f32]) {
    let mean = image.iter().map(|&v| f64::from(v)).sum::<f64>() / image.len().max(1) as f64;
    let (s, c) = deg.to_radians().sin_cos();
    let (cx, cy) = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
    for y in 0..h {
        for x in 0..w {
            let (px, py) = (x as f64 - cx, y as f64 - cy);
            // Inverse rotation: where this output pixel comes from.
            let sx = c * px + s * py + cx;
            let sy = -s * px + c * py + cy;
            out[y * w + x] = sample(image, w, h, sx, sy).unwrap_or(mean as f32);
        }
    }
}

/// Bilinear sample at `(x, y)`; None outside the image.
fn sample(image: &[f32], w: usize, h: usize, x: f64, y: f64) -> Option<f32> {
    if !(x >= 0.0 && y >= 0.0 && x <= (w - 1) as f64 && y <= (h - 1) as f64) {
        return None;
    }
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (ax, ay) = ((x - x0 as f64) as f32, (y - y0 as f64) as f32);
    let v = |xx: usize, yy: usize| image[yy * w + xx];
    Some(
        (1.0 - ax) * (1.0 - ay) * v(x0, y0)
            + ax * (1.0 - ay) * v(x1, y0)
            + (1.0 - ax) * ay * v(x0, y1)
            + ax * ay * v(x1, y1),
    )
}

fn to_u16(image: &[f32], out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(image) {
        *o = if v.is_finite() {
            v.round().clamp(0.0, 65535.0) as u16
        } else {
            0
        };
    }
}

/// Pearson's r of `a` and `b` over the pixels at least `margin` from every
/// edge.
fn correlation(a: &[f32], b: &[f32], w: usize, h: usize, margin: usize) -> f64 {
    let (mut n, mut sa, mut sb) = (0.0f64, 0.0f64, 0.0f64);
    let (mut saa, mut sbb, mut sab) = (0.0f64, 0.0f64, 0.0f64);
    for y in margin..h.saturating_sub(margin) {
        for x in margin..w.saturating_sub(margin) {
            let (va, vb) = (f64::from(a[y * w + x]), f64::from(b[y * w + x]));
            n += 1.0;
            sa += va;
            sb += vb;
            saa += va * va;
            sbb += vb * vb;
            sab += va * vb;
        }
    }
    if n < 16.0 {
        return 0.0;
    }
    let cov = sab - sa * sb / n;
    let var = (saa - sa * sa / n) * (sbb - sb * sb / n);
    if var <= 0.0 {
        0.0
    } else {
        cov / var.sqrt()
    }
}

/// Register `mean` (the first frames' mean, H x W) against `reference`.
pub fn measure(
    reference: &[f32],
    mean: &[f32],
    w: usize,
    h: usize,
) -> Result<FovMeasure, MotionError> {
    let reference_img = Reference::from_image(reference, w, h)?;
    if mean.len() != w * h {
        return Err(MotionError::SizeMismatch {
            width: w,
            height: h,
            expected: w * h,
            got: mean.len(),
        });
    }
    let params = MotionParams {
        max_shift: (w.min(h) / 4) as f32,
        ..MotionParams::default()
    };
    let mut mc = MotionCorrector::new(&reference_img, params)?;
    let mut as_u16 = vec![0u16; w * h];
    // 1. The shift, before any rotation is known.
    to_u16(mean, &mut as_u16);
    let first = mc.register(&as_u16);
    let mut unshifted = vec![0.0f32; w * h];
    apply_shift(&as_u16, w, h, first.dx, first.dy, &mut unshifted);
    // 2. The rotation of the unshifted image, about the centre it now
    //    shares with the reference.
    let mut rotated = vec![0.0f32; w * h];
    let steps = (ROTATION_SEARCH_DEG / ROTATION_STEP_DEG).round() as i32;
    let mut peaks = Vec::with_capacity(2 * steps as usize + 1);
    for k in -steps..=steps {
        let deg = f64::from(k) * ROTATION_STEP_DEG;
        rotate(&unshifted, w, h, -deg, &mut rotated);
        to_u16(&rotated, &mut as_u16);
        peaks.push((deg, f64::from(mc.register(&as_u16).peak)));
    }
    let best = peaks
        .iter()
        .enumerate()
        .max_by(|a, b| a.1 .1.total_cmp(&b.1 .1))
        .map_or(steps as usize, |(i, _)| i);
    let mut rotation_deg = peaks[best].0;
    if best > 0 && best + 1 < peaks.len() {
        let (l, c, r) = (peaks[best - 1].1, peaks[best].1, peaks[best + 1].1);
        let denom = l - 2.0 * c + r;
        if denom < 0.0 {
            rotation_deg += (0.5 * (l - r) / denom).clamp(-0.5, 0.5) * ROTATION_STEP_DEG;
        }
    }
    // 3. Undo the rotation; what shift is left.
    rotate(&unshifted, w, h, -rotation_deg, &mut rotated);
    to_u16(&rotated, &mut as_u16);
    let rest = mc.register(&as_u16);
    let mut undone = vec![0.0f32; w * h];
    apply_shift(&as_u16, w, h, rest.dx, rest.dy, &mut undone);
    let (dx, dy) = (first.dx + rest.dx, first.dy + rest.dy);
    let margin = (f64::from(dx.abs().max(dy.abs())).ceil() as usize)
        + (rotation_deg.abs().to_radians() * w.max(h) as f64 / 2.0).ceil() as usize
        + 1;
    Ok(FovMeasure {
        dx_px: f64::from(dx),
        dy_px: f64::from(dy),
        rotation_deg,
        correlation: correlation(reference, &undone, w, h, margin),
        peak: f64::from(rest.peak),
        flagged: first.flagged || rest.flagged,
    })
}

/// Why the first frames could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(
        "no frame ring {name:?} ({reason}): start the microscope's acquisition (its producer \
         creates the ring) before the session"
    )]
    NoRing { name: String, reason: String },
    #[error("frame ring {name:?}: {reason}: fix [imaging] width/height/channels or the producer")]
    Geometry { name: String, reason: String },
    #[error(
        "only {got} of {wanted} frames arrived from {name:?} in {timeout_s:.0} s: is the \
         microscope acquiring? ([imaging.fov_check].timeout_s)"
    )]
    Timeout {
        name: String,
        got: u32,
        wanted: u32,
        timeout_s: f64,
    },
    #[error("frame ring {name:?}: {reason}")]
    Ring { name: String, reason: String },
    #[error("cancelled")]
    Cancelled,
}

/// The mean (first channel, H x W) of the next `frames` frames published
/// into the ring `shm_name`, waiting at most `timeout`. Frames are read as a
/// second reader: the ring is never written. `cancel` is polled between
/// frames.
pub fn collect_mean(
    shm_name: &str,
    w: usize,
    h: usize,
    channels: u32,
    frames: u32,
    timeout: Duration,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<(Vec<f32>, u32), CollectError> {
    use protocol::ring::PollOutcome;
    let name = shm_name.to_owned();
    let deadline = Instant::now() + timeout;
    // The ring may be created a moment after the start (the acquisition
    // starting): keep trying until the deadline.
    let mapping = loop {
        match frame_ring::FrameRingMapping::open(shm_name) {
            Ok(m) => break m,
            Err(e) if Instant::now() >= deadline => {
                return Err(CollectError::NoRing {
                    name,
                    reason: e.to_string(),
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(CollectError::Cancelled);
        }
    };
    let geometry = |e: frame_ring::ShmError| CollectError::Geometry {
        name: name.clone(),
        reason: e.to_string(),
    };
    mapping
        .check_geometry(w as u32, h as u32, channels)
        .map_err(geometry)?;
    let mut reader = mapping.reader().map_err(|e| CollectError::Ring {
        name: name.clone(),
        reason: e.to_string(),
    })?;
    let mut pixels = vec![0u16; reader.frame_pixels()];
    let mut sum = vec![0.0f64; w * h];
    let mut got = 0u32;
    while got < frames {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(CollectError::Cancelled);
        }
        if Instant::now() >= deadline {
            return Err(CollectError::Timeout {
                name,
                got,
                wanted: frames,
                timeout_s: timeout.as_secs_f64(),
            });
        }
        match reader.poll(&mut pixels) {
            Ok(PollOutcome::Frame(_)) => {
                for (s, &p) in sum.iter_mut().zip(&pixels[..w * h]) {
                    *s += f64::from(p);
                }
                got += 1;
            }
            Ok(PollOutcome::NothingNew) => std::thread::sleep(Duration::from_millis(5)),
            Ok(PollOutcome::Overrun { .. } | PollOutcome::Torn) => {}
            Ok(PollOutcome::ProducerRestarted { .. }) => {
                // Another acquisition: its frames must still be this size.
                let g = reader.geometry();
                if (g.width(), g.height(), g.channels()) != (w as u32, h as u32, channels) {
                    return Err(CollectError::Geometry {
                        name,
                        reason: format!(
                            "the producer restarted with {}x{}x{} frames, expected {w}x{h}x{channels}",
                            g.width(), g.height(), g.channels()
                        ),
                    });
                }
                pixels.resize(reader.frame_pixels(), 0);
            }
            Err(e) => {
                return Err(CollectError::Ring {
                    name,
                    reason: e.to_string(),
                })
            }
        }
    }
    let n = f64::from(got);
    Ok((sum.iter().map(|&s| (s / n) as f32).collect(), got))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rig_sim::microscope::{Microscope, MicroscopeSpec};

    /// The simulated microscope's mean image over `n` frames from `t0_s`,
    /// with its field of view moved by `offset` px.
    fn sim_mean(seed: u64, offset: (f64, f64), n: usize) -> (Vec<f32>, usize, usize) {
        sim_mean_rotated(seed, offset, 0.0, n)
    }

    fn sim_mean_rotated(
        seed: u64,
        offset: (f64, f64),
        rotation_deg: f64,
        n: usize,
    ) -> (Vec<f32>, usize, usize) {
        let (w, h) = (128usize, 128usize);
        let mut spec = MicroscopeSpec::new(w as u32, h as u32);
        spec.seed = seed;
        spec.neurons = 60;
        spec.fov_offset_px = offset;
        spec.fov_rotation_deg = rotation_deg;
        let mut m = Microscope::new(spec).expect("spec");
        let mut frame = vec![0u16; w * h];
        let mut dff = vec![0.0f32; m.neurons().len()];
        let mut sum = vec![0.0f64; w * h];
        for i in 0..n {
            m.render(i as u64, i as f64 / 28.7, &mut frame, &mut dff);
            for (s, &p) in sum.iter_mut().zip(&frame) {
                *s += f64::from(p);
            }
        }
        (sum.iter().map(|&s| (s / n as f64) as f32).collect(), w, h)
    }

    #[test]
    fn a_known_shift_of_the_simulated_field_is_measured_within_a_tenth_of_its_size() {
        let (reference, w, h) = sim_mean(7, (0.0, 0.0), 60);
        for &(dx, dy) in &[(0.0, 0.0), (3.4, -2.2), (-7.0, 5.5), (14.0, 0.0)] {
            let (day7, _, _) = sim_mean(7, (dx, dy), 60);
            let m = measure(&reference, &day7, w, h).expect("measure");
            println!("true ({dx:+.1}, {dy:+.1}) measured {m:?}");
            assert!(
                (m.dx_px - dx).abs() < 0.5 && (m.dy_px - dy).abs() < 0.5,
                "true ({dx}, {dy}), measured {m:?}"
            );
            assert!(m.rotation_deg.abs() < 0.5, "{m:?}");
            assert!(m.correlation > 0.8 && !m.flagged, "{m:?}");
        }
    }

    #[test]
    fn another_field_of_view_does_not_correlate() {
        let (reference, w, h) = sim_mean(7, (0.0, 0.0), 30);
        let (other, _, _) = sim_mean(8, (0.0, 0.0), 30);
        let m = measure(&reference, &other, w, h).expect("measure");
        println!("another field: {m:?}");
        let limits = FovLimits {
            max_shift_px: 8.0,
            max_rotation_deg: 2.0,
            min_correlation: 0.5,
            pixel_size_um: None,
        };
        assert!(m.correlation < 0.5, "{m:?}");
        assert!(!limits.problems(&m).is_empty());
    }

    #[test]
    fn a_rotation_is_measured_and_undone() {
        let (reference, w, h) = sim_mean(7, (0.0, 0.0), 30);
        let mut rotated = vec![0.0f32; w * h];
        rotate(&reference, w, h, 2.5, &mut rotated);
        let m = measure(&reference, &rotated, w, h).expect("measure");
        println!("rotated 2.5°: {m:?}");
        assert!((m.rotation_deg - 2.5).abs() < 0.4, "{m:?}");
        assert!(m.dx_px.abs() < 0.5 && m.dy_px.abs() < 0.5, "{m:?}");
        assert!(m.correlation > 0.8, "{m:?}");
        let limits = FovLimits {
            max_shift_px: 8.0,
            max_rotation_deg: 2.0,
            min_correlation: 0.5,
            pixel_size_um: Some(0.8),
        };
        let p = limits.problems(&m);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("rotated +2."), "{p:?}");
    }

    #[test]
    fn a_rotated_microscope_is_measured() {
        // The simulated microscope itself turned by 1.5° (after a shift of
        // (2, -1) px): the rotation and the rotated shift are found.
        let (reference, w, h) = sim_mean(7, (0.0, 0.0), 30);
        let (turned, _, _) = sim_mean_rotated(7, (2.0, -1.0), 1.5, 30);
        let m = measure(&reference, &turned, w, h).expect("measure");
        println!("microscope rotated 1.5°: {m:?}");
        let (s, c) = 1.5f64.to_radians().sin_cos();
        let (tx, ty) = (c * 2.0 + s * 1.0, s * 2.0 - c * 1.0);
        assert!((m.rotation_deg - 1.5).abs() < 0.3, "{m:?}");
        assert!(
            (m.dx_px - tx).abs() < 0.5 && (m.dy_px - ty).abs() < 0.5,
            "{m:?}"
        );
        assert!(m.correlation > 0.8, "{m:?}");
    }

    #[test]
    fn the_limits_name_what_is_beyond_them_with_units() {
        let limits = FovLimits {
            max_shift_px: 10.0,
            max_rotation_deg: 2.0,
            min_correlation: 0.5,
            pixel_size_um: Some(0.5),
        };
        let ok = FovMeasure {
            dx_px: 3.0,
            dy_px: -4.0,
            rotation_deg: 0.3,
            correlation: 0.9,
            peak: 0.6,
            flagged: false,
        };
        assert!(limits.problems(&ok).is_empty());
        let far = FovMeasure {
            dx_px: 9.0,
            dy_px: 12.0,
            ..ok
        };
        assert_eq!(
            limits.problems(&far),
            vec!["shifted 15.0 px (7.5 µm) (dx +9.0 px, dy +12.0 px), more than the 10.0 px (5.0 µm) allowed"]
        );
    }
}
