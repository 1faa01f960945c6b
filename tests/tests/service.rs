//! rigd as a systemd service, end to end with the real binaries: the
//! `sd_notify` datagrams it sends to a real `$NOTIFY_SOCKET` (READY, STATUS,
//! WATCHDOG at the asked period, STOPPING), and the Prometheus `/metrics`
//! page during and after a session, parsed strictly and checked against the
//! session's own files.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rig_tests::{read_tsv, rigctl, session_value, start_session, wait_connected, Sim, TempDir};

/// The asked watchdog period: pings every 200 ms.
const WATCHDOG_USEC: u64 = 400_000;

/// A rig.toml for `serial_port`, with the preview on `preview_port` (or off);
/// `extra` may hold an `[imaging]` section (imaging is off otherwise).
fn write_config(dir: &Path, serial_port: &Path, preview_port: Option<u16>, extra: &str) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("create the data root");
    let preview = match preview_port {
        Some(p) => format!("[preview]\nenabled = true\nbind = \"127.0.0.1\"\nport = {p}\n"),
        None => "[preview]\nenabled = false\n".to_owned(),
    };
    let imaging = if extra.contains("[imaging]") {
        ""
    } else {
        "[imaging]\nenabled = false\n\n"
    };
    let config = dir.join("rig.toml");
    let text = format!(
        "[rig]\nserial_port = {:?}\n\n[storage]\ndata_root = {:?}\nfsync_interval_ms = 100\n\n\
         [control]\nsocket = {:?}\n\n{preview}\n{imaging}\
         [safety]\nheartbeat_interval_ms = 20\nheartbeat_timeout_ms = 2000\n\n{extra}\n",
        serial_port.display().to_string(),
        data.display().to_string(),
        dir.join("rigd.sock").display().to_string(),
    );
    std::fs::write(&config, text).expect("write config");
    config
}

/// A running rigd (killed on drop) with its stdout lines on a channel.
struct Daemon {
    child: Child,
    socket: PathBuf,
    stdout: mpsc::Receiver<String>,
}

impl Daemon {
    /// Start `rigd --config <config>` through `sh`, so the environment can
    /// name rigd's own pid (`WATCHDOG_PID=$$` before `exec`).
    fn start(config: &Path, dir: &Path, env_script: &str) -> Self {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("{env_script} exec \"$0\" --config \"$1\""))
            .arg(rig_tests::bin("rigd"))
            .arg(config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Kept with the temp dir under RIG_KEEP_TMP=1.
            .stderr(std::fs::File::create(dir.join("rigd.stderr")).expect("stderr file"))
            .spawn()
            .expect("start rigd");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, stdout) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            socket: dir.join("rigd.sock"),
            stdout,
        }
    }

    fn wait_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "rigd did not open its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The preview's address, from rigd's `preview: http://ADDR/` line.
    fn preview_addr(&self) -> String {
        let line = self
            .stdout
            .recv_timeout(Duration::from_secs(15))
            .expect("rigd prints the preview address");
        line.strip_prefix("preview: http://")
            .and_then(|r| r.strip_suffix('/'))
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned()
    }

    fn terminate(&self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
    }

    fn wait(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            assert!(Instant::now() < deadline, "rigd did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The service manager's end: a bound datagram socket, read on a thread.
struct NotifySocket {
    path: PathBuf,
    rx: mpsc::Receiver<(Instant, String)>,
    /// Every datagram so far, with its arrival time.
    seen: Vec<(Instant, String)>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if tx.send((Instant::now(), msg)).is_err() {
                    break;
                }
            }
        });
        Self {
            path,
            rx,
            seen: Vec::new(),
        }
    }

    /// Wait until a datagram has a line satisfying `pred`; returns its time
    /// and the line.
    fn wait_line(
        &mut self,
        what: &str,
        secs: u64,
        pred: impl Fn(&str) -> bool,
    ) -> (Instant, String) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        // Already seen?
        for (t, m) in &self.seen {
            if let Some(l) = m.lines().find(|l| pred(l)) {
                return (*t, l.to_owned());
            }
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((t, m)) => {
                    let hit = m.lines().find(|l| pred(l)).map(str::to_owned);
                    self.seen.push((t, m));
                    if let Some(l) = hit {
                        return (t, l);
                    }
                }
                Err(_) => panic!("no {what} within {secs} s; got {:?}", self.messages()),
            }
        }
    }

    /// Take whatever has arrived.
    fn drain(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            self.seen.push(m);
        }
    }

    fn messages(&self) -> Vec<&str> {
        self.seen.iter().map(|(_, m)| m.as_str()).collect()
    }

    /// Arrival times of `WATCHDOG=1`.
    fn pings(&self) -> Vec<Instant> {
        self.seen
            .iter()
            .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
            .map(|(t, _)| *t)
            .collect()
    }
}

