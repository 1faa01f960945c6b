/*
 * rigdevice: the device state machine. See rigdevice.h for the contexts and
 * the transmit policy, docs/protocol.md section 1 for the behaviour.
 */
#include <string.h>

#include "rigdevice.h"

#define RD_EVENT_MASK ((uint8_t)(RD_EVENT_RING - 1u))

#if (RD_EVENT_RING & (RD_EVENT_RING - 1u)) != 0 || RD_EVENT_RING > 128u || RD_EVENT_RING < 4u
#error "RD_EVENT_RING must be a power of two in 4..=128"
#endif
#if (RD_SAMPLE_RING & (RD_SAMPLE_RING - 1u)) != 0 || RD_SAMPLE_RING > 128u || RD_SAMPLE_RING < 4u
#error "RD_SAMPLE_RING must be a power of two in 4..=128"
#endif

#define RD_HARD_MS ((uint16_t)(RIG_HARD_MAX_VALVE_OPEN_MS))

/* ---- small helpers ----------------------------------------------------- */

static uint32_t rd_ms_to_us(uint16_t ms)
{
    return (uint32_t)ms * 1000ul;
}

/* Has the 32-bit clock reached `t`? (valid within 2^31 us of it) */
static uint8_t rd_reached(uint32_t now, uint32_t t)
{
    return (uint32_t)(now - t) < 0x80000000ul;
}

static uint8_t rd_lock(rd_device *d)
{
    return d->hal->irq_save ? d->hal->irq_save() : 0u;
}

static void rd_unlock(rd_device *d, uint8_t saved)
{
    if (d->hal->irq_restore) {
        d->hal->irq_restore(saved);
    }
}

static uint32_t rd_now(rd_device *d)
{
    return d->hal->now_us();
}

/* ---- event ring (any context) ------------------------------------------ */

static void rd_push(rd_device *d, uint32_t t_us, uint8_t kind, uint16_t aux, uint32_t value)
{
    uint8_t s = rd_lock(d);
    uint8_t head = d->q_head;
    uint8_t next = (uint8_t)((head + 1u) & RD_EVENT_MASK);
    if (next == d->q_tail) {
        d->tx_frames_dropped++;
        d->pending_faults |= RD_PF_TX_OVERFLOW;
    } else {
        rd_queued *e = &d->q[head];
        e->t_us = t_us;
        e->kind = kind;
        e->aux = aux;
        e->value = value;
        RD_BARRIER();
        d->q_head = next;
    }
    rd_unlock(d, s);
}

static void rd_push_event(rd_device *d, uint32_t t_us, uint8_t kind, uint16_t aux, uint32_t value)
{
    rd_push(d, t_us, kind, aux, value);
}

static void rd_push_fault(rd_device *d, uint32_t t_us, uint16_t code, uint32_t detail)
{
    rd_push(d, t_us, RD_QUEUED_FAULT, code, detail);
}

/* ---- outputs (call with interrupts off, or from the tick) --------------- */

static void rd_valve_close(rd_device *d, uint32_t now, uint16_t cause)
{
    d->hal->set_valve(0);
    d->valve_open = 0;
    rd_push_event(d, now, RP_EV_VALVE_CLOSE, cause, (uint32_t)(now - d->valve_t_open));
    if (cause == RP_CAUSE_CAP) {
        rd_push_fault(d, now, RP_FAULT_VALVE_CAP_TRIPPED, d->valve_cap_ms);
    }
}

static void rd_tone_off(rd_device *d, uint32_t now, uint16_t cause)
{
    d->hal->tone_stop();
    d->tone_on = 0;
    rd_push_event(d, now, RP_EV_TONE_OFF, cause, 0);
}

static void rd_sync_end(rd_device *d, uint32_t now)
{
    d->hal->set_sync(0);
    d->sync_busy = 0;
    rd_push_event(d, now, RP_EV_SYNC_OUT_END, 0, d->sync_value);
}

/* Level of the sync line during `slot` (see docs/protocol.md 1.6). */
static uint8_t rd_sync_level(const rd_device *d, uint8_t slot)
{
    uint8_t bit;
    if (slot == 0) {
        return 1; /* the pulse, or the bitcode's start pulse */
    }
    if (slot == 1 || (slot & 1u)) {
        return 0; /* a gap */
    }
    bit = (uint8_t)(d->sync_nbits - 1u - (uint8_t)((slot - 2u) / 2u));
    return (uint8_t)((d->sync_value >> bit) & 1ul);
}

/* Everything off; events with `cause` for what was on. */
static void rd_outputs_off(rd_device *d, uint32_t now, uint16_t cause)
{
    if (d->valve_open) {
        rd_valve_close(d, now, cause);
    }
    d->hal->set_valve(0);
    if (d->tone_on) {
        rd_tone_off(d, now, cause);
    }
    if (d->sync_busy) {
        rd_sync_end(d, now);
    }
    d->hal->set_sync(0);
}

