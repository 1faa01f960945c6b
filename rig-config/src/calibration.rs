//! The valve calibration file and its fit.
//!
//! `rigctl calibrate valve` weighs the water of N openings at several open
//! times and writes the result as a file next to `rig.toml`, which names it
//! in `[valve].calibration_file` (a path relative to the configuration's
//! folder). [`load`](crate::load) reads it and uses its points in place of
//! `[[valve.calibration]]`; its date is `valve.calibrated_utc`.
//!
//! ```toml
//! # written by rigctl calibrate valve
//! calibrated_utc = "2026-12-06T23:10:00Z"
//! fit = "piecewise-linear"
//!
//! [[point]]
//! open_ms = 10.0
//! volume_ul = 0.472
//! pulses = 50
//! weight_mg = 23.6
//! ```
//!
//! The fit ([`fit`]): each measured open time gives one point, its volume per
//! opening the weight over the pulses (1 mg of water = 1 µL). Between points
//! the curve is the straight line through them; outside the measured open
//! times it is not defined (a reward outside is refused, never
//! extrapolated). The curve must be strictly increasing: a longer opening
//! that weighed the same or less is refused, naming the two points, rather
//! than smoothed away (pooling adjacent violators would hide a scale or
//! cup mistake, and a flat segment has no inverse).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml_edit::ImDocument;

pub use crate::date::days_from_date;
use crate::error::{ConfigError, Problem};
use crate::locate::{line_col, locate};
use crate::schema::CalibrationPoint;
use crate::validate::KeyPath;

/// The largest calibration file read.
const MAX_CALIBRATION_BYTES: u64 = 64 * 1024;

/// The calibration file's contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationFile {
    /// When the water was weighed, RFC 3339 UTC (`2026-12-06T23:10:00Z`).
    pub calibrated_utc: String,
    /// How the points were fitted (free text, for people).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit: Option<String>,
    /// The points, open time increasing.
    pub point: Vec<FilePoint>,
}

/// One point of the calibration file.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePoint {
    /// Valve open time, ms.
    pub open_ms: f64,
    /// Water per opening, µL.
    pub volume_ul: f64,
    /// Openings weighed together (for the record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulses: Option<u32>,
    /// Their weight, mg (for the record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_mg: Option<f64>,
}

/// One weighing: `pulses` openings of `open_ms` gave `weight_mg` of water.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// Valve open time, ms.
    pub open_ms: f64,
    /// Openings delivered into the cup.
    pub pulses: u32,
    /// Water weighed, mg (= µL).
    pub weight_mg: f64,
}

/// Why weighings give no calibration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FitError {
    /// Fewer than two open times.
    #[error("a calibration needs at least 2 open times, got {0}: weigh at least two durations")]
    TooFew(usize),
    /// A weighing that is not a positive number of mg from a positive
    /// number of openings.
    #[error(
        "{open_ms} ms: {weight_mg} mg from {pulses} openings is not a weighing: \
         expected a weight > 0 mg from at least 1 opening"
    )]
    NotAWeighing {
        open_ms: f64,
        pulses: u32,
        weight_mg: f64,
    },
    /// The same open time twice.
    #[error("{0} ms was weighed twice: give each open time once")]
    Duplicate(f64),
    /// A longer opening that delivered no more water.
    #[error(
        "not monotonic: {long_ms} ms gave {long_ul:.4} µL per opening, not more than \
         {short_ms} ms ({short_ul:.4} µL); a longer opening must deliver more water: \
         check the cups and the scale and weigh these durations again (more openings \
         per cup make the weight more precise)"
    )]
    NotMonotonic {
        short_ms: f64,
        short_ul: f64,
        long_ms: f64,
        long_ul: f64,
    },
}