/// Pings in `[from, from + window]` come about every `WATCHDOG_USEC / 2`
/// (generous bounds: a loaded test machine delays timers).
fn assert_ping_period(pings: &[Instant], from: Instant, window: Duration) {
    let pings: Vec<Instant> = pings
        .iter()
        .copied()
        .filter(|&t| t >= from && t <= from + window)
        .collect();
    let expected = window.as_secs_f64() / (WATCHDOG_USEC as f64 / 2e6);
    assert!(
        pings.len() as f64 >= expected * 0.5 && pings.len() as f64 <= expected * 1.5 + 2.0,
        "{} pings in {window:?}, expected about {expected:.0}",
        pings.len()
    );
    let mut gaps: Vec<f64> = pings
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    gaps.sort_by(f64::total_cmp);
    let median = gaps[gaps.len() / 2];
    assert!(
        (0.1..=0.35).contains(&median),
        "median ping interval {median:.3} s, asked for 0.2 s: {gaps:?}"
    );
    assert!(
        gaps.last().is_some_and(|&g| g < 1.5),
        "a gap of {:?} s between pings",
        gaps.last()
    );
}

#[test]
fn notify_ready_status_watchdog_and_stopping() {
    let dir = TempDir::new("notify");
    let sim = Sim::start(dir.path(), &["--speed", "5", "--day", "14"]);
    let config = write_config(dir.path(), &sim.link, None, "");
    let mut notify = NotifySocket::bind(dir.path());
    let env = format!(
        "NOTIFY_SOCKET={:?} WATCHDOG_USEC={WATCHDOG_USEC}; export NOTIFY_SOCKET WATCHDOG_USEC;",
        notify.path.display().to_string()
    );
    let mut rigd = Daemon::start(&config, dir.path(), &env);

    let (t_ready, _) = notify.wait_line("READY=1", 20, |l| l == "READY=1");
    // Ready means the control socket already answers.
    assert!(
        std::os::unix::net::UnixStream::connect(&rigd.socket).is_ok(),
        "READY=1 before the control socket listens"
    );
    notify.wait_line("a STATUS= line", 5, |l| l.starts_with("STATUS="));
    wait_connected(&rigd.socket);
    notify.wait_line("STATUS with the link up", 10, |l| {
        l.starts_with("STATUS=") && l.contains("rig link up")
    });
    let session = start_session(&rigd.socket, "M9");
    notify.wait_line("STATUS for the session", 10, |l| {
        l.starts_with("STATUS=session running for mouse M9")
    });
    // At least three seconds of pings since READY.
    let window = Duration::from_secs(3);
    let left =
        (t_ready + window + Duration::from_millis(300)).saturating_duration_since(Instant::now());
    std::thread::sleep(left);
    notify.drain();
    assert_ping_period(&notify.pings(), t_ready, window);

    rigd.terminate();
    let (_, stopping) = notify.wait_line("STOPPING=1", 15, |l| l == "STOPPING=1");
    assert_eq!(stopping, "STOPPING=1");
    notify.wait_line("the stopping status", 1, |l| {
        l.starts_with("STATUS=SIGTERM: finishing the session for mouse M9")
    });
    let status = rigd.wait(60);
    assert!(status.success(), "rigd exit {status}");
    assert_eq!(session_value(&session, "state"), "complete");
    drop(sim);
}

#[test]
fn ready_and_pings_without_a_device() {
    // No device at all: rigd is still a running service, says why in its
    // status, and its link thread (retrying the port) keeps the watchdog fed.
    let dir = TempDir::new("notify-nodev");
    let config = write_config(dir.path(), &dir.path().join("no-such-tty"), None, "");
    let mut notify = NotifySocket::bind(dir.path());
    // WATCHDOG_PID names rigd itself (sh's pid, kept by exec).
    let env = format!(
        "NOTIFY_SOCKET={:?} WATCHDOG_USEC={WATCHDOG_USEC} WATCHDOG_PID=$$; \
         export NOTIFY_SOCKET WATCHDOG_USEC WATCHDOG_PID;",
        notify.path.display().to_string()
    );
    let mut rigd = Daemon::start(&config, dir.path(), &env);
    let (t_ready, _) = notify.wait_line("READY=1", 20, |l| l == "READY=1");
    rigd.wait_socket();
    notify.wait_line("STATUS with the link down", 10, |l| {
        l.starts_with("STATUS=idle; rig link down (") && l.contains("no-such-tty")
    });
    let window = Duration::from_secs(2);
    std::thread::sleep(
        (t_ready + window + Duration::from_millis(300)).saturating_duration_since(Instant::now()),
    );
    notify.drain();
    assert_ping_period(&notify.pings(), t_ready, window);
    rigd.terminate();
    notify.wait_line("STOPPING=1", 15, |l| l == "STOPPING=1");
    assert!(rigd.wait(30).success());
}

