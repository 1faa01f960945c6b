//! The reader side: attach to a ring, poll frames, detect overrun, torn
//! reads, producer restarts and a dead producer.

use core::sync::atomic::{fence, Ordering};

use super::layout::{off, ProducerState, RingGeometry, RingHeader, RingLayout};
use super::{check_host_endian, seq_published, LayoutError, RingError, RingRegion};
use super::{FLAG_HOST_STAMP_AT_ARRIVAL, FLAG_HW_TIMESTAMP_VALID, HEADER_REGION, SLOT_HEADER_SIZE};
use zerocopy::IntoBytes;

/// How many times a header snapshot is retried while the producer keeps
/// rewriting the header, before reporting [`RingError::NotReady`].
const SNAPSHOT_ATTEMPTS: usize = 16;

/// The slot header of a frame that was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameMeta {
    /// The frame's index in this generation (0, 1, 2, ...).
    pub index: u64,
    /// The acquisition program's own frame counter.
    pub frame_number: u64,
    /// Producer `CLOCK_MONOTONIC` in ns at the frame's start (its
    /// frame-clock edge), or its arrival if `host_stamp_at_arrival`.
    pub host_monotonic_ns: u64,
    /// Hardware timestamp in ns, if the producer supplied one.
    pub hw_timestamp_ns: Option<u64>,
    /// `host_monotonic_ns` is the frame's arrival on this host (a bridge
    /// from another machine), not its acquisition (flag bit 1).
    pub host_stamp_at_arrival: bool,
}

/// What one [`RingReader::poll`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PollOutcome {
    /// The next frame, whose pixels are now in the caller's buffer.
    Frame(FrameMeta),
    /// No frame published beyond what has been read (or the producer is
    /// re-initialising the ring). Poll again later.
    NothingNew,
    /// The producer lapped this reader: `skipped` frames were overwritten
    /// before they could be read. The reader has jumped to the oldest frame
    /// that may still be intact; poll again at once.
    Overrun { skipped: u64 },
    /// The frame changed while it was being copied; the buffer holds garbage.
    /// Poll again at once (the next poll usually reports an overrun).
    Torn,
    /// The producer restarted with a new generation. The reader has attached
    /// to it (its layout may have changed: check [`RingReader::layout`]) and
    /// will read from frame index 0 of the new generation.
    ProducerRestarted { old_gen: u64, new_gen: u64 },
}

/// What the first step of a slot read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotCheck {
    /// Published with this sequence value; copy it.
    Ready(u64),
    /// Not published yet (or being written for the first time).
    NotYetWritten,
    /// Reused for a later frame.
    Overwritten,
}

/// What the last step of a slot read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotEnd {
    Consistent,
    Torn,
    GenerationChanged(u64),
}

/// One reader of a ring. It never writes to the region (a read-only mapping
/// will do), tracks the next frame index it wants, counts what it read and
/// what it lost, and does not allocate in [`poll`](Self::poll).
#[derive(Debug)]
pub struct RingReader {
    region: RingRegion,
    layout: RingLayout,
    generation: u64,
    next_index: u64,
    last_write_seq: u64,
    frames_read: u64,
    frames_dropped: u64,
    torn_reads: u64,
}

impl RingReader {
    /// Attach to a live (or cleanly closed) ring: take a consistent snapshot
    /// of the header, validate it against the region's length, and start at
    /// the live edge (the next frame to be published; use
    /// [`seek`](Self::seek) to read older frames still in the ring).
    ///
    /// Returns [`RingError::NotReady`] while the producer is initialising the
    /// ring (try again shortly), and [`RingError::Layout`] when the header is
    /// not a valid ring or does not fit in the region.
    pub fn attach(region: RingRegion) -> Result<Self, RingError> {
        check_host_endian()?;
        let header = snapshot_header(&region)?;
        let layout = header.validate(region.len() as u64)?;
        if header.producer_state() == ProducerState::Initialising {
            return Err(RingError::NotReady);
        }
        Ok(Self {
            region,
            layout,
            generation: header.generation,
            next_index: header.write_seq,
            last_write_seq: header.write_seq,
            frames_read: 0,
            frames_dropped: 0,
            torn_reads: 0,
        })
    }

