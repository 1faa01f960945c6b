/*
 * End-to-end check of the real AVR firmware (build/avr/rig_firmware.elf) in
 * the simavr simulator: the ATmega2560 runs the compiled firmware cycle by
 * cycle, this program plays the host on USART0 and the hardware on the pins.
 * It checks what the host tests cannot: the register-level HAL of
 * rig_firmware.ino (Timer5 clock, sampling and tick interrupts, input
 * capture, external interrupts, the UART ring buffers, the output pins).
 *
 *   sim_avr build/avr/rig_firmware.elf
 *
 * Optional (`build.sh avr-sim`, needs libsimavr-dev); exits nonzero on failure.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <avr_ioport.h>
#include <avr_uart.h>
#include <sim_avr.h>
#include <sim_elf.h>

#include "rigproto.h"
#include "testutil.h"

#define F_CPU 16000000ull
#define MAX_FRAMES 4096
#define MAX_EDGES 4096

typedef struct frame {
    uint8_t type;
    uint16_t seq;
    uint16_t len;
    uint8_t body[RP_MAX_BODY];
    uint64_t t_sim_us; /* simulated time the frame's last byte left the UART */
} frame;

typedef struct edge {
    uint64_t t_sim_us;
    uint8_t level;
} edge;

static avr_t *avr;
static avr_irq_t *uart_in;
static rp_decoder dec;
static frame frames[MAX_FRAMES];
static int n_frames, cursor;
static edge valve_edges[MAX_EDGES], sync_edges[MAX_EDGES];
static int n_valve, n_sync;
static uint32_t tone_toggles;
static uint16_t host_seq = 1;
static int64_t clock_offset; /* sim us - device us, from the TTL capture */
static uint32_t max_rate;     /* from Hello */

static uint64_t sim_us(void) { return avr->cycle * 1000000ull / F_CPU; }

static void uart_out_hook(struct avr_irq_t *irq, uint32_t value, void *param)
{
    rp_frame f;
    (void)irq;
    (void)param;
    if (rp_decoder_push(&dec, (uint8_t)value, &f) == RP_DEC_FRAME && n_frames < MAX_FRAMES) {
        frame *c = &frames[n_frames++];
        c->type = f.type;
        c->seq = f.seq;
        c->len = f.body_len;
        memcpy(c->body, f.body, f.body_len);
        c->t_sim_us = sim_us();
    }
}

static void log_pin(edge *log, int *n, uint32_t value)
{
    uint8_t level = value ? 1 : 0;
    if ((*n == 0 && level == 0) || (*n > 0 && log[*n - 1].level == level) || *n >= MAX_EDGES) {
        return;
    }
    log[*n].t_sim_us = sim_us();
    log[*n].level = level;
    (*n)++;
}

static uint64_t valve_rise_cycle; /* simulated cycle of the latest valve rise */

static void valve_hook(struct avr_irq_t *irq, uint32_t value, void *param)
{
    (void)irq;
    (void)param;
    if (value && (n_valve == 0 || valve_edges[n_valve - 1].level == 0)) {
        valve_rise_cycle = avr->cycle;
    }
    log_pin(valve_edges, &n_valve, value);
}

static void sync_hook(struct avr_irq_t *irq, uint32_t value, void *param)
{
    (void)irq;
    (void)param;
    log_pin(sync_edges, &n_sync, value);
}

static uint32_t tone_level;

static void tone_hook(struct avr_irq_t *irq, uint32_t value, void *param)
{
    (void)irq;
    (void)param;
    if ((value ? 1u : 0u) != tone_level) {
        tone_level = value ? 1u : 0u;
        tone_toggles++;
    }
}

static int run_us(uint64_t us)
{
    uint64_t end = avr->cycle + us * (F_CPU / 1000000ull);
    while (avr->cycle < end) {
        int st = avr_run(avr);
        if (st == cpu_Done || st == cpu_Crashed) {
            fprintf(stderr, "simulated CPU stopped (state %d) at %llu us\n", st,
                    (unsigned long long)sim_us());
            return 0;
        }
    }
    return 1;
}

static void set_pin(char port, int bit, int level)
{
    avr_raise_irq(avr_io_getirq(avr, AVR_IOCTL_IOPORT_GETIRQ(port), bit), level ? 1 : 0);
}

