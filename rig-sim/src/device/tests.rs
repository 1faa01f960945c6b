//! The device state machine without a pty: fast and deterministic.

use super::*;
use protocol::serial::{capability, cobs, crc, Configure, SyncOut, Tone, ValveOpen, ValvePulse};

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
    RewardFired(protocol::serial::RewardFired),
    RewardEnded(protocol::serial::RewardEnded),
}

#[derive(Debug)]
struct TestIo {
    lever: i32,
    room: bool,
    decoder: Decoder,
    /// (device time handed over, seq, message)
    frames: Vec<(u64, u16, Msg)>,
    outputs: Vec<(u64, OutputChange)>,
    lever_queries: Vec<u64>,
}

impl TestIo {
    fn new() -> Self {
        Self {
            lever: 7,
            room: true,
            decoder: Decoder::new(),
            frames: Vec::new(),
            outputs: Vec::new(),
            lever_queries: Vec::new(),
        }
    }

    fn take(&mut self) -> Vec<Msg> {
        self.frames.drain(..).map(|(_, _, m)| m).collect()
    }

    fn events(&self) -> Vec<Event> {
        self.frames
            .iter()
            .filter_map(|(_, _, m)| match m {
                Msg::Event(e) => Some(*e),
                _ => None,
            })
            .collect()
    }

    fn acks(&self) -> Vec<Ack> {
        self.frames
            .iter()
            .filter_map(|(_, _, m)| match m {
                Msg::Ack(a) => Some(*a),
                _ => None,
            })
            .collect()
    }

    fn faults(&self) -> Vec<Fault> {
        self.frames
            .iter()
            .filter_map(|(_, _, m)| match m {
                Msg::Fault(f) => Some(*f),
                _ => None,
            })
            .collect()
    }
}

impl DeviceIo for TestIo {
    fn lever_counts(&mut self, t_us: u64) -> i32 {
        self.lever_queries.push(t_us);
        self.lever
    }
    fn can_transmit(&mut self, _t_us: u64, _len: usize) -> bool {
        self.room
    }
    fn transmit(&mut self, t_us: u64, frame: &[u8]) {
        let mut got = Vec::new();
        self.decoder.feed(frame, |f| {
            let m = match f.device_message().expect("device frame parses") {
                DeviceMessage::Hello(h) => Msg::Hello(h),
                DeviceMessage::LeverSamples(l) => Msg::Lever {
                    first: l.first_index,
                    t_first: l.t_first_us,
                    period: l.period_us,
                    counts: (0..l.len()).filter_map(|i| l.count(i)).collect(),
                },
                DeviceMessage::Event(e) => Msg::Event(e),
                DeviceMessage::Pong(p) => Msg::Pong(p),
                DeviceMessage::Ack(a) => Msg::Ack(a),
                DeviceMessage::Fault(f) => Msg::Fault(f),
                DeviceMessage::Heartbeat(h) => Msg::Heartbeat(h),
                DeviceMessage::RewardFired(r) => Msg::RewardFired(r),
                DeviceMessage::RewardEnded(r) => Msg::RewardEnded(r),
            };
            got.push((t_us, f.seq, m));
        });
        assert_eq!(got.len(), 1, "one frame per transmit");
        self.frames.extend(got);
    }
    fn output(&mut self, t_us: u64, change: OutputChange) {
        self.outputs.push((t_us, change));
    }
}

fn boot(t: u64) -> (Device, TestIo) {
    let mut io = TestIo::new();
    let d = Device::boot(Firmware::default(), t, &mut io);
    (d, io)
}

fn send(d: &mut Device, io: &mut TestIo, t: u64, seq: u16, cmd: HostCommand) {
    let mut buf = [0u8; MAX_WIRE_FRAME];
    let n = cmd.encode(seq, &mut buf).expect("encode");
    d.receive(t, &buf[..n], io);
}

/// A hand-made frame with any type and body.
fn raw_frame(ty: u8, seq: u16, body: &[u8]) -> Vec<u8> {
    let mut raw = vec![ty, 0];
    raw.extend_from_slice(&seq.to_le_bytes());
    raw.extend_from_slice(body);
    let c = crc::crc16(&raw);
    raw.extend_from_slice(&c.to_le_bytes());
    let mut out = vec![0u8; cobs::max_encoded_len(raw.len()) + 1];
    let n = cobs::encode(&raw, &mut out).expect("cobs");
    out.truncate(n);
    out.push(0);
    out
}

fn configure(rate: u32, batch: u8) -> Configure {
    Configure {
        sample_rate_hz: rate,
        samples_per_batch: batch,
        heartbeat_interval_ms: 100,
        heartbeat_timeout_ms: 500,
        max_valve_open_ms: 200,
        max_flush_ms: 5000,
    }
}

fn status_of(a: &Ack) -> AckStatus {
    AckStatus::from(a.status)
}

#[test]
fn boot_sends_hello_first() {
    let (d, mut io) = boot(1234);
    let msgs = io.take();
    assert_eq!(msgs.len(), 1);
    let Msg::Hello(h) = &msgs[0] else {
        panic!("{msgs:?}")
    };
    assert_eq!(h.protocol_version, PROTOCOL_VERSION);
    assert_eq!(h.clock_hz, 1_000_000);
    assert_eq!(h.hard_max_valve_open_ms, 1000);
    assert_eq!(h.t_us, 1234);
    assert_ne!(h.capabilities & capability::LEVER, 0);
    assert_eq!(d.status().tx_seq, 1);
}

#[test]
fn protocol_version_is_overridable() {
    let mut io = TestIo::new();
    let fw = Firmware {
        protocol_version: 9,
        ..Firmware::default()
    };
    Device::boot(fw, 0, &mut io);
    assert!(matches!(
        io.take()[0],
        Msg::Hello(Hello {
            protocol_version: 9,
            ..
        })
    ));
}

