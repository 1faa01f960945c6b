//! The receiver over real TCP into a real shared-memory ring: good senders'
//! frames land with their numbers and stamps; bad senders get a clear
//! refusal and never disturb the ring or the good sender.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use frame_bridge::receiver::{geometry, Receiver, ReceiverConfig, ReceiverStats};
use frame_bridge::wire::{
    Hello, ReasonCode, Reply, SenderHeader, SenderKind, WireGeometry, FLAG_STAMP_HOST_MONOTONIC,
    PIXEL_U16LE, REPLY_LEN,
};
use frame_ring::FrameRingMapping;
use protocol::ring::{PollOutcome, RingReader};

const TOKEN: &[u8] = b"a-token-of-24-bytes-long";
const W: u32 = 32;
const H: u32 = 16;
const G: WireGeometry = WireGeometry {
    width: W,
    height: H,
    channels: 1,
    pixel_type: PIXEL_U16LE,
};

struct Running {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<ReceiverStats>>,
    shm: String,
    ring: FrameRingMapping,
}

impl Running {
    fn start(name: &str, tweak: impl FnOnce(&mut ReceiverConfig)) -> Self {
        let shm = format!("/rig-bridge-test-{}-{name}", std::process::id());
        let g = geometry(W, H, 1, 16).expect("geometry");
        let mut config = ReceiverConfig::new(
            "127.0.0.1:0".parse().expect("addr"),
            TOKEN.to_vec(),
            &shm,
            g,
        );
        config.hello_timeout = Duration::from_millis(500);
        tweak(&mut config);
        let receiver = Receiver::bind(config).expect("bind");
        let addr = receiver.local_addr().expect("addr");
        let ring = FrameRingMapping::open(&shm).expect("the ring exists once bound");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || receiver.run(&s).expect("run"));
        Self {
            addr,
            stop,
            thread: Some(thread),
            shm,
            ring,
        }
    }

    fn finish(mut self) -> ReceiverStats {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().expect("once").join().expect("join")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = frame_ring::unlink_ring(&self.shm);
    }
}

fn read_reply(s: &mut TcpStream) -> Reply {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut head = [0u8; REPLY_LEN];
    s.read_exact(&mut head).expect("a reply");
    let (reply, n) = Reply::decode_header(&head).expect("a valid reply");
    let mut text = vec![0u8; n];
    s.read_exact(&mut text).expect("reason");
    reply.with_reason(&text)
}

fn connect(addr: SocketAddr, g: WireGeometry, token: &[u8]) -> (TcpStream, Reply) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(&Hello::encode(g, token)).expect("hello");
    let r = read_reply(&mut s);
    (s, r)
}

fn frame(s: &mut TcpStream, number: u64, stamp_ns: u64) {
    frame_flagged(s, number, stamp_ns, FLAG_STAMP_HOST_MONOTONIC);
}

fn frame_flagged(s: &mut TcpStream, number: u64, stamp_ns: u64, flags: u32) {
    let h = SenderHeader {
        kind: SenderKind::Frame,
        payload_len: W * H * 2,
        frame_number: number,
        stamp_ns,
        flags,
        sender_dropped: 0,
    };
    s.write_all(&h.encode()).expect("header");
    let px: Vec<u8> = (0..W * H)
        .flat_map(|i| ((i as u16) ^ (number as u16)).to_le_bytes())
        .collect();
    s.write_all(&px).expect("pixels");
}

/// Read frames (number, host stamp, first pixel) until `n` arrived or 10 s passed.
fn read_frames(reader: &mut RingReader, n: usize) -> Vec<(u64, u64, u16)> {
    let mut px = vec![0u16; (W * H) as usize];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < n && Instant::now() < deadline {
        match reader.poll(&mut px).expect("poll") {
            PollOutcome::Frame(m) => got.push((m.frame_number, m.host_monotonic_ns, px[1])),
            PollOutcome::NothingNew => std::thread::sleep(Duration::from_millis(2)),
            other => panic!("unexpected {other:?}"),
        }
    }
    got
}

