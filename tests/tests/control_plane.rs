//! The control plane under careless or hostile local clients: floods of idle
//! preview connections and control clients that never read, and many
//! clients sending start / stop / status / valve / tone / subscribe in random
//! order. Real `rigd` (with the open-file limit a login shell gives), real
//! `rigctl`, real `rig-sim` over a pty; the device's own log of valve
//! openings is the ground truth.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rig_tests::{
    rigctl, session_value, valve_openings, valve_rewards, wait_connected, wait_idle, Rigd, Sim,
    TempDir,
};

struct Rig {
    dir: TempDir,
    sim: Option<Sim>,
    socket: PathBuf,
    config: PathBuf,
    truth: PathBuf,
    data: PathBuf,
}

/// A virtual rig at `speed` and a config for rigd pointing at it, with the
/// preview on `preview_port` (or off).
fn rig(name: &str, speed: f64, preview_port: Option<u16>) -> Rig {
    let dir = TempDir::new(name);
    let truth = dir.path().join("truth.tsv");
    let speed_s = speed.to_string();
    let sim = Sim::start(
        dir.path(),
        &[
            "--speed",
            &speed_s,
            "--truth",
            truth.to_str().expect("utf-8 path"),
            "--day",
            "14",
        ],
    );
    let socket = dir.path().join("rigd.sock");
    let data = dir.path().join("data");
    let timeout_ms = (200.0 * speed).max(500.0) as u32;
    let preview = match preview_port {
        Some(p) => format!("[preview]\nenabled = true\nbind = \"127.0.0.1\"\nport = {p}\n"),
        None => "[preview]\nenabled = false\n".to_owned(),
    };
    let config = dir.path().join("rig.toml");
    let text = format!(
        "[rig]\nserial_port = {:?}\n\n[storage]\ndata_root = {:?}\nfsync_interval_ms = 100\n\n\
         [control]\nsocket = {:?}\n\n{preview}\n[imaging]\nenabled = false\n\n\
         [safety]\nheartbeat_interval_ms = 20\nheartbeat_timeout_ms = {timeout_ms}\n",
        sim.link.display().to_string(),
        data.display().to_string(),
        socket.display().to_string(),
    );
    std::fs::write(&config, text).expect("write config");
    std::fs::create_dir_all(&data).expect("create the data root");
    Rig {
        dir,
        sim: Some(sim),
        socket,
        config,
        truth,
        data,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `GET path` on a fresh connection; the body if the answer is 200.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// A value of `/metrics` (the first series whose name and labels start with
/// `series`).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{series} not in /metrics:\n{text}"))
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// This test process opens more than two thousand sockets.
fn raise_own_fd_limit(need: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        hard >= need,
        "this test opens {need} sockets, but the hard open-file limit is {hard}: \
         raise it (ulimit -Hn {need}, or LimitNOFILE for a CI service)"
    );
    if soft < need {
        setrlimit(Resource::RLIMIT_NOFILE, need, hard).expect("setrlimit");
    }
}

/// Retry `f` for up to `secs`; the first `Some`.
fn eventually<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn idle_preview_floods_and_unread_control_clients_leave_the_session_whole() {
    raise_own_fd_limit(4096);
    let port = free_port();
    let rig = rig("flood", 1.0, Some(port));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // The usual soft limit of a login shell, which rigd cannot raise here:
    // before the connection caps, ~1000 idle preview connections ended the
    // session with "Too many open files".
    let rigd = Rigd::start_with_fd_limit(&rig.config, &rig.socket, 1024, 1024);
    wait_connected(&rig.socket);
    let dir = rig_tests::start_session(&rig.socket, "F1");
    let pid = rigd.pid();
    let rss_before = rss_kib(pid);

    // 2,000 idle connections to the preview: connected, nothing sent.
    let mut idle = Vec::new();
    let mut connect_failed = 0;
    for _ in 0..2000 {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => idle.push(s),
            Err(_) => connect_failed += 1,
        }
    }
    // 200 control clients that pipeline requests with 60 kB ids and never
    // read an answer.
    let id = "x".repeat(60_000);
    let request = format!("{{\"cmd\":\"status\",\"id\":\"{id}\"}}\n");
    let mut unread = Vec::new();
    let mut control_bytes = 0usize;
    for _ in 0..200 {
        let Ok(mut s) = UnixStream::connect(&rig.socket) else {
            continue;
        };
        s.set_nonblocking(true).expect("nonblocking");
        let mut sent = 0usize;
        'fill: while sent < 4 << 20 {
            let mut rest = request.as_bytes();
            while !rest.is_empty() {
                match s.write(rest) {
                    Ok(n) => {
                        sent += n;
                        rest = &rest[n..];
                    }
                    // Full (rigd stopped reading it) or closed (refused).
                    Err(_) => break 'fill,
                }
            }
        }
        control_bytes += sent;
        unread.push(s);
    }

    // Meanwhile the experimenter is still served, on both servers.
    let status = eventually(30, || {
        let (code, out, _) = rigctl(&rig.socket, &["status", "--json"]);
        (code == 0).then_some(out)
    })
    .expect("rigctl status answered during the flood");
    assert!(status.contains("\"state\":\"running\""), "{status}");
    let metrics = eventually(30, || http_get(addr, "/metrics"))
        .expect("the preview served a new client during the flood");
    let rss = rss_kib(pid);
    let fds = open_fds(pid);
    eprintln!(
        "flood: {} preview connections held ({connect_failed} failed to connect), {} control \
         clients sent {:.1} MB unread; rigd RSS {:.1} MB (before {:.1} MB), {fds} open fds",
        idle.len(),
        unread.len(),
        control_bytes as f64 / 1e6,
        rss as f64 / 1024.0,
        rss_before as f64 / 1024.0
    );
    assert!(rss < 100 * 1024, "rigd RSS {rss} KiB during the flood");
    // The caps: 128 preview + 64 control connections, plus the session's own.
    assert!(fds < 192 + 128, "rigd holds {fds} descriptors");
    assert!(
        metric(
            &metrics,
            "rigd_connections_closed_total{server=\"preview\",why=\"refused\"}"
        ) + metric(
            &metrics,
            "rigd_connections_closed_total{server=\"preview\",why=\"evicted\"}"
        ) > 0.0,
        "the preview flood was over the cap"
    );

    // The session keeps running through the flood.
    std::thread::sleep(Duration::from_secs(3));
    drop(idle);
    drop(unread);
    let (code, out, err) = rigctl(&rig.socket, &["stop"]);
    assert_eq!(code, 0, "stop: {out}{err}");
    wait_idle(&rig.socket, 60);
    assert_eq!(session_value(&dir, "state"), "complete");
    let after = eventually(30, || http_get(addr, "/metrics")).expect("metrics after");
    assert_eq!(metric(&after, "rigd_lever_samples_lost_total"), 0.0);
    assert_eq!(metric(&after, "rigd_storage_dropped_total"), 0.0);
    assert_eq!(metric(&after, "rigd_subscriber_events_dropped_total"), 0.0);
    let rss_after = rss_kib(pid);
    eprintln!(
        "after the flood: rigd RSS {:.1} MB",
        rss_after as f64 / 1024.0
    );
    assert!(rss_after < 100 * 1024, "rigd RSS {rss_after} KiB after");
    // Every lever row of the session is on disk and in order.
    let lever = session_format::read_npy(&dir.join("lever.npy")).expect("lever.npy");
    assert!(lever.shape[0] > 100, "{:?}", lever.shape);
    drop(rigd);
    drop(rig.dir);
}

