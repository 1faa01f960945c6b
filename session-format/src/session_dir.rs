//! Creating a session folder exclusively.

use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{folder_stamp, sync_dir, StorageError};

/// Highest suffix tried when a folder for the same mouse and second exists.
const MAX_SUFFIX: u32 = 9;

/// A freshly created, empty session folder
/// `<data_root>/<mouse>/<YYYY-MM-DD>_<HHMMSS>[_n]/` (the lab's local time,
/// UTC unless [`SessionDir::create_at_offset`] says otherwise).
///
/// Policy for two starts of one mouse within the same second: the second
/// folder gets `_2`, the next `_3`, up to `_9`; after that the start is refused.
/// A folder is never reused or overwritten: the leaf is made with `mkdir`, which
/// fails if anything is already there, so two processes cannot share a folder.
#[derive(Debug, Clone)]
pub struct SessionDir {
    path: PathBuf,
    mouse: String,
    start_utc: SystemTime,
}

impl SessionDir {
    /// Create the folder for `mouse`'s session starting at `start_utc`.
    ///
    /// `data_root` must already exist (a missing root usually means an
    /// unmounted data disk, and writing to the system disk instead would be
    /// worse than refusing); `<data_root>/<mouse>/` is created if needed. The
    /// mouse id must match `[A-Za-z0-9_-]{1,64}`, so it can never name a path
    /// outside the data root. The new entries are fsynced into their parents.
    pub fn create(
        data_root: &Path,
        mouse: &str,
        start_utc: SystemTime,
    ) -> Result<SessionDir, StorageError> {
        Self::create_at_offset(data_root, mouse, start_utc, 0)
    }

    /// [`SessionDir::create`] with the folder named in the lab's local time:
    /// `utc_offset_s` is the lab zone's offset from UTC at `start_utc`
    /// (east positive), so `<YYYY-MM-DD>` is the lab's calendar day.
    pub fn create_at_offset(
        data_root: &Path,
        mouse: &str,
        start_utc: SystemTime,
        utc_offset_s: i32,
    ) -> Result<SessionDir, StorageError> {
        protocol::control::validate_mouse_id(mouse)?;
        // Belt and braces: the rule above already excludes these.
        assert!(
            !mouse.contains(['/', '\\', '\0']) && mouse != "." && mouse != "..",
            "mouse id {mouse:?} passed validation but names a path"
        );
        if !data_root.is_dir() {
            return Err(StorageError::DataRootMissing {
                path: data_root.to_owned(),
            });
        }
        let mouse_dir = data_root.join(mouse);
        match std::fs::create_dir(&mouse_dir) {
            Ok(()) => sync_dir(data_root)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StorageError::io("create folder", &mouse_dir, e)),
        }
        // The mouse's folder must be a real folder: not followed if it is a
        // symbolic link (which would send the session anywhere).
        plain_folder(&mouse_dir)?;
        let stamp = folder_stamp(start_utc, utc_offset_s);
        for n in 1..=MAX_SUFFIX {
            let leaf = if n == 1 {
                stamp.clone()
            } else {
                format!("{stamp}_{n}")
            };
            let path = mouse_dir.join(leaf);
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    // mkdir does not follow a link at the leaf; check that
                    // nothing on the way was swapped for one meanwhile.
                    plain_folder(&path)?;
                    inside(data_root, mouse, &path)?;
                    sync_dir(&mouse_dir)?;
                    return Ok(SessionDir {
                        path,
                        mouse: mouse.to_owned(),
                        start_utc,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(StorageError::io("create session folder", &path, e)),
            }
        }
        Err(StorageError::SessionExists {
            path: mouse_dir.join(stamp),
        })
    }

    /// The session folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The mouse id.
    pub fn mouse(&self) -> &str {
        &self.mouse
    }

    /// UTC wall time of the session start, as passed to [`SessionDir::create`].
    pub fn start_utc(&self) -> SystemTime {
        self.start_utc
    }
}

/// `path` is a folder, and not a symbolic link (looked at with `lstat`): a
/// mouse's folder must be one before anything is written into it (a link
/// would send the files anywhere). The error names the link and its target.
pub fn plain_folder(path: &Path) -> Result<(), StorageError> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| StorageError::io("look at", path, e))?;
    let t = meta.file_type();
    let reason = if t.is_symlink() {
        let target = std::fs::read_link(path)
            .map(|t| format!(" (to {})", t.display()))
            .unwrap_or_default();
        format!("it is a symbolic link{target}")
    } else if !t.is_dir() {
        "it is not a folder".to_owned()
    } else {
        return Ok(());
    };
    Err(StorageError::UnsafeFolder {
        path: path.to_owned(),
        reason,
    })
}

/// The created folder resolves to `<data_root>/<mouse>/<leaf>` with the data
/// root resolved (the root itself may be a link, e.g. to a data disk).
fn inside(data_root: &Path, mouse: &str, path: &Path) -> Result<(), StorageError> {
    let root =
        std::fs::canonicalize(data_root).map_err(|e| StorageError::io("resolve", data_root, e))?;
    let real = std::fs::canonicalize(path).map_err(|e| StorageError::io("resolve", path, e))?;
    let expected = path.file_name().map(|leaf| root.join(mouse).join(leaf));
    if expected.as_deref() == Some(real.as_path()) {
        Ok(())
    } else {
        Err(StorageError::UnsafeFolder {
            path: path.to_owned(),
            reason: format!("it resolves to {}, outside the data root", real.display()),
        })
    }
}
