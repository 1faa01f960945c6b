/*
 * rig_firmware: the rig microcontroller for an Arduino Mega 2560 (ATmega2560,
 * 16 MHz, 5 V). Speaks the serial protocol of docs/protocol.md section 1 at
 * 1,000,000 baud. Wiring: docs/wiring.md.
 *
 * This file is only the hardware layer, kept thin on purpose: timers, pins,
 * interrupts and the UART, with direct register access (avr-libc only, no
 * Arduino core functions). All protocol and device logic is the portable C in
 * ../rig (rigproto.c, rigdevice.c), which the host tests cover
 * (../test, `build.sh host-test`).
 *
 * Building:
 *   - `firmware-bridge/firmware/build.sh avr` compiles this file and the ../rig sources
 *     with plain avr-gcc (Debian: apt-get install gcc-avr avr-libc binutils-avr);
 *     this file then supplies main().
 *   - Arduino IDE / arduino-cli: the ../rig folder is a plain Arduino library;
 *     `arduino-cli compile --fqbn arduino:avr:mega --library ../rig .`
 *     (or put ../rig in your sketchbook's libraries folder). The Arduino core's
 *     main() then calls setup() and loop(); its millis() timer (Timer0) keeps
 *     running and is harmless; Serial must not be used (this file owns USART0).
 *
 * Resources (Mega 2560):
 *   Timer5 : the device clock. Free running, prescaler 8 (0.5 us ticks);
 *            overflow every 32.768 ms extends it to a 32-bit microsecond
 *            counter. Compare A = lever sampling instants (compare C for
 *            rates below 31 Hz), compare B = the
 *            control tick (valve, tone, sync-out timing every 100 us while one
 *            runs; otherwise every 1 ms for the host watchdog),
 *            input capture (ICP5, pin 48) = frame-clock TTL, stamped by the
 *            hardware to 0.5 us.
 *   Timer4 : the cue tone, a square wave on OC4A (pin 6) by hardware toggle.
 *   INT4/5 : encoder A/B (pins 2, 3), any edge: x4 quadrature decoding.
 *   INT2   : lick sensor (pin 19), any edge.
 *   USART0 : the host link via the board's USB-serial chip, 1 Mbaud (U2X,
 *            UBRR = 1: exact at 16 MHz), interrupt-driven ring buffers.
 *   Pins 8, 9, 13: valve MOSFET gate, sync-out, LED (lit while the valve is open).
 *   WDT    : the AVR hardware watchdog resets the board if the main loop hangs
 *            for 500 ms (the valve pin then floats low: gate pull-down).
 *
 * Teensy 4.x port (not in this file; see docs/wiring.md): native USB, so the
 * baud rate is ignored and Serial.write()/availableForWrite() replace the
 * USART code; micros() is already a 32-bit microsecond counter (use it, or
 * the ARM cycle counter, for now_us); an IntervalTimer gives the sampling and
 * tick interrupts; attachInterrupt() on any pin serves the encoder, lick and
 * frame TTL (ISRs run at 600 MHz, so 20 kHz sampling is easy); tone via
 * analogWriteFrequency()/tone() or the audio DAC; the device id from the
 * chip's OCOTP unique id; pins are 3.3 V and NOT 5 V tolerant.
 */

#include <avr/eeprom.h>
#include <avr/interrupt.h>
#include <avr/io.h>
#include <avr/wdt.h>
#include <stdint.h>

#include "rigdevice.h"
#include "rigproto.h"

#if !defined(__AVR_ATmega2560__)
#error "rig_firmware.ino is the ATmega2560 (Arduino Mega 2560) build; see docs/wiring.md for other boards"
#endif

#ifndef F_CPU
#define F_CPU 16000000UL
#endif
#if F_CPU != 16000000UL
#error "the clock and baud settings assume a 16 MHz crystal"
#endif

/* ---- settings ----------------------------------------------------------- */

