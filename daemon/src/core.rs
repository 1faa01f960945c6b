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

use crate::alerts::{Alert, AlertKind, Alerter};
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
    /// The latency settings held for the session (given back on drop).
    tuning: crate::realtime::SessionTuning,
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
    alerts: Alerter,
    watch: Watch,
}

/// What the core's once-a-second tick watches for alerts.
#[derive(Debug)]
struct Watch {
    /// When the link was last seen leaving `Connected` (None while up).
    link_down_since: Option<Instant>,
    /// The link was up at least once since rigd started.
    ever_connected: bool,
    device_lost_alerted: bool,
    last_disk_check: Option<Instant>,
    disk_low_alerted: bool,
}

/// How often the data root's free space is checked.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(10);

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
        let alerts = Alerter::new(cfg.alerts.clone(), cfg.rig.name.clone());
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
            alerts,
            watch: Watch {
                link_down_since: Some(Instant::now()),
                ever_connected: false,
                device_lost_alerted: false,
                last_disk_check: None,
                disk_low_alerted: false,
            },
        }
    }

    /// The alerter (for the daemon's other parts).
    pub fn alerter(&self) -> &Alerter {
        &self.alerts
    }

    /// Raise an alert about the running session (if any).
    fn alert(&self, alert: Alert) {
        let mut alert = alert;
        if let Some(s) = &self.session {
            alert.mouse.get_or_insert_with(|| s.mouse.clone());
            alert
                .session_dir
                .get_or_insert_with(|| s.dir.display().to_string());
        }
        self.alerts.raise(alert);
    }

    /// Once a second: the preview's health panel, and the conditions that
    /// raise alerts (the rig unreachable for long, the data disk filling).
    pub fn tick(&mut self) {
        self.update_preview_health();
        if let Some(s) = &mut self.session {
            s.tuning.refresh();
        }
        let now = Instant::now();
        let link = self.live().link;
        if link == Some(LinkState::Connected) {
            if self.watch.device_lost_alerted {
                tracing::info!("the rig is reachable again");
            }
            self.watch.link_down_since = None;
            self.watch.ever_connected = true;
            self.watch.device_lost_alerted = false;
        } else {
            let since = *self.watch.link_down_since.get_or_insert(now);
            let limit = Duration::from_secs(u64::from(self.cfg.alerts.device_lost_s));
            let matters = self.watch.ever_connected || self.session.is_some();
            if matters && !self.watch.device_lost_alerted && now - since >= limit {
                self.watch.device_lost_alerted = true;
                let lost_s = (now - since).as_secs();
                self.alert(
                    Alert::new(
                        AlertKind::DeviceLost,
                        "critical",
                        format!(
                            "the rig has been unreachable for {lost_s} s ({}); check the USB                              cable and the microcontroller's power; a running session continues                              when it returns",
                            self.live().link_detail.unwrap_or_else(|| "no detail".into())
                        ),
                    )
                    .details(serde_json::json!({ "lost_s": lost_s })),
                );
            }
        }
        if self
            .watch
            .last_disk_check
            .is_none_or(|t| now - t >= DISK_CHECK_EVERY)
        {
            self.watch.last_disk_check = Some(now);
            self.check_disk();
        }
    }

    fn check_disk(&mut self) {
        let root = PathBuf::from(&self.cfg.storage.data_root);
        let Some(free) = crate::alerts::free_mb(&root) else {
            return;
        };
        let min = self.cfg.alerts.disk_free_min_mb;
        if free < min && !self.watch.disk_low_alerted {
            self.watch.disk_low_alerted = true;
            self.alert(
                Alert::new(
                    AlertKind::DiskLow,
                    "warning",
                    format!(
                        "the data disk ({}) has {free} MB free, less than [alerts].disk_free_min_mb =                          {min} MB; move old sessions off it",
                        root.display()
                    ),
                )
                .details(serde_json::json!({ "free_mb": free, "min_mb": min })),
            );
        } else if free >= min.saturating_add(min / 10) {
            // 10 % hysteresis: one alert per shortage, not one per check.
            self.watch.disk_low_alerted = false;
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
        // The task for this session: the configuration plus any overrides,
        // checked by the configuration's own rules.
        let cfg = match &req.task {
            Some(t) => self
                .cfg
                .with_task_overrides(t)
                .map_err(|e| err(ErrorCode::BadRequest, e.to_string()))?,
            None => (*self.cfg).clone(),
        };
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
        // A session needs room for its reserve (see storage_thread) and
        // then some; on a full disk, refuse rather than start and stop.
        let min_free = 2 * storage_thread::RESERVE_BYTES as u64;
        if let Some(free) = crate::alerts::free_bytes(Path::new(&cfg.storage.data_root)) {
            if free < min_free {
                return Err(err(
                    ErrorCode::RefusedBySafety,
                    format!(
                        "the data disk holding [storage].data_root = {} has only {} kB free \
                         (No space left for a session, which needs at least {} kB): free space \
                         or point data_root at another disk",
                        cfg.storage.data_root.display(),
                        free / 1024,
                        min_free / 1024
                    ),
                ));
            }
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
        let tuning = crate::realtime::SessionTuning::acquire(&cfg.realtime);
        let info = SessionInfo {
            rig: cfg.rig.name.clone(),
            notes: req.notes.clone().unwrap_or_default(),
            config_toml,
            t0_rig_us: t0_us,
            host_monotonic_start_ns: firmware_bridge::link::host_now_ns(),
            clock_sync: None,
            realtime: Some(tuning.record().clone()),
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
            water_before_today_ul: today,
            daily_water_target_ul: cfg.safety.daily_water_target_ul,
            on_storage_error: Some({
                // A disk error ends the session: stop the task at once (no
                // trial may run, and no water flow, without a record).
                let rig = self.rig.clone();
                Box::new(move |e: String| {
                    let _ = rig.send(RigRequest::Stop {
                        reason: format!("storage error: {e}"),
                    });
                })
            }),
            session_log: Some(self.session_log.clone()),
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
            tuning,
        });
        crate::metrics::global().session_started();
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
        let reason = match notice {
            RigNotice::TaskFinished { reason } => reason,
            RigNotice::DeviceFault { t_us, code, detail } => {
                self.on_device_fault(t_us, code, detail);
                return None;
            }
        };
        let s = self.session.as_mut()?;
        if s.done.is_none() {
            return None; // already being finished by a stop request
        }
        // No stop request came first: the session ended by itself.
        let automatic = s.stop_reason.is_none();
        s.stop_reason.get_or_insert(reason.clone());
        let (mouse, dir) = (s.mouse.clone(), s.dir.display().to_string());
        let result = self.wait_finished().await;
        if automatic || reason.starts_with("storage error") {
            let (kind, severity, message) = match &result {
                Err(e) => (
                    AlertKind::StorageError,
                    "critical",
                    format!(
                        "the session of {mouse} stopped on a disk error ({reason}); {}",
                        e.message
                    ),
                ),
                Ok(r) => (
                    AlertKind::SessionAutoStopped,
                    // The planned ends are news, the others need a look.
                    if reason == "duration" || reason == "max_trials" {
                        "info"
                    } else {
                        "warning"
                    },
                    format!(
                        "the session of {mouse} stopped by itself: {reason} ({} trials, {}                          rewards, {:.1} µL{})",
                        r.summary.trials,
                        r.summary.rewards,
                        r.summary.water_ul,
                        r.summary
                            .supplement_ul
                            .filter(|s| *s > 0.0)
                            .map_or(String::new(), |s| format!(
                                "; give {s:.0} µL by hand today"
                            ))
                    ),
                ),
            };
            let mut a = Alert::new(kind, severity, message).details(serde_json::json!({
                "reason": reason,
                "summary": result.as_ref().ok().map(|r| &r.summary),
            }));
            a.mouse = Some(mouse);
            a.session_dir = Some(dir);
            self.alerts.raise(a);
        }
        Some(result)
    }

    fn on_device_fault(&self, t_us: u64, code: protocol::serial::FaultCode, detail: u32) {
        use protocol::serial::FaultCode;
        let message = match code {
            FaultCode::WatchdogTripped => format!(
                "the device closed the valve and silenced the tone: it heard nothing from                  rigd for {detail} ms (its heartbeat watchdog); check that rigd is running                  and not stalled"
            ),
            FaultCode::ValveCapTripped => format!(
                "the device cut a valve opening at its cap ({detail} ms); check the                  commanded times and the valve"
            ),
            _ => return,
        };
        self.alert(
            Alert::new(AlertKind::ValveSafetyTrip, "critical", message).details(
                serde_json::json!({ "code": format!("{code:?}"), "detail": detail, "t_us": t_us }),
            ),
        );
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
        crate::metrics::global().session_ended(match &result {
            Ok(fin) => &fin.reason,
            Err(_) => "error",
        });
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
        let action = v
            .action()
            .map_err(|e| err(ErrorCode::BadRequest, e.to_string()))?;
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

/// Water the mouse already had today (UTC date of the session folders): each
/// folder's `summary.json` `water_ul`, or, for a folder without one (a
/// session still running on another rig, or a crash not yet recovered), the
/// sum of `trials.tsv`'s `reward_ul` column. Unreadable numbers are not
/// guessed as 0 silently: they are logged.
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
        let dir = e.path();
        let from_summary = std::fs::read_to_string(dir.join(crate::storage::SUMMARY_FILE))
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|v| v["water_ul"].as_f64());
        let water = match from_summary {
            Some(w) => w,
            None => water_from_trials(&dir.join(crate::storage::TRIALS_FILE)),
        };
        total += water;
    }
    total
}

