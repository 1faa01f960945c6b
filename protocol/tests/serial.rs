//! Serial framing: round trips, golden byte vectors, and the decoder's
//! behaviour on corrupted streams.

use proptest::prelude::*;
use protocol::serial::*;

/// One value of every message type, with every field set to something
/// recognisable. The golden vectors are these, encoded.
fn device_specimens() -> Vec<(&'static str, u16, DeviceMessage<'static>)> {
    vec![
        (
            "hello",
            0,
            DeviceMessage::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                firmware_major: 1,
                firmware_minor: 2,
                firmware_patch: 3,
                device_id: 0x0123_4567_89AB_CDEF,
                clock_hz: 1_000_000,
                capabilities: capability::LEVER
                    | capability::LICK
                    | capability::VALVE
                    | capability::TONE
                    | capability::FRAME_TTL
                    | capability::SYNC_OUT,
                max_sample_rate_hz: 10_000,
                hard_max_valve_open_ms: 1000,
                t_us: 12_345,
            }),
        ),
        (
            "event_lick_on",
            2,
            DeviceMessage::Event(Event {
                t_us: 4_000_000_000,
                kind: EventKind::LickOn.into(),
                aux: 0,
                value: 17,
            }),
        ),
        (
            "event_valve_close_cap",
            3,
            DeviceMessage::Event(Event {
                t_us: 100,
                kind: EventKind::ValveClose.into(),
                aux: cause::CAP,
                value: 200_000,
            }),
        ),
        (
            "event_frame_ttl",
            0xFFFF,
            DeviceMessage::Event(Event {
                t_us: 0xFFFF_FFFF,
                kind: EventKind::FrameTtl.into(),
                aux: 0,
                value: 28_700,
            }),
        ),
        (
            "pong",
            4,
            DeviceMessage::Pong(Pong {
                ping_seq: 0x1234,
                t_rx_us: 1_000_000,
                t_tx_us: 1_000_012,
            }),
        ),
        (
            "ack_ok",
            5,
            DeviceMessage::Ack(Ack {
                acked_seq: 0xABCD,
                acked_type: host_type::VALVE_PULSE,
                status: AckStatus::Ok.into(),
                t_us: 2_000_000,
            }),
        ),
        (
            "ack_refused",
            6,
            DeviceMessage::Ack(Ack {
                acked_seq: 7,
                acked_type: host_type::VALVE_PULSE,
                status: AckStatus::Refused.into(),
                t_us: 2_000_001,
            }),
        ),
        (
            "fault",
            7,
            DeviceMessage::Fault(Fault {
                t_us: 3_000_000,
                code: FaultCode::SamplesDropped.into(),
                detail: 42,
            }),
        ),
        (
            "heartbeat",
            8,
            DeviceMessage::Heartbeat(Heartbeat {
                t_us: 5_000_000,
                state: state::STREAMING | state::VALVE_OPEN,
                next_sample_index: 5000,
                samples_dropped: 1,
                rx_frames_bad: 2,
                tx_frames_dropped: 3,
            }),
        ),
        (
            "reward_fired",
            9,
            DeviceMessage::RewardFired(RewardFired {
                trial_tag: 42,
                sample_index: 123_456,
                t_cross_us: 4_000_000_017,
                t_valve_us: 4_000_000_029,
                counts: -1234,
                pulse_us: 38_095,
            }),
        ),
        (
            "reward_ended_expired",
            10,
            DeviceMessage::RewardEnded(RewardEnded {
                trial_tag: 43,
                t_us: 7_000_000,
                reason: disarm_reason::EXPIRED,
                next_sample_index: 7000,
            }),
        ),
    ]
}

