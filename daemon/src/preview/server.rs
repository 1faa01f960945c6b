//! The preview's HTTP server: read-only routes over a [`PreviewState`].

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use super::state::{Cursor, PreviewState};
use crate::conns::{Admission, ConnTable, Limits, Watched};

/// How often an SSE connection gets what is new.
pub const TICK: Duration = Duration::from_millis(200);
/// At most this many SSE connections at once (more get 503).
pub const MAX_STREAMS: usize = 16;

const PAGE_HTML: &str = include_str!("page.html");
const PAGE_JS: &str = include_str!("page.js");
const PAGE_CSS: &str = include_str!("page.css");

/// Why the preview could not start.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    /// A non-loopback address without `allow_non_loopback`.
    #[error(
        "refusing to serve the preview on non-loopback address {0}: the page shows live \
         experiment data to anyone who can reach it; set [preview] allow_non_loopback = true \
         to allow this, or bind 127.0.0.1"
    )]
    NonLoopback(IpAddr),
    /// `[preview] bind` is not an IP address.
    #[error("[preview] bind {0:?} is not an IP address")]
    BadAddress(String),
    /// The preview is disabled in the config.
    #[error("the preview is disabled ([preview] enabled = false)")]
    Disabled,
    /// Binding or serving failed.
    #[error("preview server on {addr}: {source}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The preview's thread or its runtime could not be started (the
    /// process is out of threads or memory).
    #[error("cannot start the preview's {what}: {source}")]
    Start {
        /// `thread` or `runtime`.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A bug: the preview's thread panicked.
    #[error("the preview thread panicked")]
    Panicked,
}

#[derive(Debug, Clone)]
struct App {
    state: Arc<PreviewState>,
    shutdown: watch::Receiver<bool>,
    streams: Arc<AtomicUsize>,
    loopback_only: bool,
}

/// Bind the preview's listening socket (non-blocking, for tokio), refusing a
/// non-loopback address unless `allow_non_loopback`. Port 0 picks a free port.
pub fn bind_listener(
    bind: IpAddr,
    port: u16,
    allow_non_loopback: bool,
) -> Result<std::net::TcpListener, PreviewError> {
    if !bind.is_loopback() && !allow_non_loopback {
        return Err(PreviewError::NonLoopback(bind));
    }
    let addr = SocketAddr::new(bind, port);
    let io = |source| PreviewError::Io { addr, source };
    let l = std::net::TcpListener::bind(addr).map_err(io)?;
    l.set_nonblocking(true).map_err(io)?;
    Ok(l)
}

/// Serve the preview on `bind:port` until `shutdown` becomes true (or its
/// sender is dropped). Refuses a non-loopback `bind` unless
/// `allow_non_loopback`.
pub async fn serve(
    bind: IpAddr,
    port: u16,
    allow_non_loopback: bool,
    state: Arc<PreviewState>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), PreviewError> {
    let l = bind_listener(bind, port, allow_non_loopback)?;
    let addr = SocketAddr::new(bind, port);
    let l =
        tokio::net::TcpListener::from_std(l).map_err(|source| PreviewError::Io { addr, source })?;
    serve_listener(l, state, shutdown, LIMITS).await
}

/// At most this many preview connections at once (see [`crate::conns`]).
pub const MAX_CONNECTIONS: usize = 128;

/// The preview's limits: [`MAX_CONNECTIONS`]; a request's headers must
/// arrive within 10 s; a connection that moves no byte for 30 s is closed (an
/// open event stream moves bytes every [`TICK`]); a client that takes no
/// byte of its response for 10 s is closed.
pub const LIMITS: Limits = Limits {
    max_connections: MAX_CONNECTIONS,
    request_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(30),
    write_stall: Duration::from_secs(10),
};

/// What a client gets when every connection is in use and active.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
Retry-After: 5\r\nContent-Length: 39\r\nConnection: close\r\n\r\npreview: too many connections, all busy\n";

