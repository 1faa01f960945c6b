//! The producer side: initialise a ring, publish frames, heartbeat, close.

use core::sync::atomic::{fence, Ordering};

use super::layout::{off, ProducerState, RingGeometry, RingLayout, MAGIC};
use super::{check_host_endian, seq_published, seq_writing, LayoutError, RingError, RingRegion};
use super::{
    FLAG_HOST_STAMP_AT_ARRIVAL, FLAG_HW_TIMESTAMP_VALID, HEADER_REGION, RING_HEADER_LEN,
    SLOT_HEADER_SIZE,
};
use zerocopy::IntoBytes;

/// The single producer of a ring. It never waits for readers: publishing
/// overwrites the oldest slot whether or not anyone has read it.
///
/// The caller supplies every timestamp (this crate reads no clock): pass the
/// producer's `CLOCK_MONOTONIC` in nanoseconds, and call
/// [`heartbeat`](Self::heartbeat) at least every 100 ms while no frames are
/// published, so readers can tell an idle producer from a dead one.
#[derive(Debug)]
pub struct RingWriter {
    region: RingRegion,
    layout: RingLayout,
    generation: u64,
    next_index: u64,
}

impl RingWriter {
    /// Write a fresh header for `geometry` into `region` (which may hold an
    /// older ring: this is also how a producer restarts in place), zero every
    /// slot header, and go live with `generation` (nonzero, and different from
    /// the generation already in the region) and `pid`, with
    /// `heartbeat_ns = now_ns`.
    ///
    /// Readers see `generation = 0` while the header is rewritten, then the
    /// new generation (a restart).
    pub fn init(
        region: RingRegion,
        geometry: RingGeometry,
        generation: u64,
        pid: u32,
        now_ns: u64,
    ) -> Result<Self, RingError> {
        check_host_endian()?;
        if generation == 0 {
            return Err(RingError::ZeroGeneration);
        }
        let layout = RingLayout::for_geometry(geometry);
        if (region.len() as u64) < layout.region_len() {
            return Err(LayoutError::RegionTooSmall {
                actual: region.len() as u64,
                needed: layout.region_len(),
                reason: "4096 + slot_count * slot_stride",
            }
            .into());
        }
        let r = &region;
        if r.u64_at(off::GENERATION).load(Ordering::Relaxed) == generation {
            return Err(RingError::GenerationReused(generation));
        }

        // Invalidate the header first (a sequence lock on the header, with
        // generation as the sequence: 0 = being written).
        r.u64_at(off::GENERATION).store(0, Ordering::Relaxed);
        r.u32_at(off::STATE)
            .store(ProducerState::INITIALISING, Ordering::Relaxed);
        fence(Ordering::Release);

        let h = geometry.header_for(generation, pid);
        r.u64_at(off::MAGIC)
            .store(u64::from_ne_bytes(MAGIC), Ordering::Relaxed);
        for (at, value) in [
            (off::LAYOUT_VERSION, h.layout_version),
            (off::HEADER_SIZE, h.header_size),
            (off::WIDTH, h.width),
            (off::HEIGHT, h.height),
            (off::CHANNELS, h.channels),
            (off::PIXEL_TYPE, h.pixel_type),
            (off::SLOT_COUNT, h.slot_count),
            (off::SLOT_HEADER_SIZE, h.slot_header_size),
            (off::PRODUCER_PID, pid),
            (off::NOMINAL_FRAME_RATE_MHZ, 0),
            (off::RESERVED0, 0),
        ] {
            r.u32_at(at).store(value, Ordering::Relaxed);
        }
        for (at, value) in [
            (off::SLOT_STRIDE, h.slot_stride),
            (off::FRAME_BYTES, h.frame_bytes),
            (off::WRITE_SEQ, 0),
            (off::HEARTBEAT_NS, now_ns),
        ] {
            r.u64_at(at).store(value, Ordering::Relaxed);
        }
        r.zero_words(off::RESERVED, h.reserved.as_bytes().len());
        r.zero_words(RING_HEADER_LEN, HEADER_REGION - RING_HEADER_LEN);
        for slot in 0..u64::from(geometry.slot_count()) {
            let base = layout.slot_offset(slot) as usize;
            for at in [
                off::SLOT_SEQ,
                off::SLOT_FRAME_NUMBER,
                off::SLOT_HOST_NS,
                off::SLOT_HW_NS,
            ] {
                r.u64_at(base + at).store(0, Ordering::Relaxed);
            }
            r.u32_at(base + off::SLOT_FLAGS).store(0, Ordering::Relaxed);
            r.u32_at(base + off::SLOT_RESERVED0)
                .store(0, Ordering::Relaxed);
            r.zero_words(
                base + off::SLOT_RESERVED,
                SLOT_HEADER_SIZE - off::SLOT_RESERVED,
            );
        }

        // Publish the header: everything above happens-before a reader's
        // acquire load that sees the new generation.
        r.u64_at(off::GENERATION)
            .store(generation, Ordering::Release);
        r.u32_at(off::STATE)
            .store(ProducerState::LIVE, Ordering::Release);
        Ok(Self {
            region,
            layout,
            generation,
            next_index: 0,
        })
    }

