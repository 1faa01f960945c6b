//! Why a session ended: one typed value from the moment it is decided to the
//! line in `session.toml`, the alert and the metrics label.

use std::fmt;

use crate::task::FinishReason;

/// Why a session ended. Its text (`Display`) is what `session.toml`'s
/// `stop_reason`, `summary.json` and `rigctl stop` show; it is part of the
/// session format and does not change.
#[derive(Debug, Clone, PartialEq)]
pub enum StopReason {
    /// The task ended by itself: a trial, reward or water cap, the time cap,
    /// the mouse sated. (Never [`FinishReason::Stopped`]: a stop has its own
    /// reason below.)
    Task(FinishReason),
    /// A stop request: the experimenter's words, or `stopped by <peer>`.
    Requested(String),
    /// rigd was asked to exit (`SIGTERM`, `SIGINT`).
    Signal(&'static str),
    /// Writing the session's files failed; the text is the error.
    StorageError(String),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Task(r) => f.write_str(r.as_str()),
            Self::Requested(words) => f.write_str(words),
            Self::Signal(name) => f.write_str(name),
            Self::StorageError(e) => write!(f, "storage error: {e}"),
        }
    }
}

impl StopReason {
    /// The task ended it without anyone asking (a cap, the time, the mouse),
    /// or a disk error did: someone should hear about it.
    pub fn is_unrequested(&self) -> bool {
        matches!(self, Self::Task(_) | Self::StorageError(_))
    }

    /// The planned ends (the time or trial count the experimenter set) are
    /// news; the others need a look.
    pub fn alert_severity(&self) -> &'static str {
        match self {
            Self::Task(FinishReason::Duration | FinishReason::MaxTrials) => "info",
            Self::StorageError(_) => "critical",
            _ => "warning",
        }
    }

    /// The `reason` label of `rigd_sessions_completed_total` (one of
    /// [`crate::metrics::STOP_REASONS`]): a fixed set, so free-text reasons
    /// cannot make new time series.
    pub fn metrics_label(&self) -> &'static str {
        match self {
            Self::Task(FinishReason::Stopped) | Self::Requested(_) => "requested",
            Self::Task(r) => r.as_str(),
            Self::Signal(_) => "signal",
            Self::StorageError(_) => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_is_the_session_formats_and_the_label_is_from_the_fixed_set() {
        let cases = [
            (
                StopReason::Task(FinishReason::WaterCap),
                "water_cap",
                "water_cap",
            ),
            (StopReason::Task(FinishReason::Sated), "sated", "sated"),
            (
                StopReason::Task(FinishReason::Duration),
                "duration",
                "duration",
            ),
            (
                StopReason::Requested("day 3 done".into()),
                "day 3 done",
                "requested",
            ),
            (StopReason::Signal("SIGTERM"), "SIGTERM", "signal"),
            (
                StopReason::StorageError("disk full".into()),
                "storage error: disk full",
                "error",
            ),
        ];
        for (reason, text, label) in cases {
            assert_eq!(reason.to_string(), text);
            assert_eq!(reason.metrics_label(), label);
            assert!(crate::metrics::STOP_REASONS.contains(&label));
        }
        assert_eq!(
            StopReason::Task(FinishReason::MaxTrials).alert_severity(),
            "info"
        );
        assert_eq!(
            StopReason::Task(FinishReason::Sated).alert_severity(),
            "warning"
        );
        assert!(!StopReason::Signal("SIGINT").is_unrequested());
        assert!(StopReason::StorageError(String::new()).is_unrequested());
    }
}
