//! The daemon's process-lifetime counters and gauges, and their Prometheus
//! text rendering (`GET /metrics` on the preview server).
//!
//! One registry per process ([`global`]): plain atomics, so the rig thread
//! counts a trial, a lost sample or a storage drop with one relaxed
//! read-modify-write, never a lock or an allocation. Counters only ever go
//! up, across sessions, until rigd exits; Prometheus notices the restart and
//! `rate()`/`increase()` handle it. Rendering allocates the text on the
//! preview server's thread, on request.
//!
//! The registry also holds the rig thread's liveness beat
//! ([`Metrics::rig_thread_beat`]), which the systemd watchdog
//! ([`crate::notify`]) checks before every ping.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A monotonic count.
#[derive(Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

impl Default for Counter {
    fn default() -> Self {
        Self::new()
    }
}

/// An `f64` held as its bits: a gauge ([`F64Cell::set`]) or a monotonic
/// floating-point counter ([`F64Cell::add`], a compare-and-swap loop: lock
/// free, and only the rig thread adds).
#[derive(Debug)]
pub struct F64Cell(AtomicU64);

impl F64Cell {
    /// Holds `value` (`const`: `f64::to_bits` is not, so only for NaN and 0).
    const fn from_bits(bits: u64) -> Self {
        Self(AtomicU64::new(bits))
    }
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Relaxed);
    }
    pub fn add(&self, v: f64) {
        let _ = self.0.fetch_update(Relaxed, Relaxed, |b| {
            Some((f64::from_bits(b) + v).to_bits())
        });
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }
}

/// Upper bounds of the control-latency histogram's buckets, µs (50 µs to
/// 10 ms; an observation lands in the first bucket whose bound it does not
/// exceed, or in the overflow bucket rendered only as `+Inf`).
pub const LATENCY_BUCKETS_US: [u64; 13] = [
    50, 100, 200, 300, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 7_500, 10_000,
];

/// A fixed-bucket histogram of microsecond values. Each bucket counts its
/// own observations (not cumulative); the count is the sum of the buckets,
/// so a render taken during an observation is still self-consistent.
#[derive(Debug)]
pub struct LatencyHistogram {
    /// One per bound in [`LATENCY_BUCKETS_US`], then the overflow bucket.
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    pub const fn new() -> Self {
        #[allow(clippy::declare_interior_mutable_const)]
        const ZERO: AtomicU64 = AtomicU64::new(0);
        Self {
            buckets: [ZERO; LATENCY_BUCKETS_US.len() + 1],
            sum_us: AtomicU64::new(0),
        }
    }

    /// Count one observation of `us` microseconds.
    pub fn observe_us(&self, us: u64) {
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|&le| us <= le)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Per-bucket counts (not cumulative), the overflow bucket last.
    pub fn bucket_counts(&self) -> [u64; LATENCY_BUCKETS_US.len() + 1] {
        std::array::from_fn(|i| self.buckets[i].load(Relaxed))
    }

    pub fn count(&self) -> u64 {
        self.bucket_counts().iter().sum()
    }

    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Relaxed)
    }
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

/// The `rigd_last_session_qc{item}` gauges: the `qc` record of the last
/// session whose files finished (NaN before the first, and for an item the
/// session did not have, e.g. frames without imaging).
pub const QC_GAUGES: [&str; 10] = [
    "clean",
    "lever_samples",
    "lever_samples_lost",
    "lever_gaps",
    "frames_dropped",
    "frames_ttl_pct",
    "frame_stamps_not_increasing",
    "decision_latency_p99_seconds",
    "watchdog_trips",
    "anomalies",
];

/// What happened to one server's connections ([`crate::conns`]).
#[derive(Debug, Default)]
pub struct ConnCounters {
    /// Refused at the cap (every admitted connection active).
    pub refused: Counter,
    /// Closed to make room for a new one (quiet at the cap).
    pub evicted: Counter,
    /// Closed by a time limit (idle, incomplete request, not reading).
    pub timed_out: Counter,
}

