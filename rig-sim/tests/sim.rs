//! The virtual rig against a real pty: a test host opens the link like a
//! serial port (the `serialport` crate, raw mode) and speaks the protocol.
//!
//! Most tests run the simulator in-process (`rig_sim::spawn`, one thread each);
//! the last ones run the built `rig-sim` binary for its command line, its start
//! line, its truth file and its clean exit on SIGTERM. Every test has its own
//! directory under Cargo's target tmpdir.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use firmware_bridge::clock::RigClock;
use protocol::serial::{
    cause, Ack, AckStatus, Configure, Decoder, DeviceMessage, Event, EventKind, Fault, FaultCode,
    Heartbeat, Hello, HostCommand, Pong, RewardEnded, RewardFired, ValveOpen, ValvePulse,
    MAX_WIRE_FRAME,
};
use rig_sim::{FaultSpec, LatencyModel, SimClock, SimHandle, SimOptions};
use serialport::TTYPort;

/// A decoded device frame, owned.
#[derive(Debug, Clone, PartialEq)]
enum Msg {
    Hello(Hello),
    Lever {
        first: u32,
        t_first: u32,
        period: u16,
        counts: Vec<i32>,
    },
    Event(Event),
    Pong(Pong),
    Ack(Ack),
    Fault(Fault),
    Heartbeat(Heartbeat),
    RewardFired(RewardFired),
    RewardEnded(RewardEnded),
}

fn event_kind(m: &Msg) -> Option<EventKind> {
    match m {
        Msg::Event(e) => Some(EventKind::from(e.kind)),
        _ => None,
    }
}

/// The test's end of the serial line.
struct Host {
    port: TTYPort,
    decoder: Decoder,
    inbox: VecDeque<(Instant, u16, Msg)>,
    seq: u16,
}

impl Host {
    fn open(path: &Path) -> Self {
        let port = serialport::new(path.to_string_lossy(), 1_000_000)
            .timeout(Duration::from_millis(20))
            .open_native()
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        Self {
            port,
            decoder: Decoder::new(),
            inbox: VecDeque::new(),
            seq: 0,
        }
    }

    /// Read whatever arrives within `wait`; false on a read error (port gone).
    fn pump(&mut self, wait: Duration) -> bool {
        let _ = self.port_timeout(wait);
        let mut buf = [0u8; 8192];
        match self.port.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                let now = Instant::now();
                let inbox = &mut self.inbox;
                self.decoder.feed(&buf[..n], |f| {
                    let m = match f.device_message() {
                        Ok(DeviceMessage::Hello(h)) => Msg::Hello(h),
                        Ok(DeviceMessage::LeverSamples(l)) => Msg::Lever {
                            first: l.first_index,
                            t_first: l.t_first_us,
                            period: l.period_us,
                            counts: (0..l.len()).filter_map(|i| l.count(i)).collect(),
                        },
                        Ok(DeviceMessage::Event(e)) => Msg::Event(e),
                        Ok(DeviceMessage::Pong(p)) => Msg::Pong(p),
                        Ok(DeviceMessage::Ack(a)) => Msg::Ack(a),
                        Ok(DeviceMessage::Fault(x)) => Msg::Fault(x),
                        Ok(DeviceMessage::Heartbeat(h)) => Msg::Heartbeat(h),
                        Ok(DeviceMessage::RewardFired(r)) => Msg::RewardFired(r),
                        Ok(DeviceMessage::RewardEnded(r)) => Msg::RewardEnded(r),
                        Err(e) => panic!("device sent an unparsable frame: {e}"),
                    };
                    inbox.push_back((now, f.seq, m));
                });
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => true,
            Err(_) => false,
        }
    }

    fn port_timeout(&mut self, wait: Duration) -> serialport::Result<()> {
        use serialport::SerialPort;
        self.port.set_timeout(wait.max(Duration::from_millis(1)))
    }

    /// Wait up to `within` for a message matching `want`; messages before it
    /// are kept in `seen`.
    fn wait_for(
        &mut self,
        within: Duration,
        seen: &mut Vec<Msg>,
        want: impl Fn(&Msg) -> bool,
    ) -> Option<Msg> {
        let deadline = Instant::now() + within;
        loop {
            while let Some((_, _, m)) = self.inbox.pop_front() {
                if want(&m) {
                    return Some(m);
                }
                seen.push(m);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.pump(left.min(Duration::from_millis(20)));
        }
    }

    /// Everything that arrives during `d`.
    fn collect(&mut self, d: Duration) -> Vec<Msg> {
        let mut seen = Vec::new();
        self.wait_for(d, &mut seen, |_| false);
        seen
    }

    fn send(&mut self, cmd: HostCommand) -> u16 {
        self.seq = self.seq.wrapping_add(1);
        let mut buf = [0u8; MAX_WIRE_FRAME];
        let n = cmd.encode(self.seq, &mut buf).expect("encode");
        self.port.write_all(&buf[..n]).expect("write to the pty");
        self.seq
    }

    /// Send a command and wait for its Ack.
    fn command(&mut self, cmd: HostCommand) -> (Ack, Vec<Msg>) {
        let seq = self.send(cmd);
        let mut seen = Vec::new();
        let ack = self
            .wait_for(
                Duration::from_secs(2),
                &mut seen,
                |m| matches!(m, Msg::Ack(a) if a.acked_seq == seq),
            )
            .unwrap_or_else(|| panic!("no Ack for {cmd:?}; saw {seen:?}"));
        let Msg::Ack(a) = ack else { unreachable!() };
        (a, seen)
    }
}

