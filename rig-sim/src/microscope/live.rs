//! The microscope inside the running simulator: a renderer thread fed, at
//! each frame-clock TTL edge, through a bounded channel.
//!
//! The simulator's loop calls [`LiveMicroscope::press`] for every press onset
//! and [`LiveMicroscope::frame`] at every TTL edge; neither blocks. If the
//! renderer is `queue_frames` frames behind, the frame is dropped: it is not
//! rendered nor published, and `frames_truth.tsv` records it with
//! `dropped = 1` (its dF/F truth is still written).
//!
//! Frames are rendered `lookahead_s` (0.2 s by default) of true time after
//! their TTL edge, because neurons with a negative preferred lag fire before
//! the press that they belong to is known. The ring's `host_monotonic_ns` is
//! still the host time of the TTL edge, so the daemon can align by TTL count
//! (`frame_number`) or by host time; only the publication is late.

use std::io;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use firmware_bridge::link::host_now_ns;
use frame_ring::{FrameRingWriter, ShmError};
use protocol::ring::{LayoutError, PixelType, RingError, RingGeometry, RingWriter};

use super::files::{FrameRow, MicroscopeTruth};
use super::{Microscope, MicroscopeSpec, SpecError};
use crate::truth::TruthEvent;
use crate::SimClock;

/// Why a [`FrameSink`] could not publish a frame.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The shared-memory ring refused it.
    #[error(transparent)]
    Shm(#[from] ShmError),
    /// The in-memory ring refused it.
    #[error(transparent)]
    Ring(#[from] RingError),
}

/// Where rendered frames go.
pub trait FrameSink: Send {
    /// Publish one frame (`channels x height x width`, channel-major).
    fn publish(
        &mut self,
        frame_number: u64,
        host_ns: u64,
        pixels: &[u16],
    ) -> Result<(), PublishError>;
    /// Called at least every 100 ms while no frame is published.
    fn heartbeat(&mut self, _now_ns: u64) {}
    /// No more frames.
    fn close(&mut self) {}
}

impl FrameSink for FrameRingWriter {
    fn publish(
        &mut self,
        frame_number: u64,
        host_ns: u64,
        pixels: &[u16],
    ) -> Result<(), PublishError> {
        FrameRingWriter::publish(self, frame_number, host_ns, None, pixels)?;
        Ok(())
    }

    fn heartbeat(&mut self, now_ns: u64) {
        FrameRingWriter::heartbeat(self, now_ns);
    }

    fn close(&mut self) {
        FrameRingWriter::close(self);
    }
}

impl FrameSink for RingWriter {
    fn publish(
        &mut self,
        frame_number: u64,
        host_ns: u64,
        pixels: &[u16],
    ) -> Result<(), PublishError> {
        RingWriter::publish(self, frame_number, host_ns, None, pixels)?;
        Ok(())
    }

    fn heartbeat(&mut self, now_ns: u64) {
        RingWriter::heartbeat(self, now_ns);
    }
}

/// The acquisition program's side of the ring: created at its start frame
/// (the frame clock may run before), re-created at a restart, after which
/// it numbers its frames from 1 again.
struct ProgramSink {
    name: String,
    geometry: RingGeometry,
    rate_mhz: u32,
    writer: Option<FrameRingWriter>,
    start_frame: u64,
    restart_frame: Option<u64>,
}

impl ProgramSink {
    fn open(&mut self) -> Result<(), ShmError> {
        let mut w = FrameRingWriter::create(&self.name, self.geometry)?;
        w.set_nominal_frame_rate_mhz(self.rate_mhz);
        self.writer = Some(w);
        Ok(())
    }
}

impl FrameSink for ProgramSink {
    fn publish(
        &mut self,
        frame_number: u64,
        host_ns: u64,
        pixels: &[u16],
    ) -> Result<(), PublishError> {
        if frame_number < self.start_frame {
            return Ok(());
        }
        let number = match self.restart_frame {
            Some(r) if frame_number >= r => {
                if frame_number == r || self.writer.is_none() {
                    // A new run of the program: a new generation.
                    if let Some(mut w) = self.writer.take() {
                        w.close();
                    }
                    self.open()?;
                }
                frame_number - r + 1
            }
            _ => frame_number,
        };
        if self.writer.is_none() {
            self.open()?;
        }
        if let Some(w) = self.writer.as_mut() {
            w.publish(number, host_ns, None, pixels)?;
        }
        Ok(())
    }

    fn heartbeat(&mut self, now_ns: u64) {
        if let Some(w) = self.writer.as_mut() {
            w.heartbeat(now_ns);
        }
    }

    fn close(&mut self) {
        if let Some(w) = self.writer.as_mut() {
            w.close();
        }
    }
}

/// Discards the frames (ground truth only).
#[derive(Debug, Clone, Copy, Default)]
pub struct NullSink;

impl FrameSink for NullSink {
    fn publish(&mut self, _: u64, _: u64, _: &[u16]) -> Result<(), PublishError> {
        Ok(())
    }
}

/// One frame-clock TTL edge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameTick {
    /// TTL edges since the simulator started, counting this one (1-based);
    /// the ring's `frame_number`.
    pub frame_number: u64,
    /// Sim true time of the edge, µs.
    pub true_us: f64,
    /// Device counter at the edge, unwrapped.
    pub device_us: u64,
    /// Host `CLOCK_MONOTONIC` at the edge, ns.
    pub host_ns: u64,
}

