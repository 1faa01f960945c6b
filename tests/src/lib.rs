//! Helpers for the end-to-end tests: locate (and if needed build) the real
//! `rigd`, `rigctl`, `rig-sim` and `rig-probe` binaries. This crate has no code of
//! its own under test; unit tests live beside the code they test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace's binaries that end-to-end tests run.
pub const BINARIES: &[(&str, &str)] = &[
    ("daemon", "rigd"),
    ("daemon", "rigctl"),
    ("firmware-bridge", "rig-sim"),
    ("firmware-bridge", "rig-probe"),
];

/// The directory cargo put this test executable's profile outputs in
/// (`<target>/<profile>`), derived from the running test binary
/// (`<target>/<profile>/deps/<test>-<hash>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its own path");
    let deps = exe.parent().expect("test binary lives in a deps directory");
    deps.parent()
        .expect("deps directory has a parent profile directory")
        .to_path_buf()
}

/// Build every workspace binary once per test process, with the same profile
/// and target directory as the tests themselves, so a plain `cargo test` on a
/// fresh clone runs the binaries of this very commit.
fn build_once() -> &'static Result<(), String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT.get_or_init(|| {
        let profile = profile_dir();
        let release = profile.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests crate sits in the workspace root")
            .to_path_buf();
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&workspace)
            .arg("build")
            .arg("--quiet")
            .arg("--bins");
        for (package, _) in BINARIES {
            cmd.arg("-p").arg(package);
        }
        if release {
            cmd.arg("--release");
        }
        // Build into the directory this test binary came from.
        if let Some(target) = profile.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("`cargo build --bins` failed with {s}")),
            Err(e) => Err(format!("could not run cargo to build the binaries: {e}")),
        }
    })
}

/// Path to one of the workspace binaries, built if necessary.
///
/// Panics (failing the test) with a clear message if the build fails.
pub fn bin(name: &str) -> PathBuf {
    if let Err(e) = build_once() {
        panic!("{e}");
    }
    let path = profile_dir().join(name);
    assert!(
        path.exists(),
        "binary {name} not found at {}",
        path.display()
    );
    path
}

/// The workspace root (for example files such as `docs/examples/rig.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate sits in the workspace root")
        .to_path_buf()
}
