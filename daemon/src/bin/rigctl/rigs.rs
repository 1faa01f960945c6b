//! Many rigs on one PC: one configuration per rig in a folder
//! (`/etc/rigd/rigs/NAME.toml`, the layout of `rigd@NAME.service`).
//! `--rig NAME` reads NAME.toml for the socket; `status --all` asks every rig.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use protocol::control::Request;
use serde_json::{json, Value};

use super::{Client, Failure, EXIT_USAGE};

/// Where the per-rig configurations are when nothing else says.
pub const DEFAULT_RIGS_DIR: &str = "/etc/rigd/rigs";

/// `--rigs-dir`, else `$RIGD_RIGS_DIR`, else [`DEFAULT_RIGS_DIR`].
pub fn rigs_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(d) = flag {
        return d.to_path_buf();
    }
    std::env::var_os("RIGD_RIGS_DIR").map_or_else(|| PathBuf::from(DEFAULT_RIGS_DIR), PathBuf::from)
}

/// The configuration file of rig `name` in `dir`.
pub fn config_of(dir: &Path, name: &str) -> Result<PathBuf, Failure> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return Err(Failure::Usage(format!(
            "--rig {name:?}: a rig name is 1 to 64 of A-Z a-z 0-9 _ - (its file is NAME.toml in {})",
            dir.display()
        )));
    }
    let path = dir.join(format!("{name}.toml"));
    if !path.is_file() {
        let known = rig_names(dir).unwrap_or_default();
        return Err(Failure::Usage(format!(
            "--rig {name}: no {} (rigs in {}: {}); set --rigs-dir or RIGD_RIGS_DIR",
            path.display(),
            dir.display(),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        )));
    }
    Ok(path)
}

/// The rig names in `dir` (its `*.toml` files), sorted.
pub fn rig_names(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "toml" && p.is_file())
                .then(|| p.file_stem()?.to_str().map(str::to_owned))
                .flatten()
        })
        .collect();
    names.sort();
    Ok(names)
}

/// `rigctl status --all`: one line per rig (or a JSON array). Exit 0 when
/// every rig answered, 2 when one did not (its line says why).
pub fn status_all(dir: &Path, json_out: bool) -> Result<ExitCode, Failure> {
    let names = rig_names(dir)
        .map_err(|e| Failure::Usage(format!("cannot list the rigs in {}: {e}", dir.display())))?;
    if names.is_empty() {
        return Err(Failure::Usage(format!(
            "no rig configurations (NAME.toml) in {}; set --rigs-dir or RIGD_RIGS_DIR",
            dir.display()
        )));
    }
    let mut all = Vec::new();
    let mut unreachable = 0;
    for name in &names {
        let answer = ask(&dir.join(format!("{name}.toml")));
        let row = match answer {
            Ok(v) => json!({"rig": name, "ok": true, "status": v}),
            Err(why) => {
                unreachable += 1;
                json!({"rig": name, "ok": false, "error": why})
            }
        };
        if !json_out {
            print_row(&row);
        }
        all.push(row);
    }
    if json_out {
        println!("{}", Value::Array(all));
    }
    Ok(if unreachable == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_USAGE)
    })
}

fn ask(config: &Path) -> Result<Value, String> {
    let loaded = rig_config::load(config).map_err(|e| e.to_string())?;
    let socket = PathBuf::from(&loaded.config.control.socket);
    let mut client = Client::connect(&socket).map_err(|f| match f {
        Failure::Usage(m) | Failure::Refused(m) => m,
    })?;
    client
        .call(Request::Status {}, Duration::from_secs(5))
        .map_err(|f| match f {
            Failure::Usage(m) | Failure::Refused(m) => m,
        })
}

fn print_row(row: &Value) {
    let name = row["rig"].as_str().unwrap_or("?");
    if row["ok"] != true {
        println!(
            "{name:<16} UNREACHABLE  {}",
            row["error"].as_str().unwrap_or("?")
        );
        return;
    }
    let v = &row["status"];
    let state = v["state"].as_str().unwrap_or("?");
    let link = v["link"].as_str().unwrap_or("-");
    let mut line = format!("{name:<16} {state:<9} link {link:<12}");
    if state != "idle" {
        line.push_str(&format!(
            " mouse {}  trials {}  rewards {}  water {} µL",
            v["mouse"].as_str().unwrap_or("?"),
            v["trials"],
            v["rewards"],
            v["water_ul"]
                .as_f64()
                .map_or("-".into(), |w| format!("{w:.1}"))
        ));
    }
    println!("{line}");
}
