/*
 * Host tests of the device logic (rigdevice.c) with a fake HAL and a fake
 * microsecond clock. Everything the device sends is decoded with the C
 * decoder and checked against docs/protocol.md section 1.
 *
 * The fake "hardware" is driven by advance(): it moves the clock in small
 * steps, calls rd_tick() at every tick (as the timer interrupt would),
 * delivers lever samples at the sampling period (as the sampling timer
 * interrupt would), and runs rd_poll() (the main loop).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rigdevice.h"
#include "rigproto.h"
#include "testutil.h"

/* ---- fake hardware ------------------------------------------------------ */

#define MAX_CAPTURED 20000
#define MAX_EDGES 4096

typedef struct captured {
    uint8_t type;
    uint16_t seq;
    uint16_t body_len;
    uint8_t body[RP_MAX_BODY];
    uint32_t t_sent; /* fake clock when it was handed to tx_frame */
} captured;

typedef struct edge {
    uint32_t t;
    uint8_t level;
} edge;

static struct {
    uint32_t now;
    uint8_t valve;
    uint8_t sync;
    uint8_t tone;
    uint32_t tone_freq;
    uint8_t tone_level;
    uint32_t tone_starts;
    uint32_t tone_stops;
    uint16_t tx_free;
    uint32_t tx_bytes;
    uint32_t tx_delimiters_alone;
    int irq_depth;
    int irq_violations;
    /* sampling timer */
    uint8_t sampling;
    uint32_t period;
    uint32_t next_sample;
    uint32_t sample_starts;
    int32_t encoder;
    /* logs */
    edge valve_edges[MAX_EDGES];
    int n_valve_edges;
    edge sync_edges[MAX_EDGES];
    int n_sync_edges;
    /* decoded device output */
    rp_decoder dec;
    captured *frames;
    int n_frames;
    int cursor;
} hw;

static rd_device dev;
static uint16_t host_seq = 1;

static uint32_t f_now(void) { return hw.now; }

static void log_edge(edge *log, int *n, uint8_t level)
{
    if (*n > 0 && log[*n - 1].level == level) {
        return; /* not an edge */
    }
    if (*n == 0 && level == 0) {
        return; /* idle low at start */
    }
    if (*n < MAX_EDGES) {
        log[*n].t = hw.now;
        log[*n].level = level;
        (*n)++;
    }
}

static void f_set_valve(uint8_t open)
{
    log_edge(hw.valve_edges, &hw.n_valve_edges, open ? 1 : 0);
    hw.valve = open ? 1 : 0;
}

static void f_tone_start(uint32_t f, uint8_t level)
{
    hw.tone = 1;
    hw.tone_freq = f;
    hw.tone_level = level;
    hw.tone_starts++;
}

static void f_tone_stop(void)
{
    hw.tone = 0;
    hw.tone_stops++;
}

static void f_set_sync(uint8_t high)
{
    log_edge(hw.sync_edges, &hw.n_sync_edges, high ? 1 : 0);
    hw.sync = high ? 1 : 0;
}

static uint16_t f_tx_free(void) { return hw.tx_free; }

static uint8_t f_tx_frame(const uint8_t *b, uint16_t len)
{
    uint16_t i;
    if (hw.irq_depth != 0) {
        hw.irq_violations++; /* never transmit with interrupts off */
    }
    if (len > hw.tx_free) {
        return 0;
    }
    if (len == 1 && b[0] == 0) {
        hw.tx_delimiters_alone++;
    }
    hw.tx_bytes += len;
    for (i = 0; i < len; i++) {
        rp_frame fr;
        if (rp_decoder_push(&hw.dec, b[i], &fr) == RP_DEC_FRAME) {
            if (hw.n_frames < MAX_CAPTURED) {
                captured *c = &hw.frames[hw.n_frames++];
                c->type = fr.type;
                c->seq = fr.seq;
                c->body_len = fr.body_len;
                memcpy(c->body, fr.body, fr.body_len);
                c->t_sent = hw.now;
            }
        }
    }
    return 1;
}

static void f_sampler_start(uint32_t period)
{
    hw.sampling = 1;
    hw.period = period;
    hw.next_sample = hw.now + period;
    hw.sample_starts++;
}

static void f_sampler_stop(void) { hw.sampling = 0; }

static uint8_t f_irq_save(void)
{
    hw.irq_depth++;
    return 1;
}

static void f_irq_restore(uint8_t s)
{
    (void)s;
    hw.irq_depth--;
}

static const rd_hal fake_hal = {
    f_now,        f_set_valve,     f_tone_start,   f_tone_stop, f_set_sync, f_tx_free,
    f_tx_frame,   f_sampler_start, f_sampler_stop, f_irq_save,  f_irq_restore,
};

static const rd_info fake_info = {
    0x0123456789ABCDEFull,
    RP_CAP_LEVER | RP_CAP_LICK | RP_CAP_VALVE | RP_CAP_TONE | RP_CAP_FRAME_TTL | RP_CAP_SYNC_OUT,
    10000,
    100,
    40000,
};

/* The lever position the fake encoder reports at time t. */
static int32_t encoder_at(uint32_t t)
{
    return (int32_t)(t / 1000u % 1000u) - 500;
}

static void boot(uint32_t t0)
{
    static captured store[MAX_CAPTURED];
    memset(&hw, 0, sizeof hw);
    hw.frames = store;
    hw.now = t0;
    hw.tx_free = 4096;
    rp_decoder_init(&hw.dec);
    host_seq = 1;
    rd_init(&dev, &fake_hal, &fake_info);
}

/* Run the fake hardware for `us` microseconds: a tick every tick_us, samples
 * at the sampling period, the main loop after every step. */
static void advance_tick(uint32_t us, uint32_t tick_us)
{
    uint32_t end = hw.now + us;
    uint32_t next_tick = hw.now + tick_us;
    while ((uint32_t)(end - hw.now) < 0x80000000u && hw.now != end) {
        uint32_t step = end - hw.now;
        if ((uint32_t)(next_tick - hw.now) < step) {
            step = next_tick - hw.now;
        }
        if (hw.sampling && (uint32_t)(hw.next_sample - hw.now) < step) {
            step = hw.next_sample - hw.now;
        }
        if (step == 0) {
            step = 1;
        }
        hw.now += step;
        if (hw.sampling && hw.now == hw.next_sample) {
            rd_isr_lever_sample(&dev, hw.now, encoder_at(hw.now));
            hw.next_sample += hw.period;
        }
        if (hw.now == next_tick) {
            rd_tick(&dev);
            next_tick += tick_us;
        }
        rd_poll(&dev);
    }
}

static void advance(uint32_t us) { advance_tick(us, 100); }

/* Send a host frame, byte by byte, as the main loop would receive it. */
static uint16_t send_raw(uint8_t type, const uint8_t *body, size_t len)
{
    uint8_t wire[RP_MAX_WIRE_FRAME];
    size_t n = rp_build_frame(wire, type, host_seq, body, len), i;
    for (i = 0; i < n; i++) {
        rd_rx_byte(&dev, wire[i], hw.now);
    }
    rd_poll(&dev);
    return host_seq++;
}

static uint16_t send0(uint8_t type) { return send_raw(type, NULL, 0); }

static uint16_t send_configure(uint32_t rate, uint8_t batch, uint16_t hb, uint16_t timeout,
                               uint16_t max_valve, uint16_t max_flush)
{
    uint8_t b[RP_CONFIGURE_LEN];
    rp_configure c;
    c.sample_rate_hz = rate;
    c.samples_per_batch = batch;
    c.heartbeat_interval_ms = hb;
    c.heartbeat_timeout_ms = timeout;
    c.max_valve_open_ms = max_valve;
    c.max_flush_ms = max_flush;
    return send_raw(RP_T_CONFIGURE, b, rp_pack_configure(b, &c));
}

static uint16_t send_pulse(uint32_t us)
{
    uint8_t b[4];
    rp_valve_pulse p;
    p.duration_us = us;
    return send_raw(RP_T_VALVE_PULSE, b, rp_pack_valve_pulse(b, &p));
}

static uint16_t send_flush(uint16_t ms)
{
    uint8_t b[2];
    rp_valve_open v;
    v.max_ms = ms;
    return send_raw(RP_T_VALVE_OPEN, b, rp_pack_valve_open(b, &v));
}

static uint16_t send_tone(uint32_t f, uint16_t ms, uint8_t level)
{
    uint8_t b[RP_TONE_LEN];
    rp_tone t;
    t.frequency_hz = f;
    t.duration_ms = ms;
    t.level_pct = level;
    return send_raw(RP_T_TONE, b, rp_pack_tone(b, &t));
}

static uint16_t send_sync(uint8_t mode, uint8_t nbits, uint16_t unit, uint32_t value)
{
    uint8_t b[RP_SYNC_OUT_LEN];
    rp_sync_out s;
    s.mode = mode;
    s.nbits = nbits;
    s.unit_us = unit;
    s.value = value;
    return send_raw(RP_T_SYNC_OUT, b, rp_pack_sync_out(b, &s));
}

/* Keep the host alive while time passes: a HostHeartbeat every 100 ms. */
static void advance_fed(uint32_t us)
{
    while (us > 0) {
        uint32_t step = us > 100000u ? 100000u : us;
        advance(step);
        us -= step;
        send0(RP_T_HOST_HEARTBEAT);
    }
}

/* ---- looking at what the device sent ------------------------------------ */

