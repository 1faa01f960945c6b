//! The two tables, `trials.tsv` and `events.tsv`: tab-separated, one header
//! row, `\n` line ends, UTF-8. Times are session seconds printed exactly from
//! integer microseconds (`12.000250`). Text cells escape `\\`, tab, newline,
//! carriage return and `"` with a backslash, so a cell never holds a raw
//! delimiter and never starts with a quote (which CSV readers would take for
//! a quoted field).

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::StorageError;
use crate::trial::TrialRecord;

/// Columns of `trials.tsv`, in [`TrialRecord`]'s field order; `*_us` times
/// become `*_s` seconds.
pub const TRIALS_COLUMNS: [&str; 11] = [
    "trial",
    "t_start_s",
    "t_cue_s",
    "t_response_s",
    "outcome",
    "t_reward_s",
    "reward_ul",
    "valve_open_us",
    "lever_mm_at_cue",
    "iti_presses",
    "capped",
];

/// Columns of `events.tsv`.
pub const EVENTS_COLUMNS: [&str; 5] = ["t_s", "source", "kind", "value", "detail"];

/// Write buffer per table.
const BUF_BYTES: usize = 64 * 1024;

/// Where an event came from (the `source` column of `events.tsv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSource {
    /// Stamped by the microcontroller: licks, valve and tone edges, TTLs, ...
    Device,
    /// A command the host sent, at its host send time mapped onto the rig clock.
    Command,
    /// Serial link state changes (connected, lost, reconnected, ...).
    Link,
    /// Task engine state changes (iti, cue, response, reward, ...).
    Task,
    /// The daemon itself (session start/stop, storage warnings, dropped data).
    Daemon,
}

impl EventSource {
    /// The text in the `source` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Command => "command",
            Self::Link => "link",
            Self::Task => "task",
            Self::Daemon => "daemon",
        }
    }
}

/// The `value` column of `events.tsv`: empty, an integer or a number.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum EventValue {
    #[default]
    None,
    Int(i64),
    Float(f64),
}

impl From<i64> for EventValue {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}
impl From<i32> for EventValue {
    fn from(v: i32) -> Self {
        Self::Int(v.into())
    }
}
impl From<u32> for EventValue {
    fn from(v: u32) -> Self {
        Self::Int(v.into())
    }
}
impl From<bool> for EventValue {
    fn from(v: bool) -> Self {
        Self::Int(v.into())
    }
}
impl From<f64> for EventValue {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}
impl<T: Into<EventValue>> From<Option<T>> for EventValue {
    fn from(v: Option<T>) -> Self {
        v.map_or(Self::None, Into::into)
    }
}

/// Append microseconds as seconds with exactly six decimals.
pub(crate) fn put_us_as_s(out: &mut String, t_us: u64) {
    let _ = write!(out, "{}.{:06}", t_us / 1_000_000, t_us % 1_000_000);
}

/// Append a float so that numpy, pandas and MATLAB parse it back exactly
/// (shortest round-trip digits; `NaN`, `Inf`, `-Inf`).
pub(crate) fn put_f64(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{v}");
    }
}

/// Append text with `\\`, tab, newline, CR and `"` escaped.
pub(crate) fn put_escaped(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '"' => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// Undo [`put_escaped`] (for tests and readers of our own files).
pub(crate) fn unescape(cell: &str) -> String {
    let mut out = String::with_capacity(cell.len());
    let mut it = cell.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some(o) => out.push(o),
            None => out.push('\\'),
        }
    }
    out
}

/// One `trials.tsv` line, with its `\n`.
pub(crate) fn put_trial_row(out: &mut String, rec: &TrialRecord) {
    // Exhaustive destructuring: a field added to TrialRecord fails to compile
    // here until it is given a column (and TRIALS_COLUMNS and the docs).
    let TrialRecord {
        trial,
        t_start_us,
        t_cue_us,
        t_response_us,
        outcome,
        t_reward_us,
        reward_ul,
        valve_open_us,
        lever_mm_at_cue,
        iti_presses,
        capped,
    } = rec;
    let _ = write!(out, "{trial}\t");
    put_us_as_s(out, *t_start_us);
    out.push('\t');
    put_us_as_s(out, *t_cue_us);
    out.push('\t');
    if let Some(t) = t_response_us {
        put_us_as_s(out, *t);
    }
    out.push('\t');
    out.push_str(outcome.as_str());
    out.push('\t');
    if let Some(t) = t_reward_us {
        put_us_as_s(out, *t);
    }
    out.push('\t');
    put_f64(out, *reward_ul);
    let _ = write!(out, "\t{valve_open_us}\t");
    put_f64(out, *lever_mm_at_cue);
    let _ = writeln!(out, "\t{iti_presses}\t{}", u8::from(*capped));
}

