//! The virtual rig: a simulated microcontroller, lever, mouse and two-photon
//! microscope that speak the rig's serial protocol (`docs/protocol.md`,
//! section 1) on a real pty and publish frames into a real shared-memory frame
//! ring, with the ground truth to check the daemon against. It is a stand-in for
//! hardware only: it never runs task logic and is never on rigd's own data
//! path (the daemon uses it for `rigd demo` and tests, nothing else).
//!
//! * [`clock`]: true time, the device clock (offset, drift, 32-bit wrap) and
//!   the link latency model.
//! * [`device`]: the firmware as a pure state machine (time and bytes in,
//!   frames out).
//! * [`mouse`]: the lever physics and the simulated mouse (naive to expert).
//! * [`microscope`]: the synthetic calcium movie and its ground truth.
//! * [`truth`]: the ground-truth log.
//! * [`rng`]: the workspace's one seeded random number generator.
//! * [`run`] / [`spawn`]: the real-time loop on one thread that joins them on a
//!   pty, with link latency and scheduled faults (unplug, silence, garbage,
//!   reboot).
//!
//! Architecture invariant: the device state machine reads no clock; only the
//! runner looks at `CLOCK_MONOTONIC`, and it hands the device its own time.

#![forbid(unsafe_code)]

pub mod clock;
pub mod device;
pub mod microscope; // [microscope hook] the simulated two-photon microscope
pub mod mouse;
mod pty;
pub mod rng;
mod runner;
pub mod truth;
pub mod valve;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use clock::{LatencyModel, SimClock};
pub use device::{Device, DeviceIo, DeviceStatus, DigitalInput, Firmware, OutputChange};
pub use mouse::{Behaviour, LeverSpec, Mouse};
pub use pty::LinkError;
pub use truth::{TruthEvent, TruthLog, TRUTH_HEADER};
pub use valve::ValveModel;

/// A fault scheduled at a sim true time (seconds since the simulator started).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FaultSpec {
    /// `unplug@T:D`: close the pty and remove the link at T; after D seconds
    /// make a new pty behind the same link. The device keeps running (its clock,
    /// its watchdog); only its receive buffer is lost.
    Unplug { at_s: f64, duration_s: f64 },
    /// `silent@T:D`: keep the port open but send nothing and ignore input for D
    /// seconds. Frames produced meanwhile are dropped and counted.
    Silent { at_s: f64, duration_s: f64 },
    /// `garbage@T:N`: write N random bytes between two frames.
    Garbage { at_s: f64, bytes: usize },
    /// `reboot@T`: the device restarts (counter from 0, `Hello`, not streaming).
    Reboot { at_s: f64 },
    /// `clockstep@T:D`: from T on, every timestamp the device sends is D
    /// seconds off (D < 0: its clock stepped back; D > 0: it jumped
    /// forward); its sampling and timing go on unchanged.
    ClockStep { at_s: f64, step_s: f64 },
    /// `pastbatch@T:D`: the first lever batch after T is stamped D seconds
    /// in the past (the batches after it are right).
    PastBatch { at_s: f64, by_s: f64 },
    /// `dupbatch@T`: the first lever batch after T is sent twice.
    DuplicateBatch { at_s: f64 },
    /// `dropreport@T`: the first `RewardFired` after T is lost on the wire
    /// (never sent; the valve opens, and a `Disarm` of its tag repeats it).
    DropReport { at_s: f64 },
    /// `hold@T:D`: from T for D seconds the mouse holds the lever 2.4 mm
    /// down ([`HOLD_MM`]); its own presses go on over it.
    Hold { at_s: f64, duration_s: f64 },
    /// `jiggle@T:D`: from T for D seconds the lever is pushed 1 mm down
    /// every other 100 ms: never still.
    Jiggle { at_s: f64, duration_s: f64 },
}

/// How far `hold@T:D` holds the lever down, mm (the held lever).
pub const HOLD_MM: f64 = 2.4;

