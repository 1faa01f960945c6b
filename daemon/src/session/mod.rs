//! The session layer: everything the daemon's threads exchange about a
//! session, in one place that the thread modules depend on and that depends
//! on none of them.
//!
//! * the messages: [`RigRequest`] and [`SessionStart`] (supervisor -> rig
//!   thread), [`StorageMsg`] (rig and imaging threads -> storage thread),
//!   [`RigNotice`] (rig thread -> supervisor), [`FinishedSession`] (storage
//!   thread -> supervisor);
//! * what the rig thread publishes: [`LiveStatus`] and [`ClockFitCell`];
//! * why a session ended: [`StopReason`];
//! * the pure start decision: [`SessionPlan`] from the configuration, the
//!   request and the facts ([`StartFacts`]), or a typed [`StartError`];
//! * [`SideStream`]: a stream recorded beside the rig's (imaging today, a
//!   behaviour camera tomorrow) that the storage thread closes before it
//!   finishes the folder;
//! * [`SessionLog`]: where the tracing layer writes the session's `rigd.log`.
//!
//! Architecture invariant: the thread modules (`rig`, `storage_thread`,
//! `imaging`, `preview`, `control`) import this module and never each other;
//! `supervisor` is the one place that puts a session together.

mod live;
mod plan;
mod stop;

use crossbeam_channel::Sender;
use firmware_bridge::link::{AnomalyKind, LeverBatch};
use std::fmt;
use std::sync::{Arc, Mutex};

use protocol::control::Event;
use protocol::serial::{AckStatus, FaultCode, HostCommand, Tone};
use session_format::trial::TrialRecord;

use crate::task::{TaskEngine, TaskState};

pub use live::{ClockFitCell, LiveSnapshot, LiveStatus, LiveView, LATENCIES_KEPT};
pub use plan::{SessionPlan, StartError, StartFacts};
pub use session_format::EventSource as StorageSource;
pub use stop::StopReason;

/// Events for subscribers, already encoded as lines.
pub type EventLine = Arc<Vec<u8>>;

/// Encode an event once for every subscriber.
pub fn event_line(event: &Event) -> EventLine {
    Arc::new(event.to_line())
}

/// Where per-session log lines go (the daemon's tracing layer writes to it
/// while a session runs).
pub type SessionLog = Arc<Mutex<Option<session_format::SessionLogFile>>>;

/// A session's identity within this rigd. Every request and notice about a
/// session carries it, so one meant for an earlier session (a late
/// "finished", a stop that crossed a new start) is never applied to a later
/// one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "session #{}", self.0)
    }
}

/// The `detail` column of an `events.tsv` row, as typed values: the rig
/// thread hands these over without formatting (no allocation per event);
/// the storage thread writes their text ([`fmt::Display`], the text
/// `docs/session-format.md` shows).
#[derive(Debug, Clone, PartialEq)]
pub enum EventDetail {
    None,
    /// A command the task sent.
    Command(HostCommand),
    /// The task's new state.
    State(TaskState),
    /// A device event's auxiliary field.
    Aux(u16),
    /// A command's acknowledgement (`cmd_type`, its status).
    Ack {
        cmd_type: u8,
        status: AckStatus,
    },
    /// A command whose acknowledgement never came.
    NoAck {
        cmd_type: u8,
    },
    /// The link is up (again).
    Connected {
        reconnect: bool,
        rebooted: bool,
    },
    /// The first sample index of a gap.
    FromIndex(u64),
    /// Bytes of garbage on the line.
    Bytes(u64),
    /// A device fault's code.
    Fault(FaultCode),
    /// Text made where it happened (rare events: a lost link, an imaging error).
    Text(String),
    /// The lever's rest position was taken.
    Rest(crate::task::LeverRest),
    /// A device-time anomaly: its running count and the offset, µs.
    Anomaly {
        count: u64,
        offset_us: i64,
    },
    /// The device clock's rate: the host heartbeat period chosen for it.
    ClockRate {
        host_heartbeat_us: u64,
        keeps_up: bool,
    },
}