fn configure(rate: u32, batch: u8) -> Configure {
    Configure {
        sample_rate_hz: rate,
        samples_per_batch: batch,
        heartbeat_interval_ms: 100,
        heartbeat_timeout_ms: 2000,
        max_valve_open_ms: 200,
        max_flush_ms: 5000,
    }
}

fn test_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("sim-tests")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("test dir");
    d
}

fn options(name: &str) -> SimOptions {
    let mut o = SimOptions::new(test_dir(name).join("ttyRIG"));
    o.quiet = true;
    o.frame_rate_hz = 0.0;
    o
}

fn start(o: SimOptions) -> (SimHandle, Host) {
    let sim = rig_sim::spawn(o).expect("start the simulator");
    let host = Host::open(sim.link());
    (sim, host)
}

fn lever_batches(msgs: &[Msg]) -> Vec<(u32, u32, u16, usize)> {
    msgs.iter()
        .filter_map(|m| match m {
            Msg::Lever {
                first,
                t_first,
                period,
                counts,
            } => Some((*first, *t_first, *period, counts.len())),
            _ => None,
        })
        .collect()
}

/// Indices follow on without a gap and times are spaced by the period.
fn assert_contiguous(batches: &[(u32, u32, u16, usize)], period: u32) {
    for w in batches.windows(2) {
        let (a_first, a_t, _, a_n) = w[0];
        let (b_first, b_t, _, _) = w[1];
        assert_eq!(
            b_first,
            a_first.wrapping_add(a_n as u32),
            "index gap: {w:?}"
        );
        assert_eq!(
            b_t,
            a_t.wrapping_add(a_n as u32 * period),
            "time step: {w:?}"
        );
    }
}

#[test]
fn hello_arrives_on_open() {
    let (_sim, mut host) = start(options("hello"));
    let mut seen = Vec::new();
    let hello = host.wait_for(Duration::from_secs(2), &mut seen, |m| {
        matches!(m, Msg::Hello(_))
    });
    let Some(Msg::Hello(h)) = hello else {
        panic!("no Hello; saw {seen:?}")
    };
    assert_eq!(h.protocol_version, protocol::serial::PROTOCOL_VERSION);
    assert_eq!(h.clock_hz, 1_000_000);
    assert_eq!(h.hard_max_valve_open_ms, 1000);
    assert!(seen.is_empty(), "Hello comes first: {seen:?}");
    // Reset asks for a fresh Hello: Ack, then Hello.
    let (ack, _) = host.command(HostCommand::Reset);
    assert_eq!(AckStatus::from(ack.status), AckStatus::Ok);
    let mut seen = Vec::new();
    assert!(host
        .wait_for(Duration::from_secs(1), &mut seen, |m| matches!(
            m,
            Msg::Hello(_)
        ))
        .is_some());
}

