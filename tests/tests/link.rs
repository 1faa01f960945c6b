//! The serial link against the virtual rig over a real pty: handshake,
//! lossless streams, commands, unplug and reconnect, version mismatch, garbage
//! on the line, and the 32-bit counter wrap.

use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use firmware_bridge::link::{ChannelHandler, LinkEvent, LinkSettings, LostReason, SerialLink};
use protocol::serial::{AckStatus, Configure, EventKind, HostCommand, Tone, ValvePulse};
use rig_tests::{Sim, TempDir};

fn configure(rate: u32, batch: u8) -> Configure {
    Configure {
        sample_rate_hz: rate,
        samples_per_batch: batch,
        heartbeat_interval_ms: 100,
        heartbeat_timeout_ms: 1000,
        max_valve_open_ms: 200,
        max_flush_ms: 2000,
    }
}

fn start_link(sim: &Sim, cfg: Configure) -> (SerialLink, Receiver<LinkEvent>) {
    let settings = LinkSettings::new(sim.link.clone(), 1_000_000, cfg);
    let (handler, rx, _) = ChannelHandler::new(1 << 20);
    (
        SerialLink::spawn(settings, handler).expect("spawn link"),
        rx,
    )
}

/// Wait for the first event `pick` accepts, or panic after `timeout`.
fn wait_for<T>(
    rx: &Receiver<LinkEvent>,
    timeout: Duration,
    what: &str,
    mut pick: impl FnMut(&LinkEvent) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(ev) => {
                if let Some(t) = pick(&ev) {
                    return t;
                }
            }
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// Tally of a stream: samples, gaps, and whether indices and times were contiguous.
#[derive(Debug, Default)]
struct Tally {
    samples: u64,
    gaps: Vec<(u64, u64)>,
    bad_frames: u64,
    next: Option<(u64, u64)>,
    discontinuities: u64,
    first_t_us: Option<u64>,
    last_t_us: u64,
    lost: Vec<LostReason>,
    connected: u32,
}

impl Tally {
    fn add(&mut self, ev: &LinkEvent) {
        match ev {
            LinkEvent::Lever(b) => {
                if let Some((i, t)) = self.next {
                    if b.first_index != i || b.t_first_us != t {
                        self.discontinuities += 1;
                    }
                }
                let n = b.counts().len() as u64;
                self.samples += n;
                self.first_t_us.get_or_insert(b.t_first_us);
                self.last_t_us = b.t_first_us + (n - 1) * u64::from(b.period_us);
                self.next = Some((b.first_index + n, b.t_first_us + n * u64::from(b.period_us)));
            }
            LinkEvent::SampleGap {
                from_index,
                missing,
                ..
            } => {
                self.gaps.push((*from_index, *missing));
                // After a gap the next batch starts past it.
                self.next = None;
            }
            LinkEvent::BadFrames { frames, .. } => self.bad_frames += frames,
            LinkEvent::Lost { reason, .. } => self.lost.push(reason.clone()),
            LinkEvent::Connected { .. } => self.connected += 1,
            _ => {}
        }
    }

    fn device_seconds(&self) -> f64 {
        self.first_t_us
            .map_or(0.0, |f| (self.last_t_us - f) as f64 / 1e6)
    }
}

/// Stream `device_s` seconds of device time and check nothing is lost.
fn lossless_stream(rate: u32, batch: u8, speed: f64, device_s: f64) {
    let dir = TempDir::new("stream");
    let speed_s = speed.to_string();
    let sim = Sim::start(
        dir.path(),
        &["--speed", &speed_s, "--frame-rate-hz", "28.7"],
    );
    let (link, rx) = start_link(&sim, configure(rate, batch));
    let mut tally = Tally::default();
    wait_for(&rx, Duration::from_secs(5), "Connected", |ev| {
        matches!(ev, LinkEvent::Connected { .. }).then_some(())
    });
    let deadline = Instant::now() + Duration::from_secs_f64(device_s / speed * 3.0 + 10.0);
    while tally.device_seconds() < device_s {
        assert!(Instant::now() < deadline, "stream too slow: {tally:?}");
        if let Ok(ev) = rx.recv_timeout(Duration::from_secs(2)) {
            tally.add(&ev);
        }
    }
    link.shutdown();
    assert!(tally.gaps.is_empty(), "gaps at {rate} Hz: {:?}", tally.gaps);
    assert_eq!(tally.discontinuities, 0, "{tally:?}");
    assert_eq!(tally.bad_frames, 0, "{tally:?}");
    assert!(tally.lost.is_empty(), "link lost: {:?}", tally.lost);
    let expected = (tally.device_seconds() * f64::from(rate)).round() as u64 + 1;
    assert!(
        tally.samples.abs_diff(expected) <= u64::from(batch),
        "{} samples, expected {expected}",
        tally.samples
    );
}

#[test]
fn handshake_and_1khz_stream_without_loss_for_60_device_seconds() {
    lossless_stream(1000, 1, 10.0, 60.0);
}

#[test]
fn stream_at_10khz_without_loss_for_60_device_seconds() {
    lossless_stream(10_000, 10, 10.0, 60.0);
}

#[test]
fn valve_and_tone_commands_are_acknowledged_and_happen() {
    let dir = TempDir::new("commands");
    let sim = Sim::start(dir.path(), &[]);
    let (link, rx) = start_link(&sim, configure(1000, 1));
    wait_for(&rx, Duration::from_secs(5), "Connected", |ev| {
        matches!(ev, LinkEvent::Connected { .. }).then_some(())
    });
    let cmd = link.commander();

    let pulse = cmd
        .send(HostCommand::ValvePulse(ValvePulse {
            duration_us: 40_000,
        }))
        .expect("send pulse");
    let status = wait_for(&rx, Duration::from_secs(2), "valve ack", |ev| match ev {
        LinkEvent::Acked { seq, status, .. } if *seq == pulse.seq => Some(*status),
        _ => None,
    });
    assert_eq!(status, AckStatus::Ok);
    let open = wait_for(&rx, Duration::from_secs(2), "valve open", |ev| match ev {
        LinkEvent::Device {
            kind: EventKind::ValveOpen,
            t_us,
            ..
        } => Some(*t_us),
        _ => None,
    });
    let (close, open_us) = wait_for(&rx, Duration::from_secs(2), "valve close", |ev| match ev {
        LinkEvent::Device {
            kind: EventKind::ValveClose,
            t_us,
            value,
            ..
        } => Some((*t_us, *value)),
        _ => None,
    });
    assert_eq!(
        close - open,
        40_000,
        "valve open for exactly the pulse on the rig clock"
    );
    assert_eq!(open_us, 40_000);

    // Over the cap (200 ms): refused, never clamped.
    let big = cmd
        .send(HostCommand::ValvePulse(ValvePulse {
            duration_us: 250_000,
        }))
        .expect("send");
    let status = wait_for(&rx, Duration::from_secs(2), "refusal", |ev| match ev {
        LinkEvent::Acked { seq, status, .. } if *seq == big.seq => Some(*status),
        LinkEvent::Device {
            kind: EventKind::ValveOpen,
            ..
        } => panic!("the valve opened for an over-cap pulse"),
        _ => None,
    });
    assert_eq!(status, AckStatus::Refused);

    let tone = cmd
        .send(HostCommand::Tone(Tone {
            frequency_hz: 6000,
            duration_ms: 100,
            level_pct: 80,
        }))
        .expect("send tone");
    wait_for(&rx, Duration::from_secs(2), "tone ack", |ev| match ev {
        LinkEvent::Acked {
            seq,
            status: AckStatus::Ok,
            ..
        } if *seq == tone.seq => Some(()),
        _ => None,
    });
    let on = wait_for(&rx, Duration::from_secs(2), "tone on", |ev| match ev {
        LinkEvent::Device {
            kind: EventKind::ToneOn,
            t_us,
            value,
            ..
        } => {
            assert_eq!(*value, 6000);
            Some(*t_us)
        }
        _ => None,
    });
    let off = wait_for(&rx, Duration::from_secs(2), "tone off", |ev| match ev {
        LinkEvent::Device {
            kind: EventKind::ToneOff,
            t_us,
            ..
        } => Some(*t_us),
        _ => None,
    });
    assert_eq!(off - on, 100_000);
    link.shutdown();
}

#[test]
fn unplug_and_return_reconnects_and_reports_the_gap() {
    let dir = TempDir::new("unplug");
    // Unplugged from t = 2 s to t = 3.5 s of sim time.
    let sim = Sim::start(dir.path(), &["--fault", "unplug@2:1.5"]);
    let (link, rx) = start_link(&sim, configure(1000, 1));
    let mut tally = Tally::default();
    let mut lost_at = None;
    let mut back_at = None;
    let mut returned_at = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && tally.connected < 2 || tally.samples < 5000 {
        assert!(Instant::now() < deadline, "no reconnect: {tally:?}");
        let Ok(ev) = rx.recv_timeout(Duration::from_secs(1)) else {
            continue;
        };
        if lost_at.is_some() && returned_at.is_none() && sim.link.exists() {
            returned_at = Some(Instant::now());
        }
        match &ev {
            LinkEvent::Lost { .. } if lost_at.is_none() => lost_at = Some(Instant::now()),
            LinkEvent::Connected {
                reconnect: true,
                device_rebooted,
                ..
            } => {
                assert!(!device_rebooted, "an unplug is not a reboot");
                back_at = Some(Instant::now());
            }
            _ => {}
        }
        tally.add(&ev);
    }
    link.shutdown();
    assert!(lost_at.is_some(), "the link reported the loss");
    let (returned, back) = (
        returned_at.or(lost_at).expect("returned"),
        back_at.expect("reconnected"),
    );
    assert!(
        back.duration_since(returned) < Duration::from_secs(2),
        "reconnected {:?} after the device returned",
        back.duration_since(returned)
    );
    assert_eq!(tally.gaps.len(), 1, "exactly one gap: {:?}", tally.gaps);
    let (_, missing) = tally.gaps[0];
    // About 1.5 s at 1 kHz went missing (plus the reconnect time).
    assert!((1400..4000).contains(&missing), "gap of {missing} samples");
}

#[test]
fn protocol_version_mismatch_is_a_clear_error() {
    let dir = TempDir::new("version");
    let sim = Sim::start(dir.path(), &["--protocol-version", "99"]);
    let (link, rx) = start_link(&sim, configure(1000, 1));
    let reason = wait_for(&rx, Duration::from_secs(5), "refusal", |ev| match ev {
        LinkEvent::Lost { reason, .. } => Some(reason.clone()),
        LinkEvent::Connected { .. } => panic!("connected to a device with the wrong protocol"),
        _ => None,
    });
    assert_eq!(
        reason,
        LostReason::VersionMismatch {
            device: 99,
            host: protocol::serial::PROTOCOL_VERSION
        }
    );
    let text = reason.to_string();
    assert!(text.contains("99") && text.contains("flash"), "{text}");
    link.shutdown();
}

#[test]
fn garbage_mid_stream_is_counted_and_no_later_sample_is_lost() {
    let dir = TempDir::new("garbage");
    let sim = Sim::start(
        dir.path(),
        &["--fault", "garbage@1:500", "--fault", "garbage@2:3000"],
    );
    let (link, rx) = start_link(&sim, configure(1000, 1));
    let mut tally = Tally::default();
    let deadline = Instant::now() + Duration::from_secs(15);
    while tally.device_seconds() < 4.0 {
        assert!(Instant::now() < deadline, "{tally:?}");
        if let Ok(ev) = rx.recv_timeout(Duration::from_secs(1)) {
            tally.add(&ev);
        }
    }
    link.shutdown();
    assert!(tally.bad_frames > 0, "garbage was counted: {tally:?}");
    assert!(tally.gaps.is_empty(), "no sample lost: {:?}", tally.gaps);
    assert_eq!(tally.discontinuities, 0);
    assert!(tally.lost.is_empty(), "{:?}", tally.lost);
}

#[test]
fn counter_wrap_is_crossed_without_a_hiccup() {
    let dir = TempDir::new("wrap");
    // The device counter starts 2 s before it wraps.
    let start = (u64::from(u32::MAX) + 1 - 2_000_000).to_string();
    let sim = Sim::start(dir.path(), &["--counter-start", &start]);
    let (link, rx) = start_link(&sim, configure(1000, 1));
    let mut tally = Tally::default();
    let deadline = Instant::now() + Duration::from_secs(15);
    while tally.device_seconds() < 4.0 {
        assert!(Instant::now() < deadline, "{tally:?}");
        if let Ok(ev) = rx.recv_timeout(Duration::from_secs(1)) {
            tally.add(&ev);
        }
    }
    link.shutdown();
    assert!(
        tally.last_t_us > u64::from(u32::MAX),
        "crossed the wrap: last {}",
        tally.last_t_us
    );
    assert!(
        tally.gaps.is_empty() && tally.discontinuities == 0,
        "{tally:?}"
    );
}

#[test]
fn device_reboot_keeps_rig_time_moving_forward() {
    let dir = TempDir::new("reboot");
    let sim = Sim::start(dir.path(), &["--fault", "reboot@3"]);
    let (link, rx) = start_link(&sim, configure(1000, 1));
    let mut tally = Tally::default();
    let mut rebooted = false;
    let mut last_t = 0u64;
    let mut backwards = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(rebooted && tally.samples > 6000) {
        assert!(Instant::now() < deadline, "no reboot seen: {tally:?}");
        let Ok(ev) = rx.recv_timeout(Duration::from_secs(1)) else {
            continue;
        };
        match &ev {
            LinkEvent::Connected {
                device_rebooted: true,
                ..
            } => rebooted = true,
            LinkEvent::Lever(b) => {
                if b.t_first_us < last_t {
                    backwards += 1;
                }
                last_t = b.t_first_us;
            }
            _ => {}
        }
        tally.add(&ev);
    }
    link.shutdown();
    assert_eq!(
        backwards, 0,
        "rig time went backwards after the device's counter restarted"
    );
    assert_eq!(tally.connected, 2, "{tally:?}");
    // The virtual rig reboots instantly and the link reconfigures it within
    // a sample or two: at most one small gap, placed by rig time.
    assert!(
        tally.gaps.len() <= 1 && tally.gaps.iter().all(|g| g.1 < 100),
        "{:?}",
        tally.gaps
    );
}

#[test]
fn silent_device_is_declared_lost_and_recovered() {
    let dir = TempDir::new("silent");
    let sim = Sim::start(dir.path(), &["--fault", "silent@2:2"]);
    let (link, rx) = start_link(&sim, configure(1000, 1));
    let mut tally = Tally::default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tally.connected < 2 || tally.samples < 4000 {
        assert!(Instant::now() < deadline, "{tally:?}");
        if let Ok(ev) = rx.recv_timeout(Duration::from_secs(1)) {
            tally.add(&ev);
        }
    }
    link.shutdown();
    assert!(
        tally
            .lost
            .iter()
            .any(|r| matches!(r, LostReason::Silent { .. })),
        "silence detected: {:?}",
        tally.lost
    );
    assert_eq!(
        tally.gaps.len(),
        1,
        "the silent stretch is one reported gap: {:?}",
        tally.gaps
    );
    let (_, missing) = tally.gaps[0];
    assert!(
        (1500..5000).contains(&missing),
        "gap of {missing} samples for 2 s of silence"
    );
}
