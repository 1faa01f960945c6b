//! The serial link to the rig's microcontroller.
//!
//! One reader thread owns the port's read side, the decoder, the rig clock and
//! the clock-sync estimator, and hands every sample and event to a
//! [`LinkHandler`] on that same thread — the task engine can run there and send
//! a valve command without a hop through any queue or async runtime. A ticker
//! thread sends the host heartbeat and the clock-sync pings and notices missing
//! acknowledgements. The reader thread also owns the connection: it opens the
//! port, does the handshake (`Reset`, `Hello`, version check, `Configure`),
//! notices a lost device (read error, or silence), and reconnects with backoff,
//! reporting every change as a [`LinkEvent`].
//!
//! Commands go out through a [`Commander`], from any thread; each gets a
//! sequence number and must be acknowledged within the ack timeout. A missing
//! acknowledgement is reported, never answered by sending the command again.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use protocol::serial::{
    AckStatus, Configure, Decoder, DeviceMessage, EventKind, FaultCode, Hello, HostCommand,
    MAX_SAMPLES_PER_BATCH, MAX_WIRE_FRAME, PROTOCOL_VERSION,
};
use serialport::TTYPort;

use crate::clock::RigClock;
use crate::sync::{ClockFit, ClockSync, SyncSample};

/// The reader calls [`LinkHandler::on_idle`] at least this often, even while
/// bytes (say, a stream of garbage that makes no events) keep arriving.
pub const IDLE_EVERY: Duration = Duration::from_millis(50);

/// How often the handshake repeats `Reset` while waiting for `Hello`.
const RESET_REPEAT: Duration = Duration::from_millis(250);

/// Host `CLOCK_MONOTONIC` in nanoseconds: the clock the frame producer stamps
/// frames with, so it is the one mapped onto the rig clock.
pub fn host_now_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64) * 1_000_000_000 + ts.tv_nsec() as u64,
        // CLOCK_MONOTONIC cannot fail on Linux; fall back to 0 rather than panic.
        Err(_) => 0,
    }
}

/// The name of the reader thread, which runs the handler (the task engine)
/// on every frame: the press-to-valve path.
pub const READER_THREAD_NAME: &str = "rig-link-reader";

/// How to run the link. [`LinkSettings::from_config`] fills it from `rig.toml`.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    pub port: PathBuf,
    pub baud: u32,
    /// Sent after every handshake; starts the lever stream.
    pub configure: Configure,
    /// How long to wait for `Hello` after `Reset`.
    pub hello_timeout: Duration,
    /// How long a command may wait for its `Ack`.
    pub ack_timeout: Duration,
    /// No valid frame for this long means the device is lost.
    pub silence_timeout: Duration,
    /// Host heartbeat period (any command sent also counts).
    pub heartbeat_interval: Duration,
    /// Clock-sync ping period for the first `fast_ping_for` after connecting,
    /// then `ping_interval`.
    pub fast_ping_interval: Duration,
    pub fast_ping_for: Duration,
    pub ping_interval: Duration,
    /// Reconnect backoff, doubling from `min` to `max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// `SCHED_FIFO` priority for the reader thread (the latency path), or
    /// `None` to leave it a normal thread. See [`crate::rt`].
    pub realtime_priority: Option<i32>,
}

impl LinkSettings {
    /// Settings for the rig in `cfg`, with the device limits taken from its
    /// `[rig]` and `[safety]` sections.
    pub fn from_config(cfg: &rig_config::RigConfig) -> Self {
        let s = &cfg.safety;
        let configure = Configure {
            sample_rate_hz: cfg.rig.sample_rate_hz,
            samples_per_batch: cfg.rig.samples_per_batch.min(MAX_SAMPLES_PER_BATCH as u32) as u8,
            heartbeat_interval_ms: clamp_u16(s.heartbeat_interval_ms),
            heartbeat_timeout_ms: clamp_u16(s.heartbeat_timeout_ms),
            max_valve_open_ms: clamp_u16(s.max_valve_open_ms),
            max_flush_ms: clamp_u16(s.max_flush_ms),
        };
        let mut s = Self::new(cfg.rig.serial_port.clone().into(), cfg.rig.baud, configure);
        s.realtime_priority = match cfg.realtime.reader_priority {
            0 => None,
            p => Some(p.min(98) as i32),
        };
        s
    }

