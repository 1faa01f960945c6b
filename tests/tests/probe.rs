//! `rig-probe` against the virtual rig: the bring-up numbers a person reads
//! off a newly wired rig, and its checklist (lever, valve, tone, lick, frame
//! clock, sync-out loopback), pass, fail or skip per item.

use std::process::Command;

use rig_tests::{bin, Sim, TempDir};

#[test]
fn probe_measures_drift_and_reports_no_loss_as_json() {
    let dir = TempDir::new("probe");
    // The lever held down for a second: the checklist's lever item passes.
    let sim = Sim::start(dir.path(), &["--drift-ppm", "40", "--fault", "hold@2:1"]);
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
    // The drift is known to within what the clock fit's band allows over
    // the probe (two band widths over 5 s), not to a fixed few ppm: on a
    // busy machine the round trips, and so the band, widen.
    let drift = v["drift_ppm"].as_f64().expect("drift");
    let band_us = v["clock_half_band_us"].as_f64().expect("band");
    let bound_ppm = 2.0 + 2.0 * (2.0 * band_us) / 5e6 * 1e6;
    assert!(
        (drift - 40.0).abs() <= bound_ppm,
        "drift {drift} ppm (bound {bound_ppm:.1}): {v}"
    );
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

fn probe_json(link: &std::path::Path, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let out = Command::new(bin("rig-probe"))
        .arg(link)
        .args(["--json"])
        .args(args)
        .output()
        .expect("run rig-probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "not one JSON object ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), v)
}

fn item<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["checklist"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["item"] == name))
        .unwrap_or_else(|| panic!("no checklist item {name}: {v}"))
}

#[test]
fn the_checklist_passes_on_a_working_rig() {
    let dir = TempDir::new("probe-checklist");
    let sim = Sim::start(
        dir.path(),
        &["--fault", "hold@2:1", "--frame-rate-hz", "30"],
    );
    let (code, v) = probe_json(&sim.link, &["--seconds", "4", "--frame-rate-hz", "30"]);
    for name in ["lever", "valve", "tone", "lick", "frame_clock"] {
        assert_eq!(item(&v, name)["status"], "pass", "{name}: {v}");
    }
    // Not wired, so not checked: a skip, never a pass.
    assert_eq!(item(&v, "sync_out")["status"], "skip", "{v}");
    assert_eq!(v["checklist_failed"], 0, "{v}");
    assert_eq!(code, Some(0), "{v}");
    let lever = item(&v, "lever")["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(lever.contains("a press counts up"), "{lever}");
    let fc = item(&v, "frame_clock")["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(fc.starts_with("30.000 Hz"), "{fc}");
}

#[test]
fn the_checklist_fails_what_is_missing_and_exits_1() {
    let dir = TempDir::new("probe-checklist-fail");
    // No frame clock, the lever untouched, and no loopback wire in the sim.
    let sim = Sim::start(dir.path(), &["--frame-rate-hz", "0"]);
    let (code, v) = probe_json(
        &sim.link,
        &[
            "--seconds",
            "3",
            "--sync-loopback",
            "lick",
            "--lever-min-mm",
            "5",
        ],
    );
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(item(&v, "frame_clock")["status"], "fail", "{v}");
    assert!(item(&v, "frame_clock")["detail"]
        .as_str()
        .is_some_and(|d| d.starts_with("0 frame-clock edges")));
    assert_eq!(item(&v, "sync_out")["status"], "fail", "{v}");
    assert!(item(&v, "sync_out")["detail"]
        .as_str()
        .is_some_and(|d| d.contains("check the loopback wire")));
    assert_eq!(item(&v, "lever")["status"], "fail", "{v}");
    // The outputs still work.
    assert_eq!(item(&v, "valve")["status"], "pass", "{v}");
    assert_eq!(item(&v, "tone")["status"], "pass", "{v}");
    assert_eq!(v["checklist_failed"], 3, "{v}");

    let out = Command::new(bin("rig-probe"))
        .arg(&sim.link)
        .args(["--skip", "lever,teleporter"])
        .output()
        .expect("run rig-probe");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--skip teleporter: not a checklist item")
    );
}
