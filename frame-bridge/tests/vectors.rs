//! The wire format's golden vectors (`tests/vectors/wire.tsv`, written from
//! `docs/protocol.md` section 4 with Python's `struct`, not with this crate):
//! the Rust encoders produce exactly these bytes and the decoders read them
//! back; the Python sender's encoders are checked against the same file.

use frame_bridge::wire::{
    Hello, Reply, SenderHeader, SenderKind, WireGeometry, FLAG_STAMP_HOST_MONOTONIC, HELLO_LEN,
    PIXEL_U16LE, REPLY_LEN, SENDER_HEADER_LEN,
};

fn vectors() -> Vec<(String, Vec<u8>)> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/wire.tsv"),
    )
    .expect("vectors");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let mut cols = l.split('\t');
            let name = cols.next().expect("name").to_owned();
            let hex = cols.next().expect("hex");
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect();
            (name, bytes)
        })
        .collect()
}

fn vector(name: &str) -> Vec<u8> {
    vectors()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("vector {name}"))
        .1
}

fn header(b: &[u8]) -> [u8; SENDER_HEADER_LEN] {
    b.try_into().expect("40 bytes")
}

#[test]
fn the_encoders_produce_the_golden_bytes_and_the_decoders_read_them() {
    let g = WireGeometry {
        width: 512,
        height: 512,
        channels: 1,
        pixel_type: PIXEL_U16LE,
    };
    let hello = vector("hello_512x512x1_token16");
    assert_eq!(Hello::encode(g, b"0123456789abcdef"), hello);
    let fixed: [u8; HELLO_LEN] = hello[..HELLO_LEN].try_into().expect("32");
    assert_eq!(Hello::decode(&fixed).expect("hello").geometry, g);

    let frame = SenderHeader {
        kind: SenderKind::Frame,
        payload_len: 524_288,
        frame_number: 7,
        stamp_ns: 123_456_789_012,
        flags: FLAG_STAMP_HOST_MONOTONIC,
        sender_dropped: 3,
    };
    assert_eq!(frame.encode().to_vec(), vector("frame_header_7"));
    assert_eq!(
        SenderHeader::decode(&header(&vector("frame_header_7")), 524_288),
        Ok(frame)
    );
    let beat = SenderHeader {
        kind: SenderKind::Beat,
        payload_len: 0,
        frame_number: 0,
        stamp_ns: 0,
        flags: FLAG_STAMP_HOST_MONOTONIC,
        sender_dropped: 3,
    };
    assert_eq!(beat.encode().to_vec(), vector("beat"));
    let bye = SenderHeader {
        kind: SenderKind::Bye,
        flags: 0,
        sender_dropped: 0,
        ..beat
    };
    assert_eq!(bye.encode().to_vec(), vector("bye"));

    for (name, reply) in [
        (
            "accept_next_12",
            Reply::Accept {
                next_frame_number: 12,
                frame_bytes: 524_288,
            },
        ),
        (
            "refuse_bad_token",
            Reply::Refuse {
                code: 3,
                reason: "bad token".into(),
            },
        ),
        (
            "ack_5_1_40",
            Reply::Ack {
                written: 5,
                discarded: 1,
                last_frame_number: 40,
            },
        ),
        (
            "error_idle",
            Reply::Error {
                code: 12,
                reason: "idle".into(),
            },
        ),
    ] {
        let bytes = vector(name);
        assert_eq!(reply.encode(), bytes, "{name}");
        let head: [u8; REPLY_LEN] = bytes[..REPLY_LEN].try_into().expect("32");
        let (decoded, n) = Reply::decode_header(&head).expect("reply");
        assert_eq!(n, bytes.len() - REPLY_LEN);
        assert_eq!(decoded.with_reason(&bytes[REPLY_LEN..]), reply, "{name}");
    }
}
