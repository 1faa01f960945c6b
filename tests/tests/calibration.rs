//! The valve calibration workflow end to end: `rigctl calibrate valve`
//! against rig-sim through rigd, the test playing the scale from the
//! simulator's truth log (the true water of every opening), the fitted
//! calibration within 5 % of the truth, and `--check` delivering target
//! volumes between the weighed points within 5 %.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rig_tests::{bin, read_tsv, wait_connected, Rigd, Sim, TempDir};

/// True µL per opening in the truth log, by the opening's length in µs.
fn truth_water(truth: &Path) -> HashMap<u32, Vec<f64>> {
    let mut by_us: HashMap<u32, Vec<f64>> = HashMap::new();
    if !truth.exists() {
        return by_us;
    }
    for row in read_tsv(truth) {
        if row["kind"] != "valve_water" {
            continue;
        }
        let us: u32 = row["detail"]
            .strip_prefix("open_us=")
            .and_then(|s| s.parse().ok())
            .expect("valve_water detail open_us=N");
        by_us
            .entry(us)
            .or_default()
            .push(row["value"].parse().expect("µL"));
    }
    by_us
}

/// The scale: wait until the truth log holds all `pulses` openings of
/// `open_us` (it is flushed about once a second), and weigh them (0.1 mg).
fn weigh(truth: &Path, open_us: u32, pulses: usize) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = truth_water(truth).remove(&open_us).unwrap_or_default();
        if got.len() >= pulses {
            // Every opening asked for, exactly once: none lost, none repeated.
            std::thread::sleep(Duration::from_millis(1500));
            let got = truth_water(truth).remove(&open_us).unwrap_or_default();
            assert_eq!(
                got.len(),
                pulses,
                "openings of {open_us} µs in the truth log"
            );
            return (got.iter().sum::<f64>() * 10.0).round() / 10.0;
        }
        assert!(
            Instant::now() < deadline,
            "the truth log has {} of {pulses} openings of {open_us} µs",
            got.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Run `rigctl <args>`, answering every weight prompt from the truth log.
fn run_with_scale(args: &[&str], truth: &Path) -> (i32, String) {
    let mut child = Command::new(bin("rigctl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run rigctl");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut seen = String::new();
    for line in stdout.lines() {
        let line = line.expect("rigctl output");
        seen.push_str(&line);
        seen.push('\n');
        // "weight of the water from 20 x 10 ms, mg ..."
        if let Some(rest) = line.strip_prefix("weight of the water from ") {
            let mut words = rest.split_whitespace();
            let pulses: usize = words.next().and_then(|w| w.parse().ok()).expect("N");
            assert_eq!(words.next(), Some("x"));
            let ms: f64 = words.next().and_then(|w| w.parse().ok()).expect("ms");
            let mg = weigh(truth, (ms * 1000.0).round() as u32, pulses);
            writeln!(stdin, "{mg}").expect("answer the prompt");
        }
    }
    drop(stdin);
    let out = child.wait_with_output().expect("rigctl exits");
    seen.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), seen)
}

struct Room {
    dir: TempDir,
    sim: Sim,
    rigs: PathBuf,
    truth: PathBuf,
}

fn room(name: &str, day: &str) -> Room {
    let dir = TempDir::new(name);
    let truth = dir.path().join("truth.tsv");
    let sim = Sim::start(
        dir.path(),
        &["--day", day, "--truth", truth.to_str().expect("utf-8")],
    );
    let rigs = dir.path().join("rigs");
    std::fs::create_dir_all(&rigs).expect("rigs dir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data");
    std::fs::write(
        rigs.join("r1.toml"),
        format!(
            "[rig]\nname = \"r1\"\nserial_port = {:?}\n[storage]\ndata_root = {:?}\n\
             [control]\nsocket = {:?}\n[preview]\nenabled = false\n[imaging]\nenabled = false\n\
             [valve]\ncalibration_file = \"r1-valve.toml\"\n",
            sim.link.display().to_string(),
            data.display().to_string(),
            dir.path().join("r1.sock").display().to_string(),
        ),
    )
    .expect("config");
    Room {
        dir,
        sim,
        rigs,
        truth,
    }
}

