//! The mouse's imaging reference: the mean image of the field of view it is
//! imaged in (usually its first imaging session's `mean_image.npy`), and
//! optionally the ROI label image and table drawn on it. Kept in the mouse's
//! folder, so every rig sharing the data root images the same neurons:
//!
//! | file | what |
//! |---|---|
//! | `imaging_reference.toml` | where the files came from, when, their size and SHA-256 |
//! | `imaging_reference.npy` | the mean image, float32 `(..., H, W)` (the first plane is used) |
//! | `imaging_roi_labels.npy` / `.tif` | the ROI label image, if given |
//! | `imaging_roi_table.tsv` | the ROI table, if given |
//!
//! Each file is replaced crash-safely and the record is written last, with
//! the SHA-256 of each file: a reference is read only if every file is the
//! one the record names, so a crash half-way through a replacement (or a
//! file changed by hand) is reported, never used. At a start, rigd uses the
//! mouse's reference in place of `[imaging]` `reference_image`,
//! `roi_labels` and `roi_table`, checks the field of view against it, and
//! keeps copies in the session folder (docs/training.md).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The record of the mouse's reference.
pub const RECORD_FILE: &str = "imaging_reference.toml";
/// The mean image.
pub const IMAGE_FILE: &str = "imaging_reference.npy";
/// The label image's name without its extension (`.npy`, `.tif`, `.tiff`).
pub const LABELS_STEM: &str = "imaging_roi_labels";
/// The ROI table.
pub const TABLE_FILE: &str = "imaging_roi_table.tsv";

/// `imaging_reference.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceRecord {
    /// When it was set, UTC, RFC 3339.
    pub set_utc: String,
    /// The image's origin, as given (a path).
    pub source: String,
    /// The session folder the image is the mean image of, if it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_session: Option<String>,
    /// Frame size, pixels.
    pub width: u32,
    pub height: u32,
    /// SHA-256 of `imaging_reference.npy`, hex.
    pub image_sha256: String,
    /// The label image's file name in the mouse's folder, and its SHA-256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roi_labels: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roi_labels_sha256: Option<String>,
    /// SHA-256 of `imaging_roi_table.tsv`, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roi_table_sha256: Option<String>,
    /// Who set it, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The reference this one replaced: when it was set, from what, and its
    /// image's SHA-256 (the sessions that used it keep copies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_set_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_image_sha256: Option<String>,
}

/// A mouse's reference, checked: its record and its files.
#[derive(Debug, Clone, PartialEq)]
pub struct MouseReference {
    pub record: ReferenceRecord,
    pub record_path: PathBuf,
    pub image: PathBuf,
    pub roi_labels: Option<PathBuf>,
    pub roi_table: Option<PathBuf>,
}

/// What a new reference is made of.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewReference {
    /// A mean image: float32 NPY `(..., H, W)`.
    pub image: PathBuf,
    pub roi_labels: Option<PathBuf>,
    pub roi_table: Option<PathBuf>,
    /// The session folder the image comes from.
    pub from_session: Option<String>,
    pub operator: Option<String>,
    pub note: Option<String>,
}