/// The calibration through `measurements` (any order): one point per open
/// time, sorted, strictly increasing in both coordinates, or why not.
pub fn fit(measurements: &[Measurement]) -> Result<Vec<FilePoint>, FitError> {
    let mut m = measurements.to_vec();
    for x in &m {
        let ok = x.open_ms.is_finite()
            && x.open_ms > 0.0
            && x.pulses > 0
            && x.weight_mg.is_finite()
            && x.weight_mg > 0.0;
        if !ok {
            return Err(FitError::NotAWeighing {
                open_ms: x.open_ms,
                pulses: x.pulses,
                weight_mg: x.weight_mg,
            });
        }
    }
    if m.len() < 2 {
        return Err(FitError::TooFew(m.len()));
    }
    m.sort_by(|a, b| a.open_ms.total_cmp(&b.open_ms));
    let points: Vec<FilePoint> = m
        .iter()
        .map(|x| FilePoint {
            open_ms: x.open_ms,
            volume_ul: x.weight_mg / f64::from(x.pulses),
            pulses: Some(x.pulses),
            weight_mg: Some(x.weight_mg),
        })
        .collect();
    for pair in points.windows(2) {
        let [a, b] = pair else { continue };
        if b.open_ms == a.open_ms {
            return Err(FitError::Duplicate(a.open_ms));
        }
        if b.volume_ul <= a.volume_ul {
            return Err(FitError::NotMonotonic {
                short_ms: a.open_ms,
                short_ul: a.volume_ul,
                long_ms: b.open_ms,
                long_ul: b.volume_ul,
            });
        }
    }
    Ok(points)
}

impl CalibrationFile {
    /// The file's text: a comment saying what wrote it, then the TOML.
    pub fn to_toml_string(&self) -> String {
        let body = toml::to_string(self).unwrap_or_default();
        format!(
            "# The valve calibration, written by `rigctl calibrate valve`: water per\n\
             # opening at each open time, weighed; linear between points, undefined\n\
             # outside them. rig.toml names this file in [valve].calibration_file.\n{body}"
        )
    }

    /// The points as the configuration uses them.
    pub fn points(&self) -> Vec<CalibrationPoint> {
        self.point
            .iter()
            .map(|p| CalibrationPoint {
                open_ms: p.open_ms,
                volume_ul: p.volume_ul,
            })
            .collect()
    }

    /// Parses and checks a calibration file's `text` (`path` for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let problem = |offset: usize, key: Option<String>, value: Option<String>, message| {
            let (line, column) = line_col(text, offset);
            Problem {
                file: path.to_path_buf(),
                line,
                column,
                key,
                value,
                message,
            }
        };
        let invalid = |problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        };
        let file: Self = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            invalid(vec![problem(
                offset,
                None,
                None,
                format!(
                    "not a valve calibration file: {}; expected calibrated_utc = \"...\" and \
                     [[point]] tables with open_ms and volume_ul (run rigctl calibrate valve)",
                    e.message().trim_end()
                ),
            )])
        })?;
        let doc = ImDocument::parse(text).ok();
        let at = |key: &KeyPath| doc.as_ref().map_or(0, |d| locate(d, key).offset);
        let mut problems = Vec::new();
        if days_from_date(&file.calibrated_utc).is_none() {
            let k = KeyPath::dotted("calibrated_utc");
            problems.push(problem(
                at(&k),
                Some(k.to_string()),
                Some(format!("{:?}", file.calibrated_utc)),
                "must start with a date YYYY-MM-DD (RFC 3339, e.g. 2026-12-06T23:10:00Z)".into(),
            ));
        }
        if file.point.len() < 2 {
            problems.push(problem(
                0,
                Some("point".into()),
                Some(format!("{} point(s)", file.point.len())),
                "needs at least 2 [[point]] tables: calibrate again".into(),
            ));
        }
        for (i, p) in file.point.iter().enumerate() {
            for (name, v) in [("open_ms", p.open_ms), ("volume_ul", p.volume_ul)] {
                if !(v.is_finite() && v >= 0.0) {
                    let k = KeyPath::dotted("point").index(i).key(name);
                    problems.push(problem(
                        at(&k),
                        Some(k.to_string()),
                        Some(v.to_string()),
                        "must be a finite number >= 0".into(),
                    ));
                }
            }
        }
        for (i, pair) in file.point.windows(2).enumerate() {
            let [a, b] = pair else { continue };
            for (name, x0, x1) in [
                ("open_ms", a.open_ms, b.open_ms),
                ("volume_ul", a.volume_ul, b.volume_ul),
            ] {
                if x1.partial_cmp(&x0) != Some(std::cmp::Ordering::Greater) {
                    let k = KeyPath::dotted("point").index(i + 1).key(name);
                    problems.push(problem(
                        at(&k),
                        Some(k.to_string()),
                        Some(x1.to_string()),
                        format!(
                            "must be greater than the previous point's ({x0}): the curve must \
                             strictly increase; calibrate again"
                        ),
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(file)
        } else {
            Err(invalid(problems))
        }
    }

    /// Reads and checks the calibration file at `path`.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read as _;
        let read_error = |error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CALIBRATION_BYTES).read_to_end(&mut bytes))
            .map_err(read_error)?;
        let text = String::from_utf8(bytes).map_err(|_| {
            read_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not UTF-8 text",
            ))
        })?;
        Self::parse(&text, path)
    }
}