/* Send one host frame; returns its seq. */
static uint16_t send_cmd(uint8_t type, const uint8_t *body, size_t len)
{
    uint8_t wire[RP_MAX_WIRE_FRAME];
    size_t n = rp_build_frame(wire, type, host_seq, body, len), i;
    for (i = 0; i < n; i++) {
        avr_raise_irq(uart_in, wire[i]);
    }
    return host_seq++;
}

/* next frame of a type (skipping heartbeats, lever batches, other acks) */
static const frame *next_of(uint8_t type)
{
    while (cursor < n_frames) {
        const frame *f = &frames[cursor++];
        if (f->type == type) {
            return f;
        }
    }
    return NULL;
}

static int ack_status(uint16_t seq)
{
    int i;
    for (i = 0; i < n_frames; i++) {
        rp_ack a;
        if (frames[i].type == RP_T_ACK && rp_unpack_ack(frames[i].body, frames[i].len, &a) == 0 &&
            a.acked_seq == seq) {
            return a.status;
        }
    }
    return -1;
}

static void feed_watchdog(void) { send_cmd(RP_T_HOST_HEARTBEAT, NULL, 0); }

static void run_fed(uint64_t us)
{
    while (us > 0) {
        uint64_t step = us > 50000 ? 50000 : us;
        run_us(step);
        us -= step;
        feed_watchdog();
    }
}

static void test_boot(void)
{
    const frame *f;
    rp_hello h;
    CHECK(run_us(200000));
    f = next_of(RP_T_HELLO);
    CHECK(f != NULL);
    if (!f) {
        return;
    }
    CHECK_EQ(rp_unpack_hello(f->body, f->len, &h), RP_OK);
    CHECK_EQ(h.protocol_version, RP_PROTOCOL_VERSION);
    CHECK_EQ(h.clock_hz, 1000000);
    CHECKF(h.hard_max_valve_open_ms >= 200, "these checks need a hard cap of 200 ms or more");
    CHECK(h.max_sample_rate_hz >= 1000);
    max_rate = h.max_sample_rate_hz;
    CHECK_EQ(h.capabilities, 0x3F);
    CHECK(h.device_id != 0);
    CHECK_EQ(n_valve, 0);
    printf("     Hello after %llu us, device id %016llx\n", (unsigned long long)f->t_sim_us,
           (unsigned long long)h.device_id);
}

static void test_stream_and_encoder(void)
{
    uint8_t b[RP_CONFIGURE_LEN];
    rp_configure c = {1000, 10, 100, 500, 200, 2000};
    uint16_t s;
    int i, batches = 0, mark;
    uint32_t next = 0, last_t = 0;
    static const uint8_t fwd[4] = {0, 1, 3, 2};
    int32_t before = 0, after = 0;
    /* the encoder lines idle high (pull-ups); start from A = B = 0 */
    set_pin('E', 4, 0);
    set_pin('E', 5, 0);
    run_us(100);
    s = send_cmd(RP_T_CONFIGURE, b, rp_pack_configure(b, &c));
    mark = n_frames;
    run_fed(300000);
    CHECK_EQ(ack_status(s), RP_ACK_OK);
    for (i = mark; i < n_frames; i++) {
        rp_lever_header h;
        int32_t counts[RP_MAX_SAMPLES_PER_BATCH];
        if (frames[i].type != RP_T_LEVER_SAMPLES) {
            continue;
        }
        CHECK_EQ(rp_unpack_lever_samples(frames[i].body, frames[i].len, &h, counts), RP_OK);
        CHECK_EQ(h.count, 10);
        CHECK_EQ(h.period_us, 1000);
        CHECKF(h.first_index == next, "batch at %u, want %u", h.first_index, next);
        if (batches > 0) {
            CHECKF(h.t_first_us - last_t == 10000, "batches %u us apart", h.t_first_us - last_t);
        }
        next = h.first_index + h.count;
        last_t = h.t_first_us;
        before = counts[h.count - 1];
        batches++;
    }
    CHECKF(batches >= 28 && batches <= 30, "%d batches in 300 ms", batches);

    /* turn the encoder 100 steps forward (x4: 100 counts), 50 us per edge */
    for (i = 1; i <= 100; i++) {
        uint8_t ab = fwd[i % 4];
        set_pin('E', 4, ab & 1);
        set_pin('E', 5, (ab >> 1) & 1);
        run_us(50);
    }
    mark = n_frames;
    run_fed(50000);
    for (i = mark; i < n_frames; i++) {
        rp_lever_header h;
        int32_t counts[RP_MAX_SAMPLES_PER_BATCH];
        if (frames[i].type == RP_T_LEVER_SAMPLES &&
            rp_unpack_lever_samples(frames[i].body, frames[i].len, &h, counts) == RP_OK) {
            after = counts[h.count - 1];
        }
    }
    CHECKF(after - before == 100, "encoder moved %ld counts, want 100", (long)(after - before));
}

