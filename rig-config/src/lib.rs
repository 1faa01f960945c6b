//! The rig's configuration file, `rig.toml`: its schema with a documented
//! default for every key, units in the key names, validation that reports
//! every problem as `file:line:column: key = value: rule`, and the valve
//! calibration maths (volume to open time and back). A session's `[task]`
//! overrides ([`RigConfig::with_task_overrides`]) are checked by the same
//! rules, so a loaded configuration with a session's overrides applied still
//! obeys every rule.
//!
//! Architecture invariant: this crate does no I/O beyond reading the one file
//! [`load`] is given and the valve calibration file it names
//! (`[valve].calibration_file`). It never opens the serial port, the socket or the data
//! root, and never checks that paths named in the file exist: that is the
//! daemon's job when it starts a session.
//!
//! ```
//! let loaded = rig_config::parse_str("[task]\nreward_ul = 3.0\n", "rig.toml".as_ref())?;
//! assert_eq!(loaded.config.task.reward_ul, 3.0);
//! assert_eq!(loaded.config.rig.sample_rate_hz, 1000); // a default
//! assert_eq!(loaded.warnings.len(), 1); // the valve is not calibrated
//! # Ok::<(), rig_config::ConfigError>(())
//! ```

#![forbid(unsafe_code)]

mod calibration;
mod date;
mod error;
mod locate;
mod overrides;
mod schema;
mod validate;
mod valve;

use std::path::Path;

use toml_edit::ImDocument;

pub use calibration::{
    days_from_date, fit as fit_calibration, resolve as resolve_calibration_file, CalibrationFile,
    FilePoint, FitError, Measurement,
};
pub use error::{ConfigError, Problem, ToTomlError};
pub use overrides::{OverrideError, OverrideProblem, TaskOverrideField};
pub use schema::{
    AlertsSection, BaselineMethod, BaselineSection, CalibrationPoint, ControlSection, FovAction,
    FovCheckSection, ImagingSection, LabSection, LowWeightAction, PreviewSection, RealtimeSection,
    RewardDecision, RigConfig, RigSection, SafetySection, StorageSection, TaskSection,
    TrainingSection, ValveSection,
};
pub use validate::{BITS_PER_BYTE_8N1, MAX_LEVER_LINK_SHARE, MAX_SOCKET_PATH_BYTES};
pub use valve::CalibrationError;

use locate::{find_span, line_col, locate};
use validate::{validate, KeyPath, Segment};

/// A configuration that passed validation, and the warnings worth showing
/// (things that are allowed but probably not what the rig needs).
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The effective configuration, defaults filled in.
    pub config: RigConfig,
    /// Human-readable warnings, one sentence each, without a `warning:` prefix.
    pub warnings: Vec<String>,
}

/// The largest configuration file [`load`] reads (a real one is a few kB).
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Reads and validates the configuration file at `path`.
///
/// Errors: [`ConfigError::NotAFile`] for a folder, a FIFO or a device,
/// [`ConfigError::TooLarge`] past [`MAX_CONFIG_BYTES`],
/// [`ConfigError::Read`] if the file cannot be read,
/// [`ConfigError::NotUtf8`] if it is not text, [`ConfigError::Invalid`] with
/// every located problem otherwise.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    use std::io::Read as _;
    use std::os::unix::fs::FileTypeExt as _;
    let read_error = |error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    };
    // Look before opening: opening a FIFO blocks until someone writes to it.
    let meta = std::fs::metadata(path).map_err(read_error)?;
    let t = meta.file_type();
    if !t.is_file() {
        let kind = if t.is_dir() {
            "a folder"
        } else if t.is_fifo() {
            "a named pipe"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(ConfigError::NotAFile {
            path: path.to_path_buf(),
            kind,
        });
    }
    let too_large = |bytes| ConfigError::TooLarge {
        path: path.to_path_buf(),
        bytes,
        max: MAX_CONFIG_BYTES,
    };
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_large(meta.len()));
    }
    // Read at most one byte past the cap (the file may grow meanwhile).
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes))
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let offset = e.utf8_error().valid_up_to();
            let valid = String::from_utf8_lossy(e.as_bytes().get(..offset).unwrap_or_default());
            let (line, column) = line_col(&valid, offset);
            return Err(ConfigError::NotUtf8 {
                path: path.to_path_buf(),
                line,
                column,
                offset,
            });
        }
    };
    // The calibration file the configuration names, if any.
    let named = toml::from_str::<toml::Table>(&text).ok().and_then(|t| {
        t.get("valve")?
            .get("calibration_file")?
            .as_str()
            .map(str::to_owned)
    });
    let calibration = match named {
        None => None,
        Some(name) => {
            let cal_path = calibration::resolve(path, &name);
            if cal_path.exists() {
                Some(Ok(CalibrationFile::read(&cal_path)?))
            } else {
                Some(Err(cal_path))
            }
        }
    };
    parse_inner(&text, path, calibration)
}

