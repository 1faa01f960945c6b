//! The receiver: accepts senders on a TCP socket and writes their frames into
//! the shared-memory frame ring with their frame numbers and stamps.
//!
//! Threads: the acceptor (non-blocking `accept`, every connection checked
//! against the handshake cap), one short-lived handshake thread per
//! connection (hello and token within the hello deadline, else refused) and
//! the ring thread ([`Receiver::run`]), which owns the ring writer and the one
//! accepted sender. The newest accepted sender replaces the current one (a
//! restarted sender does not wait for the old connection to time out); only
//! a sender with the token gets that far.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver as ChanRx, Sender as ChanTx};
use std::sync::Arc;
use std::time::{Duration, Instant};

use frame_ring::{host_now_ns, FrameRingWriter, ShmError};
use protocol::ring::{PixelType, RingGeometry};
use zerocopy::IntoBytes;

use crate::wire::{
    tokens_equal, Hello, ReasonCode, Reply, SenderHeader, SenderKind, WireError, WireGeometry,
    FLAG_STAMP_HOST_MONOTONIC, HELLO_LEN, MIN_TOKEN_LEN, PIXEL_U16LE, SENDER_HEADER_LEN,
};

/// What the receiver needs: where to listen, the token, the ring.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub listen: SocketAddr,
    pub token: Vec<u8>,
    pub shm_name: String,
    pub geometry: RingGeometry,
    /// The hello and token must arrive within this.
    pub hello_timeout: Duration,
    /// An accepted sender that sends nothing (no frame, no beat) for this
    /// long is closed.
    pub idle_timeout: Duration,
    /// How often an accepted sender gets an `ACK_`.
    pub ack_interval: Duration,
    /// Connections in their handshake at once at most; more are refused.
    pub max_handshakes: usize,
}

impl ReceiverConfig {
    /// Defaults for everything but the essentials.
    pub fn new(listen: SocketAddr, token: Vec<u8>, shm_name: &str, geometry: RingGeometry) -> Self {
        Self {
            listen,
            token,
            shm_name: shm_name.to_owned(),
            geometry,
            hello_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            ack_interval: Duration::from_millis(100),
            max_handshakes: 4,
        }
    }

    fn wire_geometry(&self) -> WireGeometry {
        WireGeometry {
            width: self.geometry.width(),
            height: self.geometry.height(),
            channels: self.geometry.channels(),
            pixel_type: PIXEL_U16LE,
        }
    }
}

/// Why the receiver could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    #[error(
        "the token is {len} bytes: expected at least {MIN_TOKEN_LEN} (e.g. `head -c 24 \
         /dev/urandom | base64 > token`)"
    )]
    TokenTooShort { len: usize },
    #[error("the frame is {0}: larger than 4 GiB cannot be sent")]
    FrameTooLarge(WireGeometry),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Ring(#[from] ShmError),
}

/// Counts over the receiver's life (also printed at exit).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverStats {
    pub accepted: u64,
    pub refused: u64,
    pub frames_written: u64,
    pub frames_discarded: u64,
    pub generations: u64,
    /// The last `sender_dropped` a sender reported.
    pub sender_dropped: u64,
}

/// A bound receiver with its ring.
#[derive(Debug)]
pub struct Receiver {
    config: ReceiverConfig,
    listener: TcpListener,
    ring: FrameRingWriter,
    frame_bytes: u32,
}

fn log(msg: std::fmt::Arguments<'_>) {
    eprintln!("rig-frame-bridge: {msg}");
}

impl Receiver {
    /// Check the configuration, create the ring and bind the socket.
    pub fn bind(config: ReceiverConfig) -> Result<Self, ReceiverError> {
        if config.token.len() < MIN_TOKEN_LEN {
            return Err(ReceiverError::TokenTooShort {
                len: config.token.len(),
            });
        }
        let g = config.wire_geometry();
        let frame_bytes = g.frame_bytes().ok_or(ReceiverError::FrameTooLarge(g))?;
        let listener =
            TcpListener::bind(config.listen).map_err(|source| ReceiverError::Listen {
                addr: config.listen,
                source,
            })?;
        let ring = FrameRingWriter::create(&config.shm_name, config.geometry)?;
        Ok(Self {
            config,
            listener,
            ring,
            frame_bytes,
        })
    }

