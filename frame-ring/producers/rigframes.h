/*
 * rigframes.h - single-header C99 producer for the rigd shared-memory frame
 * ring (layout version 1, docs/protocol.md section 2).
 *
 * An acquisition program includes this header, creates the ring once and
 * publishes every frame into it; rigd (and any other reader) copies the
 * frames out. The producer never waits for readers.
 *
 *     #include "rigframes.h"          (first, or define _POSIX_C_SOURCE)
 *
 *     rigframes_ring ring;
 *     if (rigframes_create("/rigd-frames", 512, 512, 1, 64, &ring) != 0) {
 *         fprintf(stderr, "%s\n", ring.error);
 *         return 1;
 *     }
 *     for (;;) {
 *         ... acquire a frame into uint16_t pixels[channels][height][width] ...
 *         rigframes_publish(&ring, frame_number, rigframes_now_ns(),
 *                           RIGFRAMES_NO_HW_TIMESTAMP, &pixels[0][0][0]);
 *     }
 *     rigframes_close(&ring);        (state = closed; the object stays)
 *
 * While no frames are published (waiting for a trigger), call
 * rigframes_heartbeat(&ring) at least every 100 ms, or rigd decides the
 * producer is dead.
 *
 * Requirements: Linux or another POSIX system with shm_open, a little-endian
 * 64-bit host (x86-64, AArch64), and GCC or Clang: the atomic accesses use
 * the __atomic builtins (GCC >= 4.7, Clang >= 3.1), which work in C99 mode.
 * Other compilers: port the RIGFRAMES_STORE* macros below to C11
 * <stdatomic.h> (atomic_store_explicit / atomic_thread_fence on the same
 * addresses). Link with -lrt on glibc older than 2.34.
 *
 * Every function is static inline, so including the header in several translation
 * units is fine. Functions return 0 on success and -1 on failure with errno
 * set and a message naming the object and the fix in ring->error.
 *
 * Thread safety: one thread publishes. The ring handle is not shared.
 */
#ifndef RIGFRAMES_H
#define RIGFRAMES_H

#if !defined(_POSIX_C_SOURCE) && !defined(_GNU_SOURCE) && !defined(_DEFAULT_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#if !defined(__GNUC__) && !defined(__clang__)
#error "rigframes.h needs the GCC/Clang __atomic builtins; port RIGFRAMES_STORE* to <stdatomic.h>"
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the rigd frame ring is little-endian only"
#endif

/* ---- layout constants (docs/protocol.md 2.3-2.5) ---------------------- */

#define RIGFRAMES_LAYOUT_VERSION 1u
#define RIGFRAMES_HEADER_SIZE 4096u
#define RIGFRAMES_SLOT_HEADER_SIZE 64u
#define RIGFRAMES_SLOT_ALIGN 4096u /* stride rounding used here (spec: multiple of 64) */
#define RIGFRAMES_PIXEL_U16LE 1u
#define RIGFRAMES_MAX_DIMENSION 16384u
#define RIGFRAMES_MAX_SLOTS 65536u
#define RIGFRAMES_STATE_INITIALISING 0u
#define RIGFRAMES_STATE_LIVE 1u
#define RIGFRAMES_STATE_CLOSED 2u
#define RIGFRAMES_FLAG_HW_TIMESTAMP 1u
/* "RIGFRAME" read as one little-endian 8-byte word. */
#define RIGFRAMES_MAGIC_WORD 0x454D415246474952ull
/* Pass as hw_ts to rigframes_publish when there is no hardware timestamp. */
#define RIGFRAMES_NO_HW_TIMESTAMP UINT64_MAX