fn host_specimens() -> Vec<(&'static str, u16, HostCommand)> {
    vec![
        ("ping", 100, HostCommand::Ping),
        (
            "configure",
            101,
            HostCommand::Configure(Configure {
                sample_rate_hz: 1000,
                samples_per_batch: 1,
                heartbeat_interval_ms: 100,
                heartbeat_timeout_ms: 500,
                max_valve_open_ms: 200,
                max_flush_ms: 5000,
            }),
        ),
        (
            "tone",
            102,
            HostCommand::Tone(Tone {
                frequency_hz: 6000,
                duration_ms: 1000,
                level_pct: 80,
            }),
        ),
        ("tone_off", 103, HostCommand::ToneOff),
        (
            "valve_pulse",
            104,
            HostCommand::ValvePulse(ValvePulse {
                duration_us: 38_095,
            }),
        ),
        (
            "valve_open",
            105,
            HostCommand::ValveOpen(ValveOpen { max_ms: 3000 }),
        ),
        ("valve_close", 106, HostCommand::ValveClose),
        (
            "sync_out_bitcode",
            107,
            HostCommand::SyncOut(SyncOut {
                mode: sync_mode::BITCODE,
                nbits: 12,
                unit_us: 5000,
                value: 0x0ABC,
            }),
        ),
        ("host_heartbeat", 0, HostCommand::HostHeartbeat),
        (
            "arm_reward",
            108,
            HostCommand::ArmReward(ArmReward {
                trial_tag: 42,
                rest_counts: -250,
                threshold_counts: 120,
                rearm_counts: 80,
                direction: direction::UP,
                window_end_us: 4_000_500_000,
                pulse_us: 38_095,
            }),
        ),
        ("disarm", 109, HostCommand::Disarm(Disarm { trial_tag: 42 })),
        ("reset", 0xFFFF, HostCommand::Reset),
    ]
}

const LEVER_COUNTS: [i32; 5] = [0, 1, -1, i32::MAX, i32::MIN];

fn encode_device(msg: &DeviceMessage<'_>, seq: u16) -> Vec<u8> {
    let mut out = [0u8; MAX_WIRE_FRAME];
    let n = msg.encode(seq, &mut out).expect("specimen encodes");
    out[..n].to_vec()
}

fn encode_host(cmd: &HostCommand, seq: u16) -> Vec<u8> {
    let mut out = [0u8; MAX_WIRE_FRAME];
    let n = cmd.encode(seq, &mut out).expect("specimen encodes");
    out[..n].to_vec()
}

fn encode_lever(seq: u16, first: u32, t: u32, period: u16, counts: &[i32]) -> Vec<u8> {
    let mut out = [0u8; MAX_WIRE_FRAME];
    let n = encode_lever_samples(seq, first, t, period, counts, &mut out).expect("batch encodes");
    out[..n].to_vec()
}

/// Decode a whole byte stream into owned (type, seq, body) triples.
fn decode_all(bytes: &[u8]) -> (Vec<(u8, u16, Vec<u8>)>, DecoderStats) {
    let mut dec = Decoder::new();
    let mut frames = Vec::new();
    dec.feed(bytes, |f| frames.push((f.msg_type, f.seq, f.body.to_vec())));
    (frames, dec.stats())
}

fn decode_one(bytes: &[u8]) -> (u8, u16, Vec<u8>) {
    let (mut frames, stats) = decode_all(bytes);
    assert_eq!(
        frames.len(),
        1,
        "exactly one frame from {bytes:02x?}: {stats:?}"
    );
    frames.remove(0)
}

#[test]
fn every_device_message_round_trips() {
    for (name, seq, msg) in device_specimens() {
        let wire = encode_device(&msg, seq);
        assert_eq!(
            wire.last(),
            Some(&0),
            "{name}: frame ends with the delimiter"
        );
        assert_eq!(
            wire.first(),
            Some(&0),
            "{name}: frame starts with a delimiter"
        );
        assert!(
            !wire[1..wire.len() - 1].contains(&0),
            "{name}: no zero inside"
        );
        let (ty, got_seq, body) = decode_one(&wire);
        assert_eq!(got_seq, seq, "{name}");
        let back = DeviceMessage::parse(ty, &body).expect("parses");
        assert_eq!(back, msg, "{name}");
        assert!(
            HostCommand::parse(ty, &body).is_err(),
            "{name} is not a host command"
        );
    }
}

#[test]
fn every_host_command_round_trips() {
    for (name, seq, cmd) in host_specimens() {
        let wire = encode_host(&cmd, seq);
        let (ty, got_seq, body) = decode_one(&wire);
        assert_eq!(got_seq, seq, "{name}");
        assert_eq!(HostCommand::parse(ty, &body), Ok(cmd), "{name}");
        assert!(
            DeviceMessage::parse(ty, &body).is_err(),
            "{name} is not a device message"
        );
    }
}

