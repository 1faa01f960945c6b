//! Putting a planned session together: the folder and its writer, the imaging
//! ingest, the storage thread, and what the rig thread needs to start the
//! task. Everything here is I/O done once per session, on the supervisor's
//! thread, before the rig thread is told anything: a failure leaves no thread
//! running and nothing but a closed folder behind.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;

use crate::imaging::ingest::{check_disk_rate, Ingest, IngestCounters, IngestSetup};
use crate::preview::PreviewState;
use crate::session::{
    records_ring, FinishedSession, LiveView, RigRequest, SessionId, SessionLog, SessionPlan,
    SessionStart, SideStream, StartError, StorageMsg,
};
use crate::storage_thread::{self, StorageFailed, StorageSetup};
use crate::task::TaskEngine;
use session_format::{SessionDir, SessionInfo, SessionWriter};

/// What the supervisor hands in besides the plan.
#[derive(Debug)]
pub(super) struct OpenContext<'a> {
    pub id: SessionId,
    pub live: &'a LiveView,
    pub rig: &'a crossbeam_channel::Sender<RigRequest>,
    pub preview: Option<&'a Arc<PreviewState>>,
    pub session_log: &'a SessionLog,
}

/// A session whose threads run, ready for the rig thread.
#[derive(Debug)]
pub(super) struct Opened {
    pub dir: std::path::PathBuf,
    pub start_utc: SystemTime,
    pub start: SessionStart,
    pub done: oneshot::Receiver<Result<FinishedSession, StorageFailed>>,
    pub imaging: Option<Arc<IngestCounters>>,
    pub tuning: crate::realtime::SessionTuning,
}

/// Open the session's files and start its threads.
pub(super) fn open(plan: SessionPlan, ctx: OpenContext<'_>) -> Result<Opened, StartError> {
    let cfg = &plan.cfg;
    if let Some(bytes_per_s) = plan.raw_frames_bytes_per_s() {
        check_disk_rate(&cfg.storage.data_root, bytes_per_s)
            .map_err(|e| StartError::DiskTooSlow(e.to_string()))?;
    }
    let start_utc = SystemTime::now();
    let dir = SessionDir::create_at_offset(
        Path::new(&cfg.storage.data_root),
        &plan.mouse,
        start_utc,
        plan.utc_offset_s,
    )
    .map_err(StartError::Folder)?;
    let tuning = crate::realtime::SessionTuning::acquire(&cfg.realtime);
    let info = SessionInfo {
        rig: cfg.rig.name.clone(),
        notes: plan.notes.clone(),
        config_toml: cfg
            .to_toml_string()
            .map_err(|e| StartError::ConfigSnapshot(e.to_string()))?,
        t0_rig_us: plan.t0_us,
        host_monotonic_start_ns: firmware_bridge::link::host_now_ns(),
        clock_sync: None,
        realtime: Some(tuning.record().clone()),
        training: plan.training.clone(),
        imaging_reference: plan.imaging_reference.clone(),
        fov_check: plan.fov_check.clone(),
    };
    let fsync = Duration::from_millis(u64::from(cfg.storage.fsync_interval_ms));
    let chunk_len = Duration::from_secs(u64::from(cfg.storage.chunk_minutes) * 60);
    let writer = SessionWriter::create(dir, info, fsync, chunk_len).map_err(StartError::Writer)?;
    let path = writer.path().to_path_buf();
    if let Some(mean) = &plan.fov_mean {
        write_fov_mean(&path, mean, cfg.imaging.width, cfg.imaging.height)
            .map_err(StartError::Writer)?;
    }

    let (records, records_out) = records_ring();
    let (tx, rx) = crossbeam_channel::bounded(storage_thread::CONTROL_QUEUE);
    let (done_tx, done) = oneshot::channel();
    let (ingest, ttl_edges) = start_imaging(&plan, &path, fsync, chunk_len, &ctx, &tx)?;
    let imaging = ingest.as_ref().map(|i| i.counters.clone());
    let side_streams: Vec<Box<dyn SideStream>> = ingest
        .into_iter()
        .map(|i| Box::new(i) as Box<dyn SideStream>)
        .collect();
    let setup = StorageSetup {
        t0_us: plan.t0_us,
        counts_per_mm: cfg.rig.encoder_counts_per_mm,
        fsync_interval: fsync,
        behaviour: crate::behaviour::SummaryParams::from_config(cfg),
        side_streams,
        water_before_today_ul: plan.water_before_today_ul,
        daily_water_target_ul: cfg.safety.daily_water_target_ul,
        on_storage_error: Some({
            // A disk error ends the session: stop the task at once (no
            // trial may run, and no water flow, without a record).
            let (rig, id) = (ctx.rig.clone(), ctx.id);
            Box::new(move |reason| {
                let _ = rig.send(RigRequest::Stop { id, reason });
            })
        }),
        session_log: Some(ctx.session_log.clone()),
    };
    let inputs = storage_thread::Inputs {
        records: records_out,
        control: rx,
    };
    storage_thread::spawn(writer, setup, inputs, ctx.live.clone(), done_tx).map_err(|e| {
        StartError::Thread {
            what: "storage",
            source: Box::new(e),
        }
    })?;
    Ok(Opened {
        dir: path,
        start_utc,
        start: SessionStart {
            id: ctx.id,
            engine: TaskEngine::new(plan.params),
            records,
            storage: tx,
            ttl_edges,
        },
        done,
        imaging,
        tuning,
    })
}