#[test]
fn configure_validation() {
    let (mut d, mut io) = boot(0);
    io.take();
    let bad = [
        configure(3, 1),      // does not divide 1 MHz
        configure(40_000, 1), // above max_sample_rate_hz
        configure(10, 1),     // period 100 000 µs does not fit u16
        configure(1000, 0),
        configure(1000, 51),
        Configure {
            heartbeat_timeout_ms: 0,
            ..configure(1000, 1)
        },
        Configure {
            heartbeat_interval_ms: 0,
            ..configure(1000, 1)
        },
        Configure {
            max_valve_open_ms: 1001,
            ..configure(1000, 1)
        },
    ];
    for (i, c) in bad.iter().enumerate() {
        send(
            &mut d,
            &mut io,
            1000 + i as u64,
            i as u16,
            HostCommand::Configure(*c),
        );
    }
    let acks = io.acks();
    assert_eq!(acks.len(), bad.len());
    assert!(
        acks.iter().all(|a| status_of(a) == AckStatus::BadValue),
        "{acks:?}"
    );
    d.advance(50_000, &mut io);
    assert!(io
        .frames
        .iter()
        .all(|(_, _, m)| !matches!(m, Msg::Lever { .. })));
    assert_eq!(d.status().state & state::STREAMING, 0);

    io.take();
    send(
        &mut d,
        &mut io,
        60_000,
        100,
        HostCommand::Configure(configure(20_000, 50)),
    );
    assert_eq!(status_of(&io.acks()[0]), AckStatus::Ok);
    assert_ne!(d.status().state & state::STREAMING, 0);
    // Rate 0 stops the stream (and the batch size is then irrelevant).
    send(
        &mut d,
        &mut io,
        61_000,
        101,
        HostCommand::Configure(configure(0, 0)),
    );
    assert_eq!(status_of(&io.acks()[1]), AckStatus::Ok);
    assert_eq!(d.status().state & state::STREAMING, 0);
}

#[test]
fn lever_batches_are_gap_free_and_sequenced() {
    let (mut d, mut io) = boot(0);
    send(
        &mut d,
        &mut io,
        10_000,
        1,
        HostCommand::Configure(configure(1000, 5)),
    );
    d.advance(10_000 + 99_999, &mut io);
    let mut next_index = 0;
    let mut batches = 0;
    for (t, _, m) in &io.frames {
        if let Msg::Lever {
            first,
            t_first,
            period,
            counts,
        } = m
        {
            assert_eq!(*first, next_index);
            assert_eq!(*t_first as u64, 10_000 + u64::from(*first) * 1000);
            assert_eq!(*period, 1000);
            assert_eq!(counts, &vec![7; 5]);
            // Sent when the last sample of the batch is taken.
            assert_eq!(*t, u64::from(*t_first) + 4000);
            next_index += 5;
            batches += 1;
        }
    }
    assert_eq!(batches, 20);
    // Transmit seq increments by one per frame.
    for (i, (_, seq, _)) in io.frames.iter().enumerate() {
        assert_eq!(usize::from(*seq), i);
    }
    // The lever was sampled exactly at the sample times.
    assert_eq!(io.lever_queries.len(), 100);
    assert!(io.lever_queries.windows(2).all(|w| w[1] - w[0] == 1000));
    assert_eq!(d.status().next_sample_index, 100);
    // Re-configuring restarts at index 0.
    d.advance(199_999, &mut io);
    io.take();
    send(
        &mut d,
        &mut io,
        200_000,
        2,
        HostCommand::Configure(configure(2000, 1)),
    );
    d.advance(200_000, &mut io);
    let firsts: Vec<(u32, u32)> = io
        .take()
        .into_iter()
        .filter_map(|m| match m {
            Msg::Lever { first, t_first, .. } => Some((first, t_first)),
            _ => None,
        })
        .collect();
    assert_eq!(firsts, vec![(0, 200_000)]);
}

#[test]
fn next_deadline_is_the_batch_completion() {
    let (mut d, mut io) = boot(0);
    send(
        &mut d,
        &mut io,
        0,
        1,
        HostCommand::Configure(configure(1000, 10)),
    );
    assert_eq!(d.next_deadline(), 9_000);
    d.advance(9_000, &mut io);
    assert_eq!(d.next_deadline(), 19_000);
}

#[test]
fn exactly_one_ack_per_command_and_pong_for_ping() {
    let (mut d, mut io) = boot(0);
    let cmds = [
        HostCommand::Configure(configure(1000, 1)),
        HostCommand::HostHeartbeat,
        HostCommand::Tone(Tone {
            frequency_hz: 6000,
            duration_ms: 100,
            level_pct: 80,
        }),
        HostCommand::ToneOff,
        HostCommand::ValvePulse(ValvePulse { duration_us: 1000 }),
        HostCommand::ValveClose,
        HostCommand::ValveOpen(ValveOpen { max_ms: 10 }),
        HostCommand::ValveClose,
        HostCommand::SyncOut(SyncOut {
            mode: sync_mode::PULSE,
            nbits: 0,
            unit_us: 100,
            value: 5,
        }),
        HostCommand::ToneOff,
        HostCommand::Reset,
    ];
    for (i, c) in cmds.iter().enumerate() {
        send(&mut d, &mut io, 1000 * (i as u64 + 1), 500 + i as u16, *c);
    }
    send(&mut d, &mut io, 50_000, 999, HostCommand::Ping);
    let acks = io.acks();
    assert_eq!(acks.len(), cmds.len());
    for (i, (a, c)) in acks.iter().zip(&cmds).enumerate() {
        assert_eq!(a.acked_seq, 500 + i as u16);
        assert_eq!(a.acked_type, c.msg_type());
        assert_eq!(status_of(a), AckStatus::Ok, "{c:?}");
        assert_eq!(u64::from(a.t_us), 1000 * (i as u64 + 1));
    }
    let pongs: Vec<Pong> = io
        .frames
        .iter()
        .filter_map(|(_, _, m)| match m {
            Msg::Pong(p) => Some(*p),
            _ => None,
        })
        .collect();
    assert_eq!(
        pongs,
        vec![Pong {
            ping_seq: 999,
            t_rx_us: 50_000,
            t_tx_us: 50_000
        }]
    );
}

