//! `rigctl report`: one self-contained HTML page per mouse (inline SVG, no
//! script, no external resource) with the learning curves across sessions,
//! the water per lab-local day, the history table and, per session, the
//! histogram of cue-to-threshold-crossing times from its `trials.tsv`.
//! Every number shown is the summary's (or the ledger's) as
//! `rigctl history` prints it.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::history::SessionRow;
use crate::subject::Subject;
use crate::water::DayWater;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const W: f64 = 560.0;
const H: f64 = 200.0;
const PAD_L: f64 = 48.0;
const PAD_B: f64 = 28.0;
const PAD_T: f64 = 22.0;
const PAD_R: f64 = 12.0;

/// A line chart of one measure per session (x = session number); missing
/// values leave a gap. The points carry their value in `data-value`.
fn line_chart(
    id: &str,
    title: &str,
    unit: &str,
    values: &[Option<f64>],
    fixed: Option<(f64, f64)>,
) -> String {
    let finite: Vec<f64> = values
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = fixed.unwrap_or_else(|| {
        let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if lo.is_finite() && hi > lo {
            (lo.min(0.0), hi * 1.1)
        } else if lo.is_finite() {
            (0.0, (hi * 2.0).max(1.0))
        } else {
            (0.0, 1.0)
        }
    });
    let n = values.len().max(1);
    let x = |i: usize| {
        PAD_L
            + (W - PAD_L - PAD_R)
                * if n > 1 {
                    i as f64 / (n - 1) as f64
                } else {
                    0.5
                }
    };
    let y = |v: f64| PAD_T + (H - PAD_T - PAD_B) * (1.0 - (v - lo) / (hi - lo));
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg id=\"{id}\" class=\"chart\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" \
         xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" aria-label=\"{t}\">\
         <text x=\"{PAD_L}\" y=\"14\" class=\"title\">{t} ({u})</text>\
         <line x1=\"{PAD_L}\" y1=\"{yb}\" x2=\"{xr}\" y2=\"{yb}\" class=\"axis\"/>\
         <line x1=\"{PAD_L}\" y1=\"{PAD_T}\" x2=\"{PAD_L}\" y2=\"{yb}\" class=\"axis\"/>\
         <text x=\"{lx}\" y=\"{ylo}\" class=\"tick\" text-anchor=\"end\">{lo:.2}</text>\
         <text x=\"{lx}\" y=\"{yhi}\" class=\"tick\" text-anchor=\"end\">{hi:.2}</text>",
        t = esc(title),
        u = esc(unit),
        yb = H - PAD_B,
        xr = W - PAD_R,
        lx = PAD_L - 4.0,
        ylo = H - PAD_B,
        yhi = PAD_T + 8.0,
    );
    // Session numbers on the x axis.
    for i in 0..values.len() {
        if values.len() <= 20 || i % 5 == 0 {
            let _ = write!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" class=\"tick\" text-anchor=\"middle\">{}</text>",
                x(i),
                H - PAD_B + 14.0,
                i + 1
            );
        }
    }
    let mut path = String::new();
    let mut pen_down = false;
    for (i, v) in values.iter().enumerate() {
        match v.filter(|v| v.is_finite()) {
            Some(v) => {
                let _ = write!(
                    path,
                    "{}{:.1},{:.1} ",
                    if pen_down { "L" } else { "M" },
                    x(i),
                    y(v)
                );
                pen_down = true;
            }
            None => pen_down = false,
        }
    }
    let _ = write!(s, "<path d=\"{}\" class=\"line\"/>", path.trim_end());
    for (i, v) in values.iter().enumerate() {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            let _ = write!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" class=\"pt\" data-session=\"{}\" \
                 data-value=\"{v}\"><title>session {}: {v:.3}</title></circle>",
                x(i),
                y(v),
                i + 1,
                i + 1
            );
        }
    }
    s.push_str("</svg>");
    s
}

/// Histogram of cue-to-crossing times (s) of one session's trials.
fn rt_histogram(id: &str, rts: &[f64], max_s: f64) -> String {
    const BINS: usize = 20;
    let (w, h) = (260.0, 90.0);
    let mut counts = [0u32; BINS];
    for &r in rts {
        if r.is_finite() && r >= 0.0 {
            let b = ((r / max_s) * BINS as f64) as usize;
            counts[b.min(BINS - 1)] += 1;
        }
    }
    let top = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let bw = (w - 10.0) / BINS as f64;
    let mut s = format!(
        "<svg id=\"{id}\" class=\"hist\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         xmlns=\"http://www.w3.org/2000/svg\" data-n=\"{}\">",
        rts.len()
    );
    for (i, c) in counts.iter().enumerate() {
        let bh = (h - 16.0) * f64::from(*c) / top;
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" class=\"bar\"/>",
            5.0 + i as f64 * bw,
            h - 12.0 - bh,
            bw - 1.0
        );
    }
    let _ = write!(
        s,
        "<text x=\"5\" y=\"{h}\" class=\"tick\">0</text><text x=\"{}\" y=\"{h}\" class=\"tick\" \
         text-anchor=\"end\">{max_s:.1} s</text></svg>",
        w - 5.0
    );
    s
}

