/*
 * rigproto: the rig serial protocol in portable C99. See rigproto.h.
 */
#include "rigproto.h"

/* ---- CRC-16/CCITT-FALSE ------------------------------------------------ */

/* On AVR the table lives in flash (512 bytes of 256 KiB) instead of RAM. */
#if defined(__AVR__)
#include <avr/pgmspace.h>
#define RP_FLASH PROGMEM
#define RP_TABLE_READ(i) pgm_read_word(&rp_crc_table[(i)])
#else
#define RP_FLASH
#define RP_TABLE_READ(i) (rp_crc_table[(i)])
#endif

/* table[i] = the bitwise CRC step applied 8 times to (i << 8); polynomial 0x1021.
 * test_rigproto.c checks every entry against the bitwise definition. */
static const uint16_t rp_crc_table[256] RP_FLASH = {
    0x0000, 0x1021, 0x2042, 0x3063, 0x4084, 0x50A5, 0x60C6, 0x70E7,
    0x8108, 0x9129, 0xA14A, 0xB16B, 0xC18C, 0xD1AD, 0xE1CE, 0xF1EF,
    0x1231, 0x0210, 0x3273, 0x2252, 0x52B5, 0x4294, 0x72F7, 0x62D6,
    0x9339, 0x8318, 0xB37B, 0xA35A, 0xD3BD, 0xC39C, 0xF3FF, 0xE3DE,
    0x2462, 0x3443, 0x0420, 0x1401, 0x64E6, 0x74C7, 0x44A4, 0x5485,
    0xA56A, 0xB54B, 0x8528, 0x9509, 0xE5EE, 0xF5CF, 0xC5AC, 0xD58D,
    0x3653, 0x2672, 0x1611, 0x0630, 0x76D7, 0x66F6, 0x5695, 0x46B4,
    0xB75B, 0xA77A, 0x9719, 0x8738, 0xF7DF, 0xE7FE, 0xD79D, 0xC7BC,
    0x48C4, 0x58E5, 0x6886, 0x78A7, 0x0840, 0x1861, 0x2802, 0x3823,
    0xC9CC, 0xD9ED, 0xE98E, 0xF9AF, 0x8948, 0x9969, 0xA90A, 0xB92B,
    0x5AF5, 0x4AD4, 0x7AB7, 0x6A96, 0x1A71, 0x0A50, 0x3A33, 0x2A12,
    0xDBFD, 0xCBDC, 0xFBBF, 0xEB9E, 0x9B79, 0x8B58, 0xBB3B, 0xAB1A,
    0x6CA6, 0x7C87, 0x4CE4, 0x5CC5, 0x2C22, 0x3C03, 0x0C60, 0x1C41,
    0xEDAE, 0xFD8F, 0xCDEC, 0xDDCD, 0xAD2A, 0xBD0B, 0x8D68, 0x9D49,
    0x7E97, 0x6EB6, 0x5ED5, 0x4EF4, 0x3E13, 0x2E32, 0x1E51, 0x0E70,
    0xFF9F, 0xEFBE, 0xDFDD, 0xCFFC, 0xBF1B, 0xAF3A, 0x9F59, 0x8F78,
    0x9188, 0x81A9, 0xB1CA, 0xA1EB, 0xD10C, 0xC12D, 0xF14E, 0xE16F,
    0x1080, 0x00A1, 0x30C2, 0x20E3, 0x5004, 0x4025, 0x7046, 0x6067,
    0x83B9, 0x9398, 0xA3FB, 0xB3DA, 0xC33D, 0xD31C, 0xE37F, 0xF35E,
    0x02B1, 0x1290, 0x22F3, 0x32D2, 0x4235, 0x5214, 0x6277, 0x7256,
    0xB5EA, 0xA5CB, 0x95A8, 0x8589, 0xF56E, 0xE54F, 0xD52C, 0xC50D,
    0x34E2, 0x24C3, 0x14A0, 0x0481, 0x7466, 0x6447, 0x5424, 0x4405,
    0xA7DB, 0xB7FA, 0x8799, 0x97B8, 0xE75F, 0xF77E, 0xC71D, 0xD73C,
    0x26D3, 0x36F2, 0x0691, 0x16B0, 0x6657, 0x7676, 0x4615, 0x5634,
    0xD94C, 0xC96D, 0xF90E, 0xE92F, 0x99C8, 0x89E9, 0xB98A, 0xA9AB,
    0x5844, 0x4865, 0x7806, 0x6827, 0x18C0, 0x08E1, 0x3882, 0x28A3,
    0xCB7D, 0xDB5C, 0xEB3F, 0xFB1E, 0x8BF9, 0x9BD8, 0xABBB, 0xBB9A,
    0x4A75, 0x5A54, 0x6A37, 0x7A16, 0x0AF1, 0x1AD0, 0x2AB3, 0x3A92,
    0xFD2E, 0xED0F, 0xDD6C, 0xCD4D, 0xBDAA, 0xAD8B, 0x9DE8, 0x8DC9,
    0x7C26, 0x6C07, 0x5C64, 0x4C45, 0x3CA2, 0x2C83, 0x1CE0, 0x0CC1,
    0xEF1F, 0xFF3E, 0xCF5D, 0xDF7C, 0xAF9B, 0xBFBA, 0x8FD9, 0x9FF8,
    0x6E17, 0x7E36, 0x4E55, 0x5E74, 0x2E93, 0x3EB2, 0x0ED1, 0x1EF0,
};

