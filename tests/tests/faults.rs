//! Faults an unattended rig must survive, one test each, with the real
//! `rigd`, `rigctl`, `rig-sim` and frame producer: the cable unplugged
//! mid-trial and mid-reward, the device silent with the port open, rigd
//! SIGKILLed (the device's watchdog closes the valve; the next start recovers
//! the session), the disk filling up, an unwritable data folder, the frame
//! producer stalling. Each checks the record the fault leaves in the session
//! files. (The producer killed and restarted: tests/imaging.rs; the wall
//! clock jumping: tests/wallclock.rs, alone in its binary because it moves the
//! machine's clock.)
//!
//! The tests run one at a time (a lock): each runs a virtual rig at several
//! times real time, and two of them at once on a 2-core machine would test
//! the machine, not rigd.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rig_tests::{
    read_tsv, rigctl, run_python, session_value, start_session, valve_openings, valve_rewards,
    wait_connected, wait_idle, Rigd, Sim, TempDir,
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

struct Rig {
    /// Held for their lifetime: the folder is removed, the virtual rig
    /// stopped, when the rig is dropped.
    #[allow(dead_code)]
    dir: TempDir,
    #[allow(dead_code)]
    sim: Option<Sim>,
    socket: PathBuf,
    config: PathBuf,
    truth: PathBuf,
    #[allow(dead_code)]
    data: PathBuf,
    alerts: PathBuf,
}

/// A virtual rig at `speed` (expert mouse) and a config for rigd. `data`
/// overrides the data root (which must then exist).
fn rig(name: &str, speed: f64, extra_toml: &str, sim_args: &[&str], data: Option<&Path>) -> Rig {
    let dir = TempDir::new(name);
    let truth = dir.path().join("truth.tsv");
    let speed_s = speed.to_string();
    let mut args = vec![
        "--speed",
        &speed_s,
        "--truth",
        truth.to_str().expect("utf-8 path"),
        "--day",
        "14",
    ];
    args.extend_from_slice(sim_args);
    let sim = Sim::start(dir.path(), &args);
    let socket = dir.path().join("rigd.sock");
    let data = data.map_or_else(|| dir.path().join("data"), Path::to_path_buf);
    std::fs::create_dir_all(&data).expect("create the data root");
    let alerts = dir.path().join("alerts.jsonl");
    // Host heartbeats every 20 ms of wall time; the device's watchdog counts
    // device time, which runs `speed` times faster.
    let timeout_ms = (200.0 * speed).max(200.0) as u32;
    let config = dir.path().join("rig.toml");
    let text = format!(
        "[rig]\nserial_port = {:?}\n\n[storage]\ndata_root = {:?}\nfsync_interval_ms = 100\n\n\
         [control]\nsocket = {:?}\n\n[preview]\nenabled = false\n\n[imaging]\nenabled = false\n\n\
         [safety]\nheartbeat_interval_ms = 20\nheartbeat_timeout_ms = {timeout_ms}\n\n\
         [alerts]\ncommand = {:?}\ndisk_free_min_mb = 1\n\n{extra_toml}\n",
        sim.link.display().to_string(),
        data.display().to_string(),
        socket.display().to_string(),
        format!("cat >> '{}'", alerts.display()),
    );
    std::fs::write(&config, text).expect("write config");
    Rig {
        dir,
        sim: Some(sim),
        socket,
        config,
        truth,
        data,
        alerts,
    }
}

/// The alerts the `[alerts] command` received, as JSON.
fn alerts(rig: &Rig) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&rig.alerts)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("an alert is one JSON object"))
        .collect()
}

