//! The control socket: a Unix domain socket speaking newline-delimited JSON
//! (`docs/protocol.md` section 3). Each connection gets its own task; requests
//! go to the daemon's core as [`CoreRequest`]s and the answers come back on a
//! oneshot. Subscribers get the event stream from a broadcast channel; a slow
//! subscriber loses events (and is told how many with a `lagged` event), it
//! never slows the daemon down. A malformed request gets an error answer and
//! the connection carries on; nothing a client sends can stop the daemon.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::control::{
    parse_request_line, ControlError, ErrorCode, Event, Request, RequestId, Response, SplitLine,
    MAX_LINE_BYTES,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::conns::{Admission, ConnGuard, ConnTable, Limits};
use crate::shutdown::ShutdownSignal;

/// Who is on the other end of a connection (from `SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "uid {} pid {}", self.uid, pid),
            None => write!(f, "uid {}", self.uid),
        }
    }
}

/// A request for the supervisor, with the channel its answer goes back on. The
/// answer is the success payload (a JSON object merged into `{"ok":true}`) or
/// an error.
#[derive(Debug)]
pub struct CoreRequest {
    pub request: Request,
    pub peer: Peer,
    pub reply: oneshot::Sender<Result<Value, ControlError>>,
}

use crate::session::EventsConsumer;
pub use crate::session::{event_line, EventLine};

