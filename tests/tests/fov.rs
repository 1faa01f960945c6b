//! The same neurons every day: a simulated mouse imaged on day 1, its mean
//! image made its imaging reference (`rigctl mouse reference set`), then on
//! day 7 the simulated microscope's field of view moved by a known shift.
//! The real rigd checks the field of view before the task starts: a small
//! shift is measured (within 1 px) and the session registers its frames
//! against the mouse's reference with the mouse's ROIs; a shift beyond the
//! tolerance (or a turn beyond 2°) is refused with the fix named, started
//! with `--accept-fov`, or warned under `on_fail = "warn"`; a check that waits for frames keeps
//! rigd answering, and a stop cancels it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rig_tests::browser::{body_data, chromium, run_chromium};
use rig_tests::{read_tsv, rigctl, stop_session, wait_connected, wait_idle, Rigd, Sim, TempDir};
use serde_json::Value;

const W: u32 = 128;
const H: u32 = 128;

struct Lab {
    dir: TempDir,
    data: PathBuf,
    shm: String,
}

impl Lab {
    fn new() -> Self {
        let dir = TempDir::new("fov");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data");
        Self {
            shm: format!("/rig-e2e-{}-fov", std::process::id()),
            dir,
            data,
        }
    }

    /// The rig's configuration for a simulator at `link`.
    fn config(&self, name: &str, link: &Path, on_fail: &str, timeout_s: u32) -> (PathBuf, PathBuf) {
        self.config_with_preview(name, link, on_fail, timeout_s, None)
    }

    fn config_with_preview(
        &self,
        name: &str,
        link: &Path,
        on_fail: &str,
        timeout_s: u32,
        preview_port: Option<u16>,
    ) -> (PathBuf, PathBuf) {
        let preview = match preview_port {
            Some(port) => format!("enabled = true\nport = {port}"),
            None => "enabled = false".to_owned(),
        };
        let socket = self.dir.path().join(format!("{name}.sock"));
        let config = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[rig]\nserial_port = {:?}\n\n[storage]\ndata_root = {:?}\nfsync_interval_ms = 200\n\n\
                 [control]\nsocket = {:?}\n\n[preview]\n{preview}\n\n\
                 [imaging]\nenabled = true\nshm_name = {:?}\nwidth = {W}\nheight = {H}\nchannels = 1\n\
                 pixel_size_um = 1.5\n\n\
                 [imaging.fov_check]\nframes = 30\ntimeout_s = {timeout_s}\nmax_shift_px = 8.0\n\
                 min_correlation = 0.5\non_fail = {on_fail:?}\n",
                link.display().to_string(),
                self.data.display().to_string(),
                socket.display().to_string(),
                self.shm,
            ),
        )
        .expect("config");
        (config, socket)
    }

    /// A simulator for `day` with its field of view moved by `offset`.
    fn sim(&self, name: &str, day: u32, offset: &str, extra: &[&str]) -> (Sim, TempDir) {
        let dir = TempDir::new(&format!("fov-{name}-sim"));
        let truth = dir.path().join("truth");
        let day = day.to_string();
        let size = format!("{W}x{H}");
        let mut args = vec![
            "--microscope",
            &self.shm,
            "--microscope-size",
            &size,
            "--neurons",
            "60",
            "--day",
            &day,
            "--fov-offset",
            offset,
            "--microscope-truth",
            truth.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        (Sim::start(dir.path(), &args), dir)
    }

    fn sessions(&self, mouse: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.data.join(mouse))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn rigctl_data(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(rig_tests::bin("rigctl"))
            .arg("--data-root")
            .arg(&self.data)
            .args(args)
            .output()
            .expect("rigctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = frame_ring::unlink_ring(&self.shm);
    }
}

/// `rigctl start`, retried while the first lever sample is not in yet;
/// returns (exit code, the JSON answer or Null, stderr).
fn start(socket: &Path, extra: &[&str]) -> (i32, Value, String) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut args = vec!["start", "--mouse", "M7", "--json"];
        args.extend_from_slice(extra);
        let (code, out, err) = rigctl(socket, &args);
        if code != 0 && err.contains("no lever sample") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let v = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
        return (code, v, err);
    }
}