#[test]
fn valve_pulse_opens_for_exactly_its_duration() {
    let (mut d, mut io) = boot(0);
    send(
        &mut d,
        &mut io,
        0,
        1,
        HostCommand::Configure(configure(1000, 1)),
    );
    io.take();
    send(
        &mut d,
        &mut io,
        5_000,
        2,
        HostCommand::ValvePulse(ValvePulse {
            duration_us: 40_000,
        }),
    );
    assert_eq!(status_of(&io.acks()[0]), AckStatus::Ok);
    assert_ne!(d.status().state & state::VALVE_OPEN, 0);
    d.advance(100_000, &mut io);
    let ev: Vec<Event> = io
        .events()
        .into_iter()
        .filter(|e| {
            e.kind == u8::from(EventKind::ValveOpen) || e.kind == u8::from(EventKind::ValveClose)
        })
        .collect();
    assert_eq!(ev.len(), 2);
    assert_eq!((ev[0].t_us, ev[0].value), (5_000, 40_000));
    assert_eq!(
        (ev[1].t_us, ev[1].value, ev[1].aux),
        (45_000, 40_000, cause::COMPLETED)
    );
    assert_eq!(d.status().state & state::VALVE_OPEN, 0);
    assert_eq!(
        io.outputs,
        vec![
            (
                5_000,
                OutputChange::ValveOpen {
                    duration_us: 40_000
                }
            ),
            (
                45_000,
                OutputChange::ValveClose {
                    open_us: 40_000,
                    cause: cause::COMPLETED
                }
            ),
        ]
    );
}

#[test]
fn pulse_over_the_cap_is_refused_never_clamped() {
    let (mut d, mut io) = boot(0);
    send(
        &mut d,
        &mut io,
        0,
        1,
        HostCommand::Configure(configure(1000, 1)),
    );
    io.take();
    // Cap is 200 ms.
    send(
        &mut d,
        &mut io,
        1_000,
        2,
        HostCommand::ValvePulse(ValvePulse {
            duration_us: 200_001,
        }),
    );
    send(
        &mut d,
        &mut io,
        2_000,
        3,
        HostCommand::ValvePulse(ValvePulse { duration_us: 0 }),
    );
    let acks = io.acks();
    assert_eq!(status_of(&acks[0]), AckStatus::Refused);
    assert_eq!(status_of(&acks[1]), AckStatus::BadValue);
    d.advance(500_000, &mut io);
    assert!(io
        .events()
        .iter()
        .all(|e| e.kind != u8::from(EventKind::ValveOpen)));
    assert!(io.outputs.is_empty());
    // Exactly the cap is fine.
    send(
        &mut d,
        &mut io,
        600_000,
        4,
        HostCommand::ValvePulse(ValvePulse {
            duration_us: 200_000,
        }),
    );
    assert_eq!(status_of(&io.acks()[2]), AckStatus::Ok);
    // Before any Configure the cap is the hard cap.
    let (mut d, mut io) = boot(0);
    send(
        &mut d,
        &mut io,
        1,
        1,
        HostCommand::ValvePulse(ValvePulse {
            duration_us: 1_000_001,
        }),
    );
    send(
        &mut d,
        &mut io,
        2,
        2,
        HostCommand::ValvePulse(ValvePulse {
            duration_us: 1_000_000,
        }),
    );
    let acks = io.acks();
    assert_eq!(status_of(&acks[0]), AckStatus::Refused);
    assert_eq!(status_of(&acks[1]), AckStatus::Ok);
}

#[test]
fn valve_busy_while_open() {
    let (mut d, mut io) = boot(0);
    send(
        &mut d,
        &mut io,
        0,
        1,
        HostCommand::Configure(configure(1000, 1)),
    );
    send(
        &mut d,
        &mut io,
        1_000,
        2,
        HostCommand::ValvePulse(ValvePulse {
            duration_us: 50_000,
        }),
    );
    send(
        &mut d,
        &mut io,
        2_000,
        3,
        HostCommand::ValvePulse(ValvePulse {
            duration_us: 50_000,
        }),
    );
    send(
        &mut d,
        &mut io,
        3_000,
        4,
        HostCommand::ValveOpen(ValveOpen { max_ms: 10 }),
    );
    // Over the cap is refused even while busy.
    send(
        &mut d,
        &mut io,
        4_000,
        5,
        HostCommand::ValvePulse(ValvePulse {
            duration_us: 900_000,
        }),
    );
    let st: Vec<AckStatus> = io.acks().iter().map(status_of).collect();
    assert_eq!(
        st,
        vec![
            AckStatus::Ok,
            AckStatus::Ok,
            AckStatus::Busy,
            AckStatus::Busy,
            AckStatus::Refused
        ]
    );
    // After it closes, a new pulse is accepted.
    send(
        &mut d,
        &mut io,
        60_000,
        6,
        HostCommand::ValvePulse(ValvePulse { duration_us: 1_000 }),
    );
    assert_eq!(status_of(io.acks().last().expect("ack")), AckStatus::Ok);
}

