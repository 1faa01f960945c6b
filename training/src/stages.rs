//! A training protocol: named stages, each a set of task settings (the
//! `start` request's task overrides), with graduation and optional
//! regression rules over the mouse's sessions. The format is
//! `docs/training.md`'s; `docs/examples/protocol.toml` is an example.

use std::path::{Path, PathBuf};

use protocol::control::TaskOverrides;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Most sessions a criterion may look back over.
pub const MAX_CRITERION_SESSIONS: u32 = 30;

/// The protocol file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolFile {
    /// The protocol's name, recorded in every session.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The stages in training order: a new mouse starts at the first.
    #[serde(rename = "stage")]
    pub stages: Vec<Stage>,
}

/// One stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// `[A-Za-z0-9_-]{1,64}`, unique in the protocol.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The task settings of this stage (keys of `[task]` a start may
    /// override); the rest comes from the rig's configuration.
    #[serde(default)]
    pub task: TaskOverrides,
    /// When the mouse moves on to the next stage (absent on the last stage).
    #[serde(default)]
    pub advance: Option<Criterion>,
    /// When the mouse goes back to the previous stage (optional; never on
    /// the first stage).
    #[serde(default)]
    pub regress: Option<Criterion>,
}

/// A rule over the mouse's last `sessions` sessions at the stage: it holds
/// when every one of them meets every bound given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Criterion {
    /// How many consecutive sessions at this stage must meet the bounds
    /// (the last `sessions` of them), >= 1.
    pub sessions: u32,
    /// At least this many trials in each.
    #[serde(default)]
    pub min_trials: Option<u32>,
    /// At most this many trials in each (a regression rule: the mouse stopped
    /// working).
    #[serde(default)]
    pub max_trials: Option<u32>,
    /// Success rate (rewarded / trials) at least this, 0..=1.
    #[serde(default)]
    pub min_success: Option<f64>,
    /// Success rate at most this, 0..=1 (a regression rule).
    #[serde(default)]
    pub max_success: Option<f64>,
    /// Median reaction time (cue to threshold crossing) at most this, s.
    #[serde(default)]
    pub max_reaction_time_s: Option<f64>,
    /// Median trajectory correlation at least this, -1..=1.
    #[serde(default)]
    pub min_trajectory_corr: Option<f64>,
}

/// The numbers of one past session a criterion looks at.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SessionMeasures {
    pub trials: u64,
    pub success_rate: Option<f64>,
    pub reaction_time_median_s: Option<f64>,
    pub trajectory_corr_median: Option<f64>,
}

impl Criterion {
    /// Whether one session meets every bound; when not, the first bound it
    /// misses, in words.
    pub fn check(&self, m: &SessionMeasures) -> Result<(), String> {
        if let Some(n) = self.min_trials {
            if m.trials < u64::from(n) {
                return Err(format!("{} trials < min_trials {n}", m.trials));
            }
        }
        if let Some(n) = self.max_trials {
            if m.trials > u64::from(n) {
                return Err(format!("{} trials > max_trials {n}", m.trials));
            }
        }
        let bound = |v: Option<f64>, what: &str| v.ok_or_else(|| format!("no {what}"));
        if let Some(x) = self.min_success {
            let s = bound(m.success_rate, "success rate")?;
            if s < x {
                return Err(format!("success {s:.2} < min_success {x}"));
            }
        }
        if let Some(x) = self.max_success {
            let s = bound(m.success_rate, "success rate")?;
            if s > x {
                return Err(format!("success {s:.2} > max_success {x}"));
            }
        }
        if let Some(x) = self.max_reaction_time_s {
            let r = bound(m.reaction_time_median_s, "reaction time")?;
            if r > x {
                return Err(format!("reaction time {r:.3} s > max_reaction_time_s {x}"));
            }
        }
        if let Some(x) = self.min_trajectory_corr {
            let c = bound(m.trajectory_corr_median, "trajectory correlation")?;
            if c < x {
                return Err(format!(
                    "trajectory correlation {c:.2} < min_trajectory_corr {x}"
                ));
            }
        }
        Ok(())
    }

    /// Whether the rule holds over `recent` (the sessions at the stage, oldest
    /// first, the consecutive run ending with the latest).
    pub fn holds(&self, recent: &[SessionMeasures]) -> bool {
        let k = self.sessions as usize;
        recent.len() >= k
            && recent[recent.len() - k..]
                .iter()
                .all(|m| self.check(m).is_ok())
    }
}

