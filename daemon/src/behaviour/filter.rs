//! The low-pass filter of the lever parsing: a 4th-order Butterworth as two
//! cascaded biquads designed by the bilinear transform (prewarped, so the
//! -3 dB point lands exactly on the corner frequency), run forward and
//! backward for zero phase.

/// One second-order section, transposed direct form II:
/// `y = b0 x + z1; z1 = b1 x - a1 y + z2; z2 = b2 x - a2 y`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Biquad {
    pub b0: f64,
    pub b1: f64,
    pub b2: f64,
    pub a1: f64,
    pub a2: f64,
}

impl Biquad {
    /// The low-pass section `1 / (s² + s/q + 1)` (s normalised to the
    /// corner) mapped by the bilinear transform with the frequency prewarped
    /// to `fc_hz` at sample rate `fs_hz`.
    pub fn lowpass(fc_hz: f64, fs_hz: f64, q: f64) -> Self {
        let k = (std::f64::consts::PI * fc_hz / fs_hz).tan();
        let k2 = k * k;
        let norm = 1.0 / (1.0 + k / q + k2);
        let b0 = k2 * norm;
        Self {
            b0,
            b1: 2.0 * b0,
            b2: b0,
            a1: 2.0 * (k2 - 1.0) * norm,
            a2: (1.0 - k / q + k2) * norm,
        }
    }

    /// Filter `x` in place, starting from the steady state for a constant
    /// input equal to `x[0]` (so a trace that starts away from 0 does not
    /// ring). Assumes unity gain at DC, as for a low-pass.
    fn run(&self, x: &mut [f64]) {
        let Some(&x0) = x.first() else { return };
        let mut z1 = x0 * (1.0 - self.b0);
        let mut z2 = x0 * (self.b2 - self.a2);
        for v in x.iter_mut() {
            let xin = *v;
            let y = self.b0 * xin + z1;
            z1 = self.b1 * xin - self.a1 * y + z2;
            z2 = self.b2 * xin - self.a2 * y;
            *v = y;
        }
    }

    /// Magnitude of the frequency response at `f_hz`.
    pub fn gain(&self, f_hz: f64, fs_hz: f64) -> f64 {
        let w = 2.0 * std::f64::consts::PI * f_hz / fs_hz;
        let (c1, s1) = (w.cos(), w.sin());
        let (c2, s2) = ((2.0 * w).cos(), (2.0 * w).sin());
        let num_re = self.b0 + self.b1 * c1 + self.b2 * c2;
        let num_im = -(self.b1 * s1 + self.b2 * s2);
        let den_re = 1.0 + self.a1 * c1 + self.a2 * c2;
        let den_im = -(self.a1 * s1 + self.a2 * s2);
        (num_re.hypot(num_im)) / (den_re.hypot(den_im))
    }
}

/// A 4th-order Butterworth low-pass: two biquads with the Butterworth pole
/// pairs' quality factors `1 / (2 cos(π/8))` and `1 / (2 cos(3π/8))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Butterworth4 {
    pub sections: [Biquad; 2],
    fc_hz: f64,
    fs_hz: f64,
}

impl Butterworth4 {
    pub fn lowpass(fc_hz: f64, fs_hz: f64) -> Self {
        use std::f64::consts::PI;
        let q1 = 1.0 / (2.0 * (PI / 8.0).cos());
        let q2 = 1.0 / (2.0 * (3.0 * PI / 8.0).cos());
        Self {
            sections: [
                Biquad::lowpass(fc_hz, fs_hz, q1),
                Biquad::lowpass(fc_hz, fs_hz, q2),
            ],
            fc_hz,
            fs_hz,
        }
    }

    /// One forward (causal) pass, in place.
    pub fn filter_in_place(&self, x: &mut [f64]) {
        for s in &self.sections {
            s.run(x);
        }
    }

    /// Magnitude response of one pass at `f_hz` (0.7071 at the corner).
    pub fn gain(&self, f_hz: f64) -> f64 {
        self.sections
            .iter()
            .map(|s| s.gain(f_hz, self.fs_hz))
            .product()
    }

    /// Zero-phase filtering: forward, then backward over the reversed
    /// output, so the magnitude response is squared (0.5 at the corner) and
    /// the phase is zero. The ends are padded with an odd reflection of up
    /// to three corner periods, and each pass starts in the steady state of
    /// its first value, which keeps edge transients small.
    pub fn filtfilt(&self, x: &[f64]) -> Vec<f64> {
        let n = x.len();
        if n == 0 {
            return Vec::new();
        }
        let pad = ((3.0 * self.fs_hz / self.fc_hz) as usize).min(n - 1);
        let mut ext = Vec::with_capacity(n + 2 * pad);
        let (first, last) = (x[0], x[n - 1]);
        ext.extend((1..=pad).rev().map(|k| 2.0 * first - x[k]));
        ext.extend_from_slice(x);
        ext.extend((1..=pad).map(|k| 2.0 * last - x[n - 1 - k]));
        self.filter_in_place(&mut ext);
        ext.reverse();
        self.filter_in_place(&mut ext);
        ext.reverse();
        ext.drain(..pad);
        ext.truncate(n);
        ext
    }
}
