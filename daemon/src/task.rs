//! The lever-press task engine: a pure (sans-IO) state machine.
//!
//! [`TaskEngine::step`] takes one timestamped [`TaskInput`] (a lever sample, a
//! device event, a refused command, a link change, a stop) and hands every
//! resulting [`TaskOutput`] (a command for the device, a finished trial, a
//! state change, the end of the session) to a callback, in order.
//!
//! Architecture invariant: the task engine reads no clock, does no I/O, starts
//! no threads and does not allocate in `step`. Time is the rig-clock timestamp
//! (µs) carried by each input, and the only randomness (the ITI draw) comes
//! from a seeded generator inside the engine, so the same input stream always
//! gives the same outputs (replay).
//!
//! The state machine, what each output means and the safety rules are
//! described in `docs/behaviour.md`.

use protocol::serial::{
    direction, disarm_reason, host_type, sync_mode, ArmReward, Disarm, EventKind, HostCommand,
    SyncOut, Tone, ValvePulse,
};
pub use rig_config::RewardDecision;
use rig_config::RigConfig;
use serde::{Deserialize, Serialize};

use session_format::trial::{Outcome, TrialRecord};

/// During quiescence the lever must stay within this distance (mm) of where
/// it was when the quiet period began; any larger movement restarts the wait.
pub const QUIESCENCE_TOLERANCE_MM: f64 = 0.25;

/// After a threshold crossing, the lever must fall this far (mm) below the
/// threshold before another crossing counts. Keeps encoder jitter of a count
/// or two around the threshold from counting as many presses.
pub const REARM_HYSTERESIS_MM: f64 = 0.1;

/// The lever's rest position is taken from a still window: the lever must
/// stay within this range (mm, max - min) for [`REST_STILL_WINDOW_US`].
pub const REST_STILL_TOLERANCE_MM: f64 = 0.1;

/// How long the lever must be still before its rest position is taken, µs.
pub const REST_STILL_WINDOW_US: u64 = 500_000;

/// After this long (µs of lever samples) without a still window at the
/// start, the engine reports [`TaskOutput::LeverNotAtRest`] (once) and keeps
/// waiting: no trial starts until the lever is still.
pub const REST_WAIT_WARN_US: u64 = 5_000_000;

/// Before each cue the lever must be within this distance (mm) of rest
/// (at most half the threshold); otherwise the cue is held.
pub const CUE_REST_TOLERANCE_MM: f64 = 0.5;

/// A lever held still away from rest for this long (µs) while a cue waits is
/// taken as a new rest position (the lever or its encoder moved).
pub const REZERO_AFTER_US: u64 = 10_000_000;

/// Most samples of a still window kept for its median (a 500 ms window at
/// up to 8 kHz); later samples of a longer window only extend it.
const STILL_SAMPLES_MAX: usize = 4096;

/// Trial-number bitcode on sync-out: bits per code (as the original rig).
pub const BITCODE_NBITS: u8 = 12;
/// Trial-number bitcode on sync-out: start pulse, bit and gap length, µs.
pub const BITCODE_UNIT_US: u16 = 5000;

/// No call to [`TaskEngine::step`] produces more outputs than this, so a
/// caller can collect them in a fixed array.
pub const MAX_OUTPUTS_PER_STEP: usize = 6;

/// In device mode, how long (µs after the response window's end) the engine
/// waits for the device's verdict on an armed reward before it writes the
/// trial as a miss (and a `decision_mismatch` when its own samples crossed).
pub const DEVICE_VERDICT_GRACE_US: u64 = 500_000;

/// Armed rewards whose report may still come (the water stays committed
/// until it does); one more and the oldest stays committed for good.
const OUTSTANDING_ARMS: usize = 4;

/// When a time cap ends the session right after a reward, the engine waits at
/// most this long (µs after the pulse was commanded) for the device's
/// `ValveOpen` event before it writes the trial without a reward time.
pub const REWARD_CONFIRM_GRACE_US: u64 = 500_000;

/// The task's parameters, in the units the engine works in. Built from a
/// validated configuration (a session's overrides already applied, see
/// [`RigConfig::with_task_overrides`]) by [`TaskParams::from_config`]; every
/// field is public so tests can build odd cases.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskParams {
    /// Cue tone frequency, Hz.
    pub cue_tone_hz: u32,
    /// Cue tone duration, ms (the `Tone` command's field is 16 bits).
    pub cue_duration_ms: u16,
    /// Cue tone level, percent of full scale.
    pub cue_level_pct: u8,
    /// Response window from the cue command, µs.
    pub response_window_us: u64,
    /// Encoder counts per mm of lever travel.
    pub counts_per_mm: f64,
    /// Press threshold, mm from the rest position.
    pub threshold_mm: f64,
    /// Re-arm hysteresis below the threshold, mm ([`REARM_HYSTERESIS_MM`]).
    pub rearm_hysteresis_mm: f64,
    /// Quiet time required before the cue, µs; 0 = no quiescence state.
    pub quiescence_us: u64,
    /// Movement tolerance during quiescence, mm ([`QUIESCENCE_TOLERANCE_MM`]).
    pub quiescence_tolerance_mm: f64,
    /// Shortest and longest ITI, µs (uniform draw, both ends included).
    pub iti_min_us: u64,
    pub iti_max_us: u64,
    /// Whether a press during the ITI restarts it.
    pub iti_press_restarts: bool,
    /// Extra ITI after a miss, µs.
    pub miss_timeout_us: u64,
    /// Water per reward, µL.
    pub reward_ul: f64,
    /// Valve open time that delivers `reward_ul` by the calibration, µs.
    pub valve_open_us: u32,
    /// Stop after this many trials.
    pub max_trials: Option<u32>,
    /// Stop after this many rewards.
    pub max_rewards: Option<u32>,
    /// Start no trial after this much time since the first lever sample, µs.
    pub max_duration_us: Option<u64>,
    /// Finish (between trials) when no press was seen for this long, µs.
    pub sated_after_us: Option<u64>,
    /// Water cap for this session, µL.
    pub max_water_session_ul: f64,
    /// Water this mouse may still get today (the per-day cap minus what it
    /// already had), µL; `None` = not tracked. Set by the daemon.
    pub water_remaining_today_ul: Option<f64>,
    /// Seed of the ITI draws.
    pub seed: u64,
    /// Still window the rest position is taken from, µs
    /// ([`REST_STILL_WINDOW_US`]); 0 takes the first sample and never
    /// re-zeroes (tests only).
    pub rest_still_us: u64,
    /// Range the lever may move within a still window, mm
    /// ([`REST_STILL_TOLERANCE_MM`]).
    pub rest_tolerance_mm: f64,
    /// Before each cue the lever must be this close to rest, mm; `None`
    /// turns the check off (tests only).
    pub cue_rest_tolerance_mm: Option<f64>,
    /// Who opens the valve at the crossing (`task.reward_decision`).
    pub reward_decision: RewardDecision,
}

