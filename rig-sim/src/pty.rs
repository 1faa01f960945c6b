//! The pty the virtual rig serves, and the symlink that names it.
//!
//! The simulator keeps only the master side open. Whether a host has the slave
//! open shows as `POLLHUP` on the master (set while no process has the slave
//! open), which is how the simulator knows that nobody is listening. The slave
//! is put in raw mode once, when the pty is made; the setting stays with the
//! pty while the master is open.
//!
//! A host that opened the port exclusively (`TIOCEXCL`, as the `serialport`
//! crate does) leaves that flag on the pty after it closes (unlike a real USB
//! tty, which is released on the last close), and a later open by a non-root
//! user would fail with `EBUSY`. So when the host closes the port the simulator
//! clears the flag and flushes stale bytes, or, if it cannot open the slave to
//! do so, replaces the pty with a fresh one behind the same link.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::Mode;
use nix::sys::termios::{self, FlushArg, SetArg};

/// The master side of a pty whose slave is raw.
#[derive(Debug)]
pub(crate) struct Pty {
    master: OwnedFd,
    slave_path: PathBuf,
}

impl Pty {
    /// Make a pty: raw slave, non-blocking close-on-exec master. Our slave fd is
    /// closed again, so the master reports `POLLHUP` until a host opens it.
    pub(crate) fn open() -> io::Result<Self> {
        let pair = nix::pty::openpty(None, None)?;
        let mut t = termios::tcgetattr(&pair.slave)?;
        termios::cfmakeraw(&mut t);
        termios::tcsetattr(&pair.slave, SetArg::TCSANOW, &t)?;
        let slave_path = nix::unistd::ttyname(&pair.slave)?;
        let flags = OFlag::from_bits_truncate(fcntl(&pair.master, FcntlArg::F_GETFL)?);
        fcntl(&pair.master, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        fcntl(&pair.master, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        drop(pair.slave);
        Ok(Self {
            master: pair.master,
            slave_path,
        })
    }

    /// The slave device, e.g. `/dev/pts/7`.
    pub(crate) fn slave_path(&self) -> &Path {
        &self.slave_path
    }

    pub(crate) fn master(&self) -> &OwnedFd {
        &self.master
    }

    /// Whether some process has the slave open (no `POLLHUP` on the master).
    pub(crate) fn host_present(&self) -> bool {
        let mut fds = [PollFd::new(self.master.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => !fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
            Err(_) => false,
        }
    }

    /// Read what the host wrote. `Ok(0)` when nothing is waiting; an error
    /// (`EIO`) when the host has closed the slave.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match nix::unistd::read(&self.master, buf) {
            Ok(n) => Ok(n),
            Err(Errno::EAGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Write towards the host; `Ok(0)` when the pty's buffer is full.
    pub(crate) fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match nix::unistd::write(&self.master, buf) {
            Ok(n) => Ok(n),
            Err(Errno::EAGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// After the host closed the slave: clear a leftover exclusive flag and
    /// drop bytes the host never read. Returns false when the slave cannot be
    /// opened (it is exclusive and we are not root): replace the pty then.
    pub(crate) fn tidy_after_host(&self) -> bool {
        let fd = match nix::fcntl::open(
            &self.slave_path,
            OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(_) => return false,
        };
        let _ = rustix::termios::ioctl_tiocnxcl(&fd);
        let _ = termios::tcflush(&fd, FlushArg::TCIOFLUSH);
        true
    }
}

/// Why the link could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{path}: exists and is not a symlink; refusing to replace it (remove it or choose another --link)")]
    NotASymlink { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Check that `link` can be (re)placed: absent or a symlink.
pub(crate) fn check_link(link: &Path) -> Result<(), LinkError> {
    match std::fs::symlink_metadata(link) {
        Ok(m) if m.file_type().is_symlink() => Ok(()),
        Ok(_) => Err(LinkError::NotASymlink {
            path: link.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LinkError::Io {
            path: link.to_path_buf(),
            source,
        }),
    }
}

/// Point `link` at `target`, replacing an existing symlink atomically.
pub(crate) fn install_link(link: &Path, target: &Path) -> Result<(), LinkError> {
    check_link(link)?;
    let io_err = |source| LinkError::Io {
        path: link.to_path_buf(),
        source,
    };
    let name = link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rig-sim".to_string());
    let tmp = link.with_file_name(format!(".{name}.rig-sim-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(io_err)?;
    std::fs::rename(&tmp, link).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(e)
    })
}

/// Remove `link` if it still points at `target` (someone else may have
/// replaced it meanwhile).
pub(crate) fn remove_link(link: &Path, target: &Path) {
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        let _ = std::fs::remove_file(link);
    }
}
