//! `rig-sim`: the virtual rig. A simulated microcontroller, lever and mouse
//! speaking the rig's serial protocol on a pty, with a symlink (`--link`) the
//! host opens like `/dev/ttyACM0`. A thin command line over the `rig_sim` library.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use rig_sim::microscope::live::MicroscopeOptions; // [microscope hook]
use rig_sim::{FaultSpec, Firmware, LatencyModel, LeverSpec, SimClock, SimOptions, TriggeredFault};

/// The virtual rig: a simulated rig microcontroller (lever, lick sensor,
/// valve, tone, frame-clock TTL, sync-out) and a simulated mouse, on a pty.
#[derive(Debug, Parser)]
#[command(name = "rig-sim", version, about, long_about = None)]
struct Args {
    /// Symlink to create, pointing at the pty (an existing symlink is
    /// replaced; any other file is refused).
    #[arg(long, value_name = "PATH")]
    link: PathBuf,
    /// Write the ground truth (TSV: true_s, device_us, kind, value, detail).
    #[arg(long, value_name = "PATH")]
    truth: Option<PathBuf>,
    /// Seed of every random choice (mouse, latency, garbage).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Simulated seconds per wall-clock second.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Device clock error, ppm (positive: the device clock runs fast).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    drift_ppm: f64,
    /// Device counter at start, µs (e.g. 4289967296 = 2^32 - 5 s to test the wrap).
    #[arg(long, visible_alias = "counter-start", default_value_t = 0)]
    offset_us: u64,
    /// Protocol version announced in Hello (to test the host's check).
    #[arg(long, default_value_t = protocol::serial::PROTOCOL_VERSION)]
    protocol_version: u16,
    /// The firmware's compile-time cap on any valve opening, ms.
    #[arg(long, default_value_t = 1000)]
    hard_max_valve_open_ms: u16,
    /// Highest lever sample rate the firmware accepts, Hz.
    #[arg(long, default_value_t = 20_000)]
    max_sample_rate_hz: u32,
    /// Device id announced in Hello.
    #[arg(long, default_value_t = Firmware::DEFAULT_DEVICE_ID)]
    device_id: u64,
    /// Training day, 1 (naive) ..= 14 (expert); the valve's flow drifts
    /// with it (0.4 % less a day, see the truth log's valve_water).
    #[arg(long, default_value_t = 14, value_parser = clap::value_parser!(u8).range(1..=14))]
    day: u8,
    /// Learn from experience: the mouse's rewarded trials before this run
    /// (e.g. the sum of `rewards` over its sessions); its skill then rises
    /// with every reward, within and across sessions, and --day is ignored.
    #[arg(long, value_name = "N")]
    prior_rewards: Option<u64>,
    /// With --prior-rewards: rewards for the mouse to learn 63 % of the task
    /// (a smaller number is a faster learner).
    #[arg(long, value_name = "N", default_value_t = rig_sim::mouse::LEARNING_REWARDS)]
    learning_rewards: f64,
    /// Full lever travel, mm.
    #[arg(long, default_value_t = 6.0)]
    lever_travel_mm: f64,
    /// Encoder counts per mm of lever travel.
    #[arg(long, default_value_t = 40.0)]
    counts_per_mm: f64,
    /// Lever position whose upward crossings the truth log records, mm.
    #[arg(long, default_value_t = 1.5)]
    truth_threshold_mm: f64,
    /// Microscope frame clock, Hz (0: no frame TTL).
    #[arg(long, default_value_t = 28.7)]
    frame_rate_hz: f64,
    /// One-way link latency, both directions, µs.
    #[arg(long, default_value_t = 0.0)]
    latency_us: f64,
    /// Uniform extra latency, 0..jitter, µs.
    #[arg(long, default_value_t = 0.0)]
    jitter_us: f64,
    /// Probability of a latency spike per frame.
    #[arg(long, default_value_t = 0.0)]
    spike_prob: f64,
    /// Size of a latency spike (drawn from 0.5..1.5 times this), µs.
    #[arg(long, default_value_t = 0.0)]
    spike_us: f64,
    /// Scheduled fault, repeatable: unplug@T:D, silent@T:D, garbage@T:N,
    /// reboot@T, clockstep@T:D (the device's timestamps step by D s, D may
    /// be < 0), pastbatch@T:D (one lever batch stamped D s in the past),
    /// dupbatch@T (one lever batch sent twice), dropreport@T (the next
    /// RewardFired lost on the wire), hold@T:D (the lever held
    /// 2.4 mm down for D s), jiggle@T:D (the lever pushed 1 mm every other
    /// 100 ms for D s) (T and D in simulated seconds).
    #[arg(long = "fault", value_name = "SPEC")]
    faults: Vec<FaultSpec>,
    /// Fault at a device event, repeatable: KIND@valveN:ARG (the moment the
    /// valve opens for the Nth time, mid-reward) or KIND@cueN:ARG (the
    /// moment the Nth cue starts, mid-trial), e.g. unplug@valve2:1.5.
    #[arg(long = "fault-on", value_name = "SPEC")]
    faults_on: Vec<TriggeredFault>,
    /// The mouse is sated after this many drinks (valve openings) and stops
    /// pressing.
    #[arg(long, value_name = "N")]
    sated_after: Option<u32>,
    /// Stop after this many simulated seconds.
    #[arg(long, value_name = "S")]
    duration_s: Option<f64>,
    /// Bytes the device holds back while the host does not read; beyond that
    /// it drops frames and counts them.
    #[arg(long, default_value_t = 1024)]
    tx_buffer_bytes: usize,
    /// No status lines (the start line is still printed).
    #[arg(long)]
    quiet: bool,
    /// Spin the last N µs before each device deadline so samples leave on time
    /// (like a microcontroller's timer interrupt); costs CPU. 0 = off.
    #[arg(long, default_value_t = 0)]
    precise_us: u32,
    // ---- [microscope hook] the simulated two-photon microscope ----
    /// Run the simulated microscope, publishing frames at the frame-clock
    /// TTL edges into this POSIX shared-memory frame ring (e.g. /rigd-frames).
    #[arg(long, value_name = "SHM_NAME")]
    microscope: Option<String>,
    /// Microscope frame size, WxH.
    #[arg(long, value_name = "WxH", default_value = "512x512", value_parser = parse_size)]
    microscope_size: (u32, u32),
    /// Microscope channels: 1 (GCaMP) or 2 (plus tdTomato in inhibitory neurons).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
    channels: u32,
    /// Neurons in the simulated field of view.
    #[arg(long, default_value_t = 200)]
    neurons: usize,
    /// Write the microscope's ground truth to this directory (frames_truth.tsv,
    /// dff_truth.npy, labels.npy, labels.tif, neurons.tsv); implies the
    /// microscope even without --microscope (frames are then not published).
    #[arg(long, value_name = "DIR")]
    microscope_truth: Option<PathBuf>,
    /// The acquisition program starts (creates the ring, publishes) at this
    /// frame-clock edge; the frame clock runs from the start.
    #[arg(long, value_name = "N", default_value_t = 0)]
    microscope_start_frame: u64,
    /// The acquisition program restarts at this frame-clock edge: a new
    /// ring generation, frame numbers from 1 again.
    #[arg(long, value_name = "N")]
    microscope_restart_frame: Option<u64>,
    /// Move the microscope's whole field of view by DX,DY pixels (the same
    /// neurons, placed differently, as on another day), e.g. 3.5,-2.
    #[arg(long, value_name = "DX,DY", default_value = "0,0", value_parser = parse_offset, allow_hyphen_values = true)]
    fov_offset: (f64, f64),
    /// Rotate the microscope's field of view by DEG degrees about the
    /// frame's centre (after --fov-offset), within +-10.
    #[arg(
        long,
        value_name = "DEG",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    fov_rotation: f64,
}

