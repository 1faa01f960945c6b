#!/usr/bin/env python3
"""Send microscope frames to rig-frame-bridge over TCP (docs/frame-bridge.md).

Use from any acquisition program that can call Python:

    from rigbridge import FrameSender
    sender = FrameSender("127.0.0.1", 7690, token, width=512, height=512)
    ...
    sender.send(frame_number, pixels)   # never blocks; False if dropped
    ...
    print(sender.stats())
    sender.close()

`send` copies the frame into a bounded queue and returns at once; a sender
thread writes the queue to the socket, reconnecting with backoff when the
connection breaks. When the queue is full the new frame is dropped at the
sender and counted (`stats()["dropped"]`): the acquisition is never stalled by
the network. The receiver sees the gap in frame numbers and rigd records the
missing frames as dropped rows in frames.tsv.

The wire format is docs/protocol.md section 4. Needs numpy only.
"""

import argparse
import collections
import json
import os
import signal
import socket
import struct
import sys
import threading
import time

import numpy as np

HELLO_MAGIC = b"RIGFRNET"
WIRE_VERSION = 1
PIXEL_U16LE = 1
FLAG_STAMP_HOST_MONOTONIC = 1
SENDER_HEADER = struct.Struct("<4sIQQIIQ")  # tag, payload_len, frame, stamp, flags, 0, dropped
REPLY_HEADER = struct.Struct("<4sIQQQ")  # tag, text_len, a, b, c
MAX_REASON_LEN = 1024


def encode_hello(width, height, channels, token):
    return (
        struct.pack("<8sIIIIII", HELLO_MAGIC, WIRE_VERSION, width, height, channels,
                    PIXEL_U16LE, len(token))
        + token
    )


class BridgeRefused(Exception):
    """The receiver refused the hello (wrong token or geometry, busy)."""