#[test]
fn flush_is_capped_by_max_flush_and_by_the_hard_cap() {
    // max_flush_ms 500 cuts a 2 s flush.
    let (mut d, mut io) = boot(0);
    let c = Configure {
        max_flush_ms: 500,
        heartbeat_timeout_ms: 60_000,
        ..configure(1000, 1)
    };
    send(&mut d, &mut io, 0, 1, HostCommand::Configure(c));
    io.take();
    send(
        &mut d,
        &mut io,
        1_000,
        2,
        HostCommand::ValveOpen(ValveOpen { max_ms: 2000 }),
    );
    d.advance(3_000_000, &mut io);
    let close: Vec<Event> = io
        .events()
        .into_iter()
        .filter(|e| e.kind == u8::from(EventKind::ValveClose))
        .collect();
    assert_eq!(close.len(), 1);
    assert_eq!(
        (close[0].t_us, close[0].value, close[0].aux),
        (501_000, 500_000, cause::CAP)
    );
    let faults = io.faults();
    assert_eq!(faults.len(), 1);
    assert_eq!(FaultCode::from(faults[0].code), FaultCode::ValveCapTripped);
    assert_eq!(faults[0].detail, 500);
    let open: Vec<Event> = io
        .events()
        .into_iter()
        .filter(|e| e.kind == u8::from(EventKind::ValveOpen))
        .collect();
    assert_eq!(
        open[0].value, 0,
        "a flush reports 0 as its commanded duration"
    );

    // max_flush_ms 5000 above the hard cap (1000): the hard cap still cuts it.
    let (mut d, mut io) = boot(0);
    let c = Configure {
        heartbeat_timeout_ms: 60_000,
        ..configure(1000, 1)
    };
    send(&mut d, &mut io, 0, 1, HostCommand::Configure(c));
    send(
        &mut d,
        &mut io,
        0,
        2,
        HostCommand::ValveOpen(ValveOpen { max_ms: 5000 }),
    );
    d.advance(6_000_000, &mut io);
    let close: Vec<Event> = io
        .events()
        .into_iter()
        .filter(|e| e.kind == u8::from(EventKind::ValveClose))
        .collect();
    assert_eq!((close[0].t_us, close[0].aux), (1_000_000, cause::CAP));

    // A flush shorter than the cap completes (cause 0); ValveClose closes (cause 1).
    let (mut d, mut io) = boot(0);
    send(&mut d, &mut io, 0, 1, HostCommand::Configure(c));
    send(
        &mut d,
        &mut io,
        0,
        2,
        HostCommand::ValveOpen(ValveOpen { max_ms: 100 }),
    );
    d.advance(200_000, &mut io);
    send(
        &mut d,
        &mut io,
        300_000,
        3,
        HostCommand::ValveOpen(ValveOpen { max_ms: 0 }),
    );
    send(
        &mut d,
        &mut io,
        400_000,
        4,
        HostCommand::ValveOpen(ValveOpen { max_ms: 100 }),
    );
    send(&mut d, &mut io, 420_000, 5, HostCommand::ValveClose);
    let close: Vec<(u32, u32, u16)> = io
        .events()
        .into_iter()
        .filter(|e| e.kind == u8::from(EventKind::ValveClose))
        .map(|e| (e.t_us, e.value, e.aux))
        .collect();
    assert_eq!(
        close,
        vec![
            (100_000, 100_000, cause::COMPLETED),
            (420_000, 20_000, cause::COMMAND)
        ]
    );
    assert_eq!(status_of(&io.acks()[2]), AckStatus::BadValue);
}

#[test]
fn tone_on_off_and_restart() {
    let (mut d, mut io) = boot(0);
    let tone = Tone {
        frequency_hz: 6000,
        duration_ms: 100,
        level_pct: 80,
    };
    send(
        &mut d,
        &mut io,
        0,
        1,
        HostCommand::Configure(configure(1000, 1)),
    );
    send(&mut d, &mut io, 1_000, 2, HostCommand::Tone(tone));
    d.advance(200_000, &mut io);
    send(&mut d, &mut io, 300_000, 3, HostCommand::Tone(tone));
    send(&mut d, &mut io, 350_000, 4, HostCommand::Tone(tone)); // restart
    send(&mut d, &mut io, 400_000, 5, HostCommand::ToneOff);
    send(
        &mut d,
        &mut io,
        410_000,
        6,
        HostCommand::Tone(Tone {
            level_pct: 101,
            ..tone
        }),
    );
    send(
        &mut d,
        &mut io,
        420_000,
        7,
        HostCommand::Tone(Tone {
            duration_ms: 0,
            ..tone
        }),
    );
    let ev: Vec<(u32, u8, u16, u32)> = io
        .events()
        .into_iter()
        .map(|e| (e.t_us, e.kind, e.aux, e.value))
        .collect();
    let on = u8::from(EventKind::ToneOn);
    let off = u8::from(EventKind::ToneOff);
    assert_eq!(
        ev,
        vec![
            (1_000, on, 80, 6000),
            (101_000, off, cause::COMPLETED, 0),
            (300_000, on, 80, 6000),
            (350_000, off, cause::COMMAND, 0),
            (350_000, on, 80, 6000),
            (400_000, off, cause::COMMAND, 0),
        ]
    );
    let st: Vec<AckStatus> = io.acks().iter().map(status_of).collect();
    assert_eq!(st[5..], [AckStatus::BadValue, AckStatus::BadValue]);
}

#[test]
fn sync_out_pulse_and_bitcode() {
    let (mut d, mut io) = boot(0);
    send(
        &mut d,
        &mut io,
        0,
        1,
        HostCommand::Configure(configure(1000, 1)),
    );
    let bitcode = SyncOut {
        mode: sync_mode::BITCODE,
        nbits: 12,
        unit_us: 5000,
        value: 0xABC,
    };
    send(&mut d, &mut io, 10_000, 2, HostCommand::SyncOut(bitcode));
    send(&mut d, &mut io, 20_000, 3, HostCommand::SyncOut(bitcode));
    assert_ne!(d.status().state & state::SYNC_BUSY, 0);
    d.advance(200_000, &mut io);
    let pulse = SyncOut {
        mode: sync_mode::PULSE,
        nbits: 0,
        unit_us: 1000,
        value: 7,
    };
    send(&mut d, &mut io, 300_000, 4, HostCommand::SyncOut(pulse));
    d.advance(400_000, &mut io);
    for bad in [
        SyncOut { mode: 2, ..pulse },
        SyncOut {
            unit_us: 0,
            ..pulse
        },
        SyncOut {
            nbits: 0,
            ..bitcode
        },
        SyncOut {
            nbits: 33,
            ..bitcode
        },
    ] {
        send(&mut d, &mut io, 500_000, 9, HostCommand::SyncOut(bad));
    }
    let st: Vec<AckStatus> = io.acks().iter().map(status_of).collect();
    assert_eq!(
        st[1..],
        [
            AckStatus::Ok,
            AckStatus::Busy,
            AckStatus::Ok,
            AckStatus::BadValue,
            AckStatus::BadValue,
            AckStatus::BadValue,
            AckStatus::BadValue
        ]
    );
    let ev: Vec<(u32, u8, u32)> = io
        .events()
        .into_iter()
        .map(|e| (e.t_us, e.kind, e.value))
        .collect();
    let start = u8::from(EventKind::SyncOutStart);
    let end = u8::from(EventKind::SyncOutEnd);
    // 12 bits of 5 ms: 26 units = 130 ms.
    assert_eq!(
        ev,
        vec![
            (10_000, start, 0xABC),
            (140_000, end, 0xABC),
            (300_000, start, 7),
            (301_000, end, 7)
        ]
    );
}

