//! Serial framing between host and device (the microcontroller).
//!
//! A frame on the wire is `0x00 COBS(raw) 0x00`, where `raw` is
//! `type:u8 flags:u8 seq:u16le body… crc:u16le` and the CRC
//! (CRC-16/CCITT-FALSE) covers everything before it. Message types 0x01..=0x7F
//! go device -> host, 0x80..=0xFF host -> device. Host commands carry the
//! host's command sequence number, which the device echoes in an [`Ack`] (or a
//! [`Pong`] for a `Ping`); device frames carry the device's own transmit
//! sequence number, so the host can count frames lost on the line.
//! The byte-level specification is `docs/protocol.md`, section 1.

pub mod cobs;
pub mod crc;
mod decoder;
mod messages;

pub use decoder::{Decoder, DecoderStats, Frame};
pub use messages::{
    capability, cause, direction, disarm_reason, state, sync_mode, Ack, AckStatus, ArmReward,
    Configure, Disarm, Event, EventKind, Fault, FaultCode, Heartbeat, Hello, LeverBatchHeader,
    LeverSamples, Pong, RewardEnded, RewardFired, SyncOut, Tone, ValveOpen, ValvePulse,
};

/// Protocol version exchanged in `Hello`. A host talks only to a device with
/// the same version. Version 2 added the device-armed reward (`ArmReward`,
/// `Disarm`, `RewardFired`, `RewardEnded`).
pub const PROTOCOL_VERSION: u16 = 2;

/// Bytes of frame header before the body: type (u8), flags (u8), seq (u16 LE).
pub const HEADER_LEN: usize = 4;
/// Bytes of CRC after the body.
pub const CRC_LEN: usize = 2;
/// Bytes of the `LeverSamples` body before the samples.
pub const LEVER_BATCH_HEADER_LEN: usize = LeverBatchHeader::BODY_LEN;
/// Most lever samples one `LeverSamples` frame may carry.
pub const MAX_SAMPLES_PER_BATCH: usize = 50;
/// Largest unencoded frame (header + body + CRC). Longer frames are dropped.
pub const MAX_RAW_FRAME: usize = 256;
/// Largest frame on the wire, COBS overhead and delimiter included.
pub const MAX_WIRE_FRAME: usize = wire_len(MAX_RAW_FRAME);

/// Type bytes of the host commands that have no body.
pub mod host_type {
    pub const PING: u8 = 0x81;
    pub const CONFIGURE: u8 = super::Configure::TYPE;
    pub const TONE: u8 = super::Tone::TYPE;
    pub const TONE_OFF: u8 = 0x84;
    pub const VALVE_PULSE: u8 = super::ValvePulse::TYPE;
    pub const VALVE_OPEN: u8 = super::ValveOpen::TYPE;
    pub const VALVE_CLOSE: u8 = 0x87;
    pub const SYNC_OUT: u8 = super::SyncOut::TYPE;
    pub const HOST_HEARTBEAT: u8 = 0x89;
    pub const RESET: u8 = 0x8A;
    pub const ARM_REWARD: u8 = super::ArmReward::TYPE;
    pub const DISARM: u8 = super::Disarm::TYPE;
}

/// Worst-case bytes on the wire for one frame whose unencoded length
/// (header + body + CRC) is `raw_len`: COBS adds one byte per started 254-byte
/// block, and a 0x00 delimiter both starts and ends the frame. The leading
/// delimiter costs one byte and means bytes inserted between frames (line
/// noise, a half-sent frame from before a reset) can never take the next
/// frame down with them.
pub const fn wire_len(raw_len: usize) -> usize {
    cobs::max_encoded_len(raw_len) + 2
}

/// Bytes per second the lever stream alone puts on the serial line at
/// `sample_rate_hz`, with `samples_per_batch` samples in each `LeverSamples`
/// frame. Used by the configuration to check that the baud rate can carry it.
pub fn lever_stream_bytes_per_s(sample_rate_hz: u32, samples_per_batch: u32) -> f64 {
    let n = samples_per_batch.max(1) as usize;
    let raw = HEADER_LEN + LEVER_BATCH_HEADER_LEN + 4 * n + CRC_LEN;
    f64::from(sample_rate_hz) / n as f64 * wire_len(raw) as f64
}