/// A free TCP port on loopback (bound and released; the race is harmless here).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// `GET path` with `host`; returns (status, content type, body).
fn http_get(addr: &str, path: &str, host: &str) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the preview");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("headers end");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: HashMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    assert!(
        !headers
            .get("transfer-encoding")
            .is_some_and(|t| t.contains("chunked")),
        "unexpected chunked body"
    );
    let ctype = headers.get("content-type").cloned().unwrap_or_default();
    (status, ctype, body.to_owned())
}

/// A sample's labels, sorted.
type Labels = Vec<(String, String)>;

/// One scrape, parsed.
#[derive(Debug)]
struct Scrape {
    /// Family name -> type.
    types: HashMap<String, String>,
    /// (sample name, sorted labels) -> value.
    samples: HashMap<(String, Labels), f64>,
    /// Sample order as written, for the histogram check.
    order: Vec<(String, Labels, f64)>,
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(v: &str, line: &str) -> f64 {
    match v {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => {
            assert!(
                v.chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')),
                "bad value in {line:?}"
            );
            v.parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"))
        }
    }
}

/// `{k="v",...}` -> sorted pairs.
fn parse_labels(s: &str, line: &str) -> Labels {
    let inner = s
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or_else(|| panic!("bad labels in {line:?}"));
    let mut out = Vec::new();
    let mut rest = inner;
    while !rest.is_empty() {
        let (k, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad label in {line:?}"));
        assert!(valid_name(k), "bad label name {k:?} in {line:?}");
        // Our values never contain quotes or backslashes.
        let (v, after) = after
            .split_once('"')
            .unwrap_or_else(|| panic!("unterminated label in {line:?}"));
        assert!(!v.contains('\\'), "escape in {line:?}");
        out.push((k.to_owned(), v.to_owned()));
        rest = after.strip_prefix(',').unwrap_or(after);
        assert!(
            after.is_empty() || after.starts_with(','),
            "junk after a label in {line:?}"
        );
    }
    out.sort();
    out
}

/// Parse the text format strictly: every sample line is `name{labels} value`
/// (no timestamps), every family has HELP and TYPE before its samples and its
/// samples are together, no sample repeats, histograms are well formed.
fn parse_scrape(text: &str) -> Scrape {
    assert!(text.ends_with('\n'), "no final newline");
    let mut help = HashSet::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    let mut order = Vec::new();
    let mut finished_families: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        assert!(!line.is_empty(), "empty line in\n{text}");
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, doc) = rest.split_once(' ').expect("HELP name text");
            assert!(valid_name(name) && !doc.is_empty(), "{line:?}");
            assert!(help.insert(name.to_owned()), "second HELP for {name}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(valid_name(name), "{line:?}");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "{line:?}"
            );
            assert!(help.contains(name), "TYPE before HELP for {name}");
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "second TYPE for {name}"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not `name value`: {line:?}"));
        let (name, labels) = match series.find('{') {
            Some(i) => (&series[..i], parse_labels(&series[i..], line)),
            None => (series, Vec::new()),
        };
        assert!(valid_name(name), "bad name in {line:?}");
        let value = parse_value(value, line);
        let family = if types.contains_key(name) {
            name.to_owned()
        } else {
            let f = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or_else(|| panic!("sample {name} has no TYPE before it"));
            assert_eq!(
                types.get(f).map(String::as_str),
                Some("histogram"),
                "{name}: not a histogram's sample"
            );
            f.to_owned()
        };
        assert!(help.contains(&family), "{family} has no HELP");
        if types[&family] == "counter" {
            assert!(family.ends_with("_total"), "counter {family} not _total");
            assert!(value >= 0.0, "negative counter {line:?}");
        }
        if current.as_deref() != Some(&family) {
            assert!(
                !finished_families.contains(&family),
                "{family}'s samples are not together"
            );
            if let Some(c) = current.take() {
                finished_families.insert(c);
            }
            current = Some(family.clone());
        }
        let key = (name.to_owned(), labels.clone());
        assert!(
            samples.insert(key, value).is_none(),
            "sample repeated: {line:?}"
        );
        order.push((name.to_owned(), labels, value));
    }
    for (name, kind) in &types {
        let n = order
            .iter()
            .filter(|(s, _, _)| {
                s == name
                    || s.strip_prefix(name.as_str())
                        .is_some_and(|r| ["_bucket", "_sum", "_count"].contains(&r))
            })
            .count();
        assert!(n > 0, "{kind} {name} has no samples");
    }
    let scrape = Scrape {
        types,
        samples,
        order,
    };
    for (name, kind) in &scrape.types {
        if kind == "histogram" {
            check_histogram(&scrape, name);
        }
    }
    scrape
}