#[test]
fn watchdog_trips_then_clears_on_the_next_frame() {
    let (mut d, mut io) = boot(0);
    send(
        &mut d,
        &mut io,
        0,
        1,
        HostCommand::Configure(configure(1000, 10)),
    );
    send(
        &mut d,
        &mut io,
        100_000,
        2,
        HostCommand::ValveOpen(ValveOpen { max_ms: 4000 }),
    );
    send(
        &mut d,
        &mut io,
        100_000,
        3,
        HostCommand::Tone(Tone {
            frequency_hz: 6000,
            duration_ms: 5000,
            level_pct: 50,
        }),
    );
    io.take();
    // Timeout 500 ms after the last frame at 100 ms.
    d.advance(599_999, &mut io);
    assert!(io.events().is_empty());
    d.advance(700_000, &mut io);
    let ev: Vec<(u32, u8, u16, u32)> = io
        .events()
        .into_iter()
        .map(|e| (e.t_us, e.kind, e.aux, e.value))
        .collect();
    assert_eq!(
        ev,
        vec![
            (
                600_000,
                u8::from(EventKind::ValveClose),
                cause::WATCHDOG,
                500_000
            ),
            (600_000, u8::from(EventKind::ToneOff), cause::WATCHDOG, 0),
            (
                600_000,
                u8::from(EventKind::SafeState),
                cause::WATCHDOG,
                500
            ),
        ]
    );
    let f = io.faults();
    assert_eq!(f.len(), 1);
    assert_eq!(
        (FaultCode::from(f[0].code), f[0].detail),
        (FaultCode::WatchdogTripped, 500)
    );
    assert_ne!(d.status().state & state::SAFE, 0);
    // The lever stream goes on.
    d.advance(2_000_000, &mut io);
    let lever = io
        .take()
        .into_iter()
        .filter(|m| matches!(m, Msg::Lever { .. }))
        .count();
    assert!(lever >= 190, "{lever}");
    // It trips once, not again while safe.
    assert!(io.faults().is_empty());
    // The next valid frame clears it and is executed.
    d.advance(2_500_000, &mut io);
    io.take();
    send(
        &mut d,
        &mut io,
        2_500_000,
        4,
        HostCommand::ValvePulse(ValvePulse { duration_us: 1000 }),
    );
    let msgs = io.take();
    assert!(
        matches!(msgs[0], Msg::Event(Event { kind: 11, .. })),
        "{msgs:?}"
    );
    assert!(
        matches!(
            msgs[1],
            Msg::Ack(Ack {
                acked_seq: 4,
                status: 0,
                ..
            })
        ),
        "{msgs:?}"
    );
    assert!(
        matches!(msgs[2], Msg::Event(Event { kind: 4, .. })),
        "{msgs:?}"
    );
    assert_eq!(d.status().state & state::SAFE, 0);
}

#[test]
fn watchdog_before_configure_is_one_second() {
    let (mut d, mut io) = boot(0);
    d.advance(999_999, &mut io);
    assert!(io.faults().is_empty());
    d.advance(1_000_000, &mut io);
    assert_eq!(io.faults().len(), 1);
    // A bad frame is not a valid host frame: it does not clear the safe state.
    d.receive(1_100_000, &[0x12, 0x34, 0x56, 0x00], &mut io);
    assert_ne!(d.status().state & state::SAFE, 0);
}

#[test]
fn heartbeats_carry_state_and_counters() {
    let (mut d, mut io) = boot(0);
    d.advance(1_000_000, &mut io);
    let hbs = |io: &TestIo| -> Vec<Heartbeat> {
        io.frames
            .iter()
            .filter_map(|(_, _, m)| match m {
                Msg::Heartbeat(h) => Some(*h),
                _ => None,
            })
            .collect()
    };
    // 1000 ms before the first Configure.
    assert_eq!(hbs(&io).len(), 1);
    assert_eq!(hbs(&io)[0].t_us, 1_000_000);
    io.take();
    send(
        &mut d,
        &mut io,
        1_200_000,
        1,
        HostCommand::Configure(configure(1000, 1)),
    );
    d.receive(1_250_000, &[0x05, 0x01, 0x02, 0x00], &mut io); // one bad frame
    send(
        &mut d,
        &mut io,
        1_250_000,
        2,
        HostCommand::ValvePulse(ValvePulse {
            duration_us: 100_000,
        }),
    );
    d.advance(1_500_000, &mut io);
    let h = hbs(&io);
    // Every 100 ms after the Configure.
    assert_eq!(
        h.iter().map(|h| h.t_us).collect::<Vec<_>>(),
        vec![1_300_000, 1_400_000, 1_500_000]
    );
    assert_eq!(h[0].state, state::STREAMING | state::VALVE_OPEN);
    assert_eq!(h[0].next_sample_index, 101);
    assert_eq!(h[0].rx_frames_bad, 1);
    assert_eq!(h[2].state, state::STREAMING);
    let f: Vec<Fault> = io
        .faults()
        .into_iter()
        .filter(|f| FaultCode::from(f.code) == FaultCode::RxFrameBad)
        .collect();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].detail, 1);
}

