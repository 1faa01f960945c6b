/*
 * rigproto: the rig serial protocol (docs/protocol.md, section 1) in portable C99.
 *
 * Compiles with the host gcc (for the tests) and with avr-gcc (for the
 * firmware). No malloc, no floating point, no packed structs and no reliance
 * on the host's byte order: every body is packed and unpacked byte by byte,
 * little-endian. Written with a 16-bit `int` in mind (AVR): every arithmetic
 * that can exceed 16 bits is done on explicitly widened operands.
 *
 * The Rust `protocol` crate (protocol/src/serial/) is the reference
 * implementation; protocol/tests/vectors/serial.tsv holds golden frames that
 * firmware/test/test_rigproto.c decodes and re-encodes byte for byte.
 *
 * Wire format:   wire = COBS(raw) 0x00
 *                raw  = type:u8 flags:u8 seq:u16 body[0..=250] crc:u16
 */
#ifndef RIGPROTO_H
#define RIGPROTO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- sizes ------------------------------------------------------------- */

#define RP_PROTOCOL_VERSION 2u
#define RP_CLOCK_HZ 1000000ul
#define RP_HEADER_LEN 4u   /* type, flags, seq */
#define RP_CRC_LEN 2u
#define RP_MAX_RAW_FRAME 256u /* header + body + crc */
#define RP_MAX_BODY (RP_MAX_RAW_FRAME - RP_HEADER_LEN - RP_CRC_LEN) /* 250 */
/* COBS adds one byte per started 254 bytes; plus the 0x00 delimiter. */
#define RP_COBS_MAX_ENCODED(n) ((n) + (n) / 254u + 1u)
#define RP_MAX_WIRE_FRAME (RP_COBS_MAX_ENCODED(RP_MAX_RAW_FRAME) + 2u) /* 260: 0x00 COBS 0x00 */
/* The receive buffer holds the COBS bytes of one frame (no delimiter). Same
 * size as the Rust decoder's buffer, so both drop exactly the same frames. */
#define RP_DECODER_BUF RP_MAX_WIRE_FRAME
#define RP_MAX_SAMPLES_PER_BATCH 50u

/* ---- message types ----------------------------------------------------- */

/* device -> host */
#define RP_T_HELLO 0x01u
#define RP_T_LEVER_SAMPLES 0x02u
#define RP_T_EVENT 0x03u
#define RP_T_PONG 0x04u
#define RP_T_ACK 0x05u
#define RP_T_FAULT 0x06u
#define RP_T_HEARTBEAT 0x07u
#define RP_T_REWARD_FIRED 0x08u /* version 2 */
#define RP_T_REWARD_ENDED 0x09u /* version 2 */
/* host -> device */
#define RP_T_PING 0x81u
#define RP_T_CONFIGURE 0x82u
#define RP_T_TONE 0x83u
#define RP_T_TONE_OFF 0x84u
#define RP_T_VALVE_PULSE 0x85u
#define RP_T_VALVE_OPEN 0x86u
#define RP_T_VALVE_CLOSE 0x87u
#define RP_T_SYNC_OUT 0x88u
#define RP_T_HOST_HEARTBEAT 0x89u
#define RP_T_RESET 0x8Au
#define RP_T_ARM_REWARD 0x8Bu /* version 2 */
#define RP_T_DISARM 0x8Cu     /* version 2 */

/* ---- body lengths (bytes) ---------------------------------------------- */

#define RP_HELLO_LEN 31u
#define RP_LEVER_HEADER_LEN 11u /* + 4 * count */
#define RP_EVENT_LEN 11u
#define RP_PONG_LEN 10u
#define RP_ACK_LEN 8u
#define RP_FAULT_LEN 10u
#define RP_HEARTBEAT_LEN 21u
#define RP_CONFIGURE_LEN 13u
#define RP_TONE_LEN 7u
#define RP_VALVE_PULSE_LEN 4u
#define RP_VALVE_OPEN_LEN 2u
#define RP_SYNC_OUT_LEN 8u
#define RP_REWARD_FIRED_LEN 24u
#define RP_REWARD_ENDED_LEN 13u
#define RP_ARM_REWARD_LEN 25u
#define RP_DISARM_LEN 4u

/* ---- codes ------------------------------------------------------------- */

/* Hello.capabilities */
#define RP_CAP_LEVER (1ul << 0)
#define RP_CAP_LICK (1ul << 1)
#define RP_CAP_VALVE (1ul << 2)
#define RP_CAP_TONE (1ul << 3)
#define RP_CAP_FRAME_TTL (1ul << 4)
#define RP_CAP_SYNC_OUT (1ul << 5)