/* Highest lever sample rate offered in Hello. Measured in simulation
 * (test/sim_avr.c, cycle-accurate ATmega2560): the limit is the CPU time per
 * byte sent (the UART interrupt, CRC and COBS), about 80 kB/s in all, which is
 * also where rig-config's 80 %-of-baud rule stops. At 5 kHz, even with the
 * smallest batch that rule allows (2 per frame, 68 kB/s), about 20 % of the
 * CPU stays idle. 10 kHz works with 10 or more samples per frame (59 kB/s,
 * ~10 % idle) but the rule would also let a host ask for 5 per frame (78 kB/s,
 * ~2 % idle), so it is not offered by default: build with
 * -DRIG_MAX_SAMPLE_RATE_HZ=10000 if your host always batches 10 or more. */
#ifndef RIG_MAX_SAMPLE_RATE_HZ
#define RIG_MAX_SAMPLE_RATE_HZ 5000ul
#endif
/* The control tick: valve, tone and sync-out edges are late by at most this. */
#ifndef RIG_TICK_US
#define RIG_TICK_US 100u
#endif
/* Lick sensor output level while the tongue touches the spout. */
#ifndef RIG_LICK_ACTIVE_HIGH
#define RIG_LICK_ACTIVE_HIGH 1
#endif
/* Reset the board if the main loop stops for 500 ms. */
#ifndef RIG_USE_WDT
#define RIG_USE_WDT 1
#endif
/* Tone range: Timer4 at prescaler 1 reaches down to 123 Hz, at 8 to 16 Hz. */
#define RIG_TONE_MIN_HZ 100ul
#define RIG_TONE_MAX_HZ 40000ul
/* A fixed device id instead of the one kept in EEPROM: -DRIG_DEVICE_ID=0x... */

/* ---- pins (Arduino Mega 2560 numbering -> AVR port bits) ---------------- */

#define ENC_A_BIT PE4   /* D2,  INT4 */
#define ENC_B_BIT PE5   /* D3,  INT5 */
#define LICK_BIT PD2    /* D19, INT2 */
#define TTL_BIT PL1     /* D48, ICP5 */
#define TONE_BIT PH3    /* D6,  OC4A */
#define VALVE_BIT PH5   /* D8 */
#define SYNC_BIT PH6    /* D9 */
#define LED_BIT PB7     /* D13 */

static rd_device dev;

/* ---- clock: Timer5 ------------------------------------------------------ */

static volatile uint32_t clock_ovf_us; /* microseconds at the last overflow */

ISR(TIMER5_OVF_vect)
{
    clock_ovf_us += 32768ul; /* 65536 ticks of 0.5 us; 2^32 is a multiple */
}

/* Microseconds of the 16-bit timer value t, given the overflow count read
 * with it and whether an overflow is pending but not yet counted. */
static inline uint32_t clock_compose(uint32_t ovf_us, uint16_t t, uint8_t ovf_pending)
{
    /* A pending overflow belongs to this reading only if t has wrapped (small). */
    if (ovf_pending && t < 0x8000u) {
        ovf_us += 32768ul;
    }
    return ovf_us + (uint32_t)(t >> 1);
}

static uint32_t clock_now_us(void)
{
    uint8_t sreg = SREG;
    uint16_t t;
    uint32_t ovf;
    uint8_t pending;
    cli();
    t = TCNT5;
    ovf = clock_ovf_us;
    pending = (TIFR5 & _BV(TOV5)) != 0;
    SREG = sreg;
    return clock_compose(ovf, t, pending);
}

/* The low 16 timer bits of a microsecond time: TCNT5 is 0 whenever the clock
 * is a multiple of 32768 us. */
static inline uint16_t clock_ticks_of(uint32_t t_us)
{
    return (uint16_t)((uint16_t)(t_us & 0x7FFFu) << 1);
}

static uint8_t reached(uint32_t now, uint32_t t)
{
    return (uint32_t)(now - t) < 0x80000000ul;
}