    /// A consistent snapshot of the header as it is now.
    pub fn header(&self) -> Result<RingHeader, RingError> {
        snapshot_header(&self.region)
    }

    /// The layout of the generation this reader follows.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// The frame geometry of the generation this reader follows.
    pub fn geometry(&self) -> RingGeometry {
        self.layout.geometry()
    }

    /// Pixels per frame (all channels): the buffer size [`poll`](Self::poll)
    /// needs.
    pub fn frame_pixels(&self) -> usize {
        self.layout.frame_pixels() as usize
    }

    /// Bytes per frame: the buffer size [`poll_bytes`](Self::poll_bytes)
    /// needs.
    pub fn frame_bytes(&self) -> usize {
        self.layout.frame_bytes() as usize
    }

    /// The producer generation this reader follows.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The index of the next frame [`poll`](Self::poll) will try to read.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Continue from frame index `index` (for example
    /// `published().saturating_sub(slot_count)` to read everything still in
    /// the ring). An index that was overwritten is reported as an overrun by
    /// the next poll.
    pub fn seek(&mut self, index: u64) {
        self.next_index = index;
    }

    /// Frames published so far in the current generation (`write_seq`).
    pub fn published(&self) -> u64 {
        self.region.u64_at(off::WRITE_SEQ).load(Ordering::Acquire)
    }

    /// Frames published but not yet read by this reader.
    pub fn lag(&self) -> u64 {
        self.published().saturating_sub(self.next_index)
    }

    /// Frames this reader has read.
    pub fn frames_read(&self) -> u64 {
        self.frames_read
    }

    /// Frames this reader lost to overruns (the sum of every `skipped`).
    pub fn frames_dropped(&self) -> u64 {
        self.frames_dropped
    }

    /// Reads discarded as torn.
    pub fn torn_reads(&self) -> u64 {
        self.torn_reads
    }

    /// The producer's `state` as it is now.
    pub fn producer_state(&self) -> ProducerState {
        ProducerState::from_code(self.region.u32_at(off::STATE).load(Ordering::Acquire))
    }

    /// The producer's last heartbeat (its `CLOCK_MONOTONIC` in ns).
    pub fn heartbeat_ns(&self) -> u64 {
        self.region
            .u64_at(off::HEARTBEAT_NS)
            .load(Ordering::Acquire)
    }

    /// Whether the producer's heartbeat is more than `timeout_ns` older than
    /// `now_ns` (the reader's `CLOCK_MONOTONIC`, same host, same clock). A
    /// producer that closed cleanly stops heartbeating too, so a closed ring
    /// also goes stale: tell them apart with
    /// [`producer_state`](Self::producer_state).
    pub fn is_stale(&self, now_ns: u64, timeout_ns: u64) -> bool {
        now_ns.saturating_sub(self.heartbeat_ns()) > timeout_ns
    }

    /// Try to read the next frame into `pixels` (at least
    /// [`frame_pixels`](Self::frame_pixels) long; only that many are
    /// written, channel-major). See [`PollOutcome`] for what can happen.
    ///
    /// Errors: the buffer is too small; after a producer restart the new
    /// header is invalid or does not fit the region (re-open and re-map the
    /// shared memory); or the producer broke the protocol.
    pub fn poll(&mut self, pixels: &mut [u16]) -> Result<PollOutcome, RingError> {
        let expected = self.frame_pixels();
        if pixels.len() < expected {
            return Err(RingError::BufferTooSmall {
                expected,
                actual: pixels.len(),
            });
        }
        self.poll_bytes(pixels.as_mut_bytes())
    }

