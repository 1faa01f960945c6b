//! The simulated microcontroller: the firmware's behaviour as a pure state
//! machine (docs/protocol.md, sections 1.3 to 1.7).
//!
//! It is driven by device time and bytes in, and produces wire frames out. It
//! reads no clock and does no I/O: every call carries the device time
//! (unwrapped microseconds of the device counter), and everything it touches
//! outside itself goes through [`DeviceIo`]: the lever it samples, the
//! transmitter it hands frames to, and the outputs (valve, tone, sync-out) whose
//! edges the simulated world reacts to. The runner in [`super`] puts it on a pty
//! in real time; the unit tests below drive it directly.
//!
//! Choices where the specification leaves room:
//! * Before the first `Configure` (and after `Reset`) the limits are: heartbeat
//!   interval and timeout 1000 ms, `max_valve_open_ms = max_flush_ms =
//!   hard_max_valve_open_ms`.
//! * A command is answered by its `Ack` first; the events it causes follow.
//!   After `Reset`: the `Ack`, the events (cause 4), then `Hello`.
//! * `Configure` also refuses (`BadValue`) `heartbeat_interval_ms = 0` and a
//!   sample rate whose period does not fit the u16 `period_us` (below 16 Hz).
//!   `max_flush_ms` above the hard cap is accepted, and the hard cap still cuts
//!   the flush (cause 2 and `Fault ValveCapTripped`).
//! * A `ValvePulse` longer than the cap is `Refused` even while the valve is
//!   open; `duration_us = 0` is `BadValue`. `Tone` with frequency 0,
//!   duration 0 or level > 100 is `BadValue`; a `Tone` while one plays ends the
//!   old one (`ToneOff`, cause 1) before the new `ToneOn`.
//! * `SyncOut` with a mode other than 0/1, `unit_us = 0`, or a bitcode of 0 or
//!   more than 32 bits is `BadValue`. Aborting a sequence (watchdog, `Reset`)
//!   sends `SyncOutEnd` when the line goes low.
//! * Frames with a device-to-host type (0x01..=0x7F) are ignored: they are not
//!   commands, do not feed the watchdog and get no `Ack` (an echo of the
//!   device's own frames must not start an `Ack` storm).
//! * `Reset` does not reset the "since boot" counters or the transmit `seq`.
//! * A frame the device could not transmit (buffer full, link silent) does not
//!   use up a `seq`: a `seq` gap means a frame lost on the line, the counters
//!   say what the device dropped. When frames can be sent again the device
//!   first reports `Fault SamplesDropped` (samples lost in that episode) and
//!   `Fault TxOverflow` (frames dropped since boot).

use protocol::serial::{
    cause, encode_lever_samples, state, sync_mode, Ack, AckStatus, Decoder, DeviceMessage, Event,
    EventKind, Fault, FaultCode, Frame, Heartbeat, Hello, HostCommand, ParseError, Pong,
    MAX_SAMPLES_PER_BATCH, MAX_WIRE_FRAME, PROTOCOL_VERSION,
};

/// What the firmware was built with: the facts its `Hello` announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Firmware {
    /// Sent in `Hello`; override it to test the host's version check.
    pub protocol_version: u16,
    /// (major, minor, patch).
    pub version: (u8, u8, u8),
    pub device_id: u64,
    /// Bit set of `protocol::serial::capability`.
    pub capabilities: u32,
    pub max_sample_rate_hz: u32,
    /// Compile-time cap on any valve opening, ms; `Configure` can only lower it.
    pub hard_max_valve_open_ms: u16,
}

impl Firmware {
    /// The device id the simulator reports unless told otherwise ("RIGSIM" and 1).
    pub const DEFAULT_DEVICE_ID: u64 = 0x5249_4753_494D_0001;
}

impl Default for Firmware {
    fn default() -> Self {
        Self {
            protocol_version: PROTOCOL_VERSION,
            version: (0, 1, 0),
            device_id: Self::DEFAULT_DEVICE_ID,
            capabilities: protocol::serial::capability::LEVER
                | protocol::serial::capability::LICK
                | protocol::serial::capability::VALVE
                | protocol::serial::capability::TONE
                | protocol::serial::capability::FRAME_TTL
                | protocol::serial::capability::SYNC_OUT,
            max_sample_rate_hz: 20_000,
            hard_max_valve_open_ms: 1000,
        }
    }
}

