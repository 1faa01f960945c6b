//! The real-time loop: one thread that runs the device and the mouse in true
//! time, moves bytes between the device and the pty through the latency model,
//! and applies the scheduled faults.
//!
//! Each turn of the loop reads the host clock, turns it into true time
//! (`SimClock::true_us`), reads what the host wrote, simulates up to that true
//! time in chunks of at most 2 ms (so the mouse hears a tone or gets water
//! within 2 ms of true time, whatever the speed), writes the frames whose
//! delivery time has come, and sleeps (`ppoll` on the pty) until the next thing
//! is due. Inputs inside a chunk (host bytes delivered, lick edges, frame-clock
//! edges, faults) are applied in time order, each at its own device time, so a
//! command's `Ack` and a `Pong`'s `t_rx_us` carry the time the delayed bytes
//! reached the device.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use firmware_bridge::link::host_now_ns;
use nix::poll::{PollFd, PollFlags};
use nix::sys::time::TimeSpec;

use crate::device::{Device, DeviceIo, DigitalInput, OutputChange};
use crate::microscope::live::{host_ns_at, FrameTick, LiveMicroscope}; // [microscope hook]
use crate::mouse::Mouse;
use crate::pty::{self, Pty};
use crate::rng::Rng;
use crate::truth::{TruthEvent, TruthLog};
use crate::valve::ValveModel;
use crate::{FaultSpec, LatencyModel, SimClock, SimError, SimOptions, SimStats};

/// Longest stretch of true time simulated in one piece, µs.
const CHUNK_US: f64 = 2_000.0;
/// Longest sleep between two turns of the loop (the stop flag is checked
/// every turn).
const MAX_SLEEP: Duration = Duration::from_millis(5);
/// Shortest sleep when faster than real time: at high sample rates and
/// speeds several frames go out per turn rather than one turn per frame.
const MIN_SLEEP_FAST: Duration = Duration::from_micros(200);
/// Shortest sleep in real time: short enough that a sample due just after
/// another deadline (a frame-clock edge, a lick) still leaves on time rather
/// than up to 200 µs late, which the control-latency bench would count
/// against the daemon.
const MIN_SLEEP_REAL_TIME: Duration = Duration::from_micros(10);
/// Most bytes handed to one `write`.
const WRITE_CHUNK: usize = 64 * 1024;

/// The device clock of the current boot.
#[derive(Debug, Clone, Copy)]
struct Epoch {
    clock: SimClock,
    /// True time at which this boot's counter read `clock.offset_us`.
    start_true_us: f64,
}

impl Epoch {
    fn device_us(&self, true_us: f64) -> u64 {
        self.clock.device_us(true_us - self.start_true_us)
    }

    fn true_us(&self, device_us: u64) -> f64 {
        self.start_true_us + self.clock.true_at_device(device_us)
    }
}

/// Bytes on their way to the host, due at a host time.
#[derive(Debug)]
struct OutChunk {
    due: Instant,
    bytes: Vec<u8>,
}

/// The serial line: the pty, both directions' latency, the device's transmit
/// buffer.
#[derive(Debug)]
struct Link {
    pty: Option<Pty>,
    host_present: bool,
    last_presence_check: Instant,
    out: VecDeque<OutChunk>,
    /// Bytes of `out.front()` already written.
    front_written: usize,
    /// Bytes in `out` not yet written.
    queued_bytes: usize,
    /// Bytes that were due but could not be written at the last flush.
    stuck_bytes: usize,
    last_out_due: Instant,
    inbound: VecDeque<(Instant, Vec<u8>)>,
    last_in_due: Instant,
    silent: bool,
    latency: LatencyModel,
    rng: Rng,
    tx_capacity: usize,
    scratch: Vec<u8>,
    bytes_written: u64,
    host_bytes_in: u64,
    host_opens: u32,
}

