//! Render time of the simulated microscope per frame (`cargo bench -p
//! rig-sim --bench microscope`). 28.7 Hz needs < 34.8 ms per frame.

use std::time::Instant;

use rig_sim::microscope::{Microscope, MicroscopeSpec};

fn main() {
    for (w, h, channels, frames) in [
        (128u32, 128u32, 1u32, 2000u64),
        (512, 512, 1, 300),
        (512, 512, 2, 200),
    ] {
        let mut spec = MicroscopeSpec::new(w, h);
        spec.channels = channels;
        let mut m = Microscope::new(spec).expect("spec");
        for i in 0..400 {
            m.add_press(1.0 + 3.0 * f64::from(i));
        }
        let mut px = vec![0u16; m.frame_pixels()];
        let mut dff = vec![0f32; m.neurons().len()];
        let mut times = Vec::with_capacity(frames as usize);
        for k in 0..frames {
            let t0 = Instant::now();
            m.render(k, k as f64 / 28.7, &mut px, &mut dff);
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
        println!(
            "microscope render {w}x{h}x{channels}: mean {mean:.3} ms, p99 {p99:.3} ms per frame ({:.0} frames/s)",
            1e3 / mean
        );
    }
}