impl FaultSpec {
    /// When it happens, true seconds.
    pub fn at_s(&self) -> f64 {
        match *self {
            Self::Unplug { at_s, .. }
            | Self::Silent { at_s, .. }
            | Self::Garbage { at_s, .. }
            | Self::Reboot { at_s }
            | Self::ClockStep { at_s, .. }
            | Self::PastBatch { at_s, .. }
            | Self::DuplicateBatch { at_s }
            | Self::DropReport { at_s }
            | Self::Hold { at_s, .. }
            | Self::Jiggle { at_s, .. } => at_s,
        }
    }
}

impl fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Unplug { at_s, duration_s } => write!(f, "unplug@{at_s}:{duration_s}"),
            Self::Silent { at_s, duration_s } => write!(f, "silent@{at_s}:{duration_s}"),
            Self::Garbage { at_s, bytes } => write!(f, "garbage@{at_s}:{bytes}"),
            Self::Reboot { at_s } => write!(f, "reboot@{at_s}"),
            Self::ClockStep { at_s, step_s } => write!(f, "clockstep@{at_s}:{step_s}"),
            Self::PastBatch { at_s, by_s } => write!(f, "pastbatch@{at_s}:{by_s}"),
            Self::DuplicateBatch { at_s } => write!(f, "dupbatch@{at_s}"),
            Self::DropReport { at_s } => write!(f, "dropreport@{at_s}"),
            Self::Hold { at_s, duration_s } => write!(f, "hold@{at_s}:{duration_s}"),
            Self::Jiggle { at_s, duration_s } => write!(f, "jiggle@{at_s}:{duration_s}"),
        }
    }
}

const FAULT_FORMS: &str = "unplug@T:D, silent@T:D, garbage@T:N, reboot@T, clockstep@T:D, \
                           pastbatch@T:D, dupbatch@T, dropreport@T, hold@T:D or jiggle@T:D (T, D in seconds; clockstep's D may be < 0)";

/// Which form of fault spec was expected (the error message lists them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultForm {
    /// `--fault`: `KIND@T[:ARG]`.
    Timed,
    /// `--fault-on`: `KIND@valveN[:ARG]` or `KIND@cueN[:ARG]`.
    Triggered,
}

impl fmt::Display for FaultForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timed => f.write_str(FAULT_FORMS),
            Self::Triggered => write!(
                f,
                "KIND@valveN:ARG or KIND@cueN:ARG, KIND one of {FAULT_FORMS}"
            ),
        }
    }
}

/// A `--fault` or `--fault-on` spec that could not be read: the spec, what is
/// wrong with it and the forms expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fault '{spec}': {problem}; expected {expected}")]
pub struct FaultSpecError {
    pub spec: String,
    pub problem: FaultProblem,
    pub expected: FaultForm,
}

