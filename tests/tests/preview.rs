//! The live preview page in a real headless browser (Debian's `chromium`):
//! load the page twice a few seconds apart and check from the dumped DOM that
//! the trial count, the lever trace and the dF/F heatmap update; save a
//! screenshot (the whole page, 1280 x 1400) as `<target>/preview.png`.
//!
//! The server is, for now, the `preview_feed` example of the daemon crate (a
//! real preview server fed with changing synthetic data by a thread); once
//! `rigd demo` serves the preview, `start_server` switches to it.
//!
//! Without `/usr/bin/chromium` (or `$RIG_CHROMIUM`) the test prints a skip
//! note, unless `RIG_REQUIRE_BROWSER=1`, when it fails.
//!
//! `--dump-dom` never returns while an `EventSource` is open (virtual time
//! waits for the endless `/events` request to go idle), so the page is loaded
//! with `?close_after=5`: it takes five SSE messages (a snapshot and four
//! updates) from `/events`, closes the stream, and the virtual-time budget then
//! runs out and the DOM is dumped. The polling mode (`?poll=1`, fetching
//! `/api/state` every 500 ms) is checked once too, and used for the screenshot.
//!
//! A second test runs `rigd` against a separate `rig-sim` with its microscope
//! and two sessions one after the other: the licks, the task state and the
//! motion trace a person sees belong to the session running, checked against
//! that session's own files.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rig_tests::browser::{body_data, chromium, run_chromium};
use rig_tests::{
    read_tsv, session_value, start_session, stop_session, wait_connected, wait_idle, Rigd, Sim,
    TempDir,
};

/// The two tests each run a rig (the demo at 10x speed with 256 x 256
/// imaging; rigd and rig-sim): one at a time, so that on a 2-core machine
/// neither starves the other's imaging.
static ONE_RIG_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The task engine's states (`TaskState::as_str` in the daemon).
const TASK_STATES: [&str; 6] = [
    "waiting",
    "iti",
    "quiescence",
    "response",
    "link_down",
    "finished",
];

/// `<target>/<profile>` of this test binary.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.parent()
        .and_then(Path::parent)
        .expect("<target>/<profile>/deps/<test>")
        .to_path_buf()
}

