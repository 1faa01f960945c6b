//! The imaging side of a start: which reference the session registers its
//! frames against (the mouse's, from its folder, or the rig's
//! `[imaging].reference_image`), and the field-of-view check against it
//! before the task starts (`[imaging.fov_check]`, docs/training.md).
//!
//! The check itself runs on its own thread (it waits for frames, up to
//! `timeout_s`): the supervisor keeps serving requests and signals
//! meanwhile, and answers the start when it is done.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use protocol::control::{FovSummary, StartRequest};
use rig_config::{FovAction, RigConfig};
use tokio::sync::oneshot;
use training::reference::MouseReference;

use crate::imaging::fov::{collect_mean, measure, FovLimits, FovMeasure};
use crate::session::StartError;

/// The reference a session uses.
#[derive(Debug, Clone, Default)]
pub(super) struct ImagingChoice {
    /// The mouse's reference (used in place of the rig's files).
    pub mouse: Option<MouseReference>,
    /// Else the rig's `[imaging].reference_image`.
    pub rig: Option<PathBuf>,
    /// Why the mouse's reference cannot be used (then neither is used).
    pub problem: Option<String>,
}

impl ImagingChoice {
    /// The reference for `mouse` on this rig. Reads the mouse's folder.
    pub fn resolve(cfg: &RigConfig, mouse: &str) -> Self {
        let im = &cfg.imaging;
        if !im.enabled {
            return Self::default();
        }
        match training::reference::read(&cfg.storage.data_root, mouse) {
            Ok(Some(r)) if (r.record.width, r.record.height) != (im.width, im.height) => Self {
                problem: Some(format!(
                    "mouse {mouse}'s imaging reference ({}) is {} x {} pixels, this rig's frames \
                     are {} x {} ([imaging] width/height): set a reference from a session at \
                     this frame size (`rigctl mouse reference set {mouse} --from-session DIR`)",
                    r.record_path.display(),
                    r.record.width,
                    r.record.height,
                    im.width,
                    im.height
                )),
                ..Self::default()
            },
            Ok(Some(r)) => Self {
                mouse: Some(r),
                ..Self::default()
            },
            Ok(None) => Self {
                rig: im.reference_image.clone(),
                ..Self::default()
            },
            Err(e) => Self {
                problem: Some(format!("mouse {mouse}'s imaging reference: {e}")),
                ..Self::default()
            },
        }
    }

    /// The reference image file, if any.
    fn image(&self) -> Option<&Path> {
        match (&self.mouse, &self.rig) {
            (Some(m), _) => Some(&m.image),
            (None, Some(p)) => Some(p),
            _ => None,
        }
    }

    fn source(&self) -> &'static str {
        if self.mouse.is_some() {
            "mouse"
        } else {
            "rig"
        }
    }

    /// Whether a check is to be made (or reported as impossible).
    pub fn wants_check(&self, cfg: &RigConfig) -> bool {
        cfg.imaging.enabled
            && cfg.imaging.fov_check.enabled
            && (self.image().is_some() || self.problem.is_some())
    }

    /// Put the mouse's files in the session's configuration: its reference
    /// image, and its label image and table when it has them.
    pub fn apply(&self, cfg: &mut RigConfig) {
        if let Some(m) = &self.mouse {
            cfg.imaging.reference_image = Some(m.image.clone());
            if m.roi_labels.is_some() {
                cfg.imaging.roi_labels = m.roi_labels.clone();
                cfg.imaging.roi_table = m.roi_table.clone();
            }
        }
    }

    /// `session.toml`'s `[imaging_reference]`.
    pub fn table(&self) -> Option<toml::Table> {
        let mut t = toml::Table::new();
        let s = |v: &str| toml::Value::String(v.to_owned());
        if let Some(m) = &self.mouse {
            let r = &m.record;
            t.insert("source".into(), s("mouse"));
            t.insert("record".into(), s(&m.record_path.display().to_string()));
            t.insert("set_utc".into(), s(&r.set_utc));
            t.insert("image_sha256".into(), s(&r.image_sha256));
            if let Some(f) = &r.from_session {
                t.insert("from_session".into(), s(f));
            }
            t.insert(
                "roi_labels_from_mouse".into(),
                toml::Value::Boolean(m.roi_labels.is_some()),
            );
        } else if let Some(p) = &self.rig {
            t.insert("source".into(), s("rig"));
            t.insert("image".into(), s(&p.display().to_string()));
        } else if let Some(p) = &self.problem {
            t.insert("source".into(), s("none"));
            t.insert("problem".into(), s(p));
        } else {
            return None;
        }
        Some(t)
    }
}

/// What the check's thread found.
#[derive(Debug, Clone)]
pub(super) struct Measured {
    pub measure: FovMeasure,
    pub frames: u32,
    pub mean: Vec<f32>,
}