impl TaskParams {
    /// The task as configured. `seed` is 0 and `water_remaining_today_ul` is
    /// `None`; set them with [`Self::with_seed`] and
    /// [`Self::with_water_remaining_today_ul`].
    ///
    /// `max_duration_us` is the shorter of `task.max_duration_min` and
    /// `safety.max_session_min`.
    ///
    /// `cfg` must obey rig-config's task rules, as every configuration from
    /// `rig_config::load`/`parse_str` and [`RigConfig::with_task_overrides`]
    /// does: it is what makes every conversion here exact (the cue fits the
    /// `Tone` command, the reward is inside the valve calibration and its
    /// open time is 1 µs..=`safety.max_valve_open_ms`). Given a
    /// configuration that breaks them (a bug), this never panics in a
    /// release build: it saturates, and a reward without a calibrated open
    /// time becomes no water (0 µs).
    pub fn from_config(cfg: &RigConfig) -> Self {
        let t = &cfg.task;
        // rig-config: cue_duration_ms 1..=60000, cue_level_pct 0..=100.
        let cue_duration_ms = u16::try_from(t.cue_duration_ms).unwrap_or(u16::MAX);
        let cue_level_pct = u8::try_from(t.cue_level_pct.min(100)).unwrap_or(100);
        // rig-config: reward_ul inside the calibration, its open time rounds
        // to 1 µs..=max_valve_open_ms.
        let open_ms = cfg.valve.open_ms_for_volume(t.reward_ul);
        debug_assert!(
            open_ms.is_ok(),
            "task.reward_ul = {} has no calibrated open time: the configuration was not \
             validated ({open_ms:?})",
            t.reward_ul
        );
        let cap_us = f64::from(cfg.safety.max_valve_open_ms) * 1000.0;
        let open_us = open_ms.map_or(0.0, |ms| (ms * 1000.0).round().clamp(0.0, cap_us));
        let min_to_us = |m: u32| u64::from(m) * 60_000_000;
        let session_cap_us = min_to_us(cfg.safety.max_session_min);
        let max_duration_us = Some(match t.max_duration_min {
            Some(m) => min_to_us(m).min(session_cap_us),
            None => session_cap_us,
        });
        Self {
            cue_tone_hz: t.cue_tone_hz,
            cue_duration_ms,
            cue_level_pct,
            response_window_us: u64::from(t.response_window_ms) * 1000,
            counts_per_mm: cfg.rig.encoder_counts_per_mm,
            threshold_mm: t.threshold_mm,
            rearm_hysteresis_mm: REARM_HYSTERESIS_MM,
            quiescence_us: u64::from(t.quiescence_ms) * 1000,
            quiescence_tolerance_mm: QUIESCENCE_TOLERANCE_MM,
            iti_min_us: u64::from(t.iti_min_ms) * 1000,
            iti_max_us: u64::from(t.iti_max_ms) * 1000,
            iti_press_restarts: t.iti_press_restarts,
            miss_timeout_us: u64::from(t.miss_timeout_ms) * 1000,
            reward_ul: t.reward_ul,
            // open_us is in 0..=cap_us (<= 5 s), so it fits a u32.
            valve_open_us: open_us as u32,
            max_trials: t.max_trials,
            max_rewards: t.max_rewards,
            max_duration_us,
            sated_after_us: t.sated_after_min.map(min_to_us),
            max_water_session_ul: cfg.safety.max_water_per_session_ul,
            water_remaining_today_ul: None,
            seed: 0,
            rest_still_us: REST_STILL_WINDOW_US,
            rest_tolerance_mm: REST_STILL_TOLERANCE_MM,
            cue_rest_tolerance_mm: Some(CUE_REST_TOLERANCE_MM.min(t.threshold_mm / 2.0)),
            reward_decision: t.reward_decision,
        }
    }

    /// The same parameters with another ITI seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The same parameters with the water this mouse may still get today.
    pub fn with_water_remaining_today_ul(mut self, remaining_ul: Option<f64>) -> Self {
        self.water_remaining_today_ul = remaining_ul;
        self
    }
}

/// One input to the engine. Every time is the rig clock, µs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskInput {
    /// One lever sample (the engine's clock: timeouts are checked on samples).
    Lever { t_us: u64, counts: i32 },
    /// A device event (`ToneOn`, `ToneOff`, `ValveOpen`, `LickOn`, ...).
    Device {
        t_us: u64,
        kind: EventKind,
        aux: u16,
        value: u32,
    },
    /// A command the engine sent was answered by an `Ack` other than `Ok`,
    /// or not answered at all. `cmd_type` is the command's type byte.
    CommandRefused { t_us: u64, cmd_type: u8 },
    /// The serial link is down: no command can reach the device.
    LinkLost { t_us: u64 },
    /// The link is back and streaming.
    LinkRestored { t_us: u64 },
    /// The experimenter (or the daemon) stops the session.
    Stop { t_us: u64 },
    /// The device fired the reward armed with `trial_tag` (device mode):
    /// `t_cross_us` is the crossing (the sample that shows it, on the
    /// virtual rig; the encoder edge, on the firmware), `t_valve_us` when
    /// the valve opened. `t_us` is `t_valve_us`.
    RewardFired {
        t_us: u64,
        trial_tag: u32,
        t_cross_us: u64,
        pulse_us: u32,
    },
    /// The reward armed with `trial_tag` ended without firing (`reason`: a
    /// `protocol::serial::disarm_reason`).
    RewardEnded {
        t_us: u64,
        trial_tag: u32,
        reason: u8,
    },
}

/// The engine's state, reported on every change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// No still lever yet: the rest position is unknown (see
    /// `docs/behaviour.md`, "Lever rest").
    Waiting,
    /// Inter-trial interval.
    Iti,
    /// The trial started; waiting for the lever to be still before the cue.
    Quiescence,
    /// Cue given, response window open.
    Response,
    /// The serial link is down; the task waits for it.
    LinkDown,
    /// The session is over; inputs are ignored.
    Finished,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Iti => "iti",
            Self::Quiescence => "quiescence",
            Self::Response => "response",
            Self::LinkDown => "link_down",
            Self::Finished => "finished",
        }
    }
}

/// Why the engine finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `task.max_trials` trials were run.
    MaxTrials,
    /// `task.max_rewards` rewards were given (or the next would exceed it).
    RewardCap,
    /// The next reward would exceed the session's or the day's water cap.
    WaterCap,
    /// The session's time cap (`task.max_duration_min`, `safety.max_session_min`).
    Duration,
    /// A [`TaskInput::Stop`].
    Stopped,
    /// No press for `task.sated_after_min` (the mouse stopped working).
    Sated,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxTrials => "max_trials",
            Self::RewardCap => "reward_cap",
            Self::WaterCap => "water_cap",
            Self::Duration => "duration",
            Self::Stopped => "stopped",
            Self::Sated => "sated",
        }
    }
}

