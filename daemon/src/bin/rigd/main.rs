//! `rigd`, the rig controller daemon.
//!
//! * `rigd --config PATH` runs the daemon (until SIGTERM/SIGINT; SIGHUP
//!   reloads the configuration between sessions).
//! * `rigd demo` runs a whole session against the virtual rig.
//! * `rigd check-config PATH` loads and validates a configuration file and
//!   prints the effective configuration.
//!
//! Exit codes: 0 = fine, 1 = could not write the output or the daemon failed
//! at run time, 2 = usage error or configuration not loaded. Errors are
//! printed as text, never as a panic or a `Debug` dump.

mod app;
mod demo;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code when the output could not be written (e.g. a closed pipe).
const EXIT_OUTPUT_FAILED: u8 = 1;
/// Exit code for a configuration that did not load (also clap's usage-error code).
const EXIT_CONFIG_NOT_LOADED: u8 = 2;

/// Rig controller daemon: drives the lever-press task through the rig's
/// microcontroller and records behaviour and imaging on one clock.
#[derive(Debug, Parser)]
#[command(name = "rigd", version)]
struct Cli {
    /// Run the daemon with this rig configuration.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "human", global = true)]
    log_format: app::LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load and validate a configuration file; print the effective configuration
    /// (every default filled in) as TOML on stdout, warnings and errors on stderr.
    CheckConfig {
        /// The configuration file, e.g. /etc/rigd/rig.toml.
        path: PathBuf,
    },
    /// Run a whole simulated session against the virtual rig, with no
    /// configuration: trial outcomes as they happen, then the summary.
    Demo {
        /// Session length, minutes of device time.
        #[arg(long, default_value_t = 5)]
        minutes: u32,
        /// Device time per wall-clock time (10 = a 5-minute session in 30 s).
        #[arg(long, default_value_t = 10.0)]
        speed: f64,
        /// Training day of the simulated mouse: 1 naive ..= 14 expert.
        #[arg(long, default_value_t = 14)]
        day: u8,
        /// Where the session folder goes.
        #[arg(long, default_value = "rig-data")]
        data: PathBuf,
        /// Seed of the simulated mouse.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Mouse id of the session.
        #[arg(long, default_value = "DEMO")]
        mouse: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { path }) => check_config(&path),
        Some(Command::Demo {
            minutes,
            speed,
            day,
            data,
            seed,
            mouse,
        }) => {
            let opts = demo::DemoOptions {
                minutes,
                speed,
                day,
                data,
                seed,
                mouse,
            };
            with_runtime(cli.log_format, true, |log| async move {
                demo::run(opts, log).await.map(|_| ())
            })
        }
        None => match cli.config {
            Some(path) => run_daemon(path, cli.log_format),
            None => {
                eprintln!("error: nothing to do: give --config PATH to run the daemon, or a subcommand (see rigd --help)");
                ExitCode::from(EXIT_CONFIG_NOT_LOADED)
            }
        },
    }
}

/// Run `body` on a tokio runtime with logging set up; errors are printed as
/// one line and give exit code 1.
fn with_runtime<F, Fut>(format: app::LogFormat, quiet: bool, body: F) -> ExitCode
where
    F: FnOnce(daemon::session::SessionLog) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let log: daemon::session::SessionLog = Default::default();
    app::init_logging(format, log.clone(), quiet);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_OUTPUT_FAILED);
        }
    };
    match rt.block_on(body(log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_OUTPUT_FAILED)
        }
    }
}

fn run_daemon(path: PathBuf, format: app::LogFormat) -> ExitCode {
    let loaded = match rig_config::load(&path) {
        Ok(l) => l,
        Err(e) => {
            for p in e.problems() {
                eprintln!("error: {p}");
            }
            if e.problems().is_empty() {
                eprintln!("error: {e}");
            }
            return ExitCode::from(EXIT_CONFIG_NOT_LOADED);
        }
    };
    with_runtime(format, false, |log| async move {
        // First: a SIGTERM from now on is rigd's to act on.
        let signals = app::Signals::register()?;
        for w in &loaded.warnings {
            tracing::warn!("{w}");
        }
        let cfg = loaded.config;
        // Sessions a crash left `running` are repaired before anything else.
        for dir in session_format::find_running(std::path::Path::new(&cfg.storage.data_root)) {
            let summarize = daemon::storage_thread::summarize_folder;
            match session_format::recover_with_summary(&dir, summarize) {
                Ok(r) => tracing::warn!("recovered {}: {r}", dir.display()),
                Err(e) => tracing::error!("could not recover {}: {e}", dir.display()),
            }
        }
        let settings = firmware_bridge::link::LinkSettings::from_config(&cfg);
        let mut app = app::App::start(cfg, Some(path), settings, log).await?;
        let result = app.run_until_signal(signals).await;
        app.shutdown().await;
        result
    })
}

/// The `[training].protocol` file's problems, and each stage whose task
/// settings this rig's configuration refuses. Empty: fine (or no protocol).
fn check_protocol(cfg: &rig_config::RigConfig) -> Vec<String> {
    let Some(path) = cfg.training.as_ref().and_then(|t| t.protocol.as_ref()) else {
        return Vec::new();
    };
    let protocol = match training::Protocol::load(path) {
        Ok(p) => p,
        Err(e) => return vec![e.to_string()],
    };
    protocol
        .file
        .stages
        .iter()
        .filter_map(|stage| {
            cfg.with_task_overrides(&stage.task).err().map(|e| {
                format!(
                    "{}: stage {:?}: {e} (change the stage's [stage.task], or this rig's \
                     configuration)",
                    path.display(),
                    stage.name
                )
            })
        })
        .collect()
}

fn check_config(path: &std::path::Path) -> ExitCode {
    let mut stderr = std::io::stderr().lock();
    let loaded = match rig_config::load(path) {
        Ok(loaded) => loaded,
        Err(e) => {
            // Write failures on stderr cannot be reported anywhere: ignored.
            if e.problems().is_empty() {
                let _ = writeln!(stderr, "error: {e}");
            } else {
                for problem in e.problems() {
                    let _ = writeln!(stderr, "error: {problem}");
                }
                if let Some(summary) = e.summary() {
                    let _ = writeln!(stderr, "{summary}");
                }
            }
            return ExitCode::from(EXIT_CONFIG_NOT_LOADED);
        }
    };
    for warning in &loaded.warnings {
        let _ = writeln!(stderr, "warning: {warning}");
    }
    // The training protocol the configuration names: the file itself, and
    // every stage's task settings on this rig (otherwise found only at the
    // start of the first mouse to reach that stage).
    let protocol_problems = check_protocol(&loaded.config);
    if !protocol_problems.is_empty() {
        for p in &protocol_problems {
            let _ = writeln!(stderr, "error: {p}");
        }
        return ExitCode::from(EXIT_CONFIG_NOT_LOADED);
    }
    let text = match loaded.config.to_toml_string() {
        Ok(text) => text,
        Err(e) => {
            let _ = writeln!(stderr, "error: {e}");
            return ExitCode::from(EXIT_OUTPUT_FAILED);
        }
    };
    // A newline in the path must not end the comment line.
    let shown = path.display().to_string().replace(['\n', '\r'], " ");
    let mut stdout = std::io::stdout().lock();
    let written = writeln!(
        stdout,
        "# Effective configuration from {shown}, every default filled in."
    )
    .and_then(|()| stdout.write_all(text.as_bytes()))
    .and_then(|()| stdout.flush());
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(stderr, "error: cannot write to stdout: {e}");
            ExitCode::from(EXIT_OUTPUT_FAILED)
        }
    }
}
