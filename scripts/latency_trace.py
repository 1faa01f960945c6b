#!/usr/bin/env python3
"""Split each press-to-valve latency into its hops, from a kernel trace.

Record a trace while the latency bench runs (as root):

    cd /sys/kernel/tracing            # mount -t tracefs nodev /sys/kernel/tracing
    echo mono > trace_clock; echo 400000 > buffer_size_kb
    for e in sched/sched_switch sched/sched_waking syscalls/sys_enter_write \
             syscalls/sys_exit_read; do echo 1 > events/$e/enable; done
    A=$(grep ' flush_to_ldisc$' /proc/kallsyms | cut -d' ' -f1)
    echo "function == 0x$A" > events/workqueue/workqueue_execute_start/filter
    echo 1 > events/workqueue/workqueue_execute_start/enable
    echo 1 > tracing_on; cargo bench -p rig-tests --bench latency -- --minutes 2 --no-idle
    echo 0 > tracing_on; cp trace /tmp/trace.txt

then `scripts/latency_trace.py /tmp/trace.txt SIM_PID READER_TID` (the
`rig-sim-PID` and `rig-link-reader-TID` names in the trace). For every valve
command the reader wrote (a 13-byte write) it prints, in µs:

  total      the virtual rig's write of the sample -> its read of the command
  s_k1       sample written -> tty worker (flush_to_ldisc) starts
  k1_wake    worker starts -> it wakes the reader
  wake_read  reader woken -> its read returns (waiting for a CPU)
  proc       read returned -> valve command written (rigd's own work)
  w_k2       command written -> tty worker starts
  k2_wake    worker starts -> it wakes the virtual rig
  wake_C     virtual rig woken -> its read returns

sorted by total, so the tail is at the bottom. The total starts at the
sample's write, so it leaves out how late the virtual rig sent it.
"""
import bisect
import re
import sys

LINE = re.compile(r'^\s*(.+?)-(\d+)\s+\[(\d+)\]\s+\S+\s+([\d.]+): ([a-z_]+)[:(]?\s?(.*)$')
VALVE_COMMAND_BYTES = "0xd)"  # a ValvePulse frame on the wire
SAMPLE_BYTES = "0x18)"  # one lever batch of one sample


def main(path, sim, reader):
    sim_writes, sim_reads, reader_reads, reader_writes = [], [], [], []
    workers, wake_reader, wake_sim = [], [], []
    for line in open(path, errors="replace"):
        m = LINE.match(line)
        if not m:
            continue
        _comm, pid, cpu, ts, name, rest = m.groups()
        t = float(ts)
        if name == "sys_write" and pid == sim and rest.endswith(SAMPLE_BYTES):
            sim_writes.append(t)
        elif name == "sys_write" and pid == reader and rest.endswith(VALVE_COMMAND_BYTES):
            reader_writes.append(t)
        elif name == "sys_read" and rest.startswith("->"):
            ret = int(rest.split()[1], 16)
            if 0 < ret < 1 << 63:
                if pid == sim:
                    sim_reads.append(t)
                elif pid == reader:
                    reader_reads.append(t)
        elif name == "workqueue_execute_start":
            workers.append(t)
        elif name == "sched_waking":
            if f"pid={reader} " in rest:
                wake_reader.append(t)
            if f"pid={sim} " in rest:
                wake_sim.append(t)

    def after(xs, t):
        i = bisect.bisect_right(xs, t)
        return xs[i] if i < len(xs) else None

    def before(xs, t):
        i = bisect.bisect_left(xs, t)
        return xs[i - 1] if i > 0 else None

    rows = []
    for w in reader_writes:
        r = before(reader_reads, w)
        r_prev = before(reader_reads, r) if r else None
        if r is None or r_prev is None:
            continue
        # The first sample written after the previous read is the oldest
        # one this read returned.
        s = after(sim_writes, r_prev)
        if s is None or s > r:
            s = before(sim_writes, r)
        hops = [s, after(workers, s), after(wake_reader, s), r, w,
                after(workers, w), after(wake_sim, w), after(sim_reads, w)]
        if any(h is None for h in hops):
            continue
        us = [(b - a) * 1e6 for a, b in zip(hops, hops[1:])]
        rows.append(((hops[-1] - hops[0]) * 1e6, us))
    rows.sort()
    names = ["s_k1", "k1_wake", "wake_read", "proc", "w_k2", "k2_wake", "wake_C"]
    for total, us in rows:
        print(f"total={total:7.0f} " + " ".join(f"{n}={v:.0f}" for n, v in zip(names, us)))
    if rows:
        totals = [t for t, _ in rows]
        print(f"{len(rows)} commands; p50 {totals[len(totals) // 2]:.0f} µs, max {totals[-1]:.0f} µs")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