/* Event.kind */
#define RP_EV_LICK_ON 1u
#define RP_EV_LICK_OFF 2u
#define RP_EV_FRAME_TTL 3u
#define RP_EV_VALVE_OPEN 4u
#define RP_EV_VALVE_CLOSE 5u
#define RP_EV_TONE_ON 6u
#define RP_EV_TONE_OFF 7u
#define RP_EV_SYNC_OUT_START 8u
#define RP_EV_SYNC_OUT_END 9u
#define RP_EV_SAFE_STATE 10u
#define RP_EV_SAFE_STATE_CLEARED 11u

/* causes, in Event.aux of ValveClose, ToneOff, SafeState */
#define RP_CAUSE_COMPLETED 0u
#define RP_CAUSE_COMMAND 1u
#define RP_CAUSE_CAP 2u
#define RP_CAUSE_WATCHDOG 3u
#define RP_CAUSE_RESET 4u

/* Ack.status */
#define RP_ACK_OK 0u
#define RP_ACK_BAD_LENGTH 1u
#define RP_ACK_BAD_VALUE 2u
#define RP_ACK_REFUSED 3u
#define RP_ACK_BUSY 4u
#define RP_ACK_UNKNOWN_COMMAND 5u

/* Fault.code */
#define RP_FAULT_SAMPLES_DROPPED 1u
#define RP_FAULT_RX_FRAME_BAD 2u
#define RP_FAULT_WATCHDOG_TRIPPED 3u
#define RP_FAULT_VALVE_CAP_TRIPPED 4u
#define RP_FAULT_TX_OVERFLOW 5u

/* Heartbeat.state bits */
#define RP_STATE_STREAMING 0x01u
#define RP_STATE_VALVE_OPEN 0x02u
#define RP_STATE_TONE_ON 0x04u
#define RP_STATE_SAFE 0x08u
#define RP_STATE_SYNC_BUSY 0x10u

/* SyncOut.mode */
#define RP_SYNC_PULSE 0u
#define RP_SYNC_BITCODE 1u

/* ArmReward.direction */
#define RP_DIR_UP 0u   /* counts - rest >= threshold */
#define RP_DIR_DOWN 1u /* rest - counts >= threshold */

/* RewardEnded.reason */
#define RP_DISARM_EXPIRED 0u
#define RP_DISARM_HOST 1u
#define RP_DISARM_WATCHDOG 2u
#define RP_DISARM_RESET 3u
#define RP_DISARM_CONFIGURE 4u
#define RP_DISARM_VALVE_BUSY 5u

/* Return values of the unpackers. */
#define RP_OK 0
#define RP_ERR_SHORT (-1)     /* body shorter than the message's length */
#define RP_ERR_BAD_COUNT (-2) /* lever batch: count 0, > 50, or not enough bytes */

/* ---- CRC-16/CCITT-FALSE ------------------------------------------------ */

#define RP_CRC_INIT 0xFFFFu
uint16_t rp_crc16_update(uint16_t crc, uint8_t byte);
uint16_t rp_crc16(const uint8_t *data, size_t len);

/* ---- COBS -------------------------------------------------------------- */

/* Encode `len` bytes into `out` (room for RP_COBS_MAX_ENCODED(len) bytes);
 * writes no delimiter. Returns the encoded length. Byte-identical to the
 * Rust encoder (a run of exactly 254 non-zero bytes at the end is followed
 * by a 0x01 block). */
size_t rp_cobs_encode(const uint8_t *in, size_t len, uint8_t *out);

#define RP_COBS_ERR_ZERO (-1)      /* a 0x00 inside the frame */
#define RP_COBS_ERR_TRUNCATED (-2) /* a block runs past the end */
/* Decode in place; on success stores the decoded length and returns 0. */
int rp_cobs_decode(uint8_t *buf, size_t len, size_t *out_len);

/* ---- frame writer (streaming COBS + CRC, no scratch buffer) ------------- */

typedef struct rp_writer {
    uint8_t *out;     /* RP_MAX_WIRE_FRAME bytes */
    uint16_t code_at; /* where the open block's code byte goes */
    uint16_t w;       /* next output position */
    uint16_t raw_len; /* raw bytes written so far */
    uint16_t crc;
    uint8_t code;
    uint8_t overflow; /* more than RP_MAX_RAW_FRAME raw bytes were offered */
} rp_writer;

void rp_writer_begin(rp_writer *wr, uint8_t *out, uint8_t type, uint16_t seq);
void rp_writer_u8(rp_writer *wr, uint8_t v);
void rp_writer_u16(rp_writer *wr, uint16_t v);
void rp_writer_u32(rp_writer *wr, uint32_t v);
void rp_writer_bytes(rp_writer *wr, const uint8_t *p, size_t n);
/* Appends the CRC and the closing delimiter (rp_writer_begin wrote the
 * leading one); returns the wire length, or 0 if the
 * body was too long (more than RP_MAX_BODY bytes). */
