//! [`SessionWriter`]: the files of one running session.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::Flock;

use super::chunk::{list_chunks, parse_chunk_name, ChunkClock, ChunkedNpy};
use super::lock::lock_dir;
use super::manifest::stage_manifest;
use super::meta::{parse_config, LeverRestRecord, SessionToml, FORMAT_VERSION};
#[cfg(test)]
use super::npy::NpyAppender;
use super::npy::NpyDtype;
use super::recover::{recover_with_summary, RecoveryReport};
use super::tsv::{put_event_row, put_trial_row, EventSource, EventValue, TsvFile};
use super::tsv::{EVENTS_COLUMNS, TRIALS_COLUMNS};
use super::{
    commit_tmp, rfc3339_utc, stage_tmp, sync_dir, write_atomic, SessionDir, SessionInfo,
    SessionState, StorageError, EVENTS_FILE, LEVER_FILE, MANIFEST_FILE, SESSION_FILE, SUMMARY_FILE,
    TMP_SUFFIX, TRIALS_FILE,
};
use crate::trial::TrialRecord;

/// Longest allowed time between syncs (the "lose at most a second" promise).
const MAX_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Handle of an extra array added with [`SessionWriter::add_array`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArrayId(usize);

/// The files of one session, written from one thread.
///
/// Every `write_*` call appends to a buffer; [`SessionWriter::maybe_sync`]
/// (call it at least every few hundred ms, e.g. after each batch of input)
/// flushes and fsyncs every file once `fsync_interval` has passed, so a crash
/// or power cut loses at most that much. A write error closes the file it
/// happened on (see [`StorageError::FileClosed`]); the caller should then stop
/// the session with [`SessionWriter::abort`].
///
/// While a writer lives it holds an exclusive `flock` on the session folder,
/// so [`super::recover`] refuses to touch a session that is being recorded.
#[derive(Debug)]
pub struct SessionWriter {
    dir: PathBuf,
    mouse: String,
    start_utc: SystemTime,
    info: SessionInfo,
    lever_rest: Option<LeverRestRecord>,
    config: toml::Table,
    trials: TsvFile,
    events: TsvFile,
    lever: ChunkedNpy,
    lever_clock: ChunkClock,
    arrays: Vec<ChunkedNpy>,
    arrays_clock: ChunkClock,
    fsync_interval: Duration,
    last_sync: Option<Instant>,
    line: String,
    _lock: Flock<File>,
}

impl SessionWriter {
    /// Start writing the session in `dir`: `session.toml` (state `running`),
    /// then `trials.tsv` and `events.tsv` with their header rows and an empty
    /// `lever.npy`, all fsynced. `fsync_interval` above one second is taken as
    /// one second. Every `.npy` stream starts a new chunk file each time its
    /// session time crosses a multiple of `chunk_len` (`[storage].chunk_minutes`;
    /// tests use seconds).
    pub fn create(
        dir: SessionDir,
        info: SessionInfo,
        fsync_interval: Duration,
        chunk_len: Duration,
    ) -> Result<SessionWriter, StorageError> {
        let path = dir.path().to_owned();
        let config = parse_config(&info.config_toml).inspect_err(|_| {
            // Nothing written yet: leave no empty folder behind.
            let _ = std::fs::remove_dir(&path);
        })?;
        let lock = lock_dir(&path)?.ok_or_else(|| StorageError::Usage {
            path: path.clone(),
            reason: "the session folder is locked by another writer".to_owned(),
        })?;
        // session.toml first: from here on the folder is a (running) session
        // that recovery knows how to finish.
        let meta = build_meta(
            dir.mouse(),
            dir.start_utc(),
            &info,
            &config,
            SessionState::Running,
        );
        write_atomic(&path, SESSION_FILE, meta.to_text()?.as_bytes())?;
        let mut me = SessionWriter {
            trials: TsvFile::create(&path.join(TRIALS_FILE), &TRIALS_COLUMNS)?,
            events: TsvFile::create(&path.join(EVENTS_FILE), &EVENTS_COLUMNS)?,
            lever: ChunkedNpy::create(&path, LEVER_FILE, NpyDtype::F8, &[3])?,
            lever_clock: ChunkClock::new(chunk_len),
            arrays_clock: ChunkClock::new(chunk_len),
            dir: path,
            mouse: dir.mouse().to_owned(),
            start_utc: dir.start_utc(),
            info,
            lever_rest: None,
            config,
            arrays: Vec::new(),
            fsync_interval: fsync_interval.min(MAX_SYNC_INTERVAL),
            last_sync: None,
            line: String::with_capacity(256),
            _lock: lock,
        };
        me.sync()?;
        sync_dir(&me.dir)?;
        Ok(me)
    }

    /// The session folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The session's metadata as last written.
    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    /// Trials written so far.
    pub fn trials_written(&self) -> u64 {
        self.trials.rows()
    }

    /// Events written so far.
    pub fn events_written(&self) -> u64 {
        self.events.rows()
    }

    /// Lever samples written so far (all chunks).
    pub fn lever_rows(&self) -> u64 {
        self.lever.rows()
    }

    /// The lever stream's chunk files so far, in order.
    pub fn lever_files(&self) -> Vec<PathBuf> {
        self.lever.files()
    }

    /// Append a row to `trials.tsv`.
    pub fn write_trial(&mut self, rec: &TrialRecord) -> Result<(), StorageError> {
        self.line.clear();
        put_trial_row(&mut self.line, rec);
        self.trials.write_line(&self.line)
    }

    /// Append a row to `events.tsv`. `t_us` is session time (rig clock minus
    /// `t0_rig_us`); a host-side thing (a command) is first mapped onto the rig
    /// clock by the caller. Tabs, newlines and quotes in `kind` and `detail`
    /// are escaped.
    pub fn write_event(
        &mut self,
        t_us: u64,
        source: EventSource,
        kind: &str,
        value: impl Into<EventValue>,
        detail: &str,
    ) -> Result<(), StorageError> {
        self.line.clear();
        put_event_row(&mut self.line, t_us, source, kind, value.into(), detail);
        self.events.write_line(&self.line)
    }

    /// Append a lever sample to `lever.npy`: session time (µs, stored as s),
    /// position (mm from rest) and the raw encoder count. The first sample at
    /// or past the next multiple of the chunk length starts the next chunk
    /// file (`lever.001.npy`, ...), and `session.toml` is rewritten to list it.
    pub fn write_lever(
        &mut self,
        t_us: u64,
        position_mm: f64,
        raw_counts: i64,
    ) -> Result<(), StorageError> {
        if self.lever_clock.crosses(t_us) {
            self.lever.roll()?;
            self.write_session_toml()?;
        }
        self.lever
            .append(&[t_us as f64 / 1e6, position_mm, raw_counts as f64])
    }

    /// Add another append-only array to the session (e.g. `frames.npy`,
    /// `dff.npy`), synced with the others. `file_name` must end in `.npy`, be
    /// a plain name, not look like a chunk (`x.001.npy`) and not be one of
    /// the session's own files. The extra arrays are chunked together: call
    /// [`SessionWriter::arrays_at`] before each group of rows.
    pub fn add_array(
        &mut self,
        file_name: &str,
        dtype: NpyDtype,
        row_shape: &[usize],
    ) -> Result<ArrayId, StorageError> {
        let reserved = [
            LEVER_FILE,
            TRIALS_FILE,
            EVENTS_FILE,
            SESSION_FILE,
            SUMMARY_FILE,
        ];
        let plain = !file_name.is_empty()
            && file_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            && !file_name.starts_with('.');
        let chunk0 = parse_chunk_name(file_name).is_some_and(|(_, n)| n == 0);
        if !plain || !chunk0 || reserved.contains(&file_name) {
            return Err(StorageError::Usage {
                path: self.dir.join(file_name),
                reason: "an extra array needs a plain, new name ending in .npy \
                         (and not a chunk name like x.001.npy)"
                    .to_owned(),
            });
        }
        let appender = ChunkedNpy::create(&self.dir, file_name, dtype, row_shape)?;
        sync_dir(&self.dir)?;
        self.arrays.push(appender);
        Ok(ArrayId(self.arrays.len() - 1))
    }

    /// An array added with [`SessionWriter::add_array`], to append rows to.
    pub fn array(&mut self, id: ArrayId) -> &mut ChunkedNpy {
        &mut self.arrays[id.0]
    }

    /// Say that the next rows of the extra arrays are at session time `t_us`
    /// (a frame's time, say). When it crosses a multiple of the chunk length,
    /// every extra array starts its next chunk file here, together, so arrays
    /// that are row-aligned stay aligned chunk by chunk. Returns whether they
    /// rolled.
    pub fn arrays_at(&mut self, t_us: u64) -> Result<bool, StorageError> {
        if !self.arrays_clock.crosses(t_us) {
            return Ok(false);
        }
        for a in &mut self.arrays {
            a.roll()?;
        }
        self.write_session_toml()?;
        Ok(true)
    }

    /// Rewrite `session.toml` (still `running`) after changing what it says,
    /// e.g. a better clock-sync fit or edited notes.
    pub fn update_info(
        &mut self,
        change: impl FnOnce(&mut SessionInfo),
    ) -> Result<(), StorageError> {
        let mut info = self.info.clone();
        change(&mut info);
        if info.config_toml != self.info.config_toml {
            self.config = parse_config(&info.config_toml)?;
        }
        self.info = info;
        self.write_session_toml()
    }

    /// Sync if `fsync_interval` has passed since the last sync by this
    /// function (the first call only starts the clock). Returns whether it
    /// synced. `now` is injected so tests need no sleeps.
    pub fn maybe_sync(&mut self, now: Instant) -> Result<bool, StorageError> {
        match self.last_sync {
            Some(last) if now.saturating_duration_since(last) < self.fsync_interval => Ok(false),
            None => {
                self.last_sync = Some(now);
                Ok(false)
            }
            Some(_) => {
                self.last_sync = Some(now);
                self.sync()?;
                Ok(true)
            }
        }
    }

    /// Flush and fsync every file now and update the `.npy` headers. All
    /// files are attempted; the first error is returned.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        let mut first = None;
        let mut note = |r: Result<(), StorageError>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        note(self.trials.sync());
        note(self.events.sync());
        note(self.lever.sync());
        for a in &mut self.arrays {
            note(a.sync());
        }
        first.map_or(Ok(()), Err)
    }

    /// Stop cleanly: sync every file, write `summary.json`, then
    /// `session.toml` with state `complete` and `MANIFEST.sha256`. Returns the
    /// folder.
    ///
    /// Close `rigd.log` before calling this, or its hash in the manifest will
    /// not match what is appended later.
    ///
    /// On error (a full disk, say) the error names the file; everything
    /// written before stays intact and `session.toml` still says `running`, so
    /// [`super::recover`] (now, or at the next start of rigd) finishes the job.
    pub fn finish(
        mut self,
        stop_utc: SystemTime,
        reason: &str,
        summary: &serde_json::Value,
    ) -> Result<PathBuf, StorageError> {
        self.sync()?;
        let mut json = serde_json::to_vec_pretty(summary).map_err(|e| StorageError::Format {
            path: self.dir.join(SUMMARY_FILE),
            reason: format!("cannot serialise the summary: {e}"),
        })?;
        json.push(b'\n');
        write_atomic(&self.dir, SUMMARY_FILE, &json)?;
        let mut meta = self.meta(SessionState::Complete);
        meta.chunks = list_chunks(&self.dir)?;
        meta.stop_utc = Some(rfc3339_utc(stop_utc));
        meta.stop_reason = Some(reason.to_owned());
        let text = meta.to_text()?;
        let dir = self.dir.clone();
        let toml_tmp = stage_tmp(&dir, SESSION_FILE, text.as_bytes())?;
        let staged = stage_manifest(&dir, Some(text.as_bytes())).and_then(|manifest_tmp| {
            // The manifest first: a crash between the two renames leaves a
            // `running` folder with a manifest, which recovery rewrites.
            commit_tmp(&dir, &manifest_tmp, MANIFEST_FILE)?;
            commit_tmp(&dir, &toml_tmp, SESSION_FILE)
        });
        if let Err(e) = staged {
            let _ = std::fs::remove_file(&toml_tmp);
            let _ = std::fs::remove_file(dir.join(format!("{MANIFEST_FILE}{TMP_SUFFIX}")));
            return Err(e);
        }
        Ok(dir)
    }

    /// Stop after a failure (a full disk, a closed file): best effort. Syncs
    /// what it can, records the stop time and reason in `session.toml`, then
    /// runs [`super::recover_with_summary`] on the folder, which repairs it and
    /// marks it `recovered`. The returned report lists what failed on the way
    /// in `problems`. If recovery itself fails (the disk is still full), the
    /// folder stays `running` and the next start of rigd recovers it.
    pub fn abort(
        mut self,
        stop_utc: SystemTime,
        reason: &str,
        summary: Option<&serde_json::Value>,
    ) -> Result<RecoveryReport, StorageError> {
        let mut problems = Vec::new();
        if let Err(e) = self.sync() {
            problems.push(format!("sync at abort: {e}"));
        }
        let mut meta = self.meta(SessionState::Running);
        meta.stop_utc = Some(rfc3339_utc(stop_utc));
        meta.stop_reason = Some(reason.to_owned());
        if let Err(e) = meta
            .to_text()
            .and_then(|t| write_atomic(&self.dir, SESSION_FILE, t.as_bytes()))
        {
            problems.push(format!("stop time and reason not recorded: {e}"));
        }
        let dir = self.dir.clone();
        // Release the folder lock (and close every file) before recovering.
        drop(self);
        let mut report = recover_with_summary(&dir, |_| summary.cloned())?;
        problems.append(&mut report.problems);
        report.problems = problems;
        Ok(report)
    }

    fn meta(&self, state: SessionState) -> SessionToml {
        let mut meta = build_meta(&self.mouse, self.start_utc, &self.info, &self.config, state);
        meta.lever_rest = self.lever_rest.clone();
        meta
    }

    /// Record where the lever rests (`[lever_rest]` in `session.toml`,
    /// rewritten at once).
    pub fn set_lever_rest(&mut self, rest: LeverRestRecord) -> Result<(), StorageError> {
        self.lever_rest = Some(rest);
        self.write_session_toml()
    }

    fn write_session_toml(&self) -> Result<(), StorageError> {
        let mut meta = self.meta(SessionState::Running);
        meta.chunks = list_chunks(&self.dir)?;
        let text = meta.to_text()?;
        write_atomic(&self.dir, SESSION_FILE, text.as_bytes())
    }

    /// Test hook: what SIGKILL does — buffered data is lost, nothing synced,
    /// the folder lock released by the dying process.
    #[cfg(test)]
    pub(crate) fn simulate_kill(mut self) {
        self.trials.close_discarding();
        self.events.close_discarding();
        self.lever.close_discarding();
        for a in &mut self.arrays {
            a.close_discarding();
        }
    }

    /// Test hooks.
    #[cfg(test)]
    pub(crate) fn trials_file_for_test(&mut self) -> &mut TsvFile {
        &mut self.trials
    }
    #[cfg(test)]
    pub(crate) fn lever_for_test(&mut self) -> &mut NpyAppender {
        self.lever.open_chunk()
    }
}

/// session.toml's content for a session without a stop yet.
fn build_meta(
    mouse: &str,
    start_utc: SystemTime,
    info: &SessionInfo,
    config: &toml::Table,
    state: SessionState,
) -> SessionToml {
    SessionToml {
        format_version: FORMAT_VERSION,
        state,
        mouse: mouse.to_owned(),
        rig: info.rig.clone(),
        software: "rigd".to_owned(),
        software_version: env!("CARGO_PKG_VERSION").to_owned(),
        notes: info.notes.clone(),
        start_utc: rfc3339_utc(start_utc),
        stop_utc: None,
        stop_reason: None,
        recovered_utc: None,
        recovery: Vec::new(),
        t0_rig_us: info.t0_rig_us,
        host_monotonic_start_ns: info.host_monotonic_start_ns,
        clock_sync: info.clock_sync,
        realtime: info.realtime.clone(),
        lever_rest: None,
        training: info.training.clone(),
        imaging_reference: info.imaging_reference.clone(),
        fov_check: info.fov_check.clone(),
        chunks: Default::default(),
        config: config.clone(),
        extra: toml::Table::new(),
    }
}