    /// Defaults around a given port and `Configure`.
    pub fn new(port: PathBuf, baud: u32, configure: Configure) -> Self {
        let hb = Duration::from_millis(u64::from(configure.heartbeat_interval_ms).max(10));
        Self {
            port,
            baud,
            configure,
            // An Arduino that resets when the port opens spends ~1.6 s in
            // its bootloader before the firmware can say Hello.
            hello_timeout: Duration::from_secs(3),
            ack_timeout: Duration::from_millis(500),
            // The device sends a heartbeat every interval; allow several to go missing.
            silence_timeout: (hb * 5).max(Duration::from_millis(500)),
            heartbeat_interval: hb,
            fast_ping_interval: Duration::from_millis(20),
            fast_ping_for: Duration::from_secs(20),
            ping_interval: Duration::from_millis(100),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(1),
            realtime_priority: Some(50),
        }
    }
}

fn clamp_u16(v: impl TryInto<u16>) -> u16 {
    v.try_into().unwrap_or(u16::MAX)
}

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

/// Why the link is not connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LostReason {
    /// Opening the port failed (absent, busy, permission).
    Open(String),
    /// A read or write failed (USB unplugged).
    Io(String),
    /// No valid frame for the silence timeout.
    Silent { ms: u64 },
    /// No `Hello` after `Reset`.
    NoHello,
    /// The device answered with a protocol version we do not speak.
    VersionMismatch { device: u16, host: u16 },
    /// The device refused our `Configure` (e.g. a rate above its maximum).
    ConfigureRefused { status: AckStatus },
    /// The link is shutting down.
    Shutdown,
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Open(e) => write!(f, "cannot open the serial port: {e}"),
            Self::Io(e) => write!(f, "serial I/O failed: {e}"),
            Self::Silent { ms } => write!(f, "device silent for {ms} ms"),
            Self::NoHello => write!(f, "device did not say Hello after Reset"),
            Self::VersionMismatch { device, host } => write!(
                f,
                "device speaks protocol version {device}, this host speaks {host}: flash the firmware that matches this rigd"
            ),
            Self::ConfigureRefused { status } => write!(
                f,
                "device refused the configuration ({status:?}): check rig.sample_rate_hz, rig.samples_per_batch and the [safety] caps against the firmware's limits"
            ),
            Self::Shutdown => write!(f, "link shut down"),
        }
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

/// Receives link events on the reader thread.
pub trait LinkHandler: Send + 'static {
    /// Called for every event, in order. `commander` sends commands right away
    /// from this thread (the low-latency path).
    fn on_event(&mut self, event: &LinkEvent, commander: &Commander);

    /// Called on the reader thread when nothing arrived for a while (every
    /// read timeout, about 20 ms, and while waiting to reconnect), so the
    /// handler can act on requests even when the device is silent or gone;
    /// also at least every [`IDLE_EVERY`] while bytes keep arriving, so a
    /// handler can tell a live reader from a hung one whatever the wire does.
    fn on_idle(&mut self, _commander: &Commander) {}
}

/// A handler that forwards events into a bounded channel, dropping (and
/// counting) events when the consumer falls behind rather than blocking the
/// reader thread. For tools and tests; the daemon's task engine implements
/// [`LinkHandler`] directly.
#[derive(Debug)]
pub struct ChannelHandler {
    tx: Sender<LinkEvent>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl ChannelHandler {
    /// A handler and the receiving end; `capacity` events are buffered.
    pub fn new(capacity: usize) -> (Self, Receiver<LinkEvent>, Arc<std::sync::atomic::AtomicU64>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        (
            Self {
                tx,
                dropped: dropped.clone(),
            },
            rx,
            dropped,
        )
    }
}

impl LinkHandler for ChannelHandler {
    fn on_event(&mut self, event: &LinkEvent, _: &Commander) {
        if self.tx.try_send(event.clone()).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Why a command could not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("the rig is not connected")]
    NotConnected,
    #[error("writing to the serial port failed: {0}")]
    Io(String),
}

/// A command that went out: its sequence number and the host time it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub seq: u16,
    pub host_ns: u64,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    seq: u16,
    cmd_type: u8,
    sent_ns: u64,
}

