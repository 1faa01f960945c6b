//! The `rig.toml` schema: one struct per section, every key with a documented
//! default so that an empty file is a complete configuration.
//!
//! Units are in the key names (`_ms`, `_mm`, `_ul`, `_hz`, `_pct`, `_min`, `_s`).
//! The rules each value must satisfy live in [`crate::validate`] and are listed
//! in `docs/configuration.md`.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The whole configuration of one rig: every section of `rig.toml`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RigConfig {
    /// `[rig]`: the hardware: serial link, lever sampling, lever geometry.
    pub rig: RigSection,
    /// `[task]`: the lever-press task.
    pub task: TaskSection,
    /// `[valve]`: the water valve's calibration.
    pub valve: ValveSection,
    /// `[imaging]`: the two-photon frame ring and online dF/F.
    pub imaging: ImagingSection,
    /// `[storage]`: where and how sessions are written.
    pub storage: StorageSection,
    /// `[control]`: the experimenter's control socket.
    pub control: ControlSection,
    /// `[preview]`: the live preview web server.
    pub preview: PreviewSection,
    /// `[safety]`: caps that protect the mouse.
    pub safety: SafetySection,
    /// `[alerts]`: who hears about trouble when nobody is in the room.
    pub alerts: AlertsSection,
    /// `[realtime]`: how rigd keeps the press-to-valve path short.
    pub realtime: RealtimeSection,
    /// `[lab]`: the lab's time zone (which day a session belongs to).
    pub lab: LabSection,
    /// `[training]`: mouse records, the training protocol, the welfare rule.
    /// Absent: the rig runs any mouse id with its own `[task]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingSection>,
}

/// `[rig]`: the rig's hardware and the serial link to its microcontroller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RigSection {
    /// Rig name, `[A-Za-z0-9_-]{1,64}`. Default `"rig1"`.
    pub name: String,
    /// Serial device of the microcontroller. Default `"/dev/ttyACM0"`.
    pub serial_port: String,
    /// Serial baud rate (8N1). Default 1 000 000.
    pub baud: u32,
    /// Lever sampling rate on the device, Hz. Must divide 1 000 000 (the device
    /// samples on a microsecond timer) and be 1..=20 000. Default 1000.
    pub sample_rate_hz: u32,
    /// Lever samples per serial frame, 1..=`MAX_SAMPLES_PER_BATCH`. Default 1.
    pub samples_per_batch: u32,
    /// Encoder counts per millimetre of lever travel, > 0. Default 40 (an
    /// assumption: measure it on the rig).
    pub encoder_counts_per_mm: f64,
    /// Full lever travel, mm, > 0. Default 6.
    pub lever_travel_mm: f64,
}

impl Default for RigSection {
    fn default() -> Self {
        Self {
            name: "rig1".to_owned(),
            serial_port: "/dev/ttyACM0".to_owned(),
            baud: 1_000_000,
            sample_rate_hz: 1000,
            samples_per_batch: 1,
            encoder_counts_per_mm: 40.0,
            lever_travel_mm: 6.0,
        }
    }
}

impl RigSection {
    /// Microseconds between two lever samples (`1_000_000 / sample_rate_hz`),
    /// or `None` for a rate of 0 (which validation rejects).
    pub fn sample_period_us(&self) -> Option<u32> {
        1_000_000u32.checked_div(self.sample_rate_hz)
    }

    /// Lever displacement in encoder counts for `mm` millimetres.
    pub fn mm_to_counts(&self, mm: f64) -> f64 {
        mm * self.encoder_counts_per_mm
    }

    /// Lever displacement in millimetres for `counts` encoder counts.
    pub fn counts_to_mm(&self, counts: f64) -> f64 {
        counts / self.encoder_counts_per_mm
    }
}

/// Default `task.quiescence_ms`: the lab's analysis counts a trial as cued
/// only when the lever was still for the 100 ms before the cue, so with
/// this wait every cue is one, and a press already under way
/// when the ITI ends is never met (and rewarded) by a cue.
pub const DEFAULT_QUIESCENCE_MS: u32 = 100;

