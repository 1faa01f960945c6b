//! Rigs in a room: the templated unit `rigd@.service` (checked with
//! `systemd-analyze verify`), and two rigd instances started from one
//! config folder the way the unit starts them, each against its own
//! simulated rig, driven and watched with `rigctl --rig NAME` and
//! `rigctl status --all`.

use std::path::Path;
use std::process::Command;

use rig_tests::room::{add_rig, rigs_dir};
use rig_tests::{bin, rigctl, wait_connected, wait_idle, workspace_root, TempDir};

fn rigctl_room(root: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("rigctl"))
        .arg("--rigs-dir")
        .arg(rigs_dir(root))
        .args(args)
        .env_remove("RIGD_SOCKET")
        .output()
        .expect("run rigctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `systemd-analyze verify` on a copy of `unit` (ExecStart pointed at the
/// built rigd) named `as_name`: its exit code and the lines about the unit.
fn verify(dir: &Path, unit: &str, as_name: &str) -> (i32, Vec<String>) {
    let text = unit.replace("/usr/local/bin/rigd", &bin("rigd").display().to_string());
    let path = dir.join(as_name);
    std::fs::write(&path, text).expect("write the unit copy");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let about_it = stderr
        .lines()
        .filter(|l| l.contains(as_name))
        .map(str::to_owned)
        .collect();
    (out.status.code().unwrap_or(-1), about_it)
}

/// The units must verify cleanly. systemd-analyze is required: without it
/// this test fails, unless RIG_SKIP_SYSTEMD_ANALYZE=1 says to skip it, and
/// then it prints that the check was NOT RUN.
#[test]
fn the_units_verify_with_systemd_analyze() {
    let have = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var_os("RIG_SKIP_SYSTEMD_ANALYZE").is_some(),
            "systemd-analyze is not installed (Debian package systemd): the unit files cannot \
             be verified; install it, or set RIG_SKIP_SYSTEMD_ANALYZE=1 to skip this check"
        );
        eprintln!("NOT RUN: systemd-analyze verify (RIG_SKIP_SYSTEMD_ANALYZE=1, tool missing)");
        return;
    }
    let dir = TempDir::new("units");
    let units = workspace_root().join("packaging/systemd");
    let template = std::fs::read_to_string(units.join("rigd@.service")).expect("rigd@.service");
    let single = std::fs::read_to_string(units.join("rigd.service")).expect("rigd.service");
    for (unit, name) in [(&template, "rigd@rig1.service"), (&single, "rigd.service")] {
        let (code, lines) = verify(dir.path(), unit, name);
        assert_eq!(code, 0, "{name}: {lines:?}");
        assert!(lines.is_empty(), "systemd-analyze verify {name}: {lines:?}");
    }
    // The check sees mistakes: a misspelt value and key are reported.
    let broken = template
        .replace("Type=notify", "Type=notiffy")
        .replace("WatchdogSec=", "WatchdogSecs=");
    let (_, lines) = verify(dir.path(), &broken, "rigd@broken.service");
    assert!(
        lines.iter().any(|l| l.contains("notiffy"))
            && lines.iter().any(|l| l.contains("WatchdogSecs")),
        "{lines:?}"
    );
    // The template's layout: one config per rig, one runtime folder per rig.
    assert!(template.contains("\nExecStart=/usr/local/bin/rigd --config /etc/rigd/rigs/%i.toml\n"));
    assert!(template.contains("\nRuntimeDirectory=rigd/%i\n"));
}

#[test]
fn two_rigs_from_one_config_folder() {
    let dir = TempDir::new("room");
    let root = dir.path();
    let mut a = add_rig(root, "rigA", false, "", &["--seed", "1"]);
    let mut b = add_rig(root, "rigB", false, "", &["--seed", "2"]);
    a.start_rigd(root);
    b.start_rigd(root);
    wait_connected(&a.socket);
    wait_connected(&b.socket);

    // Every rig in the folder answers.
    let (code, out, err) = rigctl_room(root, &["status", "--all", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let rows: serde_json::Value = serde_json::from_str(out.trim()).expect("a JSON array");
    let names: Vec<&str> = rows
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["rig"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(names, ["rigA", "rigB"]);
    for r in rows.as_array().expect("array") {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["status"]["link"], "connected", "{r}");
    }

    // --rig NAME reaches that rig and no other.
    let (code, out, err) = rigctl_room(root, &["--rig", "rigA", "start", "--mouse", "MA"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = rigctl_room(root, &["--rig", "rigB", "start", "--mouse", "MB"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = rigctl_room(root, &["status", "--all"]);
    assert_eq!(code, 0, "{out}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no line for {name}: {out}"))
            .to_owned()
    };
    assert!(
        line("rigA").contains("running") && line("rigA").contains("mouse MA"),
        "{out}"
    );
    assert!(
        line("rigB").contains("running") && line("rigB").contains("mouse MB"),
        "{out}"
    );
    for rig in [&a, &b] {
        let (code, out, err) = rigctl_room(root, &["--rig", &rig.name, "stop"]);
        assert_eq!(code, 0, "{out}{err}");
        wait_idle(&rig.socket, 60);
    }
    // Each rig's sessions went to its own data root.
    assert!(a.data.join("MA").is_dir() && !a.data.join("MB").exists());
    assert!(b.data.join("MB").is_dir() && !b.data.join("MA").exists());

    // A rig that is down is named as such, and the exit code says so.
    drop(b.rigd.take());
    let (code, out, _) = rigctl_room(root, &["status", "--all"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("rigB") && l.contains("UNREACHABLE")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("rigA") && l.contains("idle")),
        "{out}"
    );
    // An unknown rig is a clear usage error listing the known ones.
    let (code, _, err) = rigctl_room(root, &["--rig", "rigC", "status"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("rigC.toml") && err.contains("rigA, rigB"),
        "{err}"
    );
    let _ = rigctl(&a.socket, &["status"]);
}
