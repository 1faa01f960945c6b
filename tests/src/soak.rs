//! The soak: a long session of the real `rigd` against the virtual rig and its
//! simulated microscope at high speed (small frames), with faults injected on
//! a schedule, then every trial, reward, lever sample and frame accounted for
//! against the virtual rig's ground truth, and rigd's memory, file
//! descriptors and threads sampled throughout.
//!
//! Used by `cargo bench -p rig-tests --bench soak` (12 h of device time; the
//! numbers in docs/performance.md) and by a short version in the tests.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{rigctl, start_session, wait_connected, Rigd, Sim, TempDir};

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// Device time of the session, hours.
    pub device_hours: f64,
    /// Device time per wall second.
    pub speed: f64,
    /// One injected fault every this many device seconds (cycling through
    /// unplug, silent, garbage). A device reboot is left out: it restarts the
    /// virtual rig's counter, which its truth log does not unwrap (reboots
    /// are tested in tests/link.rs).
    pub fault_every_s: f64,
    /// Microscope frame size (square), pixels.
    pub frame_px: u32,
    /// Print progress lines.
    pub verbose: bool,
}

/// Resource samples of the rigd process.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub wall_s: f64,
    pub rss_kb: u64,
    pub fds: u64,
    pub threads: u64,
}

/// What the soak found.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    pub device_s: f64,
    pub wall_s: f64,
    pub trials: usize,
    pub aborted: usize,
    pub rewards: usize,
    /// Rewards recorded without the device's ValveOpen (the link went).
    pub unconfirmed_rewards: usize,
    pub cues_on_device: usize,
    pub valve_openings: usize,
    pub max_valve_open_ms: f64,
    pub lever_rows: u64,
    pub lever_gaps: usize,
    pub frames_rows: u64,
    pub frames_dropped: u64,
    pub ttl_edges: u64,
    pub faults: Vec<String>,
    pub fault_records_missing: Vec<String>,
    pub samples: Vec<ProcSample>,
    pub rss_growth_pct: f64,
    /// File descriptors and threads: median of the second tenth of the run
    /// (after warm-up), median of the last tenth, and the most seen.
    pub fds: (u64, u64, u64),
    pub threads: (u64, u64, u64),
    /// Accounting failures (empty = every trial, reward, sample and frame
    /// accounted for).
    pub problems: Vec<String>,
    pub session_dir: PathBuf,
}

impl SoakReport {
    pub fn print(&self) {
        println!(
            "soak: {:.1} h of device time in {:.1} min wall ({:.0}x)",
            self.device_s / 3600.0,
            self.wall_s / 60.0,
            self.device_s / self.wall_s.max(1e-9)
        );
        println!(
            "  faults injected: {} ({})",
            self.faults.len(),
            self.faults.join(", ")
        );
        println!(
            "  trials {} ({} aborted by faults), cues on the device {}, rewards {} ({} unconfirmed at faults), valve openings {} (longest {:.1} ms)",
            self.trials, self.aborted, self.cues_on_device, self.rewards, self.unconfirmed_rewards, self.valve_openings, self.max_valve_open_ms
        );
        println!(
            "  lever rows {}, gaps {} (each at an injected fault); frames {} rows ({} dropped) for {} TTL edges",
            self.lever_rows, self.lever_gaps, self.frames_rows, self.frames_dropped, self.ttl_edges
        );
        if let (Some(first), Some(last)) = (self.samples.first(), self.samples.last()) {
            println!(
                "  rigd RSS {} -> {} kB (growth after warm-up {:+.1} %), fds {} -> {} (max {}), threads {} -> {} (max {})",
                first.rss_kb, last.rss_kb, self.rss_growth_pct, self.fds.0, self.fds.1, self.fds.2,
                self.threads.0, self.threads.1, self.threads.2
            );
        }
        if self.problems.is_empty() {
            println!("  accounting: everything accounted for");
        } else {
            for p in &self.problems {
                println!("  PROBLEM: {p}");
            }
        }
    }
}

fn proc_sample(pid: u32, wall_s: f64) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(ProcSample {
        wall_s,
        rss_kb: field("VmRSS:")?,
        fds,
        threads: field("Threads:")?,
    })
}

