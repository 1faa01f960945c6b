//! The README's "Rehearse without hardware" block, run as written: the
//! shell block is taken from README.md and run with bash from the checkout,
//! with `$HOME` in a temp folder and this build's binaries first on `PATH`
//! (the only change: `target/release` becomes the test build's folder).

use std::process::Command;
use std::time::{Duration, Instant};

use rig_tests::{bin, workspace_root, TempDir};

fn rehearsal_block() -> String {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README");
    let section = readme
        .split("## Rehearse without hardware")
        .nth(1)
        .expect("README has a \"Rehearse without hardware\" section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("the section has a sh block");
    block.to_owned()
}

#[test]
fn the_readme_rehearsal_runs_as_written() {
    let block = rehearsal_block();
    let bin_dir = bin("rigd").parent().expect("bin dir").to_path_buf();
    assert!(
        block.contains("$PWD/target/release"),
        "the block no longer puts target/release on PATH:\n{block}"
    );
    let script = block.replace("$PWD/target/release", &bin_dir.display().to_string());
    let home = TempDir::new("readme-home");
    let started = Instant::now();
    let mut child = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(&script)
        .current_dir(workspace_root())
        .env("HOME", home.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run bash");
    // The block ends by itself (a 20 s session); a hang is a failure.
    let deadline = Duration::from_secs(240);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            panic!("the rehearsal block did not finish in {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log =
        std::fs::read_to_string(home.path().join("rig-rehearsal/rigd.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "the block failed ({}):\n{stdout}\n{stderr}\nrigd log:\n{log}",
        out.status
    );
    // stderr went to a file: plain text, no terminal colour codes.
    assert!(log.contains("INFO"), "rigd logged to {log:?}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
    // It recorded a session, and stop printed its summary.
    let mouse = home.path().join("rig-rehearsal/data/M1");
    let sessions: Vec<_> = std::fs::read_dir(&mouse)
        .expect("M1's folder")
        .flatten()
        .collect();
    assert_eq!(sessions.len(), 1, "{stdout}");
    let toml = std::fs::read_to_string(sessions[0].path().join("session.toml")).expect("toml");
    assert!(toml.contains("state = \"complete\""), "{toml}");
    assert!(
        stdout.contains("trials"),
        "stop prints the summary:\n{stdout}"
    );
    // The simulator and rigd took their shared memory with them.
    assert!(
        !std::path::Path::new("/dev/shm/rig-rehearsal").exists(),
        "the frame ring /dev/shm/rig-rehearsal was left behind"
    );
}