/// Why the control socket could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(
        "another rigd is already listening on {}: stop it first, or set [control].socket to another path",
        .0.display()
    )]
    InUse(PathBuf),
    #[error(
        "refusing to replace {}: it is {kind}, not a socket; set [control].socket to a free \
         path (rigd only ever replaces a stale socket)",
        .path.display()
    )]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("[control].group = {0:?}: no such group")]
    NoGroup(String),
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Bind the control socket at `path` with permission bits `mode` (and group
/// `group`, if given). A stale socket file left by a crashed daemon is
/// replaced; a live one (another rigd answering) is an error.
pub async fn bind(path: &Path, mode: u32, group: Option<&str>) -> Result<UnixListener, BindError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| BindError::Io {
            action,
            path,
            source,
        }
    };
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io("create the directory", dir))?;
        }
    }
    // Only a socket is ever replaced (a stale one a killed rigd left), and
    // the path is not followed: a file, a folder or a symbolic link at the
    // configured path is someone else's.
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(BindError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io("remove the stale socket", path))?;
        }
        Ok(meta) => {
            let t = meta.file_type();
            let kind = if t.is_symlink() {
                "a symbolic link"
            } else if t.is_dir() {
                "a folder"
            } else if t.is_file() {
                "a regular file"
            } else {
                "not a socket"
            };
            return Err(BindError::NotASocket {
                path: path.to_owned(),
                kind,
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("look at", path)(e)),
    }
    let listener = UnixListener::bind(path).map_err(io("bind the control socket at", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("set the mode of", path))?;
    if let Some(group) = group {
        let g = nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .ok_or_else(|| BindError::NoGroup(group.to_owned()))?;
        nix::unistd::chown(path, None, Some(g.gid)).map_err(|e| BindError::Io {
            action: "give the group to",
            path: path.to_owned(),
            source: e.into(),
        })?;
    }
    Ok(listener)
}

/// At most this many control connections at once (see [`crate::conns`]).
pub const MAX_CONNECTIONS: usize = 64;

/// The control socket's limits: [`MAX_CONNECTIONS`]; a request line must be
/// complete 10 s after its first byte; a client that takes no byte of its
/// answers for 10 s is closed. (No idle limit: a subscriber may wait for
/// events for hours.)
pub const LIMITS: Limits = Limits {
    max_connections: MAX_CONNECTIONS,
    request_timeout: std::time::Duration::from_secs(10),
    idle_timeout: std::time::Duration::MAX,
    write_stall: std::time::Duration::from_secs(10),
};
/// Bytes of answers and events waiting for one client. Past this, the
/// client's requests wait (it is not read) and its events are dropped and
/// reported as `lagged`: a client that sends and never reads pins at most
/// this much (plus one line being read).
pub const MAX_QUEUED_BYTES: usize = 256 * 1024;

/// Accept connections until the shutdown begins, within `limits`
/// (normally [`LIMITS`]). The socket file is removed on the way out.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    limits: Limits,
    core: mpsc::Sender<CoreRequest>,
    events: broadcast::Sender<EventLine>,
    mut shutdown: ShutdownSignal,
) {
    let table = ConnTable::new(
        limits.max_connections,
        &crate::metrics::global().control_conns,
    );
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match table.admit() {
                    Admission::Admitted(guard) => {
                        let core = core.clone();
                        let events = events.clone();
                        let shutdown = shutdown.clone();
                        tokio::spawn(async move {
                            connection(stream, guard, limits, core, events, shutdown).await
                        });
                    }
                    Admission::Refused => refuse(&stream, table.cap()),
                },
                Err(e) => {
                    // Out of descriptors (or another transient error): wait
                    // rather than spin; the session's own descriptors are
                    // reserved (crate::conns::SESSION_FDS).
                    tracing::warn!("control socket accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.wait() => break,
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Tell a client it was not admitted (best effort: one non-blocking write),
/// then close.
fn refuse(stream: &UnixStream, cap: usize) {
    let line = Response::error(
        None,
        ErrorCode::Busy,
        format!("too many control connections ({cap}), all active; try again in a few seconds"),
    )
    .to_line();
    let _ = stream.try_write(&line);
}

/// How often the fan-out takes the rig thread's events.
const FAN_OUT_EVERY: std::time::Duration = std::time::Duration::from_millis(5);

/// Events for control-socket subscribers, in one order: the rig thread's
/// (from its ring: it never encodes or broadcasts itself) and the
/// supervisor's (session started / stopped), each encoded once and
/// broadcast as a line.
pub struct EventFanOut {
    ring: std::sync::Mutex<EventsConsumer>,
    events: broadcast::Sender<EventLine>,
}

impl std::fmt::Debug for EventFanOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventFanOut").finish_non_exhaustive()
    }
}

impl EventFanOut {
    pub fn new(ring: EventsConsumer, events: broadcast::Sender<EventLine>) -> Self {
        Self {
            ring: std::sync::Mutex::new(ring),
            events,
        }
    }

    /// Broadcast what the rig thread has handed over so far. (The lock is
    /// between the fan-out task and the supervisor only; the rig thread
    /// writes the ring's other end.)
    pub fn flush(&self) {
        use ringbuf::traits::Consumer;
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(event) = ring.try_pop() {
            // No subscribers is fine.
            let _ = self.events.send(event_line(&event));
        }
    }

    /// An event of the supervisor's, after every rig event before it.
    pub fn publish(&self, event: &Event) {
        self.flush();
        let _ = self.events.send(event_line(event));
    }

    /// Flush every few milliseconds until the shutdown, then once more.
    pub async fn run(self: std::sync::Arc<Self>, mut shutdown: ShutdownSignal) {
        let mut tick = tokio::time::interval(FAN_OUT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.wait() => true,
            };
            self.flush();
            if stopping {
                break;
            }
        }
    }
}

/// Lines waiting for one client's writer (their bytes are bounded by
/// [`MAX_QUEUED_BYTES`]).
const CLIENT_QUEUE: usize = 1024;

/// The bytes of one client's queue: a line takes its length (at most
/// [`MAX_QUEUED_BYTES`]) before it is queued and gives it back once written.
#[derive(Debug, Clone)]
struct OutQueue {
    tx: mpsc::Sender<EventLine>,
    bytes: Arc<tokio::sync::Semaphore>,
}

fn line_permits(line: &[u8]) -> u32 {
    u32::try_from(line.len().min(MAX_QUEUED_BYTES)).unwrap_or(u32::MAX)
}

