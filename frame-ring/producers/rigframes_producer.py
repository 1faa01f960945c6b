#!/usr/bin/env python3
"""Example producer for the rigd shared-memory frame ring, in Python.

Creates the ring (layout version 1, docs/protocol.md section 2) under
/dev/shm and publishes frames from numpy arrays into it. It needs only the
standard library (mmap, struct, ctypes, os) and numpy, and no code from rigd:
copy the RingProducer class into your acquisition script.

    python3 rigframes_producer.py --name /rig-test --width 64 --height 48 \\
        --frames 200 --rate 100

writes 200 synthetic frames at 100 Hz in which pixel i (flat index over
channel, row, column) of the frame with frame_number f is (f + i) mod 65536.

Memory ordering -- read this before using it on anything but x86-64.
The ring is a sequence lock: the producer must make the slot's odd `seq`
visible before the pixels, and the pixels and metadata before the even
`seq`, then `write_seq`. C and Rust producers use release fences and release
stores for that. Python cannot issue a memory fence. This example relies on
x86-64 being TSO: stores become visible to other cores in program order, and
each store below is one interpreter call, so the order in the source is the
order other processes see. Each 8-byte field is written through an aligned
ctypes.c_uint64, which is one 8-byte store in practice. On AArch64 (ARM64) and
other weakly ordered CPUs stores may become visible out of order, and a
reader could accept a frame whose pixels are not all written: there, use the
C header rigframes.h (e.g. compiled into a small shared library called
through ctypes) instead of this script.
"""

import argparse
import ctypes
import mmap
import os
import platform
import struct
import sys
import time

import numpy as np

MAGIC = b"RIGFRAME"
LAYOUT_VERSION = 1
HEADER_SIZE = 4096
SLOT_HEADER_SIZE = 64
SLOT_ALIGN = 4096  # this producer's stride rounding (the spec allows any multiple of 64)
PIXEL_U16LE = 1
STATE_INITIALISING, STATE_LIVE, STATE_CLOSED = 0, 1, 2
FLAG_HW_TIMESTAMP = 1
FLAG_HOST_STAMP_AT_ARRIVAL = 2

# Header field offsets (docs/protocol.md 2.4).
OFF_MAGIC = 0
OFF_LAYOUT_VERSION = 8  # then header_size, width, height, channels,
# pixel_type, slot_count, slot_header_size: eight u32 from offset 8
OFF_SLOT_STRIDE = 40
OFF_FRAME_BYTES = 48
OFF_GENERATION = 56
OFF_WRITE_SEQ = 64
OFF_PRODUCER_PID = 72
OFF_STATE = 76
OFF_HEARTBEAT_NS = 80
OFF_NOMINAL_RATE_MHZ = 88
OFF_RESERVED0 = 92
# Slot header field offsets (2.5).
SLOT_SEQ = 0
SLOT_FRAME_NUMBER = 8
SLOT_HOST_NS = 16
SLOT_HW_NS = 24
SLOT_FLAGS = 32

U64_MASK = (1 << 64) - 1


