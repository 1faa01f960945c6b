//! The disk reserve: space set aside in a session folder while it is recorded,
//! freed at the first failed write so a full disk still lets the session be
//! closed properly.

use std::path::Path;

/// Space set aside in every session folder while it is recorded
/// (`.rigd-reserve.tmp`, zeros): freed when a write fails, so that on a full
/// disk the session can still be closed properly (`session.toml` with the
/// stop reason, the summary). Removed at the end; recovery removes a
/// leftover one with the other temporary files.
pub const RESERVE_BYTES: usize = 1 << 20;
/// The reserve's file name (a temporary file: never in the manifest).
pub const RESERVE_FILE: &str = ".rigd-reserve.tmp";

/// Write the reserve into `dir` (fsynced).
pub fn make_reserve(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join(RESERVE_FILE))?;
    f.write_all(&vec![0u8; RESERVE_BYTES])?;
    f.sync_all()
}

/// Remove the reserve (no error if it is gone).
pub fn free_reserve(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(RESERVE_FILE));
}
