//! The bridge's wire format (`docs/protocol.md`, section 4): pure encoders and
//! decoders over byte slices, no I/O. All integers are little-endian.
//!
//! A connection is: the sender's [`Hello`] (32 bytes + token), the
//! receiver's [`Reply::Accept`] or [`Reply::Refuse`], then sender messages
//! ([`SenderHeader`], 40 bytes, followed by the pixels of a frame) one way
//! and receiver replies ([`Reply`], 32 bytes + reason text) the other.

/// First eight bytes of a hello.
pub const HELLO_MAGIC: [u8; 8] = *b"RIGFRNET";
/// The wire version this crate speaks.
pub const WIRE_VERSION: u32 = 1;
/// Bytes of a hello before the token.
pub const HELLO_LEN: usize = 32;
/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 256;
/// Shortest token accepted (a receiver refuses to start with a shorter one).
pub const MIN_TOKEN_LEN: usize = 16;
/// Bytes of a sender message header.
pub const SENDER_HEADER_LEN: usize = 40;
/// Bytes of a receiver reply header.
pub const REPLY_LEN: usize = 32;
/// Longest reason text in a reply.
pub const MAX_REASON_LEN: usize = 1024;
/// Pixel type code for unsigned 16-bit little-endian (as in the ring).
pub const PIXEL_U16LE: u32 = 1;
/// `flags` bit 0: `stamp_ns` is `CLOCK_MONOTONIC` of the receiver's host
/// (the sender runs on the rig PC). Clear: the sender's own clock.
pub const FLAG_STAMP_HOST_MONOTONIC: u32 = 1;

/// Sender message tags.
pub const TAG_FRAME: [u8; 4] = *b"FRAM";
pub const TAG_BEAT: [u8; 4] = *b"BEAT";
pub const TAG_BYE: [u8; 4] = *b"BYE_";
/// Receiver reply tags.
pub const TAG_ACCEPT: [u8; 4] = *b"ACPT";
pub const TAG_REFUSE: [u8; 4] = *b"RFSE";
pub const TAG_ACK: [u8; 4] = *b"ACK_";
pub const TAG_ERROR: [u8; 4] = *b"ERR_";

/// Why a hello or a message could not be decoded. Each message names the
/// field, the value and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("hello magic = {found:?}: expected \"RIGFRNET\" (not a frame-bridge sender)")]
    BadMagic { found: String },
    #[error("hello version = {found}: this receiver speaks version {WIRE_VERSION} only")]
    BadVersion { found: u32 },
    #[error("hello token_len = {found}: expected 1..={MAX_TOKEN_LEN}")]
    BadTokenLen { found: u32 },
    #[error("message tag = {found:?}: expected \"FRAM\", \"BEAT\" or \"BYE_\"")]
    BadTag { found: String },
    #[error("reply tag = {found:?}: expected \"ACPT\", \"RFSE\", \"ACK_\" or \"ERR_\"")]
    BadReplyTag { found: String },
    #[error(
        "frame {frame_number}: payload_len = {found}: expected {expected} bytes (the \
         configured geometry)"
    )]
    BadPayloadLen {
        frame_number: u64,
        found: u32,
        expected: u32,
    },
    #[error("{tag} message: payload_len = {found}: expected 0")]
    UnexpectedPayload { tag: &'static str, found: u32 },
    #[error("message flags = {found:#x}: only bit 0 (stamp on the host clock) is defined")]
    BadFlags { found: u32 },
    #[error("reply text_len = {found}: expected at most {MAX_REASON_LEN}")]
    BadReasonLen { found: u32 },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn tag_text(tag: &[u8]) -> String {
    String::from_utf8_lossy(tag).escape_default().to_string()
}

/// The frame geometry a sender announces (and a receiver is configured with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireGeometry {
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    pub pixel_type: u32,
}

impl WireGeometry {
    /// Bytes of one frame's pixels, if it fits in a `u32` (a frame larger
    /// than 4 GiB cannot be sent).
    pub fn frame_bytes(&self) -> Option<u32> {
        let bpp: u64 = if self.pixel_type == PIXEL_U16LE { 2 } else { 0 };
        let n = u64::from(self.width) * u64::from(self.height) * u64::from(self.channels) * bpp;
        u32::try_from(n).ok().filter(|n| *n > 0)
    }
}

impl std::fmt::Display for WireGeometry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ty = if self.pixel_type == PIXEL_U16LE {
            "uint16".to_owned()
        } else {
            format!("pixel type {}", self.pixel_type)
        };
        write!(
            f,
            "{}x{} x {} channel(s) {ty}",
            self.width, self.height, self.channels
        )
    }
}