impl OutQueue {
    /// Queue an answer, waiting while the client has too much unread.
    async fn send(&self, line: EventLine) -> Result<(), ()> {
        let permits = self
            .bytes
            .acquire_many(line_permits(&line))
            .await
            .map_err(|_| ())?;
        permits.forget();
        self.tx.send(line).await.map_err(|_| ())
    }

    /// Queue an event if there is room; `Err(true)` if the client is gone.
    fn try_send(&self, line: EventLine) -> Result<(), bool> {
        let Ok(permits) = self.bytes.try_acquire_many(line_permits(&line)) else {
            return Err(false);
        };
        match self.tx.try_send(line) {
            Ok(()) => {
                permits.forget();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(false),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(true),
        }
    }
}

async fn connection(
    stream: UnixStream,
    guard: ConnGuard,
    limits: Limits,
    core: mpsc::Sender<CoreRequest>,
    events: broadcast::Sender<EventLine>,
    mut shutdown: ShutdownSignal,
) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        },
        Err(e) => {
            tracing::warn!("control connection without peer credentials: {e}");
            Peer {
                uid: u32::MAX,
                gid: u32::MAX,
                pid: None,
            }
        }
    };
    let guard = Arc::new(guard);
    let (mut rd, mut wr) = stream.into_split();
    // One writer task per client: responses and events go through it in order.
    let (out_tx, mut out_rx) = mpsc::channel::<EventLine>(CLIENT_QUEUE);
    let bytes = Arc::new(tokio::sync::Semaphore::new(MAX_QUEUED_BYTES));
    let out = OutQueue {
        tx: out_tx,
        bytes: Arc::clone(&bytes),
    };
    let writer_guard = Arc::clone(&guard);
    let mut writer = tokio::spawn(async move {
        while let Some(line) = out_rx.recv().await {
            match tokio::time::timeout(limits.write_stall, wr.write_all(&line)).await {
                Ok(Ok(())) => {
                    writer_guard.touch();
                    bytes.add_permits(line_permits(&line) as usize);
                }
                Ok(Err(_)) => break,
                Err(_) => {
                    writer_guard.table().timed_out();
                    tracing::info!("control client {peer} stopped reading; closed");
                    break;
                }
            }
        }
        // A request waiting for room in the queue gives up at once.
        bytes.close();
    });
    let mut splitter = protocol::control::LineSplitter::with_limit(MAX_LINE_BYTES);
    let mut buf = vec![0u8; 8192];
    let mut subscribed: Option<tokio::task::JoinHandle<()>> = None;
    // When the partial line in the splitter must be complete.
    let mut line_due: Option<tokio::time::Instant> = None;
    'conn: loop {
        let n = tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            },
            _ = shutdown.wait() => break,
            _ = guard.evicted() => break,
            _ = &mut writer => break,
            _ = crate::conns::sleep_opt(line_due) => {
                guard.table().timed_out();
                let e = Response::error(
                    None,
                    ErrorCode::BadRequest,
                    format!(
                        "request incomplete after {:.1} s (a request is one line ending in a newline)",
                        limits.request_timeout.as_secs_f64()
                    ),
                );
                let _ = out.send(Arc::new(e.to_line())).await;
                break;
            }
        };
        if n == 0 {
            // Answer a last request sent without a newline, then close.
            if let Some(line) = splitter.finish() {
                let _ = handle_line(line, peer, &core, &events, &out, &mut subscribed).await;
            }
            break;
        }
        guard.touch();
        splitter.push(&buf[..n]);
        while let Some(line) = splitter.next_line() {
            if handle_line(line, peer, &core, &events, &out, &mut subscribed)
                .await
                .is_err()
            {
                break 'conn;
            }
        }
        line_due = match (splitter.buffered(), line_due) {
            (0, _) => None,
            (_, Some(due)) => Some(due),
            (_, None) => Some(tokio::time::Instant::now() + limits.request_timeout),
        };
    }
    if let Some(s) = subscribed {
        s.abort();
    }
    drop(out);
    if !writer.is_finished() {
        // Let the last answers go out, within the write limit.
        let _ = tokio::time::timeout(limits.write_stall, &mut writer).await;
        writer.abort();
    }
}

