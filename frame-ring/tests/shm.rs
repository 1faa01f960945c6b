//! The frame ring over real POSIX shared memory: the Rust writer and reader,
//! and the C (`producers/rigframes.h`) and Python (`producers/
//! rigframes_producer.py`) producers feeding the Rust reader.
//!
//! Every test uses its own shared-memory name (with the pid) and unlinks it
//! when done, even on failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use frame_ring::{host_now_ns, unlink_ring, FrameRingMapping, FrameRingWriter, ShmError};
use protocol::ring::{FrameMeta, PixelType, PollOutcome, ProducerState, RingGeometry, RingReader};

/// Unlinks the shared-memory object when dropped (also on panic).
struct ShmName(String);

impl ShmName {
    fn new(tag: &str) -> Self {
        let name = format!("/rigd-test-{}-{tag}", std::process::id());
        let _ = unlink_ring(&name); // a leftover from a crashed run
        Self(name)
    }
}

impl Drop for ShmName {
    fn drop(&mut self) {
        let _ = unlink_ring(&self.0);
    }
}

fn geometry(width: u32, height: u32, channels: u32, slots: u32) -> RingGeometry {
    RingGeometry::new(width, height, channels, PixelType::U16Le, slots).expect("valid geometry")
}

/// The synthetic frames of this test file and of the example producers:
/// pixel `i` (flat index) of frame number `f` is `(f + i) mod 65536`.
fn pattern(frame_number: u64, pixels: usize) -> Vec<u16> {
    (0..pixels)
        .map(|i| (frame_number.wrapping_add(i as u64) & 0xffff) as u16)
        .collect()
}

fn check_pattern(meta: &FrameMeta, pixels: &[u16]) {
    for (i, &p) in pixels.iter().enumerate() {
        let want = (meta.frame_number.wrapping_add(i as u64) & 0xffff) as u16;
        assert_eq!(p, want, "frame index {} pixel {i}", meta.index);
    }
}