/// Serve the preview on an already bound listener until `shutdown` becomes
/// true (or its sender is dropped), within `limits` (normally [`LIMITS`]).
/// Open SSE streams end at shutdown too.
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    state: Arc<PreviewState>,
    shutdown: watch::Receiver<bool>,
    limits: Limits,
) -> Result<(), PreviewError> {
    let addr = listener.local_addr().map_err(|source| PreviewError::Io {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let app = App {
        state,
        shutdown: shutdown.clone(),
        streams: Arc::new(AtomicUsize::new(0)),
        loopback_only: addr.ip().is_loopback(),
    };
    let service = hyper_util::service::TowerToHyperService::new(router(app));
    let table = ConnTable::new(
        limits.max_connections,
        &crate::metrics::global().preview_conns,
    );
    let mut rx = shutdown;
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = rx.wait_for(|&stop| stop) => break,
        };
        // Reap finished connection tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, or a connection reset before accept:
                // wait rather than spin (the session's descriptors are
                // reserved, crate::conns::SESSION_FDS).
                tracing::debug!("preview accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let guard = match table.admit() {
            Admission::Admitted(g) => Arc::new(g),
            Admission::Refused => {
                let _ = stream.try_write(REFUSED);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let io = hyper_util::rt::TokioIo::new(Watched::new(
            stream,
            Arc::clone(&guard),
            limits.idle_timeout,
            limits.write_stall,
        ));
        let service = service.clone();
        let mut stop = rx.clone();
        tasks.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.request_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(io, service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = guard.evicted() => {}
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
            }
        });
    }
    tasks.shutdown().await;
    Ok(())
}

/// Resolves when `stop` becomes true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|&s| s).await;
}

fn router(app: App) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/page.js", get(page_js))
        .route("/page.css", get(page_css))
        .route("/events", get(events))
        .route("/api/state", get(api_state))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// Every response: no caching, no sniffing, same-origin only. On a loopback
/// bind, a request whose `Host` is not a loopback name is refused (so a web
/// page elsewhere cannot read the preview through DNS rebinding).
async fn guard(State(app): State<App>, req: Request, next: Next) -> Response {
    if app.loopback_only && !host_is_loopback(req.headers()) {
        return (
            StatusCode::FORBIDDEN,
            "preview: Host must be a loopback address\n",
        )
            .into_response();
    }
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    res
}

fn host_is_loopback(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        // HTTP/1.0 without Host: not a browser.
        return true;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(n, _)| n)
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

async fn page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        PAGE_HTML,
    )
}

async fn page_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        PAGE_JS,
    )
}

async fn page_css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        PAGE_CSS,
    )
}

async fn api_state(State(app): State<App>) -> Response {
    let snap = app.state.snapshot();
    match serde_json::to_string(&snap) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The daemon's counters in the Prometheus text format ([`crate::metrics`]).
async fn metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::global().render(),
    )
}

/// Decrements the open-stream count when a stream ends.
#[derive(Debug)]
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Stream {
    state: Arc<PreviewState>,
    cursor: Cursor,
    interval: tokio::time::Interval,
    shutdown: watch::Receiver<bool>,
    _slot: StreamSlot,
}

async fn events(State(app): State<App>) -> Response {
    if app.streams.fetch_add(1, Ordering::AcqRel) >= MAX_STREAMS {
        app.streams.fetch_sub(1, Ordering::AcqRel);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "preview: too many open event streams\n",
        )
            .into_response();
    }
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let st = Stream {
        state: app.state,
        cursor: Cursor::default(),
        interval,
        shutdown: app.shutdown,
        _slot: StreamSlot(app.streams),
    };
    let stream = futures_util::stream::unfold(st, |mut s| async move {
        // The first tick fires at once: the snapshot goes out immediately.
        tokio::select! {
            _ = s.interval.tick() => {}
            r = s.shutdown.changed() => {
                if r.is_err() || *s.shutdown.borrow() {
                    return None;
                }
            }
        }
        if *s.shutdown.borrow() {
            return None;
        }
        let up = s.state.update_since(&mut s.cursor);
        let json = serde_json::to_string(&up).unwrap_or_else(|_| "{}".to_owned());
        Some((Ok::<Event, Infallible>(Event::default().data(json)), s))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// A running preview server (its own thread and single-threaded runtime, so
/// a slow browser never competes with the daemon's runtime). Dropping it
/// asks the server to stop without waiting.
#[derive(Debug)]
pub struct PreviewHandle {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<Result<(), PreviewError>>>,
}

impl PreviewHandle {
    /// Stop the server (closing open event streams) and wait for its thread.
    pub fn shutdown(mut self) -> Result<(), PreviewError> {
        let _ = self.stop.send(true);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| PreviewError::Panicked)?,
            None => Ok(()),
        }
    }
}

