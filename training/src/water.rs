//! The water ledger per mouse per lab-local day: the task's water (from the
//! session folders), water given by hand (`<data_root>/<mouse>/water.tsv`,
//! appended by `rigctl water`), and the supplement still owed against
//! `[safety].daily_water_target_ul`.
//!
//! `water.tsv` is append-only: one line per gift, written with one `write`
//! and fsynced; a line cut short by a crash has no newline and is ignored.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::history::SessionRow;
use crate::zone::LabZone;

/// The hand-water file in the mouse's folder.
pub const WATER_FILE: &str = "water.tsv";
/// Its header.
pub const WATER_HEADER: &str = "utc\tlocal_date\tul\tkind\tby\tnote";
/// The most one hand gift can plausibly be, µL.
pub const MAX_GIFT_UL: f64 = 5_000.0;

/// One gift of water by hand.
#[derive(Debug, Clone, PartialEq)]
pub struct Gift {
    pub utc: String,
    pub local_date: String,
    pub ul: f64,
    /// `supplement` (to reach the day's target) or `pulse` (manual valve
    /// pulses given to this mouse).
    pub kind: String,
    pub by: String,
    pub note: String,
}

fn clean(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
}

/// Append a gift. The mouse's folder must exist (its record was added).
pub fn give(
    data_root: &Path,
    mouse: &str,
    zone: &LabZone,
    ul: f64,
    kind: &str,
    by: &str,
    note: &str,
) -> Result<Gift, String> {
    protocol::control::validate_mouse_id(mouse).map_err(|e| e.to_string())?;
    if !(ul.is_finite() && ul > 0.0 && ul <= MAX_GIFT_UL) {
        return Err(format!(
            "--ul {ul}: must be the water given, µL, > 0 and <= {MAX_GIFT_UL}"
        ));
    }
    if !["supplement", "pulse"].contains(&kind) {
        return Err(format!("--kind {kind:?}: must be supplement or pulse"));
    }
    let dir = data_root.join(mouse);
    if !dir.is_dir() {
        return Err(format!(
            "no folder for mouse {mouse} in {}: add it with `rigctl mouse add {mouse} ...`",
            data_root.display()
        ));
    }
    // Never written through a link (the rule of the session folders).
    session_format::plain_folder(&dir).map_err(|e| e.to_string())?;
    let now = SystemTime::now();
    let gift = Gift {
        utc: session_format::rfc3339_utc(now),
        local_date: zone.local_date(now),
        ul,
        kind: kind.to_owned(),
        by: clean(by),
        note: clean(note),
    };
    let path = dir.join(WATER_FILE);
    let new = !path.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut line = String::new();
    if new {
        line.push_str(WATER_HEADER);
        line.push('\n');
    }
    line.push_str(&format!(
        "{}\t{}\t{:.1}\t{}\t{}\t{}\n",
        gift.utc, gift.local_date, gift.ul, gift.kind, gift.by, gift.note
    ));
    f.write_all(line.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    if new {
        let _ = crate::fsio::sync_dir(&dir);
    }
    Ok(gift)
}

/// Every gift recorded for the mouse (lines that do not parse are skipped
/// and counted).
pub fn gifts(data_root: &Path, mouse: &str) -> (Vec<Gift>, usize) {
    let path: PathBuf = data_root.join(mouse).join(WATER_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return (Vec::new(), 0);
    };
    let mut out = Vec::new();
    let mut bad = 0;
    // A last line without its newline was cut by a crash: not recorded.
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    for line in complete.lines().skip(1) {
        let c: Vec<&str> = line.split('\t').collect();
        let ul = c.get(2).and_then(|v| v.parse::<f64>().ok());
        match (c.len() >= 6, ul) {
            (true, Some(ul)) if ul.is_finite() && ul > 0.0 && ul <= MAX_GIFT_UL => out.push(Gift {
                utc: c[0].to_owned(),
                local_date: c[1].to_owned(),
                ul,
                kind: c[3].to_owned(),
                by: c[4].to_owned(),
                note: c[5].to_owned(),
            }),
            _ => bad += 1,
        }
    }
    (out, bad)
}

/// Water given by hand on a local day, µL.
pub fn by_hand_on_day(data_root: &Path, mouse: &str, local_date: &str) -> f64 {
    gifts(data_root, mouse)
        .0
        .iter()
        .filter(|g| g.local_date == local_date)
        .map(|g| g.ul)
        .sum()
}

/// One lab-local day of the ledger.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DayWater {
    pub task_ul: f64,
    pub by_hand_ul: f64,
    /// Still to give to reach the target (None: no target configured).
    pub supplement_owed_ul: Option<f64>,
}

impl DayWater {
    pub fn total_ul(&self) -> f64 {
        self.task_ul + self.by_hand_ul
    }
}

/// The ledger: every local day with a session or a gift.
pub fn ledger(
    rows: &[SessionRow],
    gifts: &[Gift],
    target_ul: Option<f64>,
) -> BTreeMap<String, DayWater> {
    let mut out: BTreeMap<String, DayWater> = BTreeMap::new();
    for r in rows {
        out.entry(r.local_date.clone()).or_default().task_ul += r.water_ul;
    }
    for g in gifts {
        out.entry(g.local_date.clone()).or_default().by_hand_ul += g.ul;
    }
    for d in out.values_mut() {
        d.supplement_owed_ul = target_ul.map(|t| (t - d.total_ul()).max(0.0));
    }
    out
}