static void rd_valve_open(rd_device *d, uint32_t now, uint32_t limit_us, uint8_t cause,
                          uint16_t cap_ms, uint32_t event_value);

/* ---- armed reward (any context, interrupts off) -------------------------- */

/* End the arm without firing; the report goes out from rd_poll. */
static void rd_arm_end(rd_device *d, uint32_t now, uint8_t reason)
{
    if (d->arm_state == RD_ARM_NONE) {
        return;
    }
    d->arm_state = RD_ARM_NONE;
    d->ended.trial_tag = d->arm_tag;
    d->ended.t_us = now;
    d->ended.reason = reason;
    d->ended.next_sample_index = d->next_index;
    d->report = RD_REPORT_ENDED;
    d->last_report = RD_REPORT_ENDED;
}

void rd_arm_fire(rd_device *d, int32_t counts)
{
    uint32_t now = rd_now(d);
    if (rd_reached(now, d->arm_end_us)) {
        /* The window is over (the tick has not expired it yet): never late. */
        rd_arm_end(d, d->arm_end_us, RP_DISARM_EXPIRED);
        return;
    }
    if (d->valve_open) {
        rd_arm_end(d, now, RP_DISARM_VALVE_BUSY);
        return;
    }
    d->arm_state = RD_ARM_NONE; /* one firing per arm */
    rd_valve_open(d, now, d->arm_pulse_us, RP_CAUSE_COMPLETED, 0, d->arm_pulse_us);
    d->fired.trial_tag = d->arm_tag;
    d->fired.sample_index = d->next_index; /* the next sample shows the crossing */
    d->fired.t_cross_us = now;
    d->fired.t_valve_us = now;
    d->fired.counts = counts;
    d->fired.pulse_us = d->arm_pulse_us;
    d->report = RD_REPORT_FIRED;
    d->last_report = RD_REPORT_FIRED;
}

/* ---- periodic tick (interrupt context) ---------------------------------- */

void rd_tick(rd_device *d)
{
    uint32_t now = rd_now(d);

    if (d->valve_open) {
        uint32_t open_for = (uint32_t)(now - d->valve_t_open);
        if (open_for >= d->valve_limit_us) {
            rd_valve_close(d, now, d->valve_cause);
        } else if (open_for >= rd_ms_to_us(RD_HARD_MS)) {
            /* Belt and braces: valve_limit_us never exceeds the hard cap. */
            d->valve_cap_ms = RD_HARD_MS;
            rd_valve_close(d, now, RP_CAUSE_CAP);
        }
    }

    if (d->tone_on && (uint32_t)(now - d->tone_t_start) >= d->tone_dur_us) {
        rd_tone_off(d, now, RP_CAUSE_COMPLETED);
    }

    if (d->sync_busy) {
        while (d->sync_busy && rd_reached(now, d->sync_t_next)) {
            d->sync_slot++;
            d->sync_t_next += d->sync_unit_us;
            if (d->sync_slot >= d->sync_nslots) {
                rd_sync_end(d, now);
            } else {
                d->hal->set_sync(rd_sync_level(d, d->sync_slot));
            }
        }
    }

    if (d->arm_state != RD_ARM_NONE && rd_reached(now, d->arm_end_us)) {
        rd_arm_end(d, d->arm_end_us, RP_DISARM_EXPIRED);
    }

    if (!d->safe) {
        uint32_t silent = (uint32_t)(now - d->last_rx_us);
        if (silent >= d->hb_timeout_us) {
            uint32_t ms = silent / 1000ul;
            d->safe = 1;
            rd_arm_end(d, now, RP_DISARM_WATCHDOG);
            rd_outputs_off(d, now, RP_CAUSE_WATCHDOG);
            rd_push_event(d, now, RP_EV_SAFE_STATE, RP_CAUSE_WATCHDOG, ms);
            rd_push_fault(d, now, RP_FAULT_WATCHDOG_TRIPPED, ms);
        }
    }
}

/* ---- inputs (interrupt context) ----------------------------------------- */

void rd_isr_lick(rd_device *d, uint32_t t_us, uint8_t touching)
{
    touching = touching ? 1u : 0u;
    if (touching == d->lick_level) {
        return; /* no change (a missed edge in between, or a repeat) */
    }
    d->lick_level = touching;
    if (touching) {
        d->lick_count++;
        rd_push_event(d, t_us, RP_EV_LICK_ON, 0, d->lick_count);
    } else {
        rd_push_event(d, t_us, RP_EV_LICK_OFF, 0, d->lick_count);
    }
}

void rd_isr_frame_ttl(rd_device *d, uint32_t t_us)
{
    d->ttl_count++;
    rd_push_event(d, t_us, RP_EV_FRAME_TTL, 0, d->ttl_count);
}

/* ---- transmit (main loop) ----------------------------------------------- */