#[test]
fn configure_streams_contiguous_batches() {
    let (_sim, mut host) = start(options("stream"));
    let (ack, _) = host.command(HostCommand::Configure(configure(1000, 1)));
    assert_eq!(AckStatus::from(ack.status), AckStatus::Ok);
    let msgs = host.collect(Duration::from_millis(600));
    let b = lever_batches(&msgs);
    assert!(b.len() >= 400, "{} batches in 600 ms", b.len());
    assert_eq!(b[0].0, 0, "the stream starts at index 0");
    assert_eq!(
        b[0].1, ack.t_us,
        "the first sample is taken when the Configure takes effect"
    );
    assert!(b.iter().all(|x| x.2 == 1000 && x.3 == 1));
    assert_contiguous(&b, 1000);
    // Heartbeats every 100 ms, streaming bit set.
    let hb: Vec<Heartbeat> = msgs
        .iter()
        .filter_map(|m| match m {
            Msg::Heartbeat(h) => Some(*h),
            _ => None,
        })
        .collect();
    assert!(hb.len() >= 4, "{hb:?}");
    assert!(hb.windows(2).all(|w| w[1].t_us - w[0].t_us == 100_000));
    assert!(hb
        .iter()
        .all(|h| h.state & protocol::serial::state::STREAMING != 0));

    // Batches of 10 at 2 kHz: 500 µs apart, 10 per frame.
    let (ack, _) = host.command(HostCommand::Configure(configure(2000, 10)));
    assert_eq!(AckStatus::from(ack.status), AckStatus::Ok);
    let b = lever_batches(&host.collect(Duration::from_millis(300)));
    let b: Vec<_> = b.into_iter().skip_while(|x| x.2 != 500).collect();
    assert!(b.len() >= 40, "{}", b.len());
    assert_eq!(b[0].0, 0);
    assert!(b.iter().all(|x| x.3 == 10));
    assert_contiguous(&b, 500);
}

#[test]
fn valve_pulse_opens_and_closes() {
    let (_sim, mut host) = start(options("valve"));
    host.command(HostCommand::Configure(configure(1000, 1)));
    let (ack, _) = host.command(HostCommand::ValvePulse(ValvePulse {
        duration_us: 40_000,
    }));
    assert_eq!(AckStatus::from(ack.status), AckStatus::Ok);
    let mut seen = Vec::new();
    let open = host.wait_for(Duration::from_secs(1), &mut seen, |m| {
        event_kind(m) == Some(EventKind::ValveOpen)
    });
    let close = host.wait_for(Duration::from_secs(1), &mut seen, |m| {
        event_kind(m) == Some(EventKind::ValveClose)
    });
    let (Some(Msg::Event(open)), Some(Msg::Event(close))) = (open, close) else {
        panic!("no ValveOpen/ValveClose; saw {seen:?}")
    };
    assert_eq!(open.value, 40_000);
    assert_eq!(open.t_us, ack.t_us);
    assert_eq!(close.t_us.wrapping_sub(open.t_us), 40_000);
    assert_eq!((close.value, close.aux), (40_000, cause::COMPLETED));
}

#[test]
fn pulse_over_the_cap_is_refused() {
    let (_sim, mut host) = start(options("refused"));
    host.command(HostCommand::Configure(configure(1000, 1)));
    // The cap is 200 ms: 200.001 ms is refused, not clamped.
    let (ack, _) = host.command(HostCommand::ValvePulse(ValvePulse {
        duration_us: 200_001,
    }));
    assert_eq!(AckStatus::from(ack.status), AckStatus::Refused);
    let msgs = host.collect(Duration::from_millis(300));
    assert!(
        msgs.iter()
            .all(|m| event_kind(m) != Some(EventKind::ValveOpen)),
        "{msgs:?}"
    );
}

