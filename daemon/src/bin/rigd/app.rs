//! Wiring: the serial link with the rig thread's handler, the control socket,
//! the supervisor, signals and logging. `rigd --config` and `rigd demo` both run
//! through [`App`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use firmware_bridge::link::{LinkSettings, SerialLink};
use rig_config::RigConfig;
use tokio::sync::{broadcast, mpsc};

use daemon::control::{self, CoreRequest, EventLine};
use daemon::rig::RigHandler;
use daemon::session::{events_ring, LiveView, RigNotice, SessionLog, StopReason};
use daemon::shutdown::Shutdown;
use daemon::supervisor::{Background, Supervisor};

/// How the daemon logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Set up tracing: human lines (or JSON) on stderr, and the same events in the
/// running session's `rigd.log` (which rolls to `rigd.001.log`, ... past
/// 64 MiB, see [`session_format::SessionLogFile`]).
/// Whether stderr is a terminal that wants colour (not `NO_COLOR`, not `TERM=dumb`).
fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").map_or(true, |v| v.is_empty())
        && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

pub fn init_logging(format: LogFormat, session_log: SessionLog, quiet: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let level = if quiet {
        tracing::Level::WARN
    } else {
        tracing::Level::INFO
    };
    let filter = tracing_subscriber::filter::LevelFilter::from_level(level);
    let stderr: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Human => Box::new(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour only for a person at a terminal: a log file, the
                // journal or a pipe gets plain text (NO_COLOR is honoured too).
                .with_ansi(colour_on_stderr())
                .with_target(false)
                .with_filter(filter),
        ),
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        ),
    };
    let file = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_target(false)
        .with_writer(SessionLogWriter(session_log))
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .try_init();
}

#[derive(Clone)]
struct SessionLogWriter(SessionLog);

/// Writes to the session's log file while one is open, else nowhere.
struct SessionLogHandle(SessionLog);

