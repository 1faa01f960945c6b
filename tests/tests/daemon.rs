//! The daemon end to end: real `rigd`, `rigctl` and `rig-sim` over a real pty
//! and a real Unix socket; the session files checked against the virtual
//! rig's ground truth and loaded with numpy.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rig_tests::{
    read_tsv, rigctl, run_python, session_value, start_session, valve_openings, valve_rewards,
    wait_connected, wait_idle, Rigd, Sim, TempDir,
};

struct Rig {
    dir: TempDir,
    /// The virtual rig (stopped by dropping, or by `take()` + `stop()`).
    sim: Option<Sim>,
    socket: PathBuf,
    config: PathBuf,
    truth: PathBuf,
}

/// A virtual rig at `speed` and a config for rigd pointing at it.
fn rig(name: &str, speed: f64, extra_toml: &str, sim_args: &[&str]) -> Rig {
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
    let data = dir.path().join("data");
    // Host heartbeats every 20 ms of wall time; the device's watchdog counts
    // device time, which runs `speed` times faster.
    let timeout_ms = (200.0 * speed).max(500.0) as u32;
    let config = dir.path().join("rig.toml");
    let text = format!(
        "[rig]\nserial_port = {:?}\n\n[storage]\ndata_root = {:?}\nfsync_interval_ms = 100\n\n[control]\nsocket = {:?}\n\n\
         [preview]\nenabled = false\n\n[imaging]\nenabled = false\n\n\
         [safety]\nheartbeat_interval_ms = 20\nheartbeat_timeout_ms = {timeout_ms}\n\n{extra_toml}\n",
        sim.link.display().to_string(),
        data.display().to_string(),
        socket.display().to_string(),
    );
    std::fs::write(&config, text).expect("write config");
    std::fs::create_dir_all(&data).expect("create the data root");
    Rig {
        dir,
        sim: Some(sim),
        socket,
        config,
        truth,
    }
}

const NUMPY_CHECK: &str = r##"
import sys, json, numpy as np
d = sys.argv[1]
lever = np.load(d + "/lever.npy")
assert lever.ndim == 2 and lever.shape[1] == 3 and lever.shape[0] > 0, lever.shape
assert np.all(np.diff(lever[:, 0]) > 0), "lever times increase"
def tsv(name):
    rows = [l.rstrip("\n").split("\t") for l in open(d + "/" + name) if not l.startswith("#")]
    return rows[0], rows[1:]
th, trials = tsv("trials.tsv")
eh, events = tsv("events.tsv")
assert "outcome" in th and all(len(r) == len(th) for r in trials)
assert all(len(r) == len(eh) for r in events)
summary = json.load(open(d + "/summary.json"))
print(json.dumps({"lever_rows": int(lever.shape[0]), "last_t": float(lever[-1, 0]), "trials": len(trials), "summary_trials": summary["trials"]}))
"##;