/// Parses and validates configuration `text`; `path_for_messages` is only
/// used to prefix problems (`rig.toml:14:15: ...`).
pub fn parse_str(text: &str, path_for_messages: &Path) -> Result<Loaded, ConfigError> {
    parse_inner(text, path_for_messages, None)
}

/// [`parse_str`] with the calibration file `[valve].calibration_file`
/// names: read (its points replace the inline ones before the rules run), or
/// missing (its path, for a warning).
fn parse_inner(
    text: &str,
    path_for_messages: &Path,
    calibration: Option<Result<CalibrationFile, std::path::PathBuf>>,
) -> Result<Loaded, ConfigError> {
    let file = path_for_messages;
    let invalid = |problems: Vec<Problem>| ConfigError::Invalid {
        path: file.to_path_buf(),
        problems,
    };

    // 1. TOML syntax, with spans kept for locating keys later.
    let doc = match ImDocument::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            let (line, column) = line_col(text, offset);
            let message = format!(
                "not valid TOML: {}; each line must be `key = value`, `[section]`, \
                 `[[array.of.tables]]` or a `# comment`",
                e.message().trim_end()
            );
            return Err(invalid(vec![Problem {
                file: file.to_path_buf(),
                line,
                column,
                key: None,
                value: None,
                message,
            }]));
        }
    };

    // 2. The schema: types and unknown keys. serde stops at the first; to
    // report them all at once, the offending `key = value` line is blanked
    // (offsets kept, so every later problem is located in the original
    // text) and the file read again, as long as that leaves valid TOML.
    let mut schema_problems = Vec::new();
    let mut current = text.to_owned();
    let parsed: Option<RigConfig> = loop {
        match toml::from_str::<RigConfig>(&current) {
            Ok(config) => break Some(config),
            // A field missing after a blanked line is most likely the one
            // that line misspelled: already reported.
            Err(e) if !schema_problems.is_empty() && e.message().starts_with("missing field") => {
                break None
            }
            Err(e) => {
                schema_problems.push(schema_problem(&doc, file, &e));
                let blanked = e
                    .span()
                    .and_then(|span| blank_line_at(&current, span.start))
                    .filter(|b| ImDocument::parse(b.as_str()).is_ok());
                match blanked {
                    Some(b) if schema_problems.len() < MAX_SCHEMA_PROBLEMS => current = b,
                    _ => break None,
                }
            }
        }
    };

    let mut parsed = parsed;
    if let (Some(config), Some(Ok(cal))) = (parsed.as_mut(), calibration.as_ref()) {
        config.valve.calibration = cal.points();
        config.valve.calibrated_utc = Some(cal.calibrated_utc.clone());
    }

    // 3. The rules, all of them, reported in file order (with the schema's
    // problems; the rules run on the file without the lines they blamed).
    let issues = parsed.as_ref().map(validate).unwrap_or_default();
    if !issues.is_empty() || !schema_problems.is_empty() {
        let mut problems: Vec<Problem> = issues
            .into_iter()
            .map(|issue| {
                let at = locate(&doc, &issue.key);
                let (line, column) = line_col(text, at.offset);
                let value = match at.raw_value {
                    Some(raw) => raw,
                    None if at.present => issue.value,
                    None => format!("{} (default)", issue.value),
                };
                Problem {
                    file: file.to_path_buf(),
                    line,
                    column,
                    key: Some(issue.key.to_string()),
                    value: Some(value),
                    message: issue.rule,
                }
            })
            .collect();
        problems.extend(schema_problems);
        problems.sort_by_key(|p| (p.line, p.column));
        return Err(invalid(problems));
    }
    let Some(config) = parsed else {
        unreachable!("a file that did not parse has a schema problem");
    };

    let mut warnings = Vec::new();
    // Legal values that are most likely slips.
    let at = |key: &str| {
        let l = locate(&doc, &KeyPath::dotted(key));
        let (line, column) = line_col(text, l.offset);
        format!("{}:{line}:{column}: {key}", file.display())
    };
    let t = &config.task;
    if t.response_window_ms < 100 {
        warnings.push(format!(
            "{} = {}: a response window of {} ms is shorter than a mouse can react; the \
             unit is milliseconds (10 s is 10000)",
            at("task.response_window_ms"),
            t.response_window_ms,
            t.response_window_ms
        ));
    }
    if t.cue_level_pct == 0 {
        warnings.push(format!(
            "{} = 0: the cue tone is silent; the mouse gets no cue",
            at("task.cue_level_pct")
        ));
    }
    let counts = config.rig.mm_to_counts(t.threshold_mm);
    if counts < 1.0 {
        warnings.push(format!(
            "{} = {}: below one encoder count ({:.4} mm at rig.encoder_counts_per_mm = {}): \
             any movement of the lever crosses it",
            at("task.threshold_mm"),
            t.threshold_mm,
            1.0 / config.rig.encoder_counts_per_mm,
            config.rig.encoder_counts_per_mm
        ));
    }
    if let Some(Err(missing)) = &calibration {
        warnings.push(format!(
            "{}: valve.calibration_file: {} does not exist, so the calibration in this file \
             is in use; run rigctl calibrate valve to write it",
            file.display(),
            missing.display()
        ));
    }
    let from_file = matches!(calibration, Some(Ok(_)));
    if !from_file && !locate(&doc, &KeyPath::dotted("valve.calibration")).present {
        let points: Vec<String> = ValveSection::EXAMPLE_CALIBRATION
            .iter()
            .map(|p| format!("{} ms -> {} µL", p.open_ms, p.volume_ul))
            .collect();
        warnings.push(format!(
            "{}: valve.calibration is not set, so the EXAMPLE calibration ({}) is in use; \
             it is not a measurement of this valve: calibrate the valve and add \
             [[valve.calibration]] points before giving water to a mouse",
            file.display(),
            points.join(", ")
        ));
    }
    Ok(Loaded { config, warnings })
}

