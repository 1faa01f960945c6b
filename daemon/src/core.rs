//! The daemon's core, on the tokio runtime: owns the session lifecycle and
//! answers control requests. It never touches the serial port or the disk on
//! the latency path; it asks the rig thread ([`crate::rig`]) and the storage
//! thread ([`crate::storage_thread`]) through channels.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use protocol::control::{
    validate_mouse_id, ControlError, ErrorCode, Event, LinkState, Request, SessionEvent,
    SessionState, SessionSummary, StartReply, StartRequest, StatusReply, StopReply, ValveAction,
};
use protocol::serial::Tone;
use rig_config::RigConfig;
use serde_json::Value;
use tokio::sync::{broadcast, oneshot};

use crate::control::{event_line, CoreRequest, EventLine};
use crate::imaging::ingest::{check_disk_rate, Ingest, IngestCounters, IngestSetup};
use crate::rig::{LiveStatus, RigNotice, RigRequest, SessionStart};
use crate::storage::{SessionDir, SessionInfo, SessionWriter};
use crate::storage_thread::{self, FinishedSession, StorageSetup};
use crate::task::{TaskEngine, TaskParams};

/// Where per-session log lines go (the daemon's tracing layer writes to it
/// while a session runs).
pub type SessionLog = Arc<Mutex<Option<SessionLogFile>>>;

/// A session's `rigd.log`, rolled to `rigd.001.log`, `rigd.002.log`, ... when
/// the open part would grow past a size limit. Nothing is deleted: every
/// part is session data (and listed in the manifest). The tracing layer
/// writes one whole event per `write`, so a part ends at a line end.
#[derive(Debug)]
pub struct SessionLogFile {
    dir: PathBuf,
    file: std::fs::File,
    /// Bytes in the open part.
    bytes: u64,
    /// Number of the open part (0 = `rigd.log`).
    part: u32,
    max_bytes: u64,
}

impl SessionLogFile {
    /// Open (append to) `dir/rigd.log`; parts roll over past `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let path = dir.join(crate::storage::LOG_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let bytes = file.metadata()?.len();
        Ok(Self {
            dir: dir.to_owned(),
            file,
            bytes,
            part: 0,
            max_bytes: max_bytes.max(1),
        })
    }

    /// Close the open part (synced) and start the next free one.
    fn roll(&mut self) -> std::io::Result<()> {
        let mut part = self.part;
        let file = loop {
            part = part
                .checked_add(1)
                .ok_or_else(|| std::io::Error::other("no log part number left"))?;
            let path = self.dir.join(crate::storage::log_file_name(part));
            match std::fs::OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(path)
            {
                Ok(f) => break f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        };
        let _ = self.file.sync_data();
        self.file = file;
        self.part = part;
        self.bytes = 0;
        Ok(())
    }
}

impl std::io::Write for SessionLogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes > 0 && self.bytes.saturating_add(buf.len() as u64) > self.max_bytes {
            // If the next part cannot be made, keep writing to this one.
            let _ = self.roll();
        }
        let n = self.file.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// A session in progress.
#[derive(Debug)]
struct Running {
    mouse: String,
    dir: PathBuf,
    started_utc: String,
    started: Instant,
    done: Option<oneshot::Receiver<Result<FinishedSession, String>>>,
    stop_reason: Option<String>,
    imaging: Option<Arc<IngestCounters>>,
}

/// The core's state. See the module docs.
#[derive(Debug)]
pub struct Core {
    pub cfg: Arc<RigConfig>,
    config_path: Option<PathBuf>,
    rig: crossbeam_channel::Sender<RigRequest>,
    status: Arc<Mutex<LiveStatus>>,
    events: broadcast::Sender<EventLine>,
    session: Option<Running>,
    session_log: SessionLog,
    seed: u64,
    preview: Option<Arc<crate::preview::PreviewState>>,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> ControlError {
    ControlError::new(code, msg)
}

impl Core {
    pub fn new(
        cfg: Arc<RigConfig>,
        config_path: Option<PathBuf>,
        rig: crossbeam_channel::Sender<RigRequest>,
        status: Arc<Mutex<LiveStatus>>,
        events: broadcast::Sender<EventLine>,
        session_log: SessionLog,
    ) -> Self {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Self {
            cfg,
            config_path,
            rig,
            status,
            events,
            session: None,
            session_log,
            seed,
            preview: None,
        }
    }