#[test]
fn rigd_raises_its_own_open_file_limit() {
    let rig = rig("nofile", 1.0, None);
    let rigd = Rigd::start_with_fd_limit(&rig.config, &rig.socket, 512, 4096);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", rigd.pid())).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums, ["4096", "4096"], "{line}");
}

/// A small deterministic generator (splitmix64) for the clients' choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Default)]
struct Ledger {
    /// Manual valve pulses the daemon said it sent.
    pulses: usize,
    sessions: Vec<PathBuf>,
    ops: usize,
}

/// One client's random requests.
fn client(socket: &Path, seed: u64, ops: usize, ledger: &Mutex<Ledger>) {
    let mut rng = Rng(seed);
    for n in 0..ops {
        let op = rng.below(100);
        let what;
        let (code, out, err) = match op {
            0..=24 => {
                what = "status";
                rigctl(socket, &["status", "--json"])
            }
            25..=44 => {
                what = "start";
                let mouse = format!("S{seed}x{n}");
                rigctl(socket, &["start", "--mouse", &mouse, "--json"])
            }
            45..=62 => {
                what = "stop";
                rigctl(socket, &["stop"])
            }
            63..=77 => {
                what = "valve";
                rigctl(socket, &["valve", "pulse", "--ms", "5"])
            }
            78..=84 => {
                what = "tone";
                rigctl(socket, &["tone"])
            }
            85..=94 => {
                what = "subscribe";
                let mut s = UnixStream::connect(socket).expect("connect");
                s.write_all(b"{\"cmd\":\"subscribe\",\"id\":1}\n")
                    .expect("subscribe");
                s.set_read_timeout(Some(Duration::from_millis(50 + rng.below(200))))
                    .expect("timeout");
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..k]);
                }
                let text = String::from_utf8_lossy(&got).into_owned();
                let first = text.lines().next().unwrap_or("");
                assert!(
                    first.contains("\"ok\":true") || first.contains("too many"),
                    "subscribe answered {first:?}"
                );
                (0, String::new(), String::new())
            }
            _ => {
                what = "unread";
                // Pipelined requests, then gone without reading.
                if let Ok(mut s) = UnixStream::connect(socket) {
                    for _ in 0..20 {
                        let _ = s.write_all(b"{\"cmd\":\"status\"}\n");
                    }
                }
                (0, String::new(), String::new())
            }
        };
        let mut l = ledger.lock().expect("ledger");
        l.ops += 1;
        match (what, code) {
            ("start", 0) => {
                let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
                l.sessions
                    .push(PathBuf::from(v["session_dir"].as_str().expect("dir")));
            }
            ("start", _) => assert!(
                err.contains("is running")
                    || err.contains("is stopping")
                    || err.contains("no lever sample"),
                "start refused for another reason: {err}"
            ),
            ("stop", 0) => {}
            ("stop", _) => assert!(err.contains("no session"), "stop failed: {err}"),
            ("valve", 0) => l.pulses += 1,
            ("tone", 0) => {}
            // The task owns the valve and speaker in a session; the device
            // refuses a pulse while another one is open.
            ("valve" | "tone", _) => assert!(
                err.contains("a session is running") || err.contains("device refused it: Busy"),
                "{what} refused for another reason: {err}"
            ),
            ("status", c) => {
                assert_eq!(c, 0, "status failed: {err}");
                assert!(
                    ["idle", "running", "stopping"]
                        .iter()
                        .any(|s| out.contains(&format!("\"state\":\"{s}\""))),
                    "status: {out}"
                );
            }
            _ => assert_eq!(code, 0, "{what}: {out}{err}"),
        }
        drop(l);
        std::thread::sleep(Duration::from_millis(rng.below(40)));
    }
}