/// One output of the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskOutput {
    /// Send this command to the device now (`SyncOut`, `Tone`, `ToneOff`,
    /// `ValvePulse`).
    Command(HostCommand),
    /// A trial is complete (once per trial, in trial order).
    Trial(TrialRecord),
    /// The engine entered `state` at `t_us`.
    State { t_us: u64, state: TaskState },
    /// The session is over; this is the last output.
    Finished { t_us: u64, reason: FinishReason },
    /// The rest position was taken (at the start, or re-zeroed while a cue
    /// waited): the median of a still window.
    Rest(LeverRest),
    /// No still window within [`REST_WAIT_WARN_US`] of the first sample:
    /// no trial starts until the lever is still (once per session).
    /// `range_counts` is the lever's range (max - min) over that time.
    LeverNotAtRest { t_us: u64, range_counts: i32 },
    /// A cue is held because the lever is away from rest (once per held cue).
    CueHeld { t_us: u64, lever_mm: f64 },
    /// Device mode: the device's decision and the one the host derives from
    /// the lever samples disagree. `device_cross_us` is the device's
    /// crossing (`None`: it did not fire), `host_cross_us` the first sample
    /// in the window that crosses by the host's rule (`None`: none did).
    DecisionMismatch {
        t_us: u64,
        trial: u32,
        device_cross_us: Option<u64>,
        host_cross_us: Option<u64>,
        /// The device's report: `fired`, `expired`, `disarmed_<reason>` or
        /// `silent` (no report within [`DEVICE_VERDICT_GRACE_US`]).
        device: &'static str,
    },
}

/// The device's report on an armed reward.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Verdict {
    Fired {
        t_cross_us: u64,
        t_valve_us: u64,
        pulse_us: u32,
    },
    Ended {
        reason: u8,
    },
}

/// Device mode: the current trial's armed reward.
#[derive(Debug, Clone, Copy)]
struct DeviceArm {
    trial: u32,
    /// Rig-clock end of the response window (the arm's `window_end_us`).
    window_end_us: u64,
    verdict: Option<Verdict>,
    /// The host's own decision: the first sample in the window that crosses.
    host_cross_us: Option<u64>,
    /// When the engine asked the device to repeat a report that did not
    /// come (`Disarm` of the arm's tag, after the window and its grace).
    asked_at_us: Option<u64>,
}

fn verdict_name(v: Option<Verdict>) -> &'static str {
    match v {
        None => "silent",
        Some(Verdict::Fired { .. }) => "fired",
        Some(Verdict::Ended { reason }) => match reason {
            disarm_reason::EXPIRED => "expired",
            disarm_reason::HOST => "disarmed_host",
            disarm_reason::WATCHDOG => "disarmed_watchdog",
            disarm_reason::RESET => "disarmed_reset",
            disarm_reason::CONFIGURE => "disarmed_configure",
            disarm_reason::VALVE_BUSY => "disarmed_valve_busy",
            _ => "disarmed_other",
        },
    }
}

/// How the rest position was found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeverRest {
    /// When it was taken (the still window's last sample), µs.
    pub t_us: u64,
    /// Rest position, encoder counts.
    pub rest_counts: i32,
    /// The session's first sample, counts (the lever files' zero).
    pub first_counts: i32,
    /// The still window: its length, µs, and its range (max - min), counts.
    pub window_us: u64,
    pub range_counts: i32,
    /// Taken again during the session (not the first rest).
    pub rezero: bool,
    /// How: `still_window` (the first), `rezero_below_rest` (a lever still
    /// below rest: it was held down when the rest was taken) or
    /// `rezero_held_cue` (still away from rest while a cue waited for
    /// [`REZERO_AFTER_US`]).
    pub method: &'static str,
}

impl LeverRest {
    /// Rest minus the first sample, mm: what to subtract from the lever
    /// files' `mm` (which count from the first sample) to get mm from rest.
    pub fn offset_mm(&self, counts_per_mm: f64) -> f64 {
        (i64::from(self.rest_counts) - i64::from(self.first_counts)) as f64 / counts_per_mm
    }
}

/// A run of samples that stayed within a range: the candidate still window.
#[derive(Debug, Clone)]
struct StillRun {
    since_us: u64,
    min: i32,
    max: i32,
    /// Samples of the run (at most [`STILL_SAMPLES_MAX`]); made once.
    samples: Vec<i32>,
}

impl StillRun {
    fn new() -> Self {
        Self {
            since_us: 0,
            min: 0,
            max: 0,
            samples: Vec::with_capacity(STILL_SAMPLES_MAX),
        }
    }

    fn restart(&mut self, t: u64, counts: i32) {
        self.since_us = t;
        self.min = counts;
        self.max = counts;
        self.samples.clear();
        self.samples.push(counts);
    }

    /// Add a sample; a sample that widens the range past `tol` counts starts
    /// a new run at itself.
    fn push(&mut self, t: u64, counts: i32, tol: f64) {
        let (min, max) = (self.min.min(counts), self.max.max(counts));
        if self.samples.is_empty() || (i64::from(max) - i64::from(min)) as f64 > tol {
            self.restart(t, counts);
            return;
        }
        self.min = min;
        self.max = max;
        if self.samples.len() < STILL_SAMPLES_MAX {
            self.samples.push(counts);
        }
    }

    fn len_us(&self, t: u64) -> u64 {
        t.saturating_sub(self.since_us)
    }

    fn range(&self) -> i32 {
        self.max.saturating_sub(self.min)
    }

    /// The median of the run's samples (the lower middle one); sorts in place.
    fn median(&mut self) -> i32 {
        if self.samples.is_empty() {
            return self.min;
        }
        let mid = (self.samples.len() - 1) / 2;
        *self.samples.select_nth_unstable(mid).1
    }
}

/// splitmix64: a tiny, well-mixed, deterministic generator for the ITI draws.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` (multiply-shift; the bias is below 2^-40 for
    /// any range an ITI can have).
    fn range_inclusive(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        let span = u128::from(hi - lo) + 1;
        lo + ((u128::from(self.next_u64()) * span) >> 64) as u64
    }
}

/// A rewarded trial waiting for the device's `ValveOpen` event.
#[derive(Debug, Clone)]
struct PendingReward {
    record: TrialRecord,
    t_pulse_us: u64,
}