    /// Feed the live preview page (sessions' imaging and the health panel).
    pub fn set_preview(&mut self, preview: Arc<crate::preview::PreviewState>) {
        self.preview = Some(preview);
    }

    /// Refresh the preview's health panel (called about once a second).
    pub fn update_preview_health(&self) {
        let Some(p) = &self.preview else { return };
        let live = self.live();
        let mut lat: Vec<f64> = live.latencies_us.iter().copied().collect();
        lat.sort_by(f64::total_cmp);
        let pct = |q: f64| {
            if lat.is_empty() {
                0.0
            } else {
                lat[((lat.len() - 1) as f64 * q).round() as usize]
            }
        };
        let (frames, drops) = self
            .session
            .as_ref()
            .and_then(|s| s.imaging.as_ref())
            .map(|c| {
                use std::sync::atomic::Ordering::Relaxed;
                (c.frames.load(Relaxed), c.dropped.load(Relaxed))
            })
            .unwrap_or((0, 0));
        p.set_health(crate::preview::Health {
            frames,
            drops,
            link: match live.link {
                Some(LinkState::Connected) => "up".into(),
                Some(LinkState::Lost) => format!("down: {}", live.link_detail.unwrap_or_default()),
                Some(LinkState::Reconnecting) => "reconnecting".into(),
                None => "not connected yet".into(),
            },
            clock_band_us: live.clock.map_or(0.0, |c| c.half_band_us),
            latency_p50_us: pct(0.5),
            latency_p99_us: pct(0.99),
            trials: live.trials as u32,
            rewards: live.rewards as u32,
            water_ul: live.water_ul,
            session: self
                .session
                .as_ref()
                .map(|s| format!("{} {}", s.mouse, s.dir.display())),
        });
    }

    fn live(&self) -> LiveStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn is_running(&self) -> bool {
        self.session.is_some()
    }

    /// Answer one control request.
    pub async fn handle(&mut self, req: CoreRequest) {
        let CoreRequest {
            request,
            peer,
            reply,
        } = req;
        let answer = match request {
            Request::Start(start) => {
                tracing::info!(%peer, mouse = %start.mouse, "start requested");
                self.start(start).await.and_then(|r| to_value(&r))
            }
            Request::Stop(stop) => {
                tracing::info!(%peer, reason = ?stop.reason, "stop requested");
                let reason = stop.reason.unwrap_or_else(|| format!("stopped by {peer}"));
                self.stop(&reason).await.and_then(|r| to_value(&r))
            }
            Request::Status {} => to_value(&self.status_reply()),
            Request::Valve(v) => {
                tracing::info!(%peer, "valve requested: {v:?}");
                self.valve(&v)
                    .await
                    .map(|()| Value::Object(Default::default()))
            }
            Request::Tone(t) => {
                if !t.test {
                    Err(err(
                        ErrorCode::BadRequest,
                        "tone: only {\"test\": true} is supported",
                    ))
                } else {
                    self.tone_test()
                        .await
                        .map(|()| Value::Object(Default::default()))
                }
            }
            Request::Subscribe {} => Ok(Value::Object(Default::default())),
        };
        let _ = reply.send(answer);
    }

    pub fn status_reply(&self) -> StatusReply {
        let live = self.live();
        let mut reply = StatusReply {
            state: SessionState::Idle,
            link: live.link,
            ..Default::default()
        };
        if let Some(s) = &self.session {
            reply.state = if s.stop_reason.is_some() {
                SessionState::Stopping
            } else {
                SessionState::Running
            };
            reply.mouse = Some(s.mouse.clone());
            reply.session_dir = Some(s.dir.display().to_string());
            reply.started_utc = Some(s.started_utc.clone());
            reply.elapsed_s = Some(match live.t0_us {
                Some(t0) => live.rig_now_us.saturating_sub(t0) as f64 / 1e6,
                None => s.started.elapsed().as_secs_f64(),
            });
            reply.trials = Some(live.trials);
            reply.rewards = Some(live.rewards);
            reply.water_ul = Some(live.water_ul);
            if let Some(c) = &s.imaging {
                use std::sync::atomic::Ordering::Relaxed;
                reply.frames = Some(c.frames.load(Relaxed));
                reply.drops = Some(c.dropped.load(Relaxed));
            }
        }
        reply
    }

