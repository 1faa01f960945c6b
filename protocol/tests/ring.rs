//! Tests of the shared-memory frame ring through its public API: layout,
//! validation, the writer and reader algorithms, and a two-thread stress test
//! that no torn frame is ever accepted.

use std::sync::atomic::{AtomicBool, Ordering};

use proptest::prelude::*;
use protocol::ring::{
    FrameMeta, LayoutError, PixelType, PollOutcome, ProducerState, RingError, RingGeometry,
    RingHeader, RingLayout, RingReader, RingRegion, RingWriter, HEADER_REGION, MAGIC,
    SLOT_HEADER_SIZE,
};
use zerocopy::IntoBytes;

fn geometry(width: u32, height: u32, channels: u32, slots: u32) -> RingGeometry {
    RingGeometry::new(width, height, channels, PixelType::U16Le, slots).expect("valid geometry")
}

/// A fresh ring in an owned region, a writer (generation 1) and a reader
/// attached at the live edge (frame 0).
fn ring(g: RingGeometry) -> (RingWriter, RingReader) {
    let region = RingRegion::new_owned(g.region_len_usize().expect("fits"));
    let writer = RingWriter::init(region.clone(), g, 1, 1234, 5).expect("init");
    let reader = RingReader::attach(region).expect("attach");
    (writer, reader)
}

fn frame_of(value: u16, g: &RingGeometry) -> Vec<u16> {
    vec![value; g.frame_pixels() as usize]
}

/// Poll once and insist on a frame.
fn expect_frame(reader: &mut RingReader, pixels: &mut [u16]) -> FrameMeta {
    match reader.poll(pixels) {
        Ok(PollOutcome::Frame(meta)) => meta,
        other => panic!("expected a frame, got {other:?}"),
    }
}

