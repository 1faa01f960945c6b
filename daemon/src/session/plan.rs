//! Whether a session may start, and with what: a pure function of the rig's
//! configuration, the start request and the facts the supervisor gathered
//! (the link, the mouse's water today, the free disk). No I/O, no clock: the
//! refusals are unit-tested here, the opening of files is the supervisor's.

use std::path::PathBuf;

use protocol::control::{validate_mouse_id, ErrorCode, InvalidMouseId, LinkState, StartRequest};
use rig_config::RigConfig;

use crate::task::TaskParams;

/// Space a session needs on the data disk to start: its reserve
/// ([`session_format::RESERVE_BYTES`]) and as much again.
pub const MIN_FREE_BYTES: u64 = 2 * session_format::RESERVE_BYTES as u64;

/// What the supervisor knows when a start request arrives.
#[derive(Debug, Clone, Default)]
pub struct StartFacts {
    /// The session already running: (mouse, folder).
    pub running: Option<(String, PathBuf)>,
    /// That session is ending (its files are being finished).
    pub running_is_stopping: bool,
    pub link: Option<LinkState>,
    pub link_detail: Option<String>,
    /// Rig time of the latest lever sample, µs (0: none yet).
    pub rig_now_us: u64,
    /// Water the mouse already had today, from its session folders, µL.
    pub water_today_ul: f64,
    /// Why that could not be counted (an implausible earlier record): the
    /// start is refused.
    pub water_history_problem: Option<String>,
    /// Free space under the data root (None: unknown).
    pub free_bytes: Option<u64>,
    /// The task's random seed for this session.
    pub seed: u64,
}

/// A session that may start: the configuration it runs with (the rig's plus
/// the request's task overrides, validated) and the task's parameters.
#[derive(Debug, Clone)]
pub struct SessionPlan {
    pub mouse: String,
    pub notes: String,
    pub cfg: RigConfig,
    pub params: TaskParams,
    /// Water before this session today, µL (for the summary's supplement).
    pub water_before_today_ul: f64,
    /// Rig time of session time 0: the latest sample when it was planned.
    pub t0_us: u64,
    /// `session.toml`'s `[training]` table (set by the supervisor).
    pub training: Option<toml::Table>,
    /// The lab zone's offset from UTC at the start, s: the folder is named
    /// in the lab's local time.
    pub utc_offset_s: i32,
    /// `session.toml`'s `[imaging_reference]` and `[fov_check]` tables (set
    /// by the supervisor), and the mean image the check registered, H x W.
    pub imaging_reference: Option<toml::Table>,
    pub fov_check: Option<toml::Table>,
    pub fov_mean: Option<Vec<f32>>,
}

/// Why a session did not start. Each message names what is wrong and the fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("a session for {mouse} is running ({}): stop it first", .dir.display())]
    AlreadyRunning { mouse: String, dir: PathBuf },
    #[error(
        "the session for {mouse} is stopping (its files are being finished): start again in a moment"
    )]
    Stopping { mouse: String },
    #[error("{0}")]
    InvalidMouse(#[from] InvalidMouseId),
    /// No record for the mouse (`[training].require_subject`).
    #[error("{0}")]
    UnknownMouse(String),
    /// The training side of the start (protocol, stage, mouse record).
    #[error("{0}")]
    Training(String),
    /// The welfare rule (weight) refused the start.
    #[error("{0}")]
    Welfare(String),
    #[error(
        "the rig is not connected ({detail}): check the USB cable and [rig].serial_port = {port:?}"
    )]
    NotConnected { detail: String, port: String },
    #[error("the rig is connected but no lever sample has arrived yet: try again in a moment")]
    NoSampleYet,
    /// The request's task overrides broke the configuration's rules.
    #[error("{0}")]
    Overrides(#[from] rig_config::OverrideError),
    /// The mouse's earlier records today cannot be counted.
    #[error("{0}")]
    WaterHistory(String),
    #[error(
        "{mouse} already had {today_ul:.1} µL today, the daily cap ([safety].max_water_per_day_ul) is {cap_ul:.1} µL"
    )]
    DailyWaterCap {
        mouse: String,
        today_ul: f64,
        cap_ul: f64,
    },
    #[error(
        "the data disk holding [storage].data_root = {} has only {} kB free (No space left for a \
         session, which needs at least {} kB): free space or point data_root at another disk",
        .root.display(), .free_bytes / 1024, MIN_FREE_BYTES / 1024
    )]
    DiskFull { root: PathBuf, free_bytes: u64 },
    /// The disk cannot keep up with raw frames (the measured rate is in the text).
    #[error("{0}")]
    DiskTooSlow(String),
    #[error("cannot create the session folder: {0}")]
    Folder(#[source] session_format::StorageError),
    #[error("cannot write the session folder: {0}")]
    Writer(#[source] session_format::StorageError),
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the configuration cannot be recorded: {0}")]
    ConfigSnapshot(String),
    #[error("the rig thread is gone")]
    RigGone,
    /// The field-of-view check refused the start (or could not be made).
    #[error("{0}")]
    FieldOfView(String),
    /// The mouse's imaging reference cannot be used.
    #[error("{0}")]
    ImagingReference(String),
}

impl StartError {
    /// The control protocol's code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::AlreadyRunning { .. } => ErrorCode::AlreadyRunning,
            Self::Stopping { .. } => ErrorCode::Busy,
            Self::InvalidMouse(_) | Self::UnknownMouse(_) => ErrorCode::InvalidMouse,
            Self::Training(_) => ErrorCode::BadRequest,
            Self::Welfare(_) => ErrorCode::RefusedBySafety,
            Self::NotConnected { .. } | Self::NoSampleYet => ErrorCode::DeviceUnavailable,
            Self::Overrides(_) => ErrorCode::BadRequest,
            Self::DailyWaterCap { .. }
            | Self::WaterHistory(_)
            | Self::DiskFull { .. }
            | Self::DiskTooSlow(_) => ErrorCode::RefusedBySafety,
            Self::FieldOfView(_) | Self::ImagingReference(_) => ErrorCode::BadRequest,
            // Not a fault of rigd's: the lab's folder needs attention.
            Self::Folder(
                session_format::StorageError::DataRootMissing { .. }
                | session_format::StorageError::UnsafeFolder { .. },
            ) => ErrorCode::RefusedBySafety,
            Self::Folder(session_format::StorageError::SessionExists { .. }) => ErrorCode::Busy,
            Self::Folder(_)
            | Self::Writer(_)
            | Self::Thread { .. }
            | Self::ConfigSnapshot(_)
            | Self::RigGone => ErrorCode::Internal,
        }
    }
}

