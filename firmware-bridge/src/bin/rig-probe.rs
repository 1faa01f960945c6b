//! `rig-probe PORT`: the bring-up tool for a newly wired rig. Connects,
//! prints the device's Hello, shows the lever live, measures round-trip
//! latency, clock drift and offset, the sample rate and losses, and runs the
//! bring-up checklist (`checklist.rs`): lever range and direction, a valve
//! click, a tone, the lick sensor, the frame clock and its rate, and the
//! sync-out loopback when it is wired, each pass, fail or skip.
//!
//! Exit codes: 0 measured and no checklist item failed, 1 the device
//! misbehaved (lost, refused, samples lost) or an item failed, 2 cannot
//! connect or bad usage.

#[path = "rig-probe/checklist.rs"]
mod checklist;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use firmware_bridge::link::{
    host_now_ns, ChannelHandler, LinkEvent, LinkSettings, LostReason, SerialLink,
};
use protocol::serial::{
    sync_mode, Configure, EventKind, Hello, HostCommand, SyncOut, Tone, ValvePulse,
};

#[derive(Debug, Parser)]
#[command(
    name = "rig-probe",
    version,
    about = "Bring-up checks for a rig's microcontroller"
)]
struct Args {
    /// The serial port (e.g. /dev/ttyACM0, or the link path of rig-sim).
    port: PathBuf,
    /// Measure for this many seconds (of host time).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Baud rate (ignored by native-USB boards and ptys).
    #[arg(long, default_value_t = 1_000_000)]
    baud: u32,
    /// Lever sample rate to configure, Hz (must divide 1,000,000).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Samples per frame.
    #[arg(long, default_value_t = 1)]
    batch: u8,
    /// Encoder counts per mm, for showing the lever in mm.
    #[arg(long, default_value_t = 40.0)]
    counts_per_mm: f64,
    /// How long to wait for the device to answer, seconds.
    #[arg(long, default_value_t = 5.0)]
    connect_timeout: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// The lever must move at least this far from rest during the probe, mm.
    #[arg(long, default_value_t = 1.0)]
    lever_min_mm: f64,
    /// Length of the valve check's one pulse, ms (1..=100).
    #[arg(long, default_value_t = 20)]
    valve_ms: u32,
    /// The tone check's frequency, Hz, and length, ms.
    #[arg(long, default_value_t = 6000)]
    tone_hz: u32,
    #[arg(long, default_value_t = 100)]
    tone_ms: u16,
    /// The frame clock's expected rate, Hz (checked within 1 %).
    #[arg(long)]
    frame_rate_hz: Option<f64>,
    /// The sync-out line is wired back into this input: check it.
    #[arg(long, value_enum)]
    sync_loopback: Option<checklist::Loopback>,
    /// Checklist items to skip, comma-separated (lever, valve, tone, lick,
    /// frame_clock, sync_out); valve and tone skipped send nothing.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
}