/// The fixed part of a sender's hello; `token_len` bytes of token follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub geometry: WireGeometry,
    pub token_len: u32,
}

impl Hello {
    /// Encode the hello and its token.
    pub fn encode(geometry: WireGeometry, token: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(HELLO_LEN + token.len());
        b.extend_from_slice(&HELLO_MAGIC);
        b.extend_from_slice(&WIRE_VERSION.to_le_bytes());
        b.extend_from_slice(&geometry.width.to_le_bytes());
        b.extend_from_slice(&geometry.height.to_le_bytes());
        b.extend_from_slice(&geometry.channels.to_le_bytes());
        b.extend_from_slice(&geometry.pixel_type.to_le_bytes());
        b.extend_from_slice(&(token.len() as u32).to_le_bytes());
        b.extend_from_slice(token);
        b
    }

    /// Decode the first [`HELLO_LEN`] bytes.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Self, WireError> {
        if b[..8] != HELLO_MAGIC {
            return Err(WireError::BadMagic {
                found: tag_text(&b[..8]),
            });
        }
        let version = u32_at(b, 8);
        if version != WIRE_VERSION {
            return Err(WireError::BadVersion { found: version });
        }
        let token_len = u32_at(b, 28);
        if token_len == 0 || token_len as usize > MAX_TOKEN_LEN {
            return Err(WireError::BadTokenLen { found: token_len });
        }
        Ok(Self {
            geometry: WireGeometry {
                width: u32_at(b, 12),
                height: u32_at(b, 16),
                channels: u32_at(b, 20),
                pixel_type: u32_at(b, 24),
            },
            token_len,
        })
    }
}

/// What a sender message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderKind {
    /// A frame; `payload_len` bytes of pixels follow.
    Frame,
    /// Nothing to send: the sender is alive.
    Beat,
    /// The sender closes the connection cleanly.
    Bye,
}

/// A sender message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderHeader {
    pub kind: SenderKind,
    pub payload_len: u32,
    /// The acquisition's frame number (frames only).
    pub frame_number: u64,
    /// When the frame was acquired, ns (see [`FLAG_STAMP_HOST_MONOTONIC`]).
    pub stamp_ns: u64,
    pub flags: u32,
    /// Frames the sender dropped so far (its queue was full).
    pub sender_dropped: u64,
}

impl SenderHeader {
    pub fn encode(&self) -> [u8; SENDER_HEADER_LEN] {
        let mut b = [0u8; SENDER_HEADER_LEN];
        let tag = match self.kind {
            SenderKind::Frame => TAG_FRAME,
            SenderKind::Beat => TAG_BEAT,
            SenderKind::Bye => TAG_BYE,
        };
        b[..4].copy_from_slice(&tag);
        b[4..8].copy_from_slice(&self.payload_len.to_le_bytes());
        b[8..16].copy_from_slice(&self.frame_number.to_le_bytes());
        b[16..24].copy_from_slice(&self.stamp_ns.to_le_bytes());
        b[24..28].copy_from_slice(&self.flags.to_le_bytes());
        b[32..40].copy_from_slice(&self.sender_dropped.to_le_bytes());
        b
    }

    /// Decode a header for a receiver whose frames are `frame_bytes` long:
    /// a frame must carry exactly that many bytes, other messages none.
    pub fn decode(b: &[u8; SENDER_HEADER_LEN], frame_bytes: u32) -> Result<Self, WireError> {
        let kind = match [b[0], b[1], b[2], b[3]] {
            TAG_FRAME => SenderKind::Frame,
            TAG_BEAT => SenderKind::Beat,
            TAG_BYE => SenderKind::Bye,
            _ => {
                return Err(WireError::BadTag {
                    found: tag_text(&b[..4]),
                })
            }
        };
        let payload_len = u32_at(b, 4);
        let frame_number = u64_at(b, 8);
        match kind {
            SenderKind::Frame if payload_len != frame_bytes => {
                return Err(WireError::BadPayloadLen {
                    frame_number,
                    found: payload_len,
                    expected: frame_bytes,
                })
            }
            SenderKind::Beat | SenderKind::Bye if payload_len != 0 => {
                return Err(WireError::UnexpectedPayload {
                    tag: if kind == SenderKind::Beat {
                        "BEAT"
                    } else {
                        "BYE_"
                    },
                    found: payload_len,
                })
            }
            _ => {}
        }
        let flags = u32_at(b, 24);
        if flags & !FLAG_STAMP_HOST_MONOTONIC != 0 {
            return Err(WireError::BadFlags { found: flags });
        }
        Ok(Self {
            kind,
            payload_len,
            frame_number,
            stamp_ns: u64_at(b, 16),
            flags,
            sender_dropped: u64_at(b, 32),
        })
    }
}