impl ConnCounters {
    pub const fn new() -> Self {
        Self {
            refused: Counter::new(),
            evicted: Counter::new(),
            timed_out: Counter::new(),
        }
    }
}

/// How a session ended, as the `reason` label of
/// `rigd_sessions_completed_total`: the task's own reasons, a signal, a stop
/// request, or an error while finishing the files. A fixed set, so a free-text
/// stop reason cannot make new time series.
pub const STOP_REASONS: [&str; 8] = [
    "max_trials",
    "reward_cap",
    "water_cap",
    "duration",
    "sated",
    "requested",
    "signal",
    "error",
];

/// The `kind` label of `rigd_alerts_total` (`alerts::AlertKind::as_str`).
pub const ALERT_KINDS: [&str; 5] = [
    "valve_safety_trip",
    "device_lost",
    "disk_low",
    "session_auto_stopped",
    "storage_error",
];

/// The registry. See the module docs.
#[derive(Debug)]
pub struct Metrics {
    pub sessions_started: Counter,
    /// One per [`STOP_REASONS`] label.
    sessions_completed: [Counter; STOP_REASONS.len()],
    /// 1 from a session's start until its files are finished.
    pub session_running: Counter,
    pub trials: Counter,
    pub rewards: Counter,
    pub water_ul: F64Cell,
    pub frames: Counter,
    pub frames_dropped: Counter,
    pub storage_dropped: Counter,
    /// Events the rig thread could not hand to the subscribers' fan-out.
    pub subscriber_events_dropped: Counter,
    pub lever_samples_lost: Counter,
    /// Device times or indices found implausible (any kind).
    pub device_time_anomalies: Counter,
    /// 1 while the serial link is connected.
    pub link_up: Counter,
    pub link_losses: Counter,
    /// The latest clock fit's half band, µs (NaN before the first fit).
    pub clock_half_band_us: F64Cell,
    /// Crossing sample -> valve open at the device, per rewarded trial.
    pub control_latency: LatencyHistogram,
    /// The last finished session's `qc` record, as gauges.
    last_qc: [F64Cell; QC_GAUGES.len()],
    /// The preview server's connections.
    pub preview_conns: ConnCounters,
    /// The control socket's connections.
    pub control_conns: ConnCounters,
    /// Bumped by the rig thread every time the link calls it.
    rig_thread_beats: Counter,
    /// Alerts raised (before the repeat gate), one per [`ALERT_KINDS`].
    alerts: [Counter; ALERT_KINDS.len()],
    /// Valve pulses given for a calibration (water for no mouse).
    pub calibration_pulses: Counter,
    /// Free space on the data root, bytes (NaN until the first check).
    pub data_root_free_bytes: F64Cell,
    /// `[alerts].disk_free_min_mb`, in bytes (NaN until the first check).
    pub data_root_free_min_bytes: F64Cell,
    /// Age of the valve calibration, days (NaN when it has no date).
    pub valve_calibration_age_days: F64Cell,
    /// `[valve].max_calibration_age_days`.
    pub valve_calibration_max_age_days: F64Cell,
}

impl Metrics {
    pub const fn new() -> Self {
        #[allow(clippy::declare_interior_mutable_const)]
        const ZERO: Counter = Counter::new();
        #[allow(clippy::declare_interior_mutable_const)]
        const NAN: F64Cell = F64Cell::from_bits(0x7ff8_0000_0000_0000);
        Self {
            sessions_started: Counter::new(),
            sessions_completed: [ZERO; STOP_REASONS.len()],
            session_running: Counter::new(),
            trials: Counter::new(),
            rewards: Counter::new(),
            water_ul: F64Cell::from_bits(0), // 0.0
            frames: Counter::new(),
            frames_dropped: Counter::new(),
            storage_dropped: Counter::new(),
            subscriber_events_dropped: Counter::new(),
            lever_samples_lost: Counter::new(),
            device_time_anomalies: Counter::new(),
            link_up: Counter::new(),
            link_losses: Counter::new(),
            clock_half_band_us: F64Cell::from_bits(0x7ff8_0000_0000_0000), // NaN
            control_latency: LatencyHistogram::new(),
            last_qc: [NAN; QC_GAUGES.len()],
            preview_conns: ConnCounters::new(),
            control_conns: ConnCounters::new(),
            rig_thread_beats: Counter::new(),
            alerts: [ZERO; ALERT_KINDS.len()],
            calibration_pulses: Counter::new(),
            data_root_free_bytes: NAN,
            data_root_free_min_bytes: NAN,
            valve_calibration_age_days: NAN,
            valve_calibration_max_age_days: NAN,
        }
    }