#[test]
fn frames_land_in_the_ring_with_their_numbers_and_stamps() {
    let r = Running::start("good", |_| {});
    let mut reader = r.ring.reader().expect("reader");
    let (mut s, accept) = connect(r.addr, G, TOKEN);
    assert_eq!(
        accept,
        Reply::Accept {
            next_frame_number: 0,
            frame_bytes: W * H * 2
        }
    );
    for n in 10..20 {
        frame(&mut s, n, 1_000 + n);
    }
    let got = read_frames(&mut reader, 10);
    let want: Vec<(u64, u64, u16)> = (10..20).map(|n| (n, 1_000 + n, 1 ^ n as u16)).collect();
    assert_eq!(got, want);
    // An ack reports what was written.
    loop {
        if let Reply::Ack {
            written,
            last_frame_number,
            ..
        } = read_reply(&mut s)
        {
            if written == 10 {
                assert_eq!(last_frame_number, 19);
                break;
            }
        }
    }
    drop(s);
    let stats = r.finish();
    assert_eq!(stats.frames_written, 10);
}

#[test]
fn a_stamp_from_another_machine_becomes_an_arrival_stamp_marked_as_such() {
    let r = Running::start("foreign", |_| {});
    let mut reader = r.ring.reader().expect("reader");
    let (mut s, _) = connect(r.addr, G, TOKEN);
    // Frame 1 with a stamp of this host's clock, frame 2 with another's.
    frame(&mut s, 1, 5_000);
    let before = frame_ring::host_now_ns();
    frame_flagged(&mut s, 2, 123_456_789, 0);
    let mut px = vec![0u16; (W * H) as usize];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 2 && Instant::now() < deadline {
        match reader.poll(&mut px).expect("poll") {
            PollOutcome::Frame(m) => got.push(m),
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    let after = frame_ring::host_now_ns();
    assert_eq!(got.len(), 2, "{got:?}");
    // The rig PC's stamp is the frame's start: kept, not marked.
    assert_eq!(
        (
            got[0].host_monotonic_ns,
            got[0].hw_timestamp_ns,
            got[0].host_stamp_at_arrival
        ),
        (5_000, None, false)
    );
    // Another machine's: the arrival here, marked as an arrival (rigd never
    // takes it for the frame's clock edge), the sender's stamp kept.
    assert!(got[1].host_stamp_at_arrival, "{:?}", got[1]);
    assert_eq!(got[1].hw_timestamp_ns, Some(123_456_789));
    assert!(
        (before..=after).contains(&got[1].host_monotonic_ns),
        "{:?}",
        got[1]
    );
    drop(s);
    r.finish();
}

#[test]
fn a_wrong_token_or_geometry_is_refused_with_the_reason_and_the_good_sender_goes_on() {
    let r = Running::start("bad", |_| {});
    let mut reader = r.ring.reader().expect("reader");
    let (mut good, _) = connect(r.addr, G, TOKEN);
    frame(&mut good, 1, 1);

    let (_, reply) = connect(r.addr, G, b"a-token-of-24-bytes-lonG");
    let Reply::Refuse { code, reason } = reply else {
        panic!("refused: {reply:?}")
    };
    assert_eq!(code, ReasonCode::BadToken as u64);
    assert!(reason.contains("wrong token"), "{reason}");

    let big = WireGeometry {
        width: 4096,
        height: 4096,
        ..G
    };
    let (_, reply) = connect(r.addr, big, TOKEN);
    let Reply::Refuse { code, reason } = reply else {
        panic!("refused: {reply:?}")
    };
    assert_eq!(code, ReasonCode::BadGeometry as u64);
    assert!(
        reason.contains("4096x4096") && reason.contains("32x16"),
        "names both geometries: {reason}"
    );

    // Not even a hello: refused after the hello deadline.
    let mut silent = TcpStream::connect(r.addr).expect("connect");
    let reply = read_reply(&mut silent);
    assert!(
        matches!(reply, Reply::Refuse { code, .. } if code == ReasonCode::HelloTimeout as u64),
        "{reply:?}"
    );
    // Garbage instead of a hello.
    let mut junk = TcpStream::connect(r.addr).expect("connect");
    junk.write_all(&[0xAB; 64]).expect("junk");
    let reply = read_reply(&mut junk);
    let Reply::Refuse { code, reason } = reply else {
        panic!("refused: {reply:?}")
    };
    assert_eq!(code, ReasonCode::BadHello as u64);
    assert!(reason.contains("RIGFRNET"), "{reason}");

    // The good sender was never disturbed.
    frame(&mut good, 2, 2);
    let got = read_frames(&mut reader, 2);
    assert_eq!(
        got.iter().map(|g| g.0).collect::<Vec<_>>(),
        vec![1, 2],
        "{got:?}"
    );
    drop(good);
    let stats = r.finish();
    assert_eq!(stats.refused, 4);
    assert_eq!(stats.frames_written, 2);
}

#[test]
fn an_oversized_frame_closes_that_connection_and_writes_nothing() {
    let r = Running::start("oversize", |_| {});
    let mut reader = r.ring.reader().expect("reader");
    let (mut s, _) = connect(r.addr, G, TOKEN);
    let h = SenderHeader {
        kind: SenderKind::Frame,
        payload_len: u32::MAX,
        frame_number: 1,
        stamp_ns: 1,
        flags: FLAG_STAMP_HOST_MONOTONIC,
        sender_dropped: 0,
    };
    s.write_all(&h.encode()).expect("header");
    let reason = loop {
        match read_reply(&mut s) {
            Reply::Error { code, reason } => {
                assert_eq!(code, ReasonCode::BadMessage as u64);
                break reason;
            }
            Reply::Ack { .. } => {}
            other => panic!("{other:?}"),
        }
    };
    assert!(reason.contains("payload_len = 4294967295"), "{reason}");
    // The next sender is served as usual.
    let (mut s2, _) = connect(r.addr, G, TOKEN);
    frame(&mut s2, 5, 5);
    assert_eq!(read_frames(&mut reader, 1)[0].0, 5);
    drop(s2);
    assert_eq!(r.finish().frames_written, 1);
}

#[test]
fn a_reconnect_continues_the_numbers_and_numbers_going_back_start_a_new_generation() {
    let r = Running::start("restart", |_| {});
    let mut reader = r.ring.reader().expect("reader");
    let (mut a, _) = connect(r.addr, G, TOKEN);
    frame(&mut a, 1, 1);
    frame(&mut a, 2, 2);
    assert_eq!(read_frames(&mut reader, 2).len(), 2);
    // A restarted sender: the newest replaces the old connection, and is told
    // where the ring's numbers stand.
    let (mut b, accept) = connect(r.addr, G, TOKEN);
    assert_eq!(
        accept,
        Reply::Accept {
            next_frame_number: 3,
            frame_bytes: W * H * 2
        }
    );
    // The old connection is told why it was closed.
    let why = loop {
        match read_reply(&mut a) {
            Reply::Error { code, reason } => {
                assert_eq!(code, ReasonCode::Replaced as u64);
                break reason;
            }
            _ => continue,
        }
    };
    assert!(why.contains("replaced"), "{why}");
    frame(&mut b, 6, 6); // 3..=5 never sent: rigd sees the gap
    frame(&mut b, 4, 4); // going back within a connection: discarded
    frame(&mut b, 7, 7);
    assert_eq!(
        read_frames(&mut reader, 2)
            .iter()
            .map(|g| g.0)
            .collect::<Vec<_>>(),
        vec![6, 7]
    );
    drop(b);
    // A new acquisition numbering from 1: a new generation.
    let (mut c, _) = connect(r.addr, G, TOKEN);
    frame(&mut c, 1, 8);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut px = vec![0u16; (W * H) as usize];
    loop {
        assert!(Instant::now() < deadline, "no restart seen");
        match reader.poll(&mut px).expect("poll") {
            PollOutcome::ProducerRestarted { .. } => break,
            PollOutcome::NothingNew => std::thread::sleep(Duration::from_millis(2)),
            other => panic!("{other:?}"),
        }
    }
    drop(c);
    let stats = r.finish();
    assert_eq!(stats.generations, 2);
    assert_eq!(stats.frames_discarded, 1);
    assert_eq!(stats.frames_written, 5);
}

#[test]
fn a_silent_sender_is_closed_after_the_idle_timeout() {
    let r = Running::start("idle", |c| c.idle_timeout = Duration::from_millis(300));
    let (mut s, _) = connect(r.addr, G, TOKEN);
    let reason = loop {
        match read_reply(&mut s) {
            Reply::Error { code, reason } => {
                assert_eq!(code, ReasonCode::IdleTimeout as u64);
                break reason;
            }
            _ => continue,
        }
    };
    assert!(reason.contains("300 ms"), "{reason}");
}

#[test]
fn a_short_token_is_refused_at_start() {
    let g = geometry(W, H, 1, 4).expect("geometry");
    let config = ReceiverConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        b"short".to_vec(),
        "/rig-bridge-test-short",
        g,
    );
    let err = Receiver::bind(config).expect_err("refused");
    assert!(err.to_string().contains("at least 16"), "{err}");
}
