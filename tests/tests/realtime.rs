//! The latency settings (`[realtime]`) with the real binaries: during a
//! session rigd holds the CPUs awake (the kernel's PM QoS reads 0 µs), has
//! raised the kernel's unbound workers to `SCHED_FIFO` 1 and has locked its
//! memory, and `session.toml` records it; after the stop the CPUs and the
//! workers are given back. With the settings off, none of it happens and
//! the record says so.
//!
//! This binary holds one test on purpose: test binaries run one after the
//! other, so no other rigd is holding the same system-wide settings when it
//! checks that they were given back. Needs root (CI sets
//! `RIG_REQUIRE_ROOT=1`; elsewhere it is skipped without root).

use std::path::{Path, PathBuf};

use rig_tests::{start_session, stop_session, wait_connected, Rigd, Sim, TempDir};

fn root() -> bool {
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if uid == "0" {
        return true;
    }
    assert!(
        std::env::var_os("RIG_REQUIRE_ROOT").is_none(),
        "RIG_REQUIRE_ROOT is set but the tests do not run as root"
    );
    eprintln!("skipped: the latency settings need root");
    false
}

/// The kernel's current PM QoS CPU latency limit, µs.
fn cpu_latency_us() -> i32 {
    let b = std::fs::read("/dev/cpu_dma_latency").expect("read /dev/cpu_dma_latency");
    i32::from_ne_bytes(b[..4].try_into().expect("4 bytes"))
}

/// Processes holding `/dev/cpu_dma_latency` open (a PM QoS request).
fn qos_holders() -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let pid = e.file_name();
        let Some(pid) = pid.to_str().filter(|s| s.parse::<u32>().is_ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        if fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l == Path::new("/dev/cpu_dma_latency"))
        }) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            out.push(format!("{pid} {}", comm.trim()));
        }
    }
    out
}

/// The settings are system-wide: another rigd session on this machine (a
/// second test run, a rig) holds them too. Wait up to 2 minutes for them to
/// be free, then fail naming who holds them.
fn wait_until_nobody_holds_the_settings() {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while (cpu_latency_us() == 0 || !raised_workers().is_empty())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(
        cpu_latency_us() != 0 && raised_workers().is_empty(),
        "another process holds the latency settings this test checks (PM QoS {} µs, held          by {:?}; workers at SCHED_FIFO 1: {:?}): stop other rigd sessions and run it again",
        cpu_latency_us(),
        qos_holders(),
        raised_workers()
    );
}

/// Pids of the kernel's unbound workers at SCHED_FIFO (policy 1) priority 1.
fn raised_workers() -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with("kworker/u") {
            continue;
        }
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // proc(5) fields 40 (rt_priority) and 41 (policy), counted from 3.
        if f.get(37) == Some(&"1") && f.get(38) == Some(&"1") {
            out.push(pid);
        }
    }
    out
}

fn realtime_table(session: &Path) -> toml::Table {
    let text = std::fs::read_to_string(session.join("session.toml")).expect("session.toml");
    let doc: toml::Table = text.parse().expect("session.toml parses");
    doc.get("realtime")
        .and_then(|v| v.as_table())
        .cloned()
        .unwrap_or_else(|| panic!("no [realtime] table in\n{text}"))
}

fn config(dir: &Path, link: &Path, realtime: &str) -> (PathBuf, PathBuf) {
    let socket = dir.join("rigd.sock");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("data root");
    let config = dir.join("rig.toml");
    std::fs::write(
        &config,
        format!(
            "[rig]\nserial_port = {:?}\n\n[storage]\ndata_root = {:?}\n\n[control]\nsocket = {:?}\n\n\
             [preview]\nenabled = false\n\n[imaging]\nenabled = false\n\n[realtime]\n{realtime}\n",
            link.display().to_string(),
            data.display().to_string(),
            socket.display().to_string()
        ),
    )
    .expect("config");
    (config, socket)
}

#[test]
fn a_session_holds_the_latency_settings_and_gives_them_back() {
    if !root() {
        return;
    }
    wait_until_nobody_holds_the_settings();
    let before_qos = cpu_latency_us();
    let before_workers = raised_workers();
    assert!(
        before_workers.is_empty(),
        "unbound workers already at SCHED_FIFO 1 before any session: {before_workers:?}"
    );

    // Defaults, and the worker boost (off by default) on.
    let dir = TempDir::new("realtime-on");
    let sim = Sim::start(dir.path(), &["--speed", "1", "--day", "14"]);
    let (cfg, socket) = config(dir.path(), &sim.link, "boost_tty_workers = true\n");
    let rigd = Rigd::start(&cfg, &socket);
    wait_connected(&socket);
    assert_ne!(
        cpu_latency_us(),
        0,
        "the CPUs are only held during a session"
    );
    let session = start_session(&socket, "RT1");
    let during_qos = cpu_latency_us();
    let during_workers = raised_workers();
    let rt = realtime_table(&session);
    eprintln!(
        "[realtime] = {rt:?}; QoS {before_qos} -> {during_qos} µs; workers {during_workers:?}"
    );
    assert_eq!(during_qos, 0, "PM QoS held at 0 µs during the session");
    assert!(
        !during_workers.is_empty(),
        "workers raised during the session"
    );
    assert_eq!(rt["reader"].as_str(), Some("SCHED_FIFO 50"));
    assert_eq!(rt["memory_locked"].as_bool(), Some(true));
    assert_eq!(rt["cpus_held_awake"].as_bool(), Some(true));
    let recorded = rt["tty_workers_raised"].as_integer().expect("integer");
    assert!(recorded > 0, "{rt:?}");
    assert!(rt.get("not_granted").is_none(), "{rt:?}");
    assert!(rt["kernel_preemption"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    // rigd's memory is locked: VmLck covers its resident set.
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", rigd.child.id())).expect("status");
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    assert!(kb("VmLck:") > 1024, "VmLck {} kB", kb("VmLck:"));
    stop_session(&socket);
    assert_eq!(
        cpu_latency_us(),
        before_qos,
        "the PM QoS request ended with the session"
    );
    assert!(
        raised_workers().is_empty(),
        "workers given back at the stop: {:?}",
        raised_workers()
    );
    drop(rigd);
    drop(sim);

    // Everything off: nothing held, and the record says so.
    wait_until_nobody_holds_the_settings();
    let dir = TempDir::new("realtime-off");
    let sim = Sim::start(dir.path(), &["--speed", "1", "--day", "14"]);
    let (cfg, socket) = config(
        dir.path(),
        &sim.link,
        "reader_priority = 0\nlock_memory = false\nhold_cpus_awake = false\nboost_tty_workers = false\n",
    );
    let rigd = Rigd::start(&cfg, &socket);
    wait_connected(&socket);
    let session = start_session(&socket, "RT2");
    assert_ne!(cpu_latency_us(), 0);
    assert!(raised_workers().is_empty());
    let rt = realtime_table(&session);
    assert_eq!(rt["reader"].as_str(), Some("SCHED_OTHER"));
    assert_eq!(rt["memory_locked"].as_bool(), Some(false));
    assert_eq!(rt["cpus_held_awake"].as_bool(), Some(false));
    assert_eq!(rt["tty_workers_raised"].as_integer(), Some(0));
    stop_session(&socket);
    drop(rigd);
    drop(sim);
}