/// The running demo (stopped on drop) and its data folder.
struct Server(Child, #[allow(dead_code)] TempDir);

impl Drop for Server {
    fn drop(&mut self) {
        // SIGINT (Ctrl-C) lets the demo stop its session and remove its
        // 34 MB shared-memory ring; SIGKILL would leave it in /dev/shm.
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(self.0.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Build and start the preview server; returns it and the page's URL.
fn start_server() -> (Server, String) {
    // The real thing: `rigd demo` runs a virtual rig, the task, the simulated
    // microscope and the preview page; its first stdout line is the address.
    let data = TempDir::new("preview-demo");
    let mut child = Command::new(rig_tests::bin("rigd"))
        // Long enough to outlive four chromium runs on a loaded machine (a
        // cold start alone has taken 15 s); stopped when the test ends.
        .args(["demo", "--minutes", "30", "--speed", "10", "--data"])
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rigd demo");
    let stdout = child.stdout.take().expect("piped stdout");
    let server = Server(child, data);
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line).expect("read the address line");
    // Keep reading the demo's progress so it never writes into a closed pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while reader.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    let url = line
        .trim()
        .strip_prefix("preview: ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    (server, url)
}

fn num(d: &HashMap<String, String>, k: &str) -> u64 {
    d.get(k)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {k} in {d:?}"))
}

#[test]
fn preview_page_updates_in_headless_chromium() {
    let Some(browser) = chromium() else { return };
    let _one = ONE_RIG_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (_server, url) = start_server();
    let sse_page = format!("{url}?close_after=5");
    let page = format!("{url}?poll=1");
    let dir = TempDir::new("preview-browser");
    let dump = |n: u32, page: &str| {
        let profile = dir.path().join(format!("chromium-{n}"));
        let dom = run_chromium(
            &browser,
            &profile,
            page,
            &["--virtual-time-budget=2500", "--dump-dom"],
            Duration::from_secs(60),
        );
        body_data(&dom)
    };

    // Let the feed produce some data first.
    std::thread::sleep(Duration::from_secs(2));
    let first = dump(1, &sse_page);
    std::thread::sleep(Duration::from_secs(4));
    let second = dump(2, &sse_page);
    let polled = dump(3, &page);
    eprintln!("first:  {first:?}\nsecond: {second:?}\npolled: {polled:?}");

    for d in [&first, &second] {
        assert_eq!(d.get("mode").map(String::as_str), Some("sse"), "{d:?}");
        assert_eq!(
            num(d, "updates"),
            5,
            "not all SSE messages reached the page: {d:?}"
        );
        assert_eq!(d.get("closed").map(String::as_str), Some("1"), "{d:?}");
    }
    assert_eq!(polled.get("mode").map(String::as_str), Some("poll"));
    assert_eq!(
        polled.get("connected").map(String::as_str),
        Some("1"),
        "{polled:?}"
    );
    assert!(
        num(&polled, "updates") >= 1,
        "no poll reached the page: {polled:?}"
    );
    assert!(num(&polled, "trials") >= num(&second, "trials"));
    for d in [&first, &second, &polled] {
        assert_eq!(d.get("connected").map(String::as_str), Some("1"), "{d:?}");
        assert!(d.get("error").is_none(), "page error: {d:?}");
        // No label image in the demo: the 8 x 8 grid of tiles.
        assert_eq!(num(d, "rois"), 64);
        assert!(num(d, "lever-points") > 0 && num(d, "lever-shown") > 0);
        assert!(num(d, "heatmap-rows") > 0 && num(d, "heatmap-shown") > 0);
    }
    assert!(
        num(&second, "trials") > num(&first, "trials"),
        "trial count did not update"
    );
    assert!(
        num(&second, "lever-points") > num(&first, "lever-points"),
        "lever trace did not update"
    );
    assert!(
        num(&second, "heatmap-rows") > num(&first, "heatmap-rows"),
        "heatmap did not update"
    );
    assert!(num(&second, "now-us") > num(&first, "now-us"));
    // The session's task on the page: its mouse, its threshold (the lever
    // plot's line), reaction times for the histogram.
    for d in [&second, &polled] {
        assert!(
            d.get("session").is_some_and(|m| !m.is_empty()),
            "the running session's mouse: {d:?}"
        );
        let thr: f64 = d
            .get("threshold-mm")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("threshold on the page: {d:?}"));
        assert!(thr > 0.0, "{d:?}");
        assert!(num(d, "rt-count") >= 1, "reaction times: {d:?}");
        // The ROI outlines are thin lines: most of the mean image shows.
        let cover: f64 = d
            .get("outline-cover")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("outline cover: {d:?}"));
        assert!(
            cover > 0.0 && cover < 0.25,
            "outlines cover {:.1} % of the mean image: {d:?}",
            cover * 100.0
        );
    }
    // The licks, the task state and the motion trace: the demo's mouse
    // licks after its rewards, the task moves through its states, the
    // demo's imaging is motion corrected.
    for d in [&first, &second, &polled] {
        let state = d.get("task-state").map_or("", String::as_str);
        assert!(TASK_STATES.contains(&state), "task state {state:?}: {d:?}");
    }
    assert!(
        num(&second, "task-changes") > num(&first, "task-changes"),
        "the task state did not change: {first:?} {second:?}"
    );
    for d in [&second, &polled] {
        assert!(
            num(d, "licks") > 0 && num(d, "licks-shown") > 0,
            "licks: {d:?}"
        );
        assert!(
            num(d, "motion-points") > 0 && num(d, "motion-shown") > 0,
            "motion: {d:?}"
        );
        assert!(
            num(d, "success20") <= 100,
            "success over the last 20 trials: {d:?}"
        );
    }
    assert!(
        num(&polled, "lick-rows") > 0 && num(&polled, "lick-row-licks") > 0,
        "the cue-aligned lick raster: {polled:?}"
    );
    // An ROI picked (as a click does; ?roi=N for a test) is drawn as a trace.
    let picked = dump(4, &format!("{url}?poll=1&roi=5"));
    assert_eq!(
        picked.get("selected-roi").map(String::as_str),
        Some("4"),
        "{picked:?}"
    );

    let png = profile_dir()
        .parent()
        .expect("target dir")
        .join("preview.png");
    let _ = std::fs::remove_file(&png);
    let profile = dir.path().join("chromium-shot");
    let shot_page = format!("{url}?poll=1&roi=5");
    run_chromium(
        &browser,
        &profile,
        &shot_page,
        &[
            "--virtual-time-budget=2500",
            "--window-size=1280,1400",
            "--hide-scrollbars",
            &format!("--screenshot={}", png.display()),
        ],
        Duration::from_secs(60),
    );
    let bytes =
        std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display()));
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "bad screenshot"
    );
    eprintln!("screenshot: {}", png.display());
}

