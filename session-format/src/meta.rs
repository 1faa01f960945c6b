//! `session.toml`: what the session was and whether its folder is complete.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{StorageError, SESSION_FILE};

/// Version of the session folder format (`format_version` in session.toml).
pub const FORMAT_VERSION: u32 = 2;

/// Whether a session folder is finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Being written, or left by a crash (then [`super::recover`] repairs it).
    Running,
    /// Stopped cleanly: every file final, manifest written.
    Complete,
    /// Repaired after a crash: loadable, at most the last second lost.
    Recovered,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Complete => "complete",
            Self::Recovered => "recovered",
        }
    }
}

/// The host -> rig clock mapping in force, as fitted by the clock-sync
/// estimator: `rig_us = rig_ref_us + (host_us - host_ref_us) * (1 + drift_ppm * 1e-6)`,
/// where `host_us` is the host's `CLOCK_MONOTONIC` in µs and `rig_us` the
/// unwrapped rig clock (absolute, not session time).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClockSyncRecord {
    /// Host CLOCK_MONOTONIC reference point, µs.
    pub host_ref_us: f64,
    /// Rig clock at the reference point, µs.
    pub rig_ref_us: f64,
    /// Rig µs per host µs minus one, parts per million.
    pub drift_ppm: f64,
    /// Half-width of the band the ping/pong exchanges leave for the offset
    /// line, µs: an upper bound on the mapping error.
    pub half_band_us: f64,
    /// Exchanges behind the fit.
    pub exchanges: u64,
    /// Shortest round trip seen, µs.
    pub min_rtt_us: f64,
}

/// The latency settings a session ran with (`[realtime]` in rig.toml, and
/// what the system granted): the `[realtime]` table of `session.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RealtimeRecord {
    /// The serial reader thread's scheduling (`"SCHED_FIFO 50"`,
    /// `"SCHED_OTHER"`).
    pub reader: String,
    /// rigd's memory was locked (no page faults on the path).
    pub memory_locked: bool,
    /// Idle CPUs were held awake (`/dev/cpu_dma_latency` at 0 µs).
    pub cpus_held_awake: bool,
    /// Kernel unbound workers raised to `SCHED_FIFO` 1 at the start.
    pub tty_workers_raised: u32,
    /// The kernel's preemption model, as far as it could be read.
    pub kernel_preemption: String,
    /// What was asked for and not granted, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_granted: Vec<String>,
}

/// Where the lever rests, as the task engine found it: the `[lever_rest]`
/// table of `session.toml`. The lever files' `mm` counts from the session's
/// first sample; `offset_mm` is rest minus that first sample, so
/// `mm - offset_mm` is mm from rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeverRestRecord {
    /// Rest position, encoder counts (the median of the still window).
    pub rest_counts: i64,
    /// The session's first lever sample, counts (the lever files' zero).
    pub first_counts: i64,
    /// `rest_counts - first_counts` in mm.
    pub offset_mm: f64,
    /// How it was found: `still_window` (at the start), `rezero_below_rest`
    /// or `rezero_held_cue` (taken again during the session, see
    /// `docs/behaviour.md`).
    pub method: String,
    /// Session time the rest was taken at, s.
    pub t_s: f64,
    /// The still window: its length, ms, and its range (max - min), counts.
    pub window_ms: f64,
    pub range_counts: i64,
    /// Times the rest was taken during this session (1 = only at the start).
    pub times_taken: u32,
}

/// What the caller knows about a session, for `session.toml`. The mouse and
/// the UTC start come from the [`super::SessionDir`].
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    /// Rig name (`[rig].name`).
    pub rig: String,
    /// The experimenter's notes (may be empty).
    pub notes: String,
    /// The effective configuration as TOML text; embedded in session.toml as
    /// the `[config]` table.
    pub config_toml: String,
    /// The rig clock (unwrapped, µs) at session time 0. Every time in the
    /// session's tables is rig time minus this.
    pub t0_rig_us: u64,
    /// Host CLOCK_MONOTONIC (ns) at the session start.
    pub host_monotonic_start_ns: u64,
    /// The clock-sync fit, when there is one (update it as it improves).
    pub clock_sync: Option<ClockSyncRecord>,
    /// The latency settings in force at the start.
    pub realtime: Option<RealtimeRecord>,
    /// The session's place in the mouse's training (stage, protocol hash,
    /// training day, weight), written as the `[training]` table; its keys
    /// are the `training` crate's (docs/training.md).
    pub training: Option<toml::Table>,
    /// The imaging reference the session's motion correction and ROIs used
    /// (the mouse's or the rig's), written as `[imaging_reference]`.
    pub imaging_reference: Option<toml::Table>,
    /// The field-of-view check at the start, written as `[fov_check]`.
    pub fov_check: Option<toml::Table>,
}

/// The on-disk shape of session.toml. Field order is file order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SessionToml {
    pub format_version: u32,
    pub state: SessionState,
    pub mouse: String,
    pub rig: String,
    pub software: String,
    pub software_version: String,
    pub notes: String,
    pub start_utc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_utc: Option<String>,
    /// What recovery repaired, one line per change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recovery: Vec<String>,
    pub t0_rig_us: u64,
    pub host_monotonic_start_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_sync: Option<ClockSyncRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realtime: Option<RealtimeRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lever_rest: Option<LeverRestRecord>,
    /// The session's place in the mouse's training (docs/training.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<toml::Table>,
    /// The imaging reference used (docs/session-format.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imaging_reference: Option<toml::Table>,
    /// The field-of-view check at the start (docs/session-format.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fov_check: Option<toml::Table>,
    /// Every `.npy` stream and its chunk files in order (`lever =
    /// ["lever.npy", "lever.001.npy"]`), as of the last rewrite.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub chunks: std::collections::BTreeMap<String, Vec<String>>,
    /// The effective configuration.
    #[serde(default)]
    pub config: toml::Table,
    /// Keys this version does not know (from a newer rigd), kept as they are
    /// when recovery rewrites the file.
    #[serde(flatten)]
    pub extra: toml::Table,
}

impl SessionToml {
    pub(crate) fn to_text(&self) -> Result<String, StorageError> {
        let body = toml::to_string(self).map_err(|e| StorageError::Format {
            path: SESSION_FILE.into(),
            reason: format!("cannot serialise: {e}"),
        })?;
        Ok(format!(
            "# rigd session metadata; format: docs/session-format.md\n{body}"
        ))
    }

    pub(crate) fn read(dir: &Path) -> Result<SessionToml, StorageError> {
        let path = dir.join(SESSION_FILE);
        let text =
            std::fs::read_to_string(&path).map_err(|e| StorageError::io("read", &path, e))?;
        toml::from_str(&text).map_err(|e| StorageError::Format {
            path,
            reason: format!("not a rigd session.toml: {}", e.message()),
        })
    }
}

/// A session's `t0_rig_us` and the `[config]` it ran with, from its
/// `session.toml` (for recomputing a summary from the files).
pub fn read_t0_and_config(dir: &Path) -> Result<(u64, toml::Table), StorageError> {
    let meta = SessionToml::read(dir)?;
    Ok((meta.t0_rig_us, meta.config))
}

/// Parse the caller's config snapshot.
pub(crate) fn parse_config(text: &str) -> Result<toml::Table, StorageError> {
    text.parse::<toml::Table>()
        .map_err(|e| StorageError::ConfigSnapshot(e.message().to_owned()))
}
