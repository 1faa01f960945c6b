//! `MANIFEST.sha256`: `sha256sum` lines for every file of a finished session.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{commit_tmp, stage_tmp, StorageError, MANIFEST_FILE, SESSION_FILE, TMP_SUFFIX};

/// Rewrite `dir/MANIFEST.sha256` (atomically) from the files now in `dir`.
/// For use after a file of a finished session was replaced on purpose (say a
/// recomputed `summary.json`); `SessionWriter::finish` and `recover` write
/// the manifest themselves.
pub fn write_manifest(dir: &Path) -> Result<(), StorageError> {
    let tmp = stage_manifest(dir, None)?;
    commit_tmp(dir, &tmp, MANIFEST_FILE)
}

/// Write the manifest to its temporary file. `session_toml`, when given, is
/// the content session.toml is about to get (it is hashed instead of the file
/// on disk, so the manifest can be staged before the state changes).
pub(crate) fn stage_manifest(
    dir: &Path,
    session_toml: Option<&[u8]>,
) -> Result<PathBuf, StorageError> {
    let mut files = Vec::new();
    list_files(dir, Path::new(""), &mut files)?;
    files.sort();
    let mut text = String::new();
    for rel in files {
        let name = rel.to_string_lossy().into_owned();
        let hex = match session_toml {
            Some(bytes) if name == SESSION_FILE => hex(&Sha256::digest(bytes)),
            _ => sha256_file(&dir.join(&rel))?,
        };
        text.push_str(&hex);
        text.push_str("  ");
        text.push_str(&name);
        text.push('\n');
    }
    stage_tmp(dir, MANIFEST_FILE, text.as_bytes())
}

/// Regular files under `dir/rel`, relative to `dir`, minus the manifest and
/// temporary files. Symbolic links are not followed or listed.
fn list_files(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), StorageError> {
    let here = dir.join(rel);
    let entries = std::fs::read_dir(&here).map_err(|e| StorageError::io("list", &here, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("list", &here, e))?;
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        let ty = entry
            .file_type()
            .map_err(|e| StorageError::io("stat", &entry.path(), e))?;
        let rel_path = rel.join(&name);
        if ty.is_dir() {
            list_files(dir, &rel_path, out)?;
        } else if ty.is_file() {
            if rel.as_os_str().is_empty() && name_str == MANIFEST_FILE {
                continue;
            }
            if name_str.ends_with(TMP_SUFFIX) {
                continue;
            }
            // sha256sum would escape these; our own names never contain them.
            if name.to_str().is_none() || name_str.contains(['\n', '\\']) {
                return Err(StorageError::Format {
                    path: entry.path(),
                    reason: "file name cannot be listed in a sha256sum manifest".to_owned(),
                });
            }
            out.push(rel_path);
        }
    }
    Ok(())
}

/// Lower-case hex SHA-256 of a file.
pub(crate) fn sha256_file(path: &Path) -> Result<String, StorageError> {
    let mut f = File::open(path).map_err(|e| StorageError::io("open", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| StorageError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
