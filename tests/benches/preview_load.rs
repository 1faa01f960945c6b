//! Imaging ingest with a browser connected: `rigd demo` at real-time speed
//! (the simulated microscope at 28.7 Hz, online motion correction and dF/F)
//! while headless Chromium keeps the live preview page open on its
//! Server-Sent Events stream. Reports the frames the demo ingested and how many
//! were dropped (the demo's own last line, from frames.tsv).
//!
//! Run: `cargo bench -p rig-tests --bench preview_load [-- --minutes M]`.
//! Needs /usr/bin/chromium (or $RIG_CHROMIUM). Target: zero drops at 30 Hz.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use rig_tests::{bin, TempDir};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let minutes = args
        .iter()
        .position(|a| a == "--minutes")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "2".into());
    let browser = std::env::var("RIG_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let data = TempDir::new("preview-load");
    let mut demo = Command::new(bin("rigd"))
        .args(["demo", "--speed", "1", "--minutes", &minutes, "--data"])
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rigd demo");
    let mut out = BufReader::new(demo.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("address line");
    let url = line
        .trim()
        .strip_prefix("preview: ")
        .expect("preview address")
        .to_owned();
    let profile = data.path().join("chromium-profile");
    // A live page: no --dump-dom, so Chromium keeps the SSE stream open until killed.
    let mut chromium = Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(&url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {browser}: {e}"));
    let mut imaging = String::new();
    let mut summary = String::new();
    for l in out.lines().map_while(Result::ok) {
        if l.starts_with("imaging:") {
            imaging = l.clone();
        }
        if l.starts_with("trials ") {
            summary = l.clone();
        }
    }
    let browser_alive = matches!(chromium.try_wait(), Ok(None));
    let _ = chromium.kill();
    let _ = chromium.wait();
    assert!(
        browser_alive,
        "Chromium exited before the session ended: the page was not open throughout"
    );
    let _ = demo.wait();
    println!(
        "rigd demo at 1x for {minutes} min, 256x256 at 28.7 Hz, Chromium on the preview page (SSE)"
    );
    println!("{summary}");
    println!("{imaging}");
}
