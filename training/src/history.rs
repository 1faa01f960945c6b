//! A mouse's training history, read from its session folders: each
//! folder's `session.toml` (start, rig, the `[training]` record) and
//! `summary.json` (or, for a folder without one, its `trials.tsv`). Nothing
//! is kept anywhere else, so a crash cannot corrupt it and every rig sharing
//! the data root sees the same history.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::stages::SessionMeasures;
use crate::zone::LabZone;

/// The `[training]` table of `session.toml`: what the session was in the
/// mouse's training.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainingRecord {
    /// The protocol's `name`, its file and the file's SHA-256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_sha256: Option<String>,
    /// The stage the session ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// Its index in the protocol, from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_number: Option<u32>,
    /// Why this stage (the rule's verdict, or the override's reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_why: Option<String>,
    /// The stage the rules chose, when `--stage` overrode it, and who did
    /// it and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_overridden_from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_override_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_override_reason: Option<String>,
    /// Training day: 1 on the mouse's first lab-local day with a session,
    /// +1 for each later day with one.
    pub day: u32,
    /// The lab-local date of the start (`YYYY-MM-DD`) and the zone.
    pub local_date: String,
    pub timezone: String,
    /// The weight given at the start, g, and the share of the baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_g: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_pct_of_baseline: Option<f64>,
}

/// One session of the mouse, as the history and the stage rules see it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    pub dir: PathBuf,
    /// `session.toml`'s `start_utc`.
    pub start_utc: String,
    /// The lab-local date of the start.
    pub local_date: String,
    pub rig: String,
    /// `complete`, `recovered` or `running`.
    pub state: String,
    pub training: Option<TrainingRecord>,
    pub trials: u64,
    pub rewards: u64,
    pub success_rate: Option<f64>,
    pub reaction_time_median_s: Option<f64>,
    pub cue_to_reward_median_s: Option<f64>,
    pub trajectory_corr_median: Option<f64>,
    pub water_ul: f64,
    /// Where the numbers came from: `summary`, `recovery` or `trials.tsv`.
    pub source: String,
}

impl SessionRow {
    /// What the stage rules look at.
    pub fn measures(&self) -> SessionMeasures {
        SessionMeasures {
            trials: self.trials,
            success_rate: self.success_rate,
            reaction_time_median_s: self.reaction_time_median_s,
            trajectory_corr_median: self.trajectory_corr_median,
        }
    }

    pub fn stage(&self) -> Option<&str> {
        self.training.as_ref().and_then(|t| t.stage.as_deref())
    }
}

#[derive(Debug, Deserialize)]
struct MetaView {
    start_utc: String,
    #[serde(default)]
    rig: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    training: Option<TrainingRecord>,
}

/// A folder that could not be read as a session (listed, never silently
/// dropped).
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    pub dir: PathBuf,
    pub reason: String,
}

/// Every session of `mouse`, oldest first (by `start_utc`), and the folders
/// that are not readable sessions.
pub fn read_sessions(
    data_root: &Path,
    mouse: &str,
    zone: &LabZone,
) -> (Vec<SessionRow>, Vec<Skipped>) {
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    let Ok(entries) = std::fs::read_dir(data_root.join(mouse)) else {
        return (rows, skipped);
    };
    for e in entries.flatten() {
        let dir = e.path();
        if !dir.is_dir() {
            continue;
        }
        match read_row(&dir, zone) {
            Ok(r) => rows.push(r),
            Err(reason) => skipped.push(Skipped { dir, reason }),
        }
    }
    rows.sort_by(|a, b| a.start_utc.cmp(&b.start_utc).then(a.dir.cmp(&b.dir)));
    (rows, skipped)
}

