//! The device-armed reward end to end (`task.reward_decision = "device"`):
//! real `rigd` and `rig-sim` over a real pty. The device opens the valve at
//! the crossing sample; the session's books (trials.tsv, events.tsv, the qc
//! record) agree with what the device did and with the virtual rig's truth.

use std::collections::HashMap;

use rig_tests::{
    read_tsv, session_value, start_session, wait_connected, wait_idle, Rigd, Sim, TempDir,
};

fn detail_value(detail: &str, key: &str) -> Option<u64> {
    detail
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// One device-mode session of `minutes` on a fresh virtual rig at 10x
/// (`extra` added to its arguments), run to its end; returns the folder (keep
/// it alive), the session folder and the simulator's complete truth log.
fn device_session(
    name: &str,
    mouse: &str,
    minutes: u32,
    extra: &[&str],
) -> (TempDir, std::path::PathBuf, std::path::PathBuf) {
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
    args.extend_from_slice(extra);
    let sim = Sim::start(dir.path(), &args);
    let socket = dir.path().join("rigd.sock");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data root");
    let config = dir.path().join("rig.toml");
    std::fs::write(
        &config,
        format!(
            "[rig]\nserial_port = {:?}\n\n[storage]\ndata_root = {:?}\nfsync_interval_ms = 100\n\n\
             [control]\nsocket = {:?}\n\n[preview]\nenabled = false\n\n[imaging]\nenabled = false\n\n\
             [safety]\nheartbeat_interval_ms = 20\nheartbeat_timeout_ms = 2000\n\n\
             [task]\nreward_decision = \"device\"\nmax_duration_min = {minutes}\n",
            sim.link.display().to_string(),
            data.display().to_string(),
            socket.display().to_string(),
        ),
    )
    .expect("config");
    let rigd = Rigd::start(&config, &socket);
    wait_connected(&socket);
    let session = start_session(&socket, mouse);
    wait_idle(&socket, 120);
    assert_eq!(session_value(&session, "state"), "complete");
    sim.stop(); // the truth log is complete
    drop(rigd);
    (dir, session, truth)
}

#[test]
fn device_mode_session_rewards_at_the_device_and_the_books_agree() {
    let (dir, session, truth) = device_session("armed", "M7", 3, &[]);

    let t0: u64 = session_value(&session, "t0_rig_us").parse().expect("t0");
    let trials = read_tsv(&session.join("trials.tsv"));
    let events = read_tsv(&session.join("events.tsv"));
    let rows = |source: &str, kind: &str| -> Vec<&HashMap<String, String>> {
        events
            .iter()
            .filter(|e| e["source"] == source && e["kind"] == kind)
            .collect()
    };
    let rewarded: Vec<&HashMap<String, String>> = trials
        .iter()
        .filter(|t| t["outcome"] == "rewarded")
        .collect();
    assert!(
        trials.len() >= 8,
        "only {} trials in 3 minutes",
        trials.len()
    );
    assert!(
        rewarded.len() >= 4,
        "an expert mouse earns rewards: {}",
        rewarded.len()
    );

    // The host armed every cued trial and never pulsed the valve itself.
    assert_eq!(rows("command", "arm_reward").len(), trials.len());
    assert!(rows("command", "valve_pulse").is_empty());

    // Every rewarded trial is one firing of the device, at its crossing.
    let fired = rows("device", "reward_fired");
    assert_eq!(
        fired.len(),
        rewarded.len(),
        "one RewardFired per rewarded trial"
    );
    for t in &rewarded {
        let n: u64 = t["trial"].parse().expect("trial");
        let f = fired
            .iter()
            .find(|f| detail_value(&f["detail"], "trial") == Some(n))
            .unwrap_or_else(|| panic!("no reward_fired for rewarded trial {n}"));
        let cross = detail_value(&f["detail"], "t_cross_us").expect("t_cross_us");
        let valve = detail_value(&f["detail"], "t_valve_us").expect("t_valve_us");
        let secs = |k: &str| -> f64 { t[k].parse().expect(k) };
        let resp = t0 as f64 + secs("t_response_s") * 1e6;
        let rew = t0 as f64 + secs("t_reward_s") * 1e6;
        assert!(
            (resp - cross as f64).abs() <= 1.0,
            "trial {n}: response {resp} vs crossing {cross}"
        );
        assert!(
            (rew - valve as f64).abs() <= 1.0,
            "trial {n}: reward {rew} vs valve {valve}"
        );
        assert!(
            valve >= cross,
            "trial {n}: the valve opened before the crossing"
        );
    }
    // Unrewarded trials ended at the device without firing.
    let ended = rows("device", "reward_ended");
    let unrewarded = trials.len() - rewarded.len();
    assert!(
        ended.len() >= unrewarded.saturating_sub(1),
        "{} ended, {unrewarded} unrewarded",
        ended.len()
    );

    // The valve openings the device reported, and the ones the virtual rig
    // made (its truth), equal the rewarded trials.
    assert_eq!(rows("device", "valve_open").len(), rewarded.len());
    let truth_opens = read_tsv(&truth)
        .iter()
        .filter(|r| r["kind"] == "valve_open")
        .count();
    assert_eq!(
        truth_opens,
        rewarded.len(),
        "valve openings at the virtual rig"
    );

    // The audit: every disagreement is an event and is counted in qc.
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(session.join("summary.json")).expect("summary.json"),
    )
    .expect("JSON");
    let mismatches = rows("task", "decision_mismatch").len() as u64;
    eprintln!(
        "device mode: {} trials, {} rewarded, {} arms ended unfired, {mismatches} decision mismatches",
        trials.len(),
        rewarded.len(),
        ended.len()
    );
    assert_eq!(
        summary["qc"]["decision_mismatches"].as_u64(),
        Some(mismatches),
        "{}",
        summary["qc"]
    );
    let water: f64 = summary["water_ul"].as_f64().unwrap_or(f64::NAN);
    let per: f64 = rewarded[0]["reward_ul"].parse().expect("reward_ul");
    assert!(
        (water - per * rewarded.len() as f64).abs() < 1e-6,
        "water {water} µL for {} rewards",
        rewarded.len()
    );
    drop(dir);
}

