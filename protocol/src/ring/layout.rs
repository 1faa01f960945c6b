//! Byte layout of the ring: the header, the slot header, the geometry maths
//! and the validation of a header found in memory.

use core::mem::{offset_of, size_of};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The first 8 bytes of every ring.
pub const MAGIC: [u8; 8] = *b"RIGFRAME";
/// The layout version this code writes and understands.
pub const LAYOUT_VERSION: u32 = 1;
/// Bytes reserved for the header at the start of the region; slot 0 starts
/// here, so slots are page-aligned when the region is.
pub const HEADER_REGION: usize = 4096;
/// Bytes of [`RingHeader`] that carry fields; the rest of [`HEADER_REGION`]
/// is reserved (zero in layout version 1).
pub const RING_HEADER_LEN: usize = size_of::<RingHeader>();
/// Bytes of [`SlotHeader`] at the start of every slot; pixels follow.
pub const SLOT_HEADER_SIZE: usize = 64;
/// `slot_stride` must be a multiple of this (so pixel data is 64-byte aligned).
pub const SLOT_ALIGN: u64 = 64;
/// The stride [`RingGeometry::slot_stride`] rounds up to (one page), as
/// recommended for producers.
pub const DEFAULT_SLOT_ALIGN: u64 = 4096;
/// Largest accepted `width` or `height`.
pub const MAX_DIMENSION: u32 = 16384;
/// Largest accepted `slot_count`.
pub const MAX_SLOT_COUNT: u32 = 65536;
/// [`SlotHeader::flags`] bit 0: `hw_timestamp_ns` is valid.
pub const FLAG_HW_TIMESTAMP_VALID: u32 = 1;
/// [`SlotHeader::flags`] bit 1: `host_monotonic_ns` is when the frame reached
/// this host (a bridge from another machine), not when it was acquired: it
/// cannot tell which frame-clock edge is the frame's.
pub const FLAG_HOST_STAMP_AT_ARRIVAL: u32 = 2;

/// The ring header as it lies at offset 0 of the region (little-endian,
/// 128 bytes; bytes 128..4096 of the header region are reserved and zero).
///
/// The `u64` fields sit at 8-byte-aligned offsets, so they can be accessed
/// atomically in a page-aligned mapping. Do not take a reference to a live
/// header in shared memory: the producer changes `write_seq`,
/// `heartbeat_ns`, `state` and (on a restart) everything else concurrently.
/// This type is for building a header ([`RingGeometry::header_for`]) and for
/// validating a copy ([`RingHeader::validate`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct RingHeader {
    /// `b"RIGFRAME"`.
    pub magic: [u8; 8],
    /// [`LAYOUT_VERSION`].
    pub layout_version: u32,
    /// [`HEADER_REGION`]: offset of slot 0.
    pub header_size: u32,
    /// Pixels per row.
    pub width: u32,
    /// Rows per channel plane.
    pub height: u32,
    /// 1 or 2.
    pub channels: u32,
    /// [`PixelType`] code; 1 = uint16 little-endian.
    pub pixel_type: u32,
    /// Number of slots; frame index `n` lives in slot `n % slot_count`.
    pub slot_count: u32,
    /// [`SLOT_HEADER_SIZE`].
    pub slot_header_size: u32,
    /// Bytes from one slot's start to the next: a multiple of 64 and at least
    /// `64 + frame_bytes`.
    pub slot_stride: u64,
    /// `width * height * channels * bytes_per_pixel`.
    pub frame_bytes: u64,
    /// Nonzero, new at every producer (re)start; 0 while (re)initialising.
    pub generation: u64,
    /// Frames published in this generation.
    pub write_seq: u64,
    /// The producer's process id (informational).
    pub producer_pid: u32,
    /// [`ProducerState`] code.
    pub state: u32,
    /// Producer `CLOCK_MONOTONIC` in ns, updated at every publish and at least
    /// every 100 ms while idle.
    pub heartbeat_ns: u64,
    /// Nominal frame rate in milli-hertz; 0 = unknown.
    pub nominal_frame_rate_mhz: u32,
    /// Reserved, zero.
    pub reserved0: u32,
    /// Reserved, zero.
    pub reserved: [u64; 4],
}

