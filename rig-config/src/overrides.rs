//! Per-session overrides of `[task]`: the `task` object of a control-socket
//! `start` request ([`TaskOverrides`]), applied to a configuration and checked
//! by the very rules (cross-key rules included) that check the file.

use std::fmt;

use protocol::control::TaskOverrides;

use crate::schema::{RigConfig, TaskSection};
use crate::validate::{fmt_f64, validate, Issue, KeyPath};

/// A `[task]` key that a `start` request may override: one field of
/// [`TaskOverrides`], in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TaskOverrideField {
    /// `response_window_ms`
    ResponseWindowMs,
    /// `threshold_mm`
    ThresholdMm,
    /// `reward_ul`
    RewardUl,
    /// `iti_min_ms`
    ItiMinMs,
    /// `iti_max_ms`
    ItiMaxMs,
    /// `quiescence_ms`
    QuiescenceMs,
    /// `max_trials`
    MaxTrials,
    /// `max_rewards`
    MaxRewards,
    /// `sated_after_min`
    SatedAfterMin,
    /// `max_duration_min`
    MaxDurationMin,
}

impl TaskOverrideField {
    /// The field's name in the request's `task` object, which is also its
    /// key in `[task]`: `threshold_mm`.
    pub fn name(self) -> &'static str {
        match self {
            Self::ResponseWindowMs => "response_window_ms",
            Self::ThresholdMm => "threshold_mm",
            Self::RewardUl => "reward_ul",
            Self::ItiMinMs => "iti_min_ms",
            Self::ItiMaxMs => "iti_max_ms",
            Self::QuiescenceMs => "quiescence_ms",
            Self::MaxTrials => "max_trials",
            Self::MaxRewards => "max_rewards",
            Self::SatedAfterMin => "sated_after_min",
            Self::MaxDurationMin => "max_duration_min",
        }
    }

    fn key(self) -> KeyPath {
        KeyPath::dotted("task").key(self.name())
    }
}

impl fmt::Display for TaskOverrideField {
    /// As the request spells it: `task.threshold_mm`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task.{}", self.name())
    }
}

/// One override that breaks a rule.
///
/// Displays as `task.FIELD = VALUE: RULE`, like a file problem without the
/// position; when the rule broken is another key's (a cross-key rule), as
/// `task.FIELD = VALUE: conflicts with the configured KEY = VALUE, which RULE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverrideProblem {
    /// The override that broke the rule.
    pub field: TaskOverrideField,
    /// Its value as requested, written as in `rig.toml`.
    pub value: String,
    /// When the broken rule belongs to a key the request did not override
    /// (`task.iti_min_ms` must be <= `task.iti_max_ms`, and only
    /// `iti_max_ms` was overridden): that key and its configured value.
    pub conflicts_with: Option<(String, String)>,
    /// The rule and how to fix it, word for word as `rigd check-config`
    /// says it for the file.
    pub rule: String,
}

impl fmt::Display for OverrideProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: ", self.field, self.value)?;
        if let Some((key, value)) = &self.conflicts_with {
            write!(f, "conflicts with the configured {key} = {value}, which ")?;
        }
        f.write_str(&self.rule)
    }
}

/// Why [`RigConfig::with_task_overrides`] refused a session's overrides.
/// Displays as `task overrides rejected: ` and every problem, separated by
/// `; `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task overrides rejected: {}", display_problems(problems))]
pub struct OverrideError {
    /// Every broken rule, in the order of the request's fields (at least
    /// one).
    pub problems: Vec<OverrideProblem>,
}

fn display_problems(problems: &[OverrideProblem]) -> String {
    let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
    all.join("; ")
}

