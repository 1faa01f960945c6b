//! Helpers for the end-to-end tests: locate (and if needed build) the real
//! `rigd`, `rigctl`, `rig-sim` and `rig-probe` binaries. This crate has no code of
//! its own under test; unit tests live beside the code they test.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub mod browser;
pub mod room;
pub mod soak;

/// The workspace's binaries that end-to-end tests run.
pub const BINARIES: &[(&str, &str)] = &[
    ("daemon", "rigd"),
    ("daemon", "rigctl"),
    ("rig-sim", "rig-sim"),
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

/// A fresh, empty directory under the system temp dir, unique to this process
/// and `name`. Removed when the value is dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("rig-tests-{}-{name}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // RIG_KEEP_TMP=1 keeps the files of a failing test for inspection.
        if std::env::var_os("RIG_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A running `rig-sim`, killed (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Sim {
    pub child: std::process::Child,
    pub link: PathBuf,
}

impl Sim {
    /// Start `rig-sim --link <dir>/ttyRIG --quiet <args>` and wait until the
    /// link path exists.
    pub fn start(dir: &Path, args: &[&str]) -> Self {
        let link = dir.join("ttyRIG");
        let child = Command::new(bin("rig-sim"))
            .arg("--link")
            .arg(&link)
            .arg("--quiet")
            .args(args)
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start rig-sim");
        let sim = Self { child, link };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !sim.link.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "rig-sim did not create {}",
                sim.link.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        sim
    }

    /// Ask the sim to stop (SIGTERM) and wait for it.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        // kill(1) keeps this crate free of libc; a process already gone is fine.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("wait for rig-sim");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// The Python interpreter for file checks: `$RIG_PYTHON`, else `python3`.
/// Tests that load session files with numpy require it (CI installs it).
pub fn python() -> PathBuf {
    std::env::var_os("RIG_PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from)
}

/// `PYTHONPATH` with the checkout's `python/` first, so tests import
/// `rigsession` from this very commit, not from an installed copy.
pub fn checkout_pythonpath() -> std::ffi::OsString {
    let mut path = std::ffi::OsString::from(workspace_root().join("python"));
    if let Some(old) = std::env::var_os("PYTHONPATH") {
        path.push(":");
        path.push(old);
    }
    path
}

/// Run a Python snippet with `args`; panics with its output if it fails.
pub fn run_python(code: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("run python (set RIG_PYTHON to a python3 with numpy)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A running `rigd --config <path>`, killed when dropped.
#[derive(Debug)]
pub struct Rigd {
    pub child: std::process::Child,
    pub socket: PathBuf,
    /// Reads rigd's stderr as it comes (a pipe nobody reads fills up, and
    /// then every thread of rigd that logs blocks); `wait` returns it.
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Rigd {
    /// Start rigd and wait until its control socket answers.
    pub fn start(config: &Path, socket: &Path) -> Self {
        let mut cmd = Command::new(bin("rigd"));
        cmd.arg("--config").arg(config);
        Self::spawn(cmd, socket)
    }

    /// Start rigd with its open-file limit set to `soft` (and `hard`), as a
    /// service manager or a login shell might leave it.
    pub fn start_with_fd_limit(config: &Path, socket: &Path, soft: u64, hard: u64) -> Self {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\" \"$@\""
            ))
            .arg(bin("rigd"))
            .arg("--config")
            .arg(config);
        Self::spawn(cmd, socket)
    }

    /// Start rigd from a prepared command (extra environment, a wrapper
    /// such as `faketime`) and wait until its control socket answers.
    pub fn start_command(cmd: Command, socket: &Path) -> Self {
        Self::spawn(cmd, socket)
    }

    /// rigd's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn spawn(mut cmd: Command, socket: &Path) -> Self {
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start rigd");
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                use std::io::Read;
                let mut text = String::new();
                let _ = e.read_to_string(&mut text);
                text
            })
        });
        let me = Self {
            child,
            socket: socket.to_path_buf(),
            stderr,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "rigd did not open {}",
                socket.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        me
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Wait for exit (up to `secs`), returning the status and stderr.
    pub fn wait(mut self, secs: u64) -> (std::process::ExitStatus, String) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let err = self
                    .stderr
                    .take()
                    .and_then(|t| t.join().ok())
                    .unwrap_or_default();
                return (status, err);
            }
            assert!(std::time::Instant::now() < deadline, "rigd did not exit");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Rigd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run `rigctl --socket <socket> <args>`; returns (exit code, stdout, stderr).
pub fn rigctl(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("rigctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run rigctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Trials of a session's `trials.tsv` that opened the valve: rewarded, not
/// held back by a cap, with water.
pub fn valve_rewards(session: &Path) -> usize {
    read_tsv(&session.join("trials.tsv"))
        .iter()
        .filter(|r| {
            r["outcome"] == "rewarded"
                && r["capped"] == "0"
                && r["reward_ul"].parse::<f64>().is_ok_and(|v| v > 0.0)
        })
        .count()
}

/// Valve openings in rig-sim's truth log (the device's own record).
pub fn valve_openings(truth: &Path) -> usize {
    read_tsv(truth)
        .iter()
        .filter(|r| r["kind"] == "valve_open")
        .count()
}

/// A TSV file (header row first, `#` lines skipped) as header-keyed rows.
pub fn read_tsv(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines().filter(|l| !l.starts_with('#'));
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let header: Vec<String> = header.split('\t').map(str::to_owned).collect();
    lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            header
                .iter()
                .cloned()
                .zip(l.split('\t').map(str::to_owned))
                .collect()
        })
        .collect()
}

/// A top-level value of a session's `session.toml`, as text.
pub fn session_value(dir: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(dir.join("session.toml")).expect("session.toml");
    let table: toml::Table = text.parse().expect("session.toml is TOML");
    table
        .get(key)
        .map(|v| v.to_string().trim_matches('"').to_owned())
        .unwrap_or_default()
}

/// Wait (up to 15 s) until rigd reports the rig connected.
pub fn wait_connected(socket: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (code, out, _) = rigctl(socket, &["status", "--json"]);
        if code == 0 && out.contains("\"link\":\"connected\"") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rig never connected: {out}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `rigctl start --mouse <mouse>`; returns the session folder.
pub fn start_session(socket: &Path, mouse: &str) -> PathBuf {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (code, out, err) = rigctl(socket, &["start", "--mouse", mouse, "--json"]);
        if code == 0 {
            let v: serde_json::Value =
                serde_json::from_str(out.trim()).expect("start answers JSON");
            return PathBuf::from(v["session_dir"].as_str().expect("session_dir"));
        }
        // Right after connecting, the first lever sample may not be in yet;
        // right after a stop, the last session's files may still be finishing.
        assert!(
            (err.contains("no lever sample") || err.contains("is stopping"))
                && std::time::Instant::now() < deadline,
            "start failed: {out} {err}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `rigctl stop`, asserting it succeeded.
pub fn stop_session(socket: &Path) {
    let (code, out, err) = rigctl(socket, &["stop"]);
    assert_eq!(code, 0, "stop failed: {out}{err}");
}

/// Wait (up to `secs`) until rigd reports no session running.
pub fn wait_idle(socket: &Path, secs: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let (code, out, _) = rigctl(socket, &["status", "--json"]);
        if code == 0 && out.contains("\"state\":\"idle\"") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "session did not end: {out}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
