//! Online dF/F throughput: 512x512 one-channel u16 frames, 500 disc ROIs
//! (radius 5 px) with suite2p-style neuropil masks, 60 s window at 30 Hz,
//! sigma 10 frames, both baseline methods, one core.
//!
//! Run: `cargo bench -p daemon --bench dff`. Target: >= 2000 frames/s.

use std::time::Instant;

use daemon::imaging::dff::{BaselineMethod, BaselineParams, OnlineDff};
use daemon::imaging::rois::{LabelImage, NeuropilParams, RoiSet};

fn labels(w: usize, h: usize, n: usize) -> LabelImage {
    let mut labels = vec![0u32; w * h];
    let (cols, rows) = (25usize, n.div_ceil(25));
    let (sx, sy) = (w as f32 / cols as f32, h as f32 / rows as f32);
    for k in 0..n {
        let (cx, cy) = (
            (k % cols) as f32 * sx + sx / 2.0,
            (k / cols) as f32 * sy + sy / 2.0,
        );
        for y in (cy - 6.0) as usize..=(cy + 6.0) as usize {
            for x in (cx - 6.0) as usize..=(cx + 6.0) as usize {
                let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                if x < w && y < h && dx * dx + dy * dy <= 25.0 {
                    labels[y * w + x] = k as u32 + 1;
                }
            }
        }
    }
    LabelImage {
        width: w,
        height: h,
        labels,
    }
}

fn main() {
    let (w, h, n) = (512usize, 512usize, 500usize);
    let t0 = Instant::now();
    let set = RoiSet::from_labels(&labels(w, h, n), &NeuropilParams::default());
    let roi_px: usize = set.rois.iter().map(|r| r.pixels.len()).sum();
    let np_px: usize = set.rois.iter().map(|r| r.neuropil.len()).sum();
    println!(
        "ROI set: {} ROIs, {} ROI px, {} neuropil px in all, built in {:.0} ms",
        set.rois.len(),
        roi_px,
        np_px,
        t0.elapsed().as_secs_f64() * 1e3
    );
    // A few noisy frames, cycled.
    let mut seed = 0x1234_5678_u64;
    let frames: Vec<Vec<u16>> = (0..16)
        .map(|_| {
            (0..w * h)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    1000 + (seed % 512) as u16
                })
                .collect()
        })
        .collect();
    let window = 1800usize;
    for method in [BaselineMethod::Maximin, BaselineMethod::Percentile] {
        let p = BaselineParams {
            method,
            window_frames: window,
            percentile: 8.0,
            sigma_frames: 10.0,
        };
        let mut d = OnlineDff::new(&set, &p, 0.7);
        let (mut f, mut dff) = (vec![0.0f32; n], vec![0.0f32; n]);
        // Warm up past one window so the baseline windows are full.
        for i in 0..window + 200 {
            d.push(&frames[i % frames.len()], &mut f, &mut dff);
        }
        let iters = 6000;
        let t = Instant::now();
        for i in 0..iters {
            d.push(&frames[i % frames.len()], &mut f, &mut dff);
        }
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(&dff);
        println!(
            "{:<10} {w}x{h}, {n} ROIs: {:.0} frames/s ({:.1} us/frame)",
            format!("{method:?}"),
            iters as f64 / dt,
            dt / iters as f64 * 1e6
        );
    }
}