    /// The layout being written.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// This producer's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Frames published so far in this generation (the value of
    /// `write_seq`), which is also the index the next frame gets.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Pixels per frame, all channels.
    pub fn frame_pixels(&self) -> usize {
        self.layout.frame_pixels() as usize
    }

    /// The region this writer writes.
    pub fn region(&self) -> &RingRegion {
        &self.region
    }

    /// Set `nominal_frame_rate_mhz` (milli-hertz, 0 = unknown). Informational;
    /// readers see it in their next header snapshot.
    pub fn set_nominal_frame_rate_mhz(&mut self, rate_mhz: u32) {
        self.region
            .u32_at(off::NOMINAL_FRAME_RATE_MHZ)
            .store(rate_mhz, Ordering::Release);
    }

    /// Publish one frame: `pixels` holds `width * height * channels` values,
    /// channel-major (all of channel 0 row by row, then channel 1).
    /// `host_ns` is the producer's `CLOCK_MONOTONIC` when the frame was
    /// complete (it also becomes the heartbeat); `hw_ts` a hardware timestamp
    /// if the acquisition has one. Returns the frame's index.
    pub fn publish(
        &mut self,
        frame_number: u64,
        host_ns: u64,
        hw_ts: Option<u64>,
        pixels: &[u16],
    ) -> Result<u64, RingError> {
        let expected = self.frame_pixels();
        if pixels.len() != expected {
            return Err(RingError::FrameLength {
                expected,
                actual: pixels.len(),
            });
        }
        let mut slot = self.begin_frame();
        slot.write_pixels(0, pixels)?;
        Ok(slot.commit(frame_number, host_ns, hw_ts))
    }

    /// [`publish`](Self::publish) a frame whose `host_ns` is its arrival on
    /// this host, not its acquisition (a bridge from another machine: flag
    /// bit 1, [`FLAG_HOST_STAMP_AT_ARRIVAL`]).
    pub fn publish_arrived(
        &mut self,
        frame_number: u64,
        arrival_ns: u64,
        hw_ts: Option<u64>,
        pixels: &[u16],
    ) -> Result<u64, RingError> {
        let expected = self.frame_pixels();
        if pixels.len() != expected {
            return Err(RingError::FrameLength {
                expected,
                actual: pixels.len(),
            });
        }
        let mut slot = self.begin_frame();
        slot.write_pixels(0, pixels)?;
        slot.at_arrival = true;
        Ok(slot.commit(frame_number, arrival_ns, hw_ts))
    }

