//! Running under systemd: the `sd_notify(3)` protocol, hand-rolled (one
//! datagram of `KEY=value` lines to the Unix socket named by
//! `$NOTIFY_SOCKET`), and the watchdog that pings it only while the daemon
//! is alive. Without `$NOTIFY_SOCKET` everything here is a no-op.
//!
//! What rigd sends, and when:
//! * `READY=1` once the control socket listens and the link threads run
//!   (not waiting for the device: a rig with its USB cable out is still a
//!   running service, and says so in `STATUS=`);
//! * `STATUS=...` when the one-line summary changes (link state, session
//!   running for which mouse, or idle);
//! * `WATCHDOG=1` every `$WATCHDOG_USEC / 2` while both the async runtime
//!   (which runs the supervisor; the pinger is a task on it) and the serial link's
//!   reader thread (its beat in [`crate::metrics`]) have shown progress
//!   recently ([`StallCheck`]);
//! * `RELOADING=1` and then `READY=1` around a SIGHUP reload;
//! * `STOPPING=1` when a SIGTERM/SIGINT starts the shutdown.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The rig thread must have beaten within this long, at least, for a ping
/// (it is called every ~20 ms even with no device; see `firmware_bridge::link`).
pub const MIN_STALL_LIMIT: Duration = Duration::from_secs(1);

/// Where `sd_notify` messages go; [`Notifier::disabled`] drops them.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

/// Why `$NOTIFY_SOCKET` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0:?}: only a path (/run/...) or an abstract name (@...) is supported")]
    Unsupported(String),
    #[error("NOTIFY_SOCKET={addr:?}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Self { target: None }
    }

    /// From `$NOTIFY_SOCKET`; disabled (with a warning) if it is unusable,
    /// and disabled silently if it is not set.
    pub fn from_env() -> Self {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(addr) if !addr.is_empty() => match Self::for_address(&addr) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("systemd notifications off: {e}");
                    Self::disabled()
                }
            },
            _ => Self::disabled(),
        }
    }

    /// Send to `addr`: a filesystem path, or `@name` for an abstract socket.
    pub fn for_address(addr: &str) -> Result<Self, NotifyError> {
        let io = |source| NotifyError::Io {
            addr: addr.to_owned(),
            source,
        };
        let target = if let Some(name) = addr.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(io)?
        } else if addr.starts_with('/') {
            SocketAddr::from_pathname(addr).map_err(io)?
        } else {
            return Err(NotifyError::Unsupported(addr.to_owned()));
        };
        let socket = UnixDatagram::unbound().map_err(io)?;
        // A service manager that stops reading must not stall the supervisor.
        socket
            .set_write_timeout(Some(Duration::from_millis(200)))
            .map_err(io)?;
        Ok(Self {
            target: Some((socket, target)),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Send one message (newline-separated `KEY=value` assignments). A
    /// failure is logged (at debug: systemd may be gone at shutdown) and
    /// otherwise ignored; nothing in rigd depends on it.
    pub fn send(&self, message: &str) -> bool {
        let Some((socket, addr)) = &self.target else {
            return false;
        };
        match socket.send_to_addr(message.as_bytes(), addr) {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!("sd_notify {message:?} not sent: {e}");
                false
            }
        }
    }
}