impl fmt::Display for EventDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => Ok(()),
            Self::Command(cmd) => write_command(f, cmd),
            Self::State(state) => f.write_str(&snake_case(&format!("{state:?}"))),
            Self::Aux(aux) => write!(f, "aux={aux}"),
            Self::Ack { cmd_type, status } => write!(
                f,
                "type=0x{cmd_type:02x} status={}",
                snake_case(&format!("{status:?}"))
            ),
            Self::NoAck { cmd_type } => write!(f, "type=0x{cmd_type:02x}"),
            Self::Connected {
                reconnect,
                rebooted,
            } => {
                write!(f, "reconnect={reconnect} rebooted={rebooted}")
            }
            Self::FromIndex(i) => write!(f, "from_index={i}"),
            Self::Bytes(n) => write!(f, "bytes={n}"),
            Self::Fault(code) => write!(f, "code={}", snake_case(&format!("{code:?}"))),
            Self::Text(text) => f.write_str(text),
            Self::Rest(r) => write!(
                f,
                "method={} first_counts={} window_ms={:.0} range_counts={}",
                r.method,
                r.first_counts,
                r.window_us as f64 / 1000.0,
                r.range_counts
            ),
            Self::Anomaly { count, offset_us } => {
                write!(f, "count={count} offset_us={offset_us}")
            }
            Self::ClockRate {
                host_heartbeat_us,
                keeps_up,
            } => write!(
                f,
                "host_heartbeat_us={host_heartbeat_us} watchdog_fed={keeps_up}"
            ),
        }
    }
}

/// `CamelCase` (a type's name, as `Debug` prints a field-less variant) in
/// `snake_case`: the stable, documented spelling of names in `events.tsv`.
pub fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A command as `events.tsv` writes it: `cmd=<name>` and its fields as
/// `key=value` pairs (docs/session-format.md).
fn write_command(f: &mut fmt::Formatter<'_>, cmd: &HostCommand) -> fmt::Result {
    match cmd {
        HostCommand::Ping => f.write_str("cmd=ping"),
        HostCommand::Configure(c) => write!(
            f,
            "cmd=configure sample_rate_hz={} samples_per_batch={} heartbeat_interval_ms={} \
             heartbeat_timeout_ms={} max_valve_open_ms={} max_flush_ms={}",
            c.sample_rate_hz,
            c.samples_per_batch,
            c.heartbeat_interval_ms,
            c.heartbeat_timeout_ms,
            c.max_valve_open_ms,
            c.max_flush_ms
        ),
        HostCommand::Tone(t) => write!(
            f,
            "cmd=tone frequency_hz={} duration_ms={} level_pct={}",
            t.frequency_hz, t.duration_ms, t.level_pct
        ),
        HostCommand::ToneOff => f.write_str("cmd=tone_off"),
        HostCommand::ValvePulse(v) => write!(f, "cmd=valve_pulse duration_us={}", v.duration_us),
        HostCommand::ValveOpen(v) => write!(f, "cmd=valve_open max_ms={}", v.max_ms),
        HostCommand::ValveClose => f.write_str("cmd=valve_close"),
        HostCommand::SyncOut(s) => write!(
            f,
            "cmd=sync_out mode={} nbits={} unit_us={} value={}",
            s.mode, s.nbits, s.unit_us, s.value
        ),
        HostCommand::HostHeartbeat => f.write_str("cmd=host_heartbeat"),
        HostCommand::Reset => f.write_str("cmd=reset"),
        HostCommand::ArmReward(a) => write!(
            f,
            "cmd=arm_reward trial_tag={} rest_counts={} threshold_counts={} rearm_counts={} \
             direction={} window_end_us={} pulse_us={}",
            a.trial_tag,
            a.rest_counts,
            a.threshold_counts,
            a.rearm_counts,
            a.direction,
            a.window_end_us,
            a.pulse_us
        ),
        HostCommand::Disarm(d) => write!(f, "cmd=disarm trial_tag={}", d.trial_tag),
    }
}

/// A record for the session files (to the storage thread).
#[derive(Debug)]
pub enum StorageMsg {
    Lever(LeverBatch),
    Event {
        t_us: u64,
        source: StorageSource,
        kind: &'static str,
        value: f64,
        detail: EventDetail,
    },
    Trial(TrialRecord),
    /// The lever's rest position (for `session.toml`'s `[lever_rest]`);
    /// `times_taken` counts this one.
    LeverRest {
        rest: crate::task::LeverRest,
        times_taken: u32,
    },
    /// The task is over: finish the folder.
    Finish {
        reason: StopReason,
        t_us: u64,
        counters: SessionCounters,
    },
}

/// What went wrong on the device streams during one session, counted by the
/// rig thread (every count is exact for the session; the events in
/// `events.tsv` are rate-limited, these are not). For the session's QC record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCounters {
    /// Device-time anomalies by kind ([`AnomalyKind::index`]).
    pub anomalies: [u64; AnomalyKind::ALL.len()],
    /// Lever samples dropped as duplicates or overlaps.
    pub lever_samples_dropped: u64,
    /// Lever samples re-placed (stamped off their index or off the host clock).
    pub lever_samples_replaced: u64,
    /// Lever samples that never came, and the gaps they came in.
    pub lever_samples_lost: u64,
    pub sample_gaps: u64,
    /// Device frames lost on the line, and frames the decoder dropped.
    pub frames_lost: u64,
    pub bad_frames: u64,
    /// Device heartbeat-watchdog trips and other device faults.
    pub watchdog_trips: u64,
    pub device_faults: u64,
    /// Cues held for a lever away from rest; rest positions taken.
    pub cues_held: u64,
    pub lever_rests_taken: u64,
    /// Device mode: rewards the device fired, arms that ended unfired, and
    /// trials where the device's decision and the lever samples disagree.
    pub rewards_fired: u64,
    pub arms_ended: u64,
    pub decision_mismatches: u64,
}

