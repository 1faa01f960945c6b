/*
 * rigdevice: the rig microcontroller's logic (docs/protocol.md, sections
 * 1.3-1.7) in portable C99, behind a small hardware abstraction (rd_hal).
 *
 * The same code runs in the firmware (rig_firmware.ino supplies an AVR HAL)
 * and in the host tests (test/test_rigdevice.c supplies a fake HAL and a
 * fake clock). Nothing here touches hardware, allocates or uses floating point.
 *
 * Execution contexts
 * ------------------
 *   main loop : rd_init, rd_rx_byte, rd_poll. All frames are built and handed
 *               to hal->tx_frame here, never from an interrupt.
 *   interrupt : rd_tick (periodic, e.g. every 100 us: valve / tone / sync-out
 *               timing and the host watchdog, so they keep working even if
 *               the main loop stalls), rd_isr_lever_sample (sampling timer),
 *               rd_isr_lick, rd_isr_frame_ttl (edge interrupts).
 * Interrupt code only queues small records (samples into a sample ring,
 * events and faults into an event ring); the main loop turns them into
 * frames. The main loop changes output state inside hal->irq_save /
 * hal->irq_restore (interrupts off), so the tick never sees half an update.
 *
 * Transmit policy: a frame is handed to the HAL only if it fits entirely
 * (hal->tx_free), so the device never blocks. A lever batch is sent only if
 * RD_TX_RESERVE bytes stay free after it, so acks, events and faults still
 * get through when the lever stream saturates the line. Queued events and
 * faults wait in their ring until there is room; when a lever batch cannot
 * be sent its samples are dropped and counted (samples_dropped and Fault
 * SamplesDropped, plus one frame in tx_frames_dropped; the host sees a gap in
 * the sample indices); any other frame that cannot be sent (Ack, Pong,
 * Hello, Heartbeat) is dropped and counted (tx_frames_dropped, Fault
 * TxOverflow). A frame not sent does not use up a seq.
 *
 * Order of frames: a command's Ack (or Pong) goes out first, the events it
 * caused follow; after Reset: Ack, the events (cause 4), Hello. When a frame
 * ends the safe state, SafeStateCleared precedes the command's answer. These
 * choices, and the others where docs/protocol.md leaves room, are the same
 * as the Rust virtual rig's (rig-sim/src/device.rs).
 */
#ifndef RIGDEVICE_H
#define RIGDEVICE_H

#include <stdint.h>

#include "rigproto.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- compile-time settings --------------------------------------------- */

/* The hard cap on any valve opening, in ms, reported in Hello. Configure can
 * only lower the pulse cap below it; every opening (pulse or flush) is cut at
 * this value whatever the host asks. Build with -DRIG_HARD_MAX_VALVE_OPEN_MS=N
 * to change it. */
#ifndef RIG_HARD_MAX_VALVE_OPEN_MS
#define RIG_HARD_MAX_VALVE_OPEN_MS 1000
#endif
#if (RIG_HARD_MAX_VALVE_OPEN_MS) < 1 || (RIG_HARD_MAX_VALVE_OPEN_MS) > 65535
#error "RIG_HARD_MAX_VALVE_OPEN_MS must be 1..=65535"
#endif

#define RD_FW_MAJOR 1u
#define RD_FW_MINOR 0u
#define RD_FW_PATCH 0u

/* Before the first Configure (and after Reset). */
#define RD_BOOT_HEARTBEAT_INTERVAL_MS 1000u
#define RD_BOOT_HEARTBEAT_TIMEOUT_MS 1000u

/* Ring sizes: powers of two, at most 128. */
#ifndef RD_EVENT_RING
#define RD_EVENT_RING 32u
#endif
#ifndef RD_SAMPLE_RING
#define RD_SAMPLE_RING 64u
#endif
/* Bytes a lever batch must leave free in the transmit buffer. */
#ifndef RD_TX_RESERVE
#define RD_TX_RESERVE 64u
#endif
/* Shortest time between two Faults of the same counter kind (SamplesDropped,
 * RxFrameBad, TxOverflow); the counts accumulate in between. */
#ifndef RD_FAULT_MIN_INTERVAL_US
#define RD_FAULT_MIN_INTERVAL_US 100000ul
#endif

/* ---- hardware abstraction ---------------------------------------------- */

typedef struct rd_hal {
    /* Free-running 32-bit microsecond clock (wraps every 71.6 minutes). */
    uint32_t (*now_us)(void);
    /* Valve output: 1 = open (MOSFET on). */
    void (*set_valve)(uint8_t open);
    /* Start (or retune) the speaker's square wave; level_pct 0..=100. */
    void (*tone_start)(uint32_t frequency_hz, uint8_t level_pct);
    void (*tone_stop)(void);
    /* Sync-out line level. */
    void (*set_sync)(uint8_t high);
    /* Bytes that tx_frame would accept now; NULL means unlimited. */
    uint16_t (*tx_free)(void);
    /* Queue a whole frame for transmission, all or nothing, without
     * blocking; returns 1 if queued. */
    uint8_t (*tx_frame)(const uint8_t *bytes, uint16_t len);
    /* Start the sampling timer: call rd_isr_lever_sample every period_us,
     * the first one period_us from now. */
    void (*sampler_start)(uint32_t period_us);
    void (*sampler_stop)(void);
    /* Disable interrupts and return the previous state / restore it.
     * Both NULL on a single-threaded host. */
    uint8_t (*irq_save)(void);
    void (*irq_restore)(uint8_t saved);
} rd_hal;