/// A check under way.
#[derive(Debug)]
pub(super) struct FovJob {
    pub result: oneshot::Receiver<Result<Measured, String>>,
    pub cancel: Arc<AtomicBool>,
}

impl FovJob {
    /// Start the check: wait for the frames, register their mean.
    pub fn spawn(cfg: &RigConfig, choice: &ImagingChoice) -> Result<FovJob, StartError> {
        let (tx, result) = oneshot::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let im = cfg.imaging.clone();
        let image = choice.image().map(Path::to_owned);
        let problem = choice.problem.clone();
        let stop = cancel.clone();
        std::thread::Builder::new()
            .name("rig-fov-check".into())
            .spawn(move || {
                let r = (|| {
                    if let Some(p) = problem {
                        return Err(p);
                    }
                    let image = image.ok_or("no reference image")?;
                    let (w, h) = (im.width as usize, im.height as usize);
                    let reference = crate::imaging::analysis::load_reference(&image, w, h)
                        .map_err(|e| e.to_string())?;
                    let fc = &im.fov_check;
                    let (mean, frames) = collect_mean(
                        &im.shm_name,
                        w,
                        h,
                        im.channels,
                        fc.frames,
                        Duration::from_secs_f64(fc.timeout_s),
                        &stop,
                    )
                    .map_err(|e| format!("no field-of-view check: {e}"))?;
                    let measure = measure(reference.image(), &mean, w, h)
                        .map_err(|e| format!("no field-of-view check: {e}"))?;
                    Ok(Measured {
                        measure,
                        frames,
                        mean,
                    })
                })();
                let _ = tx.send(r);
            })
            .map_err(|e| StartError::Thread {
                what: "field-of-view check",
                source: Box::new(e),
            })?;
        Ok(FovJob { result, cancel })
    }
}

/// A check's outcome for the start.
#[derive(Debug, Clone)]
pub(super) struct FovDecision {
    pub table: toml::Table,
    pub summary: FovSummary,
    pub warnings: Vec<String>,
    pub mean: Option<Vec<f32>>,
}

fn round(v: f64, digits: i32) -> f64 {
    let k = 10f64.powi(digits);
    (v * k).round() / k
}

/// Decide the start from the check's result: within the limits, start;
/// beyond them (or no check possible), refuse under `on_fail = "refuse"`
/// unless the request accepts the field of view, else start with a warning.
pub(super) fn decide(
    cfg: &RigConfig,
    choice: &ImagingChoice,
    req: &StartRequest,
    result: Result<Measured, String>,
) -> Result<FovDecision, StartError> {
    let limits = FovLimits::from_config(&cfg.imaging);
    let fc = &cfg.imaging.fov_check;
    let mut t = toml::Table::new();
    let f = |v: f64| toml::Value::Float(v);
    let mut summary = FovSummary {
        reference: choice.source().to_owned(),
        ..FovSummary::default()
    };
    let (problems, mean) = match result {
        Ok(m) => {
            let x = &m.measure;
            t.insert("frames".into(), toml::Value::Integer(i64::from(m.frames)));
            t.insert("dx_px".into(), f(round(x.dx_px, 2)));
            t.insert("dy_px".into(), f(round(x.dy_px, 2)));
            t.insert("shift_px".into(), f(round(x.shift_px(), 2)));
            if let Some(px) = cfg.imaging.pixel_size_um {
                t.insert("shift_um".into(), f(round(x.shift_px() * px, 2)));
                summary.shift_um = Some(round(x.shift_px() * px, 2));
            }
            t.insert("rotation_deg".into(), f(round(x.rotation_deg, 2)));
            t.insert("correlation".into(), f(round(x.correlation, 3)));
            t.insert("peak".into(), f(round(x.peak, 3)));
            summary.dx_px = Some(round(x.dx_px, 2));
            summary.dy_px = Some(round(x.dy_px, 2));
            summary.rotation_deg = Some(round(x.rotation_deg, 2));
            summary.correlation = Some(round(x.correlation, 3));
            (limits.problems(x), Some(m.mean))
        }
        Err(why) => (vec![why], None),
    };
    t.insert("max_shift_px".into(), f(round(limits.max_shift_px, 2)));
    t.insert("max_rotation_deg".into(), f(limits.max_rotation_deg));
    t.insert("min_correlation".into(), f(limits.min_correlation));
    t.insert(
        "reference".into(),
        toml::Value::String(summary.reference.clone()),
    );
    let checked = mean.is_some();
    let verdict = match (problems.is_empty(), checked, req.accept_fov, fc.on_fail) {
        (true, ..) => "pass",
        (false, true, true, _) => "accepted",
        (false, true, false, FovAction::Warn) => "warned",
        (false, false, true, _) | (false, false, false, FovAction::Warn) => "not_checked",
        (false, true, false, FovAction::Refuse) => {
            return Err(StartError::FieldOfView(format!(
                "the field of view does not match mouse {m}'s reference ({}): {}. Move the stage \
                 (or fix the microscope) and start again; or start with --accept-fov to run \
                 anyway (recorded in session.toml); or, if the field of view is meant to \
                 change, set a new reference (`rigctl mouse reference set {m} --from-session \
                 DIR`). [imaging.fov_check].on_fail = \"warn\" starts with a warning instead.",
                reference_origin(choice),
                problems.join("; "),
                m = req.mouse,
            )));
        }
        (false, false, false, FovAction::Refuse) => {
            return Err(StartError::FieldOfView(format!(
                "{}. The field of view could not be checked: fix that and start again; or \
                 start with --accept-fov to run without the check (recorded in session.toml). \
                 [imaging.fov_check].on_fail = \"warn\" starts with a warning instead.",
                problems.join("; ")
            )));
        }
    };
    t.insert("verdict".into(), toml::Value::String(verdict.into()));
    if !problems.is_empty() {
        t.insert(
            "problems".into(),
            toml::Value::Array(problems.iter().cloned().map(toml::Value::String).collect()),
        );
    }
    if req.accept_fov && !problems.is_empty() {
        t.insert("accepted_by_request".into(), toml::Value::Boolean(true));
        if let Some(op) = &req.operator {
            t.insert("operator".into(), toml::Value::String(op.clone()));
        }
    }
    let warnings = if problems.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "field of view ({verdict}): {}",
            problems.join("; ")
        )]
    };
    summary.verdict = verdict.to_owned();
    summary.problems = problems;
    Ok(FovDecision {
        table: t,
        summary,
        warnings,
        mean,
    })
}