/// Handle one line; `Err` means the client is gone.
async fn handle_line(
    line: SplitLine,
    peer: Peer,
    core: &mpsc::Sender<CoreRequest>,
    events: &broadcast::Sender<EventLine>,
    out: &OutQueue,
    subscribed: &mut Option<tokio::task::JoinHandle<()>>,
) -> Result<(), ()> {
    let response = match line {
        SplitLine::TooLong => Response::from(ControlError::line_too_long()),
        SplitLine::Line(bytes) => match parse_request_line(&bytes) {
            Err(e) => Response::from(e),
            Ok(env) => {
                let id = env.id.clone();
                match env.request {
                    Request::Subscribe {} => {
                        if subscribed.is_none() {
                            *subscribed = Some(spawn_forwarder(events.subscribe(), out.clone()));
                        }
                        Response::ok_empty(id)
                    }
                    request => ask_core(request, peer, id, core).await,
                }
            }
        },
    };
    out.send(Arc::new(response.to_line())).await
}

async fn ask_core(
    request: Request,
    peer: Peer,
    id: Option<RequestId>,
    core: &mpsc::Sender<CoreRequest>,
) -> Response {
    let (tx, rx) = oneshot::channel();
    if core
        .send(CoreRequest {
            request,
            peer,
            reply: tx,
        })
        .await
        .is_err()
    {
        return Response::error(id, ErrorCode::Internal, "the daemon is shutting down");
    }
    match rx.await {
        Ok(Ok(payload)) => Response::ok(id, &payload),
        Ok(Err(e)) => Response::from(e.with_id(id)),
        Err(_) => Response::error(id, ErrorCode::Internal, "the daemon dropped the request"),
    }
}

/// Copy broadcast events to one client's queue, dropping (and counting) what
/// it cannot take.
fn spawn_forwarder(
    mut rx: broadcast::Receiver<EventLine>,
    out: OutQueue,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut dropped = 0u64;
        loop {
            let line = match rx.recv().await {
                Ok(line) => line,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    dropped += n;
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            };
            if dropped > 0 {
                let lagged = event_line(&Event::Lagged { dropped });
                if out.try_send(lagged).is_ok() {
                    dropped = 0;
                }
            }
            match out.try_send(line) {
                Ok(()) => {}
                Err(false) => dropped += 1,
                Err(true) => break,
            }
        }
    })
}