/* Forced inline where it matters: the frame writer runs this per byte. */
#if defined(__GNUC__)
#define RP_HOT static inline __attribute__((always_inline))
#else
#define RP_HOT static inline
#endif

RP_HOT uint16_t rp_crc_step(uint16_t crc, uint8_t byte)
{
    uint8_t i = (uint8_t)((uint8_t)(crc >> 8) ^ byte);
    return (uint16_t)((uint16_t)(crc << 8) ^ (uint16_t)RP_TABLE_READ(i));
}

uint16_t rp_crc16_update(uint16_t crc, uint8_t byte)
{
    return rp_crc_step(crc, byte);
}

uint16_t rp_crc16(const uint8_t *data, size_t len)
{
    uint16_t crc = RP_CRC_INIT;
    size_t i;
    for (i = 0; i < len; i++) {
        crc = rp_crc_step(crc, data[i]);
    }
    return crc;
}

/* ---- COBS -------------------------------------------------------------- */

size_t rp_cobs_encode(const uint8_t *in, size_t len, uint8_t *out)
{
    size_t code_at = 0;
    size_t w = 1;
    uint8_t code = 1;
    size_t i;
    for (i = 0; i < len; i++) {
        uint8_t b = in[i];
        if (b == 0) {
            out[code_at] = code;
            code_at = w++;
            code = 1;
        } else {
            out[w++] = b;
            code++;
            if (code == 0xFF) {
                out[code_at] = code;
                code_at = w++;
                code = 1;
            }
        }
    }
    out[code_at] = code;
    return w;
}

int rp_cobs_decode(uint8_t *buf, size_t len, size_t *out_len)
{
    size_t r = 0;
    size_t w = 0;
    while (r < len) {
        uint8_t code = buf[r];
        size_t run;
        size_t i;
        if (code == 0) {
            return RP_COBS_ERR_ZERO;
        }
        run = (size_t)code - 1u;
        r++;
        if (run > len - r) {
            return RP_COBS_ERR_TRUNCATED;
        }
        for (i = 0; i < run; i++) {
            uint8_t b = buf[r + i];
            if (b == 0) {
                return RP_COBS_ERR_ZERO;
            }
            buf[w + i] = b;
        }
        w += run;
        r += run;
        /* A block shorter than 254 data bytes stands for "data then a zero",
         * except at the very end of the frame. */
        if (code != 0xFF && r < len) {
            buf[w++] = 0;
        }
    }
    *out_len = w;
    return 0;
}

