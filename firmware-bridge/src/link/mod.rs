//! The serial link to the rig's microcontroller.
//!
//! One reader thread owns the port's read side and the decoder, and hands
//! every sample and event to a [`LinkHandler`] on that same thread — the task
//! engine can run there and send a valve command without a hop through any
//! queue or async runtime. A ticker thread sends the host heartbeat and the
//! clock-sync pings and notices missing acknowledgements. The reader thread
//! also owns the connection: it opens the port, notices a read error, and
//! reconnects after the wait the state asks for, reporting every change as a
//! [`LinkEvent`].
//!
//! What the frames mean lives in [`state::LinkState`], which does no I/O: the
//! handshake (`Reset`, `Hello`, version check, `Configure`), the rig clock and
//! clock sync, sample indices continuous across reconnects, lost and bad
//! frames, silence, and the reconnect policy. The reader loop reads bytes,
//! decodes frames, feeds each to the state with the host time, and carries
//! out the state's [`state::Output`]s (hand an event to the handler, write a
//! command, mark the link ready, close the connection).
//!
//! Commands go out through a [`Commander`], from any thread; each gets a
//! sequence number and must be acknowledged within the ack timeout. A missing
//! acknowledgement is reported, never answered by sending the command again.

mod event;
pub mod state;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use protocol::serial::{Configure, Decoder, HostCommand, MAX_SAMPLES_PER_BATCH, MAX_WIRE_FRAME};
use serialport::TTYPort;

pub use event::{AnomalyKind, LeverBatch, LinkEvent, LostReason, OpenError};
use state::{LinkState, Output, PendingCommand, MAX_OUTPUTS_PER_INPUT};

/// The reader calls [`LinkHandler::on_idle`] at least this often, even while
/// bytes (say, a stream of garbage that makes no events) keep arriving.
pub const IDLE_EVERY: Duration = Duration::from_millis(50);

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