static void clock_init(void)
{
    TCCR5B = 0;
    TCCR5A = 0; /* normal mode (the Arduino core sets PWM modes; undo them) */
    TCCR5C = 0;
    TCNT5 = 0;
    clock_ovf_us = 0;
    TIFR5 = 0xFF; /* clear all pending flags */
    TIMSK5 = _BV(TOIE5);
    /* clk/8 = 2 MHz; input capture with noise canceller, on the rising edge */
    TCCR5B = _BV(ICNC5) | _BV(ICES5) | _BV(CS51);
}

/* ---- lever sampling: Timer5 compare A ----------------------------------- */

static volatile int32_t enc_count;
static uint8_t enc_state;
static uint32_t samp_next_us;
static uint32_t samp_period_us;
/* 2 * period, for periods below 32.768 ms (one timer wrap): each sample's
 * compare is chained by adding it to OCR5A, with no clock arithmetic. */
static uint16_t samp_period_ticks;

/* Rates of 31 Hz and up (period < 32.768 ms): every compare A match is a
 * sample. No calls in here, so the interrupt saves only a few registers. */
ISR(TIMER5_COMPA_vect)
{
    for (;;) {
        /* The sample's time is the compare instant; the count is read within
         * a few microseconds of it (interrupt latency). */
        uint32_t t = samp_next_us;
        uint16_t ahead;
        samp_next_us = t + samp_period_us;
        OCR5A += samp_period_ticks;
        rd_isr_lever_sample(&dev, t, enc_count);
        ahead = (uint16_t)(OCR5A - TCNT5);
        if (ahead >= 2u && ahead <= samp_period_ticks) {
            return; /* the next compare is ahead: it will fire on time */
        }
        /* Late by a whole period (interrupts were held off): take the missed
         * sample now, at its scheduled time, and re-arm. */
    }
}

/* Slower rates (16..30 Hz): compare C matches once per timer wrap; only the
 * match in the right wrap is a sample. */
ISR(TIMER5_COMPC_vect)
{
    for (;;) {
        uint32_t now = clock_now_us();
        if (reached(now, samp_next_us)) {
            uint32_t t = samp_next_us;
            samp_next_us += samp_period_us;
            rd_isr_lever_sample(&dev, t, enc_count);
            continue;
        }
        OCR5C = clock_ticks_of(samp_next_us);
        /* If the new compare point already passed while we were busy, the
         * match is lost: go round again. */
        if (!reached(clock_now_us(), samp_next_us)) {
            break;
        }
    }
}

static void hal_sampler_start(uint32_t period_us)
{
    uint8_t sreg = SREG;
    cli();
    TIMSK5 &= (uint8_t)~(_BV(OCIE5A) | _BV(OCIE5C));
    samp_period_us = period_us;
    samp_next_us = clock_now_us() + period_us;
    if (period_us < 32768ul) {
        samp_period_ticks = (uint16_t)(2u * (uint16_t)period_us);
        OCR5A = clock_ticks_of(samp_next_us);
        TIFR5 = _BV(OCF5A);
        TIMSK5 |= _BV(OCIE5A);
    } else {
        OCR5C = clock_ticks_of(samp_next_us);
        TIFR5 = _BV(OCF5C);
        TIMSK5 |= _BV(OCIE5C);
    }
    SREG = sreg;
}

static void hal_sampler_stop(void)
{
    uint8_t sreg = SREG;
    cli();
    TIMSK5 &= (uint8_t)~(_BV(OCIE5A) | _BV(OCIE5C));
    SREG = sreg;
}

/* ---- control tick: Timer5 compare B ------------------------------------- */

#define TICK_TICKS ((uint16_t)(2u * RIG_TICK_US))
/* While no valve pulse, tone or sync-out runs, the tick only checks the host
 * watchdog: once a millisecond is plenty and saves interrupt time. */
