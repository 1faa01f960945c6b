//! What the link reports: [`LinkEvent`]s, the [`LostReason`] a connection
//! ended for, and the [`LeverBatch`] a sample frame becomes. Plain values;
//! [`super::state::LinkState`] makes them, the handler receives them.

use std::path::PathBuf;

use protocol::serial::{AckStatus, EventKind, FaultCode, Hello, MAX_SAMPLES_PER_BATCH};

use crate::sync::ClockFit;

/// A batch of lever samples on the rig clock. Owned and `Copy` so it can be
/// handed on without allocating.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeverBatch {
    /// Index of the first sample in the link's continuous sample count (it
    /// does not restart when the device is reconfigured after a reconnect;
    /// missing samples leave a hole, reported as [`LinkEvent::SampleGap`]).
    pub first_index: u64,
    /// Rig time of the first sample, µs.
    pub t_first_us: u64,
    pub period_us: u32,
    len: u8,
    counts: [i32; MAX_SAMPLES_PER_BATCH],
}

impl LeverBatch {
    /// A batch of the first [`MAX_SAMPLES_PER_BATCH`] of `counts` (a decoded
    /// frame never holds more).
    pub(crate) fn new(
        first_index: u64,
        t_first_us: u64,
        period_us: u32,
        counts: impl Iterator<Item = i32>,
    ) -> Self {
        let mut batch = Self {
            first_index,
            t_first_us,
            period_us,
            len: 0,
            counts: [0; MAX_SAMPLES_PER_BATCH],
        };
        for (i, c) in counts.enumerate().take(MAX_SAMPLES_PER_BATCH) {
            batch.counts[i] = c;
            batch.len = (i + 1) as u8;
        }
        batch
    }

    /// Encoder counts, oldest first.
    pub fn counts(&self) -> &[i32] {
        &self.counts[..usize::from(self.len)]
    }

    /// `(index, rig t_us, counts)` for each sample.
    pub fn samples(&self) -> impl Iterator<Item = (u64, u64, i32)> + '_ {
        self.counts().iter().enumerate().map(|(i, &c)| {
            let i = i as u64;
            (
                self.first_index + i,
                self.t_first_us + i * u64::from(self.period_us),
                c,
            )
        })
    }
}

/// Why the serial port could not be opened. Each names the port and what to
/// do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error(
        "serial port {} does not exist: check that the rig is plugged in and that \
         rig.serial_port in rig.toml names it (ls /dev/serial/by-id/)",
        .port.display()
    )]
    NotFound { port: PathBuf },
    #[error(
        "serial port {} refused access ({reason}): add rigd's user to the port's group \
         (usually dialout) or give it access with a udev rule",
        .port.display()
    )]
    PermissionDenied { port: PathBuf, reason: String },
    #[error(
        "serial port {} is unavailable ({reason}): another program may hold it (a serial \
         monitor, another rigd, ModemManager); close it, or replug the rig",
        .port.display()
    )]
    Unavailable { port: PathBuf, reason: String },
    #[error(
        "cannot open serial port {} at {baud} baud ({reason}): check rig.serial_port and \
         rig.baud in rig.toml",
        .port.display()
    )]
    Other {
        port: PathBuf,
        baud: u32,
        reason: String,
    },
    #[error(
        "serial port {} opened but its write handle could not be made ({reason}): the \
         system may be out of file descriptors (check rigd's LimitNOFILE)",
        .port.display()
    )]
    WriteHandle { port: PathBuf, reason: String },
}

impl OpenError {
    /// Classify a failed `open` of `port` at `baud`.
    pub(crate) fn from_serialport(port: PathBuf, baud: u32, e: &serialport::Error) -> Self {
        use serialport::ErrorKind as K;
        use std::io::ErrorKind as Io;
        let reason = e.description.clone();
        match e.kind {
            K::Io(Io::NotFound) => Self::NotFound { port },
            K::Io(Io::PermissionDenied) => Self::PermissionDenied { port, reason },
            // serialport reports a port locked by another opener as NoDevice.
            K::NoDevice => Self::Unavailable { port, reason },
            _ => Self::Other { port, baud, reason },
        }
    }
}