/// `[task]`: the lever-press task (inter-trial interval, cue, response window,
/// reward or miss).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskSection {
    /// Cue tone frequency, Hz, 1000..=40 000. Default 6000.
    pub cue_tone_hz: u32,
    /// Cue tone duration, ms, 1..=60 000. Default 1000.
    pub cue_duration_ms: u32,
    /// Cue tone level, percent of the speaker's full scale, 0..=100. Default 80.
    pub cue_level_pct: u32,
    /// Time after cue onset in which a press earns a reward, ms, 1..=600 000.
    /// Default 10 000.
    pub response_window_ms: u32,
    /// Lever displacement that counts as a press, mm, > 0 and <
    /// `rig.lever_travel_mm`. Default 1.5.
    pub threshold_mm: f64,
    /// Shortest inter-trial interval, ms, <= `iti_max_ms`. Default 3000.
    pub iti_min_ms: u32,
    /// Longest inter-trial interval, ms, <= 600 000. Default 6000.
    pub iti_max_ms: u32,
    /// Whether a press during the ITI restarts it. Default false.
    pub iti_press_restarts: bool,
    /// The lever must be still this long before the cue, ms, 0 (off)..=60 000.
    /// Default [`DEFAULT_QUIESCENCE_MS`].
    pub quiescence_ms: u32,
    /// Water per reward, µL, inside the valve calibration's range. Default 4.
    pub reward_ul: f64,
    /// Extra wait after a miss, ms, 0..=600 000. Default 2000.
    pub miss_timeout_ms: u32,
    /// Stop after this many trials; absent = no limit; > 0 if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_trials: Option<u32>,
    /// Stop after this many rewards; absent = no limit; > 0 if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rewards: Option<u32>,
    /// Stop after this many minutes; absent = no limit; > 0 if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_duration_min: Option<u32>,
    /// Stop (between trials) when the mouse has not pressed for this many
    /// minutes: it is sated. Absent = never; 1..=1440 if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sated_after_min: Option<u32>,
    /// Who decides the reward at the threshold crossing: `"device"` (the
    /// host arms the threshold at the cue, the microcontroller opens the
    /// valve at the crossing and the host audits it) or `"host"` (the host
    /// sees the crossing sample and sends the pulse). Default `"device"`.
    pub reward_decision: RewardDecision,
}

/// `task.reward_decision`: who opens the valve at the crossing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardDecision {
    /// The device, armed by the host (protocol version 2): the valve opens
    /// within microseconds of the crossing whatever the host is doing.
    #[default]
    Device,
    /// The host, from the lever samples it receives.
    Host,
}

impl RewardDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Host => "host",
        }
    }
}

impl Default for TaskSection {
    fn default() -> Self {
        Self {
            cue_tone_hz: 6000,
            cue_duration_ms: 1000,
            cue_level_pct: 80,
            response_window_ms: 10_000,
            threshold_mm: 1.5,
            iti_min_ms: 3000,
            iti_max_ms: 6000,
            iti_press_restarts: false,
            quiescence_ms: DEFAULT_QUIESCENCE_MS,
            reward_ul: 4.0,
            miss_timeout_ms: 2000,
            max_trials: None,
            max_rewards: None,
            max_duration_min: None,
            sated_after_min: None,
            reward_decision: RewardDecision::Device,
        }
    }
}

/// `[valve]`: the water valve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValveSection {
    /// Measured points of the valve's open-time to volume curve, at least 2,
    /// `open_ms` and `volume_ul` both strictly increasing. Between points the
    /// curve is linear; outside them it is not defined. Default:
    /// [`ValveSection::EXAMPLE_CALIBRATION`], which is an example only.
    pub calibration: Vec<CalibrationPoint>,
    /// A calibration file written by `rigctl calibrate valve`, relative to
    /// this file's folder (or absolute). When set and present, its points
    /// replace `calibration` and its date is `calibrated_utc`; when set and
    /// missing, loading warns and `calibration` is used. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration_file: Option<String>,
    /// When the calibration was weighed, `YYYY-MM-DD` or RFC 3339 UTC.
    /// Taken from the calibration file when there is one. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibrated_utc: Option<String>,
    /// rigd warns (at start, at every session start, and in
    /// `rigd_valve_calibration_age_days`) when the calibration is older than
    /// this, days, 1..=3650. Default 30.
    pub max_calibration_age_days: u32,
}

/// One measured point of the valve calibration: opening the valve for
/// `open_ms` delivers `volume_ul`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationPoint {
    /// Valve open time, ms.
    pub open_ms: f64,
    /// Water delivered per opening, µL.
    pub volume_ul: f64,
}

impl ValveSection {
    /// The calibration used when the file sets none. A plausible example, not a
    /// measurement: loading a file without `[[valve.calibration]]` warns.
    pub const EXAMPLE_CALIBRATION: [CalibrationPoint; 3] = [
        CalibrationPoint {
            open_ms: 20.0,
            volume_ul: 2.0,
        },
        CalibrationPoint {
            open_ms: 40.0,
            volume_ul: 4.2,
        },
        CalibrationPoint {
            open_ms: 80.0,
            volume_ul: 8.6,
        },
    ];
}