/// A change of one of the device's outputs or of its safety state, reported to
/// [`DeviceIo::output`] at the device time it happens (for the simulated
/// mouse, which licks when water comes and presses after the cue, and for the
/// ground-truth log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputChange {
    /// The valve opened; `duration_us` is the commanded pulse, 0 for a flush.
    ValveOpen {
        duration_us: u32,
    },
    /// The valve closed after `open_us`, for a [`cause`].
    ValveClose {
        open_us: u32,
        cause: u16,
    },
    ToneOn {
        frequency_hz: u32,
        level_pct: u8,
    },
    ToneOff {
        cause: u16,
    },
    /// Sync-out sequence started (first rising edge).
    SyncStart {
        value: u32,
    },
    /// Sync-out line low again at the end (or abort) of a sequence.
    SyncEnd {
        value: u32,
    },
    /// The host watchdog tripped.
    SafeState {
        since_host_ms: u32,
    },
    SafeStateCleared,
}

/// A digital input edge seen by the device (stamped in an interrupt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigitalInput {
    LickOn,
    LickOff,
    /// Rising edge of the microscope's frame clock.
    FrameTtl,
}

/// Everything the device touches outside itself.
pub trait DeviceIo {
    /// The lever encoder position, counts, at device time `t_us`.
    fn lever_counts(&mut self, t_us: u64) -> i32;
    /// Whether the transmitter can take a frame of `len` bytes now. When it
    /// cannot (buffer full, link silent or unplugged) the device drops the
    /// frame and counts it.
    fn can_transmit(&mut self, t_us: u64, len: usize) -> bool;
    /// Send one complete wire frame (COBS and delimiter included), produced at
    /// device time `t_us`. Only called after `can_transmit` said yes.
    fn transmit(&mut self, t_us: u64, frame: &[u8]);
    /// An output changed. The default ignores it.
    fn output(&mut self, _t_us: u64, _change: OutputChange) {}
}

/// The limits set by `Configure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    heartbeat_interval_ms: u16,
    heartbeat_timeout_ms: u16,
    max_valve_open_ms: u16,
    max_flush_ms: u16,
}

impl Limits {
    fn boot(fw: &Firmware) -> Self {
        Self {
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_ms: 1000,
            max_valve_open_ms: fw.hard_max_valve_open_ms,
            max_flush_ms: fw.hard_max_valve_open_ms,
        }
    }
}

#[derive(Debug, Clone)]
struct Stream {
    period_us: u64,
    samples_per_batch: usize,
    /// Device time of the next sample.
    next_t_us: u64,
    /// Index the next sample gets.
    next_index: u32,
    batch: [i32; MAX_SAMPLES_PER_BATCH],
    batch_len: usize,
    batch_first_index: u32,
    batch_t_first_us: u64,
}

impl Stream {
    /// Device time of the sample that completes the current batch.
    fn batch_done_at(&self) -> u64 {
        let left = (self.samples_per_batch - self.batch_len) as u64;
        self.next_t_us + (left.saturating_sub(1)) * self.period_us
    }
}

#[derive(Debug, Clone, Copy)]
struct Valve {
    opened_at_us: u64,
    close_at_us: u64,
    /// Cause reported when `close_at_us` is reached.
    end_cause: u16,
    /// The cap that cuts the opening, ms (for `Fault ValveCapTripped`).
    cap_ms: u16,
}

#[derive(Debug, Clone, Copy)]
struct ToneState {
    off_at_us: u64,
}

#[derive(Debug, Clone, Copy)]
struct SyncState {
    end_at_us: u64,
    value: u32,
}

/// The device's counters and state bits, as its `Heartbeat` would report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceStatus {
    /// Bit set of `protocol::serial::state`.
    pub state: u8,
    pub next_sample_index: u32,
    pub samples_dropped: u32,
    pub rx_frames_bad: u32,
    pub tx_frames_dropped: u32,
    /// Frames handed to the transmitter since boot.
    pub tx_frames_sent: u64,
    pub licks: u32,
    pub frame_ttl_edges: u32,
    /// The transmit sequence number the next frame gets.
    pub tx_seq: u16,
}