size_t rp_writer_end(rp_writer *wr);

/* Build a complete wire frame (COBS and delimiter included) into `wire`
 * (RP_MAX_WIRE_FRAME bytes). Returns the length, 0 if body_len > RP_MAX_BODY. */
size_t rp_build_frame(uint8_t *wire, uint8_t type, uint16_t seq, const uint8_t *body,
                      size_t body_len);

/* ---- streaming decoder ------------------------------------------------- */

typedef struct rp_frame {
    uint8_t type;
    uint8_t flags;
    uint16_t seq;
    const uint8_t *body; /* points into the decoder; valid until the next byte */
    uint16_t body_len;
} rp_frame;

typedef struct rp_decoder {
    uint8_t buf[RP_DECODER_BUF];
    uint16_t len;
    uint8_t discarding; /* the frame overflowed the buffer: drop until 0x00 */
    uint32_t frames_ok;
    uint32_t frames_bad; /* all drops: cobs + runts + oversize + crc */
    uint32_t cobs_errors;
    uint32_t runts;
    uint32_t oversize;
    uint32_t crc_errors;
} rp_decoder;

#define RP_DEC_NONE 0  /* nothing complete yet (or an empty frame) */
#define RP_DEC_FRAME 1 /* *frame holds a frame that passed COBS and CRC */
#define RP_DEC_BAD 2   /* a frame was dropped and counted */

void rp_decoder_init(rp_decoder *d);
/* Forget a partial frame (not counted). */
void rp_decoder_reset(rp_decoder *d);
/* Feed one byte. */
int rp_decoder_push(rp_decoder *d, uint8_t byte, rp_frame *frame);

/* ---- little-endian helpers --------------------------------------------- */

void rp_put_u16(uint8_t *p, uint16_t v);
void rp_put_u32(uint8_t *p, uint32_t v);
void rp_put_u64(uint8_t *p, uint64_t v);
uint16_t rp_get_u16(const uint8_t *p);
uint32_t rp_get_u32(const uint8_t *p);
uint64_t rp_get_u64(const uint8_t *p);

/* ---- message bodies ---------------------------------------------------- */
/* Field names are those of docs/protocol.md and of the golden vectors. */

typedef struct rp_hello {
    uint16_t protocol_version;
    uint8_t firmware_major;
    uint8_t firmware_minor;
    uint8_t firmware_patch;
    uint64_t device_id;
    uint32_t clock_hz;
    uint32_t capabilities;
    uint32_t max_sample_rate_hz;
    uint16_t hard_max_valve_open_ms;
    uint32_t t_us;
} rp_hello;

typedef struct rp_lever_header {
    uint32_t first_index;
    uint32_t t_first_us;
    uint16_t period_us;
    uint8_t count;
} rp_lever_header;

typedef struct rp_event {
    uint32_t t_us;
    uint8_t kind;
    uint16_t aux;
    uint32_t value;
} rp_event;

typedef struct rp_pong {
    uint16_t ping_seq;
    uint32_t t_rx_us;
    uint32_t t_tx_us;
} rp_pong;

typedef struct rp_ack {
    uint16_t acked_seq;
    uint8_t acked_type;
    uint8_t status;
    uint32_t t_us;
} rp_ack;

typedef struct rp_fault {
    uint32_t t_us;
    uint16_t code;
    uint32_t detail;
} rp_fault;

typedef struct rp_heartbeat {
    uint32_t t_us;
    uint8_t state;
    uint32_t next_sample_index;
    uint32_t samples_dropped;
    uint32_t rx_frames_bad;
    uint32_t tx_frames_dropped;
} rp_heartbeat;

typedef struct rp_configure {
    uint32_t sample_rate_hz;
    uint8_t samples_per_batch;
    uint16_t heartbeat_interval_ms;
    uint16_t heartbeat_timeout_ms;
    uint16_t max_valve_open_ms;
    uint16_t max_flush_ms;
} rp_configure;

typedef struct rp_tone {
    uint32_t frequency_hz;
    uint16_t duration_ms;
    uint8_t level_pct;
} rp_tone;

typedef struct rp_valve_pulse {
    uint32_t duration_us;
} rp_valve_pulse;

typedef struct rp_valve_open {
    uint16_t max_ms;
} rp_valve_open;

typedef struct rp_sync_out {
    uint8_t mode;
    uint8_t nbits;
    uint16_t unit_us;
    uint32_t value;
} rp_sync_out;

