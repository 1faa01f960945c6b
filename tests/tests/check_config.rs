//! `rigd check-config`: the real binary on real files. The human-facing output
//! (stderr and exit code) of each bad configuration is pinned with insta
//! snapshots; each case must give exactly one clear error.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What one run of `rigd` produced.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Exit code and stderr, the part a person reads when a file is wrong.
    fn report(&self) -> String {
        let code = self
            .code
            .map_or_else(|| "killed by a signal".to_owned(), |c| c.to_string());
        format!("exit code: {code}\n--- stderr\n{}", self.stderr)
    }
}

/// A fresh, empty directory for one test.
fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rigd-check-config-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}

/// Runs `rigd check-config FILE` in `dir`, with backtraces on so that any
/// panic would show, and checks that none did.
fn check_config(dir: &Path, file: &Path) -> Run {
    let output = Command::new(rig_tests::bin("rigd"))
        .arg("check-config")
        .arg(file)
        .current_dir(dir)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run rigd");
    let run = Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    for text in [&run.stdout, &run.stderr] {
        let lower = text.to_lowercase();
        assert!(
            !lower.contains("panicked") && !lower.contains("backtrace"),
            "rigd panicked:\n{}",
            run.report()
        );
    }
    run
}

/// Writes `contents` to `rig.toml` in a fresh directory and checks it, as a
/// person would: from that directory, with a relative file name.
fn check_bad_file(test: &str, contents: &str) -> Run {
    let dir = scratch_dir(test);
    std::fs::write(dir.join("rig.toml"), contents).expect("write rig.toml");
    let run = check_config(&dir, Path::new("rig.toml"));
    let _ = std::fs::remove_dir_all(&dir);
    assert_one_error(&run);
    run
}

/// Exit 2, nothing on stdout, exactly one `error:` line.
fn assert_one_error(run: &Run) {
    assert_eq!(run.code, Some(2), "{}", run.report());
    assert_eq!(run.stdout, "", "{}", run.report());
    let errors = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .count();
    assert_eq!(errors, 1, "{}", run.report());
}

#[test]
fn mistyped_key() {
    let run = check_bad_file(
        "mistyped_key",
        "[task]\ncue_tone_hz = 6000\nthreshhold_mm = 1.5\n",
    );
    insta::assert_snapshot!("mistyped_key", run.report());
}

#[test]
fn negative_threshold() {
    let run = check_bad_file("negative_threshold", "[task]\nthreshold_mm = -2\n");
    insta::assert_snapshot!("negative_threshold", run.report());
}

#[test]
fn threshold_past_lever_travel() {
    let run = check_bad_file(
        "threshold_past_lever_travel",
        "[rig]\nlever_travel_mm = 6.0\n\n[task]\nthreshold_mm = 7.5\n",
    );
    insta::assert_snapshot!("threshold_past_lever_travel", run.report());
}

#[test]
fn sample_rate_the_baud_cannot_carry() {
    let run = check_bad_file(
        "sample_rate_the_baud_cannot_carry",
        "[rig]\nbaud = 115200\nsample_rate_hz = 10000\n",
    );
    insta::assert_snapshot!("sample_rate_the_baud_cannot_carry", run.report());
}

#[test]
fn missing_file() {
    let dir = scratch_dir("missing_file");
    let run = check_config(&dir, Path::new("rig.toml"));
    let _ = std::fs::remove_dir_all(&dir);
    assert_one_error(&run);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.report());
    insta::assert_snapshot!("missing_file", run.report());
}

#[test]
fn file_that_is_not_toml() {
    let run = check_bad_file(
        "file_that_is_not_toml",
        "{\n  \"rig\": { \"name\": \"rig1\" }\n}\n",
    );
    insta::assert_snapshot!("file_that_is_not_toml", run.report());
}

#[test]
fn example_config_loads_and_its_output_reparses() {
    let example = rig_tests::workspace_root().join("docs/examples/rig.toml");
    let dir = scratch_dir("example_config");
    let first = check_config(&dir, &example);
    assert_eq!(first.code, Some(0), "{}", first.report());
    assert_eq!(first.stderr, "", "the example must load without warnings");
    assert!(first.stdout.contains("[[valve.calibration]]"));
    assert!(first.stdout.contains("mode = 0o660"));

    // The printed configuration is itself a valid configuration, and printing
    // it again gives the same configuration.
    std::fs::write(dir.join("effective.toml"), &first.stdout).expect("write");
    let second = check_config(&dir, Path::new("effective.toml"));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(second.code, Some(0), "{}", second.report());
    assert_eq!(second.stderr, "");
    let body = |s: &str| s.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(body(&first.stdout), body(&second.stdout));
}

#[test]
fn empty_file_loads_with_a_calibration_warning() {
    let dir = scratch_dir("empty_file");
    std::fs::write(dir.join("rig.toml"), "").expect("write");
    let run = check_config(&dir, Path::new("rig.toml"));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(run.code, Some(0), "{}", run.report());
    assert!(run
        .stderr
        .starts_with("warning: rig.toml: valve.calibration is not set"));
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.report());
    assert!(run.stdout.contains("sample_rate_hz = 1000\n"));
}

