/*
 * Host tests of rigproto.c against the golden vectors of the Rust protocol
 * crate, plus CRC, COBS and decoder edge cases.
 *
 *   test_rigproto PATH/TO/protocol/tests/vectors/serial.tsv
 *
 * For every vector line: hex -> bytes, decode with the streaming decoder
 * (exactly one frame, at the delimiter), check type and seq, unpack the body
 * and compare every field with the `fields` column, then fill a fresh struct
 * from the `fields` column, pack and frame it, and compare the bytes exactly.
 * Exit status 0 only if everything passed.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rigproto.h"
#include "testutil.h"

/* ---- generic field access for the vector comparison -------------------- */

typedef struct fdesc {
    const char *name;
    size_t off;
    size_t size;
} fdesc;

#define FD(T, f) {#f, offsetof(T, f), sizeof(((T *)0)->f)}

static uint64_t get_field(const void *s, const fdesc *f)
{
    const unsigned char *p = (const unsigned char *)s + f->off;
    switch (f->size) {
    case 1: { uint8_t v; memcpy(&v, p, 1); return v; }
    case 2: { uint16_t v; memcpy(&v, p, 2); return v; }
    case 4: { uint32_t v; memcpy(&v, p, 4); return v; }
    default: { uint64_t v; memcpy(&v, p, 8); return v; }
    }
}

static void set_field(void *s, const fdesc *f, uint64_t value)
{
    unsigned char *p = (unsigned char *)s + f->off;
    switch (f->size) {
    case 1: { uint8_t v = (uint8_t)value; memcpy(p, &v, 1); break; }
    case 2: { uint16_t v = (uint16_t)value; memcpy(p, &v, 2); break; }
    case 4: { uint32_t v = (uint32_t)value; memcpy(p, &v, 4); break; }
    default: memcpy(p, &value, 8); break;
    }
}

static const fdesc hello_f[] = {
    FD(rp_hello, protocol_version), FD(rp_hello, firmware_major),
    FD(rp_hello, firmware_minor),   FD(rp_hello, firmware_patch),
    FD(rp_hello, device_id),        FD(rp_hello, clock_hz),
    FD(rp_hello, capabilities),     FD(rp_hello, max_sample_rate_hz),
    FD(rp_hello, hard_max_valve_open_ms), FD(rp_hello, t_us),
};
static const fdesc lever_f[] = {
    FD(rp_lever_header, first_index), FD(rp_lever_header, t_first_us),
    FD(rp_lever_header, period_us),
};
static const fdesc event_f[] = {
    FD(rp_event, t_us), FD(rp_event, kind), FD(rp_event, aux), FD(rp_event, value),
};
static const fdesc pong_f[] = {
    FD(rp_pong, ping_seq), FD(rp_pong, t_rx_us), FD(rp_pong, t_tx_us),
};
static const fdesc ack_f[] = {
    FD(rp_ack, acked_seq), FD(rp_ack, acked_type), FD(rp_ack, status), FD(rp_ack, t_us),
};
static const fdesc fault_f[] = {
    FD(rp_fault, t_us), FD(rp_fault, code), FD(rp_fault, detail),
};
static const fdesc heartbeat_f[] = {
    FD(rp_heartbeat, t_us),          FD(rp_heartbeat, state),
    FD(rp_heartbeat, next_sample_index), FD(rp_heartbeat, samples_dropped),
    FD(rp_heartbeat, rx_frames_bad), FD(rp_heartbeat, tx_frames_dropped),
};
static const fdesc configure_f[] = {
    FD(rp_configure, sample_rate_hz),       FD(rp_configure, samples_per_batch),
    FD(rp_configure, heartbeat_interval_ms), FD(rp_configure, heartbeat_timeout_ms),
    FD(rp_configure, max_valve_open_ms),    FD(rp_configure, max_flush_ms),
};
static const fdesc tone_f[] = {
    FD(rp_tone, frequency_hz), FD(rp_tone, duration_ms), FD(rp_tone, level_pct),
};
static const fdesc valve_pulse_f[] = {FD(rp_valve_pulse, duration_us)};
static const fdesc valve_open_f[] = {FD(rp_valve_open, max_ms)};
static const fdesc sync_out_f[] = {
    FD(rp_sync_out, mode), FD(rp_sync_out, nbits), FD(rp_sync_out, unit_us),
    FD(rp_sync_out, value),
};
static const fdesc reward_fired_f[] = {
    FD(rp_reward_fired, trial_tag),  FD(rp_reward_fired, sample_index),
    FD(rp_reward_fired, t_cross_us), FD(rp_reward_fired, t_valve_us),
    FD(rp_reward_fired, counts),     FD(rp_reward_fired, pulse_us),
};
static const fdesc reward_ended_f[] = {
    FD(rp_reward_ended, trial_tag), FD(rp_reward_ended, t_us), FD(rp_reward_ended, reason),
    FD(rp_reward_ended, next_sample_index),
};
static const fdesc arm_reward_f[] = {
    FD(rp_arm_reward, trial_tag),     FD(rp_arm_reward, rest_counts),
    FD(rp_arm_reward, threshold_counts), FD(rp_arm_reward, rearm_counts),
    FD(rp_arm_reward, direction),     FD(rp_arm_reward, window_end_us),
    FD(rp_arm_reward, pulse_us),
};
static const fdesc disarm_f[] = {FD(rp_disarm, trial_tag)};