impl From<StartError> for protocol::control::ControlError {
    fn from(e: StartError) -> Self {
        protocol::control::ControlError::new(e.code(), e.to_string())
    }
}

impl SessionPlan {
    /// Decide a start request. `cfg` is the rig's configuration (validated
    /// when it was loaded).
    pub fn new(
        cfg: &RigConfig,
        req: &StartRequest,
        facts: &StartFacts,
    ) -> Result<SessionPlan, StartError> {
        if let Some((mouse, dir)) = &facts.running {
            return Err(if facts.running_is_stopping {
                StartError::Stopping {
                    mouse: mouse.clone(),
                }
            } else {
                StartError::AlreadyRunning {
                    mouse: mouse.clone(),
                    dir: dir.clone(),
                }
            });
        }
        validate_mouse_id(&req.mouse)?;
        if facts.link != Some(LinkState::Connected) {
            return Err(StartError::NotConnected {
                detail: facts
                    .link_detail
                    .clone()
                    .unwrap_or_else(|| "no answer yet".into()),
                port: cfg.rig.serial_port.clone(),
            });
        }
        if facts.rig_now_us == 0 {
            return Err(StartError::NoSampleYet);
        }
        // The task for this session: the configuration plus any overrides,
        // checked by the configuration's own rules.
        let cfg = match &req.task {
            Some(t) => cfg.with_task_overrides(t)?,
            None => cfg.clone(),
        };
        if let Some(problem) = &facts.water_history_problem {
            return Err(StartError::WaterHistory(problem.clone()));
        }
        let today = facts.water_today_ul;
        let remaining = (cfg.safety.max_water_per_day_ul - today).max(0.0);
        if remaining <= 0.0 {
            return Err(StartError::DailyWaterCap {
                mouse: req.mouse.clone(),
                today_ul: today,
                cap_ul: cfg.safety.max_water_per_day_ul,
            });
        }
        if let Some(free) = facts.free_bytes {
            if free < MIN_FREE_BYTES {
                return Err(StartError::DiskFull {
                    root: cfg.storage.data_root.clone(),
                    free_bytes: free,
                });
            }
        }
        let params = TaskParams::from_config(&cfg)
            .with_seed(facts.seed)
            .with_water_remaining_today_ul(Some(remaining));
        Ok(SessionPlan {
            mouse: req.mouse.clone(),
            notes: req.notes.clone().unwrap_or_default(),
            cfg,
            params,
            water_before_today_ul: today,
            t0_us: facts.rig_now_us,
            training: None,
            utc_offset_s: 0,
            imaging_reference: None,
            fov_check: None,
            fov_mean: None,
        })
    }