/// The task engine. See the module documentation and `docs/behaviour.md`.
#[derive(Debug, Clone)]
pub struct TaskEngine {
    p: TaskParams,
    threshold_counts: f64,
    rearm_counts: f64,
    quiet_counts: f64,
    rng: SplitMix64,
    state: TaskState,
    link_up: bool,

    /// Time and position of the first lever sample.
    origin_us: Option<u64>,
    first_counts: i32,
    /// The rest position, once found (`None` while [`TaskState::Waiting`]).
    rest: Option<LeverRest>,
    rest_counts: i32,
    still: StillRun,
    rest_tol_counts: f64,
    cue_rest_counts: Option<f64>,
    not_at_rest_reported: bool,
    /// The lever's lowest and highest counts while waiting for rest.
    wait_range: (i32, i32),
    /// The cue waiting now was reported held.
    cue_held: bool,
    last_counts: i32,
    /// A crossing counts only when armed (the lever was below threshold -
    /// hysteresis since the last crossing).
    armed: bool,

    iti_start_us: u64,
    iti_duration_us: u64,
    /// Presses outside the response window since the last cue.
    iti_presses: u32,
    /// The latest press (any threshold crossing), or the first sample or the
    /// link's return when later: what `sated_after_us` counts from.
    last_press_us: u64,

    trial_start_us: u64,
    quiet_anchor_counts: i32,
    quiet_since_us: u64,

    cue_cmd_us: u64,
    awaiting_tone_on: bool,
    tone_on: bool,
    tone_cmd_us: u64,
    tone_until_us: u64,
    current: Option<TrialRecord>,
    pending: Option<PendingReward>,

    trials: u32,
    rewards: u32,
    water_ul: f64,
    refused: u32,

    /// Device mode: the current trial's arm.
    arm: Option<DeviceArm>,
    /// Armed rewards not yet reported (tag, µL): counted against the caps.
    outstanding: [Option<(u32, f64)>; OUTSTANDING_ARMS],
    /// Arms that could not be tracked (every slot taken): counted for good.
    untracked_ul: f64,
    /// Device mode: the trial whose response window the link's loss cut
    /// while its arm was unresolved. The device may have fired before the
    /// link went; when the link is back the engine asks (`Disarm` of its
    /// tag, which makes the device repeat its report) and writes the trial
    /// from the answer, or aborted when none comes before the next trial.
    lost: Option<(DeviceArm, TrialRecord)>,
}

impl TaskEngine {
    pub fn new(params: TaskParams) -> Self {
        let cpm = params.counts_per_mm;
        let rest_tol = params.rest_tolerance_mm * cpm;
        let cue_rest = params.cue_rest_tolerance_mm.map(|mm| mm * cpm);
        Self {
            threshold_counts: params.threshold_mm * cpm,
            rearm_counts: (params.threshold_mm - params.rearm_hysteresis_mm) * cpm,
            quiet_counts: params.quiescence_tolerance_mm * cpm,
            rng: SplitMix64(params.seed),
            p: params,
            state: TaskState::Waiting,
            link_up: true,
            origin_us: None,
            first_counts: 0,
            rest: None,
            rest_counts: 0,
            still: StillRun::new(),
            rest_tol_counts: rest_tol,
            cue_rest_counts: cue_rest,
            not_at_rest_reported: false,
            wait_range: (i32::MAX, i32::MIN),
            cue_held: false,
            last_counts: 0,
            armed: false,
            iti_start_us: 0,
            iti_duration_us: 0,
            iti_presses: 0,
            last_press_us: 0,
            trial_start_us: 0,
            quiet_anchor_counts: 0,
            quiet_since_us: 0,
            cue_cmd_us: 0,
            awaiting_tone_on: false,
            tone_on: false,
            tone_cmd_us: 0,
            tone_until_us: 0,
            current: None,
            pending: None,
            trials: 0,
            rewards: 0,
            water_ul: 0.0,
            refused: 0,
            arm: None,
            outstanding: [None; OUTSTANDING_ARMS],
            untracked_ul: 0.0,
            lost: None,
        }
    }

    pub fn params(&self) -> &TaskParams {
        &self.p
    }

    /// Trials started (cues given) so far; the current trial's number.
    pub fn trials(&self) -> u32 {
        self.trials
    }

    /// Reward pulses commanded so far.
    pub fn rewards(&self) -> u32 {
        self.rewards
    }

    /// Water commanded so far, µL (what the caps are checked against; a
    /// pulse the device refused is still counted, to err on the safe side).
    pub fn water_ul(&self) -> f64 {
        self.water_ul
    }

    pub fn state(&self) -> TaskState {
        self.state
    }

    /// Lever position at the latest sample, mm from rest (0 before any sample).
    pub fn lever_mm(&self) -> f64 {
        (i64::from(self.last_counts) - i64::from(self.rest_counts)) as f64 / self.p.counts_per_mm
    }

    /// Rest position, encoder counts, once found.
    pub fn rest_counts(&self) -> Option<i32> {
        self.rest.map(|r| r.rest_counts)
    }

    /// How the rest position was found, once it was.
    pub fn rest(&self) -> Option<LeverRest> {
        self.rest
    }

    /// Commands reported refused or unanswered so far.
    pub fn refused_commands(&self) -> u32 {
        self.refused
    }

    /// Update the water this mouse may still get today (for example after
    /// the experimenter gave water by hand during the session). Takes effect
    /// from the next reward on.
    pub fn set_water_remaining_today_ul(&mut self, remaining_ul: Option<f64>) {
        self.p.water_remaining_today_ul = remaining_ul;
    }

    /// Feed one input; every output goes to `out`, in order (at most
    /// [`MAX_OUTPUTS_PER_STEP`]). A `ValvePulse` is always the first output
    /// of its step.
    pub fn step(&mut self, input: &TaskInput, out: &mut impl FnMut(TaskOutput)) {
        if self.state == TaskState::Finished {
            // A reward the device gave after the end still counts as water.
            if let TaskInput::RewardFired { trial_tag, .. } = *input {
                self.settle_outstanding(trial_tag, true);
            }
            return;
        }
        match *input {
            TaskInput::Lever { t_us, counts } => self.on_lever(t_us, counts, out),
            TaskInput::Device {
                t_us, kind, value, ..
            } => self.on_device(t_us, kind, value, out),
            TaskInput::CommandRefused { t_us, cmd_type } => self.on_refused(t_us, cmd_type, out),
            TaskInput::LinkLost { t_us } => self.on_link_lost(t_us, out),
            TaskInput::LinkRestored { t_us } => self.on_link_restored(t_us, out),
            TaskInput::Stop { t_us } => self.finish(t_us, FinishReason::Stopped, out),
            TaskInput::RewardFired {
                t_us,
                trial_tag,
                t_cross_us,
                pulse_us,
            } => self.on_reward_fired(t_us, trial_tag, t_cross_us, pulse_us, out),
            TaskInput::RewardEnded {
                trial_tag, reason, ..
            } => self.on_reward_ended(trial_tag, reason, out),
        }
    }