/// The write side, shared between the reader thread, the ticker and any
/// [`Commander`]. The lock is held only while one frame is written.
#[derive(Debug)]
struct Writer {
    port: Option<TTYPort>,
    /// Commands may be sent (the handshake finished).
    ready: bool,
    next_seq: u16,
    pending: Vec<Pending>,
    last_tx_ns: u64,
    buf: [u8; MAX_WIRE_FRAME],
}

impl Writer {
    fn write_cmd(&mut self, cmd: &HostCommand) -> Result<Sent, SendError> {
        let Some(port) = self.port.as_mut() else {
            return Err(SendError::NotConnected);
        };
        let seq = self.next_seq;
        let n = cmd
            .encode(seq, &mut self.buf)
            .map_err(|e| SendError::Io(e.to_string()))?;
        // Stamp before writing: the device may read the frame before write()
        // returns, and a send time later than the truth would bias clock sync.
        let host_ns = host_now_ns();
        port.write_all(&self.buf[..n])
            .map_err(|e| SendError::Io(e.to_string()))?;
        self.next_seq = seq.wrapping_add(1);
        self.last_tx_ns = host_ns;
        // `Reset` is answered by `Hello`, never by an `Ack`: not tracked.
        if cmd.msg_type() == protocol::serial::host_type::RESET {
            return Ok(Sent { seq, host_ns });
        }
        // Bounded: at most 256 outstanding commands are tracked; older ones
        // have long timed out and been reported by then.
        if self.pending.len() >= 256 {
            self.pending.remove(0);
        }
        self.pending.push(Pending {
            seq,
            cmd_type: cmd.msg_type(),
            sent_ns: host_ns,
        });
        Ok(Sent { seq, host_ns })
    }

    fn take_pending(&mut self, seq: u16) -> Option<Pending> {
        let i = self.pending.iter().position(|p| p.seq == seq)?;
        Some(self.pending.swap_remove(i))
    }
}

/// Sends commands to the device from any thread.
#[derive(Debug, Clone)]
pub struct Commander {
    writer: Arc<Mutex<Writer>>,
}

impl Commander {
    fn lock(&self) -> MutexGuard<'_, Writer> {
        // A panic while holding the lock leaves the writer usable: recover it.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Send a command now. Fails if the link is not connected and configured.
    pub fn send(&self, cmd: HostCommand) -> Result<Sent, SendError> {
        let mut w = self.lock();
        if !w.ready {
            return Err(SendError::NotConnected);
        }
        w.write_cmd(&cmd)
    }

    /// Whether the link is connected and configured.
    pub fn is_ready(&self) -> bool {
        self.lock().ready
    }
}

/// A running link. Dropping it shuts the link down (valve commands stop; the
/// device's watchdog then makes it safe).
#[derive(Debug)]
pub struct SerialLink {
    commander: Commander,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    ticker: Option<JoinHandle<()>>,
}

impl SerialLink {
    /// Start the link's threads. Connection happens in the background; the
    /// handler sees [`LinkEvent::Connected`] or [`LinkEvent::Lost`].
    pub fn spawn(settings: LinkSettings, handler: impl LinkHandler) -> std::io::Result<Self> {
        let writer = Arc::new(Mutex::new(Writer {
            port: None,
            ready: false,
            next_seq: 0,
            pending: Vec::new(),
            last_tx_ns: 0,
            buf: [0; MAX_WIRE_FRAME],
        }));
        let commander = Commander { writer };
        let stop = Arc::new(AtomicBool::new(false));
        let (timeout_tx, timeout_rx) = crossbeam_channel::bounded(256);
        let ping_times = Arc::new(Mutex::new(PingTimes::default()));

        let reader = {
            let mut r = Reader::new(
                settings.clone(),
                commander.clone(),
                stop.clone(),
                timeout_rx,
                ping_times.clone(),
            );
            let mut handler = handler;
            std::thread::Builder::new()
                .name(READER_THREAD_NAME.into())
                .spawn(move || r.run(&mut handler))?
        };
        let ticker = {
            let t = Ticker {
                settings,
                commander: commander.clone(),
                stop: stop.clone(),
                timeouts: timeout_tx,
                ping_times,
            };
            std::thread::Builder::new()
                .name("rig-link-ticker".into())
                .spawn(move || t.run())?
        };
        Ok(Self {
            commander,
            stop,
            reader: Some(reader),
            ticker: Some(ticker),
        })
    }

