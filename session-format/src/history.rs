//! A mouse's history, read from its session folders (never kept elsewhere, so
//! a crash cannot lose it and every rig sharing the data root sees it).

use std::path::Path;
use std::time::SystemTime;

use super::{rfc3339_utc, SUMMARY_FILE, TRIALS_FILE};

/// Water the mouse already had today (UTC date of the session folders): each
/// folder's `summary.json` `water_ul`, or, for a folder without one (a
/// session still running on another rig, or a crash not yet recovered), the
/// sum of `trials.tsv`'s `reward_ul` column. Unreadable numbers are not
/// guessed as 0 silently: they are logged.
pub fn water_today_ul(data_root: &Path, mouse: &str) -> f64 {
    let today = rfc3339_utc(SystemTime::now());
    let day = &today[..10.min(today.len())];
    let Ok(entries) = std::fs::read_dir(data_root.join(mouse)) else {
        return 0.0;
    };
    let mut total = 0.0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(day) {
            continue;
        }
        let dir = e.path();
        let from_summary = std::fs::read_to_string(dir.join(SUMMARY_FILE))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|v| v["water_ul"].as_f64());
        let water = match from_summary {
            Some(w) => w,
            None => water_from_trials(&dir.join(TRIALS_FILE)),
        };
        total += water;
    }
    total
}

/// Sum of the `reward_ul` column of a `trials.tsv` (0 when absent).
fn water_from_trials(path: &Path) -> f64 {
    let Ok(text) = std::fs::read_to_string(path) else {
        return 0.0;
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
        return 0.0;
    };
    lines
        .filter_map(|l| l.split('\t').nth(col))
        .filter_map(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
        .sum()
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
        let w = water_today_ul(&root, "M1");
        assert!((w - 408.5).abs() < 1e-9, "{w}");
        assert_eq!(water_today_ul(&root, "M2"), 0.0);
        let _ = std::fs::remove_dir_all(&root);
    }
}