/* The ring header at offset 0 (sizeof == 128; bytes 128..4096 reserved). */
struct rig_ring_header {
    union {
        uint8_t bytes[8];
        uint64_t word;                /* accessed as one 8-byte word */
    } magic;                          /*  0  "RIGFRAME" */
    uint32_t layout_version;          /*  8  1 */
    uint32_t header_size;             /* 12  4096 */
    uint32_t width;                   /* 16 */
    uint32_t height;                  /* 20 */
    uint32_t channels;                /* 24  1 or 2 */
    uint32_t pixel_type;              /* 28  1 = uint16 LE */
    uint32_t slot_count;              /* 32 */
    uint32_t slot_header_size;        /* 36  64 */
    uint64_t slot_stride;             /* 40 */
    uint64_t frame_bytes;             /* 48 */
    uint64_t generation;              /* 56  atomic; header sequence lock */
    uint64_t write_seq;               /* 64  atomic */
    uint32_t producer_pid;            /* 72 */
    uint32_t state;                   /* 76  atomic */
    uint64_t heartbeat_ns;            /* 80  atomic */
    uint32_t nominal_frame_rate_mhz;  /* 88 */
    uint32_t reserved0;               /* 92 */
    uint64_t reserved[4];             /* 96..128 */
};

/* The 64-byte header at the start of every slot (4096 + i * slot_stride). */
struct rig_ring_slot_header {
    uint64_t seq;                     /*  0  atomic, the slot sequence lock */
    uint64_t frame_number;            /*  8 */
    uint64_t host_monotonic_ns;       /* 16 */
    uint64_t hw_timestamp_ns;         /* 24 */
    uint32_t flags;                   /* 32  bit 0: hw_timestamp_ns valid */
    uint32_t reserved0;               /* 36 */
    uint64_t reserved[3];             /* 40..64 */
};

/* Compile-time layout checks (C11 _Static_assert, or the C99 array trick). */
#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#define RIGFRAMES_STATIC_ASSERT(cond, tag) _Static_assert(cond, #tag)
#else
#define RIGFRAMES_STATIC_ASSERT(cond, tag) \
    typedef char rigframes_static_assert_##tag[(cond) ? 1 : -1]
#endif

RIGFRAMES_STATIC_ASSERT(sizeof(struct rig_ring_header) == 128, header_size);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, magic) == 0, off_magic);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, layout_version) == 8, off_version);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, header_size) == 12, off_header_size);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, width) == 16, off_width);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, height) == 20, off_height);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, channels) == 24, off_channels);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, pixel_type) == 28, off_pixel_type);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, slot_count) == 32, off_slot_count);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, slot_header_size) == 36, off_slot_hs);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, slot_stride) == 40, off_slot_stride);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, frame_bytes) == 48, off_frame_bytes);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, generation) == 56, off_generation);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, write_seq) == 64, off_write_seq);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, producer_pid) == 72, off_pid);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, state) == 76, off_state);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, heartbeat_ns) == 80, off_heartbeat);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, nominal_frame_rate_mhz) == 88, off_rate);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, reserved0) == 92, off_reserved0);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_header, reserved) == 96, off_reserved);
RIGFRAMES_STATIC_ASSERT(sizeof(struct rig_ring_slot_header) == 64, slot_header_size);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_slot_header, seq) == 0, off_seq);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_slot_header, frame_number) == 8, off_fnum);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_slot_header, host_monotonic_ns) == 16, off_host);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_slot_header, hw_timestamp_ns) == 24, off_hw);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_slot_header, flags) == 32, off_flags);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_slot_header, reserved0) == 36, off_s_res0);
RIGFRAMES_STATIC_ASSERT(offsetof(struct rig_ring_slot_header, reserved) == 40, off_s_res);
RIGFRAMES_STATIC_ASSERT(sizeof(uint64_t) == 8 && sizeof(size_t) >= 4, word_sizes);

/* ---- atomics (docs/protocol.md 2.2): one width per field --------------- */

#define RIGFRAMES_STORE_RELAXED(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define RIGFRAMES_STORE_RELEASE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define RIGFRAMES_LOAD_ACQUIRE(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define RIGFRAMES_FENCE_RELEASE() __atomic_thread_fence(__ATOMIC_RELEASE)