/// The fault schedule: one every `every_s`, cycling through the kinds.
fn schedule(device_s: f64, every_s: f64, speed: f64) -> Vec<String> {
    // Silence is noticed after about a second of the host's time: make it
    // last 1.5 s of wall time at any speed.
    let silent_s = (1.5 * speed).max(3.0);
    let mut out = Vec::new();
    let mut k = 0;
    let mut t = every_s;
    while t < device_s - every_s / 2.0 {
        out.push(match k % 3 {
            0 => format!("unplug@{t:.0}:2"),
            1 => format!("silent@{t:.0}:{silent_s:.0}"),
            _ => format!("garbage@{t:.0}:500"),
        });
        k += 1;
        t += every_s;
    }
    out
}

/// Truth rows of the kinds we need, streamed (the file is large).
struct Truth {
    /// (kind, device µs, value, detail) for faults and outputs.
    rows: Vec<(String, f64, f64, String)>,
    ttl_device_us: Vec<f64>,
}

fn read_truth(path: &Path) -> Truth {
    let f = std::fs::File::open(path).expect("truth file");
    let mut rows = Vec::new();
    let mut ttl = Vec::new();
    for line in std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .skip(1)
    {
        let mut it = line.split('\t');
        let (_, dev, kind, value) = (it.next(), it.next(), it.next(), it.next());
        let (Some(dev), Some(kind), Some(value)) = (dev, kind, value) else {
            continue;
        };
        let dev: f64 = dev.parse().unwrap_or(f64::NAN);
        match kind {
            "ttl" => ttl.push(dev),
            "tone_on" | "valve_open" | "valve_close" => rows.push((
                kind.to_owned(),
                dev,
                value.parse().unwrap_or(f64::NAN),
                it.next().unwrap_or("").to_owned(),
            )),
            k if k.starts_with("fault_") => rows.push((
                k.to_owned(),
                dev,
                value.parse().unwrap_or(f64::NAN),
                String::new(),
            )),
            _ => {}
        }
    }
    Truth {
        rows,
        ttl_device_us: ttl,
    }
}

/// Lever and frames checks in numpy (the lever of a 12-hour session is
/// ~1 GB): prints JSON with the rows, the gaps (session s) and frames.
const NUMPY_CHECK: &str = r#"
import sys, json, glob, os, re, numpy as np
d = sys.argv[1]
def chunks(stem):
    files = [p for p in glob.glob(os.path.join(d, stem + "*.npy"))
             if re.fullmatch(re.escape(stem) + r"(\.\d+)?\.npy", os.path.basename(p))]
    key = lambda p: int(re.search(r"\.(\d+)\.npy$", p).group(1)) if re.search(r"\.(\d+)\.npy$", p) else 0
    return sorted(files, key=key)
rows, gaps, prev, bad_order = 0, [], None, 0
for f in chunks("lever"):
    a = np.load(f, mmap_mode="r")
    t = np.asarray(a[:, 0])
    if prev is not None and len(t):
        t = np.concatenate([[prev], t])
    dt = np.diff(t)
    bad_order += int(np.sum(dt <= 0))
    for i in np.nonzero(dt > 0.005)[0]:
        gaps.append([float(t[i]), float(t[i + 1])])
    if len(t):
        prev = float(t[-1])
    rows += a.shape[0]
frames = dropped = jumps = 0
first_frame = last_frame = None
with open(os.path.join(d, "frames.tsv")) as fh:
    next(fh)
    for line in fh:
        cols = line.rstrip("\n").split("\t")
        n = int(cols[1])
        if last_frame is not None and n != last_frame + 1:
            jumps += 1
        if first_frame is None:
            first_frame = n
        last_frame = n
        frames += 1
        if cols[4] == "1":
            dropped += 1
first = None
for f in chunks("lever")[:1]:
    a = np.load(f, mmap_mode="r")
    first = float(a[0, 0]) if a.shape[0] else None
print(json.dumps({"lever_rows": rows, "gaps": gaps, "bad_order": bad_order,
                  "frames": frames, "dropped": dropped, "frame_jumps": jumps,
                  "first_frame": first_frame, "last_frame": last_frame,
                  "first_t": first, "last_t": prev}))
"#;

