//! `rigctl calibrate valve`: the valve calibration workflow.
//!
//! For each open time: `--pulses` openings of that length into one cup
//! (rigd's manual valve command, marked `calibration`: water for no mouse),
//! `--pause-ms` between openings; then the weight of the cup's water is asked
//! (1 mg of water = 1 µL), or all weights come from `--weights FILE` without
//! opening the valve. The fit is `rig_config::fit_calibration`: one point per
//! open time (weight / openings), linear in between, strictly increasing or
//! refused. The result is written, crash-safely (temp file, fsync, rename,
//! fsync of the folder), as the calibration file the rig's configuration
//! names (`[valve].calibration_file`, default `valve-calibration.toml` next
//! to it). `--check --target-ul X` delivers X µL per opening by the current
//! calibration and compares the weighed water.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use protocol::control::{Request, ValveRequest};
use rig_config::{CalibrationFile, Measurement, ValveSection};

use super::{Client, Failure, EXIT_REFUSED};

/// The default calibration file name, next to the configuration.
pub const DEFAULT_FILE: &str = "valve-calibration.toml";

#[derive(Debug, clap::Args)]
pub struct ValveArgs {
    /// Open times to weigh, ms, comma-separated (at least 2; spanning the
    /// rewards the rig gives).
    #[arg(long, value_delimiter = ',', default_values_t = [10.0, 20.0, 40.0, 80.0])]
    durations: Vec<f64>,
    /// Openings per open time, all into one cup (more = a more precise weight).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pulses: u32,
    /// Pause after each opening has closed, ms (the line refills, drops fall).
    #[arg(long, default_value_t = 300)]
    pause_ms: u64,
    /// Fit weights from this file instead of opening the valve: one line per
    /// open time, `OPEN_MS PULSES WEIGHT_MG` (`#` starts a comment).
    #[arg(long, value_name = "FILE", conflicts_with = "check")]
    weights: Option<PathBuf>,
    /// Where to write the calibration (default: the file [valve].calibration_file
    /// of --config/--rig names, else valve-calibration.toml next to it).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Verify instead: deliver --target-ul per opening by the current
    /// calibration, --pulses times, and compare the weighed water.
    #[arg(long, requires = "target_ul")]
    check: bool,
    /// The volume per opening to verify, µL (with --check).
    #[arg(long, value_name = "UL")]
    target_ul: Option<f64>,
    /// Largest acceptable error of a check, % of the target.
    #[arg(long, default_value_t = 5.0)]
    tolerance_pct: f64,
}