/* Adapters so every message fits one table. */
#define ADAPT(name, T, LEN)                                                          \
    static int un_##name(const uint8_t *b, size_t n, void *m)                        \
    {                                                                                \
        return rp_unpack_##name(b, n, (T *)m);                                       \
    }                                                                                \
    static size_t pk_##name(uint8_t *o, const void *m) { return rp_pack_##name(o, (const T *)m); }
ADAPT(hello, rp_hello, RP_HELLO_LEN)
ADAPT(event, rp_event, RP_EVENT_LEN)
ADAPT(pong, rp_pong, RP_PONG_LEN)
ADAPT(ack, rp_ack, RP_ACK_LEN)
ADAPT(fault, rp_fault, RP_FAULT_LEN)
ADAPT(heartbeat, rp_heartbeat, RP_HEARTBEAT_LEN)
ADAPT(configure, rp_configure, RP_CONFIGURE_LEN)
ADAPT(tone, rp_tone, RP_TONE_LEN)
ADAPT(valve_pulse, rp_valve_pulse, RP_VALVE_PULSE_LEN)
ADAPT(valve_open, rp_valve_open, RP_VALVE_OPEN_LEN)
ADAPT(sync_out, rp_sync_out, RP_SYNC_OUT_LEN)
ADAPT(reward_fired, rp_reward_fired, RP_REWARD_FIRED_LEN)
ADAPT(reward_ended, rp_reward_ended, RP_REWARD_ENDED_LEN)
ADAPT(arm_reward, rp_arm_reward, RP_ARM_REWARD_LEN)
ADAPT(disarm, rp_disarm, RP_DISARM_LEN)

typedef struct msgdesc {
    uint8_t type;
    const char *name;
    size_t body_len; /* fixed length; for LeverSamples the header */
    const fdesc *fields;
    size_t nfields;
    int (*unpack)(const uint8_t *, size_t, void *);
    size_t (*pack)(uint8_t *, const void *);
    int seen;
} msgdesc;

#define N(a) (sizeof(a) / sizeof((a)[0]))
#define MSG(t, nm, len, f) {t, #nm, len, f, N(f), un_##nm, pk_##nm, 0}
#define BODYLESS(t, nm) {t, #nm, 0, NULL, 0, NULL, NULL, 0}

static msgdesc messages[] = {
    MSG(RP_T_HELLO, hello, RP_HELLO_LEN, hello_f),
    {RP_T_LEVER_SAMPLES, "lever_samples", RP_LEVER_HEADER_LEN, lever_f, N(lever_f), NULL, NULL, 0},
    MSG(RP_T_EVENT, event, RP_EVENT_LEN, event_f),
    MSG(RP_T_PONG, pong, RP_PONG_LEN, pong_f),
    MSG(RP_T_ACK, ack, RP_ACK_LEN, ack_f),
    MSG(RP_T_FAULT, fault, RP_FAULT_LEN, fault_f),
    MSG(RP_T_HEARTBEAT, heartbeat, RP_HEARTBEAT_LEN, heartbeat_f),
    MSG(RP_T_REWARD_FIRED, reward_fired, RP_REWARD_FIRED_LEN, reward_fired_f),
    MSG(RP_T_REWARD_ENDED, reward_ended, RP_REWARD_ENDED_LEN, reward_ended_f),
    BODYLESS(RP_T_PING, ping),
    MSG(RP_T_CONFIGURE, configure, RP_CONFIGURE_LEN, configure_f),
    MSG(RP_T_TONE, tone, RP_TONE_LEN, tone_f),
    BODYLESS(RP_T_TONE_OFF, tone_off),
    MSG(RP_T_VALVE_PULSE, valve_pulse, RP_VALVE_PULSE_LEN, valve_pulse_f),
    MSG(RP_T_VALVE_OPEN, valve_open, RP_VALVE_OPEN_LEN, valve_open_f),
    BODYLESS(RP_T_VALVE_CLOSE, valve_close),
    MSG(RP_T_SYNC_OUT, sync_out, RP_SYNC_OUT_LEN, sync_out_f),
    BODYLESS(RP_T_HOST_HEARTBEAT, host_heartbeat),
    BODYLESS(RP_T_RESET, reset),
    MSG(RP_T_ARM_REWARD, arm_reward, RP_ARM_REWARD_LEN, arm_reward_f),
    MSG(RP_T_DISARM, disarm, RP_DISARM_LEN, disarm_f),
};

static msgdesc *find_msg(uint8_t type)
{
    size_t i;
    for (i = 0; i < N(messages); i++) {
        if (messages[i].type == type) {
            return &messages[i];
        }
    }
    return NULL;
}

/* ---- vector file parsing ------------------------------------------------ */

#define MAX_KV 16

typedef struct kv {
    char key[64];
    char val[512];
} kv;