fn wait_alert(rig: &Rig, kind: &str, secs: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(a) = alerts(rig).into_iter().find(|a| a["kind"] == kind) {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} alert; got {:?}",
            alerts(rig)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn truth_rows(rig: &Rig, kind: &str) -> Vec<HashMap<String, String>> {
    read_tsv(&rig.truth)
        .into_iter()
        .filter(|r| r["kind"] == kind)
        .collect()
}

fn num(row: &HashMap<String, String>, key: &str) -> f64 {
    row[key]
        .parse()
        .unwrap_or_else(|_| panic!("{key} = {:?} is not a number", row[key]))
}

/// The valve never stayed open past its cap: every opening in the device's
/// truth closed within `cap_ms`.
fn assert_valve_within(rig: &Rig, cap_ms: f64) {
    // An opening the truth log shows may be closing this instant (the
    // simulator runs on): give it the cap and a margin to show its close.
    let deadline = Instant::now() + Duration::from_millis(cap_ms as u64 + 3000);
    while truth_rows(rig, "valve_open").len() != truth_rows(rig, "valve_close").len()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let closes = truth_rows(rig, "valve_close");
    assert!(!closes.is_empty(), "the valve never opened");
    for c in &closes {
        let open_ms = num(c, "value") / 1000.0;
        assert!(
            open_ms <= cap_ms + 0.01,
            "the valve was open {open_ms} ms (> {cap_ms} ms): {c:?}"
        );
    }
    assert_eq!(
        truth_rows(rig, "valve_open").len(),
        closes.len(),
        "every opening closed"
    );
}

/// Lever gaps (> 5 sample periods) in the session, as session seconds.
const LEVER_GAPS: &str = r#"
import sys, json, numpy as np
lever = np.load(sys.argv[1] + "/lever.npy")
t = lever[:, 0]
assert np.all(np.diff(t) > 0), "lever times increase"
d = np.diff(t)
gaps = [[float(t[i]), float(t[i + 1])] for i in np.nonzero(d > 0.005)[0]]
print(json.dumps({"rows": int(len(t)), "last": float(t[-1]), "gaps": gaps}))
"#;

#[test]
fn unplugged_mid_trial_and_mid_reward_the_session_goes_on() {
    let _one = serial();
    let rig = rig(
        "unplug",
        5.0,
        "[task]\nmax_duration_min = 2\niti_min_ms = 1000\niti_max_ms = 2000\n",
        &[
            "--fault-on",
            "unplug@cue3:1.5",
            "--fault-on",
            "unplug@valve6:1.5",
        ],
        None,
    );
    let _rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let dir = start_session(&rig.socket, "M21");
    wait_idle(&rig.socket, 120);
    assert_eq!(session_value(&dir, "state"), "complete");
    assert_eq!(session_value(&dir, "stop_reason"), "duration");

    // Both unplugs happened, and the device's valve never stayed open.
    assert_eq!(truth_rows(&rig, "fault_unplug").len(), 2);
    assert_eq!(truth_rows(&rig, "fault_replug").len(), 2);
    assert_valve_within(&rig, 200.0);

    // Each is in events.tsv: lost, then connected again, and the samples
    // the cable did not carry are one gap each.
    let events = read_tsv(&dir.join("events.tsv"));
    let count = |kind: &str| events.iter().filter(|e| e["kind"] == kind).count();
    assert_eq!(count("lost"), 2, "two losses recorded");
    let reconnects = events
        .iter()
        .filter(|e| e["kind"] == "connected" && e["detail"].contains("reconnect=true"))
        .count();
    assert_eq!(reconnects, 2, "two reconnections recorded");
    assert!(count("sample_gap") >= 2, "the missing samples are recorded");

    // The trial whose cue the unplug interrupted is never a miss. The device
    // decides it (task.reward_decision = "device", the default): armed
    // at the cue, it fires if the mouse crosses before the watchdog trips,
    // and rigd learns so when the link is back. So it is rewarded exactly
    // when the virtual rig opened the valve in its window, else aborted.
    let trials = read_tsv(&dir.join("trials.tsv"));
    let t0: f64 = session_value(&dir, "t0_rig_us").parse().expect("t0");
    let t3 = trials.iter().find(|t| t["trial"] == "3").expect("trial 3");
    let cue3: f64 = t3["t_cue_s"].parse().expect("cue");
    // The arm ends at the latest when the link is back (the reconnection's
    // Reset disarms it): a valve opening before the replug is trial 3's.
    let replug3 = truth_rows(&rig, "fault_replug")
        .iter()
        .map(|r| (num(r, "device_us") - t0) / 1e6)
        .find(|&s| s > cue3)
        .expect("a replug after trial 3's cue");
    let opened_in_3 = truth_rows(&rig, "valve_open").iter().any(|r| {
        let s = (num(r, "device_us") - t0) / 1e6;
        s > cue3 && s < replug3
    });
    if opened_in_3 {
        assert_eq!(t3["outcome"], "rewarded", "{t3:?}");
        assert_eq!(t3["reward_ul"], "4", "{t3:?}");
    } else {
        assert_eq!(t3["outcome"], "aborted", "{t3:?}");
    }
    // The reward the unplug interrupted was given (the device finished the
    // pulse on its own) and is recorded with its volume.
    let sixth_open = &truth_rows(&rig, "valve_open")[5];
    let open_s = (num(sixth_open, "device_us") - t0) / 1e6;
    let rewarded_then = trials
        .iter()
        .filter(|t| t["outcome"] == "rewarded")
        .find(|t| {
            let resp: f64 = t["t_response_s"].parse().unwrap_or(f64::NAN);
            (open_s - resp).abs() < 0.05
        })
        .unwrap_or_else(|| panic!("no rewarded trial for the valve opening at {open_s} s"));
    assert_eq!(rewarded_then["reward_ul"], "4", "{rewarded_then:?}");
    // Trials went on after both faults.
    let last_cue: f64 = trials
        .last()
        .expect("trials")
        .get("t_cue_s")
        .and_then(|s| s.parse().ok())
        .expect("cue");
    assert!(last_cue > open_s + 5.0, "no trials after the second unplug");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).expect("summary"))
            .expect("json");
    // Trial 3 is the aborted one unless the device rewarded it.
    let want_aborted = u64::from(!opened_in_3);
    assert!(
        summary["aborted"].as_u64() >= Some(want_aborted),
        "{summary}"
    );

    // Lever gaps only where the cable was out (each ~1.5 s plus reconnect).
    let out = run_python(LEVER_GAPS, &[dir.as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let unplugs: Vec<f64> = truth_rows(&rig, "fault_unplug")
        .iter()
        .map(|r| (num(r, "device_us") - t0) / 1e6)
        .collect();
    let gaps = v["gaps"].as_array().expect("gaps");
    assert_eq!(gaps.len(), 2, "gaps {gaps:?} vs unplugs at {unplugs:?}");
    for g in gaps {
        let (a, b) = (g[0].as_f64().expect("a"), g[1].as_f64().expect("b"));
        assert!(
            unplugs
                .iter()
                .any(|&u| a <= u + 0.01 && b >= u + 1.5 && b < u + 15.0),
            "gap {a}..{b} s is not an unplug (at {unplugs:?})"
        );
    }
}

#[test]
fn a_silent_device_is_detected_and_the_session_resumes() {
    let _one = serial();
    let mut rig = rig(
        "silent",
        5.0,
        "[task]\nmax_duration_min = 1\niti_min_ms = 1000\niti_max_ms = 2000\n",
        &["--fault-on", "silent@cue2:3"],
        None,
    );
    let _rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let dir = start_session(&rig.socket, "M22");
    wait_idle(&rig.socket, 120);
    assert_eq!(session_value(&dir, "state"), "complete");
    assert_eq!(truth_rows(&rig, "fault_silent_start").len(), 1);
    let events = read_tsv(&dir.join("events.tsv"));
    let lost: Vec<_> = events.iter().filter(|e| e["kind"] == "lost").collect();
    assert_eq!(lost.len(), 1, "one loss: {lost:?}");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "connected" && e["detail"].contains("reconnect=true")),
        "reconnected"
    );
    let trials = read_tsv(&dir.join("trials.tsv"));
    let t2 = trials.iter().find(|t| t["trial"] == "2").expect("trial 2");
    // The device decides the reward: armed at cue 2 before it fell silent,
    // it may have opened the valve at the crossing during the silence, and
    // rigd learns it when the link is back. Either way the record says what
    // the valve did.
    assert!(
        t2["outcome"] == "aborted" || t2["outcome"] == "rewarded",
        "trial 2: {t2:?}"
    );
    assert!(
        trials.len() >= 4,
        "the session went on: {} trials",
        trials.len()
    );
    // The simulator writes its truth log in batches: stop it, so that the
    // log holds every opening, before reading it.
    if let Some(sim) = rig.sim.take() {
        sim.stop();
    }
    assert_valve_within(&rig, 200.0);
    // Not asserted yet: under a silence the device can open the valve for a
    // trial the files end as aborted (seen once in 10-20 runs: 21 openings,
    // 20 rewarded). Printed for the investigation (the issue note says more).
    eprintln!(
        "valve openings on the device {}, rewarded trials {}",
        valve_openings(&rig.truth),
        valve_rewards(&dir)
    );
}

