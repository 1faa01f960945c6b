//! The link's protocol logic with no I/O: the handshake, the rig clock,
//! sample-index continuity across reconnects, loss accounting and the
//! reconnect policy.
//!
//! [`LinkState`] takes inputs — a port opened, an intact frame, time passing,
//! the decoder's counters, a connection ended — each with the host time
//! (`CLOCK_MONOTONIC` ns) it happened at, and pushes [`Output`]s into a buffer
//! the caller provides and drains: events for the handler, commands to write,
//! "commands may flow now", "end this connection". The reader thread in
//! [`super`] does the I/O around it; the tests below drive it frame by frame.
//!
//! Architecture invariant: `LinkState` owns no port, thread or lock and
//! reads no clock; the same inputs give the same outputs. It never allocates
//! on a lever frame: the caller keeps one output buffer for the link's life.

use std::time::Duration;

use protocol::serial::{
    AckStatus, Configure, DecoderStats, DeviceMessage, Hello, LeverSamples, ParseError,
    PROTOCOL_VERSION,
};

use super::event::{AnomalyKind, LeverBatch, LinkEvent, LostReason};
use super::LinkSettings;
use crate::clock::RigClock;
use crate::sync::{ClockSync, SyncSample};

/// How often the handshake repeats `Reset` while waiting for `Hello`.
pub const RESET_REPEAT: Duration = Duration::from_millis(250);

/// Most outputs one input pushes (a frame: `FramesLost`, then `Ready` and
/// `Connected`, or up to three `TimeAnomaly`s, `SampleGap` and `Lever`). The
/// reader's buffer is made this big once, so pushing never allocates.
pub const MAX_OUTPUTS_PER_INPUT: usize = 8;

/// A lever batch whose stamp is within this of where its sample index puts
/// it (after the previous batch, at the sample period) is on time, µs.
pub const STAMP_TOLERANCE_US: u64 = 2_000;

/// The same stamp offset on this many lever batches in a row is a step of
/// the device clock, corrected from then on.
pub const CLOCK_STEP_BATCHES: u32 = 3;

/// A lever sample stamped more than this after the host's clock fit says
/// it is now, or (on a new stream) more than [`HOST_PAST_TOLERANCE_US`]
/// before, is placed at the host's time, µs. Generous: a fit is good to
/// well under a millisecond, and a busy host reads late, never early.
pub const HOST_FUTURE_TOLERANCE_US: f64 = 1_000_000.0;
/// See [`HOST_FUTURE_TOLERANCE_US`]: a new stream's first batch read this
/// long after the fit says it was sampled is placed by host time, µs.
pub const HOST_PAST_TOLERANCE_US: f64 = 30_000_000.0;

/// A device event stamped more than this after, or
/// [`EVENT_PAST_TOLERANCE_US`] before, where the clock fit puts the moment
/// it was read is given the fit's time, µs.
pub const EVENT_FUTURE_TOLERANCE_US: f64 = 500_000.0;
pub const EVENT_PAST_TOLERANCE_US: f64 = 30_000_000.0;

/// The host clock fit is trusted to check device times once it spans this
/// much host time (its drift is only known well once several of its 0.5 s
/// windows are in), ns.
pub const FIT_TRUSTED_AFTER_NS: u64 = 5_000_000_000;

/// A pong whose device times are further than this from the clock fit (one
/// with at least [`PONG_CHECK_EXCHANGES`] exchanges) is not used, µs.
pub const PONG_TOLERANCE_US: f64 = 250_000.0;
pub const PONG_CHECK_EXCHANGES: usize = 20;
/// This many pongs rejected in a row: the fit itself is taken as wrong and
/// started again.
pub const PONG_REJECTS_RESTART: u32 = 10;

/// A command written to the device and not yet answered, as the writer keeps
/// it (shared with every `Commander`). The I/O layer looks one up for each
/// `Ack` and `Pong` (see [`LinkState::answers`]) and hands it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingCommand {
    pub seq: u16,
    pub cmd_type: u8,
    /// Host time the command was written, ns.
    pub sent_ns: u64,
}

/// What the I/O layer must do, in the order pushed.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Hand this to the handler.
    Event(LinkEvent),
    /// Write `0x00` (ends any partial frame at the device), then `Reset`.
    SendReset,
    /// Write `Configure`, then report its sequence number with
    /// [`LinkState::configure_sent`] before the next input.
    SendConfigure(Configure),
    /// The handshake is done: commands may be sent, and the clock-sync pings
    /// start (fast for a while, counted from this input's time).
    Ready,
    /// End this connection. Outputs after it, if any, are moot.
    Close(LostReason),
    /// Send host heartbeats at this period from now on (the device clock
    /// runs at another rate than the host's; see [`LinkEvent::ClockRate`]).
    HeartbeatInterval(Duration),
}

/// A device clock more than this far from the host's rate (a fraction) is
/// reported, and the host heartbeat scaled to it.
pub const RATE_WARN_FRACTION: f64 = 0.01;

/// The shortest host heartbeat period the link keeps (its ticker wakes
/// every 5 ms).
pub const MIN_HOST_HEARTBEAT: Duration = Duration::from_millis(5);

/// Where the connection is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// No port open.
    Closed,
    /// Waiting for `Hello` after `Reset`, until the deadline; the Reset is
    /// sent again at `next_reset_ns`.
    Hello {
        deadline_ns: u64,
        next_reset_ns: u64,
    },
    /// `Configure` asked for (its seq known once written); waiting for its `Ack`.
    Configuring {
        seq: Option<u16>,
        hello: Hello,
        rebooted: bool,
        deadline_ns: u64,
    },
    Streaming,
}

/// The link's state across connections. See the module documentation.
#[derive(Debug)]
pub struct LinkState {
    configure: Configure,
    hello_timeout_ns: u64,
    /// How long `Configure` may wait for its `Ack` (twice the ack timeout).
    configure_timeout_ns: u64,
    silence_timeout_ns: u64,
    reconnect_min: Duration,
    reconnect_max: Duration,

    phase: Phase,
    /// Host time of the last intact frame (or of the handshake's start).
    last_rx_ns: u64,
    /// The device's 32-bit µs counter on the continuous rig clock.
    clock: RigClock,
    sync: ClockSync,
    /// Link-level sample index of device index 0 in the current stream.
    stream_base: u64,
    /// Unwraps the device's 32-bit sample index within the current stream.
    index_clock: RigClock,
    /// Next expected link-level sample index and rig time, once any sample came.
    expected: Option<(u64, u64)>,
    /// The next batch starts a new device stream (after `Configure`).
    new_stream: bool,
    /// Device transmit counter expected next.
    expected_dev_seq: Option<u16>,
    /// Decoder drop counters already reported: `(frames, bytes)`.
    reported_drops: (u64, u64),
    /// Connections that completed the handshake.
    connections: u64,
    /// Wait before the next attempt after a short-lived failure.
    backoff: Duration,
    /// The last loss reported, so a reason is reported once, not every retry.
    last_lost: Option<LostReason>,
    /// Added to every device time: the device clock steps found so far
    /// (and new streams placed by host time), µs.
    correction_us: i64,
    /// Lever batches in a row stamped off their index by the same offset:
    /// `(offset_us, batches)`.
    off_run: Option<(i64, u32)>,
    /// Anomalies seen, by [`AnomalyKind::index`].
    anomalies: [u64; AnomalyKind::ALL.len()],
    pongs_rejected_in_a_row: u32,
    /// Host time of the first exchange of the current fit.
    fit_since_ns: Option<u64>,
    /// The device clock's rate was measured on this connection.
    rate_checked: bool,
}

impl LinkState {
    /// A link that has not connected yet, with the timeouts and the
    /// `Configure` of `settings` (its port and baud are the I/O layer's).
    pub fn new(settings: &LinkSettings) -> Self {
        Self {
            configure: settings.configure,
            hello_timeout_ns: duration_ns(settings.hello_timeout),
            configure_timeout_ns: duration_ns(settings.ack_timeout) * 2,
            silence_timeout_ns: duration_ns(settings.silence_timeout),
            reconnect_min: settings.reconnect_min,
            reconnect_max: settings.reconnect_max,
            phase: Phase::Closed,
            last_rx_ns: 0,
            clock: RigClock::new(),
            sync: ClockSync::default(),
            stream_base: 0,
            index_clock: RigClock::new(),
            expected: None,
            new_stream: true,
            expected_dev_seq: None,
            reported_drops: (0, 0),
            connections: 0,
            backoff: settings.reconnect_min,
            last_lost: None,
            correction_us: 0,
            off_run: None,
            anomalies: [0; AnomalyKind::ALL.len()],
            pongs_rejected_in_a_row: 0,
            fit_since_ns: None,
            rate_checked: false,
        }
    }

    /// The clock fit, once it is trusted to check device times against
    /// (see [`FIT_TRUSTED_AFTER_NS`]).
    fn trusted_fit(&self, now_ns: u64) -> Option<crate::sync::ClockFit> {
        let since = self.fit_since_ns?;
        let fit = self.sync.fit()?;
        (now_ns.saturating_sub(since) >= FIT_TRUSTED_AFTER_NS
            && fit.exchanges >= PONG_CHECK_EXCHANGES)
            .then_some(fit)
    }

    /// Device-time anomalies seen since the link was made, by kind.
    pub fn anomalies(&self, kind: AnomalyKind) -> u64 {
        self.anomalies[kind.index()]
    }

    /// A device time on the rig clock: unwrapped, then corrected for the
    /// clock steps found.
    fn device_time(&mut self, t32: u32) -> u64 {
        self.clock
            .unwrap(t32)
            .saturating_add_signed(self.correction_us)
    }

    fn anomaly(
        &mut self,
        kind: AnomalyKind,
        t_us: u64,
        offset_us: i64,
        samples: u64,
        out: &mut Vec<Output>,
    ) {
        let n = &mut self.anomalies[kind.index()];
        *n += 1;
        out.push(Output::Event(LinkEvent::TimeAnomaly {
            kind,
            t_us,
            offset_us,
            samples,
            count: *n,
        }));
    }