/// Sum of the `reward_ul` column of a `trials.tsv` (0 when absent).
fn water_from_trials(path: &Path) -> f64 {
    let Ok(text) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    let mut lines = text.lines();
    let Some(col) = lines
        .next()
        .and_then(|h| h.split('\t').position(|c| c == "reward_ul"))
    else {
        tracing::warn!(
            "{}: no reward_ul column; its water is not counted",
            path.display()
        );
        return 0.0;
    };
    lines
        .filter_map(|l| l.split('\t').nth(col))
        .filter_map(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
        .sum()
}

#[cfg(test)]
mod water_tests {
    use super::*;

    #[test]
    fn the_days_water_counts_summaries_and_unfinished_sessions() {
        let root = std::env::temp_dir().join(format!("rigd-water-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let today = crate::storage::rfc3339_utc(SystemTime::now());
        let day = &today[..10];
        let mk = |name: &str| {
            let d = root.join("M1").join(name);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let a = mk(&format!("{day}_080000"));
        std::fs::write(a.join("summary.json"), r#"{"water_ul": 400.0}"#).unwrap();
        let b = mk(&format!("{day}_120000"));
        std::fs::write(
            b.join("trials.tsv"),
            "trial\toutcome\treward_ul\n1\trewarded\t4.0\n2\tmiss\t0\n3\trewarded\t4.5\n",
        )
        .unwrap();
        let old = mk("1999-01-01_080000");
        std::fs::write(old.join("summary.json"), r#"{"water_ul": 999.0}"#).unwrap();
        let w = water_today_ul(&root, "M1");
        assert!((w - 408.5).abs() < 1e-9, "{w}");
        assert_eq!(water_today_ul(&root, "M2"), 0.0);
        let _ = std::fs::remove_dir_all(&root);
    }
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