static void skip_all(void) { hw.cursor = hw.n_frames; }

/* Frames that come and go with time, skipped when looking for the next
 * interesting one: Heartbeats, LeverSamples, and the Acks of the
 * HostHeartbeats that advance_fed() sends. */
static int is_noise(const captured *c)
{
    return c->type == RP_T_HEARTBEAT || c->type == RP_T_LEVER_SAMPLES ||
           (c->type == RP_T_ACK && c->body_len >= 3 && c->body[2] == RP_T_HOST_HEARTBEAT);
}

/* The next frame of `type`, skipping noise; NULL if something else comes first. */
static const captured *next_of(uint8_t type)
{
    while (hw.cursor < hw.n_frames) {
        const captured *c = &hw.frames[hw.cursor++];
        if (c->type == type && !is_noise(c)) {
            return c;
        }
        if (is_noise(c)) {
            continue;
        }
        fprintf(stderr, "    expected type 0x%02x, got 0x%02x (frame %d)\n", type, c->type,
                hw.cursor - 1);
        return NULL;
    }
    fprintf(stderr, "    expected type 0x%02x, no more frames\n", type);
    return NULL;
}

/* No further frame except noise. */
static int nothing_more(void)
{
    int i;
    for (i = hw.cursor; i < hw.n_frames; i++) {
        if (!is_noise(&hw.frames[i])) {
            fprintf(stderr, "    unexpected frame type 0x%02x\n", hw.frames[i].type);
            return 0;
        }
    }
    return 1;
}

static int expect_ack(uint16_t seq, uint8_t type, uint8_t status)
{
    rp_ack a;
    while (hw.cursor < hw.n_frames) {
        const captured *c = &hw.frames[hw.cursor++];
        if (c->type == RP_T_ACK && rp_unpack_ack(c->body, c->body_len, &a) == RP_OK &&
            a.acked_seq == seq) {
            if (a.acked_type != type || a.status != status) {
                fprintf(stderr, "    ack seq %u type 0x%02x status %u, want 0x%02x %u\n",
                        a.acked_seq, a.acked_type, a.status, type, status);
                return 0;
            }
            return 1;
        }
        if (is_noise(c)) {
            continue;
        }
        fprintf(stderr, "    expected the ack of %u, got type 0x%02x (frame %d)\n", seq, c->type,
                hw.cursor - 1);
        return 0;
    }
    fprintf(stderr, "    expected the ack of %u, no more frames\n", seq);
    return 0;
}

static int expect_event(uint8_t kind, uint16_t aux, rp_event *out)
{
    const captured *c = next_of(RP_T_EVENT);
    rp_event e;
    if (!c || rp_unpack_event(c->body, c->body_len, &e) != RP_OK) {
        return 0;
    }
    if (e.kind != kind || e.aux != aux) {
        fprintf(stderr, "    event kind %u aux %u, want %u %u\n", e.kind, e.aux, kind, aux);
        return 0;
    }
    if (out) {
        *out = e;
    }
    return 1;
}

static int expect_fault(uint16_t code, rp_fault *out)
{
    const captured *c = next_of(RP_T_FAULT);
    rp_fault f;
    if (!c || rp_unpack_fault(c->body, c->body_len, &f) != RP_OK) {
        return 0;
    }
    if (f.code != code) {
        fprintf(stderr, "    fault code %u, want %u\n", f.code, code);
        return 0;
    }
    if (out) {
        *out = f;
    }
    return 1;
}

static int last_heartbeat(rp_heartbeat *hb)
{
    int i;
    for (i = hw.n_frames - 1; i >= 0; i--) {
        if (hw.frames[i].type == RP_T_HEARTBEAT) {
            return rp_unpack_heartbeat(hw.frames[i].body, hw.frames[i].body_len, hb) == RP_OK;
        }
    }
    return 0;
}

/* Device seq increments by exactly 1 per frame sent. */
static int seqs_contiguous(void)
{
    int i;
    for (i = 1; i < hw.n_frames; i++) {
        if (hw.frames[i].seq != (uint16_t)(hw.frames[i - 1].seq + 1u)) {
            fprintf(stderr, "    seq %u after %u\n", hw.frames[i].seq, hw.frames[i - 1].seq);
            return 0;
        }
    }
    return 1;
}

/* Handshake as the host does it: Reset, Hello, Configure. */
static void connect(uint32_t rate, uint8_t batch, uint16_t max_valve, uint16_t max_flush)
{
    uint16_t s;
    skip_all();
    s = send0(RP_T_RESET);
    CHECK(expect_ack(s, RP_T_RESET, RP_ACK_OK));
    CHECK(next_of(RP_T_HELLO) != NULL);
    s = send_configure(rate, batch, 100, 500, max_valve, max_flush);
    CHECK(expect_ack(s, RP_T_CONFIGURE, RP_ACK_OK));
}

/* ---- tests -------------------------------------------------------------- */

static void test_boot_hello(void)
{
    const captured *c;
    rp_hello h;
    boot(5000);
    CHECK_EQ(hw.tx_delimiters_alone, 1); /* a lone 0x00 before anything */
    CHECK_EQ(hw.valve, 0);
    CHECK_EQ(hw.sync, 0);
    CHECK(hw.tone_stops >= 1);
    CHECK_EQ(hw.n_frames, 1);
    c = next_of(RP_T_HELLO);
    CHECK(c != NULL);
    if (!c) {
        return;
    }
    CHECK_EQ(c->seq, 0);
    CHECK_EQ(c->body_len, RP_HELLO_LEN);
    CHECK_EQ(rp_unpack_hello(c->body, c->body_len, &h), RP_OK);
    CHECK_EQ(h.protocol_version, RP_PROTOCOL_VERSION);
    CHECK_EQ(h.firmware_major, RD_FW_MAJOR);
    CHECK_EQ(h.device_id, 0x0123456789ABCDEFull);
    CHECK_EQ(h.clock_hz, 1000000);
    CHECK_EQ(h.capabilities, 0x3F);
    CHECK_EQ(h.max_sample_rate_hz, 10000);
    CHECK_EQ(h.hard_max_valve_open_ms, RIG_HARD_MAX_VALVE_OPEN_MS);
    CHECK_EQ(h.t_us, 5000);
}

static void test_handshake_and_heartbeat(void)
{
    rp_heartbeat hb;
    uint16_t s;
    int i, beats = 0;
    boot(0);
    skip_all();
    /* before Configure: a heartbeat every 1000 ms */
    advance_fed(1000000);
    CHECK(last_heartbeat(&hb));
    CHECK_EQ(hb.state, 0);
    CHECK_EQ(hb.t_us, 1000000);
    /* Reset: Ack, then Hello */
    s = send0(RP_T_RESET);
    CHECK(expect_ack(s, RP_T_RESET, RP_ACK_OK));
    CHECK(next_of(RP_T_HELLO) != NULL);
    /* Configure without streaming; heartbeat every 100 ms */
    s = send_configure(0, 1, 100, 500, 200, 5000);
    CHECK(expect_ack(s, RP_T_CONFIGURE, RP_ACK_OK));
    CHECK_EQ(hw.sample_starts, 0);
    skip_all();
    advance_fed(1000000);
    for (i = hw.cursor; i < hw.n_frames; i++) {
        if (hw.frames[i].type == RP_T_HEARTBEAT) {
            beats++;
        }
    }
    CHECKF(beats == 10, "%d heartbeats in 1 s", beats);
    /* Ping is answered by a Pong, not an Ack */
    CHECK(nothing_more());
    s = send0(RP_T_PING);
    {
        const captured *c = next_of(RP_T_PONG);
        rp_pong p;
        skip_all();
        CHECK(c != NULL);
        if (c) {
            CHECK_EQ(rp_unpack_pong(c->body, c->body_len, &p), RP_OK);
            CHECK_EQ(p.ping_seq, s);
            CHECK_EQ(p.t_rx_us, hw.now);
            CHECK(p.t_tx_us >= p.t_rx_us);
        }
    }
    CHECK(seqs_contiguous());
    CHECK_EQ(hw.irq_violations, 0);
    CHECK_EQ(hw.irq_depth, 0);
}