/// The 64-byte header at the start of every slot.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct SlotHeader {
    /// Sequence lock: 0 = never written, `2n+1` while frame index `n` is
    /// being written, `2n+2` once it is published.
    pub seq: u64,
    /// The acquisition program's own frame counter (may differ from `n`).
    pub frame_number: u64,
    /// Producer `CLOCK_MONOTONIC` in ns at the frame's start (its
    /// frame-clock edge), or its arrival on this host (flag bit 1).
    pub host_monotonic_ns: u64,
    /// Hardware timestamp in ns, meaningful when flag bit 0 is set.
    pub hw_timestamp_ns: u64,
    /// Bit 0 ([`FLAG_HW_TIMESTAMP_VALID`]): `hw_timestamp_ns` is valid.
    /// Bit 1 ([`FLAG_HOST_STAMP_AT_ARRIVAL`]): `host_monotonic_ns` is the
    /// frame's arrival on this host, not its acquisition.
    pub flags: u32,
    /// Reserved, zero.
    pub reserved0: u32,
    /// Reserved, zero.
    pub reserved: [u64; 3],
}

/// Byte offsets of the header fields, used by the atomic accessors.
pub(crate) mod off {
    use super::{RingHeader, SlotHeader};
    use core::mem::offset_of;

    pub const MAGIC: usize = offset_of!(RingHeader, magic);
    pub const LAYOUT_VERSION: usize = offset_of!(RingHeader, layout_version);
    pub const HEADER_SIZE: usize = offset_of!(RingHeader, header_size);
    pub const WIDTH: usize = offset_of!(RingHeader, width);
    pub const HEIGHT: usize = offset_of!(RingHeader, height);
    pub const CHANNELS: usize = offset_of!(RingHeader, channels);
    pub const PIXEL_TYPE: usize = offset_of!(RingHeader, pixel_type);
    pub const SLOT_COUNT: usize = offset_of!(RingHeader, slot_count);
    pub const SLOT_HEADER_SIZE: usize = offset_of!(RingHeader, slot_header_size);
    pub const SLOT_STRIDE: usize = offset_of!(RingHeader, slot_stride);
    pub const FRAME_BYTES: usize = offset_of!(RingHeader, frame_bytes);
    pub const GENERATION: usize = offset_of!(RingHeader, generation);
    pub const WRITE_SEQ: usize = offset_of!(RingHeader, write_seq);
    pub const PRODUCER_PID: usize = offset_of!(RingHeader, producer_pid);
    pub const STATE: usize = offset_of!(RingHeader, state);
    pub const HEARTBEAT_NS: usize = offset_of!(RingHeader, heartbeat_ns);
    pub const NOMINAL_FRAME_RATE_MHZ: usize = offset_of!(RingHeader, nominal_frame_rate_mhz);
    pub const RESERVED0: usize = offset_of!(RingHeader, reserved0);
    pub const RESERVED: usize = offset_of!(RingHeader, reserved);

    pub const SLOT_SEQ: usize = offset_of!(SlotHeader, seq);
    pub const SLOT_FRAME_NUMBER: usize = offset_of!(SlotHeader, frame_number);
    pub const SLOT_HOST_NS: usize = offset_of!(SlotHeader, host_monotonic_ns);
    pub const SLOT_HW_NS: usize = offset_of!(SlotHeader, hw_timestamp_ns);
    pub const SLOT_FLAGS: usize = offset_of!(SlotHeader, flags);
    pub const SLOT_RESERVED0: usize = offset_of!(SlotHeader, reserved0);
    pub const SLOT_RESERVED: usize = offset_of!(SlotHeader, reserved);
}

