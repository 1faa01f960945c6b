//! The session's storage thread: owns the [`SessionWriter`], takes the rig
//! thread's records from its ring (every 10 ms) and other records (the
//! imaging ingest's events, the rig's `Finish`) from its control channel,
//! syncs the files at least every `fsync_interval_ms`, and at the end finishes
//! the side streams, computes the summary, finishes the folder and hands the
//! summary to the supervisor. Disk work never runs on the rig
//! thread; a disk error stops the session cleanly with the data so far intact.
//!
//! Memory stays flat however long the session runs: the thread keeps only
//! running counts; the trials and the lever trace the summary needs are read
//! back from `trials.tsv` and the lever chunk files at the end.

use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use ringbuf::traits::Consumer;

use crate::behaviour::{parse_resampled, resample_1khz_from, summarize_parsed, Summary};
use crate::session::{
    FinishedSession, LiveView, RecordsConsumer, SessionLog, SideStream, StopReason, StorageMsg,
};
use session_format::trial::TrialRecord;
use session_format::{
    free_reserve, make_reserve, ClockSyncRecord, EventSource, LeverFiles, SessionWriter,
    StorageError, RESERVE_BYTES,
};

/// Why the storage thread could not finish the session folder.
#[derive(Debug, thiserror::Error)]
pub enum StorageFailed {
    #[error(transparent)]
    Files(#[from] StorageError),
    #[error("the summary cannot be encoded as JSON: {0}")]
    Summary(#[from] serde_json::Error),
}

/// Capacity of the storage thread's control channel (the rig's `Finish`, the
/// imaging ingest's events; the rig's records come through its ring).
pub const CONTROL_QUEUE: usize = 4096;

/// Session parameters the thread needs besides the writer.
pub struct StorageSetup {
    /// Rig time (µs) of session time 0.
    pub t0_us: u64,
    pub counts_per_mm: f64,
    pub fsync_interval: Duration,
    pub behaviour: crate::behaviour::SummaryParams,
    /// Streams writing into the same folder (the imaging ingest): stopped
    /// (their files closed) before the folder is finished.
    pub side_streams: Vec<Box<dyn SideStream>>,
    /// Water the mouse had today before this session, µL, and the daily
    /// target: for `summary.json`'s `water_today_ul` and `supplement_ul`.
    pub water_before_today_ul: f64,
    pub daily_water_target_ul: Option<f64>,
    /// Called (once) when a disk error ends the session early, with the
    /// error: stops the task at once so no trial runs unrecorded.
    pub on_storage_error: Option<Box<dyn FnOnce(StopReason) + Send>>,
    /// The session's log file, closed just before the manifest is written
    /// (a line written after it would not match its checksum; later lines
    /// still go to the daemon's own log).
    pub session_log: Option<SessionLog>,
}

fn close_session_log(setup: &mut StorageSetup) {
    if let Some(log) = setup.session_log.take() {
        if let Ok(mut g) = log.lock() {
            *g = None;
        }
    }
}

impl std::fmt::Debug for StorageSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageSetup")
            .field("t0_us", &self.t0_us)
            .field("fsync_interval", &self.fsync_interval)
            .field("side_streams", &self.side_streams.len())
            .finish_non_exhaustive()
    }
}

/// Start the storage thread. `done` gets the result when the folder is
/// finished (or the error that stopped it).
pub fn spawn(
    writer: SessionWriter,
    setup: StorageSetup,
    inputs: Inputs,
    shared: LiveView,
    done: tokio::sync::oneshot::Sender<Result<FinishedSession, StorageFailed>>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("rig-storage".into())
        .spawn(move || {
            let (mut setup, mut inputs) = (setup, inputs);
            let dir = writer.path().to_path_buf();
            if let Err(e) = make_reserve(&dir) {
                // Not fatal: the session is recorded, only a full disk would
                // end it less tidily.
                tracing::warn!(
                    "cannot set aside {RESERVE_BYTES} B in {}: {e}",
                    dir.display()
                );
                free_reserve(&dir);
            }
            let result = run(writer, &mut setup, &mut inputs, &shared);
            free_reserve(&dir);
            if let Err(e) = &result {
                if let Some(stop) = setup.on_storage_error.take() {
                    stop(StopReason::StorageError(e.to_string()));
                }
            }
            let _ = done.send(result);
        })
}