/// Host `CLOCK_MONOTONIC` (ns) at sim true time `true_us`, for a simulator
/// that started at `start_host_ns`: the inverse of
/// [`SimClock::true_us_at_host_ns`].
pub fn host_ns_at(clock: &SimClock, start_host_ns: u64, true_us: f64) -> u64 {
    let ns = (true_us * 1e3 / clock.speed).round();
    if ns <= 0.0 {
        start_host_ns
    } else {
        start_host_ns.saturating_add(ns as u64)
    }
}

/// The simulator's microscope options (`rig-sim --microscope ...`).
#[derive(Debug, Clone, PartialEq)]
pub struct MicroscopeOptions {
    /// POSIX shared-memory name of the frame ring (`/rigd-frames`); `None`:
    /// render and write the truth only.
    pub shm_name: Option<String>,
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    pub neurons: usize,
    /// Ground-truth directory.
    pub truth_dir: Option<PathBuf>,
    /// Frames the renderer may fall behind before frames are dropped.
    pub queue_frames: usize,
    /// Ring slots (0: about 2 s of frames, at least 8).
    pub slot_count: u32,
    /// The acquisition program starts (creates the ring and publishes) at
    /// this TTL edge (0 or 1: at once); the frame clock runs before it.
    pub start_frame: u64,
    /// At this TTL edge the acquisition program restarts: the ring gets a
    /// new generation and the frame numbers start again at 1.
    pub restart_frame: Option<u64>,
    /// Constant displacement of the field of view, px (x, y): see
    /// [`MicroscopeSpec::fov_offset_px`].
    pub fov_offset_px: (f64, f64),
    /// Constant rotation of the field of view, degrees: see
    /// [`MicroscopeSpec::fov_rotation_deg`].
    pub fov_rotation_deg: f64,
}

impl MicroscopeOptions {
    /// 512x512, one channel, 200 neurons, publishing to `shm_name`.
    pub fn new(shm_name: Option<String>) -> Self {
        Self {
            shm_name,
            width: 512,
            height: 512,
            channels: 1,
            neurons: 200,
            truth_dir: None,
            queue_frames: 8,
            slot_count: 0,
            start_frame: 0,
            restart_frame: None,
            fov_offset_px: (0.0, 0.0),
            fov_rotation_deg: 0.0,
        }
    }

    /// The generator's spec for a simulator run.
    pub fn spec(&self, seed: u64, day: u8, frame_rate_hz: f64) -> MicroscopeSpec {
        let mut s = MicroscopeSpec::new(self.width, self.height);
        s.channels = self.channels;
        s.neurons = self.neurons;
        s.seed = seed;
        s.day = day;
        s.frame_rate_hz = frame_rate_hz;
        s.fov_offset_px = self.fov_offset_px;
        s.fov_rotation_deg = self.fov_rotation_deg;
        s
    }