#[test]
fn lever_samples_round_trip() {
    for n in 1..=MAX_SAMPLES_PER_BATCH {
        let counts: Vec<i32> = (0..n as i32).map(|i| i * 1000 - 7).collect();
        let wire = encode_lever(9, u32::MAX - 2, u32::MAX - 150, 100, &counts);
        let (ty, seq, body) = decode_one(&wire);
        assert_eq!(seq, 9);
        let DeviceMessage::LeverSamples(batch) = DeviceMessage::parse(ty, &body).expect("parses")
        else {
            panic!("not a lever batch");
        };
        assert_eq!(batch.len(), n);
        let samples: Vec<_> = batch.iter().collect();
        for (i, (index, t_us, c)) in samples.iter().enumerate() {
            assert_eq!(*index, (u32::MAX - 2).wrapping_add(i as u32), "index wraps");
            assert_eq!(
                *t_us,
                (u32::MAX - 150).wrapping_add(100 * i as u32),
                "time wraps"
            );
            assert_eq!(*c, counts[i]);
        }
        // Re-encoding the decoded batch gives the same bytes.
        assert_eq!(encode_device(&DeviceMessage::LeverSamples(batch), 9), wire);
    }
    let mut out = [0u8; MAX_WIRE_FRAME];
    assert!(encode_lever_samples(0, 0, 0, 100, &[], &mut out).is_err());
    assert!(encode_lever_samples(0, 0, 0, 100, &[0; MAX_SAMPLES_PER_BATCH + 1], &mut out).is_err());
}

#[test]
fn short_bodies_are_refused_and_long_ones_tolerated() {
    for (name, _, msg) in device_specimens() {
        let wire = encode_device(&msg, 1);
        let (ty, _, body) = decode_one(&wire);
        let short = &body[..body.len() - 1];
        assert!(
            matches!(
                DeviceMessage::parse(ty, short),
                Err(ParseError::TooShort { .. })
            ),
            "{name}"
        );
        let mut long = body.clone();
        long.extend_from_slice(&[0xEE; 3]);
        assert_eq!(
            DeviceMessage::parse(ty, &long),
            Ok(msg),
            "{name}: appended fields ignored"
        );
    }
    assert_eq!(
        DeviceMessage::parse(0x7F, &[]),
        Err(ParseError::UnknownType(0x7F))
    );
    assert_eq!(
        HostCommand::parse(0xFE, &[]),
        Err(ParseError::UnknownType(0xFE))
    );
}

#[test]
fn encode_refuses_a_small_buffer() {
    let mut out = [0u8; 8];
    assert!(matches!(
        HostCommand::Ping.encode(0, &mut out),
        Err(EncodeError::BufferTooSmall { .. })
    ));
}

// ---------------------------------------------------------------- golden vectors

/// `k=v;k=v` from a struct's Debug output, for the vectors file.
fn fields_of(debug: &str) -> String {
    let inner = match (debug.find('{'), debug.rfind('}')) {
        (Some(a), Some(b)) => &debug[a + 1..b],
        _ => "",
    };
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|kv| kv.replacen(": ", "=", 1))
        .collect::<Vec<_>>()
        .join(";")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn golden_table() -> String {
    let mut s = String::from(
        "# Golden frames of the rig serial protocol, version 2. Generated by\n\
         # protocol/tests/serial.rs (UPDATE_VECTORS=1 cargo test -p protocol --test serial);\n\
         # the firmware's host-side tests decode and re-encode every line.\n\
         # Columns: name, direction, type (hex), seq, fields (k=v;...), wire bytes (hex, both delimiters included).\n\
         name\tdirection\ttype\tseq\tfields\twire\n",
    );
    for (name, seq, msg) in device_specimens() {
        let debug = match &msg {
            DeviceMessage::Hello(m) => format!("{m:?}"),
            DeviceMessage::Event(m) => format!("{m:?}"),
            DeviceMessage::Pong(m) => format!("{m:?}"),
            DeviceMessage::Ack(m) => format!("{m:?}"),
            DeviceMessage::Fault(m) => format!("{m:?}"),
            DeviceMessage::Heartbeat(m) => format!("{m:?}"),
            DeviceMessage::RewardFired(m) => format!("{m:?}"),
            DeviceMessage::RewardEnded(m) => format!("{m:?}"),
            DeviceMessage::LeverSamples(_) => unreachable!("lever batches are listed below"),
        };
        let wire = encode_device(&msg, seq);
        s += &format!(
            "{name}\tdevice\t0x{:02x}\t{seq}\t{}\t{}\n",
            msg.msg_type(),
            fields_of(&debug),
            hex(&wire)
        );
    }
    for (name, n) in [("lever_samples_1", 1usize), ("lever_samples_5", 5)] {
        let counts = &LEVER_COUNTS[..n];
        let wire = encode_lever(11, 1000, 2_000_000, 100, counts);
        let counts_txt: Vec<String> = counts.iter().map(i32::to_string).collect();
        s += &format!(
            "{name}\tdevice\t0x02\t11\tfirst_index=1000;t_first_us=2000000;period_us=100;counts={}\t{}\n",
            counts_txt.join(","),
            hex(&wire)
        );
    }
    for (name, seq, cmd) in host_specimens() {
        let debug = match &cmd {
            HostCommand::Configure(m) => format!("{m:?}"),
            HostCommand::Tone(m) => format!("{m:?}"),
            HostCommand::ValvePulse(m) => format!("{m:?}"),
            HostCommand::ValveOpen(m) => format!("{m:?}"),
            HostCommand::SyncOut(m) => format!("{m:?}"),
            HostCommand::ArmReward(m) => format!("{m:?}"),
            HostCommand::Disarm(m) => format!("{m:?}"),
            _ => String::new(),
        };
        let wire = encode_host(&cmd, seq);
        s += &format!(
            "{name}\thost\t0x{:02x}\t{seq}\t{}\t{}\n",
            cmd.msg_type(),
            fields_of(&debug),
            hex(&wire)
        );
    }
    s
}