/* ---- the producer handle ----------------------------------------------- */

typedef struct rigframes_ring {
    uint8_t *base;          /* start of the mapping */
    size_t region_len;      /* 4096 + slot_count * slot_stride */
    uint32_t width, height, channels, slot_count;
    uint64_t slot_stride;
    uint64_t frame_bytes;
    uint64_t generation;    /* this run's generation */
    uint64_t next_index;    /* n: frames published in this generation */
    char name[256];
    char error[512];        /* last error, for people */
} rigframes_ring;

/* CLOCK_MONOTONIC in nanoseconds (the clock rigd reads too). */
static inline uint64_t rigframes_now_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) {
        return 0;
    }
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline int rigframes_fail_(rigframes_ring *ring, int err, const char *what)
{
    snprintf(ring->error, sizeof ring->error, "frame ring %s: %s: %s", ring->name, what,
             strerror(err));
    errno = err;
    return -1;
}

static inline int rigframes_check_name_(rigframes_ring *ring, const char *name)
{
    size_t len = name ? strlen(name) : 0;
    if (name == NULL || name[0] != '/' || len < 2 || len > 255 || strchr(name + 1, '/')) {
        snprintf(ring->error, sizeof ring->error,
                 "shared-memory name \"%s\": expected '/' followed by 1 to 254 characters "
                 "with no further '/', e.g. \"/rigd-frames\"",
                 name ? name : "(null)");
        errno = EINVAL;
        return -1;
    }
    memcpy(ring->name, name, len + 1);
    return 0;
}

/* The slot stride this header uses: 64 + frame_bytes rounded up to a page. */
static inline uint64_t rigframes_slot_stride(uint32_t width, uint32_t height, uint32_t channels)
{
    uint64_t min = RIGFRAMES_SLOT_HEADER_SIZE + (uint64_t)width * height * channels * 2u;
    return (min + RIGFRAMES_SLOT_ALIGN - 1) / RIGFRAMES_SLOT_ALIGN * RIGFRAMES_SLOT_ALIGN;
}

/* Zero `len` bytes (a multiple of 8) at `p` with relaxed 8-byte stores. */
static inline void rigframes_zero_words_(uint8_t *p, size_t len)
{
    size_t i;
    for (i = 0; i < len; i += 8) {
        RIGFRAMES_STORE_RELAXED((uint64_t *)(void *)(p + i), (uint64_t)0);
    }
}