    /// Check the values (the message names the flag).
    pub fn validate(&self, frame_rate_hz: f64) -> Result<(), MicroscopeError> {
        if frame_rate_hz <= 0.0 {
            return Err(MicroscopeError::NoFrameClock);
        }
        if self.queue_frames == 0 {
            return Err(MicroscopeError::NoQueue);
        }
        self.spec(1, 14, frame_rate_hz)
            .validate()
            .map_err(MicroscopeError::Spec)?;
        if let Some(name) = &self.shm_name {
            frame_ring::check_shm_name(name).map_err(|error| MicroscopeError::ShmName {
                name: name.clone(),
                error,
            })?;
        }
        Ok(())
    }

    /// Build the generator, create the ring and the truth directory, and
    /// start the renderer thread.
    pub fn start(
        &self,
        seed: u64,
        day: u8,
        frame_rate_hz: f64,
    ) -> Result<LiveMicroscope, MicroscopeError> {
        self.validate(frame_rate_hz)?;
        let micro =
            Microscope::new(self.spec(seed, day, frame_rate_hz)).map_err(MicroscopeError::Spec)?;
        let truth = match &self.truth_dir {
            Some(dir) => Some(MicroscopeTruth::create(dir, &micro).map_err(|error| {
                MicroscopeError::Truth {
                    dir: dir.clone(),
                    error,
                }
            })?),
            None => None,
        };
        let sink: Box<dyn FrameSink> = match &self.shm_name {
            Some(name) => {
                let slots = if self.slot_count > 0 {
                    self.slot_count
                } else {
                    ((2.0 * frame_rate_hz).ceil() as u32).clamp(8, 1024)
                };
                let g = RingGeometry::new(
                    self.width,
                    self.height,
                    self.channels,
                    PixelType::U16Le,
                    slots,
                )
                .map_err(|error| MicroscopeError::Geometry {
                    name: name.clone(),
                    error,
                })?;
                let rate_mhz = (frame_rate_hz * 1e3).round() as u32;
                let mut sink = ProgramSink {
                    name: name.clone(),
                    geometry: g,
                    rate_mhz,
                    writer: None,
                    start_frame: self.start_frame,
                    restart_frame: self.restart_frame,
                };
                if self.start_frame <= 1 {
                    sink.open().map_err(MicroscopeError::Ring)?;
                }
                Box::new(sink)
            }
            None => Box::new(NullSink),
        };
        let mut live = LiveMicroscope::spawn(micro, sink, truth, self.queue_frames)
            .map_err(MicroscopeError::Thread)?;
        live.ring_name.clone_from(&self.shm_name);
        Ok(live)
    }
}

/// Why the simulated microscope could not start. The message names the flag
/// or the object, the value and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum MicroscopeError {
    #[error("--microscope needs a frame clock: --frame-rate-hz must be > 0")]
    NoFrameClock,
    #[error("microscope queue_frames: must be >= 1")]
    NoQueue,
    /// The generator's spec (size, channels, neurons) is refused.
    #[error("--microscope: {0}")]
    Spec(SpecError),
    /// The ring's name is not a valid POSIX shared-memory name.
    #[error("--microscope {name}: {error}")]
    ShmName { name: String, error: ShmError },
    /// The frame size and slot count make no valid ring.
    #[error("--microscope {name}: {error}")]
    Geometry { name: String, error: LayoutError },
    /// The shared-memory ring could not be created (the message names it).
    #[error(transparent)]
    Ring(ShmError),
    /// The ground-truth directory or its files could not be created.
    #[error("--microscope-truth {}: {error}", dir.display())]
    Truth { dir: PathBuf, error: io::Error },
    #[error("cannot start the microscope thread: {0}")]
    Thread(io::Error),
}

/// What the microscope did, returned by [`LiveMicroscope::finish`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MicroscopeStats {
    /// TTL edges seen.
    pub frames: u64,
    pub frames_published: u64,
    /// Frames dropped because the renderer was behind.
    pub frames_dropped: u64,
    pub publish_errors: u64,
    /// Rows written to `frames_truth.tsv`.
    pub truth_rows: u64,
    /// Render time per frame, µs.
    pub render_mean_us: f64,
    pub render_max_us: f64,
}