#[test]
fn golden_vectors_are_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/serial.tsv");
    let want = golden_table();
    if std::env::var_os("UPDATE_VECTORS").is_some() {
        std::fs::write(path, &want).expect("write the vectors file");
    }
    let have =
        std::fs::read_to_string(path).expect("vectors file exists (UPDATE_VECTORS=1 creates it)");
    assert_eq!(
        have, want,
        "encoding changed: the golden vectors no longer match"
    );
    // And every line's bytes decode to exactly one frame of the stated type and seq.
    for line in have.lines().filter(|l| !l.starts_with('#')).skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 6, "{line}");
        let bytes: Vec<u8> = (0..cols[5].len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&cols[5][i..i + 2], 16).expect("hex"))
            .collect();
        let (ty, seq, body) = decode_one(&bytes);
        assert_eq!(format!("0x{ty:02x}"), cols[2]);
        assert_eq!(seq.to_string(), cols[3]);
        match cols[1] {
            "device" => assert!(DeviceMessage::parse(ty, &body).is_ok(), "{line}"),
            _ => assert!(HostCommand::parse(ty, &body).is_ok(), "{line}"),
        }
    }
}

// ---------------------------------------------------------------- decoder behaviour

#[test]
fn garbage_between_frames_is_counted_and_skipped() {
    let a = encode_host(&HostCommand::Ping, 1);
    let b = encode_host(&HostCommand::Reset, 2);
    let mut stream = vec![0x55, 0x66, 0x77]; // the tail of a frame we joined mid-way
    stream.push(0);
    stream.extend_from_slice(&a);
    stream.extend_from_slice(&[0x13, 0x37]); // line noise between two frames
    stream.extend_from_slice(&b);
    let (frames, stats) = decode_all(&stream);
    assert_eq!(frames.iter().map(|f| f.1).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(stats.frames_ok, 2);
    assert_eq!(stats.frames_dropped, 2);
    // 3 bytes + their delimiter, 2 bytes ended by the next frame's leading delimiter.
    assert_eq!(stats.bytes_dropped, 4 + 3);
    assert_eq!(stats.bytes_in, stream.len() as u64);
}

#[test]
fn noise_between_frames_never_costs_the_next_frame() {
    // Without a leading delimiter, noise with no zero in it would merge with
    // the next frame and take it down; with one, only the noise is dropped.
    let frames: Vec<Vec<u8>> = (0..50u16)
        .map(|i| encode_host(&HostCommand::Ping, i))
        .collect();
    for noise_len in 1..40usize {
        let mut stream = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            stream.extend_from_slice(f);
            if i % 7 == 3 {
                stream.extend((0..noise_len).map(|k| (k * 37 + i) as u8 | 1));
            }
        }
        let (decoded, _) = decode_all(&stream);
        let seqs: Vec<u16> = decoded.iter().map(|f| f.1).collect();
        assert_eq!(
            seqs,
            (0..50).collect::<Vec<_>>(),
            "noise of {noise_len} bytes"
        );
    }
}