/// Buckets in increasing `le`, cumulative, ending in `+Inf` == `_count`.
fn check_histogram(s: &Scrape, name: &str) {
    let bucket_name = format!("{name}_bucket");
    let buckets: Vec<(f64, f64)> = s
        .order
        .iter()
        .filter(|(n, _, _)| *n == bucket_name)
        .map(|(_, labels, v)| {
            assert_eq!(labels.len(), 1, "{name}: bucket labels {labels:?}");
            assert_eq!(labels[0].0, "le");
            (parse_value(&labels[0].1, name), *v)
        })
        .collect();
    assert!(buckets.len() >= 2, "{name}: {buckets:?}");
    for w in buckets.windows(2) {
        assert!(w[0].0 < w[1].0, "{name}: le not increasing: {buckets:?}");
        assert!(w[0].1 <= w[1].1, "{name}: not cumulative: {buckets:?}");
    }
    let (last_le, last_n) = *buckets.last().expect("buckets");
    assert!(last_le.is_infinite(), "{name}: last bucket is not +Inf");
    assert_eq!(
        s.get(&format!("{name}_count"), &[]),
        last_n,
        "{name}: +Inf bucket != _count"
    );
    assert!(s.get(&format!("{name}_sum"), &[]) >= 0.0);
}

impl Scrape {
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut l: Labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        l.sort();
        *self
            .samples
            .get(&(name.to_owned(), l))
            .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
    }

    fn sum_over(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| v)
            .sum()
    }
}

fn scrape(addr: &str) -> Scrape {
    let (status, ctype, body) = http_get(addr, "/metrics", addr);
    assert_eq!(status, 200, "{body}");
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    parse_scrape(&body)
}

/// Removes a POSIX shared-memory object when dropped (also when a test fails).
struct ShmGuard(String);

impl Drop for ShmGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(format!("/dev/shm{}", self.0));
    }
}

const EXPECTED: &[(&str, &str)] = &[
    ("rigd_sessions_started_total", "counter"),
    ("rigd_sessions_completed_total", "counter"),
    ("rigd_session_running", "gauge"),
    ("rigd_trials_total", "counter"),
    ("rigd_rewards_total", "counter"),
    ("rigd_water_delivered_microliters_total", "counter"),
    ("rigd_frames_total", "counter"),
    ("rigd_frames_dropped_total", "counter"),
    ("rigd_storage_dropped_total", "counter"),
    ("rigd_lever_samples_lost_total", "counter"),
    ("rigd_device_time_anomalies_total", "counter"),
    ("rigd_link_up", "gauge"),
    ("rigd_link_losses_total", "counter"),
    ("rigd_clock_sync_half_band_seconds", "gauge"),
    ("rigd_control_latency_seconds", "histogram"),
];