/// Why a frame's body could not be turned into a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    #[error("message type 0x{msg_type:02x} needs a {need}-byte body, got {got}")]
    TooShort {
        msg_type: u8,
        need: usize,
        got: usize,
    },
    #[error("lever batch says {count} samples but carries {bytes} bytes of samples")]
    BadCount { count: u8, bytes: usize },
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("output buffer holds {have} bytes, the frame needs up to {need}")]
    BufferTooSmall { need: usize, have: usize },
    #[error("a lever batch holds 1..={MAX_SAMPLES_PER_BATCH} samples, not {0}")]
    BadBatch(usize),
}

/// A message from the device to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceMessage<'a> {
    Hello(Hello),
    LeverSamples(LeverSamples<'a>),
    Event(Event),
    Pong(Pong),
    Ack(Ack),
    Fault(Fault),
    Heartbeat(Heartbeat),
    RewardFired(RewardFired),
    RewardEnded(RewardEnded),
}

impl<'a> DeviceMessage<'a> {
    /// Interpret a frame's type and body as a device message.
    pub fn parse(msg_type: u8, body: &'a [u8]) -> Result<Self, ParseError> {
        Ok(match msg_type {
            Hello::TYPE => Self::Hello(Hello::read_body(body)?),
            LeverSamples::TYPE => Self::LeverSamples(LeverSamples::read_body(body)?),
            Event::TYPE => Self::Event(Event::read_body(body)?),
            Pong::TYPE => Self::Pong(Pong::read_body(body)?),
            Ack::TYPE => Self::Ack(Ack::read_body(body)?),
            Fault::TYPE => Self::Fault(Fault::read_body(body)?),
            Heartbeat::TYPE => Self::Heartbeat(Heartbeat::read_body(body)?),
            RewardFired::TYPE => Self::RewardFired(RewardFired::read_body(body)?),
            RewardEnded::TYPE => Self::RewardEnded(RewardEnded::read_body(body)?),
            other => return Err(ParseError::UnknownType(other)),
        })
    }

    /// The message type byte.
    pub fn msg_type(&self) -> u8 {
        match self {
            Self::Hello(_) => Hello::TYPE,
            Self::LeverSamples(_) => LeverSamples::TYPE,
            Self::Event(_) => Event::TYPE,
            Self::Pong(_) => Pong::TYPE,
            Self::Ack(_) => Ack::TYPE,
            Self::Fault(_) => Fault::TYPE,
            Self::Heartbeat(_) => Heartbeat::TYPE,
            Self::RewardFired(_) => RewardFired::TYPE,
            Self::RewardEnded(_) => RewardEnded::TYPE,
        }
    }

    /// Encode as a complete wire frame (COBS and delimiter included) into
    /// `out`, which needs [`MAX_WIRE_FRAME`] bytes. Returns the length written.
    pub fn encode(&self, seq: u16, out: &mut [u8]) -> Result<usize, EncodeError> {
        encode_frame(self.msg_type(), seq, out, |body| match self {
            Self::Hello(m) => m.write_body(body),
            Self::LeverSamples(m) => m.write_body(body),
            Self::Event(m) => m.write_body(body),
            Self::Pong(m) => m.write_body(body),
            Self::Ack(m) => m.write_body(body),
            Self::Fault(m) => m.write_body(body),
            Self::Heartbeat(m) => m.write_body(body),
            Self::RewardFired(m) => m.write_body(body),
            Self::RewardEnded(m) => m.write_body(body),
        })
    }
}

/// Encode a `LeverSamples` frame from native encoder counts (what a device or
/// the virtual rig sends).
pub fn encode_lever_samples(
    seq: u16,
    first_index: u32,
    t_first_us: u32,
    period_us: u16,
    counts: &[i32],
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    if counts.is_empty() || counts.len() > MAX_SAMPLES_PER_BATCH {
        return Err(EncodeError::BadBatch(counts.len()));
    }
    let header = LeverBatchHeader {
        first_index,
        t_first_us,
        period_us,
        count: counts.len() as u8,
    };
    encode_frame(LeverSamples::TYPE, seq, out, |body| {
        let mut n = header.write_body(body);
        for c in counts {
            body[n..n + 4].copy_from_slice(&c.to_le_bytes());
            n += 4;
        }
        n
    })
}

/// A command from the host to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCommand {
    Ping,
    Configure(Configure),
    Tone(Tone),
    ToneOff,
    ValvePulse(ValvePulse),
    ValveOpen(ValveOpen),
    ValveClose,
    SyncOut(SyncOut),
    HostHeartbeat,
    Reset,
    ArmReward(ArmReward),
    Disarm(Disarm),
}