    /// A handle for sending commands.
    pub fn commander(&self) -> Commander {
        self.commander.clone()
    }

    /// Stop both threads and close the port. The handler sees a final
    /// `Lost { reason: Shutdown }`.
    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in [self.reader.take(), self.ticker.take()]
            .into_iter()
            .flatten()
        {
            let _ = h.join();
        }
    }
}

impl Drop for SerialLink {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// Host send times of outstanding pings, by sequence number, and when the
/// current connection started (for the fast-ping phase).
#[derive(Debug, Default)]
struct PingTimes {
    connected_at_ns: Option<u64>,
}

struct Ticker {
    settings: LinkSettings,
    commander: Commander,
    stop: Arc<AtomicBool>,
    timeouts: Sender<Pending>,
    ping_times: Arc<Mutex<PingTimes>>,
}

impl Ticker {
    fn run(self) {
        // The ticker writes heartbeats and pings under the writer lock that
        // the reader needs for a valve command. As an ordinary thread it
        // could be preempted while holding that lock (seen in a trace: the
        // reader waited 1 ms for it), so it runs just below the reader.
        if let Some(p) = self.settings.realtime_priority {
            if let Err(e) = crate::rt::make_current_thread_realtime((p - 1).max(1)) {
                tracing::debug!("serial link ticker is not real-time: {e}");
            }
        }
        let tick = Duration::from_millis(5);
        let mut last_ping_ns = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(tick);
            let now = host_now_ns();
            let connected_at = self
                .ping_times
                .lock()
                .map(|p| p.connected_at_ns)
                .unwrap_or(None);
            let mut w = self.commander.lock();
            if !w.ready {
                continue;
            }
            // Clock-sync pings: fast right after connecting, then slower.
            let fast = connected_at.is_some_and(|c| {
                now.saturating_sub(c) < self.settings.fast_ping_for.as_nanos() as u64
            });
            let interval = if fast {
                self.settings.fast_ping_interval
            } else {
                self.settings.ping_interval
            };
            if now.saturating_sub(last_ping_ns) >= interval.as_nanos() as u64 {
                last_ping_ns = now;
                if w.write_cmd(&HostCommand::Ping).is_err() {
                    continue; // the reader notices the broken port
                }
            }
            if now.saturating_sub(w.last_tx_ns)
                >= self.settings.heartbeat_interval.as_nanos() as u64
                && w.write_cmd(&HostCommand::HostHeartbeat).is_err()
            {
                continue;
            }
            // Missing acknowledgements (pings are answered by pongs; a lost one is harmless).
            let limit = self.settings.ack_timeout.as_nanos() as u64;
            let mut i = 0;
            while i < w.pending.len() {
                if now.saturating_sub(w.pending[i].sent_ns) > limit {
                    let p = w.pending.swap_remove(i);
                    if p.cmd_type != HostCommand::Ping.msg_type() {
                        let _ = self.timeouts.try_send(p);
                    }
                } else {
                    i += 1;
                }
            }
        }
    }
}