static void test_unknown_and_bad_frames(void)
{
    uint16_t s;
    rp_fault f;
    rp_heartbeat hb;
    uint8_t wire[RP_MAX_WIRE_FRAME];
    size_t n, i;
    boot(0);
    skip_all();
    s = send0(0x90);
    CHECK(expect_ack(s, 0x90, RP_ACK_UNKNOWN_COMMAND));
    /* a device -> host type is not a command: ignored, no Ack, and it does
     * not feed the watchdog */
    advance(600000);
    send0(RP_T_ACK);
    send0(RP_T_HELLO);
    advance(500000);
    CHECK(rd_state(&dev) & RP_STATE_SAFE);
    CHECK(expect_event(RP_EV_SAFE_STATE, RP_CAUSE_WATCHDOG, NULL));
    CHECK(expect_fault(RP_FAULT_WATCHDOG_TRIPPED, NULL));
    CHECK(nothing_more());
    s = send0(RP_T_HOST_HEARTBEAT);
    CHECK(expect_event(RP_EV_SAFE_STATE_CLEARED, 0, NULL));
    CHECK(expect_ack(s, RP_T_HOST_HEARTBEAT, RP_ACK_OK));
    /* short bodies */
    s = send_raw(RP_T_VALVE_PULSE, (const uint8_t *)"\x10\x27", 2);
    CHECK(expect_ack(s, RP_T_VALVE_PULSE, RP_ACK_BAD_LENGTH));
    s = send0(RP_T_CONFIGURE);
    CHECK(expect_ack(s, RP_T_CONFIGURE, RP_ACK_BAD_LENGTH));
    s = send0(RP_T_TONE);
    CHECK(expect_ack(s, RP_T_TONE, RP_ACK_BAD_LENGTH));
    s = send0(RP_T_VALVE_OPEN);
    CHECK(expect_ack(s, RP_T_VALVE_OPEN, RP_ACK_BAD_LENGTH));
    s = send0(RP_T_SYNC_OUT);
    CHECK(expect_ack(s, RP_T_SYNC_OUT, RP_ACK_BAD_LENGTH));
    CHECK_EQ(hw.n_valve_edges, 0);
    CHECK(nothing_more());

    /* a frame with a bad CRC: no Ack, a Fault RxFrameBad, counted */
    n = rp_build_frame(wire, RP_T_VALVE_CLOSE, 77, NULL, 0);
    wire[n - 2] ^= 0x01;
    if (wire[n - 2] == 0) {
        wire[n - 2] = 0x55;
    }
    for (i = 0; i < n; i++) {
        rd_rx_byte(&dev, wire[i], hw.now);
    }
    rd_poll(&dev);
    CHECK(expect_fault(RP_FAULT_RX_FRAME_BAD, &f));
    CHECK_EQ(f.detail, 1);
    CHECK(nothing_more());
    /* garbage without a delimiter merges with the next frame: both are one
     * bad frame (no Ack); the frame after that is fine */
    for (i = 0; i < 50; i++) {
        rd_rx_byte(&dev, (uint8_t)(i * 37 + 1), hw.now);
    }
    send0(RP_T_HOST_HEARTBEAT);
    CHECK(nothing_more());
    s = send0(RP_T_HOST_HEARTBEAT);
    CHECK(expect_ack(s, RP_T_HOST_HEARTBEAT, RP_ACK_OK));
    advance_fed(1000000);
    CHECK(last_heartbeat(&hb));
    CHECK_EQ(hb.rx_frames_bad, 2);
    CHECK_EQ(hb.tx_frames_dropped, 0);
    /* a longer body than defined is accepted (fields appended later) */
    {
        uint8_t b[RP_CONFIGURE_LEN + 5];
        rp_configure c = {0, 1, 100, 500, 200, 5000};
        rp_pack_configure(b, &c);
        memset(b + RP_CONFIGURE_LEN, 0xEE, 5);
        skip_all();
        s = send_raw(RP_T_CONFIGURE, b, sizeof b);
        CHECK(expect_ack(s, RP_T_CONFIGURE, RP_ACK_OK));
    }
    CHECK(seqs_contiguous());
}

static void test_configure_validation(void)
{
    static const struct {
        uint32_t rate;
        uint8_t batch;
        uint16_t hb, timeout, max_valve, max_flush;
    } bad[] = {
        {3, 1, 100, 500, 200, 5000},     /* does not divide 1e6 */
        {999, 1, 100, 500, 200, 5000},   /* does not divide 1e6 */
        {20000, 1, 100, 500, 200, 5000}, /* above max_sample_rate_hz */
        {10, 1, 100, 500, 200, 5000},    /* period 100000 us does not fit u16 */
        {1000, 0, 100, 500, 200, 5000},  /* batch 0 */
        {1000, 51, 100, 500, 200, 5000}, /* batch > 50 */
        {1000, 1, 100, 0, 200, 5000},    /* timeout 0 */
        {1000, 1, 0, 500, 200, 5000},    /* interval 0 */
        {1000, 1, 100, 500, RIG_HARD_MAX_VALVE_OPEN_MS + 1, 5000}, /* above hard cap */
    };
    size_t i;
    uint16_t s;
    boot(0);
    skip_all();
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        s = send_configure(bad[i].rate, bad[i].batch, bad[i].hb, bad[i].timeout, bad[i].max_valve,
                           bad[i].max_flush);
        CHECKF(expect_ack(s, RP_T_CONFIGURE, RP_ACK_BAD_VALUE), "case %zu", i);
    }
    CHECK_EQ(hw.sample_starts, 0); /* nothing changed */
    CHECK_EQ(rd_state(&dev), 0);
    /* the edges that are fine */
    s = send_configure(10000, 50, 100, 500, RIG_HARD_MAX_VALVE_OPEN_MS, 60000);
    CHECK(expect_ack(s, RP_T_CONFIGURE, RP_ACK_OK));
    CHECK_EQ(hw.period, 100);
    s = send_configure(16, 1, 100, 500, 0, 0);
    CHECK(expect_ack(s, RP_T_CONFIGURE, RP_ACK_OK));
    CHECK_EQ(hw.period, 62500);
    /* a BadValue after a good Configure leaves the stream running */
    s = send_configure(3, 1, 100, 500, 200, 5000);
    CHECK(expect_ack(s, RP_T_CONFIGURE, RP_ACK_BAD_VALUE));
    CHECK(hw.sampling);
    CHECK_EQ(hw.period, 62500);
    /* rate 0 stops (the batch size is not checked then) */
    s = send_configure(0, 0, 100, 500, 200, 5000);
    CHECK(expect_ack(s, RP_T_CONFIGURE, RP_ACK_OK));
    CHECK(!hw.sampling);
    CHECK_EQ(rd_state(&dev) & RP_STATE_STREAMING, 0);
}

#define ANY_INDEX 0xFFFFFFFFu

/* Check every LeverSamples frame from frame `from` on: consecutive indices
 * starting at `first`, times first + i * period, encoder values. Returns the
 * number of samples seen. */
static uint32_t check_batches(int from, uint32_t first, uint32_t expect_count, int allow_gaps,
                              uint32_t *gap_total)
{
    int i;
    uint32_t next = first, seen = 0;
    int first_batch = 1;
    for (i = from; i < hw.n_frames; i++) {
        rp_lever_header h;
        int32_t counts[RP_MAX_SAMPLES_PER_BATCH];
        uint8_t k;
        if (hw.frames[i].type != RP_T_LEVER_SAMPLES) {
            continue;
        }
        CHECK_EQ(rp_unpack_lever_samples(hw.frames[i].body, hw.frames[i].body_len, &h, counts),
                 RP_OK);
        if (expect_count) {
            CHECKF(h.count == expect_count, "batch of %u, want %u", h.count, expect_count);
        }
        if (first_batch && first == ANY_INDEX) {
            next = h.first_index;
        }
        if (h.first_index != next) {
            CHECKF(allow_gaps && !first_batch, "batch starts at %u, want %u", h.first_index,
                   next);
            if (gap_total) {
                *gap_total += h.first_index - next;
            }
        }
        first_batch = 0;
        CHECK_EQ(h.period_us, hw.period);
        for (k = 0; k < h.count; k++) {
            uint32_t t = h.t_first_us + (uint32_t)k * h.period_us;
            CHECKF(counts[k] == encoder_at(t), "index %u: %ld at t=%u, want %ld",
                   h.first_index + k, (long)counts[k], t, (long)encoder_at(t));
        }
        next = h.first_index + h.count;
        seen += h.count;
    }
    return seen;
}

static void test_sampling_gap_free(void)
{
    int mark;
    uint32_t seen;
    uint32_t t_start;
    rp_heartbeat hb;
    boot(0);
    skip_all();
    mark = hw.n_frames;
    connect(1000, 5, 200, 5000);
    t_start = hw.now;
    CHECK_EQ(hw.period, 1000);
    advance_fed(1000000);
    seen = check_batches(mark, 0, 5, 0, NULL);
    CHECKF(seen >= 995 && seen <= 1000, "%u samples in 1 s at 1 kHz", seen);
    /* the first sample is one period after Configure */
    {
        int i;
        for (i = mark; i < hw.n_frames; i++) {
            if (hw.frames[i].type == RP_T_LEVER_SAMPLES) {
                rp_lever_header h;
                rp_unpack_lever_header(hw.frames[i].body, hw.frames[i].body_len, &h);
                CHECK_EQ(h.first_index, 0);
                CHECK_EQ(h.t_first_us, t_start + 1000);
                break;
            }
        }
    }
    CHECK(last_heartbeat(&hb));
    CHECK(hb.state & RP_STATE_STREAMING);
    CHECK(hb.next_sample_index >= seen);
    CHECK_EQ(hb.samples_dropped, 0);

    /* reconfigure: the partial batch of the old stream is flushed, then the
     * new stream starts again at index 0 */
    advance_fed(2500); /* 2-3 samples into a batch of 5 */
    mark = hw.n_frames;
    {
        uint16_t s = send_configure(2000, 10, 100, 500, 200, 5000);
        int i, lever_before_ack = 0;
        for (i = mark; i < hw.n_frames; i++) {
            if (hw.frames[i].type == RP_T_LEVER_SAMPLES) {
                lever_before_ack++;
            }
            if (hw.frames[i].type == RP_T_ACK) {
                break;
            }
        }
        CHECK_EQ(lever_before_ack, 1);
        hw.cursor = mark;
        CHECK(expect_ack(s, RP_T_CONFIGURE, RP_ACK_OK));
    }
    mark = hw.n_frames;
    advance_fed(500000);
    seen = check_batches(mark, 0, 10, 0, NULL);
    CHECKF(seen >= 990 && seen <= 1000, "%u samples in 0.5 s at 2 kHz", seen);
    CHECK(seqs_contiguous());

    /* 10 kHz, batches of 10 */
    mark = hw.n_frames;
    send_configure(10000, 10, 100, 500, 200, 5000);
    advance_fed(200000);
    seen = check_batches(mark, 0, 10, 0, NULL);
    CHECKF(seen >= 1980 && seen <= 2000, "%u samples in 0.2 s at 10 kHz", seen);
}

