//! The session supervisor, on the tokio runtime: owns the session lifecycle
//! and answers control requests. A start is planned ([`SessionPlan`], pure),
//! opened ([`open`]: files and threads) and handed to the rig thread; a stop
//! goes to the rig thread, whose task ends and whose storage thread finishes
//! the folder. It never touches the serial port or the disk on the latency
//! path: it talks to the rig and storage threads through the messages of
//! [`crate::session`].

mod fov;
mod open;
mod training;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use protocol::control::{
    validate_mouse_id, ControlError, ErrorCode, Event, LinkState, ManualEvent, Request,
    SessionEvent, SessionState, SessionSummary, StartReply, StartRequest, StatusReply, StopReply,
    ValveAction,
};
use protocol::serial::Tone;
use rig_config::RigConfig;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::alerts::{Alert, Alerter};
use crate::control::{CoreRequest, EventFanOut};
use crate::imaging::ingest::IngestCounters;
use crate::session::{
    FinishedSession, LiveSnapshot, LiveView, ManualRefused, RigNotice, RigRequest, SessionId,
    SessionLog, SessionPlan, StartError, StartFacts, StopReason,
};
use crate::storage_thread::StorageFailed;
use session_format::{water_on_day_ul, SessionLogFile};

/// Why a SIGHUP did not reload the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "a session for {mouse} is running: the configuration is reloaded only between sessions"
    )]
    SessionRunning { mouse: String },
    #[error("no configuration file to reload (rigd was started without --config)")]
    NoFile,
    #[error(transparent)]
    Invalid(#[from] rig_config::ConfigError),
}

/// A session in progress.
#[derive(Debug)]
struct Running {
    id: SessionId,
    mouse: String,
    dir: PathBuf,
    started_utc: String,
    started: Instant,
    /// The storage thread's result when it has finished the folder.
    done: oneshot::Receiver<Result<FinishedSession, StorageFailed>>,
    /// Set once the session is ending (a stop request, a signal, or the task
    /// ended by itself); the supervisor keeps serving requests meanwhile.
    stopping: Option<Stopping>,
    imaging: Option<Arc<IngestCounters>>,
    /// The latency settings held for the session (given back on drop).
    tuning: crate::realtime::SessionTuning,
}

/// A session whose files are being finished.
#[derive(Debug)]
struct Stopping {
    reason: StopReason,
    /// The task ended by itself (no one asked): someone should hear about it.
    automatic: bool,
    /// The files must be finished by then; past it the session ends with an
    /// error (and its task is stopped for certain).
    deadline: tokio::time::Instant,
    /// Stop requests waiting for the summary.
    waiters: Vec<oneshot::Sender<Result<Value, ControlError>>>,
}

/// The shortest manual valve pulse rigd sends, ms.
pub const MIN_VALVE_PULSE_MS: f64 = 1.0;

/// How long a stopping session's files may take to finish.
const FINISH_DEADLINE: Duration = Duration::from_secs(120);

/// The supervisor's state. See the module docs.
#[derive(Debug)]
pub struct Supervisor {
    pub cfg: Arc<RigConfig>,
    config_path: Option<PathBuf>,
    rig: crossbeam_channel::Sender<RigRequest>,
    live: LiveView,
    events: Arc<EventFanOut>,
    session: Option<Running>,
    /// The id the next session gets.
    next_id: u64,
    session_log: SessionLog,
    seed: u64,
    preview: Option<Arc<crate::preview::PreviewState>>,
    alerts: Alerter,
    watch: Watch,
    /// A start waiting for its field-of-view check.
    pending: Option<PendingStart>,
}

/// A start whose refusals are checked, waiting for its field-of-view check.
#[derive(Debug)]
struct PendingStart {
    prepared: Prepared,
    job: fov::FovJob,
    reply: oneshot::Sender<Result<Value, ControlError>>,
}