impl Default for ValveSection {
    fn default() -> Self {
        Self {
            calibration: Self::EXAMPLE_CALIBRATION.to_vec(),
            calibration_file: None,
            calibrated_utc: None,
            max_calibration_age_days: 30,
        }
    }
}

/// `[imaging]`: the microscope's shared-memory frame ring and online dF/F.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImagingSection {
    /// Whether to read frames at all. Default true.
    pub enabled: bool,
    /// POSIX shared-memory name of the frame ring: starts with `/`, no other
    /// `/`, 2..=255 characters. Default `"/rigd-frames"`.
    pub shm_name: String,
    /// Frame width, pixels, 1..=8192. Default 512.
    pub width: u32,
    /// Frame height, pixels, 1..=8192. Default 512.
    pub height: u32,
    /// Colour channels per frame, 1 or 2. Default 1.
    pub channels: u32,
    /// Nominal frame rate, Hz, > 0 and <= 1000. Default 28.7.
    pub frame_rate_hz: f64,
    /// Whether the microscope's frame-clock TTL is wired to the device.
    /// Default true.
    pub ttl_wired: bool,
    /// ROI label image (one integer label per pixel). Absent = no ROIs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roi_labels: Option<PathBuf>,
    /// ROI table (names, cell types). Absent = none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roi_table: Option<PathBuf>,
    /// Rigid motion correction against a reference image. Default true.
    pub motion_correction: bool,
    /// Reference image for motion correction. Absent = built from the first
    /// frames of the session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_image: Option<PathBuf>,
    /// Neuropil coefficient r in F - r * Fneu, 0..=1. Default 0.7.
    pub neuropil_coefficient: f64,
    /// Size of one pixel in the sample, µm (> 0, <= 100). Absent = unknown:
    /// shifts are then given in pixels only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pixel_size_um: Option<f64>,
    /// `[imaging.baseline]`: the causal F0 estimate.
    pub baseline: BaselineSection,
    /// `[imaging.fov_check]`: the field of view against the mouse's
    /// reference at each start.
    pub fov_check: FovCheckSection,
}

impl Default for ImagingSection {
    fn default() -> Self {
        Self {
            enabled: true,
            shm_name: "/rigd-frames".to_owned(),
            width: 512,
            height: 512,
            channels: 1,
            frame_rate_hz: 28.7,
            ttl_wired: true,
            roi_labels: None,
            roi_table: None,
            motion_correction: true,
            reference_image: None,
            neuropil_coefficient: 0.7,
            pixel_size_um: None,
            baseline: BaselineSection::default(),
            fov_check: FovCheckSection::default(),
        }
    }
}

/// `[imaging.fov_check]`: before the task starts, the mean of the first
/// frames is registered against the imaging reference (the mouse's, or the
/// rig's `reference_image`); a shift, rotation or correlation beyond these
/// limits warns or refuses the start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FovCheckSection {
    /// Check at all (when there is a reference). Default true.
    pub enabled: bool,
    /// Frames averaged for the check, 1..=1000. Default 60 (about 2 s at
    /// 28.7 Hz).
    pub frames: u32,
    /// Longest wait for those frames, s, 1..=120. Default 10.
    pub timeout_s: f64,
    /// Largest shift accepted, px, > 0. Default 8 (well under a cell body
    /// at 512 x 512; an assumption, set it for your objective and zoom).
    pub max_shift_px: f64,
    /// Largest shift accepted, µm: replaces `max_shift_px` when set (needs
    /// `[imaging].pixel_size_um`). No default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_shift_um: Option<f64>,
    /// Largest rotation accepted, degrees, 0..=10. Default 2.
    pub max_rotation_deg: f64,
    /// Smallest correlation with the reference accepted (after the shift
    /// and rotation are undone), 0..=1. Default 0.5.
    pub min_correlation: f64,
    /// What a check beyond the limits (or one that cannot be made) does:
    /// `"refuse"` the start, or `"warn"` and start. Default `"refuse"`.
    pub on_fail: FovAction,
}

impl Default for FovCheckSection {
    fn default() -> Self {
        Self {
            enabled: true,
            frames: 60,
            timeout_s: 10.0,
            max_shift_px: 8.0,
            max_shift_um: None,
            max_rotation_deg: 2.0,
            min_correlation: 0.5,
            on_fail: FovAction::Refuse,
        }
    }
}

/// What a field-of-view check beyond its limits does to the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FovAction {
    /// Refuse the start (the operator moves the stage, or starts again
    /// with `--accept-fov`).
    Refuse,
    /// Start, and say so (in the answer, the log and session.toml).
    Warn,
}