#[test]
fn ping_gets_pong_through_the_latency() {
    let mut o = options("ping");
    o.latency = LatencyModel {
        base_us: 3_000.0,
        jitter_us: 500.0,
        spike_prob: 0.0,
        spike_us: 0.0,
    };
    let (_sim, mut host) = start(o);
    host.collect(Duration::from_millis(50));
    for _ in 0..5 {
        let sent = Instant::now();
        let seq = host.send(HostCommand::Ping);
        let mut seen = Vec::new();
        let pong = host.wait_for(
            Duration::from_secs(1),
            &mut seen,
            |m| matches!(m, Msg::Pong(p) if p.ping_seq == seq),
        );
        let rtt = sent.elapsed();
        let Some(Msg::Pong(p)) = pong else {
            panic!("no Pong; saw {seen:?}")
        };
        assert!(p.t_tx_us.wrapping_sub(p.t_rx_us) < 1000);
        // Two one-way latencies of at least 3 ms each.
        assert!(rtt >= Duration::from_millis(6), "{rtt:?}");
        assert!(
            seen.iter().all(|m| !matches!(m, Msg::Ack(_))),
            "a Ping gets no Ack"
        );
    }
}

#[test]
fn watchdog_trips_when_the_host_goes_quiet() {
    let (_sim, mut host) = start(options("watchdog"));
    let c = Configure {
        heartbeat_interval_ms: 50,
        heartbeat_timeout_ms: 200,
        ..configure(500, 5)
    };
    host.command(HostCommand::Configure(c));
    let (ack, _) = host.command(HostCommand::ValveOpen(ValveOpen { max_ms: 3000 }));
    assert_eq!(AckStatus::from(ack.status), AckStatus::Ok);
    // Say nothing; keep reading.
    let mut seen = Vec::new();
    let safe = host.wait_for(Duration::from_secs(2), &mut seen, |m| {
        event_kind(m) == Some(EventKind::SafeState)
    });
    let Some(Msg::Event(safe)) = safe else {
        panic!("no SafeState; saw {seen:?}")
    };
    assert_eq!(safe.aux, cause::WATCHDOG);
    assert!(
        (200..260).contains(&safe.value),
        "ms since the last frame: {}",
        safe.value
    );
    let close = seen
        .iter()
        .find_map(|m| match m {
            Msg::Event(e) if e.kind == u8::from(EventKind::ValveClose) => Some(*e),
            _ => None,
        })
        .expect("the valve was closed");
    assert_eq!(close.aux, cause::WATCHDOG);
    let mut seen = Vec::new();
    let fault = host.wait_for(
        Duration::from_secs(1),
        &mut seen,
        |m| matches!(m, Msg::Fault(f) if FaultCode::from(f.code) == FaultCode::WatchdogTripped),
    );
    assert!(fault.is_some(), "{seen:?}");
    // The lever stream goes on while safe.
    let later = host.collect(Duration::from_millis(200));
    assert!(!lever_batches(&later).is_empty());
    // The next frame clears the safe state, then is executed.
    let (ack, before) = host.command(HostCommand::HostHeartbeat);
    assert_eq!(AckStatus::from(ack.status), AckStatus::Ok);
    assert!(
        before
            .iter()
            .any(|m| event_kind(m) == Some(EventKind::SafeStateCleared)),
        "{before:?}"
    );
}

#[test]
fn garbage_fault_does_not_break_the_stream() {
    let mut o = options("garbage");
    o.faults = vec![FaultSpec::Garbage {
        at_s: 0.5,
        bytes: 300,
    }];
    let (sim, mut host) = start(o);
    host.command(HostCommand::Configure(configure(1000, 1)));
    let msgs = host.collect(Duration::from_millis(1000));
    let b = lever_batches(&msgs);
    let dropped = host.decoder.stats().frames_dropped;
    assert!(dropped >= 1, "the garbage was seen as bad frames");
    // At most the frame the garbage ran into is lost; the stream goes on.
    let mut lost = 0;
    for w in b.windows(2) {
        lost += w[1].0 - w[0].0 - 1;
    }
    assert!(lost <= 1, "{lost} samples lost");
    assert!(b.last().expect("batches").0 > 700);
    let stats = sim.stop().expect("sim");
    assert_eq!(stats.garbage_bytes, 300);
}