#[test]
fn metrics_during_and_after_a_session() {
    let dir = TempDir::new("metrics");
    // The simulated microscope too, small, so the frame counters count.
    let shm = format!("/rig-e2e-{}-metrics", std::process::id());
    let _ring = ShmGuard(shm.clone());
    let sim = Sim::start(
        dir.path(),
        &[
            "--speed",
            "10",
            "--day",
            "14",
            "--microscope",
            &shm,
            "--microscope-size",
            "64x48",
            "--neurons",
            "8",
        ],
    );
    let port = free_port();
    let config = write_config(
        dir.path(),
        &sim.link,
        Some(port),
        &format!(
            "[task]\nmax_duration_min = 1\n\n[imaging]\nenabled = true\nshm_name = {shm:?}\n\
             width = 64\nheight = 48\nchannels = 1\nttl_wired = true\n"
        ),
    );
    let mut rigd = Daemon::start(&config, dir.path(), "");
    let addr = rigd.preview_addr();
    assert_eq!(addr, format!("127.0.0.1:{port}"));
    rigd.wait_socket();
    wait_connected(&rigd.socket);

    let before = scrape(&addr);
    for (name, kind) in EXPECTED {
        assert_eq!(
            before.types.get(*name).map(String::as_str),
            Some(*kind),
            "{name}"
        );
    }
    assert_eq!(before.get("rigd_link_up", &[]), 1.0);
    assert_eq!(before.get("rigd_session_running", &[]), 0.0);
    assert_eq!(before.get("rigd_sessions_started_total", &[]), 0.0);
    assert_eq!(before.get("rigd_trials_total", &[]), 0.0);
    // Read-only and loopback-guarded like the rest of the preview.
    assert_eq!(http_get(&addr, "/metrics", "evil.example").0, 403);

    let session = start_session(&rigd.socket, "M4");
    std::thread::sleep(Duration::from_secs(2));
    let during = scrape(&addr);
    assert_eq!(during.get("rigd_session_running", &[]), 1.0);
    assert_eq!(during.get("rigd_sessions_started_total", &[]), 1.0);
    assert_eq!(during.get("rigd_link_up", &[]), 1.0);
    let band = during.get("rigd_clock_sync_half_band_seconds", &[]);
    // Device µs at 10x speed: loose; this checks the unit and that it is set.
    assert!(band > 0.0 && band < 0.05, "clock half band {band} s");

    // One minute of device time at 10x: the session ends by itself.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (code, out, _) = rigctl(&rigd.socket, &["status", "--json"]);
        if code == 0 && out.contains("\"state\":\"idle\"") {
            break;
        }
        assert!(Instant::now() < deadline, "session did not end: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = scrape(&addr);
    assert_eq!(session_value(&session, "state"), "complete");
    let trials = read_tsv(&session.join("trials.tsv"));
    let rewarded = trials.iter().filter(|t| t["outcome"] == "rewarded").count() as f64;
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(session.join("summary.json")).expect("summary.json"),
    )
    .expect("summary is JSON");
    assert!(trials.len() >= 3, "only {} trials", trials.len());
    assert!(rewarded >= 1.0, "no reward in a minute of an expert mouse");

    assert_eq!(after.get("rigd_session_running", &[]), 0.0);
    assert_eq!(after.get("rigd_sessions_started_total", &[]), 1.0);
    assert_eq!(
        after.get("rigd_sessions_completed_total", &[("reason", "duration")]),
        1.0
    );
    assert_eq!(after.sum_over("rigd_sessions_completed_total"), 1.0);
    assert_eq!(after.get("rigd_trials_total", &[]), trials.len() as f64);
    assert_eq!(
        Some(after.get("rigd_trials_total", &[])),
        summary["trials"].as_f64()
    );
    assert_eq!(after.get("rigd_rewards_total", &[]), rewarded);
    assert_eq!(
        Some(after.get("rigd_rewards_total", &[])),
        summary["rewards"].as_f64()
    );
    let water = summary["water_ul"].as_f64().expect("water_ul");
    let got = after.get("rigd_water_delivered_microliters_total", &[]);
    assert!(
        (got - water).abs() < 1e-6,
        "water {got} µL vs summary {water}"
    );
    assert_eq!(
        after.get("rigd_control_latency_seconds_count", &[]),
        rewarded,
        "one control latency per rewarded trial"
    );
    let mean = after.get("rigd_control_latency_seconds_sum", &[]) / rewarded;
    // Seconds, not µs; loose, since host delays count ten times at 10x.
    assert!(mean > 0.0 && mean < 2.0, "mean control latency {mean} s");
    assert_eq!(after.get("rigd_link_up", &[]), 1.0);
    assert_eq!(after.get("rigd_link_losses_total", &[]), 0.0);
    let frames = read_tsv(&session.join("frames.tsv"));
    let received = frames.iter().filter(|f| f["dropped"] == "0").count() as f64;
    let dropped = frames.iter().filter(|f| f["dropped"] == "1").count() as f64;
    assert!(received > 0.0, "no frames in the session");
    assert_eq!(after.get("rigd_frames_total", &[]), received);
    assert_eq!(after.get("rigd_frames_dropped_total", &[]), dropped);

    rigd.terminate();
    assert!(rigd.wait(30).success());
    drop(sim);
}
