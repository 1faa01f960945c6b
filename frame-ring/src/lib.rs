//! The frame ring in POSIX shared memory: the I/O around `protocol::ring`,
//! for the producer ([`FrameRingWriter`]) and for readers
//! ([`FrameRingMapping`]), plus the C and Python producers in `producers/`.
//! It only does `shm_open`, `ftruncate`, `fstat`, `mmap` and `shm_unlink`: it
//! never defines the layout or the lock-free algorithm (those are
//! `protocol::ring`'s) and never interprets a frame.
//!
//! [`FrameRingWriter`] creates (or re-initialises) the shared-memory object
//! and publishes frames into it: it is the producer API for Rust acquisition
//! code and for the simulated microscope (`rig-sim`). [`FrameRingMapping`]
//! opens the object read-only for readers and hands out [`RingReader`]s
//! (`docs/protocol.md`, section 2).
//!
//! A dead producer is detected with [`RingReader::is_stale`] (pass
//! [`host_now_ns`]); a producer that restarted in place shows up as
//! `PollOutcome::ProducerRestarted`; one that unlinked the object and created
//! a new one (for example with another frame size) is picked up by
//! [`FrameRingMapping::reopen_if_needed`].

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::mman::{mmap, munmap, shm_open, shm_unlink, MapFlags, ProtFlags};
use nix::sys::stat::{fstat, Mode};
use protocol::ring::{
    FrameSlot, LayoutError, RingError, RingGeometry, RingReader, RingRegion, RingWriter,
    HEADER_REGION, MAGIC,
};

/// Host `CLOCK_MONOTONIC` now, ns: the clock of the ring's `host_monotonic_ns`
/// and `heartbeat_ns` stamps (`docs/protocol.md` 2.4 and 2.5). The same clock as
/// `firmware_bridge::link::host_now_ns`, so the daemon can map ring stamps
/// through its clock-sync fit; this crate reads it itself so that a producer
/// does not need the serial link's crate.
pub fn host_now_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64) * 1_000_000_000 + ts.tv_nsec() as u64,
        // CLOCK_MONOTONIC cannot fail on Linux; fall back to 0 rather than panic.
        Err(_) => 0,
    }
}

/// The longest POSIX shared-memory name, including the leading `/`.
pub const MAX_SHM_NAME_LEN: usize = 255;

/// Mode of an object the writer creates: owner read/write, group read (the
/// daemon needs read access only; put it in the producer's group or widen
/// the mode afterwards). The process umask still applies.
pub const SHM_MODE: u32 = 0o640;

/// Why opening, creating or using a shared-memory frame ring failed. Every
/// message names the shared-memory object and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error(
        "shared-memory name {name:?}: {reason}; expected '/' followed by 1 to 254 characters \
         with no further '/', e.g. \"/rigd-frames\""
    )]
    InvalidName { name: String, reason: &'static str },
    #[error(
        "frame ring {name} does not exist (no /dev/shm{name}): the acquisition program \
         (or rig-sim) must create it before rigd opens it; start the producer, and check \
         that imaging.shm_name in rig.toml matches the producer's name"
    )]
    NotFound { name: String },
    #[error(
        "frame ring {name}: {op} was refused (permission denied): give the daemon's user \
         read access to /dev/shm{name} (same group as the producer and mode 0640, or a \
         wider mode)"
    )]
    PermissionDenied { name: String, op: &'static str },
    #[error("frame ring {name}: {op} failed: {errno}")]
    Os {
        name: String,
        op: &'static str,
        errno: Errno,
    },
    #[error(
        "frame ring {name} is {len} bytes: expected at least {needed}; the producer has not \
         sized it yet (retry shortly) or the object is not a frame ring"
    )]
    Truncated { name: String, len: u64, needed: u64 },
    #[error(
        "frame ring {name} is not ready: the producer is initialising it (generation = 0 or \
         state = 0); retry shortly"
    )]
    NotReady { name: String },
    #[error("frame ring {name}: {source}")]
    Layout { name: String, source: LayoutError },
    #[error("frame ring {name}: {source}")]
    Ring { name: String, source: RingError },
    #[error(
        "frame ring {name} carries {found_width}x{found_height} pixels x {found_channels} \
         channel(s): expected {width}x{height} x {channels} from imaging.width, \
         imaging.height and imaging.channels; configure the microscope and rig.toml alike"
    )]
    GeometryMismatch {
        name: String,
        width: u32,
        height: u32,
        channels: u32,
        found_width: u32,
        found_height: u32,
        found_channels: u32,
    },
    #[error("frame ring {name}: the writer was closed; create a new FrameRingWriter to publish")]
    WriterClosed { name: String },
}