#[test]
fn reset_acks_then_hello_and_stops_everything() {
    let (mut d, mut io) = boot(0);
    send(
        &mut d,
        &mut io,
        0,
        1,
        HostCommand::Configure(configure(1000, 1)),
    );
    send(
        &mut d,
        &mut io,
        1_000,
        2,
        HostCommand::ValvePulse(ValvePulse {
            duration_us: 100_000,
        }),
    );
    d.advance(10_000, &mut io);
    io.take();
    send(&mut d, &mut io, 10_000, 3, HostCommand::Reset);
    let msgs = io.take();
    assert!(
        matches!(
            msgs[0],
            Msg::Ack(Ack {
                acked_seq: 3,
                status: 0,
                ..
            })
        ),
        "{msgs:?}"
    );
    assert!(
        matches!(
            msgs[1],
            Msg::Event(Event {
                kind: 5,
                aux: cause::RESET,
                value: 9_000,
                ..
            })
        ),
        "{msgs:?}"
    );
    assert!(
        matches!(msgs[2], Msg::Hello(Hello { t_us: 10_000, .. })),
        "{msgs:?}"
    );
    assert_eq!(msgs.len(), 3);
    assert_eq!(d.status().state, 0);
    d.advance(500_000, &mut io);
    assert!(io
        .frames
        .iter()
        .all(|(_, _, m)| !matches!(m, Msg::Lever { .. })));
    // Back to boot limits: heartbeat every 1000 ms from the Reset.
    d.advance(1_010_000, &mut io);
    let hb: Vec<u32> = io
        .frames
        .iter()
        .filter_map(|(_, _, m)| match m {
            Msg::Heartbeat(h) => Some(h.t_us),
            _ => None,
        })
        .collect();
    assert_eq!(hb, vec![1_010_000]);
}

#[test]
fn bad_length_unknown_command_and_device_frames() {
    let (mut d, mut io) = boot(0);
    io.take();
    // ValvePulse with a 2-byte body.
    d.receive(1_000, &raw_frame(0x85, 7, &[1, 2]), &mut io);
    // Unknown host type.
    d.receive(2_000, &raw_frame(0xF0, 8, &[]), &mut io);
    // A longer body than defined is accepted.
    d.receive(
        3_000,
        &raw_frame(0x85, 9, &[0x10, 0x27, 0, 0, 0xEE, 0xEE]),
        &mut io,
    );
    // A device-type frame (an echo) is ignored: no Ack.
    d.receive(4_000, &raw_frame(0x05, 10, &[0; 8]), &mut io);
    let acks: Vec<(u16, u8, AckStatus)> = io
        .acks()
        .iter()
        .map(|a| (a.acked_seq, a.acked_type, status_of(a)))
        .collect();
    assert_eq!(
        acks,
        vec![
            (7, 0x85, AckStatus::BadLength),
            (8, 0xF0, AckStatus::UnknownCommand),
            (9, 0x85, AckStatus::Ok)
        ]
    );
    // A frame with a bad CRC is counted, not acknowledged.
    let mut f = raw_frame(0x89, 11, &[]);
    f[2] ^= 0x40;
    d.receive(5_000, &f, &mut io);
    assert_eq!(io.acks().len(), 3);
    assert_eq!(d.status().rx_frames_bad, 1);
    // Bytes split across deliveries still form one frame.
    let f = raw_frame(0x89, 12, &[]);
    d.receive(6_000, &f[..3], &mut io);
    d.receive(7_000, &f[3..], &mut io);
    let last = *io.acks().last().expect("ack");
    assert_eq!((last.acked_seq, last.t_us), (12, 7_000));
}

#[test]
fn dropped_frames_are_counted_and_reported() {
    let (mut d, mut io) = boot(0);
    send(
        &mut d,
        &mut io,
        0,
        1,
        HostCommand::Configure(Configure {
            heartbeat_timeout_ms: 60_000,
            ..configure(1000, 5)
        }),
    );
    d.advance(49_999, &mut io);
    let seq_before = d.status().tx_seq;
    io.take();
    io.room = false;
    d.advance(149_999, &mut io); // 20 batches, 100 samples, 1 heartbeat at 100 ms
    assert!(io.frames.is_empty());
    let st = d.status();
    assert_eq!(st.samples_dropped, 100);
    assert_eq!(st.tx_frames_dropped, 21);
    assert_eq!(st.tx_seq, seq_before, "dropped frames use no seq");
    io.room = true;
    d.advance(154_999, &mut io);
    let msgs = io.take();
    assert!(
        matches!(
            msgs[0],
            Msg::Fault(Fault {
                code: 1,
                detail: 100,
                ..
            })
        ),
        "{msgs:?}"
    );
    assert!(
        matches!(
            msgs[1],
            Msg::Fault(Fault {
                code: 5,
                detail: 21,
                ..
            })
        ),
        "{msgs:?}"
    );
    // Then the stream goes on, with the gap visible in the indices.
    assert!(matches!(msgs[2], Msg::Lever { first: 150, .. }), "{msgs:?}");
    assert_eq!(msgs.len(), 3);
}

#[test]
fn lick_and_frame_ttl_events_count_since_boot() {
    let (mut d, mut io) = boot(0);
    io.take();
    d.input(1_000, DigitalInput::LickOn, &mut io);
    d.input(41_000, DigitalInput::LickOff, &mut io);
    d.input(150_000, DigitalInput::LickOn, &mut io);
    d.input(34_843, DigitalInput::FrameTtl, &mut io); // out of order: stamped at now
    d.input(200_000, DigitalInput::FrameTtl, &mut io);
    let ev: Vec<(u32, u8, u32)> = io
        .events()
        .into_iter()
        .map(|e| (e.t_us, e.kind, e.value))
        .collect();
    assert_eq!(
        ev,
        vec![
            (1_000, 1, 1),
            (41_000, 2, 1),
            (150_000, 1, 2),
            (150_000, 3, 1),
            (200_000, 3, 2)
        ]
    );
}

#[test]
fn timestamps_wrap_with_the_32_bit_counter() {
    let start = (1u64 << 32) - 2_500;
    let (mut d, mut io) = boot(start);
    send(
        &mut d,
        &mut io,
        start,
        1,
        HostCommand::Configure(configure(1000, 2)),
    );
    d.advance(start + 5_999, &mut io);
    let batches: Vec<(u32, u32)> = io
        .frames
        .iter()
        .filter_map(|(_, _, m)| match m {
            Msg::Lever { first, t_first, .. } => Some((*first, *t_first)),
            _ => None,
        })
        .collect();
    assert_eq!(
        batches,
        vec![(0, u32::MAX - 2_499), (2, u32::MAX - 499), (4, 1_500)]
    );
}

