//! Connection budgets for the two servers that face other processes (the
//! preview's HTTP port and the control socket), so that no client, careless
//! or hostile, can take the descriptors or the memory a session needs.
//!
//! Each server has a [`ConnTable`] of at most `cap` connections. A new
//! connection is admitted while there is room; at the cap, the connection
//! that has moved no byte for the longest is closed to make room if it has
//! been quiet for at least [`EVICTABLE_AFTER`] (an idle or non-reading client
//! loses its place to one that wants to talk); otherwise the newcomer is
//! refused at once. Either way the server keeps accepting, so the kernel's
//! backlog never fills with connections nobody will serve.
//!
//! [`Watched`] wraps a connection's stream: every byte moved marks the
//! connection active, and a connection that moves nothing (in either
//! direction) for its idle limit, or whose peer stops reading for its write
//! limit, ends with `TimedOut`.
//!
//! How the budget protects the session is in `docs/ARCHITECTURE.md`
//! ("Resource limits"): the caps times the per-connection bounds are far
//! below the process's descriptor limit (raised at start by
//! [`raise_fd_limit`]) and a few MB of memory.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

pub use crate::metrics::ConnCounters;

/// A connection quiet for at least this long may be closed to admit a new
/// one when its server is at its cap.
pub const EVICTABLE_AFTER: Duration = Duration::from_secs(2);

/// One server's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections at once.
    pub max_connections: usize,
    /// A request (a control line, an HTTP request's headers) must be
    /// complete this long after it began.
    pub request_timeout: Duration,
    /// A connection that moves no byte for this long is closed (the preview
    /// only: a control subscriber may wait for events for hours).
    pub idle_timeout: Duration,
    /// A client that takes no byte of what it is sent for this long is closed.
    pub write_stall: Duration,
}

/// One admitted connection's slot.
#[derive(Debug)]
struct Slot {
    /// Milliseconds since the table's epoch at the last byte moved.
    last_active_ms: AtomicU64,
    evicted: AtomicBool,
    wake: Notify,
}

/// The connections of one server. See the module docs.
#[derive(Debug)]
pub struct ConnTable {
    cap: usize,
    epoch: Instant,
    slots: Mutex<Vec<Arc<Slot>>>,
    counters: &'static ConnCounters,
}

/// The answer to [`ConnTable::admit`].
#[derive(Debug)]
pub enum Admission {
    /// Room was free, or a quiet connection was closed to make some.
    Admitted(ConnGuard),
    /// The table is full of connections that are all active: refuse.
    Refused,
}

impl ConnTable {
    pub fn new(cap: usize, counters: &'static ConnCounters) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            epoch: Instant::now(),
            slots: Mutex::new(Vec::with_capacity(cap)),
            counters,
        })
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Connections admitted and not yet closed.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Admit a new connection, closing the quietest one if the table is full
    /// and it has been quiet for [`EVICTABLE_AFTER`].
    pub fn admit(self: &Arc<Self>) -> Admission {
        let now = self.now_ms();
        let mut slots = self.lock();
        if slots.len() >= self.cap {
            let quiet_ms = u64::try_from(EVICTABLE_AFTER.as_millis()).unwrap_or(u64::MAX);
            let victim = slots
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.evicted.load(Ordering::Acquire))
                .min_by_key(|(_, s)| s.last_active_ms.load(Ordering::Relaxed))
                .filter(|(_, s)| {
                    now.saturating_sub(s.last_active_ms.load(Ordering::Relaxed)) >= quiet_ms
                })
                .map(|(i, _)| i);
            let Some(i) = victim else {
                self.counters.refused.inc();
                return Admission::Refused;
            };
            // The evicted connection's guard no longer holds a place: its
            // task ends as soon as it is woken (its socket closes then).
            let s = slots.swap_remove(i);
            s.evicted.store(true, Ordering::Release);
            s.wake.notify_one();
            self.counters.evicted.inc();
        }
        let slot = Arc::new(Slot {
            last_active_ms: AtomicU64::new(now),
            evicted: AtomicBool::new(false),
            wake: Notify::new(),
        });
        slots.push(Arc::clone(&slot));
        Admission::Admitted(ConnGuard {
            table: Arc::clone(self),
            slot,
        })
    }

    /// A connection ended by one of its time limits.
    pub fn timed_out(&self) {
        self.counters.timed_out.inc();
    }
}

