//! Headless Chromium for the tests of pages: find the browser (failing
//! under `RIG_REQUIRE_BROWSER=1` when it is missing), run it on a URL, read
//! the `data-*` attributes a page puts on its `<body>`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The browser: `$RIG_CHROMIUM`, else `/usr/bin/chromium`. None (with a
/// note) when it is missing, unless `RIG_REQUIRE_BROWSER=1`: then the test
/// fails.
pub fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("RIG_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var("RIG_REQUIRE_BROWSER").as_deref() != Ok("1"),
        "RIG_REQUIRE_BROWSER=1 but there is no browser at {} (apt-get install chromium)",
        path.display()
    );
    eprintln!(
        "SKIP browser check: no browser at {} (apt-get install chromium; set RIG_REQUIRE_BROWSER=1 to make this fail)",
        path.display()
    );
    None
}

/// Run chromium headless on `url` with `extra` args, killing it after
/// `limit`; returns its stdout.
pub fn run_chromium(
    browser: &Path,
    profile: &Path,
    url: &str,
    extra: &[&str],
    limit: Duration,
) -> String {
    let out = profile.with_extension("out");
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", browser.display()));
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait for chromium") {
            assert!(st.success(), "chromium exited with {st}");
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within {limit:?} on {url}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::read_to_string(&out).expect("chromium output")
}

/// The `data-*` attributes of the dumped `<body>`.
pub fn body_data(dom: &str) -> HashMap<String, String> {
    let start = dom
        .find("<body")
        .unwrap_or_else(|| panic!("no <body> in dump: {dom}"));
    let tag = &dom[start..start + dom[start..].find('>').expect("end of <body>")];
    let mut out = HashMap::new();
    let mut rest = tag;
    while let Some(i) = rest.find(" data-") {
        rest = &rest[i + " data-".len()..];
        let Some((name, after)) = rest.split_once("=\"") else {
            break;
        };
        let Some((value, after)) = after.split_once('"') else {
            break;
        };
        out.insert(name.to_owned(), value.to_owned());
        rest = after;
    }
    out
}
