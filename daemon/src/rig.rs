//! The rig side of the daemon, on the serial link's reader thread: the
//! [`RigHandler`] receives every lever sample and device event from the link,
//! runs the task engine on it and sends the engine's commands right away, on
//! the same thread (the latency path: encoder sample in, valve command out,
//! with no queue, lock that I/O holds, or async runtime in between). Everything
//! else it hands on without waiting and without allocating: records for the
//! session files into the records ring, events for subscribers into the events
//! ring (both lock-free, single producer; a full ring drops and counts), the
//! live status as atomics, notices to the supervisor.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use firmware_bridge::link::{AnomalyKind, Commander, LinkEvent, LinkHandler, LostReason};
use firmware_bridge::sync::ClockFit;
use protocol::control::{
    DeviceEvent, Event, LinkEvent as LinkEventMsg, LinkState, TrialEvent, TrialOutcome,
};
use protocol::serial::{AckStatus, EventKind, HostCommand, ValvePulse};
use ringbuf::traits::{Observer, Producer};

use crate::session::{
    ClockFitCell, EventDetail, EventsProducer, LiveStatus, ManualRefused, ManualReply,
    RecordsProducer, RigNotice, RigRequest, SessionCounters, SessionId, SessionStart, StopReason,
    StorageMsg, StorageSource,
};
use crate::task::{TaskEngine, TaskInput, TaskOutput};
use session_format::trial::{Outcome, TrialRecord};

/// Frame-clock edges remembered for the next session's ingest (~9 s at 28.7 Hz).
const RECENT_TTL: usize = 256;

struct ActiveSession {
    id: SessionId,
    engine: TaskEngine,
    records: RecordsProducer,
    storage: Sender<StorageMsg>,
    ttl_edges: Option<Sender<(u64, u64)>>,
    t0_us: Option<u64>,
    finished: bool,
    /// Why the experimenter (or a signal) stopped the session.
    stop_reason: Option<StopReason>,
    /// The session's stream faults, counted.
    counters: SessionCounters,
    /// Host time each anomaly kind was last written to events.tsv, ns.
    anomaly_logged_ns: [u64; AnomalyKind::ALL.len()],
}

/// An anomaly of one kind is written to `events.tsv` at most this often
/// (each row carries the running count; the totals are written at the end).
const ANOMALY_LOG_INTERVAL_NS: u64 = 1_000_000_000;

/// The link handler that runs the task. See the module docs.
pub struct RigHandler {
    requests: Receiver<RigRequest>,
    session: Option<ActiveSession>,
    status: Arc<LiveStatus>,
    clock: Arc<ClockFitCell>,
    /// The latest clock fit (this thread publishes it; kept here so that
    /// reading it never waits on the cell).
    last_fit: Option<ClockFit>,
    events: EventsProducer,
    notices: tokio::sync::mpsc::UnboundedSender<RigNotice>,
    /// Outstanding manual commands waiting for their Ack: (seq, reply).
    manual: Vec<(u16, ManualReply)>,
    connected: bool,
    /// The last frame-clock edges `(count, rig µs)`, handed to a new
    /// session's imaging ingest: frames that started just before the session
    /// still find their edge.
    recent_ttl: std::collections::VecDeque<(u64, u64)>,
    preview: Option<Arc<crate::preview::PreviewState>>,
    /// Lever samples for the preview not yet handed over (its lock was busy).
    preview_pending: Vec<(u64, f32)>,
    /// Trials for the preview not yet handed over (its lock was busy).
    preview_trials: Vec<crate::preview::TrialEvent>,
    /// Lick onsets and task states for the preview not yet handed over.
    preview_marks: Vec<crate::preview::RigMark>,
    /// The device clock's rate against the host's, once measured, with the
    /// host heartbeat period chosen for it and whether that feeds the
    /// device's watchdog.
    device_clock_rate: Option<(f64, std::time::Duration, bool)>,
}

/// Most lever samples kept for the preview while its lock stays busy (20 s
/// at 1 kHz); beyond that the oldest are dropped (the preview only shows).
const PREVIEW_PENDING_MAX: usize = 20_000;

/// Most trials kept for the preview while its lock stays busy (allocated
/// once; beyond it a trial is not shown, the files have it).
const PREVIEW_TRIALS_PENDING_MAX: usize = 64;

/// Most licks and task states kept for the preview while its lock stays
/// busy (allocated once; beyond it the oldest is let go).
const PREVIEW_MARKS_PENDING_MAX: usize = 256;

impl std::fmt::Debug for RigHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RigHandler")
            .field("connected", &self.connected)
            .finish()
    }
}