#[test]
fn a_flipped_bit_is_caught_by_the_crc() {
    let wire = encode_host(
        &HostCommand::ValvePulse(ValvePulse {
            duration_us: 40_000,
        }),
        3,
    );
    for i in 0..wire.len() - 1 {
        for bit in 0..8 {
            let mut bad = wire.clone();
            bad[i] ^= 1 << bit;
            let (frames, stats) = decode_all(&bad);
            // A flip that makes a zero splits the frame; either way nothing
            // corrupted may come out as a valve pulse of another duration.
            for (ty, _, body) in &frames {
                assert_eq!(
                    HostCommand::parse(*ty, body),
                    Ok(HostCommand::ValvePulse(ValvePulse {
                        duration_us: 40_000
                    })),
                    "byte {i} bit {bit}"
                );
            }
            assert!(
                frames.is_empty(),
                "byte {i} bit {bit}: corrupted frame accepted: {stats:?}"
            );
        }
    }
}

#[test]
fn oversized_frames_are_dropped_and_decoding_resumes() {
    let mut stream = vec![0x01; MAX_WIRE_FRAME * 3];
    stream.push(0);
    stream.extend_from_slice(&encode_host(&HostCommand::Ping, 77));
    let (frames, stats) = decode_all(&stream);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].1, 77);
    assert_eq!(stats.oversize, 1);
    assert_eq!(stats.bytes_dropped, MAX_WIRE_FRAME as u64 * 3 + 1);
}

#[test]
fn runts_and_empty_frames() {
    let (frames, stats) = decode_all(&[0, 0, 0, 0x02, 0x05, 0]);
    assert!(frames.is_empty());
    assert_eq!(
        stats.frames_dropped, 1,
        "empty frames are not errors: {stats:?}"
    );
    assert_eq!(stats.runts, 1);
}

#[test]
fn stream_rate_arithmetic() {
    // 1 sample per frame: 4 header + 11 batch header + 4 + 2 CRC = 21 raw bytes,
    // 22 after COBS, 24 with the two delimiters.
    assert_eq!(lever_stream_bytes_per_s(1000, 1), 24_000.0);
    assert!(lever_stream_bytes_per_s(10_000, 10) < lever_stream_bytes_per_s(10_000, 1));
}

// ---------------------------------------------------------------- properties

fn any_frame() -> impl Strategy<Value = Vec<u8>> {
    let device_types = vec![
        (Hello::TYPE, Hello::BODY_LEN),
        (Event::TYPE, Event::BODY_LEN),
        (Pong::TYPE, Pong::BODY_LEN),
        (Ack::TYPE, Ack::BODY_LEN),
        (Fault::TYPE, Fault::BODY_LEN),
        (Heartbeat::TYPE, Heartbeat::BODY_LEN),
    ];
    let fixed = (
        proptest::sample::select(device_types),
        any::<u16>(),
        proptest::collection::vec(any::<u8>(), 32),
    )
        .prop_map(|((ty, len), seq, bytes)| {
            let msg = DeviceMessage::parse(ty, &bytes[..len])
                .expect("any body of the right length parses");
            encode_device(&msg, seq)
        });
    let lever = (
        any::<u16>(),
        any::<u32>(),
        any::<u32>(),
        proptest::collection::vec(any::<i32>(), 1..=MAX_SAMPLES_PER_BATCH),
    )
        .prop_map(|(seq, first, t, counts)| encode_lever(seq, first, t, 100, &counts));
    prop_oneof![fixed, lever]
}

#[derive(Debug, Clone)]
enum Corruption {
    Flip { at: usize, mask: u8 },
    Zero { at: usize },
    Delete { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Truncate { keep: usize },
}

fn any_corruption() -> impl Strategy<Value = Corruption> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Corruption::Flip { at, mask }),
        any::<usize>().prop_map(|at| Corruption::Zero { at }),
        any::<usize>().prop_map(|at| Corruption::Delete { at }),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..20)
        )
            .prop_map(|(at, bytes)| Corruption::Insert { at, bytes }),
        any::<usize>().prop_map(|keep| Corruption::Truncate { keep }),
    ]
}