static void test_valve(void)
{
    uint8_t b[4];
    rp_valve_pulse p;
    uint16_t s;
    const frame *f;
    rp_event e;
    uint64_t open_us;
    int found = 0;
    p.duration_us = 200001;
    s = send_cmd(RP_T_VALVE_PULSE, b, rp_pack_valve_pulse(b, &p));
    run_fed(20000);
    CHECK_EQ(ack_status(s), RP_ACK_REFUSED);
    CHECK_EQ(n_valve, 0);
    p.duration_us = 38095;
    s = send_cmd(RP_T_VALVE_PULSE, b, rp_pack_valve_pulse(b, &p));
    cursor = n_frames;
    run_fed(100000);
    CHECK_EQ(ack_status(s), RP_ACK_OK);
    CHECK_EQ(n_valve, 2);
    if (n_valve < 2) {
        return;
    }
    open_us = valve_edges[1].t_sim_us - valve_edges[0].t_sim_us;
    CHECKF(open_us >= 38094 && open_us <= 38095 + 110, "valve pin high for %llu us",
           (unsigned long long)open_us);
    while ((f = next_of(RP_T_EVENT)) != NULL) {
        if (rp_unpack_event(f->body, f->len, &e) == 0 && e.kind == RP_EV_VALVE_CLOSE) {
            found = 1;
            CHECK_EQ(e.aux, RP_CAUSE_COMPLETED);
            CHECKF(e.value + 3 >= open_us && e.value <= open_us + 3,
                   "event says %u us, the pin %llu us", e.value, (unsigned long long)open_us);
        }
    }
    CHECK(found);
    printf("     38095 us pulse: pin high %llu us\n", (unsigned long long)open_us);
}

static void test_bitcode(void)
{
    uint8_t b[RP_SYNC_OUT_LEN];
    rp_sync_out so = {1, 12, 5000, 2748}; /* 1010 1011 1100 */
    uint16_t s;
    int i, k = 0, worst = 0;
    uint64_t t0;
    /* expected edges as offsets in units from the start */
    int want_units[64], want_level[64], nwant = 0, prev = 0;
    for (i = 0; i < 27; i++) {
        int lvl;
        if (i == 0) {
            lvl = 1;
        } else if (i == 1 || (i & 1) || i >= 26) {
            lvl = 0;
        } else {
            lvl = (int)((so.value >> (so.nbits - 1 - (i - 2) / 2)) & 1u);
        }
        if (lvl != prev) {
            want_units[nwant] = i;
            want_level[nwant] = lvl;
            nwant++;
            prev = lvl;
        }
    }
    n_sync = 0;
    s = send_cmd(RP_T_SYNC_OUT, b, rp_pack_sync_out(b, &so));
    run_fed(200000);
    CHECK_EQ(ack_status(s), RP_ACK_OK);
    CHECKF(n_sync == nwant, "%d sync edges, want %d", n_sync, nwant);
    if (n_sync < 1) {
        return;
    }
    t0 = sync_edges[0].t_sim_us;
    for (k = 0; k < n_sync && k < nwant; k++) {
        int64_t err = (int64_t)(sync_edges[k].t_sim_us - t0) - (int64_t)want_units[k] * 5000;
        CHECK_EQ(sync_edges[k].level, want_level[k]);
        CHECKF(err >= -2 && err <= 110, "edge %d off by %lld us", k, (long long)err);
        if (err > worst) {
            worst = (int)err;
        }
    }
    printf("     bitcode 0xABC: %d edges, latest %d us after its slot boundary\n", n_sync, worst);
}

