//! Imaging ingest throughput: the highest frame rate the daemon's ingest
//! thread sustains with zero drops, 512x512 one-channel uint16 frames over a
//! real POSIX shared-memory ring, raw storage off and on.
//!
//! A producer thread publishes at a fixed rate for 3 s; the rate steps up
//! until the ingest drops frames. Frames are stamped in mapped mode (no TTL),
//! so this measures the ring copy, the mean image, frames.tsv and, with
//! storage on, frames.npy with its fsyncs.
//!
//! Run: `cargo bench -p daemon --bench ingest`. Target: >= 1000 frames/s with
//! storage off on the 2-core CI machine; memory flat.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use daemon::imaging::ingest::{Ingest, IngestSetup};
use daemon::session::LiveView;
use firmware_bridge::link::host_now_ns;
use frame_ring::{unlink_ring, FrameRingWriter};
use protocol::ring::{PixelType, RingGeometry};

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A 512 x 512 label image with 500 disc ROIs (radius 5 px) on a grid.
fn write_labels(path: &std::path::Path) {
    let mut npy = session_format::NpyAppender::create(path, session_format::NpyDtype::U2, &[512])
        .expect("labels");
    let mut img = vec![0u16; 512 * 512];
    let mut id = 0u16;
    'grid: for gy in 0..23usize {
        for gx in 0..22usize {
            id += 1;
            if id > 500 {
                break 'grid;
            }
            let (cx, cy) = (11 + gx * 22 + (gy % 2) * 5, 11 + gy * 22);
            for y in cy.saturating_sub(5)..(cy + 6).min(512) {
                for x in cx.saturating_sub(5)..(cx + 6).min(512) {
                    let (dx, dy) = (x as i32 - cx as i32, y as i32 - cy as i32);
                    if dx * dx + dy * dy <= 25 {
                        img[y * 512 + x] = id;
                    }
                }
            }
        }
    }
    for row in img.chunks(512) {
        npy.append(row).expect("row");
    }
    npy.sync().expect("sync");
}

/// Publish `rate` frames/s for `secs`; returns (published, ingested, dropped).
/// With `analysis`, every frame is also motion-corrected and its 500 ROIs'
/// dF/F computed (the full per-frame path).
fn trial(rate: f64, secs: f64, raw: bool, analysis: bool) -> (u64, u64, u64) {
    let name = format!("/rigd-bench-{}", std::process::id());
    let dir = std::env::temp_dir().join(format!(
        "rigd-ingest-bench-{}-{}",
        std::process::id(),
        rate as u64
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let geometry = RingGeometry::new(512, 512, 1, PixelType::U16Le, 64).expect("geometry");
    let mut writer = FrameRingWriter::create(&name, geometry).expect("ring");
    let live = LiveView::default();
    let (_edge_tx, edge_rx) = crossbeam_channel::bounded(16);
    let (notice_tx, notice_rx) = crossbeam_channel::bounded(1 << 16);
    let setup = IngestSetup {
        shm_name: name.clone(),
        width: 512,
        height: 512,
        channels: 1,
        ttl_wired: false,
        frame_rate_hz: rate,
        raw_frames: raw,
        t0_us: 0,
        session_dir: dir.clone(),
        fsync_interval: Duration::from_secs(1),
        chunk_len: Duration::from_secs(3600),
        analysis: analysis.then(|| {
            let labels = dir.join("labels.npy");
            write_labels(&labels);
            daemon::imaging::analysis::AnalysisSetup {
                width: 512,
                height: 512,
                roi_labels: Some(labels),
                roi_table: None,
                motion_correction: true,
                reference_image: None,
                neuropil_coefficient: 0.7,
                baseline: daemon::imaging::dff::BaselineParams::from_config(
                    &rig_config::BaselineSection::default(),
                    rate,
                ),
            }
        }),
        preview: None,
    };
    // Without a clock fit frames wait for one: give the ingest an identity fit.
    live.clock.publish(firmware_bridge::sync::ClockFit {
        host_ref_us: 0.0,
        rig_ref_us: 0.0,
        drift_ppm: 0.0,
        half_band_us: 0.0,
        exchanges: 1,
        min_rtt_us: 0.0,
    });
    let ingest = Ingest::start(setup, edge_rx, live.clone(), notice_tx).expect("ingest");
    std::thread::sleep(Duration::from_millis(700)); // let it attach
                                                    // A textured frame (so motion correction has something to lock on).
    let pixels: Vec<u16> = (0..512 * 512)
        .map(|i| 1000 + ((i * 7919) % 997) as u16)
        .collect();
    let n = (rate * secs) as u64;
    let start = Instant::now();
    for k in 0..n {
        let due = start + Duration::from_secs_f64(k as f64 / rate);
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        writer
            .publish(k + 1, host_now_ns(), None, &pixels)
            .expect("publish");
        if k % 64 == 0 {
            live.status.set_rig_now_us(host_now_ns() / 1000);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    live.status.set_rig_now_us(host_now_ns() / 1000);
    let counters = ingest.counters.clone();
    ingest.finish().expect("finish");
    drop(notice_rx);
    let got = counters.frames.load(Ordering::Relaxed);
    let dropped = counters.dropped.load(Ordering::Relaxed);
    writer.close();
    let _ = unlink_ring(&name);
    let _ = std::fs::remove_dir_all(&dir);
    (n, got, dropped)
}

fn main() {
    println!("imaging ingest, 512x512x1 uint16, POSIX shm ring of 64 slots, 3 s per step");
    println!("| condition | rate frames/s | published | ingested | dropped | RSS MB after |");
    println!("|---|---|---|---|---|---|");
    for (raw, analysis, name) in [
        (false, false, "storage off"),
        (true, false, "raw storage on"),
        (false, true, "storage off, motion + 500 ROIs + dF/F"),
    ] {
        let mut best = 0.0;
        for rate in [250.0, 500.0, 1000.0, 1500.0, 2000.0, 3000.0, 4000.0] {
            let (n, got, dropped) = trial(rate, 3.0, raw, analysis);
            println!(
                "| {name} | {rate} | {n} | {got} | {dropped} | {:.0} |",
                rss_kb() as f64 / 1024.0
            );
            if dropped == 0 && got == n {
                best = rate;
            } else {
                break;
            }
        }
        println!("max sustained with zero drops, {name}: {best} frames/s");
    }
}
