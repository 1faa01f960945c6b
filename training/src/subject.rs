//! The mouse record `<data_root>/<mouse>/subject.toml`: who the mouse is.
//!
//! A plain TOML file a person can read and edit, written crash-safely
//! (temporary file, fsync, rename, fsync of the folder), so a power cut
//! leaves the old record or the new one and never half of either. Every rig
//! sharing the data root reads the same file. The keys are those the NWB
//! export reads (`python/rigsession/nwb.py`).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The record's file name inside the mouse's folder.
pub const SUBJECT_FILE: &str = "subject.toml";

/// The sexes NWB/DANDI accept: male, female, unknown, other.
pub const SEXES: [&str; 4] = ["M", "F", "U", "O"];

/// Plausible mouse weights, g (a laboratory mouse weighs 15-40 g).
pub const WEIGHT_RANGE_G: (f64, f64) = (5.0, 80.0);

/// One mouse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subject {
    /// The mouse id, equal to its folder's name.
    pub id: String,
    /// Latin name, `Mus musculus`.
    pub species: String,
    /// `M`, `F`, `U` (unknown) or `O` (other).
    pub sex: String,
    /// `YYYY-MM-DD` (written as a TOML date).
    pub date_of_birth: String,
    #[serde(default)]
    pub strain: String,
    #[serde(default)]
    pub genotype: String,
    /// Who trains the mouse, `Last, First`.
    #[serde(default)]
    pub experimenter: String,
    /// Weight before water restriction, g: the welfare rule's reference.
    pub baseline_weight_g: f64,
    #[serde(default)]
    pub notes: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lab: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub institution: Option<String>,
    /// Age as an ISO 8601 duration (NWB's `age`), when the date of birth is
    /// not known exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age: Option<String>,
    /// Free description for NWB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Why a subject record cannot be used. Names the file, the field, the value
/// and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SubjectError {
    #[error(
        "no mouse {mouse} in {root}: add it first with `rigctl mouse add {mouse} --species \
         \"Mus musculus\" --sex F --date-of-birth YYYY-MM-DD --baseline-weight-g 24.0` \
         (or check the id's spelling: `rigctl mouse list`)",
        root = .root.display()
    )]
    Unknown { root: PathBuf, mouse: String },
    #[error("mouse {mouse} already exists ({}): change it with `rigctl mouse edit {mouse}`", .path.display())]
    Exists { path: PathBuf, mouse: String },
    #[error("{}: {field} = {value}: {rule}", .path.display())]
    Field {
        path: PathBuf,
        field: &'static str,
        value: String,
        rule: String,
    },
    #[error("{}: not a mouse record: {reason}", .path.display())]
    Syntax { path: PathBuf, reason: String },
    #[error("{0}")]
    Unsafe(session_format::StorageError),
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl SubjectError {
    fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }
}

/// The record's path.
pub fn subject_path(data_root: &Path, mouse: &str) -> PathBuf {
    data_root.join(mouse).join(SUBJECT_FILE)
}

fn field(path: &Path, field: &'static str, value: impl fmt::Display, rule: &str) -> SubjectError {
    SubjectError::Field {
        path: path.to_owned(),
        field,
        value: value.to_string(),
        rule: rule.to_owned(),
    }
}

/// `YYYY-MM-DD`, a real calendar date.
pub fn parse_date(text: &str) -> Option<jiff::civil::Date> {
    if text.len() != 10 {
        return None;
    }
    text.parse::<jiff::civil::Date>().ok()
}