impl Drop for PreviewHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Start the preview as configured by `[preview]`: bind now (so a bad
/// address or a taken port is an error here, and port 0 reports the port it
/// got), then serve on a thread of its own. Returns the bound address.
pub fn start_preview(
    cfg: &rig_config::PreviewSection,
    state: Arc<PreviewState>,
    limits: Limits,
) -> Result<(SocketAddr, PreviewHandle), PreviewError> {
    if !cfg.enabled {
        return Err(PreviewError::Disabled);
    }
    let ip = cfg
        .bind_addr()
        .ok_or_else(|| PreviewError::BadAddress(cfg.bind.clone()))?;
    let std_listener = bind_listener(ip, cfg.port, cfg.allow_non_loopback)?;
    let requested = SocketAddr::new(ip, cfg.port);
    let addr = std_listener
        .local_addr()
        .map_err(|source| PreviewError::Io {
            addr: requested,
            source,
        })?;
    let (stop, rx) = watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("rigd-preview".to_owned())
        .spawn(move || -> Result<(), PreviewError> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| PreviewError::Start {
                    what: "runtime",
                    source,
                })?;
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(std_listener)
                    .map_err(|source| PreviewError::Io { addr, source })?;
                serve_listener(l, state, rx, limits).await
            })
        })
        .map_err(|source| PreviewError::Start {
            what: "thread",
            source,
        })?;
    Ok((
        addr,
        PreviewHandle {
            stop,
            thread: Some(thread),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preview::Health;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn cfg(bind: &str, allow: bool) -> rig_config::PreviewSection {
        rig_config::PreviewSection {
            enabled: true,
            bind: bind.to_owned(),
            port: 0,
            allow_non_loopback: allow,
        }
    }

    /// A raw HTTP/1.1 request; returns (status, headers+body text).
    async fn request(addr: SocketAddr, method: &str, path: &str, host: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .expect("response in time")
            .expect("read");
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status line");
        (status, text)
    }

    fn body(resp: &str) -> &str {
        resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }

    #[test]
    fn every_health_number_has_a_unit_column_and_a_meaning() {
        let table = PAGE_HTML
            .split_once("<table id=\"health\">")
            .and_then(|(_, t)| t.split_once("</table>"))
            .map(|(t, _)| t)
            .expect("the health table");
        let rows: Vec<&str> = table.split("<tr").skip(1).collect();
        assert!(rows.len() >= 10, "{} rows", rows.len());
        for r in rows {
            let title = r
                .split_once("title=\"")
                .and_then(|(_, t)| t.split_once('"'))
                .map_or("", |(t, _)| t);
            assert!(title.len() > 20, "a row without its meaning: {r}");
            assert!(
                r.contains("class=\"unit\""),
                "a row without a unit cell: {r}"
            );
        }
        for (id, unit) in [
            ("h-latency", "µs"),
            ("h-clock", "± µs"),
            ("h-lost", "samples"),
            ("h-records", "records"),
            ("h-water", "µL"),
        ] {
            let row = table
                .split("<tr")
                .find(|r| r.contains(&format!("id=\"{id}\"")))
                .unwrap_or_else(|| panic!("no {id}"));
            assert!(
                row.contains(&format!("<td class=\"unit\">{unit}</td>")),
                "{id}: {row}"
            );
        }
    }

    fn filled() -> Arc<PreviewState> {
        let s = Arc::new(PreviewState::new());
        for i in 0..3000u64 {
            #[allow(clippy::cast_precision_loss)]
            s.push_lever(i * 1000, (i % 100) as f32 / 10.0);
        }
        for i in 0..90u64 {
            s.push_dff(i * 33_333, &[0.1, 0.2, f32::NAN]);
        }
        s.push_trial(1, "rewarded", 100_000, Some(0.35));
        s.push_trial(2, "miss", 1_500_000, None);
        s.set_rois(
            vec![vec![(1, 1), (5, 1), (5, 5)], vec![(8, 8), (9, 9)], vec![]],
            vec!["excitatory".into(), "inhibitory".into(), String::new()],
        );
        s.set_mean_image(
            4,
            3,
            &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0],
        );
        s.set_health(Health {
            frames: 90,
            drops: 1,
            link: "up".into(),
            clock_band_us: 12.5,
            latency_p50_us: 300.0,
            latency_p99_us: 900.0,
            trials: 2,
            rewards: 1,
            water_ul: 4.0,
            session: Some("s1".into()),
        });
        s
    }

    #[test]
    fn non_loopback_is_refused_unless_allowed() {
        let st = Arc::new(PreviewState::new());
        let err = start_preview(&cfg("0.0.0.0", false), Arc::clone(&st), LIMITS)
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("non-loopback") && err.contains("allow_non_loopback"),
            "{err}"
        );
        let err = bind_listener("192.0.2.1".parse().expect("ip"), 0, false).expect_err("refused");
        assert!(matches!(err, PreviewError::NonLoopback(_)));
        // Allowed: binding 0.0.0.0 works.
        let (addr, h) = start_preview(&cfg("0.0.0.0", true), st, LIMITS).expect("allowed");
        assert!(addr.ip().is_unspecified());
        h.shutdown().expect("clean stop");
    }

    #[test]
    fn disabled_is_an_error() {
        let mut c = cfg("127.0.0.1", false);
        c.enabled = false;
        assert!(matches!(
            start_preview(&c, Arc::new(PreviewState::new()), LIMITS),
            Err(PreviewError::Disabled)
        ));
    }

    #[test]
    fn a_bind_that_is_not_an_ip_address_is_named() {
        let err = start_preview(
            &cfg("preview.local", false),
            Arc::new(PreviewState::new()),
            LIMITS,
        )
        .expect_err("not an IP address");
        assert!(matches!(err, PreviewError::BadAddress(_)), "{err:?}");
        assert!(err.to_string().contains("\"preview.local\""), "{err}");
    }

    #[tokio::test]
    async fn routes_and_state_json() {
        let (addr, h) = start_preview(&cfg("127.0.0.1", false), filled(), LIMITS).expect("start");
        let host = addr.to_string();

        let (st, r) = request(addr, "GET", "/", &host).await;
        assert_eq!(st, 200);
        assert!(r.to_ascii_lowercase().contains("content-type: text/html"));
        assert!(body(&r).contains("page.js"));
        assert_eq!(request(addr, "GET", "/page.js", &host).await.0, 200);
        assert_eq!(request(addr, "GET", "/page.css", &host).await.0, 200);
        let (st, r) = request(addr, "GET", "/metrics", &host).await;
        assert_eq!(st, 200);
        assert!(r
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"));
        assert!(body(&r).contains("# TYPE rigd_trials_total counter\n"));
        assert_eq!(request(addr, "POST", "/metrics", &host).await.0, 405);
        assert_eq!(request(addr, "GET", "/nope", &host).await.0, 404);
        assert_eq!(request(addr, "GET", "/api/state/x", &host).await.0, 404);
        assert_eq!(request(addr, "POST", "/api/state", &host).await.0, 405);
        assert_eq!(request(addr, "DELETE", "/", &host).await.0, 405);
        assert_eq!(request(addr, "PUT", "/events", &host).await.0, 405);
        // DNS-rebinding guard.
        assert_eq!(
            request(addr, "GET", "/api/state", "evil.example:8787")
                .await
                .0,
            403
        );
        assert_eq!(
            request(addr, "GET", "/api/state", "localhost:8787").await.0,
            200
        );

        let (st, r) = request(addr, "GET", "/api/state", &host).await;
        assert_eq!(st, 200);
        assert!(r
            .to_ascii_lowercase()
            .contains("content-type: application/json"));
        let v: serde_json::Value = serde_json::from_str(body(&r)).expect("json");
        assert_eq!(v["reset"], true);
        assert_eq!(v["trial_count"], 2);
        assert_eq!(v["rewarded_count"], 1);
        assert_eq!(v["trials"][0]["outcome"], "rewarded");
        assert_eq!(v["trials"][1]["reaction_s"], serde_json::Value::Null);
        assert_eq!(v["lever_total"], 299);
        assert_eq!(v["lever"].as_array().map(Vec::len), Some(299));
        assert_eq!(v["lever"][0].as_array().map(Vec::len), Some(2));
        assert_eq!(v["dff_total"], 29);
        assert_eq!(v["dff"].as_array().map(Vec::len), Some(29));
        assert_eq!(v["dff_t_us"].as_array().map(Vec::len), Some(29));
        assert_eq!(v["dff"][0][1], 0.2);
        assert_eq!(v["dff"][0][2], serde_json::Value::Null);
        assert_eq!(v["rois"]["n"], 3);
        assert_eq!(v["rois"]["outlines"][0][1], serde_json::json!([5, 1]));
        assert_eq!(v["rois"]["kinds"][1], "inhibitory");
        assert_eq!(v["mean_image"]["w"], 4);
        assert_eq!(v["mean_image"]["hex"].as_str().map(str::len), Some(24));
        assert_eq!(v["health"]["link"], "up");
        assert_eq!(v["health"]["session"], "s1");
        assert_eq!(v["health"]["drops"], 1);
        h.shutdown().expect("clean stop");
    }

    /// Read SSE `data:` lines from an open stream until `want` of them came.
    async fn sse_messages(
        s: &mut tokio::net::TcpStream,
        buf: &mut String,
        want: usize,
    ) -> Vec<serde_json::Value> {
        let mut chunk = [0u8; 65536];
        loop {
            let msgs: Vec<serde_json::Value> = buf
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter_map(|d| serde_json::from_str(d).ok())
                .collect();
            if msgs.len() >= want {
                return msgs;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
                .await
                .expect("SSE data in time")
                .expect("read");
            assert!(n > 0, "stream closed early: {buf}");
            buf.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    }

    #[tokio::test]
    async fn sse_delivers_snapshot_then_updates_after_push() {
        let state = filled();
        let (addr, h) =
            start_preview(&cfg("127.0.0.1", false), Arc::clone(&state), LIMITS).expect("start");
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req =
            format!("GET /events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = String::new();
        let msgs = sse_messages(&mut s, &mut buf, 1).await;
        assert!(buf
            .to_ascii_lowercase()
            .contains("content-type: text/event-stream"));
        assert_eq!(msgs[0]["reset"], true);
        assert_eq!(msgs[0]["trial_count"], 2);
        assert!(msgs[0]["mean_image"].is_object());

        state.push_trial(3, "rewarded", 4_000_000, Some(0.5));
        for i in 3000..3100u64 {
            state.push_lever(i * 1000, 2.0);
        }
        // Wait for a message that carries the new trial.
        let mut n = 2;
        let newer = loop {
            let msgs = sse_messages(&mut s, &mut buf, n).await;
            let last = msgs.last().cloned().expect("a message");
            if last["trial_count"] == 3 {
                break last;
            }
            n += 1;
            assert!(n < 20, "no update after a push");
        };
        assert_eq!(newer["reset"], false);
        assert_eq!(newer["trials"].as_array().map(Vec::len), Some(1));
        assert_eq!(newer["trials"][0]["trial"], 3);
        assert_eq!(newer["lever"].as_array().map(Vec::len), Some(10));
        assert!(
            newer.get("mean_image").is_none(),
            "image only when it changes"
        );
        // Shutdown ends the open stream, and the server stops.
        tokio::task::spawn_blocking(move || h.shutdown())
            .await
            .expect("join")
            .expect("clean stop with an open stream");
    }

    /// Read until the server closes (or 20 s pass: a failure).
    async fn until_closed(s: &mut tokio::net::TcpStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
            .await
            .expect("closed by the server")
            .ok();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn slow_silent_and_surplus_clients_are_closed() {
        let limits = Limits {
            max_connections: 2,
            request_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(600),
            write_stall: Duration::from_millis(300),
        };
        let (addr, h) = start_preview(&cfg("127.0.0.1", false), filled(), limits).expect("start");
        let host = addr.to_string();
        // Headers that never finish (one byte, then nothing): closed.
        let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"G").await.expect("write");
        let text = until_closed(&mut slow).await;
        assert!(!text.contains(" 200 "), "{text}");
        // Connected and silent: closed.
        let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = until_closed(&mut silent).await;
        // Two connections that keep talking fill the table: a third is
        // refused with 503 at once.
        let mut a = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut b = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET /page.css HTTP/1.1\r\nHost: {host}\r\n\r\n");
        for s in [&mut a, &mut b] {
            s.write_all(req.as_bytes()).await.expect("write");
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).await.expect("read");
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        }
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let text = until_closed(&mut c).await;
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(
            text.ends_with("preview: too many connections, all busy\n"),
            "{text}"
        );
        drop((a, b));
        // With room again, a request is served.
        let served = async {
            loop {
                // (A refused connection may be reset: the request it sent
                // was never read.)
                let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
                let req = format!("GET /api/state HTTP/1.1\r\nHost: {host}\r\n\r\n");
                if s.write_all(req.as_bytes()).await.is_ok() {
                    let mut buf = [0u8; 64];
                    if let Ok(n) = s.read(&mut buf).await {
                        if buf[..n].starts_with(b"HTTP/1.1 200") {
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), served)
            .await
            .expect("served once the others left");
        tokio::task::spawn_blocking(move || h.shutdown())
            .await
            .expect("join")
            .expect("clean stop");
    }
}