/// A protocol read from its file, with the file's SHA-256.
#[derive(Debug, Clone, PartialEq)]
pub struct Protocol {
    pub path: PathBuf,
    pub file: ProtocolFile,
    /// Hex SHA-256 of the file's bytes: which version of it a session ran.
    pub sha256: String,
}

/// Why a protocol file cannot be used: names the file, the key, the value
/// and the rule.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("cannot read the training protocol {}: {source} (check [training].protocol)", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", .path.display())]
    Syntax { path: PathBuf, reason: String },
    #[error("{}: {key} = {value}: {rule}", .path.display())]
    Rule {
        path: PathBuf,
        key: String,
        value: String,
        rule: String,
    },
}

impl Protocol {
    /// Read and check a protocol file.
    pub fn load(path: &Path) -> Result<Protocol, ProtocolError> {
        let bytes = std::fs::read(path).map_err(|source| ProtocolError::Io {
            path: path.to_owned(),
            source,
        })?;
        let text = String::from_utf8(bytes.clone()).map_err(|_| ProtocolError::Syntax {
            path: path.to_owned(),
            reason: "not UTF-8 text".into(),
        })?;
        let file = Self::parse(path, &text)?;
        let sha256 = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Protocol {
            path: path.to_owned(),
            file,
            sha256,
        })
    }

    /// Parse and check a protocol's text (`path` is for the messages).
    pub fn parse(path: &Path, text: &str) -> Result<ProtocolFile, ProtocolError> {
        let file: ProtocolFile = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}: ")
                })
                .unwrap_or_default();
            ProtocolError::Syntax {
                path: path.to_owned(),
                reason: format!("{at}{}", e.message().trim_end()),
            }
        })?;
        check(path, &file)?;
        Ok(file)
    }

    /// The stage called `name`, with its index.
    pub fn stage(&self, name: &str) -> Option<(usize, &Stage)> {
        self.file
            .stages
            .iter()
            .enumerate()
            .find(|(_, s)| s.name == name)
    }

    /// The stage names, for messages.
    pub fn stage_names(&self) -> String {
        let names: Vec<&str> = self.file.stages.iter().map(|s| s.name.as_str()).collect();
        names.join(", ")
    }
}

fn check(path: &Path, p: &ProtocolFile) -> Result<(), ProtocolError> {
    let rule = |key: String, value: String, rule: &str| ProtocolError::Rule {
        path: path.to_owned(),
        key,
        value,
        rule: rule.to_owned(),
    };
    if p.name.trim().is_empty() {
        return Err(rule("name".into(), "\"\"".into(), "must name the protocol"));
    }
    if p.stages.is_empty() {
        return Err(rule(
            "stage".into(),
            "[]".into(),
            "needs at least one [[stage]] table",
        ));
    }
    let last = p.stages.len() - 1;
    for (i, s) in p.stages.iter().enumerate() {
        let at = |k: &str| format!("stage[{i}].{k}");
        if protocol::control::validate_mouse_id(&s.name).is_err() {
            return Err(rule(
                at("name"),
                format!("{:?}", s.name),
                "must be 1-64 letters, digits, `_` or `-`",
            ));
        }
        if p.stages[..i].iter().any(|o| o.name == s.name) {
            return Err(rule(
                at("name"),
                format!("{:?}", s.name),
                "is used by an earlier stage: stage names must be unique",
            ));
        }
        match (&s.advance, i == last) {
            (Some(_), true) => {
                return Err(rule(
                    at("advance"),
                    "{...}".into(),
                    "the last stage has nowhere to advance to: remove it, or add a stage after it",
                ))
            }
            (None, false) => {
                return Err(rule(
                    at("advance"),
                    "(missing)".into(),
                    "every stage but the last needs an [stage.advance] rule",
                ))
            }
            _ => {}
        }
        if s.regress.is_some() && i == 0 {
            return Err(rule(
                at("regress"),
                "{...}".into(),
                "the first stage has nowhere to go back to: remove it",
            ));
        }
        for (name, c) in [("advance", &s.advance), ("regress", &s.regress)] {
            let Some(c) = c else { continue };
            let key = |k: &str| format!("stage[{i}].{name}.{k}");
            if !(1..=MAX_CRITERION_SESSIONS).contains(&c.sessions) {
                return Err(rule(
                    key("sessions"),
                    c.sessions.to_string(),
                    &format!("must be 1..={MAX_CRITERION_SESSIONS}"),
                ));
            }
            for (k, v) in [
                ("min_success", c.min_success),
                ("max_success", c.max_success),
            ] {
                if let Some(v) = v {
                    if !(0.0..=1.0).contains(&v) {
                        return Err(rule(
                            key(k),
                            v.to_string(),
                            "must be a fraction 0..=1 (0.7, not 70)",
                        ));
                    }
                }
            }
            if let Some(v) = c.max_reaction_time_s {
                if !(v.is_finite() && v > 0.0) {
                    return Err(rule(
                        key("max_reaction_time_s"),
                        v.to_string(),
                        "must be > 0 s",
                    ));
                }
            }
            if let Some(v) = c.min_trajectory_corr {
                if !(-1.0..=1.0).contains(&v) {
                    return Err(rule(
                        key("min_trajectory_corr"),
                        v.to_string(),
                        "must be -1..=1",
                    ));
                }
            }
            if c.min_trials.is_none()
                && c.max_trials.is_none()
                && c.min_success.is_none()
                && c.max_success.is_none()
                && c.max_reaction_time_s.is_none()
                && c.min_trajectory_corr.is_none()
            {
                return Err(rule(
                    format!("stage[{i}].{name}"),
                    format!("{{ sessions = {} }}", c.sessions),
                    "needs at least one bound (min_trials, max_trials, min_success, max_success, \
                     max_reaction_time_s, min_trajectory_corr)",
                ));
            }
        }
    }
    Ok(())
}

