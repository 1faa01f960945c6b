//! The `qc` record of `summary.json`: what a session's files say about
//! their own quality, computed from the files themselves (so a recovered
//! session gets the same record as a clean one, and nothing in it is a
//! number the daemon merely believed).
//!
//! Sources: the lever chunks' headers and first row, `events.tsv` (link
//! gaps, storage drops, device faults, every anomaly the daemon recorded),
//! `frames.tsv` (stamps by source, drops, monotonicity), `trials.tsv`
//! (crossing -> valve-open latency) and `session.toml` (the clock fit).
//! Streams line by line: memory stays flat for a 12-hour session.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::meta::SessionToml;
use crate::tsv::unescape;
use crate::{StorageError, EVENTS_FILE, TRIALS_FILE};

/// The frames table (written by the daemon's imaging ingest).
pub const FRAMES_FILE: &str = "frames.tsv";

/// The whole record. Field order is the JSON order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Qc {
    pub lever: LeverQc,
    /// Absent when the session had no imaging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<FramesQc>,
    /// Half width of the host -> rig clock fit's band at the end, µs
    /// (absent when the link never produced a fit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_half_band_us: Option<f64>,
    pub decision_latency: LatencyQc,
    /// Device faults by code (`watchdog_tripped`, `valve_cap_tripped`, ...).
    pub device_faults: BTreeMap<String, u64>,
    /// The device's heartbeat watchdog closed the valve (a subset of
    /// `device_faults`).
    pub watchdog_trips: u64,
    /// Every event that reports something wrong, by kind (see
    /// [`is_anomaly`]), with its number of rows.
    pub anomalies: BTreeMap<String, u64>,
    /// Records the daemon could not queue for storage (missing from the files).
    pub storage_dropped: u64,
    /// Trials where the device's reward decision and the one re-derived
    /// from the lever samples disagree (`decision_mismatch` rows; device
    /// mode). Also under `anomalies`.
    #[serde(default)]
    pub decision_mismatches: u64,
    /// The device clock's rate against the host's when it was more than 1 %
    /// off (a simulator at speed; never real hardware).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_clock_rate: Option<f64>,
    /// True when nothing above reports a loss or an anomaly.
    pub clean: bool,
}

/// The lever stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LeverQc {
    /// Rows in the lever chunks.
    pub samples: u64,
    /// Samples the device sent that never arrived (`sample_gap` values).
    pub samples_lost: u64,
    /// Gaps (`sample_gap` events).
    pub gaps: u64,
    /// Session time of the first recorded sample, s (before it, no file
    /// holds a lever position: the link had not delivered one yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_sample_s: Option<f64>,
}

/// The frames table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FramesQc {
    /// Rows of frames.tsv.
    pub rows: u64,
    /// Rows with `dropped = 1`.
    pub dropped: u64,
    /// Delivered frames by stamp source (`ttl`, `mapped`, ...).
    pub by_source: BTreeMap<String, u64>,
    /// Percent of delivered frames stamped by the frame clock.
    pub ttl_pct: f64,
    /// Delivered frames whose time is not after the previous delivered
    /// frame's (must be 0).
    pub stamps_not_increasing: u64,
    /// `ttl` rows whose time is a `frame_ttl` edge of `events.tsv`, to the µs.
    pub ttl_on_an_edge: u64,
    /// `ttl` rows whose time is no recorded edge (must be 0).
    pub ttl_not_on_an_edge: u64,
    /// `ttl` rows from before the first recorded edge (cannot be checked).
    pub ttl_unverifiable: u64,
}

/// Lever crossing -> valve open, device time, rewarded trials.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyQc {
    pub count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_us: Option<f64>,
}

/// Anomaly events written rate-limited: one row stands for `value`
/// occurrences of the kind its detail starts with.
const RATE_LIMITED: [&str; 1] = ["producer_anomaly"];

/// Whether an `events.tsv` row reports something wrong. The link's and the
/// daemon's kinds are anomalies except the ordinary ones; device `fault`
/// rows are counted under `device_faults` instead.
pub fn is_anomaly(source: &str, kind: &str) -> bool {
    match source {
        // The device-time rows are rate-limited; their exact totals come at
        // the stop as `device_time_anomalies` (counted from there).
        "link" => kind != "connected" && !kind.starts_with("device_"),
        "task" => kind == "lever_not_at_rest" || kind == "decision_mismatch",
        "daemon" => !matches!(
            kind,
            "imaging_attached"
                | "producer_resumed"
                | "frame_offset_found"
                | "imaging_qc"
                | "device_time_anomalies"
        ),
        _ => false,
    }
}