    /// The port opened at `now_ns`: start the handshake. Bytes sent right
    /// after opening may be lost (a board that resets on open is still in
    /// its bootloader), so the `Reset` is repeated every [`RESET_REPEAT`]
    /// until a `Hello` comes; `Reset` only makes the device safe and say
    /// Hello, so repeating it is harmless.
    pub fn connect(&mut self, now_ns: u64, out: &mut Vec<Output>) {
        self.backoff = self.reconnect_min;
        self.phase = Phase::Hello {
            deadline_ns: now_ns + self.hello_timeout_ns,
            next_reset_ns: now_ns + duration_ns(RESET_REPEAT),
        };
        self.last_rx_ns = now_ns;
        out.push(Output::SendReset);
    }

    /// The `Configure` asked for by [`Output::SendConfigure`] went out with
    /// sequence number `seq`; its `Ack` completes the handshake.
    pub fn configure_sent(&mut self, seq: u16) {
        if let Phase::Configuring { seq: s, .. } = &mut self.phase {
            *s = Some(seq);
        }
    }

    /// The sequence number of the command this message answers, if the state
    /// wants it: the I/O layer takes that [`PendingCommand`] out of its table
    /// and passes it to [`LinkState::on_frame`]. `None` for lever samples,
    /// so the sample path takes no lock.
    pub fn answers(&self, msg: &Result<DeviceMessage<'_>, ParseError>) -> Option<u16> {
        match msg {
            Ok(DeviceMessage::Ack(a)) => Some(a.acked_seq),
            Ok(DeviceMessage::Pong(p)) if self.phase == Phase::Streaming => Some(p.ping_seq),
            _ => None,
        }
    }

    /// Whether the handshake is done and the stream configured.
    pub fn is_streaming(&self) -> bool {
        self.phase == Phase::Streaming
    }

    /// One intact frame: the device's transmit counter `seq`, the message (or
    /// why it could not be parsed), the command it answers (see
    /// [`LinkState::answers`]) and the host time the bytes were read.
    pub fn on_frame(
        &mut self,
        seq: u16,
        msg: Result<DeviceMessage<'_>, ParseError>,
        answered: Option<PendingCommand>,
        now_ns: u64,
        out: &mut Vec<Output>,
    ) {
        if self.phase == Phase::Closed {
            return;
        }
        self.last_rx_ns = now_ns;
        // Device transmit counter: count frames lost on the line. A Hello
        // follows a device reset, which restarts the counter; a repeated or
        // older counter (`lost` in the upper half) is not a loss.
        if let Some(want) = self.expected_dev_seq {
            let lost = seq.wrapping_sub(want);
            if lost != 0 && lost < 0x8000 && !matches!(msg, Ok(DeviceMessage::Hello(_))) {
                out.push(Output::Event(LinkEvent::FramesLost {
                    count: u64::from(lost),
                }));
            }
        }
        self.expected_dev_seq = Some(seq.wrapping_add(1));
        let Ok(msg) = msg else {
            // Intact frame of a type or length we don't know: counted as bad.
            out.push(Output::Event(LinkEvent::BadFrames {
                frames: 1,
                bytes: 0,
            }));
            return;
        };
        match msg {
            DeviceMessage::Hello(hello) => self.on_hello(hello, now_ns, out),
            DeviceMessage::Ack(a) => {
                let t_us = self
                    .clock
                    .peek(a.t_us)
                    .saturating_add_signed(self.correction_us);
                if let Phase::Configuring {
                    seq: Some(configure_seq),
                    hello,
                    rebooted,
                    ..
                } = self.phase
                {
                    if a.acked_seq == configure_seq {
                        let status = AckStatus::from(a.status);
                        if status != AckStatus::Ok {
                            out.push(Output::Close(LostReason::ConfigureRefused { status }));
                            return;
                        }
                        self.phase = Phase::Streaming;
                        self.connections += 1;
                        out.push(Output::Ready);
                        out.push(Output::Event(LinkEvent::Connected {
                            hello,
                            reconnect: self.connections > 1,
                            device_rebooted: rebooted,
                        }));
                        return;
                    }
                }
                if let Some(p) = answered {
                    out.push(Output::Event(LinkEvent::Acked {
                        seq: p.seq,
                        cmd_type: p.cmd_type,
                        status: a.status.into(),
                        t_us,
                    }));
                }
            }
            _ if self.phase != Phase::Streaming => {} // stale frames from before the Reset
            DeviceMessage::LeverSamples(b) => self.on_lever(&b, now_ns, out),
            DeviceMessage::Event(e) => {
                let t_us = self.event_time(e.t_us, now_ns, out);
                out.push(Output::Event(LinkEvent::Device {
                    t_us,
                    kind: e.kind.into(),
                    aux: e.aux,
                    value: e.value,
                }));
            }
            DeviceMessage::Pong(p) => {
                if let Some(sent) = answered {
                    let sample = SyncSample {
                        host_send_ns: sent.sent_ns,
                        host_recv_ns: now_ns,
                        dev_rx_us: self.device_time(p.t_rx_us),
                        dev_tx_us: self.device_time(p.t_tx_us),
                    };
                    if !self.pong_plausible(&sample, out) {
                        return;
                    }
                    if let Some(fit) = self.sync.add(sample) {
                        self.fit_since_ns.get_or_insert(sample.host_send_ns);
                        self.check_rate(now_ns, out);
                        out.push(Output::Event(LinkEvent::Clock {
                            fit,
                            rtt_us: sample.rtt_us(),
                        }));
                    }
                }
            }
            DeviceMessage::Fault(f) => {
                let t_us = self.event_time(f.t_us, now_ns, out);
                out.push(Output::Event(LinkEvent::Fault {
                    t_us,
                    code: f.code.into(),
                    detail: f.detail,
                }));
            }
            DeviceMessage::RewardFired(r) => {
                let t_cross_us = self.event_time(r.t_cross_us, now_ns, out);
                let t_valve_us = self.event_time(r.t_valve_us, now_ns, out);
                out.push(Output::Event(LinkEvent::RewardFired {
                    trial_tag: r.trial_tag,
                    sample_index: r.sample_index,
                    t_cross_us,
                    t_valve_us,
                    counts: r.counts,
                    pulse_us: r.pulse_us,
                }));
            }
            DeviceMessage::RewardEnded(r) => {
                let t_us = self.event_time(r.t_us, now_ns, out);
                out.push(Output::Event(LinkEvent::RewardEnded {
                    trial_tag: r.trial_tag,
                    t_us,
                    reason: r.reason,
                    next_sample_index: r.next_sample_index,
                }));
            }
            DeviceMessage::Heartbeat(h) => {
                let t_us = self.device_time(h.t_us);
                out.push(Output::Event(LinkEvent::Heartbeat {
                    t_us,
                    state: h.state,
                    samples_dropped: h.samples_dropped,
                    rx_frames_bad: h.rx_frames_bad,
                    tx_frames_dropped: h.tx_frames_dropped,
                }));
            }
        }
    }

    /// One lever batch: placed on the continuous sample count, its time
    /// checked against its index and the host clock, duplicates and
    /// overlaps dropped (see `docs/protocol.md`, "Device time
    /// plausibility").
    fn on_lever(&mut self, b: &LeverSamples<'_>, now_ns: u64, out: &mut Vec<Output>) {
        let mut stamped = self.device_time(b.t_first_us);
        let dev_index = self.index_clock.unwrap(b.first_index);
        let period = u32::from(b.period_us);
        let p = u64::from(period.max(1));
        let n = b.len() as u64;
        if n == 0 {
            return;
        }
        let host_now = self.trusted_fit(now_ns).map(|f| f.host_to_rig_us(now_ns));
        if self.new_stream {
            self.new_stream = false;
            // Where this sample falls in the continuous count: after the
            // last sample received, by the time that has passed. A stamp the
            // host clock says cannot be right is replaced by the host's time.
            let mut t_first = stamped;
            if let Some(host) = host_now {
                let t_last = (stamped + (n - 1) * p) as f64;
                if t_last > host + HOST_FUTURE_TOLERANCE_US
                    || t_last < host - HOST_PAST_TOLERANCE_US
                {
                    let placed = (host - ((n - 1) * p) as f64).max(0.0) as u64;
                    let placed = self
                        .expected
                        .map_or(placed, |(_, want_t)| placed.max(want_t));
                    let offset = stamped as i64 - placed as i64;
                    self.correction_us -= offset;
                    t_first = placed;
                    stamped = placed;
                    self.anomaly(AnomalyKind::HostImplausible, placed, offset, n, out);
                }
            }
            let first = match self.expected {
                Some((want, want_t)) => want + (t_first.saturating_sub(want_t) + p / 2) / p,
                None => 0,
            };
            self.stream_base = first.saturating_sub(dev_index);
            self.off_run = None;
        }
        let first_index = self.stream_base + dev_index;
        let (mut index, mut t_first, mut skip) = (first_index, stamped, 0u64);
        if let Some((want, want_t)) = self.expected {
            if first_index + n <= want {
                // Every sample of it was received already.
                self.anomaly(AnomalyKind::DuplicateBatch, stamped, 0, n, out);
                return;
            }
            if first_index < want {
                skip = want - first_index;
                self.anomaly(AnomalyKind::OverlapBatch, want_t, 0, skip, out);
            }
            index = first_index + skip;
            // Where the index puts it: after the last sample, one period
            // per sample (a gap in the index is a gap in time).
            let t_index = want_t + (index - want) * p;
            let t_stamp = stamped + skip * p;
            let offset = t_stamp as i64 - t_index as i64;
            t_first = t_index;
            if offset.unsigned_abs() <= STAMP_TOLERANCE_US {
                t_first = t_stamp;
                self.off_run = None;
            } else {
                match self.off_run {
                    Some((o, k)) if (o - offset).unsigned_abs() <= STAMP_TOLERANCE_US => {
                        self.off_run = Some((o, k + 1));
                        if k + 1 >= CLOCK_STEP_BATCHES {
                            // The device clock stepped: correct every device
                            // time from here on.
                            self.correction_us -= offset;
                            self.off_run = None;
                            self.anomaly(AnomalyKind::ClockStep, t_index, offset, n - skip, out);
                        }
                    }
                    _ => {
                        self.off_run = Some((offset, 1));
                        let kind = if offset < 0 {
                            AnomalyKind::TimeBackward
                        } else {
                            AnomalyKind::TimeForward
                        };
                        self.anomaly(kind, t_index, offset, n - skip, out);
                    }
                }
            }
            // The last check: nothing is sampled after now.
            if let Some(host) = host_now {
                let t_last = (t_first + (n - skip - 1) * p) as f64;
                if t_last > host + HOST_FUTURE_TOLERANCE_US {
                    let placed = ((host - ((n - skip - 1) * p) as f64).max(0.0) as u64).max(want_t);
                    let offset = t_first as i64 - placed as i64;
                    self.anomaly(AnomalyKind::HostImplausible, placed, offset, n - skip, out);
                    t_first = placed;
                    index = want + (placed - want_t) / p;
                    self.off_run = None;
                }
            }
            if index > want {
                out.push(Output::Event(LinkEvent::SampleGap {
                    from_index: want,
                    missing: index - want,
                    t_us: t_first,
                }));
            }
        }
        let batch = LeverBatch::new(
            index,
            t_first,
            period,
            b.iter().skip(skip as usize).map(|(_, _, counts)| counts),
        );
        let len = batch.counts().len() as u64;
        self.expected = Some((index + len, t_first + len * p));
        out.push(Output::Event(LinkEvent::Lever(batch)));
    }