impl ShmError {
    fn ring(name: &str, source: RingError) -> Self {
        match source {
            RingError::Layout(source) => Self::Layout {
                name: name.to_owned(),
                source,
            },
            RingError::NotReady => Self::NotReady {
                name: name.to_owned(),
            },
            source => Self::Ring {
                name: name.to_owned(),
                source,
            },
        }
    }

    fn os(name: &str, op: &'static str, errno: Errno) -> Self {
        match errno {
            Errno::ENOENT => Self::NotFound {
                name: name.to_owned(),
            },
            Errno::EACCES | Errno::EPERM => Self::PermissionDenied {
                name: name.to_owned(),
                op,
            },
            errno => Self::Os {
                name: name.to_owned(),
                op,
                errno,
            },
        }
    }
}

/// Check a POSIX shared-memory name: starts with `/`, has no other `/`, no
/// NUL, and is 2..=255 bytes long.
pub fn check_shm_name(name: &str) -> Result<(), ShmError> {
    let reason = if !name.starts_with('/') {
        Some("does not start with '/'")
    } else if name.len() < 2 {
        Some("is only '/'")
    } else if name.len() > MAX_SHM_NAME_LEN {
        Some("is longer than 255 bytes")
    } else if name[1..].contains('/') {
        Some("contains a '/' after the first character")
    } else if name.contains('\0') {
        Some("contains a NUL byte")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ShmError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Remove the shared-memory object `name`. Readers that still map it keep
/// their mapping (it goes stale); the memory is freed when the last one
/// unmaps. A name that does not exist is not an error.
pub fn unlink_ring(name: &str) -> Result<(), ShmError> {
    check_shm_name(name)?;
    match shm_unlink(name) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(errno) => Err(ShmError::os(name, "shm_unlink", errno)),
    }
}

/// One `mmap` of a shared-memory object, unmapped on drop. It is the owner
/// kept alive by every [`RingRegion`] handle over it.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<c_void>,
    len: NonZeroUsize,
}

// SAFETY: the pointer is only used to unmap the memory on drop; all reads and
// writes of the memory go through `RingRegion`, which uses atomics only.
unsafe impl Send for Mapping {}
// SAFETY: as above; `Mapping` has no methods that touch the memory.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + len` is exactly one mapping made by `map_region`
        // and no handle into it survives the last `RingRegion` (which owns
        // this value). An error here could only mean a bug; nothing to do.
        let _ = unsafe { munmap(self.ptr, self.len.get()) };
    }
}

/// Map `len` bytes of `fd` shared, read-only or read/write, and wrap the
/// mapping in a [`RingRegion`] that keeps it alive.
fn map_region(name: &str, fd: &OwnedFd, len: u64, writable: bool) -> Result<RingRegion, ShmError> {
    let too_small = || ShmError::Truncated {
        name: name.to_owned(),
        len,
        needed: HEADER_REGION as u64,
    };
    let len_usize = usize::try_from(len).map_err(|_| ShmError::Os {
        name: name.to_owned(),
        op: "mmap",
        errno: Errno::EOVERFLOW,
    })?;
    let nz_len = NonZeroUsize::new(len_usize).ok_or_else(too_small)?;
    let prot = if writable {
        ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
    } else {
        ProtFlags::PROT_READ
    };
    // SAFETY: a fresh shared mapping chosen by the kernel (no address hint),
    // so it aliases no Rust object; its lifetime is tied to `Mapping`.
    let ptr = unsafe { mmap(None, nz_len, prot, MapFlags::MAP_SHARED, fd.as_fd(), 0) }
        .map_err(|errno| ShmError::os(name, "mmap", errno))?;
    let mapping = Mapping { ptr, len: nz_len };
    // SAFETY: the mapping is `len` bytes, page-aligned, readable (writable if
    // a writer uses it), and lives as long as the owner `mapping`. In this
    // process it is only accessed through `RingRegion` (atomics); other
    // processes are expected to follow the ring protocol. The object is never
    // shrunk in place by our producers (they unlink and re-create instead),
    // so accesses within `len` do not fault.
    unsafe { RingRegion::from_raw_with_owner(ptr.as_ptr().cast::<u8>(), len_usize, mapping) }
        .map_err(|e| ShmError::ring(name, e))
}