/* Section 2.6.1: initialise a new generation in the mapped region. */
static inline void rigframes_init_header_(rigframes_ring *ring)
{
    struct rig_ring_header *h = (struct rig_ring_header *)(void *)ring->base;
    uint64_t old_gen = RIGFRAMES_LOAD_ACQUIRE(&h->generation);
    struct timespec rt;
    uint64_t pid = (uint64_t)getpid();
    uint64_t gen, i, now;

    /* 1. a nonzero generation different from the one in the region. */
    clock_gettime(CLOCK_REALTIME, &rt);
    gen = ((uint64_t)rt.tv_sec * 1000000000ull + (uint64_t)rt.tv_nsec) ^ (pid << 32);
    gen ^= rigframes_now_ns() << 7;
    gen |= 1u;
    if (gen == old_gen) {
        gen += 2u;
    }

    /* 2. invalidate the header. */
    RIGFRAMES_STORE_RELAXED(&h->generation, (uint64_t)0);
    RIGFRAMES_STORE_RELAXED(&h->state, (uint32_t)RIGFRAMES_STATE_INITIALISING);
    RIGFRAMES_FENCE_RELEASE();

    /* 3. the fields, each with its own width. */
    now = rigframes_now_ns();
    RIGFRAMES_STORE_RELAXED(&h->magic.word, (uint64_t)RIGFRAMES_MAGIC_WORD);
    RIGFRAMES_STORE_RELAXED(&h->layout_version, (uint32_t)RIGFRAMES_LAYOUT_VERSION);
    RIGFRAMES_STORE_RELAXED(&h->header_size, (uint32_t)RIGFRAMES_HEADER_SIZE);
    RIGFRAMES_STORE_RELAXED(&h->width, ring->width);
    RIGFRAMES_STORE_RELAXED(&h->height, ring->height);
    RIGFRAMES_STORE_RELAXED(&h->channels, ring->channels);
    RIGFRAMES_STORE_RELAXED(&h->pixel_type, (uint32_t)RIGFRAMES_PIXEL_U16LE);
    RIGFRAMES_STORE_RELAXED(&h->slot_count, ring->slot_count);
    RIGFRAMES_STORE_RELAXED(&h->slot_header_size, (uint32_t)RIGFRAMES_SLOT_HEADER_SIZE);
    RIGFRAMES_STORE_RELAXED(&h->slot_stride, ring->slot_stride);
    RIGFRAMES_STORE_RELAXED(&h->frame_bytes, ring->frame_bytes);
    RIGFRAMES_STORE_RELAXED(&h->write_seq, (uint64_t)0);
    RIGFRAMES_STORE_RELAXED(&h->producer_pid, (uint32_t)pid);
    RIGFRAMES_STORE_RELAXED(&h->heartbeat_ns, now);
    RIGFRAMES_STORE_RELAXED(&h->nominal_frame_rate_mhz, (uint32_t)0);
    RIGFRAMES_STORE_RELAXED(&h->reserved0, (uint32_t)0);
    for (i = 0; i < 4; i++) {
        RIGFRAMES_STORE_RELAXED(&h->reserved[i], (uint64_t)0);
    }
    rigframes_zero_words_(ring->base + sizeof *h, RIGFRAMES_HEADER_SIZE - sizeof *h);

    /* 4. zero every slot header. */
    for (i = 0; i < ring->slot_count; i++) {
        uint8_t *slot = ring->base + RIGFRAMES_HEADER_SIZE + i * ring->slot_stride;
        struct rig_ring_slot_header *sh = (struct rig_ring_slot_header *)(void *)slot;
        RIGFRAMES_STORE_RELAXED(&sh->seq, (uint64_t)0);
        RIGFRAMES_STORE_RELAXED(&sh->frame_number, (uint64_t)0);
        RIGFRAMES_STORE_RELAXED(&sh->host_monotonic_ns, (uint64_t)0);
        RIGFRAMES_STORE_RELAXED(&sh->hw_timestamp_ns, (uint64_t)0);
        RIGFRAMES_STORE_RELAXED(&sh->flags, (uint32_t)0);
        RIGFRAMES_STORE_RELAXED(&sh->reserved0, (uint32_t)0);
        RIGFRAMES_STORE_RELAXED(&sh->reserved[0], (uint64_t)0);
        RIGFRAMES_STORE_RELAXED(&sh->reserved[1], (uint64_t)0);
        RIGFRAMES_STORE_RELAXED(&sh->reserved[2], (uint64_t)0);
    }

    /* 5. go live. */
    RIGFRAMES_STORE_RELEASE(&h->generation, gen);
    RIGFRAMES_STORE_RELEASE(&h->state, (uint32_t)RIGFRAMES_STATE_LIVE);
    ring->generation = gen;
    ring->next_index = 0;
}

/*
 * Create (or re-initialise) the ring `name` for frames of width x height
 * pixels x channels (1 or 2) uint16 values, in slot_count slots (8 or more
 * recommended, e.g. 2 s of frames). An existing object of the same size is
 * re-initialised in place with a new generation (readers see a restart); one
 * of another size is unlinked and created anew (it is never shrunk in place,
 * which would make readers fault). Returns 0, or -1 with errno and
 * ring->error set.
 */