    /// A session started.
    pub fn session_started(&self) {
        self.sessions_started.inc();
        self.session_running.0.store(1, Relaxed);
    }

    /// A session's files are finished (or failed), for `reason`.
    /// A session ended; `label` is one of [`STOP_REASONS`]
    /// (`StopReason::metrics_label`).
    pub fn session_ended(&self, label: &str) {
        if let Some(i) = STOP_REASONS.iter().position(|&r| r == label) {
            self.sessions_completed[i].inc();
        }
        self.session_running.0.store(0, Relaxed);
    }

    pub fn sessions_completed(&self, label: &str) -> u64 {
        STOP_REASONS
            .iter()
            .position(|&r| r == label)
            .map_or(0, |i| self.sessions_completed[i].get())
    }

    /// An alert of `kind` (one of [`ALERT_KINDS`]) was raised.
    pub fn alert_raised(&self, kind: &str) {
        if let Some(i) = ALERT_KINDS.iter().position(|&k| k == kind) {
            self.alerts[i].inc();
        }
    }

    pub fn set_link_up(&self, up: bool) {
        self.link_up.0.store(u64::from(up), Relaxed);
    }

    /// The rig thread is alive (called on every link callback).
    pub fn rig_thread_beat(&self) {
        self.rig_thread_beats.inc();
    }

    /// How many times the rig thread has beaten so far.
    pub fn rig_thread_beats(&self) -> u64 {
        self.rig_thread_beats.get()
    }

    /// Keep the last finished session's quality record for `/metrics`.
    pub fn set_last_qc(&self, qc: &session_format::Qc) {
        let frames = qc.frames.as_ref();
        let values: [f64; QC_GAUGES.len()] = [
            if qc.clean { 1.0 } else { 0.0 },
            qc.lever.samples as f64,
            qc.lever.samples_lost as f64,
            qc.lever.gaps as f64,
            frames.map_or(f64::NAN, |f| f.dropped as f64),
            frames.map_or(f64::NAN, |f| f.ttl_pct),
            frames.map_or(f64::NAN, |f| f.stamps_not_increasing as f64),
            qc.decision_latency.p99_us.map_or(f64::NAN, |us| us / 1e6),
            qc.watchdog_trips as f64,
            qc.anomalies.values().sum::<u64>() as f64,
        ];
        for (cell, v) in self.last_qc.iter().zip(values) {
            cell.set(v);
        }
    }

