//! Serve the preview page with synthetic, changing data (a stand-in for
//! `rigd demo` until the daemon feeds [`PreviewState`] itself; used by the
//! browser test `tests/tests/preview.rs`).
//!
//! `cargo run -p daemon --example preview_feed -- [PORT] [SECONDS]`
//! prints `preview: http://ADDR/` once listening, then runs for SECONDS
//! (default 600) or until killed. PORT 0 (default) picks a free port.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use daemon::preview::{start_preview, Health, PreviewState};

fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(600);
    let state = Arc::new(PreviewState::new());
    let cfg = rig_config::PreviewSection {
        enabled: true,
        bind: "127.0.0.1".to_owned(),
        port,
        allow_non_loopback: false,
    };
    let (addr, handle) = match start_preview(&cfg, Arc::clone(&state), daemon::preview::LIMITS) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("preview_feed: {e}");
            std::process::exit(1);
        }
    };
    println!("preview: http://{addr}/");
    let _ = std::io::stdout().flush();

    const N_ROIS: usize = 60;
    const SIDE: u16 = 256;
    // ROI centres on a grid, outlines as octagons.
    let mut outlines = Vec::new();
    let mut kinds = Vec::new();
    for k in 0..N_ROIS {
        let k16 = u16::try_from(k).unwrap_or(0);
        let (cx, cy) = (20 + (k16 % 8) * 30, 20 + (k16 / 8) * 30);
        outlines.push(vec![
            (cx - 4, cy - 9),
            (cx + 4, cy - 9),
            (cx + 9, cy - 4),
            (cx + 9, cy + 4),
            (cx + 4, cy + 9),
            (cx - 4, cy + 9),
            (cx - 9, cy + 4),
            (cx - 9, cy - 4),
        ]);
        kinds.push(
            if k % 5 == 0 {
                "inhibitory"
            } else {
                "excitatory"
            }
            .to_owned(),
        );
    }
    state.set_rois(outlines, kinds);
    let side = usize::from(SIDE);
    let img: Vec<f32> = (0..side * side)
        .map(|i| {
            let (x, y) = ((i % side) as f32, (i / side) as f32);
            100.0 + 50.0 * ((x / 7.0).sin() * (y / 9.0).cos()).abs() + (x + y) * 0.1
        })
        .collect();
    state.set_mean_image(u32::from(SIDE), u32::from(SIDE), &img);

    let start = Instant::now();
    let (mut trial, mut rewards, mut last_trial_us, mut frames) = (0u32, 0u32, 0u64, 0u64);
    let mut last_frame_us = 0u64;
    let mut last_hit = false;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 11) as f32 / (1u64 << 53) as f32
    };
    let mut lever_t = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(10));
        let now_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        // Lever at 1 kHz: a press shortly after each cue.
        while lever_t < now_us {
            let since = (lever_t.saturating_sub(last_trial_us)) as f32 / 1e6;
            let mm = if (0.3..0.8).contains(&since) {
                4.0
            } else {
                0.2
            } + 0.1 * rand();
            state.push_lever(lever_t, mm);
            lever_t += 1000;
        }
        // A trial every 1.5 s.
        if now_us >= last_trial_us + 1_500_000 {
            trial += 1;
            let hit = rand() < 0.75;
            rewards += u32::from(hit);
            state.push_trial(
                trial,
                if hit { "rewarded" } else { "miss" },
                now_us,
                hit.then_some(0.3),
            );
            state.set_task_state(now_us, "response");
            if last_hit {
                // The last trial's lick bout, after its reward.
                for k in 0..5u64 {
                    state.push_lick(last_trial_us + 450_000 + k * 140_000);
                }
            }
            last_hit = hit;
            last_trial_us = now_us;
        }
        // Imaging at 30 Hz.
        while last_frame_us + 33_333 <= now_us {
            last_frame_us += 33_333;
            frames += 1;
            let since = (last_frame_us.saturating_sub(last_trial_us)) as f32 / 1e6;
            let row: Vec<f32> = (0..N_ROIS)
                .map(|k| {
                    let resp = if k % 3 == 0 && (0.3..1.3).contains(&since) {
                        1.0
                    } else {
                        0.0
                    };
                    resp + 0.1 * (rand() - 0.5)
                })
                .collect();
            state.push_dff(last_frame_us, &row);
            let drift = (last_frame_us as f32 / 4e6).sin();
            state.push_motion(last_frame_us, drift, 0.5 * drift, 0.8, rand() < 0.01);
        }
        state.set_health(Health {
            frames,
            drops: 0,
            link: "up".to_owned(),
            clock_band_us: 15.0,
            latency_p50_us: 350.0,
            latency_p99_us: 1200.0,
            trials: trial,
            rewards,
            water_ul: f64::from(rewards) * 4.0,
            session: Some("preview-feed".to_owned()),
        });
    }
    let _ = handle.shutdown();
}