#[test]
fn five_minute_session_matches_the_truth_and_loads_with_numpy() {
    let rig = rig("session", 10.0, "[task]\nmax_duration_min = 5\n", &[]);
    let rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let dir = start_session(&rig.socket, "M12");
    // Five minutes of device time at 10x: about 30 s; the session ends itself.
    wait_idle(&rig.socket, 120);
    assert_eq!(session_value(&dir, "state"), "complete");
    // Stop the virtual rig so its truth log is complete (it flushes every
    // half second of wall time, i.e. five device seconds at 10x).
    let mut rig = rig;
    if let Some(sim) = rig.sim.take() {
        sim.stop();
    }
    let t0: u64 = session_value(&dir, "t0_rig_us").parse().expect("t0");

    let cfg = rig_config::load(&rig.config).expect("config").config;
    let window_us = u64::from(cfg.task.response_window_ms) * 1000;
    let open_ms = cfg
        .valve
        .open_ms_for_volume(cfg.task.reward_ul)
        .expect("calibrated");
    let trials = read_tsv(&dir.join("trials.tsv"));
    assert!(
        trials.len() >= 10,
        "only {} trials in 5 minutes",
        trials.len()
    );
    let secs =
        |s: &str| -> Option<u64> { s.parse::<f64>().ok().map(|x| t0 + (x * 1e6).round() as u64) };
    let truth = read_tsv(&rig.truth);
    let crossings: Vec<u64> = truth
        .iter()
        .filter(|r| r["kind"] == "threshold_crossing")
        .map(|r| r["device_us"].parse().expect("device_us"))
        .collect();
    let mut rewarded = 0;
    for t in &trials {
        let cue = secs(&t["t_cue_s"]).expect("cue time");
        let end = cue + window_us;
        // The window runs from the sample that sent the cue, a link latency
        // before the device's ToneOn (t_cue); a crossing in the last sample
        // period may be seen only after the window closed.
        let in_window: Vec<u64> = crossings
            .iter()
            .copied()
            .filter(|&c| c + 5_000 >= cue && c < end)
            .collect();
        let surely_in_window: Vec<u64> = crossings
            .iter()
            .copied()
            .filter(|&c| c >= cue && c + 2_000 < end)
            .collect();
        match t["outcome"].as_str() {
            "rewarded" => {
                rewarded += 1;
                let resp = secs(&t["t_response_s"]).expect("response time");
                let first = *in_window.first().unwrap_or_else(|| {
                    panic!(
                        "rewarded trial {} has no true crossing in its window",
                        t["trial"]
                    )
                });
                // The response is the first sample at or after the true crossing.
                assert!(
                    resp >= first && resp - first <= 2_000,
                    "trial {}: response {resp} vs true crossing {first}",
                    t["trial"]
                );
                let vol: f64 = t["reward_ul"].parse().expect("reward_ul");
                assert!((vol - cfg.task.reward_ul).abs() < 1e-9, "reward {vol} µL");
                let open_us: f64 = t["valve_open_us"].parse().expect("valve_open_us");
                assert!(
                    (open_us - open_ms * 1000.0).abs() <= 1.0,
                    "valve open {open_us} µs, calibration says {} µs",
                    open_ms * 1000.0
                );
            }
            "miss" => assert!(
                surely_in_window.is_empty(),
                "trial {} missed but the mouse crossed at {:?}",
                t["trial"],
                surely_in_window
            ),
            // Only the trial the session's stop cut short.
            "aborted" => assert!(
                std::ptr::eq(t, trials.last().expect("trials")),
                "trial {} aborted mid-session without a fault",
                t["trial"]
            ),
            other => panic!("unknown outcome {other}"),
        }
    }
    assert!(rewarded >= 5, "an expert mouse earns rewards: {rewarded}");
    // The device's own valve events carry the calibrated duration.
    let events = read_tsv(&dir.join("events.tsv"));
    let opens: Vec<&HashMap<String, String>> = events
        .iter()
        .filter(|e| e["source"] == "device" && e["kind"] == "valve_open")
        .collect();
    assert_eq!(
        opens.len(),
        rewarded,
        "one valve opening per rewarded trial"
    );

    let out = run_python(NUMPY_CHECK, &[dir.as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("python json");
    assert_eq!(v["trials"].as_u64(), Some(trials.len() as u64));
    assert_eq!(v["summary_trials"].as_u64(), Some(trials.len() as u64));
    assert!(v["last_t"].as_f64().expect("last_t") > 290.0, "{v}");
    assert!(dir.join("MANIFEST.sha256").exists());
    // The qc record agrees with the files it describes.
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("summary.json")).expect("summary.json"),
    )
    .expect("JSON");
    let qc = &summary["qc"];
    assert_eq!(qc["lever"]["samples"], v["lever_rows"], "{qc}");
    let gaps = events.iter().filter(|e| e["kind"] == "sample_gap").count();
    assert_eq!(qc["lever"]["gaps"].as_u64(), Some(gaps as u64), "{qc}");
    let confirmed = trials
        .iter()
        .filter(|t| t["outcome"] == "rewarded" && !t["t_reward_s"].is_empty())
        .count();
    assert_eq!(
        qc["decision_latency"]["count"].as_u64(),
        Some(confirmed as u64),
        "{qc}"
    );
    assert!(qc["frames"].is_null(), "no imaging, no frames record: {qc}");
    assert_eq!(qc["storage_dropped"], 0, "{qc}");
    drop(rigd);
    drop(rig);
}

#[test]
fn sigterm_finishes_the_session_cleanly() {
    let rig = rig("sigterm", 5.0, "", &[]);
    let rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let dir = start_session(&rig.socket, "M7");
    std::thread::sleep(Duration::from_secs(3));
    rigd.signal("TERM");
    let (status, stderr) = rigd.wait(60);
    assert!(status.success(), "rigd exit {status}: {stderr}");
    assert_eq!(session_value(&dir, "state"), "complete", "{stderr}");
    assert!(session_value(&dir, "stop_reason").contains("SIGTERM"));
    assert!(!rig.socket.exists(), "socket removed at exit");
    run_python(NUMPY_CHECK, &[dir.as_os_str()]);
}

