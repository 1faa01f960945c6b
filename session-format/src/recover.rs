//! Recovery: finish a session folder that a crash left `running`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use super::chunk::{list_chunks, parse_chunk_name};
use super::lock::lock_dir;
use super::manifest::stage_manifest;
use super::meta::SessionToml;
use super::npy::{read_npy_header, repair_npy};
use super::tsv::{count_trials, header_line, repair_tsv, EVENTS_COLUMNS, TRIALS_COLUMNS};
use super::{
    commit_tmp, rfc3339_utc, stage_tmp, write_atomic, SessionState, StorageError, EVENTS_FILE,
    MANIFEST_FILE, SESSION_FILE, SUMMARY_FILE, TMP_SUFFIX, TRIALS_FILE,
};

/// What [`recover`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryOutcome {
    /// The folder was `running`; it is now `recovered`.
    Recovered,
    /// The folder was already `complete`: nothing touched.
    AlreadyComplete,
    /// The folder was already `recovered`: nothing touched.
    AlreadyRecovered,
}

/// The result of [`recover`], for the log and for `rigctl recover` (as text
/// through `Display`, or as JSON through `Serialize`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecoveryReport {
    pub dir: PathBuf,
    pub outcome: RecoveryOutcome,
    /// One line per change made (also stored in session.toml's `recovery`).
    pub repairs: Vec<String>,
    /// Whether `summary.json` was written.
    pub summary_written: bool,
    /// Things that could not be repaired (a foreign `.npy`), or that went
    /// wrong before recovery (see `SessionWriter::abort`).
    pub problems: Vec<String>,
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.dir.display();
        match self.outcome {
            RecoveryOutcome::AlreadyComplete => write!(f, "{d}: already complete")?,
            RecoveryOutcome::AlreadyRecovered => write!(f, "{d}: already recovered")?,
            RecoveryOutcome::Recovered if self.repairs.is_empty() => {
                write!(f, "{d}: recovered (no file needed repair)")?
            }
            RecoveryOutcome::Recovered => write!(f, "{d}: recovered")?,
        }
        for r in &self.repairs {
            write!(f, "\n  repaired: {r}")?;
        }
        for p in &self.problems {
            write!(f, "\n  problem: {p}")?;
        }
        Ok(())
    }
}

/// Repair a session folder left `running` by a crash (rigd killed, power
/// cut) and mark it `recovered`; see [`recover_with_summary`].
pub fn recover(dir: &Path) -> Result<RecoveryReport, StorageError> {
    recover_with_summary(dir, |_| None)
}