// The documented layout, checked at compile time.
const _: () = {
    assert!(size_of::<RingHeader>() == 128);
    assert!(size_of::<SlotHeader>() == SLOT_HEADER_SIZE);
    assert!(offset_of!(RingHeader, layout_version) == 8);
    assert!(offset_of!(RingHeader, header_size) == 12);
    assert!(offset_of!(RingHeader, width) == 16);
    assert!(offset_of!(RingHeader, height) == 20);
    assert!(offset_of!(RingHeader, channels) == 24);
    assert!(offset_of!(RingHeader, pixel_type) == 28);
    assert!(offset_of!(RingHeader, slot_count) == 32);
    assert!(offset_of!(RingHeader, slot_header_size) == 36);
    assert!(offset_of!(RingHeader, slot_stride) == 40);
    assert!(offset_of!(RingHeader, frame_bytes) == 48);
    assert!(offset_of!(RingHeader, generation) == 56);
    assert!(offset_of!(RingHeader, write_seq) == 64);
    assert!(offset_of!(RingHeader, producer_pid) == 72);
    assert!(offset_of!(RingHeader, state) == 76);
    assert!(offset_of!(RingHeader, heartbeat_ns) == 80);
    assert!(offset_of!(RingHeader, nominal_frame_rate_mhz) == 88);
    assert!(offset_of!(RingHeader, reserved0) == 92);
    assert!(offset_of!(RingHeader, reserved) == 96);
    assert!(offset_of!(SlotHeader, frame_number) == 8);
    assert!(offset_of!(SlotHeader, host_monotonic_ns) == 16);
    assert!(offset_of!(SlotHeader, hw_timestamp_ns) == 24);
    assert!(offset_of!(SlotHeader, flags) == 32);
    assert!(offset_of!(SlotHeader, reserved0) == 36);
    assert!(offset_of!(SlotHeader, reserved) == 40);
    assert!(HEADER_REGION % 64 == 0 && RING_HEADER_LEN <= HEADER_REGION);
};

/// How pixels are encoded. Only `U16Le` exists in layout version 1; the
/// header field is a `u32` so more can be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum PixelType {
    /// Unsigned 16-bit little-endian (code 1).
    U16Le = 1,
}

impl PixelType {
    /// The code stored in `pixel_type`.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The pixel type for a header code, if this version knows it.
    pub const fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Self::U16Le),
            _ => None,
        }
    }

    /// Bytes per pixel.
    pub const fn bytes_per_pixel(self) -> u64 {
        match self {
            Self::U16Le => 2,
        }
    }
}

/// The producer's state, from the header's `state` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProducerState {
    /// 0: the producer is writing the header; do not trust it yet.
    Initialising,
    /// 1: frames are being published.
    Live,
    /// 2: the producer closed the ring cleanly; no more frames will come in
    /// this generation.
    Closed,
    /// Any other value (a producer that does not follow this spec).
    Unknown(u32),
}

impl ProducerState {
    /// Code 0.
    pub const INITIALISING: u32 = 0;
    /// Code 1.
    pub const LIVE: u32 = 1;
    /// Code 2.
    pub const CLOSED: u32 = 2;

    /// Decode the `state` field.
    pub const fn from_code(code: u32) -> Self {
        match code {
            Self::INITIALISING => Self::Initialising,
            Self::LIVE => Self::Live,
            Self::CLOSED => Self::Closed,
            other => Self::Unknown(other),
        }
    }

    /// The `state` field value.
    pub const fn code(self) -> u32 {
        match self {
            Self::Initialising => Self::INITIALISING,
            Self::Live => Self::LIVE,
            Self::Closed => Self::CLOSED,
            Self::Unknown(code) => code,
        }
    }
}

