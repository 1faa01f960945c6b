//! The network frame bridge end to end: the real `rig-frame-bridge` binary,
//! real TCP, the real shared-memory ring, the real `rigd` and `rig-sim`; the
//! Python sender through a TCP proxy the test can stall, and the ScanImage
//! user function in GNU Octave with a stand-in for ScanImage's frame object.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use frame_bridge::wire::{Hello, Reply, HELLO_LEN};
use frame_ring::FrameRingMapping;
use protocol::ring::PollOutcome;
use rig_tests::{
    bin, python, read_tsv, start_session, stop_session, wait_connected, workspace_root, Rigd, Sim,
    TempDir,
};

const TOKEN: &str = "bridge-e2e-token-0123456789";

/// A running `rig-frame-bridge`; SIGTERM on drop. Its stderr goes to a file.
struct Bridge {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Bridge {
    fn start(dir: &Path, shm: &str, w: u32, h: u32) -> Self {
        let token = dir.join("bridge.token");
        std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
        let log = dir.join("bridge.log");
        let mut child = Command::new(bin("rig-frame-bridge"))
            .args(["--listen", "127.0.0.1:0", "--shm-name", shm])
            .args(["--width", &w.to_string(), "--height", &h.to_string()])
            .arg("--token-file")
            .arg(&token)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start rig-frame-bridge");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the listening line");
        let port = line
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.trim_end_matches(',').rsplit(':').next())
            .and_then(|p| p.parse().ok());
        let mut bridge = Self {
            child,
            port: port.unwrap_or(0),
            log,
        };
        if port.is_none() {
            bridge.terminate();
            panic!(
                "no port in {line:?}: {}",
                std::fs::read_to_string(&bridge.log).unwrap_or_default()
            );
        }
        bridge
    }

    /// SIGTERM, wait, and return its log.
    fn stop(mut self) -> String {
        self.terminate();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

fn token_file(dir: &Path) -> PathBuf {
    dir.join("bridge.token")
}

fn unlink(shm: &str) {
    let _ = frame_ring::unlink_ring(shm);
}

/// A TCP proxy in front of the bridge that the test can stall: while
/// stalled it neither reads nor forwards, in either direction, so the
/// sender's socket fills up as on a stalled network.
struct Proxy {
    port: u16,
    stalled: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        // A small receive buffer (inherited by the accepted sockets), so a
        // stall fills the sender's socket within a few frames, as a stalled
        // network does, instead of the kernel absorbing megabytes.
        nix::sys::socket::setsockopt(&listener, nix::sys::socket::sockopt::RcvBuf, &16_384)
            .expect("SO_RCVBUF");
        let port = listener.local_addr().expect("addr").port();
        let stalled = Arc::new(AtomicBool::new(false));
        let st = stalled.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                for (from, to) in [
                    (
                        client.try_clone().expect("clone"),
                        up.try_clone().expect("clone"),
                    ),
                    (up, client),
                ] {
                    let st = st.clone();
                    std::thread::spawn(move || pump(from, to, &st));
                }
            }
        });
        Self { port, stalled }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, stalled: &AtomicBool) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if stalled.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

fn has_numpy() -> bool {
    let ok = Command::new(python())
        .args(["-c", "import numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("RIG_REQUIRE_NUMPY").is_none(),
            "numpy is required (RIG_REQUIRE_NUMPY=1) for {}",
            python().display()
        );
        eprintln!(
            "skipped: no numpy for {} (set RIG_PYTHON)",
            python().display()
        );
    }
    ok
}

fn sender(port: u16, token: &Path, w: u32, h: u32, truth: &Path) -> Child {
    Command::new(python())
        .arg(workspace_root().join("frame-bridge/python/rigbridge.py"))
        .args(["--port", &port.to_string(), "--token-file"])
        .arg(token)
        .args(["--width", &w.to_string(), "--height", &h.to_string()])
        // rig-sim flushes its frame clock's rows every 0.5 s (about 14 frames):
        // a queue of 32 holds such a burst, so frames are dropped only when the
        // network stalls.
        .args([
            "--queue",
            "32",
            "--sndbuf",
            "16384",
            "--from-now",
            "--truth",
        ])
        .arg(truth)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the Python sender")
}

