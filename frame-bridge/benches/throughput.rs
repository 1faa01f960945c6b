//! `cargo bench -p frame-bridge --bench throughput`: the Python sender
//! (`python/rigbridge.py`, numpy) sends 512 x 512 uint16 frames over loopback
//! TCP to the receiver, which writes them into a real shared-memory ring; a
//! reader polls the ring. For each paced rate it prints the rate achieved,
//! the frames dropped (at the sender, and gaps the reader saw) and the added
//! latency from the sender's `send()` call (the frame's host stamp) to the
//! frame being readable in the ring, p50 / p99 / max.
//!
//! Environment: `RIG_PYTHON` (an interpreter with numpy; default `python3`),
//! `BENCH_RATES` (comma-separated frames/s, default `300,600,1000`),
//! `BENCH_SECONDS` (per rate, default 10).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use frame_bridge::receiver::{geometry, Receiver, ReceiverConfig};
use frame_ring::{host_now_ns, FrameRingMapping};
use protocol::ring::PollOutcome;

const W: u32 = 512;
const H: u32 = 512;

struct RunResult {
    rate: f64,
    frames: u64,
    seen: u64,
    achieved_fps: f64,
    sender_dropped: u64,
    ring_gaps: u64,
    lat_us: Vec<f64>,
    call_p50_us: f64,
    call_p99_us: f64,
}

fn pct(v: &[f64], p: usize) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[(v.len() - 1) * p / 100]
}

fn json_number(json: &str, key: &str) -> f64 {
    let pat = format!("\"{key}\": ");
    json.find(&pat)
        .and_then(|i| {
            let rest = &json[i + pat.len()..];
            let end = rest.find([',', '}']).unwrap_or(rest.len());
            rest[..end].trim().parse().ok()
        })
        .unwrap_or(f64::NAN)
}

fn run(rate: f64, seconds: f64, python: &PathBuf, script: &PathBuf, n: usize) -> RunResult {
    let shm = format!("/rig-bridge-bench-{}-{n}", std::process::id());
    let dir = std::env::temp_dir().join(format!("rig-bridge-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "bench-token-0123456789\n").expect("token");
    let g = geometry(W, H, 1, 64).expect("geometry");
    let config = ReceiverConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        b"bench-token-0123456789".to_vec(),
        &shm,
        g,
    );
    let receiver = Receiver::bind(config).expect("bind");
    let port = receiver.local_addr().expect("addr").port();
    let ring = FrameRingMapping::open(&shm).expect("ring");
    let mut reader = ring.reader().expect("reader");
    let stop = Arc::new(AtomicBool::new(false));
    let rx_stop = stop.clone();
    let rx = std::thread::spawn(move || receiver.run(&rx_stop).expect("receiver"));

    let frames = (rate * seconds) as u64;
    let reading = Arc::new(AtomicBool::new(true));
    let reading2 = reading.clone();
    let reader_thread = std::thread::spawn(move || {
        let mut px = vec![0u16; (W * H) as usize];
        let mut lat_us = Vec::with_capacity(frames as usize);
        let mut last: Option<u64> = None;
        let (mut gaps, mut seen) = (0u64, 0u64);
        let (mut first_ns, mut last_ns) = (0u64, 0u64);
        while reading2.load(Ordering::Relaxed) {
            match reader.poll(&mut px) {
                Ok(PollOutcome::Frame(m)) => {
                    let now = host_now_ns();
                    lat_us.push(now.saturating_sub(m.host_monotonic_ns) as f64 / 1e3);
                    if let Some(l) = last {
                        gaps += m.frame_number.saturating_sub(l + 1);
                    }
                    if seen == 0 {
                        first_ns = now;
                    }
                    last_ns = now;
                    last = Some(m.frame_number);
                    seen += 1;
                }
                Ok(PollOutcome::Overrun { skipped }) => gaps += skipped,
                Ok(PollOutcome::NothingNew) => std::thread::sleep(Duration::from_micros(20)),
                Ok(_) => {}
                Err(e) => panic!("ring: {e}"),
            }
        }
        (lat_us, gaps, seen, first_ns, last_ns)
    });

    let out = Command::new(python)
        .arg(script)
        .args(["--port", &port.to_string(), "--token-file"])
        .arg(&token_file)
        .args(["--width", "512", "--height", "512", "--queue", "64"])
        .args(["--rate", &rate.to_string(), "--frames", &frames.to_string()])
        .args(["--wait-connected", "5"])
        .output()
        .expect("run the Python sender");
    assert!(
        out.status.success(),
        "sender failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    std::thread::sleep(Duration::from_millis(200));
    while Instant::now() < deadline && json_number(&json, "written").is_nan() {
        std::thread::sleep(Duration::from_millis(10));
    }
    reading.store(false, Ordering::Relaxed);
    let (mut lat_us, gaps, seen, first_ns, last_ns) = reader_thread.join().expect("reader");
    stop.store(true, Ordering::Relaxed);
    rx.join().expect("receiver thread");
    let _ = frame_ring::unlink_ring(&shm);
    lat_us.sort_by(f64::total_cmp);
    let span_s = (last_ns.saturating_sub(first_ns)) as f64 / 1e9;
    RunResult {
        rate,
        frames,
        seen,
        achieved_fps: if span_s > 0.0 {
            (seen.saturating_sub(1)) as f64 / span_s
        } else {
            f64::NAN
        },
        sender_dropped: json_number(&json, "dropped") as u64,
        ring_gaps: frames.saturating_sub(seen).max(gaps),
        lat_us,
        call_p50_us: json_number(&json, "send_call_us_p50"),
        call_p99_us: json_number(&json, "send_call_us_p99"),
    }
}

fn main() {
    // `cargo test --benches` passes --bench-less arguments; run only for `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let python = std::env::var_os("RIG_PYTHON").map_or_else(|| "python3".into(), PathBuf::from);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/rigbridge.py");
    let rates: Vec<f64> = std::env::var("BENCH_RATES")
        .unwrap_or_else(|_| "300,600,1000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let seconds: f64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    println!(
        "frame bridge, 512x512 uint16 over loopback TCP, Python sender -> rig-frame-bridge -> shm ring"
    );
    println!(
        "{:>8} {:>7} {:>7} {:>9} {:>8} {:>8} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "rate",
        "frames",
        "in_ring",
        "fps",
        "s_drop",
        "lost",
        "lat_p50",
        "lat_p99",
        "lat_max",
        "call_p50",
        "call_p99"
    );
    for (i, rate) in rates.iter().enumerate() {
        let r = run(*rate, seconds, &python, &script, i);
        println!(
            "{:>8.0} {:>7} {:>7} {:>9.1} {:>8} {:>8} {:>7.0}us {:>7.0}us {:>7.0}us {:>8.1}us {:>8.1}us",
            r.rate,
            r.frames,
            r.seen,
            r.achieved_fps,
            r.sender_dropped,
            r.ring_gaps,
            pct(&r.lat_us, 50),
            pct(&r.lat_us, 99),
            pct(&r.lat_us, 100),
            r.call_p50_us,
            r.call_p99_us
        );
    }
    println!("s_drop: dropped at the sender (queue full); lost: frames missing from the ring (including s_drop)");
    println!("lat: from the sender's send() call to the frame readable in the ring (ring reader polls every ~20 us)");
    println!("call: time spent in FrameSender.send() (copy + enqueue)");
}