impl RigHandler {
    pub fn new(
        requests: Receiver<RigRequest>,
        status: Arc<LiveStatus>,
        clock: Arc<ClockFitCell>,
        events: EventsProducer,
        notices: tokio::sync::mpsc::UnboundedSender<RigNotice>,
    ) -> Self {
        Self {
            requests,
            session: None,
            status,
            clock,
            last_fit: None,
            events,
            notices,
            manual: Vec::new(),
            connected: false,
            recent_ttl: std::collections::VecDeque::with_capacity(RECENT_TTL),
            preview: None,
            // Allocated once: the trace kept while the preview is busy stays
            // under this (see `on_lever`), so pushing never allocates.
            preview_pending: Vec::with_capacity(PREVIEW_PENDING_MAX + 256),
            preview_trials: Vec::with_capacity(PREVIEW_TRIALS_PENDING_MAX),
            preview_marks: Vec::with_capacity(PREVIEW_MARKS_PENDING_MAX),
            device_clock_rate: None,
        }
    }

    /// Feed the live preview page from this thread (after the commands).
    pub fn with_preview(mut self, preview: Arc<crate::preview::PreviewState>) -> Self {
        self.preview = Some(preview);
        self
    }

    /// Rig time now for records without a device timestamp (link changes):
    /// the host clock mapped through the clock fit (the latest sample's time
    /// can be seconds old while the cable is out), else the latest sample's.
    fn rig_now_us(&self) -> u64 {
        let latest = self.status.rig_now_us();
        match self.last_fit {
            Some(fit) => {
                let mapped = fit.host_to_rig_us(firmware_bridge::link::host_now_ns());
                if mapped.is_finite() && mapped > 0.0 {
                    (mapped as u64).max(latest)
                } else {
                    latest
                }
            }
            None => latest,
        }
    }

    /// An event for control-socket subscribers: into the ring, never
    /// waiting and never encoding here (the fan-out does both).
    fn broadcast(&mut self, event: Event) {
        if self.events.try_push(event).is_err() {
            crate::metrics::global().subscriber_events_dropped.inc();
        }
    }

    fn take_requests(&mut self, commander: &Commander) {
        while let Ok(req) = self.requests.try_recv() {
            match req {
                RigRequest::Start(start) => {
                    let SessionStart {
                        id,
                        engine,
                        records,
                        storage,
                        ttl_edges,
                    } = *start;
                    if let Some(tx) = &ttl_edges {
                        for &edge in &self.recent_ttl {
                            let _ = tx.try_send(edge);
                        }
                    }
                    self.status.reset_session();
                    // What the preview did not take from the last session
                    // is not this one's.
                    self.preview_trials.clear();
                    self.preview_marks.clear();
                    if let Some(old) = &self.session {
                        // The supervisor starts a session only when the last
                        // one has finished; if one still runs here, it is
                        // ended first so that no engine outlives its session.
                        tracing::error!("{id} started while {} still ran: ending it", old.id);
                        let t_us = self.status.rig_now_us();
                        let reason = StopReason::Requested(format!("replaced by {id}"));
                        self.stop_session(old.id, reason, t_us, commander);
                    }
                    self.session = Some(ActiveSession {
                        id,
                        engine,
                        records,
                        storage,
                        ttl_edges,
                        t0_us: None,
                        finished: false,
                        stop_reason: None,
                        counters: SessionCounters::default(),
                        anomaly_logged_ns: [0; AnomalyKind::ALL.len()],
                    });
                    self.log_clock_rate();
                }
                RigRequest::Stop { id, reason } => {
                    let t_us = self.status.rig_now_us();
                    self.stop_session(id, reason, t_us, commander);
                }
                RigRequest::ValvePulse { duration_us, reply } => {
                    if self.session.is_some() {
                        let _ = reply.send(Err(ManualRefused::SessionRunning("valve")));
                    } else {
                        self.manual_command(
                            HostCommand::ValvePulse(ValvePulse { duration_us }),
                            reply,
                            commander,
                        );
                    }
                }
                RigRequest::ValveFlush { duration_ms, reply } => {
                    if self.session.is_some() {
                        let _ = reply.send(Err(ManualRefused::SessionRunning("valve")));
                    } else {
                        self.manual_command(
                            HostCommand::ValveOpen(protocol::serial::ValveOpen {
                                max_ms: duration_ms,
                            }),
                            reply,
                            commander,
                        );
                    }
                }
                RigRequest::Tone { tone, reply } => {
                    if self.session.is_some() {
                        let _ = reply.send(Err(ManualRefused::SessionRunning("speaker")));
                    } else {
                        self.manual_command(HostCommand::Tone(tone), reply, commander);
                    }
                }
            }
        }
    }