static void test_tone(void)
{
    uint8_t b[RP_TONE_LEN];
    rp_tone t = {6000, 100, 80};
    uint16_t s;
    tone_toggles = 0;
    s = send_cmd(RP_T_TONE, b, rp_pack_tone(b, &t));
    run_fed(50000);
    CHECK_EQ(ack_status(s), RP_ACK_OK);
    /* 6 kHz square wave: 12,000 pin changes per second, ~600 in 50 ms */
    CHECKF(tone_toggles >= 560 && tone_toggles <= 620, "%u pin changes in 50 ms", tone_toggles);
    run_fed(100000);
    tone_toggles = 0;
    run_fed(20000);
    CHECKF(tone_toggles == 0, "%u pin changes after the tone ended", tone_toggles);
}

static void test_inputs(void)
{
    const frame *f;
    rp_event e;
    uint64_t t_edge;
    int ttl = 0, lick = 0;
    uint32_t ttl_t = 0;
    uint64_t ttl_sim = 0;
    cursor = n_frames;
    run_us(1000);
    t_edge = sim_us();
    set_pin('L', 1, 1); /* frame TTL rising edge: input capture */
    run_us(100);
    set_pin('L', 1, 0);
    set_pin('D', 2, 1); /* lick */
    run_us(2000);
    set_pin('D', 2, 0);
    run_fed(20000);
    while ((f = next_of(RP_T_EVENT)) != NULL) {
        if (rp_unpack_event(f->body, f->len, &e) != 0) {
            continue;
        }
        if (e.kind == RP_EV_FRAME_TTL) {
            ttl++;
            ttl_t = e.t_us;
            ttl_sim = t_edge;
            clock_offset = (int64_t)t_edge - (int64_t)e.t_us;
            CHECK_EQ(e.value, 1);
        } else if (e.kind == RP_EV_LICK_ON || e.kind == RP_EV_LICK_OFF) {
            lick++;
            CHECK_EQ(e.value, 1);
        }
    }
    CHECK_EQ(ttl, 1);
    CHECK_EQ(lick, 2);
    printf("     frame TTL stamped at device %u us (sim %llu us)\n", ttl_t,
           (unsigned long long)ttl_sim);
}

static void test_watchdog(void)
{
    const frame *f;
    rp_event e;
    int safe = 0;
    uint8_t b[2];
    rp_valve_open vo = {1000};
    send_cmd(RP_T_VALVE_OPEN, b, rp_pack_valve_open(b, &vo));
    cursor = n_frames;
    n_valve = 0;
    run_us(700000); /* no host frames: timeout 500 ms */
    while ((f = next_of(RP_T_EVENT)) != NULL) {
        if (rp_unpack_event(f->body, f->len, &e) == 0 && e.kind == RP_EV_SAFE_STATE) {
            safe = 1;
            CHECK_EQ(e.aux, RP_CAUSE_WATCHDOG);
            CHECK(e.value >= 500 && e.value <= 501);
        }
    }
    CHECK(safe);
    CHECK_EQ(n_valve, 2);
    if (n_valve == 2) {
        uint64_t open_us = valve_edges[1].t_sim_us - valve_edges[0].t_sim_us;
        CHECKF(open_us >= 499000 && open_us <= 500200, "valve open %llu us until the trip",
               (unsigned long long)open_us);
    }
}

static void ping_once(const char *what)
{
    const frame *f;
    rp_pong p;
    uint16_t s;
    uint64_t sent;
    cursor = n_frames;
    sent = sim_us();
    s = send_cmd(RP_T_PING, NULL, 0);
    run_us(5000);
    f = next_of(RP_T_PONG);
    CHECK(f != NULL);
    if (f && rp_unpack_pong(f->body, f->len, &p) == 0) {
        CHECK_EQ(p.ping_seq, s);
        CHECK(p.t_tx_us - p.t_rx_us < 1000);
        printf("     ping (%s): reply %llu us after sending; delimiter seen %lld us after "
               "sending, Pong queued %u us later, last byte out %lld us after that\n",
               what, (unsigned long long)(f->t_sim_us - sent),
               (long long)((int64_t)p.t_rx_us + clock_offset - (int64_t)sent),
               p.t_tx_us - p.t_rx_us,
               (long long)((int64_t)f->t_sim_us - ((int64_t)p.t_tx_us + clock_offset)));
    }
}

/* Frame-clock edges at ~30 Hz for 2 s: the device's stamps must keep the
 * simulator's spacing to the microsecond across every timer overflow. */