/// The simulated firmware. See the module documentation.
#[derive(Debug, Clone)]
pub struct Device {
    fw: Firmware,
    now_us: u64,
    tx_seq: u16,
    tx_frames_sent: u64,
    decoder: Decoder,
    rx_bad_reported: u64,
    limits: Limits,
    stream: Option<Stream>,
    valve: Option<Valve>,
    tone: Option<ToneState>,
    sync: Option<SyncState>,
    last_host_us: u64,
    safe: bool,
    next_heartbeat_us: u64,
    licks: u32,
    ttl_edges: u32,
    samples_dropped: u32,
    tx_frames_dropped: u32,
    /// Samples dropped since the last `Fault SamplesDropped`.
    unreported_samples: u32,
    /// Frames were dropped and no `Fault TxOverflow` has said so yet.
    unreported_tx: bool,
    /// Fault injection: added to every timestamp the device sends (its
    /// clock stepped), µs; the device's own timing is unchanged.
    stamp_shift_us: i64,
    /// Fault injection: the next lever batch is stamped this far in the past.
    past_next_batch_us: u64,
    /// Fault injection: the next lever batch goes out twice (same bytes).
    duplicate_next_batch: bool,
    /// Fault injection: the next `RewardFired` is not sent (lost on the wire).
    pub(super) drop_next_report: bool,
    /// The armed reward, if any (see [`arm`]).
    armed: Option<arm::Armed>,
    /// The latest lever sample's counts.
    last_counts: Option<i32>,
    /// The last arm's report, repeated on a `Disarm` of its tag.
    last_report: Option<arm::Report>,
    /// The device time the latest `advance` ran up to: when the simulator
    /// actually executed what it processes now.
    executed_at_us: u64,
}

impl Device {
    /// Power up at device time `t_us` (the counter's value then): outputs off,
    /// nothing streaming, and a `Hello` sent.
    pub fn boot(fw: Firmware, t_us: u64, io: &mut impl DeviceIo) -> Self {
        let limits = Limits::boot(&fw);
        let mut d = Self {
            fw,
            now_us: t_us,
            tx_seq: 0,
            tx_frames_sent: 0,
            decoder: Decoder::new(),
            rx_bad_reported: 0,
            limits,
            stream: None,
            valve: None,
            tone: None,
            sync: None,
            last_host_us: t_us,
            safe: false,
            next_heartbeat_us: t_us + u64::from(limits.heartbeat_interval_ms) * 1000,
            licks: 0,
            ttl_edges: 0,
            samples_dropped: 0,
            tx_frames_dropped: 0,
            unreported_samples: 0,
            unreported_tx: false,
            stamp_shift_us: 0,
            past_next_batch_us: 0,
            duplicate_next_batch: false,
            drop_next_report: false,
            armed: None,
            last_counts: None,
            last_report: None,
            executed_at_us: t_us,
        };
        d.send_hello(t_us, io);
        d
    }

    /// Fault injection: from now on every timestamp the device sends is
    /// `delta_us` off (a device clock that stepped back or jumped forward).
    pub fn step_stamps(&mut self, delta_us: i64) {
        self.stamp_shift_us = self.stamp_shift_us.saturating_add(delta_us);
    }

    /// Fault injection: the next lever batch is stamped `by_us` in the past.
    pub fn stamp_next_batch_in_past(&mut self, by_us: u64) {
        self.past_next_batch_us = by_us;
    }

    /// Fault injection: the next lever batch is sent twice (the same frame).
    pub fn duplicate_next_batch(&mut self) {
        self.duplicate_next_batch = true;
    }

    /// Fault injection: the next `RewardFired` report is lost on the wire
    /// (the valve opens; the report is kept for a `Disarm` to repeat).
    pub fn drop_next_report(&mut self) {
        self.drop_next_report = true;
    }

    /// A device time as the wire carries it (32 bits, with any injected step).
    fn stamp(&self, t: u64) -> u32 {
        t.saturating_add_signed(self.stamp_shift_us) as u32
    }

    /// The firmware constants.
    pub fn firmware(&self) -> &Firmware {
        &self.fw
    }

    /// The latest device time processed.
    pub fn now_us(&self) -> u64 {
        self.now_us
    }

    /// Counters and state bits now.
    pub fn status(&self) -> DeviceStatus {
        DeviceStatus {
            state: self.state_bits(),
            next_sample_index: self.stream.as_ref().map_or(0, |s| s.next_index),
            samples_dropped: self.samples_dropped,
            rx_frames_bad: self.rx_frames_bad(),
            tx_frames_dropped: self.tx_frames_dropped,
            tx_frames_sent: self.tx_frames_sent,
            licks: self.licks,
            frame_ttl_edges: self.ttl_edges,
            tx_seq: self.tx_seq,
        }
    }

    /// The earliest device time at which the device will produce a frame or
    /// change an output by itself (a lever batch completes, a timed output
    /// ends, a heartbeat is due, the watchdog trips).
    pub fn next_deadline(&self) -> u64 {
        let mut t = self.next_heartbeat_us;
        if let Some(s) = &self.stream {
            t = t.min(s.batch_done_at());
        }
        if let Some(v) = &self.valve {
            t = t.min(v.close_at_us);
        }
        if let Some(tone) = &self.tone {
            t = t.min(tone.off_at_us);
        }
        if let Some(s) = &self.sync {
            t = t.min(s.end_at_us);
        }
        if let Some(w) = self.watchdog_at() {
            t = t.min(w);
        }
        if let Some(a) = self.armed_deadline() {
            t = t.min(a);
        }
        t
    }

