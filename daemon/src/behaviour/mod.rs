//! The behavioural summary of a session (`summary.json`): trial counts,
//! water, success rate, reaction time, cue-to-reward time and lever
//! trajectory stereotypy, the learning measures of Peters et al. 2014, Fig. 1.
//!
//! Pure computation over the trial records and the lever trace; no I/O. The
//! lever is parsed into movements following the lab's published method
//! ([`movement`]); the method and its constants are in `docs/behaviour.md`.

pub mod filter;
pub mod movement;

use serde::{Deserialize, Serialize};

use rig_config::RigConfig;

use crate::task::TaskParams;
use session_format::trial::{Outcome, TrialRecord};

pub use movement::{
    parse_lever, parse_resampled, resample_1khz, resample_1khz_from, LeverTrace, Movement,
    MovementParams, ParsedLever, GRID_US,
};

/// What the summary needs besides the trials and the lever.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryParams {
    /// The task's response window, µs (a reaction is a movement onset
    /// inside it).
    pub response_window_us: u64,
    /// A trial is cued if the lever was still for this long before the cue, µs.
    pub still_before_cue_us: u64,
    /// Trajectory window around the rewarded movement's onset, µs.
    pub trajectory_pre_us: u64,
    pub trajectory_post_us: u64,
    /// Trajectory bin, µs.
    pub trajectory_bin_us: u64,
    /// Fewest rewarded trajectories for a correlation.
    pub trajectory_min_trials: usize,
    /// The movement parsing.
    pub movement: MovementParams,
}

impl SummaryParams {
    /// The documented method for a task with this response window.
    pub fn new(response_window_us: u64) -> Self {
        Self {
            response_window_us,
            still_before_cue_us: 100_000,
            trajectory_pre_us: 500_000,
            trajectory_post_us: 2_000_000,
            trajectory_bin_us: 10_000,
            trajectory_min_trials: 3,
            movement: MovementParams::default(),
        }
    }

    pub fn from_task(task: &TaskParams) -> Self {
        Self::new(task.response_window_us)
    }

    /// The documented method for the configured task.
    pub fn from_config(cfg: &RigConfig) -> Self {
        Self::new(u64::from(cfg.task.response_window_ms) * 1000)
    }
}

/// How the numbers were computed, written into `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Method {
    pub description: String,
    pub resample_hz: f64,
    pub lowpass_hz: f64,
    pub envelope: String,
    /// The velocity-envelope threshold used for this session, mm/s.
    pub velocity_threshold_mm_s: f64,
    /// The position cutoff used for onsets and offsets, mm.
    pub onset_cutoff_mm: f64,
    pub widen_ms: u32,
    pub fill_gap_ms: u32,
    pub settle_ms: u32,
    pub still_before_cue_ms: f64,
    pub trajectory_window_s: [f64; 2],
    pub trajectory_bin_ms: f64,
}

/// The per-session behavioural summary (`summary.json`). Times in seconds;
/// a measure without data is `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Trials with a record.
    pub trials: u64,
    /// Rewarded trials in which water was given (not capped, not refused).
    pub rewards: u64,
    pub misses: u64,
    /// Trials cut short (link lost, or the session stopped mid-window).
    #[serde(default)]
    pub aborted: u64,
    /// Rewarded trials whose water a cap withheld.
    pub capped: u64,
    /// Water given, µL (sum of the records' `reward_ul`).
    pub water_ul: f64,
    /// Water this mouse had today (the lab's local date, `[lab].timezone`)
    /// including this session and water given by hand, µL.
    /// Filled in by the daemon (`None` from [`summarize`] alone).
    #[serde(default)]
    pub water_today_ul: Option<f64>,
    /// `safety.daily_water_target_ul`, when configured.
    #[serde(default)]
    pub daily_water_target_ul: Option<f64>,
    /// Water still to give by hand today to reach the target, µL (0 when
    /// reached); `None` without a target.
    #[serde(default)]
    pub supplement_ul: Option<f64>,
    /// Rewarded outcomes / trials that were not aborted.
    pub success_rate: Option<f64>,
    /// Median of cue -> first movement onset, over trials with an onset in
    /// the response window.
    pub reaction_time_median_s: Option<f64>,
    /// Trials that entered the reaction-time median.
    pub reaction_time_n: u64,
    /// Median of cue -> reward (valve open; the crossing when not known).
    pub cue_to_reward_median_s: Option<f64>,
    /// Median pairwise Pearson r of rewarded-movement trajectories.
    pub trajectory_corr_median: Option<f64>,
    /// Trajectories that entered the correlation.
    pub trajectory_n: u64,
    /// Presses outside the response windows (sum of `iti_presses`).
    pub iti_presses_total: u64,
    /// Fraction of trials (with lever data around the cue) in which the
    /// lever was still for the 100 ms before the cue.
    pub cued_fraction: Option<f64>,
    /// Movements parsed from the whole lever trace.
    pub movements: u64,
    /// Length of the lever trace, s.
    pub lever_duration_s: f64,
    pub method: Method,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn us_to_s(us: u64) -> f64 {
    us as f64 / 1e6
}

