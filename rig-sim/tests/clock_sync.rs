//! `firmware_bridge::sync::ClockSync` against a simulated link with random
//! latency, jitter and spikes: the estimator's accuracy tests. They live here
//! rather than beside the estimator because they draw from the simulator's
//! seeded generator (`rig_sim::rng`), and `firmware-bridge` sits below
//! `rig-sim`. The bench `clock_sync` measures the same over 12 hours.

use firmware_bridge::sync::{ClockSync, SyncSample};
use rig_sim::rng::Rng;

/// A simulated link: rig = offset + host * (1 + drift); each leg's latency is
/// uniform in [0.1, 2] ms with an occasional 20 ms spike.
fn exchange(rng: &mut Rng, host_ns: u64, drift_ppm: f64, offset_us: f64) -> SyncSample {
    let leg = |rng: &mut Rng| {
        let base = rng.range(100.0, 2000.0);
        if rng.chance(0.02) {
            base + 20_000.0
        } else {
            base
        }
    };
    let up = leg(rng);
    let turnaround = rng.range(5.0, 50.0);
    let down = leg(rng);
    let to_rig = |h_us: f64| offset_us + h_us * (1.0 + drift_ppm * 1e-6);
    let h0 = host_ns as f64 / 1000.0;
    SyncSample {
        host_send_ns: host_ns,
        host_recv_ns: ((h0 + up + turnaround + down) * 1000.0) as u64,
        dev_rx_us: to_rig(h0 + up) as u64,
        dev_tx_us: to_rig(h0 + up + turnaround) as u64,
    }
}

#[test]
fn tracks_drift_and_offset_through_jitter_and_spikes() {
    let mut rng = Rng::new(1);
    let mut sync = ClockSync::default();
    let (drift, offset) = (40.0, 123_456.0);
    let mut errors = Vec::new();
    // 50 pings a second for 20 s, then 10 a second (the link's schedule),
    // for 10 minutes; check the error from 10 s on.
    let mut host_ns = 5_000_000_000u64;
    for i in 0..(1000 + 5800u64) {
        host_ns += if i < 1000 { 20_000_000 } else { 100_000_000 } + rng.range(0.0, 1e6) as u64;
        let fit = sync
            .add(exchange(&mut rng, host_ns, drift, offset))
            .or(sync.fit());
        let fit = fit.expect("a fit after the first exchange");
        if i >= 500 {
            let truth = offset + (host_ns as f64 / 1000.0) * (1.0 + drift * 1e-6);
            errors.push((fit.host_to_rig_us(host_ns) - truth).abs());
        }
    }
    errors.sort_by(f64::total_cmp);
    let p99 = errors[errors.len() * 99 / 100];
    let worst = errors[errors.len() - 1];
    assert!(
        p99 < 50.0,
        "p99 mapping error {p99:.1} µs (worst {worst:.1})"
    );
    let fit = sync.fit().expect("fit");
    assert!(
        (fit.drift_ppm - drift).abs() < 2.0,
        "drift {}",
        fit.drift_ppm
    );
    // Round trip back.
    let h = 60_000_000_000u64;
    assert!((fit.rig_to_host_ns(fit.host_to_rig_us(h)) - h as f64).abs() < 1.0);
}

#[test]
fn follows_a_device_clock_running_ten_times_faster() {
    // The virtual rig at --speed 10: ten rig µs per host µs.
    let mut rng = Rng::new(2);
    let mut sync = ClockSync::default();
    let mut host_ns = 1_000_000_000u64;
    let mut errors = Vec::new();
    for i in 0..3000u64 {
        host_ns += 20_000_000;
        let s = exchange(&mut rng, host_ns, 9e6, 0.0);
        let fit = sync.add(s).expect("fit");
        if i > 500 {
            let truth = host_ns as f64 / 1000.0 * (1.0 + 9e6 * 1e-6);
            errors.push((fit.host_to_rig_us(host_ns) - truth).abs() / (1.0 + 9e6 * 1e-6));
        }
    }
    errors.sort_by(f64::total_cmp);
    let p99 = errors[errors.len() * 99 / 100];
    assert!(p99 < 50.0, "p99 error in host µs {p99:.1}");
}