/* Hand d->wire[..len] to the HAL if it fits with `reserve` bytes to spare. */
static uint8_t rd_try_send(rd_device *d, size_t len, uint16_t reserve)
{
    if (len == 0) {
        return 0;
    }
    if (d->hal->tx_free && (uint32_t)d->hal->tx_free() < (uint32_t)len + reserve) {
        return 0;
    }
    if (!d->hal->tx_frame(d->wire, (uint16_t)len)) {
        return 0;
    }
    d->tx_seq++;
    return 1;
}

static void rd_count_tx_drop(rd_device *d)
{
    uint8_t s = rd_lock(d);
    d->tx_frames_dropped++;
    d->pending_faults |= RD_PF_TX_OVERFLOW;
    rd_unlock(d, s);
}

/* A frame that is not kept for retry: count it if it cannot be sent. */
static uint8_t rd_send_body(rd_device *d, uint8_t type, const uint8_t *body, size_t len)
{
    size_t n = rp_build_frame(d->wire, type, d->tx_seq, body, len);
    if (rd_try_send(d, n, 0)) {
        return 1;
    }
    rd_count_tx_drop(d);
    return 0;
}

/* Send queued events and faults, oldest first, until the line is full. */
static void rd_drain_events(rd_device *d)
{
    while (d->q_tail != d->q_head) {
        uint8_t body[RP_EVENT_LEN > RP_FAULT_LEN ? RP_EVENT_LEN : RP_FAULT_LEN];
        const rd_queued *e = &d->q[d->q_tail];
        size_t n;
        RD_BARRIER();
        if (e->kind == RD_QUEUED_FAULT) {
            rp_fault f;
            f.t_us = e->t_us;
            f.code = e->aux;
            f.detail = e->value;
            n = rp_build_frame(d->wire, RP_T_FAULT, d->tx_seq, body, rp_pack_fault(body, &f));
        } else {
            rp_event ev;
            ev.t_us = e->t_us;
            ev.kind = e->kind;
            ev.aux = e->aux;
            ev.value = e->value;
            n = rp_build_frame(d->wire, RP_T_EVENT, d->tx_seq, body, rp_pack_event(body, &ev));
        }
        if (!rd_try_send(d, n, 0)) {
            return; /* stays queued; retried on the next poll */
        }
        RD_BARRIER();
        d->q_tail = (uint8_t)((d->q_tail + 1u) & RD_EVENT_MASK);
    }
}

static void rd_send_ack(rd_device *d, const rp_frame *f, uint8_t status, uint32_t t_us)
{
    uint8_t body[RP_ACK_LEN];
    rp_ack a;
    a.acked_seq = f->seq;
    a.acked_type = f->type;
    a.status = status;
    a.t_us = t_us;
    /* The Ack first; the events the command caused are queued and follow. */
    rd_send_body(d, RP_T_ACK, body, rp_pack_ack(body, &a));
}

static void rd_send_hello(rd_device *d)
{
    uint8_t body[RP_HELLO_LEN];
    rp_hello h;
    h.protocol_version = RP_PROTOCOL_VERSION;
    h.firmware_major = RD_FW_MAJOR;
    h.firmware_minor = RD_FW_MINOR;
    h.firmware_patch = RD_FW_PATCH;
    h.device_id = d->info.device_id;
    h.clock_hz = RP_CLOCK_HZ;
    h.capabilities = d->info.capabilities;
    h.max_sample_rate_hz = d->info.max_sample_rate_hz;
    h.hard_max_valve_open_ms = RD_HARD_MS;
    h.t_us = rd_now(d);
    rd_send_body(d, RP_T_HELLO, body, rp_pack_hello(body, &h));
}

uint8_t rd_state(rd_device *d)
{
    uint8_t st = 0;
    uint8_t s = rd_lock(d);
    if (d->streaming) {
        st |= RP_STATE_STREAMING;
    }
    if (d->valve_open) {
        st |= RP_STATE_VALVE_OPEN;
    }
    if (d->tone_on) {
        st |= RP_STATE_TONE_ON;
    }
    if (d->safe) {
        st |= RP_STATE_SAFE;
    }
    if (d->sync_busy) {
        st |= RP_STATE_SYNC_BUSY;
    }
    rd_unlock(d, s);
    return st;
}

static void rd_send_heartbeat(rd_device *d, uint32_t now)
{
    uint8_t body[RP_HEARTBEAT_LEN];
    rp_heartbeat hb;
    uint8_t s;
    hb.t_us = now;
    hb.state = rd_state(d);
    s = rd_lock(d);
    hb.next_sample_index = d->next_index;
    hb.samples_dropped = d->samples_dropped;
    hb.tx_frames_dropped = d->tx_frames_dropped;
    rd_unlock(d, s);
    hb.rx_frames_bad = d->dec.frames_bad;
    rd_send_body(d, RP_T_HEARTBEAT, body, rp_pack_heartbeat(body, &hb));
}

/* SamplesDropped, RxFrameBad, TxOverflow: one Fault per kind at most every
 * RD_FAULT_MIN_INTERVAL_US, carrying the counts. Kept pending until sent. */
