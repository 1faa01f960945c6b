//! One dashboard for the room: the alert rules of packaging/prometheus/
//! checked and unit-tested with `promtool`, and a real Prometheus server
//! scraping two rigd instances on loopback during sessions, evaluating every
//! rule (some firing, some pending, on the rigs' own numbers), and answering
//! every query of the Grafana dashboard for both rigs.
//!
//! Needs Debian's `prometheus` package (prometheus and promtool). Without it
//! the tests print that they were not run, and fail when
//! RIG_REQUIRE_PROMETHEUS is set (CI sets it).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rig_tests::room::{add_rig, free_port};
use rig_tests::{rigctl, start_session, wait_connected, wait_idle, workspace_root, TempDir};

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("RIG_REQUIRE_PROMETHEUS").is_none(),
            "RIG_REQUIRE_PROMETHEUS is set but {tool} is missing (Debian package prometheus)"
        );
        eprintln!("NOT RUN: {tool} is not installed (Debian package prometheus)");
    }
    ok
}

fn packaging() -> PathBuf {
    workspace_root().join("packaging/prometheus")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(packaging())
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// The alert names of rigd-rules.yml, in file order.
fn alert_names() -> Vec<String> {
    std::fs::read_to_string(packaging().join("rigd-rules.yml"))
        .expect("rules")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    if !have("promtool") {
        return;
    }
    let names = alert_names();
    let out = promtool(&["check", "rules", "rigd-rules.yml"]);
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", names.len())),
        "{out}"
    );
    let out = promtool(&["test", "rules", "rigd-rules.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert has a unit test.
    let tests = std::fs::read_to_string(packaging().join("rigd-rules.test.yml")).expect("tests");
    for n in &names {
        assert!(
            tests.contains(&format!("alertname: {n}\n")),
            "no promtool test for {n}"
        );
    }
    let out = promtool(&["check", "config", "prometheus.yml"]);
    assert!(out.contains("is valid prometheus config file"), "{out}");
}

/// GET `path` from 127.0.0.1:`port`: (status, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    let Some((head, body)) = raw.split_once("\r\n\r\n") else {
        return (0, raw);
    };
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus API call; panics unless it answers `success`.
fn api(port: u16, path: &str) -> serde_json::Value {
    let (status, body) = http_get(port, path);
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {status} {e}: {body}"));
    assert_eq!(v["status"], "success", "GET {path}: {v}");
    v["data"].clone()
}

fn query(port: u16, q: &str) -> Vec<serde_json::Value> {
    api(port, &format!("/api/v1/query?query={}", encode(q)))["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The value of each series of `q`, by its `rig` label.
fn by_rig(port: u16, q: &str) -> Vec<(String, f64)> {
    query(port, q)
        .iter()
        .map(|s| {
            (
                s["metric"]["rig"].as_str().unwrap_or("?").to_owned(),
                s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN),
            )
        })
        .collect()
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_prometheus(dir: &Path, targets: &[(&str, u16)]) -> (Prometheus, u16) {
    // The packaged scrape job, with the test's targets and a 1 s interval.
    let packaged = std::fs::read_to_string(packaging().join("prometheus.yml")).expect("config");
    assert!(packaged.contains("- job_name: rigd\n") && packaged.contains("metrics_path: /metrics"));
    let mut statics = String::new();
    for (rig, port) in targets {
        statics.push_str(&format!(
            "      - targets: [\"127.0.0.1:{port}\"]\n        labels:\n          rig: {rig}\n"
        ));
    }
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {:?}\n\
             scrape_configs:\n  - job_name: rigd\n    metrics_path: /metrics\n    \
             scrape_timeout: 1s\n    static_configs:\n{statics}",
            packaging().join("rigd-rules.yml").display().to_string()
        ),
    )
    .expect("write prometheus.yml");
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    let p = Prometheus(child);
    wait_for("prometheus to be ready", 60, || {
        http_get(port, "/-/ready").0 == 200
    });
    (p, port)
}

#[test]
fn prometheus_scrapes_two_rigs_and_evaluates_every_rule() {
    if !have("prometheus") {
        return;
    }
    let dir = TempDir::new("dashboard");
    let root = dir.path();
    // rigA: a session that ends by itself after 3 trials, and a valve
    // calibration from years ago. rigB: a disk-free limit no disk meets.
    let mut a = add_rig(
        root,
        "rigA",
        true,
        "[task]\nmax_trials = 3\n[valve]\ncalibrated_utc = \"2020-01-01\"\n",
        &["--speed", "5"],
    );
    let mut b = add_rig(
        root,
        "rigB",
        true,
        "[alerts]\ndisk_free_min_mb = 1000000000\n",
        &["--speed", "5", "--seed", "2"],
    );
    a.start_rigd(root);
    b.start_rigd(root);
    wait_connected(&a.socket);
    wait_connected(&b.socket);
    let ports = [
        ("rigA", a.preview_port.expect("preview")),
        ("rigB", b.preview_port.expect("preview")),
    ];
    let (_prom, port) = start_prometheus(root, &ports);

    // Both targets scraped and up.
    wait_for("both targets up", 30, || {
        let t = api(port, "/api/v1/targets");
        let active = t["activeTargets"].as_array().cloned().unwrap_or_default();
        active.len() == 2 && active.iter().all(|t| t["health"] == "up")
    });

    // Sessions on both rigs, seen through Prometheus.
    start_session(&a.socket, "MA");
    start_session(&b.socket, "MB");
    wait_for("both sessions started in Prometheus", 30, || {
        let v = by_rig(port, "rigd_sessions_started_total");
        v.len() == 2 && v.iter().all(|(_, x)| *x >= 1.0)
    });
    wait_for("trials on both rigs", 60, || {
        let v = by_rig(port, "rigd_trials_total");
        v.len() == 2 && v.iter().all(|(_, x)| *x >= 1.0)
    });
    // rigA stops by itself at its trial cap: the auto-stop alert fires.
    wait_idle(&a.socket, 60);
    wait_for("RigSessionAutoStopped firing for rigA", 30, || {
        alerts(port)
            .iter()
            .any(|(n, r, s)| n == "RigSessionAutoStopped" && r == "rigA" && s == "firing")
    });
    // Prometheus's numbers are rigd's own.
    wait_for("rigA's trial count in Prometheus", 30, || {
        by_rig(port, "rigd_trials_total")
            .iter()
            .any(|(r, x)| r == "rigA" && *x == 3.0)
    });

    // rigB: stop its session, then unplug its device (the sim goes away).
    let (code, out, err) = rigctl(&b.socket, &["stop"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_idle(&b.socket, 60);
    drop(b.sim);
    wait_for("rigB's link down in Prometheus", 30, || {
        by_rig(port, "rigd_link_up")
            .iter()
            .any(|(r, x)| r == "rigB" && *x == 0.0)
    });

    // Every rule evaluated, healthy, on data.
    let names = alert_names();
    wait_for("every rule evaluated after the link loss", 30, || {
        let rules = api(port, "/api/v1/rules");
        let all: Vec<serde_json::Value> = rules["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = |n: &str| {
            all.iter().any(|r| {
                r["name"] == n
                    && r["health"] == "ok"
                    && r["lastError"].as_str().unwrap_or("").is_empty()
                    && !r["lastEvaluation"]
                        .as_str()
                        .unwrap_or("0001")
                        .starts_with("0001")
            })
        };
        all.len() == names.len() && names.iter().all(|n| evaluated(n))
    });
    wait_for("the expected alerts", 30, || {
        let al = alerts(port);
        let has = |n: &str, r: &str, states: &[&str]| {
            al.iter()
                .any(|(an, ar, s)| an == n && ar == r && states.contains(&s.as_str()))
        };
        has("RigValveCalibrationOld", "rigA", &["firing"])
            && has("RigDiskLow", "rigB", &["pending", "firing"])
            && has("RigDeviceLost", "rigB", &["pending", "firing"])
            && !al
                .iter()
                .any(|(n, r, _)| n == "RigDeviceLost" && r == "rigA")
            && !al.iter().any(|(n, r, _)| n == "RigDiskLow" && r == "rigA")
    });
    // Healthy rules stay quiet.
    let al = alerts(port);
    for quiet in ["RigdDown", "RigValveSafetyTrip", "RigStorageError"] {
        assert!(!al.iter().any(|(n, _, _)| n == quiet), "{quiet}: {al:?}");
    }

    // The dashboard: the rig variable lists both rigs, and every panel's
    // query runs for each; the plain metrics have a series for each rig.
    let rigs = api(
        port,
        &format!(
            "/api/v1/label/rig/values?{}",
            encode_param("match[]", "rigd_link_up")
        ),
    );
    assert_eq!(rigs, serde_json::json!(["rigA", "rigB"]));
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(packaging().join("grafana-dashboard.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    assert_eq!(
        dash["templating"]["list"][0]["query"]["query"],
        "label_values(rigd_link_up, rig)"
    );
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(exprs.len() >= 20, "{exprs:?}");
    for (rig, _) in ports {
        for e in &exprs {
            let q = e
                .replace("$rig", rig)
                .replace("$__rate_interval", "30s")
                .replace("$__range", "5m");
            let result = query(port, &q);
            let plain = !q.contains('(');
            if plain {
                assert!(
                    result.iter().any(|s| s["metric"]["rig"] == rig),
                    "dashboard query {q} has no series for {rig}"
                );
            }
        }
    }
    drop(a.rigd.take());
}

fn encode_param(k: &str, v: &str) -> String {
    format!("{}={}", encode(k), encode(v))
}

/// (alert name, rig, state) of every active alert.
fn alerts(port: u16) -> Vec<(String, String, String)> {
    api(port, "/api/v1/alerts")["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|a| {
            (
                a["labels"]["alertname"].as_str().unwrap_or("").to_owned(),
                a["labels"]["rig"].as_str().unwrap_or("").to_owned(),
                a["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}