static void test_sampling_tx_congestion(void)
{
    int mark;
    uint32_t seen, gaps = 0;
    rp_heartbeat hb;
    rp_fault f;
    int i, faults = 0;
    uint32_t fault_total = 0;
    boot(0);
    skip_all();
    connect(1000, 10, 200, 5000);
    mark = hw.n_frames;
    advance_fed(100000);
    /* the line is nearly full: the lever stream must not take the reserve */
    hw.tx_free = 70;
    advance_fed(50000);
    hw.tx_free = 4096;
    advance_fed(300000);
    seen = check_batches(mark, 0, 10, 1, &gaps);
    CHECKF(gaps >= 40 && gaps <= 60, "%u samples missing", gaps);
    CHECK(last_heartbeat(&hb));
    CHECK_EQ(hb.samples_dropped, gaps);
    CHECK(dev.next_index >= seen + gaps);
    /* each dropped batch is one dropped frame; nothing else was dropped: the
     * acks of the host heartbeats got through the congestion */
    CHECK_EQ(hb.tx_frames_dropped, gaps / 10);
    for (i = mark; i < hw.n_frames; i++) {
        if (hw.frames[i].type == RP_T_FAULT) {
            rp_unpack_fault(hw.frames[i].body, hw.frames[i].body_len, &f);
            if (f.code == RP_FAULT_SAMPLES_DROPPED) {
                faults++;
                fault_total += f.detail;
            } else {
                CHECK_EQ(f.code, RP_FAULT_TX_OVERFLOW);
                CHECK(f.detail <= gaps / 10);
            }
        }
    }
    CHECK(faults >= 1);
    CHECK_EQ(fault_total, gaps);
    CHECK(seqs_contiguous());

    /* the main loop stalls: the sample ring overflows; indices still advance */
    mark = hw.n_frames;
    {
        uint32_t t;
        for (t = 0; t < 200; t++) {
            hw.now += 1000;
            rd_isr_lever_sample(&dev, hw.now, encoder_at(hw.now));
            hw.next_sample = hw.now + 1000;
            rd_tick(&dev);
        }
        send0(RP_T_HOST_HEARTBEAT);
        advance_fed(200000);
    }
    gaps = 0;
    check_batches(mark, ANY_INDEX, 0, 1, &gaps);
    CHECK(last_heartbeat(&hb));
    CHECKF(hb.samples_dropped >= 200 - RD_SAMPLE_RING, "%u dropped", hb.samples_dropped);

    /* nothing is sent at all: acks are dropped and counted, no blocking */
    hw.tx_free = 0;
    {
        uint32_t before = dev.tx_frames_dropped;
        send0(RP_T_HOST_HEARTBEAT);
        CHECK_EQ(dev.tx_frames_dropped, before + 1);
    }
    hw.tx_free = 4096;
    skip_all();
    advance_fed(200000);
    hw.cursor = 0;
    {
        int got = 0;
        for (i = 0; i < hw.n_frames; i++) {
            if (hw.frames[i].type == RP_T_FAULT) {
                rp_unpack_fault(hw.frames[i].body, hw.frames[i].body_len, &f);
                if (f.code == RP_FAULT_TX_OVERFLOW) {
                    got = 1;
                    CHECK(f.detail >= 1);
                }
            }
        }
        CHECK(got);
    }
}

static void test_valve_pulse(void)
{
    uint16_t s;
    rp_event e;
    boot(0);
    skip_all();
    connect(0, 1, 200, 5000);
    skip_all();
    /* over the cap: refused, never clamped, the valve never moves */
    s = send_pulse(200001);
    CHECK(expect_ack(s, RP_T_VALVE_PULSE, RP_ACK_REFUSED));
    s = send_pulse(0xFFFFFFFFu);
    CHECK(expect_ack(s, RP_T_VALVE_PULSE, RP_ACK_REFUSED));
    s = send_pulse(0);
    CHECK(expect_ack(s, RP_T_VALVE_PULSE, RP_ACK_BAD_VALUE));
    CHECK_EQ(hw.n_valve_edges, 0);
    CHECK(nothing_more());
    /* at the cap: fine */
    s = send_pulse(200000);
    CHECK(expect_ack(s, RP_T_VALVE_PULSE, RP_ACK_OK));
    CHECK(expect_event(RP_EV_VALVE_OPEN, 0, &e));
    CHECK_EQ(e.value, 200000);
    CHECK_EQ(e.t_us, hw.now);
    CHECK_EQ(hw.valve, 1);
    CHECK(rd_state(&dev) & RP_STATE_VALVE_OPEN);
    /* busy while open */
    s = send_pulse(1000);
    CHECK(expect_ack(s, RP_T_VALVE_PULSE, RP_ACK_BUSY));
    s = send_flush(100);
    CHECK(expect_ack(s, RP_T_VALVE_OPEN, RP_ACK_BUSY));
    advance_fed(250000);
    CHECK_EQ(hw.valve, 0);
    CHECK(expect_event(RP_EV_VALVE_CLOSE, RP_CAUSE_COMPLETED, &e));
    CHECKF(e.value >= 200000 && e.value < 200100, "open for %u us", e.value);
    CHECK_EQ(hw.n_valve_edges, 2);
    CHECKF(hw.valve_edges[1].t - hw.valve_edges[0].t == e.value, "edges %u..%u",
           hw.valve_edges[0].t, hw.valve_edges[1].t);
    /* a 38,095 us pulse (the vectors' example) */
    hw.n_valve_edges = 0;
    skip_all();
    s = send_pulse(38095);
    CHECK(expect_ack(s, RP_T_VALVE_PULSE, RP_ACK_OK));
    CHECK(expect_event(RP_EV_VALVE_OPEN, 0, NULL));
    advance_fed(100000);
    CHECK(expect_event(RP_EV_VALVE_CLOSE, RP_CAUSE_COMPLETED, &e));
    CHECKF(e.value >= 38095 && e.value < 38195, "open for %u us", e.value);
    /* ValveClose when closed: just Ok */
    skip_all();
    s = send0(RP_T_VALVE_CLOSE);
    CHECK(expect_ack(s, RP_T_VALVE_CLOSE, RP_ACK_OK));
    CHECK(nothing_more());
    /* lower cap by Configure: 100 ms now refused above */
    send_configure(0, 1, 100, 500, 100, 5000);
    skip_all();
    s = send_pulse(100001);
    CHECK(expect_ack(s, RP_T_VALVE_PULSE, RP_ACK_REFUSED));
    /* before any Configure the cap is the hard cap */
    boot(0);
    skip_all();
    s = send_pulse((uint32_t)RIG_HARD_MAX_VALVE_OPEN_MS * 1000u + 1u);
    CHECK(expect_ack(s, RP_T_VALVE_PULSE, RP_ACK_REFUSED));
    s = send_pulse((uint32_t)RIG_HARD_MAX_VALVE_OPEN_MS * 1000u);
    CHECK(expect_ack(s, RP_T_VALVE_PULSE, RP_ACK_OK));
    CHECK(expect_event(RP_EV_VALVE_OPEN, 0, NULL));
    CHECK(seqs_contiguous());
}

static void test_valve_close_command(void)
{
    uint16_t s;
    rp_event e;
    boot(0);
    connect(0, 1, 200, 5000);
    skip_all();
    s = send_pulse(150000);
    CHECK(expect_ack(s, RP_T_VALVE_PULSE, RP_ACK_OK));
    CHECK(expect_event(RP_EV_VALVE_OPEN, 0, NULL));
    advance_fed(10000);
    s = send0(RP_T_VALVE_CLOSE);
    CHECK(expect_ack(s, RP_T_VALVE_CLOSE, RP_ACK_OK));
    CHECK(expect_event(RP_EV_VALVE_CLOSE, RP_CAUSE_COMMAND, &e));
    CHECKF(e.value >= 10000 && e.value < 10200, "open for %u", e.value);
    CHECK_EQ(hw.valve, 0);
    advance_fed(300000);
    CHECK(nothing_more()); /* no second close */
}