/// Connection state, owned by the reader thread.
struct Reader {
    s: LinkSettings,
    commander: Commander,
    stop: Arc<AtomicBool>,
    timeouts: Receiver<Pending>,
    ping_times: Arc<Mutex<PingTimes>>,
    decoder: Decoder,
    clock: RigClock,
    sync: ClockSync,
    /// Link-level sample index of device index 0 in the current stream.
    stream_base: u64,
    /// Unwraps the device's 32-bit sample index within the current stream.
    index_clock: RigClock,
    /// Next expected link-level sample index and rig time, if streaming.
    expected: Option<(u64, u64)>,
    /// The next batch starts a new device stream (after `Configure`).
    new_stream: bool,
    /// Device transmit counter expected next.
    expected_dev_seq: Option<u16>,
    reported_drops: (u64, u64),
    connections: u64,
}

enum Phase {
    /// Waiting for `Hello` after `Reset`, until the deadline; the Reset is
    /// sent again at `next_reset_ns`.
    Hello {
        deadline_ns: u64,
        next_reset_ns: u64,
    },
    /// `Configure` sent with this seq; waiting for its `Ack`.
    Configuring {
        seq: u16,
        hello: Hello,
        rebooted: bool,
        deadline_ns: u64,
    },
    Streaming,
}

impl Reader {
    fn new(
        s: LinkSettings,
        commander: Commander,
        stop: Arc<AtomicBool>,
        timeouts: Receiver<Pending>,
        ping_times: Arc<Mutex<PingTimes>>,
    ) -> Self {
        Self {
            s,
            commander,
            stop,
            timeouts,
            ping_times,
            decoder: Decoder::new(),
            clock: RigClock::new(),
            sync: ClockSync::default(),
            stream_base: 0,
            index_clock: RigClock::new(),
            expected: None,
            new_stream: true,
            expected_dev_seq: None,
            reported_drops: (0, 0),
            connections: 0,
        }
    }

    fn run(&mut self, handler: &mut impl LinkHandler) {
        if let Some(p) = self.s.realtime_priority {
            if let Err(e) = crate::rt::make_current_thread_realtime(p) {
                tracing::warn!("serial link reader is not real-time: {e}");
            }
        }
        let mut backoff = self.s.reconnect_min;
        let mut last_reason: Option<LostReason> = None;
        while !self.stop.load(Ordering::Relaxed) {
            let reason = match self.open() {
                Ok(port) => {
                    backoff = self.s.reconnect_min;
                    self.session(port, handler)
                }
                Err(e) => LostReason::Open(e),
            };
            self.disconnect();
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            // Report each distinct reason once, not every retry.
            if last_reason.as_ref() != Some(&reason) {
                handler.on_event(
                    &LinkEvent::Lost {
                        reason: reason.clone(),
                        at_host_ns: host_now_ns(),
                    },
                    &self.commander,
                );
            }
            let slow = matches!(
                reason,
                LostReason::VersionMismatch { .. } | LostReason::ConfigureRefused { .. }
            );
            last_reason = Some(reason);
            let wait = if slow { self.s.reconnect_max } else { backoff };
            self.sleep(wait, handler);
            backoff = (backoff * 2).min(self.s.reconnect_max);
        }
        handler.on_event(
            &LinkEvent::Lost {
                reason: LostReason::Shutdown,
                at_host_ns: host_now_ns(),
            },
            &self.commander,
        );
    }