fn json_u64(json: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\": ");
    let i = json.find(&pat).unwrap_or_else(|| panic!("{key} in {json}"));
    let rest = &json[i + pat.len()..];
    rest[..rest.find([',', '}']).expect("end")]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{key} in {json}"))
}

#[test]
fn the_python_sender_feeds_rigd_through_the_bridge_across_a_restart_and_a_stall() {
    if !has_numpy() {
        return;
    }
    let (w, h) = (128u32, 128u32);
    let shm = format!("/rig-e2e-{}-bridge", std::process::id());
    let sim_dir = TempDir::new("bridge-sim");
    let truth_dir = sim_dir.path().join("mtruth");
    let sim = Sim::start(
        sim_dir.path(),
        &[
            "--microscope-truth",
            truth_dir.to_str().expect("utf-8"),
            "--microscope-size",
            "32x32",
            "--neurons",
            "5",
        ],
    );
    let dir = TempDir::new("bridge");
    let socket = dir.path().join("rigd.sock");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data");
    let config = dir.path().join("rig.toml");
    std::fs::write(
        &config,
        format!(
            "[rig]\nserial_port = {:?}\n\n[storage]\ndata_root = {:?}\nfsync_interval_ms = 200\n\n\
             [control]\nsocket = {:?}\n\n[preview]\nenabled = false\n\n[imaging]\nenabled = true\n\
             shm_name = {shm:?}\nwidth = {w}\nheight = {h}\nchannels = 1\nttl_wired = true\n",
            sim.link.display().to_string(),
            data.display().to_string(),
            socket.display().to_string()
        ),
    )
    .expect("config");
    let bridge = Bridge::start(dir.path(), &shm, w, h);
    let proxy = Proxy::start(bridge.port);
    let rigd = Rigd::start(&config, &socket);
    wait_connected(&socket);
    std::thread::sleep(Duration::from_secs(2));
    let session = start_session(&socket, "BRG");
    // Frames written before rigd's ingest attached to the ring are not the
    // session's: start sending once it has.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(session.join("events.tsv"))
        .is_ok_and(|e| e.contains("imaging_attached"))
    {
        assert!(Instant::now() < deadline, "rigd never attached to the ring");
        std::thread::sleep(Duration::from_millis(50));
    }
    let truth = truth_dir.join("frames_truth.tsv");
    let token = token_file(dir.path());

    // Sender A runs, then crashes (SIGKILL): its queue and the frames until
    // sender B starts never arrive.
    let mut a = sender(proxy.port, &token, w, h, &truth);
    std::thread::sleep(Duration::from_secs(4));
    let _ = a.kill();
    let _ = a.wait();
    std::thread::sleep(Duration::from_millis(1500));
    let mut b = sender(proxy.port, &token, w, h, &truth);
    std::thread::sleep(Duration::from_secs(3));
    // The network stalls for 4 s: B's socket fills, its queue fills, and it
    // drops frames at the sender instead of blocking the acquisition.
    proxy.stalled.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(4));
    proxy.stalled.store(false, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(3));
    let _ = Command::new("kill")
        .args(["-TERM", &b.id().to_string()])
        .status();
    let mut json = String::new();
    b.stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut json)
        .expect("sender B's counts");
    assert!(b.wait().expect("wait").success(), "sender B: {json}");
    std::thread::sleep(Duration::from_millis(1500));
    stop_session(&socket);
    drop(rigd);
    let log = bridge.stop();
    drop(sim);
    unlink(&shm);

    eprintln!("sender B: {json}");
    eprintln!("session: {}", session.display());
    eprintln!("bridge:\n{log}");
    let b_dropped = json_u64(&json, "dropped");
    assert!(
        b_dropped > 0,
        "the stall made sender B drop frames at the sender: {json}"
    );
    let written: u64 = log
        .lines()
        .find(|l| l.contains("stopped:"))
        .and_then(|l| {
            l.split(", ")
                .find(|p| p.ends_with("frames written"))
                .and_then(|p| p.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or_else(|| panic!("frames written in the bridge's log:\n{log}"));

    let frames = read_tsv(&session.join("frames.tsv"));
    assert!(!frames.is_empty(), "frames.tsv has rows");
    let numbers: Vec<u64> = frames
        .iter()
        .map(|f| f["frame"].parse().expect("frame"))
        .collect();
    let first = numbers[0];
    // Every frame number from the first to the last has exactly one row:
    // nothing lost silently, nothing twice.
    assert_eq!(
        numbers,
        (first..first + numbers.len() as u64).collect::<Vec<_>>(),
        "frames.tsv accounts for every frame number once"
    );
    let dropped = frames.iter().filter(|f| f["dropped"] == "1").count() as u64;
    let stamped: Vec<_> = frames.iter().filter(|f| f["dropped"] == "0").collect();
    assert_eq!(
        stamped.len() as u64,
        written,
        "every frame the bridge wrote is a stamped row"
    );
    // The restart gap (about 1.5 s of frames) and the sender's drops.
    assert!(
        dropped >= b_dropped + 10,
        "{dropped} dropped rows: the restart gap and the {b_dropped} frames dropped at the sender"
    );
    assert!(stamped
        .iter()
        .all(|f| f["t_s"].parse::<f64>().is_ok_and(f64::is_finite)
            && (f["source"] == "ttl" || f["source"] == "mapped")));
    let ttl = stamped.iter().filter(|f| f["source"] == "ttl").count();
    assert!(
        ttl * 10 >= stamped.len() * 9,
        "the frames take their TTL edges ({ttl} of {})",
        stamped.len()
    );
    let events = std::fs::read_to_string(session.join("events.tsv")).expect("events");
    assert!(events.contains("frames_missing"), "the gaps are events");
}

/// Octave with the sockets package, or None (after checking
/// RIG_REQUIRE_OCTAVE, which turns a missing one into a failure).
fn octave() -> Option<PathBuf> {
    let exe = PathBuf::from(std::env::var_os("RIG_OCTAVE").unwrap_or_else(|| "octave".into()));
    let ok = Command::new(&exe)
        .args([
            "--no-gui",
            "--no-window-system",
            "--quiet",
            "--eval",
            "pkg load sockets",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(exe);
    }
    let msg = format!(
        "GNU Octave with the sockets package is needed to test the ScanImage user function \
         ({} not found, or `pkg load sockets` failed): install it with `sudo apt-get install \
         --no-install-recommends octave octave-sockets`",
        exe.display()
    );
    assert!(
        std::env::var_os("RIG_REQUIRE_OCTAVE").is_none(),
        "{msg} (RIG_REQUIRE_OCTAVE=1)"
    );
    eprintln!("skipped: {msg}");
    None
}

fn run_standin(
    octave: &Path,
    port: u16,
    token: &Path,
    frames: u32,
    w: u32,
    h: u32,
    pace_s: f64,
) -> String {
    let dir = workspace_root().join("frame-bridge/matlab/tests");
    let mut child = Command::new(octave)
        .args(["--no-gui", "--no-window-system", "--quiet", "--eval"])
        .arg(format!(
            "crash_dumps_octave_core(false); addpath('{}'); scanimage_standin({port}, '{}', {frames}, {w}, {h}, {pace_s})",
            dir.display(),
            token.display()
        ))
        // Octave writes `octave-workspace` into its working folder when it
        // is killed: keep it out of the checkout.
        .current_dir(token.parent().unwrap_or(Path::new("/tmp")))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run octave");
    // A user function that blocked on the network would never return.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the Octave run did not finish within 120 s: the user function blocked");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("octave output");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    stdout
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line:\n{stdout}\n{stderr}"))
        .to_owned()
}

fn field(result: &str, key: &str) -> u64 {
    result
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} in {result}"))
}

#[test]
fn the_scanimage_user_function_sends_every_frame_in_order_from_octave() {
    let Some(octave) = octave() else { return };
    let (w, h) = (64u32, 48u32);
    let shm = format!("/rig-e2e-{}-octave", std::process::id());
    let dir = TempDir::new("octave");
    let bridge = Bridge::start(dir.path(), &shm, w, h);
    let ring = FrameRingMapping::open(&shm).expect("the bridge made the ring");
    let mut reader = ring.reader().expect("reader");
    let frames = 60u32;
    let result = run_standin(
        &octave,
        bridge.port,
        &token_file(dir.path()),
        frames,
        w,
        h,
        0.02,
    );
    let mut px = vec![0u16; (w * h) as usize];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < frames as usize && Instant::now() < deadline {
        match reader.poll(&mut px).expect("poll") {
            PollOutcome::Frame(m) => {
                let k = m.frame_number as u16;
                // Line r, pixel c of the stand-in's image is r*w + c + k: the
                // frame arrives row-major, first line first.
                for i in [0usize, 1, w as usize, (w * h) as usize - 1] {
                    assert_eq!(px[i], i as u16 + k, "pixel {i} of frame {k}");
                }
                assert!(m.hw_timestamp_ns.is_some(), "the sender's stamp is kept");
                got.push(m.frame_number);
            }
            PollOutcome::NothingNew => std::thread::sleep(Duration::from_millis(5)),
            other => panic!("{other:?}"),
        }
    }
    drop(bridge);
    unlink(&shm);
    assert_eq!(got, (1..=u64::from(frames)).collect::<Vec<_>>(), "{result}");
    assert_eq!(field(&result, "sent"), u64::from(frames), "{result}");
    assert_eq!(field(&result, "dropped"), 0, "{result}");
    assert_eq!(field(&result, "written"), u64::from(frames), "{result}");
}

#[test]
fn the_scanimage_user_function_never_waits_for_a_receiver_that_stopped_reading() {
    let Some(octave) = octave() else { return };
    let (w, h) = (256u32, 256u32);
    let dir = TempDir::new("octave-stall");
    std::fs::write(token_file(dir.path()), TOKEN).expect("token");
    // A peer that accepts the hello and then never reads again.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut hello = [0u8; HELLO_LEN];
        s.read_exact(&mut hello).expect("hello");
        let h = Hello::decode(&hello).expect("a valid hello");
        let mut token = vec![0u8; h.token_len as usize];
        s.read_exact(&mut token).expect("token");
        assert_eq!(token, TOKEN.as_bytes());
        s.write_all(
            &Reply::Accept {
                next_frame_number: 0,
                frame_bytes: 256 * 256 * 2,
            }
            .encode(),
        )
        .expect("accept");
        while !done2.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let result = run_standin(&octave, port, &token_file(dir.path()), 300, w, h, 0.0);
    done.store(true, Ordering::Relaxed);
    peer.join().expect("peer");
    let dropped = field(&result, "dropped");
    let sent = field(&result, "sent");
    assert!(dropped > 0, "frames were dropped at the sender: {result}");
    assert!(sent < 300, "{result}");
    assert_eq!(field(&result, "queued") + dropped, 300, "{result}");
}

#[test]
fn the_python_sender_encodes_the_golden_vectors() {
    if !has_numpy() {
        return;
    }
    let out = Command::new(python())
        .arg("-c")
        .arg(
            "import sys; sys.path.insert(0, sys.argv[1]); import rigbridge as r\n\
             print(r.encode_hello(512, 512, 1, b'0123456789abcdef').hex())\n\
             print(r.SENDER_HEADER.pack(b'FRAM', 524288, 7, 123456789012, 1, 0, 3).hex())\n\
             print(r.SENDER_HEADER.pack(b'BEAT', 0, 0, 0, 1, 0, 3).hex())\n",
        )
        .arg(workspace_root().join("frame-bridge/python"))
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vectors =
        std::fs::read_to_string(workspace_root().join("frame-bridge/tests/vectors/wire.tsv"))
            .expect("vectors");
    let hex = |name: &str| {
        vectors
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}\t")))
            .and_then(|rest| rest.split('\t').next())
            .unwrap_or_else(|| panic!("vector {name}"))
            .to_owned()
    };
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        got,
        vec![
            hex("hello_512x512x1_token16"),
            hex("frame_header_7"),
            hex("beat")
        ]
    );
}