    /// The simulator is executing now what is due up to device time `t_us`
    /// (the real time, on the device clock): a `RewardFired` decided in this
    /// pass reports it as the valve's opening time, so a simulator running
    /// late shows its lag (see [`arm`]).
    pub fn executing_at(&mut self, t_us: u64) {
        self.executed_at_us = self.executed_at_us.max(t_us);
    }

    /// Forget any partially received frame (the USB connection was lost).
    pub fn reset_serial(&mut self) {
        self.decoder.reset();
    }

    /// Run the device's timers (lever sampling, timed outputs, heartbeat,
    /// watchdog) up to and including device time `t_us`.
    pub fn advance(&mut self, t_us: u64, io: &mut impl DeviceIo) {
        if t_us < self.now_us {
            return;
        }
        self.executed_at_us = self.executed_at_us.max(t_us);
        loop {
            let other = self.next_timer();
            // Lever samples up to the next other timer (samples first on a tie).
            if let Some(s) = &self.stream {
                if s.next_t_us <= t_us && s.next_t_us <= other {
                    let until = t_us.min(other);
                    self.take_samples(until, io);
                    continue;
                }
            }
            if other > t_us {
                break;
            }
            self.now_us = other;
            self.fire_timer(other, io);
        }
        self.now_us = t_us;
    }

    /// Bytes from the host arrive, complete at device time `t_us` (the device
    /// first runs its timers up to then).
    pub fn receive(&mut self, t_us: u64, bytes: &[u8], io: &mut impl DeviceIo) {
        self.advance(t_us, io);
        let t = self.now_us;
        let mut decoder = std::mem::take(&mut self.decoder);
        decoder.feed(bytes, |frame| self.handle_frame(t, frame, io));
        self.decoder = decoder;
        let bad = self.decoder.stats().frames_dropped;
        if bad > self.rx_bad_reported {
            self.rx_bad_reported = bad;
            let detail = self.rx_frames_bad();
            self.send_fault(t, FaultCode::RxFrameBad, detail, io);
        }
    }

    /// A digital input edge at device time `t_us`.
    pub fn input(&mut self, t_us: u64, input: DigitalInput, io: &mut impl DeviceIo) {
        self.advance(t_us, io);
        let t = self.now_us;
        match input {
            DigitalInput::LickOn => {
                self.licks = self.licks.wrapping_add(1);
                self.send_event(t, EventKind::LickOn, 0, self.licks, io);
            }
            DigitalInput::LickOff => {
                self.send_event(t, EventKind::LickOff, 0, self.licks, io);
            }
            DigitalInput::FrameTtl => {
                self.ttl_edges = self.ttl_edges.wrapping_add(1);
                self.send_event(t, EventKind::FrameTtl, 0, self.ttl_edges, io);
            }
        }
    }

    // ---- timers -----------------------------------------------------------

    fn watchdog_at(&self) -> Option<u64> {
        (!self.safe).then(|| self.last_host_us + u64::from(self.limits.heartbeat_timeout_ms) * 1000)
    }

    /// The earliest timer other than lever sampling.
    fn next_timer(&self) -> u64 {
        let mut t = self.next_heartbeat_us;
        if let Some(v) = &self.valve {
            t = t.min(v.close_at_us);
        }
        if let Some(tone) = &self.tone {
            t = t.min(tone.off_at_us);
        }
        if let Some(s) = &self.sync {
            t = t.min(s.end_at_us);
        }
        if let Some(w) = self.watchdog_at() {
            t = t.min(w);
        }
        if let Some(a) = self.armed_deadline() {
            t = t.min(a);
        }
        t
    }

    fn fire_timer(&mut self, t: u64, io: &mut impl DeviceIo) {
        if let Some(v) = self.valve {
            if v.close_at_us <= t {
                self.close_valve(v.close_at_us, v.end_cause, io);
                if v.end_cause == cause::CAP {
                    self.send_fault(t, FaultCode::ValveCapTripped, u32::from(v.cap_ms), io);
                }
            }
        }
        if let Some(tone) = self.tone {
            if tone.off_at_us <= t {
                self.stop_tone(t, cause::COMPLETED, io);
            }
        }
        if let Some(s) = self.sync {
            if s.end_at_us <= t {
                self.end_sync(t, io);
            }
        }
        if self.watchdog_at().is_some_and(|w| w <= t) {
            self.trip_watchdog(t, io);
        }
        if let Some(end) = self.armed_deadline().filter(|&end| end <= t) {
            self.disarm(end, protocol::serial::disarm_reason::EXPIRED, io);
        }
        if self.next_heartbeat_us <= t {
            self.send_heartbeat(t, io);
            let interval = u64::from(self.limits.heartbeat_interval_ms) * 1000;
            self.next_heartbeat_us += interval;
            if self.next_heartbeat_us <= t {
                self.next_heartbeat_us = t + interval;
            }
        }
    }