    /// Water armed and not yet reported by the device, µL.
    pub fn committed_ul(&self) -> f64 {
        self.untracked_ul
            + self
                .outstanding
                .iter()
                .flatten()
                .map(|&(_, ul)| ul)
                .sum::<f64>()
    }

    fn device_mode(&self) -> bool {
        self.p.reward_decision == RewardDecision::Device
    }

    // ---- device-armed reward ------------------------------------------------

    /// The device's report on `tag` came: the arm's water is no longer
    /// pending; when it fired, it is water given.
    fn settle_outstanding(&mut self, tag: u32, fired: bool) -> bool {
        let Some(slot) = self
            .outstanding
            .iter_mut()
            .find(|s| s.is_some_and(|(t, _)| t == tag))
        else {
            // Not tracked (every slot was taken when it was armed): its
            // water was counted in `untracked_ul`. Given, it moves to the
            // water given; the caps see the same total either way.
            if fired {
                let ul = self.p.reward_ul;
                self.untracked_ul = (self.untracked_ul - ul).max(0.0);
                self.water_ul += ul;
                self.rewards = self.rewards.saturating_add(1);
            }
            return false;
        };
        let (_, ul) = slot.take().unwrap_or((tag, 0.0));
        if fired {
            self.water_ul += ul;
            self.rewards = self.rewards.saturating_add(1);
        }
        true
    }

    fn on_reward_fired(
        &mut self,
        t_valve: u64,
        tag: u32,
        t_cross: u64,
        pulse_us: u32,
        out: &mut impl FnMut(TaskOutput),
    ) {
        if self.lost.as_ref().is_some_and(|(a, _)| a.trial == tag) {
            if let Some((_, rec)) = self.lost.take() {
                self.settle_outstanding(tag, true);
                out(TaskOutput::Trial(Self::rewarded_record(
                    rec, t_cross, t_valve, pulse_us, &self.p,
                )));
            }
            return;
        }
        match self.arm.as_mut().filter(|a| a.trial == tag) {
            Some(a) if a.verdict.is_none() => {
                a.verdict = Some(Verdict::Fired {
                    t_cross_us: t_cross,
                    t_valve_us: t_valve,
                    pulse_us,
                });
            }
            // An older trial's arm (its trial was already written, e.g.
            // aborted when the link dropped): the water still counts.
            _ => {
                self.settle_outstanding(tag, true);
            }
        }
    }

    fn on_reward_ended(&mut self, tag: u32, reason: u8, out: &mut impl FnMut(TaskOutput)) {
        if self.lost.as_ref().is_some_and(|(a, _)| a.trial == tag) {
            self.settle_outstanding(tag, false);
            self.flush_lost(out);
            return;
        }
        match self.arm.as_mut().filter(|a| a.trial == tag) {
            Some(a) if a.verdict.is_none() => a.verdict = Some(Verdict::Ended { reason }),
            _ => {
                self.settle_outstanding(tag, false);
            }
        }
    }

    /// A trial the device rewarded: its crossing, its valve time, its pulse.
    fn rewarded_record(
        mut rec: TrialRecord,
        t_cross: u64,
        t_valve: u64,
        pulse_us: u32,
        p: &TaskParams,
    ) -> TrialRecord {
        rec.outcome = Outcome::Rewarded;
        rec.t_response_us = Some(t_cross);
        rec.t_reward_us = Some(t_valve);
        rec.reward_ul = p.reward_ul;
        rec.valve_open_us = pulse_us;
        rec
    }

    /// The trial cut by a link loss, when no report came for it: aborted.
    fn flush_lost(&mut self, out: &mut impl FnMut(TaskOutput)) {
        if let Some((_, mut rec)) = self.lost.take() {
            rec.outcome = Outcome::Aborted;
            out(TaskOutput::Trial(rec));
        }
    }

    /// Arm the device at the cue (device mode). Returns false when a cap
    /// would be exceeded: then nothing is armed.
    fn arm_reward(&mut self, t: u64, trial: u32, out: &mut impl FnMut(TaskOutput)) -> bool {
        if self.reward_cap().is_some() {
            return false;
        }
        let window_end_us = t.saturating_add(self.p.response_window_us);
        // Integer counts cross exactly when the host's f64 rule says so.
        let threshold = self.threshold_counts.ceil().clamp(1.0, f64::from(i32::MAX)) as u32;
        let rearm = (self.rearm_counts.ceil().max(0.0) as u32).min(threshold - 1);
        out(TaskOutput::Command(HostCommand::ArmReward(ArmReward {
            trial_tag: trial,
            rest_counts: self.rest_counts,
            threshold_counts: threshold,
            rearm_counts: rearm,
            direction: direction::UP,
            // The rig clock is the device's counter unwrapped: its low 32
            // bits are the device's time.
            window_end_us: window_end_us as u32,
            pulse_us: self.p.valve_open_us,
        })));
        match self.outstanding.iter_mut().find(|s| s.is_none()) {
            Some(slot) => *slot = Some((trial, self.p.reward_ul)),
            None => self.untracked_ul += self.p.reward_ul,
        }
        self.arm = Some(DeviceArm {
            trial,
            window_end_us,
            verdict: None,
            host_cross_us: None,
            asked_at_us: None,
        });
        true
    }

    /// Device mode, response window: the device's verdict decides the trial
    /// at the sample it names; the host's own crossing is the audit.
    fn device_response(&mut self, t: u64, crossed: bool, out: &mut impl FnMut(TaskOutput)) {
        let Some(mut arm) = self.arm else {
            return;
        };
        if crossed && t > self.cue_cmd_us && t < arm.window_end_us && arm.host_cross_us.is_none() {
            arm.host_cross_us = Some(t);
        }
        self.arm = Some(arm);
        match arm.verdict {
            Some(Verdict::Fired {
                t_cross_us,
                t_valve_us,
                pulse_us,
            }) if t >= t_cross_us => {
                self.arm = None;
                let agree = arm.host_cross_us == Some(t_cross_us);
                if !agree {
                    out(TaskOutput::DecisionMismatch {
                        t_us: t,
                        trial: arm.trial,
                        device_cross_us: Some(t_cross_us),
                        host_cross_us: arm.host_cross_us,
                        device: "fired",
                    });
                }
                self.settle_outstanding(arm.trial, true);
                if let Some(rec) = self.current.take() {
                    out(TaskOutput::Trial(Self::rewarded_record(
                        rec, t_cross_us, t_valve_us, pulse_us, &self.p,
                    )));
                }
                self.last_press_us = self.last_press_us.max(t_cross_us);
                self.tone_off_if_on(t, out);
                self.enter_iti(t, 0, out);
            }
            Some(Verdict::Ended { .. }) if t >= arm.window_end_us => {
                self.device_miss(t, arm, out);
            }
            None if t >= arm.window_end_us.saturating_add(DEVICE_VERDICT_GRACE_US) => {
                match arm.asked_at_us {
                    None if self.link_up => {
                        // The report may have been lost on the wire (a
                        // dropped or corrupt message): ask the device to
                        // repeat it (a `Disarm` of an ended arm repeats its
                        // report) before writing the trial, so that a valve
                        // the device opened is never written as a miss.
                        let mut asked = arm;
                        asked.asked_at_us = Some(t);
                        self.arm = Some(asked);
                        out(TaskOutput::Command(HostCommand::Disarm(Disarm {
                            trial_tag: arm.trial,
                        })));
                    }
                    Some(at) if t < at.saturating_add(DEVICE_VERDICT_GRACE_US) => {}
                    // Still no report: the trial is a miss on the host's
                    // books; the arm's water stays committed until a report
                    // comes.
                    _ => self.device_miss(t, arm, out),
                }
            }
            _ => {}
        }
    }

