//! Clock-sync accuracy against the virtual rig's ground truth, in virtual time.
//!
//! The virtual rig's own clock model (`rig_sim::clock::SimClock`, drift 40 ppm) and
//! link latency model (`rig_sim::clock::LatencyModel`: 0.1 ms minimum, up to 2 ms
//! of jitter each way, 1 % of exchanges hit by a ~20 ms spike) drive the same
//! `ClockSync` estimator the link uses, with the link's ping schedule (50 Hz for
//! 20 s after connecting, then 10 Hz). Time is simulated, not slept, so 12 hours
//! of device time take seconds. At every exchange the estimate's host -> rig
//! mapping at that instant is compared with the truth.
//!
//! Run: `cargo bench -p rig-sim --bench clock_sync`. Prints a table of
//! mapping-error percentiles per period; the target is p99 <= 50 µs after 10 s
//! and still after 12 h.

use firmware_bridge::sync::{ClockSync, SyncSample};
use rig_sim::clock::{LatencyModel, SimClock};
use rig_sim::rng::Rng;

struct Period {
    name: &'static str,
    from_s: f64,
    to_s: f64,
    errors: Vec<f64>,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn run(seed: u64, drift_ppm: f64, hours: f64) -> Vec<Period> {
    let mut rng = Rng::new(seed);
    let clock = SimClock::new(1_234_567_890, drift_ppm, 1.0);
    let latency = LatencyModel {
        base_us: 100.0,
        jitter_us: 1900.0,
        spike_prob: 0.01,
        spike_us: 20_000.0,
    };
    let mut sync = ClockSync::default();
    // The host's CLOCK_MONOTONIC at the rig's true time zero.
    let host0_us = 5_000_000_000.0;
    let mut periods = vec![
        Period {
            name: "10 s - 60 s",
            from_s: 10.0,
            to_s: 60.0,
            errors: vec![],
        },
        Period {
            name: "1 min - 1 h",
            from_s: 60.0,
            to_s: 3600.0,
            errors: vec![],
        },
        Period {
            name: "1 h - 11 h",
            from_s: 3600.0,
            to_s: 11.0 * 3600.0,
            errors: vec![],
        },
        Period {
            name: "11 h - 12 h",
            from_s: 11.0 * 3600.0,
            to_s: 12.0 * 3600.0,
            errors: vec![],
        },
        Period {
            name: "all after 10 s",
            from_s: 10.0,
            to_s: f64::INFINITY,
            errors: vec![],
        },
    ];
    let mut t_s = 0.0;
    let end_s = hours * 3600.0;
    while t_s < end_s {
        t_s += if t_s < 20.0 { 0.020 } else { 0.100 } + rng.range(0.0, 0.001);
        let send_true = t_s * 1e6;
        let up = latency.sample(&mut rng);
        let turnaround = rng.range(5.0, 50.0);
        let down = latency.sample(&mut rng);
        let sample = SyncSample {
            host_send_ns: ((host0_us + send_true) * 1000.0) as u64,
            host_recv_ns: ((host0_us + send_true + up + turnaround + down) * 1000.0) as u64,
            dev_rx_us: clock.device_us(send_true + up),
            dev_tx_us: clock.device_us(send_true + up + turnaround),
        };
        let Some(fit) = sync.add(sample) else {
            continue;
        };
        // Error of the mapping at the moment of the exchange's reply.
        let host_now_ns = sample.host_recv_ns;
        let truth =
            clock.offset_us as f64 + (host_now_ns as f64 / 1000.0 - host0_us) * clock.rate();
        let err = (fit.host_to_rig_us(host_now_ns) - truth).abs();
        for p in &mut periods {
            if t_s >= p.from_s && t_s < p.to_s {
                p.errors.push(err);
            }
        }
    }
    periods
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful.
    let quick = std::env::args().any(|a| a == "--quick");
    let hours = if quick { 0.1 } else { 12.0 };
    println!("clock sync: drift 40 ppm, latency 0.1-2.0 ms per leg, 1 % spikes of ~20 ms, {hours} h of device time");
    println!("| period | exchanges | p50 µs | p99 µs | max µs |");
    println!("|---|---|---|---|---|");
    let start = std::time::Instant::now();
    let mut periods = run(1, 40.0, hours);
    for p in &mut periods {
        p.errors.sort_by(f64::total_cmp);
        if p.errors.is_empty() {
            continue;
        }
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} |",
            p.name,
            p.errors.len(),
            pct(&p.errors, 0.5),
            pct(&p.errors, 0.99),
            pct(&p.errors, 1.0)
        );
    }
    println!("(computed in {:.1} s)", start.elapsed().as_secs_f64());
}
