//! The record of one trial, shared by the task engine (which makes it), the
//! storage writer (which saves it) and the summary (which reads it). Times are
//! rig-clock microseconds since the session's rig-time origin.

use serde::{Deserialize, Serialize};

/// How a trial ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The lever crossed the threshold inside the response window; water given
    /// (unless a cap stopped it: then `reward_ul` is 0 and `capped` is true).
    Rewarded,
    /// The response window ended without a crossing.
    Miss,
    /// The trial was cut short before its window ended: the serial link was
    /// lost (the device cannot be seen, so neither a press nor its absence
    /// is known) or the session was stopped mid-window. Not a miss: the
    /// summary leaves aborted trials out of the success rate.
    Aborted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rewarded => "rewarded",
            Self::Miss => "miss",
            Self::Aborted => "aborted",
        }
    }
}

/// One row of `trials.tsv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialRecord {
    /// 1-based trial number (also sent as the sync-out bitcode).
    pub trial: u32,
    /// Trial start (ITI end; quiescence wait begins), µs.
    pub t_start_us: u64,
    /// Cue tone on (the device's ToneOn event time when known, else the
    /// commanding sample's time), µs.
    pub t_cue_us: u64,
    /// The sample at which the lever crossed the threshold, µs.
    pub t_response_us: Option<u64>,
    pub outcome: Outcome,
    /// Valve open time from the device's ValveOpen event, µs.
    pub t_reward_us: Option<u64>,
    /// Volume delivered by the calibration, µL (0 for a miss).
    pub reward_ul: f64,
    /// Valve open duration commanded, µs.
    pub valve_open_us: u32,
    /// Lever position at the cue, mm from rest.
    pub lever_mm_at_cue: f64,
    /// Presses (threshold crossings) during the preceding ITI.
    pub iti_presses: u32,
    /// A reward was earned but withheld by a water or reward cap.
    pub capped: bool,
}

impl TrialRecord {
    /// The trial with its times made session-relative (minus the session's
    /// rig-time origin `t0_rig_us`), as `trials.tsv` stores them.
    pub fn to_session_time(&self, t0_rig_us: u64) -> TrialRecord {
        self.map_times(|t| t.saturating_sub(t0_rig_us))
    }

    /// The inverse of [`TrialRecord::to_session_time`]: session times back
    /// on the rig clock.
    pub fn to_rig_time(&self, t0_rig_us: u64) -> TrialRecord {
        self.map_times(|t| t.saturating_add(t0_rig_us))
    }

    fn map_times(&self, f: impl Fn(u64) -> u64) -> TrialRecord {
        TrialRecord {
            t_start_us: f(self.t_start_us),
            t_cue_us: f(self.t_cue_us),
            t_response_us: self.t_response_us.map(&f),
            t_reward_us: self.t_reward_us.map(&f),
            ..self.clone()
        }
    }
}