/// What a start has decided before its files are opened.
#[derive(Debug)]
struct Prepared {
    req: StartRequest,
    trained: Option<training::TrainingStart>,
    choice: fov::ImagingChoice,
}

/// The result of a start's field-of-view check (see
/// [`Supervisor::background`]).
#[derive(Debug)]
pub struct FovCheckDone(Result<fov::Measured, String>);

/// What [`Supervisor::background`] saw happen.
#[derive(Debug)]
pub enum Background {
    FovCheck(FovCheckDone),
    /// Boxed: a session's summary is large, and this is once per session.
    Finished(Box<Result<FinishedSession, String>>),
}

/// What the supervisor's once-a-second tick watches for alerts.
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

impl Supervisor {
    pub fn new(
        cfg: Arc<RigConfig>,
        config_path: Option<PathBuf>,
        rig: crossbeam_channel::Sender<RigRequest>,
        live: LiveView,
        events: Arc<EventFanOut>,
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
            live,
            events,
            session: None,
            next_id: 1,
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
            pending: None,
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
                let detail = self.live().link_detail;
                self.alert(Alert::device_lost(
                    lost_s,
                    detail.as_deref().unwrap_or("no detail"),
                ));
            }
        }
        if self
            .watch
            .last_disk_check
            .map_or(true, |t| now - t >= DISK_CHECK_EVERY)
        {
            self.watch.last_disk_check = Some(now);
            self.check_disk();
            self.publish_calibration_age();
        }
    }

    /// Publish the valve calibration's age and warn when it is too old (at
    /// rigd's start, after a reload, at every session start).
    pub fn check_calibration_age(&self) {
        let today = self.publish_calibration_age();
        if let Some(w) = self.cfg.valve.calibration_age_warning(today) {
            tracing::warn!("{w}");
        }
    }

    /// The calibration's age into the metrics (also every disk check, so
    /// the gauge grows while rigd runs); returns today (days since 1970).
    fn publish_calibration_age(&self) -> i64 {
        let today = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| (d.as_secs() / 86_400) as i64);
        let v = &self.cfg.valve;
        let m = crate::metrics::global();
        m.valve_calibration_age_days
            .set(v.calibration_age_days(today).map_or(f64::NAN, |d| d as f64));
        m.valve_calibration_max_age_days
            .set(f64::from(v.max_calibration_age_days));
        today
    }

    fn check_disk(&mut self) {
        let root = PathBuf::from(&self.cfg.storage.data_root);
        let Some(free_bytes) = crate::alerts::free_bytes(&root) else {
            return;
        };
        crate::metrics::global()
            .data_root_free_bytes
            .set(free_bytes as f64);
        let free = free_bytes / (1024 * 1024);
        let min = self.cfg.alerts.disk_free_min_mb;
        crate::metrics::global()
            .data_root_free_min_bytes
            .set(min as f64 * 1024.0 * 1024.0);
        if free < min && !self.watch.disk_low_alerted {
            self.watch.disk_low_alerted = true;
            self.alert(Alert::disk_low(&root, free, min));
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
        let mut lat = live.latencies_us.clone();
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
            clock_band_us: self.live.clock.get().map_or(0.0, |c| c.half_band_us),
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

    fn live(&self) -> LiveSnapshot {
        self.live.status.snapshot()
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
                if let Some(p) = &self.pending {
                    Err(err(
                        ErrorCode::Busy,
                        format!(
                            "the start for {} is checking its field of view: wait for its \
                             answer, or stop to cancel it",
                            p.prepared.req.mouse
                        ),
                    ))
                } else {
                    match self.begin_start(start) {
                        Ok((prepared, Some(job))) => {
                            // Answered when the check is done
                            // (`complete_start`); requests go on being
                            // served meanwhile.
                            self.pending = Some(PendingStart {
                                prepared,
                                job,
                                reply,
                            });
                            return;
                        }
                        Ok((prepared, None)) => self
                            .finish_start(prepared, None)
                            .await
                            .map_err(ControlError::from)
                            .and_then(|r| to_value(&r)),
                        Err(e) => Err(e.into()),
                    }
                }
            }
            Request::Stop(_) if self.session.is_none() && self.pending.is_some() => {
                tracing::info!(%peer, "stop requested during a field-of-view check");
                let mouse = self.cancel_pending_start(&format!("stopped by {peer}"));
                Err(err(
                    ErrorCode::NotRunning,
                    format!(
                        "no session is running: the start for {} was cancelled during its \
                         field-of-view check",
                        mouse.unwrap_or_default()
                    ),
                ))
            }
            Request::Stop(stop) => {
                tracing::info!(%peer, reason = ?stop.reason, "stop requested");
                let reason = stop.reason.unwrap_or_else(|| format!("stopped by {peer}"));
                match self.begin_stop(StopReason::Requested(reason), false) {
                    // Answered when the files are finished (`complete_stop`);
                    // requests go on being served meanwhile.
                    Some(waiters) => {
                        waiters.push(reply);
                        return;
                    }
                    None => Err(err(ErrorCode::NotRunning, "no session is running")),
                }
            }
            Request::Status {} => to_value(&self.status_reply()),
            Request::Valve(v) => {
                tracing::info!(%peer, "valve requested: {v:?}");
                let answer = self.valve(&v).await;
                if answer.is_ok() {
                    // Subscribers see water given by hand, and whether it
                    // was for a calibration cup.
                    let (action, duration_ms) = match v.action() {
                        Ok(ValveAction::Pulse { duration_ms }) => ("valve_pulse", duration_ms),
                        Ok(ValveAction::Flush { duration_ms }) => ("valve_flush", duration_ms),
                        Err(_) => ("valve", f64::NAN),
                    };
                    self.events.publish(&Event::Manual(ManualEvent {
                        action: action.to_owned(),
                        duration_ms: Some(duration_ms).filter(|d| d.is_finite()),
                        calibration: v.calibration,
                        by: peer.to_string(),
                    }));
                }
                answer.map(|()| Value::Object(Default::default()))
            }
            Request::Tone(t) => {
                tracing::info!(%peer, "tone requested: {t:?}");
                if !t.test {
                    Err(err(
                        ErrorCode::BadRequest,
                        "tone: only {\"test\": true} is supported",
                    ))
                } else {
                    let answer = self.tone_test().await;
                    if answer.is_ok() {
                        self.events.publish(&Event::Manual(ManualEvent {
                            action: "tone_test".to_owned(),
                            duration_ms: None,
                            calibration: false,
                            by: peer.to_string(),
                        }));
                    }
                    answer.map(|()| Value::Object(Default::default()))
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
            checking_fov: self.pending.as_ref().map(|p| p.prepared.req.mouse.clone()),
            ..Default::default()
        };
        if let Some(s) = &self.session {
            reply.state = if s.stopping.is_some() {
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

    /// Start a session and wait for it (field-of-view check included): for
    /// callers that own the loop (`rigd demo`). The control socket's starts
    /// go through [`Self::handle`], which keeps serving during the check.
    pub async fn start(&mut self, req: StartRequest) -> Result<StartReply, ControlError> {
        let (prepared, job) = self.begin_start(req)?;
        let result =
            match job {
                Some(job) => Some(job.result.await.unwrap_or_else(|_| {
                    Err("the field-of-view check ended without a result".into())
                })),
                None => None,
            };
        Ok(self.finish_start(prepared, result).await?)
    }

    /// The first half of a start: every refusal that can be decided now
    /// (training, welfare, link, water, disk), the imaging reference, and
    /// the field-of-view check's thread when there is one to make.
    fn begin_start(
        &mut self,
        mut req: StartRequest,
    ) -> Result<(Prepared, Option<fov::FovJob>), StartError> {
        // The lab's zone was checked with the configuration; UTC otherwise.
        let zone = ::training::LabZone::new(&self.cfg.lab.timezone)
            .unwrap_or_else(|_| ::training::LabZone::utc());
        let now = SystemTime::now();
        let facts = self.start_facts(&req.mouse, &zone);
        let trained = if facts.running.is_none() && validate_mouse_id(&req.mouse).is_ok() {
            Some(training::prepare(&self.cfg, &req, &zone, now)?)
        } else {
            None
        };
        if let Some(t) = &trained {
            req.task = t.task.clone();
            for w in &t.warnings {
                tracing::warn!(mouse = %req.mouse, "{w}");
            }
        }
        let plan = self.plan(&req, trained.as_ref(), &facts)?;
        let choice = fov::ImagingChoice::resolve(&plan.cfg, &req.mouse);
        let job = if choice.wants_check(&plan.cfg) {
            tracing::info!(mouse = %req.mouse, "checking the field of view");
            Some(fov::FovJob::spawn(&plan.cfg, &choice)?)
        } else {
            None
        };
        Ok((
            Prepared {
                req,
                trained,
                choice,
            },
            job,
        ))
    }

    /// Plan a start (the stage named in a refusal of its settings).
    fn plan(
        &self,
        req: &StartRequest,
        trained: Option<&training::TrainingStart>,
        facts: &StartFacts,
    ) -> Result<SessionPlan, StartError> {
        SessionPlan::new(&self.cfg, req, facts).map_err(|e| {
            // A stage's settings this rig cannot run: say which stage.
            match (e, trained.map(|t| &t.record)) {
                (StartError::Overrides(o), Some(r)) if r.stage.is_some() => {
                    StartError::Training(format!(
                        "stage {} of {}: {o} (change the stage's [stage.task] in the protocol, \
                         or this rig's configuration)",
                        r.stage.as_deref().unwrap_or_default(),
                        r.protocol_file.as_deref().unwrap_or_default()
                    ))
                }
                (e, _) => e,
            }
        })
    }

    /// What the supervisor waits for besides requests and signals: the
    /// waiting start's field-of-view check (pass it to
    /// [`Self::complete_start`]), or the session's end
    /// ([`Self::stop_finished`]; pass it to [`Self::complete_stop`]). No
    /// session runs while a start waits, so it is one or the other.
    /// Cancel-safe: for a `select!`.
    pub async fn background(&mut self) -> Background {
        match self.pending.as_mut() {
            Some(p) => Background::FovCheck(FovCheckDone(match (&mut p.job.result).await {
                Ok(r) => r,
                Err(_) => Err("the field-of-view check ended without a result".into()),
            })),
            None => Background::Finished(Box::new(self.stop_finished().await)),
        }
    }

    /// Finish the waiting start with its check's result and answer it.
    pub async fn complete_start(&mut self, done: FovCheckDone) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let answer = self
            .finish_start(p.prepared, Some(done.0))
            .await
            .map_err(ControlError::from)
            .and_then(|r| to_value(&r));
        if let Err(e) = &answer {
            tracing::warn!("start refused: {}", e.message);
        }
        let _ = p.reply.send(answer);
    }

    /// Cancel the start waiting for its field-of-view check (a stop, a
    /// signal), answering it with `why`. Returns its mouse.
    pub fn cancel_pending_start(&mut self, why: &str) -> Option<String> {
        let p = self.pending.take()?;
        p.job
            .cancel
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mouse = p.prepared.req.mouse.clone();
        tracing::info!(%mouse, "start cancelled during its field-of-view check: {why}");
        let _ = p.reply.send(Err(err(
            ErrorCode::Busy,
            format!("the start for {mouse} was cancelled during its field-of-view check: {why}"),
        )));
        Some(mouse)
    }

    /// The second half of a start: plan it again (its t0 is now; a pure
    /// decision over the configuration, the request and what is known now),
    /// decide on the field of view, open its files and threads, then hand
    /// the task to the rig thread.
    async fn finish_start(
        &mut self,
        prepared: Prepared,
        fov_result: Option<Result<fov::Measured, String>>,
    ) -> Result<StartReply, StartError> {
        let Prepared {
            req,
            trained,
            choice,
        } = prepared;
        let zone = ::training::LabZone::new(&self.cfg.lab.timezone)
            .unwrap_or_else(|_| ::training::LabZone::utc());
        let now = SystemTime::now();
        let facts = self.start_facts(&req.mouse, &zone);
        let mut plan = self.plan(&req, trained.as_ref(), &facts)?;
        let mut decision = match fov_result {
            Some(r) => Some(fov::decide(&plan.cfg, &choice, &req, r)?),
            None => None,
        };
        let mut warnings: Vec<String> = trained
            .as_ref()
            .map(|t| t.warnings.clone())
            .unwrap_or_default();
        if let Some(d) = &decision {
            let s = &d.summary;
            tracing::info!(
                mouse = %req.mouse,
                verdict = %s.verdict,
                dx_px = ?s.dx_px,
                dy_px = ?s.dy_px,
                rotation_deg = ?s.rotation_deg,
                correlation = ?s.correlation,
                "field-of-view check"
            );
            for w in &d.warnings {
                tracing::warn!(mouse = %req.mouse, "{w}");
            }
            warnings.extend(d.warnings.iter().cloned());
        } else if let Some(p) = &choice.problem {
            // Not checked (the check is off): the rig's files are used.
            tracing::warn!(mouse = %req.mouse, "{p}");
            warnings.push(p.clone());
        }
        choice.apply(&mut plan.cfg);
        plan.imaging_reference = choice.table();
        plan.fov_check = decision.as_ref().map(|d| d.table.clone());
        plan.fov_mean = decision.as_mut().and_then(|d| d.mean.take());
        plan.utc_offset_s = zone.offset_s(now);
        plan.training = trained
            .as_ref()
            .and_then(|t| training::record_table(&t.record));
        let t0_us = plan.t0_us;
        if let Some(p) = &self.preview {
            // The page starts afresh before the session's first sample.
            let c = &plan.cfg;
            p.begin_session(crate::preview::SessionView {
                mouse: plan.mouse.clone(),
                t0_us,
                threshold_mm: plan.params.threshold_mm,
                response_window_s: plan.params.response_window_us as f64 / 1e6,
                lever_travel_mm: c.rig.lever_travel_mm,
                max_water_session_ul: plan.params.max_water_session_ul,
                max_water_day_ul: c.safety.max_water_per_day_ul,
                water_before_today_ul: plan.water_before_today_ul,
                daily_water_target_ul: c.safety.daily_water_target_ul,
                max_duration_s: plan.params.max_duration_us.map(|us| us as f64 / 1e6),
                max_trials: plan.params.max_trials,
                fov_check: decision.as_ref().map(|d| d.summary.clone()),
                reference_image: page_reference(&plan.cfg),
            });
        }
        let id = SessionId(self.next_id);
        self.next_id += 1;
        let opened = open::open(
            plan,
            open::OpenContext {
                id,
                live: &self.live,
                rig: &self.rig,
                preview: self.preview.as_ref(),
                session_log: &self.session_log,
            },
        )
        .inspect_err(|_| {
            if let Some(p) = &self.preview {
                p.end_session();
            }
        })?;
        let path = opened.dir;
        let started_utc = session_format::rfc3339_utc(opened.start_utc);
        self.open_session_log(&path);
        self.rig
            .send(RigRequest::Start(Box::new(opened.start)))
            .map_err(|_| StartError::RigGone)?;
        tracing::info!(mouse = %req.mouse, dir = %path.display(), "session started");
        self.check_calibration_age();
        self.session = Some(Running {
            id,
            mouse: req.mouse.clone(),
            dir: path.clone(),
            started_utc: started_utc.clone(),
            started: Instant::now(),
            done: opened.done,
            stopping: None,
            imaging: opened.imaging,
            tuning: opened.tuning,
        });
        crate::metrics::global().session_started();
        self.events.publish(&Event::Session(SessionEvent::Started {
            mouse: req.mouse.clone(),
            session_dir: path.display().to_string(),
            started_utc: started_utc.clone(),
            t0_us,
        }));
        let record = trained.map(|t| t.record);
        Ok(StartReply {
            session_dir: path.display().to_string(),
            mouse: req.mouse,
            started_utc,
            training_day: record.as_ref().map(|r| r.day),
            stage: record.as_ref().and_then(|r| r.stage.clone()),
            stage_why: record.as_ref().and_then(|r| r.stage_why.clone()),
            warnings,
            fov_check: decision.map(|d| d.summary),
        })
    }

    /// What a start decision needs to know now (reads the mouse's folders
    /// and the disk's free space).
    fn start_facts(&mut self, mouse: &str, zone: &::training::LabZone) -> StartFacts {
        let live = self.live();
        let root = Path::new(&self.cfg.storage.data_root);
        let water = if validate_mouse_id(mouse).is_ok() {
            // The lab's day: session folders are named in its zone. Water
            // given by hand that day (`rigctl water give`) counts too.
            let day = zone.today();
            water_on_day_ul(root, mouse, &day)
                .map(|w| w + ::training::water::by_hand_on_day(root, mouse, &day))
        } else {
            Ok(0.0)
        };
        self.seed = self
            .seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        StartFacts {
            running: self
                .session
                .as_ref()
                .map(|s| (s.mouse.clone(), s.dir.clone())),
            running_is_stopping: self.session.as_ref().is_some_and(|s| s.stopping.is_some()),
            link: live.link,
            link_detail: live.link_detail,
            rig_now_us: live.rig_now_us,
            water_today_ul: water.as_ref().map_or(0.0, |w| *w),
            water_history_problem: water.err().map(|e| e.to_string()),
            free_bytes: crate::alerts::free_bytes(root),
            seed: self.seed,
        }
    }

    /// Begin ending the session (if one runs and is not ending already):
    /// a requested stop goes to the rig thread, whose task ends and whose
    /// storage thread finishes the files; [`Self::stop_finished`] completes
    /// when they are. Returns the list of stop requests waiting for the
    /// summary, or None when no session runs.
    pub fn begin_stop(
        &mut self,
        reason: StopReason,
        automatic: bool,
    ) -> Option<&mut Vec<oneshot::Sender<Result<Value, ControlError>>>> {
        let s = self.session.as_mut()?;
        if s.stopping.is_none() {
            if !automatic {
                let _ = self.rig.send(RigRequest::Stop {
                    id: s.id,
                    reason: reason.clone(),
                });
            }
            s.stopping = Some(Stopping {
                reason,
                automatic,
                deadline: tokio::time::Instant::now() + FINISH_DEADLINE,
                waiters: Vec::new(),
            });
        }
        s.stopping.as_mut().map(|st| &mut st.waiters)
    }

    /// Completes when the ending session's files are finished, or its
    /// deadline has passed; never while no session is ending. Cancel-safe:
    /// for a `select!` beside the requests and signals.
    pub async fn stop_finished(&mut self) -> Result<FinishedSession, String> {
        let Some(s) = self.session.as_mut() else {
            return std::future::pending().await;
        };
        let Some(deadline) = s.stopping.as_ref().map(|st| st.deadline) else {
            // Not ending, yet the storage thread may end it by itself (a
            // disk error, before or without the rig thread's notice).
            let result = match (&mut s.done).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("the storage thread ended without a result".to_owned()),
            };
            let why = match &result {
                Ok(fin) => fin.reason.clone(),
                Err(e) => StopReason::StorageError(e.clone()),
            };
            self.begin_stop(why, true);
            return result;
        };
        match tokio::time::timeout_at(deadline, &mut s.done).await {
            Ok(Ok(r)) => r.map_err(|e| e.to_string()),
            Ok(Err(_)) => Err("the storage thread ended without a result".to_owned()),
            Err(_) => Err(format!(
                "finishing the session files took more than {} s",
                FINISH_DEADLINE.as_secs()
            )),
        }
    }

    /// The rig thread says a session's task ended (by itself, or after a
    /// stop): begin ending it, unless that is under way.
    pub fn on_notice(&mut self, notice: RigNotice) {
        let (id, reason) = match notice {
            RigNotice::TaskFinished { id, reason } => (id, reason),
            RigNotice::DeviceFault { t_us, code, detail } => {
                self.on_device_fault(t_us, code, detail);
                return;
            }
        };
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if s.id != id {
            // A late notice of a session already finished: never applied
            // to this one.
            tracing::debug!("{id} finished; {} runs: notice ignored", s.id);
            return;
        }
        // No stop request came first: the session ended by itself.
        self.begin_stop(reason, true);
    }

    fn on_device_fault(&mut self, t_us: u64, code: protocol::serial::FaultCode, detail: u32) {
        // Repeats (a watchdog that trips again and again, e.g. a fast
        // simulator) are held back by the alerter: one per kind per minute.
        let Some(alert) = Alert::device_fault(t_us, code, detail) else {
            return;
        };
        self.alert(alert);
    }

    /// End the session with what [`Self::stop_finished`] gave: the
    /// subscribers, the alert for an end nobody asked for, and every waiting
    /// stop request hear the same outcome. Returns it.
    pub fn complete_stop(
        &mut self,
        result: Result<FinishedSession, String>,
    ) -> Result<StopReply, ControlError> {
        let Some(s) = self.session.take() else {
            return Err(err(ErrorCode::NotRunning, "no session is running"));
        };
        let stopping = s.stopping.unwrap_or(Stopping {
            reason: StopReason::Requested("ended".into()),
            automatic: false,
            deadline: tokio::time::Instant::now(),
            waiters: Vec::new(),
        });
        if result.is_err() {
            // Whatever went wrong with the files, the task must not outlive
            // its session: make sure the rig thread has ended it (ignored if
            // it has).
            let _ = self.rig.send(RigRequest::Stop {
                id: s.id,
                reason: StopReason::StorageError("the session's files did not finish".into()),
            });
        }
        self.close_session_log();
        crate::metrics::global().session_ended(match &result {
            Ok(fin) => fin.reason.metrics_label(),
            Err(_) => "error",
        });
        if let Some(qc) = result
            .as_ref()
            .ok()
            .and_then(|fin| fin.summary.qc.clone())
            .and_then(|v| serde_json::from_value::<session_format::Qc>(v).ok())
        {
            crate::metrics::global().set_last_qc(&qc);
            if let Some(p) = &self.preview {
                p.set_last_qc(qc.to_string());
            }
        }
        if let Some(p) = &self.preview {
            p.end_session();
        }
        let reply = match &result {
            Ok(fin) => {
                tracing::info!(mouse = %s.mouse, reason = %fin.reason, trials = fin.summary.trials, "session stopped");
                self.events.publish(&Event::Session(SessionEvent::Stopped {
                    mouse: s.mouse.clone(),
                    reason: Some(fin.reason.to_string()),
                    summary: fin.summary.clone(),
                }));
                Ok(StopReply {
                    summary: fin.summary.clone(),
                })
            }
            Err(e) => {
                tracing::error!("session {} ended with an error: {e}", s.dir.display());
                self.events.publish(&Event::Session(SessionEvent::Stopped {
                    mouse: s.mouse.clone(),
                    reason: Some(format!("error: {e}")),
                    summary: SessionSummary {
                        session_dir: s.dir.display().to_string(),
                        ..Default::default()
                    },
                }));
                Err(err(ErrorCode::Internal, format!("the session stopped with an error: {e}; files up to the error are intact in {}", s.dir.display())))
            }
        };
        if stopping.automatic || stopping.reason.is_unrequested() {
            let mut a = Alert::session_ended(
                &s.mouse,
                &stopping.reason,
                reply
                    .as_ref()
                    .map(|r| &r.summary)
                    .map_err(|e| e.message.as_str()),
            );
            a.session_dir = Some(s.dir.display().to_string());
            self.alerts.raise(a);
        }
        for waiter in stopping.waiters {
            let _ = waiter.send(reply.clone().and_then(|r| to_value(&r)));
        }
        reply
    }

    async fn valve(&mut self, v: &protocol::control::ValveRequest) -> Result<(), ControlError> {
        let action = v
            .action()
            .map_err(|e| err(ErrorCode::BadRequest, e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        let req = match action {
            ValveAction::Pulse { duration_ms } => {
                if duration_ms < MIN_VALVE_PULSE_MS {
                    return Err(err(
                        ErrorCode::RefusedBySafety,
                        format!(
                            "valve pulse {duration_ms} ms is shorter than the shortest pulse rigd \
                             sends ({MIN_VALVE_PULSE_MS} ms): a valve does not open reliably \
                             that fast, and the device would be sent {} µs",
                            (duration_ms * 1000.0).round()
                        ),
                    ));
                }
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
        let answer = self.ask_rig(req, rx).await;
        if answer.is_ok() && v.calibration {
            // Water into the calibration cup: for no mouse.
            crate::metrics::global().calibration_pulses.inc();
            tracing::info!(
                ?action,
                "valve calibration pulse given (water for no mouse)"
            );
        }
        answer
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
        rx: oneshot::Receiver<Result<(), ManualRefused>>,
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
            Ok(Ok(Err(refused))) => Err(err(ErrorCode::RefusedBySafety, refused.to_string())),
            _ => Err(err(
                ErrorCode::DeviceUnavailable,
                "the rig did not answer in time",
            )),
        }
    }

    /// Reload the configuration (SIGHUP): only between sessions.
    pub fn reload(&mut self) -> Result<(), ReloadError> {
        if let Some(s) = &self.session {
            return Err(ReloadError::SessionRunning {
                mouse: s.mouse.clone(),
            });
        }
        let Some(path) = &self.config_path else {
            return Err(ReloadError::NoFile);
        };
        let loaded = rig_config::load(path)?;
        if loaded.config.rig.serial_port != self.cfg.rig.serial_port
            || loaded.config.control.socket != self.cfg.control.socket
        {
            tracing::warn!("[rig].serial_port and [control].socket changes take effect after a restart of rigd");
        }
        for w in &loaded.warnings {
            tracing::warn!("{w}");
        }
        self.cfg = Arc::new(loaded.config);
        self.check_calibration_age();
        Ok(())
    }

    fn open_session_log(&self, dir: &Path) {
        match SessionLogFile::open(dir, session_format::LOG_ROTATE_BYTES) {
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

/// The session's imaging reference as the page shows it (None: imaging
/// off, no reference, or one that does not load; the ingest reports that).
fn page_reference(cfg: &RigConfig) -> Option<crate::preview::MeanImage> {
    let im = &cfg.imaging;
    let path = im
        .reference_image
        .as_ref()
        .filter(|_| im.enabled && im.motion_correction)?;
    let r = crate::imaging::analysis::load_reference(path, im.width as usize, im.height as usize)
        .ok()?;
    crate::preview::page_image(im.width, im.height, r.image())
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, ControlError> {
    serde_json::to_value(v).map_err(|e| err(ErrorCode::Internal, e.to_string()))
}