    fn device_miss(&mut self, t: u64, arm: DeviceArm, out: &mut impl FnMut(TaskOutput)) {
        self.arm = None;
        if let Some(Verdict::Ended { .. }) = arm.verdict {
            self.settle_outstanding(arm.trial, false);
        }
        if arm.host_cross_us.is_some() || arm.verdict.is_none() {
            out(TaskOutput::DecisionMismatch {
                t_us: t,
                trial: arm.trial,
                device_cross_us: None,
                host_cross_us: arm.host_cross_us,
                device: verdict_name(arm.verdict),
            });
        }
        self.miss(t, out);
    }

    // ---- inputs -----------------------------------------------------------

    fn on_lever(&mut self, t: u64, counts: i32, out: &mut impl FnMut(TaskOutput)) {
        let first = self.origin_us.is_none();
        if first {
            self.origin_us = Some(t);
            self.last_press_us = t;
            self.first_counts = counts;
            self.still.restart(t, counts);
        } else {
            self.still.push(t, counts, self.rest_tol_counts);
        }
        self.last_counts = counts;
        if self.rest.is_none() {
            self.seek_rest(t, out);
            return;
        }
        if first {
            return;
        }
        if matches!(self.state, TaskState::Iti | TaskState::Quiescence) && self.still_below_rest(t)
        {
            // The lever rests lower than its rest: the rest was taken with
            // the lever held down. The sample is used for nothing else.
            self.take_rest(t, "rezero_below_rest", out);
            return;
        }
        let disp = self.displacement(counts);
        let crossed = self.armed && disp >= self.threshold_counts;
        if crossed {
            self.armed = false;
            self.last_press_us = t;
        } else if disp < self.rearm_counts {
            self.armed = true;
        }

        match self.state {
            TaskState::Iti => {
                if crossed {
                    self.iti_presses = self.iti_presses.saturating_add(1);
                    if self.p.iti_press_restarts {
                        self.iti_start_us = t;
                    }
                }
                if self.duration_finish(t, out) {
                    return;
                }
                if t >= self.iti_start_us.saturating_add(self.iti_duration_us) {
                    self.end_iti(t, counts, out);
                }
            }
            TaskState::Quiescence => {
                if crossed {
                    self.iti_presses = self.iti_presses.saturating_add(1);
                }
                if self.duration_finish(t, out) {
                    return;
                }
                let moved = (i64::from(counts) - i64::from(self.quiet_anchor_counts)).abs() as f64;
                if moved > self.quiet_counts {
                    self.quiet_anchor_counts = counts;
                    self.quiet_since_us = t;
                }
                if t.saturating_sub(self.quiet_since_us) >= self.p.quiescence_us
                    && self.near_rest_for_cue(t, counts, out)
                {
                    self.start_cue(t, counts, out);
                }
            }
            TaskState::Response if self.arm.is_some() => self.device_response(t, crossed, out),
            TaskState::Response => {
                if t >= self.cue_cmd_us.saturating_add(self.p.response_window_us) {
                    self.miss(t, out);
                    if crossed {
                        // Too late for this trial: an ITI press of the next.
                        self.iti_presses = self.iti_presses.saturating_add(1);
                    }
                } else if crossed && t > self.cue_cmd_us {
                    self.reward(t, out);
                }
            }
            TaskState::LinkDown => {
                // Samples while the link is reported down: keep the lever
                // state, start nothing.
                if crossed {
                    self.iti_presses = self.iti_presses.saturating_add(1);
                }
            }
            TaskState::Waiting | TaskState::Finished => {}
        }
    }

    fn on_device(&mut self, t: u64, kind: EventKind, value: u32, out: &mut impl FnMut(TaskOutput)) {
        match kind {
            EventKind::ToneOn if self.awaiting_tone_on && t >= self.cue_cmd_us => {
                self.awaiting_tone_on = false;
                let trial = self.trials;
                if let Some(rec) = self.current.as_mut().filter(|r| r.trial == trial) {
                    rec.t_cue_us = t;
                } else if let Some(p) = self.pending.as_mut().filter(|p| p.record.trial == trial) {
                    p.record.t_cue_us = t;
                }
            }
            EventKind::ToneOff if t >= self.tone_cmd_us => self.tone_on = false,
            EventKind::SafeState => self.tone_on = false,
            EventKind::ValveOpen => {
                // value 0 is a flush, not a reward pulse.
                let ours = self
                    .pending
                    .as_ref()
                    .is_some_and(|p| value != 0 && t >= p.t_pulse_us);
                if ours {
                    if let Some(mut p) = self.pending.take() {
                        p.record.t_reward_us = Some(t);
                        out(TaskOutput::Trial(p.record));
                    }
                }
            }
            _ => {}
        }
    }

    fn on_refused(&mut self, _t: u64, cmd_type: u8, out: &mut impl FnMut(TaskOutput)) {
        self.refused = self.refused.saturating_add(1);
        // A refused (or unanswered) ArmReward: no report will come unless the
        // device armed after all; the trial ends on the host's books after
        // the window (device_response), the water stays committed.
        if cmd_type == host_type::VALVE_PULSE {
            // The device did not confirm the pulse: write the trial without a
            // reward time or volume. The water stays counted against the caps
            // (a missing Ack does not prove a missing pulse).
            if let Some(mut p) = self.pending.take() {
                p.record.reward_ul = 0.0;
                out(TaskOutput::Trial(p.record));
            }
        }
    }