fn read_row(dir: &Path, zone: &LabZone) -> Result<SessionRow, String> {
    let meta_path = dir.join("session.toml");
    let text = std::fs::read_to_string(&meta_path).map_err(|e| format!("no session.toml: {e}"))?;
    let meta: MetaView =
        toml::from_str(&text).map_err(|e| format!("session.toml: {}", e.message().trim_end()))?;
    let local_date = zone.local_date_of_rfc3339(&meta.start_utc).ok_or_else(|| {
        format!(
            "session.toml: start_utc = {:?} is not a time",
            meta.start_utc
        )
    })?;
    let mut row = SessionRow {
        dir: dir.to_owned(),
        start_utc: meta.start_utc,
        local_date,
        rig: meta.rig,
        state: meta.state,
        training: meta.training,
        trials: 0,
        rewards: 0,
        success_rate: None,
        reaction_time_median_s: None,
        cue_to_reward_median_s: None,
        trajectory_corr_median: None,
        water_ul: 0.0,
        source: String::new(),
    };
    let summary = std::fs::read_to_string(dir.join("summary.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    match summary {
        Some(s) => {
            let f = |k: &str| s.get(k).and_then(serde_json::Value::as_f64);
            row.trials = s
                .get("trials")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            row.rewards = s
                .get("rewards")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            row.success_rate = f("success_rate");
            row.reaction_time_median_s = f("reaction_time_median_s");
            row.cue_to_reward_median_s = f("cue_to_reward_median_s");
            row.trajectory_corr_median = f("trajectory_corr_median");
            row.water_ul = f("water_ul").unwrap_or(0.0);
            row.source = s
                .get("source")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("summary")
                .to_owned();
        }
        None => {
            let (trials, rewards, water) = count_trials(&dir.join("trials.tsv"));
            row.trials = trials;
            row.rewards = rewards;
            row.water_ul = water;
            row.success_rate = (trials > 0).then(|| rewards as f64 / trials as f64);
            row.source = "trials.tsv".into();
        }
    }
    Ok(row)
}

/// Trials, rewarded trials and water from a `trials.tsv` (a session with no
/// summary yet: running elsewhere, or a crash not yet recovered).
fn count_trials(path: &Path) -> (u64, u64, f64) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return (0, 0, 0.0);
    };
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return (0, 0, 0.0);
    };
    let col = |name: &str| header.split('\t').position(|c| c == name);
    let (Some(outcome), reward) = (col("outcome"), col("reward_ul")) else {
        return (0, 0, 0.0);
    };
    let (mut trials, mut rewards, mut water) = (0, 0, 0.0);
    for l in lines {
        let cells: Vec<&str> = l.split('\t').collect();
        let Some(o) = cells.get(outcome) else {
            continue;
        };
        trials += 1;
        if *o == "rewarded" {
            rewards += 1;
        }
        if let Some(ul) = reward
            .and_then(|c| cells.get(c))
            .and_then(|v| v.parse::<f64>().ok())
        {
            if ul.is_finite() && ul >= 0.0 {
                water += ul;
            }
        }
    }
    (trials, rewards, water)
}

/// The training day a session on `local_date` has: 1 + the number of
/// distinct earlier local dates with a session.
pub fn training_day(rows: &[SessionRow], local_date: &str) -> u32 {
    let mut days: Vec<&str> = rows
        .iter()
        .map(|r| r.local_date.as_str())
        .filter(|d| *d < local_date)
        .collect();
    days.sort_unstable();
    days.dedup();
    days.len() as u32 + 1
}

/// Task water per lab-local date, µL.
pub fn task_water_by_day(rows: &[SessionRow]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for r in rows {
        *out.entry(r.local_date.clone()).or_insert(0.0) += r.water_ul;
    }
    out
}

/// The sessions the stage rules look at: those that ran a stage of the
/// protocol called `protocol_name`, oldest first, with their stage and
/// numbers.
pub fn past_on_protocol(
    rows: &[SessionRow],
    protocol_name: &str,
) -> Vec<(String, SessionMeasures)> {
    rows.iter()
        .filter(|r| {
            r.training
                .as_ref()
                .and_then(|t| t.protocol.as_deref())
                .is_some_and(|p| p == protocol_name)
        })
        .filter_map(|r| Some((r.stage()?.to_owned(), r.measures())))
        .collect()
}