/// Why a receiver refused a hello or closed a connection (`a` of a
/// `RFSE`/`ERR_` reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum ReasonCode {
    BadHello = 1,
    BadVersion = 2,
    BadToken = 3,
    BadGeometry = 4,
    Busy = 5,
    HelloTimeout = 6,
    BadMessage = 10,
    IdleTimeout = 12,
    Replaced = 13,
    ShuttingDown = 15,
}

impl ReasonCode {
    pub fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            1 => Self::BadHello,
            2 => Self::BadVersion,
            3 => Self::BadToken,
            4 => Self::BadGeometry,
            5 => Self::Busy,
            6 => Self::HelloTimeout,
            10 => Self::BadMessage,
            12 => Self::IdleTimeout,
            13 => Self::Replaced,
            15 => Self::ShuttingDown,
            _ => return None,
        })
    }
}

/// A receiver reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The hello is accepted. `next_frame_number`: one past the last frame
    /// number written in the ring's current generation (0 if none): a frame
    /// numbered below it starts a new generation.
    Accept {
        next_frame_number: u64,
        frame_bytes: u32,
    },
    /// The hello is refused; the connection is closed.
    Refuse { code: u64, reason: String },
    /// Progress of this connection: frames written into the ring, frames
    /// discarded (numbers not increasing), the last frame number written.
    Ack {
        written: u64,
        discarded: u64,
        last_frame_number: u64,
    },
    /// A fatal error on an accepted connection; it is closed.
    Error { code: u64, reason: String },
}

impl Reply {
    pub fn encode(&self) -> Vec<u8> {
        let (tag, text, a, b, c): (_, &str, u64, u64, u64) = match self {
            Self::Accept {
                next_frame_number,
                frame_bytes,
            } => (
                TAG_ACCEPT,
                "",
                *next_frame_number,
                u64::from(*frame_bytes),
                0,
            ),
            Self::Refuse { code, reason } => (TAG_REFUSE, reason, *code, 0, 0),
            Self::Ack {
                written,
                discarded,
                last_frame_number,
            } => (TAG_ACK, "", *written, *discarded, *last_frame_number),
            Self::Error { code, reason } => (TAG_ERROR, reason, *code, 0, 0),
        };
        let text = truncate_utf8(text, MAX_REASON_LEN);
        let mut out = Vec::with_capacity(REPLY_LEN + text.len());
        out.extend_from_slice(&tag);
        out.extend_from_slice(&(text.len() as u32).to_le_bytes());
        out.extend_from_slice(&a.to_le_bytes());
        out.extend_from_slice(&b.to_le_bytes());
        out.extend_from_slice(&c.to_le_bytes());
        out.extend_from_slice(text.as_bytes());
        out
    }

    /// Decode a reply header: the reply with an empty reason, and how many
    /// bytes of reason text follow (fill them in with [`Reply::with_reason`]).
    pub fn decode_header(b: &[u8; REPLY_LEN]) -> Result<(Self, usize), WireError> {
        let text_len = u32_at(b, 4);
        if text_len as usize > MAX_REASON_LEN {
            return Err(WireError::BadReasonLen { found: text_len });
        }
        let (a, bb, c) = (u64_at(b, 8), u64_at(b, 16), u64_at(b, 24));
        let reply = match [b[0], b[1], b[2], b[3]] {
            TAG_ACCEPT => Self::Accept {
                next_frame_number: a,
                frame_bytes: u32::try_from(bb).unwrap_or(u32::MAX),
            },
            TAG_REFUSE => Self::Refuse {
                code: a,
                reason: String::new(),
            },
            TAG_ACK => Self::Ack {
                written: a,
                discarded: bb,
                last_frame_number: c,
            },
            TAG_ERROR => Self::Error {
                code: a,
                reason: String::new(),
            },
            _ => {
                return Err(WireError::BadReplyTag {
                    found: tag_text(&b[..4]),
                })
            }
        };
        Ok((reply, text_len as usize))
    }