#[cfg(test)]
mod bind_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rigd-bind-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test(flavor = "current_thread")]
    async fn only_a_stale_socket_is_ever_replaced() {
        let d = dir("kinds");
        // A file someone keeps at the configured path stays as it was.
        let file = d.join("notes.txt");
        std::fs::write(&file, "day 3").unwrap();
        let e = bind(&file, 0o660, None).await.unwrap_err();
        assert!(
            matches!(
                e,
                BindError::NotASocket {
                    kind: "a regular file",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("[control].socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "day 3");
        // A symbolic link is not followed, even to a stale socket.
        let stale = d.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let link = d.join("link.sock");
        std::os::unix::fs::symlink(&stale, &link).unwrap();
        let e = bind(&link, 0o660, None).await.unwrap_err();
        assert!(
            matches!(
                e,
                BindError::NotASocket {
                    kind: "a symbolic link",
                    ..
                }
            ),
            "{e}"
        );
        // A folder neither.
        let e = bind(&d, 0o660, None).await.unwrap_err();
        assert!(
            matches!(
                e,
                BindError::NotASocket {
                    kind: "a folder",
                    ..
                }
            ),
            "{e}"
        );
        // A stale socket (nobody listening) is replaced; a live one is not.
        let live = bind(&stale, 0o660, None).await.unwrap();
        let e = bind(&stale, 0o660, None).await.unwrap_err();
        assert!(matches!(e, BindError::InUse(_)), "{e}");
        drop(live);
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[cfg(test)]
mod limit_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncBufReadExt;

    /// A control socket in a temp folder with `limits`, whose core answers
    /// every request with `{"state":"idle"}`.
    async fn server(name: &str, limits: Limits) -> (PathBuf, crate::shutdown::Shutdown) {
        let d = std::env::temp_dir().join(format!("rigd-limits-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join("c.sock");
        let listener = bind(&path, 0o600, None).await.unwrap();
        let (core_tx, mut core_rx) = mpsc::channel::<CoreRequest>(64);
        tokio::spawn(async move {
            while let Some(r) = core_rx.recv().await {
                let _ = r.reply.send(Ok(serde_json::json!({"state": "idle"})));
            }
        });
        let (events, _) = broadcast::channel(16);
        let shutdown = crate::shutdown::Shutdown::new();
        tokio::spawn(serve(
            listener,
            path.clone(),
            limits,
            core_tx,
            events,
            shutdown.signal(),
        ));
        (path, shutdown)
    }

    fn limits(max_connections: usize) -> Limits {
        Limits {
            max_connections,
            request_timeout: Duration::from_millis(300),
            idle_timeout: Duration::MAX,
            write_stall: Duration::from_millis(300),
        }
    }

    async fn read_all(s: &mut UnixStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
            .await
            .expect("closed by the server")
            .ok();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_incomplete_request_is_answered_then_closed() {
        let (path, _sd) = server("partial", limits(4)).await;
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"{\"cmd\":\"sta").await.unwrap();
        let text = read_all(&mut s).await;
        assert!(text.contains("request incomplete"), "{text}");
        assert!(text.contains("bad_request"), "{text}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_client_that_never_reads_is_closed_having_pinned_little() {
        let (path, _sd) = server("unread", limits(4)).await;
        let s = UnixStream::connect(&path).await.unwrap();
        let line = format!("{{\"cmd\":\"status\",\"id\":\"{}\"}}\n", "y".repeat(60_000));
        // Send until the server stops taking requests (its queue for this
        // client is full), then until it closes the connection.
        let mut sent = 0usize;
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                s.writable().await.unwrap();
                match s.try_write(line.as_bytes()) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(_) => break,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "still open after {sent} bytes");
        // What the server read before it stopped: its answer queue (256 KiB)
        // plus what one read and the kernel's buffers hold.
        assert!(sent < 8 << 20, "the server kept reading: {sent} bytes");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn at_the_cap_a_quiet_client_makes_room_and_an_active_one_does_not() {
        let (path, _sd) = server("cap", limits(1)).await;
        // A talks, so B is refused with a reason.
        let mut a = UnixStream::connect(&path).await.unwrap();
        a.write_all(b"{\"cmd\":\"status\"}\n").await.unwrap();
        let mut first = String::new();
        tokio::io::BufReader::new(&mut a)
            .read_line(&mut first)
            .await
            .unwrap();
        assert!(first.contains("\"ok\":true"), "{first}");
        let mut b = UnixStream::connect(&path).await.unwrap();
        let text = read_all(&mut b).await;
        assert!(text.contains("too many control connections"), "{text}");
        assert!(text.contains("busy"), "{text}");
        // Once A has been quiet for EVICTABLE_AFTER, C takes its place.
        tokio::time::sleep(crate::conns::EVICTABLE_AFTER + Duration::from_millis(200)).await;
        let mut c = UnixStream::connect(&path).await.unwrap();
        c.write_all(b"{\"cmd\":\"status\"}\n").await.unwrap();
        let mut line = String::new();
        tokio::io::BufReader::new(&mut c)
            .read_line(&mut line)
            .await
            .unwrap();
        assert!(line.contains("\"ok\":true"), "{line}");
        assert_eq!(read_all(&mut a).await, "", "A was closed");
    }
}