class FrameSender:
    """A non-blocking frame sender with a bounded queue and a sender thread.

    host_clock: stamps are CLOCK_MONOTONIC of the rig PC (time.monotonic_ns()
    on Linux, the sender runs on the rig PC). False: another machine's clock;
    the receiver then stamps the arrival and keeps yours as the hardware stamp.
    """

    def __init__(self, host, port, token, width, height, channels=1, queue_frames=32,
                 host_clock=True, sndbuf=None, io_timeout_s=5.0, max_backoff_s=2.0):
        if isinstance(token, str):
            token = token.encode()
        self.host, self.port, self.token = host, int(port), token
        self.width, self.height, self.channels = int(width), int(height), int(channels)
        self.pixels = self.width * self.height * self.channels
        self.frame_bytes = self.pixels * 2
        self.flags = FLAG_STAMP_HOST_MONOTONIC if host_clock else 0
        self.sndbuf = sndbuf
        self.io_timeout_s = io_timeout_s
        self.max_backoff_s = max_backoff_s
        self._queue = collections.deque()
        self._max_queue = int(queue_frames)
        self._cv = threading.Condition()
        self._closing = False
        self._paused = False
        self._lock = threading.Lock()
        self._stats = dict(queued=0, sent=0, dropped=0, written=0, discarded_by_receiver=0,
                           connects=0, refusals=0, disconnects=0, last_frame_sent=None,
                           last_error=None, connected=False)
        self._conn_written = 0
        self._inflight = None
        self._close_deadline = None
        self._thread = threading.Thread(target=self._run, name="rigbridge-sender", daemon=True)
        self._thread.start()

    # ---- the acquisition side: never blocks --------------------------------

    def send(self, frame_number, pixels, stamp_ns=None):
        """Queue one frame. Returns True if queued, False if dropped (queue full).

        pixels: anything numpy turns into width*height*channels uint16 values
        (channel-major, then row-major); it is copied, so the caller may reuse
        its buffer. stamp_ns: when the frame was acquired (default: now).
        """
        if stamp_ns is None:
            stamp_ns = time.monotonic_ns()
        frame = np.asarray(pixels)
        if frame.size != self.pixels:
            raise ValueError("frame has %d pixels: expected %d (%dx%d x %d)" % (
                frame.size, self.pixels, self.width, self.height, self.channels))
        data = np.ascontiguousarray(frame, dtype="<u2").tobytes()
        with self._cv:
            if len(self._queue) >= self._max_queue or self._closing:
                with self._lock:
                    self._stats["dropped"] += 1
                return False
            self._queue.append((int(frame_number), int(stamp_ns), data))
            with self._lock:
                self._stats["queued"] += 1
            self._cv.notify()
        return True

    def stats(self):
        """Counts so far: queued, sent, dropped (at this sender), written (acked
        by the receiver), discarded_by_receiver, connects, refusals,
        disconnects, last_frame_sent, last_error, connected."""
        with self._lock:
            s = dict(self._stats)
            s["written"] += self._conn_written
        with self._cv:
            s["in_queue"] = len(self._queue)
        return s

    def close(self, timeout_s=5.0):
        """Send what is queued (for up to timeout_s), say goodbye, stop."""
        with self._cv:
            self._closing = True
            self._close_deadline = time.monotonic() + timeout_s
            self._cv.notify()
        self._thread.join(timeout_s + self.io_timeout_s + 1.0)

    # ---- the sender thread -------------------------------------------------

    def _set(self, **kw):
        with self._lock:
            self._stats.update(kw)

    def _bump(self, key, n=1):
        with self._lock:
            self._stats[key] += n

    def _connect(self):
        sock = socket.create_connection((self.host, self.port), timeout=self.io_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, int(self.sndbuf))
            sock.sendall(encode_hello(self.width, self.height, self.channels, self.token))
            tag, a, b, c, reason = _read_reply(sock)
            if tag == b"RFSE":
                raise BridgeRefused("refused (code %d): %s" % (a, reason))
            if tag != b"ACPT":
                raise OSError("expected ACPT, got %r: %s" % (tag, reason))
            if b != self.frame_bytes:
                raise BridgeRefused("the receiver expects %d-byte frames, not %d" %
                                    (b, self.frame_bytes))
            return sock, a
        except BaseException:
            sock.close()
            raise

    def _reader(self, sock, alive):
        """Reads the receiver's acks and errors on one connection."""
        while alive.is_set():
            try:
                tag, a, b, c, reason = _read_reply(sock)
            except socket.timeout:
                continue
            except (OSError, ValueError):
                break
            if tag == b"ACK_":
                with self._lock:
                    self._conn_written = a
                    self._stats["discarded_by_receiver"] = max(
                        self._stats["discarded_by_receiver"], b)
            elif tag == b"ERR_":
                self._set(last_error="receiver closed the connection (code %d): %s" % (a, reason))
                break
        alive.clear()

    def _next_item(self, timeout_s):
        with self._cv:
            if not self._queue and not self._closing:
                self._cv.wait(timeout_s)
            if self._queue and not self._paused:
                return self._queue.popleft()
            return None

    def _run(self):
        backoff = 0.1
        while True:
            with self._cv:
                if self._closing and (not self._queue and self._inflight is None
                                      or time.monotonic() > self._close_deadline):
                    return
            try:
                sock, next_frame = self._connect()
            except BridgeRefused as e:
                self._bump("refusals")
                self._set(last_error=str(e))
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            except OSError as e:
                self._set(last_error="connect %s:%d: %s" % (self.host, self.port, e))
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            backoff = 0.1
            self._bump("connects")
            self._set(connected=True)
            if self._inflight is not None and self._inflight[0] < next_frame:
                self._inflight = None  # the receiver wrote it before the break
            alive = threading.Event()
            alive.set()
            reader = threading.Thread(target=self._reader, args=(sock, alive), daemon=True)
            reader.start()
            try:
                self._serve(sock, alive)
                # closing: say goodbye
                try:
                    sock.sendall(SENDER_HEADER.pack(b"BYE_", 0, 0, 0, 0, 0, self.stats()["dropped"]))
                    time.sleep(0.05)
                except OSError:
                    pass
            except OSError as e:
                self._set(last_error="sending: %s" % e)
                self._bump("disconnects")
            finally:
                alive.clear()
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
                reader.join(self.io_timeout_s + 1.0)
                with self._lock:
                    self._stats["written"] += self._conn_written
                    self._conn_written = 0
                    self._stats["connected"] = False
            with self._cv:
                if self._closing and not self._queue and self._inflight is None:
                    return

    def _serve(self, sock, alive):
        """Send frames until closing (returns) or the connection breaks (raises
        OSError; the frame being sent stays in self._inflight)."""
        last_sent = time.monotonic()
        while True:
            if not alive.is_set():
                raise OSError(self.stats()["last_error"] or "connection closed")
            item = self._inflight if self._inflight is not None else self._next_item(0.25)
            if item is None:
                with self._cv:
                    if self._closing and (not self._queue
                                          or time.monotonic() > self._close_deadline):
                        return
                if time.monotonic() - last_sent >= 0.5:
                    sock.sendall(SENDER_HEADER.pack(b"BEAT", 0, 0, 0, self.flags, 0,
                                                    self.stats()["dropped"]))
                    last_sent = time.monotonic()
                continue
            self._inflight = item
            number, stamp, data = item
            head = SENDER_HEADER.pack(b"FRAM", len(data), number, stamp, self.flags, 0,
                                      self.stats()["dropped"])
            if len(data) < 65536:
                sock.sendall(head + data)
            else:
                sock.sendall(head)
                sock.sendall(data)
            self._inflight = None
            last_sent = time.monotonic()
            with self._lock:
                self._stats["sent"] += 1
                self._stats["last_frame_sent"] = number


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed by the receiver")
        buf += chunk
    return bytes(buf)