    /// The Prometheus text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            family(out, name, help, "counter");
            let _ = writeln!(out, "{name} {v}");
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            family(out, name, help, "gauge");
            let _ = writeln!(out, "{name} {}", number(v));
        };
        counter(
            &mut out,
            "rigd_sessions_started_total",
            "Sessions started since rigd started.",
            self.sessions_started.get(),
        );
        family(
            &mut out,
            "rigd_sessions_completed_total",
            "Sessions ended (files finished) since rigd started, by why they ended.",
            "counter",
        );
        for (label, c) in STOP_REASONS.iter().zip(&self.sessions_completed) {
            let _ = writeln!(
                out,
                "rigd_sessions_completed_total{{reason=\"{label}\"}} {}",
                c.get()
            );
        }
        family(
            &mut out,
            "rigd_last_session_qc",
            "The qc record of the last finished session (summary.json): clean (1/0), lever \
             samples, lost and gaps, frames dropped, % stamped by the frame clock, stamps not \
             increasing, crossing-to-valve p99 (s), watchdog trips, anomaly events.",
            "gauge",
        );
        for (item, cell) in QC_GAUGES.iter().zip(&self.last_qc) {
            let _ = writeln!(
                out,
                "rigd_last_session_qc{{item=\"{item}\"}} {}",
                number(cell.get())
            );
        }
        family(
            &mut out,
            "rigd_connections_closed_total",
            "Preview and control connections refused at the cap, evicted (quiet, to make room) \
             or timed out (idle, incomplete request, not reading).",
            "counter",
        );
        for (server, c) in [
            ("preview", &self.preview_conns),
            ("control", &self.control_conns),
        ] {
            for (why, n) in [
                ("refused", &c.refused),
                ("evicted", &c.evicted),
                ("timed_out", &c.timed_out),
            ] {
                let _ = writeln!(
                    out,
                    "rigd_connections_closed_total{{server=\"{server}\",why=\"{why}\"}} {}",
                    n.get()
                );
            }
        }
        gauge(
            &mut out,
            "rigd_session_running",
            "1 while a session runs (until its files are finished), else 0.",
            self.session_running.get() as f64,
        );
        counter(
            &mut out,
            "rigd_trials_total",
            "Trials run, all sessions.",
            self.trials.get(),
        );
        counter(
            &mut out,
            "rigd_rewards_total",
            "Rewards delivered (rewarded, not capped), all sessions.",
            self.rewards.get(),
        );
        family(
            &mut out,
            "rigd_water_delivered_microliters_total",
            "Water delivered as rewards, microliters, all sessions.",
            "counter",
        );
        let _ = writeln!(
            out,
            "rigd_water_delivered_microliters_total {}",
            number(self.water_ul.get())
        );
        counter(
            &mut out,
            "rigd_frames_total",
            "Imaging frames received from the shared-memory ring.",
            self.frames.get(),
        );
        counter(
            &mut out,
            "rigd_frames_dropped_total",
            "Imaging frames overwritten in the ring before rigd read them.",
            self.frames_dropped.get(),
        );
        counter(
            &mut out,
            "rigd_storage_dropped_total",
            "Records the session's storage queue could not take (queue full).",
            self.storage_dropped.get(),
        );
        counter(
            &mut out,
            "rigd_subscriber_events_dropped_total",
            "Events the rig thread could not hand to control-socket subscribers (fan-out behind).",
            self.subscriber_events_dropped.get(),
        );
        counter(
            &mut out,
            "rigd_lever_samples_lost_total",
            "Lever samples the device sent but rigd never got (gaps in the sample index).",
            self.lever_samples_lost.get(),
        );
        counter(
            &mut out,
            "rigd_device_time_anomalies_total",
            "Device times or sample indices rigd found implausible (duplicates, overlaps, \
             clock steps, stamps off the host clock); events.tsv names each kind.",
            self.device_time_anomalies.get(),
        );
        gauge(
            &mut out,
            "rigd_link_up",
            "1 while the serial link to the rig's microcontroller is connected.",
            self.link_up.get() as f64,
        );
        counter(
            &mut out,
            "rigd_link_losses_total",
            "Times an established serial link was lost.",
            self.link_losses.get(),
        );
        gauge(
            &mut out,
            "rigd_clock_sync_half_band_seconds",
            "Half width of the host-to-rig clock fit's band (NaN before the first fit).",
            self.clock_half_band_us.get() / 1e6,
        );
        family(
            &mut out,
            "rigd_alerts_total",
            "Alerts raised, by kind (before repeats are held back); [alerts].command \
             gets each.",
            "counter",
        );
        for (kind, c) in ALERT_KINDS.iter().zip(&self.alerts) {
            let _ = writeln!(out, "rigd_alerts_total{{kind=\"{kind}\"}} {}", c.get());
        }
        counter(
            &mut out,
            "rigd_calibration_pulses_total",
            "Valve pulses given for a valve calibration (water into a cup, for no mouse).",
            self.calibration_pulses.get(),
        );
        gauge(
            &mut out,
            "rigd_data_root_free_bytes",
            "Free space on [storage].data_root, bytes (NaN before the first check).",
            self.data_root_free_bytes.get(),
        );
        gauge(
            &mut out,
            "rigd_data_root_free_min_bytes",
            "[alerts].disk_free_min_mb in bytes: below it rigd raises disk_low.",
            self.data_root_free_min_bytes.get(),
        );
        gauge(
            &mut out,
            "rigd_valve_calibration_age_days",
            "Age of the valve calibration, days (NaN when it has no date).",
            self.valve_calibration_age_days.get(),
        );
        gauge(
            &mut out,
            "rigd_valve_calibration_max_age_days",
            "[valve].max_calibration_age_days: older calibrations are warned about.",
            self.valve_calibration_max_age_days.get(),
        );
        let name = "rigd_control_latency_seconds";
        family(
            &mut out,
            name,
            "Crossing lever sample to valve open at the device, per rewarded trial.",
            "histogram",
        );
        let counts = self.control_latency.bucket_counts();
        let mut cumulative = 0u64;
        for (le, n) in LATENCY_BUCKETS_US.iter().zip(counts) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {cumulative}",
                number(*le as f64 / 1e6)
            );
        }
        cumulative += counts[LATENCY_BUCKETS_US.len()];
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            number(self.control_latency.sum_us() as f64 / 1e6)
        );
        let _ = writeln!(out, "{name}_count {cumulative}");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A sample value as Prometheus writes it (`NaN`, `+Inf`, `-Inf`, decimal).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        v.to_string()
    }
}