#[test]
fn rigd_killed_the_device_closes_the_valve_and_the_next_start_recovers() {
    let _one = serial();
    // Real time: the watchdog (200 ms) against a 1 s flush.
    let rig = rig("killed", 1.0, "", &[], None);
    let rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let (code, out, err) = rigctl(&rig.socket, &["valve", "flush", "--ms", "1000"]);
    assert_eq!(code, 0, "flush: {out}{err}");
    rigd.signal("KILL");
    let _ = rigd.wait(10);
    std::thread::sleep(Duration::from_millis(1500));
    let opens = truth_rows(&rig, "valve_open");
    let closes = truth_rows(&rig, "valve_close");
    assert_eq!(opens.len(), 1, "{opens:?}");
    assert_eq!(closes.len(), 1, "the valve closed");
    let open_ms = num(&closes[0], "value") / 1000.0;
    assert!(
        closes[0]["detail"].contains("cause=3"),
        "closed by the watchdog: {:?}",
        closes[0]
    );
    // The watchdog (200 ms) plus up to one heartbeat period and the time
    // from the flush's Ack to the kill; far below the 1 s flush.
    assert!(
        open_ms < 600.0,
        "the valve stayed open {open_ms} ms after rigd died"
    );
    assert_eq!(truth_rows(&rig, "safe_state").len(), 1);

    // A session, then rigd dies again mid-session.
    let rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let dir = start_session(&rig.socket, "M23");
    std::thread::sleep(Duration::from_secs(3));
    rigd.signal("KILL");
    let _ = rigd.wait(10);
    assert_eq!(session_value(&dir, "state"), "running");
    let deadline = Instant::now() + Duration::from_secs(5);
    while truth_rows(&rig, "safe_state").len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no watchdog after the second kill"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The next start recovers the folder by itself and can run a session.
    let rigd = Rigd::start(&rig.config, &rig.socket);
    assert_eq!(session_value(&dir, "state"), "recovered");
    let out = run_python(LEVER_GAPS, &[dir.as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert!(v["last"].as_f64() > Some(1.5), "{v}");
    wait_connected(&rig.socket);
    let dir2 = start_session(&rig.socket, "M23");
    assert_ne!(dir, dir2);
    std::thread::sleep(Duration::from_millis(500));
    let (code, out, err) = rigctl(&rig.socket, &["stop"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(session_value(&dir2, "state"), "complete");
    drop(rigd);
}

/// A tmpfs mounted for a test (root only), unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, options: &str) -> Option<Self> {
        std::fs::create_dir_all(at).expect("mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Some(Self(at.to_path_buf()))
        } else if std::env::var_os("RIG_REQUIRE_ROOT").is_some() {
            panic!("cannot mount a tmpfs at {} (needs root)", at.display());
        } else {
            eprintln!("skipped: cannot mount a tmpfs (needs root; CI sets RIG_REQUIRE_ROOT)");
            None
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_stops_the_session_cleanly_and_keeps_what_was_written() {
    let _one = serial();
    let scratch = TempDir::new("diskfull-mnt");
    let mnt = scratch.path().join("data");
    // 1 MiB of it is the session's reserve; the lever stream at 10x fills
    // the rest in a few seconds.
    let Some(_mount) = Mount::tmpfs(&mnt, "size=3m") else {
        return;
    };
    let rig = rig("diskfull", 10.0, "", &[], Some(&mnt));
    let rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let dir = start_session(&rig.socket, "M24");
    wait_idle(&rig.socket, 90);
    let alert = wait_alert(&rig, "storage_error", 10);
    assert_eq!(alert["severity"], "critical");
    assert_eq!(alert["mouse"], "M24");
    // The folder is closed with the reason, not left running.
    assert_eq!(session_value(&dir, "state"), "recovered");
    let reason = session_value(&dir, "stop_reason");
    assert!(
        reason.contains("storage error") && reason.contains("No space left"),
        "{reason}"
    );
    // What was written before is intact and loads.
    let out = run_python(LEVER_GAPS, &[dir.as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert!(v["rows"].as_u64() > Some(10_000), "{v}");
    assert_eq!(v["gaps"].as_array().map(Vec::len), Some(0), "{v}");
    let _ = read_tsv(&dir.join("trials.tsv"));
    assert!(!dir.join(".rigd-reserve.tmp").exists());
    // The daemon is still there, the disk-low alert came too, and a new
    // start on the full disk is refused clearly.
    let _ = wait_alert(&rig, "disk_low", 20);
    let (code, out, err) = rigctl(&rig.socket, &["start", "--mouse", "M24"]);
    assert_eq!(code, 1, "start on a full disk: {out}{err}");
    assert!(
        err.contains("No space left") || err.contains("space"),
        "{err}"
    );
    drop(rigd);
    drop(rig);
}

#[test]
fn an_unwritable_data_folder_is_refused_at_start_with_a_clear_error() {
    let _one = serial();
    let scratch = TempDir::new("readonly-mnt");
    let mnt = scratch.path().join("data");
    let Some(_mount) = Mount::tmpfs(&mnt, "ro,size=16m") else {
        return;
    };
    let rig = rig("readonly", 1.0, "", &[], Some(&mnt));
    let _rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (code, err) = loop {
        let (code, _, err) = rigctl(&rig.socket, &["start", "--mouse", "M25"]);
        if !err.contains("no lever sample") || Instant::now() > deadline {
            break (code, err);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&mnt.display().to_string()),
        "names the folder: {err}"
    );
    assert!(err.contains("Read-only"), "says why: {err}");
    assert!(err.contains("data_root"), "says what to fix: {err}");
    let (_, out, _) = rigctl(&rig.socket, &["status", "--json"]);
    assert!(out.contains("\"state\":\"idle\""), "{out}");
    assert!(std::fs::read_dir(&mnt).expect("list").next().is_none());
}

#[test]
fn a_stalled_frame_producer_is_recorded_and_ingest_resumes() {
    let _one = serial();
    let shm = format!("/rig-e2e-{}-stall", std::process::id());
    let rig = rig("stall", 1.0, "", &[], None);
    // Imaging on, timed by the producer's clock (no TTL needed).
    let cfg = std::fs::read_to_string(&rig.config)
        .expect("config")
        .replace(
            "[imaging]\nenabled = false\n",
            &format!(
                "[imaging]\nenabled = true\nshm_name = {shm:?}\nwidth = 32\nheight = 32\nttl_wired = false\n"
            ),
        );
    std::fs::write(&rig.config, cfg).expect("config");
    let _rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let dir = start_session(&rig.socket, "M26");
    let producer = rig_tests::workspace_root().join("frame-ring/producers/rigframes_producer.py");
    let mut child = Command::new(rig_tests::python())
        .arg(&producer)
        .args([
            "--name",
            &shm,
            "--width",
            "32",
            "--height",
            "32",
            "--frames",
            "500",
            "--rate",
            "50",
            "--unlink",
            "--start-delay-ms",
            "1500",
        ])
        .spawn()
        .expect("start the producer");
    let pid = child.id().to_string();
    std::thread::sleep(Duration::from_millis(4500));
    let _ = Command::new("kill").args(["-STOP", &pid]).status();
    std::thread::sleep(Duration::from_secs(4));
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    let st = child.wait().expect("producer");
    assert!(st.success());
    std::thread::sleep(Duration::from_millis(500));
    let (code, out, err) = rigctl(&rig.socket, &["stop"]);
    assert_eq!(code, 0, "{out}{err}");
    // Every frame is accounted for: ingested, or (the producer caught up in
    // a burst after the stall and overran the ring) a `dropped` row.
    let frames = read_tsv(&dir.join("frames.tsv"));
    let numbers: Vec<u64> = frames
        .iter()
        .map(|f| f["frame"].parse().expect("frame"))
        .collect();
    assert_eq!(numbers, (1..=500).collect::<Vec<u64>>());
    let dropped = frames.iter().filter(|f| f["dropped"] == "1").count();
    let events = read_tsv(&dir.join("events.tsv"));
    let reported: f64 = events
        .iter()
        .filter(|e| e["kind"] == "frames_dropped")
        .map(|e| e["value"].parse::<f64>().expect("count"))
        .sum();
    assert_eq!(dropped as f64, reported, "each dropped frame is reported");
    assert!(dropped < 500 - 100, "most frames were ingested");
    let stale = events
        .iter()
        .position(|e| e["kind"] == "producer_stale")
        .expect("the stall is recorded");
    let resumed = events
        .iter()
        .position(|e| e["kind"] == "producer_resumed")
        .expect("the resumption is recorded");
    assert!(stale < resumed);
    let secs: f64 = events[resumed]["value"].parse().expect("seconds");
    assert!((3.0..8.0).contains(&secs), "stalled {secs} s");
}

/// Lever rows: strictly increasing times, how many, the first and last, and
/// the gaps over 1.5 sample periods (1 kHz); and the lever at rest.
const LEVER_ROWS: &str = r#"
import sys, json, numpy as np
lever = np.load(sys.argv[1] + "/lever.npy")
t = lever[:, 0]
d = np.diff(t)
print(json.dumps({
    "rows": int(len(t)),
    "first": float(t[0]),
    "last": float(t[-1]),
    "increasing": bool(np.all(d > 0)),
    "at_zero": int(np.sum(t == 0.0)),
    "gaps": int(np.sum(d > 0.0015)),
}))
"#;

#[test]
fn device_time_faults_are_counted_and_the_session_keeps_sane_files() {
    let _one = serial();
    // During the session: the device clock steps back 3 s (cue 2), one batch
    // is stamped 4 s in the past (cue 3), one batch is sent twice (cue 4),
    // and the clock jumps 35 minutes forward (cue 8, when the host clock
    // fit is trusted to check device times: see protocol.md).
    let rig = rig(
        "devtime",
        5.0,
        "[task]\nmax_duration_min = 1\niti_min_ms = 1000\niti_max_ms = 2000\n",
        &[
            "--fault-on",
            "clockstep@cue2:-3",
            "--fault-on",
            "pastbatch@cue3:4",
            "--fault-on",
            "dupbatch@cue4",
            "--fault-on",
            "clockstep@cue8:2100",
        ],
        None,
    );
    let _rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let dir = start_session(&rig.socket, "M31");
    wait_idle(&rig.socket, 120);
    for kind in ["fault_clockstep", "fault_pastbatch", "fault_dupbatch"] {
        assert!(
            !truth_rows(&rig, kind).is_empty(),
            "the sim did not apply {kind}"
        );
    }
    assert_eq!(truth_rows(&rig, "fault_clockstep").len(), 2);

    // The session ran its full minute: the jump neither ended nor stretched it.
    assert_eq!(session_value(&dir, "state"), "complete");
    assert_eq!(session_value(&dir, "stop_reason"), "duration");
    let out = run_python(LEVER_ROWS, &[dir.as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["increasing"], true, "{v}");
    assert!(
        v["at_zero"].as_u64() <= Some(1),
        "rows clamped to t = 0: {v}"
    );
    // The task ends at 60 s; the lever goes on until the stop is carried out,
    // and at 5x a busy host's delay there counts five times (3 s of device
    // time for 0.6 s of host time). A jump that ended or stretched the
    // session would put the end near 0 s or 35 minutes out.
    let last = v["last"].as_f64().expect("last");
    assert!(
        (59.0..75.0).contains(&last),
        "the lever ends at {last} s: {v}"
    );
    // Every sample once: no duplicate rows, no hole.
    assert_eq!(v["gaps"], 0, "{v}");
    let span = last - v["first"].as_f64().expect("first");
    let rows = v["rows"].as_f64().expect("rows");
    assert!((rows - (span * 1000.0 + 1.0)).abs() < 0.5, "{v}");

    // Each fault is in events.tsv with its count, and the totals at the end.
    let events = read_tsv(&dir.join("events.tsv"));
    let rows_of = |kind: &str| -> Vec<&HashMap<String, String>> {
        events.iter().filter(|e| e["kind"] == kind).collect()
    };
    let total = |kind: &str| -> u64 {
        events
            .iter()
            .filter(|e| {
                e["kind"] == "device_time_anomalies" && e["detail"] == format!("kind={kind} total")
            })
            .map(|e| e["value"].parse::<u64>().expect("count"))
            .next()
            .unwrap_or(0)
    };
    assert_eq!(total("device_duplicate_batch"), 1, "{events:?}");
    let dup = rows_of("device_duplicate_batch");
    assert_eq!(dup.len(), 1);
    assert!(dup[0]["detail"].starts_with("count=1 "), "{dup:?}");
    // The step back and the past batch: two batches stamped early; the
    // step is found and corrected, as is the jump.
    assert_eq!(total("device_time_backward"), 2, "{events:?}");
    assert_eq!(total("device_time_forward"), 1, "{events:?}");
    assert_eq!(total("device_clock_step"), 2, "{events:?}");
    let steps: Vec<i64> = rows_of("device_clock_step")
        .iter()
        .map(|e| {
            let off = e["detail"].split("offset_us=").nth(1).expect("offset");
            off.parse::<i64>().expect("µs")
        })
        .collect();
    assert_eq!(steps.len(), 2);
    assert!((steps[0] + 3_000_000).abs() < 3_000, "{steps:?}");
    assert!((steps[1] - 2_100_000_000).abs() < 3_000, "{steps:?}");
    // No lever batch had to be placed by the host clock: the sample index
    // placed every one.
    assert_eq!(total("device_time_implausible"), 0, "{events:?}");
    // The link never dropped over it.
    assert!(rows_of("lost").is_empty(), "{events:?}");

    // Trials went on after the jump, on the session's clock.
    let trials = read_tsv(&dir.join("trials.tsv"));
    assert!(trials.len() >= 10, "{} trials", trials.len());
    for t in &trials {
        let cue: f64 = t["t_cue_s"].parse().expect("cue");
        assert!((0.0..62.0).contains(&cue), "trial cue at {cue} s: {t:?}");
    }
    // The rest position, from a still window, is in session.toml.
    let meta: toml::Table = std::fs::read_to_string(dir.join("session.toml"))
        .expect("session.toml")
        .parse()
        .expect("toml");
    let rest = meta["lever_rest"].as_table().expect("[lever_rest]");
    assert_eq!(rest["method"].as_str(), Some("still_window"), "{rest:?}");
    assert_eq!(rest["times_taken"].as_integer(), Some(1), "{rest:?}");
}

#[test]
fn a_simulator_at_five_times_real_time_is_reported_and_its_watchdog_stays_fed() {
    let _one = serial();
    // rig.toml as a lab writes it: the default heartbeat (every 100 ms, the
    // device's watchdog at 500 ms of device time: 100 ms of host time at 5x,
    // which the clock-sync pings every 100 ms alone would trip again and
    // again).
    let dir = TempDir::new("fastsim");
    let truth = dir.path().join("truth.tsv");
    let sim = Sim::start(
        dir.path(),
        &[
            "--speed",
            "5",
            "--truth",
            truth.to_str().expect("utf-8 path"),
            "--day",
            "14",
        ],
    );
    let socket = dir.path().join("rigd.sock");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data root");
    let config = dir.path().join("rig.toml");
    std::fs::write(
        &config,
        format!(
            "[rig]\nserial_port = {:?}\n\n[storage]\ndata_root = {:?}\n\n[control]\nsocket = \
             {:?}\n\n[preview]\nenabled = false\n\n[imaging]\nenabled = false\n\n[task]\n\
             max_duration_min = 3\n",
            sim.link.display().to_string(),
            data.display().to_string(),
            socket.display().to_string(),
        ),
    )
    .expect("write config");
    let _rigd = Rigd::start(&config, &socket);
    wait_connected(&socket);
    // Three minutes of device time: 36 s of wall time, well past the link's
    // first 20 s of fast clock-sync pings (which alone would feed the
    // watchdog).
    let session = start_session(&socket, "M32");
    wait_idle(&socket, 180);
    assert_eq!(session_value(&session, "stop_reason"), "duration");

    let events = read_tsv(&session.join("events.tsv"));
    let rate: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "device_clock_rate")
        .collect();
    // Measured once the clock fit was trusted (5 s of host time after the
    // connection), and recorded in the session (at its start, or then).
    assert!(!rate.is_empty(), "no device_clock_rate event");
    for r in &rate {
        let v: f64 = r["value"].parse().expect("rate");
        assert!((v - 5.0).abs() < 0.01, "{r:?}");
        // The configured 100 ms divided by the rate.
        let hb: f64 = r["detail"]
            .strip_prefix("host_heartbeat_us=")
            .and_then(|d| d.strip_suffix(" watchdog_fed=true"))
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("{r:?}"));
        assert!((hb - 20_000.0).abs() < 200.0, "{r:?}");
    }
    // The device's own record of its watchdog trips over the whole run.
    // With the host's heartbeats at the configured cadence of host time it
    // trips every half second once the fast pings end (133 times in a run
    // of this test without the scaling). Scaled, it is fed: none on an idle
    // machine; a 2-core machine loaded on both cores can still stall rigd
    // past the 100 ms of host time the watchdog allows at 5x now and then
    // (seen: 0 to 9, each with lever samples the stalled reader dropped), so
    // the bound is on the count, far below the unscaled one.
    let trips = read_tsv(&truth)
        .into_iter()
        .filter(|r| r["kind"] == "safe_state")
        .count();
    assert!(trips <= 30, "{trips} watchdog trips");
    drop(sim);
}

#[test]
fn a_lever_held_down_at_the_start_is_re_zeroed_and_no_cue_comes_off_rest() {
    let _one = serial();
    // The mouse rests its paw on the lever, 2.4 mm down, for the first 100 s
    // of simulated time (20 s of wall time: the session starts inside it).
    let rig = rig(
        "held",
        5.0,
        "[task]\nmax_duration_min = 3\niti_min_ms = 1000\niti_max_ms = 2000\n",
        &["--fault", "hold@0:100"],
        None,
    );
    let _rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let dir = start_session(&rig.socket, "M33");
    wait_idle(&rig.socket, 240);
    assert_eq!(session_value(&dir, "stop_reason"), "duration");
    assert_eq!(truth_rows(&rig, "fault_hold").len(), 1);

    let events = read_tsv(&dir.join("events.tsv"));
    let rests: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "lever_rest" || e["kind"] == "lever_rezeroed")
        .collect();
    // Held still: taken as rest first (nothing can tell), then, once let
    // go, the lever rests 2.4 mm below it, on its stop: re-zeroed there.
    assert!(rests.len() >= 2, "{rests:?}");
    assert_eq!(rests[0]["kind"], "lever_rest");
    let rezero = rests
        .iter()
        .find(|e| e["detail"].starts_with("method=rezero_below_rest"))
        .unwrap_or_else(|| panic!("no re-zero below rest: {rests:?}"));
    let offset: f64 = rezero["value"].parse().expect("mm");
    assert!((offset + 2.4).abs() < 0.05, "{rezero:?}");
    let t_rezero: f64 = rezero["t_s"].parse().expect("t");

    // session.toml says where the lever rests and how it was found.
    let meta: toml::Table = std::fs::read_to_string(dir.join("session.toml"))
        .expect("session.toml")
        .parse()
        .expect("toml");
    let rest = meta["lever_rest"].as_table().expect("[lever_rest]");
    let offset_mm = rest["offset_mm"].as_float().expect("offset_mm");
    assert!((offset_mm + 2.4).abs() < 0.05, "{rest:?}");
    let times = rest["times_taken"].as_integer().expect("times_taken");
    assert_eq!(times as usize, rests.len(), "{rest:?}");

    // Every cue came with the lever near rest (the hold before each cue),
    // and the mouse earned water after the re-zero: not every trial a miss.
    let trials = read_tsv(&dir.join("trials.tsv"));
    for t in &trials {
        let at_cue: f64 = t["lever_mm_at_cue"].parse().expect("mm");
        assert!(at_cue.abs() <= 0.5 + 1e-9, "cue off rest: {t:?}");
    }
    let rewarded_after = trials
        .iter()
        .filter(|t| t["outcome"] == "rewarded")
        .filter(|t| t["t_cue_s"].parse::<f64>().expect("cue") > t_rezero)
        .count();
    assert!(
        rewarded_after >= 5,
        "{rewarded_after} rewarded after the re-zero"
    );
}

#[test]
fn a_lever_never_still_at_the_start_is_reported_and_no_trial_starts_until_it_is() {
    let _one = serial();
    // A restless mouse fidgets on the lever (1 mm every other 100 ms) for
    // the first 60 s of simulated time (12 s of wall time).
    let rig = rig(
        "jiggle",
        5.0,
        "[task]\nmax_duration_min = 2\niti_min_ms = 1000\niti_max_ms = 2000\n",
        &["--fault", "jiggle@0:60"],
        None,
    );
    let _rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let dir = start_session(&rig.socket, "M34");
    wait_idle(&rig.socket, 180);
    assert_eq!(session_value(&dir, "stop_reason"), "duration");
    assert_eq!(truth_rows(&rig, "fault_jiggle").len(), 1);
    // The jiggle's end in session time (the device clock starts at 0 with
    // no drift: device µs = true µs).
    let t0: f64 = session_value(&dir, "t0_rig_us").parse().expect("t0");
    let jiggle_end_s = (60e6 - t0) / 1e6;
    assert!(
        jiggle_end_s > 6.0,
        "the session began too late: {jiggle_end_s}"
    );

    let events = read_tsv(&dir.join("events.tsv"));
    let warned: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "lever_not_at_rest")
        .collect();
    assert_eq!(warned.len(), 1, "{warned:?}");
    let t_warned: f64 = warned[0]["t_s"].parse().expect("t");
    // The lever moved over 1 mm (40 counts) in those 5 s.
    let range: f64 = warned[0]["value"].parse().expect("counts");
    assert!(range >= 39.0, "{warned:?}");
    assert!((4.9..5.5).contains(&t_warned), "{warned:?}");
    let rest: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "lever_rest")
        .collect();
    assert_eq!(rest.len(), 1, "{rest:?}");
    let t_rest: f64 = rest[0]["t_s"].parse().expect("t");
    // The last push ends 0.1 s before the jiggle does; rest after 0.5 s
    // still.
    assert!(
        t_rest >= jiggle_end_s - 0.1 + 0.5 - 0.01,
        "rest at {t_rest} s, jiggle over at {jiggle_end_s} s"
    );

    // No trial (no cue, no water) before the lever was still; trials after.
    let trials = read_tsv(&dir.join("trials.tsv"));
    assert!(trials.len() >= 5, "{} trials", trials.len());
    for t in &trials {
        let cue: f64 = t["t_cue_s"].parse().expect("cue");
        assert!(
            cue > t_rest,
            "a cue at {cue} s before the rest at {t_rest} s"
        );
    }
    let early_water = truth_rows(&rig, "valve_open")
        .iter()
        .filter(|r| (num(r, "device_us") - t0) / 1e6 < t_rest)
        .count();
    assert_eq!(early_water, 0);
}