    /// The address actually bound (port 0 picks one).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serve until `stop` is set. The ring is closed (not unlinked) at the end.
    pub fn run(self, stop: &AtomicBool) -> Result<ReceiverStats, ReceiverError> {
        let Self {
            config,
            listener,
            ring,
            frame_bytes,
        } = self;
        let (tx, rx) = mpsc::channel();
        let refused = Arc::new(AtomicUsize::new(0));
        let acceptor_stop = Arc::new(AtomicBool::new(false));
        let listen = config.listen;
        let acceptor = {
            let config = config.clone();
            let refused = refused.clone();
            let acceptor_stop = acceptor_stop.clone();
            std::thread::Builder::new()
                .name("bridge-accept".into())
                .spawn(move || accept_loop(&listener, &config, &tx, &refused, &acceptor_stop))
                .map_err(|source| ReceiverError::Listen {
                    addr: listen,
                    source,
                })?
        };
        let mut ring_loop = RingLoop {
            config: &config,
            ring,
            frame_bytes,
            pixels: vec![0u16; frame_bytes as usize / 2],
            last_written: None,
            current: None,
            logged_sender_dropped: 0,
            last_drop_log: None,
            stats: ReceiverStats {
                generations: 1,
                ..ReceiverStats::default()
            },
        };
        let result = ring_loop.run(&rx, stop);
        acceptor_stop.store(true, Ordering::Relaxed);
        let _ = acceptor.join();
        ring_loop.ring.close();
        let mut stats = ring_loop.stats;
        stats.refused = refused.load(Ordering::Relaxed) as u64;
        result.map(|()| stats)
    }
}

/// An accepted connection handed from a handshake thread to the ring thread.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
}

