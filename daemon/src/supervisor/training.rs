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
    let past = training::history::past_on_protocol(&rows, &protocol.file.name);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rig_config::TrainingSection;

    fn setup(name: &str) -> (std::path::PathBuf, RigConfig) {
        let root =
            std::env::temp_dir().join(format!("rigd-sv-training-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let mut cfg = RigConfig::default();
        cfg.storage.data_root = root.clone();
        cfg.training = Some(TrainingSection::default());
        (root, cfg)
    }

    fn req(mouse: &str) -> StartRequest {
        StartRequest {
            mouse: mouse.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_mouse_record_and_the_welfare_rule_decide_a_start() {
        let (root, mut cfg) = setup("welfare");
        let zone = LabZone::utc();
        let now = SystemTime::now();
        // Unknown mouse: refused with the command that adds it.
        let e = prepare(&cfg, &req("M1"), &zone, now).unwrap_err();
        assert!(matches!(e, StartError::UnknownMouse(_)));
        assert!(e.to_string().contains("rigctl mouse add M1"), "{e}");
        training::subject::write(&root, &training::subject::demo_subject("M1"), true, None)
            .unwrap();
        // 18 g of a 24 g baseline is 75 %: refused by default.
        let heavy = StartRequest {
            weight_g: Some(18.0),
            ..req("M1")
        };
        let e = prepare(&cfg, &heavy, &zone, now).unwrap_err();
        assert!(matches!(e, StartError::Welfare(_)), "{e}");
        assert!(e.to_string().contains("75.0 %"), "{e}");
        // Warn instead: the start goes on, with the warning and the weight.
        cfg.training.as_mut().unwrap().low_weight = LowWeightAction::Warn;
        let t = prepare(&cfg, &heavy, &zone, now).unwrap();
        assert_eq!(t.warnings.len(), 1);
        assert_eq!(t.record.weight_g, Some(18.0));
        assert_eq!(t.record.weight_pct_of_baseline, Some(75.0));
        assert_eq!(t.record.day, 1);
        // A weight required and not given.
        cfg.training.as_mut().unwrap().require_weight = true;
        assert!(matches!(
            prepare(&cfg, &req("M1"), &zone, now).unwrap_err(),
            StartError::Welfare(_)
        ));
        // Without [training], any mouse and no stage.
        cfg.training = None;
        let t = prepare(&cfg, &req("M2"), &zone, now).unwrap();
        assert!(t.record.stage.is_none());
        let staged = StartRequest {
            stage: Some("s1".into()),
            stage_reason: Some("why".into()),
            ..req("M2")
        };
        assert!(matches!(
            prepare(&cfg, &staged, &zone, now).unwrap_err(),
            StartError::Training(_)
        ));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_stage_comes_from_the_protocol_and_the_request_overrides_on_top() {
        let (root, mut cfg) = setup("stage");
        let protocol = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/protocol.toml");
        cfg.training.as_mut().unwrap().protocol = Some(protocol);
        training::subject::write(&root, &training::subject::demo_subject("M1"), true, None)
            .unwrap();
        let zone = LabZone::new("America/Los_Angeles").unwrap();
        let now = SystemTime::now();
        let r = StartRequest {
            task: Some(TaskOverrides {
                reward_ul: Some(3.0),
                ..Default::default()
            }),
            ..req("M1")
        };
        let t = prepare(&cfg, &r, &zone, now).unwrap();
        assert_eq!(t.record.stage.as_deref(), Some("s1-shaping"));
        assert_eq!(t.record.stage_number, Some(1));
        assert_eq!(t.record.protocol_sha256.as_ref().map(String::len), Some(64));
        assert_eq!(t.record.timezone, "America/Los_Angeles");
        let task = t.task.unwrap();
        assert_eq!(task.threshold_mm, Some(0.8), "the stage's");
        assert_eq!(task.reward_ul, Some(3.0), "the request's wins");
        // --stage: a stage the protocol has, recorded with who and why.
        let over = StartRequest {
            stage: Some("s3-full-task".into()),
            stage_reason: Some("imaging day".into()),
            operator: Some("jdoe".into()),
            ..req("M1")
        };
        let t = prepare(&cfg, &over, &zone, now).unwrap();
        assert_eq!(t.record.stage.as_deref(), Some("s3-full-task"));
        assert_eq!(
            t.record.stage_overridden_from.as_deref(),
            Some("s1-shaping")
        );
        assert_eq!(t.record.stage_override_by.as_deref(), Some("jdoe"));
        assert_eq!(t.task.unwrap().quiescence_ms, Some(200));
        let table = record_table(&t.record).unwrap();
        assert_eq!(table["stage_override_reason"].as_str(), Some("imaging day"));
        // One it does not have: the error lists the stages.
        let bad = StartRequest {
            stage: Some("s9".into()),
            ..over
        };
        let e = prepare(&cfg, &bad, &zone, now).unwrap_err().to_string();
        assert!(e.contains("s1-shaping, s2-threshold, s3-full-task"), "{e}");
        // A broken protocol file: the start is refused, naming it.
        let broken = root.join("broken.toml");
        std::fs::write(&broken, "name = \"x\"\n").unwrap();
        cfg.training.as_mut().unwrap().protocol = Some(broken);
        let e = prepare(&cfg, &req("M1"), &zone, now)
            .unwrap_err()
            .to_string();
        assert!(e.contains("broken.toml"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
