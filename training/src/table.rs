//! `rigctl history`: one row per session, oldest first.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::history::SessionRow;
use crate::water::DayWater;

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.digits$}"))
}

/// The table's text. `ledger` gives each row's day water (task + by hand)
/// and the supplement still owed that day.
pub fn history_table(rows: &[SessionRow], ledger: &BTreeMap<String, DayWater>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:>3} {:<16} {:>6} {:>7} {:>7} {:>7} {:>6} {:>8} {:>8} {:>8} {:>7}  {:<9} folder",
        "date",
        "day",
        "stage",
        "trials",
        "success",
        "rt_s",
        "cue_rw",
        "corr",
        "water",
        "day_ul",
        "owed_ul",
        "weight",
        "state"
    );
    for r in rows {
        let t = r.training.as_ref();
        let day = ledger.get(&r.local_date).cloned().unwrap_or_default();
        let folder = r
            .dir
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let weight = t
            .and_then(|t| t.weight_g)
            .map_or("-".to_owned(), |w| format!("{w:.1}g"));
        let _ = writeln!(
            out,
            "{:<10} {:>3} {:<16} {:>6} {:>7} {:>7} {:>7} {:>6} {:>8.1} {:>8.1} {:>8} {:>7}  {:<9} {folder}",
            r.local_date,
            t.map_or("-".to_owned(), |t| t.day.to_string()),
            r.stage().unwrap_or("-"),
            r.trials,
            r.success_rate
                .map_or("-".to_owned(), |s| format!("{:.0}%", s * 100.0)),
            opt(r.reaction_time_median_s, 3),
            opt(r.cue_to_reward_median_s, 3),
            opt(r.trajectory_corr_median, 2),
            r.water_ul,
            day.total_ul(),
            opt(day.supplement_owed_ul, 1),
            weight,
            r.state,
        );
    }
    out
}

/// The history as JSON rows (for `rigctl --json history`).
pub fn history_json(rows: &[SessionRow], ledger: &BTreeMap<String, DayWater>) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let t = r.training.as_ref();
            let day = ledger.get(&r.local_date).cloned().unwrap_or_default();
            serde_json::json!({
                "folder": r.dir.display().to_string(),
                "start_utc": r.start_utc,
                "local_date": r.local_date,
                "rig": r.rig,
                "state": r.state,
                "day": t.map(|t| t.day),
                "stage": r.stage(),
                "protocol_sha256": t.and_then(|t| t.protocol_sha256.clone()),
                "trials": r.trials,
                "rewards": r.rewards,
                "success_rate": r.success_rate,
                "reaction_time_median_s": r.reaction_time_median_s,
                "cue_to_reward_median_s": r.cue_to_reward_median_s,
                "trajectory_corr_median": r.trajectory_corr_median,
                "water_ul": r.water_ul,
                "day_task_water_ul": day.task_ul,
                "day_by_hand_ul": day.by_hand_ul,
                "day_supplement_owed_ul": day.supplement_owed_ul,
                "weight_g": t.and_then(|t| t.weight_g),
                "source": r.source,
            })
        })
        .collect();
    serde_json::Value::Array(rows)
}