impl HostCommand {
    /// Interpret a frame's type and body as a host command.
    pub fn parse(msg_type: u8, body: &[u8]) -> Result<Self, ParseError> {
        Ok(match msg_type {
            host_type::PING => Self::Ping,
            host_type::CONFIGURE => Self::Configure(Configure::read_body(body)?),
            host_type::TONE => Self::Tone(Tone::read_body(body)?),
            host_type::TONE_OFF => Self::ToneOff,
            host_type::VALVE_PULSE => Self::ValvePulse(ValvePulse::read_body(body)?),
            host_type::VALVE_OPEN => Self::ValveOpen(ValveOpen::read_body(body)?),
            host_type::VALVE_CLOSE => Self::ValveClose,
            host_type::SYNC_OUT => Self::SyncOut(SyncOut::read_body(body)?),
            host_type::HOST_HEARTBEAT => Self::HostHeartbeat,
            host_type::RESET => Self::Reset,
            host_type::ARM_REWARD => Self::ArmReward(ArmReward::read_body(body)?),
            host_type::DISARM => Self::Disarm(Disarm::read_body(body)?),
            other => return Err(ParseError::UnknownType(other)),
        })
    }

    /// The message type byte.
    pub fn msg_type(&self) -> u8 {
        match self {
            Self::Ping => host_type::PING,
            Self::Configure(_) => host_type::CONFIGURE,
            Self::Tone(_) => host_type::TONE,
            Self::ToneOff => host_type::TONE_OFF,
            Self::ValvePulse(_) => host_type::VALVE_PULSE,
            Self::ValveOpen(_) => host_type::VALVE_OPEN,
            Self::ValveClose => host_type::VALVE_CLOSE,
            Self::SyncOut(_) => host_type::SYNC_OUT,
            Self::HostHeartbeat => host_type::HOST_HEARTBEAT,
            Self::Reset => host_type::RESET,
            Self::ArmReward(_) => host_type::ARM_REWARD,
            Self::Disarm(_) => host_type::DISARM,
        }
    }

    /// Encode as a complete wire frame into `out` (needs [`MAX_WIRE_FRAME`]
    /// bytes). Returns the length written.
    pub fn encode(&self, seq: u16, out: &mut [u8]) -> Result<usize, EncodeError> {
        encode_frame(self.msg_type(), seq, out, |body| match self {
            Self::Configure(m) => m.write_body(body),
            Self::Tone(m) => m.write_body(body),
            Self::ValvePulse(m) => m.write_body(body),
            Self::ValveOpen(m) => m.write_body(body),
            Self::SyncOut(m) => m.write_body(body),
            Self::ArmReward(m) => m.write_body(body),
            Self::Disarm(m) => m.write_body(body),
            Self::Ping | Self::ToneOff | Self::ValveClose | Self::HostHeartbeat | Self::Reset => 0,
        })
    }
}

/// Assemble `type flags seq body crc`, COBS-encode it into `out` and append
/// the delimiter. `write_body` fills the body (at most the room a
/// `MAX_RAW_FRAME` leaves) and returns its length.
fn encode_frame(
    msg_type: u8,
    seq: u16,
    out: &mut [u8],
    write_body: impl FnOnce(&mut [u8]) -> usize,
) -> Result<usize, EncodeError> {
    if out.len() < MAX_WIRE_FRAME {
        return Err(EncodeError::BufferTooSmall {
            need: MAX_WIRE_FRAME,
            have: out.len(),
        });
    }
    let mut raw = [0u8; MAX_RAW_FRAME];
    raw[0] = msg_type;
    raw[1] = 0; // flags: reserved, always 0 in version 1
    raw[2..4].copy_from_slice(&seq.to_le_bytes());
    let body_len = write_body(&mut raw[HEADER_LEN..MAX_RAW_FRAME - CRC_LEN]);
    let crc_at = HEADER_LEN + body_len;
    let crc = crc::crc16(&raw[..crc_at]);
    raw[crc_at..crc_at + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    let raw_len = crc_at + CRC_LEN;
    // `out` holds MAX_WIRE_FRAME bytes, enough for any raw frame.
    out[0] = 0;
    let n = cobs::encode(&raw[..raw_len], &mut out[1..]).ok_or(EncodeError::BufferTooSmall {
        need: wire_len(raw_len),
        have: out.len(),
    })?;
    out[n + 1] = 0;
    Ok(n + 2)
}