struct State {
    zero_counts: Option<i32>,
    /// Events stamped before the session's t0 (written at session time 0,
    /// and counted here so the clamp is never silent).
    events_before_t0: u64,
    counters: crate::session::SessionCounters,
    /// Running counts, in case trials.tsv cannot be read back at the end
    /// (the trials and the lever are read back from disk for the summary,
    /// never kept here: memory stays flat over a 12-hour session).
    counts: TrialCounts,
    last_info_update: Instant,
}

/// How often the thread empties the rig's records ring when nothing else
/// wakes it (the ring has no wake-up: the rig thread never makes a syscall
/// for storage).
const RING_POLL: Duration = Duration::from_millis(10);

fn run(
    mut w: SessionWriter,
    setup: &mut StorageSetup,
    inputs: &mut Inputs,
    shared: &LiveView,
) -> Result<FinishedSession, StorageFailed> {
    let mut st = State {
        zero_counts: None,
        events_before_t0: 0,
        counters: Default::default(),
        counts: TrialCounts::default(),
        last_info_update: Instant::now(),
    };
    loop {
        if let Err(e) = inputs.drain_records(&mut w, setup, &mut st) {
            return fail(w, setup, e);
        }
        let msg = match inputs.control.recv_timeout(RING_POLL) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                // The rig thread went away without finishing (daemon shutting
                // down hard): keep what we have, finish as stopped.
                if let Err(e) = inputs.drain_records(&mut w, setup, &mut st) {
                    return fail(w, setup, e);
                }
                let reason = StopReason::Requested("daemon stopped".into());
                return finish(w, setup, st, reason, shared, &inputs.control);
            }
        };
        match msg {
            Some(StorageMsg::Finish {
                reason, counters, ..
            }) => {
                // The rig thread sent Finish after its last record: take
                // everything still in the ring and the channel, then finish.
                if let Err(e) = inputs.drain_all(&mut w, setup, &mut st) {
                    return fail(w, setup, e);
                }
                st.counters = counters;
                return finish(w, setup, st, reason, shared, &inputs.control);
            }
            Some(m) => {
                if let Err(e) = write(&mut w, setup, &mut st, m) {
                    return fail(w, setup, e);
                }
            }
            None => {}
        }
        if let Err(e) = w.maybe_sync(Instant::now()) {
            return fail(w, setup, e);
        }
        if st.last_info_update.elapsed() > Duration::from_secs(10) {
            st.last_info_update = Instant::now();
            if let Some(fit) = shared.clock.get() {
                if let Err(e) = w.update_info(|i| i.clock_sync = Some(clock_record(&fit))) {
                    return fail(w, setup, e);
                }
            }
        }
    }
}

/// What the storage thread reads: the rig thread's records ring and the
/// control channel (the rig's `Finish`, the imaging ingest's events).
pub struct Inputs {
    pub records: RecordsConsumer,
    pub control: Receiver<StorageMsg>,
}

impl std::fmt::Debug for Inputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inputs").finish_non_exhaustive()
    }
}

impl Inputs {
    fn drain_records(
        &mut self,
        w: &mut SessionWriter,
        setup: &StorageSetup,
        st: &mut State,
    ) -> Result<(), StorageError> {
        while let Some(m) = self.records.try_pop() {
            write(w, setup, st, m)?;
        }
        Ok(())
    }