    /// Start writing the next frame in place (two-phase publish, for a
    /// producer that fills the slot directly, e.g. row by row). The slot is
    /// marked "being written" at once, so the frame it held is lost to
    /// readers even if the [`FrameSlot`] is dropped without
    /// [`commit`](FrameSlot::commit); dropping it abandons the frame and the
    /// next `begin_frame` reuses the same index.
    pub fn begin_frame(&mut self) -> FrameSlot<'_> {
        let index = self.next_index;
        let base = self.layout.slot_offset(index) as usize;
        self.region
            .u64_at(base + off::SLOT_SEQ)
            .store(seq_writing(index), Ordering::Relaxed);
        // Orders the odd seq before every data store below (seqlock writer).
        fence(Ordering::Release);
        FrameSlot {
            writer: self,
            index,
            base,
            at_arrival: false,
        }
    }

    /// Update `heartbeat_ns` to `now_ns` (producer `CLOCK_MONOTONIC`). Call it
    /// at least every 100 ms while idle.
    pub fn heartbeat(&mut self, now_ns: u64) {
        self.region
            .u64_at(off::HEARTBEAT_NS)
            .store(now_ns, Ordering::Release);
    }

    /// Mark the ring closed cleanly (`state = 2`): readers drain what is
    /// left and know no more frames come in this generation. Returns the
    /// region, e.g. to [`init`](Self::init) it again with a new generation.
    pub fn close(self) -> RingRegion {
        self.region
            .u32_at(off::STATE)
            .store(ProducerState::CLOSED, Ordering::Release);
        self.region
    }
}

/// A slot being written by [`RingWriter::begin_frame`]. Readers cannot see
/// its contents until [`commit`](Self::commit).
#[derive(Debug)]
pub struct FrameSlot<'w> {
    writer: &'w mut RingWriter,
    index: u64,
    base: usize,
    /// Flag bit 1: the commit's `host_ns` is the frame's arrival.
    at_arrival: bool,
}

impl FrameSlot<'_> {
    /// The index the frame will have.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Write `pixels` at pixel offset `first_pixel` of the frame
    /// (channel-major order). The range must start and end on a multiple of
    /// 4 pixels (8 bytes), or at the end of the frame, so every 8-byte word of
    /// the frame is written whole (readers load it as one word).
    pub fn write_pixels(&mut self, first_pixel: usize, pixels: &[u16]) -> Result<(), RingError> {
        let frame_pixels = self.writer.frame_pixels();
        let end = first_pixel.saturating_add(pixels.len());
        let frame_bytes = frame_pixels * 2;
        let body_end = frame_bytes - frame_bytes % 8;
        let whole = |pixel: usize| pixel % 4 == 0 || pixel * 2 >= body_end;
        if end > frame_pixels || !whole(first_pixel) || !whole(end) {
            return Err(RingError::PixelRange {
                start: first_pixel,
                end,
                frame_pixels,
            });
        }
        let data = self.base + SLOT_HEADER_SIZE;
        self.writer
            .region
            .store_frame_bytes(data, first_pixel * 2, pixels.as_bytes(), body_end);
        Ok(())
    }

    /// Publish the frame: fill in the slot header, release the sequence lock
    /// (`seq = 2n + 2`), advance `write_seq` to `n + 1` and set the heartbeat
    /// to `host_ns`. Returns the frame's index `n`.
    pub fn commit(self, frame_number: u64, host_ns: u64, hw_ts: Option<u64>) -> u64 {
        let r = &self.writer.region;
        let base = self.base;
        let n = self.index;
        r.u64_at(base + off::SLOT_FRAME_NUMBER)
            .store(frame_number, Ordering::Relaxed);
        r.u64_at(base + off::SLOT_HOST_NS)
            .store(host_ns, Ordering::Relaxed);
        r.u64_at(base + off::SLOT_HW_NS)
            .store(hw_ts.unwrap_or(0), Ordering::Relaxed);
        let mut flags = if hw_ts.is_some() {
            FLAG_HW_TIMESTAMP_VALID
        } else {
            0
        };
        if self.at_arrival {
            flags |= FLAG_HOST_STAMP_AT_ARRIVAL;
        }
        r.u32_at(base + off::SLOT_FLAGS)
            .store(flags, Ordering::Relaxed);
        r.u64_at(base + off::SLOT_SEQ)
            .store(seq_published(n), Ordering::Release);
        r.u64_at(off::WRITE_SEQ)
            .store(n.wrapping_add(1), Ordering::Release);
        r.u64_at(off::HEARTBEAT_NS)
            .store(host_ns, Ordering::Release);
        self.writer.next_index = n.wrapping_add(1);
        n
    }
}