static void rd_send_counter_faults(rd_device *d, uint32_t now)
{
    static const uint8_t bits[3] = {RD_PF_SAMPLES, RD_PF_RX_BAD, RD_PF_TX_OVERFLOW};
    static const uint16_t codes[3] = {RP_FAULT_SAMPLES_DROPPED, RP_FAULT_RX_FRAME_BAD,
                                      RP_FAULT_TX_OVERFLOW};
    uint8_t i;
    for (i = 0; i < 3u; i++) {
        uint8_t body[RP_FAULT_LEN];
        rp_fault f;
        uint8_t s;
        uint8_t pending;
        uint32_t dropped;
        uint32_t tx_dropped;
        size_t n;
        s = rd_lock(d);
        pending = d->pending_faults;
        dropped = d->samples_dropped;
        tx_dropped = d->tx_frames_dropped;
        rd_unlock(d, s);
        if (!(pending & bits[i])) {
            continue;
        }
        if ((d->faults_sent & bits[i]) &&
            (uint32_t)(now - d->fault_last_us[i]) < RD_FAULT_MIN_INTERVAL_US) {
            continue;
        }
        f.t_us = now;
        f.code = codes[i];
        if (bits[i] == RD_PF_SAMPLES) {
            f.detail = dropped - d->samples_dropped_reported; /* since the last report */
        } else if (bits[i] == RD_PF_RX_BAD) {
            f.detail = d->dec.frames_bad; /* since boot */
        } else {
            f.detail = tx_dropped; /* since boot */
        }
        n = rp_build_frame(d->wire, RP_T_FAULT, d->tx_seq, body, rp_pack_fault(body, &f));
        if (!rd_try_send(d, n, 0)) {
            return; /* still pending; not itself counted as a dropped frame */
        }
        s = rd_lock(d);
        d->pending_faults &= (uint8_t)~bits[i];
        rd_unlock(d, s);
        if (bits[i] == RD_PF_SAMPLES) {
            d->samples_dropped_reported = dropped;
        }
        d->faults_sent |= bits[i];
        d->fault_last_us[i] = now;
    }
}

/* The arm's report (RewardFired or RewardEnded), if one waits. It stays
 * pending until the line has room; a new arm is Busy until it is sent. */
static void rd_send_report(rd_device *d)
{
    uint8_t body[RP_REWARD_FIRED_LEN];
    rp_reward_fired fired;
    rp_reward_ended ended;
    uint8_t kind;
    size_t n;
    uint8_t s = rd_lock(d);
    kind = d->report;
    fired = d->fired;
    ended = d->ended;
    rd_unlock(d, s);
    if (kind == RD_REPORT_FIRED) {
        n = rp_build_frame(d->wire, RP_T_REWARD_FIRED, d->tx_seq, body,
                           rp_pack_reward_fired(body, &fired));
    } else if (kind == RD_REPORT_ENDED) {
        n = rp_build_frame(d->wire, RP_T_REWARD_ENDED, d->tx_seq, body,
                           rp_pack_reward_ended(body, &ended));
    } else {
        return;
    }
    if (rd_try_send(d, n, 0)) {
        s = rd_lock(d);
        if (d->report == kind) {
            d->report = RD_REPORT_NONE;
        }
        rd_unlock(d, s);
    }
}

/* ---- lever batches (main loop) ------------------------------------------ */

static void rd_send_batch(rd_device *d)
{
    size_t n;
    if (d->batch.count == 0) {
        return;
    }
    n = rp_build_lever_frame(d->wire, d->tx_seq, &d->batch, d->batch_counts);
    if (!rd_try_send(d, n, RD_TX_RESERVE)) {
        /* Counted as samples and as a frame, as the Rust virtual rig does. */
        uint8_t s = rd_lock(d);
        d->samples_dropped += d->batch.count;
        d->tx_frames_dropped++;
        d->pending_faults |= RD_PF_SAMPLES | RD_PF_TX_OVERFLOW;
        rd_unlock(d, s);
    }
    d->batch.count = 0;
}

/* Move samples from the ring into batches; a batch goes out as soon as it is
 * full, or early if the next sample is not the next index (a gap), or when
 * `flush` is set (the stream stops or restarts). */
static void rd_drain_samples(rd_device *d, uint8_t flush)
{
    while (d->s_tail != d->s_head) {
        const rd_sample *smp;
        RD_BARRIER();
        smp = &d->samples[d->s_tail];
        if (d->batch.count > 0 &&
            smp->index != (uint32_t)(d->batch.first_index + d->batch.count)) {
            rd_send_batch(d);
        }
        if (d->batch.count == 0) {
            d->batch.first_index = smp->index;
            d->batch.t_first_us = smp->t_us;
            d->batch.period_us = d->period_us;
        }
        d->batch_counts[d->batch.count] = smp->counts;
        d->batch.count++;
        RD_BARRIER();
        d->s_tail = (uint8_t)((d->s_tail + 1u) & RD_SAMPLE_MASK);
        if (d->batch.count >= d->samples_per_batch) {
            rd_send_batch(d);
        }
    }
    if (flush) {
        rd_send_batch(d);
    }
}