/// The watchdog period asked for by the service manager: `$WATCHDOG_USEC`
/// when `$WATCHDOG_PID` is unset or is `pid` (pure; see [`watchdog_from_env`]).
pub fn watchdog_period(
    usec: Option<&str>,
    watchdog_pid: Option<&str>,
    pid: u32,
) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(p) = watchdog_pid {
        if p.trim().parse::<u32>().ok() != Some(pid) {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// [`watchdog_period`] from this process's environment.
pub fn watchdog_from_env() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_period(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// Decides, from a progress counter sampled at every ping time, whether the
/// thread behind it is alive: the counter must have moved within `limit`.
#[derive(Debug)]
pub struct StallCheck {
    limit: Duration,
    last_value: u64,
    last_change: Instant,
}

impl StallCheck {
    pub fn new(limit: Duration, value: u64, now: Instant) -> Self {
        Self {
            limit,
            last_value: value,
            last_change: now,
        }
    }

    /// Record the counter's `value` at `now`; `Err(for how long)` if it has
    /// not moved for longer than the limit.
    pub fn check(&mut self, value: u64, now: Instant) -> Result<(), Duration> {
        if value != self.last_value {
            self.last_value = value;
            self.last_change = now;
        }
        let still = now.saturating_duration_since(self.last_change);
        if still > self.limit {
            Err(still)
        } else {
            Ok(())
        }
    }
}

/// rigd's side of systemd: READY/STATUS/STOPPING and the watchdog task.
#[derive(Debug)]
pub struct Service {
    notifier: Arc<Notifier>,
    watchdog: Option<Duration>,
    pinger: Option<tokio::task::JoinHandle<()>>,
    /// The last status sent (the pinger re-sends it after a stall ends).
    status: Arc<Mutex<String>>,
}

impl Service {
    /// From the environment (`$NOTIFY_SOCKET`, `$WATCHDOG_USEC`, `$WATCHDOG_PID`).
    pub fn from_env() -> Self {
        let notifier = Notifier::from_env();
        let watchdog = if notifier.is_enabled() {
            watchdog_from_env()
        } else {
            None
        };
        Self::new(notifier, watchdog)
    }

    pub fn new(notifier: Notifier, watchdog: Option<Duration>) -> Self {
        Self {
            notifier: Arc::new(notifier),
            watchdog,
            pinger: None,
            status: Arc::default(),
        }
    }

    /// `READY=1` with the first status; starts the watchdog pings (a task on
    /// the current tokio runtime, which must be the supervisor's).
    pub fn ready(&mut self, status: String) {
        if !self.notifier.is_enabled() {
            return;
        }
        self.notifier
            .send(&format!("READY=1\nSTATUS={}", one_line(&status)));
        self.remember(status);
        tracing::info!("told systemd: ready");
        if let (Some(period), None) = (self.watchdog, &self.pinger) {
            let limit = (period / 2).max(MIN_STALL_LIMIT);
            self.pinger = Some(tokio::spawn(ping(
                self.notifier.clone(),
                period,
                limit,
                rig_thread_beats,
                self.status.clone(),
            )));
            tracing::info!("systemd watchdog: pinging every {:?}", period / 2);
        }
    }

    /// `STATUS=...` if `status` differs from the last one sent.
    pub fn set_status(&mut self, status: String) {
        if !self.notifier.is_enabled() || self.status.lock().is_ok_and(|s| *s == status) {
            return;
        }
        self.notifier.send(&format!("STATUS={}", one_line(&status)));
        self.remember(status);
    }

    /// `RELOADING=1` (a SIGHUP reload begins); [`Service::ready`] ends it.
    pub fn reloading(&mut self) {
        let usec = firmware_bridge::link::host_now_ns() / 1000;
        self.notifier
            .send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }

    /// `STOPPING=1` with a status.
    pub fn stopping(&mut self, status: String) {
        self.notifier
            .send(&format!("STOPPING=1\nSTATUS={}", one_line(&status)));
        self.remember(status);
    }

    fn remember(&self, status: String) {
        if let Ok(mut s) = self.status.lock() {
            *s = status;
        }
    }

    /// Stop the watchdog pings (before the link threads are stopped at
    /// exit, whose silence would otherwise read as a hang).
    pub fn stop_watchdog(&mut self) {
        if let Some(p) = self.pinger.take() {
            p.abort();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop_watchdog();
    }
}

/// A status value on one line (a newline would start a new assignment).
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn rig_thread_beats() -> u64 {
    crate::metrics::global().rig_thread_beats()
}

/// Every `period / 2`: `WATCHDOG=1` if `beats` (the rig thread's progress
/// counter) has moved within `stall_limit`. The runtime's own liveness needs
/// no counter: this task runs on it, so a core blocked in a synchronous call
/// stops the pings as well.
async fn ping(
    notifier: Arc<Notifier>,
    period: Duration,
    stall_limit: Duration,
    beats: fn() -> u64,
    status: Arc<Mutex<String>>,
) {
    let half = period / 2;
    let mut rig = StallCheck::new(stall_limit, beats(), Instant::now());
    let mut stalled = false;
    let mut tick = tokio::time::interval(half);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match rig.check(beats(), Instant::now()) {
            Ok(()) => {
                if stalled {
                    tracing::warn!(
                        "the serial link's reader thread is running again: watchdog pings resumed"
                    );
                    stalled = false;
                    if let Ok(s) = status.lock() {
                        notifier.send(&format!("STATUS={}", one_line(&s)));
                    }
                }
                notifier.send("WATCHDOG=1");
            }
            Err(still) => {
                if !stalled {
                    tracing::error!(
                        "the serial link's reader thread has shown no progress for {:.1} s: \
                         watchdog pings stopped, systemd will restart rigd",
                        still.as_secs_f64()
                    );
                    notifier.send(&format!(
                        "STATUS=rig thread hung for {:.1} s; waiting for the watchdog",
                        still.as_secs_f64()
                    ));
                    stalled = true;
                }
            }
        }
    }
}

/// The one-line status shown by `systemctl status rigd`.
pub fn status_text(
    state: protocol::control::SessionState,
    mouse: Option<&str>,
    link: Option<protocol::control::LinkState>,
    link_detail: Option<&str>,
) -> String {
    use protocol::control::{LinkState, SessionState};
    let link = match link {
        Some(LinkState::Connected) => "rig link up".to_owned(),
        Some(LinkState::Reconnecting) => "rig link reconnecting".to_owned(),
        Some(LinkState::Lost) => match link_detail {
            Some(d) if !d.is_empty() => format!("rig link down ({d})"),
            _ => "rig link down".to_owned(),
        },
        None => "rig link not connected yet".to_owned(),
    };
    let mouse = mouse.unwrap_or("?");
    match state {
        SessionState::Idle => format!("idle; {link}"),
        SessionState::Running => format!("session running for mouse {mouse}; {link}"),
        SessionState::Stopping => format!("stopping the session for mouse {mouse}; {link}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_period_honours_pid() {
        let d = Some(Duration::from_micros(400_000));
        assert_eq!(watchdog_period(Some("400000"), None, 42), d);
        assert_eq!(watchdog_period(Some("400000"), Some("42"), 42), d);
        assert_eq!(watchdog_period(Some("400000"), Some("41"), 42), None);
        assert_eq!(watchdog_period(Some("400000"), Some("x"), 42), None);
        assert_eq!(watchdog_period(Some("0"), None, 42), None);
        assert_eq!(watchdog_period(Some("soon"), None, 42), None);
        assert_eq!(watchdog_period(None, Some("42"), 42), None);
    }

    #[test]
    fn stall_check_needs_progress_within_the_limit() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let mut c = StallCheck::new(Duration::from_millis(1000), 5, t0);
        assert_eq!(c.check(5, s(900)), Ok(()));
        assert_eq!(c.check(6, s(1500)), Ok(()), "moved: fresh");
        assert_eq!(c.check(6, s(2400)), Ok(()));
        assert_eq!(c.check(6, s(2600)), Err(Duration::from_millis(1100)));
        assert_eq!(c.check(6, s(5000)), Err(Duration::from_millis(3500)));
        assert_eq!(c.check(7, s(5100)), Ok(()), "recovers");
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_and_to_an_abstract_name() {
        let dir = std::env::temp_dir().join(format!("rigd-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("n.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let n = Notifier::for_address(path.to_str().expect("utf-8")).expect("notifier");
        assert!(n.send("READY=1\nSTATUS=x"));
        assert_eq!(recv(&sock), "READY=1\nSTATUS=x");
        let _ = std::fs::remove_dir_all(&dir);

        let name = format!("rigd-notify-test-{}", std::process::id());
        let abs = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let sock = UnixDatagram::bind_addr(&abs).expect("bind abstract");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let n = Notifier::for_address(&format!("@{name}")).expect("notifier");
        assert!(n.send("WATCHDOG=1"));
        assert_eq!(recv(&sock), "WATCHDOG=1");
    }

    /// The pinger itself: pings while the counter moves, none once it has
    /// stood still for longer than the limit, pings again when it moves.
    #[tokio::test]
    async fn pings_stop_while_the_rig_thread_is_stuck() {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        static BEATS: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!("rigd-ping-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("n.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).expect("bind");
        sock.set_nonblocking(true).expect("nonblocking");
        let n = Notifier::for_address(path.to_str().expect("utf-8")).expect("notifier");
        let mut statuses = Vec::new();
        let mut pings = || {
            let mut buf = [0u8; 512];
            let mut k = 0;
            while let Ok(len) = sock.recv(&mut buf) {
                match std::str::from_utf8(&buf[..len]).expect("utf-8") {
                    "WATCHDOG=1" => k += 1,
                    other => statuses.push(other.to_owned()),
                }
            }
            k
        };
        // Pings every 50 ms; stuck after 200 ms without a beat.
        let task = tokio::spawn(ping(
            Arc::new(n),
            Duration::from_millis(100),
            Duration::from_millis(200),
            || BEATS.load(Relaxed),
            Arc::new(Mutex::new("idle; rig link up".to_owned())),
        ));
        let run = |beating: bool, ms: u64| async move {
            for _ in 0..ms / 10 {
                if beating {
                    BEATS.fetch_add(1, Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        run(true, 600).await;
        let alive = pings();
        run(false, 300).await;
        let _ = pings(); // the last pings before the limit ran out
        run(false, 400).await;
        let stuck = pings();
        run(true, 600).await;
        let again = pings();
        task.abort();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(alive >= 5, "{alive} pings in 600 ms while beating");
        assert_eq!(stuck, 0, "pings while the rig thread was stuck");
        assert!(again >= 5, "{again} pings in 600 ms after it recovered");
        assert_eq!(statuses.len(), 2, "{statuses:?}");
        assert!(statuses[0].starts_with("STATUS=rig thread hung for 0."));
        assert_eq!(statuses[1], "STATUS=idle; rig link up", "status restored");
    }

    #[test]
    fn unusable_addresses() {
        assert!(matches!(
            Notifier::for_address("vsock:2:1234"),
            Err(NotifyError::Unsupported(_))
        ));
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        assert!(!n.send("READY=1"));
    }

    #[test]
    fn status_lines() {
        use protocol::control::{LinkState, SessionState};
        assert_eq!(
            status_text(SessionState::Idle, None, None, None),
            "idle; rig link not connected yet"
        );
        assert_eq!(
            status_text(
                SessionState::Running,
                Some("M12"),
                Some(LinkState::Connected),
                Some("firmware 1.0.0")
            ),
            "session running for mouse M12; rig link up"
        );
        assert_eq!(
            status_text(
                SessionState::Idle,
                None,
                Some(LinkState::Lost),
                Some("/dev/ttyACM0: gone")
            ),
            "idle; rig link down (/dev/ttyACM0: gone)"
        );
        assert_eq!(one_line("a\nb"), "a b");
    }
}
