//! Drives the firmware's own build script from `cargo test`:
//!
//! * `firmware_host_tests`: `firmware/build.sh host-test` compiles the portable
//!   firmware C (protocol codec and device logic) with the host gcc and runs
//!   its tests, including a byte-exact check against
//!   `protocol/tests/vectors/serial.tsv`. Needs `bash` and `gcc`, which every
//!   development and CI machine of this project has; it fails if they are missing.
//! * `firmware_builds_for_avr`: `firmware/build.sh avr` compiles the Arduino
//!   Mega 2560 firmware with avr-gcc and prints its flash and RAM use. Skipped
//!   when `avr-gcc` is not on PATH, unless `RIG_REQUIRE_AVR=1` (CI installs
//!   `gcc-avr avr-libc binutils-avr` and sets it), in which case it fails.
//! * `firmware_runs_in_simulator`: `firmware/build.sh avr-sim` runs the compiled
//!   firmware in the simavr ATmega2560 simulator and checks its pins, timing and
//!   throughput from outside. Skipped unless avr-gcc and the simavr headers
//!   (`libsimavr-dev`) are installed; `RIG_REQUIRE_AVR_SIM=1` makes that an error.

use std::path::{Path, PathBuf};
use std::process::Command;

fn firmware_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware")
}

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("protocol")
        .join("tests")
        .join("vectors")
        .join("serial.tsv")
}

/// A build directory of its own per test and per process, inside Cargo's
/// target directory: nothing is written into the source tree, and neither
/// parallel tests nor concurrent `cargo test` runs sharing a target directory
/// collide. Removed when the build script succeeded.
fn build_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()))
}

fn on_path(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Run `build.sh <args>`, echo its output, and fail the test if it fails.
fn run_build_script(args: &[&str], build: &Path) -> String {
    let script = firmware_dir().join("build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .env("RIG_BUILD_DIR", build)
        .output()
        .unwrap_or_else(|e| panic!("cannot run bash {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "`build.sh {}` failed ({}), build files kept in {}:\n{stdout}\n{stderr}",
        args.join(" "),
        out.status,
        build.display()
    );
    let _ = std::fs::remove_dir_all(build);
    stdout
}

#[test]
fn firmware_host_tests() {
    assert!(
        on_path("gcc"),
        "gcc is needed to run the firmware's host tests (install gcc)"
    );
    let vectors = vectors();
    assert!(vectors.is_file(), "missing {}", vectors.display());
    let vectors = vectors.to_string_lossy().into_owned();
    let out = run_build_script(&["host-test", &vectors], &build_dir("firmware-host"));
    assert!(
        out.contains("host-test: all passed"),
        "unexpected output:\n{out}"
    );
    // Every golden frame was decoded and re-encoded.
    assert!(
        out.contains(" vectors, 0 failed"),
        "unexpected output:\n{out}"
    );
}

#[test]
fn firmware_builds_for_avr() {
    let required = std::env::var("RIG_REQUIRE_AVR").is_ok_and(|v| v == "1");
    if !on_path("avr-gcc") {
        assert!(
            !required,
            "RIG_REQUIRE_AVR=1 but avr-gcc is not on PATH \
             (apt-get install -y gcc-avr avr-libc binutils-avr)"
        );
        eprintln!("skipped: avr-gcc not on PATH (set RIG_REQUIRE_AVR=1 to make this an error)");
        return;
    }
    let out = run_build_script(&["avr"], &build_dir("firmware-avr"));
    let report: Vec<&str> = out.lines().filter(|l| l.starts_with("avr size:")).collect();
    assert_eq!(report.len(), 2, "no size report in:\n{out}");
    for line in report {
        eprintln!("{line}");
    }
}

#[test]
fn firmware_runs_in_simulator() {
    let required = std::env::var("RIG_REQUIRE_AVR_SIM").is_ok_and(|v| v == "1");
    let simavr = Path::new("/usr/include/simavr/sim_avr.h").is_file()
        || Command::new("pkg-config")
            .args(["--exists", "simavr"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if !(on_path("avr-gcc") && on_path("gcc") && simavr) {
        assert!(
            !required,
            "RIG_REQUIRE_AVR_SIM=1 but avr-gcc, gcc or the simavr headers are missing \
             (apt-get install -y gcc-avr avr-libc binutils-avr libsimavr-dev)"
        );
        eprintln!("skipped: needs avr-gcc and libsimavr-dev (set RIG_REQUIRE_AVR_SIM=1 to make this an error)");
        return;
    }
    let out = run_build_script(&["avr-sim"], &build_dir("firmware-sim"));
    assert!(
        out.contains("avr-sim: all passed"),
        "unexpected output:\n{out}"
    );
}