    /// A device event's time, checked against the clock fit (when there is
    /// one): a stamp that cannot be right gets the fit's time for `now_ns`.
    fn event_time(&mut self, t32: u32, now_ns: u64, out: &mut Vec<Output>) -> u64 {
        let t = self.device_time(t32);
        let Some(host) = self.trusted_fit(now_ns).map(|f| f.host_to_rig_us(now_ns)) else {
            return t;
        };
        let tf = t as f64;
        if tf <= host + EVENT_FUTURE_TOLERANCE_US && tf >= host - EVENT_PAST_TOLERANCE_US {
            return t;
        }
        let placed = host.max(0.0) as u64;
        self.anomaly(
            AnomalyKind::EventTime,
            placed,
            t as i64 - placed as i64,
            0,
            out,
        );
        placed
    }

    /// Once per connection, when the fit is trusted: the device clock's rate
    /// against the host's, and the host heartbeat period that keeps the
    /// device's watchdog (which counts device time) fed as configured.
    fn check_rate(&mut self, now_ns: u64, out: &mut Vec<Output>) {
        if self.rate_checked {
            return;
        }
        let Some(fit) = self.trusted_fit(now_ns) else {
            return;
        };
        self.rate_checked = true;
        let rate = 1.0 + fit.drift_ppm * 1e-6;
        let configured =
            Duration::from_millis(u64::from(self.configure.heartbeat_interval_ms).max(10));
        let (host_heartbeat, keeps_up) = if rate > 1.0 + RATE_WARN_FRACTION {
            let scaled = configured.div_f64(rate);
            // The device trips after heartbeat_timeout_ms of its time, which
            // is this much host time; the host must write well within it.
            let timeout_host =
                Duration::from_millis(u64::from(self.configure.heartbeat_timeout_ms)).div_f64(rate);
            (
                scaled.max(MIN_HOST_HEARTBEAT),
                MIN_HOST_HEARTBEAT * 2 <= timeout_host,
            )
        } else {
            (configured, true)
        };
        if host_heartbeat != configured {
            out.push(Output::HeartbeatInterval(host_heartbeat));
        }
        out.push(Output::Event(LinkEvent::ClockRate {
            rate,
            host_heartbeat,
            keeps_up,
        }));
    }

    /// Whether a clock-sync exchange agrees with the fit it would join. A
    /// device clock that stepped must not bend the fit; a fit every pong
    /// disagrees with is started again.
    fn pong_plausible(&mut self, sample: &SyncSample, out: &mut Vec<Output>) -> bool {
        let Some(fit) = self
            .sync
            .fit()
            .filter(|f| f.exchanges >= PONG_CHECK_EXCHANGES)
        else {
            return true;
        };
        let predicted = fit.host_to_rig_us(sample.host_send_ns);
        let offset = sample.dev_rx_us as f64 - predicted;
        if offset.abs() <= PONG_TOLERANCE_US + fit.half_band_us {
            self.pongs_rejected_in_a_row = 0;
            return true;
        }
        self.pongs_rejected_in_a_row += 1;
        self.anomaly(
            AnomalyKind::PongRejected,
            sample.dev_rx_us,
            offset as i64,
            0,
            out,
        );
        if self.pongs_rejected_in_a_row >= PONG_REJECTS_RESTART {
            self.pongs_rejected_in_a_row = 0;
            self.sync.clear();
            self.fit_since_ns = None;
        }
        false
    }

    fn on_hello(&mut self, hello: Hello, now_ns: u64, out: &mut Vec<Output>) {
        if hello.protocol_version != PROTOCOL_VERSION {
            out.push(Output::Close(LostReason::VersionMismatch {
                device: hello.protocol_version,
                host: PROTOCOL_VERSION,
            }));
            return;
        }
        // Did the device's clock restart? Compare its time with where the
        // clock fit says it should be now.
        let mut rebooted = false;
        if let Some(fit) = self.sync.fit() {
            let predicted = fit.host_to_rig_us(now_ns);
            let got = self
                .clock
                .peek(hello.t_us)
                .saturating_add_signed(self.correction_us) as f64;
            if (got - predicted).abs() > 500_000.0 {
                rebooted = true;
                let latest = self.clock.latest_us().unwrap_or(0);
                let latest = latest.saturating_add_signed(self.correction_us);
                let resume = predicted.max(latest as f64) as u64;
                // The new epoch starts where the corrected clock was.
                self.correction_us = 0;
                self.clock
                    .reset(resume.saturating_sub(u64::from(hello.t_us)));
                self.sync.clear();
                self.fit_since_ns = None;
            }
        }
        let _ = self.clock.unwrap(hello.t_us);
        self.rate_checked = false;
        // A new stream starts at device index 0 after Configure; its first
        // batch is placed on the link's sample count by its time.
        self.new_stream = true;
        self.index_clock = RigClock::new();
        self.phase = Phase::Configuring {
            seq: None,
            hello,
            rebooted,
            deadline_ns: now_ns + self.configure_timeout_ns,
        };
        out.push(Output::SendConfigure(self.configure));
    }

    /// The decoder's counters after a chunk of bytes: frames it dropped
    /// (corrupted bytes) since the last report become one `BadFrames`.
    pub fn on_decoder_stats(&mut self, stats: DecoderStats, out: &mut Vec<Output>) {
        let (frames, bytes) = self.reported_drops;
        // The decoder never restarts its counts (`reset` keeps them).
        if stats.frames_dropped > frames {
            out.push(Output::Event(LinkEvent::BadFrames {
                frames: stats.frames_dropped - frames,
                bytes: stats.bytes_dropped - bytes,
            }));
            self.reported_drops = (stats.frames_dropped, stats.bytes_dropped);
        }
    }

    /// Time passed: call after every read, bytes or none (at least every
    /// read timeout). Repeats the `Reset` while waiting for `Hello`, and ends
    /// the connection when the `Hello` or the `Configure` acknowledgement is
    /// late or the device has been silent too long. A device still booting is
    /// quiet: while waiting for `Hello` only the Hello deadline applies.
    pub fn on_tick(&mut self, now_ns: u64, out: &mut Vec<Output>) {
        match &mut self.phase {
            Phase::Closed => return,
            Phase::Hello {
                deadline_ns,
                next_reset_ns,
            } => {
                if now_ns > *next_reset_ns {
                    *next_reset_ns = now_ns + duration_ns(RESET_REPEAT);
                    out.push(Output::SendReset);
                }
                self.last_rx_ns = now_ns;
                if now_ns > *deadline_ns {
                    out.push(Output::Close(LostReason::NoHello));
                    return;
                }
            }
            Phase::Configuring { deadline_ns, .. } if now_ns > *deadline_ns => {
                out.push(Output::Close(LostReason::Io("no Ack for Configure".into())));
                return;
            }
            Phase::Configuring { .. } | Phase::Streaming => {}
        }
        let silent_ns = now_ns.saturating_sub(self.last_rx_ns);
        if silent_ns > self.silence_timeout_ns {
            out.push(Output::Close(LostReason::Silent {
                ms: silent_ns / 1_000_000,
            }));
        }
    }