fn reference_origin(choice: &ImagingChoice) -> String {
    match (&choice.mouse, &choice.rig) {
        (Some(m), _) => match &m.record.from_session {
            Some(s) => format!("set {} from {s}", m.record.set_utc),
            None => format!("set {} from {}", m.record.set_utc, m.record.source),
        },
        (None, Some(p)) => format!("the rig's [imaging].reference_image {}", p.display()),
        _ => "none".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(dx: f64, correlation: f64) -> Result<Measured, String> {
        Ok(Measured {
            measure: FovMeasure {
                dx_px: dx,
                dy_px: 0.0,
                rotation_deg: 0.0,
                correlation,
                peak: 0.8,
                flagged: false,
            },
            frames: 60,
            mean: vec![0.0; 4],
        })
    }

    fn choice() -> ImagingChoice {
        ImagingChoice {
            rig: Some("/ref.npy".into()),
            ..ImagingChoice::default()
        }
    }

    #[test]
    fn within_the_limits_starts_beyond_them_refuses_warns_or_is_accepted() {
        let mut cfg = RigConfig::default();
        let req = StartRequest {
            mouse: "M1".into(),
            ..StartRequest::default()
        };
        let d = decide(&cfg, &choice(), &req, measured(3.0, 0.9)).expect("pass");
        assert_eq!(d.summary.verdict, "pass");
        assert!(d.warnings.is_empty() && d.mean.is_some());
        assert_eq!(d.table["dx_px"].as_float(), Some(3.0));

        let e = decide(&cfg, &choice(), &req, measured(12.0, 0.9))
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("shifted 12.0 px") && e.contains("--accept-fov") && e.contains("M1"),
            "{e}"
        );
        let e = decide(&cfg, &choice(), &req, Err("no frames".into()))
            .expect_err("refused")
            .to_string();
        assert!(
            e.starts_with("no frames. The field of view could not be checked"),
            "{e}"
        );

        let accept = StartRequest {
            accept_fov: true,
            operator: Some("ana".into()),
            ..req.clone()
        };
        let d = decide(&cfg, &choice(), &accept, measured(12.0, 0.2)).expect("accepted");
        assert_eq!(d.summary.verdict, "accepted");
        assert_eq!(d.summary.problems.len(), 2, "{:?}", d.summary.problems);
        assert_eq!(d.table["operator"].as_str(), Some("ana"));

        cfg.imaging.fov_check.on_fail = FovAction::Warn;
        let d = decide(&cfg, &choice(), &req, measured(12.0, 0.9)).expect("warned");
        assert_eq!(d.summary.verdict, "warned");
        assert!(
            d.warnings[0].contains("shifted 12.0 px"),
            "{:?}",
            d.warnings
        );
        let d = decide(&cfg, &choice(), &req, Err("no frames".into())).expect("warned");
        assert_eq!(d.summary.verdict, "not_checked");
        assert!(d.mean.is_none());
    }
}