#[test]
fn a_reward_report_lost_on_the_wire_is_asked_for_and_the_trial_is_rewarded() {
    // The device fires and opens the valve, but its RewardFired never
    // reaches rigd (`dropreport`: lost on the wire, as a full transmit
    // buffer loses it). After the window and its grace rigd asks (`Disarm`
    // of the trial's tag), the device repeats the report, and the trial is
    // written rewarded: the valve opened, so the books say so.
    let (_dir, session, truth) = device_session(
        "armed-lost-report",
        "M8",
        1,
        &["--fault-on", "dropreport@cue2"],
    );

    let truth_rows = read_tsv(&truth);
    assert_eq!(
        truth_rows
            .iter()
            .filter(|r| r["kind"] == "fault_dropreport")
            .count(),
        1
    );
    assert_eq!(
        rig_tests::valve_openings(&truth),
        rig_tests::valve_rewards(&session),
        "every valve opening is a rewarded trial"
    );
    let events = read_tsv(&session.join("events.tsv"));
    assert!(
        !events.iter().any(|e| e["kind"] == "lost"),
        "the link stayed up"
    );
    // The one ask: a Disarm of a tag whose report then came, and that trial
    // rewarded.
    let asks: Vec<u64> = events
        .iter()
        .filter(|e| e["kind"] == "disarm")
        .filter_map(|e| detail_value(&e["detail"], "trial_tag"))
        .collect();
    assert_eq!(asks.len(), 1, "one report asked for: {asks:?}");
    let tag = asks[0];
    let reports = events
        .iter()
        .filter(|e| e["kind"] == "reward_fired" && e["value"] == tag.to_string())
        .count();
    assert_eq!(reports, 1, "the repeated report, once");
    let trials = read_tsv(&session.join("trials.tsv"));
    let t = trials
        .iter()
        .find(|t| t["trial"] == tag.to_string())
        .expect("the trial");
    assert_eq!(t["outcome"], "rewarded", "{t:?}");
    assert!(
        !events.iter().any(|e| e["kind"] == "decision_mismatch"),
        "the host saw the same crossing"
    );
}
