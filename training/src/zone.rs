//! The lab's time zone: which calendar day a session belongs to.
//!
//! The tz database is compiled in (jiff's bundled copy), so the answer does
//! not depend on the host's `/usr/share/zoneinfo` or its `TZ`.

use std::time::SystemTime;

/// The lab's zone (`[lab].timezone`).
#[derive(Debug, Clone)]
pub struct LabZone {
    name: String,
    tz: jiff::tz::TimeZone,
}

impl LabZone {
    /// An IANA zone name (`America/Los_Angeles`) or `UTC`.
    pub fn new(name: &str) -> Result<LabZone, String> {
        let tz = jiff::tz::TimeZone::get(name).map_err(|_| {
            format!(
                "{name:?} is not a time zone of the tz database: give an IANA name like \
                 \"America/Los_Angeles\", \"Europe/Berlin\" or \"UTC\""
            )
        })?;
        Ok(LabZone {
            name: name.to_owned(),
            tz,
        })
    }

    /// UTC.
    pub fn utc() -> LabZone {
        LabZone {
            name: "UTC".into(),
            tz: jiff::tz::TimeZone::UTC,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn zoned(&self, t: SystemTime) -> Option<jiff::Zoned> {
        jiff::Timestamp::try_from(t)
            .ok()
            .map(|ts| ts.to_zoned(self.tz.clone()))
    }

    /// The local date of `t`, `YYYY-MM-DD`.
    pub fn local_date(&self, t: SystemTime) -> String {
        self.zoned(t)
            .map(|z| z.date().to_string())
            .unwrap_or_else(|| "1970-01-01".into())
    }

    /// The local date today.
    pub fn today(&self) -> String {
        self.local_date(SystemTime::now())
    }

    /// The local civil date today.
    pub fn today_date(&self) -> Option<jiff::civil::Date> {
        self.zoned(SystemTime::now()).map(|z| z.date())
    }

    /// The zone's offset from UTC at `t`, seconds (east positive).
    pub fn offset_s(&self, t: SystemTime) -> i32 {
        self.zoned(t).map_or(0, |z| z.offset().seconds())
    }

    /// The local date of an RFC 3339 time (`session.toml`'s `start_utc`).
    pub fn local_date_of_rfc3339(&self, text: &str) -> Option<String> {
        let ts: jiff::Timestamp = text.parse().ok()?;
        Some(ts.to_zoned(self.tz.clone()).date().to_string())
    }

    /// An RFC 3339 time as local `YYYY-MM-DD HH:MM`.
    pub fn local_minute_of_rfc3339(&self, text: &str) -> Option<String> {
        let ts: jiff::Timestamp = text.parse().ok()?;
        Some(
            ts.to_zoned(self.tz.clone())
                .strftime("%Y-%m-%d %H:%M")
                .to_string(),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn a_california_lab_changes_day_at_its_midnight_not_utcs() {
        let la = LabZone::new("America/Los_Angeles").unwrap();
        // 2026-07-02 01:30 UTC is 2026-07-01 18:30 PDT (UTC-7).
        let t = UNIX_EPOCH + Duration::from_secs(1_782_955_800);
        assert_eq!(LabZone::utc().local_date(t), "2026-07-02");
        assert_eq!(la.local_date(t), "2026-07-01");
        assert_eq!(la.offset_s(t), -7 * 3600);
        assert_eq!(
            la.local_date_of_rfc3339("2026-07-02T01:30:00.000000Z")
                .unwrap(),
            "2026-07-01"
        );
        // Winter: PST, UTC-8.
        assert_eq!(
            la.local_date_of_rfc3339("2026-12-02T07:59:59Z").unwrap(),
            "2026-12-01"
        );
        assert!(LabZone::new("America/Los_Angles")
            .unwrap_err()
            .contains("IANA"));
    }
}
