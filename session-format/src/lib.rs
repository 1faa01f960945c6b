//! The on-disk session folder: every file a session writes, how it is
//! written so that a crash loses at most a second, how a crash is repaired,
//! and how each file is read back. It never starts a thread, opens a socket or
//! reads a clock except the UTC wall time the caller passes in.
//!
//! The format is specified for readers (numpy, MATLAB, pandas) in
//! `docs/session-format.md`; this crate is its only writer, and the reader
//! that the daemon's summary, recovery and offline tools share.
//!
//! * [`SessionDir`] creates `<data_root>/<mouse>/<YYYY-MM-DD>_<HHMMSS>/`
//!   exclusively.
//! * [`SessionWriter`] owns the files of one running session: `trials.tsv`,
//!   `events.tsv`, `lever.npy`, `session.toml`, and at a clean stop
//!   `summary.json` and `MANIFEST.sha256`.
//! * [`NpyAppender`] is the append-only `.npy` writer every dense array uses;
//!   [`ChunkedNpy`] cuts a stream into chunk files (`lever.npy`,
//!   `lever.001.npy`, ...) when a [`ChunkClock`] says its session time crossed
//!   a multiple of `[storage].chunk_minutes`.
//! * [`recover`] and [`find_running`] repair folders left `running` by a crash.
//! * Readers: [`read_trials`] / [`read_trials_in_rig_time`], [`LeverFiles`]
//!   and [`read_lever_trace`] (every chunk), [`read_npy_header`], [`read_npy`]
//!   (any whole integer or float array, e.g. an ROI label image or a mean
//!   image), [`read_t0_and_config`], and a mouse's history
//!   ([`water_today_ul`]).
//! * [`SessionLogFile`] is the session's `rigd.log`, rolled into parts.
//!
//! Architecture invariant: a session file is never overwritten or truncated
//! except by [`recover`], which only cuts what a crash left half-written; every
//! rewrite of a whole file (`session.toml`, `summary.json`, the manifest) goes
//! through a temporary file, `fsync` and `rename`, so a reader sees the old
//! version or the new one, never a mixture.

#![forbid(unsafe_code)]

mod chunk;
mod history;
mod lock;
mod log;
mod manifest;
mod meta;
mod npy;
mod qc;
mod recover;
mod reserve;
mod session_dir;
pub mod trial;
mod tsv;
mod writer;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use chunk::{
    chunk_file_name, list_chunks, parse_chunk_name, read_lever_trace, ChunkClock, ChunkedNpy,
    LeverFiles,
};
pub use history::{
    water_on_day_ul, water_today_ul, ImplausibleWater, MAX_REWARD_UL, MAX_SESSION_WATER_UL,
};
pub use log::SessionLogFile;
pub use manifest::write_manifest;
pub use meta::{
    read_t0_and_config, ClockSyncRecord, LeverRestRecord, RealtimeRecord, SessionInfo, SessionState,
};
pub use npy::{
    parse_npy, read_npy, read_npy_header, NpyAppender, NpyArray, NpyData, NpyDtype, NpyElement,
    NpyHeader,
};
pub use qc::{is_anomaly, FramesQc, LatencyQc, LeverQc, Qc, FRAMES_FILE};
pub use recover::{find_running, recover, recover_with_summary, RecoveryOutcome, RecoveryReport};
pub use reserve::{free_reserve, make_reserve, RESERVE_BYTES, RESERVE_FILE};
pub use session_dir::{plain_folder, SessionDir};
pub use trial::{Outcome, TrialRecord};
pub use tsv::{read_trials, EventSource, EventValue, EVENTS_COLUMNS, TRIALS_COLUMNS};
pub use writer::{ArrayId, SessionWriter};

/// Behaviour table, one row per trial.
pub const TRIALS_FILE: &str = "trials.tsv";
/// Every device event, command, link and task state change.
pub const EVENTS_FILE: &str = "events.tsv";
/// Lever samples, float64 (N, 3): session time s, position mm, raw counts.
pub const LEVER_FILE: &str = "lever.npy";
/// Session metadata; `state` says whether the folder is complete.
pub const SESSION_FILE: &str = "session.toml";
/// Behavioural summary, written at stop (or by recovery, counts only).
pub const SUMMARY_FILE: &str = "summary.json";
/// `sha256sum` lines for every other file, written at a clean stop.
pub const MANIFEST_FILE: &str = "MANIFEST.sha256";
/// The session's log, written by the daemon's tracing layer (not by this
/// module). Close it before [`SessionWriter::finish`] so the manifest's hash
/// of it stays true.
pub const LOG_FILE: &str = "rigd.log";
/// Size past which the session log rolls to `rigd.001.log`, `rigd.002.log`,
/// ... (all kept).
pub const LOG_ROTATE_BYTES: u64 = 64 * 1024 * 1024;

/// Part `n` of the session log: `rigd.log`, then `rigd.001.log`, ...
pub fn log_file_name(n: u32) -> String {
    if n == 0 {
        LOG_FILE.to_owned()
    } else {
        format!("rigd.{n:03}.log")
    }
}
/// Suffix of the temporary files of atomic rewrites; never part of a session.
pub const TMP_SUFFIX: &str = ".tmp";