impl Link {
    fn delay(&mut self) -> Duration {
        if self.latency.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(self.latency.sample(&mut self.rng) / 1e6)
        }
    }

    /// Whether the device's transmitter can take `len` more bytes.
    fn can_transmit(&self, len: usize) -> bool {
        if self.pty.is_none() || self.silent {
            return false;
        }
        let held = if self.host_present {
            self.stuck_bytes
        } else {
            self.queued_bytes
        };
        held + len <= self.tx_capacity
    }

    /// A frame leaves the device at host time `sent`; it reaches the host
    /// after the link latency, never before an earlier frame.
    fn send(&mut self, sent: Instant, frame: &[u8]) {
        let due = (sent + self.delay()).max(self.last_out_due);
        self.push_out(due, frame.to_vec());
    }

    fn push_out(&mut self, due: Instant, bytes: Vec<u8>) {
        self.last_out_due = due;
        self.queued_bytes += bytes.len();
        self.out.push_back(OutChunk { due, bytes });
    }

    fn clear(&mut self) {
        self.out.clear();
        self.front_written = 0;
        self.queued_bytes = 0;
        self.stuck_bytes = 0;
        self.inbound.clear();
    }

    /// Write every chunk that is due, as far as the pty takes it.
    fn flush(&mut self, now: Instant) {
        let Some(pty) = self.pty.as_ref().filter(|_| self.host_present) else {
            self.stuck_bytes = self.queued_bytes;
            return;
        };
        loop {
            self.scratch.clear();
            for (i, c) in self.out.iter().enumerate() {
                if c.due > now || self.scratch.len() >= WRITE_CHUNK {
                    break;
                }
                let from = if i == 0 { self.front_written } else { 0 };
                self.scratch.extend_from_slice(&c.bytes[from..]);
            }
            if self.scratch.is_empty() {
                break;
            }
            let n = match pty.write(&self.scratch) {
                Ok(n) => n,
                Err(_) => {
                    self.host_present = false;
                    0
                }
            };
            self.bytes_written += n as u64;
            self.queued_bytes -= n;
            let mut left = n;
            while left > 0 {
                let Some(front) = self.out.front() else { break };
                let rest = front.bytes.len() - self.front_written;
                if left >= rest {
                    left -= rest;
                    self.out.pop_front();
                    self.front_written = 0;
                } else {
                    self.front_written += left;
                    left = 0;
                }
            }
            if n < self.scratch.len() {
                break; // the pty is full
            }
        }
        let mut stuck = 0;
        for (i, c) in self.out.iter().enumerate() {
            if c.due > now {
                break;
            }
            stuck += c.bytes.len() - if i == 0 { self.front_written } else { 0 };
        }
        self.stuck_bytes = stuck;
    }
}

/// The microscope's frame clock, on true time.
#[derive(Debug, Clone, Copy)]
struct FrameClock {
    period_us: f64,
    next_us: f64,
}

/// The device's view of the world, lent to it for one call.
struct World<'a> {
    start: Instant,
    clock: SimClock,
    epoch: Epoch,
    mouse: &'a mut Mouse,
    link: &'a mut Link,
    rows: &'a mut Vec<(TruthEvent, u64)>,
    valve: ValveModel,
}

impl DeviceIo for World<'_> {
    fn lever_counts(&mut self, t_us: u64) -> i32 {
        self.mouse.lever_counts(self.epoch.true_us(t_us))
    }

    fn can_transmit(&mut self, _t_us: u64, len: usize) -> bool {
        self.link.can_transmit(len)
    }

    fn transmit(&mut self, t_us: u64, frame: &[u8]) {
        let sent = self.start + self.clock.host_elapsed(self.epoch.true_us(t_us));
        self.link.send(sent, frame);
    }

    fn output(&mut self, t_us: u64, change: OutputChange) {
        let t = self.epoch.true_us(t_us);
        let (kind, value, detail) = match change {
            OutputChange::ValveOpen { duration_us } => {
                self.mouse.water(t);
                ("valve_open", f64::from(duration_us), String::new())
            }
            OutputChange::ValveClose { open_us, cause } => {
                // What a scale under the spout would weigh for this opening.
                let water = TruthEvent::new(t, "valve_water", self.valve.volume_ul(open_us))
                    .with_detail(format!("open_us={open_us}"));
                self.rows.push((water, t_us));
                ("valve_close", f64::from(open_us), format!("cause={cause}"))
            }
            OutputChange::ToneOn {
                frequency_hz,
                level_pct,
            } => {
                self.mouse.tone_on(t);
                (
                    "tone_on",
                    f64::from(frequency_hz),
                    format!("level_pct={level_pct}"),
                )
            }
            OutputChange::ToneOff { cause } => ("tone_off", 0.0, format!("cause={cause}")),
            OutputChange::SyncStart { value } => ("sync_start", f64::from(value), String::new()),
            OutputChange::SyncEnd { value } => ("sync_end", f64::from(value), String::new()),
            OutputChange::SafeState { since_host_ms } => {
                ("safe_state", f64::from(since_host_ms), String::new())
            }
            OutputChange::SafeStateCleared => ("safe_state_cleared", 0.0, String::new()),
        };
        self.rows
            .push((TruthEvent::new(t, kind, value).with_detail(detail), t_us));
    }
}