#[test]
fn sigkill_then_recover_loses_at_most_a_second() {
    let rig = rig("sigkill", 5.0, "", &[]);
    let rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let dir = start_session(&rig.socket, "M3");
    std::thread::sleep(Duration::from_secs(4));
    let (_, out, _) = rigctl(&rig.socket, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("status json");
    let elapsed_before = v["elapsed_s"].as_f64().expect("elapsed");
    rigd.signal("KILL");
    let _ = rigd.wait(10);
    assert_eq!(session_value(&dir, "state"), "running");
    let (code, out, err) = rigctl(&rig.socket, &["recover", dir.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "recover: {out} {err}");
    assert_eq!(session_value(&dir, "state"), "recovered");
    let out = run_python(NUMPY_CHECK, &[dir.as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("python json");
    let last_t = v["last_t"].as_f64().expect("last_t");
    // At most one second of device time lost (status was read just before the kill).
    assert!(
        last_t >= elapsed_before - 1.0,
        "last lever sample at {last_t} s, status said {elapsed_before} s"
    );
    // Recovering twice is harmless.
    let (code, _, _) = rigctl(&rig.socket, &["recover", dir.to_str().expect("utf-8")]);
    assert_eq!(code, 0);
}

fn send_lines(socket: &Path, lines: &[&[u8]]) -> Vec<serde_json::Value> {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut answers = Vec::new();
    for l in lines {
        s.write_all(l).expect("write");
        s.write_all(b"\n").expect("write");
        let mut line = String::new();
        r.read_line(&mut line).expect("answer");
        answers.push(
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}")),
        );
    }
    answers
}

#[test]
fn bad_requests_get_clear_errors_and_the_daemon_carries_on() {
    let rig = rig("badinput", 1.0, "", &[]);
    let rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    // A second client stays connected through all of it.
    let mut watcher = UnixStream::connect(&rig.socket).expect("connect");
    watcher
        .write_all(b"{\"cmd\":\"subscribe\",\"id\":1}\n")
        .expect("subscribe");

    let huge = vec![b'x'; 70_000];
    let answers = send_lines(
        &rig.socket,
        &[
            b"{not json",
            b"{\"cmd\":\"explode\",\"id\":7}",
            &huge,
            b"{\"cmd\":\"stop\",\"id\":8}",
            b"{\"cmd\":\"start\",\"mouse\":\"../x\",\"id\":9}",
            b"{\"cmd\":\"start\",\"mouse\":\"\",\"id\":10}",
            b"{\"cmd\":\"start\",\"mouse\":\"a/b\",\"id\":11}",
            b"{\"cmd\":\"start\",\"id\":12}",
            b"{\"cmd\":\"valve\",\"pulse_ms\":5000,\"id\":13}",
            b"{\"cmd\":\"valve\",\"pulse_ms\":0.0001,\"id\":15}",
            b"{\"cmd\":\"status\",\"id\":14}",
        ],
    );
    let codes: Vec<&str> = answers
        .iter()
        .map(|a| a["error"]["code"].as_str().unwrap_or("ok"))
        .collect();
    assert_eq!(
        codes,
        vec![
            "bad_json",
            "unknown_command",
            "line_too_long",
            "not_running",
            "invalid_mouse",
            "invalid_mouse",
            "invalid_mouse",
            "bad_request",
            "refused_by_safety",
            "refused_by_safety",
            "ok"
        ]
    );
    assert!(
        answers[9]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("shorter than the shortest pulse")),
        "{}",
        answers[9]
    );
    assert_eq!(answers[1]["id"], 7, "the id survives an unknown command");
    for a in &answers[..10] {
        assert_eq!(a["ok"], false);
        assert!(
            a["error"]["message"].as_str().is_some_and(|m| m.len() > 10),
            "{a}"
        );
    }
    // Start while running is refused; the watcher saw the session start.
    let _dir = start_session(&rig.socket, "M5");
    let (code, _, err) = rigctl(&rig.socket, &["start", "--mouse", "M6"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already_running"), "{err}");
    let (code, out, err) = rigctl(&rig.socket, &["stop"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = rigctl(&rig.socket, &["stop"]);
    assert_eq!(code, 1);
    assert!(err.contains("not_running"), "{err}");
    let mut r = BufReader::new(watcher.try_clone().expect("clone"));
    watcher
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut saw_start = false;
    for _ in 0..200 {
        let mut line = String::new();
        if r.read_line(&mut line).is_err() {
            break;
        }
        if line.contains("\"state\":\"started\"") {
            saw_start = true;
            break;
        }
    }
    assert!(saw_start, "the subscribed client kept getting events");
    // Water given by hand reaches the subscribers, marked when it went into
    // a calibration cup (for no mouse).
    let answers = send_lines(
        &rig.socket,
        &[b"{\"cmd\":\"valve\",\"pulse_ms\":20,\"calibration\":true,\"id\":21}"],
    );
    assert_eq!(answers[0]["ok"], true, "{}", answers[0]);
    let mut manual = None;
    for _ in 0..5000 {
        let mut line = String::new();
        if r.read_line(&mut line).is_err() {
            break;
        }
        if line.contains("\"event\":\"manual\"") {
            manual = Some(line);
            break;
        }
    }
    let manual: serde_json::Value =
        serde_json::from_str(&manual.expect("a manual event")).expect("json");
    assert_eq!(manual["action"], "valve_pulse", "{manual}");
    assert_eq!(manual["duration_ms"], 20.0, "{manual}");
    assert_eq!(manual["calibration"], true, "{manual}");
    assert!(
        manual["by"].as_str().is_some_and(|b| !b.is_empty()),
        "{manual}"
    );
    // Task overrides are checked by the file's rules; a refused start names
    // the override, its value and the rule.
    let answers = send_lines(
        &rig.socket,
        &[
            br#"{"cmd":"start","mouse":"M7","id":20,"task":{"threshold_mm":7.5}}"#,
            br#"{"cmd":"start","mouse":"M7","id":21,"task":{"iti_max_ms":2000}}"#,
        ],
    );
    assert_eq!(answers[0]["error"]["code"], "bad_request", "{}", answers[0]);
    assert_eq!(
        answers[0]["error"]["message"],
        "task overrides rejected: task.threshold_mm = 7.5: must be > 0 and < \
         rig.lever_travel_mm (6 mm)"
    );
    assert_eq!(answers[1]["error"]["code"], "bad_request", "{}", answers[1]);
    assert!(
        answers[1]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with(
                "task overrides rejected: task.iti_max_ms = 2000: conflicts with the configured \
             task.iti_min_ms = 3000"
            )),
        "{}",
        answers[1]
    );
    // Accepted overrides are the session's configuration.
    let answers = send_lines(
        &rig.socket,
        &[br#"{"cmd":"start","mouse":"M7","id":22,"task":{"threshold_mm":2.0,"max_trials":3}}"#],
    );
    assert_eq!(answers[0]["ok"], true, "{}", answers[0]);
    let dir = PathBuf::from(answers[0]["session_dir"].as_str().expect("session_dir"));
    let meta: toml::Table = std::fs::read_to_string(dir.join("session.toml"))
        .expect("session.toml")
        .parse()
        .expect("session.toml is TOML");
    let task = &meta["config"]["task"];
    assert_eq!(task["threshold_mm"].as_float(), Some(2.0), "{task}");
    assert_eq!(task["max_trials"].as_integer(), Some(3), "{task}");
    assert_eq!(
        task["reward_ul"].as_float(),
        Some(4.0),
        "the rest as configured"
    );
    let (code, out, err) = rigctl(&rig.socket, &["stop"]);
    assert_eq!(code, 0, "{out}{err}");
    // No connection: exit code 2.
    let (code, _, err) = rigctl(&rig.dir.path().join("nope.sock"), &["status"]);
    assert_eq!(code, 2, "{err}");
    drop(rigd);
}

/// Checks a chunked session folder with numpy: the lever chunks that
/// session.toml lists are the ones on disk, each loads and holds only its
/// own minute, and concatenated they are one continuous series (no row
/// duplicated or missing at a boundary); the manifest covers every chunk.
const CHUNKS_CHECK: &str = r##"
import sys, glob, hashlib, json, os, tomllib, numpy as np
d, chunk_s, period_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
meta = tomllib.load(open(f"{d}/session.toml", "rb"))
listed = meta["chunks"]["lever"]
on_disk = [os.path.basename(f) for f in [f"{d}/lever.npy"] + sorted(glob.glob(f"{d}/lever.[0-9]*.npy"), key=lambda p: (len(p), p))]
assert listed == on_disk, (listed, on_disk)
parts = [np.load(f"{d}/{f}") for f in listed]
for k, p in enumerate(parts):
    assert p.dtype == np.float64 and p.ndim == 2 and p.shape[1] == 3 and p.shape[0] > 0, (k, p.shape)
    assert p[0, 0] >= k * chunk_s and p[-1, 0] < (k + 1) * chunk_s, (k, p[0, 0], p[-1, 0])
lever = np.concatenate(parts)
dt = np.diff(lever[:, 0])
assert np.all(dt > 0), "strictly increasing"
boundaries = [abs((parts[k + 1][0, 0] - parts[k][-1, 0]) - period_s) for k in range(len(parts) - 1)]
assert all(b < 1e-6 for b in boundaries), ("one sample period across each boundary", boundaries)
on_period = float(np.mean(np.abs(dt - period_s) < 1e-6))
assert on_period > 0.999, on_period
manifest = {l.split("  ", 1)[1]: l.split("  ", 1)[0] for l in open(f"{d}/MANIFEST.sha256").read().splitlines()}
for f in listed:
    assert manifest[f] == hashlib.sha256(open(f"{d}/{f}", "rb").read()).hexdigest(), f
summary = json.load(open(f"{d}/summary.json"))
print(json.dumps({"chunks": len(parts), "rows": int(lever.shape[0]), "last_t": float(lever[-1, 0]),
                  "on_period": on_period, "water_ul": summary["water_ul"], "source": summary.get("source"),
                  "trials": summary["trials"], "reaction_time_median_s": summary.get("reaction_time_median_s")}))
"##;

/// A rig whose session files roll every minute of device time.
fn one_minute_chunk_rig(name: &str, extra_toml: &str) -> Rig {
    let rig = rig(name, 10.0, extra_toml, &[]);
    let text = std::fs::read_to_string(&rig.config).expect("config");
    let text = text.replacen(
        "fsync_interval_ms = 100\n",
        "fsync_interval_ms = 100\nchunk_minutes = 1\n",
        1,
    );
    std::fs::write(&rig.config, text).expect("write config");
    rig
}

#[test]
fn three_minute_session_with_one_minute_chunks_concatenates_to_one_series() {
    let rig = one_minute_chunk_rig("chunks", "[task]\nmax_duration_min = 3\n");
    let rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let dir = start_session(&rig.socket, "M21");
    // Three minutes of device time at 10x: about 18 s; the session ends itself.
    wait_idle(&rig.socket, 120);
    assert_eq!(session_value(&dir, "state"), "complete");
    let out = run_python(
        CHUNKS_CHECK,
        &[dir.as_os_str(), "60".as_ref(), "0.001".as_ref()],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("python json");
    println!("chunked session: {v}");
    assert!(v["chunks"].as_u64().expect("chunks") >= 3, "{v}");
    assert!(v["last_t"].as_f64().expect("last_t") > 175.0, "{v}");
    assert!(v["rows"].as_u64().expect("rows") > 175_000, "{v}");
    // The summary was computed from the chunk files read back.
    assert!(v["trials"].as_u64().expect("trials") >= 5, "{v}");
    assert!(v["reaction_time_median_s"].as_f64().is_some(), "{v}");
    assert!(v["water_ul"].as_f64().expect("water") > 0.0, "{v}");
    drop(rigd);
    drop(rig);
}

#[test]
fn chunked_session_killed_mid_chunk_is_recovered_with_its_water() {
    let rig = one_minute_chunk_rig("chunkkill", "");
    let rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let dir = start_session(&rig.socket, "M22");
    // Into the third minute of device time, then SIGKILL.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, out, _) = rigctl(&rig.socket, &["status", "--json"]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("status json");
        if v["elapsed_s"].as_f64().unwrap_or(0.0) > 150.0 {
            break;
        }
        assert!(Instant::now() < deadline, "session too slow: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
    rigd.signal("KILL");
    let _ = rigd.wait(10);
    assert_eq!(session_value(&dir, "state"), "running");
    let (code, out, err) = rigctl(&rig.socket, &["recover", dir.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "recover: {out} {err}");
    assert_eq!(session_value(&dir, "state"), "recovered");
    let out = run_python(
        CHUNKS_CHECK,
        &[dir.as_os_str(), "60".as_ref(), "0.001".as_ref()],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("python json");
    println!("recovered chunked session: {v}");
    assert_eq!(v["chunks"].as_u64(), Some(3), "{v}");
    assert!(v["last_t"].as_f64().expect("last_t") > 149.0, "{v}");
    // Recovery recomputed the full summary from the files, water included.
    assert_eq!(v["source"].as_str(), Some("recovery"), "{v}");
    assert!(v["water_ul"].as_f64().expect("water") > 0.0, "{v}");
    assert!(v["trials"].as_u64().expect("trials") > 0, "{v}");
}

/// A stop and a start sent together, round after round: the late "finished"
/// of the stopped session must never be taken for the new one's (which
/// left an engine opening the valve while status said idle, and hung the
/// socket for 120 s). Every session ends `complete`, and the device opens
/// the valve exactly as often as the sessions recorded rewards: no engine
/// outlives its session. `RIG_RACE_ROUNDS` sets the rounds (default 20).
#[test]
fn a_stop_and_a_start_sent_together_never_orphan_a_session() {
    let rounds: usize = std::env::var("RIG_RACE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let rig = rig("race", 10.0, "", &[]);
    let _rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let mut dirs = vec![start_session(&rig.socket, "R0")];
    for round in 1..=rounds {
        std::thread::sleep(Duration::from_millis(300));
        let mouse = format!("R{round}");
        let (a, b) = (rig.socket.clone(), rig.socket.clone());
        let stop = std::thread::spawn(move || rigctl(&a, &["stop"]));
        let start = std::thread::spawn(move || rigctl(&b, &["start", "--mouse", &mouse, "--json"]));
        let (stop_code, stop_out, stop_err) = stop.join().expect("stop thread");
        let (start_code, start_out, start_err) = start.join().expect("start thread");
        assert_eq!(stop_code, 0, "round {round}: stop: {stop_out}{stop_err}");
        if start_code == 0 {
            let v: serde_json::Value = serde_json::from_str(start_out.trim()).expect("JSON");
            dirs.push(PathBuf::from(
                v["session_dir"].as_str().expect("session_dir"),
            ));
        } else {
            // The start came first and found the old session running, or
            // came while its files were being finished (`busy`): never a
            // hang, never a second session.
            assert!(
                start_err.contains("is running") || start_err.contains("is stopping"),
                "round {round}: start: {start_out}{start_err}"
            );
            dirs.push(start_session(&rig.socket, &format!("R{round}b")));
        }
        // The daemon answers at once, and says what the device does.
        let asked = Instant::now();
        let (code, out, err) = rigctl(&rig.socket, &["status", "--json"]);
        assert_eq!(code, 0, "round {round}: status: {out}{err}");
        assert!(
            asked.elapsed() < Duration::from_secs(30),
            "round {round}: status took {:?}",
            asked.elapsed()
        );
        assert!(
            out.contains("\"state\":\"running\""),
            "round {round}: a session was just started: {out}"
        );
    }
    let (code, out, err) = rigctl(&rig.socket, &["stop"]);
    assert_eq!(code, 0, "last stop: {out}{err}");
    wait_idle(&rig.socket, 30);
    let mut rewards = 0;
    for d in &dirs {
        assert_eq!(
            session_value(d, "state"),
            "complete",
            "{} did not finish",
            d.display()
        );
        rewards += valve_rewards(d);
    }
    // The device's own log of valve openings (written a moment after each).
    let openings = || valve_openings(&rig.truth);
    let deadline = Instant::now() + Duration::from_secs(10);
    while openings() != rewards && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        openings(),
        rewards,
        "valve openings on the device vs rewards recorded in {} sessions",
        dirs.len()
    );
}

#[test]
fn a_sigterm_the_moment_rigd_answers_is_a_clean_exit() {
    // systemd (or a person) may stop rigd as soon as it is up: the signal
    // must be rigd's to act on from before its socket exists, never the
    // default action that kills it on the spot and leaves the socket.
    let dir = TempDir::new("term-at-once");
    let socket = dir.path().join("rigd.sock");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data");
    let config = dir.path().join("rig.toml");
    std::fs::write(
        &config,
        format!(
            "[rig]\nserial_port = {:?}\n\n[storage]\ndata_root = {:?}\n\n[control]\nsocket = {:?}\n\n\
             [preview]\nenabled = false\n\n[imaging]\nenabled = false\n",
            dir.path().join("no-such-tty").display().to_string(),
            data.display().to_string(),
            socket.display().to_string()
        ),
    )
    .expect("config");
    for round in 0..5 {
        let rigd = Rigd::start(&config, &socket);
        rigd.signal("TERM");
        let (status, stderr) = rigd.wait(30);
        assert!(
            status.success(),
            "round {round}: rigd exit {status}: {stderr}"
        );
        assert!(!socket.exists(), "round {round}: socket removed at exit");
    }
}
