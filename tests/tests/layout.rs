//! The workspace's layout rules, checked on the source: no two files of a
//! crate import each other (directly or in a circle), and the daemon's thread
//! modules depend on the session layer, never on each other
//! (`docs/ARCHITECTURE.md`). The checker is `scripts/import_cycles.py`.

use std::path::Path;
use std::process::Command;

fn check(args: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::env::var("RIG_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(root.join("scripts/import_cycles.py"))
        .args(args)
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (install Python 3): {e}"));
    assert!(
        out.status.success(),
        "import_cycles.py {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn no_crate_has_an_import_cycle_between_its_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let members = manifest
        .split("members = [")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .expect("workspace members");
    let crates: Vec<&str> = members
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
        .collect();
    assert!(crates.len() >= 5, "{crates:?}");
    for c in crates {
        check(&[c]);
    }
}

#[test]
fn the_daemons_thread_modules_meet_only_in_the_session_layer() {
    check(&[
        "daemon",
        "--layer",
        "session:rig,storage_thread,imaging,supervisor,control,preview",
        "--layer",
        "rig:storage_thread,imaging,supervisor,control",
        "--layer",
        "storage_thread:rig,imaging,supervisor,control,preview",
        "--layer",
        "imaging:rig,storage_thread,supervisor,control",
    ]);
}
