//! `rig-probe` against the virtual rig: the bring-up numbers a person reads
//! off a newly wired rig.

use std::process::Command;

use rig_tests::{bin, Sim, TempDir};

#[test]
fn probe_measures_drift_and_reports_no_loss_as_json() {
    let dir = TempDir::new("probe");
    let sim = Sim::start(dir.path(), &["--drift-ppm", "40"]);
    let out = Command::new(bin("rig-probe"))
        .arg(&sim.link)
        .args(["--seconds", "5", "--json"])
        .output()
        .expect("run rig-probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rig-probe failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(v["firmware_version"], "0.1.0");
    assert_eq!(v["samples_lost"], 0);
    assert!(
        (v["sample_rate_hz"].as_f64().expect("rate") - 1000.0).abs() < 1.0,
        "{v}"
    );
    let drift = v["drift_ppm"].as_f64().expect("drift");
    assert!((drift - 40.0).abs() <= 5.0, "drift {drift} ppm: {v}");
    for k in ["min", "median", "p99"] {
        assert!(
            v["rtt_us"][k].as_f64().is_some_and(|x| x > 0.0),
            "rtt {k}: {v}"
        );
    }
    // A crystal's drift is not worth a note; the device counted nothing
    // dropped during the probe.
    assert!(v["clock_rate_note"].is_null(), "{v}");
    assert_eq!(v["device_samples_dropped"], 0, "{v}");
}

#[test]
fn probe_says_when_the_device_clock_runs_at_another_rate() {
    let dir = TempDir::new("probe-fast");
    let sim = Sim::start(dir.path(), &["--speed", "5"]);
    let out = Command::new(bin("rig-probe"))
        .arg(&sim.link)
        .args(["--seconds", "3"])
        .output()
        .expect("run rig-probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("the device clock runs at 5.0") && stdout.contains("rig-sim at --speed 5"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("during the probe ("), "{stdout}");
}

#[test]
fn probe_without_a_device_exits_2_with_one_clear_line() {
    let dir = TempDir::new("probe-none");
    let out = Command::new(bin("rig-probe"))
        .arg(dir.path().join("ttyNONE"))
        .args(["--seconds", "1", "--connect-timeout", "1"])
        .output()
        .expect("run rig-probe");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: no rig at "), "{stderr}");
    assert!(
        stderr.contains("ttyNONE") && !stderr.contains("panicked"),
        "{stderr}"
    );
}