impl RigConfig {
    /// The configuration as TOML, every key written (optional keys only when
    /// set), `control.mode` in octal. Parsing the output gives back `self`.
    pub fn to_toml_string(&self) -> Result<String, ToTomlError> {
        let plain = toml::to_string(self).map_err(|e| ToTomlError(e.to_string()))?;
        let mut doc: toml_edit::DocumentMut = plain
            .parse()
            .map_err(|e: toml_edit::TomlError| ToTomlError(e.to_string()))?;
        let octal: Option<toml_edit::Value> = format!("0o{:o}", self.control.mode).parse().ok();
        let mode = doc
            .get_mut("control")
            .and_then(toml_edit::Item::as_table_like_mut)
            .and_then(|t| t.get_mut("mode"))
            .and_then(toml_edit::Item::as_value_mut);
        if let (Some(mode), Some(mut octal)) = (mode, octal) {
            *octal.decor_mut() = mode.decor().clone();
            *mode = octal;
        }
        Ok(doc.to_string())
    }
}

/// At most this many type and unknown-key problems are reported at once.
const MAX_SCHEMA_PROBLEMS: usize = 50;

/// `text` with the line holding `offset` replaced by spaces (the newline
/// kept), unless that line is a table header (blanking it would move its
/// keys into another table) or is empty.
fn blank_line_at(text: &str, offset: usize) -> Option<String> {
    let start = text.get(..offset)?.rfind('\n').map_or(0, |i| i + 1);
    let end = text
        .get(offset..)?
        .find('\n')
        .map_or(text.len(), |i| offset + i);
    let line = text.get(start..end)?;
    let trimmed = line.trim_start();
    if trimmed.is_empty() || trimmed.starts_with('[') {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..start]);
    out.extend(std::iter::repeat(' ').take(line.len()));
    out.push_str(&text[end..]);
    Some(out)
}