/// What is wrong with a fault spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultProblem {
    #[error("missing '@'")]
    MissingAt,
    #[error("{what} '{value}' is not a number of seconds >= 0")]
    NotSeconds { what: &'static str, value: String },
    #[error("missing ':{0}'")]
    MissingArgument(&'static str),
    #[error("the duration must be > 0")]
    ZeroDuration,
    #[error("byte count '{0}' must be 1..=1000000")]
    ByteCount(String),
    #[error("reboot, dupbatch and dropreport take no ':' argument")]
    RebootArgument,
    #[error("unknown fault '{0}'")]
    UnknownKind(String),
    #[error("'{0}': N must be a whole number >= 1")]
    TriggerCount(String),
    #[error("'{0}' is neither valveN nor cueN")]
    UnknownTrigger(String),
}

impl FromStr for FaultSpec {
    type Err = FaultSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |problem| FaultSpecError {
            spec: s.to_string(),
            problem,
            expected: FaultForm::Timed,
        };
        let (kind, rest) = s
            .split_once('@')
            .ok_or_else(|| bad(FaultProblem::MissingAt))?;
        let (at, arg) = match rest.split_once(':') {
            Some((a, b)) => (a, Some(b)),
            None => (rest, None),
        };
        let secs = |v: &str, what: &'static str| match v.trim().parse::<f64>() {
            Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
            _ => Err(bad(FaultProblem::NotSeconds {
                what,
                value: v.to_string(),
            })),
        };
        let at_s = secs(at, "time")?;
        let need_arg = |what| arg.ok_or_else(|| bad(FaultProblem::MissingArgument(what)));
        match kind.trim() {
            "unplug" | "silent" | "hold" | "jiggle" => {
                let duration_s = secs(need_arg("D")?, "duration")?;
                if duration_s <= 0.0 {
                    return Err(bad(FaultProblem::ZeroDuration));
                }
                Ok(match kind.trim() {
                    "unplug" => Self::Unplug { at_s, duration_s },
                    "silent" => Self::Silent { at_s, duration_s },
                    "hold" => Self::Hold { at_s, duration_s },
                    _ => Self::Jiggle { at_s, duration_s },
                })
            }
            "garbage" => {
                let n = need_arg("N")?;
                let bytes = n
                    .trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&b| (1..=1_000_000).contains(&b))
                    .ok_or_else(|| bad(FaultProblem::ByteCount(n.to_string())))?;
                Ok(Self::Garbage { at_s, bytes })
            }
            "reboot" | "dupbatch" | "dropreport" => {
                if arg.is_some() {
                    return Err(bad(FaultProblem::RebootArgument));
                }
                Ok(match kind.trim() {
                    "reboot" => Self::Reboot { at_s },
                    "dupbatch" => Self::DuplicateBatch { at_s },
                    _ => Self::DropReport { at_s },
                })
            }
            "pastbatch" => {
                let by_s = secs(need_arg("D")?, "duration")?;
                if by_s <= 0.0 {
                    return Err(bad(FaultProblem::ZeroDuration));
                }
                Ok(Self::PastBatch { at_s, by_s })
            }
            "clockstep" => {
                let d = need_arg("D")?;
                let step_s = d
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x != 0.0 && x.abs() < 2147.0)
                    .ok_or_else(|| {
                        bad(FaultProblem::NotSeconds {
                            what: "step (non-zero, within +-2147 s)",
                            value: d.to_string(),
                        })
                    })?;
                Ok(Self::ClockStep { at_s, step_s })
            }
            other => Err(bad(FaultProblem::UnknownKind(other.to_string()))),
        }
    }
}

/// What a [`TriggeredFault`] waits for: the Nth (1-based) valve opening or
/// cue tone of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultTrigger {
    /// `valveN`: the moment the valve opens for the Nth time (mid-reward).
    Valve(u32),
    /// `cueN`: the moment the Nth tone starts (mid-trial, in its window).
    Cue(u32),
}

/// A fault applied at a device event instead of a time: `unplug@valve2:0.5`
/// unplugs the cable the moment the valve opens for the second time (the
/// fault's own time is ignored).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TriggeredFault {
    pub on: FaultTrigger,
    pub fault: FaultSpec,
}

impl FromStr for TriggeredFault {
    type Err = FaultSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |problem| FaultSpecError {
            spec: s.to_string(),
            problem,
            expected: FaultForm::Triggered,
        };
        let (kind, rest) = s
            .split_once('@')
            .ok_or_else(|| bad(FaultProblem::MissingAt))?;
        let (when, arg) = match rest.split_once(':') {
            Some((a, b)) => (a, Some(b)),
            None => (rest, None),
        };
        let nth = |digits: &str| {
            digits
                .parse::<u32>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| bad(FaultProblem::TriggerCount(when.to_string())))
        };
        let on = if let Some(n) = when.strip_prefix("valve") {
            FaultTrigger::Valve(nth(n)?)
        } else if let Some(n) = when.strip_prefix("cue") {
            FaultTrigger::Cue(nth(n)?)
        } else {
            return Err(bad(FaultProblem::UnknownTrigger(when.to_string())));
        };
        let timed = match arg {
            Some(a) => format!("{kind}@0:{a}"),
            None => format!("{kind}@0"),
        };
        Ok(Self {
            on,
            fault: timed.parse()?,
        })
    }
}