    fn on_link_lost(&mut self, t: u64, out: &mut impl FnMut(TaskOutput)) {
        if !self.link_up {
            return;
        }
        self.link_up = false;
        // The device silences the tone itself when the host goes quiet, and
        // disarms; an arm's water stays committed until its report comes.
        self.tone_on = false;
        let arm = self.arm.take();
        if let Some(mut rec) = self.current.take() {
            match arm.filter(|a| a.trial == rec.trial) {
                Some(a) => match a.verdict {
                    Some(Verdict::Fired {
                        t_cross_us,
                        t_valve_us,
                        pulse_us,
                    }) => {
                        // It fired before the link went: the mouse got it.
                        self.settle_outstanding(a.trial, true);
                        out(TaskOutput::Trial(Self::rewarded_record(
                            rec, t_cross_us, t_valve_us, pulse_us, &self.p,
                        )));
                    }
                    Some(Verdict::Ended { .. }) => {
                        self.settle_outstanding(a.trial, false);
                        rec.outcome = Outcome::Aborted;
                        out(TaskOutput::Trial(rec));
                    }
                    // Unknown: ask the device when the link is back.
                    None => self.lost = Some((a, rec)),
                },
                None => {
                    rec.outcome = Outcome::Aborted;
                    out(TaskOutput::Trial(rec));
                }
            }
        }
        self.awaiting_tone_on = false;
        self.set_state(t, TaskState::LinkDown, out);
    }

    fn on_link_restored(&mut self, t: u64, out: &mut impl FnMut(TaskOutput)) {
        if self.link_up {
            return;
        }
        self.link_up = true;
        // The lever was not seen while the link was down: count the mouse's
        // idle time afresh, never declare it sated over an unplugged cable.
        self.last_press_us = self.last_press_us.max(t);
        if let Some((a, _)) = &self.lost {
            // The device repeats the last arm's report for its tag.
            out(TaskOutput::Command(HostCommand::Disarm(Disarm {
                trial_tag: a.trial,
            })));
        }
        if self.state == TaskState::LinkDown {
            if self.rest.is_some() {
                self.enter_iti(t, 0, out);
            } else {
                self.set_state(t, TaskState::Waiting, out);
            }
        }
    }

    // ---- transitions ------------------------------------------------------

    fn displacement(&self, counts: i32) -> f64 {
        (i64::from(counts) - i64::from(self.rest_counts)) as f64
    }

    fn set_state(&mut self, t: u64, state: TaskState, out: &mut impl FnMut(TaskOutput)) {
        if self.state != state {
            self.state = state;
            out(TaskOutput::State { t_us: t, state });
        }
    }

    fn enter_iti(&mut self, t: u64, extra_us: u64, out: &mut impl FnMut(TaskOutput)) {
        self.iti_start_us = t;
        self.iti_duration_us = self
            .rng
            .range_inclusive(self.p.iti_min_us, self.p.iti_max_us)
            .saturating_add(extra_us);
        self.set_state(t, TaskState::Iti, out);
    }

    /// The session's time is up, or the mouse is sated (checked between
    /// trials only). Returns true when the engine finished.
    fn duration_finish(&mut self, t: u64, out: &mut impl FnMut(TaskOutput)) -> bool {
        let Some(origin) = self.origin_us else {
            return false;
        };
        let timed_out = self
            .p
            .max_duration_us
            .is_some_and(|max| t.saturating_sub(origin) >= max);
        let sated = self
            .p
            .sated_after_us
            .is_some_and(|idle| t.saturating_sub(self.last_press_us) >= idle);
        if !timed_out && !sated {
            return false;
        }
        if let Some(p) = &self.pending {
            if t < p.t_pulse_us.saturating_add(REWARD_CONFIRM_GRACE_US) {
                return false; // give the last reward's ValveOpen a moment
            }
        }
        let reason = if timed_out {
            FinishReason::Duration
        } else {
            FinishReason::Sated
        };
        self.finish(t, reason, out);
        true
    }

    /// Which cap stops the next trial, if any.
    fn trial_cap(&self) -> Option<FinishReason> {
        if self.p.max_trials.is_some_and(|m| self.trials >= m) {
            return Some(FinishReason::MaxTrials);
        }
        self.reward_cap()
    }

    /// Which cap one more reward would exceed, if any.
    fn reward_cap(&self) -> Option<FinishReason> {
        let pending = self.outstanding.iter().flatten().count() as u32;
        if self
            .p
            .max_rewards
            .is_some_and(|m| self.rewards.saturating_add(pending) >= m)
        {
            return Some(FinishReason::RewardCap);
        }
        // A hair of tolerance so that caps that are exact multiples of the
        // reward are reached, not missed by rounding.
        // `fits` is false for NaN, so a cap that is not a number stops rewards.
        let fits = |total: f64, cap: f64| total <= cap;
        let after = self.water_ul + self.committed_ul() + self.p.reward_ul - 1e-9;
        let over_day = self
            .p
            .water_remaining_today_ul
            .is_some_and(|left| !fits(after, left));
        if !fits(after, self.p.max_water_session_ul) || over_day {
            return Some(FinishReason::WaterCap);
        }
        None
    }

    fn end_iti(&mut self, t: u64, counts: i32, out: &mut impl FnMut(TaskOutput)) {
        self.flush_pending(out);
        self.flush_lost(out);
        if let Some(reason) = self.trial_cap() {
            self.finish(t, reason, out);
            return;
        }
        self.trial_start_us = t;
        self.cue_held = false;
        if self.p.quiescence_us > 0 || !self.near_rest_for_cue(t, counts, out) {
            // The quiescence state also holds a cue while the lever is away
            // from rest (with no quiescence time configured).
            self.quiet_anchor_counts = counts;
            self.quiet_since_us = t;
            self.set_state(t, TaskState::Quiescence, out);
        } else {
            self.start_cue(t, counts, out);
        }
    }

    /// Looking for the rest position (state `Waiting`): the lever still for
    /// `rest_still_us` gives it (the median of the window) and starts the
    /// first ITI. Warns once when none came within [`REST_WAIT_WARN_US`].
    fn seek_rest(&mut self, t: u64, out: &mut impl FnMut(TaskOutput)) {
        let origin = self.origin_us.unwrap_or(t);
        let (lo, hi) = self.wait_range;
        self.wait_range = (lo.min(self.last_counts), hi.max(self.last_counts));
        if self.still.len_us(t) >= self.p.rest_still_us {
            self.take_rest(t, "still_window", out);
            self.armed = true;
            if self.state == TaskState::Waiting {
                self.enter_iti(t, 0, out);
            }
            return;
        }
        if !self.not_at_rest_reported && t.saturating_sub(origin) >= REST_WAIT_WARN_US {
            self.not_at_rest_reported = true;
            let (lo, hi) = self.wait_range;
            out(TaskOutput::LeverNotAtRest {
                t_us: t,
                range_counts: hi.saturating_sub(lo),
            });
        }
        // The session's time cap counts from the first sample, rest or not.
        self.duration_finish(t, out);
    }

