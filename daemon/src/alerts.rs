//! Alerts: the things someone must hear about when nobody is in the room (a
//! valve safety trip, the rig unreachable for long, the data disk nearly
//! full, a session that stopped by itself or on a disk error).
//!
//! Every alert is logged (error level) and counted; with `[alerts] command`
//! it is also handed to that command — `/bin/sh -c COMMAND` with the alert as
//! one JSON object and a newline on standard input. The command runs on its
//! own short-lived thread, is killed after `command_timeout_s`, and never
//! blocks the supervisor; at most [`MAX_RUNNING`] run at once (more are logged and
//! dropped, so a flapping condition cannot fork-bomb the rig PC).

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rig_config::AlertsSection;
use serde::Serialize;

/// Alert commands allowed to run at the same time.
pub const MAX_RUNNING: usize = 4;

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The device closed the valve by itself: its heartbeat watchdog fired
    /// (the host went quiet) or a valve opening hit its cap.
    ValveSafetyTrip,
    /// The rig has been unreachable for `[alerts] device_lost_s`.
    DeviceLost,
    /// The data root has less than `[alerts] disk_free_min_mb` free.
    DiskLow,
    /// A session ended without anyone asking (a cap, its duration, the mouse
    /// sated).
    SessionAutoStopped,
    /// A disk error ended a session early.
    StorageError,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ValveSafetyTrip => "valve_safety_trip",
            Self::DeviceLost => "device_lost",
            Self::DiskLow => "disk_low",
            Self::SessionAutoStopped => "session_auto_stopped",
            Self::StorageError => "storage_error",
        }
    }
}

/// One alert, as the command receives it (JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub kind: AlertKind,
    /// `"critical"` (the animal or the data may be at risk), `"warning"`
    /// (someone should look) or `"info"` (a planned end, e.g. the session's
    /// duration or trial count reached).
    pub severity: &'static str,
    /// One human sentence: what happened and what to do.
    pub message: String,
    pub rig: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mouse: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_dir: Option<String>,
    /// RFC 3339 UTC, filled in when raised.
    pub time_utc: String,
    /// Kind-specific numbers (fault code, seconds lost, MB free, reason...).
    pub details: serde_json::Value,
    /// Alerts of this kind held back since the last one sent (at most one
    /// per kind per [`REPEAT_WINDOW`]); absent when none.
    #[serde(skip_serializing_if = "is_zero")]
    pub repeats: u64,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Alert {
    pub fn new(kind: AlertKind, severity: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            severity,
            message: message.into(),
            rig: String::new(),
            mouse: None,
            session_dir: None,
            time_utc: String::new(),
            details: serde_json::Value::Null,
            repeats: 0,
        }
    }

    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

/// The alerts rigd raises, with their texts in one place (they are what a
/// person reads at night; `tests::alert_texts` pins them).
impl Alert {
    /// The rig has been unreachable for `lost_s` seconds.
    pub fn device_lost(lost_s: u64, link_detail: &str) -> Self {
        Alert::new(
            AlertKind::DeviceLost,
            "critical",
            format!(
                "the rig has been unreachable for {lost_s} s ({link_detail}); check the USB \
                 cable and the microcontroller's power; a running session continues when it \
                 returns"
            ),
        )
        .details(serde_json::json!({ "lost_s": lost_s }))
    }

    /// The data disk under `root` has `free_mb` MB free, less than `min_mb`.
    pub fn disk_low(root: &std::path::Path, free_mb: u64, min_mb: u64) -> Self {
        Alert::new(
            AlertKind::DiskLow,
            "warning",
            format!(
                "the data disk ({}) has {free_mb} MB free, less than \
                 [alerts].disk_free_min_mb = {min_mb} MB; move old sessions off it",
                root.display()
            ),
        )
        .details(serde_json::json!({ "free_mb": free_mb, "min_mb": min_mb }))
    }

    /// The device reported a valve safety fault; None for other faults.
    pub fn device_fault(t_us: u64, code: protocol::serial::FaultCode, detail: u32) -> Option<Self> {
        use protocol::serial::FaultCode;
        let message = match code {
            FaultCode::WatchdogTripped => format!(
                "the device closed the valve and silenced the tone: it heard nothing from \
                 rigd for {detail} ms (its heartbeat watchdog); check that rigd is running \
                 and not stalled"
            ),
            FaultCode::ValveCapTripped => format!(
                "the device cut a valve opening at its cap ({detail} ms); check the \
                 commanded times and the valve"
            ),
            _ => return None,
        };
        Some(
            Alert::new(AlertKind::ValveSafetyTrip, "critical", message).details(
                serde_json::json!({ "code": format!("{code:?}"), "detail": detail, "t_us": t_us }),
            ),
        )
    }

