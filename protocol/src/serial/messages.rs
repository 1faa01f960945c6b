//! Message bodies. Every body is a packed little-endian struct with no padding
//! (the wire structs are `Unaligned`), so firmware can read and write it byte by
//! byte. Each message is defined once below; the macro derives both the plain
//! Rust struct the application uses and its zerocopy wire struct.

use zerocopy::little_endian as le;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::ParseError;

macro_rules! wire_ty {
    (u8) => {
        u8
    };
    (u16) => {
        le::U16
    };
    (u32) => {
        le::U32
    };
    (u64) => {
        le::U64
    };
    (i32) => {
        le::I32
    };
}

macro_rules! messages {
    ($(
        $(#[$meta:meta])*
        $name:ident ($wire:ident) = $id:literal {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ident ),* $(,)?
        }
    )*) => {$(
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct $name { $( $(#[$fmeta])* pub $field: $ty ),* }

        #[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
        #[repr(C)]
        struct $wire { $( $field: wire_ty!($ty) ),* }

        impl $name {
            /// The message type byte.
            pub const TYPE: u8 = $id;
            /// Length of the body in bytes.
            pub const BODY_LEN: usize = ::core::mem::size_of::<$wire>();

            /// Write the body to the start of `out` (which must have room); returns its length.
            pub(crate) fn write_body(&self, out: &mut [u8]) -> usize {
                let wire = $wire { $( $field: self.$field.into() ),* };
                out[..Self::BODY_LEN].copy_from_slice(wire.as_bytes());
                Self::BODY_LEN
            }

            /// Parse a body. Longer bodies are accepted (fields appended by a
            /// later minor protocol revision are ignored); shorter are refused.
            pub fn read_body(body: &[u8]) -> Result<Self, ParseError> {
                let (wire, _) = $wire::read_from_prefix(body).map_err(|_| ParseError::TooShort {
                    msg_type: $id,
                    need: Self::BODY_LEN,
                    got: body.len(),
                })?;
                Ok(Self { $( $field: wire.$field.into() ),* })
            }
        }
    )*};
}

messages! {
    /// Device -> host, sent at boot, after `Reset`, and in answer to nothing
    /// else. The host refuses the device unless `protocol_version` equals
    /// [`super::PROTOCOL_VERSION`]. `protocol_version` is the first field in
    /// every version of the protocol, so any host can read it.
    Hello (HelloWire) = 0x01 {
        protocol_version: u16,
        firmware_major: u8,
        firmware_minor: u8,
        firmware_patch: u8,
        /// A number unique to the board (serial number or chip id).
        device_id: u64,
        /// Ticks per second of the device clock; 1_000_000 (µs) in version 1.
        clock_hz: u32,
        /// Bit set of [`capability`] flags.
        capabilities: u32,
        max_sample_rate_hz: u32,
        /// The firmware's compile-time cap on any valve opening; `Configure`
        /// can lower the cap, never raise it.
        hard_max_valve_open_ms: u16,
        /// Device clock when the Hello was sent.
        t_us: u32,
    }

    /// Device -> host: the fixed part of a `LeverSamples` body; `count`
    /// little-endian i32 encoder counts follow it.
    LeverBatchHeader (LeverBatchHeaderWire) = 0x02 {
        /// Index of the first sample since streaming started (wraps at 2^32).
        /// The next batch starts at `first_index + count`; anything else is a gap.
        first_index: u32,
        /// Device time of the first sample; sample i is at `t_first_us + i * period_us`.
        t_first_us: u32,
        period_us: u16,
        count: u8,
    }

    /// Device -> host: something happened at a device time.
    Event (EventWire) = 0x03 {
        t_us: u32,
        /// An [`EventKind`] code.
        kind: u8,
        /// Kind-specific small value (a cause code; see [`EventKind`]).
        aux: u16,
        /// Kind-specific value (see [`EventKind`]).
        value: u32,
    }

    /// Device -> host: the answer to `Ping`, with device times of the ping's
    /// arrival and of the pong's departure, for clock synchronisation.
    Pong (PongWire) = 0x04 {
        ping_seq: u16,
        t_rx_us: u32,
        t_tx_us: u32,
    }

    /// Device -> host: the answer to every host command except `Ping`.
    Ack (AckWire) = 0x05 {
        acked_seq: u16,
        acked_type: u8,
        /// An [`AckStatus`] code.
        status: u8,
        /// Device time the command took effect (or was refused).
        t_us: u32,
    }

    /// Device -> host: an error the device noticed.
    Fault (FaultWire) = 0x06 {
        t_us: u32,
        /// A [`FaultCode`].
        code: u16,
        detail: u32,
    }

    /// Device -> host, every `heartbeat_interval_ms` (set by `Configure`;
    /// 1000 ms before the first `Configure`).
    Heartbeat (HeartbeatWire) = 0x07 {
        t_us: u32,
        /// Bit set of [`state`] flags.
        state: u8,
        /// Index the next lever sample will get.
        next_sample_index: u32,
        /// Samples the device had to drop (its transmit buffer was full), since boot.
        samples_dropped: u32,
        /// Host frames the device discarded (bad CRC, COBS or length), since boot.
        rx_frames_bad: u32,
        /// Device frames it could not send (transmit buffer full), since boot.
        tx_frames_dropped: u32,
    }

    /// Device -> host (protocol version 2): an armed reward fired. The device
    /// saw the lever cross the armed threshold and opened the valve for the
    /// armed `pulse_us` (a `ValveOpen` event with the same time follows).
    RewardFired (RewardFiredWire) = 0x08 {
        /// The `trial_tag` of the `ArmReward` that fired.
        trial_tag: u32,
        /// Index of the first lever sample taken at or after the crossing: the
        /// sample that shows it (the next one the stream will carry when the
        /// crossing was seen between two samples).
        sample_index: u32,
        /// Device time of the crossing (the encoder update that crossed).
        t_cross_us: u32,
        /// Device time the valve was opened.
        t_valve_us: u32,
        /// Encoder count that crossed the threshold.
        counts: i32,
        /// The valve opening commanded, µs.
        pulse_us: u32,
    }

    /// Device -> host (protocol version 2): an armed reward ended without
    /// firing. Every arm ends in exactly one `RewardFired` or one `RewardEnded`.
    RewardEnded (RewardEndedWire) = 0x09 {
        trial_tag: u32,
        t_us: u32,
        /// A [`disarm_reason`] code.
        reason: u8,
        /// Lever samples with a lower index were all checked against the
        /// threshold while armed.
        next_sample_index: u32,
    }

    /// Host -> device: set up and start (or, with `sample_rate_hz = 0`, stop)
    /// the lever stream, and set the safety limits.
    Configure (ConfigureWire) = 0x82 {
        /// Must divide 1_000_000; 0 stops streaming.
        sample_rate_hz: u32,
        /// 1..=MAX_SAMPLES_PER_BATCH.
        samples_per_batch: u8,
        heartbeat_interval_ms: u16,
        /// The device goes to its safe state when no valid host frame arrived
        /// for this long. 0 is refused.
        heartbeat_timeout_ms: u16,
        /// Cap on a reward pulse; at most the Hello's `hard_max_valve_open_ms`.
        max_valve_open_ms: u16,
        /// Cap on a `ValveOpen` (flush).
        max_flush_ms: u16,
    }

    /// Host -> device (protocol version 2): arm a reward. From now until
    /// `window_end_us` the device checks every encoder update; the first one
    /// that crosses the threshold (after the lever was below the re-arm point)
    /// opens the valve for `pulse_us`, at once, and ends the arm. Answered by an
    /// `Ack`, later by exactly one `RewardFired` or `RewardEnded`.
    ArmReward (ArmRewardWire) = 0x8B {
        /// The host's tag for this arm (the trial number), echoed in the events.
        trial_tag: u32,
        /// Encoder count of the lever's rest position; the threshold counts from it.
        rest_counts: i32,
        /// Crossing: the lever `threshold_counts` or more from rest, in `direction`. >= 1.
        threshold_counts: u32,
        /// Before a crossing counts the lever must be less than this far from
        /// rest, in `direction` (hysteresis, as the host's re-arm point).
        /// Less than `threshold_counts`. A lever already past it when the arm
        /// arrives must come back below it first.
        rearm_counts: u32,
        /// A [`direction`] code.
        direction: u8,
        /// Device time the arm expires (a crossing at or after it never fires).
        window_end_us: u32,
        /// Valve opening on a crossing, µs; at most `max_valve_open_ms`.
        pulse_us: u32,
    }

    /// Host -> device (protocol version 2): disarm the reward armed with
    /// `trial_tag`, if it is still armed (`RewardEnded`, reason host).
    Disarm (DisarmWire) = 0x8C {
        trial_tag: u32,
    }

    /// Host -> device: play the cue tone.
    Tone (ToneWire) = 0x83 {
        frequency_hz: u32,
        duration_ms: u16,
        /// 0..=100.
        level_pct: u8,
    }

    /// Host -> device: open the valve for `duration_us`, then close it.
    ValvePulse (ValvePulseWire) = 0x85 {
        duration_us: u32,
    }

    /// Host -> device: open the valve for flushing; it closes after
    /// `min(max_ms, max_flush_ms)` or on `ValveClose`.
    ValveOpen (ValveOpenWire) = 0x86 {
        max_ms: u16,
    }

    /// Host -> device: drive the sync-out line (see [`sync_mode`]).
    SyncOut (SyncOutWire) = 0x88 {
        mode: u8,
        /// Bits in a bitcode (1..=32), most significant first.
        nbits: u8,
        /// Length of the start pulse, of each bit and of each gap, in µs.
        unit_us: u16,
        value: u32,
    }
}

/// Bits of `Hello::capabilities`.
pub mod capability {
    pub const LEVER: u32 = 1 << 0;
    pub const LICK: u32 = 1 << 1;
    pub const VALVE: u32 = 1 << 2;
    pub const TONE: u32 = 1 << 3;
    pub const FRAME_TTL: u32 = 1 << 4;
    pub const SYNC_OUT: u32 = 1 << 5;
}

/// Bits of `Heartbeat::state`.
pub mod state {
    pub const STREAMING: u8 = 1 << 0;
    pub const VALVE_OPEN: u8 = 1 << 1;
    pub const TONE_ON: u8 = 1 << 2;
    /// Outputs forced off because the host's heartbeat stopped (or never came).
    pub const SAFE: u8 = 1 << 3;
    pub const SYNC_BUSY: u8 = 1 << 4;
}

/// Values of `SyncOut::mode`.
pub mod sync_mode {
    /// One high pulse of `unit_us`.
    pub const PULSE: u8 = 0;
    /// A start pulse of `unit_us`, a gap of `unit_us`, then `nbits` bits of
    /// `value`, most significant first, each a `unit_us` slot (high for 1, low
    /// for 0) followed by a `unit_us` low gap.
    pub const BITCODE: u8 = 1;
}

/// Values of `ArmReward::direction`.
pub mod direction {
    /// The crossing is `counts - rest_counts >= threshold_counts` (a press
    /// moves the lever up, the rig's convention).
    pub const UP: u8 = 0;
    /// The crossing is `rest_counts - counts >= threshold_counts`.
    pub const DOWN: u8 = 1;
}

/// Values of `RewardEnded::reason`.
pub mod disarm_reason {
    /// The window ended (`window_end_us` reached) without a crossing.
    pub const EXPIRED: u8 = 0;
    /// The host sent `Disarm`.
    pub const HOST: u8 = 1;
    /// The host watchdog tripped (safe state): no reward without a host.
    pub const WATCHDOG: u8 = 2;
    /// `Reset`.
    pub const RESET: u8 = 3;
    /// `Configure` (the stream restarted or the caps changed).
    pub const CONFIGURE: u8 = 4;
    /// The lever crossed but the valve was already open (a flush or a host
    /// pulse): nothing fired.
    pub const VALVE_BUSY: u8 = 5;
}

/// Causes carried in `Event::aux` for `ValveClose`, `ToneOff` and `SafeState`.
pub mod cause {
    /// The commanded duration ended.
    pub const COMPLETED: u16 = 0;
    /// A host command (`ValveClose`, `ToneOff`).
    pub const COMMAND: u16 = 1;
    /// The device's cap on open time was reached.
    pub const CAP: u16 = 2;
    /// The host heartbeat stopped.
    pub const WATCHDOG: u16 = 3;
    /// `Reset` or boot.
    pub const RESET: u16 = 4;
}

macro_rules! code_enum {
    ($(#[$meta:meta])* $name:ident : $repr:ty { $( $(#[$vmeta:meta])* $variant:ident = $val:literal ),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
            /// A code this version does not know.
            Unknown($repr),
        }
        impl From<$repr> for $name {
            fn from(v: $repr) -> Self {
                match v { $( $val => Self::$variant, )* other => Self::Unknown(other) }
            }
        }
        impl From<$name> for $repr {
            fn from(v: $name) -> $repr {
                match v { $( $name::$variant => $val, )* $name::Unknown(other) => other }
            }
        }
    };
}

code_enum! {
    /// `Event::kind`. `value` and `aux` per kind are given on each variant.
    EventKind: u8 {
        /// Lick sensor touched. value: lick count since boot.
        LickOn = 1,
        /// Lick sensor released.
        LickOff = 2,
        /// Rising edge on the frame-clock TTL input. value: edges since boot.
        FrameTtl = 3,
        /// Valve opened. value: commanded duration µs (0 for a flush).
        ValveOpen = 4,
        /// Valve closed. value: how long it was open, µs; aux: a [`cause`].
        ValveClose = 5,
        /// Tone started. value: frequency Hz.
        ToneOn = 6,
        /// Tone stopped. aux: a [`cause`].
        ToneOff = 7,
        /// Sync-out sequence started (first rising edge). value: the code sent.
        SyncOutStart = 8,
        /// Sync-out sequence finished (line low again). value: the code sent.
        SyncOutEnd = 9,
        /// Outputs forced safe. aux: a [`cause`].
        SafeState = 10,
        /// The host heartbeat is back; commands are obeyed again.
        SafeStateCleared = 11,
    }
}

code_enum! {
    /// `Ack::status`.
    AckStatus: u8 {
        Ok = 0,
        /// The body was too short for the command.
        BadLength = 1,
        /// A field was out of range (e.g. a sample rate that does not divide 1 MHz).
        BadValue = 2,
        /// Refused for safety (a pulse over the cap, a command during the safe state).
        Refused = 3,
        /// The output is busy (e.g. a sync-out sequence in progress).
        Busy = 4,
        /// The command type is unknown to this firmware.
        UnknownCommand = 5,
    }
}

code_enum! {
    /// `Fault::code`.
    FaultCode: u16 {
        /// The device dropped lever samples. detail: how many.
        SamplesDropped = 1,
        /// The device discarded a host frame. detail: bad frames since boot.
        RxFrameBad = 2,
        /// The host heartbeat stopped; outputs are safe. detail: ms since the last frame.
        WatchdogTripped = 3,
        /// A valve opening hit the cap and was cut. detail: the cap in ms.
        ValveCapTripped = 4,
        /// The device could not send a frame. detail: frames dropped since boot.
        TxOverflow = 5,
    }
}

/// Device -> host lever samples: a batch of consecutive encoder readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeverSamples<'a> {
    pub first_index: u32,
    pub t_first_us: u32,
    pub period_us: u16,
    counts: &'a [le::I32],
}

impl<'a> LeverSamples<'a> {
    /// The message type byte.
    pub const TYPE: u8 = LeverBatchHeader::TYPE;

    pub(crate) fn read_body(body: &'a [u8]) -> Result<Self, ParseError> {
        let header = LeverBatchHeader::read_body(body)?;
        let n = usize::from(header.count);
        let rest = &body[LeverBatchHeader::BODY_LEN..];
        if n == 0 || n > super::MAX_SAMPLES_PER_BATCH || rest.len() < 4 * n {
            return Err(ParseError::BadCount {
                count: header.count,
                bytes: rest.len(),
            });
        }
        let counts =
            <[le::I32]>::ref_from_bytes(&rest[..4 * n]).map_err(|_| ParseError::BadCount {
                count: header.count,
                bytes: rest.len(),
            })?;
        Ok(Self {
            first_index: header.first_index,
            t_first_us: header.t_first_us,
            period_us: header.period_us,
            counts,
        })
    }

    /// Number of samples in the batch (1..=MAX_SAMPLES_PER_BATCH).
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// Always false for a decoded batch; present for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Encoder count of sample `i`.
    pub fn count(&self, i: usize) -> Option<i32> {
        self.counts.get(i).map(|c| c.get())
    }

    /// The samples as `(index, t_us, counts)`, on the device's 32-bit clock.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u32, i32)> + 'a {
        let (first, t0, period) = (self.first_index, self.t_first_us, u32::from(self.period_us));
        self.counts.iter().enumerate().map(move |(i, c)| {
            let i = i as u32;
            (
                first.wrapping_add(i),
                t0.wrapping_add(i.wrapping_mul(period)),
                c.get(),
            )
        })
    }

    fn header(&self) -> LeverBatchHeader {
        LeverBatchHeader {
            first_index: self.first_index,
            t_first_us: self.t_first_us,
            period_us: self.period_us,
            count: self.counts.len() as u8,
        }
    }

    pub(crate) fn write_body(&self, out: &mut [u8]) -> usize {
        let n = self.header().write_body(out);
        let bytes = self.counts.as_bytes();
        out[n..n + bytes.len()].copy_from_slice(bytes);
        n + bytes.len()
    }
}
