//! The wall clock jumping (NTP stepping it, an administrator setting it)
//! must not move anything timed by the rig clock. This test steps the
//! machine's real clock (CLOCK_REALTIME, as root) an hour forward and two
//! back during a session, then puts it right; it is alone in its test
//! binary so no other test runs meanwhile, and only with
//! RIG_ALLOW_CLOCK_STEP=1 (CI sets it).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rig_tests::{
    read_tsv, rigctl, run_python, session_value, start_session, wait_connected, Rigd, Sim, TempDir,
};

/// Puts the wall clock right (true start + monotonic time elapsed) when
/// dropped, even if the test fails half-way.
struct ClockGuard {
    wall_at_start: SystemTime,
    mono_at_start: Instant,
}

impl ClockGuard {
    fn set_offset(&self, offset_s: i64) -> bool {
        let true_now = self.wall_at_start + self.mono_at_start.elapsed();
        let secs = true_now
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs() as i64;
        Command::new("date")
            .arg("-s")
            .arg(format!("@{}", secs + offset_s))
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for ClockGuard {
    fn drop(&mut self) {
        let _ = self.set_offset(0);
    }
}

#[test]
fn a_wall_clock_jump_does_not_move_rig_times() {
    // Stepping the machine's clock is not something to do on a developer's
    // machine unasked: CI (`.ci/run`) sets RIG_ALLOW_CLOCK_STEP=1.
    if std::env::var_os("RIG_ALLOW_CLOCK_STEP").is_none() {
        eprintln!("skipped: set RIG_ALLOW_CLOCK_STEP=1 to let this test step the wall clock");
        return;
    }
    let guard = ClockGuard {
        wall_at_start: SystemTime::now(),
        mono_at_start: Instant::now(),
    };
    // Can we set the clock at all (root, CAP_SYS_TIME)?
    if !guard.set_offset(0) {
        assert!(
            std::env::var_os("RIG_REQUIRE_ROOT").is_none(),
            "cannot set the wall clock (needs root)"
        );
        eprintln!("skipped: cannot set the wall clock (needs root; CI sets RIG_REQUIRE_ROOT)");
        return;
    }
    let dir = TempDir::new("wallclock");
    let sim = Sim::start(dir.path(), &["--speed", "5", "--day", "14"]);
    let socket = dir.path().join("rigd.sock");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data root");
    let config = dir.path().join("rig.toml");
    std::fs::write(
        &config,
        format!(
            "[rig]\nserial_port = {:?}\n\n[storage]\ndata_root = {:?}\nfsync_interval_ms = 100\n\n\
             [control]\nsocket = {:?}\n\n[preview]\nenabled = false\n\n[imaging]\nenabled = false\n\n\
             [safety]\nheartbeat_interval_ms = 20\nheartbeat_timeout_ms = 1000\n",
            sim.link.display().to_string(),
            data.display().to_string(),
            socket.display().to_string()
        ),
    )
    .expect("config");
    let _rigd = Rigd::start(&config, &socket);
    wait_connected(&socket);
    let session = start_session(&socket, "M30");
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    assert!(guard.set_offset(3600), "clock forward");
    std::thread::sleep(Duration::from_secs(3));
    assert!(guard.set_offset(-3600), "clock back");
    std::thread::sleep(Duration::from_secs(3));
    assert!(guard.set_offset(0), "clock right");
    std::thread::sleep(Duration::from_secs(2));
    let wall_s = started.elapsed().as_secs_f64();
    let (code, out, err) = rigctl(&socket, &["stop"]);
    assert_eq!(code, 0, "{out}{err}");
    drop(guard);
    check(&session, wall_s);
}

fn check(session: &Path, wall_s: f64) {
    assert_eq!(session_value(session, "state"), "complete");
    // The link never noticed.
    let events = read_tsv(&session.join("events.tsv"));
    assert!(
        !events
            .iter()
            .any(|e| e["kind"] == "lost" || e["kind"] == "sample_gap"),
        "the clock jump disturbed the link"
    );
    // The lever: no gap, no step, and as long as the session ran (5x).
    let out = run_python(
        r#"
import sys, json, numpy as np
lever = np.load(sys.argv[1] + "/lever.npy")
d = np.diff(lever[:, 0])
print(json.dumps({"min": float(d.min()), "max": float(d.max()), "last": float(lever[-1, 0])}))
"#,
        &[session.as_os_str()],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let (min, max, last) = (
        v["min"].as_f64().expect("min"),
        v["max"].as_f64().expect("max"),
        v["last"].as_f64().expect("last"),
    );
    assert!(min > 0.0009 && max < 0.0011, "lever period {min}..{max} s");
    assert!(
        (last - wall_s * 5.0).abs() < 5.0,
        "lever covers {last} s of rig time, the session ran {wall_s} s at 5x"
    );
    // The clock fit is still tight.
    let text = std::fs::read_to_string(session.join("session.toml")).expect("session.toml");
    let table: toml::Table = text.parse().expect("toml");
    let band = table["clock_sync"]["half_band_us"]
        .as_float()
        .expect("half_band_us");
    assert!(band < 2000.0, "clock sync half band {band} µs");
    // Trials follow each other at the task's pace (no hour-long ITI).
    let trials = read_tsv(&session.join("trials.tsv"));
    let cues: Vec<f64> = trials
        .iter()
        .map(|t| t["t_cue_s"].parse().expect("cue"))
        .collect();
    assert!(cues.len() >= 3, "{} trials", cues.len());
    for w in cues.windows(2) {
        assert!(w[1] - w[0] < 30.0, "cues {w:?}");
    }
}