#[test]
fn calibration_against_the_simulated_valve_is_within_5_percent_of_the_truth() {
    let r = room("calibrate", "9");
    let config = r.rigs.join("r1.toml");
    let socket = r.dir.path().join("r1.sock");
    let rigd = Rigd::start(&config, &socket);
    wait_connected(&socket);
    let rigs = r.rigs.to_str().expect("utf-8");

    let pulses = 20;
    let (code, out) = run_with_scale(
        &[
            "--rigs-dir",
            rigs,
            "--rig",
            "r1",
            "calibrate",
            "valve",
            "--durations",
            "10,20,40,80",
            "--pulses",
            "20",
            "--pause-ms",
            "50",
        ],
        &r.truth,
    );
    assert_eq!(code, 0, "{out}");
    let file = r.rigs.join("r1-valve.toml");
    assert!(out.contains(&format!("wrote {}", file.display())), "{out}");

    // The configuration now takes its calibration from the file, dated today.
    let loaded = rig_config::load(&config).expect("the config loads with the calibration");
    let points = &loaded.config.valve.calibration;
    assert_eq!(points.len(), 4, "{points:?}");
    assert!(loaded.config.valve.calibrated_utc.is_some());
    assert!(
        !loaded.warnings.iter().any(|w| w.contains("calibration")),
        "{:?}",
        loaded.warnings
    );
    // Every fitted point within 5 % of the true water per opening.
    let truth = truth_water(&r.truth);
    for p in points {
        let t = &truth[&((p.open_ms * 1000.0).round() as u32)];
        assert_eq!(t.len(), pulses);
        let true_ul = t.iter().sum::<f64>() / t.len() as f64;
        let err = (p.volume_ul - true_ul).abs() / true_ul;
        eprintln!(
            "{} ms: fitted {:.4} µL, true {true_ul:.4} µL",
            p.open_ms, p.volume_ul
        );
        assert!(
            err < 0.05,
            "{} ms: fitted {} µL, true {true_ul} µL",
            p.open_ms,
            p.volume_ul
        );
    }

    // Check mode between the points, where the valve's curve bends most
    // (0.7 µL between 10 and 20 ms) and on the straighter part (5 µL).
    for target in [0.7, 5.0] {
        let before: usize = truth_water(&r.truth).values().map(Vec::len).sum();
        let (code, out) = run_with_scale(
            &[
                "--rigs-dir",
                rigs,
                "--rig",
                "r1",
                "calibrate",
                "valve",
                "--check",
                "--target-ul",
                &target.to_string(),
                "--pulses",
                "20",
                "--pause-ms",
                "50",
            ],
            &r.truth,
        );
        assert_eq!(code, 0, "check {target} µL: {out}");
        assert!(out.contains("PASS"), "{out}");
        // The truth agrees: the openings the check gave carry the target.
        let truth = truth_water(&r.truth);
        let after: usize = truth.values().map(Vec::len).sum();
        assert_eq!(after - before, 20, "{out}");
        // "check: 20 x 14.587 ms for 0.7 µL each ..."
        let open_ms: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix("check: 20 x "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|w| w.parse().ok())
            .expect("the check's open time");
        let v = &truth[&((open_ms * 1000.0).round() as u32)];
        assert_eq!(v.len(), 20);
        let last = v.iter().sum::<f64>() / v.len() as f64;
        eprintln!("check {target} µL: {open_ms} ms delivered {last:.4} µL per opening");
        assert!(
            (last - target).abs() / target < 0.05,
            "check {target} µL delivered {last} µL per opening"
        );
    }

    // Every calibration opening was marked as such by rigd.
    rigd.signal("TERM");
    let (_, log) = rigd.wait(30);
    let marked = log.matches("valve calibration pulse given").count();
    assert_eq!(marked, 4 * pulses + 2 * 20, "{log}");
    drop(r.sim);
}

#[test]
fn weights_that_are_not_a_curve_are_refused_and_nothing_is_written() {
    let dir = TempDir::new("calibrate-refuse");
    let weights = dir.path().join("weights.txt");
    let out_file = dir.path().join("valve.toml");
    std::fs::write(
        &weights,
        "# open_ms pulses weight_mg\n10 50 30.0\n20 50 29.0\n",
    )
    .expect("w");
    let out = Command::new(bin("rigctl"))
        .args([
            "--socket",
            "/nonexistent.sock",
            "calibrate",
            "valve",
            "--weights",
        ])
        .arg(&weights)
        .arg("--out")
        .arg(&out_file)
        .output()
        .expect("run rigctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not monotonic: 20 ms gave 0.5800 µL per opening, not more than 10 ms")
            && err.contains("nothing written"),
        "{err}"
    );
    assert!(!out_file.exists());

    // A line that is not a weighing names the file and line.
    std::fs::write(&weights, "10 50 30.0\n20 fifty 60\n").expect("w");
    let out = Command::new(bin("rigctl"))
        .args(["calibrate", "valve", "--weights"])
        .arg(&weights)
        .arg("--out")
        .arg(&out_file)
        .output()
        .expect("run rigctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("weights.txt:2:") && err.contains("OPEN_MS PULSES WEIGHT_MG"),
        "{err}"
    );

    // Good weights from a file: written, and the file loads.
    std::fs::write(&weights, "10 50 23.6\n20 50 69.6\n40 50 176.3\n").expect("w");
    let out = Command::new(bin("rigctl"))
        .args(["calibrate", "valve", "--weights"])
        .arg(&weights)
        .arg("--out")
        .arg(&out_file)
        .output()
        .expect("run rigctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = rig_config::CalibrationFile::read(&out_file).expect("a calibration file");
    assert_eq!(f.point.len(), 3);
    assert!((f.point[1].volume_ul - 1.392).abs() < 1e-9);
}