/// Everything the simulator can be told. [`SimOptions::new`] gives the
/// defaults of the `rig-sim` command line.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOptions {
    /// Where to put the symlink to the pty's slave device.
    pub link: PathBuf,
    /// Ground-truth TSV, if wanted.
    pub truth: Option<PathBuf>,
    pub seed: u64,
    /// Device clock at start (`offset_us`), drift and speed.
    pub clock: SimClock,
    /// The firmware: protocol version, caps, device id.
    pub firmware: Firmware,
    /// Training day 1..=14 (naive to expert); also the valve's drift
    /// ([`ValveModel::on_day`]).
    pub day: u8,
    /// The mouse learns from experience instead: its rewarded trials before
    /// this run (its skill rises with every reward; see `mouse::experience`).
    pub prior_rewards: Option<u64>,
    /// The experience model's time constant, rewards (`mouse::LEARNING_REWARDS`).
    pub learning_rewards: f64,
    pub lever: LeverSpec,
    /// Lever position whose upward crossings the truth log records, mm.
    pub truth_threshold_mm: f64,
    /// Microscope frame clock, Hz (0: none).
    pub frame_rate_hz: f64,
    /// One-way latency of the link, both directions, host µs.
    pub latency: LatencyModel,
    pub faults: Vec<FaultSpec>,
    /// Faults applied at the Nth valve opening or cue.
    pub triggered_faults: Vec<TriggeredFault>,
    /// The mouse is sated after this many drinks (valve openings): it stops
    /// pressing. `None`: never.
    pub sated_after_drinks: Option<u32>,
    /// Stop after this much true time.
    pub duration_s: Option<f64>,
    /// Bytes the device can hold back when the host does not read (its
    /// transmit buffer); beyond that it drops frames and counts them.
    pub tx_buffer_bytes: usize,
    /// No status lines on stderr (the start line is still printed).
    pub quiet: bool,
    /// Spin (instead of sleeping) the last this-many µs before each device
    /// deadline, so samples go out on time as from a microcontroller's timer
    /// interrupt. 0 = off (default): timed sleeps only, no busy CPU.
    pub precise_wake_us: u32,
    /// [microscope hook] The simulated microscope, rendered at the frame-clock
    /// TTL edges (`--microscope`); `None`: no imaging.
    pub microscope: Option<microscope::live::MicroscopeOptions>,
}

impl SimOptions {
    /// Defaults, with the link at `link`.
    pub fn new(link: impl Into<PathBuf>) -> Self {
        Self {
            link: link.into(),
            truth: None,
            seed: 1,
            clock: SimClock::default(),
            firmware: Firmware::default(),
            day: 14,
            prior_rewards: None,
            learning_rewards: mouse::LEARNING_REWARDS,
            lever: LeverSpec::default(),
            truth_threshold_mm: 1.5,
            frame_rate_hz: 28.7,
            latency: LatencyModel::ZERO,
            faults: Vec::new(),
            triggered_faults: Vec::new(),
            sated_after_drinks: None,
            duration_s: None,
            tx_buffer_bytes: 1024,
            quiet: false,
            precise_wake_us: 0,
            microscope: None, // [microscope hook]
        }
    }