impl Qc {
    /// Compute the record from the session folder `dir`.
    pub fn compute(dir: &Path) -> Result<Qc, StorageError> {
        let mut qc = Qc::default();
        let meta = SessionToml::read(dir)?;
        qc.clock_half_band_us = meta.clock_sync.as_ref().map(|c| c.half_band_us);
        // The folder's own listing: session.toml's [chunks] may lag the
        // newest chunk while the session runs.
        let lever_chunks = crate::list_chunks(dir)?
            .remove("lever")
            .unwrap_or_else(|| vec![crate::LEVER_FILE.to_owned()]);
        for (i, name) in lever_chunks.iter().enumerate() {
            let path = dir.join(name);
            let Ok(h) = crate::read_npy_header(&path) else {
                continue;
            };
            let rows = h.shape.first().copied().unwrap_or(0);
            qc.lever.samples += rows;
            if i == 0 && rows > 0 && h.descr == "<f8" {
                qc.lever.first_sample_s = first_f64(&path, h.data_offset);
            }
        }
        let edges = events(dir, &mut qc)?;
        qc.frames = frames(dir, &edges)?;
        qc.decision_latency = latency(dir)?;
        qc.clean = qc.lever.samples_lost == 0
            && qc.storage_dropped == 0
            && qc.anomalies.is_empty()
            && qc.device_faults.is_empty()
            && qc.frames.as_ref().map_or(true, |f| {
                f.dropped == 0 && f.stamps_not_increasing == 0 && f.ttl_not_on_an_edge == 0
            });
        Ok(qc)
    }
}

impl std::fmt::Display for Qc {
    /// A few lines for a person (`rigctl stop`, the demo).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counts = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            f,
            "qc: {}",
            if self.clean {
                "clean (no loss, no anomaly)"
            } else {
                "NOT clean (see below)"
            }
        )?;
        write!(f, "  lever      {} samples", self.lever.samples)?;
        if let Some(t) = self.lever.first_sample_s {
            write!(f, " from {t:.3} s")?;
        }
        writeln!(
            f,
            ", {} lost in {} gaps",
            self.lever.samples_lost, self.lever.gaps
        )?;
        if let Some(fr) = &self.frames {
            writeln!(
                f,
                "  frames     {} rows: {} ({:.1} % by the frame clock), {} dropped, {} stamps not increasing",
                fr.rows,
                counts(&fr.by_source),
                fr.ttl_pct,
                fr.dropped,
                fr.stamps_not_increasing
            )?;
            writeln!(
                f,
                "             ttl rows on a recorded edge: {}, on none: {}, before the first edge: {}",
                fr.ttl_on_an_edge, fr.ttl_not_on_an_edge, fr.ttl_unverifiable
            )?;
        }
        if let Some(r) = self.device_clock_rate {
            writeln!(
                f,
                "  device     clock runs at {r:.3}x the host's (a simulator at speed?)"
            )?;
        }
        if let Some(b) = self.clock_half_band_us {
            writeln!(f, "  clock      host -> rig fit within +/- {b:.0} us")?;
        }
        let l = &self.decision_latency;
        match (l.p50_us, l.p99_us, l.max_us) {
            (Some(a), Some(b), Some(c)) => writeln!(
                f,
                "  latency    crossing -> valve open: p50 {a:.0} us, p99 {b:.0} us, max {c:.0} us ({} rewards)",
                l.count
            )?,
            _ => writeln!(f, "  latency    no rewarded trial")?,
        }
        if !self.device_faults.is_empty() {
            writeln!(f, "  faults     {}", counts(&self.device_faults))?;
        }
        if self.decision_mismatches > 0 {
            writeln!(
                f,
                "  decisions  {} trials where the device's reward decision and the lever samples disagree",
                self.decision_mismatches
            )?;
        }
        if !self.anomalies.is_empty() {
            writeln!(f, "  anomalies  {}", counts(&self.anomalies))?;
        }
        if self.storage_dropped > 0 {
            writeln!(
                f,
                "  storage    {} records could not be written",
                self.storage_dropped
            )?;
        }
        Ok(())
    }
}

fn first_f64(path: &Path, offset: u64) -> Option<f64> {
    let mut f = std::fs::File::open(path).ok()?;
    f.seek(SeekFrom::Start(offset)).ok()?;
    let mut b = [0u8; 8];
    f.read_exact(&mut b).ok()?;
    Some(f64::from_le_bytes(b))
}