#define IDLE_TICK_TICKS ((uint16_t)2000u)

ISR(TIMER5_COMPB_vect)
{
    uint16_t next = (uint16_t)(OCR5B + TICK_TICKS);
    rd_tick(&dev);
    if (!rd_outputs_busy(&dev)) {
        next = (uint16_t)(next - TICK_TICKS + IDLE_TICK_TICKS);
    }
    if ((uint16_t)(next - TCNT5) > IDLE_TICK_TICKS) {
        next = (uint16_t)(TCNT5 + TICK_TICKS); /* we were late: do not lose a wrap */
    }
    OCR5B = next;
}

/* An output just started: make sure the next tick is at most one tick away.
 * Called with interrupts off (from the device's critical sections). */
static void tick_soon(void)
{
    uint16_t now = TCNT5;
    if ((uint16_t)(OCR5B - now) > TICK_TICKS) {
        OCR5B = (uint16_t)(now + TICK_TICKS);
    }
}

static void tick_start(void)
{
    uint8_t sreg = SREG;
    cli();
    OCR5B = (uint16_t)(TCNT5 + TICK_TICKS);
    TIFR5 = _BV(OCF5B);
    TIMSK5 |= _BV(OCIE5B);
    SREG = sreg;
}

/* ---- frame-clock TTL: Timer5 input capture (pin 48) ---------------------- */

ISR(TIMER5_CAPT_vect)
{
    uint16_t icr = ICR5; /* latched by the hardware at the edge */
    uint8_t pending = (TIFR5 & _BV(TOV5)) != 0;
    rd_isr_frame_ttl(&dev, clock_compose(clock_ovf_us, icr, pending));
}

/* ---- encoder: INT4 / INT5 (pins 2, 3), x4 ------------------------------- */

/* Every edge also goes to the armed reward's check (rd_isr_encoder): the
 * crossing edge opens the valve inside this interrupt. The check is here and
 * not in the sampling interrupt because a sample comes only every period
 * (1 ms at 1 kHz); measured edge -> valve pin in test/sim_avr.c. */
ISR(INT4_vect)
{
    uint8_t ab = (uint8_t)((PINE >> ENC_A_BIT) & 3u); /* bit 0 = A, bit 1 = B */
    int32_t c = enc_count + rd_quadrature_delta(enc_state, ab);
    enc_count = c;
    enc_state = ab;
    rd_isr_encoder(&dev, c);
}

ISR(INT5_vect, ISR_ALIASOF(INT4_vect));

/* ---- lick: INT2 (pin 19) ------------------------------------------------ */

ISR(INT2_vect)
{
    uint8_t level = (uint8_t)((PIND >> LICK_BIT) & 1u);
#if !RIG_LICK_ACTIVE_HIGH
    level ^= 1u;
#endif
    rd_isr_lick(&dev, clock_now_us(), level);
}

static void inputs_init(void)
{
    /* encoder: inputs with pull-ups (open-collector encoders need them) */
    DDRE &= (uint8_t)~(_BV(ENC_A_BIT) | _BV(ENC_B_BIT));
    PORTE |= _BV(ENC_A_BIT) | _BV(ENC_B_BIT);
    /* lick and TTL: plain inputs, driven by the sensor / microscope (the
     * board carries pull-downs, see docs/wiring.md) */
    DDRD &= (uint8_t)~_BV(LICK_BIT);
    PORTD &= (uint8_t)~_BV(LICK_BIT);
    DDRL &= (uint8_t)~_BV(TTL_BIT);
    PORTL &= (uint8_t)~_BV(TTL_BIT);
    enc_state = (uint8_t)((PINE >> ENC_A_BIT) & 3u);
    enc_count = 0;
    /* any edge on INT4, INT5, INT2 */
    EICRB = (uint8_t)((EICRB & ~(_BV(ISC41) | _BV(ISC51))) | _BV(ISC40) | _BV(ISC50));
    EICRA = (uint8_t)((EICRA & ~_BV(ISC21)) | _BV(ISC20));
}