static void test_ttl_train(void)
{
    uint64_t sent[60];
    uint32_t got[60];
    int n = 0, i, worst = 0;
    const frame *f;
    rp_event e;
    cursor = n_frames;
    for (i = 0; i < 60; i++) {
        run_us(33333u + (uint64_t)(i * 7919) % 2000u); /* irregular on purpose */
        sent[i] = sim_us();
        set_pin('L', 1, 1);
        run_us(50);
        set_pin('L', 1, 0);
        if (i % 3 == 0) {
            feed_watchdog();
        }
    }
    run_fed(20000);
    while ((f = next_of(RP_T_EVENT)) != NULL && n < 60) {
        if (rp_unpack_event(f->body, f->len, &e) == 0 && e.kind == RP_EV_FRAME_TTL) {
            got[n++] = e.t_us;
        }
    }
    CHECK_EQ(n, 60);
    for (i = 1; i < n; i++) {
        int64_t d_sim = (int64_t)(sent[i] - sent[0]);
        int64_t d_dev = (int64_t)(uint32_t)(got[i] - got[0]);
        int err = (int)(d_dev - d_sim);
        if (err < 0) {
            err = -err;
        }
        if (err > worst) {
            worst = err;
        }
    }
    CHECKF(worst <= 1, "TTL stamps off by up to %d us", worst);
    printf("     60 frame-clock edges over %llu ms: stamps within %d us of the truth\n",
           (unsigned long long)((sent[59] - sent[0]) / 1000u), worst);
}

static void test_ping(void)
{
    uint8_t b[RP_CONFIGURE_LEN];
    rp_configure c = {0, 1, 100, 500, 200, 2000};
    int i;
    for (i = 0; i < 3; i++) {
        run_us(3333);
        ping_once("streaming 1 kHz");
    }
    send_cmd(RP_T_CONFIGURE, b, rp_pack_configure(b, &c));
    run_us(20000);
    for (i = 0; i < 3; i++) {
        run_us(3333);
        ping_once("idle");
    }
}

/* The advertised maximum rate, with the smallest batch rig-config's baud rule
 * (lever stream <= 80 % of 1,000,000 baud, 10 bits a byte) allows, while the
 * encoder turns at 10,000 edges a second: nothing may be lost. */
static void test_max_rate(void)
{
    uint8_t b[RP_CONFIGURE_LEN];
    rp_configure c = {0, 1, 100, 500, 200, 2000};
    uint32_t n, k, gaps = 0, seen = 0, next = 0, first = 1;
    int i, mark, beats = 0;
    int32_t last = 0, base = 0;
    static const uint8_t fwd[4] = {0, 1, 3, 2};
    rp_heartbeat hb;
    for (n = 1; n <= 50; n++) {
        uint32_t raw = 4u + 11u + 4u * n + 2u;
        uint32_t wire = raw + raw / 254u + 1u + 1u;
        if ((uint64_t)max_rate * wire * 10u <= (uint64_t)n * 800000u) {
            break;
        }
    }
    c.sample_rate_hz = max_rate;
    c.samples_per_batch = (uint8_t)n;
    set_pin('E', 4, 0);
    set_pin('E', 5, 0);
    send_cmd(RP_T_CONFIGURE, b, rp_pack_configure(b, &c));
    run_us(20000);
    mark = n_frames;
    for (k = 1; k <= 10000; k++) { /* 1 s */
        uint8_t ab = fwd[k % 4];
        set_pin('E', 4, ab & 1);
        set_pin('E', 5, (ab >> 1) & 1);
        run_us(100);
        if (k % 500 == 0) {
            feed_watchdog();
        }
    }
    run_fed(50000);
    memset(&hb, 0, sizeof hb);
    for (i = mark; i < n_frames; i++) {
        if (frames[i].type == RP_T_LEVER_SAMPLES) {
            rp_lever_header h;
            int32_t counts[RP_MAX_SAMPLES_PER_BATCH];
            if (rp_unpack_lever_samples(frames[i].body, frames[i].len, &h, counts) != RP_OK) {
                continue;
            }
            if (!first && h.first_index != next) {
                gaps += h.first_index - next;
            }
            if (first) {
                base = counts[0]; /* sampled before the encoder moved */
            }
            first = 0;
            next = h.first_index + h.count;
            seen += h.count;
            last = counts[h.count - 1];
        } else if (frames[i].type == RP_T_HEARTBEAT) {
            rp_unpack_heartbeat(frames[i].body, frames[i].len, &hb);
            beats++;
        }
    }
    printf("     %u Hz, %u per frame: %u samples in 1.05 s, %u missing, encoder moved %ld\n",
           max_rate, n, seen, gaps, (long)(last - base));
    CHECK(seen >= max_rate);
    CHECK_EQ(gaps, 0);
    CHECK(beats >= 9);
    CHECK_EQ(hb.samples_dropped, 0);
    CHECK_EQ(hb.tx_frames_dropped, 0);
    CHECK_EQ(last - base, 10000); /* every edge counted */
    /* stop the stream */
    c.sample_rate_hz = 0;
    send_cmd(RP_T_CONFIGURE, b, rp_pack_configure(b, &c));
    run_fed(20000);
}