impl SessionCounters {
    pub fn anomaly(&self, kind: AnomalyKind) -> u64 {
        self.anomalies[kind.index()]
    }

    /// Every count by name (the anomalies by their `events.tsv` kind), for
    /// a QC record.
    pub fn to_json(&self) -> serde_json::Value {
        let mut anomalies = serde_json::Map::new();
        for kind in AnomalyKind::ALL {
            anomalies.insert(kind.as_str().to_owned(), self.anomaly(kind).into());
        }
        serde_json::json!({
            "device_time_anomalies": anomalies,
            "lever_samples_dropped": self.lever_samples_dropped,
            "lever_samples_replaced": self.lever_samples_replaced,
            "lever_samples_lost": self.lever_samples_lost,
            "sample_gaps": self.sample_gaps,
            "frames_lost": self.frames_lost,
            "bad_frames": self.bad_frames,
            "watchdog_trips": self.watchdog_trips,
            "device_faults": self.device_faults,
            "cues_held": self.cues_held,
            "lever_rests_taken": self.lever_rests_taken,
            "rewards_fired": self.rewards_fired,
            "arms_ended": self.arms_ended,
            "decision_mismatches": self.decision_mismatches,
        })
    }
}

/// What the storage thread hands back when the session folder is finished.
#[derive(Debug, Clone)]
pub struct FinishedSession {
    pub summary: protocol::control::SessionSummary,
    /// The full summary as written to summary.json.
    pub summary_json: serde_json::Value,
    pub reason: StopReason,
    /// The rig thread's counts of the session's stream faults.
    pub counters: SessionCounters,
}

/// Why the rig thread did not carry out a manual command.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManualRefused {
    /// The task owns the valve and the speaker while a session runs.
    #[error("a session is running: the {0} belongs to the task")]
    SessionRunning(&'static str),
    #[error("the rig did not take the command: {0}")]
    NotSent(String),
    #[error("the device refused it: {0}")]
    DeviceRefused(String),
    #[error("the device did not acknowledge the command")]
    NoAck,
    #[error("link lost: {0}")]
    LinkLost(String),
}

/// The answer to a manual command.
pub type ManualReply = tokio::sync::oneshot::Sender<Result<(), ManualRefused>>;

/// What the supervisor asks of the rig thread.
#[derive(Debug)]
pub enum RigRequest {
    /// Start running the task; records go to `storage`.
    Start(Box<SessionStart>),
    /// Stop session `id`'s task (tone off) and tell its storage thread to
    /// finish; ignored when another session (or none) is running.
    Stop { id: SessionId, reason: StopReason },
    /// One valve pulse outside the task (refused while a session runs).
    ValvePulse {
        duration_us: u32,
        reply: ManualReply,
    },
    /// Open the valve for a flush (capped by the device).
    ValveFlush {
        duration_ms: u16,
        reply: ManualReply,
    },
    /// Play a tone outside the task.
    Tone { tone: Tone, reply: ManualReply },
}

/// The rig thread's end of its records ring to the storage thread.
pub type RecordsProducer = ringbuf::HeapProd<StorageMsg>;
/// The storage thread's end of the rig's records ring.
pub type RecordsConsumer = ringbuf::HeapCons<StorageMsg>;

/// Capacity of the rig -> storage records ring, in messages. A lever batch
/// is one message, so this is over a minute of a 10 kHz stream in batches
/// of ten; a full ring drops (and counts) records, it never waits.
pub const RECORDS_RING: usize = 1 << 16;

/// The ring the rig thread writes its records into (lock-free, single
/// producer, single consumer; made once per session, so pushing never
/// allocates).
pub fn records_ring() -> (RecordsProducer, RecordsConsumer) {
    use ringbuf::traits::Split;
    ringbuf::HeapRb::new(RECORDS_RING).split()
}

/// The rig thread's end of its events ring to the subscribers' fan-out.
pub type EventsProducer = ringbuf::HeapProd<Event>;
/// The fan-out's end: it encodes each event once and broadcasts the line.
pub type EventsConsumer = ringbuf::HeapCons<Event>;