    /// [`poll`](Self::poll) into a byte buffer (at least
    /// [`frame_bytes`](Self::frame_bytes) long); the pixels arrive as they lie
    /// in the ring (little-endian).
    pub fn poll_bytes(&mut self, out: &mut [u8]) -> Result<PollOutcome, RingError> {
        let frame_bytes = self.frame_bytes();
        if out.len() < frame_bytes {
            return Err(RingError::BufferTooSmall {
                expected: frame_bytes / 2,
                actual: out.len() / 2,
            });
        }
        let write_seq = self.region.u64_at(off::WRITE_SEQ).load(Ordering::Acquire);
        // Loaded after write_seq: if write_seq came from a restarted
        // producer, this sees 0 or the new generation.
        let generation = self.region.u64_at(off::GENERATION).load(Ordering::Acquire);
        if generation != self.generation {
            return self.reattach(generation);
        }
        if write_seq < self.last_write_seq {
            return Err(RingError::WriteSeqBackwards {
                previous: self.last_write_seq,
                found: write_seq,
            });
        }
        self.last_write_seq = write_seq;
        let n = self.next_index;
        if write_seq <= n {
            return Ok(PollOutcome::NothingNew);
        }
        let slot_count = u64::from(self.layout.slot_count());
        if write_seq - n > slot_count {
            return Ok(self.skip_to(write_seq - slot_count));
        }
        match self.slot_begin(n) {
            SlotCheck::NotYetWritten => Ok(PollOutcome::NothingNew),
            SlotCheck::Overwritten => self.after_overwrite(n),
            SlotCheck::Ready(s1) => {
                let meta = self.slot_copy(n, &mut out[..frame_bytes]);
                match self.slot_end(n, s1) {
                    SlotEnd::GenerationChanged(g) => self.reattach(g),
                    SlotEnd::Torn => {
                        self.torn_reads = self.torn_reads.saturating_add(1);
                        Ok(PollOutcome::Torn)
                    }
                    SlotEnd::Consistent => {
                        self.next_index = n + 1;
                        self.frames_read = self.frames_read.saturating_add(1);
                        Ok(PollOutcome::Frame(meta))
                    }
                }
            }
        }
    }

    /// The slot of frame `n` was reused: jump to the oldest frame that may
    /// still be intact (and at least past `n`).
    fn after_overwrite(&mut self, n: u64) -> Result<PollOutcome, RingError> {
        let write_seq = self.region.u64_at(off::WRITE_SEQ).load(Ordering::Acquire);
        let generation = self.region.u64_at(off::GENERATION).load(Ordering::Acquire);
        if generation != self.generation {
            return self.reattach(generation);
        }
        let slot_count = u64::from(self.layout.slot_count());
        let oldest = write_seq.saturating_sub(slot_count).max(n + 1);
        self.last_write_seq = self.last_write_seq.max(write_seq);
        Ok(self.skip_to(oldest))
    }

    fn skip_to(&mut self, index: u64) -> PollOutcome {
        let skipped = index - self.next_index;
        self.next_index = index;
        self.frames_dropped = self.frames_dropped.saturating_add(skipped);
        PollOutcome::Overrun { skipped }
    }

    /// The generation changed to `seen`: follow the new producer if its
    /// header is ready and valid.
    fn reattach(&mut self, seen: u64) -> Result<PollOutcome, RingError> {
        if seen == 0 {
            return Ok(PollOutcome::NothingNew);
        }
        let header = match snapshot_header(&self.region) {
            Ok(header) => header,
            Err(RingError::NotReady) => return Ok(PollOutcome::NothingNew),
            Err(e) => return Err(e),
        };
        if header.producer_state() == ProducerState::Initialising
            || header.generation == self.generation
        {
            return Ok(PollOutcome::NothingNew);
        }
        self.layout = header.validate(self.region.len() as u64)?;
        let old_gen = self.generation;
        self.generation = header.generation;
        self.next_index = 0;
        self.last_write_seq = 0;
        Ok(PollOutcome::ProducerRestarted {
            old_gen,
            new_gen: header.generation,
        })
    }

    /// Step 1 of a slot read: acquire-load the slot's sequence lock.
    fn slot_begin(&self, n: u64) -> SlotCheck {
        let base = self.layout.slot_offset(n) as usize;
        let s1 = self
            .region
            .u64_at(base + off::SLOT_SEQ)
            .load(Ordering::Acquire);
        let expected = seq_published(n);
        if s1 == expected {
            SlotCheck::Ready(s1)
        } else if s1 < expected {
            SlotCheck::NotYetWritten
        } else {
            SlotCheck::Overwritten
        }
    }