/* ---- armed reward: encoder edge -> valve pin ------------------------------ */

/* The encoder's quadrature phase (forward: 00 01 11 10), as the previous
 * tests left it (A = B = 0). */
static int enc_phase;

static void enc_step(int dir)
{
    static const uint8_t fwd[4] = {0, 1, 3, 2};
    uint8_t ab;
    enc_phase = (enc_phase + dir + 4) % 4;
    ab = fwd[enc_phase];
    set_pin('E', 4, ab & 1);
    set_pin('E', 5, (ab >> 1) & 1);
}

/* The latest lever count the device reported. */
static int32_t last_lever_count(void)
{
    int i;
    for (i = n_frames - 1; i >= 0; i--) {
        rp_lever_header h;
        int32_t counts[RP_MAX_SAMPLES_PER_BATCH];
        if (frames[i].type == RP_T_LEVER_SAMPLES &&
            rp_unpack_lever_samples(frames[i].body, frames[i].len, &h, counts) == RP_OK) {
            return counts[h.count - 1];
        }
    }
    return 0;
}

/* Device time now, from the latest frame that carries one (an Ack). */
static uint32_t device_now_us(void)
{
    int i;
    for (i = n_frames - 1; i >= 0; i--) {
        rp_ack a;
        if (frames[i].type == RP_T_ACK && rp_unpack_ack(frames[i].body, frames[i].len, &a) == 0) {
            return a.t_us + (uint32_t)(sim_us() - frames[i].t_sim_us);
        }
    }
    return 0;
}

#define ARM_TRIALS 16
#define ARM_THRESHOLD 20
/* 50 us at 16 MHz: the budget from the crossing edge to the valve pin. */
#define ARM_MAX_CYCLES 800u