/* Stop the sampler and send every sample taken so far. */
static void rd_stop_stream(rd_device *d)
{
    if (d->streaming) {
        d->hal->sampler_stop();
        d->streaming = 0;
    }
    rd_drain_samples(d, 1);
}

/* ---- configuration ------------------------------------------------------ */

static void rd_default_config(rd_device *d)
{
    d->configured = 0;
    d->sample_rate_hz = 0;
    d->period_us = 0;
    d->samples_per_batch = 1;
    d->hb_interval_us = rd_ms_to_us(RD_BOOT_HEARTBEAT_INTERVAL_MS);
    d->hb_timeout_us = rd_ms_to_us(RD_BOOT_HEARTBEAT_TIMEOUT_MS);
    /* Until Configure: the caps are the hard cap. */
    d->max_valve_open_ms = RD_HARD_MS;
    d->max_flush_ms = RD_HARD_MS;
}

/* Status of a Configure; RP_ACK_OK if every field is acceptable. */
static uint8_t rd_check_configure(const rd_device *d, const rp_configure *c)
{
    if (c->sample_rate_hz != 0) {
        if (c->sample_rate_hz > d->info.max_sample_rate_hz) {
            return RP_ACK_BAD_VALUE;
        }
        if (RP_CLOCK_HZ % c->sample_rate_hz != 0) {
            return RP_ACK_BAD_VALUE;
        }
        /* LeverSamples carries period_us as a u16: rates below 16 Hz cannot
         * be described (docs/protocol.md 1.4), so they are refused. */
        if (RP_CLOCK_HZ / c->sample_rate_hz > 0xFFFFul) {
            return RP_ACK_BAD_VALUE;
        }
        /* Only checked for a stream: a stop (rate 0) needs no batch size. */
        if (c->samples_per_batch < 1u || c->samples_per_batch > RP_MAX_SAMPLES_PER_BATCH) {
            return RP_ACK_BAD_VALUE;
        }
    }
    if (c->heartbeat_timeout_ms == 0) {
        return RP_ACK_BAD_VALUE;
    }
    if (c->heartbeat_interval_ms == 0) {
        return RP_ACK_BAD_VALUE; /* would send heartbeats back to back */
    }
    if (c->max_valve_open_ms > RD_HARD_MS) {
        return RP_ACK_BAD_VALUE;
    }
    return RP_ACK_OK;
}

static void rd_configure(rd_device *d, const rp_configure *c, uint32_t now)
{
    uint8_t s;
    rd_stop_stream(d);
    d->configured = 1;
    d->sample_rate_hz = c->sample_rate_hz;
    d->samples_per_batch = c->samples_per_batch;
    d->period_us = (uint16_t)(c->sample_rate_hz ? RP_CLOCK_HZ / c->sample_rate_hz : 0u);
    d->hb_interval_us = rd_ms_to_us(c->heartbeat_interval_ms);
    d->max_valve_open_ms = c->max_valve_open_ms;
    d->max_flush_ms = c->max_flush_ms;
    s = rd_lock(d);
    d->hb_timeout_us = rd_ms_to_us(c->heartbeat_timeout_ms);
    d->next_index = 0;
    d->s_head = 0;
    d->s_tail = 0;
    rd_unlock(d, s);
    d->batch.count = 0;
    d->last_hb_us = now;
    if (c->sample_rate_hz != 0) {
        d->streaming = 1;
        d->hal->sampler_start(d->period_us);
    }
}

/* ---- commands (main loop) ----------------------------------------------- */

static void rd_cmd_ping(rd_device *d, const rp_frame *f, uint32_t t_rx)
{
    uint8_t body[RP_PONG_LEN];
    rp_pong p;
    p.ping_seq = f->seq;
    p.t_rx_us = t_rx;
    p.t_tx_us = rd_now(d);
    rd_send_body(d, RP_T_PONG, body, rp_pack_pong(body, &p));
}

static void rd_cmd_configure(rd_device *d, const rp_frame *f)
{
    rp_configure c;
    uint8_t status;
    if (rp_unpack_configure(f->body, f->body_len, &c) != RP_OK) {
        rd_send_ack(d, f, RP_ACK_BAD_LENGTH, rd_now(d));
        return;
    }
    status = rd_check_configure(d, &c);
    if (status == RP_ACK_OK) {
        uint8_t s = rd_lock(d);
        rd_arm_end(d, rd_now(d), RP_DISARM_CONFIGURE);
        rd_unlock(d, s);
        rd_configure(d, &c, rd_now(d));
    }
    rd_send_ack(d, f, status, rd_now(d));
    rd_send_report(d);
}

