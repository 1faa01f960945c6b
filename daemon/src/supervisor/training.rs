//! A start's place in the mouse's training (`[training]`, docs/training.md):
//! the mouse's record, its weight against the welfare rule, the stage the
//! protocol's rules choose from its session folders (or `--stage`), the
//! training day. Read from the data root at each start: nothing is kept in
//! rigd between sessions, so a crash or another rig changes nothing.

use std::path::Path;
use std::time::SystemTime;

use protocol::control::{StartRequest, TaskOverrides};
use rig_config::{LowWeightAction, RigConfig};
use training::{LabZone, Protocol, TrainingRecord};

use crate::session::StartError;

/// What the training adds to a start.
#[derive(Debug, Clone)]
pub(super) struct TrainingStart {
    /// The request's task overrides on top of the stage's settings.
    pub task: Option<TaskOverrides>,
    /// `session.toml`'s `[training]`.
    pub record: TrainingRecord,
    /// Said in the answer and the log (a low weight under `low_weight = "warn"`).
    pub warnings: Vec<String>,
}

/// Decide the training side of a start. `now` is the start's wall time.
pub(super) fn prepare(
    cfg: &RigConfig,
    req: &StartRequest,
    zone: &LabZone,
    now: SystemTime,
) -> Result<TrainingStart, StartError> {
    let root = Path::new(&cfg.storage.data_root);
    let local_date = zone.local_date(now);
    let (rows, _) = training::read_sessions(root, &req.mouse, zone);
    let mut record = TrainingRecord {
        day: training::training_day(&rows, &local_date),
        local_date,
        timezone: zone.name().to_owned(),
        weight_g: req.weight_g,
        ..TrainingRecord::default()
    };
    let mut warnings = Vec::new();
    let Some(t) = &cfg.training else {
        if req.stage.is_some() {
            return Err(StartError::Training(format!(
                "--stage {:?}: this rig has no [training] protocol to take stages from (set \
                 [training].protocol in its configuration)",
                req.stage.as_deref().unwrap_or_default()
            )));
        }
        return Ok(TrainingStart {
            task: req.task.clone(),
            record,
            warnings,
        });
    };
    let subject = match training::subject::read(root, &req.mouse) {
        Ok(s) => Some(s),
        Err(training::SubjectError::Unknown { .. }) if !t.require_subject => None,
        Err(e @ training::SubjectError::Unknown { .. }) => {
            return Err(StartError::UnknownMouse(e.to_string()))
        }
        Err(e) => return Err(StartError::Training(e.to_string())),
    };
    match (req.weight_g, &subject) {
        (None, _) if t.require_weight => {
            return Err(StartError::Welfare(format!(
                "{}: no weight given, and [training].require_weight is on: weigh the mouse and \
                 start with --weight-g GRAMS",
                req.mouse
            )))
        }
        (Some(w), Some(s)) => {
            let pct = 100.0 * w / s.baseline_weight_g;
            record.weight_pct_of_baseline = Some((pct * 10.0).round() / 10.0);
            if pct < t.min_weight_pct {
                let msg = format!(
                    "{} weighs {w:.1} g, {pct:.1} % of its baseline {:.1} g, below the welfare \
                     threshold [training].min_weight_pct = {} %",
                    req.mouse, s.baseline_weight_g, t.min_weight_pct
                );
                match t.low_weight {
                    LowWeightAction::Refuse => {
                        return Err(StartError::Welfare(format!(
                            "{msg}: no session today; give water by hand and tell the \
                             veterinarian (or set low_weight = \"warn\")"
                        )))
                    }
                    LowWeightAction::Warn => warnings.push(msg),
                }
            }
        }
        _ => {}
    }
    let Some(path) = &t.protocol else {
        if req.stage.is_some() {
            return Err(StartError::Training(
                "--stage: [training].protocol is not set, so there are no stages".into(),
            ));
        }
        return Ok(TrainingStart {
            task: req.task.clone(),
            record,
            warnings,
        });
    };
    let protocol = Protocol::load(path).map_err(|e| StartError::Training(e.to_string()))?;
    let past: Vec<(String, training::SessionMeasures)> = rows
        .iter()
        .filter(|r| {
            r.training
                .as_ref()
                .and_then(|t| t.protocol.as_deref())
                .is_some_and(|p| p == protocol.file.name)
        })
        .filter_map(|r| Some((r.stage()?.to_owned(), r.measures())))
        .collect();
    let decided = training::decide(&protocol, &past);
    let (index, why) = match (&req.stage, decided) {
        (Some(want), decided) => {
            let Some((i, _)) = protocol.stage(want) else {
                return Err(StartError::Training(format!(
                    "--stage {want:?}: {} has no such stage (its stages: {})",
                    protocol.path.display(),
                    protocol.stage_names()
                )));
            };
            record.stage_overridden_from = decided.ok().map(|d| d.name);
            record.stage_override_by =
                Some(req.operator.clone().unwrap_or_else(|| "unknown".into()));
            record.stage_override_reason = req.stage_reason.clone();
            (
                i,
                format!(
                    "set by {}: {}",
                    record.stage_override_by.as_deref().unwrap_or("unknown"),
                    req.stage_reason.as_deref().unwrap_or("")
                ),
            )
        }
        (None, Ok(d)) => (d.index, d.why),
        (None, Err(e)) => return Err(StartError::Training(format!("{}: {e}", req.mouse))),
    };
    let stage = &protocol.file.stages[index];
    record.protocol = Some(protocol.file.name.clone());
    record.protocol_file = Some(protocol.path.display().to_string());
    record.protocol_sha256 = Some(protocol.sha256.clone());
    record.stage = Some(stage.name.clone());
    record.stage_number = Some(index as u32 + 1);
    record.stage_why = Some(why);
    Ok(TrainingStart {
        task: Some(merge(&stage.task, req.task.as_ref())),
        record,
        warnings,
    })
}

/// The stage's settings with the request's own overrides on top.
fn merge(stage: &TaskOverrides, request: Option<&TaskOverrides>) -> TaskOverrides {
    let Some(r) = request else {
        return stage.clone();
    };
    TaskOverrides {
        response_window_ms: r.response_window_ms.or(stage.response_window_ms),
        threshold_mm: r.threshold_mm.or(stage.threshold_mm),
        reward_ul: r.reward_ul.or(stage.reward_ul),
        iti_min_ms: r.iti_min_ms.or(stage.iti_min_ms),
        iti_max_ms: r.iti_max_ms.or(stage.iti_max_ms),
        quiescence_ms: r.quiescence_ms.or(stage.quiescence_ms),
        max_trials: r.max_trials.or(stage.max_trials),
        max_rewards: r.max_rewards.or(stage.max_rewards),
        sated_after_min: r.sated_after_min.or(stage.sated_after_min),
        max_duration_min: r.max_duration_min.or(stage.max_duration_min),
    }
}

/// The record as `session.toml`'s `[training]` table.
pub(super) fn record_table(record: &TrainingRecord) -> Option<toml::Table> {
    match toml::Value::try_from(record) {
        Ok(toml::Value::Table(t)) => Some(t),
        _ => None,
    }
}