/// Where `[valve].calibration_file = name` points for the configuration at
/// `config_path`: relative names are in the configuration's folder.
pub fn resolve(config_path: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    config_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| p.to_path_buf(), |d| d.join(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(open_ms: f64, pulses: u32, weight_mg: f64) -> Measurement {
        Measurement {
            open_ms,
            pulses,
            weight_mg,
        }
    }

    #[test]
    fn fits_through_the_weighings_in_order() {
        let p = fit(&[m(40.0, 50, 176.0), m(10.0, 50, 23.5), m(20.0, 50, 70.0)]).expect("valid");
        let v: Vec<(f64, f64)> = p.iter().map(|p| (p.open_ms, p.volume_ul)).collect();
        assert_eq!(v, vec![(10.0, 0.47), (20.0, 1.4), (40.0, 3.52)]);
    }

    #[test]
    fn refuses_what_is_not_a_curve() {
        let e = fit(&[m(10.0, 50, 30.0), m(20.0, 50, 29.0)]).expect_err("refused");
        assert!(matches!(e, FitError::NotMonotonic { .. }));
        assert!(e
            .to_string()
            .contains("20 ms gave 0.5800 µL per opening, not more than 10 ms"));
        assert_eq!(fit(&[m(10.0, 50, 30.0)]), Err(FitError::TooFew(1)));
        assert!(matches!(
            fit(&[m(10.0, 0, 30.0), m(20.0, 5, 1.0)]),
            Err(FitError::NotAWeighing { .. })
        ));
        assert!(fit(&[m(10.0, 5, -1.0), m(20.0, 5, 1.0)]).is_err());
        assert!(fit(&[m(10.0, 5, f64::NAN), m(20.0, 5, 1.0)]).is_err());
        assert_eq!(
            fit(&[m(10.0, 5, 1.0), m(10.0, 5, 2.0)]),
            Err(FitError::Duplicate(10.0))
        );
    }

    #[test]
    fn the_file_round_trips_and_is_checked() {
        let f = CalibrationFile {
            calibrated_utc: "2026-12-06T23:10:00Z".into(),
            fit: Some("piecewise-linear".into()),
            point: fit(&[m(10.0, 50, 23.5), m(20.0, 50, 70.0)]).expect("valid"),
        };
        let text = f.to_toml_string();
        assert_eq!(
            CalibrationFile::parse(&text, "v.toml".as_ref()).expect("valid"),
            f
        );
        let bad = text.replace("volume_ul = 1.4", "volume_ul = 0.1");
        let e = CalibrationFile::parse(&bad, "v.toml".as_ref())
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("v.toml:") && e.contains("point[1].volume_ul = 0.1"),
            "{e}"
        );
        let e = CalibrationFile::parse("x = 1\n", "v.toml".as_ref())
            .expect_err("refused")
            .to_string();
        assert!(e.contains("not a valve calibration file"), "{e}");
    }

    #[test]
    fn dates() {
        assert_eq!(days_from_date("1970-01-01"), Some(0));
        assert_eq!(days_from_date("2000-03-01T00:00:00Z"), Some(11_017));
        assert_eq!(days_from_date("2026-12-06T23:10:00Z"), Some(20_793));
        assert_eq!(days_from_date("06/12/2026"), None);
        assert_eq!(days_from_date("2026-13-01"), None);
    }
}