/* ---- frame writer ------------------------------------------------------ */

/* One raw byte through COBS (no CRC). */
RP_HOT void rp_w_cobs(rp_writer *wr, uint8_t b)
{
    if (wr->raw_len >= RP_MAX_RAW_FRAME) {
        wr->overflow = 1;
        return;
    }
    wr->raw_len++;
    if (b == 0) {
        wr->out[wr->code_at] = wr->code;
        wr->code_at = wr->w++;
        wr->code = 1;
    } else {
        wr->out[wr->w++] = b;
        if (++wr->code == 0xFF) {
            wr->out[wr->code_at] = 0xFF;
            wr->code_at = wr->w++;
            wr->code = 1;
        }
    }
}

/* One header or body byte: CRC, then COBS. */
RP_HOT void rp_w_byte(rp_writer *wr, uint8_t v)
{
    /* Keep room for the CRC: the body may use at most RP_MAX_BODY bytes. */
    if (wr->raw_len >= RP_MAX_RAW_FRAME - RP_CRC_LEN) {
        wr->overflow = 1;
        return;
    }
    wr->crc = rp_crc_step(wr->crc, v);
    rp_w_cobs(wr, v);
}

RP_HOT void rp_w_u16(rp_writer *wr, uint16_t v)
{
    rp_w_byte(wr, (uint8_t)(v & 0xFFu));
    rp_w_byte(wr, (uint8_t)(v >> 8));
}

RP_HOT void rp_w_u32(rp_writer *wr, uint32_t v)
{
    rp_w_u16(wr, (uint16_t)(v & 0xFFFFu));
    rp_w_u16(wr, (uint16_t)(v >> 16));
}

void rp_writer_u8(rp_writer *wr, uint8_t v)
{
    rp_w_byte(wr, v);
}

void rp_writer_u16(rp_writer *wr, uint16_t v)
{
    rp_w_u16(wr, v);
}

void rp_writer_u32(rp_writer *wr, uint32_t v)
{
    rp_w_u32(wr, v);
}

void rp_writer_bytes(rp_writer *wr, const uint8_t *p, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        rp_w_byte(wr, p[i]);
    }
}

RP_HOT void rp_w_begin(rp_writer *wr, uint8_t *out, uint8_t type, uint16_t seq)
{
    wr->out = out;
    out[0] = 0; /* leading delimiter: noise before the frame cannot merge with it */
    wr->code_at = 1;
    wr->w = 2;
    wr->raw_len = 0;
    wr->crc = RP_CRC_INIT;
    wr->code = 1;
    wr->overflow = 0;
    rp_w_byte(wr, type);
    rp_w_byte(wr, 0); /* flags: reserved, 0 in version 1 */
    rp_w_u16(wr, seq);
}

RP_HOT size_t rp_w_end(rp_writer *wr)
{
    uint16_t crc = wr->crc;
    if (wr->overflow) {
        return 0;
    }
    rp_w_cobs(wr, (uint8_t)(crc & 0xFFu));
    rp_w_cobs(wr, (uint8_t)(crc >> 8));
    wr->out[wr->code_at] = wr->code;
    wr->out[wr->w++] = 0; /* delimiter */
    return wr->w;
}

void rp_writer_begin(rp_writer *wr, uint8_t *out, uint8_t type, uint16_t seq)
{
    rp_w_begin(wr, out, type, seq);
}

size_t rp_writer_end(rp_writer *wr)
{
    return rp_w_end(wr);
}

size_t rp_build_frame(uint8_t *wire, uint8_t type, uint16_t seq, const uint8_t *body,
                      size_t body_len)
{
    rp_writer wr;
    size_t i;
    if (body_len > RP_MAX_BODY) {
        return 0;
    }
    /* the inline steps keep the writer in registers */
    rp_w_begin(&wr, wire, type, seq);
    for (i = 0; i < body_len; i++) {
        rp_w_byte(&wr, body[i]);
    }
    return rp_w_end(&wr);
}