    fn take_samples(&mut self, until: u64, io: &mut impl DeviceIo) {
        loop {
            let Some(s) = self.stream.as_mut() else {
                return;
            };
            if s.next_t_us > until {
                return;
            }
            let t = s.next_t_us;
            let counts = io.lever_counts(t);
            let Some(s) = self.stream.as_mut() else {
                return;
            };
            if s.batch_len == 0 {
                s.batch_first_index = s.next_index;
                s.batch_t_first_us = t;
            }
            s.batch[s.batch_len] = counts;
            s.batch_len += 1;
            let index = s.next_index;
            s.next_index = s.next_index.wrapping_add(1);
            s.next_t_us += s.period_us;
            self.now_us = t;
            self.check_armed(t, index, counts, io);
            let Some(s) = self.stream.as_mut() else {
                return;
            };
            if s.batch_len == s.samples_per_batch {
                let (first, t_first, period, n) = (
                    s.batch_first_index,
                    s.batch_t_first_us,
                    s.period_us as u16,
                    s.batch_len,
                );
                let batch = s.batch;
                s.batch_len = 0;
                self.send_lever_batch(t, first, t_first, period, &batch[..n], io);
            }
        }
    }

    // ---- commands ---------------------------------------------------------

    fn handle_frame(&mut self, t: u64, frame: Frame<'_>, io: &mut impl DeviceIo) {
        if frame.msg_type < 0x80 {
            return; // a device -> host type: not a command (see module docs)
        }
        // A valid host frame: feed the watchdog, leave the safe state.
        self.last_host_us = t;
        if self.safe {
            self.safe = false;
            io.output(t, OutputChange::SafeStateCleared);
            self.send_event(t, EventKind::SafeStateCleared, 0, 0, io);
        }
        let (seq, ty) = (frame.seq, frame.msg_type);
        let cmd = match frame.host_command() {
            Ok(cmd) => cmd,
            Err(ParseError::UnknownType(_)) => {
                return self.ack(t, seq, ty, AckStatus::UnknownCommand, io)
            }
            Err(ParseError::TooShort { .. } | ParseError::BadCount { .. }) => {
                return self.ack(t, seq, ty, AckStatus::BadLength, io)
            }
        };
        match cmd {
            HostCommand::Ping => {
                let pong = Pong {
                    ping_seq: seq,
                    t_rx_us: self.stamp(t),
                    t_tx_us: self.stamp(t),
                };
                self.send(t, DeviceMessage::Pong(pong), io);
            }
            HostCommand::HostHeartbeat => self.ack(t, seq, ty, AckStatus::Ok, io),
            HostCommand::Configure(c) => {
                let status = self.configure(t, c);
                self.ack(t, seq, ty, status, io);
                if status == AckStatus::Ok {
                    self.disarm(t, protocol::serial::disarm_reason::CONFIGURE, io);
                    self.last_counts = None;
                }
            }
            HostCommand::ArmReward(a) => {
                let status = self.arm(t, a);
                self.ack(t, seq, ty, status, io);
            }
            HostCommand::Disarm(d) => {
                self.ack(t, seq, ty, AckStatus::Ok, io);
                self.disarm_tag(t, d.trial_tag, io);
            }
            HostCommand::Tone(tone) => {
                if tone.frequency_hz == 0 || tone.duration_ms == 0 || tone.level_pct > 100 {
                    return self.ack(t, seq, ty, AckStatus::BadValue, io);
                }
                self.ack(t, seq, ty, AckStatus::Ok, io);
                if self.tone.is_some() {
                    self.stop_tone(t, cause::COMMAND, io);
                }
                self.tone = Some(ToneState {
                    off_at_us: t + u64::from(tone.duration_ms) * 1000,
                });
                io.output(
                    t,
                    OutputChange::ToneOn {
                        frequency_hz: tone.frequency_hz,
                        level_pct: tone.level_pct,
                    },
                );
                let level = u16::from(tone.level_pct);
                self.send_event(t, EventKind::ToneOn, level, tone.frequency_hz, io);
            }
            HostCommand::ToneOff => {
                self.ack(t, seq, ty, AckStatus::Ok, io);
                if self.tone.is_some() {
                    self.stop_tone(t, cause::COMMAND, io);
                }
            }
            HostCommand::ValvePulse(p) => {
                let cap_us = u64::from(
                    self.limits
                        .max_valve_open_ms
                        .min(self.fw.hard_max_valve_open_ms),
                ) * 1000;
                let status = if p.duration_us == 0 {
                    AckStatus::BadValue
                } else if u64::from(p.duration_us) > cap_us {
                    AckStatus::Refused
                } else if self.valve.is_some() {
                    AckStatus::Busy
                } else {
                    AckStatus::Ok
                };
                self.ack(t, seq, ty, status, io);
                if status == AckStatus::Ok {
                    self.open_valve(
                        t,
                        p.duration_us,
                        u64::from(p.duration_us),
                        cause::COMPLETED,
                        0,
                        io,
                    );
                }
            }
            HostCommand::ValveOpen(o) => {
                let status = if o.max_ms == 0 {
                    AckStatus::BadValue
                } else if self.valve.is_some() {
                    AckStatus::Busy
                } else {
                    AckStatus::Ok
                };
                self.ack(t, seq, ty, status, io);
                if status == AckStatus::Ok {
                    let cap_ms = self.limits.max_flush_ms.min(self.fw.hard_max_valve_open_ms);
                    let (ms, end_cause) = if o.max_ms > cap_ms {
                        (cap_ms, cause::CAP)
                    } else {
                        (o.max_ms, cause::COMPLETED)
                    };
                    self.open_valve(t, 0, u64::from(ms) * 1000, end_cause, cap_ms, io);
                }
            }
            HostCommand::ValveClose => {
                self.ack(t, seq, ty, AckStatus::Ok, io);
                if self.valve.is_some() {
                    self.close_valve(t, cause::COMMAND, io);
                }
            }
            HostCommand::SyncOut(s) => {
                let valid_mode = s.mode == sync_mode::PULSE
                    || (s.mode == sync_mode::BITCODE && (1..=32).contains(&s.nbits));
                let status = if !valid_mode || s.unit_us == 0 {
                    AckStatus::BadValue
                } else if self.sync.is_some() {
                    AckStatus::Busy
                } else {
                    AckStatus::Ok
                };
                self.ack(t, seq, ty, status, io);
                if status == AckStatus::Ok {
                    let units = if s.mode == sync_mode::PULSE {
                        1
                    } else {
                        2 + 2 * u64::from(s.nbits)
                    };
                    self.sync = Some(SyncState {
                        end_at_us: t + units * u64::from(s.unit_us),
                        value: s.value,
                    });
                    io.output(t, OutputChange::SyncStart { value: s.value });
                    self.send_event(t, EventKind::SyncOutStart, 0, s.value, io);
                }
            }
            HostCommand::Reset => {
                self.ack(t, seq, ty, AckStatus::Ok, io);
                self.outputs_off(t, cause::RESET, io);
                self.disarm(t, protocol::serial::disarm_reason::RESET, io);
                self.last_counts = None;
                self.stream = None;
                self.limits = Limits::boot(&self.fw);
                self.next_heartbeat_us = t + u64::from(self.limits.heartbeat_interval_ms) * 1000;
                self.send_hello(t, io);
            }
        }
    }