fn object_size(name: &str, fd: &OwnedFd) -> Result<(u64, (u64, u64)), ShmError> {
    let st = fstat(fd.as_fd()).map_err(|errno| ShmError::os(name, "fstat", errno))?;
    let size = u64::try_from(st.st_size).unwrap_or(0);
    #[allow(clippy::unnecessary_cast)] // dev_t/ino_t widths differ between targets
    let identity = (st.st_dev as u64, st.st_ino as u64);
    Ok((size, identity))
}

/// A fresh generation: nonzero, mixing the wall-clock time and the pid
/// (`docs/protocol.md` 2.6.1).
fn fresh_generation(pid: u32) -> u64 {
    let realtime_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (realtime_ns ^ host_now_ns().rotate_left(17) ^ (u64::from(pid) << 32)) | 1
}

/// The producer side of a frame ring in POSIX shared memory. It never waits
/// for readers. Dropping it marks the ring closed (`state = 2`) but does not
/// unlink it, so readers can drain the last frames.
#[derive(Debug)]
pub struct FrameRingWriter {
    name: String,
    geometry: RingGeometry,
    generation: u64,
    writer: Option<RingWriter>,
}

impl FrameRingWriter {
    /// Create the shared-memory object `name` (`shm_open(O_CREAT | O_RDWR,
    /// 0640)`), size it to `geometry.region_len()`, map it shared read/write
    /// and initialise a new generation of the ring in it.
    ///
    /// An existing object of the same name is reused (a restarted producer:
    /// readers see a new generation). If its size differs it is unlinked and
    /// created anew (readers that still map the old one see it go stale and
    /// re-open, see [`FrameRingMapping::reopen_if_needed`]); an object is
    /// never shrunk in place, which would make a reader's access fault.
    pub fn create(name: &str, geometry: RingGeometry) -> Result<Self, ShmError> {
        check_shm_name(name)?;
        let region_len = geometry.region_len();
        let mode = Mode::from_bits_truncate(SHM_MODE);
        let mut fd = shm_open(name, OFlag::O_CREAT | OFlag::O_RDWR, mode)
            .map_err(|e| ShmError::os(name, "shm_open(O_CREAT | O_RDWR)", e))?;
        let (mut size, _) = object_size(name, &fd)?;
        if size != 0 && size != region_len {
            drop(fd);
            unlink_ring(name)?;
            fd = shm_open(name, OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR, mode)
                .map_err(|e| ShmError::os(name, "shm_open(O_CREAT | O_EXCL | O_RDWR)", e))?;
            size = 0;
        }
        if size != region_len {
            let len = i64::try_from(region_len).map_err(|_| ShmError::Os {
                name: name.to_owned(),
                op: "ftruncate",
                errno: Errno::EFBIG,
            })?;
            nix::unistd::ftruncate(fd.as_fd(), len)
                .map_err(|e| ShmError::os(name, "ftruncate", e))?;
        }
        let region = map_region(name, &fd, region_len, true)?;
        drop(fd); // the mapping stays valid without the descriptor

        let pid = std::process::id();
        let mut generation = fresh_generation(pid);
        let writer = loop {
            match RingWriter::init(region.clone(), geometry, generation, pid, host_now_ns()) {
                // Same nanosecond as the previous run in this region: pick
                // another odd (hence nonzero) value.
                Err(RingError::GenerationReused(_)) => generation = generation.wrapping_add(2),
                other => break other.map_err(|e| ShmError::ring(name, e))?,
            }
        };
        Ok(Self {
            name: name.to_owned(),
            geometry,
            generation,
            writer: Some(writer),
        })
    }

    /// The shared-memory name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The geometry being written.
    pub fn geometry(&self) -> RingGeometry {
        self.geometry
    }

    /// This producer run's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Frames published so far in this generation (the next frame's index).
    pub fn next_index(&self) -> u64 {
        self.writer.as_ref().map_or(0, RingWriter::next_index)
    }

    /// Pixels per frame (`width * height * channels`).
    pub fn frame_pixels(&self) -> usize {
        self.geometry.frame_pixels() as usize
    }

    fn live(&mut self) -> Result<&mut RingWriter, ShmError> {
        self.writer.as_mut().ok_or_else(|| ShmError::WriterClosed {
            name: self.name.clone(),
        })
    }