static inline int rigframes_create(const char *name, uint32_t width, uint32_t height,
                            uint32_t channels, uint32_t slot_count, rigframes_ring *ring)
{
    struct stat st;
    int fd;
    void *p;
    uint64_t region_len;

    memset(ring, 0, sizeof *ring);
    if (rigframes_check_name_(ring, name) != 0) {
        return -1;
    }
    if (width < 1 || width > RIGFRAMES_MAX_DIMENSION || height < 1 ||
        height > RIGFRAMES_MAX_DIMENSION || (channels != 1 && channels != 2) ||
        slot_count < 1 || slot_count > RIGFRAMES_MAX_SLOTS) {
        snprintf(ring->error, sizeof ring->error,
                 "frame ring %s: geometry %ux%u x %u channel(s) in %u slots: expected width "
                 "and height 1..=16384, channels 1 or 2, slot_count 1..=65536",
                 name, (unsigned)width, (unsigned)height, (unsigned)channels,
                 (unsigned)slot_count);
        errno = EINVAL;
        return -1;
    }
    ring->width = width;
    ring->height = height;
    ring->channels = channels;
    ring->slot_count = slot_count;
    ring->frame_bytes = (uint64_t)width * height * channels * 2u;
    ring->slot_stride = rigframes_slot_stride(width, height, channels);
    region_len = RIGFRAMES_HEADER_SIZE + (uint64_t)slot_count * ring->slot_stride;
    if ((uint64_t)(size_t)region_len != region_len || (uint64_t)(off_t)region_len != region_len) {
        return rigframes_fail_(ring, EFBIG, "region too large for this platform");
    }
    ring->region_len = (size_t)region_len;

    fd = shm_open(name, O_CREAT | O_RDWR, 0640);
    if (fd < 0) {
        return rigframes_fail_(ring, errno, "shm_open(O_CREAT | O_RDWR)");
    }
    if (fstat(fd, &st) != 0) {
        int err = errno;
        close(fd);
        return rigframes_fail_(ring, err, "fstat");
    }
    if (st.st_size != 0 && (uint64_t)st.st_size != region_len) {
        /* Another geometry: never shrink in place; unlink and re-create. */
        close(fd);
        if (shm_unlink(name) != 0 && errno != ENOENT) {
            return rigframes_fail_(ring, errno, "shm_unlink (to change the size)");
        }
        fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0640);
        if (fd < 0) {
            return rigframes_fail_(ring, errno, "shm_open(O_CREAT | O_EXCL | O_RDWR)");
        }
        st.st_size = 0;
    }
    if ((uint64_t)st.st_size != region_len && ftruncate(fd, (off_t)region_len) != 0) {
        int err = errno;
        close(fd);
        return rigframes_fail_(ring, err, "ftruncate");
    }
    p = mmap(NULL, ring->region_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd); /* the mapping stays valid */
    if (p == MAP_FAILED) {
        return rigframes_fail_(ring, errno, "mmap");
    }
    ring->base = (uint8_t *)p;
    rigframes_init_header_(ring);
    return 0;
}

/* Set the informational nominal frame rate, milli-hertz (30 Hz = 30000). */
static inline void rigframes_set_frame_rate_mhz(rigframes_ring *ring, uint32_t rate_mhz)
{
    struct rig_ring_header *h = (struct rig_ring_header *)(void *)ring->base;
    RIGFRAMES_STORE_RELEASE(&h->nominal_frame_rate_mhz, rate_mhz);
}

/*
 * Section 2.6.2: publish one frame. `pixels` holds width * height * channels
 * uint16 values, channel-major then row-major (a C array
 * [channels][height][width]); it needs only 2-byte alignment. host_ns is
 * CLOCK_MONOTONIC at the frame's start, its frame-clock edge, to within a
 * quarter of a frame period (section 2.5; rigframes_now_ns() at the frame's
 * start, or at its end less the frame period), hw_ts a
 * hardware timestamp in ns or RIGFRAMES_NO_HW_TIMESTAMP. Never waits.
 * Returns the frame's index in this generation.
 */