impl std::io::Write for SessionLogHandle {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut g) = self.0.lock() {
            if let Some(f) = g.as_mut() {
                return f.write(buf);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if let Ok(mut g) = self.0.lock() {
            if let Some(f) = g.as_mut() {
                return f.flush();
            }
        }
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SessionLogWriter {
    type Writer = SessionLogHandle;
    fn make_writer(&'a self) -> Self::Writer {
        SessionLogHandle(self.0.clone())
    }
}

/// How long the daemon's parts get to stop once a shutdown begins (after a
/// running session's files are finished).
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// A running daemon.
pub struct App {
    pub core: Supervisor,
    pub core_rx: mpsc::Receiver<CoreRequest>,
    pub notices: mpsc::UnboundedReceiver<RigNotice>,
    pub events: broadcast::Sender<EventLine>,
    pub live: LiveView,
    /// The link's threads, the control socket and the preview, stopped
    /// together by [`App::shutdown`].
    shutdown: Shutdown,
    /// systemd: READY/STATUS/STOPPING and the watchdog (no-op without it).
    service: daemon::notify::Service,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

/// The signals rigd acts on, registered before anything else is set up: a
/// SIGTERM from the moment rigd starts (systemd stopping it at once, a test)
/// is taken and acted on, never the default action (killed on the spot,
/// leaving its socket behind).
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Register SIGTERM, SIGINT and SIGHUP (inside the runtime).
    pub fn register() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

impl App {
    /// Start the link and the control socket.
    pub async fn start(
        cfg: RigConfig,
        config_path: Option<PathBuf>,
        link_settings: LinkSettings,
        session_log: SessionLog,
    ) -> anyhow::Result<Self> {
        let cfg = Arc::new(cfg);
        if cfg.realtime.lock_memory {
            match firmware_bridge::rt::lock_memory() {
                Ok(()) => tracing::debug!("memory locked (no page faults on the latency path)"),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        // Descriptors: raise the soft limit, and size the servers' connection
        // caps so that they leave the session its own (crate docs of
        // daemon::conns).
        let (preview_cap, control_cap) = match daemon::conns::raise_fd_limit() {
            Ok(l) => {
                tracing::debug!(
                    "open-file limit {} (was {}, hard {})",
                    l.soft,
                    l.before,
                    l.hard
                );
                let caps = daemon::conns::fit_caps(
                    l.soft,
                    daemon::preview::MAX_CONNECTIONS,
                    control::MAX_CONNECTIONS,
                );
                if caps != (daemon::preview::MAX_CONNECTIONS, control::MAX_CONNECTIONS) {
                    tracing::warn!(
                        "open-file limit {} is low: preview and control connections capped at \
                         {} and {}; raise LimitNOFILE (systemd) or `ulimit -n`",
                        l.soft,
                        caps.0,
                        caps.1
                    );
                }
                caps
            }
            Err(e) => {
                tracing::warn!("cannot read or raise the open-file limit: {e}");
                (daemon::preview::MAX_CONNECTIONS, control::MAX_CONNECTIONS)
            }
        };
        let (events, _) = broadcast::channel(4096);
        let (rig_events, rig_events_out) = events_ring();
        let live = LiveView::default();
        let (rig_tx, rig_rx) = crossbeam_channel::bounded(64);
        let (notice_tx, notices) = mpsc::unbounded_channel();
        let socket = PathBuf::from(&cfg.control.socket);
        let listener =
            control::bind(&socket, cfg.control.mode, cfg.control.group.as_deref()).await?;
        let preview = Arc::new(daemon::preview::PreviewState::new());
        preview.set_live_status(live.status.clone());
        let handler = RigHandler::new(
            rig_rx,
            live.status.clone(),
            live.clock.clone(),
            rig_events,
            notice_tx,
        )
        .with_preview(preview.clone());
        let preview_server = if cfg.preview.enabled {
            match daemon::preview::start_preview(
                &cfg.preview,
                preview.clone(),
                daemon::conns::Limits {
                    max_connections: preview_cap,
                    ..daemon::preview::LIMITS
                },
            ) {
                Ok((addr, handle)) => {
                    daemon::outln!("preview: http://{addr}/");
                    tracing::info!("live preview at http://{addr}/");
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!("live preview not started: {e}");
                    None
                }
            }
        } else {
            None
        };
        let link = SerialLink::spawn(link_settings, handler)
            .context("cannot start the serial link threads")?;
        let (core_tx, core_rx) = mpsc::channel(64);
        let mut shutdown = Shutdown::new();
        let server = tokio::spawn(control::serve(
            listener,
            socket.clone(),
            daemon::conns::Limits {
                max_connections: control_cap,
                ..control::LIMITS
            },
            core_tx,
            events.clone(),
            shutdown.signal(),
        ));
        shutdown.register("control socket", async move {
            let _ = server.await;
        });
        let fan_out = Arc::new(control::EventFanOut::new(rig_events_out, events.clone()));
        let fan_out_task = tokio::spawn(fan_out.clone().run(shutdown.signal()));
        shutdown.register("event fan-out", async move {
            let _ = fan_out_task.await;
        });
        shutdown.register_blocking("serial link", move || link.shutdown());
        if let Some(p) = preview_server {
            shutdown.register_blocking("preview", move || {
                if let Err(e) = p.shutdown() {
                    tracing::warn!("preview: {e}");
                }
            });
        }
        tracing::info!(socket = %socket.display(), port = %cfg.rig.serial_port, "rigd ready");
        let mut core =
            Supervisor::new(cfg, config_path, rig_tx, live.clone(), fan_out, session_log);
        core.set_preview(preview);
        core.check_calibration_age();
        let mut app = Self {
            core,
            core_rx,
            notices,
            events,
            live,
            shutdown,
            service: daemon::notify::Service::from_env(),
        };
        // Ready to take commands: the socket listens and the link threads
        // run; the device may still be connecting (the status says so).
        let text = app.service_status();
        app.service.ready(text);
        Ok(app)
    }

    /// The one-line status for systemd.
    fn service_status(&self) -> String {
        let reply = self.core.status_reply();
        let detail = self.live.status.snapshot().link_detail;
        daemon::notify::status_text(
            reply.state,
            reply.mouse.as_deref(),
            reply.link,
            detail.as_deref(),
        )
    }

    fn update_service_status(&mut self) {
        let text = self.service_status();
        self.service.set_status(text);
    }

    /// Serve requests until SIGTERM or SIGINT; SIGHUP reloads the
    /// configuration between sessions. A running session is stopped cleanly
    /// (files finished) before returning. `signals` were registered before
    /// the socket was bound, so a signal sent at any moment is taken.
    pub async fn run_until_signal(&mut self, signals: Signals) -> anyhow::Result<()> {
        let Signals {
            mut term,
            mut int,
            mut hup,
        } = signals;
        let mut health = tokio::time::interval(Duration::from_secs(1));
        // Set by SIGTERM/SIGINT: exit once the running session (if any) has
        // finished its files. Requests are served until then.
        let mut exiting = false;
        loop {
            tokio::select! {
                _ = health.tick() => self.core.tick(),
                Some(req) = self.core_rx.recv() => self.core.handle(req).await,
                Some(n) = self.notices.recv() => self.core.on_notice(n),
                bg = self.core.background() => match bg {
                    Background::FovCheck(done) => self.core.complete_start(done).await,
                    Background::Finished(finished) => {
                        if let Err(e) = self.core.complete_stop(*finished) {
                            tracing::debug!("session ended: {}", e.message);
                        }
                        if exiting {
                            break;
                        }
                    }
                },
                _ = term.recv() => exiting = self.exit_on("SIGTERM") || exiting,
                _ = int.recv() => exiting = self.exit_on("SIGINT") || exiting,
                _ = hup.recv() => {
                    self.service.reloading();
                    match self.core.reload() {
                        Ok(()) => tracing::info!("configuration reloaded (SIGHUP)"),
                        Err(e) => tracing::warn!("SIGHUP: configuration not reloaded: {e}"),
                    }
                    let text = self.service_status();
                    self.service.ready(text);
                }
            }
            if exiting && !self.core.is_running() {
                break;
            }
            self.update_service_status();
        }
        Ok(())
    }

    /// A signal to exit: tell systemd, and begin ending the running session
    /// (its files are finished before rigd exits). Returns true.
    fn exit_on(&mut self, what: &'static str) -> bool {
        let text = match self.core.status_reply().mouse {
            Some(m) => format!("{what}: finishing the session for mouse {m}"),
            None => format!("{what}: shutting down"),
        };
        self.service.stopping(text);
        self.core
            .cancel_pending_start(&format!("rigd is shutting down ({what})"));
        if self.core.is_running() {
            tracing::info!("{what}: stopping the running session");
            self.core.begin_stop(StopReason::Signal(what), false);
        }
        true
    }

    /// Close the control socket, the link and the preview: one signal, one
    /// deadline (see [`daemon::shutdown`]).
    pub async fn shutdown(mut self) {
        self.service.stop_watchdog();
        self.shutdown.run(SHUTDOWN_DEADLINE).await;
    }
}
