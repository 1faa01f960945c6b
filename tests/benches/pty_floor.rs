//! The floor the pty puts under the control latency: a 24-byte message
//! bounced between two real-time threads through a real pty (master <->
//! slave, raw mode), with nothing else in the path. The daemon's sample ->
//! valve-command latency crosses the pty twice, so twice the one-way time here
//! is the least it can be.
//!
//! Run: `cargo bench -p rig-tests --bench pty_floor`.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use nix::pty::openpty;
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};

fn raw(fd: &OwnedFd) {
    let mut t = tcgetattr(fd.as_fd()).expect("tcgetattr");
    cfmakeraw(&mut t);
    tcsetattr(fd.as_fd(), SetArg::TCSANOW, &t).expect("tcsetattr");
}

fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let pty = openpty(None, None).expect("openpty");
    raw(&pty.slave);
    raw(&pty.master);
    let mut master = std::fs::File::from(pty.master);
    let mut slave = std::fs::File::from(pty.slave);
    let n = 20_000;
    let echo = std::thread::spawn(move || {
        let _ = firmware_bridge::rt::make_current_thread_realtime(60);
        let mut buf = [0u8; 24];
        for _ in 0..n {
            if slave.read_exact(&mut buf).is_err() {
                return;
            }
            let _ = slave.write_all(&buf);
        }
    });
    let realtime = firmware_bridge::rt::make_current_thread_realtime(50).is_ok();
    let msg = [0x55u8; 24];
    let mut buf = [0u8; 24];
    let mut rtt = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        master.write_all(&msg).expect("write");
        master.read_exact(&mut buf).expect("read");
        rtt.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let _ = echo.join();
    rtt.sort_by(f64::total_cmp);
    println!("pty round trip, 24-byte messages, {n} exchanges, real-time threads: {realtime}");
    println!("| | min µs | p50 µs | p99 µs | max µs |");
    println!("|---|---|---|---|---|");
    println!(
        "| round trip | {:.0} | {:.0} | {:.0} | {:.0} |",
        pct(&rtt, 0.0),
        pct(&rtt, 0.5),
        pct(&rtt, 0.99),
        pct(&rtt, 1.0)
    );
}