    /// Set the reason text of a `Refuse` or `Error` (lossy UTF-8).
    pub fn with_reason(self, text: &[u8]) -> Self {
        let reason = String::from_utf8_lossy(text).into_owned();
        match self {
            Self::Refuse { code, .. } => Self::Refuse { code, reason },
            Self::Error { code, .. } => Self::Error { code, reason },
            other => other,
        }
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Compare two tokens in time that depends only on their lengths.
pub fn tokens_equal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: WireGeometry = WireGeometry {
        width: 512,
        height: 512,
        channels: 1,
        pixel_type: PIXEL_U16LE,
    };

    #[test]
    fn a_hello_round_trips_and_its_fields_are_checked() {
        let b = Hello::encode(G, b"0123456789abcdef");
        let fixed: [u8; HELLO_LEN] = b[..HELLO_LEN].try_into().expect("32");
        let h = Hello::decode(&fixed).expect("hello");
        assert_eq!(h.geometry, G);
        assert_eq!(h.token_len, 16);
        let mut bad = fixed;
        bad[0] = b'X';
        assert!(matches!(
            Hello::decode(&bad),
            Err(WireError::BadMagic { .. })
        ));
        let mut bad = fixed;
        bad[8] = 2;
        assert_eq!(Hello::decode(&bad), Err(WireError::BadVersion { found: 2 }));
        let mut bad = fixed;
        bad[28..32].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(
            Hello::decode(&bad),
            Err(WireError::BadTokenLen { found: 1000 })
        );
    }

    #[test]
    fn a_frame_must_carry_exactly_the_configured_bytes() {
        let h = SenderHeader {
            kind: SenderKind::Frame,
            payload_len: 524_288,
            frame_number: 7,
            stamp_ns: 99,
            flags: FLAG_STAMP_HOST_MONOTONIC,
            sender_dropped: 3,
        };
        let b = h.encode();
        assert_eq!(SenderHeader::decode(&b, 524_288), Ok(h));
        let err = SenderHeader::decode(&b, 8192).expect_err("too big");
        assert!(err.to_string().contains("expected 8192 bytes"), "{err}");
        let mut beat = h;
        beat.kind = SenderKind::Beat;
        assert!(matches!(
            SenderHeader::decode(&beat.encode(), 524_288),
            Err(WireError::UnexpectedPayload { .. })
        ));
        let mut flags = b;
        flags[24] = 0x82;
        assert!(matches!(
            SenderHeader::decode(&flags, 524_288),
            Err(WireError::BadFlags { .. })
        ));
    }

    #[test]
    fn replies_round_trip_with_their_reasons() {
        for r in [
            Reply::Accept {
                next_frame_number: 12,
                frame_bytes: 524_288,
            },
            Reply::Refuse {
                code: ReasonCode::BadToken as u64,
                reason: "bad token".into(),
            },
            Reply::Ack {
                written: 5,
                discarded: 1,
                last_frame_number: 40,
            },
            Reply::Error {
                code: ReasonCode::IdleTimeout as u64,
                reason: "idle".into(),
            },
        ] {
            let b = r.encode();
            let head: [u8; REPLY_LEN] = b[..REPLY_LEN].try_into().expect("32");
            let (d, n) = Reply::decode_header(&head).expect("reply");
            assert_eq!(n, b.len() - REPLY_LEN);
            assert_eq!(d.with_reason(&b[REPLY_LEN..]), r);
        }
    }

    #[test]
    fn a_long_reason_is_cut_on_a_character_boundary() {
        let r = Reply::Error {
            code: 10,
            reason: "é".repeat(MAX_REASON_LEN),
        };
        let b = r.encode();
        assert!(b.len() - REPLY_LEN <= MAX_REASON_LEN);
        assert!(std::str::from_utf8(&b[REPLY_LEN..]).is_ok());
    }

    #[test]
    fn tokens_compare_by_content_and_length() {
        assert!(tokens_equal(b"abc", b"abc"));
        assert!(!tokens_equal(b"abc", b"abd"));
        assert!(!tokens_equal(b"abc", b"abcd"));
    }

    proptest::proptest! {
        #[test]
        fn any_header_bytes_decode_or_fail_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, SENDER_HEADER_LEN)) {
            let b: [u8; SENDER_HEADER_LEN] = bytes.try_into().expect("len");
            if let Ok(h) = SenderHeader::decode(&b, 524_288) {
                proptest::prop_assert_eq!(&h.encode()[..28], &b[..28]);
            }
        }

        #[test]
        fn any_hello_bytes_decode_or_fail_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, HELLO_LEN)) {
            let b: [u8; HELLO_LEN] = bytes.try_into().expect("len");
            let _ = Hello::decode(&b);
        }

        #[test]
        fn any_reply_bytes_decode_or_fail_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, REPLY_LEN)) {
            let b: [u8; REPLY_LEN] = bytes.try_into().expect("len");
            let _ = Reply::decode_header(&b);
        }
    }
}