    /// Validate and apply a `Configure`; nothing changes unless it is `Ok`.
    fn configure(&mut self, t: u64, c: protocol::serial::Configure) -> AckStatus {
        let rate = c.sample_rate_hz;
        let rate_ok = rate == 0
            || (1_000_000 % rate == 0
                && rate <= self.fw.max_sample_rate_hz
                && 1_000_000 / rate <= u32::from(u16::MAX)
                && (1..=MAX_SAMPLES_PER_BATCH).contains(&usize::from(c.samples_per_batch)));
        if !rate_ok
            || c.heartbeat_interval_ms == 0
            || c.heartbeat_timeout_ms == 0
            || c.max_valve_open_ms > self.fw.hard_max_valve_open_ms
        {
            return AckStatus::BadValue;
        }
        self.limits = Limits {
            heartbeat_interval_ms: c.heartbeat_interval_ms,
            heartbeat_timeout_ms: c.heartbeat_timeout_ms,
            max_valve_open_ms: c.max_valve_open_ms,
            max_flush_ms: c.max_flush_ms,
        };
        self.stream = (rate > 0).then(|| Stream {
            period_us: u64::from(1_000_000 / rate),
            samples_per_batch: usize::from(c.samples_per_batch),
            next_t_us: t,
            next_index: 0,
            batch: [0; MAX_SAMPLES_PER_BATCH],
            batch_len: 0,
            batch_first_index: 0,
            batch_t_first_us: t,
        });
        self.next_heartbeat_us = t + u64::from(c.heartbeat_interval_ms) * 1000;
        AckStatus::Ok
    }