    /// Stop session `id`: the engine's stop (tone off, trial aborted), then
    /// the storage thread's `Finish`. A stop for another session (one that
    /// has already ended) is ignored.
    fn stop_session(
        &mut self,
        id: SessionId,
        reason: StopReason,
        t_us: u64,
        commander: &Commander,
    ) {
        match self.session.as_mut() {
            Some(s) if s.id == id => s.stop_reason = Some(reason.clone()),
            Some(s) => {
                tracing::warn!("a stop for {id} ignored: {} is running", s.id);
                return;
            }
            None => return,
        }
        self.feed(&TaskInput::Stop { t_us }, commander);
        // In case the engine had already finished by itself.
        self.finish_session(reason, t_us);
    }

    fn manual_command(&mut self, cmd: HostCommand, reply: ManualReply, commander: &Commander) {
        match commander.send(cmd) {
            Ok(sent) => self.manual.push((sent.seq, reply)),
            Err(e) => {
                let _ = reply.send(Err(ManualRefused::NotSent(e.to_string())));
            }
        }
    }

    /// A record for the session files: into the ring, never waiting. A full
    /// ring (the storage thread fell behind) drops it and counts it; the
    /// storage thread writes the count into the session.
    #[allow(clippy::wrong_self_convention)] // "to" the storage thread, not a conversion
    fn to_storage(&mut self, msg: StorageMsg) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if s.records.try_push(msg).is_err() && s.records.read_is_held() {
            self.status.add_storage_drop();
            crate::metrics::global().storage_dropped.inc();
        }
    }

    fn log(
        &mut self,
        t_us: u64,
        source: StorageSource,
        kind: &'static str,
        value: f64,
        detail: EventDetail,
    ) {
        if self.session.is_some() {
            self.to_storage(StorageMsg::Event {
                t_us,
                source,
                kind,
                value,
                detail,
            });
        }
    }

    /// Feed one input to the engine and act on its outputs.
    fn feed(&mut self, input: &TaskInput, commander: &Commander) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if s.finished {
            return;
        }
        // Collect outputs first (the engine borrows `s`); a step yields at
        // most a handful, and commands go out before anything is logged.
        let mut outputs: [Option<TaskOutput>; 8] = Default::default();
        let mut n = 0;
        let mut overflow = 0;
        s.engine.step(input, &mut |out| {
            if let TaskOutput::Command(cmd) = &out {
                // The latency path: send now, log after.
                if let Err(e) = commander.send(*cmd) {
                    tracing::warn!("task command {cmd:?} not sent: {e}");
                }
            }
            if n < outputs.len() {
                outputs[n] = Some(out);
                n += 1;
            } else {
                overflow += 1;
            }
        });
        if overflow > 0 {
            tracing::error!(
                "task engine produced {overflow} outputs beyond the buffer; they were not logged"
            );
        }
        let t_now = input_time(input);
        for out in outputs.into_iter().take(n).flatten() {
            self.on_output(out, t_now);
        }
    }

    fn on_output(&mut self, out: TaskOutput, t_us: u64) {
        match out {
            TaskOutput::Command(cmd) => {
                let (kind, value) = command_kind(&cmd);
                self.log(
                    t_us,
                    StorageSource::Command,
                    kind,
                    value,
                    EventDetail::Command(cmd),
                );
            }
            TaskOutput::State { t_us, state } => {
                self.mark_for_preview(crate::preview::RigMark::State {
                    t_us,
                    state: state.as_str(),
                });
                self.log(
                    t_us,
                    StorageSource::Task,
                    "state",
                    0.0,
                    EventDetail::State(state),
                );
            }
            TaskOutput::Trial(rec) => self.on_trial(rec),
            TaskOutput::Rest(rest) => {
                let cpm = self
                    .session
                    .as_ref()
                    .map_or(1.0, |s| s.engine.params().counts_per_mm);
                let times_taken = match self.session.as_mut() {
                    Some(s) => {
                        s.counters.lever_rests_taken += 1;
                        u32::try_from(s.counters.lever_rests_taken).unwrap_or(u32::MAX)
                    }
                    None => 0,
                };
                if rest.rezero {
                    tracing::warn!(
                        "lever rest re-zeroed ({}): {} counts, {:+.2} mm from the first sample",
                        rest.method,
                        rest.rest_counts,
                        rest.offset_mm(cpm)
                    );
                } else {
                    tracing::info!(
                        "lever rest {} counts ({:+.2} mm from the first sample)",
                        rest.rest_counts,
                        rest.offset_mm(cpm)
                    );
                }
                self.log(
                    rest.t_us,
                    StorageSource::Task,
                    if rest.rezero {
                        "lever_rezeroed"
                    } else {
                        "lever_rest"
                    },
                    rest.offset_mm(cpm),
                    EventDetail::Rest(rest),
                );
                self.to_storage(StorageMsg::LeverRest { rest, times_taken });
            }
            TaskOutput::LeverNotAtRest { t_us, range_counts } => {
                tracing::warn!(
                    "lever not at rest: no still window (range <= {} mm for {} ms) in the first \
                     {} s; no trial starts until the lever is still (moved over {range_counts} \
                     counts)",
                    crate::task::REST_STILL_TOLERANCE_MM,
                    crate::task::REST_STILL_WINDOW_US / 1000,
                    crate::task::REST_WAIT_WARN_US / 1_000_000,
                );
                self.log(
                    t_us,
                    StorageSource::Task,
                    "lever_not_at_rest",
                    f64::from(range_counts),
                    EventDetail::None,
                );
            }
            TaskOutput::CueHeld { t_us, lever_mm } => {
                if let Some(s) = self.session.as_mut() {
                    s.counters.cues_held += 1;
                }
                self.log(
                    t_us,
                    StorageSource::Task,
                    "cue_held",
                    lever_mm,
                    EventDetail::None,
                );
            }
            TaskOutput::DecisionMismatch {
                t_us,
                trial,
                device_cross_us,
                host_cross_us,
                device,
            } => {
                if let Some(s) = self.session.as_mut() {
                    s.counters.decision_mismatches += 1;
                }
                let at = |t: Option<u64>| t.map_or_else(|| "none".to_owned(), |t| t.to_string());
                tracing::warn!(
                    "trial {trial}: the device's decision ({device}) and the lever samples \
                     disagree (device crossing {}, host crossing {})",
                    at(device_cross_us),
                    at(host_cross_us)
                );
                self.log(
                    t_us,
                    StorageSource::Task,
                    "decision_mismatch",
                    f64::from(trial),
                    EventDetail::Text(format!(
                        "trial={trial} device={device} device_cross_us={} host_cross_us={}",
                        at(device_cross_us),
                        at(host_cross_us)
                    )),
                );
            }
            TaskOutput::Finished { t_us, reason } => {
                // A stop request's own reason wins over the engine's "stopped".
                let reason = self
                    .session
                    .as_mut()
                    .and_then(|s| s.stop_reason.take())
                    .unwrap_or(StopReason::Task(reason));
                self.finish_session(reason, t_us);
            }
        }
    }

    /// A lick or a task state for the preview: handed over unless its lock
    /// is busy this instant (then kept, in a buffer allocated once, for the
    /// next one). Only while a session runs (the page shows sessions).
    fn mark_for_preview(&mut self, mark: crate::preview::RigMark) {
        let Some(p) = &self.preview else { return };
        if self.session.is_none() {
            return;
        }
        if self.preview_marks.len() >= PREVIEW_MARKS_PENDING_MAX {
            self.preview_marks.remove(0);
        }
        self.preview_marks.push(mark);
        p.try_push_marks(&mut self.preview_marks);
    }

    fn on_trial(&mut self, rec: TrialRecord) {
        if let Some(p) = &self.preview {
            let reaction_s = rec
                .t_response_us
                .map(|r| r.saturating_sub(rec.t_cue_us) as f32 / 1e6);
            if self.preview_trials.len() < PREVIEW_TRIALS_PENDING_MAX {
                self.preview_trials.push(crate::preview::TrialEvent {
                    trial: rec.trial,
                    outcome: rec.outcome.as_str(),
                    t_us: rec.t_cue_us,
                    reaction_s,
                });
            }
            p.try_push_trials(&mut self.preview_trials);
        }
        let (rewards, water) = {
            let m = crate::metrics::global();
            if let (Some(resp), Some(open)) = (rec.t_response_us, rec.t_reward_us) {
                self.status.add_latency_us(open.saturating_sub(resp) as f64);
                m.control_latency.observe_us(open.saturating_sub(resp));
            }
            m.trials.inc();
            let rewarded = rec.outcome == Outcome::Rewarded && !rec.capped && rec.reward_ul > 0.0;
            if rewarded {
                m.rewards.inc();
                m.water_ul.add(rec.reward_ul);
            }
            self.status.add_trial(rewarded.then_some(rec.reward_ul))
        };
        let outcome = match rec.outcome {
            Outcome::Rewarded => TrialOutcome::Rewarded,
            Outcome::Miss => TrialOutcome::Miss,
            Outcome::Aborted => TrialOutcome::Aborted,
        };
        let event = Event::Trial(TrialEvent {
            trial: u64::from(rec.trial),
            outcome,
            t_us: rec.t_response_us.unwrap_or(rec.t_cue_us),
            cue_to_crossing_s: rec
                .t_response_us
                .map(|r| r.saturating_sub(rec.t_cue_us) as f64 / 1e6),
            reward_ul: (rec.outcome == Outcome::Rewarded).then_some(rec.reward_ul),
            rewards,
            water_ul: water,
        });
        self.to_storage(StorageMsg::Trial(rec));
        self.broadcast(event);
    }

    fn finish_session(&mut self, reason: StopReason, t_us: u64) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if s.finished {
            return;
        }
        s.finished = true;
        let _ = s.storage.send_timeout(
            StorageMsg::Finish {
                reason: reason.clone(),
                t_us,
                counters: s.counters,
            },
            std::time::Duration::from_millis(200),
        );
        let id = s.id;
        self.session = None;
        let _ = self.notices.send(RigNotice::TaskFinished { id, reason });
    }

    fn on_lever(&mut self, batch: &firmware_bridge::link::LeverBatch, commander: &Commander) {
        let Some(s) = self.session.as_mut() else {
            if let Some(last) = batch.samples().last() {
                self.status.set_rig_now_us(last.1);
            }
            return;
        };
        if s.t0_us.is_none() {
            s.t0_us = Some(batch.t_first_us);
            self.status.set_t0_us(batch.t_first_us);
        }
        for (_, t_us, counts) in batch.samples() {
            self.feed(&TaskInput::Lever { t_us, counts }, commander);
            if let (Some(_), Some(s)) = (&self.preview, &self.session) {
                self.preview_pending
                    .push((t_us, s.engine.lever_mm() as f32));
            }
        }
        self.to_storage(StorageMsg::Lever(*batch));
        // Per-sample bookkeeping never waits for a lock another thread holds:
        // an ordinary thread preempted while holding it would hold up the
        // reader, and with it the next sample's valve command.
        if let Some(p) = &self.preview {
            if !p.try_push_levers(&mut self.preview_pending)
                && self.preview_pending.len() > PREVIEW_PENDING_MAX
            {
                let excess = self.preview_pending.len() - PREVIEW_PENDING_MAX / 2;
                self.preview_pending.drain(..excess);
            }
        }
        if let Some(last) = batch.samples().last() {
            self.status.set_rig_now_us(last.1);
        }
    }

    fn on_device(
        &mut self,
        t_us: u64,
        kind: EventKind,
        aux: u16,
        value: u32,
        commander: &Commander,
    ) {
        self.feed(
            &TaskInput::Device {
                t_us,
                kind,
                aux,
                value,
            },
            commander,
        );
        if kind == EventKind::LickOn {
            self.mark_for_preview(crate::preview::RigMark::Lick(t_us));
        }
        let (name, ev) = match kind {
            EventKind::LickOn => ("lick_on", Some(DeviceEvent::Lick { t_us, on: true })),
            EventKind::LickOff => ("lick_off", Some(DeviceEvent::Lick { t_us, on: false })),
            EventKind::FrameTtl => {
                if self.recent_ttl.len() == RECENT_TTL {
                    self.recent_ttl.pop_front();
                }
                self.recent_ttl.push_back((u64::from(value), t_us));
                if let Some(tx) = self.session.as_ref().and_then(|s| s.ttl_edges.as_ref()) {
                    let _ = tx.try_send((u64::from(value), t_us));
                }
                ("frame_ttl", None)
            }
            EventKind::ValveOpen => (
                "valve_open",
                Some(DeviceEvent::Valve {
                    t_us,
                    open: true,
                    duration_ms: Some(f64::from(value) / 1000.0),
                }),
            ),
            EventKind::ValveClose => (
                "valve_close",
                Some(DeviceEvent::Valve {
                    t_us,
                    open: false,
                    duration_ms: None,
                }),
            ),
            EventKind::ToneOn => (
                "tone_on",
                Some(DeviceEvent::Tone {
                    t_us,
                    on: true,
                    freq_hz: Some(f64::from(value)),
                }),
            ),
            EventKind::ToneOff => (
                "tone_off",
                Some(DeviceEvent::Tone {
                    t_us,
                    on: false,
                    freq_hz: None,
                }),
            ),
            EventKind::SyncOutStart => ("sync_start", None),
            EventKind::SyncOutEnd => ("sync_end", None),
            EventKind::SafeState => ("safe_state", None),
            EventKind::SafeStateCleared => ("safe_state_cleared", None),
            EventKind::Unknown(_) => ("unknown", None),
        };
        self.log(
            t_us,
            StorageSource::Device,
            name,
            f64::from(value),
            EventDetail::Aux(aux),
        );
        if let Some(ev) = ev {
            self.broadcast(Event::Device(ev));
        }
    }

    fn on_ack(
        &mut self,
        seq: u16,
        cmd_type: u8,
        status: AckStatus,
        t_us: u64,
        commander: &Commander,
    ) {
        if let Some(i) = self.manual.iter().position(|(s, _)| *s == seq) {
            let (_, reply) = self.manual.swap_remove(i);
            let _ = reply.send(match status {
                AckStatus::Ok => Ok(()),
                other => Err(ManualRefused::DeviceRefused(format!("{other:?}"))),
            });
            self.log(
                t_us,
                StorageSource::Device,
                "ack",
                f64::from(seq),
                EventDetail::Ack { cmd_type, status },
            );
            return;
        }
        if status != AckStatus::Ok {
            self.feed(&TaskInput::CommandRefused { t_us, cmd_type }, commander);
            self.log(
                t_us,
                StorageSource::Device,
                "ack_refused",
                f64::from(seq),
                EventDetail::Ack { cmd_type, status },
            );
        }
    }

    /// A device time or index the link found implausible: counted always,
    /// written to events.tsv at most once a second per kind (each row with
    /// the session's running count), warned in the log the first time.
    fn on_time_anomaly(
        &mut self,
        kind: AnomalyKind,
        t_us: u64,
        offset_us: i64,
        samples: u64,
        link_count: u64,
    ) {
        crate::metrics::global().device_time_anomalies.inc();
        let Some(s) = self.session.as_mut() else {
            if link_count == 1 {
                tracing::warn!(
                    "{}: device time {offset_us:+} µs off ({samples} samples)",
                    kind.as_str()
                );
            }
            return;
        };
        let c = &mut s.counters;
        c.anomalies[kind.index()] += 1;
        let count = c.anomalies[kind.index()];
        match kind {
            AnomalyKind::DuplicateBatch | AnomalyKind::OverlapBatch => {
                c.lever_samples_dropped += samples;
            }
            AnomalyKind::TimeBackward | AnomalyKind::TimeForward | AnomalyKind::HostImplausible => {
                c.lever_samples_replaced += samples
            }
            AnomalyKind::ClockStep | AnomalyKind::PongRejected | AnomalyKind::EventTime => {}
        }
        let now_ns = firmware_bridge::link::host_now_ns();
        let last = &mut s.anomaly_logged_ns[kind.index()];
        if count > 1 && now_ns.saturating_sub(*last) < ANOMALY_LOG_INTERVAL_NS {
            return;
        }
        *last = now_ns;
        if count == 1 {
            tracing::warn!(
                "{}: the device's time was {offset_us:+} µs off where its sample index or the \
                 host clock puts it ({samples} samples); placed by the index/host clock",
                kind.as_str()
            );
        }
        self.log(
            t_us,
            StorageSource::Link,
            kind.as_str(),
            samples as f64,
            EventDetail::Anomaly { count, offset_us },
        );
    }

    /// The device clock's rate, measured once per connection: reported
    /// (a log line and an event) when it is far from the host's.
    fn on_clock_rate(&mut self, rate: f64, host_heartbeat: std::time::Duration, keeps_up: bool) {
        self.device_clock_rate = Some((rate, host_heartbeat, keeps_up));
        if (rate - 1.0).abs() <= firmware_bridge::link::state::RATE_WARN_FRACTION {
            tracing::debug!("device clock rate {rate:.6} x the host's");
            return;
        }
        let hb_ms = host_heartbeat.as_secs_f64() * 1000.0;
        if keeps_up {
            tracing::warn!(
                "the device clock runs {rate:.3} times as fast as the host's (a simulator at \
                 --speed {rate:.0}? real hardware never does): its heartbeat watchdog counts \
                 device time, so rigd now sends heartbeats every {hb_ms:.1} ms"
            );
        } else {
            tracing::error!(
                "the device clock runs {rate:.3} times as fast as the host's (a simulator at \
                 --speed {rate:.0}?): even a heartbeat every {hb_ms:.1} ms cannot feed its \
                 watchdog; expect watchdog trips (raise safety.heartbeat_timeout_ms or lower \
                 the simulator's speed)"
            );
        }
        self.log_clock_rate();
    }

    /// The device clock's rate into the session's events, when it is far
    /// from the host's (at the measurement, and at each session's start).
    fn log_clock_rate(&mut self) {
        let Some((rate, host_heartbeat, keeps_up)) = self.device_clock_rate else {
            return;
        };
        if (rate - 1.0).abs() <= firmware_bridge::link::state::RATE_WARN_FRACTION {
            return;
        }
        let t_us = self.rig_now_us();
        self.log(
            t_us,
            StorageSource::Link,
            "device_clock_rate",
            rate,
            EventDetail::ClockRate {
                host_heartbeat_us: host_heartbeat.as_micros() as u64,
                keeps_up,
            },
        );
    }

    fn set_link(&mut self, state: LinkState, detail: Option<String>) {
        self.status.set_link(state, detail.clone());
        crate::metrics::global().set_link_up(state == LinkState::Connected);
        self.broadcast(Event::Link(LinkEventMsg { state, detail }));
    }
}