/// Something that happens at a true time, from outside the device's timers.
#[derive(Debug, Clone, Copy)]
enum Input {
    Deliver,
    Lick,
    FrameTtl,
    Fault,
    Replug,
    SilentEnd,
}

/// The simulator: made by `new` (pty, link, truth file), run by `run`.
#[derive(Debug)]
pub(crate) struct Sim {
    opts: SimOptions,
    start: Instant,
    link: Link,
    device: Device,
    mouse: Mouse,
    epoch: Epoch,
    cursor_us: f64,
    frame_clock: Option<FrameClock>,
    faults: Vec<FaultSpec>,
    next_fault: usize,
    /// Event-triggered faults still waiting, valve openings and cues so
    /// far, and how many truth rows were already scanned for them.
    triggered: Vec<crate::TriggeredFault>,
    valve_opens: u32,
    cues: u32,
    rows_scanned: usize,
    replug_at_us: Option<f64>,
    silent_until_us: Option<f64>,
    garbage_rng: Rng,
    truth: Option<TruthLog>,
    rows: Vec<(TruthEvent, u64)>,
    stats: SimStats,
    /// Frames sent and dropped by earlier boots.
    earlier_sent: u64,
    earlier_dropped: u64,
    first_pty_path: std::path::PathBuf,
    /// `CLOCK_MONOTONIC` (ns) at true time 0.
    start_host_ns: u64,
    /// [microscope hook] The simulated microscope, and the frame-clock TTL
    /// edges since the start (all boots; its `frame_number`).
    microscope: Option<LiveMicroscope>,
    ttl_total: u64,
}

