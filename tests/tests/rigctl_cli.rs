//! `rigctl`'s command line, the real binary: every command, option and
//! argument says what it is for, and the short forms a person types first
//! are accepted.

use std::process::Command;

use rig_tests::{bin, TempDir};

fn rigctl(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin("rigctl"))
        .args(args)
        .env_remove("RIGD_SOCKET")
        .output()
        .expect("run rigctl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The subcommands listed under `Commands:` in a help text.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

/// Lines of the `Arguments:` and `Options:` sections that name an item
/// but give it no description: neither on the same line (after two or more
/// spaces) nor on the next line, indented further (clap's layout when the
/// texts are long).
fn undescribed(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut bad = Vec::new();
    let mut in_items = false;
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with("Arguments:") || l.starts_with("Options:") {
            in_items = true;
            continue;
        }
        if !l.starts_with(' ') {
            in_items = false;
            continue;
        }
        let t = l.trim_start();
        if !in_items || !(t.starts_with('-') || t.starts_with('<') || t.starts_with('[')) {
            continue;
        }
        let same_line = t
            .split_once("  ")
            .is_some_and(|(_, d)| !d.trim().is_empty());
        let next_line = lines
            .get(i + 1)
            .is_some_and(|n| !n.trim().is_empty() && indent(n) > indent(l));
        if !same_line && !next_line {
            bad.push((*l).to_owned());
        }
    }
    bad
}

#[test]
fn every_command_option_and_argument_has_a_help_text() {
    let (code, top, err) = rigctl(&["-h"]);
    assert_eq!(code, Some(0), "{err}");
    let mut checked = 0;
    let mut missing = Vec::new();
    let mut queue: Vec<Vec<String>> = subcommands(&top).into_iter().map(|c| vec![c]).collect();
    assert!(queue.len() >= 6, "commands listed:\n{top}");
    while let Some(path) = queue.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("-h");
        let (code, help, err) = rigctl(&args);
        assert_eq!(code, Some(0), "rigctl {}: {err}", path.join(" "));
        for line in undescribed(&help) {
            missing.push(format!("rigctl {}: {line}", path.join(" ")));
        }
        for sub in subcommands(&help) {
            let mut p = path.clone();
            p.push(sub);
            queue.push(p);
        }
        checked += 1;
    }
    assert!(checked >= 8, "{checked} help texts");
    assert!(missing.is_empty(), "no help text:\n{}", missing.join("\n"));
}

#[test]
fn the_short_forms_parse() {
    // No daemon here: each form must get as far as connecting (exit 2 with
    // a connection message), not stop at a usage error.
    let dir = TempDir::new("rigctl-cli");
    let socket = dir.path().join("none.sock");
    let socket = socket.to_str().expect("utf-8");
    for args in [
        vec!["valve", "pulse", "40"],
        vec!["valve", "pulse", "--ms", "40"],
        vec!["valve", "flush", "2000"],
        vec!["tone"],
        vec!["tone", "--test"],
        vec!["stop"],
    ] {
        let mut full = vec!["--socket", socket];
        full.extend(&args);
        let (code, _, err) = rigctl(&full);
        assert_eq!(code, Some(2), "rigctl {args:?}: {err}");
        assert!(
            !err.contains("Usage:") && err.contains(socket),
            "rigctl {args:?} is a usage the parser accepts: {err}"
        );
    }
    // A pulse length given twice, or none, is a usage error that says so.
    for args in [
        vec!["valve", "pulse"],
        vec!["valve", "pulse", "40", "--ms", "40"],
    ] {
        let mut full = vec!["--socket", socket];
        full.extend(&args);
        let (code, _, err) = rigctl(&full);
        assert_eq!(code, Some(2), "rigctl {args:?}: {err}");
        assert!(err.contains("Usage:"), "rigctl {args:?}: {err}");
    }
}