static void inputs_start(void)
{
    uint8_t level;
    uint8_t sreg = SREG;
    cli();
    /* report the lick line if it is already active (before INT2 can fire) */
    level = (uint8_t)((PIND >> LICK_BIT) & 1u);
#if !RIG_LICK_ACTIVE_HIGH
    level ^= 1u;
#endif
    if (level) {
        rd_isr_lick(&dev, clock_now_us(), 1);
    }
    EIFR = _BV(INTF4) | _BV(INTF5) | _BV(INTF2);
    EIMSK |= _BV(INT4) | _BV(INT5) | _BV(INT2);
    TIFR5 = _BV(ICF5);
    TIMSK5 |= _BV(ICIE5);
    SREG = sreg;
}

/* ---- outputs ------------------------------------------------------------ */

static void outputs_init(void)
{
    /* low first, then output: no glitch on the valve gate */
    PORTH &= (uint8_t)~(_BV(VALVE_BIT) | _BV(SYNC_BIT) | _BV(TONE_BIT));
    DDRH |= _BV(VALVE_BIT) | _BV(SYNC_BIT) | _BV(TONE_BIT);
    PORTB &= (uint8_t)~_BV(LED_BIT);
    DDRB |= _BV(LED_BIT);
}

static void hal_set_valve(uint8_t open)
{
    uint8_t sreg = SREG;
    cli();
    if (open) {
        PORTH |= _BV(VALVE_BIT);
        PORTB |= _BV(LED_BIT);
        tick_soon();
    } else {
        PORTH &= (uint8_t)~_BV(VALVE_BIT);
        PORTB &= (uint8_t)~_BV(LED_BIT);
    }
    SREG = sreg;
}

static void hal_set_sync(uint8_t high)
{
    uint8_t sreg = SREG;
    cli();
    if (high) {
        PORTH |= _BV(SYNC_BIT);
        tick_soon();
    } else {
        PORTH &= (uint8_t)~_BV(SYNC_BIT);
    }
    SREG = sreg;
}

/* Square wave on OC4A: Timer4 in CTC mode toggles the pin at every match.
 * level_pct cannot set the amplitude here (that needs a digital pot or a
 * DAC, out of scope; set the volume on the amplifier): 0 means silent,
 * anything else full scale. */
static void hal_tone_start(uint32_t frequency_hz, uint8_t level_pct)
{
    uint32_t top = F_CPU / (2ul * frequency_hz) - 1ul;
    uint8_t cs = _BV(CS40); /* clk/1 */
    uint8_t sreg = SREG;
    if (top > 0xFFFFul) {
        top = F_CPU / (16ul * frequency_hz) - 1ul;
        cs = _BV(CS41); /* clk/8 */
    }
    cli();
    TCCR4B = 0;
    TCCR4A = 0;
    TCCR4C = 0;
    TCNT4 = 0;
    OCR4A = (uint16_t)top;
    PORTH &= (uint8_t)~_BV(TONE_BIT);
    if (level_pct > 0) {
        TCCR4A = _BV(COM4A0); /* toggle OC4A on match */
    }
    TCCR4B = (uint8_t)(_BV(WGM42) | cs); /* CTC, TOP = OCR4A */
    tick_soon();
    SREG = sreg;
}

static void hal_tone_stop(void)
{
    uint8_t sreg = SREG;
    cli();
    TCCR4B = 0;
    TCCR4A = 0; /* the pin is a plain output again */
    PORTH &= (uint8_t)~_BV(TONE_BIT);
    SREG = sreg;
}

/* ---- UART: USART0 at 1 Mbaud -------------------------------------------- */

#define RX_SIZE 256u /* uint8_t indices wrap by themselves */
#define DELIM_SIZE 16u
#define TX_SIZE 1024u
#define TX_MASK (TX_SIZE - 1u)