/// Run the soak. Panics only when the rig cannot be set up; accounting
/// failures go into `problems`.
pub fn run(opts: &SoakOptions) -> SoakReport {
    let device_s = opts.device_hours * 3600.0;
    let dir = TempDir::new("soak");
    let truth = dir.path().join("truth.tsv");
    let shm = format!("/rig-soak-{}", std::process::id());
    let faults = schedule(device_s, opts.fault_every_s, opts.speed);
    let speed = opts.speed.to_string();
    let size = format!("{0}x{0}", opts.frame_px);
    // The device holds back up to ~1 s of its own time when the host is
    // slow to read (as a 1 kB buffer does at 1x): scale it with the speed.
    let tx_buffer = ((1024.0 * opts.speed) as usize).to_string();
    let mut args: Vec<String> = vec![
        "--tx-buffer-bytes".into(),
        tx_buffer,
        "--speed".into(),
        speed,
        "--day".into(),
        "14".into(),
        "--truth".into(),
        truth.display().to_string(),
        "--microscope".into(),
        shm.clone(),
        "--microscope-size".into(),
        size,
        "--neurons".into(),
        "20".into(),
    ];
    for f in &faults {
        args.push("--fault".into());
        args.push(f.clone());
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let sim = Sim::start(dir.path(), &arg_refs);
    let socket = dir.path().join("rigd.sock");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data root");
    // The device's watchdog counts device time, `speed` times faster than
    // the host's heartbeats.
    // 500 ms of wall time, as the default is at 1x.
    let timeout_ms = ((500.0 * opts.speed).max(500.0) as u32).min(65_000);
    let minutes = (opts.device_hours * 60.0).ceil() as u32;
    let config = dir.path().join("rig.toml");
    std::fs::write(
        &config,
        format!(
            "[rig]\nserial_port = {:?}\nsamples_per_batch = 10\n\n\
             [task]\niti_min_ms = 2000\niti_max_ms = 4000\nmax_duration_min = {minutes}\n\n\
             [storage]\ndata_root = {:?}\n\n[control]\nsocket = {:?}\n\n[preview]\nenabled = false\n\n\
             [imaging]\nenabled = true\nshm_name = {shm:?}\nwidth = {px}\nheight = {px}\n\n\
             [safety]\nheartbeat_interval_ms = 10\nheartbeat_timeout_ms = {timeout_ms}\n\
             max_session_min = 1440\nmax_water_per_session_ul = 1000000.0\nmax_water_per_day_ul = 1000000.0\n",
            sim.link.display().to_string(),
            data.display().to_string(),
            socket.display().to_string(),
            px = opts.frame_px,
        ),
    )
    .expect("config");
    let rigd = Rigd::start(&config, &socket);
    wait_connected(&socket);
    let session = start_session(&socket, "SOAK");
    let started = Instant::now();
    let pid = rigd.child.id();
    let mut samples = Vec::new();
    let mut last_print = Instant::now();
    // The session ends itself at its duration; sample until then.
    loop {
        let wall = started.elapsed().as_secs_f64();
        if let Some(s) = proc_sample(pid, wall) {
            samples.push(s);
        }
        let (code, out, _) = rigctl(&socket, &["status", "--json"]);
        if code == 0 && out.contains("\"state\":\"idle\"") {
            break;
        }
        if opts.verbose && last_print.elapsed() > Duration::from_secs(60) {
            last_print = Instant::now();
            let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
            eprintln!(
                "soak: {:.2} h device, {} trials, {} frames, RSS {} kB",
                v["elapsed_s"].as_f64().unwrap_or(0.0) / 3600.0,
                v["trials"],
                v["frames"],
                samples.last().map_or(0, |s| s.rss_kb)
            );
        }
        assert!(
            wall < device_s / opts.speed * 3.0 + 120.0,
            "the soak session did not end: {out}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    let wall_s = started.elapsed().as_secs_f64();
    drop(rigd);
    drop(sim);
    let mut report = account(&session, &truth, &faults, device_s);
    report.wall_s = wall_s;
    report.session_dir = session;
    resources(&mut report, samples);
    if std::env::var_os("RIG_KEEP_TMP").is_some() {
        std::mem::forget(dir);
    }
    report
}

fn resources(report: &mut SoakReport, samples: Vec<ProcSample>) {
    let n = samples.len();
    if n >= 10 {
        let median = |s: &[ProcSample], f: fn(&ProcSample) -> u64| {
            let mut v: Vec<u64> = s.iter().map(f).collect();
            v.sort_unstable();
            v[v.len() / 2]
        };
        // Warm-up: the motion reference, the first fsyncs, the allocator
        // settling. Baseline = the second tenth, end = the last tenth.
        let tenth = (n / 10).max(1);
        let (base, end) = (&samples[tenth..2 * tenth], &samples[n - tenth..]);
        let rss = |s: &ProcSample| s.rss_kb;
        report.rss_growth_pct = (median(end, rss) as f64 / median(base, rss) as f64 - 1.0) * 100.0;
        let fds = |s: &ProcSample| s.fds;
        let threads = |s: &ProcSample| s.threads;
        report.fds = (
            median(base, fds),
            median(end, fds),
            samples.iter().map(fds).max().unwrap_or(0),
        );
        report.threads = (
            median(base, threads),
            median(end, threads),
            samples.iter().map(threads).max().unwrap_or(0),
        );
    }
    report.samples = samples;
}

fn account(session: &Path, truth_path: &Path, faults: &[String], device_s: f64) -> SoakReport {
    let mut r = SoakReport {
        device_s,
        faults: faults.to_vec(),
        ..Default::default()
    };
    let t0: f64 = crate::session_value(session, "t0_rig_us")
        .parse()
        .expect("t0_rig_us");
    let truth = read_truth(truth_path);
    let trials = crate::read_tsv(&session.join("trials.tsv"));
    let events = crate::read_tsv(&session.join("events.tsv"));
    let stop_s = events
        .iter()
        .filter_map(|e| e["t_s"].parse::<f64>().ok())
        .fold(0.0, f64::max);
    // Nothing plays a cue or opens the valve outside the session.
    r.cues_on_device = truth.rows.iter().filter(|x| x.0 == "tone_on").count();
    r.valve_openings = truth.rows.iter().filter(|x| x.0 == "valve_open").count();
    r.max_valve_open_ms = truth
        .rows
        .iter()
        .filter(|x| x.0 == "valve_close")
        .map(|x| x.2 / 1000.0)
        .fold(0.0, f64::max);
    let closes = truth.rows.iter().filter(|x| x.0 == "valve_close").count();
    if closes != r.valve_openings {
        r.problems.push(format!(
            "{} valve openings but {closes} closings",
            r.valve_openings
        ));
    }
    r.trials = trials.len();
    r.aborted = trials.iter().filter(|t| t["outcome"] == "aborted").count();
    r.rewards = trials
        .iter()
        .filter(|t| t["outcome"] == "rewarded" && t["reward_ul"] != "0")
        .count();
    // A reward whose valve opening the device confirmed has its time; one
    // without (the link went in between) is counted as given, which is the
    // safe side for the caps, but the device may or may not have opened.
    r.unconfirmed_rewards = trials
        .iter()
        .filter(|t| {
            t["outcome"] == "rewarded" && t["reward_ul"] != "0" && t["t_reward_s"].is_empty()
        })
        .count();
    // Every trial numbered, in order, none missing.
    for (i, t) in trials.iter().enumerate() {
        if t["trial"] != (i + 1).to_string() {
            r.problems
                .push(format!("trial row {} is numbered {}", i + 1, t["trial"]));
            break;
        }
    }
    // Every cue the device played is a trial; a trial without a cue on the
    // device is one the link lost (aborted), or whose cue command was on
    // the wire when the cable went.
    if r.cues_on_device > r.trials {
        r.problems.push(format!(
            "{} cues on the device but only {} trials recorded",
            r.cues_on_device, r.trials
        ));
    }
    if r.trials - r.cues_on_device.min(r.trials) > r.aborted + faults.len() {
        r.problems.push(format!(
            "{} trials without a cue on the device, only {} aborted",
            r.trials - r.cues_on_device,
            r.aborted
        ));
    }
    // Every valve opening is a recorded reward, and every recorded reward
    // with a valve time is an opening; the unconfirmed ones are at faults.
    let confirmed = r.rewards - r.unconfirmed_rewards;
    if r.valve_openings < confirmed || r.valve_openings > r.rewards {
        r.problems.push(format!(
            "{} valve openings on the device, {} rewards recorded ({} unconfirmed)",
            r.valve_openings, r.rewards, r.unconfirmed_rewards
        ));
    }
    if r.unconfirmed_rewards > faults.len() {
        r.problems.push(format!(
            "{} rewards without a confirmed valve opening for {} faults",
            r.unconfirmed_rewards,
            faults.len()
        ));
    }
    if r.max_valve_open_ms > 200.0 + 0.01 {
        r.problems.push(format!(
            "the valve was open {:.1} ms (cap 200)",
            r.max_valve_open_ms
        ));
    }
    // Each injected fault left its record.
    let count = |kind: &str, detail: &str| {
        events
            .iter()
            .filter(|e| e["kind"] == kind && e["detail"].contains(detail))
            .count()
    };
    let n = |prefix: &str| faults.iter().filter(|f| f.starts_with(prefix)).count();
    let want = [
        ("lost", "", n("unplug") + n("silent")),
        ("connected", "reconnect=true", n("unplug") + n("silent")),
        ("bad_frames", "", n("garbage").min(1)),
    ];
    for (kind, detail, at_least) in want {
        let got = count(kind, detail);
        if got < at_least {
            r.fault_records_missing.push(format!(
                "{kind} {detail}: {got} in events.tsv, {at_least} faults"
            ));
        }
    }
    if !r.fault_records_missing.is_empty() {
        r.problems.push(format!(
            "fault records missing: {:?}",
            r.fault_records_missing
        ));
    }
    // Lever and frames, with numpy.
    let out = crate::run_python(NUMPY_CHECK, &[session.as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("numpy check JSON");
    r.lever_rows = v["lever_rows"].as_u64().unwrap_or(0);
    let gaps = v["gaps"].as_array().cloned().unwrap_or_default();
    r.lever_gaps = gaps.len();
    if v["bad_order"].as_u64() != Some(0) {
        r.problems
            .push(format!("lever times out of order: {}", v["bad_order"]));
    }
    let sample_gaps: Vec<f64> = events
        .iter()
        .filter(|e| e["kind"] == "sample_gap")
        .filter_map(|e| e["t_s"].parse().ok())
        .collect();
    for g in &gaps {
        let (a, b) = (g[0].as_f64().unwrap_or(0.0), g[1].as_f64().unwrap_or(0.0));
        // Recorded: a sample_gap event at the gap's end (first new sample).
        if !sample_gaps.iter().any(|&s| s >= a - 0.01 && s <= b + 0.01) {
            r.problems.push(format!(
                "lever gap {a:.3}..{b:.3} s with no sample_gap event"
            ));
        }
    }
    // Each fault on the link may cost samples: an unplug or a silence
    // always, garbage when it lands inside a batch (which then fails its
    // check and is lost, whether it does depends on timing). Every gap is
    // an event (checked above); no more gaps than such faults.
    let link_faults = n("unplug") + n("silent") + n("garbage");
    if gaps.len() > link_faults {
        r.problems.push(format!(
            "{} lever gaps for {link_faults} link faults",
            gaps.len(),
        ));
    }
    // From the first sample the session took to the last one written (the
    // session's own start, t0, is taken a moment before its first sample).
    let span_s = v["last_t"].as_f64().unwrap_or(0.0) - v["first_t"].as_f64().unwrap_or(0.0);
    let expected_rows = (span_s * 1000.0).round() as i64 + 1;
    let lost: f64 = events
        .iter()
        .filter(|e| e["kind"] == "sample_gap")
        .filter_map(|e| e["value"].parse::<f64>().ok())
        .sum();
    let missing = expected_rows - r.lever_rows as i64 - lost as i64;
    if missing.abs() > 1000 {
        r.problems.push(format!(
            "lever: {} rows + {lost} reported missing vs {expected_rows} expected",
            r.lever_rows
        ));
    }
    r.frames_rows = v["frames"].as_u64().unwrap_or(0);
    r.frames_dropped = v["dropped"].as_u64().unwrap_or(0);
    // TTL edges (frames the microscope made) during the session.
    r.ttl_edges = truth
        .ttl_device_us
        .iter()
        .filter(|&&d| d >= t0 && d <= t0 + stop_s * 1e6)
        .count() as u64;
    // One row per frame of the acquisition, numbered without a hole, from
    // the first frame rigd saw to the last; and all but the few in flight
    // at either end of the session.
    if v["frame_jumps"].as_u64() != Some(0) {
        r.problems.push(format!(
            "frames.tsv skips frame numbers {} times",
            v["frame_jumps"]
        ));
    }
    let span = v["last_frame"].as_i64().unwrap_or(0) - v["first_frame"].as_i64().unwrap_or(0) + 1;
    if span != r.frames_rows as i64 {
        r.problems.push(format!(
            "{} frame rows for frames {span} numbers",
            r.frames_rows
        ));
    }
    let diff = r.ttl_edges as i64 - r.frames_rows as i64;
    if diff.abs() > (30.0 * 28.7) as i64 {
        r.problems.push(format!(
            "frames.tsv has {} rows for {} frames made in the session",
            r.frames_rows, r.ttl_edges
        ));
    }
    if r.frames_dropped > 0 {
        let reported: f64 = events
            .iter()
            .filter(|e| e["kind"] == "frames_dropped" || e["kind"] == "frames_missing")
            .filter_map(|e| e["value"].parse::<f64>().ok())
            .sum();
        if reported as u64 != r.frames_dropped {
            r.problems.push(format!(
                "{} dropped frame rows, {reported} reported",
                r.frames_dropped
            ));
        }
    }
    r
}
