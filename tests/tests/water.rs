//! Water safety end to end with the real binaries: the per-session and
//! per-day caps hold across sessions (the day's water counted from the
//! mouse's session folders), `summary.json` gives the supplement still due,
//! a sated mouse ends its session, and every automatic stop raises an alert.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rig_tests::{
    read_tsv, rigctl, session_value, start_session, wait_connected, wait_idle, Rigd, Sim, TempDir,
};

struct Rig {
    _dir: TempDir,
    _sim: Sim,
    socket: PathBuf,
    config: PathBuf,
    truth: PathBuf,
    alerts: PathBuf,
}

fn rig(name: &str, extra_toml: &str, sim_args: &[&str]) -> Rig {
    let dir = TempDir::new(name);
    let truth = dir.path().join("truth.tsv");
    let mut args = vec![
        "--speed",
        "10",
        "--day",
        "14",
        "--truth",
        truth.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(sim_args);
    let sim = Sim::start(dir.path(), &args);
    let socket = dir.path().join("rigd.sock");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data root");
    let alerts = dir.path().join("alerts.jsonl");
    let config = dir.path().join("rig.toml");
    std::fs::write(
        &config,
        format!(
            "[rig]\nserial_port = {:?}\n\n[storage]\ndata_root = {:?}\nfsync_interval_ms = 100\n\n\
             [control]\nsocket = {:?}\n\n[preview]\nenabled = false\n\n[imaging]\nenabled = false\n\n\
             [alerts]\ncommand = {:?}\ndisk_free_min_mb = 1\n\n{extra_toml}\n",
            sim.link.display().to_string(),
            data.display().to_string(),
            socket.display().to_string(),
            format!("cat >> '{}'", alerts.display()),
        ),
    )
    .expect("config");
    Rig {
        _dir: dir,
        _sim: sim,
        socket,
        config,
        truth,
        alerts,
    }
}

fn summary(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).expect("summary"))
        .expect("summary.json is JSON")
}

fn alerts(rig: &Rig, want: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: Vec<serde_json::Value> = std::fs::read_to_string(&rig.alerts)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("alert JSON"))
            .collect();
        if v.len() >= want || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn valve_openings(rig: &Rig) -> usize {
    rig_tests::valve_openings(&rig.truth)
}