/// `[imaging.baseline]`: how F0 is estimated from a trailing window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BaselineSection {
    /// `"maximin"` or `"percentile"`. Default `"maximin"`.
    pub method: BaselineMethod,
    /// Trailing window, s, > 0. Default 60.
    pub window_s: f64,
    /// Percentile for the `percentile` method, >= 0 and < 100. Default 8.
    pub percentile: f64,
    /// Gaussian smoothing before the window filter, frames, >= 0. Default 10.
    pub smoothing_sigma_frames: f64,
}

impl Default for BaselineSection {
    fn default() -> Self {
        Self {
            method: BaselineMethod::Maximin,
            window_s: 60.0,
            percentile: 8.0,
            smoothing_sigma_frames: 10.0,
        }
    }
}

/// The baseline (F0) estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaselineMethod {
    /// Smooth, then a minimum filter, then a maximum filter over the window.
    Maximin,
    /// A low percentile of the smoothed trace over the window.
    Percentile,
}

/// `[storage]`: where session folders go and how they are written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    /// Root of the session folders, an absolute path.
    /// Default `"/var/lib/rigd/sessions"`.
    pub data_root: PathBuf,
    /// Whether to store every raw frame as well. Default false.
    pub raw_frames: bool,
    /// Longest time between two syncs of the session files to disk, ms,
    /// 1..=1000 (a crash loses at most one second). Default 1000.
    pub fsync_interval_ms: u32,
    /// Every `.npy` stream of a session (`lever.npy`, `frames.npy`, `f.npy`,
    /// `dff.npy`) rolls into a new chunk file (`lever.001.npy`, ...) each time
    /// the session's rig time crosses a multiple of this many minutes,
    /// 1..=1440. Default 60.
    pub chunk_minutes: u32,
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            data_root: PathBuf::from("/var/lib/rigd/sessions"),
            raw_frames: false,
            fsync_interval_ms: 1000,
            chunk_minutes: 60,
        }
    }
}

/// `[control]`: the control socket `rigctl` talks to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlSection {
    /// Unix socket path, absolute, at most 107 bytes.
    /// Default `"/run/rigd/rigd.sock"`.
    pub socket: PathBuf,
    /// Socket file permissions, <= 0o777 and not world-writable. Default 0o660.
    pub mode: u32,
    /// Group to own the socket. Absent = the daemon's group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl Default for ControlSection {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/rigd/rigd.sock"),
            mode: 0o660,
            group: None,
        }
    }
}

/// `[preview]`: the live preview web server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreviewSection {
    /// Whether to serve the preview. Default true.
    pub enabled: bool,
    /// Address to listen on, an IP address. Default `"127.0.0.1"`.
    pub bind: String,
    /// TCP port, != 0. Default 8787.
    pub port: u16,
    /// Must be true to listen on anything but loopback. Default false.
    pub allow_non_loopback: bool,
}

impl Default for PreviewSection {
    fn default() -> Self {
        Self {
            enabled: true,
            bind: "127.0.0.1".to_owned(),
            port: 8787,
            allow_non_loopback: false,
        }
    }
}

impl PreviewSection {
    /// The bind address, if it parses (validation guarantees it does).
    pub fn bind_addr(&self) -> Option<IpAddr> {
        self.bind.parse().ok()
    }
}

/// `[safety]`: limits that protect the mouse, enforced by the device (valve
/// time, heartbeat) and by the host (water, session length).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SafetySection {
    /// Longest reward pulse the device will open the valve for, ms, 1..=5000.
    /// Default 200.
    pub max_valve_open_ms: u32,
    /// Longest manual flush (`ValveOpen`), ms, 1..=60 000. Default 5000.
    pub max_flush_ms: u32,
    /// Host heartbeat period, ms, 1..=10 000. Default 100.
    pub heartbeat_interval_ms: u32,
    /// The device goes to its safe state after this long without a heartbeat,
    /// ms, >= 2 x `heartbeat_interval_ms`. Default 500.
    pub heartbeat_timeout_ms: u32,
    /// Water cap per session, µL, > 0 and <= `max_water_per_day_ul`.
    /// Default 1000.
    pub max_water_per_session_ul: f64,
    /// Water cap per mouse per day, µL, > 0. Default 1500.
    pub max_water_per_day_ul: f64,
    /// Longest session, min, 1..=1440. Default 120.
    pub max_session_min: u32,
    /// Daily water the mouse should get (supplement after the session).
    /// Absent = not tracked; > 0 and <= `max_water_per_day_ul` if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_water_target_ul: Option<f64>,
}

