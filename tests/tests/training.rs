//! Training across days, end to end with the real binaries: one simulated
//! mouse (rig-sim learning from its rewards) through 14 short sessions of the
//! example protocol (docs/examples/protocol.toml, trial counts scaled down),
//! alternating between two rigs with different configurations that share
//! one data root, in a lab in California, with rigd killed (SIGKILL) in the
//! middle of one session.
//!
//! The days pass with `faketime` (libfaketime): each session's rigd runs with
//! its wall clock moved on by whole days (the monotonic clock untouched), so
//! folder names, "today" and the training day are those of a real two-week
//! course. Without `faketime` the test prints a skip note, unless
//! `RIG_REQUIRE_FAKETIME=1`, when it fails.
//!
//! Checked: stages advance (and an override is recorded) by the protocol's
//! rules, recomputed here from the history rows; the history has 14 rows with
//! the right training days; water per lab-local day adds up from the session
//! folders and the hand-water ledger; nothing is lost (every folder complete
//! or recovered, manifests verify, every valve opening of the virtual rig in
//! the trials); the learning curve rises; the HTML report shows the history's
//! numbers and renders in headless Chromium (a screenshot is saved).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rig_tests::{bin, read_tsv, rigctl, wait_connected, wait_idle, Rigd, Sim, TempDir};

const SESSIONS: usize = 14;
/// The session during which rigd is killed; the next one is on the same day.
const KILLED: usize = 6;
/// The session started with `--stage` (who and why recorded).
const OVERRIDDEN: usize = 10;
/// Trials per session (each stage's `max_trials`), and the protocol's
/// `min_trials` scaled to it.
const TRIALS: i64 = 25;
const MIN_TRIALS: i64 = 20;
const MOUSE: &str = "M12";
const ZONE: &str = "America/Los_Angeles";

/// libfaketime (Debian's `faketime`), the thread-safe build.
fn faketime() -> Option<PathBuf> {
    let found = std::fs::read_dir("/usr/lib").ok().and_then(|dirs| {
        dirs.flatten()
            .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
            .find(|p| p.exists())
    });
    if found.is_some() {
        return found;
    }
    assert!(
        std::env::var("RIG_REQUIRE_FAKETIME").as_deref() != Ok("1"),
        "RIG_REQUIRE_FAKETIME=1 but there is no /usr/lib/*/faketime/libfaketimeMT.so.1 (apt-get install faketime)"
    );
    eprintln!("SKIP training test: no libfaketime (apt-get install faketime; set RIG_REQUIRE_FAKETIME=1 to make this fail)");
    None
}

/// `program` with its wall clock `offset_s` ahead (libfaketime preloaded:
/// the process is the program itself, so signals reach it).
fn faked(faketime: &Path, offset_s: i64, program: &Path) -> Command {
    let mut c = Command::new(program);
    c.env("LD_PRELOAD", faketime)
        .env("FAKETIME", format!("{offset_s:+}"))
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    c
}

/// Seconds to add to now so that it is about noon in the lab (so that one
/// session day never straddles the lab's midnight).
fn to_lab_noon_s() -> i64 {
    let out = Command::new("date")
        .args(["+%H %M"])
        .env("TZ", ZONE)
        .output()
        .expect("date");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse::<i64>().expect("HH MM"));
    let (h, m) = (it.next().expect("hour"), it.next().expect("minute"));
    (12 * 60 - (h * 60 + m)) * 60
}

/// The example protocol with each stage capped at TRIALS trials and its
/// rules' min_trials scaled from 100 to MIN_TRIALS; everything else as shipped.
fn scaled_protocol(dir: &Path) -> (PathBuf, toml::Table) {
    let text =
        std::fs::read_to_string(rig_tests::workspace_root().join("docs/examples/protocol.toml"))
            .expect("example protocol");
    let mut p: toml::Table = text.parse().expect("protocol is TOML");
    for stage in p["stage"].as_array_mut().expect("stages") {
        let stage = stage.as_table_mut().expect("stage table");
        let task = stage["task"].as_table_mut().expect("task");
        task.insert("max_trials".into(), toml::Value::Integer(TRIALS));
        for rule in ["advance", "regress"] {
            if let Some(r) = stage.get_mut(rule).and_then(toml::Value::as_table_mut) {
                if r.contains_key("min_trials") {
                    assert_eq!(r["min_trials"].as_integer(), Some(100), "example changed");
                    r.insert("min_trials".into(), toml::Value::Integer(MIN_TRIALS));
                }
            }
        }
    }
    let path = dir.join("protocol.toml");
    std::fs::write(&path, toml::to_string(&p).expect("serialise")).expect("write protocol");
    (path, p)
}

