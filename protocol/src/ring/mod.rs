//! The shared-memory frame ring: the layout the microscope's acquisition
//! program (the producer) writes frames into, and the lock-free algorithms to
//! publish and read them.
//!
//! One producer, any number of readers, and the producer never waits. The
//! region is one 4096-byte header ([`RingHeader`]) followed by `slot_count`
//! slots, each a 64-byte [`SlotHeader`] guarded by a sequence lock and then
//! the frame's pixels. Readers detect a reader-side overrun (the producer
//! lapped them), torn reads, a producer restart (a new `generation`) and a
//! dead producer (a stale heartbeat).
//!
//! Everything that another process may change while we look at it is accessed
//! through atomics ([`RingRegion`] never hands out a plain reference into the
//! region), so a producer in another process or thread is never a data race.
//! The format is little-endian only; [`RingWriter::init`] and
//! [`RingReader::attach`] refuse to run on a big-endian host.
//!
//! The byte-level specification, written so a producer can be implemented in
//! C from it, is `docs/protocol.md`, section 2.
//!
//! ```
//! use protocol::ring::{PixelType, PollOutcome, RingGeometry, RingReader, RingRegion, RingWriter};
//!
//! let geometry = RingGeometry::new(4, 3, 1, PixelType::U16Le, 8)?;
//! let region = RingRegion::new_owned(geometry.region_len_usize()?);
//! let mut writer = RingWriter::init(region.clone(), geometry, 0x5eed, 4242, 1_000)?;
//! let mut reader = RingReader::attach(region)?;
//!
//! writer.publish(17, 2_000, None, &[7u16; 12])?;
//! let mut pixels = vec![0u16; reader.frame_pixels()];
//! match reader.poll(&mut pixels)? {
//!     PollOutcome::Frame(meta) => {
//!         assert_eq!((meta.index, meta.frame_number), (0, 17));
//!         assert!(pixels.iter().all(|&p| p == 7));
//!     }
//!     other => panic!("expected a frame, got {other:?}"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod layout;
mod reader;
mod region;
mod writer;

pub use layout::{
    LayoutError, PixelType, ProducerState, RingGeometry, RingHeader, RingLayout, SlotHeader,
    DEFAULT_SLOT_ALIGN, FLAG_HOST_STAMP_AT_ARRIVAL, FLAG_HW_TIMESTAMP_VALID, HEADER_REGION,
    LAYOUT_VERSION, MAGIC, MAX_DIMENSION, MAX_SLOT_COUNT, RING_HEADER_LEN, SLOT_ALIGN,
    SLOT_HEADER_SIZE,
};
pub use reader::{FrameMeta, PollOutcome, RingReader};
pub use region::RingRegion;
pub use writer::{FrameSlot, RingWriter};

/// Why a ring operation failed. Layout problems (a header that does not
/// describe a valid ring) are wrapped in [`RingError::Layout`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("ring region pointer is null")]
    NullRegion,
    #[error("ring region at address {addr:#x} is not 8-byte aligned; map it page-aligned")]
    MisalignedRegion { addr: usize },
    #[error("this host is big-endian; the frame ring format is little-endian only")]
    BigEndianHost,
    #[error("generation = 0: expected a nonzero value chosen by the producer at each start")]
    ZeroGeneration,
    #[error(
        "generation = {0}: expected a value different from the one already in the region, \
         or readers cannot tell that the producer restarted"
    )]
    GenerationReused(u64),
    #[error("frame has {actual} pixels: expected {expected} (width * height * channels)")]
    FrameLength { expected: usize, actual: usize },
    #[error("pixel buffer holds {actual} pixels: expected at least {expected} (one frame)")]
    BufferTooSmall { expected: usize, actual: usize },
    #[error(
        "pixel write {start}..{end}: expected a range inside 0..{frame_pixels} that starts and \
         ends on a multiple of 4 pixels (or at the end of the frame)"
    )]
    PixelRange {
        start: usize,
        end: usize,
        frame_pixels: usize,
    },
    #[error("ring not ready: the producer is (re)initialising it (generation = 0 or state = 0)")]
    NotReady,
    #[error(
        "write_seq = {found}: went backwards from {previous} without a new generation; \
         the producer does not follow the ring protocol"
    )]
    WriteSeqBackwards { previous: u64, found: u64 },
}

/// Refuse big-endian hosts: the format is little-endian and the copy loops
/// move bytes verbatim.
fn check_host_endian() -> Result<(), RingError> {
    if cfg!(target_endian = "big") {
        Err(RingError::BigEndianHost)
    } else {
        Ok(())
    }
}

/// The slot sequence-lock value while frame index `n` is being written.
#[inline]
const fn seq_writing(n: u64) -> u64 {
    n.wrapping_mul(2).wrapping_add(1)
}

/// The slot sequence-lock value once frame index `n` is published.
#[inline]
const fn seq_published(n: u64) -> u64 {
    n.wrapping_mul(2).wrapping_add(2)
}