/* ---- streaming decoder ------------------------------------------------- */

void rp_decoder_init(rp_decoder *d)
{
    d->len = 0;
    d->discarding = 0;
    d->frames_ok = 0;
    d->frames_bad = 0;
    d->cobs_errors = 0;
    d->runts = 0;
    d->oversize = 0;
    d->crc_errors = 0;
}

void rp_decoder_reset(rp_decoder *d)
{
    d->len = 0;
    d->discarding = 0;
}

int rp_decoder_push(rp_decoder *d, uint8_t byte, rp_frame *frame)
{
    size_t raw_len = 0;
    size_t crc_at;
    uint16_t want;

    if (byte != 0) {
        if (d->discarding) {
            return RP_DEC_NONE;
        }
        if (d->len >= RP_DECODER_BUF) {
            /* Too long for any legal frame: drop everything up to the next 0x00. */
            d->discarding = 1;
            d->len = 0;
            return RP_DEC_NONE;
        }
        d->buf[d->len++] = byte;
        return RP_DEC_NONE;
    }

    /* A delimiter ends the frame. */
    if (d->discarding) {
        d->discarding = 0;
        d->oversize++;
        d->frames_bad++;
        return RP_DEC_BAD;
    }
    if (d->len == 0) {
        return RP_DEC_NONE; /* an empty frame: a deliberate resync */
    }
    if (rp_cobs_decode(d->buf, d->len, &raw_len) != 0) {
        d->len = 0;
        d->cobs_errors++;
        d->frames_bad++;
        return RP_DEC_BAD;
    }
    d->len = 0;
    if (raw_len < RP_HEADER_LEN + RP_CRC_LEN) {
        d->runts++;
        d->frames_bad++;
        return RP_DEC_BAD;
    }
    if (raw_len > RP_MAX_RAW_FRAME) {
        d->oversize++;
        d->frames_bad++;
        return RP_DEC_BAD;
    }
    crc_at = raw_len - RP_CRC_LEN;
    want = rp_get_u16(&d->buf[crc_at]);
    if (rp_crc16(d->buf, crc_at) != want) {
        d->crc_errors++;
        d->frames_bad++;
        return RP_DEC_BAD;
    }
    d->frames_ok++;
    frame->type = d->buf[0];
    frame->flags = d->buf[1];
    frame->seq = rp_get_u16(&d->buf[2]);
    frame->body = &d->buf[RP_HEADER_LEN];
    frame->body_len = (uint16_t)(crc_at - RP_HEADER_LEN);
    return RP_DEC_FRAME;
}

/* ---- little-endian helpers --------------------------------------------- */

void rp_put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v & 0xFFu);
    p[1] = (uint8_t)(v >> 8);
}

void rp_put_u32(uint8_t *p, uint32_t v)
{
    rp_put_u16(p, (uint16_t)(v & 0xFFFFu));
    rp_put_u16(p + 2, (uint16_t)(v >> 16));
}

void rp_put_u64(uint8_t *p, uint64_t v)
{
    rp_put_u32(p, (uint32_t)(v & 0xFFFFFFFFu));
    rp_put_u32(p + 4, (uint32_t)(v >> 32));
}

uint16_t rp_get_u16(const uint8_t *p)
{
    return (uint16_t)((uint16_t)p[0] | (uint16_t)((uint16_t)p[1] << 8));
}

uint32_t rp_get_u32(const uint8_t *p)
{
    return (uint32_t)rp_get_u16(p) | ((uint32_t)rp_get_u16(p + 2) << 16);
}

uint64_t rp_get_u64(const uint8_t *p)
{
    return (uint64_t)rp_get_u32(p) | ((uint64_t)rp_get_u32(p + 4) << 32);
}