struct RigSetup {
    name: &'static str,
    /// Extra rig.toml text (how the two rigs differ).
    extra: &'static str,
}

const RIGS: [RigSetup; 2] = [
    RigSetup {
        name: "rigA",
        extra: "[rig]\nsample_rate_hz = 1000\n",
    },
    RigSetup {
        name: "rigB",
        extra: "[rig]\nsample_rate_hz = 500\nsamples_per_batch = 2\n",
    },
];

fn write_config(
    dir: &Path,
    rig: &RigSetup,
    link: &Path,
    data: &Path,
    protocol: &Path,
) -> (PathBuf, PathBuf) {
    let socket = dir.join("rigd.sock");
    let config = dir.join("rig.toml");
    let extra = rig.extra.replace("[rig]\n", "");
    std::fs::write(
        &config,
        format!(
            "[rig]\nname = {:?}\nserial_port = {:?}\n{extra}\n[storage]\ndata_root = {:?}\nfsync_interval_ms = 100\n\n\
             [control]\nsocket = {:?}\n\n[preview]\nenabled = false\n\n[imaging]\nenabled = false\n\n\
             [alerts]\ndisk_free_min_mb = 1\n\n[safety]\ndaily_water_target_ul = 1000.0\n\n\
             [lab]\ntimezone = {ZONE:?}\n\n[training]\nprotocol = {:?}\nmin_weight_pct = 80.0\n",
            rig.name,
            link.display().to_string(),
            data.display().to_string(),
            socket.display().to_string(),
            protocol.display().to_string(),
        ),
    )
    .expect("config");
    (config, socket)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn history(config: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(bin("rigctl"))
        .args(["--json", "--config"])
        .arg(config)
        .args(["history", MOUSE])
        .output()
        .expect("rigctl history");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&String::from_utf8_lossy(&out.stdout))
        .as_array()
        .expect("rows")
        .clone()
}

fn f(v: &serde_json::Value) -> Option<f64> {
    v.as_f64()
}

fn summary(dir: &Path) -> serde_json::Value {
    json(&std::fs::read_to_string(dir.join("summary.json")).expect("summary.json"))
}

fn training_table(dir: &Path) -> toml::Table {
    let t: toml::Table = std::fs::read_to_string(dir.join("session.toml"))
        .expect("session.toml")
        .parse()
        .expect("TOML");
    t["training"].as_table().expect("[training]").clone()
}

/// Start a session (retrying while the first lever sample is not in yet).
fn start(socket: &Path, extra: &[&str]) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut args = vec!["start", "--mouse", MOUSE, "--json"];
        args.extend_from_slice(extra);
        let (code, out, err) = rigctl(socket, &args);
        if code == 0 {
            return json(&out);
        }
        assert!(
            err.contains("no lever sample") && Instant::now() < deadline,
            "start failed: {out} {err}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop_rigd(rigd: Rigd) {
    rigd.signal("TERM");
    let (status, err) = rigd.wait(60);
    assert!(status.success(), "rigd exit {status}: {err}");
}