    /// Start a session.
    pub async fn start(&mut self, req: StartRequest) -> Result<StartReply, ControlError> {
        if let Some(s) = &self.session {
            return Err(err(
                ErrorCode::AlreadyRunning,
                format!(
                    "a session for {} is running ({}): stop it first",
                    s.mouse,
                    s.dir.display()
                ),
            ));
        }
        validate_mouse_id(&req.mouse).map_err(|e| err(ErrorCode::InvalidMouse, e.to_string()))?;
        let live = self.live();
        if live.link != Some(LinkState::Connected) {
            return Err(err(
                ErrorCode::DeviceUnavailable,
                format!(
                    "the rig is not connected ({}): check the USB cable and [rig].serial_port = {:?}",
                    live.link_detail.as_deref().unwrap_or("no answer yet"),
                    self.cfg.rig.serial_port
                ),
            ));
        }
        if live.rig_now_us == 0 {
            return Err(err(
                ErrorCode::DeviceUnavailable,
                "the rig is connected but no lever sample has arrived yet: try again in a moment",
            ));
        }
        // The task for this session: the configuration plus any overrides.
        let mut cfg = (*self.cfg).clone();
        if let Some(t) = &req.task {
            apply_overrides(&mut cfg, t);
            let text = cfg
                .to_toml_string()
                .map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
            if let Err(e) = rig_config::parse_str(&text, Path::new("start.task")) {
                let msg = e
                    .problems()
                    .iter()
                    .map(|p| p.message.clone())
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(err(
                    ErrorCode::BadRequest,
                    format!("task overrides rejected: {msg}"),
                ));
            }
        }
        let today = water_today_ul(Path::new(&cfg.storage.data_root), &req.mouse);
        let remaining = (cfg.safety.max_water_per_day_ul - today).max(0.0);
        if remaining <= 0.0 {
            return Err(err(
                ErrorCode::RefusedBySafety,
                format!(
                    "{} already had {today:.1} µL today, the daily cap ([safety].max_water_per_day_ul) is {:.1} µL",
                    req.mouse, cfg.safety.max_water_per_day_ul
                ),
            ));
        }
        self.seed = self
            .seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let params = TaskParams::from_config(&cfg)
            .map_err(|e| err(ErrorCode::BadRequest, format!("task: {e}")))?
            .with_seed(self.seed)
            .with_water_remaining_today_ul(Some(remaining));
        let engine = TaskEngine::new(params);

        if cfg.imaging.enabled && cfg.storage.raw_frames {
            let im = &cfg.imaging;
            let bytes_per_s = f64::from(im.width)
                * f64::from(im.height)
                * f64::from(im.channels)
                * 2.0
                * im.frame_rate_hz;
            check_disk_rate(&cfg.storage.data_root, bytes_per_s)
                .map_err(|e| err(ErrorCode::RefusedBySafety, e))?;
        }
        // The folder and its writer.
        let start_utc = SystemTime::now();
        let dir = SessionDir::create(Path::new(&cfg.storage.data_root), &req.mouse, start_utc)
            .map_err(|e| {
                err(
                    ErrorCode::Internal,
                    format!("cannot create the session folder: {e}"),
                )
            })?;
        let config_toml = cfg
            .to_toml_string()
            .map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
        let t0_us = live.rig_now_us;
        let info = SessionInfo {
            rig: cfg.rig.name.clone(),
            notes: req.notes.clone().unwrap_or_default(),
            config_toml,
            t0_rig_us: t0_us,
            host_monotonic_start_ns: firmware_bridge::link::host_now_ns(),
            clock_sync: None,
        };
        let fsync = Duration::from_millis(u64::from(cfg.storage.fsync_interval_ms));
        let chunk_len = Duration::from_secs(u64::from(cfg.storage.chunk_minutes) * 60);
        let writer = SessionWriter::create(dir, info, fsync, chunk_len).map_err(|e| {
            err(
                ErrorCode::Internal,
                format!("cannot write the session folder: {e}"),
            )
        })?;
        let path = writer.path().to_path_buf();
        let started_utc = crate::storage::rfc3339_utc(start_utc);

        let (tx, rx) = crossbeam_channel::bounded(storage_thread::STORAGE_QUEUE);
        let (done_tx, done_rx) = oneshot::channel();
        // Imaging: its own thread, writing frames.tsv (and frames.npy) into
        // the same folder; frame-clock edges come from the rig thread.
        let (ingest, ttl_edges, imaging) = if cfg.imaging.enabled {
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
                t0_us,
                session_dir: path.clone(),
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
                preview: self.preview.clone(),
            };
            let ingest =
                Ingest::start(setup, edge_rx, self.status.clone(), tx.clone()).map_err(|e| {
                    err(
                        ErrorCode::Internal,
                        format!("cannot start the imaging thread: {e}"),
                    )
                })?;
            let counters = ingest.counters.clone();
            (Some(ingest), Some(edge_tx), Some(counters))
        } else {
            (None, None, None)
        };
        let setup = StorageSetup {
            t0_us,
            counts_per_mm: cfg.rig.encoder_counts_per_mm,
            fsync_interval: fsync,
            behaviour: crate::behaviour::SummaryParams::from_config(&cfg),
            ingest,
        };
        storage_thread::spawn(writer, setup, rx, self.status.clone(), done_tx).map_err(|e| {
            err(
                ErrorCode::Internal,
                format!("cannot start the storage thread: {e}"),
            )
        })?;
        self.open_session_log(&path);
        self.rig
            .send(RigRequest::Start(Box::new(SessionStart {
                engine,
                storage: tx,
                ttl_edges,
            })))
            .map_err(|_| err(ErrorCode::Internal, "the rig thread is gone"))?;
        tracing::info!(mouse = %req.mouse, dir = %path.display(), "session started");
        self.session = Some(Running {
            mouse: req.mouse.clone(),
            dir: path.clone(),
            started_utc: started_utc.clone(),
            started: Instant::now(),
            done: Some(done_rx),
            stop_reason: None,
            imaging,
        });
        let _ = self
            .events
            .send(event_line(&Event::Session(SessionEvent::Started {
                mouse: req.mouse.clone(),
                session_dir: path.display().to_string(),
                started_utc: started_utc.clone(),
                t0_us,
            })));
        Ok(StartReply {
            session_dir: path.display().to_string(),
            mouse: req.mouse,
            started_utc,
        })
    }

