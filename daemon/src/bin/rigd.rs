//! `rigd`, the rig controller daemon.
//!
//! Today it has one subcommand, `rigd check-config PATH`, which loads and
//! validates a configuration file and prints the effective configuration.
//! Exit codes: 0 = fine, 1 = could not write the output, 2 = usage error or
//! configuration not loaded. Errors are printed as text, never as a panic or
//! a `Debug` dump.

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load and validate a configuration file; print the effective configuration
    /// (every default filled in) as TOML on stdout, warnings and errors on stderr.
    CheckConfig {
        /// The configuration file, e.g. /etc/rigd/rig.toml.
        path: PathBuf,
    },
    // Later subcommands go here: `run --config PATH` (the daemon itself) and
    // `demo` (a session against the virtual rig). They do not exist yet.
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { path } => check_config(&path),
    }
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