impl Default for SafetySection {
    fn default() -> Self {
        Self {
            max_valve_open_ms: 200,
            max_flush_ms: 1000,
            heartbeat_interval_ms: 100,
            heartbeat_timeout_ms: 500,
            max_water_per_session_ul: 1000.0,
            max_water_per_day_ul: 1500.0,
            max_session_min: 120,
            daily_water_target_ul: None,
        }
    }
}

/// `[alerts]`: a command run for every alert (a valve safety trip, the device
/// lost for long, a disk nearly full, a session stopped automatically), with
/// the alert as one JSON object on its standard input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsSection {
    /// Shell command (run with `/bin/sh -c`); absent = alerts are only
    /// logged and counted. No default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Alert when the rig has been unreachable this long, s, 1..=86 400.
    /// Default 30.
    pub device_lost_s: u32,
    /// Alert when the data root has less free space than this, MB, >= 1.
    /// Default 2048.
    pub disk_free_min_mb: u64,
    /// The command is killed if it runs longer than this, s, 1..=600.
    /// Default 30.
    pub command_timeout_s: u32,
}

impl Default for AlertsSection {
    fn default() -> Self {
        Self {
            command: None,
            device_lost_s: 30,
            disk_free_min_mb: 2048,
            command_timeout_s: 30,
        }
    }
}

/// `[realtime]`: the host settings on the press-to-valve path (serial reader
/// priority, CPU idle states, the kernel's tty workers). Each needs a
/// privilege (root, `CAP_SYS_NICE`, write access to `/dev/cpu_dma_latency`);
/// without it rigd says so and runs without. See docs/performance.md for
/// what each is worth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RealtimeSection {
    /// `SCHED_FIFO` priority of the serial reader thread, which runs the task
    /// engine, 1..=98; 0 = an ordinary thread. Default 50.
    pub reader_priority: u32,
    /// Lock rigd's memory (`mlockall`) so the reward path's code is never
    /// paged out between trials. Needs `CAP_IPC_LOCK` or an unlimited
    /// `RLIMIT_MEMLOCK`. Default true.
    pub lock_memory: bool,
    /// While a session runs, ask the kernel (through `/dev/cpu_dma_latency`)
    /// to keep idle CPUs out of sleep states, so a byte from the rig wakes
    /// the reader at once. Costs power while the session runs. Default true.
    pub hold_cpus_awake: bool,
    /// While a session runs, give the kernel's unbound worker threads
    /// (`kworker/u*`, which move serial bytes from the driver to the reader)
    /// `SCHED_FIFO` priority 1, so busy programs cannot delay them; restored
    /// at the stop. Default false: the same workers run the kernel's
    /// writeback, which at a real-time priority can starve rigd's storage and
    /// imaging threads under heavy disk traffic.
    pub boost_tty_workers: bool,
}

impl Default for RealtimeSection {
    fn default() -> Self {
        Self {
            reader_priority: 50,
            lock_memory: true,
            hold_cpus_awake: true,
            boost_tty_workers: false,
        }
    }
}

/// `[lab]`: facts about the lab the rig is in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LabSection {
    /// The lab's IANA time zone (`"America/Los_Angeles"`): session folder
    /// names, "today" for the daily water cap and ledger, and the training
    /// day are in this zone. Default `"UTC"`.
    pub timezone: String,
}

impl Default for LabSection {
    fn default() -> Self {
        Self {
            timezone: "UTC".to_owned(),
        }
    }
}

/// What the rig does about a weight below the welfare threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LowWeightAction {
    /// Start, and say so (in the answer, the log and session.toml).
    Warn,
    /// Refuse the start.
    Refuse,
}

/// `[training]`: training across days (docs/training.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingSection {
    /// The training protocol file (stages and their rules). Absent: the
    /// rig's `[task]` for every session, no stages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<PathBuf>,
    /// Refuse a start for a mouse without `<data_root>/<mouse>/subject.toml`.
    /// Default true.
    pub require_subject: bool,
    /// Refuse a start without `--weight-g`. Default false.
    pub require_weight: bool,
    /// The welfare threshold: a weight below this share of the mouse's
    /// baseline weight, %, 50..=100. Default 80.
    pub min_weight_pct: f64,
    /// `"refuse"` (default) or `"warn"` below the threshold.
    pub low_weight: LowWeightAction,
}

impl Default for TrainingSection {
    fn default() -> Self {
        Self {
            protocol: None,
            require_subject: true,
            require_weight: false,
            min_weight_pct: 80.0,
            low_weight: LowWeightAction::Refuse,
        }
    }
}