fn header_bytes(region: &RingRegion) -> Vec<u8> {
    let mut bytes = vec![0u8; HEADER_REGION];
    assert_eq!(region.snapshot_into(&mut bytes), HEADER_REGION);
    bytes
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

#[test]
fn round_trip_one_frame() {
    let g = geometry(16, 8, 1, 4);
    let (mut writer, mut reader) = ring(g);
    let pixels: Vec<u16> = (0..128).map(|i| i * 3 + 1).collect();
    assert_eq!(writer.publish(900, 1_000_000, Some(777), &pixels), Ok(0));

    let mut out = vec![0u16; reader.frame_pixels()];
    let meta = expect_frame(&mut reader, &mut out);
    assert_eq!(
        meta,
        FrameMeta {
            index: 0,
            frame_number: 900,
            host_monotonic_ns: 1_000_000,
            hw_timestamp_ns: Some(777),
            host_stamp_at_arrival: false,
        }
    );
    assert_eq!(out, pixels);
    assert_eq!(reader.poll(&mut out), Ok(PollOutcome::NothingNew));
    assert_eq!((reader.frames_read(), reader.frames_dropped()), (1, 0));
}

#[test]
fn round_trip_many_frames_in_order() {
    let g = geometry(8, 8, 1, 3);
    let (mut writer, mut reader) = ring(g);
    let mut out = vec![0u16; reader.frame_pixels()];
    for i in 0..10u16 {
        writer
            .publish(
                u64::from(i) + 100,
                u64::from(i) * 10,
                None,
                &frame_of(i, &g),
            )
            .expect("publish");
        let meta = expect_frame(&mut reader, &mut out);
        assert_eq!(meta.index, u64::from(i));
        assert_eq!(meta.frame_number, u64::from(i) + 100);
        assert_eq!(meta.hw_timestamp_ns, None);
        assert!(out.iter().all(|&p| p == i));
    }
    assert_eq!(reader.poll(&mut out), Ok(PollOutcome::NothingNew));
    assert_eq!(reader.lag(), 0);
}

#[test]
fn two_channel_frames_are_channel_major() {
    let g = geometry(4, 3, 2, 2);
    assert_eq!(g.frame_pixels(), 24);
    assert_eq!(g.frame_bytes(), 48);
    let (mut writer, mut reader) = ring(g);
    // pixel (c, y, x) = 1000 * c + 10 * y + x, stored plane by plane.
    let mut pixels = Vec::new();
    for c in 0..2u16 {
        for y in 0..3u16 {
            for x in 0..4u16 {
                pixels.push(1000 * c + 10 * y + x);
            }
        }
    }
    writer.publish(1, 1, None, &pixels).expect("publish");
    let mut out = vec![0u16; 24];
    expect_frame(&mut reader, &mut out);
    assert_eq!(out, pixels);
    // Channel 1, row 2, column 3 is at 1 * (3 * 4) + 2 * 4 + 3.
    assert_eq!(out[12 + 8 + 3], 1023);

    // And the bytes in the slot are little-endian uint16 in that order.
    let mut bytes = vec![0u8; reader.frame_bytes()];
    writer.publish(2, 2, None, &pixels).expect("publish");
    assert!(matches!(
        reader.poll_bytes(&mut bytes),
        Ok(PollOutcome::Frame(_))
    ));
    assert_eq!(bytes, pixels.as_bytes());
    assert_eq!(&bytes[2..4], &1u16.to_le_bytes());
}

#[test]
fn frames_whose_size_is_not_a_multiple_of_8_bytes_round_trip() {
    // 9, 10 and 11 pixels: 2, 4 and 6 tail bytes after the last whole word.
    for (width, height) in [(3, 3), (5, 2), (11, 1), (1, 1)] {
        let g = geometry(width, height, 1, 2);
        let (mut writer, mut reader) = ring(g);
        let pixels: Vec<u16> = (0..g.frame_pixels() as u16).map(|i| 0xA000 + i).collect();
        writer.publish(0, 0, None, &pixels).expect("publish");
        let mut out = vec![0u16; pixels.len()];
        expect_frame(&mut reader, &mut out);
        assert_eq!(out, pixels, "{width}x{height}");
    }
}

#[test]
fn poll_writes_only_one_frame_into_a_larger_buffer() {
    let g = geometry(2, 2, 1, 2);
    let (mut writer, mut reader) = ring(g);
    writer.publish(0, 0, None, &[5; 4]).expect("publish");
    let mut out = [9u16; 6];
    expect_frame(&mut reader, &mut out);
    assert_eq!(out, [5, 5, 5, 5, 9, 9]);
}

#[test]
fn buffer_and_frame_length_errors() {
    let g = geometry(4, 4, 1, 2);
    let (mut writer, mut reader) = ring(g);
    assert_eq!(
        writer.publish(0, 0, None, &[0; 15]),
        Err(RingError::FrameLength {
            expected: 16,
            actual: 15
        })
    );
    let mut small = [0u16; 15];
    assert_eq!(
        reader.poll(&mut small),
        Err(RingError::BufferTooSmall {
            expected: 16,
            actual: 15
        })
    );
}

#[test]
fn two_phase_write_row_by_row() {
    let g = geometry(8, 4, 1, 2);
    let (mut writer, mut reader) = ring(g);
    let mut slot = writer.begin_frame();
    assert_eq!(slot.index(), 0);
    for row in 0..4u16 {
        slot.write_pixels(usize::from(row) * 8, &[row; 8])
            .expect("row write");
    }
    // Not visible before commit.
    let mut out = vec![0u16; 32];
    // (the reader cannot run while the slot borrows the writer mutably in
    // this single-threaded test, so commit and check afterwards)
    assert_eq!(slot.commit(42, 4242, Some(1)), 0);
    let meta = expect_frame(&mut reader, &mut out);
    assert_eq!((meta.frame_number, meta.hw_timestamp_ns), (42, Some(1)));
    for (i, &p) in out.iter().enumerate() {
        assert_eq!(p, (i / 8) as u16);
    }
}

#[test]
fn two_phase_write_refuses_ranges_that_split_words() {
    let g = geometry(3, 3, 1, 2); // 9 pixels: words 0..4, 4..8, tail pixel 8
    let (mut writer, _reader) = ring(g);
    let mut slot = writer.begin_frame();
    let err = |start, end| RingError::PixelRange {
        start,
        end,
        frame_pixels: 9,
    };
    assert_eq!(slot.write_pixels(1, &[0; 3]), Err(err(1, 4)));
    assert_eq!(slot.write_pixels(0, &[0; 3]), Err(err(0, 3)));
    assert_eq!(slot.write_pixels(8, &[0; 2]), Err(err(8, 10)));
    assert_eq!(
        slot.write_pixels(usize::MAX, &[0; 2]),
        Err(err(usize::MAX, usize::MAX))
    );
    assert_eq!(slot.write_pixels(4, &[0; 5]), Ok(()));
    assert_eq!(slot.write_pixels(8, &[0; 1]), Ok(()));
    assert_eq!(slot.write_pixels(0, &[]), Ok(()));
}

#[test]
fn abandoned_slot_is_never_seen_and_its_index_is_reused() {
    let g = geometry(4, 1, 1, 2);
    let (mut writer, mut reader) = ring(g);
    let mut out = [0u16; 4];
    {
        let mut slot = writer.begin_frame();
        slot.write_pixels(0, &[9; 4]).expect("write");
        // dropped without commit
    }
    assert_eq!(reader.poll(&mut out), Ok(PollOutcome::NothingNew));
    assert_eq!(writer.publish(1, 1, None, &[1; 4]), Ok(0));
    assert_eq!(expect_frame(&mut reader, &mut out).frame_number, 1);
    assert_eq!(out, [1; 4]);
}

#[test]
fn writer_laps_reader_overrun_is_counted() {
    let g = geometry(4, 4, 1, 4);
    let (mut writer, mut reader) = ring(g);
    for i in 0..10u16 {
        writer
            .publish(u64::from(i), 0, None, &frame_of(i, &g))
            .expect("publish");
    }
    let mut out = vec![0u16; 16];
    // Frames 0..6 are gone; 6..10 are still in the 4 slots.
    assert_eq!(
        reader.poll(&mut out),
        Ok(PollOutcome::Overrun { skipped: 6 })
    );
    for i in 6..10u16 {
        let meta = expect_frame(&mut reader, &mut out);
        assert_eq!(meta.index, u64::from(i));
        assert!(out.iter().all(|&p| p == i));
    }
    assert_eq!(reader.poll(&mut out), Ok(PollOutcome::NothingNew));
    assert_eq!(reader.frames_dropped(), 6);
    assert_eq!(reader.frames_read(), 4);
}

#[test]
fn reader_exactly_one_ring_behind_loses_nothing() {
    let g = geometry(4, 4, 1, 4);
    let (mut writer, mut reader) = ring(g);
    for i in 0..4u16 {
        writer
            .publish(0, 0, None, &frame_of(i, &g))
            .expect("publish");
    }
    let mut out = vec![0u16; 16];
    for i in 0..4 {
        assert_eq!(expect_frame(&mut reader, &mut out).index, i);
    }
    assert_eq!(reader.frames_dropped(), 0);
}

#[test]
fn slot_being_overwritten_is_an_overrun_of_one() {
    let g = geometry(4, 4, 1, 4);
    let (mut writer, mut reader) = ring(g);
    for i in 0..4u16 {
        writer
            .publish(0, 0, None, &frame_of(i, &g))
            .expect("publish");
    }
    // Frame 4 is being written into frame 0's slot.
    let slot = writer.begin_frame();
    let mut out = vec![0u16; 16];
    assert_eq!(
        reader.poll(&mut out),
        Ok(PollOutcome::Overrun { skipped: 1 })
    );
    assert_eq!(expect_frame(&mut reader, &mut out).index, 1);
    slot.commit(0, 0, None);
}

#[test]
fn attach_starts_at_the_live_edge_and_seek_reads_history() {
    let g = geometry(4, 4, 1, 8);
    let region = RingRegion::new_owned(g.region_len_usize().expect("fits"));
    let mut writer = RingWriter::init(region.clone(), g, 3, 1, 0).expect("init");
    for i in 0..5u16 {
        writer
            .publish(0, 0, None, &frame_of(i, &g))
            .expect("publish");
    }
    let mut reader = RingReader::attach(region).expect("attach");
    assert_eq!(reader.next_index(), 5);
    assert_eq!(reader.published(), 5);
    let mut out = vec![0u16; 16];
    assert_eq!(reader.poll(&mut out), Ok(PollOutcome::NothingNew));
    reader.seek(2);
    assert_eq!(reader.lag(), 3);
    assert_eq!(expect_frame(&mut reader, &mut out).index, 2);
    assert!(out.iter().all(|&p| p == 2));
}

#[test]
fn producer_restart_is_detected_and_followed() {
    let g = geometry(4, 4, 1, 4);
    let (writer, mut reader) = ring(g);
    let mut writer = writer;
    writer
        .publish(0, 0, None, &frame_of(1, &g))
        .expect("publish");
    let mut out = vec![0u16; 16];
    expect_frame(&mut reader, &mut out);

    // The producer dies and a new one re-initialises the same region.
    let region = writer.region().clone();
    drop(writer);
    let mut writer = RingWriter::init(region, g, 2, 999, 50).expect("restart");
    writer
        .publish(0, 60, None, &frame_of(7, &g))
        .expect("publish");
    assert_eq!(
        reader.poll(&mut out),
        Ok(PollOutcome::ProducerRestarted {
            old_gen: 1,
            new_gen: 2
        })
    );
    assert_eq!(reader.generation(), 2);
    let meta = expect_frame(&mut reader, &mut out);
    assert_eq!((meta.index, meta.host_monotonic_ns), (0, 60));
    assert!(out.iter().all(|&p| p == 7));
}

#[test]
fn restart_with_a_new_geometry_changes_the_readers_layout() {
    let big = geometry(16, 16, 2, 4);
    let small = geometry(8, 8, 1, 2);
    let region = RingRegion::new_owned(big.region_len_usize().expect("fits"));
    let writer = RingWriter::init(region.clone(), big, 10, 1, 0).expect("init");
    let mut reader = RingReader::attach(region).expect("attach");
    let region = writer.close();
    let mut writer = RingWriter::init(region, small, 11, 1, 0).expect("restart");
    writer
        .publish(0, 0, None, &frame_of(3, &small))
        .expect("publish");
    let mut out = vec![0u16; big.frame_pixels() as usize];
    assert!(matches!(
        reader.poll(&mut out),
        Ok(PollOutcome::ProducerRestarted { .. })
    ));
    assert_eq!(reader.geometry(), small);
    assert_eq!(reader.frame_pixels(), 64);
    expect_frame(&mut reader, &mut out);
    assert!(out[..64].iter().all(|&p| p == 3));
}

#[test]
fn restart_into_a_ring_too_big_for_the_mapping_is_an_error() {
    let small = geometry(8, 8, 1, 2);
    let big = geometry(8, 8, 1, 3);
    let memory = RingRegion::new_owned(big.region_len_usize().expect("fits"));
    let writer = RingWriter::init(memory.clone(), small, 1, 1, 0).expect("init");
    // The reader mapped exactly the small ring.
    // SAFETY: `memory` (the owner) keeps the buffer alive; it is only
    // accessed atomically.
    let view = unsafe {
        RingRegion::from_raw_with_owner(
            memory.as_ptr() as *mut u8,
            small.region_len_usize().expect("fits"),
            memory.clone(),
        )
    }
    .expect("aligned");
    let mut reader = RingReader::attach(view).expect("attach");
    // The new producer grew the ring beyond the reader's mapping.
    let _writer = RingWriter::init(writer.close(), big, 2, 1, 0).expect("restart");
    let mut out = vec![0u16; 64];
    match reader.poll(&mut out) {
        Err(RingError::Layout(LayoutError::RegionTooSmall { actual, needed, .. })) => {
            assert_eq!((actual, needed), (small.region_len(), big.region_len()));
        }
        other => panic!("expected RegionTooSmall, got {other:?}"),
    }
    // The reader stays on the old generation and keeps reporting it.
    assert_eq!(reader.generation(), 1);
    assert!(reader.poll(&mut out).is_err());
}

#[test]
fn init_refuses_zero_and_reused_generations_and_small_regions() {
    let g = geometry(4, 4, 1, 2);
    let region = RingRegion::new_owned(g.region_len_usize().expect("fits"));
    assert_eq!(
        RingWriter::init(region.clone(), g, 0, 1, 0).err(),
        Some(RingError::ZeroGeneration)
    );
    let writer = RingWriter::init(region.clone(), g, 5, 1, 0).expect("init");
    drop(writer);
    assert_eq!(
        RingWriter::init(region.clone(), g, 5, 1, 0).err(),
        Some(RingError::GenerationReused(5))
    );
    let tiny = RingRegion::new_owned(4096);
    match RingWriter::init(tiny, g, 1, 1, 0) {
        Err(RingError::Layout(LayoutError::RegionTooSmall { actual, needed, .. })) => {
            assert_eq!((actual, needed), (4096, g.region_len()));
        }
        other => panic!("expected RegionTooSmall, got {other:?}"),
    }
}

#[test]
fn attach_to_an_uninitialised_region_is_not_ready() {
    let region = RingRegion::new_owned(1 << 16);
    assert_eq!(RingReader::attach(region).err(), Some(RingError::NotReady));
    let tiny = RingRegion::new_owned(64);
    assert!(matches!(
        RingReader::attach(tiny),
        Err(RingError::Layout(LayoutError::RegionTooSmall {
            needed: 4096,
            ..
        }))
    ));
}

#[test]
fn attach_refuses_a_region_smaller_than_the_header_claims() {
    let g = geometry(4, 4, 1, 4);
    let region = RingRegion::new_owned(g.region_len_usize().expect("fits"));
    let _writer = RingWriter::init(region.clone(), g, 1, 1, 0).expect("init");
    // A reader that mapped too little of the same memory.
    // SAFETY: `region` stays alive (it is the owner) for the whole test and
    // is only accessed atomically.
    let short = unsafe {
        RingRegion::from_raw_with_owner(
            region.as_ptr() as *mut u8,
            region.len() - 8,
            region.clone(),
        )
    }
    .expect("aligned");
    match RingReader::attach(short) {
        Err(RingError::Layout(e)) => {
            let msg = e.to_string();
            assert!(msg.contains("region length"), "{msg}");
            assert!(msg.contains(&g.region_len().to_string()), "{msg}");
        }
        other => panic!("expected a layout error, got {other:?}"),
    }
}

#[test]
fn from_raw_checks_null_and_alignment() {
    let mut words = vec![0u64; 4];
    let ptr = words.as_mut_ptr().cast::<u8>();
    // SAFETY: the pointers are rejected before any access.
    unsafe {
        assert_eq!(
            RingRegion::from_raw(std::ptr::null_mut(), 8).err(),
            Some(RingError::NullRegion)
        );
        assert!(matches!(
            RingRegion::from_raw(ptr.add(4), 8),
            Err(RingError::MisalignedRegion { .. })
        ));
    }
    // SAFETY: `words` outlives `region` and is only accessed through it.
    let region = unsafe { RingRegion::from_raw(ptr, 32) }.expect("aligned");
    assert_eq!(region.len(), 32);
    drop(region);
    drop(words);
}

#[test]
fn ring_over_raw_memory_works_like_an_owned_one() {
    let g = geometry(4, 4, 2, 2);
    let len = g.region_len_usize().expect("fits");
    let mut words = vec![0u64; len / 8];
    // SAFETY: `words` lives until the end of the test, after the writer and
    // reader are dropped, and is only accessed through the region.
    let region = unsafe { RingRegion::from_raw(words.as_mut_ptr().cast(), len) }.expect("aligned");
    let mut writer = RingWriter::init(region.clone(), g, 9, 1, 0).expect("init");
    let mut reader = RingReader::attach(region).expect("attach");
    writer
        .publish(1, 2, None, &frame_of(4, &g))
        .expect("publish");
    let mut out = vec![0u16; 32];
    expect_frame(&mut reader, &mut out);
    assert!(out.iter().all(|&p| p == 4));
    drop((writer, reader));
    drop(words);
}

#[test]
fn header_bytes_match_the_documented_layout() {
    let g = geometry(512, 256, 2, 16);
    let region = RingRegion::new_owned(g.region_len_usize().expect("fits"));
    let mut writer =
        RingWriter::init(region.clone(), g, 0x1122_3344_5566_7788, 4321, 99).expect("init");
    writer.set_nominal_frame_rate_mhz(30_000);
    writer
        .publish(5, 123_456, Some(42), &frame_of(1, &g))
        .expect("publish");
    let b = header_bytes(&region);
    assert_eq!(&b[0..8], b"RIGFRAME");
    assert_eq!(le_u32(&b, 8), 1, "layout_version");
    assert_eq!(le_u32(&b, 12), 4096, "header_size");
    assert_eq!(le_u32(&b, 16), 512, "width");
    assert_eq!(le_u32(&b, 20), 256, "height");
    assert_eq!(le_u32(&b, 24), 2, "channels");
    assert_eq!(le_u32(&b, 28), 1, "pixel_type");
    assert_eq!(le_u32(&b, 32), 16, "slot_count");
    assert_eq!(le_u32(&b, 36), 64, "slot_header_size");
    let frame_bytes: u64 = 512 * 256 * 2 * 2;
    assert_eq!(le_u64(&b, 40), (64 + frame_bytes).div_ceil(4096) * 4096);
    assert_eq!(le_u64(&b, 48), frame_bytes, "frame_bytes");
    assert_eq!(le_u64(&b, 56), 0x1122_3344_5566_7788, "generation");
    assert_eq!(le_u64(&b, 64), 1, "write_seq");
    assert_eq!(le_u32(&b, 72), 4321, "producer_pid");
    assert_eq!(le_u32(&b, 76), 1, "state");
    assert_eq!(le_u64(&b, 80), 123_456, "heartbeat_ns");
    assert_eq!(le_u32(&b, 88), 30_000, "nominal_frame_rate_mhz");
    assert!(b[92..].iter().all(|&x| x == 0), "reserved bytes are zero");

    let header = RingHeader::parse(&b).expect("parse");
    assert_eq!(
        header.validate(region.len() as u64),
        Ok(RingLayout::for_geometry(g))
    );
    assert_eq!(header.producer_state(), ProducerState::Live);
    let mut expected = g.header_for(0x1122_3344_5566_7788, 4321);
    expected.write_seq = 1;
    expected.state = 1;
    expected.heartbeat_ns = 123_456;
    expected.nominal_frame_rate_mhz = 30_000;
    assert_eq!(header, expected);

    // Slot 0 header: seq = 2, frame_number, host_ns, hw_ts, flags = 1.
    let mut slot = vec![0u8; HEADER_REGION + SLOT_HEADER_SIZE];
    region.snapshot_into(&mut slot);
    let s = &slot[HEADER_REGION..];
    assert_eq!(le_u64(s, 0), 2, "seq");
    assert_eq!(le_u64(s, 8), 5, "frame_number");
    assert_eq!(le_u64(s, 16), 123_456, "host_monotonic_ns");
    assert_eq!(le_u64(s, 24), 42, "hw_timestamp_ns");
    assert_eq!(le_u32(s, 32), 1, "flags");
    assert!(s[36..64].iter().all(|&x| x == 0));
}

#[test]
fn heartbeat_close_and_staleness() {
    let g = geometry(4, 4, 1, 2);
    let (mut writer, reader) = ring(g);
    assert_eq!(reader.producer_state(), ProducerState::Live);
    assert_eq!(reader.heartbeat_ns(), 5);
    writer.heartbeat(1_000_000_000);
    assert_eq!(reader.heartbeat_ns(), 1_000_000_000);
    assert!(!reader.is_stale(1_100_000_000, 500_000_000));
    assert!(reader.is_stale(1_600_000_001, 500_000_000));
    // A clock reading before the heartbeat is never stale.
    assert!(!reader.is_stale(0, 0));
    writer
        .publish(0, 2_000_000_000, None, &frame_of(0, &g))
        .expect("publish");
    assert_eq!(reader.heartbeat_ns(), 2_000_000_000);
    let _region = writer.close();
    assert_eq!(reader.producer_state(), ProducerState::Closed);
    assert_eq!(
        reader.header().expect("header").state,
        ProducerState::CLOSED
    );
}

#[test]
fn closed_ring_can_still_be_attached_and_drained() {
    let g = geometry(4, 4, 1, 4);
    let region = RingRegion::new_owned(g.region_len_usize().expect("fits"));
    let mut writer = RingWriter::init(region.clone(), g, 1, 1, 0).expect("init");
    writer
        .publish(0, 0, None, &frame_of(8, &g))
        .expect("publish");
    writer.close();
    let mut reader = RingReader::attach(region).expect("attach closed ring");
    assert_eq!(reader.producer_state(), ProducerState::Closed);
    reader.seek(0);
    let mut out = vec![0u16; 16];
    expect_frame(&mut reader, &mut out);
    assert_eq!(reader.poll(&mut out), Ok(PollOutcome::NothingNew));
}

// ---- header validation -------------------------------------------------

fn valid_header() -> (RingHeader, u64) {
    let g = geometry(64, 32, 2, 8);
    let mut h = g.header_for(77, 1);
    h.state = ProducerState::LIVE;
    (h, g.region_len())
}

/// Mutate a valid header, validate it, and return the error message.
fn invalid_message(mutate: impl FnOnce(&mut RingHeader)) -> (LayoutError, String) {
    let (mut h, len) = valid_header();
    mutate(&mut h);
    let err = h.validate(len).expect_err("should be invalid");
    let msg = err.to_string();
    (err, msg)
}

#[test]
fn valid_header_validates() {
    let (h, len) = valid_header();
    let layout = h.validate(len).expect("valid");
    assert_eq!(layout.frame_bytes(), 64 * 32 * 2 * 2);
    assert_eq!(layout.slot_offset(0), 4096);
    assert_eq!(layout.slot_offset(9), 4096 + layout.slot_stride());
    assert_eq!(layout.data_offset(0), 4096 + 64);
}

#[test]
fn header_validation_errors_name_field_value_and_expectation() {
    let (err, msg) = invalid_message(|h| h.magic = *b"NOTARING");
    assert!(matches!(err, LayoutError::BadMagic { .. }));
    assert!(
        msg.contains("magic = NOTARING") && msg.contains("RIGFRAME"),
        "{msg}"
    );

    let (_, msg) = invalid_message(|h| h.magic = [0; 8]);
    assert!(msg.contains(r"\x00"), "{msg}");

    let (err, msg) = invalid_message(|h| h.layout_version = 2);
    assert_eq!(
        err,
        LayoutError::UnsupportedVersion {
            found: 2,
            expected: 1
        }
    );
    assert!(msg.starts_with("layout_version = 2: expected 1"), "{msg}");

    type Case = (&'static str, fn(&mut RingHeader), &'static str);
    let cases: [Case; 12] = [
        (
            "header_size = 128",
            |h| h.header_size = 128,
            "expected 4096",
        ),
        (
            "slot_header_size = 32",
            |h| h.slot_header_size = 32,
            "expected 64",
        ),
        ("pixel_type = 2", |h| h.pixel_type = 2, "uint16"),
        ("channels = 3", |h| h.channels = 3, "1 or 2"),
        ("channels = 0", |h| h.channels = 0, "1 or 2"),
        ("width = 0", |h| h.width = 0, "1..=16384"),
        ("height = 20000", |h| h.height = 20000, "1..=16384"),
        ("slot_count = 0", |h| h.slot_count = 0, "1..=65536"),
        ("frame_bytes = 1", |h| h.frame_bytes = 1, "= 8192"),
        (
            "slot_stride = 8200",
            |h| h.slot_stride = 8200,
            "multiple of 64",
        ),
        (
            "slot_stride = 8192",
            |h| h.slot_stride = 8192,
            "at least 64 + frame_bytes = 8256",
        ),
        (
            "state = 7",
            |h| h.state = 7,
            "0 (initialising), 1 (live) or 2 (closed)",
        ),
    ];
    for (prefix, mutate, expectation) in cases {
        let (err, msg) = invalid_message(mutate);
        assert!(matches!(err, LayoutError::InvalidField { .. }), "{err:?}");
        assert!(msg.starts_with(prefix), "{msg} should start with {prefix}");
        assert!(
            msg.contains(expectation),
            "{msg} should mention {expectation}"
        );
    }
}

#[test]
fn header_validation_checks_the_region_length() {
    let (h, len) = valid_header();
    assert!(h.validate(len).is_ok());
    let err = h.validate(len - 1).expect_err("one byte short");
    assert_eq!(
        err,
        LayoutError::RegionTooSmall {
            actual: len - 1,
            needed: len,
            reason: "4096 + slot_count * slot_stride"
        }
    );
    // A stride from memory so large that slot_count * stride overflows.
    let (err, _) = invalid_message(|h| h.slot_stride = u64::MAX / 2 / 64 * 64);
    assert!(matches!(err, LayoutError::TooLarge { .. }), "{err:?}");
}

#[test]
fn a_producer_may_choose_a_smaller_stride() {
    let (mut h, _) = valid_header();
    h.slot_stride = 64 + 8192; // multiple of 64, not of 4096
    let len = 4096 + 8 * h.slot_stride;
    let layout = h.validate(len).expect("valid");
    assert_eq!(layout.slot_stride(), 8256);
    assert_eq!(layout.region_len(), len);
}

#[test]
fn header_parse_needs_128_bytes() {
    assert!(matches!(
        RingHeader::parse(&[0u8; 127]),
        Err(LayoutError::RegionTooSmall { needed: 128, .. })
    ));
    let (h, _) = valid_header();
    assert_eq!(RingHeader::parse(h.as_bytes()), Ok(h));
    assert_eq!(&h.as_bytes()[..8], &MAGIC);
}

#[test]
fn geometry_validation() {
    let ok = |w, h, c, s| RingGeometry::new(w, h, c, PixelType::U16Le, s).is_ok();
    assert!(ok(1, 1, 1, 1));
    assert!(ok(16384, 16384, 2, 2));
    assert!(!ok(0, 1, 1, 1));
    assert!(!ok(1, 0, 1, 1));
    assert!(!ok(16385, 1, 1, 1));
    assert!(!ok(1, 1, 3, 1));
    assert!(!ok(1, 1, 1, 0));
    assert!(!ok(1, 1, 1, 65537));
    let msg = RingGeometry::new(512, 512, 4, PixelType::U16Le, 8)
        .expect_err("4 channels")
        .to_string();
    assert_eq!(msg, "channels = 4: expected 1 or 2");
    let g = geometry(512, 512, 2, 32);
    assert_eq!(g.frame_bytes(), 1 << 20);
    assert_eq!(g.slot_stride(), (1 << 20) + 4096);
    assert_eq!(g.region_len(), 4096 + 32 * ((1 << 20) + 4096));
}

// ---- concurrency -------------------------------------------------------

/// One writer thread publishes frames whose every pixel equals the frame
/// index; reader threads check every accepted frame is self-consistent and
/// that frames read + frames dropped accounts for every frame.
#[test]
fn concurrent_stress_never_accepts_a_torn_frame() {
    const FRAMES: u64 = 20_000;
    // 45 x 45 = 2025 pixels = 4050 bytes: whole words plus a 2-byte tail.
    let g = geometry(45, 45, 1, 4);
    let region = RingRegion::new_owned(g.region_len_usize().expect("fits"));
    let mut writer = RingWriter::init(region.clone(), g, 1, 1, 0).expect("init");
    let readers: Vec<RingReader> = (0..2)
        .map(|_| RingReader::attach(region.clone()).expect("attach"))
        .collect();
    let done = AtomicBool::new(false);

    std::thread::scope(|scope| {
        let handles: Vec<_> = readers
            .into_iter()
            .map(|mut reader| {
                let done = &done;
                scope.spawn(move || {
                    let mut out = vec![0u16; reader.frame_pixels()];
                    let (mut torn, mut overruns) = (0u64, 0u64);
                    let mut expected_next = 0u64;
                    loop {
                        let finished = done.load(Ordering::Acquire);
                        match reader.poll(&mut out).expect("poll") {
                            PollOutcome::Frame(meta) => {
                                assert_eq!(meta.index, expected_next, "frames in order");
                                assert_eq!(meta.frame_number, meta.index);
                                assert_eq!(meta.host_monotonic_ns, meta.index * 1000);
                                let want = meta.index as u16;
                                if let Some(bad) = out.iter().position(|&p| p != want) {
                                    panic!(
                                        "torn frame {} accepted: pixel {bad} = {}",
                                        meta.index, out[bad]
                                    );
                                }
                                expected_next += 1;
                            }
                            PollOutcome::Overrun { skipped } => {
                                assert!(skipped > 0);
                                expected_next += skipped;
                                overruns += 1;
                            }
                            PollOutcome::Torn => torn += 1,
                            PollOutcome::NothingNew => {
                                if finished {
                                    break;
                                }
                                std::thread::yield_now();
                            }
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                    assert_eq!(reader.next_index(), FRAMES);
                    assert_eq!(reader.frames_read() + reader.frames_dropped(), FRAMES);
                    assert_eq!(reader.torn_reads(), torn);
                    (
                        reader.frames_read(),
                        reader.frames_dropped(),
                        torn,
                        overruns,
                    )
                })
            })
            .collect();

        let mut pixels = vec![0u16; g.frame_pixels() as usize];
        for i in 0..FRAMES {
            pixels.fill(i as u16);
            writer.publish(i, i * 1000, None, &pixels).expect("publish");
        }
        done.store(true, Ordering::Release);
        for handle in handles {
            let (read, dropped, torn, overruns) = handle.join().expect("reader thread");
            eprintln!("reader: {read} read, {dropped} dropped in {overruns} overruns, {torn} torn");
            assert!(read > 0);
        }
    });
}

/// The producer restarts in place (a new generation) while a reader polls:
/// the reader reports the restart once, follows the new generation and never
/// accepts a frame that mixes the two.
#[test]
fn concurrent_restart_is_followed_without_torn_frames() {
    const PER_GENERATION: u64 = 3000;
    let g = geometry(32, 16, 1, 4);
    let region = RingRegion::new_owned(g.region_len_usize().expect("fits"));
    let first = RingWriter::init(region.clone(), g, 1, 1, 0).expect("init");
    let mut reader = RingReader::attach(region.clone()).expect("attach");
    let done = AtomicBool::new(false);
    let value = |generation: u64, index: u64| (generation * 4000 + index) as u16;

    std::thread::scope(|scope| {
        let done = &done;
        let handle = scope.spawn(move || {
            let mut out = vec![0u16; reader.frame_pixels()];
            let mut restarts = Vec::new();
            loop {
                let finished = done.load(Ordering::Acquire);
                match reader.poll(&mut out).expect("poll") {
                    PollOutcome::Frame(meta) => {
                        let generation = reader.generation();
                        assert_eq!(meta.frame_number, generation * 1_000_000 + meta.index);
                        let want = value(generation, meta.index);
                        assert!(
                            out.iter().all(|&p| p == want),
                            "mixed frame accepted: generation {generation}, index {}",
                            meta.index
                        );
                    }
                    PollOutcome::ProducerRestarted { old_gen, new_gen } => {
                        restarts.push((old_gen, new_gen));
                    }
                    PollOutcome::Overrun { .. } | PollOutcome::Torn => {}
                    PollOutcome::NothingNew => {
                        if finished {
                            break;
                        }
                        std::thread::yield_now();
                    }
                }
            }
            (restarts, reader.next_index())
        });

        let mut pixels = vec![0u16; g.frame_pixels() as usize];
        let mut writer = first;
        for generation in 1..=2u64 {
            if generation == 2 {
                writer = RingWriter::init(region.clone(), g, 2, 2, 0).expect("restart");
            }
            for i in 0..PER_GENERATION {
                pixels.fill(value(generation, i));
                writer
                    .publish(generation * 1_000_000 + i, i, None, &pixels)
                    .expect("publish");
            }
        }
        done.store(true, Ordering::Release);
        let (restarts, next) = handle.join().expect("reader thread");
        assert_eq!(restarts, vec![(1, 2)]);
        assert_eq!(next, PER_GENERATION);
    });
}

// ---- properties ----------------------------------------------------------

proptest! {
    #[test]
    fn geometry_size_invariants(
        width in 1u32..=4096,
        height in 1u32..=4096,
        channels in 1u32..=2,
        slots in 1u32..=4096,
    ) {
        let g = geometry(width, height, channels, slots);
        let frame_bytes = u64::from(width) * u64::from(height) * u64::from(channels) * 2;
        prop_assert_eq!(g.frame_bytes(), frame_bytes);
        let stride = g.slot_stride();
        prop_assert_eq!(stride % 4096, 0);
        prop_assert!(stride >= 64 + frame_bytes);
        prop_assert!(stride < 64 + frame_bytes + 4096);
        prop_assert_eq!(g.region_len(), 4096 + u64::from(slots) * stride);

        let header = g.header_for(1, 1);
        let layout = header.validate(g.region_len()).expect("own header is valid");
        prop_assert_eq!(layout, RingLayout::for_geometry(g));
        prop_assert!(header.validate(g.region_len() - 1).is_err());
        for index in [0, 1, u64::from(slots) - 1, u64::from(slots), 12_345] {
            let slot = layout.slot_offset(index);
            prop_assert_eq!(slot % 4096, 0);
            prop_assert_eq!(layout.data_offset(index) % 64, 0);
            prop_assert!(slot + stride <= g.region_len());
        }
    }

    #[test]
    fn arbitrary_header_bytes_never_panic_validation(
        bytes in proptest::collection::vec(any::<u8>(), 128),
        len in any::<u64>(),
    ) {
        let header = RingHeader::parse(&bytes).expect("128 bytes");
        if let Ok(layout) = header.validate(len) {
            prop_assert!(layout.region_len() <= len);
        }
    }

    #[test]
    fn any_frame_round_trips(
        width in 1u32..=40,
        height in 1u32..=8,
        channels in 1u32..=2,
        seed in any::<u16>(),
    ) {
        let g = geometry(width, height, channels, 2);
        let (mut writer, mut reader) = ring(g);
        let pixels: Vec<u16> = (0..g.frame_pixels() as u16)
            .map(|i| i.wrapping_mul(31).wrapping_add(seed))
            .collect();
        writer.publish(0, 0, None, &pixels).expect("publish");
        let mut out = vec![0u16; pixels.len()];
        prop_assert!(matches!(reader.poll(&mut out), Ok(PollOutcome::Frame(_))));
        prop_assert_eq!(out, pixels);
    }
}