#[derive(Debug)]
enum Msg {
    Frame {
        tick: FrameTick,
        presses: Vec<f64>,
        dropped: Vec<FrameTick>,
    },
    Finish {
        presses: Vec<f64>,
        dropped: Vec<FrameTick>,
    },
}

/// The running microscope. Dropping it finishes it (renders what is left,
/// closes the ring, flushes the truth).
#[derive(Debug)]
pub struct LiveMicroscope {
    tx: Option<Sender<Msg>>,
    thread: Option<JoinHandle<MicroscopeStats>>,
    presses: Vec<f64>,
    drops: Vec<FrameTick>,
    frames: u64,
    dropped: u64,
    /// The frame ring this microscope created, removed when it stops (a
    /// reader that has it mapped keeps its mapping).
    ring_name: Option<String>,
}

impl LiveMicroscope {
    /// Start the renderer thread.
    pub fn spawn(
        micro: Microscope,
        sink: Box<dyn FrameSink>,
        truth: Option<MicroscopeTruth>,
        queue_frames: usize,
    ) -> io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded(queue_frames.max(1));
        let thread = std::thread::Builder::new()
            .name("rig-sim-microscope".to_string())
            .spawn(move || {
                normal_priority();
                Renderer::new(micro, sink, truth).run(&rx)
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            presses: Vec::new(),
            drops: Vec::new(),
            frames: 0,
            dropped: 0,
            ring_name: None,
        })
    }

    /// A press began at true time `onset_us`.
    pub fn press(&mut self, onset_us: f64) {
        self.presses.push(onset_us);
    }

    /// Feed a truth event of the mouse: `press_start` rows other than twitches
    /// are press onsets.
    pub fn mouse_event(&mut self, ev: &TruthEvent) {
        if ev.kind == "press_start" && !ev.detail.starts_with("twitch") {
            self.press(ev.true_us);
        }
    }

    /// A TTL edge: queue the frame for rendering. Never blocks; returns false
    /// if the frame was dropped (the renderer is behind).
    pub fn frame(&mut self, tick: FrameTick) -> bool {
        self.frames += 1;
        let Some(tx) = &self.tx else { return false };
        let msg = Msg::Frame {
            tick,
            presses: std::mem::take(&mut self.presses),
            dropped: std::mem::take(&mut self.drops),
        };
        match tx.try_send(msg) {
            Ok(()) => true,
            Err(TrySendError::Full(Msg::Frame {
                tick,
                presses,
                dropped,
            })) => {
                self.presses = presses;
                self.drops = dropped;
                self.drops.push(tick);
                self.dropped += 1;
                false
            }
            Err(_) => {
                self.tx = None;
                false
            }
        }
    }

    /// Frames dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Render what is queued, close the ring, flush the truth.
    pub fn finish(mut self) -> MicroscopeStats {
        self.shut_down()
    }

    fn shut_down(&mut self) -> MicroscopeStats {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Msg::Finish {
                presses: std::mem::take(&mut self.presses),
                dropped: std::mem::take(&mut self.drops),
            });
        }
        let joined = self.thread.take().map(|t| t.join().unwrap_or_default());
        if let Some(name) = self.ring_name.take() {
            // Closed by the renderer above; nobody else will remove it.
            let _ = frame_ring::unlink_ring(&name);
        }
        let Some(mut stats) = joined else {
            return MicroscopeStats::default();
        };
        stats.frames = self.frames;
        stats.frames_dropped = self.dropped;
        stats
    }
}

impl Drop for LiveMicroscope {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}

/// Rendering is bulk work: if the simulator's loop runs real-time
/// (`SCHED_FIFO`, inherited by threads it starts), drop back to the normal
/// policy so a 512x512 movie cannot starve the rest of the machine. A refusal
/// leaves the policy unchanged, which is harmless.
fn normal_priority() {
    let _ = firmware_bridge::rt::make_current_thread_normal();
}