    /// A session of `mouse` ended without a stop request (`reason`): with its
    /// summary, or the error that ended it.
    pub fn session_ended(
        mouse: &str,
        reason: &crate::session::StopReason,
        result: Result<&protocol::control::SessionSummary, &str>,
    ) -> Self {
        let (kind, severity, message) = match result {
            Err(e) => (
                AlertKind::StorageError,
                "critical",
                format!("the session of {mouse} stopped on a disk error ({reason}); {e}"),
            ),
            Ok(s) => (
                AlertKind::SessionAutoStopped,
                reason.alert_severity(),
                format!(
                    "the session of {mouse} stopped by itself: {reason} ({} trials, {} \
                     rewards, {:.1} µL{})",
                    s.trials,
                    s.rewards,
                    s.water_ul,
                    s.supplement_ul
                        .filter(|v| *v > 0.0)
                        .map_or(String::new(), |v| format!("; give {v:.0} µL by hand today"))
                ),
            ),
        };
        let mut a = Alert::new(kind, severity, message).details(serde_json::json!({
            "reason": reason.to_string(),
            "summary": result.ok(),
        }));
        a.mouse = Some(mouse.to_owned());
        a
    }
}

/// Alerts of one kind go out at most once per this window; the ones between
/// are counted into the next (each is still logged, at debug level).
pub const REPEAT_WINDOW: Duration = Duration::from_secs(60);

/// The once-per-window rule of [`Alerter::raise`], by kind. A session's own
/// end (`session_auto_stopped`, `storage_error`) is never held back: each
/// is about another session. Pure, so it is tested with made-up times.
#[derive(Debug, Default)]
pub struct RepeatGate {
    by_kind: std::collections::HashMap<&'static str, (Instant, u64)>,
}

impl RepeatGate {
    /// `Some(n)`: send it, mentioning `n` alerts of its kind held back since
    /// the last one; `None`: hold it back (counted).
    pub fn pass(&mut self, kind: AlertKind, now: Instant) -> Option<u64> {
        if matches!(
            kind,
            AlertKind::SessionAutoStopped | AlertKind::StorageError
        ) {
            return Some(0);
        }
        match self.by_kind.get_mut(kind.as_str()) {
            Some((last, held)) if now.saturating_duration_since(*last) < REPEAT_WINDOW => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                *last = now;
                Some(std::mem::take(held))
            }
            None => {
                self.by_kind.insert(kind.as_str(), (now, 0));
                Some(0)
            }
        }
    }
}

/// Raises alerts. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Alerter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: AlertsSection,
    rig: String,
    raised: AtomicU64,
    running: AtomicUsize,
    repeats: std::sync::Mutex<RepeatGate>,
}

impl Alerter {
    pub fn new(cfg: AlertsSection, rig: impl Into<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                cfg,
                rig: rig.into(),
                raised: AtomicU64::new(0),
                running: AtomicUsize::new(0),
                repeats: std::sync::Mutex::new(RepeatGate::default()),
            }),
        }
    }

    /// Alerts raised since start.
    pub fn raised(&self) -> u64 {
        self.inner.raised.load(Ordering::Relaxed)
    }

    /// Log the alert and hand it to the configured command (in the background).
    pub fn raise(&self, mut alert: Alert) {
        crate::metrics::global().alert_raised(alert.kind.as_str());
        let held = self
            .inner
            .repeats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pass(alert.kind, Instant::now());
        let Some(held) = held else {
            tracing::debug!(
                kind = alert.kind.as_str(),
                "alert held back (repeat): {}",
                alert.message
            );
            return;
        };
        if held > 0 {
            alert.message.push_str(&format!(
                " ({held} more {} alerts in the last {} s were not sent one by one)",
                alert.kind.as_str(),
                REPEAT_WINDOW.as_secs()
            ));
            alert.repeats = held;
        }
        alert.rig.clone_from(&self.inner.rig);
        alert.time_utc = session_format::rfc3339_utc(SystemTime::now());
        self.inner.raised.fetch_add(1, Ordering::Relaxed);
        let kind = alert.kind.as_str();
        match alert.severity {
            "critical" => tracing::error!(kind, "ALERT: {}", alert.message),
            "warning" => tracing::warn!(kind, "ALERT: {}", alert.message),
            _ => tracing::info!(kind, "ALERT: {}", alert.message),
        }
        let Some(cmd) = self.inner.cfg.command.clone() else {
            return;
        };
        let json = match serde_json::to_string(&alert) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!("alert not serialisable: {e}");
                return;
            }
        };
        let inner = self.inner.clone();
        if inner.running.fetch_add(1, Ordering::SeqCst) >= MAX_RUNNING {
            inner.running.fetch_sub(1, Ordering::SeqCst);
            tracing::error!(
                "alert command not run: {MAX_RUNNING} alert commands are still running"
            );
            return;
        }
        let timeout = Duration::from_secs(u64::from(inner.cfg.command_timeout_s));
        let spawned = std::thread::Builder::new()
            .name("rig-alert".into())
            .spawn(move || {
                if let Err(e) = run_command(&cmd, &json, timeout) {
                    tracing::error!("alert command `{cmd}` failed: {e}");
                }
                inner.running.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.inner.running.fetch_sub(1, Ordering::SeqCst);
            tracing::error!("alert command not run: cannot start a thread: {e}");
        }
    }
}