/// Why the link is not connected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LostReason {
    /// Opening the port failed (absent, busy, permission).
    #[error("{0}")]
    Open(OpenError),
    /// A read or write failed (USB unplugged).
    #[error("serial I/O failed: {0}")]
    Io(String),
    /// No valid frame for the silence timeout.
    #[error("device silent for {ms} ms")]
    Silent { ms: u64 },
    /// No `Hello` after `Reset`.
    #[error("device did not say Hello after Reset")]
    NoHello,
    /// The device answered with a protocol version we do not speak.
    #[error(
        "device speaks protocol version {device}, this host speaks {host}: {}",
        version_hint(*device, *host)
    )]
    VersionMismatch { device: u16, host: u16 },
    /// The device refused our `Configure` (e.g. a rate above its maximum).
    #[error(
        "device refused the configuration ({status:?}): check rig.sample_rate_hz, rig.samples_per_batch and the [safety] caps against the firmware's limits"
    )]
    ConfigureRefused { status: AckStatus },
    /// The link is shutting down.
    #[error("link shut down")]
    Shutdown,
}

/// The fix for a protocol version mismatch, in words.
fn version_hint(device: u16, host: u16) -> &'static str {
    if device < host && host == 2 {
        "the firmware is older than this rigd (version 2 added the device-armed reward); \
         flash the firmware that matches this rigd (firmware-bridge/firmware, docs/wiring.md)"
    } else if device < host {
        "the firmware is older than this rigd; flash the firmware that matches this rigd \
         (firmware-bridge/firmware, docs/wiring.md)"
    } else {
        "the firmware is newer than this rigd; flash the firmware that matches this rigd \
         (firmware-bridge/firmware, docs/wiring.md) or update rigd"
    }
}

/// What was implausible about a device stream's times or indices (see
/// `docs/protocol.md`, "Device time plausibility").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AnomalyKind {
    /// A lever batch whose samples had all been received: dropped.
    DuplicateBatch,
    /// A lever batch partly received already: those samples dropped.
    OverlapBatch,
    /// A lever batch stamped earlier than its sample index says (a batch
    /// stamped in the past, or the first batches after a backward step).
    TimeBackward,
    /// A lever batch stamped later than its sample index says (a forward
    /// jump of the device clock).
    TimeForward,
    /// The same offset on [`CLOCK_STEP_BATCHES`](super::state::CLOCK_STEP_BATCHES)
    /// batches in a row: the device clock stepped; later device times are
    /// corrected by it.
    ClockStep,
    /// Lever samples stamped (or indexed) in the future or long past by the
    /// host clock fit: placed at the host's time instead.
    HostImplausible,
    /// A clock-sync answer far off the fit: not used for the fit.
    PongRejected,
    /// A device event (lick, tone, valve, fault, ack) stamped far off the
    /// host clock fit: given the fit's time instead.
    EventTime,
}

impl AnomalyKind {
    pub const ALL: [Self; 8] = [
        Self::DuplicateBatch,
        Self::OverlapBatch,
        Self::TimeBackward,
        Self::TimeForward,
        Self::ClockStep,
        Self::HostImplausible,
        Self::PongRejected,
        Self::EventTime,
    ];