static void test_valve_flush_caps(void)
{
    uint16_t s;
    rp_event e;
    rp_fault f;
    uint32_t hard_us = (uint32_t)RIG_HARD_MAX_VALVE_OPEN_MS * 1000u;

    /* max_flush above the hard cap: the hard cap cuts it */
    boot(0);
    connect(0, 1, 200, 5000);
    skip_all();
    s = send_flush(3000);
    CHECK(expect_ack(s, RP_T_VALVE_OPEN, RP_ACK_OK));
    CHECK(expect_event(RP_EV_VALVE_OPEN, 0, &e));
    CHECK_EQ(e.value, 0); /* 0 for a flush */
    advance_fed(hard_us + 300000);
    CHECK(expect_event(RP_EV_VALVE_CLOSE, RP_CAUSE_CAP, &e));
    CHECKF(e.value >= hard_us && e.value < hard_us + 100, "open for %u", e.value);
    CHECK(expect_fault(RP_FAULT_VALVE_CAP_TRIPPED, &f));
    CHECK_EQ(f.detail, RIG_HARD_MAX_VALVE_OPEN_MS);
    CHECK_EQ(hw.valve, 0);

    /* max_flush below: it cuts */
    send_configure(0, 1, 100, 500, 200, 300);
    skip_all();
    s = send_flush(3000);
    CHECK(expect_ack(s, RP_T_VALVE_OPEN, RP_ACK_OK));
    CHECK(expect_event(RP_EV_VALVE_OPEN, 0, NULL));
    advance_fed(400000);
    CHECK(expect_event(RP_EV_VALVE_CLOSE, RP_CAUSE_CAP, &e));
    CHECKF(e.value >= 300000 && e.value < 300100, "open for %u", e.value);
    CHECK(expect_fault(RP_FAULT_VALVE_CAP_TRIPPED, &f));
    CHECK_EQ(f.detail, 300);

    /* shorter than the cap: completes */
    s = send_flush(100);
    CHECK(expect_ack(s, RP_T_VALVE_OPEN, RP_ACK_OK));
    CHECK(expect_event(RP_EV_VALVE_OPEN, 0, NULL));
    advance_fed(200000);
    CHECK(expect_event(RP_EV_VALVE_CLOSE, RP_CAUSE_COMPLETED, &e));
    CHECKF(e.value >= 100000 && e.value < 100100, "open for %u", e.value);
    /* exactly the cap: completes, no fault */
    s = send_flush(300);
    CHECK(expect_ack(s, RP_T_VALVE_OPEN, RP_ACK_OK));
    CHECK(expect_event(RP_EV_VALVE_OPEN, 0, NULL));
    advance_fed(400000);
    CHECK(expect_event(RP_EV_VALVE_CLOSE, RP_CAUSE_COMPLETED, NULL));
    CHECK(nothing_more());
    /* 0 is BadValue */
    s = send_flush(0);
    CHECK(expect_ack(s, RP_T_VALVE_OPEN, RP_ACK_BAD_VALUE));
    /* closed by command */
    s = send_flush(250);
    CHECK(expect_ack(s, RP_T_VALVE_OPEN, RP_ACK_OK));
    CHECK(expect_event(RP_EV_VALVE_OPEN, 0, NULL));
    advance_fed(50000);
    s = send0(RP_T_VALVE_CLOSE);
    CHECK(expect_ack(s, RP_T_VALVE_CLOSE, RP_ACK_OK));
    CHECK(expect_event(RP_EV_VALVE_CLOSE, RP_CAUSE_COMMAND, NULL));
    CHECK(seqs_contiguous());

    /* the valve is never open longer than the hard cap, whatever happens:
     * scan the whole edge log */
    {
        int i;
        for (i = 0; i + 1 < hw.n_valve_edges; i += 2) {
            CHECK(hw.valve_edges[i].level == 1 && hw.valve_edges[i + 1].level == 0);
            CHECK(hw.valve_edges[i + 1].t - hw.valve_edges[i].t <= hard_us + 100);
        }
    }
}

static void test_watchdog(void)
{
    uint16_t s;
    rp_event e;
    rp_fault f;
    rp_heartbeat hb;
    uint32_t t_last;
    int mark;
    boot(0);
    connect(1000, 10, 200, 5000); /* timeout 500 ms */
    skip_all();
    send_flush(900);
    send_tone(6000, 5000, 80);
    send_sync(1, 12, 50000, 0xABC); /* 1.3 s: still running at the trip */
    t_last = hw.now;
    skip_all();
    mark = hw.n_frames;
    /* the host goes quiet */
    advance(499000);
    CHECK_EQ(hw.valve, 1);
    CHECK_EQ(rd_state(&dev) & RP_STATE_SAFE, 0);
    advance(2000);
    CHECK_EQ(hw.valve, 0);
    CHECK_EQ(hw.tone, 0);
    CHECK_EQ(hw.sync, 0);
    CHECK(rd_state(&dev) & RP_STATE_SAFE);
    CHECK(expect_event(RP_EV_VALVE_CLOSE, RP_CAUSE_WATCHDOG, &e));
    CHECKF(e.t_us - t_last >= 500000 && e.t_us - t_last < 500100, "tripped after %u us",
           e.t_us - t_last);
    CHECK(expect_event(RP_EV_TONE_OFF, RP_CAUSE_WATCHDOG, NULL));
    CHECK(expect_event(RP_EV_SYNC_OUT_END, 0, NULL));
    CHECK(expect_event(RP_EV_SAFE_STATE, RP_CAUSE_WATCHDOG, &e));
    CHECK_EQ(e.value, 500);
    CHECK(expect_fault(RP_FAULT_WATCHDOG_TRIPPED, &f));
    CHECK_EQ(f.detail, 500);
    /* the lever stream goes on; nothing else happens; no repeat */
    advance(1000000);
    CHECK(nothing_more());
    CHECK(last_heartbeat(&hb));
    CHECK(hb.state & RP_STATE_SAFE);
    CHECK(hb.state & RP_STATE_STREAMING);
    {
        uint32_t gaps = 0;
        check_batches(mark, ANY_INDEX, 10, 0, &gaps);
        CHECK_EQ(gaps, 0);
    }
    {
        int i, lever = 0;
        for (i = mark; i < hw.n_frames; i++) {
            lever += hw.frames[i].type == RP_T_LEVER_SAMPLES;
        }
        CHECKF(lever >= 140, "%d lever batches during 1.5 s", lever);
    }
    /* the next valid frame clears it, then is executed normally */
    skip_all();
    s = send_pulse(1000);
    CHECK(expect_event(RP_EV_SAFE_STATE_CLEARED, 0, NULL));
    CHECK(expect_ack(s, RP_T_VALVE_PULSE, RP_ACK_OK));
    CHECK(expect_event(RP_EV_VALVE_OPEN, 0, NULL));
    CHECK_EQ(rd_state(&dev) & RP_STATE_SAFE, 0);
    advance_fed(10000);
    CHECK(expect_event(RP_EV_VALVE_CLOSE, RP_CAUSE_COMPLETED, NULL));
    /* fed: no trip */
    advance_fed(3000000);
    CHECK(nothing_more());
    CHECK(seqs_contiguous());

    /* before any Configure the timeout is 1000 ms */
    boot(0);
    skip_all();
    advance(999000);
    CHECK_EQ(rd_state(&dev) & RP_STATE_SAFE, 0);
    advance(2000);
    CHECK(rd_state(&dev) & RP_STATE_SAFE);
    CHECK(expect_event(RP_EV_SAFE_STATE, RP_CAUSE_WATCHDOG, &e));
    CHECK_EQ(e.value, 1000);
    CHECK(expect_fault(RP_FAULT_WATCHDOG_TRIPPED, NULL));
    s = send0(RP_T_PING);
    CHECK(expect_event(RP_EV_SAFE_STATE_CLEARED, 0, NULL));
    CHECK(next_of(RP_T_PONG) != NULL);
}

static void test_tone(void)
{
    uint16_t s;
    rp_event e;
    boot(0);
    connect(0, 1, 200, 5000);
    skip_all();
    s = send_tone(6000, 1000, 80);
    CHECK(expect_ack(s, RP_T_TONE, RP_ACK_OK));
    CHECK(expect_event(RP_EV_TONE_ON, 80, &e));
    CHECK_EQ(e.value, 6000);
    CHECK_EQ(hw.tone, 1);
    CHECK_EQ(hw.tone_freq, 6000);
    CHECK_EQ(hw.tone_level, 80);
    CHECK(rd_state(&dev) & RP_STATE_TONE_ON);
    advance_fed(1100000);
    CHECK_EQ(hw.tone, 0);
    CHECK(expect_event(RP_EV_TONE_OFF, RP_CAUSE_COMPLETED, &e));
    CHECK_EQ(e.value, 0);
    /* stopped by command */
    s = send_tone(8000, 1000, 50);
    CHECK(expect_ack(s, RP_T_TONE, RP_ACK_OK));
    CHECK(expect_event(RP_EV_TONE_ON, 50, NULL));
    s = send0(RP_T_TONE_OFF);
    CHECK(expect_ack(s, RP_T_TONE_OFF, RP_ACK_OK));
    CHECK(expect_event(RP_EV_TONE_OFF, RP_CAUSE_COMMAND, NULL));
    s = send0(RP_T_TONE_OFF); /* already off */
    CHECK(expect_ack(s, RP_T_TONE_OFF, RP_ACK_OK));
    /* restart while playing */
    send_tone(6000, 1000, 80);
    skip_all();
    s = send_tone(7000, 200, 80);
    CHECK(expect_ack(s, RP_T_TONE, RP_ACK_OK));
    CHECK(expect_event(RP_EV_TONE_OFF, RP_CAUSE_COMMAND, NULL));
    CHECK(expect_event(RP_EV_TONE_ON, 80, &e));
    CHECK_EQ(e.value, 7000);
    advance_fed(300000);
    CHECK(expect_event(RP_EV_TONE_OFF, RP_CAUSE_COMPLETED, NULL));
    /* bad values */
    s = send_tone(0, 100, 50);
    CHECK(expect_ack(s, RP_T_TONE, RP_ACK_BAD_VALUE));
    s = send_tone(50000, 100, 50);
    CHECK(expect_ack(s, RP_T_TONE, RP_ACK_BAD_VALUE));
    s = send_tone(6000, 100, 101);
    CHECK(expect_ack(s, RP_T_TONE, RP_ACK_BAD_VALUE));
    s = send_tone(6000, 0, 50);
    CHECK(expect_ack(s, RP_T_TONE, RP_ACK_BAD_VALUE));
    CHECK(nothing_more());
}