fn run_command(cmd: &str, json: &str, timeout: Duration) -> Result<(), String> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start /bin/sh: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its input is not an error.
        let _ = stdin.write_all(json.as_bytes());
        let _ = stdin.write_all(b"\n");
    }
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!("{status}: {}", err.trim()));
            }
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("killed after {} s", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Free space on the filesystem holding `path`, bytes (for rigd's user).
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Free space on the filesystem holding `path`, MB.
pub fn free_mb(path: &std::path::Path) -> Option<u64> {
    free_bytes(path).map(|b| b / (1024 * 1024))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn alert_texts() {
        use crate::session::StopReason;
        use crate::task::FinishReason;
        use protocol::serial::FaultCode;
        let summary = protocol::control::SessionSummary {
            trials: 120,
            rewards: 80,
            water_ul: 320.0,
            supplement_ul: Some(680.0),
            ..Default::default()
        };
        let alerts = [
            Alert::device_lost(300, "read error: device unplugged"),
            Alert::disk_low(std::path::Path::new("/data"), 900, 1000),
            Alert::device_fault(5, FaultCode::WatchdogTripped, 500).unwrap(),
            Alert::device_fault(5, FaultCode::ValveCapTripped, 200).unwrap(),
            Alert::session_ended("M12", &StopReason::Task(FinishReason::Sated), Ok(&summary)),
            Alert::session_ended(
                "M12",
                &StopReason::Task(FinishReason::Duration),
                Ok(&summary),
            ),
            Alert::session_ended(
                "M12",
                &StopReason::StorageError("No space left on device".into()),
                Err("the session stopped with an error"),
            ),
        ];
        let text: String = alerts
            .iter()
            .map(|a| format!("{} {} {}\n", a.kind.as_str(), a.severity, a.message))
            .collect();
        assert!(
            !text.contains("  "),
            "a run of spaces in an alert text:\n{text}"
        );
        assert!(Alert::device_fault(5, FaultCode::TxOverflow, 1).is_none());
        insta::assert_snapshot!(text);
    }

    #[test]
    fn the_command_gets_the_alert_as_json_on_stdin() {
        let dir = std::env::temp_dir().join(format!("rigd-alert-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("alerts.jsonl");
        let cfg = AlertsSection {
            command: Some(format!("cat >> '{}'", out.display())),
            ..AlertsSection::default()
        };
        let a = Alerter::new(cfg, "rig7");
        a.raise(
            Alert::new(AlertKind::DiskLow, "warning", "disk nearly full")
                .details(serde_json::json!({"free_mb": 12})),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let line = loop {
            if let Ok(t) = std::fs::read_to_string(&out) {
                if t.ends_with('\n') {
                    break t;
                }
            }
            assert!(Instant::now() < deadline, "the alert command did not run");
            std::thread::sleep(Duration::from_millis(20));
        };
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(v["kind"], "disk_low");
        assert_eq!(v["rig"], "rig7");
        assert_eq!(v["details"]["free_mb"], 12);
        assert!(v["time_utc"].as_str().unwrap().ends_with('Z'));
        assert_eq!(a.raised(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_hanging_command_is_killed() {
        let e = run_command("sleep 30", "{}", Duration::from_millis(200)).unwrap_err();
        assert!(e.contains("killed"), "{e}");
        let e = run_command("echo nope >&2; exit 3", "{}", Duration::from_secs(5)).unwrap_err();
        assert!(e.contains("nope"), "{e}");
    }
}

#[cfg(test)]
mod repeat_tests {
    use super::*;

    #[test]
    fn one_alert_per_kind_per_window_with_the_count_of_the_rest() {
        let mut g = RepeatGate::default();
        let t = Instant::now();
        let s = |secs: u64| t + Duration::from_secs(secs);
        assert_eq!(g.pass(AlertKind::ValveSafetyTrip, s(0)), Some(0));
        // Nine more trips within the minute: held back, counted.
        for k in 1..10 {
            assert_eq!(g.pass(AlertKind::ValveSafetyTrip, s(k)), None);
        }
        // Another kind is not held back by them.
        assert_eq!(g.pass(AlertKind::DiskLow, s(5)), Some(0));
        // After the window, the next one says how many were held.
        assert_eq!(g.pass(AlertKind::ValveSafetyTrip, s(61)), Some(9));
        assert_eq!(g.pass(AlertKind::ValveSafetyTrip, s(62)), None);
        // A session's end is never held back.
        for k in 0..3 {
            assert_eq!(g.pass(AlertKind::SessionAutoStopped, s(k)), Some(0));
        }
    }
}