#[test]
fn water_caps_hold_across_sessions_and_the_summary_gives_the_supplement() {
    let rig = rig(
        "watercaps",
        "[task]\nreward_ul = 4.0\niti_min_ms = 1000\niti_max_ms = 1500\n\n\
         [safety]\nmax_water_per_session_ul = 40.0\nmax_water_per_day_ul = 60.0\n\
         daily_water_target_ul = 50.0\n",
        &[],
    );
    let _rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);

    // Session 1: the session cap (10 rewards of 4 µL).
    let s1 = start_session(&rig.socket, "M40");
    wait_idle(&rig.socket, 120);
    assert_eq!(session_value(&s1, "stop_reason"), "water_cap");
    let v = summary(&s1);
    assert_eq!(v["rewards"], 10, "{v}");
    assert_eq!(v["water_ul"], 40.0);
    assert_eq!(v["water_today_ul"], 40.0);
    assert_eq!(v["supplement_ul"], 10.0, "50 µL target - 40 µL");
    // The manifest matches every file, the session's log included.
    let check = std::process::Command::new("sha256sum")
        .args(["--quiet", "-c", "MANIFEST.sha256"])
        .current_dir(&s1)
        .output()
        .expect("sha256sum");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // Session 2, same mouse, same day: only 20 µL left of the day's 60.
    let s2 = start_session(&rig.socket, "M40");
    wait_idle(&rig.socket, 120);
    assert_eq!(session_value(&s2, "stop_reason"), "water_cap");
    let v = summary(&s2);
    assert_eq!(v["rewards"], 5, "{v}");
    assert_eq!(v["water_today_ul"], 60.0);
    assert_eq!(v["supplement_ul"], 0.0);

    // Session 3: the day's cap is reached; refused with the numbers.
    let (code, out, err) = rigctl(&rig.socket, &["start", "--mouse", "M40"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("60.0 µL today"), "{err}");
    // Another mouse is not affected.
    let s4 = start_session(&rig.socket, "M41");
    std::thread::sleep(Duration::from_millis(300));
    let (code, out, err) = rigctl(&rig.socket, &["stop"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(session_value(&s4, "state"), "complete");

    // The device opened the valve exactly 15 times for M40 (+ M41's, if any).
    // (The virtual rig writes its log a moment after the valve opens.)
    let m41 = summary(&s4)["rewards"].as_u64().expect("rewards") as usize;
    let deadline = Instant::now() + Duration::from_secs(5);
    while valve_openings(&rig) < 15 + m41 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(valve_openings(&rig), 15 + m41);
    // Both automatic stops were alerted; the experimenter's stop was not.
    let a = alerts(&rig, 2);
    let stops: Vec<_> = a
        .iter()
        .filter(|a| a["kind"] == "session_auto_stopped")
        .collect();
    assert_eq!(stops.len(), 2, "{a:?}");
    assert!(stops.iter().all(|a| a["details"]["reason"] == "water_cap"));
    assert!(
        stops[0]["message"]
            .as_str()
            .unwrap_or("")
            .contains("10 µL by hand"),
        "the first alert names the supplement: {}",
        stops[0]["message"]
    );
}

#[test]
fn a_sated_mouse_ends_the_session() {
    let rig = rig(
        "sated",
        "[task]\nsated_after_min = 1\niti_min_ms = 1000\niti_max_ms = 1500\n",
        &["--sated-after", "5"],
    );
    let _rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let dir = start_session(&rig.socket, "M42");
    wait_idle(&rig.socket, 120);
    assert_eq!(session_value(&dir, "stop_reason"), "sated");
    assert_eq!(summary(&dir)["rewards"], 5);
    // The last press was a minute (of rig time) before the end.
    let trials = read_tsv(&dir.join("trials.tsv"));
    let last_press: f64 = trials
        .iter()
        .filter_map(|t| t["t_response_s"].parse::<f64>().ok())
        .fold(0.0, f64::max);
    let events = read_tsv(&dir.join("events.tsv"));
    let end: f64 = events
        .iter()
        .filter(|e| e["kind"] == "state" && e["detail"] == "finished")
        .map(|e| e["t_s"].parse::<f64>().expect("t_s"))
        .next()
        .expect("a Finished state");
    assert!(
        end - last_press >= 60.0 && end - last_press < 90.0,
        "ended {} s after the last press",
        end - last_press
    );
    let a = alerts(&rig, 1);
    assert_eq!(a[0]["kind"], "session_auto_stopped", "{a:?}");
    assert_eq!(a[0]["details"]["reason"], "sated");
}

/// A record of today that cannot be water (here `water_ul = -1e9`, which
/// would have lowered the day's count and let the mouse drink past its
/// daily cap) refuses the start, naming the file; once the folder is moved
/// away the mouse can be trained again.
#[test]
fn an_implausible_record_of_today_refuses_the_start() {
    let rig = rig("implausible", "", &[]);
    let _rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let out = std::process::Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .expect("date");
    let day = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let folder = rig
        ._dir
        .path()
        .join("data/M60")
        .join(format!("{day}_000000"));
    std::fs::create_dir_all(&folder).expect("folder");
    std::fs::write(folder.join("summary.json"), r#"{"water_ul": -1e9}"#).expect("summary");
    let (code, out, err) = rigctl(&rig.socket, &["start", "--mouse", "M60"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("refused_by_safety") && err.contains("water_ul = -1000000000"),
        "{err}"
    );
    assert!(err.contains("fix or move"), "{err}");
    std::fs::remove_dir_all(&folder).expect("move it away");
    let _dir = start_session(&rig.socket, "M60");
    let (code, out, err) = rigctl(&rig.socket, &["stop"]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn a_manual_pulse_given_to_a_mouse_counts_for_its_day() {
    let rig = rig("pulse-mouse", "", &[]);
    let _rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let cfg = rig.config.to_str().expect("utf-8");
    let (code, out, err) = rigctl(
        &rig.socket,
        &[
            "--config",
            cfg,
            "mouse",
            "add",
            "P1",
            "--sex",
            "F",
            "--date-of-birth",
            "2026-01-10",
            "--baseline-weight-g",
            "24.0",
        ],
    );
    assert_eq!(code, 0, "mouse add: {out}{err}");
    let openings = || valve_openings(&rig);
    // A mouse without a record: refused before the valve opens.
    let (code, out, err) = rigctl(
        &rig.socket,
        &["--config", cfg, "valve", "pulse", "40", "--mouse", "NOPE"],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("rigctl mouse add NOPE"), "{err}");
    // The mouse's pulse: the calibration's volume for 40 ms (the example
    // calibration: 4.2 µL) goes into its ledger for today.
    let (code, out, err) = rigctl(
        &rig.socket,
        &["--config", cfg, "valve", "pulse", "40", "--mouse", "P1"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("4.20 µL recorded for P1"), "{out}");
    let data = rig.config.parent().expect("dir").join("data");
    let ledger = std::fs::read_to_string(data.join("P1/water.tsv")).expect("water.tsv");
    let lines: Vec<&str> = ledger.lines().filter(|l| l.contains("\tpulse\t")).collect();
    assert_eq!(lines.len(), 1, "{ledger}");
    assert!(lines[0].contains("\t4.2"), "{ledger}");
    // The device opened the valve once: for P1, not for NOPE.
    let deadline = Instant::now() + Duration::from_secs(10);
    while openings() < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(openings(), 1);
}