/// Repair a session folder left `running`:
///
/// 1. delete leftover `*.tmp` files of interrupted atomic rewrites;
/// 2. cut each `*.tsv` after its last complete line (restoring the header
///    row of `trials.tsv`/`events.tsv` if nothing is left);
/// 3. set each `*.npy` header's row count from the file size, dropping a
///    partial last row, in every chunk of every stream (a later chunk whose
///    header never reached the disk is removed);
/// 4. `summary.json`: `summarize(dir)` if it returns a value (it sees the
///    repaired files), else keep an existing one, else write counts from
///    `trials.tsv` with `"source": "recovery"`;
/// 5. `session.toml`: state `recovered`, `recovered_utc`, the list of
///    repairs and the `[chunks]` table; then `MANIFEST.sha256`.
///
/// Idempotent: a `recovered` or `complete` folder is left alone. Refuses a folder without a `session.toml` and a
/// session that a live `SessionWriter` holds. An I/O error stops recovery
/// with the state still `running`, so it can be run again.
pub fn recover_with_summary(
    dir: &Path,
    summarize: impl FnOnce(&Path) -> Option<serde_json::Value>,
) -> Result<RecoveryReport, StorageError> {
    let not_session = |reason: &str| StorageError::NotASession {
        path: dir.to_owned(),
        reason: reason.to_owned(),
    };
    if !dir.is_dir() {
        return Err(not_session("not a directory"));
    }
    if !dir.join(SESSION_FILE).is_file() {
        return Err(not_session("it has no session.toml"));
    }
    let mut meta = SessionToml::read(dir).map_err(|e| match e {
        StorageError::Format { reason, .. } => not_session(&format!("session.toml: {reason}")),
        other => other,
    })?;
    let _lock = lock_dir(dir)?.ok_or_else(|| StorageError::Usage {
        path: dir.to_owned(),
        reason: "the session is being recorded by a running rigd; stop it first".to_owned(),
    })?;
    let mut report = RecoveryReport {
        dir: dir.to_owned(),
        outcome: RecoveryOutcome::Recovered,
        repairs: Vec::new(),
        summary_written: false,
        problems: Vec::new(),
    };
    match meta.state {
        SessionState::Complete | SessionState::Recovered => {
            report.outcome = if meta.state == SessionState::Complete {
                RecoveryOutcome::AlreadyComplete
            } else {
                RecoveryOutcome::AlreadyRecovered
            };
            if !dir.join(MANIFEST_FILE).exists() {
                report.problems.push(format!(
                    "{MANIFEST_FILE} is missing (deleted by hand?); `write_manifest` makes a new one"
                ));
            }
            return Ok(report);
        }
        SessionState::Running => {}
    }

    // 1-3: the files, in name order.
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| StorageError::io("list", dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    for name in &names {
        let path = dir.join(name);
        if name.ends_with(TMP_SUFFIX) {
            std::fs::remove_file(&path).map_err(|e| StorageError::io("remove", &path, e))?;
            report.repairs.push(if name == crate::RESERVE_FILE {
                format!("{name}: removed the disk-space reserve the session held")
            } else {
                format!("{name}: removed an interrupted rewrite")
            });
        } else if name.ends_with(".tsv") {
            let header = match name.as_str() {
                TRIALS_FILE => Some(header_line(&TRIALS_COLUMNS)),
                EVENTS_FILE => Some(header_line(&EVENTS_COLUMNS)),
                _ => None,
            };
            if let Some(change) = repair_tsv(&path, header.as_deref())? {
                report.repairs.push(format!("{name}: {change}"));
            }
        } else if name.ends_with(".npy") {
            if is_headerless_chunk(name, &path) {
                // A crash while a chunk was being started: its header never
                // reached the disk, so no row did either.
                std::fs::remove_file(&path).map_err(|e| StorageError::io("remove", &path, e))?;
                report.repairs.push(format!(
                    "{name}: removed a chunk file whose header never reached the disk"
                ));
                continue;
            }
            match repair_npy(&path) {
                Ok(Some(change)) => report.repairs.push(format!("{name}: {change}")),
                Ok(None) => {}
                Err(e @ StorageError::Format { .. }) => report.problems.push(e.to_string()),
                Err(e) => return Err(e),
            }
        }
    }

    // 4: the summary.
    let summary_path = dir.join(SUMMARY_FILE);
    let summary = match summarize(dir) {
        Some(v) => Some(v),
        None if summary_path.exists() => None,
        None => Some(counts_summary(dir)?),
    };
    if let Some(v) = summary {
        let mut json = serde_json::to_vec_pretty(&v).map_err(|e| StorageError::Format {
            path: summary_path.clone(),
            reason: format!("cannot serialise the summary: {e}"),
        })?;
        json.push(b'\n');
        write_atomic(dir, SUMMARY_FILE, &json)?;
        report.summary_written = true;
        report.repairs.push(format!("{SUMMARY_FILE}: written"));
    }

    // 5: state and manifest (manifest renamed first, as in finish()).
    meta.chunks = list_chunks(dir)?;
    meta.state = SessionState::Recovered;
    meta.recovered_utc = Some(rfc3339_utc(SystemTime::now()));
    meta.recovery = report.repairs.clone();
    meta.recovery
        .extend(report.problems.iter().map(|p| format!("problem: {p}")));
    let text = meta.to_text()?;
    let toml_tmp = stage_tmp(dir, SESSION_FILE, text.as_bytes())?;
    let done = stage_manifest(dir, Some(text.as_bytes())).and_then(|manifest_tmp| {
        commit_tmp(dir, &manifest_tmp, MANIFEST_FILE)?;
        commit_tmp(dir, &toml_tmp, SESSION_FILE)
    });
    if let Err(e) = done {
        let _ = std::fs::remove_file(&toml_tmp);
        let _ = std::fs::remove_file(dir.join(format!("{MANIFEST_FILE}{TMP_SUFFIX}")));
        return Err(e);
    }
    Ok(report)
}

/// A later chunk (`x.001.npy`, ...) shorter than any NPY header, or with no
/// readable header: what a crash between creating it and fsyncing its
/// header leaves. Chunk 0 is never judged here (it is created with the
/// session and synced at once).
fn is_headerless_chunk(name: &str, path: &Path) -> bool {
    const MAX_UNSYNCED_HEADER: u64 = 4096;
    let later = parse_chunk_name(name).is_some_and(|(_, n)| n > 0);
    later
        && std::fs::metadata(path).is_ok_and(|m| m.len() < MAX_UNSYNCED_HEADER)
        && read_npy_header(path).is_err()
}

/// The counts-only summary recovery writes when there is none.
fn counts_summary(dir: &Path) -> Result<serde_json::Value, StorageError> {
    let trials = dir.join(TRIALS_FILE);
    let c = if trials.exists() {
        count_trials(&trials)?
    } else {
        Default::default()
    };
    Ok(serde_json::json!({
        "trials": c.trials,
        "rewards": c.rewards,
        "water_ul": c.water_ul,
        "source": "recovery",
    }))
}

/// Session folders under `data_root/<mouse>/<session>/` whose `session.toml`
/// says `running`, sorted: the ones rigd should [`recover`] at startup.
/// Unreadable entries are skipped.
pub fn find_running(data_root: &Path) -> Vec<PathBuf> {
    let subdirs = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut found: Vec<PathBuf> = subdirs(data_root)
        .iter()
        .flat_map(|mouse| subdirs(mouse))
        .filter(|s| SessionToml::read(s).is_ok_and(|m| m.state == SessionState::Running))
        .collect();
    found.sort();
    found
}