    fn drain_all(
        &mut self,
        w: &mut SessionWriter,
        setup: &StorageSetup,
        st: &mut State,
    ) -> Result<(), StorageError> {
        self.drain_records(w, setup, st)?;
        while let Ok(m) = self.control.try_recv() {
            write(w, setup, st, m)?;
        }
        Ok(())
    }
}

/// Session-relative µs.
fn rel(setup: &StorageSetup, t_us: u64) -> u64 {
    t_us.saturating_sub(setup.t0_us)
}

fn write(
    w: &mut SessionWriter,
    setup: &StorageSetup,
    st: &mut State,
    msg: StorageMsg,
) -> Result<(), StorageError> {
    match msg {
        StorageMsg::Lever(batch) => {
            let zero = *st
                .zero_counts
                .get_or_insert(batch.counts().first().copied().unwrap_or(0));
            for (_, t_us, counts) in batch.samples() {
                let mm = f64::from(counts.wrapping_sub(zero)) / setup.counts_per_mm;
                w.write_lever(rel(setup, t_us), mm, i64::from(counts))?;
            }
        }
        StorageMsg::Event {
            t_us,
            source,
            kind,
            value,
            detail,
        } => {
            if t_us < setup.t0_us {
                st.events_before_t0 += 1;
            }
            w.write_event(rel(setup, t_us), source, kind, value, &detail.to_string())?;
        }
        StorageMsg::Trial(rec) => {
            let shifted = rec.to_session_time(setup.t0_us);
            w.write_trial(&shifted)?;
            st.counts.add(&rec);
        }
        StorageMsg::LeverRest { rest, times_taken } => {
            w.set_lever_rest(session_format::LeverRestRecord {
                rest_counts: i64::from(rest.rest_counts),
                first_counts: i64::from(rest.first_counts),
                offset_mm: rest.offset_mm(setup.counts_per_mm),
                method: rest.method.to_owned(),
                t_s: rel(setup, rest.t_us) as f64 / 1e6,
                window_ms: rest.window_us as f64 / 1000.0,
                range_counts: i64::from(rest.range_counts),
                times_taken,
            })?;
        }
        StorageMsg::Finish { .. } => {}
    }
    Ok(())
}

fn clock_record(fit: &firmware_bridge::sync::ClockFit) -> ClockSyncRecord {
    ClockSyncRecord {
        host_ref_us: fit.host_ref_us,
        rig_ref_us: fit.rig_ref_us,
        drift_ppm: fit.drift_ppm,
        half_band_us: fit.half_band_us,
        exchanges: fit.exchanges as u64,
        min_rtt_us: fit.min_rtt_us,
    }
}