    fn take_rest(&mut self, t: u64, method: &'static str, out: &mut impl FnMut(TaskOutput)) {
        let rest = LeverRest {
            t_us: t,
            rest_counts: self.still.median(),
            first_counts: self.first_counts,
            window_us: self.still.len_us(t),
            range_counts: self.still.range(),
            rezero: method != "still_window",
            method,
        };
        self.rest_counts = rest.rest_counts;
        self.rest = Some(rest);
        out(TaskOutput::Rest(rest));
    }

    /// Presses move the lever up from its mechanical stop, so a lever still
    /// for a window clearly below the rest position is resting on the stop
    /// and the rest was taken while it was held down.
    fn still_below_rest(&self, t: u64) -> bool {
        let margin = self
            .cue_rest_counts
            .unwrap_or(0.0)
            .max(self.rest_tol_counts);
        self.p.rest_still_us > 0
            && self.still.len_us(t) >= self.p.rest_still_us
            && (i64::from(self.rest_counts) - i64::from(self.still.max)) as f64 > margin
    }

    /// Whether the lever is near enough to rest for a cue. When it is not,
    /// reports the held cue (once per cue), and takes a new rest when the
    /// lever has stayed still away from rest for [`REZERO_AFTER_US`].
    fn near_rest_for_cue(&mut self, t: u64, counts: i32, out: &mut impl FnMut(TaskOutput)) -> bool {
        let Some(tol) = self.cue_rest_counts else {
            return true;
        };
        if self.displacement(counts).abs() <= tol {
            return true;
        }
        if !self.cue_held {
            self.cue_held = true;
            out(TaskOutput::CueHeld {
                t_us: t,
                lever_mm: self.displacement(counts) / self.p.counts_per_mm,
            });
        }
        if self.still.len_us(t) >= REZERO_AFTER_US.max(self.p.rest_still_us) {
            // The cue comes at the next sample (this step's outputs stay
            // within MAX_OUTPUTS_PER_STEP).
            self.take_rest(t, "rezero_held_cue", out);
            self.cue_held = false;
        }
        false
    }

    fn start_cue(&mut self, t: u64, counts: i32, out: &mut impl FnMut(TaskOutput)) {
        self.trials += 1;
        let trial = self.trials;
        out(TaskOutput::Command(HostCommand::SyncOut(SyncOut {
            mode: sync_mode::BITCODE,
            nbits: BITCODE_NBITS,
            unit_us: BITCODE_UNIT_US,
            value: trial % (1 << BITCODE_NBITS),
        })));
        out(TaskOutput::Command(HostCommand::Tone(Tone {
            frequency_hz: self.p.cue_tone_hz,
            duration_ms: self.p.cue_duration_ms,
            level_pct: self.p.cue_level_pct,
        })));
        if self.device_mode() {
            self.arm_reward(t, trial, out);
        }
        self.tone_on = true;
        self.tone_cmd_us = t;
        self.tone_until_us = t + u64::from(self.p.cue_duration_ms) * 1000;
        self.awaiting_tone_on = true;
        self.cue_cmd_us = t;
        self.current = Some(TrialRecord {
            trial,
            t_start_us: self.trial_start_us,
            t_cue_us: t,
            t_response_us: None,
            outcome: Outcome::Miss,
            t_reward_us: None,
            reward_ul: 0.0,
            valve_open_us: 0,
            lever_mm_at_cue: self.displacement(counts) / self.p.counts_per_mm,
            iti_presses: self.iti_presses,
            capped: false,
        });
        self.iti_presses = 0;
        self.set_state(t, TaskState::Response, out);
    }

    fn reward(&mut self, t: u64, out: &mut impl FnMut(TaskOutput)) {
        let Some(mut rec) = self.current.take() else {
            return;
        };
        rec.outcome = Outcome::Rewarded;
        rec.t_response_us = Some(t);
        let cap = match self.reward_cap() {
            // Device mode with nothing armed: a cap held the arm back, and
            // the host never opens the valve itself in this mode.
            None if self.device_mode() => Some(FinishReason::WaterCap),
            cap => cap,
        };
        if let Some(reason) = cap {
            // Caps are checked before every cue, so this only happens when
            // the day's remaining water was lowered during the trial.
            rec.capped = true;
            out(TaskOutput::Trial(rec));
            self.finish(t, reason, out);
            return;
        }
        out(TaskOutput::Command(HostCommand::ValvePulse(ValvePulse {
            duration_us: self.p.valve_open_us,
        })));
        self.rewards += 1;
        self.water_ul += self.p.reward_ul;
        self.tone_off_if_on(t, out);
        rec.reward_ul = self.p.reward_ul;
        rec.valve_open_us = self.p.valve_open_us;
        self.pending = Some(PendingReward {
            record: rec,
            t_pulse_us: t,
        });
        self.enter_iti(t, 0, out);
    }

    fn miss(&mut self, t: u64, out: &mut impl FnMut(TaskOutput)) {
        self.tone_off_if_on(t, out);
        if let Some(rec) = self.current.take() {
            out(TaskOutput::Trial(rec));
        }
        self.enter_iti(t, self.p.miss_timeout_us, out);
    }

    fn tone_off_if_on(&mut self, t: u64, out: &mut impl FnMut(TaskOutput)) {
        if self.tone_on && t < self.tone_until_us && self.link_up {
            out(TaskOutput::Command(HostCommand::ToneOff));
        }
        self.tone_on = false;
    }

    fn flush_pending(&mut self, out: &mut impl FnMut(TaskOutput)) {
        if let Some(p) = self.pending.take() {
            out(TaskOutput::Trial(p.record));
        }
    }

    fn finish(&mut self, t: u64, reason: FinishReason, out: &mut impl FnMut(TaskOutput)) {
        self.tone_off_if_on(t, out);
        if let Some(arm) = self.arm.take() {
            if arm.verdict.is_none() && self.link_up {
                out(TaskOutput::Command(HostCommand::Disarm(Disarm {
                    trial_tag: arm.trial,
                })));
            }
            if let Some(Verdict::Fired { .. }) = arm.verdict {
                // It fired, but the session ends before its sample came: the
                // water was given.
                self.settle_outstanding(arm.trial, true);
            }
        }
        // A trial cut short in its response window is written as aborted.
        if let Some(mut rec) = self.current.take() {
            rec.outcome = Outcome::Aborted;
            out(TaskOutput::Trial(rec));
        }
        self.flush_pending(out);
        self.flush_lost(out);
        self.set_state(t, TaskState::Finished, out);
        out(TaskOutput::Finished { t_us: t, reason });
    }
}

#[cfg(test)]
mod tests;