    /// Step 2: copy the slot header fields and the pixels with relaxed loads.
    fn slot_copy(&self, n: u64, out: &mut [u8]) -> FrameMeta {
        let r = &self.region;
        let base = self.layout.slot_offset(n) as usize;
        let frame_number = r
            .u64_at(base + off::SLOT_FRAME_NUMBER)
            .load(Ordering::Relaxed);
        let host_monotonic_ns = r.u64_at(base + off::SLOT_HOST_NS).load(Ordering::Relaxed);
        let hw = r.u64_at(base + off::SLOT_HW_NS).load(Ordering::Relaxed);
        let flags = r.u32_at(base + off::SLOT_FLAGS).load(Ordering::Relaxed);
        r.load_frame_bytes(base + SLOT_HEADER_SIZE, out);
        FrameMeta {
            index: n,
            frame_number,
            host_monotonic_ns,
            hw_timestamp_ns: (flags & FLAG_HW_TIMESTAMP_VALID != 0).then_some(hw),
            host_stamp_at_arrival: flags & FLAG_HOST_STAMP_AT_ARRIVAL != 0,
        }
    }

    /// Step 3: after an acquire fence, the sequence lock must be unchanged
    /// and the generation the same, or the copy may mix two frames.
    fn slot_end(&self, n: u64, s1: u64) -> SlotEnd {
        fence(Ordering::Acquire);
        let base = self.layout.slot_offset(n) as usize;
        let s2 = self
            .region
            .u64_at(base + off::SLOT_SEQ)
            .load(Ordering::Relaxed);
        let generation = self.region.u64_at(off::GENERATION).load(Ordering::Relaxed);
        if generation != self.generation {
            SlotEnd::GenerationChanged(generation)
        } else if s2 != s1 {
            SlotEnd::Torn
        } else {
            SlotEnd::Consistent
        }
    }
}