def _read_reply(sock):
    head = _recv_exact(sock, REPLY_HEADER.size)
    tag, text_len, a, b, c = REPLY_HEADER.unpack(head)
    if text_len > MAX_REASON_LEN:
        raise ValueError("reply text_len %d" % text_len)
    reason = _recv_exact(sock, text_len).decode("utf-8", "replace") if text_len else ""
    return tag, a, b, c, reason


# ---- command line: a test and bench driver ---------------------------------

def _truth_rows(path, from_now, stop):
    """Yield (frame_number, host_ns) of frames_truth.tsv rows as rig-sim writes
    them (the simulated microscope's frame clock)."""
    while not os.path.exists(path):
        if stop.is_set():
            return
        time.sleep(0.05)
    with open(path) as f:
        header = f.readline()
        while not header.endswith("\n"):
            time.sleep(0.05)
            header += f.readline()
        cols = header.rstrip("\n").split("\t")
        i_num, i_ns = cols.index("frame_number"), cols.index("host_ns")
        if from_now:
            # Skip what is already there: the acquisition is under way.
            while True:
                pos = f.tell()
                line = f.readline()
                if not line.endswith("\n"):
                    f.seek(pos)
                    break
        partial = ""
        while not stop.is_set():
            line = f.readline()
            if not line:
                time.sleep(0.02)
                continue
            partial += line
            if not partial.endswith("\n"):
                continue
            row = partial.rstrip("\n").split("\t")
            partial = ""
            yield int(row[i_num]), int(row[i_ns])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token-file", required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--queue", type=int, default=32, help="queue length, frames")
    p.add_argument("--sndbuf", type=int, default=None, help="SO_SNDBUF, bytes")
    p.add_argument("--frames", type=int, default=0, help="frames to send (0: until stopped)")
    p.add_argument("--rate", type=float, default=30.0, help="frames/s (0: as fast as possible)")
    p.add_argument("--first-frame", type=int, default=1)
    p.add_argument("--truth", help="pace to rig-sim's frames_truth.tsv (frame numbers and stamps)")
    p.add_argument("--from-now", action="store_true", help="with --truth: skip rows already written")
    p.add_argument("--wait-connected", type=float, default=0.0,
                   help="seconds to wait for the first connection before sending")
    args = p.parse_args(argv)
    with open(args.token_file, "rb") as f:
        token = f.read()
    if token.endswith(b"\n"):
        token = token[:-1]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sender = FrameSender(args.host, args.port, token, args.width, args.height, args.channels,
                         queue_frames=args.queue, sndbuf=args.sndbuf)
    deadline = time.monotonic() + args.wait_connected
    while time.monotonic() < deadline and not sender.stats()["connected"]:
        time.sleep(0.01)
    frame = np.zeros((args.channels, args.height, args.width), dtype=np.uint16)
    frame[:] = np.arange(args.width, dtype=np.uint16)
    calls = []
    if args.truth:
        for n, host_ns in _truth_rows(args.truth, args.from_now, stop):
            frame.flat[0] = n & 0xFFFF
            sender.send(n, frame, stamp_ns=host_ns)
            if args.frames and n >= args.first_frame + args.frames:
                break
    else:
        t0 = time.monotonic()
        for k in range(args.frames or 2**62):
            if stop.is_set():
                break
            if args.rate > 0:
                due = t0 + k / args.rate
                while True:
                    left = due - time.monotonic()
                    if left <= 0:
                        break
                    time.sleep(min(left, 0.001) if left < 0.002 else left - 0.001)
            frame.flat[0] = k & 0xFFFF
            t_call = time.perf_counter()
            sender.send(args.first_frame + k, frame)
            calls.append(time.perf_counter() - t_call)
    sender.close(timeout_s=10.0)
    s = sender.stats()
    if calls:
        c = sorted(calls)
        s["send_call_us_p50"] = round(c[len(c) // 2] * 1e6, 1)
        s["send_call_us_p99"] = round(c[(len(c) - 1) * 99 // 100] * 1e6, 1)
        s["send_call_us_max"] = round(c[-1] * 1e6, 1)
    print(json.dumps(s), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