/// The write side, shared between the reader thread, the ticker and any
/// [`Commander`]. The lock is held only while one frame is written.
#[derive(Debug)]
struct Writer {
    port: Option<TTYPort>,
    /// Commands may be sent (the handshake finished).
    ready: bool,
    next_seq: u16,
    pending: Vec<PendingCommand>,
    last_tx_ns: u64,
    /// Host heartbeat period set by the link state for a device clock at
    /// another rate (`None`: the configured one).
    heartbeat_ns: Option<u64>,
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
        self.pending.push(PendingCommand {
            seq,
            cmd_type: cmd.msg_type(),
            sent_ns: host_ns,
        });
        Ok(Sent { seq, host_ns })
    }

    fn take_pending(&mut self, seq: u16) -> Option<PendingCommand> {
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
            heartbeat_ns: None,
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

/// When the current connection finished its handshake (the reader sets it on
/// [`Output::Ready`]), for the ticker's fast-ping phase.
#[derive(Debug, Default)]
struct PingTimes {
    connected_at_ns: Option<u64>,
}

struct Ticker {
    settings: LinkSettings,
    commander: Commander,
    stop: Arc<AtomicBool>,
    timeouts: Sender<PendingCommand>,
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
            let heartbeat_ns = w
                .heartbeat_ns
                .unwrap_or(self.settings.heartbeat_interval.as_nanos() as u64);
            if now.saturating_sub(w.last_tx_ns) >= heartbeat_ns
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

/// The reader thread: the port's read side, the decoder and the link state.
struct Reader {
    s: LinkSettings,
    commander: Commander,
    stop: Arc<AtomicBool>,
    timeouts: Receiver<PendingCommand>,
    ping_times: Arc<Mutex<PingTimes>>,
    decoder: Decoder,
    state: LinkState,
    /// The state's outputs, drained after every input. Made once with room
    /// for one input's worth, so the sample path never allocates.
    out: Vec<Output>,
}

impl Reader {
    fn new(
        s: LinkSettings,
        commander: Commander,
        stop: Arc<AtomicBool>,
        timeouts: Receiver<PendingCommand>,
        ping_times: Arc<Mutex<PingTimes>>,
    ) -> Self {
        Self {
            state: LinkState::new(&s),
            out: Vec::with_capacity(MAX_OUTPUTS_PER_INPUT),
            s,
            commander,
            stop,
            timeouts,
            ping_times,
            decoder: Decoder::new(),
        }
    }

    fn run(&mut self, handler: &mut impl LinkHandler) {
        if let Some(p) = self.s.realtime_priority {
            if let Err(e) = crate::rt::make_current_thread_realtime(p) {
                tracing::warn!("serial link reader is not real-time: {e}");
            }
        }
        while !self.stop.load(Ordering::Relaxed) {
            let reason = match self.open() {
                Ok(port) => self.session(port, handler),
                Err(e) => LostReason::Open(e),
            };
            self.disconnect();
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let now = host_now_ns();
            let wait = self.state.closed(reason, now, &mut self.out);
            // Only the `Lost` report: there is no connection left to end.
            let _ = self.perform(now, handler);
            self.sleep(wait, handler);
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

    fn open(&self) -> Result<TTYPort, OpenError> {
        let port = serialport::new(self.s.port.to_string_lossy(), self.s.baud)
            .timeout(Duration::from_millis(20))
            .open_native()
            .map_err(|e| OpenError::from_serialport(self.s.port.clone(), self.s.baud, &e))?;
        let writer_port = port
            .try_clone_native()
            .map_err(|e| OpenError::WriteHandle {
                port: self.s.port.clone(),
                reason: e.to_string(),
            })?;
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
    }

    /// Carry out the outputs the state has pushed (see [`perform`]).
    fn perform(&mut self, now_ns: u64, handler: &mut impl LinkHandler) -> Option<LostReason> {
        perform(
            &mut self.out,
            &mut self.state,
            &self.commander,
            &self.ping_times,
            now_ns,
            handler,
        )
    }

    /// One connection, from handshake to loss. Returns why it ended.
    fn session(&mut self, mut port: TTYPort, handler: &mut impl LinkHandler) -> LostReason {
        let start_ns = host_now_ns();
        self.state.connect(start_ns, &mut self.out);
        if let Some(reason) = self.perform(start_ns, handler) {
            return reason;
        }
        let mut last_idle_ns = start_ns;
        let mut buf = [0u8; 4096];
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return LostReason::Shutdown;
            }
            let n = match port.read(&mut buf) {
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
            } else {
                // The latency path: each frame goes to the state and its
                // outputs (a lever batch to the handler, which may send a
                // valve command at once) are carried out before the next
                // frame is decoded. Only an `Ack` or a `Pong` takes the
                // writer's lock here, to find the command it answers.
                let mut end = None;
                let Self {
                    decoder,
                    state,
                    out,
                    commander,
                    ping_times,
                    ..
                } = self;
                decoder.feed(&buf[..n], |f| {
                    if end.is_some() {
                        return;
                    }
                    let msg = f.device_message();
                    let answered = state
                        .answers(&msg)
                        .and_then(|seq| commander.lock().take_pending(seq));
                    state.on_frame(f.seq, msg, answered, now, out);
                    end = perform(out, state, commander, ping_times, now, handler);
                });
                if let Some(reason) = end {
                    return reason;
                }
                self.state
                    .on_decoder_stats(self.decoder.stats(), &mut self.out);
                if let Some(reason) = self.perform(now, handler) {
                    return reason;
                }
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
            self.state.on_tick(now, &mut self.out);
            if let Some(reason) = self.perform(now, handler) {
                return reason;
            }
        }
    }
}

/// Carry out the state's outputs in order, emptying the buffer. Returns why
/// the connection must end, if an output says so or a write failed; the
/// outputs after that one go with the connection.
fn perform(
    out: &mut Vec<Output>,
    state: &mut LinkState,
    commander: &Commander,
    ping_times: &Mutex<PingTimes>,
    now_ns: u64,
    handler: &mut impl LinkHandler,
) -> Option<LostReason> {
    for output in out.drain(..) {
        match output {
            Output::Event(event) => handler.on_event(&event, commander),
            Output::SendReset => {
                if let Err(reason) = send_reset(commander) {
                    return Some(reason);
                }
            }
            Output::SendConfigure(configure) => {
                let sent = commander
                    .lock()
                    .write_cmd(&HostCommand::Configure(configure));
                match sent {
                    Ok(sent) => state.configure_sent(sent.seq),
                    Err(e) => return Some(LostReason::Io(e.to_string())),
                }
            }
            Output::Ready => {
                commander.lock().ready = true;
                if let Ok(mut p) = ping_times.lock() {
                    p.connected_at_ns = Some(now_ns);
                }
            }
            Output::HeartbeatInterval(d) => {
                commander.lock().heartbeat_ns = Some(d.as_nanos() as u64);
            }
            Output::Close(reason) => return Some(reason),
        }
    }
    None
}

/// End any partial frame at the device, then ask for a fresh `Hello`.
fn send_reset(commander: &Commander) -> Result<(), LostReason> {
    let mut w = commander.lock();
    let Some(p) = w.port.as_mut() else {
        return Err(LostReason::Shutdown);
    };
    p.write_all(&[0])
        .map_err(|e| LostReason::Io(e.to_string()))?;
    w.write_cmd(&HostCommand::Reset)
        .map_err(|e| LostReason::Io(e.to_string()))?;
    Ok(())
}