/// Cue-to-crossing times of a session, s (trials with a crossing).
fn session_rts(row: &SessionRow) -> Vec<f64> {
    match session_format::read_trials(&row.dir.join("trials.tsv")) {
        Ok((trials, _)) => trials
            .iter()
            .filter_map(|t| {
                t.t_response_us
                    .map(|r| r.saturating_sub(t.t_cue_us) as f64 / 1e6)
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Seconds shown before and after each cue in the lever overlay.
const OVERLAY_BEFORE_S: f64 = 0.5;
const OVERLAY_AFTER_S: f64 = 2.0;
/// Trials drawn per session (the first ones), so a page stays small.
const OVERLAY_MAX_TRIALS: usize = 60;

/// The cue-aligned lever traces of a session's trials (lever mm minus its
/// value at the cue; rewarded trials in blue, the others grey), from its
/// `lever.npy` chunks and `trials.tsv`. None when they cannot be read.
fn lever_overlay(id: &str, row: &SessionRow) -> Option<(String, usize)> {
    let (t0, _) = session_format::read_t0_and_config(&row.dir).ok()?;
    let (trials, _) = session_format::read_trials_in_rig_time(&row.dir, t0).ok()?;
    let lever = session_format::read_lever_trace(&row.dir, t0).ok()?;
    if lever.is_empty() {
        return None;
    }
    let (w, h) = (260.0, 120.0);
    let (ymin, ymax) = (-1.0, 4.0);
    let x =
        |t: f64| 5.0 + (w - 10.0) * (t + OVERLAY_BEFORE_S) / (OVERLAY_BEFORE_S + OVERLAY_AFTER_S);
    let y = |mm: f64| 5.0 + (h - 20.0) * (1.0 - (mm.clamp(ymin, ymax) - ymin) / (ymax - ymin));
    let mut s = format!(
        "<svg id=\"{id}\" class=\"overlay\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         xmlns=\"http://www.w3.org/2000/svg\">\
         <line x1=\"{cx:.1}\" y1=\"5\" x2=\"{cx:.1}\" y2=\"{yb}\" class=\"cue\"/>",
        cx = x(0.0),
        yb = h - 15.0
    );
    let mut drawn = 0;
    for t in trials.iter().take(OVERLAY_MAX_TRIALS) {
        let cue = t.t_cue_us;
        let from = cue.saturating_sub((OVERLAY_BEFORE_S * 1e6) as u64);
        let to = cue + (OVERLAY_AFTER_S * 1e6) as u64;
        let start = lever.partition_point(|(ts, _)| *ts < from);
        let end = lever.partition_point(|(ts, _)| *ts <= to);
        let window = &lever[start..end];
        let at_cue = lever.partition_point(|(ts, _)| *ts < cue);
        let (Some(&(_, base)), false) = (lever.get(at_cue), window.is_empty()) else {
            continue;
        };
        let step = (window.len() / 120).max(1);
        let mut d = String::new();
        for (k, (ts, mm)) in window.iter().step_by(step).enumerate() {
            let dt = (*ts as f64 - cue as f64) / 1e6;
            let _ = write!(
                d,
                "{}{:.1},{:.1} ",
                if k == 0 { "M" } else { "L" },
                x(dt),
                y(mm - base)
            );
        }
        let class = if t.outcome == session_format::Outcome::Rewarded {
            "tr rw"
        } else {
            "tr"
        };
        let _ = write!(s, "<path d=\"{}\" class=\"{class}\"/>", d.trim_end());
        drawn += 1;
    }
    let _ = write!(
        s,
        "<text x=\"5\" y=\"{h}\" class=\"tick\">-{OVERLAY_BEFORE_S} s</text>\
         <text x=\"{cx:.1}\" y=\"{h}\" class=\"tick\" text-anchor=\"middle\">cue</text>\
         <text x=\"{xr}\" y=\"{h}\" class=\"tick\" text-anchor=\"end\">+{OVERLAY_AFTER_S} s</text></svg>",
        cx = x(0.0),
        xr = w - 5.0
    );
    Some((s, drawn))
}

/// The page.
pub fn report_html(
    mouse: &str,
    subject: Option<&Subject>,
    rows: &[SessionRow],
    ledger: &BTreeMap<String, DayWater>,
    generated_utc: &str,
) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Training report: {m}</title><style>\
         body{{font-family:sans-serif;margin:1.5em;color:#222}}\
         table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}\
         th{{background:#f0f0f0}}.chart,.hist{{border:1px solid #ddd;margin:4px;background:#fff}}\
         .line{{fill:none;stroke:#1f6fb4;stroke-width:2}}.pt{{fill:#1f6fb4}}.axis{{stroke:#888}}\
         .title{{font-size:13px;font-weight:bold}}.tick{{font-size:10px;fill:#555}}.bar{{fill:#e07b39}}\
         .sessions{{display:flex;flex-wrap:wrap}}.session{{margin:4px;font-size:12px}}\
         .overlay{{border:1px solid #ddd;margin:4px;background:#fff}}.tr{{fill:none;stroke:#999;stroke-width:0.7;opacity:0.6}}\
         .rw{{stroke:#1f6fb4}}.cue{{stroke:#e07b39;stroke-dasharray:3,2}}\
         </style></head><body>\n<h1>Training report: {m}</h1>\n",
        m = esc(mouse)
    );
    if let Some(s) = subject {
        let _ = writeln!(
            h,
            "<p id=\"subject\">{} · {} · born {} · {} {} · baseline {:.1} g · {}</p>",
            esc(&s.species),
            esc(&s.sex),
            esc(&s.date_of_birth),
            esc(&s.strain),
            esc(&s.genotype),
            s.baseline_weight_g,
            esc(&s.experimenter)
        );
    }
    let _ = write!(
        h,
        "<p>{} sessions; generated {} by rigd from the session folders.</p>\n<h2>Learning curves</h2>\n<div>",
        rows.len(),
        esc(generated_utc)
    );
    let col = |f: &dyn Fn(&SessionRow) -> Option<f64>| rows.iter().map(f).collect::<Vec<_>>();
    h.push_str(&line_chart(
        "success",
        "Success rate",
        "fraction",
        &col(&|r| r.success_rate),
        Some((0.0, 1.0)),
    ));
    h.push_str(&line_chart(
        "reaction_time",
        "Reaction time, median",
        "s",
        &col(&|r| r.reaction_time_median_s),
        None,
    ));
    h.push_str(&line_chart(
        "cue_to_reward",
        "Cue to reward, median",
        "s",
        &col(&|r| r.cue_to_reward_median_s),
        None,
    ));
    h.push_str(&line_chart(
        "trajectory_corr",
        "Trajectory correlation, median",
        "r",
        &col(&|r| r.trajectory_corr_median),
        Some((-0.2, 1.0)),
    ));
    h.push_str(&line_chart(
        "trials",
        "Trials",
        "count",
        &col(&|r| Some(r.trials as f64)),
        None,
    ));
    h.push_str(&line_chart(
        "weight",
        "Weight",
        "g",
        &col(&|r| r.training.as_ref().and_then(|t| t.weight_g)),
        None,
    ));
    h.push_str("</div>\n<h2>Water per lab-local day</h2>\n<table id=\"water\"><tr><th>date</th><th>task µL</th><th>by hand µL</th><th>total µL</th><th>supplement owed µL</th></tr>\n");
    for (day, w) in ledger {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td></tr>",
            esc(day),
            w.task_ul,
            w.by_hand_ul,
            w.total_ul(),
            w.supplement_owed_ul
                .map_or("-".into(), |s| format!("{s:.1}"))
        );
    }
    h.push_str("</table>\n<h2>Sessions</h2>\n<table id=\"history\"><tr><th>#</th><th>date</th><th>day</th><th>stage</th><th>rig</th><th>trials</th><th>success</th><th>reaction time s</th><th>cue to reward s</th><th>trajectory r</th><th>water µL</th><th>weight g</th><th>state</th></tr>\n");
    let f = |v: Option<f64>, d: usize| v.map_or("-".to_owned(), |x| format!("{x:.d$}"));
    for (i, r) in rows.iter().enumerate() {
        let t = r.training.as_ref();
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td style=\"text-align:left\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td></tr>",
            i + 1,
            esc(&r.local_date),
            t.map_or("-".into(), |t| t.day.to_string()),
            esc(r.stage().unwrap_or("-")),
            esc(&r.rig),
            r.trials,
            f(r.success_rate, 3),
            f(r.reaction_time_median_s, 3),
            f(r.cue_to_reward_median_s, 3),
            f(r.trajectory_corr_median, 3),
            r.water_ul,
            f(t.and_then(|t| t.weight_g), 1),
            esc(&r.state)
        );
    }
    h.push_str(
        "</table>\n<h2>Per session: the lever around each cue (mm from its position at the cue; \
         rewarded trials blue) and cue to threshold crossing</h2>\n<div class=\"sessions\">\n",
    );
    for (i, r) in rows.iter().enumerate() {
        let rts = session_rts(r);
        let overlay = lever_overlay(&format!("lever{}", i + 1), r)
            .map_or_else(|| "<div>(no lever data)</div>".to_owned(), |(svg, _)| svg);
        let _ = writeln!(
            h,
            "<div class=\"session\"><div>#{} {} {} ({} crossings)</div>{overlay}{}</div>",
            i + 1,
            esc(&r.local_date),
            esc(r.stage().unwrap_or("")),
            rts.len(),
            rt_histogram(&format!("rt{}", i + 1), &rts, 2.0)
        );
    }
    h.push_str("</div>\n</body></html>\n");
    h
}