/* Two's complement conversions without implementation-defined casts. */
static uint32_t rp_i32_bits(int32_t v)
{
    return (v >= 0) ? (uint32_t)v : (uint32_t)(~(uint32_t)(-(v + 1)));
}

static int32_t rp_bits_i32(uint32_t u)
{
    return (u <= 0x7FFFFFFFul) ? (int32_t)u : (int32_t)(-(int32_t)(~u)) - 1;
}

/* ---- packers ----------------------------------------------------------- */

size_t rp_pack_hello(uint8_t *out, const rp_hello *m)
{
    rp_put_u16(out + 0, m->protocol_version);
    out[2] = m->firmware_major;
    out[3] = m->firmware_minor;
    out[4] = m->firmware_patch;
    rp_put_u64(out + 5, m->device_id);
    rp_put_u32(out + 13, m->clock_hz);
    rp_put_u32(out + 17, m->capabilities);
    rp_put_u32(out + 21, m->max_sample_rate_hz);
    rp_put_u16(out + 25, m->hard_max_valve_open_ms);
    rp_put_u32(out + 27, m->t_us);
    return RP_HELLO_LEN;
}

size_t rp_pack_lever_header(uint8_t *out, const rp_lever_header *m)
{
    rp_put_u32(out + 0, m->first_index);
    rp_put_u32(out + 4, m->t_first_us);
    rp_put_u16(out + 8, m->period_us);
    out[10] = m->count;
    return RP_LEVER_HEADER_LEN;
}

size_t rp_pack_lever_samples(uint8_t *out, const rp_lever_header *m, const int32_t *counts)
{
    size_t n = rp_pack_lever_header(out, m);
    uint8_t i;
    if (m->count == 0 || m->count > RP_MAX_SAMPLES_PER_BATCH) {
        return 0;
    }
    for (i = 0; i < m->count; i++) {
        rp_put_u32(out + n, rp_i32_bits(counts[i]));
        n += 4;
    }
    return n;
}

size_t rp_pack_event(uint8_t *out, const rp_event *m)
{
    rp_put_u32(out + 0, m->t_us);
    out[4] = m->kind;
    rp_put_u16(out + 5, m->aux);
    rp_put_u32(out + 7, m->value);
    return RP_EVENT_LEN;
}

size_t rp_pack_pong(uint8_t *out, const rp_pong *m)
{
    rp_put_u16(out + 0, m->ping_seq);
    rp_put_u32(out + 2, m->t_rx_us);
    rp_put_u32(out + 6, m->t_tx_us);
    return RP_PONG_LEN;
}

size_t rp_pack_ack(uint8_t *out, const rp_ack *m)
{
    rp_put_u16(out + 0, m->acked_seq);
    out[2] = m->acked_type;
    out[3] = m->status;
    rp_put_u32(out + 4, m->t_us);
    return RP_ACK_LEN;
}

size_t rp_pack_fault(uint8_t *out, const rp_fault *m)
{
    rp_put_u32(out + 0, m->t_us);
    rp_put_u16(out + 4, m->code);
    rp_put_u32(out + 6, m->detail);
    return RP_FAULT_LEN;
}

size_t rp_pack_heartbeat(uint8_t *out, const rp_heartbeat *m)
{
    rp_put_u32(out + 0, m->t_us);
    out[4] = m->state;
    rp_put_u32(out + 5, m->next_sample_index);
    rp_put_u32(out + 9, m->samples_dropped);
    rp_put_u32(out + 13, m->rx_frames_bad);
    rp_put_u32(out + 17, m->tx_frames_dropped);
    return RP_HEARTBEAT_LEN;
}

