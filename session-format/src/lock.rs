//! The folder lock: an exclusive `flock` on a session folder, held by the
//! writer while it records and by recovery while it repairs, so the two never
//! touch the same folder at once.

use std::fs::File;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use super::StorageError;

/// Take an exclusive, non-blocking `flock` on a folder. `Ok(None)` if another
/// open file description holds it (a live writer).
pub(crate) fn lock_dir(dir: &Path) -> Result<Option<Flock<File>>, StorageError> {
    let f = File::open(dir).map_err(|e| StorageError::io("open", dir, e))?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(StorageError::io(
            "lock",
            dir,
            std::io::Error::from_raw_os_error(errno as i32),
        )),
    }
}