#[test]
fn random_control_clients_never_leave_the_valve_to_no_one() {
    let ops: usize = std::env::var("RIG_STRESS_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let seed: u64 = std::env::var("RIG_STRESS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261206);
    let clients = 4;
    let mut rig = rig("stress", 10.0, None);
    let rigd = Rigd::start(&rig.config, &rig.socket);
    wait_connected(&rig.socket);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let socket = rig.socket.clone();
            let ledger = Arc::clone(&ledger);
            std::thread::spawn(move || client(&socket, seed + i, ops / clients as usize, &ledger))
        })
        .collect();
    for t in threads {
        t.join().expect("a client failed");
    }
    let _ = rigctl(&rig.socket, &["stop"]);
    wait_idle(&rig.socket, 60);
    let ledger = std::mem::take(&mut *ledger.lock().expect("ledger"));
    eprintln!(
        "stress: {} requests from {clients} clients (seed {seed}), {} sessions, {} manual pulses",
        ledger.ops,
        ledger.sessions.len(),
        ledger.pulses
    );
    assert!(
        !ledger.sessions.is_empty(),
        "no start succeeded: not a test of sessions"
    );
    // Every session folder on disk is one a client was told about, and each
    // ended complete.
    let mut on_disk = Vec::new();
    for mouse in std::fs::read_dir(&rig.data).expect("data root").flatten() {
        for s in std::fs::read_dir(mouse.path())
            .expect("mouse folder")
            .flatten()
        {
            on_disk.push(s.path());
        }
    }
    assert_eq!(on_disk.len(), ledger.sessions.len(), "{on_disk:?}");
    let mut rewards = 0;
    for d in &ledger.sessions {
        assert_eq!(
            session_value(d, "state"),
            "complete",
            "{} did not finish",
            d.display()
        );
        rewards += valve_rewards(d);
    }
    // The device's own log: every valve opening is a session's reward or a
    // manual pulse rigd acknowledged, and nothing opens once all is idle.
    let expected = rewards + ledger.pulses;
    std::thread::sleep(Duration::from_secs(2));
    if let Some(sim) = rig.sim.take() {
        sim.stop();
    }
    assert_eq!(
        valve_openings(&rig.truth),
        expected,
        "device valve openings vs {rewards} rewards + {} manual pulses",
        ledger.pulses
    );
    drop(rigd);
}