size_t rp_pack_configure(uint8_t *out, const rp_configure *m)
{
    rp_put_u32(out + 0, m->sample_rate_hz);
    out[4] = m->samples_per_batch;
    rp_put_u16(out + 5, m->heartbeat_interval_ms);
    rp_put_u16(out + 7, m->heartbeat_timeout_ms);
    rp_put_u16(out + 9, m->max_valve_open_ms);
    rp_put_u16(out + 11, m->max_flush_ms);
    return RP_CONFIGURE_LEN;
}

size_t rp_pack_tone(uint8_t *out, const rp_tone *m)
{
    rp_put_u32(out + 0, m->frequency_hz);
    rp_put_u16(out + 4, m->duration_ms);
    out[6] = m->level_pct;
    return RP_TONE_LEN;
}

size_t rp_pack_valve_pulse(uint8_t *out, const rp_valve_pulse *m)
{
    rp_put_u32(out + 0, m->duration_us);
    return RP_VALVE_PULSE_LEN;
}

size_t rp_pack_valve_open(uint8_t *out, const rp_valve_open *m)
{
    rp_put_u16(out + 0, m->max_ms);
    return RP_VALVE_OPEN_LEN;
}

size_t rp_pack_sync_out(uint8_t *out, const rp_sync_out *m)
{
    out[0] = m->mode;
    out[1] = m->nbits;
    rp_put_u16(out + 2, m->unit_us);
    rp_put_u32(out + 4, m->value);
    return RP_SYNC_OUT_LEN;
}

size_t rp_pack_reward_fired(uint8_t *out, const rp_reward_fired *m)
{
    rp_put_u32(out + 0, m->trial_tag);
    rp_put_u32(out + 4, m->sample_index);
    rp_put_u32(out + 8, m->t_cross_us);
    rp_put_u32(out + 12, m->t_valve_us);
    rp_put_u32(out + 16, rp_i32_bits(m->counts));
    rp_put_u32(out + 20, m->pulse_us);
    return RP_REWARD_FIRED_LEN;
}

size_t rp_pack_reward_ended(uint8_t *out, const rp_reward_ended *m)
{
    rp_put_u32(out + 0, m->trial_tag);
    rp_put_u32(out + 4, m->t_us);
    out[8] = m->reason;
    rp_put_u32(out + 9, m->next_sample_index);
    return RP_REWARD_ENDED_LEN;
}

size_t rp_pack_arm_reward(uint8_t *out, const rp_arm_reward *m)
{
    rp_put_u32(out + 0, m->trial_tag);
    rp_put_u32(out + 4, rp_i32_bits(m->rest_counts));
    rp_put_u32(out + 8, m->threshold_counts);
    rp_put_u32(out + 12, m->rearm_counts);
    out[16] = m->direction;
    rp_put_u32(out + 17, m->window_end_us);
    rp_put_u32(out + 21, m->pulse_us);
    return RP_ARM_REWARD_LEN;
}

size_t rp_pack_disarm(uint8_t *out, const rp_disarm *m)
{
    rp_put_u32(out + 0, m->trial_tag);
    return RP_DISARM_LEN;
}

/* ---- unpackers --------------------------------------------------------- */

int rp_unpack_hello(const uint8_t *b, size_t len, rp_hello *m)
{
    if (len < RP_HELLO_LEN) {
        return RP_ERR_SHORT;
    }
    m->protocol_version = rp_get_u16(b + 0);
    m->firmware_major = b[2];
    m->firmware_minor = b[3];
    m->firmware_patch = b[4];
    m->device_id = rp_get_u64(b + 5);
    m->clock_hz = rp_get_u32(b + 13);
    m->capabilities = rp_get_u32(b + 17);
    m->max_sample_rate_hz = rp_get_u32(b + 21);
    m->hard_max_valve_open_ms = rp_get_u16(b + 25);
    m->t_us = rp_get_u32(b + 27);
    return RP_OK;
}