/// `rig-sim` with its microscope and `rigd` with the preview on a free port.
struct Rig {
    _sim: Sim,
    rigd: Rigd,
    socket: PathBuf,
    url: String,
    shm: String,
    _dir: TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.rigd.signal("INT");
        let _ = Command::new("rm")
            .arg("-f")
            .arg(format!("/dev/shm{}", self.shm))
            .status();
    }
}

fn rig_with_microscope() -> Rig {
    let dir = TempDir::new("preview-sessions");
    let shm = format!("/rig-e2e-{}-preview", std::process::id());
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
            "20",
        ],
    );
    let socket = dir.path().join("rigd.sock");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data");
    let port = rig_tests::room::free_port();
    let config = dir.path().join("rig.toml");
    // Host heartbeats every 20 ms of wall time; the device's watchdog counts
    // device time, 10 times faster.
    std::fs::write(
        &config,
        format!(
            "[rig]\nserial_port = {:?}\n\n[storage]\ndata_root = {:?}\nfsync_interval_ms = 200\n\n\
             [control]\nsocket = {:?}\n\n[preview]\nenabled = true\nport = {port}\n\n\
             [imaging]\nenabled = true\nshm_name = {shm:?}\nwidth = 64\nheight = 48\nchannels = 1\n\n\
             [safety]\nheartbeat_interval_ms = 20\nheartbeat_timeout_ms = 2000\n",
            sim.link.display().to_string(),
            data.display().to_string(),
            socket.display().to_string()
        ),
    )
    .expect("config");
    let rigd = Rigd::start(&config, &socket);
    wait_connected(&socket);
    Rig {
        _sim: sim,
        rigd,
        socket,
        url: format!("http://127.0.0.1:{port}/"),
        shm,
        _dir: dir,
    }
}

/// Rig times (µs) of a finished session's `lick_on` events, and how many
/// task state changes it recorded.
fn session_licks_and_states(dir: &Path) -> (Vec<u64>, usize) {
    let t0: u64 = session_value(dir, "t0_rig_us").parse().expect("t0_rig_us");
    let events = read_tsv(&dir.join("events.tsv"));
    let licks = events
        .iter()
        .filter(|e| e["kind"] == "lick_on")
        .map(|e| {
            let t_s: f64 = e["t_s"].parse().expect("t_s");
            t0 + (t_s * 1e6).round() as u64
        })
        .collect();
    let states = events.iter().filter(|e| e["kind"] == "state").count();
    (licks, states)
}

/// Rig time (µs) of a finished session's first imaging frame.
fn first_frame_us(dir: &Path) -> i64 {
    let t0: i64 = session_value(dir, "t0_rig_us").parse().expect("t0_rig_us");
    let frames = read_tsv(&dir.join("frames.tsv"));
    let first = frames
        .iter()
        .find(|f| f["dropped"] == "0")
        .expect("a frame in frames.tsv");
    let t_s: f64 = first["t_s"].parse().expect("t_s");
    t0 + (t_s * 1e6).round() as i64
}

/// The page's lick marks (`data-lick-times`), rig µs.
fn page_licks(d: &HashMap<String, String>) -> Vec<u64> {
    d.get("lick-times")
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
        .filter(|t| !t.is_empty())
        .map(|t| t.parse().unwrap_or_else(|_| panic!("lick time {t:?}")))
        .collect()
}

/// Every lick on the page is one of the session's own (to the µs).
fn assert_licks_of(page: &[u64], session: &[u64], what: &str) {
    for &t in page {
        assert!(
            session.iter().any(|&s| s.abs_diff(t) <= 1),
            "{what}: the page shows a lick at {t} µs that is not the session's ({} of its licks)",
            session.len()
        );
    }
}