static GLOBAL: Metrics = Metrics::new();

/// The process's registry.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_the_count() {
        let m = Metrics::new();
        for us in [10, 50, 51, 999, 1_000, 10_000, 10_001, 250_000] {
            m.control_latency.observe_us(us);
        }
        let text = m.render();
        let bucket = |le: &str| -> u64 {
            let prefix = format!("rigd_control_latency_seconds_bucket{{le=\"{le}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no bucket {le} in\n{text}"))
                .parse()
                .expect("count")
        };
        assert_eq!(bucket("0.00005"), 2);
        assert_eq!(bucket("0.0001"), 3);
        assert_eq!(bucket("0.001"), 5);
        assert_eq!(bucket("0.01"), 6);
        assert_eq!(bucket("+Inf"), 8);
        assert!(text.contains("rigd_control_latency_seconds_count 8\n"));
        assert!(text.contains("rigd_control_latency_seconds_sum 0.272111\n"));
    }

    #[test]
    fn every_family_has_help_and_type_and_values_parse() {
        let m = Metrics::new();
        m.session_started();
        m.trials.add(3);
        m.water_ul.add(2.5);
        m.water_ul.add(0.25);
        m.session_ended("requested");
        m.session_ended("signal");
        m.session_ended("duration");
        let text = m.render();
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().expect("name").to_owned());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (name, value) = line.rsplit_once(' ').expect("name value");
            let base = name.split('{').next().expect("name");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| base.strip_suffix(s).filter(|b| typed.contains(*b)))
                .unwrap_or(base);
            assert!(typed.contains(family), "{line}: no TYPE before it");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        assert!(text.contains("rigd_trials_total 3\n"));
        assert!(text.contains("rigd_water_delivered_microliters_total 2.75\n"));
        assert!(text.contains("rigd_sessions_completed_total{reason=\"requested\"} 1\n"));
        assert!(text.contains("rigd_sessions_completed_total{reason=\"signal\"} 1\n"));
        assert!(text.contains("rigd_sessions_completed_total{reason=\"duration\"} 1\n"));
        assert!(text.contains("rigd_session_running 0\n"));
        assert!(text.contains("rigd_clock_sync_half_band_seconds NaN\n"));
        assert_eq!(m.sessions_completed("signal"), 1);
    }
}