fn session_toml(dir: &Path) -> toml::Table {
    let text = std::fs::read_to_string(dir.join("session.toml")).expect("session.toml");
    toml::from_str(&text).expect("session.toml parses")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn the_field_of_view_is_checked_against_the_mouses_day_1_reference() {
    let lab = Lab::new();
    let (code, out, err) = lab.rigctl_data(&[
        "mouse",
        "add",
        "M7",
        "--sex",
        "F",
        "--date-of-birth",
        "2026-09-01",
        "--baseline-weight-g",
        "24",
    ]);
    assert_eq!(code, 0, "mouse add: {out}{err}");

    // ---- Day 1: no reference yet, so no check; the session's mean image
    // becomes the mouse's reference, with the microscope's true ROIs.
    let (sim, sim_dir) = lab.sim("day1", 1, "0,0", &[]);
    let (config, socket) = lab.config("rig", &sim.link, "refuse", 30);
    let rigd = Rigd::start(&config, &socket);
    wait_connected(&socket);
    let (code, v, err) = start(&socket, &[]);
    assert_eq!(code, 0, "day 1 start: {v} {err}");
    assert!(v.get("fov_check").is_none(), "no reference, no check: {v}");
    let day1 = PathBuf::from(v["session_dir"].as_str().expect("session_dir"));
    std::thread::sleep(Duration::from_secs(5));
    stop_session(&socket);
    wait_idle(&socket, 60);
    drop(rigd);
    drop(sim);
    assert!(day1.join("mean_image.npy").is_file());
    assert!(session_toml(&day1).get("fov_check").is_none());

    let labels = sim_dir.path().join("truth").join("labels.npy");
    let (code, out, err) = lab.rigctl_data(&[
        "mouse",
        "reference",
        "set",
        "M7",
        "--from-session",
        day1.to_str().expect("utf-8"),
        "--labels",
        labels.to_str().expect("utf-8"),
        "--note",
        "day 1 field of view",
    ]);
    assert_eq!(code, 0, "reference set: {out} {err}");
    assert!(out.contains("imaging_reference.npy"), "{out}");
    let (code, out, _) = lab.rigctl_data(&["mouse", "reference", "show", "M7"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(day1.to_str().expect("utf-8")) && out.contains("imaging_roi_labels.npy"),
        "{out}"
    );
    // A label image of another size is refused, naming the file.
    let small = lab.dir.path().join("small.npy");
    std::fs::write(&small, npy_u16(&[2, 2], &[1, 1, 0, 0])).expect("small");
    let (code, _, err) = lab.rigctl_data(&[
        "mouse",
        "reference",
        "set",
        "M7",
        "--from-session",
        day1.to_str().expect("utf-8"),
        "--labels",
        small.to_str().expect("utf-8"),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("small.npy"), "{err}");
    // The refused set changed nothing.
    let (_, out, _) = lab.rigctl_data(&["mouse", "reference", "show", "M7"]);
    assert!(out.contains("imaging_roi_labels.npy"), "{out}");

    // ---- Day 7, the field moved by (3.4, -2.2) px: within the 8 px
    // tolerance. The check measures it, the session registers against the
    // mouse's reference and uses its ROIs.
    let (sim, _keep) = lab.sim("day7", 7, "3.4,-2.2", &[]);
    let port = rig_tests::room::free_port();
    let (config, socket) = lab.config_with_preview("rig", &sim.link, "refuse", 30, Some(port));
    let rigd = Rigd::start(&config, &socket);
    wait_connected(&socket);
    let (code, v, err) = start(&socket, &[]);
    assert_eq!(code, 0, "day 7 start: {v} {err}");
    let f = &v["fov_check"];
    println!("day 7, true shift (+3.4, -2.2) px: {f}");
    assert_eq!(f["verdict"], "pass", "{v}");
    assert_eq!(f["reference"], "mouse", "{v}");
    let (dx, dy) = (
        f["dx_px"].as_f64().expect("dx"),
        f["dy_px"].as_f64().expect("dy"),
    );
    assert!((dx - 3.4).abs() < 1.0 && (dy + 2.2).abs() < 1.0, "{f}");
    assert!(f["correlation"].as_f64().expect("r") > 0.5, "{f}");
    let um = f["shift_um"].as_f64().expect("shift_um");
    assert!((um - 1.5 * dx.hypot(dy)).abs() < 0.05, "{f}");
    let day7 = PathBuf::from(v["session_dir"].as_str().expect("session_dir"));
    std::thread::sleep(Duration::from_secs(5));
    // What the experimenter sees: the check on the live page, and the
    // session's mean image over the reference.
    if let Some(browser) = chromium() {
        let url = format!("http://127.0.0.1:{port}/?poll=1&overlay=1");
        let profile = lab.dir.path().join("chromium-fov");
        let dom = run_chromium(
            &browser,
            &profile,
            &url,
            &["--virtual-time-budget=4000", "--dump-dom"],
            Duration::from_secs(90),
        );
        let d = body_data(&dom);
        assert_eq!(
            d.get("fov-verdict").map(String::as_str),
            Some("pass"),
            "{d:?}"
        );
        let page_dx: f64 = d["fov-dx"].parse().expect("fov-dx");
        assert_eq!(page_dx, dx, "the page shows the check's shift");
        assert_eq!(
            d.get("ref-overlay").map(String::as_str),
            Some("on"),
            "{d:?}"
        );
        // The ROIs (drawn on day 1) are outlined where their cells are in
        // today's raw mean image: moved by the registration's shift.
        let (sx, sy) = d["roi-shift"].split_once(',').expect("roi-shift");
        let (sx, sy): (f64, f64) = (sx.parse().expect("x"), sy.parse().expect("y"));
        assert!(
            (sx - 3.4).abs() < 1.0 && (sy + 2.2).abs() < 1.0,
            "roi shift ({sx}, {sy})"
        );
        assert!(
            dom.contains("field of view vs mouse reference: pass"),
            "{dom}"
        );
        let png = rig_tests::bin("rigd")
            .parent()
            .expect("target dir")
            .join("fov-preview.png");
        run_chromium(
            &browser,
            &lab.dir.path().join("chromium-fov-shot"),
            &url,
            &[
                "--virtual-time-budget=4000",
                "--window-size=1280,1400",
                &format!("--screenshot={}", png.display()),
            ],
            Duration::from_secs(90),
        );
        let bytes = std::fs::read(&png).expect("screenshot");
        assert!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
            "bad screenshot"
        );
        eprintln!("screenshot: {}", png.display());
    }
    stop_session(&socket);
    wait_idle(&socket, 60);

    let meta = session_toml(&day7);
    let check = meta["fov_check"].as_table().expect("[fov_check]");
    assert_eq!(check["verdict"].as_str(), Some("pass"));
    assert_eq!(check["frames"].as_integer(), Some(30));
    assert_eq!(check["dx_px"].as_float(), Some(dx));
    let reference = meta["imaging_reference"]
        .as_table()
        .expect("[imaging_reference]");
    assert_eq!(reference["source"].as_str(), Some("mouse"));
    assert_eq!(
        reference["from_session"].as_str(),
        Some(day1.to_str().expect("utf-8"))
    );
    for f in [
        "fov_check_mean.npy",
        "reference_image.npy",
        "roi_labels.npy",
    ] {
        assert!(day7.join(f).is_file(), "{f} missing in {}", day7.display());
    }
    // The mouse's 60 ROIs, not the 8 x 8 grid.
    assert_eq!(read_tsv(&day7.join("rois.tsv")).len(), 60);
    // Every frame registered against day 1 carries the day's shift.
    let shifts: Vec<(f64, f64)> = read_tsv(&day7.join("motion.tsv"))
        .iter()
        .filter_map(|r| Some((r["dx_px"].parse().ok()?, r["dy_px"].parse().ok()?)))
        .collect();
    assert!(shifts.len() > 30, "{} registered frames", shifts.len());
    let mdx = median(shifts.iter().map(|s| s.0).collect());
    let mdy = median(shifts.iter().map(|s| s.1).collect());
    assert!(
        (mdx - 3.4).abs() < 1.0 && (mdy + 2.2).abs() < 1.0,
        "motion ({mdx}, {mdy})"
    );
    python_sees_the_check(&day7, dx);
    drop(rigd);
    drop(sim);

    // ---- Day 7, moved by (14, 0) px: beyond the tolerance. Refused with
    // the numbers and the fixes, leaving no session folder; then started
    // with --accept-fov, recorded.
    let before = lab.sessions("M7").len();
    let (sim, _keep) = lab.sim("far", 7, "14,0", &[]);
    let (config, socket) = lab.config("rig", &sim.link, "refuse", 30);
    let rigd = Rigd::start(&config, &socket);
    wait_connected(&socket);
    let (code, _, err) = start(&socket, &[]);
    assert_ne!(code, 0, "a 14 px shift must be refused");
    println!("refused: {err}");
    assert!(
        err.contains("does not match mouse M7's reference")
            && (err.contains("shifted 13.") || err.contains("shifted 14."))
            && err.contains("more than the 8.0 px (12.0 µm) allowed")
            && err.contains("--accept-fov")
            && err.contains("rigctl mouse reference set M7"),
        "{err}"
    );
    assert_eq!(
        lab.sessions("M7").len(),
        before,
        "a refused start leaves no folder"
    );
    let (code, v, err) = start(&socket, &["--accept-fov", "--operator", "ana"]);
    assert_eq!(code, 0, "{v} {err}");
    assert_eq!(v["fov_check"]["verdict"], "accepted", "{v}");
    assert!(
        (v["fov_check"]["dx_px"].as_f64().expect("dx") - 14.0).abs() < 1.0,
        "{v}"
    );
    let accepted = PathBuf::from(v["session_dir"].as_str().expect("dir"));
    stop_session(&socket);
    wait_idle(&socket, 60);
    let check = session_toml(&accepted)["fov_check"].clone();
    assert_eq!(check["verdict"].as_str(), Some("accepted"));
    assert_eq!(check["accepted_by_request"].as_bool(), Some(true));
    assert_eq!(check["operator"].as_str(), Some("ana"));
    drop(rigd);

    // ---- The same, with on_fail = "warn": starts, says why.
    let (config, socket) = lab.config("warn", &sim.link, "warn", 30);
    let rigd = Rigd::start(&config, &socket);
    wait_connected(&socket);
    let (code, v, err) = start(&socket, &[]);
    assert_eq!(code, 0, "{v} {err}");
    assert_eq!(v["fov_check"]["verdict"], "warned", "{v}");
    let warnings = v["warnings"].to_string();
    assert!(
        warnings.contains("field of view (warned): shifted 13.")
            || warnings.contains("field of view (warned): shifted 14."),
        "{warnings}"
    );
    stop_session(&socket);
    wait_idle(&socket, 60);
    drop(rigd);
    drop(sim);

    // ---- The microscope turned by 3°: beyond the 2° allowed, refused.
    let (sim, _keep) = lab.sim("turned", 7, "0,0", &["--fov-rotation", "3"]);
    let (config, socket) = lab.config("rig", &sim.link, "refuse", 30);
    let rigd = Rigd::start(&config, &socket);
    wait_connected(&socket);
    let (code, _, err) = start(&socket, &[]);
    assert_ne!(code, 0, "a 3° rotation must be refused");
    println!("rotated: {err}");
    assert!(
        err.contains("rotated +2.") || err.contains("rotated +3."),
        "{err}"
    );
    assert!(err.contains("more than the 2.0° allowed"), "{err}");
    drop(rigd);
    drop(sim);

    // ---- A microscope that never acquires: the check waits for frames,
    // rigd keeps answering meanwhile, and a stop cancels the start.
    let (sim, _keep) = lab.sim("dark", 7, "0,0", &["--microscope-start-frame", "1000000"]);
    let (config, socket) = lab.config("dark", &sim.link, "refuse", 60);
    let rigd = Rigd::start(&config, &socket);
    wait_connected(&socket);
    let before = lab.sessions("M7").len();
    let waiting = {
        let socket = socket.clone();
        std::thread::spawn(move || start(&socket, &[]))
    };
    // The start is waiting (its check has no frames): status answers, and
    // says so.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, out, err) = rigctl(&socket, &["status", "--json"]);
        assert_eq!(code, 0, "status during the check: {out}{err}");
        if out.contains("\"checking_fov\":\"M7\"") {
            assert!(out.contains("\"state\":\"idle\""), "{out}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no start waiting for its check: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Another start meanwhile is told to wait.
    let (code, _, err) = rigctl(&socket, &["start", "--mouse", "M8"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("the start for M7 is checking its field of view"),
        "{err}"
    );
    let (code, _, err) = rigctl(&socket, &["stop"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cancelled during its field-of-view check"),
        "{err}"
    );
    let (code, _, err) = waiting.join().expect("start thread");
    assert_ne!(code, 0);
    assert!(
        err.contains("was cancelled during its field-of-view check"),
        "{err}"
    );
    assert_eq!(lab.sessions("M7").len(), before);
    drop(rigd);
    drop(sim);
}

/// The Python loader reads the check, the reference and the session's own
/// copy of the labels; the NWB export carries the summary images. Needs
/// numpy and pynwb in `$RIG_PYTHON` (required under `RIG_REQUIRE_NWB=1`).
fn python_sees_the_check(session: &Path, dx: f64) {
    let py = |args: &[&std::ffi::OsStr]| {
        Command::new(rig_tests::python())
            .args(args)
            .env("PYTHONPATH", rig_tests::checkout_pythonpath())
            .env("PYTHONWARNINGS", "ignore")
            .output()
            .expect("run python")
    };
    let probe = py(&["-c".as_ref(), "import numpy, pynwb".as_ref()]);
    if !probe.status.success() {
        assert!(
            std::env::var("RIG_REQUIRE_NWB").as_deref() != Ok("1"),
            "RIG_REQUIRE_NWB=1 but {} cannot import numpy and pynwb",
            rig_tests::python().display()
        );
        eprintln!(
            "SKIP the Python check: no numpy/pynwb in {}",
            rig_tests::python().display()
        );
        return;
    }
    let code = r#"
import sys
from pathlib import Path
import rigsession
from rigsession import nwb
from pynwb import NWBHDF5IO
s = rigsession.Session(sys.argv[1])
print("verdict", s.fov_check["verdict"])
print("dx", s.fov_check["dx_px"])
print("source", s.imaging_reference["source"])
print("ref", s.reference_image().shape)
print("labels", int(s.roi_labels().max()))
print("fovmean", s.fov_check_mean().shape)
out = Path(sys.argv[2])
nwb.export(sys.argv[1], out)
with NWBHDF5IO(str(out), "r") as io:
    f = io.read()
    imgs = f.processing["ophys"]["SummaryImages"]
    print("images", ",".join(sorted(imgs.images.keys())))
    print("refdesc", imgs.images["reference"].description)
"#;
    let out_nwb = session.with_extension("nwb");
    let out = py(&[
        "-c".as_ref(),
        code.as_ref(),
        session.as_os_str(),
        out_nwb.as_os_str(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("verdict pass\n"), "{text}");
    assert!(text.contains(&format!("dx {dx}\n")), "{text}");
    assert!(text.contains("source mouse\n"), "{text}");
    assert!(text.contains(&format!("ref ({H}, {W})\n")), "{text}");
    assert!(text.contains("labels 60\n"), "{text}");
    assert!(text.contains(&format!("fovmean ({H}, {W})\n")), "{text}");
    assert!(text.contains("images fov_check,mean,reference\n"), "{text}");
    assert!(
        text.contains("the mouse's imaging reference, set"),
        "{text}"
    );
}

/// A little uint16 NPY file, C order.
fn npy_u16(shape: &[usize], values: &[u16]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
    let mut header = format!(
        "{{'descr': '<u2', 'fortran_order': False, 'shape': ({}), }}",
        dims.join(", ")
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}