/// The data lines of a TSV file (after its header), with the header's
/// column positions; `None` when the file is absent.
fn tsv_lines(
    path: &Path,
) -> Result<Option<(Vec<String>, impl Iterator<Item = String>)>, StorageError> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StorageError::io("open", path, e)),
    };
    let mut lines = BufReader::new(f).lines().map_while(Result::ok);
    let header: Vec<String> = match lines.next() {
        Some(h) => h.split('\t').map(str::to_owned).collect(),
        None => return Ok(None),
    };
    Ok(Some((header, lines.filter(|l| !l.is_empty()))))
}

fn col(header: &[String], name: &str) -> Option<usize> {
    header.iter().position(|h| h == name)
}

/// A time in s as printed in the TSV files, in whole µs.
fn us(cell: &str) -> Option<i64> {
    cell.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .map(|v| (v * 1e6).round() as i64)
}

/// The frame-clock edges of `events.tsv` (session µs, sorted: 8 bytes an
/// edge, ~10 MB for 12 hours at 30 Hz, only while the record is computed).
#[derive(Debug, Default)]
struct Edges {
    first: Option<i64>,
    times: Vec<i64>,
}

impl Edges {
    fn contains(&self, t: i64) -> bool {
        self.times.binary_search(&t).is_ok()
    }
}

/// Reads `events.tsv` into `qc`; returns its frame-clock edges.
fn events(dir: &Path, qc: &mut Qc) -> Result<Edges, StorageError> {
    let mut edges = Edges::default();
    let Some((header, lines)) = tsv_lines(&dir.join(EVENTS_FILE))? else {
        return Ok(edges);
    };
    let (Some(ct), Some(cs), Some(ck), Some(cv), Some(cd)) = (
        col(&header, "t_s"),
        col(&header, "source"),
        col(&header, "kind"),
        col(&header, "value"),
        col(&header, "detail"),
    ) else {
        return Ok(edges);
    };
    for line in lines {
        let cells: Vec<&str> = line.split('\t').collect();
        let (Some(source), Some(kind)) = (cells.get(cs), cells.get(ck)) else {
            continue;
        };
        let kind = unescape(kind);
        let value = cells.get(cv).and_then(|v| v.parse::<f64>().ok());
        let count = value
            .filter(|v| v.is_finite() && *v > 0.0)
            .map_or(0, |v| v as u64);
        match (*source, kind.as_str()) {
            ("link", "sample_gap") => {
                qc.lever.gaps += 1;
                qc.lever.samples_lost += count;
            }
            ("daemon", "storage_dropped") => qc.storage_dropped += count,
            ("task", "decision_mismatch") => qc.decision_mismatches += 1,
            ("daemon", "device_time_anomalies") => {
                // detail `kind=<kind> total`, value = the session's total.
                let detail = cells.get(cd).map(|d| unescape(d)).unwrap_or_default();
                let sub = detail
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("kind="))
                    .unwrap_or("unknown")
                    .to_owned();
                *qc.anomalies.entry(sub).or_default() += count.max(1);
            }
            ("link", "device_clock_rate") => qc.device_clock_rate = value,
            ("device", "frame_ttl") => {
                if let Some(t) = cells.get(ct).and_then(|t| us(t)) {
                    edges.times.push(t);
                }
            }
            ("device", "fault") => {
                let detail = cells.get(cd).map(|d| unescape(d)).unwrap_or_default();
                let code = fault_code(&detail);
                if code == "watchdog_tripped" {
                    qc.watchdog_trips += 1;
                }
                *qc.device_faults.entry(code).or_default() += 1;
            }
            _ => {}
        }
        if is_anomaly(source, &kind) {
            if RATE_LIMITED.contains(&kind.as_str()) {
                // One row reports `value` occurrences; the detail starts
                // with the anomaly's own kind.
                let detail = cells.get(cd).map(|d| unescape(d)).unwrap_or_default();
                let sub = detail.split_whitespace().next().unwrap_or("unknown");
                let sub = sub.trim_end_matches([':', ',']);
                *qc.anomalies.entry(format!("{kind}:{sub}")).or_default() += count.max(1);
            } else {
                *qc.anomalies.entry(kind).or_default() += 1;
            }
        }
    }
    edges.times.sort_unstable();
    edges.first = edges.times.first().copied();
    Ok(edges)
}