/* Expected sync-out level at offset `dt` from the start of a bitcode. */
static int bitcode_level(uint32_t dt, uint16_t unit, uint8_t nbits, uint32_t value)
{
    uint32_t slot = dt / unit;
    if (slot == 0) {
        return 1;
    }
    if (slot == 1 || (slot & 1u) || slot >= 2u + 2u * nbits) {
        return 0;
    }
    return (int)((value >> (nbits - 1u - (slot - 2u) / 2u)) & 1u);
}

static void check_bitcode(uint32_t tick_us, uint32_t t0_offset)
{
    uint16_t s;
    rp_event start, end;
    const uint16_t unit = 5000;
    const uint8_t nbits = 12;
    const uint32_t value = 2748; /* 0xABC = 1010 1011 1100 */
    uint32_t t0;
    int i, want_edges = 0, prev = 0;
    uint32_t dt;

    boot(t0_offset);
    connect(0, 1, 200, 5000);
    advance_tick(777, tick_us); /* start between ticks */
    skip_all();
    hw.n_sync_edges = 0;
    s = send_sync(RP_SYNC_BITCODE, nbits, unit, value);
    t0 = hw.now;
    CHECK(expect_ack(s, RP_T_SYNC_OUT, RP_ACK_OK));
    CHECK(expect_event(RP_EV_SYNC_OUT_START, 0, &start));
    CHECK_EQ(start.value, value);
    CHECK_EQ(start.t_us, t0);
    CHECK(rd_state(&dev) & RP_STATE_SYNC_BUSY);
    /* busy while it runs */
    s = send_sync(RP_SYNC_PULSE, 0, 1000, 0);
    CHECK(expect_ack(s, RP_T_SYNC_OUT, RP_ACK_BUSY));
    /* run it (keeping the host alive without disturbing the timing much) */
    for (i = 0; i < 3; i++) {
        advance_tick(50000, tick_us);
        send0(RP_T_HOST_HEARTBEAT);
    }
    CHECK_EQ(hw.sync, 0);
    CHECK_EQ(rd_state(&dev) & RP_STATE_SYNC_BUSY, 0);
    CHECK(expect_event(RP_EV_SYNC_OUT_END, 0, &end));
    CHECK_EQ(end.value, value);
    CHECKF(end.t_us - t0 >= 26u * unit && end.t_us - t0 < 26u * unit + tick_us,
           "sequence lasted %u us", end.t_us - t0);

    /* every edge where the definition puts it, late by less than one tick */
    for (dt = 0; dt < 27u * unit; dt += unit) {
        int lvl = bitcode_level(dt, unit, nbits, value);
        if (lvl != prev) {
            int found = 0;
            for (i = 0; i < hw.n_sync_edges; i++) {
                uint32_t et = hw.sync_edges[i].t - t0;
                if (hw.sync_edges[i].level == lvl && et >= dt && et < dt + tick_us) {
                    found = 1;
                }
            }
            CHECKF(found, "tick %u: no %s edge at +%u us", tick_us, lvl ? "rising" : "falling",
                   dt);
            want_edges++;
            prev = lvl;
        }
    }
    CHECKF(hw.n_sync_edges == want_edges, "%d edges, want %d", hw.n_sync_edges, want_edges);
    /* and the level in the middle of every slot */
    for (i = 0; i + 1 < hw.n_sync_edges; i++) {
        CHECK(hw.sync_edges[i].level != hw.sync_edges[i + 1].level);
    }
}

static void test_sync_bitcode(void)
{
    uint16_t s;
    rp_event e;
    check_bitcode(100, 0);
    check_bitcode(10, 0);
    check_bitcode(1, 12345);
    check_bitcode(100, 0xFFFFFFFFu - 60000u); /* across the clock wrap */

    /* a single pulse */
    boot(0);
    connect(0, 1, 200, 5000);
    skip_all();
    hw.n_sync_edges = 0;
    s = send_sync(RP_SYNC_PULSE, 0, 2000, 0);
    CHECK(expect_ack(s, RP_T_SYNC_OUT, RP_ACK_OK));
    CHECK(expect_event(RP_EV_SYNC_OUT_START, 0, NULL));
    advance_fed(10000);
    CHECK(expect_event(RP_EV_SYNC_OUT_END, 0, &e));
    CHECK_EQ(hw.n_sync_edges, 2);
    CHECK(hw.sync_edges[1].t - hw.sync_edges[0].t >= 2000 &&
          hw.sync_edges[1].t - hw.sync_edges[0].t < 2100);
    /* 32 bits of all ones, shortest unit */
    hw.n_sync_edges = 0;
    s = send_sync(RP_SYNC_BITCODE, 32, 100, 0xFFFFFFFFu);
    CHECK(expect_ack(s, RP_T_SYNC_OUT, RP_ACK_OK));
    CHECK(expect_event(RP_EV_SYNC_OUT_START, 0, NULL));
    advance_tick(20000, 1);
    CHECK(expect_event(RP_EV_SYNC_OUT_END, 0, NULL));
    CHECK_EQ(hw.n_sync_edges, 2 * 33); /* start pulse + 32 ones */
    /* bad values */
    s = send_sync(2, 12, 5000, 1);
    CHECK(expect_ack(s, RP_T_SYNC_OUT, RP_ACK_BAD_VALUE));
    s = send_sync(RP_SYNC_BITCODE, 0, 5000, 1);
    CHECK(expect_ack(s, RP_T_SYNC_OUT, RP_ACK_BAD_VALUE));
    s = send_sync(RP_SYNC_BITCODE, 33, 5000, 1);
    CHECK(expect_ack(s, RP_T_SYNC_OUT, RP_ACK_BAD_VALUE));
    s = send_sync(RP_SYNC_PULSE, 0, 0, 1);
    CHECK(expect_ack(s, RP_T_SYNC_OUT, RP_ACK_BAD_VALUE));
    CHECK(nothing_more());
}

static void test_reset(void)
{
    uint16_t s;
    rp_heartbeat hb;
    boot(0);
    connect(1000, 10, 200, 5000);
    advance_fed(50000);
    skip_all();
    send_flush(500);
    send_tone(6000, 1000, 80);
    send_sync(1, 12, 5000, 1);
    skip_all();
    s = send0(RP_T_RESET);
    CHECK(expect_ack(s, RP_T_RESET, RP_ACK_OK));
    CHECK(expect_event(RP_EV_VALVE_CLOSE, RP_CAUSE_RESET, NULL));
    CHECK(expect_event(RP_EV_TONE_OFF, RP_CAUSE_RESET, NULL));
    CHECK(expect_event(RP_EV_SYNC_OUT_END, 0, NULL));
    CHECK(next_of(RP_T_HELLO) != NULL);
    CHECK_EQ(hw.valve, 0);
    CHECK_EQ(hw.tone, 0);
    CHECK_EQ(hw.sync, 0);
    CHECK(!hw.sampling);
    CHECK_EQ(rd_state(&dev), 0);
    /* back to boot settings: heartbeat every 1000 ms */
    skip_all();
    advance_fed(2000000);
    {
        int i, beats = 0;
        for (i = hw.cursor; i < hw.n_frames; i++) {
            beats += hw.frames[i].type == RP_T_HEARTBEAT;
        }
        CHECK_EQ(beats, 2);
    }
    CHECK(last_heartbeat(&hb));
    CHECK_EQ(hb.next_sample_index, 0);
    CHECK(seqs_contiguous());
}

static void test_inputs(void)
{
    rp_event e;
    int i;
    boot(0);
    connect(0, 1, 200, 5000);
    skip_all();
    rd_isr_lick(&dev, 1000, 1);
    rd_isr_lick(&dev, 1001, 1); /* no change: ignored */
    rd_isr_lick(&dev, 1500, 0);
    rd_isr_lick(&dev, 2000, 1);
    rd_isr_frame_ttl(&dev, 2100);
    rd_isr_frame_ttl(&dev, 2200);
    rd_poll(&dev);
    CHECK(expect_event(RP_EV_LICK_ON, 0, &e));
    CHECK(e.t_us == 1000 && e.value == 1);
    CHECK(expect_event(RP_EV_LICK_OFF, 0, &e));
    CHECK(e.t_us == 1500 && e.value == 1);
    CHECK(expect_event(RP_EV_LICK_ON, 0, &e));
    CHECK(e.t_us == 2000 && e.value == 2);
    CHECK(expect_event(RP_EV_FRAME_TTL, 0, &e));
    CHECK(e.t_us == 2100 && e.value == 1);
    CHECK(expect_event(RP_EV_FRAME_TTL, 0, &e));
    CHECK(e.t_us == 2200 && e.value == 2);
    CHECK(nothing_more());

    /* a burst larger than the ring: the excess is counted, not blocked */
    for (i = 0; i < 100; i++) {
        rd_isr_frame_ttl(&dev, 3000u + (uint32_t)i);
    }
    CHECK_EQ(dev.tx_frames_dropped, 100 - (RD_EVENT_RING - 1));
    advance_fed(200000);
    {
        int ttl = 0, got_fault = 0;
        uint32_t last = 2;
        for (i = hw.cursor; i < hw.n_frames; i++) {
            if (hw.frames[i].type == RP_T_EVENT) {
                rp_unpack_event(hw.frames[i].body, hw.frames[i].body_len, &e);
                if (e.kind == RP_EV_FRAME_TTL) {
                    ttl++;
                    CHECK(e.value == last + 1); /* in order */
                    last = e.value;
                }
            } else if (hw.frames[i].type == RP_T_FAULT) {
                rp_fault f;
                rp_unpack_fault(hw.frames[i].body, hw.frames[i].body_len, &f);
                if (f.code == RP_FAULT_TX_OVERFLOW) {
                    got_fault = 1;
                    CHECK_EQ(f.detail, 100 - (RD_EVENT_RING - 1));
                }
            }
        }
        CHECK_EQ(ttl, RD_EVENT_RING - 1);
        CHECK(got_fault);
    }
    /* events wait (not dropped) while the line is full */
    skip_all();
    hw.tx_free = 10;
    rd_isr_lick(&dev, hw.now, 0);
    rd_poll(&dev);
    CHECK_EQ(hw.cursor, hw.n_frames);
    hw.tx_free = 4096;
    rd_poll(&dev);
    CHECK(expect_event(RP_EV_LICK_OFF, 0, NULL));
}