impl Sim {
    pub(crate) fn new(opts: &SimOptions) -> Result<Self, SimError> {
        opts.validate()?;
        let truth = match &opts.truth {
            Some(path) => Some(TruthLog::create(path).map_err(|source| SimError::Truth {
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        // [microscope hook] Ring, truth directory, renderer thread.
        let microscope = match &opts.microscope {
            Some(m) => Some(
                m.start(opts.seed, opts.day, opts.frame_rate_hz)
                    .map_err(SimError::Microscope)?,
            ),
            None => None,
        };
        let pty = Pty::open().map_err(SimError::Pty)?;
        pty::install_link(&opts.link, pty.slave_path())?;
        let first_pty_path = pty.slave_path().to_path_buf();

        let mut seeds = Rng::new(opts.seed);
        let mouse = Mouse::new(
            opts.day,
            opts.lever,
            opts.truth_threshold_mm,
            seeds.next_u64(),
        )
        .with_sated_after(opts.sated_after_drinks)
        .with_learning_rewards(opts.learning_rewards)
        .with_prior_rewards(opts.prior_rewards);
        let link_rng = Rng::new(seeds.next_u64());
        let garbage_rng = Rng::new(seeds.next_u64());
        let mut frame_rng = Rng::new(seeds.next_u64());
        let frame_clock = (opts.frame_rate_hz > 0.0).then(|| {
            let period_us = 1e6 / opts.frame_rate_hz;
            FrameClock {
                period_us,
                next_us: frame_rng.range(0.0, period_us),
            }
        });
        let mut faults = opts.faults.clone();
        faults.sort_by(|a, b| a.at_s().total_cmp(&b.at_s()));

        let start = Instant::now();
        let start_host_ns = host_now_ns();
        let mut link = Link {
            pty: Some(pty),
            host_present: false,
            last_presence_check: start,
            out: VecDeque::new(),
            front_written: 0,
            queued_bytes: 0,
            stuck_bytes: 0,
            last_out_due: start,
            inbound: VecDeque::new(),
            last_in_due: start,
            silent: false,
            latency: opts.latency,
            rng: link_rng,
            tx_capacity: opts.tx_buffer_bytes,
            scratch: Vec::with_capacity(WRITE_CHUNK + 512),
            bytes_written: 0,
            host_bytes_in: 0,
            host_opens: 0,
        };
        let epoch = Epoch {
            clock: opts.clock,
            start_true_us: 0.0,
        };
        let mut mouse = mouse;
        let mut rows = vec![(
            TruthEvent::new(0.0, "sim_start", start_host_ns as f64).with_detail(format!(
                "host_monotonic_ns={start_host_ns} speed={}",
                opts.clock.speed
            )),
            epoch.device_us(0.0),
        )];
        let device = {
            let mut world = World {
                start,
                clock: opts.clock,
                epoch,
                mouse: &mut mouse,
                link: &mut link,
                rows: &mut rows,
                valve: ValveModel::on_day(opts.day),
            };
            Device::boot(opts.firmware, epoch.device_us(0.0), &mut world)
        };
        eprintln!(
            "rig-sim: serving {} at {} (day {}, seed {}, speed {}x, device clock from {} µs, drift {} ppm)",
            first_pty_path.display(),
            opts.link.display(),
            opts.day,
            opts.seed,
            opts.clock.speed,
            opts.clock.offset_us,
            opts.clock.drift_ppm,
        );
        Ok(Self {
            opts: opts.clone(),
            start,
            link,
            device,
            mouse,
            epoch,
            cursor_us: 0.0,
            frame_clock,
            faults,
            triggered: opts.triggered_faults.clone(),
            valve_opens: 0,
            cues: 0,
            rows_scanned: 0,
            next_fault: 0,
            replug_at_us: None,
            silent_until_us: None,
            garbage_rng,
            truth,
            rows,
            stats: SimStats::default(),
            earlier_sent: 0,
            earlier_dropped: 0,
            first_pty_path,
            start_host_ns,
            microscope,
            ttl_total: 0,
        })
    }

    pub(crate) fn start_host_ns(&self) -> u64 {
        self.start_host_ns
    }

    pub(crate) fn pty_path(&self) -> &Path {
        &self.first_pty_path
    }

    /// The loop. Returns when `stop` is set or the duration has passed; the
    /// link is removed and the truth log finished on the way out.
    pub(crate) fn run(mut self, stop: &AtomicBool) -> Result<SimStats, SimError> {
        let end_us = self.opts.duration_s.map(|d| d * 1e6);
        loop {
            self.watch_host(Instant::now());
            self.read_host();
            // Simulate up to after the read, so bytes that just arrived are
            // delivered (and answered, e.g. a Ping's Pong) in this turn rather
            // than after the next sleep: a reply written a sleep later than
            // its device timestamp says would bias the host's clock sync.
            let now = Instant::now();
            let mut target = self.opts.clock.true_us(now - self.start);
            let mut done = stop.load(Ordering::Relaxed);
            if let Some(end) = end_us {
                if target >= end {
                    target = end;
                    done = true;
                }
            }
            self.device.executing_at(self.epoch.device_us(target));
            self.simulate_to(target);
            self.link.flush(now);
            self.commit_truth();
            if done {
                break;
            }
            self.sleep(now);
        }
        Ok(self.finish())
    }

    fn finish(mut self) -> SimStats {
        self.link.flush(Instant::now());
        if let Some(p) = &self.link.pty {
            pty::remove_link(&self.opts.link, p.slave_path());
        }
        self.commit_truth();
        // [microscope hook] Render what is queued, close the ring.
        if let Some(m) = self.microscope.take() {
            let st = m.finish();
            if !self.opts.quiet {
                eprintln!(
                    "rig-sim: microscope: {} frames, {} published, {} dropped, render {:.2} ms mean / {:.2} ms max",
                    st.frames,
                    st.frames_published,
                    st.frames_dropped,
                    st.render_mean_us / 1e3,
                    st.render_max_us / 1e3
                );
            }
        }
        if let Some(t) = self.truth.take() {
            if let Err(e) = t.finish() {
                eprintln!("rig-sim: --truth: {e}");
            }
        }
        self.stats()
    }

    fn stats(&self) -> SimStats {
        let st = self.device.status();
        SimStats {
            frames_sent: self.earlier_sent + st.tx_frames_sent,
            frames_dropped: self.earlier_dropped + u64::from(st.tx_frames_dropped),
            bytes_written: self.link.bytes_written,
            host_bytes_in: self.link.host_bytes_in,
            host_opens: self.link.host_opens,
            ..self.stats
        }
    }

    fn status(&self, t_us: f64, msg: &str) {
        if !self.opts.quiet {
            eprintln!("rig-sim: t={:.3} s: {msg}", t_us / 1e6);
        }
    }

    fn true_now(&self) -> f64 {
        self.cursor_us
    }

    // ---- the host side ----------------------------------------------------

    /// Notice a host opening or closing the port.
    fn watch_host(&mut self, now: Instant) {
        let Some(p) = &self.link.pty else { return };
        if !self.link.host_present && now - self.link.last_presence_check < MAX_SLEEP {
            return;
        }
        self.link.last_presence_check = now;
        let present = p.host_present();
        if present == self.link.host_present {
            return;
        }
        self.link.host_present = present;
        if present {
            self.link.host_opens += 1;
            self.status(self.true_now(), "host opened the port");
            return;
        }
        self.status(self.true_now(), "host closed the port");
        if !p.tidy_after_host() {
            // The slave is left exclusive and cannot be reopened by a
            // non-root host: serve a fresh pty behind the same link.
            match Pty::open() {
                Ok(fresh) => {
                    let old = self.link.pty.replace(fresh);
                    if let Some(p) = &self.link.pty {
                        if let Err(e) = pty::install_link(&self.opts.link, p.slave_path()) {
                            eprintln!("rig-sim: {e}");
                        }
                    }
                    drop(old);
                }
                Err(e) => eprintln!("rig-sim: cannot replace the pty: {e}"),
            }
        }
    }

    fn read_host(&mut self) {
        if !self.link.host_present {
            return;
        }
        let mut buf = [0u8; 4096];
        loop {
            let Some(p) = &self.link.pty else { return };
            let n = match p.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(_) => return, // the host closed it; watch_host will see
            };
            // Stamp the bytes when they were actually read, not at the top of
            // the loop: the host may have written them after that, and a
            // device receive time before the host's send time would break the
            // causality that clock sync relies on.
            let arrived = Instant::now();
            self.link.host_bytes_in += n as u64;
            if self.link.silent {
                continue;
            }
            let due = (arrived + self.link.delay()).max(self.link.last_in_due);
            self.link.last_in_due = due;
            self.link.inbound.push_back((due, buf[..n].to_vec()));
        }
    }

    // ---- simulation -------------------------------------------------------

    fn wall_to_true(&self, at: Instant) -> f64 {
        self.opts
            .clock
            .true_us(at.saturating_duration_since(self.start))
    }

    fn true_to_wall(&self, true_us: f64) -> Instant {
        self.start + self.opts.clock.host_elapsed(true_us)
    }

    fn next_input(&self, limit_us: f64) -> Option<(f64, Input)> {
        let mut best: Option<(f64, Input)> = None;
        let mut consider = |t: Option<f64>, what: Input| {
            if let Some(t) = t {
                if t <= limit_us && best.map_or(true, |(b, _)| t < b) {
                    best = Some((t, what));
                }
            }
        };
        consider(
            self.faults.get(self.next_fault).map(|f| f.at_s() * 1e6),
            Input::Fault,
        );
        consider(self.replug_at_us, Input::Replug);
        consider(self.silent_until_us, Input::SilentEnd);
        consider(
            self.link
                .inbound
                .front()
                .map(|(due, _)| self.wall_to_true(*due)),
            Input::Deliver,
        );
        consider(self.mouse.next_lick_edge().map(|(t, _)| t), Input::Lick);
        consider(self.frame_clock.map(|f| f.next_us), Input::FrameTtl);
        best
    }

    fn simulate_to(&mut self, target_us: f64) {
        while self.cursor_us < target_us {
            let chunk_end = (self.cursor_us + CHUNK_US).min(target_us);
            while let Some((t, input)) = self.next_input(chunk_end) {
                let t = t.max(self.cursor_us);
                self.advance_world(t);
                self.cursor_us = t;
                self.apply(t, input);
                self.fire_triggers();
            }
            self.advance_world(chunk_end);
            self.cursor_us = chunk_end;
            self.fire_triggers();
        }
    }

    /// Apply the event-triggered faults whose valve opening or cue has just
    /// happened (at the simulation's current time).
    fn fire_triggers(&mut self) {
        if self.triggered.is_empty() {
            self.rows_scanned = self.rows.len();
            return;
        }
        let mut due = Vec::new();
        for (ev, _) in &self.rows[self.rows_scanned.min(self.rows.len())..] {
            let hit = match ev.kind {
                "valve_open" => {
                    self.valve_opens += 1;
                    crate::FaultTrigger::Valve(self.valve_opens)
                }
                "tone_on" => {
                    self.cues += 1;
                    crate::FaultTrigger::Cue(self.cues)
                }
                _ => continue,
            };
            self.triggered.retain(|f| {
                if f.on == hit {
                    due.push(f.fault);
                    false
                } else {
                    true
                }
            });
        }
        self.rows_scanned = self.rows.len();
        let t = self.cursor_us;
        for f in due {
            self.apply_fault(t, f);
        }
        self.rows_scanned = self.rows.len();
    }

    /// Run the device's timers and the mouse up to true time `t`.
    fn advance_world(&mut self, t: f64) {
        let dev_t = self.epoch.device_us(t);
        let mut world = World {
            start: self.start,
            clock: self.opts.clock,
            epoch: self.epoch,
            mouse: &mut self.mouse,
            link: &mut self.link,
            rows: &mut self.rows,
            valve: ValveModel::on_day(self.opts.day),
        };
        self.device.advance(dev_t, &mut world);
        self.mouse.advance_to(t);
        self.drain_mouse_truth();
    }

    fn drain_mouse_truth(&mut self) {
        let epoch = self.epoch;
        for ev in self.mouse.drain_truth() {
            // [microscope hook] Press onsets drive the movement neurons.
            if let Some(m) = self.microscope.as_mut() {
                m.mouse_event(&ev);
            }
            let dev = epoch.device_us(ev.true_us);
            self.rows.push((ev, dev));
        }
    }

    fn row(&mut self, t: f64, kind: &'static str, value: f64) {
        let dev = self.epoch.device_us(t);
        self.rows.push((TruthEvent::new(t, kind, value), dev));
    }

    fn apply(&mut self, t: f64, input: Input) {
        let dev_t = self.epoch.device_us(t);
        let mut world = World {
            start: self.start,
            clock: self.opts.clock,
            epoch: self.epoch,
            mouse: &mut self.mouse,
            link: &mut self.link,
            rows: &mut self.rows,
            valve: ValveModel::on_day(self.opts.day),
        };
        match input {
            Input::Deliver => {
                if let Some((_, bytes)) = world.link.inbound.pop_front() {
                    self.device.receive(dev_t, &bytes, &mut world);
                }
            }
            Input::Lick => {
                if let Some((_, on)) = world.mouse.pop_lick_edge() {
                    let (what, kind) = if on {
                        (DigitalInput::LickOn, "lick_on")
                    } else {
                        (DigitalInput::LickOff, "lick_off")
                    };
                    self.device.input(dev_t, what, &mut world);
                    let licks = self.device.status().licks;
                    self.row(t, kind, f64::from(licks));
                }
            }
            Input::FrameTtl => {
                if let Some(f) = self.frame_clock.as_mut() {
                    f.next_us += f.period_us;
                }
                self.device.input(dev_t, DigitalInput::FrameTtl, &mut world);
                let edges = self.device.status().frame_ttl_edges;
                self.row(t, "ttl", f64::from(edges));
                // [microscope hook] Render and publish this frame.
                self.ttl_total += 1;
                if let Some(m) = self.microscope.as_mut() {
                    m.frame(FrameTick {
                        frame_number: self.ttl_total,
                        true_us: t,
                        device_us: dev_t,
                        host_ns: host_ns_at(&self.opts.clock, self.start_host_ns, t),
                    });
                }
            }
            Input::Fault => {
                let f = self.faults[self.next_fault];
                self.next_fault += 1;
                self.apply_fault(t, f);
            }
            Input::Replug => {
                self.replug_at_us = None;
                match Pty::open() {
                    Ok(p) => {
                        if let Err(e) = pty::install_link(&self.opts.link, p.slave_path()) {
                            eprintln!("rig-sim: {e}");
                        }
                        let msg = format!("plugged in again at {}", p.slave_path().display());
                        self.link.pty = Some(p);
                        self.link.host_present = false;
                        self.link.last_presence_check = Instant::now() - MAX_SLEEP;
                        self.row(t, "fault_replug", 0.0);
                        self.status(t, &msg);
                    }
                    Err(e) => {
                        self.status(t, &format!("cannot make a new pty ({e}); retrying in 1 s"));
                        self.replug_at_us = Some(t + 1e6);
                    }
                }
            }
            Input::SilentEnd => {
                self.silent_until_us = None;
                self.link.silent = false;
                self.row(t, "fault_silent_end", 0.0);
                self.status(t, "talking again");
            }
        }
        self.drain_mouse_truth();
    }

    fn apply_fault(&mut self, t: f64, fault: FaultSpec) {
        match fault {
            FaultSpec::Unplug { duration_s, .. } => {
                if let Some(p) = self.link.pty.take() {
                    pty::remove_link(&self.opts.link, p.slave_path());
                    drop(p);
                    self.link.clear();
                    self.link.host_present = false;
                    self.device.reset_serial();
                    self.stats.unplugs += 1;
                }
                let back = t + duration_s * 1e6;
                self.replug_at_us = Some(self.replug_at_us.map_or(back, |r| r.max(back)));
                self.row(t, "fault_unplug", duration_s);
                self.status(t, &format!("unplugged for {duration_s} s"));
            }
            FaultSpec::Silent { duration_s, .. } => {
                let until = t + duration_s * 1e6;
                self.silent_until_us = Some(self.silent_until_us.map_or(until, |u| u.max(until)));
                self.link.silent = true;
                self.row(t, "fault_silent_start", duration_s);
                self.status(t, &format!("silent for {duration_s} s"));
            }
            FaultSpec::Garbage { bytes, .. } => {
                if self.link.pty.is_some() {
                    let junk: Vec<u8> = (0..bytes)
                        .map(|_| (self.garbage_rng.next_u64() >> 56) as u8)
                        .collect();
                    let due = self.true_to_wall(t).max(self.link.last_out_due);
                    self.link.push_out(due, junk);
                    self.stats.garbage_bytes += bytes as u64;
                }
                self.row(t, "fault_garbage", bytes as f64);
                self.status(t, &format!("{bytes} bytes of garbage on the line"));
            }
            FaultSpec::ClockStep { step_s, .. } => {
                self.device.step_stamps((step_s * 1e6).round() as i64);
                self.row(t, "fault_clockstep", step_s);
                self.status(t, &format!("device timestamps stepped by {step_s} s"));
            }
            FaultSpec::PastBatch { by_s, .. } => {
                self.device
                    .stamp_next_batch_in_past((by_s * 1e6).round() as u64);
                self.row(t, "fault_pastbatch", by_s);
                self.status(t, &format!("next lever batch stamped {by_s} s in the past"));
            }
            FaultSpec::Hold { duration_s, .. } => {
                self.mouse.hold_lever(t, duration_s * 1e6, crate::HOLD_MM);
                self.row(t, "fault_hold", duration_s);
                self.status(
                    t,
                    &format!("lever held {} mm down for {duration_s} s", crate::HOLD_MM),
                );
            }
            FaultSpec::Jiggle { duration_s, .. } => {
                self.mouse.jiggle_lever(t, duration_s * 1e6);
                self.row(t, "fault_jiggle", duration_s);
                self.status(t, &format!("lever jiggled for {duration_s} s"));
            }
            FaultSpec::DropReport { .. } => {
                self.device.drop_next_report();
                self.row(t, "fault_dropreport", 0.0);
                self.status(t, "next RewardFired report lost");
            }
            FaultSpec::DuplicateBatch { .. } => {
                self.device.duplicate_next_batch();
                self.row(t, "fault_dupbatch", 0.0);
                self.status(t, "next lever batch sent twice");
            }
            FaultSpec::Reboot { .. } => {
                let old_counter = self.epoch.device_us(t);
                self.row(t, "reboot", old_counter as f64);
                let st = self.device.status();
                self.earlier_sent += st.tx_frames_sent;
                self.earlier_dropped += u64::from(st.tx_frames_dropped);
                self.epoch = Epoch {
                    clock: SimClock {
                        offset_us: 0,
                        ..self.opts.clock
                    },
                    start_true_us: t,
                };
                let mut world = World {
                    start: self.start,
                    clock: self.opts.clock,
                    epoch: self.epoch,
                    mouse: &mut self.mouse,
                    link: &mut self.link,
                    rows: &mut self.rows,
                    valve: ValveModel::on_day(self.opts.day),
                };
                self.device = Device::boot(self.opts.firmware, 0, &mut world);
                self.stats.reboots += 1;
                self.status(t, "device rebooted");
            }
        }
    }

    fn commit_truth(&mut self) {
        self.rows_scanned = 0;
        if self.truth.is_none() {
            self.rows.clear();
            return;
        }
        let mut failed = None;
        if let Some(t) = self.truth.as_mut() {
            for (ev, dev) in self.rows.drain(..) {
                t.push(ev, dev);
            }
            if let Err(e) = t.commit() {
                failed = Some(e);
            }
            self.stats.truth_rows = t.rows();
        }
        if let Some(e) = failed {
            // Reported once; the rig goes on without its truth log.
            eprintln!("rig-sim: --truth: {e}; no more truth rows will be written");
            self.truth = None;
        }
    }

    // ---- waiting ----------------------------------------------------------

    fn sleep(&mut self, now: Instant) {
        let mut wake = now + MAX_SLEEP;
        let at_true = |t: f64, wake: &mut Instant| {
            let w = self.true_to_wall(t);
            if w < *wake {
                *wake = w;
            }
        };
        at_true(self.epoch.true_us(self.device.next_deadline()), &mut wake);
        if let Some((t, _)) = self.mouse.next_lick_edge() {
            at_true(t, &mut wake);
        }
        if let Some(f) = &self.frame_clock {
            at_true(f.next_us, &mut wake);
        }
        if let Some(f) = self.faults.get(self.next_fault) {
            at_true(f.at_s() * 1e6, &mut wake);
        }
        for t in [self.replug_at_us, self.silent_until_us]
            .into_iter()
            .flatten()
        {
            at_true(t, &mut wake);
        }
        if let Some(d) = self.opts.duration_s {
            at_true(d * 1e6, &mut wake);
        }
        if let Some((due, _)) = self.link.inbound.front() {
            wake = wake.min(*due);
        }
        if self.link.host_present && self.link.stuck_bytes == 0 {
            if let Some(c) = self.link.out.front() {
                wake = wake.min(c.due);
            }
        }
        let precise = Duration::from_micros(u64::from(self.opts.precise_wake_us));
        let remaining = wake.saturating_duration_since(Instant::now());
        if !precise.is_zero() && remaining <= precise {
            // A microcontroller sends a sample from its timer interrupt, on
            // time; a timed sleep on this host can end tens of µs late. So
            // with `--precise-us` the last stretch before a deadline is spun,
            // returning early only if the host sends something.
            while Instant::now() < wake {
                if self.host_input_ready() {
                    return;
                }
                std::hint::spin_loop();
            }
            return;
        }
        let min_sleep = if self.opts.clock.speed <= 1.0 {
            MIN_SLEEP_REAL_TIME
        } else {
            MIN_SLEEP_FAST
        };
        let timeout = if precise.is_zero() {
            remaining.clamp(min_sleep, MAX_SLEEP)
        } else {
            (remaining - precise).min(MAX_SLEEP)
        };
        match self.link.pty.as_ref().filter(|_| self.link.host_present) {
            Some(p) => {
                let mut events = PollFlags::POLLIN;
                if self.link.stuck_bytes > 0 {
                    events |= PollFlags::POLLOUT;
                }
                let mut fds = [PollFd::new(p.master().as_fd(), events)];
                let _ = nix::poll::ppoll(&mut fds, Some(TimeSpec::from(timeout)), None);
            }
            None => std::thread::sleep(timeout),
        }
    }

    /// Whether the host has written something (a zero-timeout poll).
    fn host_input_ready(&self) -> bool {
        let Some(p) = self.link.pty.as_ref().filter(|_| self.link.host_present) else {
            return false;
        };
        let mut fds = [PollFd::new(p.master().as_fd(), PollFlags::POLLIN)];
        matches!(nix::poll::ppoll(&mut fds, Some(TimeSpec::from(Duration::ZERO)), None), Ok(n) if n > 0)
    }
}
