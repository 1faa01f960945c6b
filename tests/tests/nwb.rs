//! NWB export end to end: real `rigd demo` sessions (an expert day, a naive
//! day 1, and one killed with SIGKILL mid-session and then repaired by
//! `rigctl recover`), plus a `rigd --config` session with raw frames and an
//! ROI label image, are exported with `python/rigsession` (pynwb), read back
//! with pynwb and compared with the session files value by value, and checked
//! with nwbinspector's DANDI configuration (no CRITICAL, ERROR or
//! BEST_PRACTICE_VIOLATION).
//!
//! Needs a Python with pynwb and nwbinspector (`$RIG_PYTHON`): with
//! `RIG_REQUIRE_NWB=1` (set by `.ci/run`) the tests fail without them, else
//! they skip with a message.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rig_tests::{
    bin, python, read_tsv, start_session, stop_session, wait_connected, workspace_root, Rigd, Sim,
    TempDir,
};

const INSTALL: &str = "pip install './python[nwb]' (from the checkout, into $RIG_PYTHON's environment; .ci/run does this)";

/// Imaging metadata the rig configuration does not hold, given as an
/// experimenter would (without them the export uses documented placeholders,
/// and nwbinspector asks for a brain area).
const IMAGING_ARGS: &[&str] = &[
    "--location",
    "Primary motor area",
    "--indicator",
    "GCaMP6f",
    "--excitation-nm",
    "920",
    "--emission-nm",
    "510",
];

/// Whether the NWB tests can run: pynwb and nwbinspector importable. Panics
/// naming the install command when they are required (`RIG_REQUIRE_NWB=1`).
fn nwb_available() -> bool {
    let out = py(&["-c", "import numpy, pynwb, nwbinspector, hdmf"]);
    if out.status.success() {
        return true;
    }
    let why = String::from_utf8_lossy(&out.stderr);
    if std::env::var_os("RIG_REQUIRE_NWB").is_some_and(|v| v == "1") {
        panic!(
            "RIG_REQUIRE_NWB=1 but {} cannot import pynwb/nwbinspector: {}\ninstall them with: {INSTALL}",
            python().display(),
            why.trim()
        );
    }
    eprintln!(
        "skipping the NWB test: {} lacks pynwb/nwbinspector ({}); install with {INSTALL}",
        python().display(),
        why.lines().last().unwrap_or("")
    );
    false
}

/// `$RIG_PYTHON args`, with this checkout's `python/` first on the path, so
/// the code under test is the working tree's, not an installed copy.
fn py<S: AsRef<OsStr>>(args: &[S]) -> Output {
    let path = rig_tests::checkout_pythonpath();
    Command::new(python())
        .args(args)
        .env("PYTHONPATH", path)
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", python().display()))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn export(dir: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("-m"),
        OsStr::new("rigsession"),
        OsStr::new("export-nwb"),
        dir.as_os_str(),
        OsStr::new("-o"),
        out.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    args.extend(IMAGING_ARGS.iter().map(OsStr::new));
    let o = py(&args);
    assert!(
        o.status.success(),
        "export of {} failed:\n{}",
        dir.display(),
        text(&o)
    );
    text(&o)
}

/// Round trip and nwbinspector, by python/tests/check_nwb.py.
fn check(dir: &Path, nwb: &Path) -> String {
    let script = workspace_root().join("python/tests/check_nwb.py");
    let o = py(&[script.as_os_str(), dir.as_os_str(), nwb.as_os_str()]);
    let out = text(&o);
    assert!(
        o.status.success(),
        "NWB check of {} failed:\n{out}",
        dir.display()
    );
    let ok = out
        .lines()
        .find(|l| l.starts_with("OK "))
        .expect("check prints OK");
    eprintln!("{ok}");
    ok.to_owned()
}

fn subject_toml(mouse_dir: &Path, id: &str) {
    std::fs::write(
        mouse_dir.join("subject.toml"),
        format!(
            "id = \"{id}\"\nspecies = \"Mus musculus\"\nsex = \"F\"\ndate_of_birth = 2026-09-01\n\
             strain = \"C57BL/6J\"\ngenotype = \"wild type\"\nexperimenter = \"Doe, Jane\"\n\
             baseline_weight_g = 23.5\nnotes = \"test mouse\"\nlab = \"Test lab\"\ninstitution = \"Test institute\"\n"
        ),
    )
    .expect("write subject.toml");
}

