//! The streaming frame decoder: feed it byte chunks of any size, get frames.

use super::{cobs, crc, DeviceMessage, HostCommand, ParseError};
use super::{CRC_LEN, HEADER_LEN, MAX_RAW_FRAME, MAX_WIRE_FRAME};

/// A frame that passed COBS decoding and its CRC. The body borrows the
/// decoder's buffer; it is valid until the next byte is fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub msg_type: u8,
    pub flags: u8,
    pub seq: u16,
    pub body: &'a [u8],
}

impl<'a> Frame<'a> {
    /// The frame as a device -> host message.
    pub fn device_message(&self) -> Result<DeviceMessage<'a>, ParseError> {
        DeviceMessage::parse(self.msg_type, self.body)
    }

    /// The frame as a host -> device command.
    pub fn host_command(&self) -> Result<HostCommand, ParseError> {
        HostCommand::parse(self.msg_type, self.body)
    }
}

/// What the decoder has seen. All counters are totals since creation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecoderStats {
    /// Bytes fed in.
    pub bytes_in: u64,
    /// Frames that passed COBS and CRC and were handed on.
    pub frames_ok: u64,
    /// Frames discarded, for any of the reasons counted below.
    pub frames_dropped: u64,
    /// Bytes of discarded frames (delimiters included).
    pub bytes_dropped: u64,
    /// Frames whose CRC did not match.
    pub crc_errors: u64,
    /// Frames that were not valid COBS.
    pub cobs_errors: u64,
    /// Frames longer than the largest legal frame.
    pub oversize: u64,
    /// Frames too short to hold a header and a CRC.
    pub runts: u64,
}

/// Streaming decoder. It holds one frame's worth of bytes in a fixed buffer,
/// never allocates, and never panics on any input: a corrupted, truncated or
/// oversized frame is counted and dropped, and decoding resumes at the next
/// 0x00 delimiter. Empty frames (consecutive delimiters) are ignored, so a
/// sender may emit a 0x00 at any time to end a partial frame at the receiver.
#[derive(Debug, Clone)]
pub struct Decoder {
    buf: [u8; MAX_WIRE_FRAME],
    len: usize,
    /// The current frame overflowed the buffer; drop bytes until a delimiter.
    discarding: bool,
    discarded: u64,
    stats: DecoderStats,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub const fn new() -> Self {
        Self {
            buf: [0; MAX_WIRE_FRAME],
            len: 0,
            discarding: false,
            discarded: 0,
            stats: DecoderStats {
                bytes_in: 0,
                frames_ok: 0,
                frames_dropped: 0,
                bytes_dropped: 0,
                crc_errors: 0,
                cobs_errors: 0,
                oversize: 0,
                runts: 0,
            },
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> DecoderStats {
        self.stats
    }

    /// Bytes of an unfinished frame held from earlier chunks.
    pub fn pending(&self) -> usize {
        self.len
    }

    /// Forget any partial frame (e.g. after the port was reopened). The
    /// forgotten bytes are not counted as dropped.
    pub fn reset(&mut self) {
        self.len = 0;
        self.discarding = false;
        self.discarded = 0;
    }

    /// Feed a chunk of bytes; `on_frame` is called for every complete, intact
    /// frame, in order.
    pub fn feed(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(Frame<'_>)) {
        self.stats.bytes_in += bytes.len() as u64;
        while !bytes.is_empty() {
            let (chunk, delimited) = match bytes.iter().position(|&b| b == 0) {
                Some(i) => (&bytes[..i], true),
                None => (bytes, false),
            };
            self.append(chunk);
            bytes = &bytes[chunk.len() + usize::from(delimited)..];
            if delimited {
                self.end_frame(&mut on_frame);
            }
        }
    }

    fn append(&mut self, chunk: &[u8]) {
        if self.discarding {
            self.discarded += chunk.len() as u64;
            return;
        }
        let room = self.buf.len() - self.len;
        if chunk.len() > room {
            self.discarding = true;
            self.discarded = (self.len + chunk.len()) as u64;
            self.len = 0;
            return;
        }
        self.buf[self.len..self.len + chunk.len()].copy_from_slice(chunk);
        self.len += chunk.len();
    }

    fn drop_frame(&mut self, bytes: u64) {
        self.stats.frames_dropped += 1;
        self.stats.bytes_dropped += bytes + 1; // + the delimiter
    }

    fn end_frame(&mut self, on_frame: &mut impl FnMut(Frame<'_>)) {
        if self.discarding {
            self.stats.oversize += 1;
            let n = self.discarded;
            self.drop_frame(n);
            self.discarding = false;
            self.discarded = 0;
            return;
        }
        let encoded_len = self.len;
        self.len = 0;
        if encoded_len == 0 {
            return; // an empty frame: a deliberate resync delimiter
        }
        let raw_len = match cobs::decode_in_place(&mut self.buf[..encoded_len]) {
            Ok(n) => n,
            Err(_) => {
                self.stats.cobs_errors += 1;
                self.drop_frame(encoded_len as u64);
                return;
            }
        };
        if raw_len < HEADER_LEN + CRC_LEN {
            self.stats.runts += 1;
            self.drop_frame(encoded_len as u64);
            return;
        }
        if raw_len > MAX_RAW_FRAME {
            self.stats.oversize += 1;
            self.drop_frame(encoded_len as u64);
            return;
        }
        let crc_at = raw_len - CRC_LEN;
        let want = u16::from_le_bytes([self.buf[crc_at], self.buf[crc_at + 1]]);
        if crc::crc16(&self.buf[..crc_at]) != want {
            self.stats.crc_errors += 1;
            self.drop_frame(encoded_len as u64);
            return;
        }
        self.stats.frames_ok += 1;
        on_frame(Frame {
            msg_type: self.buf[0],
            flags: self.buf[1],
            seq: u16::from_le_bytes([self.buf[2], self.buf[3]]),
            body: &self.buf[HEADER_LEN..crc_at],
        });
    }
}
