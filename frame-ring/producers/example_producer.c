/*
 * example_producer.c - writes N synthetic frames into a rigd frame ring with
 * rigframes.h, at a given rate. Pixel i (flat index over channel, row,
 * column) of the frame with frame_number f is (f + i) mod 65536, so a reader
 * can check every pixel.
 *
 *   cc -std=c11 -O2 -Wall -Wextra -Werror -o example_producer example_producer.c
 *   ./example_producer --name /rig-test --width 64 --height 48 --channels 1 \
 *                      --slots 64 --frames 200 --rate 100 [--first-frame 1]
 *                      [--start-delay-ms 0] [--hw]
 *
 * --hw also stamps a (synthetic) hardware timestamp: host time minus 1 us.
 * The ring is closed (state = closed), not unlinked, at the end.
 */
#include "rigframes.h"

#include <stdlib.h>

static int parse_u64(const char *text, uint64_t *out)
{
    char *end = NULL;
    unsigned long long v;
    errno = 0;
    v = strtoull(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0') {
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

static void sleep_until_ns(uint64_t deadline_ns)
{
    struct timespec ts;
    ts.tv_sec = (time_t)(deadline_ns / 1000000000ull);
    ts.tv_nsec = (long)(deadline_ns % 1000000000ull);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static void usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s --name /NAME [--width 64] [--height 48] [--channels 1] [--slots 64]\n"
            "          [--frames 200] [--rate 100] [--first-frame 1] [--start-delay-ms 0] [--hw]\n",
            argv0);
}

int main(int argc, char **argv)
{
    const char *name = NULL;
    uint64_t width = 64, height = 48, channels = 1, slots = 64, frames = 200, rate_hz = 100;
    uint64_t first_frame = 1, start_delay_ms = 0;
    int hw = 0;
    int i;
    rigframes_ring ring;
    uint16_t *pixels;
    size_t frame_pixels, p;
    uint64_t k, period_ns, start_ns;

    for (i = 1; i < argc; i++) {
        uint64_t *target = NULL;
        if (strcmp(argv[i], "--hw") == 0) {
            hw = 1;
            continue;
        }
        if (i + 1 >= argc) {
            usage(argv[0]);
            return 2;
        }
        if (strcmp(argv[i], "--name") == 0) {
            name = argv[++i];
            continue;
        } else if (strcmp(argv[i], "--width") == 0) {
            target = &width;
        } else if (strcmp(argv[i], "--height") == 0) {
            target = &height;
        } else if (strcmp(argv[i], "--channels") == 0) {
            target = &channels;
        } else if (strcmp(argv[i], "--slots") == 0) {
            target = &slots;
        } else if (strcmp(argv[i], "--frames") == 0) {
            target = &frames;
        } else if (strcmp(argv[i], "--rate") == 0) {
            target = &rate_hz;
        } else if (strcmp(argv[i], "--first-frame") == 0) {
            target = &first_frame;
        } else if (strcmp(argv[i], "--start-delay-ms") == 0) {
            target = &start_delay_ms;
        }
        if (target == NULL || parse_u64(argv[++i], target) != 0) {
            usage(argv[0]);
            return 2;
        }
    }
    if (name == NULL || rate_hz == 0 || width > UINT32_MAX || height > UINT32_MAX ||
        channels > UINT32_MAX || slots > UINT32_MAX) {
        usage(argv[0]);
        return 2;
    }

    if (rigframes_create(name, (uint32_t)width, (uint32_t)height, (uint32_t)channels,
                         (uint32_t)slots, &ring) != 0) {
        fprintf(stderr, "example_producer: %s\n", ring.error);
        return 1;
    }
    rigframes_set_frame_rate_mhz(&ring, (uint32_t)(rate_hz * 1000u));

    frame_pixels = (size_t)(width * height * channels);
    pixels = malloc(frame_pixels * sizeof *pixels);
    if (pixels == NULL) {
        fprintf(stderr, "example_producer: out of memory for a %zu-pixel frame\n", frame_pixels);
        rigframes_close(&ring);
        return 1;
    }

    period_ns = 1000000000ull / rate_hz;
    /* An optional pause after creating the ring, so readers can attach first. */
    start_ns = rigframes_now_ns() + start_delay_ms * 1000000ull;
    for (k = 0; k < frames; k++) {
        uint64_t frame_number = first_frame + k;
        uint64_t deadline = start_ns + k * period_ns;
        uint64_t host_ns;
        /* Wait for the frame's time, heartbeating at least every 50 ms. */
        while (rigframes_now_ns() + 50000000ull < deadline) {
            sleep_until_ns(rigframes_now_ns() + 50000000ull);
            rigframes_heartbeat(&ring);
        }
        sleep_until_ns(deadline);
        for (p = 0; p < frame_pixels; p++) {
            pixels[p] = (uint16_t)((frame_number + p) & 0xffffu);
        }
        host_ns = rigframes_now_ns();
        rigframes_publish(&ring, frame_number, host_ns,
                          hw ? host_ns - 1000u : RIGFRAMES_NO_HW_TIMESTAMP, pixels);
    }

    free(pixels);
    printf("example_producer: published %llu frames to %s (generation %llu)\n",
           (unsigned long long)frames, name, (unsigned long long)ring.generation);
    if (rigframes_close(&ring) != 0) {
        fprintf(stderr, "example_producer: %s\n", ring.error);
        return 1;
    }
    return 0;
}
