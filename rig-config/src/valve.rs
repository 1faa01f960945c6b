//! Valve calibration maths: piecewise-linear interpolation between measured
//! points, in both directions, and never outside the measured range.

use crate::schema::{CalibrationPoint, ValveSection};

/// Why a calibration lookup gave no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CalibrationError {
    /// Fewer than two points: no line to interpolate on.
    #[error("the valve calibration needs at least 2 points, it has {points}")]
    TooFewPoints {
        /// Number of points in the calibration.
        points: usize,
    },
    /// The requested volume lies outside the measured volumes.
    #[error(
        "{volume_ul} µL is outside the calibrated range {min_ul}..={max_ul} µL; \
         measure a calibration point that covers it"
    )]
    VolumeOutOfRange {
        /// The requested volume, µL.
        volume_ul: f64,
        /// Smallest calibrated volume, µL.
        min_ul: f64,
        /// Largest calibrated volume, µL.
        max_ul: f64,
    },
    /// The requested open time lies outside the measured open times.
    #[error(
        "{open_ms} ms is outside the calibrated range {min_ms}..={max_ms} ms; \
         measure a calibration point that covers it"
    )]
    OpenTimeOutOfRange {
        /// The requested open time, ms.
        open_ms: f64,
        /// Shortest calibrated open time, ms.
        min_ms: f64,
        /// Longest calibrated open time, ms.
        max_ms: f64,
    },
}

impl ValveSection {
    /// Smallest and largest calibrated volumes, µL, or `None` with fewer than
    /// two points.
    pub fn volume_range_ul(&self) -> Option<(f64, f64)> {
        range(&self.calibration, |p| p.volume_ul)
    }

    /// Shortest and longest calibrated open times, ms, or `None` with fewer
    /// than two points.
    pub fn open_range_ms(&self) -> Option<(f64, f64)> {
        range(&self.calibration, |p| p.open_ms)
    }

    /// How long to open the valve to deliver `volume_ul`, by linear
    /// interpolation between the two calibration points around it.
    pub fn open_ms_for_volume(&self, volume_ul: f64) -> Result<f64, CalibrationError> {
        let (min_ul, max_ul) = self
            .volume_range_ul()
            .ok_or(CalibrationError::TooFewPoints {
                points: self.calibration.len(),
            })?;
        interpolate(&self.calibration, volume_ul, |p| p.volume_ul, |p| p.open_ms).ok_or(
            CalibrationError::VolumeOutOfRange {
                volume_ul,
                min_ul,
                max_ul,
            },
        )
    }

    /// How much water opening the valve for `open_ms` delivers, by linear
    /// interpolation between the two calibration points around it.
    pub fn volume_for_open_ms(&self, open_ms: f64) -> Result<f64, CalibrationError> {
        let (min_ms, max_ms) = self.open_range_ms().ok_or(CalibrationError::TooFewPoints {
            points: self.calibration.len(),
        })?;
        interpolate(&self.calibration, open_ms, |p| p.open_ms, |p| p.volume_ul).ok_or(
            CalibrationError::OpenTimeOutOfRange {
                open_ms,
                min_ms,
                max_ms,
            },
        )
    }
}

impl ValveSection {
    /// Age of the calibration in days on day `today` (days since
    /// 1970-01-01), or `None` without a (valid) `calibrated_utc`.
    pub fn calibration_age_days(&self, today: i64) -> Option<i64> {
        let d = crate::date::days_from_date(self.calibrated_utc.as_deref()?)?;
        Some(today - d)
    }

    /// The warning for a calibration older than `max_calibration_age_days`
    /// on day `today`, or for one without a date.
    pub fn calibration_age_warning(&self, today: i64) -> Option<String> {
        match self.calibration_age_days(today) {
            Some(age) if age > i64::from(self.max_calibration_age_days) => Some(format!(
                "the valve calibration is {age} days old (calibrated {}), older than \
                 valve.max_calibration_age_days = {}: valves drift; run rigctl calibrate valve",
                self.calibrated_utc.as_deref().unwrap_or("?"),
                self.max_calibration_age_days
            )),
            Some(_) => None,
            None if self.calibration_file.is_some() => None, // the load warned
            None => Some(
                "the valve calibration has no date (valve.calibrated_utc): its age is unknown; \
                 run rigctl calibrate valve"
                    .into(),
            ),
        }
    }
}