static void test_clock_wrap(void)
{
    uint16_t s;
    rp_event e;
    int mark;
    uint32_t seen;
    boot(0xFFFFFFFFu - 100000u);
    connect(1000, 10, 200, 5000);
    mark = hw.n_frames;
    skip_all();
    s = send_pulse(150000);
    CHECK(expect_ack(s, RP_T_VALVE_PULSE, RP_ACK_OK));
    CHECK(expect_event(RP_EV_VALVE_OPEN, 0, NULL));
    advance_fed(100000); /* crosses 2^32 during the pulse */
    advance_fed(100000);
    CHECK(expect_event(RP_EV_VALVE_CLOSE, RP_CAUSE_COMPLETED, &e));
    CHECKF(e.value >= 150000 && e.value < 150100, "open for %u", e.value);
    CHECK(e.t_us < 100000u); /* after the wrap */
    advance_fed(500000);
    seen = check_batches(mark, 0, 10, 0, NULL);
    CHECK(seen >= 690);
    CHECK(nothing_more());
    CHECK_EQ(rd_state(&dev) & RP_STATE_SAFE, 0);
}

static void test_fault_rate_limit(void)
{
    int i, faults = 0;
    uint32_t last_detail = 0;
    boot(0);
    connect(0, 1, 200, 5000);
    skip_all();
    /* 50 bad frames within 50 ms: a few Faults, the count in the last */
    for (i = 0; i < 50; i++) {
        uint8_t junk[4] = {0x03, 0x11, 0x22, 0x00};
        int k;
        for (k = 0; k < 4; k++) {
            rd_rx_byte(&dev, junk[k], hw.now);
        }
        advance(1000);
    }
    advance_fed(300000);
    for (i = hw.cursor; i < hw.n_frames; i++) {
        if (hw.frames[i].type == RP_T_FAULT) {
            rp_fault f;
            rp_unpack_fault(hw.frames[i].body, hw.frames[i].body_len, &f);
            CHECK_EQ(f.code, RP_FAULT_RX_FRAME_BAD);
            faults++;
            last_detail = f.detail;
        }
    }
    CHECKF(faults >= 1 && faults <= 3, "%d faults", faults);
    CHECK_EQ(last_detail, 50);
}

static void test_quadrature(void)
{
    /* forward: 00 -> 01 -> 11 -> 10 -> 00, four counts per cycle */
    static const uint8_t fwd[4] = {0, 1, 3, 2};
    int32_t pos = 0;
    int i;
    uint8_t prev = 0;
    for (i = 1; i <= 400; i++) {
        uint8_t cur = fwd[i % 4];
        pos += rd_quadrature_delta(prev, cur);
        prev = cur;
    }
    CHECK_EQ(pos, 400);
    for (i = 399; i >= 0; i--) {
        uint8_t cur = fwd[i % 4];
        pos += rd_quadrature_delta(prev, cur);
        prev = cur;
    }
    CHECK_EQ(pos, 0);
    /* no change, and impossible double jumps, count nothing */
    for (i = 0; i < 4; i++) {
        CHECK_EQ(rd_quadrature_delta(fwd[i], fwd[i]), 0);
        CHECK_EQ(rd_quadrature_delta(fwd[i], fwd[(i + 2) % 4]), 0);
        CHECK_EQ(rd_quadrature_delta(fwd[i], fwd[(i + 1) % 4]), 1);
        CHECK_EQ(rd_quadrature_delta(fwd[(i + 1) % 4], fwd[i]), -1);
    }
}

/* ---- armed reward (protocol version 2) ---------------------------------- */

static uint16_t send_arm(uint32_t tag, int32_t rest, uint32_t thr, uint32_t rearm, uint8_t dir,
                         uint32_t end, uint32_t pulse)
{
    uint8_t b[RP_ARM_REWARD_LEN];
    rp_arm_reward a;
    a.trial_tag = tag;
    a.rest_counts = rest;
    a.threshold_counts = thr;
    a.rearm_counts = rearm;
    a.direction = dir;
    a.window_end_us = end;
    a.pulse_us = pulse;
    return send_raw(RP_T_ARM_REWARD, b, rp_pack_arm_reward(b, &a));
}

static uint16_t send_disarm(uint32_t tag)
{
    uint8_t b[RP_DISARM_LEN];
    rp_disarm a;
    a.trial_tag = tag;
    return send_raw(RP_T_DISARM, b, rp_pack_disarm(b, &a));
}

/* Frames of one type from the cursor on, noise skipped; the last one into *out. */
static int count_of(uint8_t type, const captured **out)
{
    int i, n = 0;
    for (i = hw.cursor; i < hw.n_frames; i++) {
        if (hw.frames[i].type == type) {
            n++;
            if (out) {
                *out = &hw.frames[i];
            }
        }
    }
    return n;
}

static void test_armed_reward_fires_in_the_encoder_update(void)
{
    uint16_t s;
    const captured *c = NULL;
    rp_reward_fired f;
    rp_event e;
    uint32_t t_cross, index;
    int mark;
    boot(0);
    connect(1000, 1, 200, 5000);
    advance_fed(10000);
    skip_all();
    rd_isr_encoder(&dev, 0);
    s = send_arm(5, 0, 100, 60, RP_DIR_UP, hw.now + 300000u, 40000);
    CHECK(expect_ack(s, RP_T_ARM_REWARD, RP_ACK_OK));
    rd_isr_encoder(&dev, 50);
    rd_isr_encoder(&dev, 99);
    CHECK_EQ(hw.valve, 0);
    advance_fed(1000);
    hw.now += 17; /* between two samples and two ticks */
    t_cross = hw.now;
    index = dev.next_index;
    rd_isr_encoder(&dev, 100);
    /* open in the interrupt that saw the edge, before any main loop */
    CHECK_EQ(hw.valve, 1);
    CHECK_EQ(hw.n_valve_edges, 1);
    CHECK_EQ(hw.valve_edges[0].t, t_cross);
    rd_poll(&dev);
    mark = hw.cursor;
    CHECK_EQ(count_of(RP_T_REWARD_FIRED, &c), 1);
    if (c) {
        CHECK_EQ(rp_unpack_reward_fired(c->body, c->body_len, &f), RP_OK);
        CHECK_EQ(f.trial_tag, 5);
        CHECK_EQ(f.t_cross_us, t_cross);
        CHECK_EQ(f.t_valve_us, t_cross);
        CHECK_EQ(f.sample_index, index);
        CHECK_EQ(f.counts, 100);
        CHECK_EQ(f.pulse_us, 40000);
    }
    CHECK(next_of(RP_T_REWARD_FIRED) != NULL); /* the report, then the valve's event */
    CHECK(expect_event(RP_EV_VALVE_OPEN, 0, &e));
    CHECK_EQ(e.value, 40000);
    hw.cursor = mark;
    /* one firing per arm: down and up again does nothing */
    rd_isr_encoder(&dev, 0);
    rd_isr_encoder(&dev, 150);
    advance_fed(100000);
    CHECK_EQ(hw.n_valve_edges, 2);
    CHECKF(hw.valve_edges[1].t - hw.valve_edges[0].t >= 40000 &&
               hw.valve_edges[1].t - hw.valve_edges[0].t < 40100,
           "open for %u us", hw.valve_edges[1].t - hw.valve_edges[0].t);
    CHECK_EQ(count_of(RP_T_REWARD_FIRED, NULL), 1);
    CHECK_EQ(count_of(RP_T_REWARD_ENDED, NULL), 0);
    /* a Disarm of the spent tag repeats its report; of another, nothing */
    skip_all();
    s = send_disarm(5);
    CHECK(expect_ack(s, RP_T_DISARM, RP_ACK_OK));
    rd_poll(&dev);
    CHECK_EQ(count_of(RP_T_REWARD_FIRED, &c), 1);
    if (c) {
        CHECK_EQ(rp_unpack_reward_fired(c->body, c->body_len, &f), RP_OK);
        CHECK_EQ(f.trial_tag, 5);
        CHECK_EQ(f.t_cross_us, t_cross);
    }
    skip_all();
    s = send_disarm(6);
    CHECK(expect_ack(s, RP_T_DISARM, RP_ACK_OK));
    rd_poll(&dev);
    CHECK_EQ(count_of(RP_T_REWARD_FIRED, NULL), 0);
    CHECK_EQ(hw.n_valve_edges, 2);
    CHECK(seqs_contiguous());
}