/// The renderer thread's state.
struct Renderer {
    micro: Microscope,
    sink: Box<dyn FrameSink>,
    truth: Option<MicroscopeTruth>,
    pending: std::collections::VecDeque<(FrameTick, bool)>,
    next_index: u64,
    latest_us: f64,
    lookahead_us: f64,
    pixels: Vec<u16>,
    dff: Vec<f32>,
    stats: MicroscopeStats,
    render_total_us: f64,
    rendered: u64,
}

impl Renderer {
    fn new(micro: Microscope, sink: Box<dyn FrameSink>, truth: Option<MicroscopeTruth>) -> Self {
        let lookahead_us = micro.spec().lookahead_s() * 1e6;
        Self {
            pixels: vec![0; micro.frame_pixels()],
            dff: vec![0.0; micro.neurons().len()],
            micro,
            sink,
            truth,
            pending: Default::default(),
            next_index: 0,
            latest_us: f64::NEG_INFINITY,
            lookahead_us,
            stats: MicroscopeStats::default(),
            render_total_us: 0.0,
            rendered: 0,
        }
    }

    fn run(mut self, rx: &Receiver<Msg>) -> MicroscopeStats {
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Msg::Frame {
                    tick,
                    presses,
                    dropped,
                }) => {
                    self.take(&presses, &dropped);
                    self.latest_us = self.latest_us.max(tick.true_us);
                    self.pending.push_back((tick, false));
                    self.process(false);
                }
                Ok(Msg::Finish { presses, dropped }) => {
                    self.take(&presses, &dropped);
                    break;
                }
                Err(RecvTimeoutError::Timeout) => self.sink.heartbeat(host_now_ns()),
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.process(true);
        self.sink.close();
        if let Some(t) = self.truth.take() {
            self.stats.truth_rows = t.rows();
            if let Err(e) = t.finish() {
                eprintln!("rig-sim: --microscope-truth: {e}");
            }
        }
        if self.rendered > 0 {
            self.stats.render_mean_us = self.render_total_us / self.rendered as f64;
        }
        self.stats
    }

    fn take(&mut self, presses: &[f64], dropped: &[FrameTick]) {
        for &p in presses {
            self.micro.add_press(p / 1e6);
        }
        for &d in dropped {
            self.pending.push_back((d, true));
        }
    }

    /// Render (or record as dropped) the pending frames whose lookahead has
    /// passed; all of them if `all`.
    fn process(&mut self, all: bool) {
        while let Some(&(tick, dropped)) = self.pending.front() {
            if !all && tick.true_us + self.lookahead_us > self.latest_us {
                break;
            }
            self.pending.pop_front();
            let t_s = tick.true_us / 1e6;
            let truth = if dropped {
                self.micro.truth_at(t_s, &mut self.dff)
            } else {
                let t0 = Instant::now();
                let truth =
                    self.micro
                        .render(self.next_index, t_s, &mut self.pixels, &mut self.dff);
                let us = t0.elapsed().as_secs_f64() * 1e6;
                self.render_total_us += us;
                self.rendered += 1;
                self.stats.render_max_us = self.stats.render_max_us.max(us);
                match self
                    .sink
                    .publish(tick.frame_number, tick.host_ns, &self.pixels)
                {
                    Ok(()) => self.stats.frames_published += 1,
                    Err(e) => {
                        if self.stats.publish_errors == 0 {
                            eprintln!("rig-sim: microscope: publishing a frame: {e}");
                        }
                        self.stats.publish_errors += 1;
                    }
                }
                truth
            };
            self.next_index += 1;
            if let Some(t) = self.truth.as_mut() {
                let row = FrameRow {
                    frame_number: tick.frame_number,
                    true_us: tick.true_us,
                    device_us: tick.device_us,
                    host_ns: tick.host_ns,
                    truth,
                    dropped,
                };
                if let Err(e) = t.push(&row, &self.dff) {
                    eprintln!("rig-sim: --microscope-truth: {e}; no more truth rows");
                    self.truth = None;
                }
            }
        }
    }
}
