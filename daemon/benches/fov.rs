//! The field-of-view check's accuracy and cost: the simulated microscope's
//! field (512 x 512, 200 neurons, shot noise, motion, neuropil) on "day 1"
//! is the reference (mean of 60 frames); on "day 7" the same field is moved
//! by known shifts (rig-sim's `fov_offset_px`) and, for some cases, rotated
//! by a known angle (the day-7 mean image rotated about its centre). Each
//! case's mean of 60 frames is measured against the reference.
//!
//! The true shift includes the brain's own slow motion (the mean
//! displacement over each set of frames, from the simulator's truth), so
//! it is the offset give or take a pixel or two.
//!
//! Prints, per case, the true and measured shift and rotation, the errors,
//! the correlation and the time `measure` took; then the worst errors and a
//! different mouse's field (another seed) for the correlation it gives.
//!
//! Run: `cargo bench -p daemon --bench fov`.

use std::time::Instant;

use daemon::imaging::fov::{measure, rotate};
use rig_sim::microscope::{Microscope, MicroscopeSpec};

const W: usize = 512;
const H: usize = 512;
const FRAMES: usize = 60;

/// The mean of 60 frames from `t0_s`, and the mean true displacement of the
/// content over them (the offset plus the brain's own motion), px.
fn mean_image(seed: u64, day: u8, offset: (f64, f64), t0_s: f64) -> (Vec<f32>, (f64, f64)) {
    let mut spec = MicroscopeSpec::new(W as u32, H as u32);
    spec.seed = seed;
    spec.day = day;
    spec.fov_offset_px = offset;
    let mut m = Microscope::new(spec).expect("spec");
    let mut frame = vec![0u16; W * H];
    let mut dff = vec![0.0f32; m.neurons().len()];
    let mut sum = vec![0.0f64; W * H];
    let (mut mx, mut my) = (0.0, 0.0);
    for i in 0..FRAMES {
        let t = t0_s + i as f64 / 28.7;
        let truth = m.render(i as u64, t, &mut frame, &mut dff);
        mx += truth.shift_x_px / FRAMES as f64;
        my += truth.shift_y_px / FRAMES as f64;
        for (s, &p) in sum.iter_mut().zip(&frame) {
            *s += f64::from(p);
        }
    }
    (
        sum.iter().map(|&s| (s / FRAMES as f64) as f32).collect(),
        (mx, my),
    )
}

fn main() {
    let (reference, (rx, ry)) = mean_image(1, 1, (0.0, 0.0), 0.0);
    let cases: &[(f64, f64, f64)] = &[
        (0.0, 0.0, 0.0),
        (0.7, -0.3, 0.0),
        (3.4, -2.2, 0.0),
        (-6.3, 4.1, 0.0),
        (12.0, -9.0, 0.0),
        (25.0, 18.0, 0.0),
        (-40.0, 10.0, 0.0),
        (0.0, 0.0, 1.5),
        (4.0, 3.0, -2.5),
    ];
    println!(
        "{:>7} {:>7} {:>6} | {:>7} {:>7} {:>6} | {:>6} {:>6} | {:>5} {:>6} | {:>7}",
        "dx", "dy", "rot°", "dx'", "dy'", "rot'°", "err px", "err °", "r", "peak", "ms"
    );
    let (mut worst_px, mut worst_deg, mut times) = (0.0f64, 0.0f64, Vec::new());
    for &(dx, dy, rot) in cases {
        // Day 7, 10 minutes into the acquisition (other motion, other activity).
        let (mut day7, (mx, my)) = mean_image(1, 7, (dx, dy), 600.0);
        // What the content truly moved between the two means.
        let (dx, dy) = (mx - rx, my - ry);
        if rot != 0.0 {
            // Rotate about the reference's centre: the content moved by
            // (dx, dy) then rotated.
            let mut r = vec![0.0f32; W * H];
            rotate(&day7, W, H, rot, &mut r);
            day7 = r;
        }
        let t = Instant::now();
        let m = measure(&reference, &day7, W, H).expect("measure");
        let ms = t.elapsed().as_secs_f64() * 1e3;
        times.push(ms);
        // The true shift of the rotated image: the offset rotated about the
        // centre.
        let (s, c) = rot.to_radians().sin_cos();
        let (tx, ty) = (c * dx - s * dy, s * dx + c * dy);
        let err = (m.dx_px - tx).hypot(m.dy_px - ty);
        let err_deg = (m.rotation_deg - rot).abs();
        worst_px = worst_px.max(err);
        worst_deg = worst_deg.max(err_deg);
        println!(
            "{tx:>7.2} {ty:>7.2} {rot:>6.2} | {:>7.2} {:>7.2} {:>6.2} | {err:>6.3} {err_deg:>6.3} | {:>5.3} {:>6.3} | {ms:>7.1}",
            m.dx_px, m.dy_px, m.rotation_deg, m.correlation, m.peak
        );
    }
    times.sort_by(f64::total_cmp);
    println!(
        "worst shift error {worst_px:.3} px, worst rotation error {worst_deg:.3}°, measure() median {:.1} ms, max {:.1} ms",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    let (other, _) = mean_image(2, 7, (0.0, 0.0), 600.0);
    let m = measure(&reference, &other, W, H).expect("measure");
    println!(
        "another mouse's field (seed 2): r = {:.3}, peak {:.3}, flagged {}",
        m.correlation, m.peak, m.flagged
    );
}