/// Summarise a session. Never panics, whatever the inputs (empty, short,
/// unsorted or partly missing lever data give `null` measures).
pub fn summarize(trials: &[TrialRecord], lever: &LeverTrace, params: &SummaryParams) -> Summary {
    let parsed = parse_lever(lever, &params.movement);
    summarize_parsed(trials, &parsed, params)
}

/// [`summarize`] over an already parsed lever.
pub fn summarize_parsed(
    trials: &[TrialRecord],
    parsed: &ParsedLever,
    params: &SummaryParams,
) -> Summary {
    let count = |f: &dyn Fn(&TrialRecord) -> bool| trials.iter().filter(|r| f(r)).count() as u64;
    let n_trials = trials.len() as u64;
    let rewarded = count(&|r| r.outcome == Outcome::Rewarded);
    let capped = count(&|r| r.capped);
    let rewards = count(&|r| r.outcome == Outcome::Rewarded && !r.capped && r.reward_ul > 0.0);
    let misses = count(&|r| r.outcome == Outcome::Miss);
    let aborted = count(&|r| r.outcome == Outcome::Aborted);
    let water_ul = trials.iter().map(|r| r.reward_ul).sum();
    let judged = n_trials - aborted;
    let success_rate = (judged > 0).then(|| rewarded as f64 / judged as f64);
    let iti_presses_total = trials.iter().map(|r| u64::from(r.iti_presses)).sum();

    let moves = &parsed.movements;
    let mut rts = Vec::new();
    let mut cue_to_reward = Vec::new();
    let (mut cued, mut cue_known) = (0u64, 0u64);
    for r in trials {
        // Reaction time: the first onset at or after the cue, inside the
        // window (up to the crossing for a rewarded trial).
        let end = match (r.outcome, r.t_response_us) {
            (Outcome::Rewarded, Some(t)) => t + 1,
            _ => r.t_cue_us.saturating_add(params.response_window_us),
        };
        if parsed.index_of(r.t_cue_us).is_some() {
            let k = moves.partition_point(|m| m.onset_us < r.t_cue_us);
            if let Some(m) = moves.get(k).filter(|m| m.onset_us < end) {
                rts.push(us_to_s(m.onset_us - r.t_cue_us));
            }
        }
        if r.outcome == Outcome::Rewarded && !r.capped {
            if let Some(t) = r.t_reward_us.or(r.t_response_us) {
                if t >= r.t_cue_us {
                    cue_to_reward.push(us_to_s(t - r.t_cue_us));
                }
            }
        }
        // Cued: no movement during the still window before the cue.
        let from = r.t_cue_us.saturating_sub(params.still_before_cue_us);
        if parsed.index_of(from).is_some() && parsed.index_of(r.t_cue_us).is_some() {
            cue_known += 1;
            let k = moves.partition_point(|m| m.offset_us <= from);
            let moving = moves.get(k).is_some_and(|m| m.onset_us < r.t_cue_us);
            if !moving {
                cued += 1;
            }
        }
    }
    let reaction_time_n = rts.len() as u64;

    let trajectories = rewarded_trajectories(trials, parsed, params);
    let trajectory_n = trajectories.len() as u64;
    let trajectory_corr_median = if trajectories.len() >= params.trajectory_min_trials.max(2) {
        median_pairwise_correlation(&trajectories)
    } else {
        None
    };

    let mp = &params.movement;
    Summary {
        trials: n_trials,
        rewards,
        misses,
        aborted,
        capped,
        water_ul,
        water_today_ul: None,
        daily_water_target_ul: None,
        supplement_ul: None,
        success_rate,
        reaction_time_median_s: median(rts),
        reaction_time_n,
        cue_to_reward_median_s: median(cue_to_reward),
        trajectory_corr_median,
        trajectory_n,
        iti_presses_total,
        cued_fraction: (cue_known > 0).then(|| cued as f64 / cue_known as f64),
        movements: moves.len() as u64,
        lever_duration_s: parsed.len() as f64 * GRID_US as f64 / 1e6,
        method: Method {
            description: "lever resampled to 1 kHz, 4th-order Butterworth low-pass (zero \
                          phase), velocity envelope above a noise-scaled threshold, widened \
                          and bridged, onsets/offsets refined on the position; see \
                          docs/behaviour.md"
                .to_owned(),
            resample_hz: 1e6 / GRID_US as f64,
            lowpass_hz: mp.lowpass_hz,
            envelope: format!(
                "moving maximum of |velocity| over ±{} ms",
                mp.envelope_half_width_ms
            ),
            velocity_threshold_mm_s: parsed.velocity_threshold_mm_s,
            onset_cutoff_mm: parsed.cutoff_mm,
            widen_ms: mp.widen_ms,
            fill_gap_ms: mp.fill_gap_ms,
            settle_ms: mp.settle_ms,
            still_before_cue_ms: params.still_before_cue_us as f64 / 1e3,
            trajectory_window_s: [
                -(params.trajectory_pre_us as f64) / 1e6,
                params.trajectory_post_us as f64 / 1e6,
            ],
            trajectory_bin_ms: params.trajectory_bin_us as f64 / 1e3,
        },
    }
}