typedef struct rp_reward_fired {
    uint32_t trial_tag;
    uint32_t sample_index;
    uint32_t t_cross_us;
    uint32_t t_valve_us;
    int32_t counts;
    uint32_t pulse_us;
} rp_reward_fired;

typedef struct rp_reward_ended {
    uint32_t trial_tag;
    uint32_t t_us;
    uint8_t reason;
    uint32_t next_sample_index;
} rp_reward_ended;

typedef struct rp_arm_reward {
    uint32_t trial_tag;
    int32_t rest_counts;
    uint32_t threshold_counts;
    uint32_t rearm_counts;
    uint8_t direction;
    uint32_t window_end_us;
    uint32_t pulse_us;
} rp_arm_reward;

typedef struct rp_disarm {
    uint32_t trial_tag;
} rp_disarm;

/* Packers write the body at `out` and return its length. */
size_t rp_pack_hello(uint8_t *out, const rp_hello *m);
size_t rp_pack_lever_header(uint8_t *out, const rp_lever_header *m);
/* Header + m->count samples from `counts`; returns 0 if count is 0 or > 50. */
size_t rp_pack_lever_samples(uint8_t *out, const rp_lever_header *m, const int32_t *counts);
size_t rp_pack_event(uint8_t *out, const rp_event *m);
size_t rp_pack_pong(uint8_t *out, const rp_pong *m);
size_t rp_pack_ack(uint8_t *out, const rp_ack *m);
size_t rp_pack_fault(uint8_t *out, const rp_fault *m);
size_t rp_pack_heartbeat(uint8_t *out, const rp_heartbeat *m);
size_t rp_pack_configure(uint8_t *out, const rp_configure *m);
size_t rp_pack_tone(uint8_t *out, const rp_tone *m);
size_t rp_pack_valve_pulse(uint8_t *out, const rp_valve_pulse *m);
size_t rp_pack_valve_open(uint8_t *out, const rp_valve_open *m);
size_t rp_pack_sync_out(uint8_t *out, const rp_sync_out *m);
size_t rp_pack_reward_fired(uint8_t *out, const rp_reward_fired *m);
size_t rp_pack_reward_ended(uint8_t *out, const rp_reward_ended *m);
size_t rp_pack_arm_reward(uint8_t *out, const rp_arm_reward *m);
size_t rp_pack_disarm(uint8_t *out, const rp_disarm *m);

/* Unpackers return RP_OK, or RP_ERR_SHORT if the body is shorter than the
 * message. Longer bodies are accepted and the extra bytes ignored. */
int rp_unpack_hello(const uint8_t *body, size_t len, rp_hello *m);
int rp_unpack_lever_header(const uint8_t *body, size_t len, rp_lever_header *m);
/* Header and samples; `counts` needs room for RP_MAX_SAMPLES_PER_BATCH values.
 * RP_ERR_BAD_COUNT if count is 0, > 50 or the body is too short for it. */
int rp_unpack_lever_samples(const uint8_t *body, size_t len, rp_lever_header *m, int32_t *counts);
int rp_unpack_event(const uint8_t *body, size_t len, rp_event *m);
int rp_unpack_pong(const uint8_t *body, size_t len, rp_pong *m);
int rp_unpack_ack(const uint8_t *body, size_t len, rp_ack *m);
int rp_unpack_fault(const uint8_t *body, size_t len, rp_fault *m);
int rp_unpack_heartbeat(const uint8_t *body, size_t len, rp_heartbeat *m);
int rp_unpack_configure(const uint8_t *body, size_t len, rp_configure *m);
int rp_unpack_tone(const uint8_t *body, size_t len, rp_tone *m);
int rp_unpack_valve_pulse(const uint8_t *body, size_t len, rp_valve_pulse *m);
int rp_unpack_valve_open(const uint8_t *body, size_t len, rp_valve_open *m);
int rp_unpack_sync_out(const uint8_t *body, size_t len, rp_sync_out *m);
int rp_unpack_reward_fired(const uint8_t *body, size_t len, rp_reward_fired *m);
int rp_unpack_reward_ended(const uint8_t *body, size_t len, rp_reward_ended *m);
int rp_unpack_arm_reward(const uint8_t *body, size_t len, rp_arm_reward *m);
int rp_unpack_disarm(const uint8_t *body, size_t len, rp_disarm *m);

/* A LeverSamples frame straight from a header and counts (no body buffer).
 * Returns the wire length, 0 if count is 0 or > 50. */
size_t rp_build_lever_frame(uint8_t *wire, uint16_t seq, const rp_lever_header *m,
                            const int32_t *counts);

#ifdef __cplusplus
}
#endif

#endif /* RIGPROTO_H */