    // ---- outputs ----------------------------------------------------------

    fn open_valve(
        &mut self,
        t: u64,
        commanded_us: u32,
        open_for_us: u64,
        end_cause: u16,
        cap_ms: u16,
        io: &mut impl DeviceIo,
    ) {
        self.valve = Some(Valve {
            opened_at_us: t,
            close_at_us: t + open_for_us,
            end_cause,
            cap_ms,
        });
        io.output(
            t,
            OutputChange::ValveOpen {
                duration_us: commanded_us,
            },
        );
        self.send_event(t, EventKind::ValveOpen, 0, commanded_us, io);
    }

    fn close_valve(&mut self, t: u64, why: u16, io: &mut impl DeviceIo) {
        if let Some(v) = self.valve.take() {
            let open_us = t.saturating_sub(v.opened_at_us).min(u64::from(u32::MAX)) as u32;
            io.output(
                t,
                OutputChange::ValveClose {
                    open_us,
                    cause: why,
                },
            );
            self.send_event(t, EventKind::ValveClose, why, open_us, io);
        }
    }

    fn stop_tone(&mut self, t: u64, why: u16, io: &mut impl DeviceIo) {
        if self.tone.take().is_some() {
            io.output(t, OutputChange::ToneOff { cause: why });
            self.send_event(t, EventKind::ToneOff, why, 0, io);
        }
    }

    fn end_sync(&mut self, t: u64, io: &mut impl DeviceIo) {
        if let Some(s) = self.sync.take() {
            io.output(t, OutputChange::SyncEnd { value: s.value });
            self.send_event(t, EventKind::SyncOutEnd, 0, s.value, io);
        }
    }

    /// Valve closed, tone off, sync-out low.
    fn outputs_off(&mut self, t: u64, why: u16, io: &mut impl DeviceIo) {
        self.close_valve(t, why, io);
        self.stop_tone(t, why, io);
        self.end_sync(t, io);
    }

    fn trip_watchdog(&mut self, t: u64, io: &mut impl DeviceIo) {
        let since_ms = (t.saturating_sub(self.last_host_us) / 1000).min(u64::from(u32::MAX)) as u32;
        self.disarm(t, protocol::serial::disarm_reason::WATCHDOG, io);
        self.outputs_off(t, cause::WATCHDOG, io);
        self.safe = true;
        io.output(
            t,
            OutputChange::SafeState {
                since_host_ms: since_ms,
            },
        );
        self.send_event(t, EventKind::SafeState, cause::WATCHDOG, since_ms, io);
        self.send_fault(t, FaultCode::WatchdogTripped, since_ms, io);
    }

    // ---- frames out -------------------------------------------------------

    fn rx_frames_bad(&self) -> u32 {
        self.decoder.stats().frames_dropped.min(u64::from(u32::MAX)) as u32
    }

    fn state_bits(&self) -> u8 {
        let mut s = 0;
        if self.stream.is_some() {
            s |= state::STREAMING;
        }
        if self.valve.is_some() {
            s |= state::VALVE_OPEN;
        }
        if self.tone.is_some() {
            s |= state::TONE_ON;
        }
        if self.safe {
            s |= state::SAFE;
        }
        if self.sync.is_some() {
            s |= state::SYNC_BUSY;
        }
        s
    }

    fn send_hello(&mut self, t: u64, io: &mut impl DeviceIo) {
        let fw = self.fw;
        let hello = Hello {
            protocol_version: fw.protocol_version,
            firmware_major: fw.version.0,
            firmware_minor: fw.version.1,
            firmware_patch: fw.version.2,
            device_id: fw.device_id,
            clock_hz: 1_000_000,
            capabilities: fw.capabilities,
            max_sample_rate_hz: fw.max_sample_rate_hz,
            hard_max_valve_open_ms: fw.hard_max_valve_open_ms,
            t_us: self.stamp(t),
        };
        self.send(t, DeviceMessage::Hello(hello), io);
    }

    fn send_heartbeat(&mut self, t: u64, io: &mut impl DeviceIo) {
        let st = self.status();
        let hb = Heartbeat {
            t_us: self.stamp(t),
            state: st.state,
            next_sample_index: st.next_sample_index,
            samples_dropped: st.samples_dropped,
            rx_frames_bad: st.rx_frames_bad,
            tx_frames_dropped: st.tx_frames_dropped,
        };
        self.send(t, DeviceMessage::Heartbeat(hb), io);
    }