#[test]
fn several_problems_are_all_reported() {
    let dir = scratch_dir("several_problems");
    std::fs::write(
        dir.join("rig.toml"),
        "[task]\nthreshold_mm = -1\niti_min_ms = 9000\n[preview]\nbind = \"0.0.0.0\"\n",
    )
    .expect("write");
    let run = check_config(&dir, Path::new("rig.toml"));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(run.code, Some(2), "{}", run.report());
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 4, "{}", run.report());
    assert!(lines[0].starts_with("error: rig.toml:2:"));
    assert!(lines[1].starts_with("error: rig.toml:3:"));
    assert!(lines[2].starts_with("error: rig.toml:5:"));
    assert_eq!(lines[3], "rig.toml: 3 errors, configuration not loaded");
}

#[test]
fn not_utf8_and_directory_are_one_line_errors() {
    let dir = scratch_dir("not_utf8");
    std::fs::write(dir.join("rig.toml"), b"[rig]\nname = \"\xff\"\n").expect("write");
    for file in ["rig.toml", "."] {
        let run = check_config(&dir, Path::new(file));
        assert_one_error(&run);
        assert_eq!(run.stderr.lines().count(), 1, "{}", run.report());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn usage_errors_exit_2_without_panicking() {
    let dir = scratch_dir("usage");
    for args in [&[][..], &["check-config"][..], &["no-such-command"][..]] {
        let output = Command::new(rig_tests::bin("rigd"))
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run rigd");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unknown_key_and_the_other_errors_in_one_report() {
    // The unknown key used to stop every other check: all are reported
    // at once, the unknown key first, in file order.
    let dir = scratch_dir("unknown_and_others");
    std::fs::write(
        dir.join("rig.toml"),
        "[task]\nthreshhold_mm = 1.5\niti_min_ms = 9000\ncue_level_pct = 101\n",
    )
    .expect("write");
    let run = check_config(&dir, Path::new("rig.toml"));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(run.code, Some(2), "{}", run.report());
    insta::assert_snapshot!("unknown_key_and_other_errors", run.report());
}

#[test]
fn slips_that_load_with_a_warning() {
    // Accepted, but each is most likely a slip: a response window in
    // seconds written as ms, a silent cue, a threshold below one count.
    let dir = scratch_dir("slips");
    std::fs::write(
        dir.join("rig.toml"),
        "[[valve.calibration]]\nopen_ms = 20.0\nvolume_ul = 2.0\n\n\
         [[valve.calibration]]\nopen_ms = 40.0\nvolume_ul = 4.2\n\n\
         [task]\nresponse_window_ms = 10\ncue_level_pct = 0\nthreshold_mm = 0.001\n",
    )
    .expect("write");
    let run = check_config(&dir, Path::new("rig.toml"));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(run.code, Some(0), "{}", run.report());
    insta::assert_snapshot!("slips_that_load_with_a_warning", run.report());
}

#[test]
fn the_training_protocol_and_each_stage_on_this_rig_are_checked() {
    let dir = scratch_dir("protocol");
    let example = rig_tests::workspace_root().join("docs/examples/protocol.toml");
    std::fs::copy(&example, dir.join("protocol.toml")).expect("copy the example protocol");
    let rig = |lever_travel_mm: f64| {
        format!(
            "[rig]\nlever_travel_mm = {lever_travel_mm:?}\n\n[task]\nthreshold_mm = 0.5\n\n\
             [training]\nprotocol = {:?}\n",
            dir.join("protocol.toml").display().to_string()
        )
    };
    // The example protocol on a rig with the usual lever: fine.
    std::fs::write(dir.join("rig.toml"), rig(6.0)).expect("write rig.toml");
    let run = check_config(&dir, Path::new("rig.toml"));
    assert_eq!(run.code, Some(0), "{}", run.report());
    // On a rig whose lever travels 1 mm, a stage's 1.5 mm threshold cannot
    // run: said now, naming the file and the stage, not at the start of the
    // first mouse to reach it.
    std::fs::write(dir.join("rig.toml"), rig(1.0)).expect("write rig.toml");
    let run = check_config(&dir, Path::new("rig.toml"));
    assert_eq!(run.code, Some(2), "{}", run.report());
    assert!(
        run.stderr.contains("protocol.toml: stage \"")
            && run.stderr.contains("threshold_mm")
            && run.stderr.contains("[stage.task]"),
        "{}",
        run.report()
    );
    assert!(
        !run.stderr.contains("stage \"s1-shaping\""),
        "the 0.8 mm stage fits a 1 mm lever: {}",
        run.report()
    );
    // A protocol file that is not one: its own error.
    std::fs::write(
        dir.join("protocol.toml"),
        "name = \"x\"\n[[stage]]\nnam = \"a\"\n",
    )
    .expect("write protocol");
    let run = check_config(&dir, Path::new("rig.toml"));
    assert_eq!(run.code, Some(2), "{}", run.report());
    assert!(run.stderr.contains("protocol.toml"), "{}", run.report());
    let _ = std::fs::remove_dir_all(&dir);
}