/// Why a geometry or a header does not describe a usable ring. Every message
/// names the field, the value found and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "magic = {found}: expected \"RIGFRAME\" (not a frame ring, or the producer has not \
         initialised it yet)"
    )]
    BadMagic { found: String },
    #[error(
        "layout_version = {found}: expected {expected} (this reader understands only layout \
         version {expected}; upgrade rigd or the producer)"
    )]
    UnsupportedVersion { found: u32, expected: u32 },
    #[error("{field} = {value}: expected {expected}")]
    InvalidField {
        field: &'static str,
        value: u64,
        expected: String,
    },
    #[error("region length = {actual} bytes: expected at least {needed} ({reason})")]
    RegionTooSmall {
        actual: u64,
        needed: u64,
        reason: &'static str,
    },
    #[error(
        "ring of {width}x{height}x{channels} pixels in {slot_count} slots: {what} overflows \
         this platform's address space; expected a smaller geometry"
    )]
    TooLarge {
        width: u32,
        height: u32,
        channels: u32,
        slot_count: u32,
        what: &'static str,
    },
}

fn invalid(field: &'static str, value: impl Into<u64>, expected: impl Into<String>) -> LayoutError {
    LayoutError::InvalidField {
        field,
        value: value.into(),
        expected: expected.into(),
    }
}

/// The shape of a ring: frame geometry, pixel type and slot count. Always
/// valid (built by [`RingGeometry::new`]), so its size maths cannot overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RingGeometry {
    width: u32,
    height: u32,
    channels: u32,
    pixel_type: PixelType,
    slot_count: u32,
}

impl RingGeometry {
    /// Validate and build a geometry: `width` and `height` in
    /// 1..=[`MAX_DIMENSION`], `channels` 1 or 2, `slot_count` in
    /// 1..=[`MAX_SLOT_COUNT`], and a total region length that fits in a
    /// `usize` on this platform.
    pub fn new(
        width: u32,
        height: u32,
        channels: u32,
        pixel_type: PixelType,
        slot_count: u32,
    ) -> Result<Self, LayoutError> {
        let dim = format!("1..={MAX_DIMENSION}");
        if width == 0 || width > MAX_DIMENSION {
            return Err(invalid("width", width, dim));
        }
        if height == 0 || height > MAX_DIMENSION {
            return Err(invalid("height", height, dim));
        }
        if channels != 1 && channels != 2 {
            return Err(invalid("channels", channels, "1 or 2"));
        }
        if slot_count == 0 || slot_count > MAX_SLOT_COUNT {
            return Err(invalid(
                "slot_count",
                slot_count,
                format!("1..={MAX_SLOT_COUNT}"),
            ));
        }
        let geometry = Self {
            width,
            height,
            channels,
            pixel_type,
            slot_count,
        };
        // With the limits above, region_len() is below 2^47: it fits in a
        // u64; check that it also fits in this platform's usize.
        if usize::try_from(geometry.region_len()).is_err() {
            return Err(geometry.too_large("the region length"));
        }
        Ok(geometry)
    }

    fn too_large(&self, what: &'static str) -> LayoutError {
        LayoutError::TooLarge {
            width: self.width,
            height: self.height,
            channels: self.channels,
            slot_count: self.slot_count,
            what,
        }
    }

    /// Pixels per row.
    pub const fn width(&self) -> u32 {
        self.width
    }
    /// Rows per channel plane.
    pub const fn height(&self) -> u32 {
        self.height
    }
    /// Channel planes per frame (1 or 2).
    pub const fn channels(&self) -> u32 {
        self.channels
    }
    /// The pixel encoding.
    pub const fn pixel_type(&self) -> PixelType {
        self.pixel_type
    }
    /// Slots in the ring.
    pub const fn slot_count(&self) -> u32 {
        self.slot_count
    }

    /// Pixels per frame, all channels: `width * height * channels`.
    pub const fn frame_pixels(&self) -> u64 {
        self.width as u64 * self.height as u64 * self.channels as u64
    }

    /// Bytes of pixel data per frame: `frame_pixels * bytes_per_pixel`.
    pub const fn frame_bytes(&self) -> u64 {
        self.frame_pixels() * self.pixel_type.bytes_per_pixel()
    }