static void rd_cmd_tone(rd_device *d, const rp_frame *f)
{
    rp_tone t;
    uint32_t now;
    uint8_t s;
    if (rp_unpack_tone(f->body, f->body_len, &t) != RP_OK) {
        rd_send_ack(d, f, RP_ACK_BAD_LENGTH, rd_now(d));
        return;
    }
    if (t.frequency_hz < d->info.tone_min_hz || t.frequency_hz > d->info.tone_max_hz ||
        t.level_pct > 100u || t.duration_ms == 0) {
        rd_send_ack(d, f, RP_ACK_BAD_VALUE, rd_now(d));
        return;
    }
    s = rd_lock(d);
    now = rd_now(d);
    if (d->tone_on) {
        /* Restart: the old tone ends by command, the new one starts. */
        rd_tone_off(d, now, RP_CAUSE_COMMAND);
    }
    d->hal->tone_start(t.frequency_hz, t.level_pct);
    d->tone_t_start = now;
    d->tone_dur_us = rd_ms_to_us(t.duration_ms);
    d->tone_on = 1;
    rd_push_event(d, now, RP_EV_TONE_ON, t.level_pct, t.frequency_hz);
    rd_unlock(d, s);
    rd_send_ack(d, f, RP_ACK_OK, now);
}

static void rd_cmd_tone_off(rd_device *d, const rp_frame *f)
{
    uint8_t s = rd_lock(d);
    uint32_t now = rd_now(d);
    if (d->tone_on) {
        rd_tone_off(d, now, RP_CAUSE_COMMAND);
    }
    rd_unlock(d, s);
    rd_send_ack(d, f, RP_ACK_OK, now);
}

static void rd_valve_open(rd_device *d, uint32_t now, uint32_t limit_us, uint8_t cause,
                          uint16_t cap_ms, uint32_t event_value)
{
    d->hal->set_valve(1);
    d->valve_open = 1;
    d->valve_t_open = now;
    d->valve_limit_us = limit_us;
    d->valve_cause = cause;
    d->valve_cap_ms = cap_ms;
    rd_push_event(d, now, RP_EV_VALVE_OPEN, 0, event_value);
}

static void rd_cmd_valve_pulse(rd_device *d, const rp_frame *f)
{
    rp_valve_pulse p;
    uint32_t now;
    uint8_t s;
    uint8_t status = RP_ACK_OK;
    if (rp_unpack_valve_pulse(f->body, f->body_len, &p) != RP_OK) {
        rd_send_ack(d, f, RP_ACK_BAD_LENGTH, rd_now(d));
        return;
    }
    s = rd_lock(d);
    now = rd_now(d);
    if (p.duration_us == 0) {
        status = RP_ACK_BAD_VALUE;
    } else if (p.duration_us > rd_ms_to_us(d->max_valve_open_ms) ||
               p.duration_us > rd_ms_to_us(RD_HARD_MS)) {
        status = RP_ACK_REFUSED; /* never clamped: it would be the wrong volume */
    } else if (d->valve_open) {
        status = RP_ACK_BUSY;
    } else {
        rd_valve_open(d, now, p.duration_us, RP_CAUSE_COMPLETED, 0, p.duration_us);
    }
    rd_unlock(d, s);
    rd_send_ack(d, f, status, now);
}

static void rd_cmd_valve_open(rd_device *d, const rp_frame *f)
{
    rp_valve_open v;
    uint32_t now;
    uint8_t s;
    uint8_t status = RP_ACK_OK;
    if (rp_unpack_valve_open(f->body, f->body_len, &v) != RP_OK) {
        rd_send_ack(d, f, RP_ACK_BAD_LENGTH, rd_now(d));
        return;
    }
    s = rd_lock(d);
    now = rd_now(d);
    if (v.max_ms == 0) {
        status = RP_ACK_BAD_VALUE;
    } else if (d->valve_open) {
        status = RP_ACK_BUSY;
    } else {
        uint16_t cap_ms = d->max_flush_ms < RD_HARD_MS ? d->max_flush_ms : RD_HARD_MS;
        if (v.max_ms <= cap_ms) {
            rd_valve_open(d, now, rd_ms_to_us(v.max_ms), RP_CAUSE_COMPLETED, 0, 0);
        } else {
            rd_valve_open(d, now, rd_ms_to_us(cap_ms), RP_CAUSE_CAP, cap_ms, 0);
        }
    }
    rd_unlock(d, s);
    rd_send_ack(d, f, status, now);
}

static void rd_cmd_valve_close(rd_device *d, const rp_frame *f)
{
    uint8_t s = rd_lock(d);
    uint32_t now = rd_now(d);
    if (d->valve_open) {
        rd_valve_close(d, now, RP_CAUSE_COMMAND);
    }
    d->hal->set_valve(0);
    rd_unlock(d, s);
    rd_send_ack(d, f, RP_ACK_OK, now);
}