/// One `events.tsv` line, with its `\n`.
pub(crate) fn put_event_row(
    out: &mut String,
    t_us: u64,
    source: EventSource,
    kind: &str,
    value: EventValue,
    detail: &str,
) {
    put_us_as_s(out, t_us);
    out.push('\t');
    out.push_str(source.as_str());
    out.push('\t');
    put_escaped(out, kind);
    out.push('\t');
    match value {
        EventValue::None => {}
        EventValue::Int(v) => {
            let _ = write!(out, "{v}");
        }
        EventValue::Float(v) => put_f64(out, v),
    }
    out.push('\t');
    put_escaped(out, detail);
    out.push('\n');
}

/// The header line (with `\n`) of a table.
pub(crate) fn header_line(columns: &[&str]) -> String {
    let mut s = columns.join("\t");
    s.push('\n');
    s
}

/// A buffered, append-only table file. Closed after a write error, like
/// [`super::NpyAppender`], so what is on disk stays a clean prefix.
#[derive(Debug)]
pub(crate) struct TsvFile {
    path: PathBuf,
    writer: Option<BufWriter<File>>,
    rows: u64,
}

impl TsvFile {
    /// Create `path` exclusively and write the header row (not yet fsynced).
    pub(crate) fn create(path: &Path, columns: &[&str]) -> Result<Self, StorageError> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| StorageError::io("create", path, e))?;
        let mut me = Self {
            path: path.to_owned(),
            writer: Some(BufWriter::with_capacity(BUF_BYTES, file)),
            rows: 0,
        };
        me.write_raw(header_line(columns).as_bytes())?;
        Ok(me)
    }

    /// Rows written (after the header).
    pub(crate) fn rows(&self) -> u64 {
        self.rows
    }

    /// Append one complete line (ending in `\n`).
    pub(crate) fn write_line(&mut self, line: &str) -> Result<(), StorageError> {
        debug_assert!(line.ends_with('\n'));
        self.write_raw(line.as_bytes())?;
        self.rows += 1;
        Ok(())
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        let w = self
            .writer
            .as_mut()
            .ok_or_else(|| StorageError::FileClosed {
                path: self.path.clone(),
            })?;
        if let Err(e) = w.write_all(bytes) {
            self.close_discarding();
            return Err(StorageError::io("write", &self.path, e));
        }
        Ok(())
    }

    /// Flush the buffer and fsync.
    pub(crate) fn sync(&mut self) -> Result<(), StorageError> {
        let w = self
            .writer
            .as_mut()
            .ok_or_else(|| StorageError::FileClosed {
                path: self.path.clone(),
            })?;
        let result = w
            .flush()
            .map_err(|e| StorageError::io("write", &self.path, e))
            .and_then(|()| {
                w.get_ref()
                    .sync_data()
                    .map_err(|e| StorageError::io("fsync", &self.path, e))
            });
        if result.is_err() {
            self.close_discarding();
        }
        result
    }

    /// Drop the file without flushing its buffer.
    pub(crate) fn close_discarding(&mut self) {
        if let Some(w) = self.writer.take() {
            let (file, _unwritten) = w.into_parts();
            drop(file);
        }
    }

    /// Test hook: replace the file (e.g. with `/dev/full`).
    #[cfg(test)]
    pub(crate) fn replace_file_for_test(&mut self, file: File) {
        self.writer = Some(BufWriter::with_capacity(BUF_BYTES, file));
    }
}

/// How far back from the end a crash can have left garbage: far more than a
/// second of writes.
const TAIL_WINDOW: u64 = 4 * 1024 * 1024;

/// Make a table consistent after a crash: cut everything after the last
/// complete line (a half-written row, or the zero bytes some file systems
/// leave at the end of unsynced data). If the file is empty or lost its
/// header, `header` (when known) is written back. Returns what changed.
pub(crate) fn repair_tsv(
    path: &Path,
    header: Option<&str>,
) -> Result<Option<String>, StorageError> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| StorageError::io("open for repair", path, e))?;
    let size = f
        .metadata()
        .map_err(|e| StorageError::io("stat", path, e))?
        .len();
    let start = size.saturating_sub(TAIL_WINDOW);
    f.seek(SeekFrom::Start(start))
        .map_err(|e| StorageError::io("seek", path, e))?;
    let mut tail = Vec::with_capacity((size - start) as usize);
    f.read_to_end(&mut tail)
        .map_err(|e| StorageError::io("read", path, e))?;
    // Everything from the first NUL on is crash debris, never table text.
    let clean = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
    let keep = match tail[..clean].iter().rposition(|&b| b == b'\n') {
        Some(i) => start + i as u64 + 1,
        None if start == 0 => 0,
        // No line end in the whole window: a line this long is not ours.
        None => {
            return Err(StorageError::Format {
                path: path.to_owned(),
                reason: format!("no line end in the last {TAIL_WINDOW} bytes"),
            })
        }
    };
    let mut changes = Vec::new();
    if keep < size {
        f.set_len(keep)
            .map_err(|e| StorageError::io("truncate", path, e))?;
        changes.push(format!(
            "dropped {} bytes after the last complete line",
            size - keep
        ));
    }
    if keep == 0 {
        if let Some(h) = header {
            f.seek(SeekFrom::Start(0))
                .map_err(|e| StorageError::io("seek", path, e))?;
            f.write_all(h.as_bytes())
                .map_err(|e| StorageError::io("write", path, e))?;
            changes.push("restored the header row".to_owned());
        }
    }
    if changes.is_empty() {
        return Ok(None);
    }
    f.sync_all()
        .map_err(|e| StorageError::io("fsync", path, e))?;
    Ok(Some(changes.join("; ")))
}