/// For each rewarded trial, the filtered lever position aligned to the onset
/// of the movement that crossed the threshold, averaged in bins. Trials
/// whose window leaves the trace, or whose crossing is in no movement, are
/// left out.
pub fn rewarded_trajectories(
    trials: &[TrialRecord],
    parsed: &ParsedLever,
    params: &SummaryParams,
) -> Vec<Vec<f64>> {
    let bin = (params.trajectory_bin_us / GRID_US).max(1) as usize;
    let pre = (params.trajectory_pre_us / GRID_US) as usize;
    let post = (params.trajectory_post_us / GRID_US) as usize;
    let bins = (pre + post) / bin;
    let moves = &parsed.movements;
    let mut out = Vec::new();
    if bins == 0 {
        return out;
    }
    for r in trials {
        let (Outcome::Rewarded, Some(t_cross)) = (r.outcome, r.t_response_us) else {
            continue;
        };
        let k = moves.partition_point(|m| m.onset_us <= t_cross);
        let Some(m) = k.checked_sub(1).and_then(|k| moves.get(k)) else {
            continue;
        };
        // The crossing lies in the movement (with a little slack for the
        // refinement trimming its end).
        if t_cross >= m.offset_us + 50 * GRID_US {
            continue;
        }
        let Some(onset) = parsed.index_of(m.onset_us) else {
            continue;
        };
        let Some(start) = onset.checked_sub(pre) else {
            continue;
        };
        if start + bins * bin > parsed.len() {
            continue;
        }
        let trace = &parsed.filtered_mm[start..start + bins * bin];
        out.push(
            trace
                .chunks_exact(bin)
                .map(|c| c.iter().sum::<f64>() / bin as f64)
                .collect(),
        );
    }
    out
}

/// Median over all pairs of the Pearson correlation. Flat trajectories
/// (zero variance) have no correlation and are left out.
pub fn median_pairwise_correlation(trajectories: &[Vec<f64>]) -> Option<f64> {
    let centred: Vec<Vec<f64>> = trajectories
        .iter()
        .filter_map(|t| {
            if t.is_empty() {
                return None;
            }
            let mean = t.iter().sum::<f64>() / t.len() as f64;
            let c: Vec<f64> = t.iter().map(|v| v - mean).collect();
            let norm = c.iter().map(|v| v * v).sum::<f64>().sqrt();
            (norm > 1e-12 && norm.is_finite()).then(|| c.iter().map(|v| v / norm).collect())
        })
        .collect();
    let mut rs = Vec::with_capacity(centred.len() * centred.len().saturating_sub(1) / 2);
    for i in 0..centred.len() {
        for j in i + 1..centred.len() {
            if centred[i].len() == centred[j].len() {
                let r: f64 = centred[i].iter().zip(&centred[j]).map(|(a, b)| a * b).sum();
                rs.push(r.clamp(-1.0, 1.0));
            }
        }
    }
    median(rs)
}

#[cfg(test)]
mod tests;

impl Summary {
    /// Fill in the day's water: `before_ul` is what the mouse had today
    /// before this session; `target_ul` the configured daily target.
    pub fn set_water_today(&mut self, before_ul: f64, target_ul: Option<f64>) {
        let today = before_ul + self.water_ul;
        self.water_today_ul = Some(today);
        self.daily_water_target_ul = target_ul;
        self.supplement_ul = target_ul.map(|t| (t - today).max(0.0));
    }
}