#[test]
fn licks_task_state_and_motion_start_afresh_at_a_new_session() {
    let Some(browser) = chromium() else { return };
    let _one = ONE_RIG_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let rig = rig_with_microscope();
    let dir = TempDir::new("preview-sessions-browser");
    let mut n = 0;
    let mut dump = |page: &str| {
        n += 1;
        let profile = dir.path().join(format!("chromium-{n}"));
        let dom = run_chromium(
            &browser,
            &profile,
            page,
            &["--virtual-time-budget=2500", "--dump-dom"],
            Duration::from_secs(60),
        );
        body_data(&dom)
    };
    let page = format!("{}?poll=1", rig.url);

    // Session A runs a while: its licks, task states and motion on the page.
    let a_dir = start_session(&rig.socket, "PVA");
    std::thread::sleep(Duration::from_secs(8));
    let a1 = dump(&page);
    std::thread::sleep(Duration::from_secs(3));
    let a2 = dump(&page);
    eprintln!("A1: {a1:?}\nA2: {a2:?}");
    for d in [&a1, &a2] {
        assert_eq!(d.get("session").map(String::as_str), Some("PVA"), "{d:?}");
        let state = d.get("task-state").map_or("", String::as_str);
        assert!(TASK_STATES.contains(&state), "task state {state:?}: {d:?}");
        assert!(num(d, "task-changes") > 0, "{d:?}");
        assert!(
            num(d, "motion-points") > 0 && num(d, "motion-shown") > 0,
            "{d:?}"
        );
    }
    assert!(
        num(&a2, "task-changes") > num(&a1, "task-changes"),
        "the task state did not change"
    );
    assert!(num(&a2, "licks") > 0, "no lick reached the page: {a2:?}");
    assert!(
        num(&a2, "lick-rows") > 0 && num(&a2, "lick-row-licks") > 0,
        "the cue-aligned lick raster is empty: {a2:?}"
    );
    stop_session(&rig.socket);
    wait_idle(&rig.socket, 60);

    // Session B: the page starts afresh.
    let b_dir = start_session(&rig.socket, "PVB");
    let b1 = dump(&page);
    std::thread::sleep(Duration::from_secs(6));
    let b2 = dump(&page);
    stop_session(&rig.socket);
    wait_idle(&rig.socket, 60);
    eprintln!("B1: {b1:?}\nB2: {b2:?}");
    for d in [&b1, &b2] {
        assert_eq!(d.get("session").map(String::as_str), Some("PVB"), "{d:?}");
        let state = d.get("task-state").map_or("", String::as_str);
        assert!(TASK_STATES.contains(&state), "task state {state:?}: {d:?}");
    }
    assert!(
        num(&b2, "licks") > 0,
        "no lick of B reached the page: {b2:?}"
    );
    assert!(num(&b2, "motion-points") > 0, "no motion of B: {b2:?}");

    // Accounting against the sessions' files: each page shows its own
    // session's licks and state changes only.
    let (a_licks, _) = session_licks_and_states(&a_dir);
    let (b_licks, b_states) = session_licks_and_states(&b_dir);
    assert_licks_of(&page_licks(&a2), &a_licks, "session A");
    for d in [&b1, &b2] {
        assert_licks_of(&page_licks(d), &b_licks, "session B");
        assert!(
            page_licks(d).iter().all(|t| !a_licks.contains(t)),
            "a lick of session A on B's page: {d:?}"
        );
        assert!(
            num(d, "licks") as usize <= b_licks.len(),
            "more licks counted than B had: {d:?}"
        );
        assert!(
            num(d, "task-changes") as usize <= b_states,
            "more task state changes than B recorded ({b_states}): {d:?}"
        );
        // The motion trace is B's frames' (bins of 100 ms, centred).
        if num(d, "motion-shown") > 0 {
            let first: i64 = d["motion-first-us"].parse().expect("motion-first-us");
            assert!(
                first + 50_000 >= first_frame_us(&b_dir),
                "a motion bin before B's first frame: {d:?}"
            );
        }
    }
}