static volatile uint8_t rx_buf[RX_SIZE];
static volatile uint8_t rx_head, rx_tail;
/* Arrival times of the 0x00 bytes in rx_buf, in order: a Ping's t_rx_us is
 * when its frame was complete, not when the main loop got to it. */
static volatile uint32_t delim_t[DELIM_SIZE];
static volatile uint8_t delim_head, delim_tail;
static volatile uint8_t tx_buf[TX_SIZE];
static volatile uint16_t tx_head, tx_tail;

ISR(USART0_RX_vect)
{
    uint8_t b = UDR0;
    uint8_t next = (uint8_t)(rx_head + 1u);
    if (next == rx_tail) {
        return; /* full: the frame fails its CRC and is counted by the decoder */
    }
    rx_buf[rx_head] = b;
    rx_head = next;
    if (b == 0) {
        uint8_t dn = (uint8_t)((delim_head + 1u) % DELIM_SIZE);
        if (dn != delim_tail) {
            delim_t[delim_head] = clock_now_us();
            delim_head = dn;
        }
    }
}

ISR(USART0_UDRE_vect)
{
    uint16_t t = tx_tail;
    if (t == tx_head) {
        UCSR0B &= (uint8_t)~_BV(UDRIE0);
        return;
    }
    UDR0 = tx_buf[t];
    tx_tail = (uint16_t)((t + 1u) & TX_MASK);
}

static void uart_init(void)
{
    UCSR0B = 0;
    UCSR0A = _BV(U2X0);
    UBRR0 = 1; /* 16 MHz / (8 * (1 + 1)) = 1,000,000 baud exactly */
    UCSR0C = _BV(UCSZ01) | _BV(UCSZ00); /* 8N1 */
    rx_head = rx_tail = 0;
    delim_head = delim_tail = 0;
    tx_head = tx_tail = 0;
    UCSR0B = _BV(RXEN0) | _BV(TXEN0) | _BV(RXCIE0);
}

static uint16_t hal_tx_free(void)
{
    uint16_t head, tail;
    uint8_t sreg = SREG;
    cli();
    head = tx_head;
    tail = tx_tail;
    SREG = sreg;
    return (uint16_t)((tail - head - 1u) & TX_MASK);
}

static uint8_t hal_tx_frame(const uint8_t *bytes, uint16_t len)
{
    uint16_t head, i;
    uint8_t sreg;
    if (hal_tx_free() < len) {
        return 0;
    }
    head = tx_head; /* only this function writes tx_head */
    for (i = 0; i < len; i++) {
        tx_buf[head] = bytes[i];
        head = (uint16_t)((head + 1u) & TX_MASK);
    }
    sreg = SREG;
    cli();
    tx_head = head;
    UCSR0B |= _BV(UDRIE0);
    SREG = sreg;
    return 1;
}

/* ---- critical sections -------------------------------------------------- */

static uint8_t hal_irq_save(void)
{
    uint8_t sreg = SREG;
    cli();
    return sreg;
}

static void hal_irq_restore(uint8_t sreg)
{
    SREG = sreg;
}

/* ---- device id ---------------------------------------------------------- */

#define EE_MAGIC_ADDR ((uint8_t *)0)
#define EE_ID_ADDR ((void *)1)
#define EE_MAGIC 0xA7u

/* The ATmega2560 has no serial number: make a random 64-bit id once (from
 * the noise of the floating ADC input A15 and the timer), keep it in EEPROM
 * bytes 0..8. Uploads through the bootloader do not erase the EEPROM. */
