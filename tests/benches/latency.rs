//! Control latency, end to end through the pty, for every rewarded trial,
//! in both reward modes (`task.reward_decision`):
//!
//! * `host`: from the device time of the lever sample that crossed the
//!   threshold to the device time at which the virtual rig received the
//!   valve command (its ValveOpen event): the host's decision and the link.
//! * `device`: the device decides at the sample; from the crossing sample's
//!   device time to the device time at which the virtual rig actually
//!   executed that sample and opened the valve (`RewardFired`'s
//!   `t_valve_us - t_cross_us`): the simulator's own scheduling lag, the
//!   only delay left (the firmware's, encoder edge -> valve pin, is measured
//!   in simavr: `firmware/build.sh avr-sim`).
//!
//! Real `rigd`, real `rig-sim` at real-time speed, real pty. Runs: the
//! machine idle, and under load (a parallel disk writer doing fsync'd writes
//! and one CPU hog per core), each mode in turn.
//!
//! Run: `cargo bench -p rig-tests --bench latency [-- --minutes M] [--pin]
//! [--precise-us N] [--load both|cpu|disk] [--no-idle] [--realtime "K = V"]
//! [--mode host|device|both]` (`--mode` default both).
//! `--pin` gives the virtual rig the last CPU and rigd the others;
//! `--precise-us N` makes the virtual rig spin the last N µs before each
//! sample (default 0: it sleeps, woken on time because rigd holds the CPUs
//! awake during the session); `--load` picks the load (default both: a CPU
//! hog per core and an fsync'd disk writer); `--no-idle` skips the idle run;
//! `--realtime` adds a `[realtime]` key to rigd's config (repeatable), to
//! measure what each setting is worth.
//! Target: p99 <= 250 µs on the 2-core CI machine.

use std::process::{Child, Command};
use std::time::Duration;

use rig_tests::{read_tsv, start_session, stop_session, wait_connected, Rigd, Sim, TempDir};

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Pin a process and all its threads (present and future) to CPUs.
fn pin(pid: u32, cpus: &str) {
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "taskset -a -p -c {cpus} {pid} failed");
}

/// One session of `minutes` real-time minutes; returns the latencies in µs.
/// With `pinned`, the virtual rig gets the last CPU to itself and rigd the
/// others (the rig's microcontroller is its own hardware: in the simulation
/// its spinning must not preempt rigd's reader on a shared core).
fn run_session(
    minutes: f64,
    name: &str,
    pinned: bool,
    precise_us: &str,
    realtime: &str,
    mode: &str,
) -> Vec<f64> {
    let dir = TempDir::new(name);
    // The virtual rig sleeps until each sample is due; rigd holds the CPUs
    // awake during the session ([realtime].hold_cpus_awake), so it wakes on
    // time. `--precise-us N` makes it spin the last N µs instead, as the
    // bench did before: that costs a CPU the kernel's tty workers need.
    let sim = Sim::start(
        dir.path(),
        &[
            "--speed",
            "1",
            "--day",
            "14",
            "--frame-rate-hz",
            "28.7",
            "--precise-us",
            precise_us,
        ],
    );
    let socket = dir.path().join("rigd.sock");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data root");
    let config = dir.path().join("rig.toml");
    std::fs::write(
        &config,
        format!(
            "[rig]\nserial_port = {:?}\n\n[task]\nreward_decision = {mode:?}\niti_min_ms = 500\niti_max_ms = 1000\nresponse_window_ms = 3000\nmiss_timeout_ms = 0\n\n\
             [storage]\ndata_root = {:?}\n\n[control]\nsocket = {:?}\n\n[preview]\nenabled = false\n\n[imaging]\nenabled = false\n\n\
             [safety]\nmax_water_per_session_ul = 100000.0\nmax_water_per_day_ul = 100000.0\n\n\
             [realtime]\n{realtime}\n",
            sim.link.display().to_string(),
            data.display().to_string(),
            socket.display().to_string()
        ),
    )
    .expect("config");
    let rigd = Rigd::start(&config, &socket);
    if pinned {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let last = cpus - 1;
        pin(sim.child.id(), &last.to_string());
        pin(rigd.child.id(), &format!("0-{}", last.saturating_sub(1)));
    }
    wait_connected(&socket);
    let session = start_session(&socket, "LAT");
    std::thread::sleep(Duration::from_secs_f64(minutes * 60.0));
    stop_session(&socket);
    drop(rigd);
    drop(sim);

    // What the session ran with (session.toml's [realtime] table).
    let meta = std::fs::read_to_string(session.join("session.toml")).unwrap_or_default();
    if let Some(start) = meta.find("[realtime]") {
        let table: String = meta[start..]
            .lines()
            .skip(1)
            .take_while(|l| !l.starts_with('['))
            .filter(|l| !l.trim().is_empty())
            .map(|l| format!("  {l}\n"))
            .collect();
        println!("{name}: session.toml [realtime]:\n{table}");
    }
    let trials = read_tsv(&session.join("trials.tsv"));
    let events = read_tsv(&session.join("events.tsv"));
    if mode == "device" {
        // The device's own report: crossing sample -> valve open.
        let field = |d: &str, k: &str| -> Option<f64> {
            d.split_whitespace()
                .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
        };
        let mut lat: Vec<f64> = events
            .iter()
            .filter(|e| e["source"] == "device" && e["kind"] == "reward_fired")
            .filter_map(|e| {
                Some(field(&e["detail"], "t_valve_us")? - field(&e["detail"], "t_cross_us")?)
            })
            .collect();
        let rewarded = trials.iter().filter(|t| t["outcome"] == "rewarded").count();
        let mismatches = events
            .iter()
            .filter(|e| e["kind"] == "decision_mismatch")
            .count();
        println!(
            "{name}: {rewarded} rewarded trials, {} device firings, {mismatches} decision mismatches",
            lat.len()
        );
        lat.sort_by(f64::total_cmp);
        return lat;
    }
    // Pair each rewarded trial's response sample with the device's valve opening.
    let mut opens: Vec<f64> = events
        .iter()
        .filter(|e| e["source"] == "device" && e["kind"] == "valve_open")
        .filter_map(|e| e["t_s"].parse::<f64>().ok())
        .collect();
    opens.sort_by(f64::total_cmp);
    let mut lat = Vec::new();
    for t in trials.iter().filter(|t| t["outcome"] == "rewarded") {
        let Ok(resp) = t["t_response_s"].parse::<f64>() else {
            continue;
        };
        if let Some(open) = opens.iter().find(|&&o| o >= resp) {
            let us = (open - resp) * 1e6;
            if us < 1e6 {
                lat.push(us);
            }
        }
    }
    lat.sort_by(f64::total_cmp);
    lat
}