/// Open a ring a producer is creating, retrying while it does not exist yet
/// or is still being initialised.
fn open_when_ready(name: &str, timeout: Duration) -> FrameRingMapping {
    let deadline = Instant::now() + timeout;
    loop {
        match FrameRingMapping::open(name) {
            Ok(mapping) => return mapping,
            Err(
                e @ (ShmError::NotFound { .. }
                | ShmError::Truncated { .. }
                | ShmError::NotReady { .. }),
            ) => {
                assert!(Instant::now() < deadline, "ring never became ready: {e}");
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("open {name}: {e}"),
        }
    }
}

fn poll_frame(reader: &mut RingReader, buf: &mut [u16], timeout: Duration) -> FrameMeta {
    let deadline = Instant::now() + timeout;
    loop {
        match reader.poll(buf).expect("poll") {
            PollOutcome::Frame(meta) => return meta,
            PollOutcome::NothingNew => {
                assert!(Instant::now() < deadline, "no frame within {timeout:?}");
                std::thread::sleep(Duration::from_micros(200));
            }
            PollOutcome::Torn => {}
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

#[test]
fn rust_writer_to_reader_thread_every_frame_arrives() {
    const FRAMES: u64 = 300;
    let shm = ShmName::new("every-frame");
    let geometry = geometry(32, 24, 2, 16);
    let mut writer = FrameRingWriter::create(&shm.0, geometry).expect("create");
    let frame_pixels = writer.frame_pixels();
    let read = Arc::new(AtomicU64::new(0));

    let reader_thread = {
        let (name, read) = (shm.0.clone(), Arc::clone(&read));
        std::thread::spawn(move || {
            let mapping = FrameRingMapping::open(&name).expect("open");
            assert_eq!(mapping.geometry(), geometry);
            mapping
                .check_geometry(32, 24, 2)
                .expect("geometry as configured");
            let mut reader = mapping.reader().expect("reader");
            reader.seek(0);
            let mut buf = vec![0u16; reader.frame_pixels()];
            for k in 0..FRAMES {
                let meta = poll_frame(&mut reader, &mut buf, Duration::from_secs(5));
                assert_eq!(meta.index, k);
                assert_eq!(meta.frame_number, 1000 + k);
                assert_eq!(meta.host_monotonic_ns, 5_000_000 + k * 1000);
                let hw = (k % 2 == 0).then_some(7_000_000 + k);
                assert_eq!(meta.hw_timestamp_ns, hw);
                check_pattern(&meta, &buf);
                read.store(k + 1, Ordering::Release);
            }
            assert_eq!(reader.frames_dropped(), 0);
            reader.frames_read()
        })
    };

    for k in 0..FRAMES {
        // Flow control is the test's, not the API's: the writer never waits,
        // so keep it less than a ring ahead of the reader.
        let deadline = Instant::now() + Duration::from_secs(5);
        while k >= read.load(Ordering::Acquire) + 15 {
            assert!(Instant::now() < deadline, "reader stuck at {k}");
            std::thread::yield_now();
        }
        let frame_number = 1000 + k;
        let hw = (k % 2 == 0).then_some(7_000_000 + k);
        let index = writer
            .publish(
                frame_number,
                5_000_000 + k * 1000,
                hw,
                &pattern(frame_number, frame_pixels),
            )
            .expect("publish");
        assert_eq!(index, k);
    }
    let frames_read = reader_thread.join().expect("reader thread");
    assert_eq!(frames_read, FRAMES);
}

#[test]
fn stalled_reader_sees_an_overrun_and_counts_dropped_frames() {
    let shm = ShmName::new("overrun");
    let mut writer = FrameRingWriter::create(&shm.0, geometry(16, 8, 1, 8)).expect("create");
    let mapping = FrameRingMapping::open(&shm.0).expect("open");
    let mut reader = mapping.reader().expect("reader");
    let mut buf = vec![0u16; reader.frame_pixels()];
    for k in 0..20u64 {
        writer
            .publish(k, host_now_ns(), None, &pattern(k, 128))
            .expect("publish");
    }
    assert_eq!(
        reader.poll(&mut buf).expect("poll"),
        PollOutcome::Overrun { skipped: 12 }
    );
    for k in 12..20u64 {
        let meta = poll_frame(&mut reader, &mut buf, Duration::from_secs(1));
        assert_eq!((meta.index, meta.frame_number), (k, k));
        check_pattern(&meta, &buf);
    }
    assert_eq!(
        reader.poll(&mut buf).expect("poll"),
        PollOutcome::NothingNew
    );
    assert_eq!((reader.frames_read(), reader.frames_dropped()), (8, 12));
}

#[test]
fn producer_restart_on_the_same_name_is_reported() {
    let shm = ShmName::new("restart");
    let geometry = geometry(16, 8, 1, 8);
    let mut first = FrameRingWriter::create(&shm.0, geometry).expect("create");
    let mapping = FrameRingMapping::open(&shm.0).expect("open");
    let mut reader = mapping.reader().expect("reader");
    let mut buf = vec![0u16; reader.frame_pixels()];
    first
        .publish(1, host_now_ns(), None, &pattern(1, 128))
        .expect("publish");
    assert_eq!(
        poll_frame(&mut reader, &mut buf, Duration::from_secs(1)).frame_number,
        1
    );
    let old_gen = first.generation();
    drop(first); // a clean exit: state = closed, the object stays
    assert_eq!(reader.producer_state(), ProducerState::Closed);

    let mut second = FrameRingWriter::create(&shm.0, geometry).expect("re-create");
    assert_ne!(second.generation(), old_gen);
    second
        .publish(500, host_now_ns(), Some(42), &pattern(500, 128))
        .expect("publish");
    assert_eq!(
        reader.poll(&mut buf).expect("poll"),
        PollOutcome::ProducerRestarted {
            old_gen,
            new_gen: second.generation()
        }
    );
    let meta = poll_frame(&mut reader, &mut buf, Duration::from_secs(1));
    assert_eq!(
        (meta.index, meta.frame_number, meta.hw_timestamp_ns),
        (0, 500, Some(42))
    );
    check_pattern(&meta, &buf);
    // Same object, same size: nothing to re-map.
    let mut mapping = mapping;
    assert!(!mapping.reopen_if_needed().expect("reopen"));
}

#[test]
fn producer_restart_with_another_frame_size_is_remapped() {
    let shm = ShmName::new("resize");
    let mut small = FrameRingWriter::create(&shm.0, geometry(16, 8, 1, 8)).expect("create");
    let mut mapping = FrameRingMapping::open(&shm.0).expect("open");
    let old_reader = mapping.reader().expect("reader");
    let old_len = mapping.len();
    small
        .publish(1, host_now_ns(), None, &pattern(1, 128))
        .expect("publish");
    drop(small);

    // A larger geometry: the writer unlinks and re-creates the object, so
    // the old mapping goes stale (its heartbeat stops) and must be re-opened.
    let mut big = FrameRingWriter::create(&shm.0, geometry(128, 64, 2, 8)).expect("create");
    let now = host_now_ns();
    assert!(old_reader.is_stale(now + 2_000_000_000, 1_000_000_000));
    assert!(mapping.reopen_if_needed().expect("reopen"));
    assert!(mapping.len() > old_len);
    assert_eq!(mapping.geometry(), big.geometry());
    let err = mapping
        .check_geometry(16, 8, 1)
        .expect_err("geometry changed");
    let text = err.to_string();
    assert!(
        text.contains("128x64 pixels x 2 channel(s)") && text.contains("expected 16x8 x 1"),
        "{text}"
    );

    let mut reader = mapping.reader().expect("reader");
    let mut buf = vec![0u16; reader.frame_pixels()];
    big.publish(9, host_now_ns(), None, &pattern(9, 128 * 64 * 2))
        .expect("publish");
    let meta = poll_frame(&mut reader, &mut buf, Duration::from_secs(1));
    assert_eq!((meta.index, meta.frame_number), (0, 9));
    check_pattern(&meta, &buf);
    assert!(!mapping.reopen_if_needed().expect("reopen"));
}

#[test]
fn stale_heartbeat_marks_a_dead_producer() {
    let shm = ShmName::new("stale");
    let mut writer = FrameRingWriter::create(&shm.0, geometry(8, 8, 1, 4)).expect("create");
    let mapping = FrameRingMapping::open(&shm.0).expect("open");
    let reader = mapping.reader().expect("reader");
    // Times are injected: the producer's last heartbeat at t, readers ask
    // at t + 50 ms (alive) and t + 2 s (dead, with a 1 s timeout).
    let t = host_now_ns();
    writer.heartbeat(t);
    assert_eq!(reader.heartbeat_ns(), t);
    assert!(!reader.is_stale(t + 50_000_000, 1_000_000_000));
    assert!(reader.is_stale(t + 2_000_000_000, 1_000_000_000));
    assert_eq!(reader.producer_state(), ProducerState::Live);
    writer.close();
    assert_eq!(reader.producer_state(), ProducerState::Closed);
    assert!(matches!(
        writer.publish(0, t, None, &[0; 64]),
        Err(ShmError::WriterClosed { .. })
    ));
}

#[test]
fn opening_a_missing_ring_names_it_and_the_fix() {
    let shm = ShmName::new("missing");
    let err = FrameRingMapping::open(&shm.0).expect_err("no such ring");
    assert!(matches!(err, ShmError::NotFound { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&shm.0), "{text}");
    assert!(text.contains("acquisition program"), "{text}");
    assert!(text.contains("must create it"), "{text}");

    for bad in ["rigd-frames", "/", "/a/b"] {
        let err = FrameRingMapping::open(bad).expect_err("bad name");
        assert!(
            matches!(err, ShmError::InvalidName { .. }),
            "{bad}: {err:?}"
        );
        assert!(err.to_string().contains("\"/rigd-frames\""), "{err}");
    }
}

#[test]
fn objects_that_are_not_frame_rings_are_refused_clearly() {
    let shm = ShmName::new("garbage");
    let path = PathBuf::from(format!("/dev/shm/{}", &shm.0[1..]));

    std::fs::write(&path, [1u8; 100]).expect("write /dev/shm");
    let err = FrameRingMapping::open(&shm.0).expect_err("truncated");
    assert!(
        matches!(err, ShmError::Truncated { len: 100, .. }),
        "{err:?}"
    );

    let mut bytes = vec![0u8; 8192];
    bytes[..8].copy_from_slice(b"NOTARING");
    std::fs::write(&path, &bytes).expect("write /dev/shm");
    let err = FrameRingMapping::open(&shm.0).expect_err("bad magic");
    assert!(err.to_string().contains("expected \"RIGFRAME\""), "{err}");

    // A valid ring whose version a newer producer bumped.
    let writer = FrameRingWriter::create(&shm.0, geometry(8, 8, 1, 2)).expect("create");
    drop(writer);
    let mut bytes = std::fs::read(&path).expect("read /dev/shm");
    bytes[8] = 2;
    std::fs::write(&path, &bytes).expect("write /dev/shm");
    let err = FrameRingMapping::open(&shm.0).expect_err("bad version");
    let text = err.to_string();
    assert!(
        text.contains(&shm.0) && text.contains("layout_version = 2"),
        "{text}"
    );

    // A zeroed object: a producer between ftruncate and initialisation.
    std::fs::write(&path, vec![0u8; 8192]).expect("write /dev/shm");
    let err = FrameRingMapping::open(&shm.0).expect_err("not ready");
    assert!(matches!(err, ShmError::NotReady { .. }), "{err:?}");
}

/// Run an external producer and read every frame it writes with the Rust
/// reader. The ring has more slots than frames, so no frame can be lost
/// however late the reader opens it.
fn ingest_external_producer(mut cmd: Command, name: &str, frames: u64, pixels: usize) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the producer");
    let mapping = open_when_ready(name, Duration::from_secs(10));
    mapping.check_geometry(64, 48, 2).expect("geometry");
    let mut reader = mapping.reader().expect("reader");
    reader.seek(0);
    let mut buf = vec![0u16; reader.frame_pixels()];
    assert_eq!(buf.len(), pixels);
    let mut last_host_ns = 0;
    for k in 0..frames {
        let meta = poll_frame(&mut reader, &mut buf, Duration::from_secs(10));
        assert_eq!((meta.index, meta.frame_number), (k, k + 1));
        assert!(meta.host_monotonic_ns >= last_host_ns);
        assert_eq!(meta.hw_timestamp_ns, Some(meta.host_monotonic_ns - 1000));
        last_host_ns = meta.host_monotonic_ns;
        check_pattern(&meta, &buf);
    }
    assert_eq!((reader.frames_read(), reader.frames_dropped()), (frames, 0));
    let out = child.wait_with_output().expect("producer exit");
    assert!(
        out.status.success(),
        "producer failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(reader.producer_state(), ProducerState::Closed);
    assert!(!reader.is_stale(host_now_ns(), 10_000_000_000));
}

fn producers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("producers")
}

#[test]
fn c_producer_frames_are_ingested() {
    let shm = ShmName::new("c-producer");
    let dir = std::env::temp_dir().join(format!("rigframes-c-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let exe = dir.join("example_producer");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let out = Command::new(&cc)
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&exe)
        .arg(producers_dir().join("example_producer.c"))
        .output()
        .unwrap_or_else(|e| panic!("run the C compiler {cc:?}: {e}"));
    assert!(
        out.status.success(),
        "example_producer.c does not compile:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut cmd = Command::new(&exe);
    cmd.args(["--name", &shm.0])
        .args(["--width", "64", "--height", "48", "--channels", "2"])
        .args([
            "--slots", "256", "--frames", "200", "--rate", "1000", "--hw",
        ]);
    ingest_external_producer(cmd, &shm.0, 200, 64 * 48 * 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn python_producer_frames_are_ingested() {
    let shm = ShmName::new("py-producer");
    let python = std::env::var("RIG_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let has_numpy = Command::new(&python)
        .args(["-c", "import numpy"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_numpy {
        let required = std::env::var("RIG_REQUIRE_NUMPY").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "{python} cannot import numpy and RIG_REQUIRE_NUMPY=1: set RIG_PYTHON to a \
             python with numpy"
        );
        eprintln!(
            "skipping python_producer_frames_are_ingested: {python} cannot import numpy \
             (set RIG_PYTHON to a python with numpy, e.g. /work/.rig-venv/bin/python3)"
        );
        return;
    }
    let mut cmd = Command::new(&python);
    cmd.arg(producers_dir().join("rigframes_producer.py"))
        .args(["--name", &shm.0])
        .args(["--width", "64", "--height", "48", "--channels", "2"])
        .args([
            "--slots", "256", "--frames", "200", "--rate", "1000", "--hw",
        ]);
    ingest_external_producer(cmd, &shm.0, 200, 64 * 48 * 2);
}

/// The ring's permission bits as a reader sees them: our producers create it
/// 0640; one made writable by others is reported as such (rigd records it).
#[test]
fn a_reader_sees_whether_the_ring_is_writable_by_others() {
    use std::os::unix::fs::PermissionsExt;
    let shm = ShmName::new("mode");
    let _writer = FrameRingWriter::create(&shm.0, geometry(8, 8, 1, 4)).expect("create");
    let mapping = FrameRingMapping::open(&shm.0).expect("open");
    // At most SHM_MODE (the umask may take more away), never world-writable.
    let mode = mapping.mode().expect("mode");
    assert_eq!(mode & !frame_ring::SHM_MODE, 0, "{mode:o}");
    let path = format!("/dev/shm{}", shm.0);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let mode = mapping.mode().expect("mode");
    assert_eq!(mode, 0o666);
    assert_ne!(mode & 0o002, 0);
}