/// An admitted connection's place in its [`ConnTable`]; dropping it frees
/// the place.
#[derive(Debug)]
pub struct ConnGuard {
    table: Arc<ConnTable>,
    slot: Arc<Slot>,
}

impl ConnGuard {
    /// The connection moved a byte.
    pub fn touch(&self) {
        self.slot
            .last_active_ms
            .store(self.table.now_ms(), Ordering::Relaxed);
    }

    /// Resolves when the connection was closed to make room for another.
    pub async fn evicted(&self) {
        loop {
            if self.slot.evicted.load(Ordering::Acquire) {
                return;
            }
            let notified = self.slot.wake.notified();
            if self.slot.evicted.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    pub fn table(&self) -> &Arc<ConnTable> {
        &self.table
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut slots = self.table.lock();
        if let Some(i) = slots.iter().position(|s| Arc::ptr_eq(s, &self.slot)) {
            slots.swap_remove(i);
        }
    }
}

/// A stream that marks its connection active on every byte moved, and fails
/// with `TimedOut` when nothing moved for `idle`, or when a write could not
/// proceed for `write_stall` (the peer stopped reading).
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    guard: Arc<ConnGuard>,
    idle: Duration,
    write_stall: Duration,
    /// Deadline of the idle limit (reset on every byte moved).
    idle_timer: Pin<Box<Sleep>>,
    /// Set while a write is waiting for the peer.
    stall_timer: Option<Pin<Box<Sleep>>>,
}

/// `now + d`, or a year from now when `d` is longer (`Duration::MAX`
/// means "no limit").
fn far(now: Instant, d: Duration) -> Instant {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    now + d.min(YEAR)
}

impl<S> Watched<S> {
    pub fn new(inner: S, guard: Arc<ConnGuard>, idle: Duration, write_stall: Duration) -> Self {
        Self {
            inner,
            guard,
            idle,
            write_stall,
            idle_timer: Box::pin(tokio::time::sleep_until(far(Instant::now(), idle))),
            stall_timer: None,
        }
    }

    fn moved(&mut self) {
        self.guard.touch();
        let deadline = far(Instant::now(), self.idle);
        self.idle_timer.as_mut().reset(deadline);
    }

    /// After a write: progress marks the connection active and ends a
    /// stall; a write still waiting starts (or checks) the stall limit.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => {
                self.stall_timer = None;
                if n > 0 {
                    self.moved();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let stall = self.write_stall;
                let timer = self.stall_timer.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(far(Instant::now(), stall)))
                });
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(self.timed_out("peer stopped reading")));
                }
                Poll::Pending
            }
        }
    }

    fn timed_out(&self, what: &str) -> io::Error {
        self.guard.table().timed_out();
        io::Error::new(io::ErrorKind::TimedOut, what.to_owned())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.moved();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.idle_timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(this.timed_out("connection idle")));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        this.wrote(cx, r)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The descriptor budget rigd asks for: its soft `RLIMIT_NOFILE` is raised
/// to this (or to the hard limit, if lower).
pub const WANTED_FDS: u64 = 8192;

/// Descriptors a session needs beside the servers' connections: the session
/// files, the serial port (and a re-open after a replug), the shared-memory
/// ring, logs, sockets, threads' pipes, with a wide margin.
pub const SESSION_FDS: u64 = 256;

/// The soft descriptor limit after trying to raise it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raise this process's soft `RLIMIT_NOFILE` to [`WANTED_FDS`] (or the hard
/// limit, if lower); never lowers it.
pub fn raise_fd_limit() -> io::Result<FdLimit> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    let want = WANTED_FDS.min(hard).max(soft);
    if want > soft {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard).map_err(io::Error::from)?;
    }
    Ok(FdLimit {
        before: soft,
        soft: want,
        hard,
    })
}