/* What this board is and can do (goes into Hello and bounds commands). */
typedef struct rd_info {
    uint64_t device_id;
    uint32_t capabilities;       /* RP_CAP_* bits */
    uint32_t max_sample_rate_hz; /* highest lever rate the board sustains */
    uint32_t tone_min_hz;        /* Tone frequencies outside are BadValue */
    uint32_t tone_max_hz;
} rd_info;

/* ---- device state ------------------------------------------------------ */

typedef struct rd_sample {
    uint32_t index;
    uint32_t t_us;
    int32_t counts;
} rd_sample;

/* An Event (kind 1..=255) or a Fault (kind 0, code in aux, detail in value). */
typedef struct rd_queued {
    uint32_t t_us;
    uint32_t value;
    uint16_t aux;
    uint8_t kind;
} rd_queued;

#define RD_QUEUED_FAULT 0u

typedef struct rd_device {
    const rd_hal *hal;
    rd_info info;

    /* configuration (main loop only) */
    uint8_t configured;
    uint8_t streaming;
    uint8_t samples_per_batch;
    uint16_t period_us;
    uint32_t sample_rate_hz;
    uint32_t hb_interval_us;
    uint32_t hb_timeout_us; /* read by rd_tick */
    uint16_t max_valve_open_ms;
    uint16_t max_flush_ms;

    /* transmit (main loop only) */
    uint16_t tx_seq;
    uint32_t last_hb_us;
    uint8_t wire[RP_MAX_WIRE_FRAME];

    /* receive */
    rp_decoder dec;
    volatile uint32_t last_rx_us; /* last valid host frame; read by rd_tick */

    /* outputs (main loop under irq_save, and rd_tick) */
    volatile uint8_t safe;
    volatile uint8_t valve_open;
    uint8_t valve_cause;    /* cause if it closes at valve_limit_us */
    uint16_t valve_cap_ms;  /* the cap in ms, when valve_cause is CAP */
    uint32_t valve_t_open;
    uint32_t valve_limit_us;
    volatile uint8_t tone_on;
    uint32_t tone_t_start;
    uint32_t tone_dur_us;
    volatile uint8_t sync_busy;
    uint8_t sync_mode;
    uint8_t sync_nbits;
    uint8_t sync_slot;   /* current slot: 0 start, 1 gap, then bit/gap pairs */
    uint8_t sync_nslots;
    uint16_t sync_unit_us;
    uint32_t sync_value;
    uint32_t sync_t_next; /* when the current slot ends */

    /* lever samples: producer rd_isr_lever_sample, consumer rd_poll */
    volatile uint32_t next_index;
    rd_sample samples[RD_SAMPLE_RING];
    volatile uint8_t s_head;
    volatile uint8_t s_tail;
    rp_lever_header batch;
    int32_t batch_counts[RP_MAX_SAMPLES_PER_BATCH];

    /* events and faults: producers anywhere (under irq_save), consumer rd_poll */
    rd_queued q[RD_EVENT_RING];
    volatile uint8_t q_head;
    volatile uint8_t q_tail;

    /* armed reward (protocol version 2): armed by the main loop under
     * irq_save, checked and fired by rd_isr_encoder, expired by rd_tick */
    volatile uint8_t arm_state; /* RD_ARM_* */
    uint8_t arm_down;           /* direction DOWN */
    int32_t arm_fire_at;        /* absolute counts that fire */
    int32_t arm_rearm_at;       /* absolute counts the lever must pass back over first */
    uint32_t arm_tag;
    uint32_t arm_end_us;
    uint32_t arm_pulse_us;
    volatile int32_t enc_last; /* the encoder count at its latest update */
    /* the arm's one report (RewardFired or RewardEnded), sent by rd_poll */
    volatile uint8_t report; /* RD_REPORT_*: waiting to be sent */
    uint8_t last_report;     /* RD_REPORT_*: the last arm's, repeated on a Disarm of its tag */
    rp_reward_fired fired;
    rp_reward_ended ended;

    /* inputs (their interrupts only) */
    uint8_t lick_level;
    uint32_t lick_count;
    uint32_t ttl_count;

    /* counters since boot */
    volatile uint32_t samples_dropped;
    volatile uint32_t tx_frames_dropped;
    uint32_t samples_dropped_reported;
    volatile uint8_t pending_faults; /* RD_PF_* */
    uint8_t faults_sent;             /* RD_PF_*: sent at least once */
    uint32_t fault_last_us[3];
} rd_device;

/* ---- quadrature (x4) decoding ------------------------------------------ */