/// The stage the protocol's rules give after `past` (history rows, oldest
/// first), recomputed here from the protocol's numbers.
fn expected_stage(protocol: &toml::Table, past: &[serde_json::Value]) -> String {
    let stages = protocol["stage"].as_array().expect("stages");
    let name = |i: usize| stages[i]["name"].as_str().expect("name").to_owned();
    let Some(last) = past.last() else {
        return name(0);
    };
    let last_stage = last["stage"].as_str().expect("stage");
    let i = stages
        .iter()
        .position(|s| s["name"].as_str() == Some(last_stage))
        .expect("known stage");
    let run: Vec<&serde_json::Value> = past
        .iter()
        .rev()
        .take_while(|r| r["stage"].as_str() == Some(last_stage))
        .collect();
    let holds = |rule: &toml::Value| {
        let k = rule["sessions"].as_integer().expect("sessions") as usize;
        run.len() >= k
            && run[..k].iter().all(|r| {
                let trials = r["trials"].as_i64().unwrap_or(0);
                let ok_min_trials = rule
                    .get("min_trials")
                    .and_then(toml::Value::as_integer)
                    .map_or(true, |n| trials >= n);
                let ok_min_success = rule
                    .get("min_success")
                    .and_then(toml::Value::as_float)
                    .map_or(true, |x| f(&r["success_rate"]).is_some_and(|s| s >= x));
                let ok_max_success = rule
                    .get("max_success")
                    .and_then(toml::Value::as_float)
                    .map_or(true, |x| f(&r["success_rate"]).is_some_and(|s| s <= x));
                let ok_rt = rule
                    .get("max_reaction_time_s")
                    .and_then(toml::Value::as_float)
                    .map_or(true, |x| {
                        f(&r["reaction_time_median_s"]).is_some_and(|t| t <= x)
                    });
                ok_min_trials && ok_min_success && ok_max_success && ok_rt
            })
    };
    if let Some(adv) = stages[i].get("advance") {
        if holds(adv) {
            return name(i + 1);
        }
    }
    if let Some(reg) = stages[i].get("regress") {
        if holds(reg) {
            return name(i - 1);
        }
    }
    name(i)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn a_mouse_trains_for_two_weeks_on_two_rigs_through_a_crash() {
    let Some(faketime) = faketime() else { return };
    let dir = TempDir::new("training");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data root");
    let (protocol_path, protocol) = scaled_protocol(dir.path());
    let noon = to_lab_noon_s();

    // The mouse's record, written on the data root (no rigd needed).
    let cfg_dir = dir.path().join("cfg");
    std::fs::create_dir_all(&cfg_dir).expect("cfg dir");
    let (config_a, _) = write_config(
        &cfg_dir,
        &RIGS[0],
        Path::new("/dev/null"),
        &data,
        &protocol_path,
    );
    let add = Command::new(bin("rigctl"))
        .arg("--config")
        .arg(&config_a)
        .args([
            "mouse",
            "add",
            MOUSE,
            "--sex",
            "F",
            "--date-of-birth",
            "2026-01-10",
            "--baseline-weight-g",
            "24.0",
            "--strain",
            "C57BL/6J",
            "--experimenter",
            "Doe, Jane",
        ])
        .output()
        .expect("rigctl mouse add");
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let record =
        std::fs::read_to_string(data.join(MOUSE).join("subject.toml")).expect("subject.toml");
    assert!(record.contains("baseline_weight_g = 24.0"), "{record}");

    let mut folders: Vec<PathBuf> = Vec::new();
    let mut truths: Vec<PathBuf> = Vec::new();
    let mut prior_rewards: u64 = 0;
    for i in 0..SESSIONS {
        let rig = &RIGS[i % 2];
        let day = if i <= KILLED { i } else { i - 1 } as i64;
        let offset = noon + day * 86_400;
        let run = dir.path().join(format!("s{:02}", i + 1));
        std::fs::create_dir_all(&run).expect("run dir");
        let truth = run.join("truth.tsv");
        // The virtual mouse knows what it has learned: its rewards so far.
        let prior = prior_rewards.to_string();
        let seed = (i + 1).to_string();
        let sim = Sim::start(
            &run,
            &[
                "--speed",
                "25",
                "--seed",
                &seed,
                "--prior-rewards",
                &prior,
                "--learning-rewards",
                "40",
                "--truth",
                truth.to_str().expect("utf-8"),
            ],
        );
        let (config, socket) = write_config(&run, rig, &sim.link, &data, &protocol_path);
        let mut rigd_cmd = faked(&faketime, offset, &bin("rigd"));
        rigd_cmd.arg("--config").arg(&config);
        let rigd = Rigd::start_command(rigd_cmd, &socket);
        wait_connected(&socket);

        if i == 0 {
            // An unknown mouse is refused, naming the command that adds it.
            let (code, _, err) = rigctl(&socket, &["start", "--mouse", "M99"]);
            assert_eq!(code, 1, "{err}");
            assert!(err.contains("rigctl mouse add M99"), "{err}");
            // The welfare rule: 18 g is 75 % of 24 g, below 80 %.
            let (code, _, err) =
                rigctl(&socket, &["start", "--mouse", MOUSE, "--weight-g", "18.0"]);
            assert_eq!(code, 1, "{err}");
            assert!(
                err.contains("75.0 %") && err.contains("min_weight_pct"),
                "{err}"
            );
            // --stage needs a reason.
            let (code, _, err) = rigctl(
                &socket,
                &["start", "--mouse", MOUSE, "--stage", "s2-threshold"],
            );
            assert_ne!(code, 0, "{err}");
        }
        let weight = format!("{:.1}", 23.0 - 0.1 * i as f64);
        let mut extra = vec!["--weight-g", weight.as_str(), "--operator", "tester"];
        if i == OVERRIDDEN {
            extra.extend_from_slice(&[
                "--stage",
                "s2-threshold",
                "--stage-reason",
                "check the imaging window at the easier stage",
            ]);
        }
        let started = start(&socket, &extra);
        let folder = PathBuf::from(started["session_dir"].as_str().expect("session_dir"));
        assert_eq!(
            started["training_day"].as_u64(),
            Some(day as u64 + 1),
            "{started}"
        );

        if i == KILLED {
            // SIGKILL in the middle of the session.
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let (_, out, _) = rigctl(&socket, &["status", "--json"]);
                if json(&out)["trials"].as_u64().unwrap_or(0) >= 8 {
                    break;
                }
                assert!(Instant::now() < deadline, "no trials: {out}");
                std::thread::sleep(Duration::from_millis(100));
            }
            rigd.signal("KILL");
            let _ = rigd.wait(10);
            drop(sim);
            // The next rigd on this data root recovers the folder at startup.
            let mut again = faked(&faketime, offset, &bin("rigd"));
            again.arg("--config").arg(&config);
            let rigd = Rigd::start_command(again, &socket);
            let deadline = Instant::now() + Duration::from_secs(60);
            while !folder.join("summary.json").exists() {
                assert!(
                    Instant::now() < deadline,
                    "not recovered: {}",
                    folder.display()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            stop_rigd(rigd);
            assert_eq!(rig_tests::session_value(&folder, "state"), "recovered");
        } else {
            wait_idle(&socket, 600);
            stop_rigd(rigd);
            drop(sim);
            assert_eq!(rig_tests::session_value(&folder, "state"), "complete");
        }
        prior_rewards += summary(&folder)["rewards"].as_u64().expect("rewards");
        if i == 3 {
            // Water by hand that day (the supplement), on the lab's day.
            let out = faked(&faketime, offset + 3600, &bin("rigctl"))
                .arg("--config")
                .arg(&config)
                .args(["water", "give", MOUSE, "--ul", "300", "--by", "tester"])
                .stdin(Stdio::null())
                .output()
                .expect("rigctl water give");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        folders.push(folder);
        truths.push(truth);
    }

    // ---- the history: 14 rows, one per session, in order ----
    let rows = history(&config_a);
    assert_eq!(rows.len(), SESSIONS, "{rows:#?}");
    for (i, (row, folder)) in rows.iter().zip(&folders).enumerate() {
        assert_eq!(
            row["folder"].as_str(),
            Some(folder.to_str().expect("utf-8")),
            "row {i}"
        );
        assert_eq!(row["rig"].as_str(), Some(RIGS[i % 2].name), "row {i}");
        let day = if i <= KILLED { i + 1 } else { i } as u64;
        assert_eq!(row["day"].as_u64(), Some(day), "row {i}: training day");
        assert_eq!(
            row["weight_g"].as_f64(),
            Some(((230 - i) as f64) / 10.0),
            "row {i}"
        );
        // The folder is named with the lab's local date.
        let name = folder
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert_eq!(Some(&name[..10]), row["local_date"].as_str(), "row {i}");
    }
    let last_day = rows.last().expect("rows")["day"].as_u64();
    assert_eq!(
        last_day,
        Some(SESSIONS as u64 - 1),
        "13 days, one with two sessions"
    );

    // ---- stages by the rules (and the override, recorded) ----
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..SESSIONS {
        let t = training_table(&folders[i]);
        let stage = rows[i]["stage"].as_str().expect("stage").to_owned();
        seen.insert(stage.clone());
        let by_rules = expected_stage(&protocol, &rows[..i]);
        if i == OVERRIDDEN {
            assert_eq!(stage, "s2-threshold");
            assert_eq!(t["stage_override_by"].as_str(), Some("tester"));
            assert!(t["stage_override_reason"]
                .as_str()
                .unwrap_or("")
                .contains("imaging window"));
            assert_eq!(t["stage_overridden_from"].as_str(), Some(by_rules.as_str()));
        } else {
            assert_eq!(
                stage,
                by_rules,
                "session {}: {:?}",
                i + 1,
                t.get("stage_why")
            );
            assert!(!t.contains_key("stage_override_by"));
        }
        assert_eq!(t["protocol"].as_str(), Some("lever-press-shaping"));
        assert_eq!(t["timezone"].as_str(), Some(ZONE));
    }
    assert!(
        seen.len() >= 3,
        "the mouse reached the last stage: {seen:?}"
    );
    // The protocol's hash is the file's.
    let sha = Command::new("sha256sum")
        .arg(&protocol_path)
        .output()
        .expect("sha256sum");
    let sha = String::from_utf8_lossy(&sha.stdout);
    assert_eq!(
        training_table(&folders[0])["protocol_sha256"].as_str(),
        sha.split_whitespace().next()
    );

    // ---- nothing lost ----
    for (i, (folder, truth)) in folders.iter().zip(&truths).enumerate() {
        let s = summary(folder);
        let trials = read_tsv(&folder.join("trials.tsv"));
        assert_eq!(
            s["trials"].as_u64(),
            Some(trials.len() as u64),
            "session {}",
            i + 1
        );
        let rewarded = trials.iter().filter(|r| r["outcome"] == "rewarded").count();
        assert_eq!(
            s["rewards"].as_u64(),
            Some(rewarded as u64),
            "session {}",
            i + 1
        );
        let water: f64 = trials
            .iter()
            .map(|r| r["reward_ul"].parse::<f64>().unwrap_or(0.0))
            .sum();
        assert!((s["water_ul"].as_f64().expect("water") - water).abs() < 1e-6);
        let opened = read_tsv(truth)
            .iter()
            .filter(|r| r["kind"] == "valve_open")
            .count();
        if i == KILLED {
            // At most the last second before the kill can be lost
            // (docs/session-format.md): one reward at most at this pace.
            assert!(
                opened >= rewarded && opened - rewarded <= 1,
                "{opened} vs {rewarded}"
            );
        } else {
            assert_eq!(
                opened,
                rewarded,
                "session {}: every valve opening is a rewarded trial",
                i + 1
            );
            assert_eq!(trials.len() as i64, TRIALS, "session {}", i + 1);
        }
        let check = Command::new("sha256sum")
            .args(["--quiet", "-c", "MANIFEST.sha256"])
            .current_dir(folder)
            .output()
            .expect("sha256sum");
        assert!(
            check.status.success(),
            "{}: {}",
            folder.display(),
            String::from_utf8_lossy(&check.stdout)
        );
    }

    // ---- water per lab-local day ----
    let mut by_day: std::collections::BTreeMap<String, f64> = Default::default();
    for folder in &folders {
        let name = folder
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        *by_day.entry(name[..10].to_owned()).or_default() +=
            summary(folder)["water_ul"].as_f64().expect("water");
    }
    for (i, row) in rows.iter().enumerate() {
        let date = row["local_date"].as_str().expect("date");
        let task = row["day_task_water_ul"].as_f64().expect("task water");
        assert!(
            (task - by_day[date]).abs() < 1e-6,
            "row {i}: {task} vs {}",
            by_day[date]
        );
        let hand = row["day_by_hand_ul"].as_f64().expect("by hand");
        assert_eq!(hand, if i == 3 { 300.0 } else { 0.0 }, "row {i}");
        let owed = row["day_supplement_owed_ul"].as_f64().expect("owed");
        assert!(
            (owed - (1000.0 - task - hand).max(0.0)).abs() < 1e-6,
            "row {i}"
        );
    }
    // The second session of the shared day counted the first one's water
    // (the daily cap and the supplement use the lab's day).
    let first = summary(&folders[KILLED])["water_ul"]
        .as_f64()
        .expect("water");
    let second = summary(&folders[KILLED + 1]);
    let today = second["water_today_ul"].as_f64().expect("water today");
    assert!(
        (today - first - second["water_ul"].as_f64().expect("water")).abs() < 1e-6,
        "{second}"
    );

    // ---- the learning curve rises ----
    let col = |k: &str| -> Vec<f64> { rows.iter().filter_map(|r| r[k].as_f64()).collect() };
    let clean: Vec<&serde_json::Value> = rows
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != KILLED)
        .map(|(_, r)| r)
        .collect();
    let early = |k: &str| {
        mean(
            &clean[..3]
                .iter()
                .filter_map(|r| r[k].as_f64())
                .collect::<Vec<_>>(),
        )
    };
    let late = |k: &str| {
        mean(
            &clean[clean.len() - 3..]
                .iter()
                .filter_map(|r| r[k].as_f64())
                .collect::<Vec<_>>(),
        )
    };
    assert!(
        late("success_rate") > early("success_rate"),
        "success {:?}",
        col("success_rate")
    );
    assert!(
        late("reaction_time_median_s") < early("reaction_time_median_s"),
        "reaction time {:?}",
        col("reaction_time_median_s")
    );
    assert!(
        late("trajectory_corr_median") > early("trajectory_corr_median"),
        "trajectory correlation {:?}",
        col("trajectory_corr_median")
    );

    // ---- the report ----
    let report = dir.path().join("report.html");
    let out = Command::new(bin("rigctl"))
        .arg("--config")
        .arg(&config_a)
        .args(["report", MOUSE, "--out"])
        .arg(&report)
        .output()
        .expect("rigctl report");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(&report).expect("report");
    for banned in ["<script", "src=", "href=", "url("] {
        assert!(!html.contains(banned), "the report loads {banned}");
    }
    // Every point of the success curve is the history's number.
    let chart = &html[html.find("id=\"success\"").expect("success chart")..];
    let chart = &chart[..chart.find("</svg>").expect("end")];
    let points: Vec<f64> = chart
        .split("data-value=\"")
        .skip(1)
        .map(|s| s[..s.find('"').expect("quote")].parse().expect("number"))
        .collect();
    assert_eq!(points, col("success_rate"));
    // Per session, the cue-aligned lever traces from its lever files.
    for i in 1..=SESSIONS {
        let at = html
            .find(&format!("id=\"lever{i}\""))
            .unwrap_or_else(|| panic!("no lever overlay for session {i}"));
        let svg = &html[at..at + html[at..].find("</svg>").expect("end")];
        assert!(svg.matches("class=\"tr").count() >= 7, "session {i}: {svg}");
    }
    screenshot(&report);
}

fn screenshot(report: &Path) {
    let browser = std::env::var_os("RIG_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    if !browser.exists() {
        assert!(
            std::env::var("RIG_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "RIG_REQUIRE_BROWSER=1 but there is no browser at {}",
            browser.display()
        );
        eprintln!(
            "SKIP report screenshot: no browser at {}",
            browser.display()
        );
        return;
    }
    let target = std::env::current_exe()
        .expect("own path")
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("<target>/<profile>/deps/<test>")
        .to_path_buf();
    let png = target.join("training-report.png");
    let _ = std::fs::remove_file(&png);
    let profile = report.with_file_name("chromium-profile");
    let mut child = Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1600",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", report.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait for chromium") {
            assert!(st.success(), "chromium exited with {st}");
            break;
        }
        if start.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let bytes =
        std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display()));
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "bad screenshot"
    );
    eprintln!("screenshot: {}", png.display());
}
