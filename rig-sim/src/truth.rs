//! The ground-truth log: what really happened in the simulated world, one row
//! per event, on both the simulator's true time and the device clock.
//!
//! A TSV file (tab-separated, shown here with spaces) with a header line:
//!
//! ```text
//! true_s    device_us  kind         value  detail
//! 1.234567  1234567    press_start  2.61   cued rt_ms=412 rise_ms=141 hold_ms=118 release_ms=60 double=0
//! ```
//!
//! * `true_s`: sim true time, seconds since the simulator started (µs precision).
//! * `device_us`: the device counter at that moment, unwrapped to 64 bits (the
//!   wire carries it modulo 2^32). After a `reboot` row the counter starts again
//!   from 0.
//! * `kind` and `value`: see the table on [`TruthEvent`].
//! * `detail`: free text of `key=value` words (may be empty), for people.
//!
//! Rows are written in true-time order within each flush. The file is flushed
//! at least once a second of host time and at exit.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// The header line of the truth file.
pub const TRUTH_HEADER: &str = "true_s\tdevice_us\tkind\tvalue\tdetail";

/// One true event.
///
/// | kind | value |
/// |---|---|
/// | `sim_start` | host `CLOCK_MONOTONIC`, ns, at true time 0 (exact in detail: `host_monotonic_ns=N speed=S`) |
/// | `press_start` | planned peak, mm (detail: `cued rt_ms=..`, `spontaneous` or `twitch`) |
/// | `threshold_crossing` | the truth threshold, mm (lever passing it upward) |
/// | `press_end` | peak reached, mm (lever back below 0.1 mm after the release) |
/// | `cue_ignored` | 0 (the mouse decided not to answer this cue) |
/// | `lick_on`, `lick_off` | licks since device boot |
/// | `valve_open` | commanded µs (0 for a flush) |
/// | `valve_close` | µs open (detail: `cause=N`) |
/// | `valve_water` | µL the opening really delivered ([`crate::ValveModel`]; detail: `open_us=N`), just before its `valve_close` |
/// | `tone_on` | frequency, Hz (detail: `level_pct=N`) |
/// | `tone_off` | 0 (detail: `cause=N`) |
/// | `ttl` | frame-clock edges since device boot |
/// | `sync_start`, `sync_end` | the code sent |
/// | `safe_state` | ms since the last valid host frame |
/// | `safe_state_cleared` | 0 |
/// | `fault_unplug` | seconds unplugged |
/// | `fault_replug` | 0 |
/// | `fault_silent_start` | seconds silent |
/// | `fault_silent_end` | 0 |
/// | `fault_garbage` | bytes written |
/// | `fault_clockstep` | seconds the device's timestamps stepped by |
/// | `fault_pastbatch` | seconds the next lever batch is stamped in the past |
/// | `fault_dupbatch` | 0 |
/// | `fault_hold` | seconds the lever is held 2.4 mm down |
/// | `fault_jiggle` | seconds the lever is jiggled (1 mm every other 100 ms) |
/// | `reboot` | the device counter just before the reboot (old epoch) |
#[derive(Debug, Clone, PartialEq)]
pub struct TruthEvent {
    /// Sim true time, µs.
    pub true_us: f64,
    pub kind: TruthKind,
    pub value: f64,
    pub detail: String,
}

/// The `kind` column.
pub type TruthKind = &'static str;

impl TruthEvent {
    pub fn new(true_us: f64, kind: TruthKind, value: f64) -> Self {
        Self {
            true_us,
            kind,
            value,
            detail: String::new(),
        }
    }

    pub fn with_detail(mut self, detail: String) -> Self {
        self.detail = detail;
        self
    }
}

/// Writes the truth TSV. Rows are collected with [`TruthLog::push`] and
/// written, sorted by true time, by [`TruthLog::commit`].
#[derive(Debug)]
pub struct TruthLog {
    out: BufWriter<File>,
    pending: Vec<(TruthEvent, u64)>,
    last_flush: Instant,
    rows: u64,
}

impl TruthLog {
    /// Create (or truncate) the file and write the header.
    pub fn create(path: &Path) -> io::Result<Self> {
        let mut out = BufWriter::new(File::create(path)?);
        writeln!(out, "{TRUTH_HEADER}")?;
        out.flush()?;
        Ok(Self {
            out,
            pending: Vec::new(),
            last_flush: Instant::now(),
            rows: 0,
        })
    }

    /// Queue one row; `device_us` is the unwrapped device counter.
    pub fn push(&mut self, ev: TruthEvent, device_us: u64) {
        self.pending.push((ev, device_us));
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Write the queued rows in true-time order; flush the file if a second
    /// has passed since the last flush.
    pub fn commit(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.pending
                .sort_by(|a, b| a.0.true_us.total_cmp(&b.0.true_us));
            for (ev, device_us) in self.pending.drain(..) {
                let value = (ev.value * 1e4).round() / 1e4;
                writeln!(
                    self.out,
                    "{:.6}\t{}\t{}\t{}\t{}",
                    ev.true_us / 1e6,
                    device_us,
                    ev.kind,
                    value,
                    ev.detail
                )?;
                self.rows += 1;
            }
        }
        if self.last_flush.elapsed() >= Duration::from_millis(500) {
            self.out.flush()?;
            self.last_flush = Instant::now();
        }
        Ok(())
    }

    /// Write everything and flush to the disk.
    pub fn finish(mut self) -> io::Result<()> {
        self.commit()?;
        self.out.flush()?;
        self.out.get_ref().sync_all()
    }
}