    /// The slot stride this crate's producer uses: `64 + frame_bytes` rounded
    /// up to a multiple of [`DEFAULT_SLOT_ALIGN`] (4096), so every slot starts
    /// on a page. Readers accept any multiple of 64 that is large enough.
    pub const fn slot_stride(&self) -> u64 {
        let min = SLOT_HEADER_SIZE as u64 + self.frame_bytes();
        min.div_ceil(DEFAULT_SLOT_ALIGN) * DEFAULT_SLOT_ALIGN
    }

    /// Total bytes of the region: `4096 + slot_count * slot_stride`.
    pub const fn region_len(&self) -> u64 {
        HEADER_REGION as u64 + self.slot_count as u64 * self.slot_stride()
    }

    /// [`region_len`](Self::region_len) as a `usize` (checked by
    /// [`new`](Self::new), so this only fails for a geometry built on
    /// another platform).
    pub fn region_len_usize(&self) -> Result<usize, LayoutError> {
        usize::try_from(self.region_len()).map_err(|_| self.too_large("the region length"))
    }

    /// The header a producer writes for this geometry, with the stride of
    /// [`slot_stride`](Self::slot_stride). `state` is
    /// [`ProducerState::Initialising`], `write_seq`, `heartbeat_ns` and
    /// `nominal_frame_rate_mhz` are 0: a producer sets them as it goes live.
    pub fn header_for(&self, generation: u64, pid: u32) -> RingHeader {
        RingHeader {
            magic: MAGIC,
            layout_version: LAYOUT_VERSION,
            header_size: HEADER_REGION as u32,
            width: self.width,
            height: self.height,
            channels: self.channels,
            pixel_type: self.pixel_type.code(),
            slot_count: self.slot_count,
            slot_header_size: SLOT_HEADER_SIZE as u32,
            slot_stride: self.slot_stride(),
            frame_bytes: self.frame_bytes(),
            generation,
            write_seq: 0,
            producer_pid: pid,
            state: ProducerState::INITIALISING,
            heartbeat_ns: 0,
            nominal_frame_rate_mhz: 0,
            reserved0: 0,
            reserved: [0; 4],
        }
    }
}

/// Where everything lies in a particular region: a geometry plus the
/// `slot_stride` actually in use (a producer may choose any valid stride).
/// Built by [`RingLayout::for_geometry`] or [`RingHeader::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RingLayout {
    geometry: RingGeometry,
    slot_stride: u64,
}

impl RingLayout {
    /// The layout this crate's producer writes for `geometry`.
    pub const fn for_geometry(geometry: RingGeometry) -> Self {
        Self {
            geometry,
            slot_stride: geometry.slot_stride(),
        }
    }

    /// The frame geometry.
    pub const fn geometry(&self) -> RingGeometry {
        self.geometry
    }

    /// Bytes from one slot's start to the next.
    pub const fn slot_stride(&self) -> u64 {
        self.slot_stride
    }

    /// Bytes of pixel data per frame.
    pub const fn frame_bytes(&self) -> u64 {
        self.geometry.frame_bytes()
    }

    /// Pixels per frame, all channels.
    pub const fn frame_pixels(&self) -> u64 {
        self.geometry.frame_pixels()
    }

    /// Slots in the ring.
    pub const fn slot_count(&self) -> u32 {
        self.geometry.slot_count
    }

    /// Bytes the region needs: `4096 + slot_count * slot_stride`.
    pub const fn region_len(&self) -> u64 {
        HEADER_REGION as u64 + self.geometry.slot_count as u64 * self.slot_stride
    }

    /// Byte offset of the slot that holds frame index `index`
    /// (`4096 + (index % slot_count) * slot_stride`).
    pub const fn slot_offset(&self, index: u64) -> u64 {
        HEADER_REGION as u64 + (index % self.geometry.slot_count as u64) * self.slot_stride
    }

    /// Byte offset of the pixel data of frame index `index`.
    pub const fn data_offset(&self, index: u64) -> u64 {
        self.slot_offset(index) + SLOT_HEADER_SIZE as u64
    }
}