/// `fov_check_mean.npy`: the mean image the field-of-view check registered
/// against the reference, float32 `(1, H, W)` like `mean_image.npy`.
fn write_fov_mean(
    dir: &Path,
    mean: &[f32],
    width: u32,
    height: u32,
) -> Result<(), session_format::StorageError> {
    let path = dir.join(FOV_MEAN_FILE);
    let mut npy = session_format::NpyAppender::create(
        &path,
        session_format::NpyDtype::F4,
        &[height as usize, width as usize],
    )?;
    npy.append(mean)?;
    npy.sync()
}

/// The mean image of the field-of-view check, in the session folder.
pub const FOV_MEAN_FILE: &str = "fov_check_mean.npy";

/// The imaging ingest on its own thread, writing frames.tsv (and
/// frames.npy) into the same folder; frame-clock edges come from the rig
/// thread through the returned sender. None when imaging is off.
#[allow(clippy::type_complexity)]
fn start_imaging(
    plan: &SessionPlan,
    path: &Path,
    fsync: Duration,
    chunk_len: Duration,
    ctx: &OpenContext<'_>,
    storage: &crossbeam_channel::Sender<StorageMsg>,
) -> Result<
    (
        Option<Ingest>,
        Option<crossbeam_channel::Sender<(u64, u64)>>,
    ),
    StartError,
> {
    let cfg = &plan.cfg;
    if !cfg.imaging.enabled {
        return Ok((None, None));
    }
    let im = &cfg.imaging;
    let (edge_tx, edge_rx) = crossbeam_channel::bounded(4096);
    let setup = IngestSetup {
        shm_name: im.shm_name.clone(),
        width: im.width,
        height: im.height,
        channels: im.channels,
        ttl_wired: im.ttl_wired,
        frame_rate_hz: im.frame_rate_hz,
        raw_frames: cfg.storage.raw_frames,
        t0_us: plan.t0_us,
        session_dir: path.to_owned(),
        fsync_interval: fsync,
        chunk_len,
        analysis: Some(crate::imaging::analysis::AnalysisSetup {
            width: im.width as usize,
            height: im.height as usize,
            roi_labels: im.roi_labels.clone(),
            roi_table: im.roi_table.clone(),
            motion_correction: im.motion_correction,
            reference_image: im.reference_image.clone(),
            neuropil_coefficient: im.neuropil_coefficient,
            baseline: crate::imaging::dff::BaselineParams::from_config(
                &im.baseline,
                im.frame_rate_hz,
            ),
        }),
        preview: ctx.preview.cloned(),
    };
    let ingest = Ingest::start(setup, edge_rx, ctx.live.clone(), storage.clone()).map_err(|e| {
        StartError::Thread {
            what: "imaging",
            source: Box::new(e),
        }
    })?;
    Ok((Some(ingest), Some(edge_tx)))
}