static void rd_cmd_sync_out(rd_device *d, const rp_frame *f)
{
    rp_sync_out so;
    uint32_t now;
    uint8_t s;
    uint8_t status = RP_ACK_OK;
    if (rp_unpack_sync_out(f->body, f->body_len, &so) != RP_OK) {
        rd_send_ack(d, f, RP_ACK_BAD_LENGTH, rd_now(d));
        return;
    }
    if (so.mode > RP_SYNC_BITCODE || so.unit_us == 0 ||
        (so.mode == RP_SYNC_BITCODE && (so.nbits < 1u || so.nbits > 32u))) {
        rd_send_ack(d, f, RP_ACK_BAD_VALUE, rd_now(d));
        return;
    }
    s = rd_lock(d);
    now = rd_now(d);
    if (d->sync_busy) {
        status = RP_ACK_BUSY;
    } else {
        d->sync_mode = so.mode;
        d->sync_nbits = so.nbits;
        d->sync_unit_us = so.unit_us;
        d->sync_value = so.value;
        d->sync_slot = 0;
        /* pulse: one slot; bitcode: start, gap, then a slot and a gap per bit */
        d->sync_nslots = so.mode == RP_SYNC_PULSE ? 1u : (uint8_t)(2u + 2u * so.nbits);
        d->sync_t_next = now + so.unit_us;
        d->hal->set_sync(1);
        d->sync_busy = 1;
        rd_push_event(d, now, RP_EV_SYNC_OUT_START, 0, so.value);
    }
    rd_unlock(d, s);
    rd_send_ack(d, f, status, now);
}

/* Absolute count `rest + sign * delta`, clamped to the i32 range. */
static int32_t rd_counts_at(int32_t rest, uint32_t delta, uint8_t down)
{
    int64_t v = down ? (int64_t)rest - (int64_t)delta : (int64_t)rest + (int64_t)delta;
    if (v > (int64_t)INT32_MAX) {
        return INT32_MAX;
    }
    if (v < (int64_t)INT32_MIN) {
        return INT32_MIN;
    }
    return (int32_t)v;
}

static void rd_cmd_arm_reward(rd_device *d, const rp_frame *f)
{
    rp_arm_reward a;
    uint32_t now;
    uint8_t s;
    uint8_t status = RP_ACK_OK;
    if (rp_unpack_arm_reward(f->body, f->body_len, &a) != RP_OK) {
        rd_send_ack(d, f, RP_ACK_BAD_LENGTH, rd_now(d));
        return;
    }
    s = rd_lock(d);
    now = rd_now(d);
    {
        uint32_t ahead = (uint32_t)(a.window_end_us - now);
        if (a.threshold_counts == 0 || a.threshold_counts > (uint32_t)INT32_MAX ||
            a.rearm_counts >= a.threshold_counts || a.direction > RP_DIR_DOWN ||
            a.pulse_us == 0 || ahead == 0 || ahead >= 0x80000000ul) {
            status = RP_ACK_BAD_VALUE;
        } else if (a.pulse_us > rd_ms_to_us(d->max_valve_open_ms) ||
                   a.pulse_us > rd_ms_to_us(RD_HARD_MS) || !d->streaming) {
            status = RP_ACK_REFUSED; /* never clamped: it would be the wrong volume */
        } else if (d->arm_state != RD_ARM_NONE || d->report != RD_REPORT_NONE || d->valve_open) {
            status = RP_ACK_BUSY;
        } else {
            int32_t c = d->enc_last;
            d->arm_tag = a.trial_tag;
            d->arm_down = a.direction == RP_DIR_DOWN;
            d->arm_fire_at = rd_counts_at(a.rest_counts, a.threshold_counts, d->arm_down);
            d->arm_rearm_at = rd_counts_at(a.rest_counts, a.rearm_counts, d->arm_down);
            d->arm_end_us = a.window_end_us;
            d->arm_pulse_us = a.pulse_us;
            d->arm_state = (d->arm_down ? c > d->arm_rearm_at : c < d->arm_rearm_at)
                               ? RD_ARM_READY
                               : RD_ARM_WAIT;
        }
    }
    rd_unlock(d, s);
    rd_send_ack(d, f, status, now);
}

static void rd_cmd_disarm(rd_device *d, const rp_frame *f)
{
    rp_disarm a;
    uint32_t now;
    uint8_t s;
    if (rp_unpack_disarm(f->body, f->body_len, &a) != RP_OK) {
        rd_send_ack(d, f, RP_ACK_BAD_LENGTH, rd_now(d));
        return;
    }
    s = rd_lock(d);
    now = rd_now(d);
    if (d->arm_state != RD_ARM_NONE && d->arm_tag == a.trial_tag) {
        rd_arm_end(d, now, RP_DISARM_HOST);
    } else if (d->arm_state == RD_ARM_NONE && d->report == RD_REPORT_NONE &&
               ((d->last_report == RD_REPORT_FIRED && d->fired.trial_tag == a.trial_tag) ||
                (d->last_report == RD_REPORT_ENDED && d->ended.trial_tag == a.trial_tag))) {
        /* The last arm, already reported: say it again (a host that lost
         * the link in between learns what happened). */
        d->report = d->last_report;
    }
    rd_unlock(d, s);
    rd_send_ack(d, f, RP_ACK_OK, now);
    rd_send_report(d);
}