    fn sleep(&self, d: Duration, handler: &mut impl LinkHandler) {
        let end = host_now_ns() + d.as_nanos() as u64;
        while !self.stop.load(Ordering::Relaxed) && host_now_ns() < end {
            handler.on_idle(&self.commander);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn open(&self) -> Result<TTYPort, String> {
        let port = serialport::new(self.s.port.to_string_lossy(), self.s.baud)
            .timeout(Duration::from_millis(20))
            .open_native()
            .map_err(|e| format!("{}: {e}", self.s.port.display()))?;
        let writer_port = port.try_clone_native().map_err(|e| e.to_string())?;
        let mut w = self.commander.lock();
        w.port = Some(writer_port);
        w.ready = false;
        w.pending.clear();
        Ok(port)
    }

    fn disconnect(&mut self) {
        let mut w = self.commander.lock();
        w.port = None;
        w.ready = false;
        w.pending.clear();
        drop(w);
        if let Ok(mut p) = self.ping_times.lock() {
            p.connected_at_ns = None;
        }
        self.decoder.reset();
        self.expected_dev_seq = None;
    }

    fn send_reset(&self) -> Result<(), LostReason> {
        let mut w = self.commander.lock();
        let Some(p) = w.port.as_mut() else {
            return Err(LostReason::Shutdown);
        };
        p.write_all(&[0])
            .map_err(|e| LostReason::Io(e.to_string()))?;
        w.write_cmd(&HostCommand::Reset)
            .map_err(|e| LostReason::Io(e.to_string()))?;
        Ok(())
    }

    /// One connection, from handshake to loss. Returns why it ended.
    fn session(&mut self, mut port: TTYPort, handler: &mut impl LinkHandler) -> LostReason {
        // End any partial frame at the device, then ask for a fresh Hello.
        // Bytes sent right after opening may be lost (a board that resets
        // on open is still in its bootloader; a device may flush its input),
        // so the Reset is repeated until the Hello comes. Reset only makes
        // the device safe and say Hello: repeating it is harmless.
        if let Err(e) = self.send_reset() {
            return e;
        }
        let mut phase = Phase::Hello {
            deadline_ns: host_now_ns() + self.s.hello_timeout.as_nanos() as u64,
            next_reset_ns: host_now_ns() + RESET_REPEAT.as_nanos() as u64,
        };
        let mut last_rx_ns = host_now_ns();
        let mut last_idle_ns = host_now_ns();
        let mut buf = [0u8; 4096];
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return LostReason::Shutdown;
            }
            let n = match port.read(&mut buf) {
                Ok(0) => 0,
                Ok(n) => n,
                Err(e)
                    if e.kind() == std::io::ErrorKind::TimedOut
                        || e.kind() == std::io::ErrorKind::Interrupted =>
                {
                    0
                }
                Err(e) => return LostReason::Io(e.to_string()),
            };
            let now = host_now_ns();
            if n == 0 {
                last_idle_ns = now;
                handler.on_idle(&self.commander);
            }
            if n > 0 {
                let mut result = None;
                let mut frames = 0u32;
                // Split borrows: the decoder callback needs the rest of self.
                let mut decoder = std::mem::take(&mut self.decoder);
                decoder.feed(&buf[..n], |f| {
                    if result.is_some() {
                        return;
                    }
                    frames += 1;
                    result = self.on_frame(f.seq, f.device_message(), now, &mut phase, handler);
                });
                self.decoder = decoder;
                if let Some(reason) = result {
                    return reason;
                }
                if frames > 0 {
                    last_rx_ns = now;
                }
                self.report_decoder_drops(handler);
                // After the bytes' frames, so never ahead of a lever sample.
                if now.saturating_sub(last_idle_ns) >= IDLE_EVERY.as_nanos() as u64 {
                    last_idle_ns = now;
                    handler.on_idle(&self.commander);
                }
            }
            while let Ok(p) = self.timeouts.try_recv() {
                handler.on_event(
                    &LinkEvent::NoAck {
                        seq: p.seq,
                        cmd_type: p.cmd_type,
                    },
                    &self.commander,
                );
            }
            if let Phase::Hello { next_reset_ns, .. } = &mut phase {
                if now > *next_reset_ns {
                    *next_reset_ns = now + RESET_REPEAT.as_nanos() as u64;
                    if let Err(e) = self.send_reset() {
                        return e;
                    }
                }
                // A device still booting is quiet: only the Hello deadline applies.
                last_rx_ns = now;
            }
            match phase {
                Phase::Hello { deadline_ns, .. } if now > deadline_ns => {
                    return LostReason::NoHello
                }
                Phase::Configuring { deadline_ns, .. } if now > deadline_ns => {
                    return LostReason::Io("no Ack for Configure".into())
                }
                _ => {}
            }
            let silent_ns = now.saturating_sub(last_rx_ns);
            if silent_ns > self.s.silence_timeout.as_nanos() as u64 {
                return LostReason::Silent {
                    ms: silent_ns / 1_000_000,
                };
            }
        }
    }