fn corrupt(frame: &mut Vec<u8>, c: &Corruption) {
    let n = frame.len();
    if n < 2 {
        frame.clear();
        return;
    }
    match c {
        Corruption::Flip { at, mask } => frame[at % n] ^= mask,
        Corruption::Zero { at } => frame[at % (n - 1)] = 0,
        Corruption::Delete { at } => {
            frame.remove(at % n);
        }
        Corruption::Insert { at, bytes } => {
            let at = at % n;
            frame.splice(at..at, bytes.iter().copied());
        }
        Corruption::Truncate { keep } => frame.truncate(keep % n),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096), split in any::<usize>()) {
        let mut dec = Decoder::new();
        let split = if bytes.is_empty() { 0 } else { split % bytes.len() };
        let mut seen = 0u64;
        dec.feed(&bytes[..split], |f| { seen += 1; let _ = f.device_message(); let _ = f.host_command(); });
        dec.feed(&bytes[split..], |f| { seen += 1; let _ = f.device_message(); let _ = f.host_command(); });
        let s = dec.stats();
        let delimiters = bytes.iter().filter(|&&b| b == 0).count() as u64;
        prop_assert_eq!(s.frames_ok, seen);
        prop_assert!(s.frames_ok + s.frames_dropped <= delimiters);
        prop_assert!(s.bytes_dropped <= s.bytes_in);
        prop_assert_eq!(s.bytes_in, bytes.len() as u64);
    }

    #[test]
    fn any_chunking_gives_the_same_frames(frames in proptest::collection::vec(any_frame(), 1..20), cuts in proptest::collection::vec(any::<usize>(), 0..10)) {
        let stream: Vec<u8> = frames.concat();
        let (whole, _) = decode_all(&stream);
        prop_assert_eq!(whole.len(), frames.len());
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort_unstable();
        let mut dec = Decoder::new();
        let mut pieces = Vec::new();
        let mut start = 0;
        for cut in cuts.into_iter().chain([stream.len()]) {
            dec.feed(&stream[start..cut], |f| pieces.push((f.msg_type, f.seq, f.body.to_vec())));
            start = cut;
        }
        prop_assert_eq!(pieces, whole);
    }

    #[test]
    fn intact_frames_survive_corruption(
        frames in proptest::collection::vec(any_frame(), 2..30),
        hits in proptest::collection::vec((any::<usize>(), any_corruption()), 1..6),
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let originals: Vec<(u8, u16, Vec<u8>)> = frames.iter().map(|f| decode_one(f)).collect();
        let mut damaged = frames.clone();
        let mut intact = vec![true; frames.len()];
        for (which, c) in &hits {
            let i = which % frames.len();
            corrupt(&mut damaged[i], c);
            // A damaged frame may lose its delimiter and swallow the next one.
            intact[i] = false;
            if i + 1 < frames.len() { intact[i + 1] = false; }
        }
        let mut stream = garbage.clone();
        if !garbage.is_empty() { intact[0] = false; }
        for f in &damaged { stream.extend_from_slice(f); }
        let (decoded, stats) = decode_all(&stream);
        // Every intact frame comes out, in order (corrupted ones may, with
        // CRC-16's 1-in-65536 odds, also pass; they are not required to fail).
        let mut it = decoded.iter();
        for (i, orig) in originals.iter().enumerate() {
            if intact[i] {
                prop_assert!(it.any(|d| d == orig), "intact frame {} lost; stats {:?}", i, stats);
            }
        }
    }

    #[test]
    fn messages_round_trip(frame in any_frame()) {
        let (ty, seq, body) = decode_one(&frame);
        let msg = DeviceMessage::parse(ty, &body).expect("parses");
        prop_assert_eq!(encode_device(&msg, seq), frame);
    }
}

#[test]
fn body_lengths_match_the_spec() {
    // docs/protocol.md section 1 documents these lengths and offsets.
    assert_eq!(Hello::BODY_LEN, 31);
    assert_eq!(LEVER_BATCH_HEADER_LEN, 11);
    assert_eq!(Event::BODY_LEN, 11);
    assert_eq!(Pong::BODY_LEN, 10);
    assert_eq!(Ack::BODY_LEN, 8);
    assert_eq!(Fault::BODY_LEN, 10);
    assert_eq!(Heartbeat::BODY_LEN, 21);
    assert_eq!(Configure::BODY_LEN, 13);
    assert_eq!(Tone::BODY_LEN, 7);
    assert_eq!(ValvePulse::BODY_LEN, 4);
    assert_eq!(ValveOpen::BODY_LEN, 2);
    assert_eq!(SyncOut::BODY_LEN, 8);
    assert_eq!(MAX_WIRE_FRAME, 260);
}