static void rd_cmd_reset(rd_device *d, const rp_frame *f)
{
    uint8_t s = rd_lock(d);
    uint32_t now = rd_now(d);
    rd_arm_end(d, now, RP_DISARM_RESET);
    rd_outputs_off(d, now, RP_CAUSE_RESET);
    rd_unlock(d, s);
    rd_stop_stream(d);
    rd_default_config(d);
    s = rd_lock(d);
    d->next_index = 0;
    d->s_head = 0;
    d->s_tail = 0;
    rd_unlock(d, s);
    d->batch.count = 0;
    rd_send_ack(d, f, RP_ACK_OK, now);
    rd_send_report(d);
    rd_drain_events(d); /* Ack, the events (cause 4), then Hello */
    rd_send_hello(d);
    d->last_hb_us = rd_now(d);
}

static void rd_handle_frame(rd_device *d, const rp_frame *f, uint32_t t_rx)
{
    uint8_t s;
    uint8_t cleared = 0;
    uint32_t now;
    if (f->type < 0x80u) {
        /* A device -> host type is not a command: no Ack, and it does not feed
         * the watchdog (an echo of our own frames must not keep us alive or
         * start an Ack storm). Same choice as the Rust virtual rig. */
        return;
    }
    s = rd_lock(d);
    now = rd_now(d);
    /* Any valid host frame feeds the watchdog and ends the safe state. */
    d->last_rx_us = now;
    if (d->safe) {
        d->safe = 0;
        cleared = 1;
        rd_push_event(d, now, RP_EV_SAFE_STATE_CLEARED, 0, 0);
    }
    rd_unlock(d, s);
    if (cleared) {
        rd_drain_events(d); /* SafeStateCleared before the command's answer */
    }

    switch (f->type) {
    case RP_T_PING:
        rd_cmd_ping(d, f, t_rx);
        break;
    case RP_T_CONFIGURE:
        rd_cmd_configure(d, f);
        break;
    case RP_T_TONE:
        rd_cmd_tone(d, f);
        break;
    case RP_T_TONE_OFF:
        rd_cmd_tone_off(d, f);
        break;
    case RP_T_VALVE_PULSE:
        rd_cmd_valve_pulse(d, f);
        break;
    case RP_T_VALVE_OPEN:
        rd_cmd_valve_open(d, f);
        break;
    case RP_T_VALVE_CLOSE:
        rd_cmd_valve_close(d, f);
        break;
    case RP_T_SYNC_OUT:
        rd_cmd_sync_out(d, f);
        break;
    case RP_T_HOST_HEARTBEAT:
        rd_send_ack(d, f, RP_ACK_OK, now);
        break;
    case RP_T_RESET:
        rd_cmd_reset(d, f);
        break;
    case RP_T_ARM_REWARD:
        rd_cmd_arm_reward(d, f);
        break;
    case RP_T_DISARM:
        rd_cmd_disarm(d, f);
        break;
    default:
        rd_send_ack(d, f, RP_ACK_UNKNOWN_COMMAND, now);
        break;
    }
}

/* ---- main-loop API ------------------------------------------------------ */

void rd_init(rd_device *d, const rd_hal *hal, const rd_info *info)
{
    static const uint8_t resync = 0;
    uint32_t now;
    memset(d, 0, sizeof *d);
    d->hal = hal;
    d->info = *info;
    /* Outputs off before anything is sent (docs/protocol.md 1.7, Boot). */
    hal->set_valve(0);
    hal->tone_stop();
    hal->set_sync(0);
    rp_decoder_init(&d->dec);
    rd_default_config(d);
    now = rd_now(d);
    d->last_rx_us = now; /* the watchdog counts from boot */
    d->last_hb_us = now;
    /* A lone 0x00 ends any partial frame the host holds, then Hello. */
    hal->tx_frame(&resync, 1);
    rd_send_hello(d);
}

void rd_rx_byte(rd_device *d, uint8_t byte, uint32_t t_us)
{
    rp_frame f;
    int r = rp_decoder_push(&d->dec, byte, &f);
    if (r == RP_DEC_FRAME) {
        rd_handle_frame(d, &f, t_us);
    } else if (r == RP_DEC_BAD) {
        /* Not acknowledged: its seq cannot be trusted. Counted in dec. */
        uint8_t s = rd_lock(d);
        d->pending_faults |= RD_PF_RX_BAD;
        rd_unlock(d, s);
    }
}

void rd_poll(rd_device *d)
{
    uint32_t now;
    rd_send_report(d);
    rd_drain_events(d);
    now = rd_now(d);
    rd_send_counter_faults(d, now);
    rd_drain_samples(d, 0);
    if ((uint32_t)(now - d->last_hb_us) >= d->hb_interval_us) {
        d->last_hb_us = now;
        rd_drain_events(d);
        rd_send_heartbeat(d, now);
    }
}