fn accept_loop(
    listener: &TcpListener,
    config: &ReceiverConfig,
    tx: &ChanTx<Accepted>,
    refused: &Arc<AtomicUsize>,
    stop: &AtomicBool,
) {
    if let Err(e) = listener.set_nonblocking(true) {
        log(format_args!("cannot poll the listening socket: {e}"));
        return;
    }
    let in_handshake = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => {
                // EMFILE and friends: wait rather than spin.
                log(format_args!("accept: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        if in_handshake.load(Ordering::Relaxed) >= config.max_handshakes {
            refused.fetch_add(1, Ordering::Relaxed);
            refuse(
                stream,
                peer,
                ReasonCode::Busy,
                &format!(
                    "{} connections are already in their handshake; try again later",
                    config.max_handshakes
                ),
            );
            continue;
        }
        in_handshake.fetch_add(1, Ordering::Relaxed);
        let (config, tx, refused, in_handshake) = (
            config.clone(),
            tx.clone(),
            refused.clone(),
            in_handshake.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("bridge-hello".into())
            .spawn(move || {
                match handshake(stream, peer, &config) {
                    Ok(stream) => {
                        let _ = tx.send(Accepted { stream, peer });
                    }
                    Err(()) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                in_handshake.fetch_sub(1, Ordering::Relaxed);
            });
        if let Err(e) = spawned {
            log(format_args!("cannot start a handshake thread: {e}"));
        }
    }
}

fn refuse(mut stream: TcpStream, peer: SocketAddr, code: ReasonCode, reason: &str) {
    log(format_args!("refused {peer}: {reason}"));
    let _ = stream.write_all(
        &Reply::Refuse {
            code: code as u64,
            reason: reason.to_owned(),
        }
        .encode(),
    );
    let _ = stream.shutdown(Shutdown::Both);
}

/// Read exactly `buf.len()` bytes before `deadline`.
fn read_until(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The hello: magic, version, token, geometry, all before the deadline.
fn handshake(
    mut stream: TcpStream,
    peer: SocketAddr,
    config: &ReceiverConfig,
) -> Result<TcpStream, ()> {
    let deadline = Instant::now() + config.hello_timeout;
    let timeout_reason = |e: std::io::Error| {
        if e.kind() == ErrorKind::TimedOut {
            format!(
                "no complete hello within {} ms",
                config.hello_timeout.as_millis()
            )
        } else {
            format!("reading the hello: {e}")
        }
    };
    let mut fixed = [0u8; HELLO_LEN];
    if let Err(e) = read_until(&mut stream, &mut fixed, deadline) {
        let reason = timeout_reason(e);
        refuse(stream, peer, ReasonCode::HelloTimeout, &reason);
        return Err(());
    }
    let hello = match Hello::decode(&fixed) {
        Ok(h) => h,
        Err(e) => {
            let code = match e {
                WireError::BadVersion { .. } => ReasonCode::BadVersion,
                _ => ReasonCode::BadHello,
            };
            refuse(stream, peer, code, &e.to_string());
            return Err(());
        }
    };
    let mut token = vec![0u8; hello.token_len as usize];
    if let Err(e) = read_until(&mut stream, &mut token, deadline) {
        let reason = timeout_reason(e);
        refuse(stream, peer, ReasonCode::HelloTimeout, &reason);
        return Err(());
    }
    if !tokens_equal(&token, &config.token) {
        refuse(
            stream,
            peer,
            ReasonCode::BadToken,
            "wrong token: use the receiver's token file (--token-file)",
        );
        return Err(());
    }
    let want = config.wire_geometry();
    if hello.geometry != want {
        refuse(
            stream,
            peer,
            ReasonCode::BadGeometry,
            &format!(
                "the sender announces {}: this receiver is configured for {want} (rig.toml \
                 [imaging] and rig-frame-bridge --width/--height/--channels must match the \
                 microscope)",
                hello.geometry
            ),
        );
        return Err(());
    }
    Ok(stream)
}

/// Where a connection's reader is within the current message.
enum ReadState {
    Header {
        buf: [u8; SENDER_HEADER_LEN],
        filled: usize,
    },
    Payload {
        header: SenderHeader,
        filled: usize,
    },
}

struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    state: ReadState,
    written: u64,
    discarded: u64,
    last_number: Option<u64>,
    last_activity: Instant,
    last_ack: Instant,
}

/// What one read step produced.
enum Step {
    Nothing,
    Message(SenderHeader),
    Closed(String),
    Bad(WireError),
}

struct RingLoop<'a> {
    config: &'a ReceiverConfig,
    ring: FrameRingWriter,
    frame_bytes: u32,
    pixels: Vec<u16>,
    /// The last frame number written in the ring's current generation.
    last_written: Option<u64>,
    current: Option<Conn>,
    stats: ReceiverStats,
    logged_sender_dropped: u64,
    last_drop_log: Option<Instant>,
}

impl RingLoop<'_> {
    fn run(&mut self, rx: &ChanRx<Accepted>, stop: &AtomicBool) -> Result<(), ReceiverError> {
        let mut last_beat = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            while let Ok(a) = rx.try_recv() {
                self.take(a);
            }
            if self.current.is_none() {
                // Nothing to read: wait for a sender (no ring heartbeat, so
                // rigd sees the producer silent, which it is).
                if let Ok(a) = rx.recv_timeout(Duration::from_millis(20)) {
                    self.take(a);
                }
                continue;
            }
            let step = self.read_step();
            self.on_step(step)?;
            let now = Instant::now();
            if let Some(c) = self.current.as_mut() {
                if now.duration_since(c.last_activity) > self.config.idle_timeout {
                    let reason = format!(
                        "nothing (no frame, no beat) for {} ms",
                        self.config.idle_timeout.as_millis()
                    );
                    self.close_current(ReasonCode::IdleTimeout, &reason);
                } else if now.duration_since(c.last_ack) >= self.config.ack_interval {
                    c.last_ack = now;
                    self.send_ack();
                }
            }
            if self.current.is_some() && now.duration_since(last_beat) >= Duration::from_millis(50)
            {
                self.ring.heartbeat(host_now_ns());
                last_beat = now;
            }
        }
        if self.current.is_some() {
            self.close_current(ReasonCode::ShuttingDown, "the receiver is stopping");
        }
        Ok(())
    }

    /// A newly accepted sender: it replaces the current one.
    fn take(&mut self, a: Accepted) {
        if self.current.is_some() {
            let reason = format!("replaced by a newer sender from {}", a.peer);
            self.close_current(ReasonCode::Replaced, &reason);
        }
        let mut stream = a.stream;
        let _ = stream.set_read_timeout(Some(Duration::from_millis(20)));
        let accept = Reply::Accept {
            next_frame_number: self.last_written.map_or(0, |n| n.saturating_add(1)),
            frame_bytes: self.frame_bytes,
        };
        if let Err(e) = stream.write_all(&accept.encode()) {
            log(format_args!("{}: sending the accept: {e}", a.peer));
            return;
        }
        log(format_args!("accepted a sender from {}", a.peer));
        self.stats.accepted += 1;
        let now = Instant::now();
        self.current = Some(Conn {
            stream,
            peer: a.peer,
            state: ReadState::Header {
                buf: [0; SENDER_HEADER_LEN],
                filled: 0,
            },
            written: 0,
            discarded: 0,
            last_number: None,
            last_activity: now,
            last_ack: now,
        });
    }

    fn close_current(&mut self, code: ReasonCode, reason: &str) {
        if let Some(mut c) = self.current.take() {
            log(format_args!(
                "closed the sender from {}: {reason} ({} frames written, {} discarded)",
                c.peer, c.written, c.discarded
            ));
            let _ = c.stream.write_all(
                &Reply::Error {
                    code: code as u64,
                    reason: reason.to_owned(),
                }
                .encode(),
            );
            let _ = c.stream.shutdown(Shutdown::Both);
        }
    }

    fn send_ack(&mut self) {
        let Some(c) = self.current.as_mut() else {
            return;
        };
        let ack = Reply::Ack {
            written: c.written,
            discarded: c.discarded,
            last_frame_number: self.last_written.unwrap_or(0),
        };
        if let Err(e) = c.stream.write_all(&ack.encode()) {
            let peer = c.peer;
            self.current = None;
            log(format_args!(
                "dropped the sender from {peer}: it does not read its acks ({e})"
            ));
        }
    }

    /// One `read` on the current connection.
    fn read_step(&mut self) -> Step {
        let Some(c) = self.current.as_mut() else {
            return Step::Nothing;
        };
        let result = match &mut c.state {
            ReadState::Header { buf, filled } => c.stream.read(&mut buf[*filled..]),
            ReadState::Payload { filled, .. } => {
                let bytes = self.pixels.as_mut_slice().as_mut_bytes();
                c.stream.read(&mut bytes[*filled..])
            }
        };
        let n = match result {
            Ok(0) => return Step::Closed("the sender closed the connection".into()),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Step::Nothing
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => return Step::Nothing,
            Err(e) => return Step::Closed(format!("reading: {e}")),
        };
        c.last_activity = Instant::now();
        match &mut c.state {
            ReadState::Header { buf, filled } => {
                *filled += n;
                if *filled < SENDER_HEADER_LEN {
                    return Step::Nothing;
                }
                match SenderHeader::decode(buf, self.frame_bytes) {
                    Err(e) => Step::Bad(e),
                    Ok(h) if h.kind == SenderKind::Frame => {
                        c.state = ReadState::Payload {
                            header: h,
                            filled: 0,
                        };
                        Step::Nothing
                    }
                    Ok(h) => {
                        c.state = ReadState::Header {
                            buf: [0; SENDER_HEADER_LEN],
                            filled: 0,
                        };
                        Step::Message(h)
                    }
                }
            }
            ReadState::Payload { header, filled } => {
                *filled += n;
                if *filled < self.frame_bytes as usize {
                    return Step::Nothing;
                }
                let h = *header;
                c.state = ReadState::Header {
                    buf: [0; SENDER_HEADER_LEN],
                    filled: 0,
                };
                Step::Message(h)
            }
        }
    }

    fn on_step(&mut self, step: Step) -> Result<(), ReceiverError> {
        match step {
            Step::Nothing => Ok(()),
            Step::Closed(why) => {
                if let Some(c) = self.current.take() {
                    log(format_args!(
                        "the sender from {} is gone: {why} ({} frames written, {} discarded)",
                        c.peer, c.written, c.discarded
                    ));
                }
                Ok(())
            }
            Step::Bad(e) => {
                self.close_current(ReasonCode::BadMessage, &e.to_string());
                Ok(())
            }
            Step::Message(h) => match h.kind {
                SenderKind::Frame => self.on_frame(&h),
                SenderKind::Beat => {
                    self.note_sender_dropped(h.sender_dropped);
                    Ok(())
                }
                SenderKind::Bye => {
                    self.note_sender_dropped(h.sender_dropped);
                    self.send_ack();
                    if let Some(c) = self.current.take() {
                        log(format_args!(
                            "the sender from {} said goodbye ({} frames written, {} \
                             discarded, {} dropped at the sender)",
                            c.peer, c.written, c.discarded, h.sender_dropped
                        ));
                    }
                    Ok(())
                }
            },
        }
    }

    /// The sender's running count of frames it dropped: logged when it grew,
    /// at most once a second.
    fn note_sender_dropped(&mut self, total: u64) {
        let due = self
            .last_drop_log
            .map_or(true, |t| t.elapsed() >= Duration::from_secs(1));
        if total > self.logged_sender_dropped && due {
            log(format_args!(
                "the sender reports {total} frames dropped at the sender so far"
            ));
            self.logged_sender_dropped = total;
            self.last_drop_log = Some(Instant::now());
        }
        self.stats.sender_dropped = total;
    }

    fn on_frame(&mut self, h: &SenderHeader) -> Result<(), ReceiverError> {
        self.note_sender_dropped(h.sender_dropped);
        let Some(c) = self.current.as_mut() else {
            return Ok(());
        };
        if c.last_number.is_some_and(|last| h.frame_number <= last) {
            c.discarded += 1;
            self.stats.frames_discarded += 1;
            return Ok(());
        }
        let first_of_conn = c.last_number.is_none();
        c.last_number = Some(h.frame_number);
        if first_of_conn && self.last_written.is_some_and(|last| h.frame_number <= last) {
            // The acquisition numbers its frames afresh: a new generation, which
            // rigd records as a producer restart.
            log(format_args!(
                "frame numbers went back ({} after {}): a new ring generation",
                h.frame_number,
                self.last_written.unwrap_or(0)
            ));
            self.ring.close();
            self.ring = FrameRingWriter::create(&self.config.shm_name, self.config.geometry)?;
            self.stats.generations += 1;
        }
        if cfg!(target_endian = "big") {
            for p in &mut self.pixels {
                *p = u16::from_le(*p);
            }
        }
        if h.flags & FLAG_STAMP_HOST_MONOTONIC != 0 {
            self.ring
                .publish(h.frame_number, h.stamp_ns, None, &self.pixels)?;
        } else {
            // Another machine's clock: stamp the arrival on this host, mark
            // it so (rigd never takes an arrival for a frame-clock edge) and
            // keep the sender's stamp as the hardware timestamp.
            self.ring.publish_arrived(
                h.frame_number,
                host_now_ns(),
                Some(h.stamp_ns),
                &self.pixels,
            )?;
        }
        self.last_written = Some(h.frame_number);
        self.stats.frames_written += 1;
        if let Some(c) = self.current.as_mut() {
            c.written += 1;
            c.last_ack = Instant::now();
        }
        // An ack for every frame: a sender without threads (the Octave one)
        // keeps at most a few frames unacknowledged, so its socket never fills.
        self.send_ack();
        Ok(())
    }
}

/// The ring geometry for the CLI's flags.
pub fn geometry(
    width: u32,
    height: u32,
    channels: u32,
    slots: u32,
) -> Result<RingGeometry, protocol::ring::LayoutError> {
    RingGeometry::new(width, height, channels, PixelType::U16Le, slots)
}