#[derive(Debug, Default)]
struct Measurements {
    hello: Option<Hello>,
    samples: u64,
    samples_lost: u64,
    first_sample_us: Option<u64>,
    last_sample_us: u64,
    last_counts: i32,
    rtts_us: Vec<f64>,
    drift_ppm: Option<f64>,
    offset_us: Option<f64>,
    uncertainty_us: Option<f64>,
    bad_frames: u64,
    frames_lost: u64,
    /// The device's dropped-sample counter (since it booted): first and
    /// latest heartbeat.
    device_dropped_first: Option<u32>,
    device_samples_dropped: u32,
    licks: u64,
    ttl_edges: u64,
    lost: Vec<String>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    if !(args.seconds > 0.0 && args.seconds.is_finite())
        || args.rate == 0
        || 1_000_000 % args.rate != 0
        || args.batch == 0
    {
        eprintln!(
            "error: --seconds must be > 0, --rate must divide 1000000 and --batch must be >= 1"
        );
        return ExitCode::from(2);
    }
    if let Some(bad) = args
        .skip
        .iter()
        .find(|s| !checklist::ITEMS.contains(&s.as_str()))
    {
        eprintln!(
            "error: --skip {bad}: not a checklist item; the items are {}",
            checklist::ITEMS.join(", ")
        );
        return ExitCode::from(2);
    }
    if !(1..=100).contains(&args.valve_ms) || args.tone_ms == 0 || args.tone_hz == 0 {
        eprintln!("error: --valve-ms must be 1..=100, --tone-ms and --tone-hz > 0");
        return ExitCode::from(2);
    }
    let configure = Configure {
        sample_rate_hz: args.rate,
        samples_per_batch: args.batch,
        heartbeat_interval_ms: 100,
        heartbeat_timeout_ms: 1000,
        // The probe opens the valve once, briefly; keep the caps small.
        max_valve_open_ms: 100,
        max_flush_ms: 100,
    };
    let mut settings = LinkSettings::new(args.port.clone(), args.baud, configure);
    // A probe has seconds, not minutes, to measure drift: ping 200 times a
    // second so that enough exchanges find the link at its quickest.
    settings.fast_ping_interval = std::time::Duration::from_millis(5);
    settings.fast_ping_for = std::time::Duration::from_secs(3600);
    let (handler, rx, dropped) = ChannelHandler::new(1 << 16);
    let link = match SerialLink::spawn(settings, handler) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot start the link threads: {e}");
            return ExitCode::from(2);
        }
    };

    let mut m = Measurements::default();
    // Wait for the handshake.
    let deadline = Instant::now() + Duration::from_secs_f64(args.connect_timeout);
    while m.hello.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let why = m.lost.last().cloned().unwrap_or_else(|| "no answer".into());
            eprintln!("error: no rig at {}: {why}", args.port.display());
            link.shutdown();
            return ExitCode::from(2);
        }
        match rx.recv_timeout(left) {
            Ok(LinkEvent::Connected { hello, .. }) => m.hello = Some(hello),
            Ok(LinkEvent::Lost { reason, .. }) => {
                if let LostReason::VersionMismatch { .. } | LostReason::ConfigureRefused { .. } =
                    reason
                {
                    eprintln!("error: {}: {reason}", args.port.display());
                    link.shutdown();
                    return ExitCode::from(2);
                }
                m.lost.push(reason.to_string());
            }
            Ok(_) | Err(_) => {}
        }
    }
    let hello = m.hello.unwrap_or_default();
    if !args.json {
        println!(
            "device {:016x}: firmware {}.{}.{}, protocol {}, clock {} Hz, max rate {} Hz, valve hard cap {} ms, capabilities 0x{:02x}",
            hello.device_id,
            hello.firmware_major,
            hello.firmware_minor,
            hello.firmware_patch,
            hello.protocol_version,
            hello.clock_hz,
            hello.max_sample_rate_hz,
            hello.hard_max_valve_open_ms,
            hello.capabilities
        );
    }

    if !args.json {
        println!(
            "checklist: press the lever fully and release it, and touch the lick spout, in the \
             next {} s; the valve clicks once and the tone plays",
            args.seconds
        );
    }
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.seconds);
    let commander = link.commander();
    let skipped = |item: &str| args.skip.iter().any(|s| s == item);
    // The outputs, one after the other early in the probe (host time).
    let mut actions: Vec<(Duration, &'static str)> = vec![
        (Duration::from_millis(300), "tone"),
        (Duration::from_millis(800), "valve"),
        (Duration::from_millis(1300), "sync_out"),
    ];
    actions.retain(|(_, what)| {
        !skipped(what) && (*what != "sync_out" || args.sync_loopback.is_some())
    });
    let mut obs = checklist::Observations::default();
    let mut last_print = Instant::now();
    let mut stderr = std::io::stderr();
    while Instant::now() < end {
        while let Some(&(at, what)) = actions.first() {
            if start.elapsed() < at {
                break;
            }
            actions.remove(0);
            let cmd = match what {
                "tone" => HostCommand::Tone(Tone {
                    frequency_hz: args.tone_hz,
                    duration_ms: args.tone_ms,
                    level_pct: 50,
                }),
                "valve" => HostCommand::ValvePulse(ValvePulse {
                    duration_us: args.valve_ms * 1000,
                }),
                _ => HostCommand::SyncOut(SyncOut {
                    mode: sync_mode::PULSE,
                    nbits: 0,
                    unit_us: 10_000,
                    value: 1,
                }),
            };
            let seq = commander.send(cmd).ok().map(|s| s.seq);
            match what {
                "tone" => obs.tone.seq = seq,
                "valve" => obs.valve.seq = seq,
                _ => obs.sync.seq = seq,
            }
        }
        let wait = end
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(50));
        let ev = match rx.recv_timeout(wait) {
            Ok(ev) => ev,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        };
        match ev {
            LinkEvent::Lever(b) => {
                m.samples += b.counts().len() as u64;
                m.first_sample_us.get_or_insert(b.t_first_us);
                m.last_sample_us =
                    b.t_first_us + (b.counts().len() as u64 - 1) * u64::from(b.period_us);
                m.last_counts = b.counts().last().copied().unwrap_or(0);
                for &c in b.counts() {
                    obs.lever(c);
                }
            }
            LinkEvent::Acked { seq, status, .. } => {
                for out in [&mut obs.valve, &mut obs.tone, &mut obs.sync] {
                    if out.seq == Some(seq) {
                        out.acked = Some(format!("{status:?}"));
                    }
                }
            }
            LinkEvent::Device {
                t_us, kind, value, ..
            } if matches!(
                kind,
                EventKind::ValveOpen
                    | EventKind::ValveClose
                    | EventKind::ToneOn
                    | EventKind::ToneOff
                    | EventKind::SyncOutStart
                    | EventKind::SyncOutEnd
            ) =>
            {
                let (out, on) = match kind {
                    EventKind::ValveOpen => (&mut obs.valve, true),
                    EventKind::ValveClose => (&mut obs.valve, false),
                    EventKind::ToneOn => (&mut obs.tone, true),
                    EventKind::ToneOff => (&mut obs.tone, false),
                    EventKind::SyncOutStart => (&mut obs.sync, true),
                    _ => (&mut obs.sync, false),
                };
                if out.seq.is_some() {
                    if on {
                        out.on_us.get_or_insert(t_us);
                    } else if out.on_us.is_some() && out.off_us.is_none() {
                        out.off_us = Some(t_us);
                        out.off_value = Some(value);
                    }
                }
            }
            LinkEvent::SampleGap { missing, .. } => m.samples_lost += missing,
            LinkEvent::BadFrames { frames, .. } => m.bad_frames += frames,
            LinkEvent::FramesLost { count } => m.frames_lost += count,
            LinkEvent::Clock { fit, rtt_us } => {
                m.rtts_us.push(rtt_us);
                m.drift_ppm = Some(fit.drift_ppm);
                m.offset_us =
                    Some(fit.host_to_rig_us(host_now_ns()) - host_now_ns() as f64 / 1000.0);
                m.uncertainty_us = Some(fit.half_band_us);
            }
            LinkEvent::Heartbeat {
                samples_dropped, ..
            } => {
                m.device_dropped_first.get_or_insert(samples_dropped);
                m.device_samples_dropped = samples_dropped;
            }
            LinkEvent::Device {
                kind: EventKind::LickOn,
                t_us,
                ..
            } => {
                m.licks += 1;
                obs.licks += 1;
                obs.lick_times_us.push(t_us);
            }
            LinkEvent::Device {
                kind: EventKind::FrameTtl,
                t_us,
                ..
            } => {
                m.ttl_edges += 1;
                obs.ttl_times_us.push(t_us);
            }
            LinkEvent::Lost { reason, .. } => m.lost.push(reason.to_string()),
            _ => {}
        }
        if !args.json && last_print.elapsed() > Duration::from_millis(100) {
            last_print = Instant::now();
            let _ = write!(
                stderr,
                "\rlever {:7.2} mm ({:7} counts)   samples {:8}   lost {:4}   rtt {:6.0} us   ",
                f64::from(m.last_counts) / args.counts_per_mm,
                m.last_counts,
                m.samples,
                m.samples_lost,
                m.rtts_us.last().copied().unwrap_or(f64::NAN)
            );
        }
    }
    link.shutdown();
    if !args.json {
        let _ = writeln!(stderr);
    }

    let mut rtts = m.rtts_us.clone();
    rtts.sort_by(f64::total_cmp);
    let span_s = m
        .first_sample_us
        .map_or(0.0, |f| m.last_sample_us.saturating_sub(f) as f64 / 1e6);
    let measured_rate = if span_s > 0.0 {
        (m.samples.saturating_sub(1)) as f64 / span_s
    } else {
        0.0
    };
    let samples_lost = m.samples_lost;
    // The device counts since it booted (earlier sessions included).
    let device_dropped_now = m
        .device_samples_dropped
        .wrapping_sub(m.device_dropped_first.unwrap_or(m.device_samples_dropped));
    let rate_note = m.drift_ppm.and_then(clock_rate_note);
    let expect = checklist::Expect {
        counts_per_mm: args.counts_per_mm,
        lever_min_mm: args.lever_min_mm,
        valve_us: args.valve_ms * 1000,
        tone_ms: args.tone_ms,
        frame_rate_hz: args.frame_rate_hz,
        loopback: args.sync_loopback,
        skip: args.skip.clone(),
    };
    let items = checklist::evaluate(&obs, &expect);
    let failed = items
        .iter()
        .filter(|i| i.status == checklist::Status::Fail)
        .count();
    let report = serde_json::json!({
        "port": args.port.display().to_string(),
        "firmware_version": format!("{}.{}.{}", hello.firmware_major, hello.firmware_minor, hello.firmware_patch),
        "protocol_version": hello.protocol_version,
        "device_id": format!("{:016x}", hello.device_id),
        "clock_hz": hello.clock_hz,
        "configured_rate_hz": args.rate,
        "sample_rate_hz": measured_rate,
        "samples": m.samples,
        "samples_lost": samples_lost,
        "device_samples_dropped": device_dropped_now,
        "device_samples_dropped_since_boot": m.device_samples_dropped,
        "bad_frames": m.bad_frames,
        "frames_lost": m.frames_lost,
        "rtt_us": {
            "min": percentile(&rtts, 0.0),
            "median": percentile(&rtts, 0.5),
            "p99": percentile(&rtts, 0.99),
            "count": rtts.len(),
        },
        "drift_ppm": m.drift_ppm,
        "clock_rate_note": rate_note,
        "offset_us": m.offset_us,
        "clock_half_band_us": m.uncertainty_us,
        "licks": m.licks,
        "frame_ttl_edges": m.ttl_edges,
        "link_lost": m.lost,
        "events_dropped": dropped.load(std::sync::atomic::Ordering::Relaxed),
        "seconds": args.seconds,
        "checklist": items.iter().map(|i| serde_json::json!({
            "item": i.item, "status": i.status.as_str(), "detail": i.detail,
        })).collect::<Vec<_>>(),
        "checklist_failed": failed,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "samples      {} over {:.2} s of rig time: {:.1} Hz (configured {} Hz)",
            m.samples, span_s, measured_rate, args.rate
        );
        println!(
            "lost         {} samples, {} bad frames, {} frames lost on the line; the device \
             dropped {} during the probe ({} since it booted)",
            samples_lost, m.bad_frames, m.frames_lost, device_dropped_now, m.device_samples_dropped
        );
        println!(
            "round trip   min {:.0} us, median {:.0} us, p99 {:.0} us ({} pings)",
            percentile(&rtts, 0.0),
            percentile(&rtts, 0.5),
            percentile(&rtts, 0.99),
            rtts.len()
        );
        match (m.drift_ppm, m.offset_us) {
            (Some(d), Some(o)) => println!(
                "clock        drift {d:+.2} ppm, offset rig - host {o:.0} us (band +/- {:.0} us)",
                m.uncertainty_us.unwrap_or(f64::NAN)
            ),
            _ => println!("clock        no ping/pong exchange completed"),
        }
        if let Some(note) = &rate_note {
            println!("             {note}");
        }
        for l in &m.lost {
            println!("link lost    {l}");
        }
        println!("checklist");
        for i in &items {
            println!(
                "  {:4}  {:<12} {}",
                i.status.as_str().to_uppercase(),
                i.item,
                i.detail
            );
        }
        if failed > 0 {
            println!("{failed} item(s) FAILED");
        }
    }
    if samples_lost > 0 || !m.lost.is_empty() || failed > 0 {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// A drift no crystal has (a real one is within about +/-100 ppm): say what
/// it means instead of leaving "+9000000 ppm" to be puzzled over.
fn clock_rate_note(drift_ppm: f64) -> Option<String> {
    (drift_ppm.abs() > 10_000.0).then(|| {
        let rate = 1.0 + drift_ppm * 1e-6;
        format!(
            "the device clock runs at {rate:.3}x the host's: not a crystal error (those are \
             within about 100 ppm) but a device that counts time at another rate, e.g. rig-sim \
             at --speed {rate:.0}"
        )
    })
}