static uint64_t device_id(void)
{
#ifdef RIG_DEVICE_ID
    return (uint64_t)(RIG_DEVICE_ID);
#else
    uint64_t id = 0;
    uint8_t i;
    if (eeprom_read_byte(EE_MAGIC_ADDR) == EE_MAGIC) {
        eeprom_read_block(&id, EE_ID_ADDR, sizeof id);
        if (id != 0) {
            return id;
        }
    }
    id = 0xcbf29ce484222325ull; /* FNV-1a over noisy samples */
    ADCSRA = _BV(ADEN) | _BV(ADPS2) | _BV(ADPS1) | _BV(ADPS0);
    ADCSRB = _BV(MUX5);
    ADMUX = _BV(REFS0) | _BV(MUX2) | _BV(MUX1) | _BV(MUX0); /* ADC15 (A15), AVcc ref */
    for (i = 0; i < 128u; i++) {
        uint16_t v;
        ADCSRA |= _BV(ADSC);
        while (ADCSRA & _BV(ADSC)) {
        }
        v = ADC;
        id = (id ^ (uint8_t)(v ^ (uint8_t)TCNT5)) * 0x100000001b3ull;
        id = (id ^ (uint8_t)(v >> 8)) * 0x100000001b3ull;
    }
    ADCSRA = 0;
    if (id == 0) {
        id = 1;
    }
    eeprom_write_block(&id, EE_ID_ADDR, sizeof id);
    eeprom_write_byte(EE_MAGIC_ADDR, EE_MAGIC);
    return id;
#endif
}

/* ---- the device --------------------------------------------------------- */

#if RIG_USE_WDT
/* After a watchdog reset the watchdog stays on with its shortest timeout:
 * switch it off before the C runtime starts (plain build; under the Arduino
 * core the bootloader and setup() do it). */
extern "C" void rig_wdt_off(void) __attribute__((naked, used, section(".init3")));
extern "C" void rig_wdt_off(void)
{
    MCUSR = 0;
    wdt_disable();
}
#endif

static const rd_hal hal = {
    clock_now_us,    hal_set_valve,     hal_tone_start,   hal_tone_stop,
    hal_set_sync,    hal_tx_free,       hal_tx_frame,     hal_sampler_start,
    hal_sampler_stop, hal_irq_save,     hal_irq_restore,
};

void setup(void)
{
    rd_info info;
    cli();
#if RIG_USE_WDT
    MCUSR = 0;
    wdt_disable();
#endif
    outputs_init(); /* valve closed, tone and sync low before anything else */
    hal_tone_stop();
    clock_init();
    inputs_init();
    uart_init();
    sei();

    info.device_id = device_id();
    info.capabilities = RP_CAP_LEVER | RP_CAP_LICK | RP_CAP_VALVE | RP_CAP_TONE |
                        RP_CAP_FRAME_TTL | RP_CAP_SYNC_OUT;
    info.max_sample_rate_hz = RIG_MAX_SAMPLE_RATE_HZ;
    info.tone_min_hz = RIG_TONE_MIN_HZ;
    info.tone_max_hz = RIG_TONE_MAX_HZ;
    rd_init(&dev, &hal, &info); /* sends 0x00 and Hello */

    /* interrupts that call into the device only once it exists */
    inputs_start();
    tick_start();
#if RIG_USE_WDT
    wdt_enable(WDTO_500MS);
#endif
}

void loop(void)
{
#if RIG_USE_WDT
    wdt_reset();
#endif
    while (rx_tail != rx_head) {
        uint8_t b = rx_buf[rx_tail];
        uint32_t t = 0;
        rx_tail = (uint8_t)(rx_tail + 1u);
        if (b == 0) {
            if (delim_tail != delim_head) {
                t = delim_t[delim_tail];
                delim_tail = (uint8_t)((delim_tail + 1u) % DELIM_SIZE);
            } else {
                t = clock_now_us();
            }
        }
        rd_rx_byte(&dev, b, t);
    }
    rd_poll(&dev);
}

#ifndef ARDUINO
/* Plain avr-gcc build (build.sh avr): no Arduino core, so no main() from it. */
int main(void)
{
    setup();
    for (;;) {
        loop();
    }
}
#endif