static void test_armed_reward_never_fires_late(void)
{
    uint16_t s;
    const captured *c = NULL;
    rp_reward_ended en;
    uint32_t end;
    boot(0);
    connect(1000, 1, 200, 5000);
    advance_fed(10000);
    rd_isr_encoder(&dev, 0);
    skip_all();
    /* the window ends: RewardEnded, expired, stamped at the window's end */
    end = hw.now + 20000u;
    s = send_arm(6, 0, 100, 60, RP_DIR_UP, end, 40000);
    CHECK(expect_ack(s, RP_T_ARM_REWARD, RP_ACK_OK));
    advance_fed(30000);
    rd_isr_encoder(&dev, 200);
    CHECK_EQ(hw.n_valve_edges, 0);
    CHECK_EQ(count_of(RP_T_REWARD_ENDED, &c), 1);
    if (c) {
        CHECK_EQ(rp_unpack_reward_ended(c->body, c->body_len, &en), RP_OK);
        CHECK_EQ(en.reason, RP_DISARM_EXPIRED);
        CHECK_EQ(en.t_us, end);
        CHECK_EQ(en.trial_tag, 6);
    }
    /* a crossing after the end but before the tick noticed: still refused */
    rd_isr_encoder(&dev, 0);
    skip_all();
    end = hw.now + 1000u;
    s = send_arm(7, 0, 100, 60, RP_DIR_DOWN, end, 40000);
    CHECK(expect_ack(s, RP_T_ARM_REWARD, RP_ACK_OK));
    hw.now += 1500; /* no tick ran */
    rd_isr_encoder(&dev, -100);
    CHECK_EQ(hw.n_valve_edges, 0);
    rd_poll(&dev);
    CHECK_EQ(count_of(RP_T_REWARD_ENDED, &c), 1);
    if (c) {
        CHECK_EQ(rp_unpack_reward_ended(c->body, c->body_len, &en), RP_OK);
        CHECK_EQ(en.reason, RP_DISARM_EXPIRED);
        CHECK_EQ(en.t_us, end);
    }
    /* the host goes quiet: the watchdog disarms, a later crossing never opens */
    rd_isr_encoder(&dev, 0);
    advance_fed(1000);
    skip_all();
    s = send_arm(8, 0, 100, 60, RP_DIR_UP, hw.now + 2000000u, 40000);
    CHECK(expect_ack(s, RP_T_ARM_REWARD, RP_ACK_OK));
    advance(600000);
    CHECK(rd_state(&dev) & RP_STATE_SAFE);
    rd_isr_encoder(&dev, 500);
    advance(100000);
    CHECK_EQ(hw.n_valve_edges, 0);
    CHECK_EQ(count_of(RP_T_REWARD_ENDED, &c), 1);
    if (c) {
        CHECK_EQ(rp_unpack_reward_ended(c->body, c->body_len, &en), RP_OK);
        CHECK_EQ(en.reason, RP_DISARM_WATCHDOG);
        CHECK_EQ(en.trial_tag, 8);
    }
    CHECK_EQ(count_of(RP_T_REWARD_FIRED, NULL), 0);
}

static void test_armed_reward_checks(void)
{
    uint16_t s;
    uint32_t end;
    const captured *c = NULL;
    rp_reward_ended en;
    boot(0);
    connect(0, 1, 200, 5000); /* not streaming */
    skip_all();
    end = hw.now + 500000u;
    s = send_arm(1, 0, 100, 60, RP_DIR_UP, end, 40000);
    CHECK(expect_ack(s, RP_T_ARM_REWARD, RP_ACK_REFUSED));
    connect(1000, 1, 200, 5000);
    skip_all();
    end = hw.now + 500000u;
    s = send_arm(1, 0, 100, 60, RP_DIR_UP, end, 200001); /* over the cap */
    CHECK(expect_ack(s, RP_T_ARM_REWARD, RP_ACK_REFUSED));
    s = send_arm(1, 0, 100, 100, RP_DIR_UP, end, 40000); /* rearm not below */
    CHECK(expect_ack(s, RP_T_ARM_REWARD, RP_ACK_BAD_VALUE));
    s = send_arm(1, 0, 0, 0, RP_DIR_UP, end, 40000);
    CHECK(expect_ack(s, RP_T_ARM_REWARD, RP_ACK_BAD_VALUE));
    s = send_arm(1, 0, 100, 60, 2, end, 40000);
    CHECK(expect_ack(s, RP_T_ARM_REWARD, RP_ACK_BAD_VALUE));
    s = send_arm(1, 0, 100, 60, RP_DIR_UP, hw.now, 40000); /* not in the future */
    CHECK(expect_ack(s, RP_T_ARM_REWARD, RP_ACK_BAD_VALUE));
    s = send_arm(1, 0, 100, 60, RP_DIR_UP, end, 0);
    CHECK(expect_ack(s, RP_T_ARM_REWARD, RP_ACK_BAD_VALUE));
    CHECK(nothing_more());
    s = send_arm(1, 0, 100, 60, RP_DIR_UP, end, 40000);
    CHECK(expect_ack(s, RP_T_ARM_REWARD, RP_ACK_OK));
    s = send_arm(2, 0, 100, 60, RP_DIR_UP, end, 40000);
    CHECK(expect_ack(s, RP_T_ARM_REWARD, RP_ACK_BUSY));
    /* Disarm of another tag does nothing; of this one ends it (reason host) */
    s = send_disarm(2);
    CHECK(expect_ack(s, RP_T_DISARM, RP_ACK_OK));
    CHECK(nothing_more());
    s = send_disarm(1);
    CHECK(expect_ack(s, RP_T_DISARM, RP_ACK_OK));
    c = next_of(RP_T_REWARD_ENDED);
    CHECK(c != NULL);
    if (c) {
        CHECK_EQ(rp_unpack_reward_ended(c->body, c->body_len, &en), RP_OK);
        CHECK_EQ(en.reason, RP_DISARM_HOST);
        CHECK_EQ(en.trial_tag, 1);
    }
    /* lever held past the threshold at the arm: it must come back first */
    rd_isr_encoder(&dev, 150);
    s = send_arm(3, 0, 100, 60, RP_DIR_UP, end, 40000);
    CHECK(expect_ack(s, RP_T_ARM_REWARD, RP_ACK_OK));
    rd_isr_encoder(&dev, 151);
    CHECK_EQ(hw.valve, 0);
    rd_isr_encoder(&dev, 59);
    rd_isr_encoder(&dev, 100);
    CHECK_EQ(hw.valve, 1);
    /* Reset and Configure disarm */
    advance_fed(100000);
    skip_all();
    CHECK_EQ(hw.valve, 0);
    s = send_arm(4, 0, 100, 60, RP_DIR_UP, hw.now + 500000u, 40000);
    CHECK(expect_ack(s, RP_T_ARM_REWARD, RP_ACK_OK));
    s = send_configure(1000, 1, 100, 500, 200, 5000);
    CHECK(expect_ack(s, RP_T_CONFIGURE, RP_ACK_OK));
    c = next_of(RP_T_REWARD_ENDED);
    CHECK(c != NULL);
    if (c) {
        CHECK_EQ(rp_unpack_reward_ended(c->body, c->body_len, &en), RP_OK);
        CHECK_EQ(en.reason, RP_DISARM_CONFIGURE);
        CHECK_EQ(en.trial_tag, 4);
    }
    skip_all();
    s = send_arm(5, 0, 100, 60, RP_DIR_UP, hw.now + 500000u, 40000);
    CHECK(expect_ack(s, RP_T_ARM_REWARD, RP_ACK_OK));
    s = send0(RP_T_RESET);
    CHECK(expect_ack(s, RP_T_RESET, RP_ACK_OK));
    c = next_of(RP_T_REWARD_ENDED);
    CHECK(c != NULL);
    if (c) {
        CHECK_EQ(rp_unpack_reward_ended(c->body, c->body_len, &en), RP_OK);
        CHECK_EQ(en.reason, RP_DISARM_RESET);
        CHECK_EQ(en.trial_tag, 5);
    }
    rd_isr_encoder(&dev, 0);
    rd_isr_encoder(&dev, 500);
    CHECK_EQ(hw.valve, 0);
    CHECK(seqs_contiguous());
}

int main(void)
{
    RUN(test_quadrature);
    RUN(test_boot_hello);
    RUN(test_handshake_and_heartbeat);
    RUN(test_unknown_and_bad_frames);
    RUN(test_configure_validation);
    RUN(test_sampling_gap_free);
    RUN(test_sampling_tx_congestion);
    RUN(test_valve_pulse);
    RUN(test_valve_close_command);
    RUN(test_valve_flush_caps);
    RUN(test_watchdog);
    RUN(test_tone);
    RUN(test_sync_bitcode);
    RUN(test_reset);
    RUN(test_inputs);
    RUN(test_clock_wrap);
    RUN(test_fault_rate_limit);
    RUN(test_armed_reward_fires_in_the_encoder_update);
    RUN(test_armed_reward_never_fires_late);
    RUN(test_armed_reward_checks);
    if (hw.irq_violations || hw.irq_depth) {
        fprintf(stderr, "FAIL: tx with interrupts off (%d) or unbalanced irq (%d)\n",
                hw.irq_violations, hw.irq_depth);
        tu_failures++;
    }
    return tu_report("test_rigdevice");
}