    fn ack(&mut self, t: u64, seq: u16, ty: u8, status: AckStatus, io: &mut impl DeviceIo) {
        let ack = Ack {
            acked_seq: seq,
            acked_type: ty,
            status: status.into(),
            t_us: self.stamp(t),
        };
        self.send(t, DeviceMessage::Ack(ack), io);
    }

    fn send_event(
        &mut self,
        t: u64,
        kind: EventKind,
        aux: u16,
        value: u32,
        io: &mut impl DeviceIo,
    ) {
        let ev = Event {
            t_us: self.stamp(t),
            kind: kind.into(),
            aux,
            value,
        };
        self.send(t, DeviceMessage::Event(ev), io);
    }

    fn send_fault(&mut self, t: u64, code: FaultCode, detail: u32, io: &mut impl DeviceIo) {
        let f = Fault {
            t_us: self.stamp(t),
            code: code.into(),
            detail,
        };
        self.send(t, DeviceMessage::Fault(f), io);
    }

    fn send_lever_batch(
        &mut self,
        t: u64,
        first_index: u32,
        t_first_us: u64,
        period_us: u16,
        counts: &[i32],
        io: &mut impl DeviceIo,
    ) {
        self.report_drops(t, io);
        let mut buf = [0u8; MAX_WIRE_FRAME];
        let past = std::mem::take(&mut self.past_next_batch_us);
        let stamp = self.stamp(t_first_us.saturating_sub(past));
        let sent = match encode_lever_samples(
            self.tx_seq,
            first_index,
            stamp,
            period_us,
            counts,
            &mut buf,
        ) {
            Ok(n) => {
                let sent = self.transmit(t, &buf[..n], io);
                if sent && std::mem::take(&mut self.duplicate_next_batch) && io.can_transmit(t, n) {
                    io.transmit(t, &buf[..n]);
                }
                sent
            }
            Err(_) => false, // cannot happen: 1..=50 samples and a full-size buffer
        };
        if !sent {
            let n = counts.len() as u32;
            self.samples_dropped = self.samples_dropped.wrapping_add(n);
            self.unreported_samples = self.unreported_samples.saturating_add(n);
        }
    }

    fn send(&mut self, t: u64, msg: DeviceMessage<'_>, io: &mut impl DeviceIo) -> bool {
        self.report_drops(t, io);
        self.encode_and_transmit(t, &msg, io)
    }

    fn encode_and_transmit(
        &mut self,
        t: u64,
        msg: &DeviceMessage<'_>,
        io: &mut impl DeviceIo,
    ) -> bool {
        let mut buf = [0u8; MAX_WIRE_FRAME];
        match msg.encode(self.tx_seq, &mut buf) {
            Ok(n) => self.transmit(t, &buf[..n], io),
            Err(_) => false, // cannot happen: the buffer is MAX_WIRE_FRAME long
        }
    }

    fn transmit(&mut self, t: u64, frame: &[u8], io: &mut impl DeviceIo) -> bool {
        if io.can_transmit(t, frame.len()) {
            io.transmit(t, frame);
            self.tx_seq = self.tx_seq.wrapping_add(1);
            self.tx_frames_sent += 1;
            true
        } else {
            self.tx_frames_dropped = self.tx_frames_dropped.wrapping_add(1);
            self.unreported_tx = true;
            false
        }
    }

    /// After frames were dropped, say so as soon as frames go out again.
    fn report_drops(&mut self, t: u64, io: &mut impl DeviceIo) {
        if !self.unreported_tx {
            return;
        }
        // Only try when both reports fit, so the reports themselves are not
        // counted as dropped over and over while the link is down.
        if !io.can_transmit(t, 2 * protocol::serial::wire_len(4 + Fault::BODY_LEN + 2)) {
            return;
        }
        self.unreported_tx = false;
        if self.unreported_samples > 0 {
            let f = Fault {
                t_us: self.stamp(t),
                code: FaultCode::SamplesDropped.into(),
                detail: self.unreported_samples,
            };
            self.unreported_samples = 0;
            self.encode_and_transmit(t, &DeviceMessage::Fault(f), io);
        }
        let f = Fault {
            t_us: self.stamp(t),
            code: FaultCode::TxOverflow.into(),
            detail: self.tx_frames_dropped,
        };
        self.encode_and_transmit(t, &DeviceMessage::Fault(f), io);
    }
}

mod arm;
#[cfg(test)]
mod tests;