impl RingHeader {
    /// Copy a header out of the first [`RING_HEADER_LEN`] bytes of `bytes`
    /// (for example a snapshot of a region). Only use this on a private copy,
    /// never on live shared memory.
    pub fn parse(bytes: &[u8]) -> Result<Self, LayoutError> {
        Self::read_from_prefix(bytes)
            .map(|(header, _)| header)
            .map_err(|_| LayoutError::RegionTooSmall {
                actual: bytes.len() as u64,
                needed: RING_HEADER_LEN as u64,
                reason: "the header fields",
            })
    }

    /// Check that this header describes a valid layout-version-1 ring that
    /// fits in a region of `region_len` bytes, and return its layout. Checks
    /// the magic, version, fixed sizes, geometry, `frame_bytes`,
    /// `slot_stride`, `state` and the region length, in that order.
    /// `generation` is not checked (0 only means "not ready").
    pub fn validate(&self, region_len: u64) -> Result<RingLayout, LayoutError> {
        if self.magic != MAGIC {
            return Err(LayoutError::BadMagic {
                found: self.magic.escape_ascii().to_string(),
            });
        }
        if self.layout_version != LAYOUT_VERSION {
            return Err(LayoutError::UnsupportedVersion {
                found: self.layout_version,
                expected: LAYOUT_VERSION,
            });
        }
        if self.header_size as usize != HEADER_REGION {
            return Err(invalid(
                "header_size",
                self.header_size,
                HEADER_REGION.to_string(),
            ));
        }
        if self.slot_header_size as usize != SLOT_HEADER_SIZE {
            return Err(invalid(
                "slot_header_size",
                self.slot_header_size,
                SLOT_HEADER_SIZE.to_string(),
            ));
        }
        let pixel_type = PixelType::from_code(self.pixel_type)
            .ok_or_else(|| invalid("pixel_type", self.pixel_type, "1 (uint16 little-endian)"))?;
        let geometry = RingGeometry::new(
            self.width,
            self.height,
            self.channels,
            pixel_type,
            self.slot_count,
        )?;
        if self.frame_bytes != geometry.frame_bytes() {
            return Err(invalid(
                "frame_bytes",
                self.frame_bytes,
                format!(
                    "width * height * channels * {} = {}",
                    pixel_type.bytes_per_pixel(),
                    geometry.frame_bytes()
                ),
            ));
        }
        let min_stride = SLOT_HEADER_SIZE as u64 + geometry.frame_bytes();
        if self.slot_stride % SLOT_ALIGN != 0 || self.slot_stride < min_stride {
            return Err(invalid(
                "slot_stride",
                self.slot_stride,
                format!(
                    "a multiple of {SLOT_ALIGN} that is at least 64 + frame_bytes = {min_stride}"
                ),
            ));
        }
        if let ProducerState::Unknown(code) = ProducerState::from_code(self.state) {
            return Err(invalid(
                "state",
                code,
                "0 (initialising), 1 (live) or 2 (closed)",
            ));
        }
        let layout = RingLayout {
            geometry,
            slot_stride: self.slot_stride,
        };
        // slot_stride comes from memory: the product may overflow.
        let needed = u64::from(self.slot_count)
            .checked_mul(self.slot_stride)
            .and_then(|slots| slots.checked_add(HEADER_REGION as u64))
            .ok_or_else(|| geometry.too_large("slot_count * slot_stride"))?;
        if usize::try_from(needed).is_err() {
            return Err(geometry.too_large("slot_count * slot_stride"));
        }
        if region_len < needed {
            return Err(LayoutError::RegionTooSmall {
                actual: region_len,
                needed,
                reason: "4096 + slot_count * slot_stride",
            });
        }
        Ok(layout)
    }

    /// The decoded `state` field.
    pub const fn producer_state(&self) -> ProducerState {
        ProducerState::from_code(self.state)
    }
}