    /// The connection ended (or the port would not open) for `reason`,
    /// noticed at `now_ns`. Reports the loss unless it is the same reason as
    /// the last one (each distinct reason once, not every retry), and
    /// returns how long to wait before opening the port again: doubling from
    /// `reconnect_min` to `reconnect_max`, or at once the maximum when
    /// retrying soon cannot help (wrong firmware, refused configuration).
    pub fn closed(&mut self, reason: LostReason, now_ns: u64, out: &mut Vec<Output>) -> Duration {
        self.phase = Phase::Closed;
        self.expected_dev_seq = None;
        if self.last_lost.as_ref() != Some(&reason) {
            out.push(Output::Event(LinkEvent::Lost {
                reason: reason.clone(),
                at_host_ns: now_ns,
            }));
        }
        let slow = matches!(
            reason,
            LostReason::VersionMismatch { .. } | LostReason::ConfigureRefused { .. }
        );
        self.last_lost = Some(reason);
        let wait = if slow {
            self.reconnect_max
        } else {
            self.backoff
        };
        self.backoff = (self.backoff * 2).min(self.reconnect_max);
        wait
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use protocol::serial::{host_type, Ack, Event, EventKind, Fault, FaultCode, Heartbeat, Pong};

    use super::*;
    use crate::link::OpenError;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;
    /// The seq the I/O layer "wrote" `Configure` with in these tests.
    const CONFIGURE_SEQ: u16 = 40;
    /// Lever sample period, µs (1 kHz).
    const PERIOD_US: u16 = 1000;

    fn configure() -> Configure {
        Configure {
            sample_rate_hz: 1000,
            samples_per_batch: 10,
            heartbeat_interval_ms: 100,
            heartbeat_timeout_ms: 1000,
            max_valve_open_ms: 200,
            max_flush_ms: 2000,
        }
    }

    /// Defaults for a 100 ms device heartbeat: Hello within 3 s, Configure
    /// acknowledged within 1 s, silence 500 ms, reconnect 50 ms .. 1 s.
    fn settings() -> LinkSettings {
        LinkSettings::new(PathBuf::from("/dev/ttyRIG"), 1_000_000, configure())
    }

    fn hello(t_us: u32) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            clock_hz: 1_000_000,
            t_us,
            ..Hello::default()
        }
    }

    fn ack(acked_seq: u16, acked_type: u8, status: AckStatus, t_us: u32) -> DeviceMessage<'static> {
        DeviceMessage::Ack(Ack {
            acked_seq,
            acked_type,
            status: status.into(),
            t_us,
        })
    }

    fn heartbeat(t_us: u32) -> DeviceMessage<'static> {
        DeviceMessage::Heartbeat(Heartbeat {
            t_us,
            state: 1,
            next_sample_index: 0,
            samples_dropped: 0,
            rx_frames_bad: 0,
            tx_frames_dropped: 0,
        })
    }

    fn heartbeat_event(t_us: u64) -> Output {
        Output::Event(LinkEvent::Heartbeat {
            t_us,
            state: 1,
            samples_dropped: 0,
            rx_frames_bad: 0,
            tx_frames_dropped: 0,
        })
    }

    /// A `LeverSamples` body as the device sends it.
    fn lever_body(first_index: u32, t_first_us: u32, counts: &[i32]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&first_index.to_le_bytes());
        body.extend_from_slice(&t_first_us.to_le_bytes());
        body.extend_from_slice(&PERIOD_US.to_le_bytes());
        body.push(counts.len() as u8);
        for c in counts {
            body.extend_from_slice(&c.to_le_bytes());
        }
        body
    }

    fn lever_event(first_index: u64, t_first_us: u64, counts: &[i32]) -> Output {
        Output::Event(LinkEvent::Lever(LeverBatch::new(
            first_index,
            t_first_us,
            u32::from(PERIOD_US),
            counts.iter().copied(),
        )))
    }

    fn lost(reason: LostReason, at_host_ns: u64) -> Output {
        Output::Event(LinkEvent::Lost { reason, at_host_ns })
    }

    /// A `LinkState` driven the way the reader thread drives it, with the
    /// device's transmit counter kept here.
    struct Link {
        state: LinkState,
        out: Vec<Output>,
        dev_seq: u16,
    }

    impl Link {
        fn new() -> Self {
            Self {
                state: LinkState::new(&settings()),
                out: Vec::with_capacity(MAX_OUTPUTS_PER_INPUT),
                dev_seq: 0,
            }
        }

        fn take(&mut self) -> Vec<Output> {
            assert!(
                self.out.len() <= MAX_OUTPUTS_PER_INPUT,
                "one input pushed {} outputs: {:?}",
                self.out.len(),
                self.out
            );
            self.out.drain(..).collect()
        }

        fn connect(&mut self, now_ns: u64) -> Vec<Output> {
            self.state.connect(now_ns, &mut self.out);
            self.take()
        }

        fn tick(&mut self, now_ns: u64) -> Vec<Output> {
            self.state.on_tick(now_ns, &mut self.out);
            self.take()
        }

        fn closed(&mut self, reason: LostReason, now_ns: u64) -> (Duration, Vec<Output>) {
            let wait = self.state.closed(reason, now_ns, &mut self.out);
            (wait, self.take())
        }

        /// A frame with transmit counter `seq`.
        fn frame_seq(
            &mut self,
            seq: u16,
            msg: Result<DeviceMessage<'_>, ParseError>,
            answered: Option<PendingCommand>,
            now_ns: u64,
        ) -> Vec<Output> {
            self.dev_seq = seq.wrapping_add(1);
            self.state
                .on_frame(seq, msg, answered, now_ns, &mut self.out);
            self.take()
        }

        /// A frame with the next transmit counter.
        fn frame(
            &mut self,
            msg: DeviceMessage<'_>,
            answered: Option<PendingCommand>,
            now_ns: u64,
        ) -> Vec<Output> {
            self.frame_seq(self.dev_seq, Ok(msg), answered, now_ns)
        }

        /// A lever batch with the next transmit counter.
        fn lever(
            &mut self,
            first_index: u32,
            t_first_us: u32,
            counts: &[i32],
            now_ns: u64,
        ) -> Vec<Output> {
            let body = lever_body(first_index, t_first_us, counts);
            let msg = DeviceMessage::parse(LeverSamples::TYPE, &body);
            assert!(msg.is_ok(), "{msg:?}");
            self.frame_seq(self.dev_seq, msg, None, now_ns)
        }

        /// Connect at `now_ns`, get a Hello sent at device time `hello_t_us`,
        /// write Configure as [`CONFIGURE_SEQ`] and get its Ack 1 ms later.
        /// Returns the outputs of the Ack.
        fn handshake(&mut self, now_ns: u64, hello_t_us: u32) -> Vec<Output> {
            assert_eq!(self.connect(now_ns), [Output::SendReset]);
            self.dev_seq = 0;
            assert_eq!(
                self.frame(DeviceMessage::Hello(hello(hello_t_us)), None, now_ns + MS),
                [Output::SendConfigure(configure())]
            );
            self.state.configure_sent(CONFIGURE_SEQ);
            let configure_cmd = PendingCommand {
                seq: CONFIGURE_SEQ,
                cmd_type: host_type::CONFIGURE,
                sent_ns: now_ns + MS,
            };
            self.frame(
                ack(
                    CONFIGURE_SEQ,
                    host_type::CONFIGURE,
                    AckStatus::Ok,
                    hello_t_us + 1000,
                ),
                Some(configure_cmd),
                now_ns + 2 * MS,
            )
        }
    }

    fn connected(reconnect: bool, device_rebooted: bool, hello_t_us: u32) -> [Output; 2] {
        [
            Output::Ready,
            Output::Event(LinkEvent::Connected {
                hello: hello(hello_t_us),
                reconnect,
                device_rebooted,
            }),
        ]
    }

    // ---- handshake ----

    #[test]
    fn handshake_resets_configures_and_connects_on_the_configure_ack() {
        let mut link = Link::new();
        assert!(!link.state.is_streaming());
        assert_eq!(
            link.handshake(10 * S, 5_000),
            connected(false, false, 5_000)
        );
        assert!(link.state.is_streaming());
    }

    #[test]
    fn hello_with_another_protocol_version_is_refused_with_a_clear_message() {
        let mut link = Link::new();
        link.connect(10 * S);
        let mut newer = hello(5_000);
        newer.protocol_version = PROTOCOL_VERSION + 1;
        let reason = LostReason::VersionMismatch {
            device: PROTOCOL_VERSION + 1,
            host: PROTOCOL_VERSION,
        };
        assert_eq!(
            link.frame(DeviceMessage::Hello(newer), None, 10 * S + MS),
            [Output::Close(reason.clone())]
        );
        assert_eq!(
            reason.to_string(),
            "device speaks protocol version 3, this host speaks 2: the firmware is newer than \
             this rigd; flash the firmware that matches this rigd (firmware-bridge/firmware, \
             docs/wiring.md) or update rigd"
        );
        let older = LostReason::VersionMismatch { device: 1, host: 2 };
        assert!(
            older
                .to_string()
                .contains("older than this rigd (version 2 added"),
            "{older}"
        );
        // Retrying soon cannot help: the wait is the longest at once.
        let (wait, out) = link.closed(reason.clone(), 10 * S + 2 * MS);
        assert_eq!(wait, Duration::from_secs(1));
        assert_eq!(out, [lost(reason, 10 * S + 2 * MS)]);
    }

    #[test]
    fn refused_configure_ends_the_connection_with_the_device_status() {
        let mut link = Link::new();
        link.connect(10 * S);
        link.frame(DeviceMessage::Hello(hello(5_000)), None, 10 * S + MS);
        link.state.configure_sent(CONFIGURE_SEQ);
        let reason = LostReason::ConfigureRefused {
            status: AckStatus::BadValue,
        };
        assert_eq!(
            link.frame(
                ack(
                    CONFIGURE_SEQ,
                    host_type::CONFIGURE,
                    AckStatus::BadValue,
                    6_000
                ),
                None,
                10 * S + 2 * MS
            ),
            [Output::Close(reason.clone())]
        );
        assert_eq!(
            reason.to_string(),
            "device refused the configuration (BadValue): check rig.sample_rate_hz, \
             rig.samples_per_batch and the [safety] caps against the firmware's limits"
        );
        assert!(!link.state.is_streaming());
    }

    #[test]
    fn only_the_ack_of_the_latest_configure_completes_the_handshake() {
        // Two Resets answered by two Hellos: two Configures go out.
        let mut link = Link::new();
        link.connect(10 * S);
        link.frame(DeviceMessage::Hello(hello(5_000)), None, 10 * S + MS);
        link.state.configure_sent(3);
        link.frame(DeviceMessage::Hello(hello(5_100)), None, 10 * S + 2 * MS);
        link.state.configure_sent(4);
        let first = PendingCommand {
            seq: 3,
            cmd_type: host_type::CONFIGURE,
            sent_ns: 10 * S + MS,
        };
        assert_eq!(
            link.frame(
                ack(3, host_type::CONFIGURE, AckStatus::Ok, 5_200),
                Some(first),
                10 * S + 3 * MS
            ),
            [Output::Event(LinkEvent::Acked {
                seq: 3,
                cmd_type: host_type::CONFIGURE,
                status: AckStatus::Ok,
                t_us: 5_200,
            })]
        );
        assert!(!link.state.is_streaming());
        assert_eq!(
            link.frame(
                ack(4, host_type::CONFIGURE, AckStatus::Ok, 5_300),
                None,
                10 * S + 4 * MS
            ),
            connected(false, false, 5_100)
        );
    }

    #[test]
    fn reset_repeats_until_hello_and_gives_up_at_the_hello_deadline() {
        let mut link = Link::new();
        let t0 = 10 * S;
        assert_eq!(link.connect(t0), [Output::SendReset]);
        assert_eq!(link.tick(t0 + 250 * MS), []);
        assert_eq!(link.tick(t0 + 251 * MS), [Output::SendReset]);
        // A booting device is quiet: no silence timeout while waiting for Hello.
        assert_eq!(link.tick(t0 + 500 * MS), []);
        assert_eq!(link.tick(t0 + 502 * MS), [Output::SendReset]);
        assert_eq!(link.tick(t0 + 2_999 * MS), [Output::SendReset]);
        assert_eq!(link.tick(t0 + 3_000 * MS), []);
        assert_eq!(
            link.tick(t0 + 3_000 * MS + 1),
            [Output::Close(LostReason::NoHello)]
        );
    }

    #[test]
    fn configure_ack_must_come_within_twice_the_ack_timeout() {
        let mut link = Link::new();
        let t1 = 10 * S + MS;
        link.connect(10 * S);
        link.frame(DeviceMessage::Hello(hello(5_000)), None, t1);
        link.state.configure_sent(CONFIGURE_SEQ);
        // Heartbeats keep silence away; frames other than the Ack are ignored.
        assert_eq!(link.frame(heartbeat(400_000), None, t1 + 400 * MS), []);
        assert_eq!(link.frame(heartbeat(800_000), None, t1 + 800 * MS), []);
        assert_eq!(link.tick(t1 + 1_000 * MS), []);
        assert_eq!(
            link.tick(t1 + 1_000 * MS + 1),
            [Output::Close(LostReason::Io("no Ack for Configure".into()))]
        );
    }

    #[test]
    fn silence_ends_a_configuring_or_streaming_connection() {
        let mut link = Link::new();
        link.connect(10 * S);
        link.frame(DeviceMessage::Hello(hello(5_000)), None, 10 * S + MS);
        assert_eq!(
            link.tick(10 * S + 502 * MS),
            [Output::Close(LostReason::Silent { ms: 501 })]
        );

        let mut link = Link::new();
        link.handshake(10 * S, 5_000);
        let last = 10 * S + 2 * MS; // the Ack
        assert_eq!(link.tick(last + 500 * MS), []);
        assert_eq!(
            link.frame(heartbeat(600_000), None, last + 500 * MS),
            [heartbeat_event(600_000)]
        );
        assert_eq!(link.tick(last + 1_000 * MS), []);
        assert_eq!(
            link.tick(last + 1_234 * MS + 5),
            [Output::Close(LostReason::Silent { ms: 734 })]
        );
        assert_eq!(
            LostReason::Silent { ms: 734 }.to_string(),
            "device silent for 734 ms"
        );
    }

    #[test]
    fn frames_before_the_handshake_is_done_are_ignored() {
        let mut link = Link::new();
        link.connect(10 * S);
        // Stale frames from before the Reset.
        assert_eq!(link.lever(500, 900_000, &[1, 2], 10 * S + MS), []);
        assert_eq!(link.frame(heartbeat(900_500), None, 10 * S + MS), []);
        let pong = DeviceMessage::Pong(Pong {
            ping_seq: 1,
            t_rx_us: 900_600,
            t_tx_us: 900_610,
        });
        assert_eq!(link.state.answers(&Ok(pong)), None);
        assert_eq!(link.frame(pong, None, 10 * S + MS), []);
        // Also while Configure waits for its Ack.
        link.frame(DeviceMessage::Hello(hello(5_000)), None, 10 * S + 2 * MS);
        link.state.configure_sent(CONFIGURE_SEQ);
        assert_eq!(link.lever(0, 5_500, &[3], 10 * S + 3 * MS), []);
        // The stream starts with the first batch after the Ack.
        link.frame(
            ack(CONFIGURE_SEQ, host_type::CONFIGURE, AckStatus::Ok, 5_600),
            None,
            10 * S + 4 * MS,
        );
        assert_eq!(
            link.lever(1, 6_500, &[4], 10 * S + 5 * MS),
            [lever_event(1, 6_500, &[4])]
        );
    }

    #[test]
    fn frames_after_the_connection_closed_are_ignored() {
        let mut link = Link::new();
        link.handshake(10 * S, 5_000);
        link.closed(LostReason::Io("unplugged".into()), 11 * S);
        assert_eq!(link.frame(heartbeat(7_000), None, 11 * S + MS), []);
        assert_eq!(link.tick(20 * S), []);
        assert!(!link.state.is_streaming());
    }

    #[test]
    fn a_new_connection_counts_no_frames_lost_against_the_old_one() {
        let mut link = Link::new();
        link.handshake(10 * S, 5_000);
        link.frame_seq(3, Ok(heartbeat(6_000)), None, 10 * S + 5 * MS);
        link.closed(LostReason::Io("unplugged".into()), 11 * S);
        link.connect(12 * S);
        // A frame the device sent before it saw the Reset, far ahead on its counter.
        assert_eq!(
            link.frame_seq(900, Ok(heartbeat(7_000)), None, 12 * S + MS),
            []
        );
        // From there on the counter is checked, before the handshake too.
        assert_eq!(
            link.frame_seq(902, Ok(heartbeat(7_100)), None, 12 * S + 2 * MS),
            [Output::Event(LinkEvent::FramesLost { count: 1 })]
        );
    }

    // ---- samples ----

    #[test]
    fn lever_batches_get_continuous_indices_on_the_rig_clock() {
        let mut link = Link::new();
        link.handshake(10 * S, 5_000);
        let now = 10 * S + 10 * MS;
        assert_eq!(
            link.lever(0, 10_000, &[1, 2, 3], now),
            [lever_event(0, 10_000, &[1, 2, 3])]
        );
        assert_eq!(
            link.lever(3, 13_000, &[4, 5, 6], now),
            [lever_event(3, 13_000, &[4, 5, 6])]
        );
        let out = link.lever(6, 16_000, &[-7], now);
        assert_eq!(out, [lever_event(6, 16_000, &[-7])]);
        let Output::Event(LinkEvent::Lever(batch)) = &out[0] else {
            panic!("{out:?}");
        };
        assert_eq!(batch.samples().collect::<Vec<_>>(), [(6, 16_000, -7)]);
    }

    #[test]
    fn samples_the_device_skipped_are_one_sample_gap() {
        let mut link = Link::new();
        link.handshake(10 * S, 5_000);
        let now = 10 * S + 10 * MS;
        link.lever(0, 10_000, &[0; 5], now);
        // Consecutive transmit counter: the device dropped samples, the line lost nothing.
        assert_eq!(
            link.lever(12, 22_000, &[9; 5], now),
            [
                Output::Event(LinkEvent::SampleGap {
                    from_index: 5,
                    missing: 7,
                    t_us: 22_000,
                }),
                lever_event(12, 22_000, &[9; 5]),
            ]
        );
        assert_eq!(
            link.lever(17, 27_000, &[1], now),
            [lever_event(17, 27_000, &[1])]
        );
    }

    #[test]
    fn a_frame_lost_on_the_line_is_counted_and_its_samples_are_a_gap() {
        let mut link = Link::new();
        link.handshake(10 * S, 5_000);
        let now = 10 * S + 10 * MS;
        link.lever(0, 10_000, &[0; 5], now);
        link.lever(5, 15_000, &[0; 5], now);
        link.dev_seq = link.dev_seq.wrapping_add(1); // one frame never arrives
        assert_eq!(
            link.lever(15, 25_000, &[0; 5], now),
            [
                Output::Event(LinkEvent::FramesLost { count: 1 }),
                Output::Event(LinkEvent::SampleGap {
                    from_index: 10,
                    missing: 5,
                    t_us: 25_000,
                }),
                lever_event(15, 25_000, &[0; 5]),
            ]
        );
    }

    #[test]
    fn a_repeated_or_older_transmit_counter_is_not_a_loss() {
        let mut link = Link::new();
        link.handshake(10 * S, 5_000);
        let now = 10 * S + 10 * MS;
        let hb = |link: &mut Link, seq: u16| link.frame_seq(seq, Ok(heartbeat(9_000)), None, now);
        assert_eq!(
            hb(&mut link, 20),
            [
                Output::Event(LinkEvent::FramesLost { count: 18 }),
                heartbeat_event(9_000)
            ]
        );
        assert_eq!(hb(&mut link, 20), [heartbeat_event(9_000)], "duplicate");
        assert_eq!(hb(&mut link, 19), [heartbeat_event(9_000)], "out of order");
        assert_eq!(
            hb(&mut link, 20),
            [heartbeat_event(9_000)],
            "in order again"
        );
        assert_eq!(
            hb(&mut link, 25),
            [
                Output::Event(LinkEvent::FramesLost { count: 4 }),
                heartbeat_event(9_000)
            ]
        );
        // The 16-bit counter wraps.
        hb(&mut link, u16::MAX - 1);
        assert_eq!(hb(&mut link, u16::MAX), [heartbeat_event(9_000)]);
        assert_eq!(hb(&mut link, 0), [heartbeat_event(9_000)]);
        assert_eq!(
            hb(&mut link, 2),
            [
                Output::Event(LinkEvent::FramesLost { count: 1 }),
                heartbeat_event(9_000)
            ]
        );
    }

    fn anomaly(kind: AnomalyKind, t_us: u64, offset_us: i64, samples: u64, count: u64) -> Output {
        Output::Event(LinkEvent::TimeAnomaly {
            kind,
            t_us,
            offset_us,
            samples,
            count,
        })
    }

    #[test]
    fn a_repeated_lever_batch_is_dropped_and_counted() {
        let mut link = Link::new();
        link.handshake(10 * S, 5_000);
        let now = 10 * S + 10 * MS;
        link.lever(0, 10_000, &[1; 5], now);
        link.lever(5, 15_000, &[2; 5], now);
        // The same batch again: every sample of it was received.
        assert_eq!(
            link.lever(5, 15_000, &[2; 5], now),
            [anomaly(AnomalyKind::DuplicateBatch, 15_000, 0, 5, 1)]
        );
        assert_eq!(
            link.lever(5, 15_000, &[2; 5], now),
            [anomaly(AnomalyKind::DuplicateBatch, 15_000, 0, 5, 2)]
        );
        assert_eq!(
            link.lever(10, 20_000, &[3; 5], now),
            [lever_event(10, 20_000, &[3; 5])]
        );
        assert_eq!(link.state.anomalies(AnomalyKind::DuplicateBatch), 2);
    }

    #[test]
    fn an_overlapping_batch_passes_on_only_its_new_samples() {
        let mut link = Link::new();
        link.handshake(10 * S, 5_000);
        let now = 10 * S + 10 * MS;
        link.lever(0, 10_000, &[1; 5], now);
        // Indices 3..8: 3 and 4 were received.
        assert_eq!(
            link.lever(3, 13_000, &[3, 4, 5, 6, 7], now),
            [
                anomaly(AnomalyKind::OverlapBatch, 15_000, 0, 2, 1),
                lever_event(5, 15_000, &[5, 6, 7]),
            ]
        );
        assert_eq!(
            link.lever(8, 18_000, &[8], now),
            [lever_event(8, 18_000, &[8])]
        );
    }

    #[test]
    fn a_batch_stamped_in_the_past_is_placed_by_its_index_and_counted_once() {
        let mut link = Link::new();
        link.handshake(10 * S, 5_000);
        let now = 10 * S + 10 * MS;
        link.lever(0, 3_010_000, &[0; 5], now);
        // Index 5 is due at 3.015 s; stamped 3 s earlier (at 15 ms: it
        // would be clamped to the session's start).
        assert_eq!(
            link.lever(5, 15_000, &[1; 5], now),
            [
                anomaly(AnomalyKind::TimeBackward, 3_015_000, -3_000_000, 5, 1),
                lever_event(5, 3_015_000, &[1; 5]),
            ]
        );
        // The next batch is on time again: no event.
        assert_eq!(
            link.lever(10, 3_020_000, &[2; 5], now),
            [lever_event(10, 3_020_000, &[2; 5])]
        );
        assert_eq!(link.state.anomalies(AnomalyKind::TimeBackward), 1);
        assert_eq!(link.state.anomalies(AnomalyKind::ClockStep), 0);
    }

    #[test]
    fn a_device_clock_stepping_back_is_found_and_corrected_for_every_device_time() {
        let mut link = Link::new();
        link.handshake(10 * S, 5_000);
        let now = 10 * S + 10 * MS;
        link.lever(0, 3_010_000, &[0; 5], now);
        // From index 5 the device clock reads 2 s less.
        let back = 2_000_000u32;
        assert_eq!(
            link.lever(5, 3_015_000 - back, &[1; 5], now),
            [
                anomaly(AnomalyKind::TimeBackward, 3_015_000, -2_000_000, 5, 1),
                lever_event(5, 3_015_000, &[1; 5]),
            ]
        );
        assert_eq!(
            link.lever(10, 3_020_000 - back, &[2; 5], now),
            [lever_event(10, 3_020_000, &[2; 5])]
        );
        // The third batch in a row: a step, corrected from here on.
        assert_eq!(
            link.lever(15, 3_025_000 - back, &[3; 5], now),
            [
                anomaly(AnomalyKind::ClockStep, 3_025_000, -2_000_000, 5, 1),
                lever_event(15, 3_025_000, &[3; 5]),
            ]
        );
        assert_eq!(
            link.lever(20, 3_030_000 - back, &[4; 5], now),
            [lever_event(20, 3_030_000, &[4; 5])]
        );
        // Device events are corrected too.
        let lick = DeviceMessage::Event(Event {
            t_us: 3_031_000 - back,
            kind: EventKind::LickOn.into(),
            aux: 0,
            value: 0,
        });
        assert_eq!(
            link.frame(lick, None, now),
            [Output::Event(LinkEvent::Device {
                t_us: 3_031_000,
                kind: EventKind::LickOn,
                aux: 0,
                value: 0,
            })]
        );
    }

    #[test]
    fn a_forward_jump_of_35_minutes_moves_no_sample_and_pongs_stay_out_of_the_fit() {
        let mut link = Link::new();
        link.handshake(10 * S, 1_000_000);
        // A fit: rig = host - 9 s.
        for i in 0..25u16 {
            exchange(&mut link, 100 + i, 10 * S + u64::from(i) * 250 * MS);
        }
        let now = 17 * S;
        link.lever(0, 7_990_000, &[0; 10], now);
        let jump = 35 * 60 * 1_000_000u32;
        let out = link.lever(10, 8_000_000 + jump, &[1; 10], now);
        assert_eq!(
            out,
            [
                anomaly(AnomalyKind::TimeForward, 8_000_000, i64::from(jump), 10, 1),
                lever_event(10, 8_000_000, &[1; 10]),
            ]
        );
        // A pong on the jumped clock is not used for the fit.
        let ping = PendingCommand {
            seq: 7,
            cmd_type: host_type::PING,
            sent_ns: now,
        };
        let pong = DeviceMessage::Pong(Pong {
            ping_seq: 7,
            t_rx_us: 8_000_050 + jump,
            t_tx_us: 8_000_060 + jump,
        });
        let out = link.frame(pong, Some(ping), now + 120_000);
        assert!(
            matches!(
                out.as_slice(),
                [Output::Event(LinkEvent::TimeAnomaly {
                    kind: AnomalyKind::PongRejected,
                    count: 1,
                    ..
                })]
            ),
            "{out:?}"
        );
        let fit = link.state.sync.fit().expect("fit");
        assert!((fit.host_to_rig_us(now) - 8_000_000.0).abs() < 1_000.0);
        // A lick on the jumped clock gets the fit's time (host 17.1 s).
        let lick = DeviceMessage::Event(Event {
            t_us: 8_100_000 + jump,
            kind: EventKind::LickOn.into(),
            aux: 0,
            value: 0,
        });
        let out = link.frame(lick, None, now + 100 * MS);
        let [Output::Event(LinkEvent::TimeAnomaly {
            kind: AnomalyKind::EventTime,
            count: 1,
            ..
        }), Output::Event(LinkEvent::Device { t_us, .. })] = out.as_slice()
        else {
            panic!("{out:?}");
        };
        assert!(t_us.abs_diff(8_100_000) < 1_000, "{t_us}");
    }

    /// Ping/pong exchanges with a device clock at `rate` times the host's
    /// (rig 0 at host 10 s), every 250 ms from `from_ns`; returns every output.
    fn exchanges_at_rate(link: &mut Link, rate: f64, from_ns: u64, n: u16) -> Vec<Output> {
        let rig = |host_ns: u64| ((host_ns - 10 * S) as f64 / 1000.0 * rate) as u32 + 1_000_000;
        let mut all = Vec::new();
        for i in 0..n {
            let send_ns = from_ns + u64::from(i) * 250 * MS;
            let ping = PendingCommand {
                seq: 200 + i,
                cmd_type: host_type::PING,
                sent_ns: send_ns,
            };
            let pong = DeviceMessage::Pong(Pong {
                ping_seq: 200 + i,
                t_rx_us: rig(send_ns + 50_000),
                t_tx_us: rig(send_ns + 60_000),
            });
            all.extend(link.frame(pong, Some(ping), send_ns + 120_000));
        }
        all
    }

    #[test]
    fn a_device_clock_at_ten_times_the_hosts_rate_is_reported_once_and_heartbeats_scaled() {
        let mut link = Link::new();
        link.handshake(10 * S, 1_000_000);
        let out = exchanges_at_rate(&mut link, 10.0, 10 * S + 10 * MS, 30);
        let scaled: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::HeartbeatInterval(d) => Some(*d),
                _ => None,
            })
            .collect();
        // Configured: a heartbeat every 100 ms, the watchdog at 1000 ms of
        // device time (100 ms of host time at 10x).
        assert_eq!(scaled, [Duration::from_millis(10)]);
        let rates: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Event(LinkEvent::ClockRate {
                    rate,
                    host_heartbeat,
                    keeps_up,
                }) => Some((*rate, *host_heartbeat, *keeps_up)),
                _ => None,
            })
            .collect();
        assert_eq!(rates.len(), 1, "{out:?}");
        assert!((rates[0].0 - 10.0).abs() < 1e-3, "{rates:?}");
        assert!(rates[0].2);
        // Only after the fit is trusted (5 s of exchanges).
        let first = out
            .iter()
            .position(|o| matches!(o, Output::HeartbeatInterval(_)))
            .expect("scaled");
        assert!(first >= 20, "at output {first}");

        // A device at the host's rate: reported (for the record), no change.
        let mut link = Link::new();
        link.handshake(10 * S, 1_000_000);
        let out = exchanges_at_rate(&mut link, 1.0, 10 * S + 10 * MS, 30);
        assert!(!out
            .iter()
            .any(|o| matches!(o, Output::HeartbeatInterval(_))));
        assert_eq!(
            out.iter()
                .filter(|o| matches!(
                    o,
                    Output::Event(LinkEvent::ClockRate { keeps_up: true, .. })
                ))
                .count(),
            1
        );

        // At 500x even 5 ms heartbeats (2.5 s of device time) cannot feed a
        // 1 s watchdog: said so.
        let mut link = Link::new();
        link.handshake(10 * S, 1_000_000);
        let out = exchanges_at_rate(&mut link, 500.0, 10 * S + 10 * MS, 30);
        assert!(out.contains(&Output::HeartbeatInterval(MIN_HOST_HEARTBEAT)));
        assert!(out.iter().any(|o| matches!(
            o,
            Output::Event(LinkEvent::ClockRate {
                keeps_up: false,
                ..
            })
        )));
    }

    #[test]
    fn a_new_stream_stamped_in_the_future_is_placed_by_the_host_clock() {
        let mut link = Link::new();
        link.handshake(10 * S, 1_000_000);
        for i in 0..25u16 {
            exchange(&mut link, 100 + i, 10 * S + u64::from(i) * 250 * MS);
        }
        link.lever(0, 1_500_000, &[0; 10], 10 * S + 500 * MS);
        link.closed(LostReason::Io("unplugged".into()), 17 * S);
        // Reconnected at host 18 s (rig 9 s); the device's first batch says
        // 30 min later.
        link.handshake(18 * S, 9_000_000);
        let later = 30 * 60 * 1_000_000u32;
        let out = link.lever(0, 9_001_000 + later, &[5; 10], 18 * S + 10 * MS);
        let [Output::Event(LinkEvent::TimeAnomaly {
            kind: AnomalyKind::HostImplausible,
            t_us,
            samples: 10,
            count: 1,
            ..
        }), Output::Event(LinkEvent::SampleGap { .. }), Output::Event(LinkEvent::Lever(batch))] =
            out.as_slice()
        else {
            panic!("{out:?}");
        };
        // Placed at the host's now (rig 9.01 s) minus the batch's length
        // (by the fit: within its band of the exact time).
        assert!(t_us.abs_diff(9_001_000) < 50, "{t_us}");
        assert_eq!(batch.t_first_us, *t_us);
        assert_eq!(batch.first_index, 10 + 7_491);
        // Later batches on the device's clock are corrected alike.
        let out = link.lever(10, 9_011_000 + later, &[6; 10], 18 * S + 20 * MS);
        assert_eq!(out, [lever_event(7_511, t_us + 10_000, &[6; 10])]);
    }

    #[test]
    fn after_a_reconnect_the_new_stream_is_placed_by_rig_time() {
        let mut link = Link::new();
        link.handshake(10 * S, 1_000_000);
        let now = 10 * S + 10 * MS;
        link.lever(0, 1_000_000, &[0; 10], now);
        link.lever(10, 1_010_000, &[0; 10], now);
        link.lever(20, 1_020_000, &[0; 10], now);
        link.dev_seq = 50;
        link.lever(30, 1_030_000, &[0; 10], now); // next expected: index 40 at 1_040_000
        let reason = LostReason::Io("unplugged".into());
        let (wait, out) = link.closed(reason.clone(), 11 * S);
        assert_eq!(wait, Duration::from_millis(50));
        assert_eq!(out, [lost(reason, 11 * S)]);

        // The device kept its clock (no reboot); its new stream starts at index 0.
        assert_eq!(
            link.handshake(12 * S, 1_500_000),
            connected(true, false, 1_500_000)
        );
        // Transmit counter restarted: no frames lost. 0.56 s after the last
        // expected sample at 1 kHz: 560 samples missed, as one gap.
        assert_eq!(
            link.lever(0, 1_600_000, &[7; 10], 12 * S + 10 * MS),
            [
                Output::Event(LinkEvent::SampleGap {
                    from_index: 40,
                    missing: 560,
                    t_us: 1_600_000,
                }),
                lever_event(600, 1_600_000, &[7; 10]),
            ]
        );
        assert_eq!(
            link.lever(10, 1_610_000, &[8; 10], 12 * S + 20 * MS),
            [lever_event(610, 1_610_000, &[8; 10])]
        );
    }

    #[test]
    fn a_hello_mid_stream_starts_a_new_stream_placed_by_rig_time() {
        let mut link = Link::new();
        link.handshake(10 * S, 1_000_000);
        let now = 10 * S + 10 * MS;
        link.dev_seq = 40_000;
        link.lever(0, 1_000_000, &[0; 10], now); // next expected: index 10 at 1_010_000
                                                 // The device reset itself with the port open and restarted its
                                                 // transmit counter: no frames counted lost.
        link.dev_seq = 0;
        assert_eq!(
            link.frame(DeviceMessage::Hello(hello(1_200_000)), None, now),
            [Output::SendConfigure(configure())]
        );
        link.state.configure_sent(CONFIGURE_SEQ + 1);
        assert_eq!(
            link.frame(
                ack(
                    CONFIGURE_SEQ + 1,
                    host_type::CONFIGURE,
                    AckStatus::Ok,
                    1_200_100
                ),
                None,
                now
            ),
            connected(true, false, 1_200_000)
        );
        // Rounded to the nearest sample: 290.6 periods after index 10.
        assert_eq!(
            link.lever(0, 1_300_600, &[1], now),
            [
                Output::Event(LinkEvent::SampleGap {
                    from_index: 10,
                    missing: 291,
                    t_us: 1_300_600,
                }),
                lever_event(301, 1_300_600, &[1]),
            ]
        );
    }

    #[test]
    fn rig_time_unwraps_across_the_32_bit_counter_wrap() {
        let mut link = Link::new();
        let near_wrap = u32::MAX - 10_000;
        link.handshake(10 * S, near_wrap);
        let now = 10 * S + 10 * MS;
        let t0 = u32::MAX - 1_500; // 4_294_965_795
        assert_eq!(
            link.lever(0, t0, &[1], now),
            [lever_event(0, u64::from(t0), &[1])]
        );
        assert_eq!(
            link.lever(1, t0 + 1_000, &[2], now),
            [lever_event(1, u64::from(t0) + 1_000, &[2])]
        );
        // 4_294_967_795 wraps to 499.
        let wrapped = t0.wrapping_add(2_000);
        assert_eq!(wrapped, 499);
        assert_eq!(
            link.lever(2, wrapped, &[3], now),
            [lever_event(2, (1 << 32) + 499, &[3])]
        );
        // An event stamped just before the wrap stays before it.
        let lick = DeviceMessage::Event(Event {
            t_us: u32::MAX - 100,
            kind: 1,
            aux: 0,
            value: 17,
        });
        assert_eq!(
            link.frame(lick, None, now),
            [Output::Event(LinkEvent::Device {
                t_us: u64::from(u32::MAX - 100),
                kind: EventKind::LickOn,
                aux: 0,
                value: 17,
            })]
        );
        assert_eq!(
            link.lever(3, 1_499, &[4], now),
            [lever_event(3, (1 << 32) + 1_499, &[4])]
        );
    }

    #[test]
    fn sample_index_unwraps_across_the_32_bit_index_wrap() {
        let mut link = Link::new();
        link.handshake(10 * S, 5_000);
        let now = 10 * S + 10 * MS;
        assert_eq!(
            link.lever(u32::MAX - 1, 10_000, &[1, 2], now),
            [lever_event(u64::from(u32::MAX) - 1, 10_000, &[1, 2])]
        );
        assert_eq!(
            link.lever(0, 12_000, &[3, 4], now),
            [lever_event(1 << 32, 12_000, &[3, 4])]
        );
    }

    // ---- acknowledgements, clock sync, device messages ----

    #[test]
    fn answers_names_the_command_an_ack_or_a_streaming_pong_answers() {
        let mut link = Link::new();
        let pong = Ok(DeviceMessage::Pong(Pong {
            ping_seq: 12,
            t_rx_us: 1,
            t_tx_us: 2,
        }));
        let acked = Ok(ack(11, host_type::VALVE_PULSE, AckStatus::Ok, 3));
        assert_eq!(link.state.answers(&acked), Some(11));
        assert_eq!(link.state.answers(&pong), None);
        link.handshake(10 * S, 5_000);
        assert_eq!(link.state.answers(&acked), Some(11));
        assert_eq!(link.state.answers(&pong), Some(12));
        assert_eq!(link.state.answers(&Ok(heartbeat(1))), None);
        let body = lever_body(0, 1, &[1]);
        assert_eq!(
            link.state
                .answers(&DeviceMessage::parse(LeverSamples::TYPE, &body)),
            None
        );
        assert_eq!(
            link.state.answers(&Err(ParseError::UnknownType(0x7f))),
            None
        );
    }

    #[test]
    fn an_ack_reports_the_command_it_answers_at_its_rig_time() {
        let mut link = Link::new();
        link.handshake(10 * S, 5_000);
        let pulse = PendingCommand {
            seq: 41,
            cmd_type: host_type::VALVE_PULSE,
            sent_ns: 10 * S + 5 * MS,
        };
        assert_eq!(
            link.frame(
                ack(41, host_type::VALVE_PULSE, AckStatus::Refused, 9_000),
                Some(pulse),
                10 * S + 6 * MS
            ),
            [Output::Event(LinkEvent::Acked {
                seq: 41,
                cmd_type: host_type::VALVE_PULSE,
                status: AckStatus::Refused,
                t_us: 9_000,
            })]
        );
        // An Ack for nothing outstanding (already timed out) says nothing.
        assert_eq!(
            link.frame(
                ack(42, host_type::TONE, AckStatus::Ok, 9_100),
                None,
                10 * S + 7 * MS
            ),
            []
        );
    }

    /// A ping sent at host `send_ns`, arriving at the device 50 µs later and
    /// answered 10 µs after that, received 60 µs after the answer, when rig
    /// time is host time minus 9 s.
    fn exchange(link: &mut Link, ping_seq: u16, send_ns: u64) -> Vec<Output> {
        let rig_us = |host_ns: u64| (host_ns / 1000 - 9_000_000) as u32;
        let ping = PendingCommand {
            seq: ping_seq,
            cmd_type: host_type::PING,
            sent_ns: send_ns,
        };
        let pong = DeviceMessage::Pong(Pong {
            ping_seq,
            t_rx_us: rig_us(send_ns + 50_000),
            t_tx_us: rig_us(send_ns + 60_000),
        });
        link.frame(pong, Some(ping), send_ns + 120_000)
    }

    #[test]
    fn a_pong_with_its_ping_updates_the_clock_fit() {
        let mut link = Link::new();
        link.handshake(10 * S, 1_000_000);
        let out = exchange(&mut link, 50, 10 * S + 20 * MS);
        let [Output::Event(LinkEvent::Clock { fit, rtt_us })] = out.as_slice() else {
            panic!("{out:?}");
        };
        // 120 µs on the host, 10 µs of it at the device.
        assert_eq!(*rtt_us, 110.0);
        assert_eq!(fit.exchanges, 1);
        // The offset lies between the bounds: rig - host in [-9 s - 70 µs, -9 s + 50 µs].
        let offset_us = fit.host_to_rig_us(11 * S) - 11_000_000.0;
        assert!(
            (-9_000_070.0..=-8_999_950.0).contains(&offset_us),
            "{offset_us}"
        );
        // A pong whose ping is not outstanding is not an exchange.
        let stray = DeviceMessage::Pong(Pong {
            ping_seq: 51,
            t_rx_us: 1_100_000,
            t_tx_us: 1_100_010,
        });
        assert_eq!(link.frame(stray, None, 10 * S + 30 * MS), []);
    }

    #[test]
    fn a_rebooted_device_is_detected_by_the_clock_fit_and_rig_time_moves_on() {
        let mut link = Link::new();
        link.handshake(10 * S, 1_000_000);
        // Next expected: index 10 at rig 1.51 s.
        link.lever(0, 1_500_000, &[0; 10], 10 * S + 500 * MS);
        let mut fit = None;
        for i in 0..20u16 {
            let out = exchange(&mut link, 100 + i, 10 * S + u64::from(i) * 600 * MS);
            if let [Output::Event(LinkEvent::Clock { fit: f, .. })] = out.as_slice() {
                fit = Some(*f);
            }
        }
        let fit = fit.expect("the exchanges made a fit");
        link.closed(LostReason::Io("unplugged".into()), 22 * S);

        // Same clock: a Hello where the fit puts it is no reboot.
        let now = 25 * S;
        let true_rig_us = 16_001_000u32; // the Hello comes at host 25.001 s
        assert_eq!(
            link.handshake(now, true_rig_us),
            connected(true, false, true_rig_us)
        );
        link.closed(LostReason::Io("unplugged".into()), 26 * S);

        // Rebooted: its counter says 2 ms at host 30.001 s (rig 21.001 s).
        let now = 30 * S;
        let predicted_us = fit.host_to_rig_us(now + MS);
        assert!(
            (predicted_us - 21_001_000.0).abs() < 100.0,
            "{predicted_us}"
        );
        assert_eq!(link.handshake(now, 2_000), connected(true, true, 2_000));
        // Rig time goes on from where the fit put the Hello, and the new
        // stream's first batch is placed by it: about 19.49 s of samples missed.
        let t_us = predicted_us as u64 - 2_000 + 3_000;
        let first_index = 10 + (t_us - 1_510_000 + 500) / 1000;
        assert!(
            (19_480..19_510).contains(&(first_index - 10)),
            "{first_index}"
        );
        assert_eq!(
            link.lever(0, 3_000, &[5], now + 3 * MS),
            [
                Output::Event(LinkEvent::SampleGap {
                    from_index: 10,
                    missing: first_index - 10,
                    t_us,
                }),
                lever_event(first_index, t_us, &[5]),
            ]
        );
    }

    #[test]
    fn device_events_faults_and_heartbeats_are_put_on_the_rig_clock() {
        let mut link = Link::new();
        link.handshake(10 * S, 5_000);
        let now = 10 * S + 10 * MS;
        let valve_close = DeviceMessage::Event(Event {
            t_us: 6_000,
            kind: 5,
            aux: 2,
            value: 40_000,
        });
        assert_eq!(
            link.frame(valve_close, None, now),
            [Output::Event(LinkEvent::Device {
                t_us: 6_000,
                kind: EventKind::ValveClose,
                aux: 2,
                value: 40_000,
            })]
        );
        let cap = DeviceMessage::Fault(Fault {
            t_us: 6_100,
            code: 4,
            detail: 200,
        });
        assert_eq!(
            link.frame(cap, None, now),
            [Output::Event(LinkEvent::Fault {
                t_us: 6_100,
                code: FaultCode::ValveCapTripped,
                detail: 200,
            })]
        );
        let hb = DeviceMessage::Heartbeat(Heartbeat {
            t_us: 6_200,
            state: 9,
            next_sample_index: 77,
            samples_dropped: 3,
            rx_frames_bad: 2,
            tx_frames_dropped: 1,
        });
        assert_eq!(
            link.frame(hb, None, now),
            [Output::Event(LinkEvent::Heartbeat {
                t_us: 6_200,
                state: 9,
                samples_dropped: 3,
                rx_frames_bad: 2,
                tx_frames_dropped: 1,
            })]
        );
    }

    // ---- bad frames ----

    #[test]
    fn an_intact_frame_that_does_not_parse_is_one_bad_frame() {
        let mut link = Link::new();
        link.connect(10 * S);
        assert_eq!(
            link.frame_seq(0, Err(ParseError::UnknownType(0x7f)), None, 10 * S),
            [Output::Event(LinkEvent::BadFrames {
                frames: 1,
                bytes: 0,
            })]
        );
        // It still counts on the transmit counter.
        assert_eq!(
            link.frame_seq(2, Err(ParseError::UnknownType(0x7f)), None, 10 * S),
            [
                Output::Event(LinkEvent::FramesLost { count: 1 }),
                Output::Event(LinkEvent::BadFrames {
                    frames: 1,
                    bytes: 0,
                }),
            ]
        );
    }

    #[test]
    fn decoder_drops_are_reported_as_the_difference_since_the_last_report() {
        let mut link = Link::new();
        let stats = |frames_dropped, bytes_dropped| DecoderStats {
            frames_dropped,
            bytes_dropped,
            ..DecoderStats::default()
        };
        let report = |link: &mut Link, s| {
            link.state.on_decoder_stats(s, &mut link.out);
            link.take()
        };
        assert_eq!(report(&mut link, stats(0, 0)), []);
        assert_eq!(
            report(&mut link, stats(3, 40)),
            [Output::Event(LinkEvent::BadFrames {
                frames: 3,
                bytes: 40,
            })]
        );
        assert_eq!(report(&mut link, stats(3, 40)), []);
        assert_eq!(
            report(&mut link, stats(5, 70)),
            [Output::Event(LinkEvent::BadFrames {
                frames: 2,
                bytes: 30,
            })]
        );
    }

    // ---- losses and reconnecting ----

    #[test]
    fn each_distinct_loss_is_reported_once_and_retries_back_off() {
        let mut link = Link::new();
        let absent = LostReason::Open(OpenError::NotFound {
            port: PathBuf::from("/dev/ttyRIG"),
        });
        assert_eq!(
            absent.to_string(),
            "serial port /dev/ttyRIG does not exist: check that the rig is plugged in and \
             that rig.serial_port in rig.toml names it (ls /dev/serial/by-id/)"
        );
        let (wait, out) = link.closed(absent.clone(), S);
        assert_eq!(
            (wait, out),
            (Duration::from_millis(50), vec![lost(absent.clone(), S)])
        );
        let mut waits = Vec::new();
        for i in 2..8 {
            let (wait, out) = link.closed(absent.clone(), i * S);
            assert_eq!(out, [], "the same reason is not reported again");
            waits.push(wait.as_millis());
        }
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        // The port opens: the backoff starts again, and a new reason is reported.
        link.connect(9 * S);
        let (wait, out) = link.closed(LostReason::NoHello, 12 * S);
        assert_eq!(
            (wait, out),
            (
                Duration::from_millis(50),
                vec![lost(LostReason::NoHello, 12 * S)]
            )
        );
        let (wait, out) = link.closed(absent.clone(), 13 * S);
        assert_eq!(
            (wait, out),
            (Duration::from_millis(100), vec![lost(absent, 13 * S)])
        );
    }

    #[test]
    fn the_output_buffer_never_grows_on_the_sample_path() {
        let mut link = Link::new();
        link.handshake(10 * S, 5_000);
        let (ptr, capacity) = (link.out.as_ptr(), link.out.capacity());
        let body_len = lever_body(0, 0, &[0; 10]).len();
        let mut body = lever_body(0, 0, &[0; 10]);
        for i in 0..10_000u32 {
            // Every 100th frame is lost on the line: three outputs, not one.
            let seq = if i % 100 == 99 {
                link.dev_seq.wrapping_add(1)
            } else {
                link.dev_seq
            };
            body[..4].copy_from_slice(&(i * 10).to_le_bytes());
            body[4..8].copy_from_slice(&(10_000 + i * 10_000).to_le_bytes());
            let msg = DeviceMessage::parse(LeverSamples::TYPE, &body[..body_len]);
            link.state.on_frame(
                seq,
                msg,
                None,
                10 * S + u64::from(i) * 10 * MS,
                &mut link.out,
            );
            link.dev_seq = seq.wrapping_add(1);
            assert!(link.out.len() <= MAX_OUTPUTS_PER_INPUT);
            link.out.clear();
        }
        assert_eq!((link.out.as_ptr(), link.out.capacity()), (ptr, capacity));
    }
}