static void test_armed_reward(void)
{
    uint64_t lat_min = UINT64_MAX, lat_max = 0, lat_sum = 0;
    int trial, fired_ok = 0;
    /* the lever stream of test_stream_and_encoder runs (1 kHz, 10 a batch) */
    for (trial = 0; trial < ARM_TRIALS; trial++) {
        uint8_t b[RP_ARM_REWARD_LEN];
        rp_arm_reward a;
        uint16_t s;
        int edge, edges_to_fire = -1, mark;
        uint64_t edge_cycle = 0, lat;
        int32_t rest;
        run_fed(30000);
        rest = last_lever_count();
        a.trial_tag = (uint32_t)(100 + trial);
        a.rest_counts = rest;
        a.threshold_counts = ARM_THRESHOLD;
        a.rearm_counts = ARM_THRESHOLD / 2;
        a.direction = RP_DIR_UP;
        a.window_end_us = device_now_us() + 1000000u;
        a.pulse_us = 2000;
        s = send_cmd(RP_T_ARM_REWARD, b, rp_pack_arm_reward(b, &a));
        run_us(8000); /* the Ack waits behind lever batches on the line */
        CHECKF(ack_status(s) == RP_ACK_OK, "trial %d: arm status %d", trial, ack_status(s));
        mark = n_frames;
        valve_rise_cycle = 0;
        /* press: one edge every 97 + 13 * trial us, so the crossing edge meets
         * the sampling and tick interrupts at a different phase each trial */
        for (edge = 1; edge <= ARM_THRESHOLD + 5; edge++) {
            uint64_t c;
            enc_step(1);
            c = avr->cycle;
            run_us((uint64_t)(97 + 13 * trial));
            if (valve_rise_cycle != 0 && edges_to_fire < 0) {
                edges_to_fire = edge;
                edge_cycle = c;
            }
        }
        CHECKF(edges_to_fire == ARM_THRESHOLD, "trial %d: valve opened at edge %d, want %d", trial,
               edges_to_fire, ARM_THRESHOLD);
        if (edges_to_fire > 0) {
            lat = valve_rise_cycle - edge_cycle;
            lat_sum += lat;
            if (lat < lat_min) {
                lat_min = lat;
            }
            if (lat > lat_max) {
                lat_max = lat;
            }
            fired_ok++;
        }
        run_fed(10000);
        {
            int i, n_fired = 0;
            for (i = mark; i < n_frames; i++) {
                rp_reward_fired f;
                if (frames[i].type == RP_T_REWARD_FIRED &&
                    rp_unpack_reward_fired(frames[i].body, frames[i].len, &f) == RP_OK) {
                    n_fired++;
                    CHECK_EQ(f.trial_tag, a.trial_tag);
                    CHECK_EQ(f.counts, rest + ARM_THRESHOLD);
                    CHECK_EQ(f.pulse_us, 2000);
                }
            }
            CHECKF(n_fired == 1, "trial %d: %d RewardFired", trial, n_fired);
        }
        /* release back to rest */
        for (edge = 0; edge < ARM_THRESHOLD + 5; edge++) {
            enc_step(-1);
            run_us(60);
        }
    }
    CHECK_EQ(fired_ok, ARM_TRIALS);
    CHECK_EQ(n_valve, 2 * ARM_TRIALS); /* each crossing: one opening, closed again */
    n_valve = 0;                       /* the next tests count their own */
    if (fired_ok > 0) {
        printf("     encoder edge -> valve pin: min %llu, mean %llu, max %llu cycles "
               "(%.2f / %.2f / %.2f us at 16 MHz) over %d crossings\n",
               (unsigned long long)lat_min, (unsigned long long)(lat_sum / (uint64_t)fired_ok),
               (unsigned long long)lat_max, (double)lat_min / 16.0,
               (double)lat_sum / (double)fired_ok / 16.0, (double)lat_max / 16.0, fired_ok);
        CHECKF(lat_max <= ARM_MAX_CYCLES, "edge -> valve %llu cycles, budget %u (50 us)",
               (unsigned long long)lat_max, ARM_MAX_CYCLES);
    }
}

int main(int argc, char **argv)
{
    elf_firmware_t fw;
    uint32_t flags = 0;
    if (argc < 2) {
        fprintf(stderr, "usage: %s rig_firmware.elf\n", argv[0]);
        return 2;
    }
    memset(&fw, 0, sizeof fw);
    if (elf_read_firmware(argv[1], &fw) != 0) {
        fprintf(stderr, "cannot read %s\n", argv[1]);
        return 2;
    }
    avr = avr_make_mcu_by_name("atmega2560");
    if (!avr) {
        fprintf(stderr, "simavr has no atmega2560\n");
        return 2;
    }
    avr_init(avr);
    avr->frequency = (uint32_t)F_CPU;
    avr->log = 0;
    avr_load_firmware(avr, &fw);
    rp_decoder_init(&dec);

    avr_ioctl(avr, AVR_IOCTL_UART_GET_FLAGS('0'), &flags);
    flags &= ~(uint32_t)AVR_UART_FLAG_STDIO;
    avr_ioctl(avr, AVR_IOCTL_UART_SET_FLAGS('0'), &flags);
    uart_in = avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_INPUT);
    avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUTPUT),
                            uart_out_hook, NULL);
    avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_IOPORT_GETIRQ('H'), 5), valve_hook, NULL);
    avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_IOPORT_GETIRQ('H'), 6), sync_hook, NULL);
    avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_IOPORT_GETIRQ('H'), 3), tone_hook, NULL);

    RUN(test_boot);
    RUN(test_stream_and_encoder);
    RUN(test_armed_reward);
    RUN(test_valve);
    RUN(test_bitcode);
    RUN(test_tone);
    RUN(test_inputs);
    RUN(test_ttl_train);
    RUN(test_ping);
    RUN(test_max_rate);
    RUN(test_watchdog);
    printf("     %d frames from the device, %u bad\n", n_frames, dec.frames_bad);
    CHECK_EQ(dec.frames_bad, 0);
    return tu_report("sim_avr");
}