    /// Stop the running session and wait for its files to be finished.
    pub async fn stop(&mut self, reason: &str) -> Result<StopReply, ControlError> {
        let Some(s) = self.session.as_mut() else {
            return Err(err(ErrorCode::NotRunning, "no session is running"));
        };
        if s.stop_reason.is_none() {
            s.stop_reason = Some(reason.to_owned());
            let _ = self.rig.send(RigRequest::Stop {
                reason: reason.to_owned(),
            });
        }
        self.wait_finished().await
    }

    /// The rig thread says the task ended by itself: finish the session.
    pub async fn on_notice(
        &mut self,
        notice: RigNotice,
    ) -> Option<Result<StopReply, ControlError>> {
        let RigNotice::TaskFinished { reason } = notice;
        let s = self.session.as_mut()?;
        if s.done.is_none() {
            return None; // already being finished by a stop request
        }
        s.stop_reason.get_or_insert(reason);
        Some(self.wait_finished().await)
    }

    async fn wait_finished(&mut self) -> Result<StopReply, ControlError> {
        let Some(s) = self.session.as_mut() else {
            return Err(err(ErrorCode::NotRunning, "no session is running"));
        };
        let Some(done) = s.done.take() else {
            return Err(err(ErrorCode::Busy, "the session is already stopping"));
        };
        let result = match tokio::time::timeout(Duration::from_secs(120), done).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the storage thread ended without a result".to_owned()),
            Err(_) => Err("finishing the session files took more than 120 s".to_owned()),
        };
        let s = self.session.take().expect("checked above");
        self.close_session_log();
        match result {
            Ok(fin) => {
                tracing::info!(mouse = %s.mouse, reason = %fin.reason, trials = fin.summary.trials, "session stopped");
                let _ = self
                    .events
                    .send(event_line(&Event::Session(SessionEvent::Stopped {
                        mouse: s.mouse.clone(),
                        reason: Some(fin.reason.clone()),
                        summary: fin.summary.clone(),
                    })));
                Ok(StopReply {
                    summary: fin.summary,
                })
            }
            Err(e) => {
                tracing::error!("session {} ended with an error: {e}", s.dir.display());
                let _ = self
                    .events
                    .send(event_line(&Event::Session(SessionEvent::Stopped {
                        mouse: s.mouse.clone(),
                        reason: Some(format!("error: {e}")),
                        summary: SessionSummary {
                            session_dir: s.dir.display().to_string(),
                            ..Default::default()
                        },
                    })));
                Err(err(ErrorCode::Internal, format!("the session stopped with an error: {e}; files up to the error are intact in {}", s.dir.display())))
            }
        }
    }

    async fn valve(&mut self, v: &protocol::control::ValveRequest) -> Result<(), ControlError> {
        let action = v.action().map_err(|m| err(ErrorCode::BadRequest, m))?;
        let (tx, rx) = oneshot::channel();
        let req = match action {
            ValveAction::Pulse { duration_ms } => {
                if duration_ms > f64::from(self.cfg.safety.max_valve_open_ms) {
                    return Err(err(
                        ErrorCode::RefusedBySafety,
                        format!(
                            "valve pulse {duration_ms} ms is longer than [safety].max_valve_open_ms = {} ms",
                            self.cfg.safety.max_valve_open_ms
                        ),
                    ));
                }
                RigRequest::ValvePulse {
                    duration_us: (duration_ms * 1000.0).round() as u32,
                    reply: tx,
                }
            }
            ValveAction::Flush { duration_ms } => {
                if duration_ms > f64::from(self.cfg.safety.max_flush_ms) {
                    return Err(err(
                        ErrorCode::RefusedBySafety,
                        format!(
                            "flush {duration_ms} ms is longer than [safety].max_flush_ms = {} ms",
                            self.cfg.safety.max_flush_ms
                        ),
                    ));
                }
                RigRequest::ValveFlush {
                    duration_ms: duration_ms.round().clamp(1.0, 65535.0) as u16,
                    reply: tx,
                }
            }
        };
        self.ask_rig(req, rx).await
    }

    async fn tone_test(&mut self) -> Result<(), ControlError> {
        let t = &self.cfg.task;
        let tone = Tone {
            frequency_hz: t.cue_tone_hz,
            duration_ms: t.cue_duration_ms.min(u32::from(u16::MAX)) as u16,
            level_pct: t.cue_level_pct.min(100) as u8,
        };
        let (tx, rx) = oneshot::channel();
        self.ask_rig(RigRequest::Tone { tone, reply: tx }, rx).await
    }

    async fn ask_rig(
        &mut self,
        req: RigRequest,
        rx: oneshot::Receiver<Result<(), String>>,
    ) -> Result<(), ControlError> {
        if self.live().link != Some(LinkState::Connected) {
            return Err(err(
                ErrorCode::DeviceUnavailable,
                "the rig is not connected",
            ));
        }
        self.rig
            .send(req)
            .map_err(|_| err(ErrorCode::Internal, "the rig thread is gone"))?;
        match tokio::time::timeout(Duration::from_secs(3), rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(msg))) => Err(err(ErrorCode::RefusedBySafety, msg)),
            _ => Err(err(
                ErrorCode::DeviceUnavailable,
                "the rig did not answer in time",
            )),
        }
    }

    /// Reload the configuration (SIGHUP): only between sessions.
    pub fn reload(&mut self) -> Result<(), String> {
        if let Some(s) = &self.session {
            return Err(format!(
                "a session for {} is running: the configuration is reloaded only between sessions",
                s.mouse
            ));
        }
        let Some(path) = &self.config_path else {
            return Err("no configuration file to reload".into());
        };
        let loaded = rig_config::load(path).map_err(|e| e.to_string())?;
        if loaded.config.rig.serial_port != self.cfg.rig.serial_port
            || loaded.config.control.socket != self.cfg.control.socket
        {
            tracing::warn!("[rig].serial_port and [control].socket changes take effect after a restart of rigd");
        }
        self.cfg = Arc::new(loaded.config);
        Ok(())
    }

    fn open_session_log(&self, dir: &Path) {
        match SessionLogFile::open(dir, crate::storage::LOG_ROTATE_BYTES) {
            Ok(f) => {
                if let Ok(mut g) = self.session_log.lock() {
                    *g = Some(f);
                }
            }
            Err(e) => tracing::warn!("cannot open the session log: {e}"),
        }
    }

    fn close_session_log(&self) {
        if let Ok(mut g) = self.session_log.lock() {
            *g = None;
        }
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, ControlError> {
    serde_json::to_value(v).map_err(|e| err(ErrorCode::Internal, e.to_string()))
}

fn apply_overrides(cfg: &mut RigConfig, t: &protocol::control::TaskOverrides) {
    let task = &mut cfg.task;
    if let Some(v) = t.response_window_ms {
        task.response_window_ms = v;
    }
    if let Some(v) = t.threshold_mm {
        task.threshold_mm = v;
    }
    if let Some(v) = t.reward_ul {
        task.reward_ul = v;
    }
    if let Some(v) = t.iti_min_ms {
        task.iti_min_ms = v;
    }
    if let Some(v) = t.iti_max_ms {
        task.iti_max_ms = v;
    }
    if let Some(v) = t.quiescence_ms {
        task.quiescence_ms = v;
    }
    if t.max_trials.is_some() {
        task.max_trials = t.max_trials;
    }
    if t.max_rewards.is_some() {
        task.max_rewards = t.max_rewards;
    }
    if t.max_duration_min.is_some() {
        task.max_duration_min = t.max_duration_min;
    }
}

/// Water the mouse already had today (UTC date of the session folders), from
/// the `summary.json` of its finished sessions.
pub fn water_today_ul(data_root: &Path, mouse: &str) -> f64 {
    let today = crate::storage::rfc3339_utc(SystemTime::now());
    let day = &today[..10.min(today.len())];
    let Ok(entries) = std::fs::read_dir(data_root.join(mouse)) else {
        return 0.0;
    };
    let mut total = 0.0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(day) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(e.path().join(crate::storage::SUMMARY_FILE)) else {
            continue;
        };
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            total += v["water_ul"].as_f64().unwrap_or(0.0);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    #[test]
    fn the_session_log_rolls_into_numbered_parts_and_keeps_every_line() {
        let dir = std::env::temp_dir().join(format!("rigd-log-roll-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut log = SessionLogFile::open(&dir, 1000).unwrap();
        let lines: Vec<String> = (0..100)
            .map(|i| {
                format!(
                    "2026-01-01T00:00:00Z INFO line {i:03} {}\n",
                    "x".repeat(i % 7)
                )
            })
            .collect();
        for l in &lines {
            log.write_all(l.as_bytes()).unwrap();
        }
        log.flush().unwrap();
        let mut parts = Vec::new();
        for n in 0.. {
            let p = dir.join(crate::storage::log_file_name(n));
            if !p.exists() {
                break;
            }
            parts.push(std::fs::read_to_string(p).unwrap());
        }
        assert!(parts.len() >= 4, "{} parts", parts.len());
        assert_eq!(crate::storage::log_file_name(1), "rigd.001.log");
        for p in &parts {
            assert!(
                p.len() <= 1000 && p.ends_with('\n'),
                "a part of {} bytes",
                p.len()
            );
        }
        assert_eq!(parts.concat(), lines.concat(), "nothing lost or reordered");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