/// Why a reference cannot be read or set. Each message names the file and
/// the fix.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{}: not an imaging reference record ({reason}): set the reference again with `rigctl \
         mouse reference set`",
        .path.display()
    )]
    Record { path: PathBuf, reason: String },
    #[error(
        "{}: {file} is not the file the record names (SHA-256 {found}, recorded {recorded}): it \
         was changed or a replacement was cut short; set the reference again with `rigctl mouse \
         reference set`",
        .record.display()
    )]
    Changed {
        record: PathBuf,
        file: String,
        found: String,
        recorded: String,
    },
    #[error("{}: {reason}", .path.display())]
    Image { path: PathBuf, reason: String },
    #[error(
        "{}: no mean_image.npy in this session folder (was imaging on?): give the image with \
         --image",
        .session.display()
    )]
    NoMeanImage { session: PathBuf },
    #[error(
        "no folder for mouse {mouse} in {}: add it first (`rigctl mouse add {mouse} ...`)",
        .root.display()
    )]
    NoMouse { root: PathBuf, mouse: String },
    #[error("{0}")]
    Unsafe(session_format::StorageError),
    #[error("{0}")]
    InvalidMouse(String),
}

fn io(what: &'static str, path: &Path, source: std::io::Error) -> ReferenceError {
    ReferenceError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Check a mean image: float32, at least 2-D, every value finite, not
/// flat. Returns its (width, height).
pub fn check_image(path: &Path) -> Result<(u32, u32), ReferenceError> {
    let bad = |reason: String| ReferenceError::Image {
        path: path.to_owned(),
        reason,
    };
    let array = session_format::read_npy(path).map_err(|e| bad(e.to_string()))?;
    let session_format::NpyData::F4(values) = &array.data else {
        return Err(bad(format!(
            "the reference image must be float32 (a session's mean_image.npy), found {}",
            array.descr
        )));
    };
    let n = array.shape.len();
    if n < 2 {
        return Err(bad(format!(
            "the reference image must be (..., height, width), found {}",
            array.shape_text()
        )));
    }
    let (h, w) = (array.shape[n - 2], array.shape[n - 1]);
    let ok = |v: u64| (1..=8192).contains(&v);
    if !ok(w) || !ok(h) {
        return Err(bad(format!(
            "the reference image is {}: height and width must be 1..=8192",
            array.shape_text()
        )));
    }
    let plane = &values[..(w * h) as usize];
    if let Some(i) = plane.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!(
            "pixel {i} of the first plane is {}: a mean image has finite values",
            plane[i]
        )));
    }
    let (lo, hi) = plane
        .iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if hi <= lo {
        return Err(bad(format!(
            "every pixel is {lo}: a flat image cannot be registered against (was the shutter \
             closed?)"
        )));
    }
    Ok((w as u32, h as u32))
}

/// The mouse's folder, checked to be a plain folder.
fn mouse_folder(data_root: &Path, mouse: &str) -> Result<PathBuf, ReferenceError> {
    protocol::control::validate_mouse_id(mouse)
        .map_err(|e| ReferenceError::InvalidMouse(e.to_string()))?;
    let dir = data_root.join(mouse);
    if !dir.exists() && std::fs::symlink_metadata(&dir).is_err() {
        return Err(ReferenceError::NoMouse {
            root: data_root.to_owned(),
            mouse: mouse.to_owned(),
        });
    }
    session_format::plain_folder(&dir).map_err(ReferenceError::Unsafe)?;
    Ok(dir)
}

/// The mouse's reference, every file checked against the record; None when
/// the mouse has none.
pub fn read(data_root: &Path, mouse: &str) -> Result<Option<MouseReference>, ReferenceError> {
    let dir = data_root.join(mouse);
    let record_path = dir.join(RECORD_FILE);
    let text = match std::fs::read_to_string(&record_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("read", &record_path, e)),
    };
    let dir = mouse_folder(data_root, mouse)?;
    let record: ReferenceRecord = toml::from_str(&text).map_err(|e| ReferenceError::Record {
        path: record_path.clone(),
        reason: e.message().trim_end().to_owned(),
    })?;
    let verify = |name: &str, recorded: &str| -> Result<PathBuf, ReferenceError> {
        if name.contains('/') || name.starts_with('.') {
            return Err(ReferenceError::Record {
                path: record_path.clone(),
                reason: format!("{name:?} is not a file name in the mouse's folder"),
            });
        }
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| io("read", &path, e))?;
        let found = sha256_hex(&bytes);
        if found != recorded {
            return Err(ReferenceError::Changed {
                record: record_path.clone(),
                file: name.to_owned(),
                found,
                recorded: recorded.to_owned(),
            });
        }
        Ok(path)
    };
    let image = verify(IMAGE_FILE, &record.image_sha256)?;
    let roi_labels = match (&record.roi_labels, &record.roi_labels_sha256) {
        (Some(name), Some(sha)) => Some(verify(name, sha)?),
        (None, None) => None,
        _ => {
            return Err(ReferenceError::Record {
                path: record_path.clone(),
                reason: "roi_labels and roi_labels_sha256 go together".into(),
            })
        }
    };
    let roi_table = match &record.roi_table_sha256 {
        Some(sha) => Some(verify(TABLE_FILE, sha)?),
        None => None,
    };
    Ok(Some(MouseReference {
        record,
        record_path,
        image,
        roi_labels,
        roi_table,
    }))
}

impl NewReference {
    /// A session folder's mean image, and the label image and table it
    /// used (its copies `roi_labels.*`, `roi_table.*`), if any.
    pub fn from_session(session: &Path) -> Result<NewReference, ReferenceError> {
        let image = session.join("mean_image.npy");
        if !image.is_file() {
            return Err(ReferenceError::NoMeanImage {
                session: session.to_owned(),
            });
        }
        let find = |stem: &str, exts: &[&str]| {
            exts.iter()
                .map(|e| session.join(format!("{stem}.{e}")))
                .find(|p| p.is_file())
        };
        Ok(NewReference {
            image,
            roi_labels: find("roi_labels", &["npy", "tif", "tiff"]),
            roi_table: find("roi_table", &["tsv"]),
            from_session: Some(session.display().to_string()),
            ..NewReference::default()
        })
    }
}

/// Make `new` the mouse's reference (replacing any), crash-safely: each
/// file is written whole, and the record, written last, names them. The
/// label image is checked by the caller (its format is rigd's).
pub fn set(
    data_root: &Path,
    mouse: &str,
    new: &NewReference,
    set_utc: String,
) -> Result<MouseReference, ReferenceError> {
    let dir = mouse_folder(data_root, mouse)?;
    let (width, height) = check_image(&new.image)?;
    let previous = read(data_root, mouse).ok().flatten();
    let copy = |src: &Path, name: &str| -> Result<String, ReferenceError> {
        let bytes = std::fs::read(src).map_err(|e| io("read", src, e))?;
        crate::fsio::write_atomic(&dir, name, &bytes)
            .map_err(|e| io("write", &dir.join(name), e))?;
        Ok(sha256_hex(&bytes))
    };
    let image_sha256 = copy(&new.image, IMAGE_FILE)?;
    let labels_name = new.roi_labels.as_ref().map(|p| {
        let ext = p
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_else(|| "npy".into());
        format!("{LABELS_STEM}.{ext}")
    });
    let roi_labels_sha256 = match (&new.roi_labels, &labels_name) {
        (Some(src), Some(name)) => Some(copy(src, name)?),
        _ => None,
    };
    let roi_table_sha256 = match &new.roi_table {
        Some(src) => Some(copy(src, TABLE_FILE)?),
        None => None,
    };
    let record = ReferenceRecord {
        set_utc,
        source: new.image.display().to_string(),
        from_session: new.from_session.clone(),
        width,
        height,
        image_sha256,
        roi_labels: labels_name.clone(),
        roi_labels_sha256,
        roi_table_sha256,
        operator: new.operator.clone(),
        note: new.note.clone(),
        previous_set_utc: previous.as_ref().map(|p| p.record.set_utc.clone()),
        previous_source: previous.as_ref().map(|p| p.record.source.clone()),
        previous_image_sha256: previous.as_ref().map(|p| p.record.image_sha256.clone()),
    };
    let text = format!(
        "# The imaging reference of mouse {mouse}: see docs/training.md\n{}",
        toml::to_string(&record).map_err(|e| ReferenceError::Record {
            path: dir.join(RECORD_FILE),
            reason: e.to_string(),
        })?
    );
    crate::fsio::write_atomic(&dir, RECORD_FILE, text.as_bytes())
        .map_err(|e| io("write", &dir.join(RECORD_FILE), e))?;
    // Files of the previous reference this one does not name.
    for ext in ["npy", "tif", "tiff"] {
        let name = format!("{LABELS_STEM}.{ext}");
        if labels_name.as_deref() != Some(name.as_str()) {
            let _ = std::fs::remove_file(dir.join(name));
        }
    }
    if new.roi_table.is_none() {
        let _ = std::fs::remove_file(dir.join(TABLE_FILE));
    }
    read(data_root, mouse)?.ok_or_else(|| ReferenceError::Record {
        path: dir.join(RECORD_FILE),
        reason: "vanished as it was written".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use session_format::{NpyAppender, NpyDtype};

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("training-ref-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp");
        d
    }

    fn npy(path: &Path, dtype: NpyDtype, shape: &[usize], values: &[f32]) {
        let mut a = NpyAppender::create(path, dtype, &shape[1..]).expect("create");
        a.append(values).expect("append");
        a.sync().expect("sync");
    }

    #[test]
    fn a_session_mean_image_becomes_the_mouse_reference_and_changes_are_caught() {
        let root = temp("set");
        let session = root.join("M1").join("2026-12-01_10-00-00");
        std::fs::create_dir_all(&session).expect("session");
        let image: Vec<f32> = (0..40 * 32).map(|i| (i % 13) as f32).collect();
        npy(
            &session.join("mean_image.npy"),
            NpyDtype::F4,
            &[1, 32, 40],
            &image,
        );
        std::fs::write(session.join("roi_labels.npy"), b"labels").expect("labels");
        assert_eq!(read(&root, "M1").expect("read"), None);

        let new = NewReference::from_session(&session).expect("from session");
        assert!(new.roi_labels.is_some() && new.roi_table.is_none());
        let r = set(&root, "M1", &new, "2026-12-01T10:30:00Z".into()).expect("set");
        assert_eq!((r.record.width, r.record.height), (40, 32));
        assert_eq!(
            r.roi_labels,
            Some(root.join("M1").join("imaging_roi_labels.npy"))
        );
        assert_eq!(read(&root, "M1").expect("read"), Some(r.clone()));

        // A second set keeps what the first was.
        let again = set(&root, "M1", &new, "2026-12-02T10:30:00Z".into()).expect("set");
        assert_eq!(
            again.record.previous_set_utc.as_deref(),
            Some("2026-12-01T10:30:00Z")
        );

        // A file changed behind the record's back is refused, named.
        std::fs::write(root.join("M1").join(IMAGE_FILE), b"x").expect("write");
        let e = read(&root, "M1").expect_err("changed").to_string();
        assert!(
            e.contains(IMAGE_FILE) && e.contains("rigctl mouse reference set"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn bad_images_and_missing_mice_are_refused_with_the_fix() {
        let root = temp("bad");
        std::fs::create_dir_all(root.join("M2")).expect("mouse");
        let flat = root.join("flat.npy");
        npy(&flat, NpyDtype::F4, &[1, 8, 8], &[3.0; 64]);
        let e = check_image(&flat).expect_err("flat").to_string();
        assert!(e.contains("flat image"), "{e}");
        let labels = root.join("u2.npy");
        let mut a = NpyAppender::create(&labels, NpyDtype::U2, &[8]).expect("create");
        a.append(&[1u16; 64]).expect("append");
        a.sync().expect("sync");
        let e = check_image(&labels).expect_err("u2").to_string();
        assert!(e.contains("must be float32") && e.contains("<u2"), "{e}");
        let new = NewReference {
            image: flat,
            ..NewReference::default()
        };
        let e = set(&root, "M9", &new, "t".into())
            .expect_err("no mouse")
            .to_string();
        assert!(e.contains("rigctl mouse add M9"), "{e}");
        let e = NewReference::from_session(&root.join("M2"))
            .expect_err("no mean image")
            .to_string();
        assert!(e.contains("no mean_image.npy"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