fn finish(
    mut w: SessionWriter,
    setup: &mut StorageSetup,
    mut st: State,
    reason: StopReason,
    shared: &LiveView,
    control: &Receiver<StorageMsg>,
) -> Result<FinishedSession, StorageFailed> {
    for stream in std::mem::take(&mut setup.side_streams) {
        let kind = stream.error_event_kind();
        if let Err(e) = stream.finish() {
            tracing::error!("{kind}: {e}");
            let _ = w.write_event(0, EventSource::Daemon, kind, 0.0, &e.to_string());
        }
    }
    // The events the side streams sent while finishing (the imaging
    // ingest's last summaries).
    while let Ok(m) = control.try_recv() {
        if matches!(m, StorageMsg::Event { .. }) {
            let _ = write(&mut w, setup, &mut st, m);
        }
    }
    let (fit, dropped) = (shared.clock.get(), shared.status.storage_drops());
    if let Some(fit) = fit {
        let _ = w.update_info(|i| i.clock_sync = Some(clock_record(&fit)));
    }
    if dropped > 0 {
        // Records the rig thread could not queue (this thread fell behind):
        // say so in the session itself, never lose them silently.
        tracing::error!("{dropped} records could not be queued for storage and are missing");
        let _ = w.write_event(
            0,
            EventSource::Daemon,
            "storage_dropped",
            dropped as f64,
            "records not written: storage queue full",
        );
    }
    // The stream faults' totals (their events were rate-limited).
    for kind in firmware_bridge::link::AnomalyKind::ALL {
        let n = st.counters.anomaly(kind);
        if n > 0 {
            let _ = w.write_event(
                0,
                EventSource::Daemon,
                "device_time_anomalies",
                n as f64,
                &format!("kind={} total", kind.as_str()),
            );
        }
    }
    if st.events_before_t0 > 0 {
        tracing::warn!(
            "{} events were stamped before the session's start; written at time 0",
            st.events_before_t0
        );
        let _ = w.write_event(
            0,
            EventSource::Daemon,
            "events_before_start",
            st.events_before_t0 as f64,
            "events stamped before t0, written at session time 0",
        );
    }
    // Every lever row on disk and declared, then read back for the summary
    // (the same (rig µs, mm) values that were written).
    w.sync()?;
    let trials = trials_on_disk(w.path(), setup.t0_us, &st.counts);
    let mut summary =
        summarize_with_lever_on_disk(w.path(), setup.t0_us, &trials, &setup.behaviour);
    if trials.len() as u64 != st.counts.trials {
        // trials.tsv could not be read back whole: the counts and the water
        // (what the day's cap adds up) come from the running totals.
        summary.trials = st.counts.trials;
        summary.rewards = st.counts.rewards;
        summary.water_ul = st.counts.water_ul;
    }
    summary.set_water_today(setup.water_before_today_ul, setup.daily_water_target_ul);
    let mut summary_json = serde_json::to_value(&summary)?;
    // The quality record, from the files as they now are.
    let qc = match session_format::Qc::compute(w.path()) {
        Ok(qc) => serde_json::to_value(&qc).ok(),
        Err(e) => {
            tracing::warn!("qc of {}: {e}", w.path().display());
            None
        }
    };
    if let (Some(o), Some(qc)) = (summary_json.as_object_mut(), &qc) {
        o.insert("qc".into(), qc.clone());
    }
    let dir = w.path().display().to_string();
    free_reserve(w.path());
    close_session_log(setup);
    w.finish(SystemTime::now(), &reason.to_string(), &summary_json)?;
    Ok(FinishedSession {
        summary: protocol::control::SessionSummary {
            session_dir: dir,
            trials: summary.trials,
            rewards: summary.rewards,
            water_ul: summary.water_ul,
            success_rate: summary.success_rate,
            reaction_time_median_s: summary.reaction_time_median_s,
            trajectory_corr_median: summary.trajectory_corr_median,
            stop_reason: Some(reason.to_string()),
            water_today_ul: summary.water_today_ul,
            supplement_ul: summary.supplement_ul,
            qc,
        },
        summary_json,
        reason,
        counters: st.counters,
    })
}

/// The full behavioural summary of a finished or crashed session folder,
/// recomputed from its files (`trials.tsv`, the lever chunks, `t0_rig_us`
/// and the task's response window from `session.toml`), with
/// `"source": "recovery"`. For [`session_format::recover_with_summary`]:
/// `None` (recovery then writes counts only) if the files cannot be read.
pub fn summarize_folder(dir: &Path) -> Option<serde_json::Value> {
    let (t0, config) = match session_format::read_t0_and_config(dir) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("summary of {}: {e}", dir.display());
            return None;
        }
    };
    let window_ms = config
        .get("task")
        .and_then(|t| t.get("response_window_ms"))
        .and_then(toml::Value::as_integer)
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or_else(|| u64::from(rig_config::RigConfig::default().task.response_window_ms));
    let params = crate::behaviour::SummaryParams::new(window_ms * 1000);
    let trials = match session_format::read_trials_in_rig_time(dir, t0) {
        Ok((trials, 0)) => trials,
        Ok((_, skipped)) => {
            tracing::warn!(
                "summary of {}: {skipped} rows of trials.tsv do not parse",
                dir.display()
            );
            return None;
        }
        Err(e) => {
            tracing::warn!("summary of {}: {e}", dir.display());
            return None;
        }
    };
    let summary = summarize_with_lever_on_disk(dir, t0, &trials, &params);
    let mut v = serde_json::to_value(&summary).ok()?;
    if let Some(o) = v.as_object_mut() {
        o.insert("source".into(), "recovery".into());
        match session_format::Qc::compute(dir) {
            Ok(qc) => {
                if let Ok(qc) = serde_json::to_value(&qc) {
                    o.insert("qc".into(), qc);
                }
            }
            Err(e) => tracing::warn!("qc of {}: {e}", dir.display()),
        }
    }
    Some(v)
}