static int parse_fields(const char *s, kv *out, size_t max)
{
    size_t n = 0;
    while (*s) {
        const char *semi = strchr(s, ';');
        const char *end = semi ? semi : s + strlen(s);
        const char *eq = memchr(s, '=', (size_t)(end - s));
        size_t klen, vlen;
        if (!eq || n >= max) {
            return -1;
        }
        klen = (size_t)(eq - s);
        vlen = (size_t)(end - eq - 1);
        if (klen >= sizeof out[n].key || vlen >= sizeof out[n].val) {
            return -1;
        }
        memcpy(out[n].key, s, klen);
        out[n].key[klen] = 0;
        memcpy(out[n].val, eq + 1, vlen);
        out[n].val[vlen] = 0;
        n++;
        s = semi ? semi + 1 : end;
    }
    return (int)n;
}

static int parse_u64(const char *s, uint64_t *v)
{
    char *end;
    errno = 0;
    if (s[0] == '-') {
        /* a signed field (i32): two's complement, compared on the field's bytes */
        long long sv = strtoll(s, &end, 10);
        if (errno != 0 || end == s || *end != 0 || sv < INT32_MIN) {
            return -1;
        }
        *v = (uint64_t)(uint32_t)(int32_t)sv;
        return 0;
    }
    *v = strtoull(s, &end, 0);
    return (errno == 0 && end != s && *end == 0) ? 0 : -1;
}