    /// Publish one frame (never waits): `pixels` are `width * height *
    /// channels` values, channel-major then row-major. `host_ns` is
    /// `CLOCK_MONOTONIC` ([`host_now_ns`]) at the frame's start, its
    /// frame-clock edge, to within a quarter period (`docs/protocol.md` 2.5),
    /// also the heartbeat; `hw_ts` a hardware timestamp if there is one. Returns
    /// the frame's index in this generation.
    pub fn publish(
        &mut self,
        frame_number: u64,
        host_ns: u64,
        hw_ts: Option<u64>,
        pixels: &[u16],
    ) -> Result<u64, ShmError> {
        let name = self.name.clone();
        self.live()?
            .publish(frame_number, host_ns, hw_ts, pixels)
            .map_err(|e| ShmError::ring(&name, e))
    }

    /// Publish a frame stamped at its arrival on this host (see
    /// [`RingWriter::publish_arrived`]).
    pub fn publish_arrived(
        &mut self,
        frame_number: u64,
        arrival_ns: u64,
        hw_ts: Option<u64>,
        pixels: &[u16],
    ) -> Result<u64, ShmError> {
        let name = self.name.clone();
        self.live()?
            .publish_arrived(frame_number, arrival_ns, hw_ts, pixels)
            .map_err(|e| ShmError::ring(&name, e))
    }

    /// Start writing the next frame in place (two-phase publish; see
    /// [`RingWriter::begin_frame`]).
    pub fn begin_frame(&mut self) -> Result<FrameSlot<'_>, ShmError> {
        Ok(self.live()?.begin_frame())
    }

    /// Store `heartbeat_ns = now_ns` ([`host_now_ns`]). Call at least every
    /// 100 ms while no frames are published. Does nothing once closed.
    pub fn heartbeat(&mut self, now_ns: u64) {
        if let Some(writer) = self.writer.as_mut() {
            writer.heartbeat(now_ns);
        }
    }

    /// Set the informational nominal frame rate, in milli-hertz.
    pub fn set_nominal_frame_rate_mhz(&mut self, rate_mhz: u32) {
        if let Some(writer) = self.writer.as_mut() {
            writer.set_nominal_frame_rate_mhz(rate_mhz);
        }
    }

    /// Mark the ring closed cleanly (`state = 2`). The frames stay readable
    /// until the object is unlinked or re-initialised. Idempotent; publishing
    /// afterwards is [`ShmError::WriterClosed`].
    pub fn close(&mut self) {
        if let Some(writer) = self.writer.take() {
            writer.close();
        }
    }

    /// Remove the shared-memory name (see [`unlink_ring`]). Readers keep
    /// their mappings; a new producer creates a fresh object.
    pub fn unlink(&self) -> Result<(), ShmError> {
        unlink_ring(&self.name)
    }
}

impl Drop for FrameRingWriter {
    fn drop(&mut self) {
        self.close();
    }
}

/// A reader's read-only mapping of a frame ring. Hand out [`RingReader`]s
/// with [`reader`](Self::reader); each keeps the mapping alive on its own.
#[derive(Debug)]
pub struct FrameRingMapping {
    name: String,
    region: RingRegion,
    geometry: RingGeometry,
    /// `(st_dev, st_ino)` of the mapped object, to notice a re-created one.
    identity: (u64, u64),
}

impl FrameRingMapping {
    /// Open the shared-memory object `name` read-only, map all of it
    /// (`fstat` gives the size) and validate the ring header.
    ///
    /// Errors: [`ShmError::NotFound`] when no producer has created it,
    /// [`ShmError::Truncated`] or [`ShmError::NotReady`] while a producer is
    /// still creating it (retry), [`ShmError::Layout`] for an object that is
    /// not a valid ring (wrong magic or version, too short for its header).
    pub fn open(name: &str) -> Result<Self, ShmError> {
        check_shm_name(name)?;
        let (region, identity) = Self::map(name)?;
        let reader = Self::attach(name, &region)?;
        Ok(Self {
            name: name.to_owned(),
            region,
            geometry: reader.geometry(),
            identity,
        })
    }

    fn map(name: &str) -> Result<(RingRegion, (u64, u64)), ShmError> {
        let fd = shm_open(name, OFlag::O_RDONLY, Mode::empty())
            .map_err(|e| ShmError::os(name, "shm_open(O_RDONLY)", e))?;
        let (size, identity) = object_size(name, &fd)?;
        if size < HEADER_REGION as u64 {
            return Err(ShmError::Truncated {
                name: name.to_owned(),
                len: size,
                needed: HEADER_REGION as u64,
            });
        }
        let region = map_region(name, &fd, size, false)?;
        Ok((region, identity))
    }