impl Subject {
    /// Every field's rule; `path` is named in the errors. `today` (the lab's
    /// local date) bounds the date of birth.
    pub fn validate(
        &self,
        path: &Path,
        today: Option<jiff::civil::Date>,
    ) -> Result<(), SubjectError> {
        if let Err(e) = protocol::control::validate_mouse_id(&self.id) {
            return Err(field(path, "id", format!("{:?}", self.id), &e.to_string()));
        }
        if let Some(mouse_dir) = path.parent().and_then(Path::file_name) {
            if mouse_dir.to_string_lossy() != self.id {
                return Err(field(
                    path,
                    "id",
                    format!("{:?}", self.id),
                    &format!(
                        "must equal the mouse's folder name {:?} (the record describes the mouse \
                         whose sessions are beside it)",
                        mouse_dir.to_string_lossy()
                    ),
                ));
            }
        }
        if self.species.trim().is_empty() {
            return Err(field(
                path,
                "species",
                "\"\"",
                "must be given, as its Latin name: \"Mus musculus\"",
            ));
        }
        if !SEXES.contains(&self.sex.as_str()) {
            return Err(field(
                path,
                "sex",
                format!("{:?}", self.sex),
                "must be one of M, F, U (unknown), O (other)",
            ));
        }
        let Some(dob) = parse_date(&self.date_of_birth) else {
            return Err(field(
                path,
                "date_of_birth",
                format!("{:?}", self.date_of_birth),
                "must be a date YYYY-MM-DD, e.g. 2026-09-01",
            ));
        };
        if let Some(today) = today {
            if dob > today {
                return Err(field(
                    path,
                    "date_of_birth",
                    &self.date_of_birth,
                    &format!("is after today ({today}): check the year"),
                ));
            }
        }
        let (lo, hi) = WEIGHT_RANGE_G;
        if !(self.baseline_weight_g.is_finite() && (lo..=hi).contains(&self.baseline_weight_g)) {
            return Err(field(
                path,
                "baseline_weight_g",
                self.baseline_weight_g,
                &format!(
                    "must be a weight in grams, {lo}..={hi} (the weight before water restriction)"
                ),
            ));
        }
        for (name, text) in [
            ("strain", &self.strain),
            ("genotype", &self.genotype),
            ("experimenter", &self.experimenter),
            ("notes", &self.notes),
        ] {
            if text.len() > 4096 || text.contains('\0') {
                return Err(field(
                    path,
                    name,
                    format!("({} bytes)", text.len()),
                    "must be text of at most 4096 bytes",
                ));
            }
        }
        if let Some(age) = &self.age {
            if !valid_iso_duration(age) {
                return Err(field(
                    path,
                    "age",
                    format!("{age:?}"),
                    "must be an ISO 8601 duration like P90D",
                ));
            }
        }
        Ok(())
    }

    /// The record as written to disk: a header comment, then the keys.
    pub fn to_text(&self) -> String {
        let mut t = toml::Table::new();
        let value = toml::Value::try_from(self).unwrap_or(toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(tab) = value {
            t = tab;
        }
        // The date of birth as a TOML date (what the NWB export reads).
        if let Ok(d) = self.date_of_birth.parse::<toml::value::Datetime>() {
            t.insert("date_of_birth".into(), toml::Value::Datetime(d));
        }
        let body = toml::to_string(&t).unwrap_or_default();
        format!(
            "# rigd mouse record; edit with `rigctl mouse edit {}` or by hand \
             (docs/training.md)\n{body}",
            self.id
        )
    }

    /// Parse a record's text (the date of birth may be a TOML date or a string).
    pub fn parse(path: &Path, text: &str) -> Result<Subject, SubjectError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| SubjectError::Syntax {
                    path: path.to_owned(),
                    reason: e.message().to_owned(),
                })?;
        if let Some(toml::Value::Datetime(d)) = table.get("date_of_birth") {
            let s = d.to_string();
            table.insert("date_of_birth".into(), toml::Value::String(s));
        }
        if let Some(toml::Value::Integer(w)) = table.get("baseline_weight_g") {
            let w = *w as f64;
            table.insert("baseline_weight_g".into(), toml::Value::Float(w));
        }
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| SubjectError::Syntax {
                path: path.to_owned(),
                reason: format!(
                    "{} (keys: id, species, sex, date_of_birth, strain, genotype, experimenter, \
                     baseline_weight_g, notes, lab, institution, age, description)",
                    e.message()
                ),
            })
    }
}

fn valid_iso_duration(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('P') else {
        return false;
    };
    !rest.is_empty()
        && rest
            .chars()
            .all(|c| c.is_ascii_digit() || "YMWDTHS".contains(c))
        && rest.chars().any(|c| c.is_ascii_digit())
}