static int parse_counts(const char *s, int32_t *counts, size_t max)
{
    size_t n = 0;
    while (*s) {
        char *end;
        long long v;
        errno = 0;
        v = strtoll(s, &end, 10);
        if (errno || end == s || v < INT32_MIN || v > INT32_MAX || n >= max) {
            return -1;
        }
        counts[n++] = (int32_t)v;
        if (*end == ',') {
            end++;
        } else if (*end != 0) {
            return -1;
        }
        s = end;
    }
    return (int)n;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int parse_hex(const char *s, uint8_t *out, size_t max)
{
    size_t n = 0;
    size_t len = strlen(s);
    if (len % 2) {
        return -1;
    }
    while (*s) {
        int hi = hexval(s[0]);
        int lo = hexval(s[1]);
        if (hi < 0 || lo < 0 || n >= max) {
            return -1;
        }
        out[n++] = (uint8_t)(hi * 16 + lo);
        s += 2;
    }
    return (int)n;
}

/* Split a line on tabs without collapsing empty columns. */
static int split_tabs(char *line, char **cols, int max)
{
    int n = 0;
    char *p = line;
    cols[n++] = p;
    while (*p) {
        if (*p == '\t') {
            *p = 0;
            if (n >= max) {
                return -1;
            }
            cols[n++] = p + 1;
        }
        p++;
    }
    return n;
}

static void dump_hex(const char *label, const uint8_t *b, size_t n)
{
    size_t i;
    fprintf(stderr, "    %s:", label);
    for (i = 0; i < n; i++) {
        fprintf(stderr, "%02x", b[i]);
    }
    fputc('\n', stderr);
}

/* One vector line; returns nonzero on failure. */
static int check_vector(const char *name, const char *dir, const char *type_s, const char *seq_s,
                        const char *fields_s, const char *wire_s)
{
    uint8_t wire[2 * RP_MAX_WIRE_FRAME];
    uint8_t rebuilt[RP_MAX_WIRE_FRAME];
    uint8_t body[RP_MAX_BODY];
    kv kvs[MAX_KV];
    rp_decoder dec;
    rp_frame fr;
    int wire_len, nkv, i, got = 0;
    uint64_t type_u, seq_u;
    msgdesc *m;
    int before = tu_failures;
    size_t rebuilt_len = 0;

    wire_len = parse_hex(wire_s, wire, sizeof wire);
    nkv = parse_fields(fields_s, kvs, MAX_KV);
    CHECKF(wire_len > 0, "%s: bad hex", name);
    CHECKF(nkv >= 0, "%s: bad fields column", name);
    CHECKF(parse_u64(type_s, &type_u) == 0 && type_u <= 0xFF, "%s: bad type", name);
    CHECKF(parse_u64(seq_s, &seq_u) == 0 && seq_u <= 0xFFFF, "%s: bad seq", name);
    if (tu_failures != before) {
        return 1;
    }
    CHECKF((type_u < 0x80) == (strcmp(dir, "device") == 0), "%s: direction %s vs type", name, dir);

    /* decode, byte by byte: exactly one frame, at the last byte */
    rp_decoder_init(&dec);
    memset(&fr, 0, sizeof fr);
    for (i = 0; i < wire_len; i++) {
        int r = rp_decoder_push(&dec, wire[i], &fr);
        if (r == RP_DEC_FRAME) {
            got++;
            CHECKF(i == wire_len - 1, "%s: frame completed at byte %d of %d", name, i, wire_len);
        } else {
            CHECKF(r == RP_DEC_NONE, "%s: decoder dropped the frame (r=%d)", name, r);
        }
    }
    CHECKF(got == 1, "%s: %d frames decoded", name, got);
    if (got != 1) {
        return 1;
    }
    CHECK_EQ(fr.type, type_u);
    CHECK_EQ(fr.seq, seq_u);
    CHECK_EQ(fr.flags, 0);

    m = find_msg(fr.type);
    CHECKF(m != NULL, "%s: type 0x%02x unknown to the test", name, fr.type);
    if (!m) {
        return 1;
    }
    m->seen++;

    if (m->type == RP_T_LEVER_SAMPLES) {
        rp_lever_header h, h2;
        int32_t counts[RP_MAX_SAMPLES_PER_BATCH], want[RP_MAX_SAMPLES_PER_BATCH];
        int nwant = -1, matched = 0;
        CHECK_EQ(rp_unpack_lever_samples(fr.body, fr.body_len, &h, counts), RP_OK);
        CHECK_EQ(fr.body_len, RP_LEVER_HEADER_LEN + 4u * h.count);
        memset(&h2, 0, sizeof h2);
        for (i = 0; i < nkv; i++) {
            size_t j;
            int found = 0;
            if (strcmp(kvs[i].key, "counts") == 0) {
                int k;
                nwant = parse_counts(kvs[i].val, want, RP_MAX_SAMPLES_PER_BATCH);
                CHECKF(nwant == h.count, "%s: count %d vs %d values", name, h.count, nwant);
                for (k = 0; k < nwant && k < h.count; k++) {
                    CHECKF(counts[k] == want[k], "%s: counts[%d] = %ld, want %ld", name, k,
                           (long)counts[k], (long)want[k]);
                }
                matched++;
                continue;
            }
            for (j = 0; j < m->nfields; j++) {
                if (strcmp(kvs[i].key, m->fields[j].name) == 0) {
                    uint64_t v;
                    found = 1;
                    CHECKF(parse_u64(kvs[i].val, &v) == 0, "%s: %s", name, kvs[i].key);
                    CHECKF(get_field(&h, &m->fields[j]) == v, "%s: %s = %llu, want %llu", name,
                           kvs[i].key, (unsigned long long)get_field(&h, &m->fields[j]),
                           (unsigned long long)v);
                    set_field(&h2, &m->fields[j], v);
                    matched++;
                }
            }
            CHECKF(found || strcmp(kvs[i].key, "counts") == 0, "%s: unknown field %s", name,
                   kvs[i].key);
        }
        CHECKF(matched == (int)m->nfields + 1, "%s: %d of %d fields given", name, matched,
               (int)m->nfields + 1);
        if (nwant > 0) {
            h2.count = (uint8_t)nwant;
            /* both frame builders: via a packed body, and streamed */
            rebuilt_len = rp_build_frame(rebuilt, RP_T_LEVER_SAMPLES, (uint16_t)seq_u, body,
                                         rp_pack_lever_samples(body, &h2, want));
            CHECKF(rebuilt_len == (size_t)wire_len && memcmp(rebuilt, wire, rebuilt_len) == 0,
                   "%s: re-encoded (packed body) differs", name);
            rebuilt_len = rp_build_lever_frame(rebuilt, (uint16_t)seq_u, &h2, want);
        }
    } else if (m->nfields == 0) {
        CHECKF(nkv == 0, "%s: fields for a bodyless message", name);
        CHECK_EQ(fr.body_len, 0);
        rebuilt_len = rp_build_frame(rebuilt, m->type, (uint16_t)seq_u, body, 0);
    } else {
        union {
            rp_hello hello; rp_event event; rp_pong pong; rp_ack ack; rp_fault fault;
            rp_heartbeat hb; rp_configure cfg; rp_tone tone; rp_valve_pulse vp;
            rp_valve_open vo; rp_sync_out so; rp_reward_fired rf; rp_reward_ended re;
            rp_arm_reward ar; rp_disarm da;
        } got_s, want_s;
        size_t j, blen;
        int matched = 0;
        memset(&got_s, 0, sizeof got_s);
        memset(&want_s, 0, sizeof want_s);
        CHECK_EQ(fr.body_len, m->body_len);
        CHECK_EQ(m->unpack(fr.body, fr.body_len, &got_s), RP_OK);
        /* a body one byte short must be refused */
        CHECK_EQ(m->unpack(fr.body, m->body_len - 1u, &want_s), RP_ERR_SHORT);
        memset(&want_s, 0, sizeof want_s);
        for (i = 0; i < nkv; i++) {
            int found = 0;
            for (j = 0; j < m->nfields; j++) {
                if (strcmp(kvs[i].key, m->fields[j].name) == 0) {
                    uint64_t v;
                    found = 1;
                    CHECKF(parse_u64(kvs[i].val, &v) == 0, "%s: %s", name, kvs[i].key);
                    CHECKF(get_field(&got_s, &m->fields[j]) == v, "%s: %s = %llu, want %llu",
                           name, kvs[i].key,
                           (unsigned long long)get_field(&got_s, &m->fields[j]),
                           (unsigned long long)v);
                    set_field(&want_s, &m->fields[j], v);
                    matched++;
                }
            }
            CHECKF(found, "%s: unknown field %s", name, kvs[i].key);
        }
        CHECKF(matched == (int)m->nfields, "%s: %d of %d fields given", name, matched,
               (int)m->nfields);
        blen = m->pack(body, &want_s);
        CHECK_EQ(blen, m->body_len);
        rebuilt_len = rp_build_frame(rebuilt, m->type, (uint16_t)seq_u, body, blen);
    }

    CHECKF(rebuilt_len == (size_t)wire_len && memcmp(rebuilt, wire, rebuilt_len) == 0,
           "%s: re-encoded frame differs", name);
    if (tu_failures != before) {
        dump_hex("want", wire, (size_t)wire_len);
        dump_hex("got ", rebuilt, rebuilt_len);
        return 1;
    }
    return 0;
}

static const char *vectors_path = NULL;

static void test_vectors(void)
{
    FILE *f = fopen(vectors_path, "r");
    char line[4096];
    int lines = 0, header = 0, failed = 0;
    size_t i;
    /* all frames of the file as one stream, to check back-to-back decoding */
    static uint8_t stream[64 * RP_MAX_WIRE_FRAME];
    size_t stream_len = 0;
    int stream_frames = 0;
    rp_decoder dec;
    rp_frame fr;

    CHECKF(f != NULL, "cannot open %s", vectors_path ? vectors_path : "(none)");
    if (!f) {
        return;
    }
    while (fgets(line, sizeof line, f)) {
        char *cols[8];
        int ncols;
        size_t len = strlen(line);
        while (len && (line[len - 1] == '\n' || line[len - 1] == '\r')) {
            line[--len] = 0;
        }
        if (len == 0 || line[0] == '#') {
            continue;
        }
        ncols = split_tabs(line, cols, 8);
        CHECKF(ncols == 6, "line with %d columns: %s", ncols, line);
        if (ncols != 6) {
            continue;
        }
        if (!header) {
            CHECKF(strcmp(cols[0], "name") == 0 && strcmp(cols[5], "wire") == 0,
                   "unexpected header %s ... %s", cols[0], cols[5]);
            header = 1;
            continue;
        }
        lines++;
        if (check_vector(cols[0], cols[1], cols[2], cols[3], cols[4], cols[5])) {
            failed++;
            fprintf(stderr, "    vector %s failed\n", cols[0]);
        } else {
            int n = parse_hex(cols[5], stream + stream_len, sizeof stream - stream_len);
            if (n > 0) {
                stream_len += (size_t)n;
            }
        }
    }
    fclose(f);
    printf("     %d vectors, %d failed\n", lines, failed);
    CHECKF(lines >= 17, "only %d vectors", lines);
    for (i = 0; i < N(messages); i++) {
        CHECKF(messages[i].seen > 0, "no vector for %s (0x%02x)", messages[i].name,
               messages[i].type);
    }
    rp_decoder_init(&dec);
    for (i = 0; i < stream_len; i++) {
        if (rp_decoder_push(&dec, stream[i], &fr) == RP_DEC_FRAME) {
            stream_frames++;
        }
    }
    CHECK_EQ(stream_frames, lines - failed);
    CHECK_EQ(dec.frames_bad, 0);
}

/* ---- CRC ------------------------------------------------------------------ */

static uint16_t crc_bitwise(const uint8_t *p, size_t n)
{
    uint16_t crc = 0xFFFF;
    size_t i;
    int b;
    for (i = 0; i < n; i++) {
        crc ^= (uint16_t)(p[i] << 8);
        for (b = 0; b < 8; b++) {
            crc = (crc & 0x8000) ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
        }
    }
    return crc;
}

static void test_crc(void)
{
    uint8_t data[356];
    size_t i;
    CHECK_EQ(rp_crc16((const uint8_t *)"123456789", 9), 0x29B1);
    CHECK_EQ(rp_crc16(data, 0), 0xFFFF);
    for (i = 0; i < 256; i++) {
        data[i] = (uint8_t)i;
    }
    for (i = 0; i < 100; i++) {
        data[256 + i] = (uint8_t)(i * 7);
    }
    for (i = 0; i <= sizeof data; i++) {
        CHECKF(rp_crc16(data, i) == crc_bitwise(data, i), "length %zu", i);
    }
    /* every table entry */
    for (i = 0; i < 256; i++) {
        uint8_t one = (uint8_t)i;
        uint16_t start = (uint16_t)(0x1234u * i);
        uint16_t want = start;
        int b;
        want ^= (uint16_t)(one << 8);
        for (b = 0; b < 8; b++) {
            want = (want & 0x8000) ? (uint16_t)((want << 1) ^ 0x1021) : (uint16_t)(want << 1);
        }
        CHECK_EQ(rp_crc16_update(start, one), want);
    }
}

/* ---- COBS ----------------------------------------------------------------- */

static void cobs_roundtrip(const uint8_t *data, size_t n)
{
    uint8_t enc[2048];
    size_t m, dlen = 0, i;
    m = rp_cobs_encode(data, n, enc);
    CHECKF(m <= RP_COBS_MAX_ENCODED(n), "n=%zu: %zu > max", n, m);
    for (i = 0; i < m; i++) {
        CHECKF(enc[i] != 0, "n=%zu: zero at %zu", n, i);
    }
    CHECK_EQ(rp_cobs_decode(enc, m, &dlen), 0);
    CHECKF(dlen == n && memcmp(enc, data, n) == 0, "n=%zu: roundtrip differs", n);
}

static void test_cobs(void)
{
    static const struct {
        uint8_t raw[8];
        size_t rn;
        uint8_t enc[8];
        size_t en;
    } known[] = {
        {{0}, 0, {0x01}, 1},
        {{0x00}, 1, {0x01, 0x01}, 2},
        {{0x00, 0x00}, 2, {0x01, 0x01, 0x01}, 3},
        {{0x11, 0x22, 0x00, 0x33}, 4, {0x03, 0x11, 0x22, 0x02, 0x33}, 5},
        {{0x11, 0x00, 0x00, 0x00}, 4, {0x02, 0x11, 0x01, 0x01, 0x01}, 5},
    };
    uint8_t data[700], enc[800];
    size_t i, n, m;
    static const size_t lens[] = {1, 253, 254, 255, 256, 300, 508, 509, 600};

    for (i = 0; i < N(known); i++) {
        n = rp_cobs_encode(known[i].raw, known[i].rn, enc);
        CHECKF(n == known[i].en && memcmp(enc, known[i].enc, n) == 0, "known vector %zu", i);
        cobs_roundtrip(known[i].raw, known[i].rn);
    }

    for (i = 0; i < sizeof data; i++) {
        data[i] = (uint8_t)(i % 255 + 1);
    }
    /* exact encodings around the 254-byte block limit */
    m = rp_cobs_encode(data, 253, enc);
    CHECK_EQ(m, 254);
    CHECK_EQ(enc[0], 0xFE);
    m = rp_cobs_encode(data, 254, enc);
    CHECK_EQ(m, 256);
    CHECK_EQ(enc[0], 0xFF);
    CHECK(memcmp(enc + 1, data, 254) == 0);
    CHECK_EQ(enc[255], 0x01); /* a final empty block, as the Rust encoder writes it */
    m = rp_cobs_encode(data, 255, enc);
    CHECK_EQ(m, 257);
    CHECK_EQ(enc[0], 0xFF);
    CHECK_EQ(enc[255], 0x02);
    CHECK_EQ(enc[256], data[254]);

    for (i = 0; i < N(lens); i++) {
        cobs_roundtrip(data, lens[i]);
        data[lens[i] / 2] = 0;
        cobs_roundtrip(data, lens[i]);
        data[lens[i] / 2] = (uint8_t)(lens[i] / 2 % 255 + 1);
    }
    /* a zero right after a full block */
    data[254] = 0;
    cobs_roundtrip(data, 300);
    data[254] = 1;

    /* invalid input */
    {
        uint8_t a[] = {0x05, 0x01};
        uint8_t b[] = {0x03, 0x00, 0x01};
        uint8_t c[] = {0x00};
        size_t out = 0;
        CHECK_EQ(rp_cobs_decode(a, sizeof a, &out), RP_COBS_ERR_TRUNCATED);
        CHECK_EQ(rp_cobs_decode(b, sizeof b, &out), RP_COBS_ERR_ZERO);
        CHECK_EQ(rp_cobs_decode(c, sizeof c, &out), RP_COBS_ERR_ZERO);
    }
}

/* ---- frame writer --------------------------------------------------------- */

static void test_writer(void)
{
    uint8_t body[RP_MAX_BODY + 1];
    uint8_t raw[RP_MAX_RAW_FRAME + 8];
    uint8_t wire[RP_MAX_WIRE_FRAME];
    uint8_t want[RP_MAX_WIRE_FRAME + 8];
    size_t len, i;
    uint32_t x = 12345;

    for (len = 0; len <= RP_MAX_BODY; len++) {
        size_t n, m;
        uint16_t crc;
        for (i = 0; i < len; i++) {
            x = x * 1103515245u + 12345u;
            body[i] = (uint8_t)((x >> 16) % 5 == 0 ? 0 : (x >> 8)); /* some zeros */
        }
        /* the one-shot way: raw frame, then COBS */
        raw[0] = 0x42;
        raw[1] = 0;
        rp_put_u16(raw + 2, (uint16_t)(len * 77u));
        memcpy(raw + 4, body, len);
        crc = rp_crc16(raw, 4 + len);
        rp_put_u16(raw + 4 + len, crc);
        want[0] = 0; /* leading delimiter */
        m = 1 + rp_cobs_encode(raw, 6 + len, want + 1);
        want[m++] = 0;
        n = rp_build_frame(wire, 0x42, (uint16_t)(len * 77u), body, len);
        CHECKF(n == m && memcmp(wire, want, n) == 0, "body length %zu", len);
        CHECKF(n <= RP_MAX_WIRE_FRAME, "body length %zu: %zu bytes", len, n);
    }
    CHECK_EQ(rp_build_frame(wire, 0x42, 0, body, RP_MAX_BODY + 1), 0);

    /* the longest frame, all non-zero: 256 raw bytes -> 0x00, 258 COBS bytes, 0x00 */
    for (i = 0; i < RP_MAX_BODY; i++) {
        body[i] = (uint8_t)(i % 250 + 1);
    }
    len = rp_build_frame(wire, 0x7F, 0x0101, body, RP_MAX_BODY);
    CHECK(len >= 258 && len <= RP_MAX_WIRE_FRAME);
    {
        rp_decoder dec;
        rp_frame f;
        int r = RP_DEC_NONE;
        rp_decoder_init(&dec);
        for (i = 0; i < len; i++) {
            r = rp_decoder_push(&dec, wire[i], &f);
        }
        CHECK_EQ(r, RP_DEC_FRAME);
        CHECK_EQ(f.body_len, RP_MAX_BODY);
        CHECK(memcmp(f.body, body, RP_MAX_BODY) == 0);
    }

    /* little-endian helpers */
    {
        uint8_t b[8];
        rp_put_u32(b, 0x12345678ul);
        CHECK(b[0] == 0x78 && b[1] == 0x56 && b[2] == 0x34 && b[3] == 0x12);
        rp_put_u64(b, 0x0123456789ABCDEFull);
        CHECK(b[0] == 0xEF && b[7] == 0x01);
        CHECK_EQ(rp_get_u64(b), 0x0123456789ABCDEFull);
        CHECK_EQ(rp_get_u16(b), 0xCDEF);
    }
}

/* ---- decoder ----------------------------------------------------------- */

static int feed(rp_decoder *d, const uint8_t *p, size_t n, rp_frame *last, int *bad)
{
    size_t i;
    int frames = 0;
    for (i = 0; i < n; i++) {
        int r = rp_decoder_push(d, p[i], last);
        if (r == RP_DEC_FRAME) {
            frames++;
        } else if (r == RP_DEC_BAD && bad) {
            (*bad)++;
        }
    }
    return frames;
}

static void test_decoder(void)
{
    rp_decoder d;
    rp_frame f;
    uint8_t good[RP_MAX_WIRE_FRAME], body[4] = {1, 0, 2, 3}, junk[600];
    size_t glen = rp_build_frame(good, RP_T_VALVE_PULSE, 7, body, sizeof body);
    int bad = 0;
    size_t i;

    rp_decoder_init(&d);
    /* empty frames are ignored, not counted */
    {
        uint8_t zeros[3] = {0, 0, 0};
        CHECK_EQ(feed(&d, zeros, 3, &f, &bad), 0);
        CHECK_EQ(bad, 0);
        CHECK_EQ(d.frames_bad, 0);
    }
    /* a clean frame */
    CHECK_EQ(feed(&d, good, glen, &f, &bad), 1);
    CHECK_EQ(f.type, RP_T_VALVE_PULSE);
    CHECK_EQ(f.seq, 7);
    CHECK_EQ(f.body_len, 4);
    CHECK(memcmp(f.body, body, 4) == 0);

    /* garbage before the frame (no delimiter in it): the frame's leading
     * delimiter ends the garbage, which is dropped; the frame itself is fine */
    for (i = 0; i < 20; i++) {
        junk[i] = (uint8_t)(i * 13 + 1);
    }
    bad = 0;
    CHECK_EQ(feed(&d, junk, 20, &f, &bad), 0);
    CHECK_EQ(feed(&d, good, glen, &f, &bad), 1);
    CHECK_EQ(bad, 1);
    CHECK_EQ(feed(&d, good, glen, &f, &bad), 1);
    /* the host's resync habit: 0x00 first, then the frame */
    {
        uint8_t z = 0;
        CHECK_EQ(feed(&d, junk, 20, &f, &bad), 0);
        CHECK_EQ(feed(&d, &z, 1, &f, &bad), 0);
        CHECK_EQ(feed(&d, good, glen, &f, &bad), 1);
        CHECK_EQ(bad, 2);
    }

    /* a corrupted byte: CRC error, counted; next frame fine */
    {
        uint8_t broken[RP_MAX_WIRE_FRAME];
        uint32_t before = d.crc_errors;
        memcpy(broken, good, glen);
        broken[3] ^= 0x40;
        if (broken[3] == 0) {
            broken[3] = 0x40;
        }
        bad = 0;
        CHECK_EQ(feed(&d, broken, glen, &f, &bad), 0);
        CHECK_EQ(bad, 1);
        CHECK(d.crc_errors + d.cobs_errors > before);
        CHECK_EQ(feed(&d, good, glen, &f, &bad), 1);
    }

    /* oversize: 600 non-zero bytes, then the frame */
    {
        uint32_t before = d.oversize;
        for (i = 0; i < sizeof junk; i++) {
            junk[i] = (uint8_t)(i % 200 + 1);
        }
        junk[sizeof junk - 1] = 0;
        bad = 0;
        CHECK_EQ(feed(&d, junk, sizeof junk, &f, &bad), 0);
        CHECK_EQ(bad, 1);
        CHECK_EQ(d.oversize, before + 1);
        CHECK_EQ(feed(&d, good, glen, &f, &bad), 1);
    }

    /* exactly at the buffer limit: 259 bytes pass, 260 are oversize */
    {
        uint32_t before = d.oversize;
        for (i = 0; i < RP_DECODER_BUF; i++) {
            junk[i] = 1; /* 259 empty COBS blocks -> 258 zeros: too long raw */
        }
        junk[RP_DECODER_BUF] = 0;
        CHECK_EQ(feed(&d, junk, RP_DECODER_BUF + 1, &f, NULL), 0);
        CHECK_EQ(d.oversize, before + 1); /* raw 258 > 256 */
        junk[RP_DECODER_BUF] = 1;
        junk[RP_DECODER_BUF + 1] = 0;
        CHECK_EQ(feed(&d, junk, RP_DECODER_BUF + 2, &f, NULL), 0);
        CHECK_EQ(d.oversize, before + 2);
        CHECK_EQ(feed(&d, good, glen, &f, NULL), 1);
    }

    /* runt: a valid COBS frame of 5 bytes */
    {
        uint8_t raw[5] = {0x81, 0, 1, 0, 0x55}, enc[16];
        size_t n = rp_cobs_encode(raw, 5, enc);
        uint32_t before = d.runts;
        enc[n++] = 0;
        CHECK_EQ(feed(&d, enc, n, &f, NULL), 0);
        CHECK_EQ(d.runts, before + 1);
    }

    /* invalid COBS: a code byte pointing past the end */
    {
        uint8_t bytes[3] = {0x09, 0x01, 0x00};
        uint32_t before = d.cobs_errors;
        CHECK_EQ(feed(&d, bytes, 3, &f, NULL), 0);
        CHECK_EQ(d.cobs_errors, before + 1);
    }

    /* both delimiters between two frames lost: they merge into one bad
     * frame; the one after is fine */
    {
        uint8_t two[2 * RP_MAX_WIRE_FRAME];
        memcpy(two, good, glen - 1);           /* no closing delimiter */
        memcpy(two + glen - 1, good + 1, glen - 1); /* no leading one */
        bad = 0;
        CHECK_EQ(feed(&d, two, 2 * glen - 2, &f, &bad), 0);
        CHECK_EQ(bad, 1);
        CHECK_EQ(feed(&d, good, glen, &f, &bad), 1);
    }

    CHECK_EQ(d.frames_bad, d.cobs_errors + d.runts + d.oversize + d.crc_errors);

    /* every prefix of random noise, then a frame: never more than the noise lost */
    {
        uint32_t x = 99;
        int k;
        for (k = 0; k < 200; k++) {
            size_t n = (size_t)(k * 3 % 400);
            for (i = 0; i < n; i++) {
                x = x * 1664525u + 1013904223u;
                junk[i] = (uint8_t)(x >> 24);
            }
            feed(&d, junk, n, &f, NULL);
            {
                uint8_t z = 0;
                feed(&d, &z, 1, &f, NULL);
            }
            CHECKF(feed(&d, good, glen, &f, NULL) == 1, "after %zu bytes of noise", n);
        }
    }

    /* short bodies are refused, longer ones accepted */
    {
        rp_valve_pulse vp;
        uint8_t longer[8] = {0x10, 0x27, 0, 0, 0xAA, 0xBB, 0, 0};
        CHECK_EQ(rp_unpack_valve_pulse(longer, 3, &vp), RP_ERR_SHORT);
        CHECK_EQ(rp_unpack_valve_pulse(longer, 8, &vp), RP_OK);
        CHECK_EQ(vp.duration_us, 10000);
    }
    /* lever batch counts */
    {
        uint8_t b[RP_LEVER_HEADER_LEN + 8];
        rp_lever_header h;
        int32_t c[RP_MAX_SAMPLES_PER_BATCH];
        int32_t two[2] = {-5, 5};
        h.first_index = 1;
        h.t_first_us = 2;
        h.period_us = 3;
        h.count = 2;
        CHECK_EQ(rp_pack_lever_samples(b, &h, two), sizeof b);
        CHECK_EQ(rp_unpack_lever_samples(b, sizeof b, &h, c), RP_OK);
        CHECK(c[0] == -5 && c[1] == 5);
        CHECK_EQ(rp_unpack_lever_samples(b, sizeof b - 1, &h, c), RP_ERR_BAD_COUNT);
        b[10] = 0;
        CHECK_EQ(rp_unpack_lever_samples(b, sizeof b, &h, c), RP_ERR_BAD_COUNT);
        b[10] = 51;
        CHECK_EQ(rp_unpack_lever_samples(b, sizeof b, &h, c), RP_ERR_BAD_COUNT);
        CHECK_EQ(rp_unpack_lever_samples(b, 10, &h, c), RP_ERR_SHORT);
        h.count = 0;
        CHECK_EQ(rp_build_lever_frame(junk, 0, &h, two), 0);
        h.count = 51;
        CHECK_EQ(rp_build_lever_frame(junk, 0, &h, two), 0);
    }
    /* the biggest lever frame fits the wire limit */
    {
        int32_t c[RP_MAX_SAMPLES_PER_BATCH];
        rp_lever_header h = {0, 0, 100, RP_MAX_SAMPLES_PER_BATCH};
        for (i = 0; i < RP_MAX_SAMPLES_PER_BATCH; i++) {
            c[i] = (int32_t)(i * 0x01010101u);
        }
        CHECK(rp_build_lever_frame(junk, 0xFFFF, &h, c) <= RP_MAX_WIRE_FRAME);
    }
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s protocol/tests/vectors/serial.tsv\n", argv[0]);
        return 2;
    }
    vectors_path = argv[1];
    RUN(test_vectors);
    RUN(test_crc);
    RUN(test_cobs);
    RUN(test_writer);
    RUN(test_decoder);
    return tu_report("test_rigproto");
}