/// The servers' connection caps fit in `soft` descriptors with
/// [`SESSION_FDS`] to spare: `(preview, control)`, lowered in proportion
/// when the limit is too low for the wanted caps.
pub fn fit_caps(soft: u64, preview: usize, control: usize) -> (usize, usize) {
    let wanted = (preview + control) as u64;
    let room = soft.saturating_sub(SESSION_FDS);
    if wanted <= room {
        return (preview, control);
    }
    let scale = |n: usize| -> usize {
        let v = (n as u64).saturating_mul(room) / wanted.max(1);
        usize::try_from(v).unwrap_or(usize::MAX).max(1)
    };
    (scale(preview), scale(control))
}

/// Resolves after `d`, or never if `d` is `None`.
pub async fn sleep_opt(d: Option<Instant>) {
    match d {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn counters() -> &'static ConnCounters {
        Box::leak(Box::default())
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_full_table_evicts_only_a_quiet_connection() {
        let c = counters();
        let t = ConnTable::new(2, c);
        let Admission::Admitted(a) = t.admit() else {
            panic!("room")
        };
        tokio::time::advance(Duration::from_millis(500)).await;
        let Admission::Admitted(b) = t.admit() else {
            panic!("room")
        };
        // Both active within the last 2 s: refused.
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert!(matches!(t.admit(), Admission::Refused));
        assert_eq!(c.refused.get(), 1);
        // a has been quiet 2.5 s, b 2 s; b talks, so a is the one to go.
        tokio::time::advance(Duration::from_millis(1000)).await;
        b.touch();
        let Admission::Admitted(n) = t.admit() else {
            panic!("a quiet connection makes room")
        };
        assert_eq!(c.evicted.get(), 1);
        tokio::time::timeout(Duration::from_millis(1), a.evicted())
            .await
            .expect("a is told");
        assert_eq!(t.len(), 2);
        // Dropping the evicted guard frees nothing more (it had no place).
        drop(a);
        assert_eq!(t.len(), 2);
        drop(n);
        assert_eq!(t.len(), 1);
        drop(b);
        assert!(t.is_empty());
    }

    #[test]
    fn caps_fit_in_the_descriptor_limit() {
        assert_eq!(fit_caps(8192, 128, 64), (128, 64));
        assert_eq!(fit_caps(448, 128, 64), (128, 64));
        let (p, c) = fit_caps(352, 128, 64);
        assert!(p + c <= 96 && p >= 1 && c >= 1, "{p} {c}");
        let (p, c) = fit_caps(10, 128, 64);
        assert_eq!((p, c), (1, 1));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_silent_peer_and_a_peer_that_does_not_read_time_out() {
        let c = counters();
        let t = ConnTable::new(4, c);
        let Admission::Admitted(g) = t.admit() else {
            panic!()
        };
        let (a, _b) = tokio::io::duplex(64);
        let mut w = Watched::new(
            a,
            Arc::new(g),
            Duration::from_secs(5),
            Duration::from_secs(3),
        );
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 8];
        let e = w.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // The peer never reads: the 64-byte pipe fills, then the write stalls.
        let e = w.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(c.timed_out.get(), 2);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn no_limit_means_no_limit() {
        let t = ConnTable::new(1, counters());
        let Admission::Admitted(g) = t.admit() else {
            panic!()
        };
        let (a, mut b) = tokio::io::duplex(64);
        let mut w = Watched::new(a, Arc::new(g), Duration::MAX, Duration::MAX);
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        b.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        w.read_exact(&mut buf).await.unwrap();
        // Silent for a day: still open (the outer timeout ends the wait).
        let r = tokio::time::timeout(Duration::from_secs(86_400), w.read(&mut buf)).await;
        assert!(r.is_err(), "{r:?}");
    }
}