    fn report_decoder_drops(&mut self, handler: &mut impl LinkHandler) {
        let st = self.decoder.stats();
        let (f0, b0) = self.reported_drops;
        // The decoder restarts its counts never; `reset` keeps them.
        if st.frames_dropped > f0 {
            handler.on_event(
                &LinkEvent::BadFrames {
                    frames: st.frames_dropped - f0,
                    bytes: st.bytes_dropped - b0,
                },
                &self.commander,
            );
            self.reported_drops = (st.frames_dropped, st.bytes_dropped);
        }
    }

    /// Handle one intact frame. Returns a reason to end the connection.
    fn on_frame(
        &mut self,
        seq: u16,
        msg: Result<DeviceMessage<'_>, protocol::serial::ParseError>,
        now_ns: u64,
        phase: &mut Phase,
        handler: &mut impl LinkHandler,
    ) -> Option<LostReason> {
        // Device transmit counter: count frames lost on the line.
        if let Some(want) = self.expected_dev_seq {
            let lost = seq.wrapping_sub(want);
            if lost != 0 && lost < 0x8000 && !matches!(msg, Ok(DeviceMessage::Hello(_))) {
                handler.on_event(
                    &LinkEvent::FramesLost {
                        count: u64::from(lost),
                    },
                    &self.commander,
                );
            }
        }
        self.expected_dev_seq = Some(seq.wrapping_add(1));
        let Ok(msg) = msg else {
            // Intact frame of a type or length we don't know: counted as bad.
            handler.on_event(
                &LinkEvent::BadFrames {
                    frames: 1,
                    bytes: 0,
                },
                &self.commander,
            );
            return None;
        };
        match msg {
            DeviceMessage::Hello(hello) => return self.on_hello(hello, now_ns, phase),
            DeviceMessage::Ack(a) => {
                let pending = self.commander.lock().take_pending(a.acked_seq);
                let t_us = self.clock.peek(a.t_us);
                if let Phase::Configuring {
                    seq: cseq,
                    hello,
                    rebooted,
                    ..
                } = *phase
                {
                    if a.acked_seq == cseq {
                        let status = AckStatus::from(a.status);
                        if status != AckStatus::Ok {
                            return Some(LostReason::ConfigureRefused { status });
                        }
                        *phase = Phase::Streaming;
                        self.connections += 1;
                        self.commander.lock().ready = true;
                        if let Ok(mut p) = self.ping_times.lock() {
                            p.connected_at_ns = Some(now_ns);
                        }
                        handler.on_event(
                            &LinkEvent::Connected {
                                hello,
                                reconnect: self.connections > 1,
                                device_rebooted: rebooted,
                            },
                            &self.commander,
                        );
                        return None;
                    }
                }
                if let Some(p) = pending {
                    handler.on_event(
                        &LinkEvent::Acked {
                            seq: p.seq,
                            cmd_type: p.cmd_type,
                            status: a.status.into(),
                            t_us,
                        },
                        &self.commander,
                    );
                }
            }
            _ if !matches!(phase, Phase::Streaming) => {} // stale frames from before the Reset
            DeviceMessage::LeverSamples(b) => {
                let t_first = self.clock.unwrap(b.t_first_us);
                let dev_index = self.index_clock.unwrap(b.first_index);
                let period = u32::from(b.period_us);
                if self.new_stream {
                    self.new_stream = false;
                    // Where this sample falls in the continuous count: after the
                    // last sample received, by the time that has passed.
                    let first = match self.expected {
                        Some((want, want_t)) => {
                            let p = u64::from(period.max(1));
                            want + (t_first.saturating_sub(want_t) + p / 2) / p
                        }
                        None => 0,
                    };
                    self.stream_base = first.saturating_sub(dev_index);
                }
                let first_index = self.stream_base + dev_index;
                match self.expected {
                    None => {}
                    Some((want, _)) if want == first_index => {}
                    Some((want, _)) if first_index > want => handler.on_event(
                        &LinkEvent::SampleGap {
                            from_index: want,
                            missing: first_index - want,
                            t_us: t_first,
                        },
                        &self.commander,
                    ),
                    Some(_) => {} // overlap cannot happen with a sane device; ignore
                }
                let mut batch = LeverBatch {
                    first_index,
                    t_first_us: t_first,
                    period_us: period,
                    len: 0,
                    counts: [0; MAX_SAMPLES_PER_BATCH],
                };
                for (i, (_, _, c)) in b.iter().enumerate().take(MAX_SAMPLES_PER_BATCH) {
                    batch.counts[i] = c;
                    batch.len = (i + 1) as u8;
                }
                self.expected = Some((
                    first_index + u64::from(batch.len),
                    t_first + u64::from(batch.len) * u64::from(period),
                ));
                handler.on_event(&LinkEvent::Lever(batch), &self.commander);
            }
            DeviceMessage::Event(e) => {
                let t_us = self.clock.unwrap(e.t_us);
                handler.on_event(
                    &LinkEvent::Device {
                        t_us,
                        kind: e.kind.into(),
                        aux: e.aux,
                        value: e.value,
                    },
                    &self.commander,
                );
            }
            DeviceMessage::Pong(p) => {
                let sent = self.commander.lock().take_pending(p.ping_seq);
                if let Some(sent) = sent {
                    let sample = SyncSample {
                        host_send_ns: sent.sent_ns,
                        host_recv_ns: now_ns,
                        dev_rx_us: self.clock.unwrap(p.t_rx_us),
                        dev_tx_us: self.clock.unwrap(p.t_tx_us),
                    };
                    if let Some(fit) = self.sync.add(sample) {
                        handler.on_event(
                            &LinkEvent::Clock {
                                fit,
                                rtt_us: sample.rtt_us(),
                            },
                            &self.commander,
                        );
                    }
                }
            }
            DeviceMessage::Fault(f) => {
                let t_us = self.clock.unwrap(f.t_us);
                handler.on_event(
                    &LinkEvent::Fault {
                        t_us,
                        code: f.code.into(),
                        detail: f.detail,
                    },
                    &self.commander,
                );
            }
            DeviceMessage::Heartbeat(h) => {
                let t_us = self.clock.unwrap(h.t_us);
                handler.on_event(
                    &LinkEvent::Heartbeat {
                        t_us,
                        state: h.state,
                        samples_dropped: h.samples_dropped,
                        rx_frames_bad: h.rx_frames_bad,
                        tx_frames_dropped: h.tx_frames_dropped,
                    },
                    &self.commander,
                );
            }
        }
        None
    }