int rp_unpack_lever_header(const uint8_t *b, size_t len, rp_lever_header *m)
{
    if (len < RP_LEVER_HEADER_LEN) {
        return RP_ERR_SHORT;
    }
    m->first_index = rp_get_u32(b + 0);
    m->t_first_us = rp_get_u32(b + 4);
    m->period_us = rp_get_u16(b + 8);
    m->count = b[10];
    return RP_OK;
}

int rp_unpack_lever_samples(const uint8_t *b, size_t len, rp_lever_header *m, int32_t *counts)
{
    uint8_t i;
    int rc = rp_unpack_lever_header(b, len, m);
    if (rc != RP_OK) {
        return rc;
    }
    if (m->count == 0 || m->count > RP_MAX_SAMPLES_PER_BATCH ||
        len - RP_LEVER_HEADER_LEN < (size_t)4u * m->count) {
        return RP_ERR_BAD_COUNT;
    }
    for (i = 0; i < m->count; i++) {
        counts[i] = rp_bits_i32(rp_get_u32(b + RP_LEVER_HEADER_LEN + (size_t)4u * i));
    }
    return RP_OK;
}

int rp_unpack_event(const uint8_t *b, size_t len, rp_event *m)
{
    if (len < RP_EVENT_LEN) {
        return RP_ERR_SHORT;
    }
    m->t_us = rp_get_u32(b + 0);
    m->kind = b[4];
    m->aux = rp_get_u16(b + 5);
    m->value = rp_get_u32(b + 7);
    return RP_OK;
}

int rp_unpack_pong(const uint8_t *b, size_t len, rp_pong *m)
{
    if (len < RP_PONG_LEN) {
        return RP_ERR_SHORT;
    }
    m->ping_seq = rp_get_u16(b + 0);
    m->t_rx_us = rp_get_u32(b + 2);
    m->t_tx_us = rp_get_u32(b + 6);
    return RP_OK;
}

int rp_unpack_ack(const uint8_t *b, size_t len, rp_ack *m)
{
    if (len < RP_ACK_LEN) {
        return RP_ERR_SHORT;
    }
    m->acked_seq = rp_get_u16(b + 0);
    m->acked_type = b[2];
    m->status = b[3];
    m->t_us = rp_get_u32(b + 4);
    return RP_OK;
}

int rp_unpack_fault(const uint8_t *b, size_t len, rp_fault *m)
{
    if (len < RP_FAULT_LEN) {
        return RP_ERR_SHORT;
    }
    m->t_us = rp_get_u32(b + 0);
    m->code = rp_get_u16(b + 4);
    m->detail = rp_get_u32(b + 6);
    return RP_OK;
}

int rp_unpack_heartbeat(const uint8_t *b, size_t len, rp_heartbeat *m)
{
    if (len < RP_HEARTBEAT_LEN) {
        return RP_ERR_SHORT;
    }
    m->t_us = rp_get_u32(b + 0);
    m->state = b[4];
    m->next_sample_index = rp_get_u32(b + 5);
    m->samples_dropped = rp_get_u32(b + 9);
    m->rx_frames_bad = rp_get_u32(b + 13);
    m->tx_frames_dropped = rp_get_u32(b + 17);
    return RP_OK;
}

int rp_unpack_configure(const uint8_t *b, size_t len, rp_configure *m)
{
    if (len < RP_CONFIGURE_LEN) {
        return RP_ERR_SHORT;
    }
    m->sample_rate_hz = rp_get_u32(b + 0);
    m->samples_per_batch = b[4];
    m->heartbeat_interval_ms = rp_get_u16(b + 5);
    m->heartbeat_timeout_ms = rp_get_u16(b + 7);
    m->max_valve_open_ms = rp_get_u16(b + 9);
    m->max_flush_ms = rp_get_u16(b + 11);
    return RP_OK;
}

int rp_unpack_tone(const uint8_t *b, size_t len, rp_tone *m)
{
    if (len < RP_TONE_LEN) {
        return RP_ERR_SHORT;
    }
    m->frequency_hz = rp_get_u32(b + 0);
    m->duration_ms = rp_get_u16(b + 4);
    m->level_pct = b[6];
    return RP_OK;
}