impl RigConfig {
    /// This configuration with a session's `[task]` overrides applied. Each
    /// override replaces its key and nothing else, and is checked by the
    /// rules that check the file, cross-key rules included
    /// (`task.threshold_mm` against `rig.lever_travel_mm`, `task.reward_ul`
    /// against the valve calibration and `safety.max_valve_open_ms`,
    /// `task.iti_min_ms` against `task.iti_max_ms`).
    ///
    /// Only what the overrides break is reported: a rule `self` already
    /// broke on a key that is not overridden is not the request's fault
    /// (and a configuration from [`crate::load`] or [`crate::parse_str`]
    /// breaks none), so if `self` is valid, so is the result.
    pub fn with_task_overrides(&self, overrides: &TaskOverrides) -> Result<Self, OverrideError> {
        let mut merged = self.clone();
        let set = apply(overrides, &mut merged.task);
        let issues = validate(&merged);
        if issues.is_empty() {
            return Ok(merged);
        }
        let before = validate(self);
        let overridden = |key: &KeyPath| set.iter().find(|(field, _)| field.key() == *key);
        let mut problems: Vec<OverrideProblem> = issues
            .into_iter()
            .filter(|issue| overridden(&issue.key).is_some() || !before.contains(issue))
            .filter_map(|issue| {
                let Issue {
                    key,
                    value,
                    rule,
                    also,
                } = issue;
                if let Some((field, requested)) = overridden(&key) {
                    return Some(OverrideProblem {
                        field: *field,
                        value: requested.clone(),
                        conflicts_with: None,
                        rule,
                    });
                }
                // A rule of a key that is not overridden broke, so an
                // override it reads broke it (`also` names those). If a rule
                // forgot to say what it reads, blame the first override
                // rather than hide the problem. `set` is not empty here:
                // without overrides `merged` is `self`, and every issue
                // would be in `before`.
                let (field, requested) = also.iter().find_map(overridden).or(set.first())?;
                Some(OverrideProblem {
                    field: *field,
                    value: requested.clone(),
                    conflicts_with: Some((key.to_string(), value)),
                    rule,
                })
            })
            .collect();
        if problems.is_empty() {
            return Ok(merged);
        }
        problems.sort_by_key(|p| p.field);
        Err(OverrideError { problems })
    }
}

/// Writes every override into `task`; returns the fields set, each with its
/// requested value written as in `rig.toml`, in the request's field order.
fn apply(overrides: &TaskOverrides, task: &mut TaskSection) -> Set {
    use TaskOverrideField as F;
    // Destructured in full, so a new override field does not compile until
    // it is applied here.
    let TaskOverrides {
        response_window_ms,
        threshold_mm,
        reward_ul,
        iti_min_ms,
        iti_max_ms,
        quiescence_ms,
        max_trials,
        max_rewards,
        sated_after_min,
        max_duration_min,
    } = *overrides;
    let mut set = Vec::new();
    let s = &mut set;
    put(
        s,
        F::ResponseWindowMs,
        response_window_ms,
        &mut task.response_window_ms,
    );
    put_f64(s, F::ThresholdMm, threshold_mm, &mut task.threshold_mm);
    put_f64(s, F::RewardUl, reward_ul, &mut task.reward_ul);
    put(s, F::ItiMinMs, iti_min_ms, &mut task.iti_min_ms);
    put(s, F::ItiMaxMs, iti_max_ms, &mut task.iti_max_ms);
    put(s, F::QuiescenceMs, quiescence_ms, &mut task.quiescence_ms);
    put_limit(s, F::MaxTrials, max_trials, &mut task.max_trials);
    put_limit(s, F::MaxRewards, max_rewards, &mut task.max_rewards);
    put_limit(
        s,
        F::SatedAfterMin,
        sated_after_min,
        &mut task.sated_after_min,
    );
    put_limit(
        s,
        F::MaxDurationMin,
        max_duration_min,
        &mut task.max_duration_min,
    );
    set
}

type Set = Vec<(TaskOverrideField, String)>;

fn put(set: &mut Set, field: TaskOverrideField, requested: Option<u32>, slot: &mut u32) {
    if let Some(v) = requested {
        *slot = v;
        set.push((field, v.to_string()));
    }
}

fn put_f64(set: &mut Set, field: TaskOverrideField, requested: Option<f64>, slot: &mut f64) {
    if let Some(v) = requested {
        *slot = v;
        set.push((field, fmt_f64(v)));
    }
}

/// A limit that is absent in the file becomes set; an override cannot
/// remove a configured limit.
fn put_limit(
    set: &mut Set,
    field: TaskOverrideField,
    requested: Option<u32>,
    slot: &mut Option<u32>,
) {
    if let Some(v) = requested {
        *slot = Some(v);
        set.push((field, v.to_string()));
    }
}

#[cfg(test)]
mod tests;