#[test]
fn silent_fault_leaves_a_reported_gap() {
    let mut o = options("silent");
    o.faults = vec![FaultSpec::Silent {
        at_s: 0.4,
        duration_s: 0.3,
    }];
    let (_sim, mut host) = start(o);
    host.command(HostCommand::Configure(configure(1000, 1)));
    let msgs = host.collect(Duration::from_millis(1100));
    let b = lever_batches(&msgs);
    let gaps: Vec<u32> = b
        .windows(2)
        .map(|w| w[1].0 - w[0].0 - 1)
        .filter(|&g| g > 0)
        .collect();
    assert_eq!(gaps.len(), 1, "one gap: {gaps:?}");
    assert!((280..=320).contains(&gaps[0]), "{gaps:?}");
    let reported = msgs.iter().find_map(|m| match m {
        Msg::Fault(f) if FaultCode::from(f.code) == FaultCode::SamplesDropped => Some(f.detail),
        _ => None,
    });
    assert_eq!(reported, Some(gaps[0]));
    let last_hb = msgs
        .iter()
        .rev()
        .find_map(|m| match m {
            Msg::Heartbeat(h) => Some(*h),
            _ => None,
        })
        .expect("heartbeat");
    assert_eq!(last_hb.samples_dropped, gaps[0]);
}

#[test]
fn unplug_fault_removes_and_restores_the_link() {
    let mut o = options("unplug");
    o.faults = vec![FaultSpec::Unplug {
        at_s: 0.4,
        duration_s: 0.5,
    }];
    let link = o.link.clone();
    let (sim, mut host) = start(o);
    assert!(std::fs::read_link(&link).is_ok());
    host.command(HostCommand::Configure(configure(1000, 1)));
    // The link disappears and the open port fails.
    let t0 = Instant::now();
    while link.symlink_metadata().is_ok() {
        assert!(t0.elapsed() < Duration::from_secs(2), "link never removed");
        host.pump(Duration::from_millis(5));
    }
    let mut dead = false;
    for _ in 0..50 {
        if !host.pump(Duration::from_millis(10)) {
            dead = true;
            break;
        }
    }
    assert!(dead, "reading the unplugged port fails");
    // It comes back: a new pty behind the same path.
    while link.symlink_metadata().is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "link never came back"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(std::fs::read_link(&link).is_ok());
    let mut host = Host::open(&link);
    // The device did not reboot: no Hello, it answers and it kept its stream
    // (indices carry on from before the unplug).
    let seq = host.send(HostCommand::Ping);
    let mut seen = Vec::new();
    let pong = host.wait_for(
        Duration::from_secs(1),
        &mut seen,
        |m| matches!(m, Msg::Pong(p) if p.ping_seq == seq),
    );
    assert!(pong.is_some(), "{seen:?}");
    let mut msgs = seen;
    msgs.extend(host.collect(Duration::from_millis(100)));
    assert!(msgs.iter().all(|m| !matches!(m, Msg::Hello(_))));
    let b = lever_batches(&msgs);
    assert!(
        !b.is_empty() && b.iter().all(|x| x.0 > 500),
        "{:?}",
        b.first()
    );
    let stats = sim.stop().expect("sim");
    assert_eq!(stats.unplugs, 1);
    assert!(
        link.symlink_metadata().is_err(),
        "the link is removed at exit"
    );
}

#[test]
fn reboot_fault_sends_a_new_hello() {
    let mut o = options("reboot");
    o.faults = vec![FaultSpec::Reboot { at_s: 0.5 }];
    o.clock = SimClock::new(7_000_000, 0.0, 1.0);
    let (_sim, mut host) = start(o);
    let mut seen = Vec::new();
    let Some(Msg::Hello(h1)) = host.wait_for(Duration::from_secs(1), &mut seen, |m| {
        matches!(m, Msg::Hello(_))
    }) else {
        panic!("no first Hello")
    };
    assert_eq!(h1.t_us, 7_000_000);
    host.command(HostCommand::Configure(configure(1000, 1)));
    let mut before = Vec::new();
    let Some(Msg::Hello(h2)) = host.wait_for(Duration::from_secs(2), &mut before, |m| {
        matches!(m, Msg::Hello(_))
    }) else {
        panic!("no second Hello")
    };
    assert!(!lever_batches(&before).is_empty());
    // The counter restarted from 0, and streaming stopped.
    assert_eq!(h2.t_us, 0);
    let after = host.collect(Duration::from_millis(300));
    assert!(lever_batches(&after).is_empty(), "{after:?}");
    // It streams again once configured.
    let (ack, _) = host.command(HostCommand::Configure(configure(1000, 1)));
    assert!(ack.t_us < 1_000_000);
    let b = lever_batches(&host.collect(Duration::from_millis(100)));
    assert_eq!(b.first().map(|x| x.0), Some(0));
}