pub fn valve(
    args: &ValveArgs,
    config: Option<&Path>,
    socket: &Path,
    json: bool,
) -> Result<ExitCode, Failure> {
    let loaded = match config {
        Some(c) => Some(rig_config::load(c).map_err(|e| Failure::Usage(e.to_string()))?),
        None => None,
    };
    let cfg = loaded.as_ref().map(|l| &l.config);
    let out =
        match (&args.out, config) {
            (Some(o), _) => o.clone(),
            (None, Some(c)) => {
                let name = cfg
                    .and_then(|c| c.valve.calibration_file.clone())
                    .unwrap_or_else(|| DEFAULT_FILE.to_owned());
                rig_config::resolve_calibration_file(c, &name)
            }
            (None, None) => return Err(Failure::Usage(
                "calibrate valve: which rig? give --rig NAME or --config FILE (the calibration \
                 is written next to it), or --out FILE"
                    .into(),
            )),
        };
    let max_open_ms = cfg.map(|c| f64::from(c.safety.max_valve_open_ms));
    if args.check {
        return check(args, cfg.map(|c| &c.valve), &out, socket, json);
    }

    let measurements = match &args.weights {
        Some(file) => read_weights(file)?,
        None => {
            let durations = checked_durations(&args.durations, max_open_ms)?;
            let mut client = Client::connect(socket)?;
            let mut input = std::io::stdin().lock();
            println!(
                "valve calibration: {} open times x {} openings; put an empty, weighed cup \
                 under the spout",
                durations.len(),
                args.pulses
            );
            let mut m = Vec::new();
            for &ms in &durations {
                println!("opening the valve {} x {ms} ms ...", args.pulses);
                deliver(&mut client, ms, args.pulses, args.pause_ms)?;
                let weight_mg = ask_weight(
                    &mut input,
                    &format!(
                        "weight of the water from {} x {ms} ms, mg (then empty the cup and put it back):",
                        args.pulses
                    ),
                )?;
                m.push(Measurement {
                    open_ms: ms,
                    pulses: args.pulses,
                    weight_mg,
                });
            }
            m
        }
    };
    let points = rig_config::fit_calibration(&measurements)
        .map_err(|e| Failure::Refused(format!("calibrate valve: {e}; nothing written")))?;
    let file = CalibrationFile {
        calibrated_utc: session_format::rfc3339_utc(SystemTime::now()),
        fit: Some(
            "piecewise-linear through the weighed points (weight / openings), strictly increasing"
                .into(),
        ),
        point: points,
    };
    write_atomically(&out, file.to_toml_string().as_bytes())
        .map_err(|e| Failure::Usage(format!("cannot write {}: {e}", out.display())))?;
    if json {
        let v = serde_json::json!({"file": out, "calibration": file});
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("open_ms  openings  weight_mg  µL/opening");
    for p in &file.point {
        println!(
            "{:7.2}  {:8}  {:9.2}  {:10.4}",
            p.open_ms,
            p.pulses.unwrap_or(0),
            p.weight_mg.unwrap_or(f64::NAN),
            p.volume_ul
        );
    }
    println!("wrote {}", out.display());
    let named = cfg.and_then(|c| c.valve.calibration_file.as_deref());
    match (config, named) {
        (Some(c), Some(_)) => println!(
            "{} names it; reload rigd to use it (systemctl reload rigd@NAME, or SIGHUP)",
            c.display()
        ),
        (Some(c), None) => println!(
            "add calibration_file = \"{}\" to [valve] in {}, then reload rigd",
            out.file_name().map_or(out.display().to_string(), |n| n
                .to_string_lossy()
                .into_owned()),
            c.display()
        ),
        (None, _) => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// `--check`: deliver the target by the current calibration and weigh it.
fn check(
    args: &ValveArgs,
    configured: Option<&ValveSection>,
    file: &Path,
    socket: &Path,
    json: bool,
) -> Result<ExitCode, Failure> {
    let target = args.target_ul.unwrap_or(f64::NAN);
    // The calibration file when there is one, else the configuration's points.
    let valve = if file.exists() {
        let f = CalibrationFile::read(file).map_err(|e| Failure::Usage(e.to_string()))?;
        ValveSection {
            calibration: f.points(),
            calibrated_utc: Some(f.calibrated_utc),
            ..ValveSection::default()
        }
    } else if let Some(v) = configured {
        v.clone()
    } else {
        return Err(Failure::Usage(format!(
            "calibrate valve --check: no calibration at {} and no --config/--rig to take one from",
            file.display()
        )));
    };
    let open_ms = valve.open_ms_for_volume(target).map_err(|e| {
        Failure::Refused(format!(
            "calibrate valve --check: --target-ul {target}: {e}"
        ))
    })?;
    // The daemon times pulses in whole µs.
    let open_ms = (open_ms * 1000.0).round() / 1000.0;
    let mut client = Client::connect(socket)?;
    println!(
        "check: {} x {open_ms} ms for {target} µL each by the calibration of {}; put an empty, \
         weighed cup under the spout",
        args.pulses,
        valve.calibrated_utc.as_deref().unwrap_or("unknown date")
    );
    deliver(&mut client, open_ms, args.pulses, args.pause_ms)?;
    let weight_mg = ask_weight(
        &mut std::io::stdin().lock(),
        &format!(
            "weight of the water from {} x {open_ms} ms, mg:",
            args.pulses
        ),
    )?;
    let per_opening = weight_mg / f64::from(args.pulses);
    let error_pct = (per_opening - target) / target * 100.0;
    let pass = error_pct.abs() <= args.tolerance_pct;
    if json {
        let v = serde_json::json!({
            "target_ul": target, "open_ms": open_ms, "pulses": args.pulses,
            "weight_mg": weight_mg, "measured_ul": per_opening, "error_pct": error_pct,
            "tolerance_pct": args.tolerance_pct, "pass": pass,
        });
        println!("{v}");
    } else {
        println!(
            "{} {per_opening:.4} µL per opening for a target of {target} µL ({error_pct:+.1} %, \
             tolerance {} %){}",
            if pass { "PASS" } else { "FAIL" },
            args.tolerance_pct,
            if pass {
                ""
            } else {
                ": the valve has drifted; run rigctl calibrate valve"
            }
        );
    }
    Ok(if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_REFUSED)
    })
}

fn checked_durations(d: &[f64], max_open_ms: Option<f64>) -> Result<Vec<f64>, Failure> {
    let mut v = d.to_vec();
    v.sort_by(f64::total_cmp);
    v.dedup();
    if v.len() < 2 {
        return Err(Failure::Usage(format!(
            "--durations {d:?}: give at least 2 different open times, ms (e.g. 10,20,40,80)"
        )));
    }
    for &ms in &v {
        if !(ms.is_finite() && ms >= 1.0) {
            return Err(Failure::Usage(format!(
                "--durations: {ms} ms: an open time is at least 1 ms"
            )));
        }
        if let Some(max) = max_open_ms {
            if ms > max {
                return Err(Failure::Usage(format!(
                    "--durations: {ms} ms is longer than [safety].max_valve_open_ms = {max} ms"
                )));
            }
        }
    }
    Ok(v)
}

/// `pulses` openings of `open_ms`, each after the last has closed. A pulse
/// the device answered `Busy` (the valve still open from the last one on a
/// slow machine) opened nothing and is asked again; any other refusal ends
/// the calibration, since the cup's count would be wrong.
fn deliver(client: &mut Client, open_ms: f64, pulses: u32, pause_ms: u64) -> Result<(), Failure> {
    let quick = Duration::from_secs(10);
    for i in 0..pulses {
        let mut busy = 0;
        loop {
            let req = Request::Valve(ValveRequest {
                pulse_ms: Some(open_ms),
                flush_ms: None,
                calibration: true,
            });
            match client.call(req, quick) {
                Ok(_) => break,
                Err(Failure::Refused(m)) if m.contains("Busy") && busy < 100 => {
                    busy += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(Failure::Refused(m) | Failure::Usage(m)) => {
                    return Err(Failure::Refused(format!(
                        "calibrate valve: opening {} of {pulses} at {open_ms} ms failed: {m}; the \
                         cup holds {i} openings: nothing written, start again",
                        i + 1
                    )))
                }
            }
        }
        std::thread::sleep(
            Duration::from_secs_f64(open_ms / 1000.0) + Duration::from_millis(pause_ms),
        );
    }
    Ok(())
}

/// Ask for a weight in mg until a number > 0 comes (end of input ends the
/// calibration).
fn ask_weight(input: &mut impl BufRead, prompt: &str) -> Result<f64, Failure> {
    loop {
        println!("{prompt}");
        let _ = std::io::stdout().flush();
        let mut line = String::new();
        match input.read_line(&mut line) {
            Ok(0) | Err(_) => {
                return Err(Failure::Usage(
                    "calibrate valve: no weight given (end of input): nothing written".into(),
                ))
            }
            Ok(_) => {}
        }
        match line.trim().trim_end_matches("mg").trim().parse::<f64>() {
            Ok(w) if w.is_finite() && w > 0.0 => return Ok(w),
            _ => eprintln!(
                "rigctl: {:?} is not a weight: type the water's weight in mg, e.g. 123.4",
                line.trim()
            ),
        }
    }
}

fn read_weights(file: &Path) -> Result<Vec<Measurement>, Failure> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Failure::Usage(format!("--weights {}: {e}", file.display())))?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let parsed = match f.as_slice() {
            [ms, n, w] => match (ms.parse::<f64>(), n.parse::<u32>(), w.parse::<f64>()) {
                (Ok(open_ms), Ok(pulses), Ok(weight_mg)) => Some(Measurement {
                    open_ms,
                    pulses,
                    weight_mg,
                }),
                _ => None,
            },
            _ => None,
        };
        match parsed {
            Some(m) => out.push(m),
            None => {
                return Err(Failure::Usage(format!(
                    "{}:{}: {line:?}: expected OPEN_MS PULSES WEIGHT_MG, e.g. `40 50 176.2`",
                    file.display(),
                    i + 1
                )))
            }
        }
    }
    Ok(out)
}

/// Write `bytes` to `path` so that a crash leaves the old file or the new
/// one, never a part: a temp file beside it, fsync, rename, fsync the folder.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map_or_else(
        || "calibration".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