/// [`crate::behaviour::summarize`] with the lever streamed from the session's
/// chunk files (read twice, never held in memory: only the 1 kHz grid of the
/// movement parsing is). The same result as summarising the trace that was
/// written. If the lever cannot be read, its measures are null (logged);
/// the trial counts and water stay right.
fn summarize_with_lever_on_disk(
    dir: &Path,
    t0_rig_us: u64,
    trials: &[TrialRecord],
    params: &crate::behaviour::SummaryParams,
) -> Summary {
    let grid = LeverFiles::open(dir, t0_rig_us).and_then(|files| {
        let grid = resample_1khz_from(|| files.samples());
        files.take_error().map_or(Ok(grid), Err)
    });
    let (grid_t0, raw_mm) = grid.unwrap_or_else(|e| {
        tracing::error!("summary of {}: cannot read the lever: {e}", dir.display());
        (0, Vec::new())
    });
    let parsed = parse_resampled(grid_t0, raw_mm, &params.movement);
    summarize_parsed(trials, &parsed, params)
}

/// Trials, rewards and water as they were written.
#[derive(Debug, Default)]
struct TrialCounts {
    trials: u64,
    rewards: u64,
    water_ul: f64,
}

impl TrialCounts {
    fn add(&mut self, r: &TrialRecord) {
        self.trials += 1;
        if r.outcome == session_format::trial::Outcome::Rewarded && !r.capped && r.reward_ul > 0.0 {
            self.rewards += 1;
        }
        self.water_ul += r.reward_ul;
    }
}

/// The session's trials read back from its trials.tsv (synced), in rig
/// time; empty (logged) if the file cannot be read.
fn trials_on_disk(dir: &Path, t0: u64, counts: &TrialCounts) -> Vec<TrialRecord> {
    match session_format::read_trials_in_rig_time(dir, t0) {
        Ok((trials, skipped)) => {
            if skipped > 0 || trials.len() as u64 != counts.trials {
                tracing::error!(
                    "summary: trials.tsv read back {} trials ({skipped} rows unreadable), {} were written",
                    trials.len(),
                    counts.trials
                );
            }
            trials
        }
        Err(e) => {
            tracing::error!("summary: cannot read trials.tsv back: {e}");
            Vec::new()
        }
    }
}

fn fail(
    w: SessionWriter,
    setup: &mut StorageSetup,
    error: StorageError,
) -> Result<FinishedSession, StorageFailed> {
    // The side streams (if any) are dropped with the setup: their threads
    // stop and their files stay as last synced; recovery repairs them. The
    // reserve makes room for that on a full disk. The error itself is
    // returned (the supervisor logs it and tells the client), not logged here.
    free_reserve(w.path());
    close_session_log(setup);
    let reason = StopReason::StorageError(error.to_string());
    match w.abort(SystemTime::now(), &reason.to_string(), None) {
        Ok(report) if report.problems.is_empty() => {}
        Ok(report) => tracing::error!("closing the session after the error: {report}"),
        Err(e) => tracing::error!(
            "the session could not be closed after the error ({e}); the next start of \
             rigd recovers it"
        ),
    }
    Err(error.into())
}