/// Counts from `trials.tsv` for a summary written by recovery.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct TrialCounts {
    pub trials: u64,
    pub rewards: u64,
    pub water_ul: f64,
}

/// Count trials, rewarded trials and water from a `trials.tsv`.
pub(crate) fn count_trials(path: &Path) -> Result<TrialCounts, StorageError> {
    let text = std::fs::read_to_string(path).map_err(|e| StorageError::io("read", path, e))?;
    let mut lines = text.lines();
    let mut counts = TrialCounts::default();
    let Some(header) = lines.next() else {
        return Ok(counts);
    };
    let cols: Vec<&str> = header.split('\t').collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .ok_or_else(|| StorageError::Format {
                path: path.to_owned(),
                reason: format!("no {name:?} column in the header"),
            })
    };
    let outcome = col("outcome")?;
    let reward = col("reward_ul")?;
    for line in lines.filter(|l| !l.is_empty()) {
        let cells: Vec<&str> = line.split('\t').collect();
        counts.trials += 1;
        if cells.get(outcome) == Some(&"rewarded") {
            counts.rewards += 1;
        }
        if let Some(v) = cells.get(reward).and_then(|c| c.parse::<f64>().ok()) {
            if v.is_finite() {
                counts.water_ul += v;
            }
        }
    }
    Ok(counts)
}

/// Session seconds as printed by [`put_us_as_s`] (`12.000250`) back to µs,
/// exactly. `None` for an empty or malformed cell.
fn parse_s_as_us(cell: &str) -> Option<u64> {
    let (s, frac) = cell.split_once('.').unwrap_or((cell, ""));
    if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u64 = s.parse().ok()?;
    let mut micros: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    for _ in frac.len()..6 {
        micros *= 10;
    }
    whole.checked_mul(1_000_000)?.checked_add(micros)
}

/// The trials of a `trials.tsv` as written by this module, times in session
/// µs (as in the file). Rows that do not parse (a foreign or damaged line)
/// are skipped; the count of skipped rows is returned with them.
pub fn read_trials(path: &Path) -> Result<(Vec<TrialRecord>, usize), StorageError> {
    use crate::trial::Outcome;
    let text = std::fs::read_to_string(path).map_err(|e| StorageError::io("read", path, e))?;
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return Ok((Vec::new(), 0));
    };
    let cols: Vec<&str> = header.split('\t').collect();
    let idx: Option<Vec<usize>> = TRIALS_COLUMNS
        .iter()
        .map(|c| cols.iter().position(|h| h == c))
        .collect();
    let Some(idx) = idx else {
        return Err(StorageError::Format {
            path: path.to_owned(),
            reason: "trials.tsv header lacks columns this rigd writes".to_owned(),
        });
    };
    let (mut out, mut skipped) = (Vec::new(), 0);
    for line in lines.filter(|l| !l.is_empty()) {
        let cells: Vec<&str> = line.split('\t').collect();
        let cell = |k: usize| cells.get(idx[k]).copied().unwrap_or("");
        let opt_us = |k: usize| -> Option<Option<u64>> {
            match cell(k) {
                "" => Some(None),
                c => parse_s_as_us(c).map(Some),
            }
        };
        let rec = (|| {
            Some(TrialRecord {
                trial: cell(0).parse().ok()?,
                t_start_us: parse_s_as_us(cell(1))?,
                t_cue_us: parse_s_as_us(cell(2))?,
                t_response_us: opt_us(3)?,
                outcome: match cell(4) {
                    "rewarded" => Outcome::Rewarded,
                    "miss" => Outcome::Miss,
                    "aborted" => Outcome::Aborted,
                    _ => return None,
                },
                t_reward_us: opt_us(5)?,
                reward_ul: cell(6).parse().ok()?,
                valve_open_us: cell(7).parse().ok()?,
                lever_mm_at_cue: cell(8).parse().ok()?,
                iti_presses: cell(9).parse().ok()?,
                capped: cell(10) == "1",
            })
        })();
        match rec {
            Some(r) => out.push(r),
            None => skipped += 1,
        }
    }
    Ok((out, skipped))
}