/// The one session folder under `<data>/<mouse>/`.
fn only_session(mouse_dir: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(mouse_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", mouse_dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("session.toml").is_file())
        .collect();
    assert_eq!(
        dirs.len(),
        1,
        "sessions in {}: {dirs:?}",
        mouse_dir.display()
    );
    dirs.into_iter().next().expect("one session")
}

fn demo(data: &Path, mouse: &str, day: &str) -> PathBuf {
    let out = Command::new(bin("rigd"))
        .args([
            "demo",
            "--speed",
            "10",
            "--minutes",
            "2",
            "--day",
            day,
            "--mouse",
            mouse,
            "--data",
        ])
        .arg(data)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run rigd demo");
    assert!(out.status.success(), "rigd demo failed:\n{}", text(&out));
    only_session(&data.join(mouse))
}

fn trial_rows(dir: &Path) -> usize {
    read_tsv(&dir.join("trials.tsv")).len()
}

#[test]
fn rigsession_unit_checks_pass() {
    if !nwb_available() {
        return;
    }
    let script = workspace_root().join("python/tests/test_units.py");
    let o = py(&[script.as_os_str()]);
    assert!(
        o.status.success(),
        "python/tests/test_units.py failed:\n{}",
        text(&o)
    );
    assert!(text(&o).contains("OK "), "{}", text(&o));
}

#[test]
fn demo_and_day1_sessions_export_to_nwb_equal_to_the_files_and_dandi_clean() {
    if !nwb_available() {
        return;
    }
    let tmp = TempDir::new("nwb-demo");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("data");

    // Expert day; the subject from the mouse record, batch form.
    let expert = demo(&data, "EXPERT", "14");
    subject_toml(&data.join("EXPERT"), "EXPERT");
    let outdir = tmp.path().join("nwb");
    let o = py(&[
        OsStr::new("-m"),
        OsStr::new("rigsession"),
        OsStr::new("export-nwb"),
        OsStr::new("--mouse"),
        data.join("EXPERT").as_os_str(),
        OsStr::new("-o"),
        outdir.as_os_str(),
        OsStr::new("--location"),
        OsStr::new("Primary motor area"),
    ]);
    assert!(o.status.success(), "batch export failed:\n{}", text(&o));
    assert!(
        text(&o).contains("[1/1]"),
        "batch shows progress: {}",
        text(&o)
    );
    let nwbs: Vec<PathBuf> = std::fs::read_dir(&outdir)
        .expect("outdir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(nwbs.len(), 1, "{nwbs:?}");
    assert!(trial_rows(&expert) > 5, "the expert demo ran trials");
    check(&expert, &nwbs[0]);

    // Day 1 (naive); no mouse record: the export refuses, naming what is
    // missing and how to give it, then works with the options.
    let naive = demo(&data, "NAIVE", "1");
    // The demo writes a record for its mouse; this one is to have none.
    std::fs::remove_file(data.join("NAIVE/subject.toml")).expect("the demo's mouse record");
    let out = tmp.path().join("naive.nwb");
    let args: Vec<&OsStr> = vec![
        OsStr::new("-m"),
        OsStr::new("rigsession"),
        OsStr::new("export-nwb"),
        naive.as_os_str(),
        OsStr::new("-o"),
        out.as_os_str(),
    ];
    let refused = py(&args);
    let msg = text(&refused);
    assert_eq!(refused.status.code(), Some(1), "{msg}");
    for want in [
        "species",
        "sex",
        "date_of_birth or age",
        "subject.toml",
        "--species",
        "--date-of-birth",
    ] {
        assert!(msg.contains(want), "the refusal names {want:?}: {msg}");
    }
    assert!(!out.exists(), "no file after a refusal");
    let subject = [
        "--species",
        "Mus musculus",
        "--sex",
        "M",
        "--age",
        "P95D",
        "--experimenter",
        "Doe, Jane",
        "--lab",
        "Test lab",
        "--institution",
        "Test institute",
    ];
    export(&naive, &out, &subject);
    check(&naive, &out);
}

#[test]
fn a_killed_and_recovered_session_exports_to_nwb_equal_to_the_files_and_dandi_clean() {
    if !nwb_available() {
        return;
    }
    let tmp = TempDir::new("nwb-crash");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("data");
    let mut child = Command::new(bin("rigd"))
        .args([
            "demo",
            "--speed",
            "10",
            "--minutes",
            "10",
            "--mouse",
            "CRASH",
            "--data",
        ])
        .arg(&data)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start rigd demo");
    let pid = child.id();
    // Kill it once it has recorded a few trials.
    let deadline = Instant::now() + Duration::from_secs(120);
    let dir = loop {
        let mouse = data.join("CRASH");
        // The session folder (the demo also writes the mouse's subject.toml).
        if let Some(d) = std::fs::read_dir(&mouse)
            .ok()
            .and_then(|r| r.flatten().map(|e| e.path()).find(|p| p.is_dir()))
        {
            if d.join("trials.tsv").is_file() && trial_rows(&d) >= 4 {
                break d;
            }
        }
        assert!(Instant::now() < deadline, "the demo recorded no trials");
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .status();
    let _ = child.wait();
    // What the killed demo leaves: its ring and its temp folder.
    let _ = std::fs::remove_file(format!("/dev/shm/rigd-demo-{pid}"));
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("rigd-demo-{pid}")));
    assert_eq!(rig_tests::session_value(&dir, "state"), "running");

    // Not exported before recovery.
    subject_toml(&data.join("CRASH"), "CRASH");
    let out = tmp.path().join("crash.nwb");
    let o = py(&[
        OsStr::new("-m"),
        OsStr::new("rigsession"),
        OsStr::new("export-nwb"),
        dir.as_os_str(),
        OsStr::new("-o"),
        out.as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("rigctl recover"), "{}", text(&o));

    let r = Command::new(bin("rigctl"))
        .arg("recover")
        .arg(&dir)
        .output()
        .expect("rigctl recover");
    assert!(r.status.success(), "recover failed:\n{}", text(&r));
    assert_eq!(rig_tests::session_value(&dir, "state"), "recovered");
    export(&dir, &out, &[]);
    let ok = check(&dir, &out);
    assert!(ok.contains("trials "), "{ok}");
}

#[test]
fn raw_frames_and_roi_masks_round_trip_through_nwb() {
    if !nwb_available() {
        return;
    }
    let shm = format!("/rig-e2e-{}-nwb", std::process::id());
    let sim_dir = TempDir::new("nwb-sim");
    let truth = sim_dir.path().join("mtruth");
    let sim = Sim::start(
        sim_dir.path(),
        &[
            "--microscope",
            &shm,
            "--microscope-size",
            "64x48",
            "--neurons",
            "12",
            "--microscope-truth",
            truth.to_str().expect("utf-8"),
        ],
    );
    let tmp = TempDir::new("nwb-raw");
    let socket = tmp.path().join("rigd.sock");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("data");
    let config = tmp.path().join("rig.toml");
    // The label image appears once the simulated microscope has started.
    let labels = truth.join("labels.npy");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !labels.is_file() {
        assert!(
            Instant::now() < deadline,
            "rig-sim wrote no {}",
            labels.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(
        &config,
        format!(
            "[rig]\nserial_port = {:?}\n\n[storage]\ndata_root = {:?}\nfsync_interval_ms = 200\nraw_frames = true\n\n\
             [control]\nsocket = {:?}\n\n[preview]\nenabled = false\n\n[imaging]\nenabled = true\nshm_name = {shm:?}\n\
             width = 64\nheight = 48\nchannels = 1\nttl_wired = true\nroi_labels = {:?}\n",
            sim.link.display().to_string(),
            data.display().to_string(),
            socket.display().to_string(),
            labels.display().to_string(),
        ),
    )
    .expect("config");
    let rigd = Rigd::start(&config, &socket);
    wait_connected(&socket);
    let dir = start_session(&socket, "RAW");
    std::thread::sleep(Duration::from_secs(6));
    stop_session(&socket);
    drop(rigd);
    drop(sim);
    let _ = std::fs::remove_file(format!("/dev/shm{shm}"));
    assert!(dir.join("frames.npy").is_file(), "raw frames stored");
    subject_toml(&data.join("RAW"), "RAW");
    let out = tmp.path().join("raw.nwb");
    export(&dir, &out, &[]);
    let ok = check(&dir, &out);
    assert!(ok.contains("frames ") && ok.contains("masks "), "{ok}");
}