fn range(
    points: &[CalibrationPoint],
    get: impl Fn(&CalibrationPoint) -> f64,
) -> Option<(f64, f64)> {
    if points.len() < 2 {
        return None;
    }
    let first = get(points.first()?);
    let last = get(points.last()?);
    Some((first.min(last), first.max(last)))
}

/// `y` at `x` on the polyline through `points`, with `x` increasing along the
/// points (validation guarantees it). `None` outside the points or for a
/// non-finite `x`.
fn interpolate(
    points: &[CalibrationPoint],
    x: f64,
    get_x: impl Fn(&CalibrationPoint) -> f64,
    get_y: impl Fn(&CalibrationPoint) -> f64,
) -> Option<f64> {
    if !x.is_finite() {
        return None;
    }
    points.windows(2).find_map(|pair| {
        let [a, b] = pair else { return None };
        let (x0, x1) = (get_x(a), get_x(b));
        let (y0, y1) = (get_y(a), get_y(b));
        if !(x0 <= x && x <= x1) {
            return None;
        }
        if x1 == x0 {
            return Some(y0);
        }
        Some(y0 + (x - x0) / (x1 - x0) * (y1 - y0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> ValveSection {
        ValveSection::default()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn interpolates_on_points_and_between() {
        let v = example();
        assert_eq!(v.open_ms_for_volume(2.0), Ok(20.0));
        assert_eq!(v.open_ms_for_volume(8.6), Ok(80.0));
        assert!(close(v.open_ms_for_volume(4.2).unwrap_or(f64::NAN), 40.0));
        // halfway between 4.2 µL @ 40 ms and 8.6 µL @ 80 ms
        assert!(close(v.open_ms_for_volume(6.4).unwrap_or(f64::NAN), 60.0));
        assert!(close(v.volume_for_open_ms(30.0).unwrap_or(f64::NAN), 3.1));
        assert!(close(v.volume_for_open_ms(60.0).unwrap_or(f64::NAN), 6.4));
    }

    #[test]
    fn round_trips() {
        let v = example();
        for i in 0..=100 {
            let ul = 2.0 + 6.6 * f64::from(i) / 100.0;
            let ms = v.open_ms_for_volume(ul).unwrap_or(f64::NAN);
            let back = v.volume_for_open_ms(ms).unwrap_or(f64::NAN);
            assert!(close(ul, back), "{ul} -> {ms} -> {back}");
        }
    }

    #[test]
    fn refuses_to_extrapolate() {
        let v = example();
        assert_eq!(
            v.open_ms_for_volume(1.0),
            Err(CalibrationError::VolumeOutOfRange {
                volume_ul: 1.0,
                min_ul: 2.0,
                max_ul: 8.6
            })
        );
        assert!(v.open_ms_for_volume(9.0).is_err());
        assert!(v.open_ms_for_volume(f64::NAN).is_err());
        assert!(v.open_ms_for_volume(f64::INFINITY).is_err());
        assert!(v.volume_for_open_ms(10.0).is_err());
        assert!(v.volume_for_open_ms(100.0).is_err());
    }

    #[test]
    fn too_few_points() {
        let v = ValveSection {
            calibration: vec![CalibrationPoint {
                open_ms: 10.0,
                volume_ul: 1.0,
            }],
            ..ValveSection::default()
        };
        assert_eq!(
            v.open_ms_for_volume(1.0),
            Err(CalibrationError::TooFewPoints { points: 1 })
        );
        let empty = ValveSection {
            calibration: vec![],
            ..ValveSection::default()
        };
        assert!(empty.volume_for_open_ms(1.0).is_err());
    }
}
