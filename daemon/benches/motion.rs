//! Online rigid motion correction throughput: 512x512 uint16 frames,
//! registered against a reference by phase correlation (default parameters:
//! 2x2 binning to 256x256, max shift 20 px) and resampled with `apply`, on one
//! thread.
//!
//! Synthetic frames: Gaussian "neurons" on a smooth background, moved by known
//! subpixel shifts, with shot noise at two brightness levels. Prints frames/s
//! for `register` alone and for `register` + `apply`, and the shift error.
//!
//! Run: `cargo bench -p daemon --bench motion`. Target: >= 500 frames/s per
//! core with motion correction (that budget also covers dF/F).

use std::hint::black_box;
use std::time::Instant;

use daemon::imaging::motion::{MotionCorrector, MotionParams, Reference};
use rig_sim::rng::SplitMix64;

const W: usize = 512;
const H: usize = 512;

/// The field of view moved by (dx, dy), photons scaled by `gain`, shot noise.
fn render(
    blobs: &[(f32, f32, f32, f32)],
    dx: f32,
    dy: f32,
    gain: f32,
    rng: Option<&mut SplitMix64>,
) -> Vec<u16> {
    let mut img = vec![0.0f32; W * H];
    for y in 0..H {
        for x in 0..W {
            let (sx, sy) = (x as f32 - dx, y as f32 - dy);
            img[y * W + x] =
                200.0 + 60.0 * (sx * 0.011 + sy * 0.007).sin() + 40.0 * (sy * 0.013 - 1.0).cos();
        }
    }
    for &(cx, cy, s, a) in blobs {
        let (cx, cy) = (cx + dx, cy + dy);
        let r = (4.0 * s) as isize + 1;
        for y in (cy as isize - r).max(0)..(cy as isize + r).min(H as isize) {
            for x in (cx as isize - r).max(0)..(cx as isize + r).min(W as isize) {
                let d2 = (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2);
                img[y as usize * W + x as usize] += a * (-d2 / (2.0 * s * s)).exp();
            }
        }
    }
    let mut rng = rng;
    img.iter()
        .map(|&v| {
            let mut p = v * gain;
            if let Some(r) = rng.as_deref_mut() {
                p += p.max(0.0).sqrt() * r.normal_f32();
            }
            p.round().clamp(0.0, 65535.0) as u16
        })
        .collect()
}

fn main() {
    let mut rng = SplitMix64::new(42);
    let blobs: Vec<_> = (0..300)
        .map(|_| {
            (
                rng.uniform_f32() * W as f32,
                rng.uniform_f32() * H as f32,
                2.0 + 2.0 * rng.uniform_f32(),
                300.0 + 700.0 * rng.uniform_f32(),
            )
        })
        .collect();
    // MOTION_BIN=1 measures full-resolution registration for comparison.
    let bin = std::env::var("MOTION_BIN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let params = MotionParams {
        bin,
        ..MotionParams::default()
    };
    println!("motion correction bench: {W}x{H} u16, {params:?}");

    for &gain in &[1.0f32, 0.05, 0.01] {
        let reference: Vec<f32> = render(&blobs, 0.0, 0.0, gain, None)
            .iter()
            .map(|&v| f32::from(v))
            .collect();
        let reference = Reference::from_image(&reference, W, H).expect("reference");
        let mut mc = MotionCorrector::new(&reference, params.clone()).expect("corrector");
        let truth: Vec<(f32, f32)> = (0..16)
            .map(|_| {
                (
                    (rng.uniform_f32() - 0.5) * 30.0,
                    (rng.uniform_f32() - 0.5) * 30.0,
                )
            })
            .collect();
        let frames: Vec<Vec<u16>> = truth
            .iter()
            .map(|&(dx, dy)| render(&blobs, dx, dy, gain, Some(&mut rng)))
            .collect();

        let (mut worst, mut sum, mut flagged) = (0.0f32, 0.0f32, 0);
        for (f, &(dx, dy)) in frames.iter().zip(&truth) {
            let s = mc.register(f);
            let e = (s.dx - dx).hypot(s.dy - dy);
            worst = worst.max(e);
            sum += e;
            flagged += usize::from(s.flagged);
        }
        println!(
            "gain {gain}: shift error mean {:.3} px, worst {:.3} px over {} frames ({flagged} flagged)",
            sum / frames.len() as f32,
            worst,
            frames.len()
        );

        let n = 3000;
        let t = Instant::now();
        for i in 0..n {
            black_box(mc.register(black_box(&frames[i % frames.len()])));
        }
        let reg = n as f64 / t.elapsed().as_secs_f64();

        let mut out = vec![0.0f32; W * H];
        let t = Instant::now();
        for i in 0..n {
            let f = &frames[i % frames.len()];
            let s = mc.register(f);
            mc.apply(f, s, &mut out);
            black_box(&out);
        }
        let both = n as f64 / t.elapsed().as_secs_f64();
        println!(
            "gain {gain}: register {reg:.0} frames/s ({:.3} ms/frame); register + apply {both:.0} frames/s ({:.3} ms/frame)",
            1e3 / reg,
            1e3 / both
        );
    }
}