// ---------------------------------------------------------------- armed reward

mod armed {
    use super::*;
    use protocol::serial::{direction, disarm_reason, ArmReward, Disarm, RewardEnded, RewardFired};

    const T0: u64 = 1_000_000;

    fn arm_cmd(tag: u32, window_end_us: u32, pulse_us: u32) -> ArmReward {
        ArmReward {
            trial_tag: tag,
            rest_counts: 7,
            threshold_counts: 100,
            rearm_counts: 60,
            direction: direction::UP,
            window_end_us,
            pulse_us,
        }
    }

    /// A device streaming at 1 kHz, one sample a batch, lever at rest (7).
    fn streaming() -> (Device, TestIo) {
        let (mut d, mut io) = boot(T0);
        send(
            &mut d,
            &mut io,
            T0,
            1,
            HostCommand::Configure(configure(1000, 1)),
        );
        d.advance(T0 + 10_000, &mut io);
        io.take();
        (d, io)
    }

    fn fired(io: &TestIo) -> Vec<RewardFired> {
        io.frames
            .iter()
            .filter_map(|(_, _, m)| match m {
                Msg::RewardFired(r) => Some(*r),
                _ => None,
            })
            .collect()
    }

    fn ended(io: &TestIo) -> Vec<RewardEnded> {
        io.frames
            .iter()
            .filter_map(|(_, _, m)| match m {
                Msg::RewardEnded(r) => Some(*r),
                _ => None,
            })
            .collect()
    }

    fn valve_opens(io: &TestIo) -> Vec<u64> {
        io.outputs
            .iter()
            .filter(|(_, o)| matches!(o, OutputChange::ValveOpen { .. }))
            .map(|(t, _)| *t)
            .collect()
    }