/* Count change for one transition of a quadrature encoder, with ab = (B << 1) | A
 * before and after: +1 or -1 for a step to a neighbouring state (every edge
 * of A and of B counts: x4 decoding), 0 for no change or for an impossible
 * jump of both lines (an edge was missed; nothing is counted). Forward is
 * 00 -> 01 -> 11 -> 10 -> 00 (A leads B); swap A and B to invert. Inline so
 * the encoder interrupt needs no call. */
static inline int8_t rd_quadrature_delta(uint8_t prev_ab, uint8_t cur_ab)
{
    /* index = prev << 2 | cur */
    static const int8_t table[16] = {0, 1, -1, 0, -1, 0, 0, 1, 1, 0, 0, -1, 0, -1, 1, 0};
    return table[((prev_ab & 3u) << 2) | (cur_ab & 3u)];
}

/* ---- main-loop API ----------------------------------------------------- */

/* Outputs off, then a 0x00 (resync) and Hello. Call with interrupts enabled
 * or not; it does not start any timer except through the HAL. */
void rd_init(rd_device *d, const rd_hal *hal, const rd_info *info);
/* One received byte. t_us is the time it arrived (only used for a 0x00,
 * which completes a frame: a Ping's t_rx_us). */
void rd_rx_byte(rd_device *d, uint8_t byte, uint32_t t_us);
/* Send what is queued: events and faults, lever batches, heartbeats. */
void rd_poll(rd_device *d);
/* Heartbeat.state bits as they are now. */
uint8_t rd_state(rd_device *d);

/* ---- interrupt API ----------------------------------------------------- */

/* Periodic: ends valve pulses, tones and sync-out slots, trips the watchdog.
 * Edges it drives are late by at most one tick period. */
void rd_tick(rd_device *d);

/* Is a timed output running? While none is, a platform may call rd_tick less
 * often (it then only checks the watchdog), to save interrupt time. */
static inline uint8_t rd_outputs_busy(const rd_device *d)
{
    return (uint8_t)(d->valve_open | d->tone_on | d->sync_busy);
}

/* Internal to the device code, here for the inline sample function. */
#define RD_PF_SAMPLES 0x01u
#define RD_PF_RX_BAD 0x02u
#define RD_PF_TX_OVERFLOW 0x04u
#define RD_SAMPLE_MASK ((uint8_t)(RD_SAMPLE_RING - 1u))
/* Keeps the compiler from moving ring stores across the index update. */
#if defined(__GNUC__)
#define RD_BARRIER() __asm__ __volatile__("" ::: "memory")
#else
#define RD_BARRIER() ((void)0)
#endif

/* One lever sample taken at t_us (the sampling instant). Inline: it runs in
 * the sampling interrupt, up to 10,000 times a second on an AVR. */
static inline void rd_isr_lever_sample(rd_device *d, uint32_t t_us, int32_t counts)
{
    uint32_t index = d->next_index;
    uint8_t head = d->s_head;
    uint8_t next = (uint8_t)((head + 1u) & RD_SAMPLE_MASK);
    d->next_index = index + 1u;
    if (next == d->s_tail) {
        /* The main loop is behind: the index is used up, so the host sees a gap. */
        d->samples_dropped++;
        d->pending_faults |= RD_PF_SAMPLES;
        return;
    }
    d->samples[head].index = index;
    d->samples[head].t_us = t_us;
    d->samples[head].counts = counts;
    RD_BARRIER();
    d->s_head = next;
}

/* The armed reward (docs/protocol.md 1.10). */
#define RD_ARM_NONE 0u
#define RD_ARM_WAIT 1u  /* armed; the lever must first come back below the re-arm point */
#define RD_ARM_READY 2u /* armed; the next update at or past the threshold fires */
#define RD_REPORT_NONE 0u
#define RD_REPORT_FIRED 1u
#define RD_REPORT_ENDED 2u

/* Out of line: the crossing was seen; checks the window, opens the valve. */
void rd_arm_fire(rd_device *d, int32_t counts);

/* Every encoder update, in the encoder interrupt, with the new count. The
 * threshold is checked here, so the valve opens within the interrupt that
 * saw the crossing edge (a few microseconds), not at the next sample. Inline
 * and branch-light: when nothing is armed it is one store and one test. */
static inline void rd_isr_encoder(rd_device *d, int32_t counts)
{
    uint8_t st = d->arm_state;
    d->enc_last = counts;
    if (st == RD_ARM_READY) {
        if (d->arm_down ? counts <= d->arm_fire_at : counts >= d->arm_fire_at) {
            rd_arm_fire(d, counts);
        }
    } else if (st == RD_ARM_WAIT) {
        if (d->arm_down ? counts > d->arm_rearm_at : counts < d->arm_rearm_at) {
            d->arm_state = RD_ARM_READY;
        }
    }
}

/* Lick sensor changed: touching = 1 when the tongue is on the spout. */
void rd_isr_lick(rd_device *d, uint32_t t_us, uint8_t touching);
/* Rising edge of the microscope's frame clock. */
void rd_isr_frame_ttl(rd_device *d, uint32_t t_us);

#ifdef __cplusplus
}
#endif

#endif /* RIGDEVICE_H */