#[test]
fn counter_wraps_near_the_top_and_unwraps_on_the_host() {
    let mut o = options("wrap");
    o.clock = SimClock::new((1u64 << 32) - 300_000, 0.0, 1.0);
    let (_sim, mut host) = start(o);
    host.command(HostCommand::Configure(configure(1000, 5)));
    let b = lever_batches(&host.collect(Duration::from_millis(600)));
    assert_contiguous(&b, 1000);
    let mut clock = RigClock::new();
    let t: Vec<u64> = b.iter().map(|x| clock.unwrap(x.1)).collect();
    assert!(t.windows(2).all(|w| w[1] == w[0] + 5000));
    assert!(
        t[0] < 1 << 32 && *t.last().expect("t") > 1 << 32,
        "{:?}",
        (t[0], t.last())
    );
    assert_eq!(clock.wraps(), 1);
}

#[test]
fn ten_khz_at_ten_times_speed_keeps_up() {
    let mut o = options("fast");
    o.clock.speed = 10.0;
    let (_sim, mut host) = start(o);
    let c = Configure {
        heartbeat_timeout_ms: 10_000,
        ..configure(10_000, 10)
    };
    host.command(HostCommand::Configure(c));
    let started = Instant::now();
    let msgs = host.collect(Duration::from_millis(500));
    let wall = started.elapsed().as_secs_f64();
    let b = lever_batches(&msgs);
    // A host that cannot keep up (a loaded machine) makes the device drop
    // frames: allowed only when the device says so (`Fault TxOverflow`, the
    // frames dropped since boot), never silently.
    let missing_batches: u64 = b
        .windows(2)
        .map(|w| u64::from(w[1].0.wrapping_sub(w[0].0.wrapping_add(w[0].3 as u32))) / 100)
        .sum();
    if missing_batches == 0 {
        assert_contiguous(&b, 100);
    } else {
        let dropped = msgs
            .iter()
            .filter_map(|m| match m {
                Msg::Fault(f) if f.code == u16::from(FaultCode::TxOverflow) => Some(f.detail),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        assert!(
            u64::from(dropped) >= missing_batches,
            "{missing_batches} lever frames missing, the device reported {dropped} dropped"
        );
    }
    let samples: usize = b.iter().map(|x| x.3).sum();
    // 10 kHz x 10 = 100 000 samples per wall second, give or take scheduling.
    let expected = 100_000.0 * wall;
    assert!(
        samples as f64 > 0.5 * expected,
        "{samples} samples in {wall:.3} s (expected ~{expected:.0})"
    );
}

// ---- the binary ---------------------------------------------------------

fn rig_sim(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_rig-sim"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run rig-sim")
}

#[test]
fn binary_serves_a_session_writes_truth_and_exits_on_sigterm() {
    let dir = test_dir("binary");
    let link = dir.join("ttyACM-sim");
    let truth = dir.join("truth.tsv");
    // A stale symlink at --link is replaced.
    std::os::unix::fs::symlink("/nonexistent", &link).expect("stale link");
    let mut child = rig_sim(&[
        "--link",
        link.to_str().expect("utf-8"),
        "--truth",
        truth.to_str().expect("utf-8"),
        "--speed",
        "2",
        "--day",
        "14",
        "--seed",
        "7",
        "--quiet",
    ]);
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("start line");
    let pty = std::fs::read_link(&link).expect("link made");
    assert!(line.contains(&*pty.to_string_lossy()), "{line}");
    assert!(line.contains(&*link.to_string_lossy()), "{line}");

    let mut host = Host::open(&link);
    let mut seen = Vec::new();
    assert!(host
        .wait_for(Duration::from_secs(2), &mut seen, |m| matches!(
            m,
            Msg::Hello(_)
        ))
        .is_some());
    host.command(HostCommand::Configure(configure(1000, 10)));
    host.command(HostCommand::Tone(protocol::serial::Tone {
        frequency_hz: 6000,
        duration_ms: 200,
        level_pct: 80,
    }));
    host.command(HostCommand::ValvePulse(ValvePulse {
        duration_us: 30_000,
    }));
    // An expert mouse answers the cue within a second or so (2x speed).
    let deadline = Instant::now() + Duration::from_millis(1200);
    while Instant::now() < deadline {
        host.command(HostCommand::HostHeartbeat);
        host.collect(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    assert!(link.symlink_metadata().is_err(), "link removed on SIGTERM");

    let text = std::fs::read_to_string(&truth).expect("truth file");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(rig_sim::TRUTH_HEADER));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split('\t').collect()).collect();
    assert!(rows.iter().all(|r| r.len() == 5), "5 columns");
    let kinds: Vec<&str> = rows.iter().map(|r| r[2]).collect();
    for k in [
        "tone_on",
        "tone_off",
        "valve_open",
        "valve_close",
        "lick_on",
        "ttl",
    ] {
        assert!(kinds.contains(&k), "no {k} in the truth: {kinds:?}");
    }
    let valve = rows
        .iter()
        .find(|r| r[2] == "valve_open")
        .expect("valve_open");
    assert_eq!(valve[3], "30000");
    // Rows are in true-time order and the device clock follows true time.
    let times: Vec<f64> = rows.iter().map(|r| r[0].parse().expect("true_s")).collect();
    assert!(times.windows(2).all(|w| w[1] >= w[0]));
    for r in &rows {
        let true_s: f64 = r[0].parse().expect("true_s");
        let dev: f64 = r[1].parse().expect("device_us");
        assert!((dev - true_s * 1e6).abs() <= 1.5, "{r:?}");
    }
}

#[test]
fn binary_refuses_bad_flags() {
    let dir = test_dir("badflags");
    let file = dir.join("not-a-link");
    std::fs::write(&file, b"keep me").expect("file");
    let out = rig_sim(&["--link", file.to_str().expect("utf-8"), "--quiet"])
        .wait_with_output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a symlink"), "{err}");
    assert_eq!(std::fs::read(&file).expect("file"), b"keep me");

    let link = dir.join("link");
    for (args, needle) in [
        (vec!["--fault", "melt@1"], "unknown fault"),
        (vec!["--day", "15"], "15"),
        (vec!["--speed", "0"], "--speed 0"),
        (vec!["--truth-threshold-mm", "9"], "--truth-threshold-mm 9"),
    ] {
        let mut all = vec!["--link", link.to_str().expect("utf-8")];
        all.extend(args);
        let out = rig_sim(&all).wait_with_output().expect("run");
        assert!(!out.status.success(), "{all:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{all:?}: {err}");
        assert!(link.symlink_metadata().is_err());
    }
}

// ---------------------------------------------------------------- armed reward

/// Lever counts with their device times, from lever batches.
fn lever_samples(msgs: &[Msg]) -> Vec<(u32, u32, i32)> {
    let mut out = Vec::new();
    for m in msgs {
        if let Msg::Lever {
            first,
            t_first,
            period,
            counts,
        } = m
        {
            for (i, c) in counts.iter().enumerate() {
                let i = i as u32;
                out.push((
                    first.wrapping_add(i),
                    t_first.wrapping_add(i * u32::from(*period)),
                    *c,
                ));
            }
        }
    }
    out
}

/// A host that arms a reward and then goes silent: the device disarms on the
/// watchdog, and the lever's crossing after that never opens the valve. The
/// same arm with the host alive fires at the crossing sample (so the first
/// half can fail).
#[test]
fn armed_reward_disarms_when_the_host_goes_silent_and_never_fires_late() {
    use protocol::serial::{direction, disarm_reason, ArmReward};
    let mut o = options("armed-silent");
    // The lever held pressed 2.4 mm (96 counts) at 2 s and at 6 s, for 1 s each.
    o.faults = vec![
        "hold@2:1".parse().expect("fault spec"),
        "hold@6:1".parse().expect("fault spec"),
    ];
    let (_sim, mut host) = start(o);
    let c = Configure {
        heartbeat_interval_ms: 100,
        heartbeat_timeout_ms: 300,
        ..configure(1000, 1)
    };
    host.command(HostCommand::Configure(c));
    let first = host.collect(Duration::from_millis(300));
    let samples = lever_samples(&first);
    let &(_, t_now, rest) = samples.last().expect("lever samples");
    assert!(t_now < 1_500_000, "the arm must come well before the hold");
    let arm = |tag: u32, end: u32| ArmReward {
        trial_tag: tag,
        rest_counts: rest,
        threshold_counts: 60,
        rearm_counts: 20,
        direction: direction::UP,
        window_end_us: end,
        pulse_us: 50_000,
    };
    let (ack, _) = host.command(HostCommand::ArmReward(arm(1, 5_000_000)));
    assert_eq!(AckStatus::from(ack.status), AckStatus::Ok);
    // Silence, through the hold (2 s to 3 s) and on to 3.5 s.
    let silent = host.collect(Duration::from_millis(
        3_500u64.saturating_sub(u64::from(t_now / 1000)),
    ));
    let crossed = lever_samples(&silent)
        .iter()
        .filter(|&&(_, _, c)| c - rest >= 60)
        .count();
    assert!(
        crossed > 500,
        "the lever crossed while the host was silent ({crossed} samples)"
    );
    let ended: Vec<RewardEnded> = silent
        .iter()
        .filter_map(|m| match m {
            Msg::RewardEnded(r) => Some(*r),
            _ => None,
        })
        .collect();
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0].reason, disarm_reason::WATCHDOG);
    assert_eq!(ended[0].trial_tag, 1);
    assert!(
        !silent.iter().any(
            |m| matches!(m, Msg::RewardFired(_)) || event_kind(m) == Some(EventKind::ValveOpen)
        ),
        "the valve opened with the host silent"
    );
    // The host is back: the same arm, fed, fires at the crossing sample.
    let (_, back) = host.command(HostCommand::HostHeartbeat);
    let mut seen = back;
    let (ack, more) = host.command(HostCommand::ArmReward(arm(2, 7_500_000)));
    seen.extend(more);
    assert_eq!(AckStatus::from(ack.status), AckStatus::Ok);
    for _ in 0..40 {
        seen.extend(host.collect(Duration::from_millis(100)));
        host.send(HostCommand::HostHeartbeat);
    }
    seen.extend(host.collect(Duration::from_millis(200)));
    let fired: Vec<RewardFired> = seen
        .iter()
        .filter_map(|m| match m {
            Msg::RewardFired(r) => Some(*r),
            _ => None,
        })
        .collect();
    assert_eq!(fired.len(), 1, "one firing per arm");
    let f = fired[0];
    assert_eq!(f.trial_tag, 2);
    assert!(f.counts - rest >= 60, "fired at {} (rest {rest})", f.counts);
    // The sample it names is the first crossing by the device's rule: at or
    // past the threshold after the lever was below the re-arm point.
    let all = lever_samples(&seen);
    let mut ready = all
        .iter()
        .rev()
        .find(|&&(_, t, _)| t < ack.t_us)
        .is_some_and(|&(_, _, c)| c - rest < 20);
    let mut want = None;
    for &(i, t, c) in all.iter().filter(|&&(_, t, _)| t >= ack.t_us) {
        if ready && c - rest >= 60 {
            want = Some((i, t));
            break;
        }
        ready |= c - rest < 20;
    }
    assert_eq!(want, Some((f.sample_index, f.t_cross_us)));
    let opens: Vec<Event> = seen
        .iter()
        .filter_map(|m| match m {
            Msg::Event(e) if e.kind == u8::from(EventKind::ValveOpen) => Some(*e),
            _ => None,
        })
        .collect();
    assert_eq!(opens.len(), 1);
    assert_eq!(opens[0].t_us, f.t_cross_us);
    assert_eq!(opens[0].value, 50_000);
}