    /// Bytes per second the raw frames need on disk, when they are recorded.
    pub fn raw_frames_bytes_per_s(&self) -> Option<f64> {
        let im = &self.cfg.imaging;
        (im.enabled && self.cfg.storage.raw_frames).then(|| {
            f64::from(im.width)
                * f64::from(im.height)
                * f64::from(im.channels)
                * 2.0
                * im.frame_rate_hz
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use protocol::control::TaskOverrides;

    fn ready() -> StartFacts {
        StartFacts {
            link: Some(LinkState::Connected),
            rig_now_us: 5_000_000,
            free_bytes: Some(1 << 30),
            seed: 42,
            ..StartFacts::default()
        }
    }

    fn request(mouse: &str) -> StartRequest {
        StartRequest {
            mouse: mouse.into(),
            notes: Some("day 3".into()),
            task: None,
            ..Default::default()
        }
    }

    fn refusal(facts: &StartFacts, req: &StartRequest) -> StartError {
        match SessionPlan::new(&RigConfig::default(), req, facts) {
            Ok(p) => panic!("planned {p:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_plan_carries_the_request_the_seed_and_the_water_left_today() {
        let cfg = RigConfig::default();
        let facts = StartFacts {
            water_today_ul: 100.0,
            ..ready()
        };
        let plan = SessionPlan::new(&cfg, &request("M12"), &facts).unwrap();
        assert_eq!((plan.mouse.as_str(), plan.notes.as_str()), ("M12", "day 3"));
        assert_eq!(plan.t0_us, 5_000_000);
        assert_eq!(plan.params.seed, 42);
        assert_eq!(plan.water_before_today_ul, 100.0);
        assert_eq!(
            plan.params.water_remaining_today_ul,
            Some(cfg.safety.max_water_per_day_ul - 100.0)
        );
        assert_eq!(plan.cfg.task, cfg.task, "no overrides: the rig's task");
    }

    #[test]
    fn each_refusal_has_its_code_and_names_the_fix() {
        let cfg = RigConfig::default();
        let running = StartFacts {
            running: Some(("M1".into(), "/data/M1/x".into())),
            ..ready()
        };
        let e = refusal(&running, &request("M2"));
        assert_eq!(e.code(), ErrorCode::AlreadyRunning);
        assert!(e.to_string().contains("stop it first"), "{e}");
        let stopping = StartFacts {
            running_is_stopping: true,
            ..running.clone()
        };
        let e = refusal(&stopping, &request("M2"));
        assert_eq!(e.code(), ErrorCode::Busy);
        assert!(e.to_string().contains("start again in a moment"), "{e}");

        let e = refusal(&ready(), &request("../etc"));
        assert_eq!(e.code(), ErrorCode::InvalidMouse);

        let unplugged = StartFacts {
            link: Some(LinkState::Lost),
            link_detail: Some("unplugged".into()),
            ..ready()
        };
        let e = refusal(&unplugged, &request("M2"));
        assert_eq!(e.code(), ErrorCode::DeviceUnavailable);
        assert!(e.to_string().contains("unplugged") && e.to_string().contains("serial_port"));

        let silent = StartFacts {
            rig_now_us: 0,
            ..ready()
        };
        assert!(matches!(
            refusal(&silent, &request("M2")),
            StartError::NoSampleYet
        ));

        let sated = StartFacts {
            water_today_ul: cfg.safety.max_water_per_day_ul,
            ..ready()
        };
        let e = refusal(&sated, &request("M2"));
        assert_eq!(e.code(), ErrorCode::RefusedBySafety);
        assert!(e.to_string().contains("max_water_per_day_ul"), "{e}");

        let damaged = StartFacts {
            water_history_problem: Some("summary.json: water_ul = -1e9 ...".into()),
            ..ready()
        };
        let e = refusal(&damaged, &request("M2"));
        assert_eq!(e.code(), ErrorCode::RefusedBySafety);

        let full = StartFacts {
            free_bytes: Some(MIN_FREE_BYTES - 1),
            ..ready()
        };
        let e = refusal(&full, &request("M2"));
        assert_eq!(e.code(), ErrorCode::RefusedBySafety);
        assert!(e.to_string().contains("No space left"), "{e}");
    }

    #[test]
    fn overrides_are_checked_by_the_files_rules() {
        let mut req = request("M2");
        req.task = Some(TaskOverrides {
            threshold_mm: Some(-1.0),
            ..TaskOverrides::default()
        });
        let e = refusal(&ready(), &req);
        assert_eq!(e.code(), ErrorCode::BadRequest);
        assert!(e.to_string().contains("task.threshold_mm"), "{e}");
        req.task = Some(TaskOverrides {
            threshold_mm: Some(1.5),
            ..TaskOverrides::default()
        });
        let plan = SessionPlan::new(&RigConfig::default(), &req, &ready()).unwrap();
        assert_eq!(plan.cfg.task.threshold_mm, 1.5);
    }
}