/// Which load to run beside the daemon: `both` (the definition),
/// or `cpu` / `disk` alone to tell their effects apart.
fn load(kind: &str) -> Vec<Child> {
    let mut hogs = Vec::new();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let cpu = kind != "disk";
    let disk_writer = kind != "cpu";
    for _ in 0..cores {
        if !cpu {
            break;
        }
        hogs.push(
            Command::new("sh")
                .arg("-c")
                .arg("while :; do :; done")
                .spawn()
                .expect("cpu hog"),
        );
    }
    let disk = std::env::temp_dir().join(format!("rig-latency-disk-{}", std::process::id()));
    if !disk_writer {
        return hogs;
    }
    hogs.push(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while :; do dd if=/dev/zero of={} bs=1M count=64 conv=fsync status=none; done",
                disk.display()
            ))
            .spawn()
            .expect("disk writer"),
    );
    hogs
}

fn report(name: &str, lat: &[f64]) {
    println!(
        "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
        lat.len(),
        pct(lat, 0.0),
        pct(lat, 0.5),
        pct(lat, 0.99),
        pct(lat, 1.0)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let minutes = args
        .iter()
        .position(|a| a == "--minutes")
        .and_then(|i| args.get(i + 1))
        .and_then(|m| m.parse().ok())
        .unwrap_or(3.0);
    let pinned = args.iter().any(|a| a == "--pin");
    // `--realtime "boost_tty_workers = false"` (repeatable): [realtime] keys
    // for rigd, to measure what each setting is worth.
    let realtime: String = args
        .iter()
        .enumerate()
        .filter(|(_, a)| *a == "--realtime")
        .filter_map(|(i, _)| args.get(i + 1))
        .map(|kv| format!("{kv}\n"))
        .collect();
    let precise_us = args
        .iter()
        .position(|a| a == "--precise-us")
        .and_then(|i| args.get(i + 1))
        .map_or("0", String::as_str);
    println!("control latency: threshold-crossing sample -> valve open at the device, µs (device clock), 1 kHz lever, {minutes} min per run (host mode: the valve command received; device mode: the sample executed and the valve opened)");
    println!("| condition | rewarded trials | min | p50 | p99 | max |");
    println!("|---|---|---|---|---|---|");
    if pinned {
        println!("(virtual rig pinned to the last CPU, rigd to the others)");
    }
    let modes: &[&str] = match args
        .iter()
        .position(|a| a == "--mode")
        .and_then(|i| args.get(i + 1))
        .map_or("both", String::as_str)
    {
        "host" => &["host"],
        "device" => &["device"],
        "both" => &["host", "device"],
        other => panic!("--mode takes host, device or both, not {other}"),
    };
    if !args.iter().any(|a| a == "--no-idle") {
        for mode in modes {
            let idle = run_session(
                minutes,
                &format!("lat-idle-{mode}"),
                pinned,
                precise_us,
                &realtime,
                mode,
            );
            report(&format!("{mode}: idle"), &idle);
        }
    }
    let load_kind = args
        .iter()
        .position(|a| a == "--load")
        .and_then(|i| args.get(i + 1))
        .map_or("both", String::as_str);
    assert!(
        ["both", "cpu", "disk"].contains(&load_kind),
        "--load takes both, cpu or disk"
    );
    let mut hogs = load(load_kind);
    let mut rows = Vec::new();
    for mode in modes {
        let loaded = run_session(
            minutes,
            &format!("lat-load-{mode}"),
            pinned,
            precise_us,
            &realtime,
            mode,
        );
        rows.push((*mode, loaded));
    }
    for h in &mut hogs {
        let _ = h.kill();
        let _ = h.wait();
    }
    let _ = std::fs::remove_file(
        std::env::temp_dir().join(format!("rig-latency-disk-{}", std::process::id())),
    );
    let what = match load_kind {
        "cpu" => "load: CPU hog per core",
        "disk" => "load: fsync'd disk writer",
        _ => "load: CPU hog per core + fsync'd disk writer",
    };
    for (mode, lat) in rows {
        report(&format!("{mode}: {what}"), &lat);
    }
}