/// `WxH`, e.g. `512x512`.
fn parse_size(s: &str) -> anyhow::Result<(u32, u32)> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("'{s}': expected WxH, e.g. 512x512"))?;
    let n = |v: &str| {
        v.trim()
            .parse::<u32>()
            .ok()
            .filter(|&n| (8..=4096).contains(&n))
            .with_context(|| format!("'{s}': each side must be 8..=4096"))
    };
    Ok((n(w)?, n(h)?))
}

fn parse_offset(s: &str) -> anyhow::Result<(f64, f64)> {
    let (x, y) = s
        .split_once(',')
        .with_context(|| format!("'{s}': expected DX,DY in pixels, e.g. 3.5,-2"))?;
    let n = |v: &str| {
        v.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && v.abs() <= 64.0)
            .with_context(|| format!("'{s}': each offset must be a number within +-64 px"))
    };
    Ok((n(x)?, n(y)?))
}

impl Args {
    fn options(self) -> SimOptions {
        SimOptions {
            link: self.link,
            truth: self.truth,
            seed: self.seed,
            clock: SimClock::new(self.offset_us, self.drift_ppm, self.speed),
            firmware: Firmware {
                protocol_version: self.protocol_version,
                device_id: self.device_id,
                max_sample_rate_hz: self.max_sample_rate_hz,
                hard_max_valve_open_ms: self.hard_max_valve_open_ms,
                ..Firmware::default()
            },
            day: self.day,
            prior_rewards: self.prior_rewards,
            learning_rewards: self.learning_rewards,
            lever: LeverSpec {
                travel_mm: self.lever_travel_mm,
                counts_per_mm: self.counts_per_mm,
            },
            truth_threshold_mm: self.truth_threshold_mm,
            frame_rate_hz: self.frame_rate_hz,
            latency: LatencyModel {
                base_us: self.latency_us,
                jitter_us: self.jitter_us,
                spike_prob: self.spike_prob,
                spike_us: self.spike_us,
            },
            faults: self.faults,
            triggered_faults: self.faults_on,
            sated_after_drinks: self.sated_after,
            duration_s: self.duration_s,
            tx_buffer_bytes: self.tx_buffer_bytes,
            quiet: self.quiet,
            precise_wake_us: self.precise_us,
            // [microscope hook]
            microscope: (self.microscope.is_some() || self.microscope_truth.is_some()).then(|| {
                let mut m = MicroscopeOptions::new(self.microscope);
                (m.width, m.height) = self.microscope_size;
                m.channels = self.channels;
                m.neurons = self.neurons;
                m.truth_dir = self.microscope_truth;
                m.start_frame = self.microscope_start_frame;
                m.restart_frame = self.microscope_restart_frame;
                m.fov_offset_px = self.fov_offset;
                m.fov_rotation_deg = self.fov_rotation;
                m
            }),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let opts = Args::parse().options();

    // SIGINT and SIGTERM are blocked on every thread and taken by one waiting
    // thread, which asks the loop to stop; the loop removes the link.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&signals), None)
        .context("blocking SIGINT and SIGTERM")?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    std::thread::Builder::new()
        .name("signals".to_string())
        .spawn(move || {
            if signals.wait().is_ok() {
                stop2.store(true, Ordering::Relaxed);
            }
        })
        .context("starting the signal thread")?;

    // The virtual rig stands for a microcontroller, which host load does not
    // slow down: ask for SCHED_FIFO so that load on this machine shows up in
    // the daemon's latency, not in the device's. Without the privilege it
    // runs as a normal thread.
    let _ = firmware_bridge::rt::make_current_thread_realtime(60);
    // Nor does a microcontroller page its firmware out: the valve-command
    // path runs once per trial and must not wait for a page fault.
    let _ = firmware_bridge::rt::lock_memory();
    let stats = rig_sim::run(&opts, &stop).context("rig-sim")?;
    if !opts.quiet {
        eprintln!(
            "rig-sim: stopped: {} frames sent, {} dropped, {} host bytes in, {} truth rows",
            stats.frames_sent, stats.frames_dropped, stats.host_bytes_in, stats.truth_rows
        );
    }
    Ok(())
}