def monotonic_ns():
    """CLOCK_MONOTONIC in ns: the clock rigd reads too."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class RingProducer:
    """The single producer of a frame ring. It never waits for readers."""

    def __init__(self, name, width, height, channels=1, slot_count=64):
        if not name.startswith("/") or len(name) < 2 or len(name) > 255 or "/" in name[1:]:
            raise ValueError(
                f"shared-memory name {name!r}: expected '/' followed by 1 to 254 "
                "characters with no further '/', e.g. '/rigd-frames'"
            )
        if not (1 <= width <= 16384 and 1 <= height <= 16384):
            raise ValueError(f"frame {width}x{height}: width and height must be 1..=16384")
        if channels not in (1, 2):
            raise ValueError(f"channels = {channels}: expected 1 or 2")
        if not 1 <= slot_count <= 65536:
            raise ValueError(f"slot_count = {slot_count}: expected 1..=65536")
        if sys.byteorder != "little":
            raise RuntimeError("the frame ring is little-endian only")
        if platform.machine().lower() not in ("x86_64", "amd64"):
            print(
                f"rigframes_producer: warning: {platform.machine()} may reorder stores; "
                "this example is only correct on x86-64 (use rigframes.h)",
                file=sys.stderr,
            )

        self.name = name
        self.shape = (channels, height, width)
        self.slot_count = slot_count
        self.frame_bytes = width * height * channels * 2
        min_stride = SLOT_HEADER_SIZE + self.frame_bytes
        self.slot_stride = (min_stride + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN
        self.region_len = HEADER_SIZE + slot_count * self.slot_stride
        self.next_index = 0

        # shm_open(name, O_CREAT | O_RDWR, 0640) is open() under /dev/shm on Linux.
        path = "/dev/shm/" + name[1:]
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o640)
        try:
            size = os.fstat(fd).st_size
            if size not in (0, self.region_len):
                # Another geometry: never shrink in place (readers would fault);
                # unlink and create a new object. Old readers see it go stale.
                os.close(fd)
                fd = -1
                os.unlink(path)
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o640)
                size = 0
            if size != self.region_len:
                os.ftruncate(fd, self.region_len)
            self.mm = mmap.mmap(fd, self.region_len, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            if fd >= 0:
                os.close(fd)

        # Aligned views for the fields that change while the ring is live.
        # Each assignment to .value is one store of the field's own width.
        u64 = lambda off: ctypes.c_uint64.from_buffer(self.mm, off)  # noqa: E731
        u32 = lambda off: ctypes.c_uint32.from_buffer(self.mm, off)  # noqa: E731
        self._generation = u64(OFF_GENERATION)
        self._write_seq = u64(OFF_WRITE_SEQ)
        self._state = u32(OFF_STATE)
        self._heartbeat = u64(OFF_HEARTBEAT_NS)
        self._slots = []
        for i in range(slot_count):
            base = HEADER_SIZE + i * self.slot_stride
            self._slots.append({
                "seq": u64(base + SLOT_SEQ),
                "frame_number": u64(base + SLOT_FRAME_NUMBER),
                "host_ns": u64(base + SLOT_HOST_NS),
                "hw_ns": u64(base + SLOT_HW_NS),
                "flags": u32(base + SLOT_FLAGS),
                "pixels": np.frombuffer(self.mm, dtype="<u2", count=self.frame_bytes // 2,
                                        offset=base + SLOT_HEADER_SIZE).reshape(self.shape),
            })
        self._initialise()

    def _initialise(self):
        """Section 2.6.1: a new generation (a restart, if the object existed)."""
        old = self._generation.value
        generation = (time.time_ns() ^ (os.getpid() << 32) ^ (monotonic_ns() << 7)) & U64_MASK
        generation |= 1
        if generation == old:
            generation = (generation + 2) & U64_MASK
        # 2. invalidate the header (on x86-64 later stores stay after these).
        self._generation.value = 0
        self._state.value = STATE_INITIALISING
        # 3. the fields. Readers ignore the header while generation == 0,
        # so plain struct writes are enough here.
        channels, height, width = self.shape
        struct.pack_into("<8s8I", self.mm, OFF_MAGIC, MAGIC, LAYOUT_VERSION, HEADER_SIZE,
                         width, height, channels, PIXEL_U16LE, self.slot_count,
                         SLOT_HEADER_SIZE)
        struct.pack_into("<QQ", self.mm, OFF_SLOT_STRIDE, self.slot_stride, self.frame_bytes)
        self._write_seq.value = 0
        struct.pack_into("<I", self.mm, OFF_PRODUCER_PID, os.getpid() & 0xFFFFFFFF)
        self._heartbeat.value = monotonic_ns()
        struct.pack_into("<II", self.mm, OFF_NOMINAL_RATE_MHZ, 0, 0)
        self.mm[96:HEADER_SIZE] = bytes(HEADER_SIZE - 96)
        # 4. zero every slot header.
        for i in range(self.slot_count):
            base = HEADER_SIZE + i * self.slot_stride
            self._slots[i]["seq"].value = 0
            self.mm[base + 8:base + SLOT_HEADER_SIZE] = bytes(SLOT_HEADER_SIZE - 8)
        # 5. go live.
        self._generation.value = generation
        self._state.value = STATE_LIVE
        self.generation = generation
        self.next_index = 0

    def set_frame_rate_hz(self, rate_hz):
        """Informational nominal frame rate."""
        struct.pack_into("<I", self.mm, OFF_NOMINAL_RATE_MHZ, int(round(rate_hz * 1000)))

    def publish(self, frame_number, pixels, host_ns=None, hw_ns=None):
        """Section 2.6.2: publish one frame, never waiting.

        pixels: uint16 array of shape (channels, height, width), or anything
        numpy can cast and reshape to it. host_ns: CLOCK_MONOTONIC at the
        frame's start (its frame-clock edge), within a quarter of a frame
        period (section 2.5). Without it the frame is stamped now and marked
        as stamped at its arrival (flag bit 1): rigd then never uses the
        stamp to pick the frame's clock edge, and the frame is `mapped`.
        hw_ns: hardware timestamp or None. Returns the frame's index in this
        generation.
        """
        flags = 0 if hw_ns is None else FLAG_HW_TIMESTAMP
        if host_ns is None:
            host_ns = monotonic_ns()
            flags |= FLAG_HOST_STAMP_AT_ARRIVAL
        n = self.next_index
        slot = self._slots[n % self.slot_count]
        slot["seq"].value = 2 * n + 1
        # (release fence here in C; on x86-64 store order is program order)
        np.copyto(slot["pixels"], np.asarray(pixels, dtype="<u2").reshape(self.shape),
                  casting="unsafe")
        slot["frame_number"].value = frame_number & U64_MASK
        slot["host_ns"].value = host_ns
        slot["hw_ns"].value = 0 if hw_ns is None else hw_ns
        slot["flags"].value = flags
        slot["seq"].value = 2 * n + 2
        self._write_seq.value = n + 1
        self._heartbeat.value = host_ns
        self.next_index = n + 1
        return n

    def heartbeat(self):
        """Call at least every 100 ms while not publishing."""
        self._heartbeat.value = monotonic_ns()

    def close(self):
        """Clean exit: state = closed, then unmap. The object stays so
        readers can drain it; the next producer re-initialises it."""
        if self.mm is None:
            return
        self._state.value = STATE_CLOSED
        # Drop every view into the mapping, or mmap.close() refuses.
        del self._generation, self._write_seq, self._state, self._heartbeat
        self._slots = []
        self.mm.close()
        self.mm = None

    def unlink(self):
        """Remove the name (readers keep their mappings until they re-open)."""
        try:
            os.unlink("/dev/shm/" + self.name[1:])
        except FileNotFoundError:
            pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="shared-memory name, e.g. /rig-test")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=48)
    parser.add_argument("--channels", type=int, default=1, choices=(1, 2))
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--rate", type=float, default=100.0, help="frames per second")
    parser.add_argument("--first-frame", type=int, default=1)
    parser.add_argument("--start-delay-ms", type=int, default=0,
                        help="pause after creating the ring, so readers can attach first")
    parser.add_argument("--hw", action="store_true",
                        help="also stamp a synthetic hardware timestamp (host time - 1 us)")
    parser.add_argument("--unlink", action="store_true",
                        help="unlink the ring at exit (default: leave it for readers)")
    args = parser.parse_args(argv)
    if args.rate <= 0:
        parser.error("--rate must be > 0")

    ring = RingProducer(args.name, args.width, args.height, args.channels, args.slots)
    ring.set_frame_rate_hz(args.rate)
    ramp = np.arange(args.channels * args.height * args.width, dtype=np.uint64)
    period_ns = int(1e9 / args.rate)
    start_ns = monotonic_ns() + args.start_delay_ms * 1_000_000
    try:
        for k in range(args.frames):
            deadline = start_ns + k * period_ns
            while True:  # wait for the frame's time, heartbeating every 50 ms
                left = deadline - monotonic_ns()
                if left <= 0:
                    break
                time.sleep(min(left, 50_000_000) / 1e9)
                ring.heartbeat()
            frame_number = args.first_frame + k
            pixels = ((ramp + frame_number) & 0xFFFF).astype("<u2")
            host_ns = monotonic_ns()
            ring.publish(frame_number, pixels, host_ns,
                         hw_ns=host_ns - 1000 if args.hw else None)
        print(f"rigframes_producer: published {args.frames} frames to {args.name} "
              f"(generation {ring.generation})")
    finally:
        ring.close()
        if args.unlink:
            ring.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