/// A consistent copy of the header, read field by field with atomic loads
/// of each field's own width, guarded by `generation` as a sequence lock
/// (the producer sets it to 0 before rewriting the header and to a new
/// nonzero value after).
fn snapshot_header(r: &RingRegion) -> Result<RingHeader, RingError> {
    if r.len() < HEADER_REGION {
        return Err(LayoutError::RegionTooSmall {
            actual: r.len() as u64,
            needed: HEADER_REGION as u64,
            reason: "the header region",
        }
        .into());
    }
    let u32_at = |at: usize| r.u32_at(at).load(Ordering::Relaxed);
    let u64_at = |at: usize| r.u64_at(at).load(Ordering::Relaxed);
    for _ in 0..SNAPSHOT_ATTEMPTS {
        let g1 = r.u64_at(off::GENERATION).load(Ordering::Acquire);
        if g1 == 0 {
            return Err(RingError::NotReady);
        }
        let header = RingHeader {
            magic: u64_at(off::MAGIC).to_ne_bytes(),
            layout_version: u32_at(off::LAYOUT_VERSION),
            header_size: u32_at(off::HEADER_SIZE),
            width: u32_at(off::WIDTH),
            height: u32_at(off::HEIGHT),
            channels: u32_at(off::CHANNELS),
            pixel_type: u32_at(off::PIXEL_TYPE),
            slot_count: u32_at(off::SLOT_COUNT),
            slot_header_size: u32_at(off::SLOT_HEADER_SIZE),
            slot_stride: u64_at(off::SLOT_STRIDE),
            frame_bytes: u64_at(off::FRAME_BYTES),
            generation: g1,
            write_seq: u64_at(off::WRITE_SEQ),
            producer_pid: u32_at(off::PRODUCER_PID),
            state: u32_at(off::STATE),
            heartbeat_ns: u64_at(off::HEARTBEAT_NS),
            nominal_frame_rate_mhz: u32_at(off::NOMINAL_FRAME_RATE_MHZ),
            reserved0: u32_at(off::RESERVED0),
            reserved: [0, 8, 16, 24].map(|d| u64_at(off::RESERVED + d)),
        };
        fence(Ordering::Acquire);
        if r.u64_at(off::GENERATION).load(Ordering::Relaxed) == g1 {
            return Ok(header);
        }
    }
    Err(RingError::NotReady)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{PixelType, RingWriter};

    fn ring(slot_count: u32) -> (RingWriter, RingReader) {
        let geometry = RingGeometry::new(8, 4, 1, PixelType::U16Le, slot_count).expect("geometry");
        let region = RingRegion::new_owned(geometry.region_len() as usize);
        let writer = RingWriter::init(region.clone(), geometry, 7, 1, 0).expect("init");
        let reader = RingReader::attach(region).expect("attach");
        (writer, reader)
    }

    /// The writer reuses the slot between the reader's copy and its check:
    /// the read must be rejected as torn, then reported as an overrun.
    #[test]
    fn slot_reused_between_copy_and_check_is_torn() {
        let (mut writer, mut reader) = ring(2);
        writer.publish(0, 10, None, &[1; 32]).expect("publish");
        let mut out = [0u8; 64];

        let SlotCheck::Ready(s1) = reader.slot_begin(0) else {
            panic!("frame 0 should be ready");
        };
        reader.slot_copy(0, &mut out);
        // Frame 1 goes to slot 1; frame 2 starts overwriting slot 0.
        writer.publish(1, 11, None, &[2; 32]).expect("publish");
        let slot = writer.begin_frame();
        assert_eq!(reader.slot_end(0, s1), SlotEnd::Torn);
        slot.commit(2, 12, None);

        assert_eq!(
            reader.poll_bytes(&mut out),
            Ok(PollOutcome::Overrun { skipped: 1 })
        );
        let mut pixels = [0u16; 32];
        match reader.poll(&mut pixels) {
            Ok(PollOutcome::Frame(meta)) => assert_eq!(meta.index, 1),
            other => panic!("expected frame 1, got {other:?}"),
        }
        assert!(pixels.iter().all(|&p| p == 2));
    }

    /// A write that started and finished between the reader's two checks
    /// changes the sequence value even though it is even again.
    #[test]
    fn completed_overwrite_between_copy_and_check_is_torn() {
        let (mut writer, reader) = ring(1);
        writer.publish(0, 10, None, &[1; 32]).expect("publish");
        let SlotCheck::Ready(s1) = reader.slot_begin(0) else {
            panic!("frame 0 should be ready");
        };
        writer.publish(1, 11, None, &[2; 32]).expect("publish");
        assert_eq!(reader.slot_end(0, s1), SlotEnd::Torn);
    }

    #[test]
    fn slot_check_classifies_sequence_values() {
        let (mut writer, reader) = ring(4);
        assert_eq!(reader.slot_begin(0), SlotCheck::NotYetWritten);
        let slot = writer.begin_frame();
        assert_eq!(reader.slot_begin(0), SlotCheck::NotYetWritten);
        slot.commit(0, 0, None);
        assert_eq!(reader.slot_begin(0), SlotCheck::Ready(2));
        for i in 1..=4 {
            writer.publish(i, 0, None, &[0; 32]).expect("publish");
        }
        assert_eq!(reader.slot_begin(0), SlotCheck::Overwritten);
    }

    #[test]
    fn restart_between_copy_and_check_is_detected() {
        let (mut writer, mut reader) = ring(4);
        writer.publish(0, 10, None, &[1; 32]).expect("publish");
        let SlotCheck::Ready(s1) = reader.slot_begin(0) else {
            panic!("frame 0 should be ready");
        };
        let geometry = writer.layout().geometry();
        let region = writer.close();
        let _writer = RingWriter::init(region, geometry, 8, 2, 0).expect("re-init");
        assert_eq!(reader.slot_end(0, s1), SlotEnd::GenerationChanged(8));
        assert_eq!(
            reader.reattach(8),
            Ok(PollOutcome::ProducerRestarted {
                old_gen: 7,
                new_gen: 8
            })
        );
    }
}
