//! A mouse's history, read from its session folders (never kept elsewhere, so
//! a crash cannot lose it and every rig sharing the data root sees it).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{rfc3339_utc, SUMMARY_FILE, TRIALS_FILE};

/// The most water one session can plausibly have given, µL (a mouse drinks
/// about 1 mL a day; no rig's caps allow ten times that in a session).
pub const MAX_SESSION_WATER_UL: f64 = 10_000.0;
/// The most water one reward can plausibly be, µL.
pub const MAX_REWARD_UL: f64 = 1_000.0;

/// A number in an earlier session's files that cannot be a real amount of
/// water (negative, not a number, absurdly large): the day's water cannot
/// be counted, so no session may give this mouse water until it is fixed.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{}: {field} = {value} is not a plausible amount of water (0..={max} µL), so the mouse's \
     water today cannot be counted; fix or move that session folder (it may be damaged or \
     not rigd's), then start again",
    .path.display()
)]
pub struct ImplausibleWater {
    pub path: PathBuf,
    pub field: &'static str,
    pub value: String,
    pub max: f64,
}

/// Water the mouse already had today (UTC date of the session folders): each
/// folder's `summary.json` `water_ul`, or, for a folder without one (a
/// session still running on another rig, or a crash not yet recovered), the
/// sum of `trials.tsv`'s `reward_ul` column. A number that cannot be water
/// is an error, never counted as 0 or subtracted: the daily cap depends on it.
pub fn water_today_ul(data_root: &Path, mouse: &str) -> Result<f64, ImplausibleWater> {
    let today = rfc3339_utc(SystemTime::now());
    water_on_day_ul(data_root, mouse, &today[..10.min(today.len())])
}

/// Water the mouse had on `day` (`YYYY-MM-DD`, the date its session folders
/// are named with: the lab's local date when rigd names folders in the
/// lab's zone), counted as [`water_today_ul`] counts it.
pub fn water_on_day_ul(data_root: &Path, mouse: &str, day: &str) -> Result<f64, ImplausibleWater> {
    let Ok(entries) = std::fs::read_dir(data_root.join(mouse)) else {
        return Ok(0.0);
    };
    let mut total = 0.0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(day) {
            continue;
        }
        let dir = e.path();
        let summary = dir.join(SUMMARY_FILE);
        let from_summary = std::fs::read_to_string(&summary)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|v| v.get("water_ul").cloned());
        let water = match from_summary {
            Some(v) => match v.as_f64() {
                Some(w) if w.is_finite() && (0.0..=MAX_SESSION_WATER_UL).contains(&w) => w,
                _ => {
                    return Err(ImplausibleWater {
                        path: summary,
                        field: "water_ul",
                        value: v.to_string(),
                        max: MAX_SESSION_WATER_UL,
                    })
                }
            },
            None => water_from_trials(&dir.join(TRIALS_FILE))?,
        };
        total += water;
    }
    Ok(total)
}

/// Sum of the `reward_ul` column of a `trials.tsv` (0 when absent).
fn water_from_trials(path: &Path) -> Result<f64, ImplausibleWater> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(0.0);
    };
    let mut lines = text.lines();
    let Some(col) = lines
        .next()
        .and_then(|h| h.split('\t').position(|c| c == "reward_ul"))
    else {
        tracing::warn!(
            "{}: no reward_ul column; its water is not counted",
            path.display()
        );
        return Ok(0.0);
    };
    let mut total = 0.0;
    // A row cut short by a crash has no number: nothing was recorded as
    // given there. A number that cannot be a reward is refused.
    for v in lines.filter_map(|l| l.split('\t').nth(col)) {
        let Ok(ul) = v.parse::<f64>() else { continue };
        if !(ul.is_finite() && (0.0..=MAX_REWARD_UL).contains(&ul)) {
            return Err(ImplausibleWater {
                path: path.to_owned(),
                field: "reward_ul",
                value: v.to_owned(),
                max: MAX_REWARD_UL,
            });
        }
        total += ul;
    }
    Ok(total)
}

#[cfg(test)]
mod water_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_days_water_counts_summaries_and_unfinished_sessions() {
        let root = std::env::temp_dir().join(format!("rigd-water-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let today = rfc3339_utc(SystemTime::now());
        let day = &today[..10];
        let mk = |name: &str| {
            let d = root.join("M1").join(name);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let a = mk(&format!("{day}_080000"));
        std::fs::write(a.join("summary.json"), r#"{"water_ul": 400.0}"#).unwrap();
        let b = mk(&format!("{day}_120000"));
        std::fs::write(
            b.join("trials.tsv"),
            "trial\toutcome\treward_ul\n1\trewarded\t4.0\n2\tmiss\t0\n3\trewarded\t4.5\n",
        )
        .unwrap();
        let old = mk("1999-01-01_080000");
        std::fs::write(old.join("summary.json"), r#"{"water_ul": 999.0}"#).unwrap();
        let w = water_today_ul(&root, "M1").unwrap();
        assert!((w - 408.5).abs() < 1e-9, "{w}");
        assert_eq!(water_today_ul(&root, "M2").unwrap(), 0.0);
        // A record that would lower the day's count (or is not a number) is
        // refused, never counted.
        for bad in ["-1e9", "\"lots\"", "1e12"] {
            std::fs::write(a.join("summary.json"), format!("{{\"water_ul\": {bad}}}")).unwrap();
            let e = water_today_ul(&root, "M1").unwrap_err();
            assert_eq!(e.field, "water_ul");
            assert!(e.to_string().contains("fix or move"), "{e}");
        }
        std::fs::write(a.join("summary.json"), r#"{"water_ul": 400.0}"#).unwrap();
        std::fs::write(
            b.join("trials.tsv"),
            "trial\toutcome\treward_ul\n1\trewarded\t-4000\n",
        )
        .unwrap();
        assert_eq!(water_today_ul(&root, "M1").unwrap_err().field, "reward_ul");
        let _ = std::fs::remove_dir_all(&root);
    }
}
