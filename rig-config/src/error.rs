//! Errors a person reads: what failed, where in the file, and what to do.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// One problem in a configuration file, located at a line and column.
///
/// Displays as `PATH:LINE:COL: KEY = VALUE: RULE`, or `PATH:LINE:COL: MESSAGE`
/// when no key applies (a TOML syntax error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file, as given for messages.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// Dotted key path (`task.threshold_mm`, `valve.calibration[1].open_ms`),
    /// if the problem is about a key.
    pub key: Option<String>,
    /// The value as written in the file, or the effective value followed by
    /// `(default)` when the file does not set the key.
    pub value: Option<String>,
    /// The rule that is broken and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        match (&self.key, &self.value) {
            (Some(k), Some(v)) => write!(f, "{k} = {}: ", elided(v))?,
            (Some(k), None) => write!(f, "{k}: ")?,
            (None, _) => {}
        }
        f.write_str(&self.message)
    }
}

/// A value as shown in a message: whole up to [`VALUE_SHOWN_CHARS`]
/// characters, else its start and its length (a pasted blob must not flood
/// the terminal or the journal).
fn elided(v: &str) -> std::borrow::Cow<'_, str> {
    if v.chars().count() <= VALUE_SHOWN_CHARS {
        return v.into();
    }
    let head: String = v.chars().take(VALUE_SHOWN_CHARS).collect();
    format!("{head}... ({} bytes in all)", v.len()).into()
}

/// The longest value a message shows whole.
pub const VALUE_SHOWN_CHARS: usize = 120;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, a directory, no permission...).
    #[error("cannot read {}: {error}", path.display())]
    Read {
        /// The file, as given.
        path: PathBuf,
        /// What the operating system said.
        error: io::Error,
    },
    /// The path is not a regular file (a folder, a FIFO that would block
    /// the read, a device such as `/dev/zero` that never ends).
    #[error(
        "{} is {kind}, not a configuration file: give the path of a rig.toml",
        path.display()
    )]
    NotAFile {
        /// The path, as given.
        path: PathBuf,
        /// What it is instead ("a folder", "a named pipe", ...).
        kind: &'static str,
    },
    /// The file is larger than any configuration (a wrong path, most likely).
    #[error(
        "{} is {bytes} bytes; a configuration is at most {max} bytes: is this the right file?",
        path.display()
    )]
    TooLarge {
        /// The file, as given.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// [`crate::MAX_CONFIG_BYTES`].
        max: u64,
    },
    /// The file is not UTF-8 text (TOML must be).
    #[error(
        "{}:{line}:{column}: not UTF-8 text (invalid byte at offset {offset}); \
         TOML files must be saved as UTF-8",
        path.display()
    )]
    NotUtf8 {
        /// The file, as given.
        path: PathBuf,
        /// 1-based line of the first invalid byte.
        line: usize,
        /// 1-based column of the first invalid byte.
        column: usize,
        /// Byte offset of the first invalid byte.
        offset: usize,
    },
    /// The file is not valid TOML, does not match the schema, or breaks
    /// validation rules. Displays every problem, one per line, then a summary.
    #[error("{}", display_invalid(path, problems))]
    Invalid {
        /// The file, as given for messages.
        path: PathBuf,
        /// Every problem found, in file order (at least one).
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The located problems (empty for [`ConfigError::Read`] and
    /// [`ConfigError::NotUtf8`]).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }

    /// For [`ConfigError::Invalid`], the closing line:
    /// `rig.toml: 2 errors, configuration not loaded`.
    pub fn summary(&self) -> Option<String> {
        match self {
            ConfigError::Invalid { path, problems } => Some(summary_line(path, problems.len())),
            _ => None,
        }
    }
}

fn summary_line(path: &std::path::Path, n: usize) -> String {
    let plural = if n == 1 { "" } else { "s" };
    format!(
        "{}: {n} error{plural}, configuration not loaded",
        path.display()
    )
}

fn display_invalid(path: &std::path::Path, problems: &[Problem]) -> String {
    let mut s = String::new();
    for p in problems {
        s.push_str(&p.to_string());
        s.push('\n');
    }
    s.push_str(&summary_line(path, problems.len()));
    s
}

/// The effective configuration could not be written as TOML (a bug, not an
/// input problem: every valid configuration can be written).
#[derive(Debug, thiserror::Error)]
#[error("cannot write the configuration as TOML: {0}")]
pub struct ToTomlError(pub String);