int rp_unpack_valve_pulse(const uint8_t *b, size_t len, rp_valve_pulse *m)
{
    if (len < RP_VALVE_PULSE_LEN) {
        return RP_ERR_SHORT;
    }
    m->duration_us = rp_get_u32(b + 0);
    return RP_OK;
}

int rp_unpack_valve_open(const uint8_t *b, size_t len, rp_valve_open *m)
{
    if (len < RP_VALVE_OPEN_LEN) {
        return RP_ERR_SHORT;
    }
    m->max_ms = rp_get_u16(b + 0);
    return RP_OK;
}

int rp_unpack_sync_out(const uint8_t *b, size_t len, rp_sync_out *m)
{
    if (len < RP_SYNC_OUT_LEN) {
        return RP_ERR_SHORT;
    }
    m->mode = b[0];
    m->nbits = b[1];
    m->unit_us = rp_get_u16(b + 2);
    m->value = rp_get_u32(b + 4);
    return RP_OK;
}

int rp_unpack_reward_fired(const uint8_t *b, size_t len, rp_reward_fired *m)
{
    if (len < RP_REWARD_FIRED_LEN) {
        return RP_ERR_SHORT;
    }
    m->trial_tag = rp_get_u32(b + 0);
    m->sample_index = rp_get_u32(b + 4);
    m->t_cross_us = rp_get_u32(b + 8);
    m->t_valve_us = rp_get_u32(b + 12);
    m->counts = rp_bits_i32(rp_get_u32(b + 16));
    m->pulse_us = rp_get_u32(b + 20);
    return RP_OK;
}

int rp_unpack_reward_ended(const uint8_t *b, size_t len, rp_reward_ended *m)
{
    if (len < RP_REWARD_ENDED_LEN) {
        return RP_ERR_SHORT;
    }
    m->trial_tag = rp_get_u32(b + 0);
    m->t_us = rp_get_u32(b + 4);
    m->reason = b[8];
    m->next_sample_index = rp_get_u32(b + 9);
    return RP_OK;
}

int rp_unpack_arm_reward(const uint8_t *b, size_t len, rp_arm_reward *m)
{
    if (len < RP_ARM_REWARD_LEN) {
        return RP_ERR_SHORT;
    }
    m->trial_tag = rp_get_u32(b + 0);
    m->rest_counts = rp_bits_i32(rp_get_u32(b + 4));
    m->threshold_counts = rp_get_u32(b + 8);
    m->rearm_counts = rp_get_u32(b + 12);
    m->direction = b[16];
    m->window_end_us = rp_get_u32(b + 17);
    m->pulse_us = rp_get_u32(b + 21);
    return RP_OK;
}

int rp_unpack_disarm(const uint8_t *b, size_t len, rp_disarm *m)
{
    if (len < RP_DISARM_LEN) {
        return RP_ERR_SHORT;
    }
    m->trial_tag = rp_get_u32(b + 0);
    return RP_OK;
}

/* ---- direct lever frame ------------------------------------------------ */

size_t rp_build_lever_frame(uint8_t *wire, uint16_t seq, const rp_lever_header *m,
                            const int32_t *counts)
{
    rp_writer wr;
    uint8_t i;
    if (m->count == 0 || m->count > RP_MAX_SAMPLES_PER_BATCH) {
        return 0;
    }
    rp_w_begin(&wr, wire, RP_T_LEVER_SAMPLES, seq);
    rp_w_u32(&wr, m->first_index);
    rp_w_u32(&wr, m->t_first_us);
    rp_w_u16(&wr, m->period_us);
    rp_w_byte(&wr, m->count);
    for (i = 0; i < m->count; i++) {
        rp_w_u32(&wr, rp_i32_bits(counts[i]));
    }
    return rp_w_end(&wr);
}