    /// The event kind in `events.tsv`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DuplicateBatch => "device_duplicate_batch",
            Self::OverlapBatch => "device_overlap_batch",
            Self::TimeBackward => "device_time_backward",
            Self::TimeForward => "device_time_forward",
            Self::ClockStep => "device_clock_step",
            Self::HostImplausible => "device_time_implausible",
            Self::PongRejected => "device_pong_rejected",
            Self::EventTime => "device_event_time_implausible",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Everything the link reports, in order, on the reader thread.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkEvent {
    /// Handshake done and the stream configured. `device_rebooted` is true
    /// when the device's clock restarted since the last connection.
    Connected {
        hello: Hello,
        reconnect: bool,
        device_rebooted: bool,
    },
    /// The device is gone (or never came); the link keeps trying to reconnect
    /// unless the reason is [`LostReason::Shutdown`].
    Lost {
        reason: LostReason,
        at_host_ns: u64,
    },
    Lever(LeverBatch),
    /// Samples that never arrived: `missing` samples from `from_index`.
    SampleGap {
        from_index: u64,
        missing: u64,
        t_us: u64,
    },
    /// A device time or index that cannot be right (see [`AnomalyKind`]).
    /// `offset_us` is how far the device's stamp was from where the sample
    /// index (or the host clock) puts it (stamp minus placed time), or the
    /// correction adopted for a [`AnomalyKind::ClockStep`]; `samples` the
    /// lever samples dropped or re-placed; `count` how many of this kind
    /// the link has seen.
    TimeAnomaly {
        kind: AnomalyKind,
        t_us: u64,
        offset_us: i64,
        samples: u64,
        count: u64,
    },
    /// The device clock's rate against the host's, measured once per
    /// connection when the clock fit is trusted. `host_heartbeat` is the
    /// host heartbeat period from then on: the configured one divided by
    /// the rate when the device runs fast (a simulator at `--speed N`), so
    /// its watchdog, which counts device time, hears from the host as often
    /// as configured; `keeps_up` is false when even the fastest period the
    /// host can keep is too slow for the device's watchdog.
    ClockRate {
        rate: f64,
        host_heartbeat: std::time::Duration,
        keeps_up: bool,
    },
    /// Device frames lost on the line (gaps in the device's transmit counter).
    FramesLost {
        count: u64,
    },
    /// Frames the decoder dropped since the last report (corrupted bytes).
    BadFrames {
        frames: u64,
        bytes: u64,
    },
    Device {
        t_us: u64,
        kind: EventKind,
        aux: u16,
        value: u32,
    },
    /// An armed reward fired at the device (protocol version 2). Times are
    /// rig-clock µs; `sample_index` is the device's (32-bit) index of the
    /// first lever sample at or after the crossing.
    RewardFired {
        trial_tag: u32,
        sample_index: u32,
        t_cross_us: u64,
        t_valve_us: u64,
        counts: i32,
        pulse_us: u32,
    },
    /// An armed reward ended without firing (`reason`: a
    /// `protocol::serial::disarm_reason` code).
    RewardEnded {
        trial_tag: u32,
        t_us: u64,
        reason: u8,
        next_sample_index: u32,
    },
    Acked {
        seq: u16,
        cmd_type: u8,
        status: AckStatus,
        t_us: u64,
    },
    /// A command was not acknowledged in time. It is not re-sent.
    NoAck {
        seq: u16,
        cmd_type: u8,
    },
    Fault {
        t_us: u64,
        code: FaultCode,
        detail: u32,
    },
    Heartbeat {
        t_us: u64,
        state: u8,
        samples_dropped: u32,
        rx_frames_bad: u32,
        tx_frames_dropped: u32,
    },
    /// A new clock-sync estimate, after a ping/pong exchange whose round
    /// trip (minus the device's turnaround) was `rtt_us`.
    Clock {
        fit: ClockFit,
        rtt_us: f64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_error(kind: serialport::ErrorKind, description: &str) -> OpenError {
        OpenError::from_serialport(
            PathBuf::from("/dev/ttyACM0"),
            115_200,
            &serialport::Error::new(kind, description),
        )
    }

    #[test]
    fn open_errors_name_the_port_the_cause_and_the_fix() {
        use serialport::ErrorKind as K;
        use std::io::ErrorKind as Io;
        let absent = open_error(K::Io(Io::NotFound), "No such file or directory");
        assert_eq!(
            absent,
            OpenError::NotFound {
                port: PathBuf::from("/dev/ttyACM0")
            }
        );
        let denied = open_error(K::Io(Io::PermissionDenied), "Permission denied");
        assert_eq!(
            denied.to_string(),
            "serial port /dev/ttyACM0 refused access (Permission denied): add rigd's user to \
             the port's group (usually dialout) or give it access with a udev rule"
        );
        let busy = open_error(K::NoDevice, "Device or resource busy");
        assert!(
            matches!(busy, OpenError::Unavailable { ref reason, .. } if reason == "Device or resource busy"),
            "{busy:?}"
        );
        let odd = open_error(K::InvalidInput, "Invalid argument");
        assert_eq!(
            LostReason::Open(odd).to_string(),
            "cannot open serial port /dev/ttyACM0 at 115200 baud (Invalid argument): check \
             rig.serial_port and rig.baud in rig.toml"
        );
    }
}