/// Read and check `<data_root>/<mouse>/subject.toml`.
pub fn read(data_root: &Path, mouse: &str) -> Result<Subject, SubjectError> {
    protocol::control::validate_mouse_id(mouse).map_err(|e| {
        field(
            &data_root.join(mouse),
            "id",
            format!("{mouse:?}"),
            &e.to_string(),
        )
    })?;
    let path = subject_path(data_root, mouse);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SubjectError::Unknown {
                root: data_root.to_owned(),
                mouse: mouse.to_owned(),
            })
        }
        Err(e) => return Err(SubjectError::io("read", &path, e)),
    };
    let s = Subject::parse(&path, &text)?;
    s.validate(&path, None)?;
    Ok(s)
}

/// Every mouse with a record under the data root, sorted by id. A record that
/// cannot be read is returned as its error (the list still shows the rest).
pub fn list(data_root: &Path) -> Result<Vec<Result<Subject, SubjectError>>, SubjectError> {
    let entries =
        std::fs::read_dir(data_root).map_err(|e| SubjectError::io("list", data_root, e))?;
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().join(SUBJECT_FILE).is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names.iter().map(|m| read(data_root, m)).collect())
}

/// Write a record (new: refuses to replace an existing one; otherwise
/// replaces it), crash-safely. The mouse's folder is created if needed; the
/// data root must exist.
pub fn write(
    data_root: &Path,
    subject: &Subject,
    new: bool,
    today: Option<jiff::civil::Date>,
) -> Result<PathBuf, SubjectError> {
    let path = subject_path(data_root, &subject.id);
    subject.validate(&path, today)?;
    if !data_root.is_dir() {
        return Err(SubjectError::io(
            "find the data root",
            data_root,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such folder (is the data disk mounted? check [storage].data_root)",
            ),
        ));
    }
    let dir = data_root.join(&subject.id);
    match std::fs::create_dir(&dir) {
        Ok(()) => {
            crate::fsio::sync_dir(data_root).map_err(|e| SubjectError::io("fsync", data_root, e))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(SubjectError::io("create folder", &dir, e)),
    }
    // Never written through a link (the rule of the session folders).
    session_format::plain_folder(&dir).map_err(SubjectError::Unsafe)?;
    if new && path.exists() {
        return Err(SubjectError::Exists {
            path,
            mouse: subject.id.clone(),
        });
    }
    crate::fsio::write_atomic(&dir, SUBJECT_FILE, subject.to_text().as_bytes())
        .map_err(|e| SubjectError::io("write", &path, e))?;
    Ok(path)
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "id                 {}", self.id)?;
        writeln!(f, "species            {}", self.species)?;
        writeln!(f, "sex                {}", self.sex)?;
        writeln!(f, "date_of_birth      {}", self.date_of_birth)?;
        writeln!(f, "strain             {}", self.strain)?;
        writeln!(f, "genotype           {}", self.genotype)?;
        writeln!(f, "experimenter       {}", self.experimenter)?;
        writeln!(f, "baseline_weight_g  {:.1}", self.baseline_weight_g)?;
        if let Some(l) = &self.lab {
            writeln!(f, "lab                {l}")?;
        }
        if let Some(i) = &self.institution {
            writeln!(f, "institution        {i}")?;
        }
        if let Some(a) = &self.age {
            writeln!(f, "age                {a}")?;
        }
        write!(f, "notes              {}", self.notes)
    }
}

/// The record `rigd demo` writes for its mouse when it has none: a
/// simulated C57BL/6J female, 90 days old today, 24 g before restriction.
pub fn demo_subject(id: &str) -> Subject {
    let today = jiff::Zoned::now().date();
    let born = today
        .checked_sub(jiff::Span::new().days(90))
        .unwrap_or(today);
    Subject {
        id: id.to_owned(),
        species: "Mus musculus".into(),
        sex: "F".into(),
        date_of_birth: born.to_string(),
        strain: "C57BL/6J".into(),
        genotype: "wild type".into(),
        experimenter: "rigd demo".into(),
        baseline_weight_g: 24.0,
        notes: "simulated mouse of rigd demo (rig-sim)".into(),
        lab: None,
        institution: None,
        age: None,
        description: None,
    }
}