/// The fault's code in snake_case, from its detail text (`code=valve_cap_tripped
/// ...`, or the older `Fault { code: WatchdogTripped, ... }`).
fn fault_code(detail: &str) -> String {
    let word = detail
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .find(|w| !matches!(*w, "Fault" | "code" | "detail" | "t_us"))
        .unwrap_or("unknown");
    let mut out = String::new();
    for (i, c) in word.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn frames(dir: &Path, edges: &Edges) -> Result<Option<FramesQc>, StorageError> {
    let Some((header, lines)) = tsv_lines(&dir.join(FRAMES_FILE))? else {
        return Ok(None);
    };
    let (Some(ct), Some(cs), Some(cd)) = (
        col(&header, "t_s"),
        col(&header, "source"),
        col(&header, "dropped"),
    ) else {
        return Ok(None);
    };
    let mut q = FramesQc::default();
    let mut last_t: Option<f64> = None;
    for line in lines {
        let cells: Vec<&str> = line.split('\t').collect();
        q.rows += 1;
        if cells.get(cd).is_some_and(|d| *d == "1") {
            q.dropped += 1;
            continue;
        }
        let source = cells.get(cs).copied().unwrap_or("").to_owned();
        if source == "ttl" {
            match cells.get(ct).and_then(|t| us(t)) {
                Some(t) if edges.contains(t) => q.ttl_on_an_edge += 1,
                Some(t) if edges.first.map_or(true, |f| t < f) => q.ttl_unverifiable += 1,
                _ => q.ttl_not_on_an_edge += 1,
            }
        }
        *q.by_source.entry(source).or_default() += 1;
        if let Some(t) = cells.get(ct).and_then(|t| t.parse::<f64>().ok()) {
            if last_t.is_some_and(|l| t <= l) {
                q.stamps_not_increasing += 1;
            }
            last_t = Some(t);
        }
    }
    let delivered = q.rows - q.dropped;
    let ttl = q.by_source.get("ttl").copied().unwrap_or(0);
    q.ttl_pct = if delivered > 0 {
        100.0 * ttl as f64 / delivered as f64
    } else {
        0.0
    };
    Ok(Some(q))
}

fn latency(dir: &Path) -> Result<LatencyQc, StorageError> {
    let Some((header, lines)) = tsv_lines(&dir.join(TRIALS_FILE))? else {
        return Ok(LatencyQc::default());
    };
    let (Some(cr), Some(cw), Some(co)) = (
        col(&header, "t_response_s"),
        col(&header, "t_reward_s"),
        col(&header, "outcome"),
    ) else {
        return Ok(LatencyQc::default());
    };
    let mut us: Vec<f64> = Vec::new();
    for line in lines {
        let cells: Vec<&str> = line.split('\t').collect();
        if cells.get(co) != Some(&"rewarded") {
            continue;
        }
        let parse = |c: usize| cells.get(c).and_then(|v| v.parse::<f64>().ok());
        if let (Some(r), Some(w)) = (parse(cr), parse(cw)) {
            // Both are device times printed to the µs: round away the
            // decimal-to-binary error.
            us.push(((w - r) * 1e6).round());
        }
    }
    us.sort_by(f64::total_cmp);
    let pick = |q: f64| -> Option<f64> {
        if us.is_empty() {
            return None;
        }
        let i = ((q * us.len() as f64).ceil() as usize).clamp(1, us.len()) - 1;
        us.get(i).copied()
    };
    Ok(LatencyQc {
        count: us.len() as u64,
        p50_us: pick(0.5),
        p99_us: pick(0.99),
        max_us: us.last().copied(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn fault_codes_read_both_detail_forms() {
        assert_eq!(
            fault_code("Fault { code: WatchdogTripped, detail: 1200 }"),
            "watchdog_tripped"
        );
        assert_eq!(
            fault_code("code=valve_cap_tripped detail=1000"),
            "valve_cap_tripped"
        );
        assert_eq!(fault_code(""), "unknown");
    }

    #[test]
    fn anomalies_leave_ordinary_events_out() {
        assert!(is_anomaly("link", "sample_gap"));
        assert!(is_anomaly("daemon", "producer_stale"));
        assert!(!is_anomaly("link", "connected"));
        assert!(!is_anomaly("daemon", "imaging_attached"));
        assert!(!is_anomaly("device", "lick"));
        assert!(!is_anomaly("task", "state"));
    }
}