fn input_time(input: &TaskInput) -> u64 {
    match *input {
        TaskInput::Lever { t_us, .. }
        | TaskInput::Device { t_us, .. }
        | TaskInput::CommandRefused { t_us, .. }
        | TaskInput::LinkLost { t_us }
        | TaskInput::LinkRestored { t_us }
        | TaskInput::Stop { t_us }
        | TaskInput::RewardFired { t_us, .. }
        | TaskInput::RewardEnded { t_us, .. } => t_us,
    }
}

/// `RewardEnded.reason` as `events.tsv` writes it.
fn disarm_reason_name(reason: u8) -> &'static str {
    use protocol::serial::disarm_reason as r;
    match reason {
        r::EXPIRED => "expired",
        r::HOST => "host",
        r::WATCHDOG => "watchdog",
        r::RESET => "reset",
        r::CONFIGURE => "configure",
        r::VALVE_BUSY => "valve_busy",
        _ => "unknown",
    }
}

fn command_kind(cmd: &HostCommand) -> (&'static str, f64) {
    match cmd {
        HostCommand::ValvePulse(p) => ("valve_pulse", f64::from(p.duration_us)),
        HostCommand::Tone(t) => ("tone", f64::from(t.frequency_hz)),
        HostCommand::ToneOff => ("tone_off", 0.0),
        HostCommand::SyncOut(s) => ("sync_out", f64::from(s.value)),
        HostCommand::ValveOpen(v) => ("valve_open", f64::from(v.max_ms)),
        HostCommand::ValveClose => ("valve_close", 0.0),
        HostCommand::Configure(_) => ("configure", 0.0),
        HostCommand::Ping => ("ping", 0.0),
        HostCommand::HostHeartbeat => ("heartbeat", 0.0),
        HostCommand::Reset => ("reset", 0.0),
        HostCommand::ArmReward(a) => ("arm_reward", f64::from(a.pulse_us)),
        HostCommand::Disarm(_) => ("disarm", 0.0),
    }
}