    /// Attach a reader, telling a zeroed (not yet initialised) object from
    /// one that is not a frame ring at all.
    fn attach(name: &str, region: &RingRegion) -> Result<RingReader, ShmError> {
        match RingReader::attach(region.clone()) {
            Ok(reader) => Ok(reader),
            Err(RingError::NotReady) => {
                let mut magic = [0u8; 8];
                region.snapshot_into(&mut magic);
                if magic != [0u8; 8] && magic != MAGIC {
                    Err(ShmError::Layout {
                        name: name.to_owned(),
                        source: LayoutError::BadMagic {
                            found: magic.escape_ascii().to_string(),
                        },
                    })
                } else {
                    Err(ShmError::NotReady {
                        name: name.to_owned(),
                    })
                }
            }
            Err(e) => Err(ShmError::ring(name, e)),
        }
    }

    /// The shared-memory name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.region.len()
    }

    /// Whether nothing is mapped (never true for an open ring).
    pub fn is_empty(&self) -> bool {
        self.region.is_empty()
    }

    /// The geometry found at the last [`open`](Self::open) or
    /// [`reopen_if_needed`](Self::reopen_if_needed). A reader follows
    /// in-place restarts by itself: use [`RingReader::geometry`] for the
    /// generation it reads.
    pub fn geometry(&self) -> RingGeometry {
        self.geometry
    }

    /// Check the ring's frame shape against the configuration
    /// (`imaging.width`, `imaging.height`, `imaging.channels`).
    pub fn check_geometry(&self, width: u32, height: u32, channels: u32) -> Result<(), ShmError> {
        let g = self.geometry;
        if (g.width(), g.height(), g.channels()) == (width, height, channels) {
            return Ok(());
        }
        Err(ShmError::GeometryMismatch {
            name: self.name.clone(),
            width,
            height,
            channels,
            found_width: g.width(),
            found_height: g.height(),
            found_channels: g.channels(),
        })
    }

    /// A new reader at the live edge (the next frame to be published; use
    /// [`RingReader::seek`] to read older frames still in the ring).
    pub fn reader(&self) -> Result<RingReader, ShmError> {
        Self::attach(&self.name, &self.region)
    }

    /// The permission bits of the shared-memory object (`st_mode & 0o777`),
    /// read now. A ring writable by others (`& 0o002`) lets any local user
    /// write frames that rigd would record as the microscope's.
    pub fn mode(&self) -> Result<u32, ShmError> {
        let fd = shm_open(self.name.as_str(), OFlag::O_RDONLY, Mode::empty())
            .map_err(|e| ShmError::os(&self.name, "shm_open(O_RDONLY)", e))?;
        let st = fstat(fd.as_fd()).map_err(|errno| ShmError::os(&self.name, "fstat", errno))?;
        #[allow(clippy::unnecessary_cast)] // mode_t widths differ between targets
        Ok(st.st_mode as u32 & 0o777)
    }

    /// Re-open the name and re-map if the object behind it is not the one
    /// mapped (the producer unlinked and re-created it) or has another size
    /// (it grew in place for a larger geometry). Returns `true` when it
    /// re-mapped: readers from [`reader`](Self::reader) still read the old
    /// mapping, so make a new one.
    ///
    /// Call it when a reader goes stale ([`RingReader::is_stale`]) or
    /// `poll` fails with a region-too-small layout error. Errors as for
    /// [`open`](Self::open) (e.g. [`ShmError::NotFound`] while a restarting
    /// producer has unlinked the old object and not created the new one).
    pub fn reopen_if_needed(&mut self) -> Result<bool, ShmError> {
        let fd = shm_open(self.name.as_str(), OFlag::O_RDONLY, Mode::empty())
            .map_err(|e| ShmError::os(&self.name, "shm_open(O_RDONLY)", e))?;
        let (size, identity) = object_size(&self.name, &fd)?;
        if identity == self.identity && size == self.region.len() as u64 {
            // Same object: a reader follows in-place restarts itself, but
            // keep `geometry()` current when the header is readable.
            if let Ok(reader) = RingReader::attach(self.region.clone()) {
                self.geometry = reader.geometry();
            }
            return Ok(false);
        }
        drop(fd);
        let (region, identity) = Self::map(&self.name)?;
        let reader = Self::attach(&self.name, &region)?;
        self.geometry = reader.geometry();
        self.region = region;
        self.identity = identity;
        Ok(true)
    }
}