static inline uint64_t rigframes_publish(rigframes_ring *ring, uint64_t frame_number, uint64_t host_ns,
                                  uint64_t hw_ts, const uint16_t *pixels)
{
    struct rig_ring_header *h = (struct rig_ring_header *)(void *)ring->base;
    uint64_t n = ring->next_index;
    uint8_t *slot = ring->base + RIGFRAMES_HEADER_SIZE + (n % ring->slot_count) * ring->slot_stride;
    struct rig_ring_slot_header *sh = (struct rig_ring_slot_header *)(void *)slot;
    uint8_t *data = slot + RIGFRAMES_SLOT_HEADER_SIZE;
    const uint8_t *src = (const uint8_t *)pixels;
    size_t body = (size_t)(ring->frame_bytes - ring->frame_bytes % 8u);
    size_t i;
    int has_hw = hw_ts != RIGFRAMES_NO_HW_TIMESTAMP;

    RIGFRAMES_STORE_RELAXED(&sh->seq, 2u * n + 1u);
    RIGFRAMES_FENCE_RELEASE();
    /* Pixel data as relaxed 8-byte words, then 2-byte words for the tail
     * (2.2). The memcpy into a local only builds the word; compilers turn it
     * into a plain load. Strictly conforming, and as fast as memcpy. */
    for (i = 0; i < body; i += 8) {
        uint64_t word;
        memcpy(&word, src + i, 8);
        RIGFRAMES_STORE_RELAXED((uint64_t *)(void *)(data + i), word);
    }
    for (; i < (size_t)ring->frame_bytes; i += 2) {
        uint16_t half;
        memcpy(&half, src + i, 2);
        RIGFRAMES_STORE_RELAXED((uint16_t *)(void *)(data + i), half);
    }
    RIGFRAMES_STORE_RELAXED(&sh->frame_number, frame_number);
    RIGFRAMES_STORE_RELAXED(&sh->host_monotonic_ns, host_ns);
    RIGFRAMES_STORE_RELAXED(&sh->hw_timestamp_ns, has_hw ? hw_ts : (uint64_t)0);
    RIGFRAMES_STORE_RELAXED(&sh->flags, has_hw ? (uint32_t)RIGFRAMES_FLAG_HW_TIMESTAMP : 0u);
    RIGFRAMES_STORE_RELEASE(&sh->seq, 2u * n + 2u);
    RIGFRAMES_STORE_RELEASE(&h->write_seq, n + 1u);
    RIGFRAMES_STORE_RELEASE(&h->heartbeat_ns, host_ns);
    ring->next_index = n + 1u;
    return n;
}

/* Section 2.6.3: heartbeat now; at least every 100 ms while not publishing. */
static inline void rigframes_heartbeat(rigframes_ring *ring)
{
    struct rig_ring_header *h = (struct rig_ring_header *)(void *)ring->base;
    RIGFRAMES_STORE_RELEASE(&h->heartbeat_ns, rigframes_now_ns());
}

/*
 * Clean exit: state = closed, then unmap. The object and its frames stay
 * until rigframes_unlink or the next rigframes_create re-initialises it, so
 * readers can drain the last frames; do not unlink right away.
 */
static inline int rigframes_close(rigframes_ring *ring)
{
    struct rig_ring_header *h = (struct rig_ring_header *)(void *)ring->base;
    if (ring->base == NULL) {
        return 0;
    }
    RIGFRAMES_STORE_RELEASE(&h->state, (uint32_t)RIGFRAMES_STATE_CLOSED);
    if (munmap(ring->base, ring->region_len) != 0) {
        return rigframes_fail_(ring, errno, "munmap");
    }
    ring->base = NULL;
    return 0;
}

/* Remove the name (readers keep their mappings until they re-open). */
static inline int rigframes_unlink(const char *name)
{
    if (shm_unlink(name) != 0 && errno != ENOENT) {
        return -1;
    }
    return 0;
}

#endif /* RIGFRAMES_H */