    /// Check the values; the message names the option, the value and the rule.
    pub fn validate(&self) -> Result<(), SimError> {
        fn bad(option: &'static str, value: impl fmt::Display, rule: &str) -> Result<(), SimError> {
            Err(SimError::BadOption {
                option,
                value: value.to_string(),
                rule: rule.to_string(),
            })
        }
        let c = &self.clock;
        if !(c.speed.is_finite() && c.speed > 0.0 && c.speed <= 1000.0) {
            return bad("--speed", c.speed, "must be > 0 and <= 1000");
        }
        if !(c.drift_ppm.is_finite() && c.drift_ppm.abs() <= 10_000.0) {
            return bad("--drift-ppm", c.drift_ppm, "must be within ±10000");
        }
        if !(self.learning_rewards.is_finite() && self.learning_rewards >= 1.0) {
            return bad(
                "--learning-rewards",
                self.learning_rewards,
                "must be >= 1 (rewards to learn 63 % of the task)",
            );
        }
        if !(1..=14).contains(&self.day) {
            return bad("--day", self.day, "must be 1..=14");
        }
        let l = &self.lever;
        if !(l.travel_mm.is_finite() && l.travel_mm > 0.0 && l.travel_mm <= 100.0) {
            return bad("--lever-travel-mm", l.travel_mm, "must be > 0 and <= 100");
        }
        if !(l.counts_per_mm.is_finite() && l.counts_per_mm > 0.0 && l.counts_per_mm <= 1e6) {
            return bad("--counts-per-mm", l.counts_per_mm, "must be > 0");
        }
        let thr = self.truth_threshold_mm;
        if !(thr.is_finite() && thr > 0.0 && thr < l.travel_mm) {
            return bad(
                "--truth-threshold-mm",
                thr,
                &format!("must be > 0 and < the lever travel ({} mm)", l.travel_mm),
            );
        }
        if !(self.frame_rate_hz.is_finite() && (0.0..=10_000.0).contains(&self.frame_rate_hz)) {
            return bad(
                "--frame-rate-hz",
                self.frame_rate_hz,
                "must be 0 (off) ..= 10000",
            );
        }
        let lat = &self.latency;
        for (name, v) in [
            ("--latency-us", lat.base_us),
            ("--jitter-us", lat.jitter_us),
            ("--spike-us", lat.spike_us),
        ] {
            if !(v.is_finite() && (0.0..=10e6).contains(&v)) {
                return bad(name, v, "must be 0..=10000000 µs");
            }
        }
        if !(0.0..=1.0).contains(&lat.spike_prob) {
            return bad("--spike-prob", lat.spike_prob, "must be 0..=1");
        }
        if self.firmware.hard_max_valve_open_ms == 0 {
            return bad("--hard-max-valve-open-ms", 0, "must be > 0");
        }
        let rate = self.firmware.max_sample_rate_hz;
        if rate == 0 || rate > 1_000_000 {
            return bad("--max-sample-rate-hz", rate, "must be 1..=1000000");
        }
        if let Some(d) = self.duration_s {
            if !(d.is_finite() && d > 0.0) {
                return bad("--duration-s", d, "must be > 0");
            }
        }
        if self.tx_buffer_bytes < 64 {
            return bad("--tx-buffer-bytes", self.tx_buffer_bytes, "must be >= 64");
        }
        // [microscope hook]
        if let Some(m) = &self.microscope {
            m.validate(self.frame_rate_hz)?;
        }
        pty::check_link(&self.link)?;
        Ok(())
    }
}