    fn on_hello(&mut self, hello: Hello, now_ns: u64, phase: &mut Phase) -> Option<LostReason> {
        if hello.protocol_version != PROTOCOL_VERSION {
            return Some(LostReason::VersionMismatch {
                device: hello.protocol_version,
                host: PROTOCOL_VERSION,
            });
        }
        // Did the device's clock restart? Compare its time with where the
        // clock fit says it should be now.
        let mut rebooted = false;
        if let Some(fit) = self.sync.fit() {
            let predicted = fit.host_to_rig_us(now_ns);
            let got = self.clock.peek(hello.t_us) as f64;
            if (got - predicted).abs() > 500_000.0 {
                rebooted = true;
                let resume = predicted.max(self.clock.latest_us().unwrap_or(0) as f64) as u64;
                self.clock
                    .reset(resume.saturating_sub(u64::from(hello.t_us)));
                self.sync.clear();
            }
        }
        let _ = self.clock.unwrap(hello.t_us);
        // A new stream starts at device index 0 after Configure; its first
        // batch is placed on the link's sample count by its time.
        self.new_stream = true;
        self.index_clock = RigClock::new();
        let sent = {
            let mut w = self.commander.lock();
            w.write_cmd(&HostCommand::Configure(self.s.configure))
        };
        match sent {
            Ok(s) => {
                *phase = Phase::Configuring {
                    seq: s.seq,
                    hello,
                    rebooted,
                    deadline_ns: now_ns + self.s.ack_timeout.as_nanos() as u64 * 2,
                };
                None
            }
            Err(e) => Some(LostReason::Io(e.to_string())),
        }
    }
}