impl LinkHandler for RigHandler {
    fn on_idle(&mut self, commander: &Commander) {
        crate::metrics::global().rig_thread_beat();
        self.take_requests(commander);
    }

    fn on_event(&mut self, event: &LinkEvent, commander: &Commander) {
        crate::metrics::global().rig_thread_beat();
        self.take_requests(commander);
        match event {
            LinkEvent::Lever(batch) => self.on_lever(batch, commander),
            LinkEvent::Device {
                t_us,
                kind,
                aux,
                value,
            } => self.on_device(*t_us, *kind, *aux, *value, commander),
            LinkEvent::Acked {
                seq,
                cmd_type,
                status,
                t_us,
            } => self.on_ack(*seq, *cmd_type, *status, *t_us, commander),
            LinkEvent::NoAck { seq, cmd_type } => {
                let t_us = self.status.rig_now_us();
                if let Some(i) = self.manual.iter().position(|(s, _)| s == seq) {
                    let (_, reply) = self.manual.swap_remove(i);
                    let _ = reply.send(Err(ManualRefused::NoAck));
                } else {
                    self.feed(
                        &TaskInput::CommandRefused {
                            t_us,
                            cmd_type: *cmd_type,
                        },
                        commander,
                    );
                }
                self.log(
                    t_us,
                    StorageSource::Link,
                    "no_ack",
                    f64::from(*seq),
                    EventDetail::NoAck {
                        cmd_type: *cmd_type,
                    },
                );
            }
            LinkEvent::Connected {
                hello,
                reconnect,
                device_rebooted,
            } => {
                self.connected = true;
                let t_us = self.rig_now_us();
                self.set_link(
                    LinkState::Connected,
                    Some(format!(
                        "firmware {}.{}.{}{}",
                        hello.firmware_major,
                        hello.firmware_minor,
                        hello.firmware_patch,
                        if *device_rebooted {
                            ", device rebooted"
                        } else {
                            ""
                        }
                    )),
                );
                tracing::info!(reconnect, device_rebooted, "rig connected");
                self.log(
                    t_us,
                    StorageSource::Link,
                    "connected",
                    0.0,
                    EventDetail::Connected {
                        reconnect: *reconnect,
                        rebooted: *device_rebooted,
                    },
                );
                if *reconnect {
                    self.feed(&TaskInput::LinkRestored { t_us }, commander);
                }
            }
            LinkEvent::Lost { reason, .. } => {
                let t_us = self.rig_now_us();
                // One `lost` per loss; the failed attempts to reconnect that
                // follow are `reconnect_failed`.
                let kind = if self.connected {
                    "lost"
                } else {
                    "reconnect_failed"
                };
                if *reason == LostReason::Shutdown {
                    tracing::debug!("rig link closed");
                } else if self.connected {
                    tracing::warn!("rig link lost: {reason}");
                    crate::metrics::global().link_losses.inc();
                    self.feed(&TaskInput::LinkLost { t_us }, commander);
                } else {
                    tracing::warn!("rig not reachable: {reason}");
                }
                self.connected = false;
                for (_, reply) in self.manual.drain(..) {
                    let _ = reply.send(Err(ManualRefused::LinkLost(reason.to_string())));
                }
                self.log(
                    t_us,
                    StorageSource::Link,
                    kind,
                    0.0,
                    EventDetail::Text(reason.to_string()),
                );
                if *reason != LostReason::Shutdown {
                    self.set_link(LinkState::Lost, Some(reason.to_string()));
                }
            }
            LinkEvent::SampleGap {
                from_index,
                missing,
                t_us,
            } => {
                self.status.add_samples_lost(*missing);
                if let Some(s) = self.session.as_mut() {
                    s.counters.lever_samples_lost += *missing;
                    s.counters.sample_gaps += 1;
                }
                crate::metrics::global().lever_samples_lost.add(*missing);
                tracing::warn!("lever samples missing: {missing} from index {from_index}");
                self.log(
                    *t_us,
                    StorageSource::Link,
                    "sample_gap",
                    *missing as f64,
                    EventDetail::FromIndex(*from_index),
                );
            }
            LinkEvent::FramesLost { count } => {
                let t_us = self.status.rig_now_us();
                if let Some(s) = self.session.as_mut() {
                    s.counters.frames_lost += *count;
                }
                self.log(
                    t_us,
                    StorageSource::Link,
                    "frames_lost",
                    *count as f64,
                    EventDetail::None,
                );
            }
            LinkEvent::BadFrames { frames, bytes } => {
                let t_us = self.status.rig_now_us();
                if let Some(s) = self.session.as_mut() {
                    s.counters.bad_frames += *frames;
                }
                self.log(
                    t_us,
                    StorageSource::Link,
                    "bad_frames",
                    *frames as f64,
                    EventDetail::Bytes(*bytes),
                );
            }
            LinkEvent::Fault { t_us, code, detail } => {
                tracing::warn!("device fault {code:?} ({detail})");
                if let Some(s) = self.session.as_mut() {
                    if *code == protocol::serial::FaultCode::WatchdogTripped {
                        s.counters.watchdog_trips += 1;
                    } else {
                        s.counters.device_faults += 1;
                    }
                }
                let _ = self.notices.send(RigNotice::DeviceFault {
                    t_us: *t_us,
                    code: *code,
                    detail: *detail,
                });
                self.log(
                    *t_us,
                    StorageSource::Device,
                    "fault",
                    f64::from(*detail),
                    EventDetail::Fault(*code),
                );
            }
            LinkEvent::TimeAnomaly {
                kind,
                t_us,
                offset_us,
                samples,
                count,
            } => self.on_time_anomaly(*kind, *t_us, *offset_us, *samples, *count),
            LinkEvent::ClockRate {
                rate,
                host_heartbeat,
                keeps_up,
            } => self.on_clock_rate(*rate, *host_heartbeat, *keeps_up),
            LinkEvent::Heartbeat { .. } => {}
            LinkEvent::RewardFired {
                trial_tag,
                sample_index,
                t_cross_us,
                t_valve_us,
                counts,
                pulse_us,
            } => {
                self.feed(
                    &TaskInput::RewardFired {
                        t_us: *t_valve_us,
                        trial_tag: *trial_tag,
                        t_cross_us: *t_cross_us,
                        pulse_us: *pulse_us,
                    },
                    commander,
                );
                if let Some(s) = self.session.as_mut() {
                    s.counters.rewards_fired += 1;
                }
                self.log(
                    *t_valve_us,
                    StorageSource::Device,
                    "reward_fired",
                    f64::from(*trial_tag),
                    EventDetail::Text(format!(
                        "trial={trial_tag} sample_index={sample_index} t_cross_us={t_cross_us} \
                         t_valve_us={t_valve_us} counts={counts} pulse_us={pulse_us}"
                    )),
                );
            }
            LinkEvent::RewardEnded {
                trial_tag,
                t_us,
                reason,
                next_sample_index,
            } => {
                self.feed(
                    &TaskInput::RewardEnded {
                        t_us: *t_us,
                        trial_tag: *trial_tag,
                        reason: *reason,
                    },
                    commander,
                );
                if let Some(s) = self.session.as_mut() {
                    s.counters.arms_ended += 1;
                }
                self.log(
                    *t_us,
                    StorageSource::Device,
                    "reward_ended",
                    f64::from(*trial_tag),
                    EventDetail::Text(format!(
                        "trial={trial_tag} reason={} next_sample_index={next_sample_index}",
                        disarm_reason_name(*reason)
                    )),
                );
            }
            LinkEvent::Clock { fit, .. } => {
                self.last_fit = Some(*fit);
                self.clock.publish(*fit);
                crate::metrics::global()
                    .clock_half_band_us
                    .set(fit.half_band_us);
            }
        }
    }
}