/// Why the simulator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A value out of range: `--speed 0: must be > 0 and <= 1000`.
    #[error("{option} {value}: {rule}")]
    BadOption {
        option: &'static str,
        value: String,
        rule: String,
    },
    #[error("--link {0}")]
    Link(#[from] LinkError),
    #[error("cannot create a pty: {0}")]
    Pty(#[source] std::io::Error),
    #[error("--truth {path}: {source}")]
    Truth {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// [microscope hook] The microscope's options are refused or it could
    /// not start (ring, truth dir).
    #[error(transparent)]
    Microscope(#[from] microscope::MicroscopeError),
    #[error("the simulator thread panicked")]
    Panicked,
}

/// What the simulator did, returned when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Frames the device put on the wire (all boots).
    pub frames_sent: u64,
    /// Frames the device could not send (all boots).
    pub frames_dropped: u64,
    /// Bytes written to the pty.
    pub bytes_written: u64,
    /// Bytes read from the host (including those ignored while silent).
    pub host_bytes_in: u64,
    /// Garbage bytes injected.
    pub garbage_bytes: u64,
    pub reboots: u32,
    pub unplugs: u32,
    /// Times a host opened the port.
    pub host_opens: u32,
    /// Rows in the truth log.
    pub truth_rows: u64,
}

/// Run the simulator on this thread until `stop` is set, `duration_s` has
/// passed, or an error. The link is removed before it returns.
pub fn run(opts: &SimOptions, stop: &AtomicBool) -> Result<SimStats, SimError> {
    runner::Sim::new(opts)?.run(stop)
}

/// A simulator running on its own thread; dropping it stops it.
#[derive(Debug)]
pub struct SimHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<SimStats, SimError>>>,
    link: PathBuf,
    pty_path: PathBuf,
    start_host_ns: u64,
    clock: SimClock,
}

/// Start the simulator on a new thread. It returns once the pty and the link
/// exist, so the host can open the link right away.
pub fn spawn(opts: SimOptions) -> Result<SimHandle, SimError> {
    let sim = runner::Sim::new(&opts)?;
    let pty_path = sim.pty_path().to_path_buf();
    let start_host_ns = sim.start_host_ns();
    let clock = opts.clock;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("rig-sim".to_string())
        .spawn(move || sim.run(&stop2))
        .map_err(SimError::Pty)?;
    Ok(SimHandle {
        stop,
        thread: Some(thread),
        link: opts.link,
        pty_path,
        start_host_ns,
        clock,
    })
}

impl SimHandle {
    /// The symlink the host opens.
    pub fn link(&self) -> &Path {
        &self.link
    }

    /// The pty's slave device when the simulator started (a new one after an
    /// unplug).
    pub fn pty_path(&self) -> &Path {
        &self.pty_path
    }

    /// Host `CLOCK_MONOTONIC`, ns, at the simulator's true time 0: with
    /// [`SimClock::true_us_at_host_ns`] it maps a host timestamp (e.g.
    /// `firmware_bridge::link::host_now_ns()`) to true time, and so to the
    /// device clock, for checking a clock-sync estimate.
    pub fn start_host_ns(&self) -> u64 {
        self.start_host_ns
    }

    /// The simulator's clock (offset, drift, speed) of its first boot.
    pub fn clock(&self) -> SimClock {
        self.clock
    }

    /// Whether the simulator has stopped by itself (duration, error).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().map_or(true, |t| t.is_finished())
    }

    /// Stop it and wait for it.
    pub fn stop(mut self) -> Result<SimStats, SimError> {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }

    /// Wait until it stops by itself (needs `duration_s`).
    pub fn wait(mut self) -> Result<SimStats, SimError> {
        self.join()
    }

    fn join(&mut self) -> Result<SimStats, SimError> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| SimError::Panicked)?,
            None => Ok(SimStats::default()),
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse_and_print() {
        for (s, f) in [
            (
                "unplug@12.5:3",
                FaultSpec::Unplug {
                    at_s: 12.5,
                    duration_s: 3.0,
                },
            ),
            (
                "silent@1:0.5",
                FaultSpec::Silent {
                    at_s: 1.0,
                    duration_s: 0.5,
                },
            ),
            (
                "garbage@2:100",
                FaultSpec::Garbage {
                    at_s: 2.0,
                    bytes: 100,
                },
            ),
            ("reboot@30", FaultSpec::Reboot { at_s: 30.0 }),
        ] {
            assert_eq!(s.parse::<FaultSpec>(), Ok(f));
            assert_eq!(f.to_string().parse::<FaultSpec>(), Ok(f));
        }
        for bad in [
            "unplug",
            "unplug@x:1",
            "unplug@1",
            "unplug@1:0",
            "garbage@1:0",
            "garbage@1:-3",
            "reboot@1:2",
            "melt@1",
            "silent@-1:1",
        ] {
            let e = bad.parse::<FaultSpec>().expect_err(bad).to_string();
            assert!(e.contains(bad) && e.contains("expected"), "{e}");
        }
    }

    #[test]
    fn options_are_validated() {
        let dir = std::env::temp_dir();
        let ok = SimOptions::new(dir.join(format!("rig-sim-opt-{}", std::process::id())));
        assert!(ok.validate().is_ok());
        let mut o = ok.clone();
        o.clock.speed = 0.0;
        assert!(o
            .validate()
            .expect_err("invalid")
            .to_string()
            .contains("--speed 0"));
        let mut o = ok.clone();
        o.truth_threshold_mm = 7.0;
        assert!(o
            .validate()
            .expect_err("invalid")
            .to_string()
            .contains("--truth-threshold-mm 7"));
        let mut o = ok.clone();
        o.latency.spike_prob = 2.0;
        assert!(o.validate().is_err());
        // An existing regular file at --link is refused.
        let file = dir.join(format!("rig-sim-opt-file-{}", std::process::id()));
        std::fs::write(&file, b"x").expect("write");
        let o = SimOptions::new(&file);
        let e = o.validate().expect_err("invalid").to_string();
        assert!(e.contains("not a symlink"), "{e}");
        let _ = std::fs::remove_file(&file);
    }
}