    #[test]
    fn the_crossing_sample_opens_the_valve_once_per_arm() {
        let (mut d, mut io) = streaming();
        let t = T0 + 10_000;
        send(
            &mut d,
            &mut io,
            t,
            2,
            HostCommand::ArmReward(arm_cmd(5, (t + 500_000) as u32, 40_000)),
        );
        assert_eq!(status_of(&io.acks()[0]), AckStatus::Ok);
        d.advance(t + 20_000, &mut io);
        assert!(fired(&io).is_empty(), "no crossing, no reward");
        // The lever crosses (7 + 100): the next sample fires.
        io.lever = 107;
        d.advance(t + 20_500, &mut io);
        d.advance(t + 21_000, &mut io);
        let f = fired(&io);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].trial_tag, 5);
        assert_eq!(
            u64::from(f[0].t_cross_us),
            t + 21_000,
            "the first sample at or after the crossing"
        );
        assert_eq!(f[0].counts, 107);
        assert_eq!(f[0].pulse_us, 40_000);
        // The sample that fired is the one the stream carries at that index.
        let sample_t: Vec<u64> = io
            .frames
            .iter()
            .filter_map(|(_, _, m)| match m {
                Msg::Lever {
                    first,
                    t_first,
                    counts,
                    ..
                } if *first == f[0].sample_index => {
                    assert_eq!(counts[0], 107);
                    Some(u64::from(*t_first))
                }
                _ => None,
            })
            .collect();
        assert_eq!(sample_t, vec![t + 21_000]);
        assert_eq!(valve_opens(&io), vec![t + 21_000]);
        let ev = io.events();
        assert!(ev
            .iter()
            .any(|e| e.kind == u8::from(EventKind::ValveOpen) && e.value == 40_000));
        // Down and up again within the window: the arm is spent.
        io.lever = 7;
        d.advance(t + 100_000, &mut io);
        io.lever = 200;
        d.advance(t + 200_000, &mut io);
        assert_eq!(fired(&io).len(), 1, "one firing per arm");
        assert_eq!(valve_opens(&io).len(), 1);
        assert!(ended(&io).is_empty(), "a fired arm has no RewardEnded");
        let closes: Vec<_> = io
            .outputs
            .iter()
            .filter_map(|(t, o)| match o {
                OutputChange::ValveClose { open_us, .. } => Some((*t, *open_us)),
                _ => None,
            })
            .collect();
        assert_eq!(closes, vec![(t + 61_000, 40_000)]);
    }

    #[test]
    fn the_window_end_expires_the_arm_and_nothing_fires_late() {
        let (mut d, mut io) = streaming();
        let t = T0 + 10_000;
        send(
            &mut d,
            &mut io,
            t,
            2,
            HostCommand::ArmReward(arm_cmd(9, (t + 30_000) as u32, 40_000)),
        );
        // The lever crosses exactly at the window's end: too late.
        d.advance(t + 29_999, &mut io);
        io.lever = 300;
        d.advance(t + 60_000, &mut io);
        assert!(fired(&io).is_empty());
        assert!(valve_opens(&io).is_empty());
        let e = ended(&io);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].reason, disarm_reason::EXPIRED);
        assert_eq!(u64::from(e[0].t_us), t + 30_000);
        assert_eq!(e[0].trial_tag, 9);
    }

    #[test]
    fn a_lever_already_past_the_threshold_must_come_back_first() {
        let (mut d, mut io) = streaming();
        io.lever = 150;
        d.advance(T0 + 20_000, &mut io);
        let t = T0 + 20_000;
        send(
            &mut d,
            &mut io,
            t,
            2,
            HostCommand::ArmReward(arm_cmd(1, (t + 500_000) as u32, 40_000)),
        );
        d.advance(t + 50_000, &mut io);
        assert!(
            fired(&io).is_empty(),
            "held past the threshold: not a crossing"
        );
        io.lever = 60; // 53 from rest: below the re-arm point (60)
        d.advance(t + 60_000, &mut io);
        io.lever = 120;
        d.advance(t + 70_000, &mut io);
        assert_eq!(fired(&io).len(), 1);
        assert_eq!(u64::from(fired(&io)[0].t_cross_us), t + 61_000);
    }

    #[test]
    fn the_watchdog_disarms_and_a_later_crossing_never_opens_the_valve() {
        let (mut d, mut io) = streaming();
        let t = T0 + 10_000;
        send(
            &mut d,
            &mut io,
            t,
            2,
            HostCommand::ArmReward(arm_cmd(3, (t + 2_000_000) as u32, 40_000)),
        );
        // The host goes silent: the watchdog (500 ms) trips before the crossing.
        d.advance(t + 600_000, &mut io);
        io.lever = 500;
        d.advance(t + 1_900_000, &mut io);
        assert!(fired(&io).is_empty());
        assert!(valve_opens(&io).is_empty());
        let e = ended(&io);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].reason, disarm_reason::WATCHDOG);
        assert_eq!(u64::from(e[0].t_us), t + 500_000);
    }

    #[test]
    fn disarm_reset_and_configure_end_the_arm() {
        let (mut d, mut io) = streaming();
        let t = T0 + 10_000;
        let end = (t + 500_000) as u32;
        send(
            &mut d,
            &mut io,
            t,
            2,
            HostCommand::ArmReward(arm_cmd(3, end, 40_000)),
        );
        send(
            &mut d,
            &mut io,
            t + 1000,
            3,
            HostCommand::Disarm(Disarm { trial_tag: 4 }),
        );
        assert!(ended(&io).is_empty(), "another tag: nothing");
        send(
            &mut d,
            &mut io,
            t + 2000,
            4,
            HostCommand::Disarm(Disarm { trial_tag: 3 }),
        );
        send(
            &mut d,
            &mut io,
            t + 3000,
            5,
            HostCommand::ArmReward(arm_cmd(6, end, 40_000)),
        );
        send(
            &mut d,
            &mut io,
            t + 4000,
            6,
            HostCommand::Configure(configure(1000, 1)),
        );
        send(
            &mut d,
            &mut io,
            t + 5000,
            7,
            HostCommand::ArmReward(arm_cmd(7, end, 40_000)),
        );
        send(&mut d, &mut io, t + 6000, 8, HostCommand::Reset);
        let reasons: Vec<(u32, u8)> = ended(&io).iter().map(|e| (e.trial_tag, e.reason)).collect();
        assert_eq!(
            reasons,
            vec![
                (3, disarm_reason::HOST),
                (6, disarm_reason::CONFIGURE),
                (7, disarm_reason::RESET)
            ]
        );
        assert!(io.acks().iter().all(|a| status_of(a) == AckStatus::Ok));
    }

    #[test]
    fn bad_arms_are_refused_with_the_right_status() {
        let (mut d, mut io) = boot(T0);
        let t = T0 + 1000;
        let end = (t + 500_000) as u32;
        // Not streaming: nothing to decide on.
        send(
            &mut d,
            &mut io,
            t,
            1,
            HostCommand::ArmReward(arm_cmd(1, end, 40_000)),
        );
        send(
            &mut d,
            &mut io,
            t,
            2,
            HostCommand::Configure(configure(1000, 1)),
        );
        // Over the pulse cap (200 ms): refused, never clamped.
        send(
            &mut d,
            &mut io,
            t,
            3,
            HostCommand::ArmReward(arm_cmd(1, end, 200_001)),
        );
        let mut bad = arm_cmd(1, end, 40_000);
        bad.rearm_counts = 100;
        send(&mut d, &mut io, t, 4, HostCommand::ArmReward(bad));
        send(
            &mut d,
            &mut io,
            t,
            5,
            HostCommand::ArmReward(arm_cmd(1, t as u32, 40_000)),
        );
        send(
            &mut d,
            &mut io,
            t,
            6,
            HostCommand::ArmReward(arm_cmd(1, end, 0)),
        );
        send(
            &mut d,
            &mut io,
            t,
            7,
            HostCommand::ArmReward(arm_cmd(1, end, 40_000)),
        );
        send(
            &mut d,
            &mut io,
            t,
            8,
            HostCommand::ArmReward(arm_cmd(2, end, 40_000)),
        );
        let got: Vec<(u16, AckStatus)> = io
            .acks()
            .iter()
            .map(|a| (a.acked_seq, status_of(a)))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, AckStatus::Refused),
                (2, AckStatus::Ok),
                (3, AckStatus::Refused),
                (4, AckStatus::BadValue),
                (5, AckStatus::BadValue),
                (6, AckStatus::BadValue),
                (7, AckStatus::Ok),
                (8, AckStatus::Busy),
            ]
        );
    }
}

#[test]
fn disarm_of_the_last_arm_repeats_its_report() {
    use protocol::serial::{direction, ArmReward, Disarm};
    let (mut d, mut io) = boot(1_000_000);
    send(
        &mut d,
        &mut io,
        1_000_000,
        1,
        HostCommand::Configure(configure(1000, 1)),
    );
    d.advance(1_010_000, &mut io);
    let arm = ArmReward {
        trial_tag: 11,
        rest_counts: 7,
        threshold_counts: 50,
        rearm_counts: 20,
        direction: direction::UP,
        window_end_us: 1_500_000,
        pulse_us: 10_000,
    };
    send(&mut d, &mut io, 1_010_000, 2, HostCommand::ArmReward(arm));
    io.lever = 100;
    d.advance(1_020_000, &mut io);
    io.take();
    // The host lost the link and asks: the report comes again, once.
    send(
        &mut d,
        &mut io,
        1_100_000,
        3,
        HostCommand::Disarm(Disarm { trial_tag: 11 }),
    );
    let again: Vec<_> = io
        .take()
        .into_iter()
        .filter_map(|m| match m {
            Msg::RewardFired(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].trial_tag, 11);
    assert_eq!(u64::from(again[0].t_cross_us), 1_011_000);
    // Another tag: nothing.
    send(
        &mut d,
        &mut io,
        1_100_000,
        4,
        HostCommand::Disarm(Disarm { trial_tag: 12 }),
    );
    assert!(!io
        .take()
        .iter()
        .any(|m| matches!(m, Msg::RewardFired(_) | Msg::RewardEnded(_))));
}