/// Capacity of the rig -> fan-out events ring (trials, device events, link
/// changes: a few per second, frame-clock ticks at the imaging rate).
pub const EVENTS_RING: usize = 4096;

/// The ring the rig thread hands subscriber events into, made once.
pub fn events_ring() -> (EventsProducer, EventsConsumer) {
    use ringbuf::traits::Split;
    ringbuf::HeapRb::new(EVENTS_RING).split()
}

/// Everything a session needs on the rig thread.
pub struct SessionStart {
    pub id: SessionId,
    pub engine: TaskEngine,
    /// Lever batches, trials and events for the session files.
    pub records: RecordsProducer,
    /// The storage thread's control channel: the rig thread sends `Finish`
    /// there, after its last record (the storage thread then empties the
    /// ring before it finishes the folder).
    pub storage: Sender<StorageMsg>,
    /// Frame-clock edges `(count, rig µs)` for the imaging ingest.
    pub ttl_edges: Option<Sender<(u64, u64)>>,
}

impl fmt::Debug for SessionStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionStart").finish_non_exhaustive()
    }
}

/// What the rig thread tells the supervisor.
#[derive(Debug, Clone, PartialEq)]
pub enum RigNotice {
    /// Session `id`'s task finished by itself (a cap or the duration) or
    /// after a stop; the storage thread has its `Finish` queued.
    TaskFinished { id: SessionId, reason: StopReason },
    /// The device reported a fault (watchdog trip, valve cap, overflow...).
    DeviceFault {
        t_us: u64,
        code: protocol::serial::FaultCode,
        detail: u32,
    },
}

/// A stream recorded into the session folder beside the rig's own (the
/// imaging ingest; a behaviour camera would be another). The storage thread
/// finishes every side stream, so its files are closed and synced, before it
/// writes the summary and the manifest.
pub trait SideStream: Send {
    /// The `events.tsv` kind recorded when finishing fails (`imaging_error`).
    fn error_event_kind(&self) -> &'static str;
    /// Stop the stream's thread and close its files.
    fn finish(self: Box<Self>) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

#[cfg(test)]
mod counters_tests {
    use super::*;

    #[test]
    fn counters_name_every_anomaly_kind_and_keep_exact_counts() {
        let mut c = SessionCounters::default();
        c.anomalies[AnomalyKind::DuplicateBatch.index()] = 3;
        c.anomalies[AnomalyKind::ClockStep.index()] = 1;
        c.lever_samples_dropped = 30;
        c.watchdog_trips = 2;
        let v = c.to_json();
        let by_kind = v["device_time_anomalies"].as_object().expect("a map");
        assert_eq!(by_kind.len(), AnomalyKind::ALL.len());
        assert_eq!(by_kind["device_duplicate_batch"], 3);
        assert_eq!(by_kind["device_clock_step"], 1);
        assert_eq!(by_kind["device_time_forward"], 0);
        assert_eq!(v["lever_samples_dropped"], 30);
        assert_eq!(v["watchdog_trips"], 2);
        assert_eq!(c.anomaly(AnomalyKind::DuplicateBatch), 3);
    }
}

#[cfg(test)]
mod detail_tests {
    use super::*;
    use protocol::serial::{SyncOut, ValvePulse};

    #[test]
    fn event_details_are_key_value_pairs_and_snake_case_names() {
        let d = |e: EventDetail| e.to_string();
        assert_eq!(
            d(EventDetail::Command(HostCommand::SyncOut(SyncOut {
                mode: 1,
                nbits: 16,
                unit_us: 500,
                value: 3
            }))),
            "cmd=sync_out mode=1 nbits=16 unit_us=500 value=3"
        );
        assert_eq!(
            d(EventDetail::Command(HostCommand::Tone(Tone {
                frequency_hz: 6000,
                duration_ms: 200,
                level_pct: 80
            }))),
            "cmd=tone frequency_hz=6000 duration_ms=200 level_pct=80"
        );
        assert_eq!(
            d(EventDetail::Command(HostCommand::ValvePulse(ValvePulse {
                duration_us: 41_250
            }))),
            "cmd=valve_pulse duration_us=41250"
        );
        assert_eq!(d(EventDetail::State(TaskState::Iti)), "iti");
        assert_eq!(d(EventDetail::State(TaskState::LinkDown)), "link_down");
        assert_eq!(
            d(EventDetail::Fault(FaultCode::WatchdogTripped)),
            "code=watchdog_tripped"
        );
        assert_eq!(
            d(EventDetail::Ack {
                cmd_type: 0x85,
                status: AckStatus::BadValue
            }),
            "type=0x85 status=bad_value"
        );
    }
}