/// Where a mouse is in the protocol, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct StageDecision {
    /// Index of the stage to run next.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// In words: `advanced from X: ...`, `stays at X: ...`, `first session`.
    pub why: String,
}

/// The stage a mouse runs next, from its past sessions at stages of this
/// protocol (oldest first: each its stage name and measures). Only the
/// latest session's stage and the run of consecutive sessions at that stage
/// ending with it matter, so the decision can be recomputed from the session
/// folders at any time, on any rig.
pub fn decide(p: &Protocol, past: &[(String, SessionMeasures)]) -> Result<StageDecision, String> {
    let Some((last_stage, _)) = past.last() else {
        let s = &p.file.stages[0];
        return Ok(StageDecision {
            index: 0,
            name: s.name.clone(),
            why: "first session on this protocol".into(),
        });
    };
    let Some((i, stage)) = p.stage(last_stage) else {
        return Err(format!(
            "the mouse's last session ran stage {last_stage:?}, which the protocol {} does not \
             have (its stages: {}): start it with --stage NAME --stage-reason \"...\" to choose \
             where it goes on",
            p.path.display(),
            p.stage_names()
        ));
    };
    let run: Vec<SessionMeasures> = past
        .iter()
        .rev()
        .take_while(|(s, _)| s == last_stage)
        .map(|(_, m)| *m)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let pick = |index: usize, why: String| StageDecision {
        index,
        name: p.file.stages[index].name.clone(),
        why,
    };
    if let Some(adv) = &stage.advance {
        if adv.holds(&run) {
            return Ok(pick(
                i + 1,
                format!(
                    "advanced from {}: its last {} session(s) met the advance rule",
                    stage.name, adv.sessions
                ),
            ));
        }
    }
    if let Some(reg) = &stage.regress {
        if i > 0 && reg.holds(&run) {
            return Ok(pick(
                i - 1,
                format!(
                    "back from {}: its last {} session(s) met the regress rule",
                    stage.name, reg.sessions
                ),
            ));
        }
    }
    let why = match &stage.advance {
        Some(adv) => {
            let missed = run
                .iter()
                .rev()
                .take(adv.sessions as usize)
                .find_map(|m| adv.check(m).err())
                .unwrap_or_else(|| {
                    format!(
                        "{} of {} session(s) at this stage so far",
                        run.len(),
                        adv.sessions
                    )
                });
            format!("stays at {}: {missed}", stage.name)
        }
        None => format!("stays at {} (the last stage)", stage.name),
    };
    Ok(pick(i, why))
}