/// Turns a deserialization error (wrong type, unknown key, bad enum value)
/// into a located problem naming the key.
fn schema_problem(doc: &ImDocument<&str>, file: &Path, e: &toml::de::Error) -> Problem {
    let text = doc.raw();
    let span = e.span();
    let offset = span.as_ref().map_or(0, |s| s.start);
    let (line, column) = line_col(text, offset);
    let found = span.as_ref().and_then(|s| find_span(doc, s));
    let raw_message = e.message().trim_end();

    let (key, value, message) = match (found, unknown_field(raw_message)) {
        (Some(found), Some((name, allowed))) => {
            let parent = KeyPath(
                found
                    .path
                    .0
                    .split_last()
                    .map(|(_, parent)| parent.to_vec())
                    .unwrap_or_default(),
            );
            let message = unknown_key_message(&parent, &name, &allowed);
            (Some(found.path.to_string()), found.raw_value, message)
        }
        (None, Some((name, allowed))) => (
            None,
            None,
            unknown_key_message(&KeyPath::default(), &name, &allowed),
        ),
        (Some(found), None) => {
            let value = if found.is_key { None } else { found.raw_value };
            (Some(found.path.to_string()), value, humanize(raw_message))
        }
        (None, None) => (None, None, humanize(raw_message)),
    };
    Problem {
        file: file.to_path_buf(),
        line,
        column,
        key,
        value,
        message,
    }
}

/// Parses serde's "unknown field `x`, expected one of `a`, `b`" (or
/// "expected `a`", or "there are no fields") into the name and allowed keys.
fn unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (name, rest) = rest.split_once('`')?;
    let allowed = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    Some((name.to_owned(), allowed))
}

fn unknown_key_message(parent: &KeyPath, name: &str, allowed: &[String]) -> String {
    let place = match parent.0.last() {
        None => "at the top level".to_owned(),
        Some(Segment::Index(_)) => {
            let mut table = parent.clone();
            table.0.pop();
            format!("in [[{table}]]")
        }
        Some(Segment::Key(_)) => format!("in [{parent}]"),
    };
    let mut message = format!("unknown key {place}");
    if let Some(best) = closest(name, allowed) {
        message.push_str(&format!(" (did you mean `{best}`?)"));
    }
    if allowed.is_empty() {
        message.push_str("; this table takes no keys");
    } else {
        message.push_str(&format!("; allowed keys: {}", allowed.join(", ")));
    }
    message
}

/// The allowed key closest to `name` by edit distance, if it is close enough
/// to be a typo, or else the one `name` is the start of (a key written
/// without its unit, `threshold` for `threshold_mm`).
fn closest<'a>(name: &str, allowed: &'a [String]) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    let typo = allowed
        .iter()
        .map(|a| (edit_distance(name, a), a))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a.as_str());
    let unit_missing = || {
        allowed
            .iter()
            .find(|a| name.len() >= 3 && a.starts_with(name) && a[name.len()..].starts_with('_'))
            .map(String::as_str)
    };
    typo.or_else(unit_missing)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// Rewrites serde's type names in a message into words a person uses.
fn humanize(message: &str) -> String {
    const TYPES: &[(&str, &str)] = &[
        ("expected u16", "expected a whole number from 0 to 65535"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
        ("expected a string", "expected a string in quotes"),
        ("expected a sequence", "expected an array"),
    ];
    let mut out = message.to_owned();
    for (from, to) in TYPES {
        if out.ends_with(from) {
            out.truncate(out.len() - from.len());
            out.push_str(to);
        }
    }
    out
}

#[cfg(test)]
mod tests;