/// Everything that can go wrong while writing or repairing a session folder.
/// Each message names the file and, for I/O, the OS error.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An operating-system call failed on `path`.
    #[error("cannot {action} {}: {source}{}", .path.display(), io_hint(.source))]
    Io {
        /// What was being done: "create", "write", "fsync", ...
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The data root is missing: refuse rather than create it, since a missing
    /// root usually means the data disk is not mounted.
    #[error(
        "data root {} does not exist or is not a directory: mount the data disk or \
         create the folder, or fix [storage].data_root",
        .path.display()
    )]
    DataRootMissing { path: PathBuf },
    /// Every name for this second (`<stamp>`, `<stamp>_2` ... `<stamp>_9`) is taken.
    #[error(
        "session folder {} and its suffixes _2.._9 all exist: wait a second and start again",
        .path.display()
    )]
    SessionExists { path: PathBuf },
    /// The mouse's folder (or the new session folder) is not a plain folder
    /// inside the data root: a symbolic link, a file, or it resolves
    /// elsewhere. rigd writes only into folders it can see are its own.
    #[error(
        "refusing to write a session into {}: {reason}; move it away (the data of a mouse \
         must be a real folder under [storage].data_root)",
        .path.display()
    )]
    UnsafeFolder { path: PathBuf, reason: String },
    /// The mouse id would not name exactly one folder.
    #[error("refusing to create a session folder: {0}")]
    InvalidMouse(#[from] protocol::control::InvalidMouseId),
    /// The caller's config snapshot is not TOML.
    #[error("config snapshot for session.toml is not valid TOML: {0}")]
    ConfigSnapshot(String),
    /// A folder given to recovery is not a session folder.
    #[error("{} is not a session folder: {reason}", .path.display())]
    NotASession { path: PathBuf, reason: String },
    /// A file's content is not what this module writes (a foreign or damaged
    /// `.npy` header, an unparsable `session.toml`).
    #[error("{}: {reason}", .path.display())]
    Format { path: PathBuf, reason: String },
    /// A call that does not fit the file (wrong dtype, a partial row).
    #[error("{}: {reason}", .path.display())]
    Usage { path: PathBuf, reason: String },
    /// An earlier write to this file failed; it takes no more data so that
    /// what is on disk stays a clean prefix for recovery.
    #[error(
        "{}: closed after an earlier write error; stop the session and run recovery",
        .path.display()
    )]
    FileClosed { path: PathBuf },
}

impl StorageError {
    pub(crate) fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// A hint for the errors a person can fix at the rig.
fn io_hint(e: &io::Error) -> &'static str {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    const EROFS: i32 = 30;
    match e.raw_os_error() {
        Some(ENOSPC) | Some(EDQUOT) => {
            " (the data disk is full: free space or move [storage].data_root)"
        }
        Some(EROFS) => {
            " (the file system is mounted read-only: remount it read-write, or point \
             [storage].data_root at a writable disk)"
        }
        _ if e.kind() == io::ErrorKind::PermissionDenied => {
            " (check that rigd's user may write to [storage].data_root)"
        }
        _ => "",
    }
}

/// `fsync` a directory so that entries created or renamed in it survive a
/// power cut.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    let f = File::open(dir).map_err(|e| StorageError::io("open directory", dir, e))?;
    f.sync_all()
        .map_err(|e| StorageError::io("fsync directory", dir, e))
}

/// Replace `dir/name` with `bytes` atomically: write `name.tmp`, fsync, rename,
/// fsync the directory.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
    let tmp = stage_tmp(dir, name, bytes)?;
    commit_tmp(dir, &tmp, name)
}

/// First half of [`write_atomic`]: the temporary file, written and fsynced.
pub(crate) fn stage_tmp(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, StorageError> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| StorageError::io("create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| StorageError::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| StorageError::io("fsync", &tmp, e))
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Second half of [`write_atomic`]: rename into place and fsync the directory.
pub(crate) fn commit_tmp(dir: &Path, tmp: &Path, name: &str) -> Result<(), StorageError> {
    let dst = dir.join(name);
    std::fs::rename(tmp, &dst).map_err(|e| StorageError::io("rename into place", &dst, e))?;
    sync_dir(dir)
}

/// A UTC wall time as RFC 3339 with microseconds: `2024-05-01T09:30:12.123456Z`.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.microsecond()
    )
}

/// The folder stamp `YYYY-MM-DD_HHMMSS` of a session start, in local time
/// `utc_offset_s` east of UTC (0: UTC).
pub(crate) fn folder_stamp(t: SystemTime, utc_offset_s: i32) -> String {
    let utc = time::OffsetDateTime::from(t);
    let dt =
        time::UtcOffset::from_whole_seconds(utc_offset_s).map_or(utc, |off| utc.to_offset(off));
    format!(
        "{:04}-{:02}-{:02}_{:02}{:02}{:02}",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

/// A folder's `trials.tsv` with its times back on the rig clock (its
/// session-time origin `t0_rig_us` from `session.toml`), and the count of
/// rows that did not parse.
pub fn read_trials_in_rig_time(
    dir: &Path,
    t0_rig_us: u64,
) -> Result<(Vec<TrialRecord>, usize), StorageError> {
    let (trials, skipped) = read_trials(&dir.join(TRIALS_FILE))?;
    Ok((
        trials.iter().map(|r| r.to_rig_time(t0_rig_us)).collect(),
        skipped,
    ))
}
