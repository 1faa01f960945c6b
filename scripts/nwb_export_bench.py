#!/usr/bin/env python3
"""Export time and peak memory of `rigsession export-nwb` for a long session.

    python scripts/nwb_export_bench.py --minutes 120 --dir /tmp/nwb-bench [--raw-frames 128x128]

`rigd demo` cannot make a 2-hour session: its mouse reaches the demo's
session water cap (1000 uL) within about half an hour. So this writes a
synthetic session folder in the documented format (docs/session-format.md):
lever at 1 kHz, frames at 28.7 Hz with 64 ROIs of F and dF/F, a trial every
6 s, a frame-TTL event per frame, 60-minute chunks like rigd's; raw frames
optionally. Then it runs the export in a child process and reports its wall
time and peak RSS (ru_maxrss of the child). Needs numpy and the [nwb] extra.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHUNK_S = 3600
RATE_HZ = 28.7
N_ROIS = 64


def chunk_name(stream, k):
    return f"{stream}.npy" if k == 0 else f"{stream}.{k:03d}.npy"


def write_chunked(d, stream, t_s, make_rows, row_shape, dtype, block=200_000):
    """Rows by 60-minute chunk of t_s, written block by block into .npy files."""
    files = []
    k_of = np.floor(t_s / CHUNK_S).astype(np.int64)
    for k in np.unique(k_of):
        idx = np.flatnonzero(k_of == k)
        name = chunk_name(stream, len(files))
        out = np.lib.format.open_memmap(d / name, mode="w+", dtype=dtype, shape=(len(idx),) + row_shape)
        for s in range(0, len(idx), block):
            out[s : s + block] = make_rows(idx[s : s + block])
        out.flush()
        del out
        files.append(name)
    return files


def make_session(root: Path, minutes: float, raw=None):
    mouse = root / "BENCH"
    d = mouse / "2026-12-01_090000"
    d.mkdir(parents=True, exist_ok=True)
    (mouse / "subject.toml").write_text(
        'id = "BENCH"\nspecies = "Mus musculus"\nsex = "F"\ndate_of_birth = 2026-09-01\n'
        'strain = "C57BL/6J"\ngenotype = "wild type"\nexperimenter = "Doe, Jane"\n'
        'baseline_weight_g = 23.5\nnotes = ""\n'
    )
    rng = np.random.default_rng(1)
    dur_s = minutes * 60
    # Lever, 1 kHz.
    n = int(dur_s * 1000)
    t_lever = np.arange(n, dtype=np.int64) / 1e3

    def lever_rows(i):
        t = i / 1e3
        counts = np.round(40 * np.sin(t * 0.7) + rng.normal(0, 2, len(i)))
        return np.column_stack([t, counts / 40.0, counts])

    chunks = {"lever": write_chunked(d, "lever", t_lever, lever_rows, (3,), "<f8")}
    # Frames, 28.7 Hz.
    nf = int(dur_s * RATE_HZ)
    t_us = np.round(np.arange(nf) * 1e6 / RATE_HZ).astype(np.int64)
    t_frames = t_us / 1e6
    with open(d / "frames.tsv", "w") as fh:
        fh.write("index\tframe\tt_s\tsource\tdropped\n")
        fh.writelines(f"{i}\t{i + 1}\t{t // 1_000_000}.{t % 1_000_000:06d}\tttl\t0\n" for i, t in enumerate(t_us))
    with open(d / "motion.tsv", "w") as fh:
        fh.write("frame\tdx_px\tdy_px\tpeak\tflagged\n")
        dx = rng.normal(0, 0.5, nf)
        fh.writelines(f"{i + 1}\t{dx[i]:.3f}\t{-dx[i]:.3f}\t0.9\t0\n" for i in range(nf))
    with open(d / "rois.tsv", "w") as fh:
        fh.write("column\troi\ttype\tpixels\tneuropil_pixels\tx\ty\n")
        fh.writelines(f"{c}\t{c + 1}\tunknown\t1024\t0\t{15.5 + 32 * (c % 8)}\t{15.5 + 32 * (c // 8)}\n" for c in range(N_ROIS))
    chunks["f"] = write_chunked(d, "f", t_frames, lambda i: (100 + rng.normal(0, 5, (len(i), N_ROIS))).astype("<f4"), (N_ROIS,), "<f4")
    chunks["dff"] = write_chunked(d, "dff", t_frames, lambda i: rng.normal(0, 0.1, (len(i), N_ROIS)).astype("<f4"), (N_ROIS,), "<f4")
    w = h = 256
    if raw:
        w, h = raw
        yy, xx = np.mgrid[0:h, 0:w]
        base = (1000 + 500 * np.sin(xx / 7.0) * np.cos(yy / 5.0)).astype(np.int32)

        def frame_rows(i):
            noise = rng.poisson(50, (len(i), 1, h, w)).astype(np.int32)
            return (base[None, None] + noise).astype("<u2")

        chunks["frames"] = write_chunked(d, "frames", t_frames, frame_rows, (1, h, w), "<u2", block=2000)
    np.save(d / "mean_image.npy", np.zeros((1, 1, h, w), "<f4"))
    chunks["mean_image"] = ["mean_image.npy"]
    # Trials every 6 s, events: per trial and a frame TTL per frame.
    nt = int(dur_s // 6)
    with open(d / "trials.tsv", "w") as fh:
        fh.write("trial\tt_start_s\tt_cue_s\tt_response_s\toutcome\tt_reward_s\treward_ul\tvalve_open_us\tlever_mm_at_cue\titi_presses\tcapped\n")
        for k in range(nt):
            s = 6 * k + 1
            fh.write(f"{k + 1}\t{s}.000000\t{s}.020000\t{s}.400000\trewarded\t{s}.410000\t4\t38182\t0\t0\t0\n")
    with open(d / "events.tsv", "w") as fh:
        fh.write("t_s\tsource\tkind\tvalue\tdetail\n")
        for k in range(nt):
            s = 6 * k + 1
            fh.write(f"{s}.000000\tcommand\ttone\t6000\tTone(Tone {{ frequency_hz: 6000, duration_ms: 1000 }})\n")
            fh.write(f"{s}.020000\tdevice\ttone_on\t\t\n{s}.410000\tdevice\tvalve_open\t\t\n")
        fh.writelines(f"{t // 1_000_000}.{t % 1_000_000:06d}\tdevice\tframe_ttl\t{i + 1}\t\n" for i, t in enumerate(t_us))
    start = "2026-12-01T09:00:00.000000Z"
    toml = [
        "format_version = 1", 'state = "complete"', 'mouse = "BENCH"', 'rig = "bench"', 'software = "rigd"',
        'software_version = "0.1.0"', f'notes = "synthetic {minutes} min session (scripts/nwb_export_bench.py)"',
        f'start_utc = "{start}"', 'stop_reason = "duration"', "t0_rig_us = 0", "host_monotonic_start_ns = 0", "",
        "[chunks]",
    ]
    toml += [f"{k} = [{', '.join(json.dumps(f) for f in v)}]" for k, v in chunks.items()]
    toml += ["", "[config.rig]", "encoder_counts_per_mm = 40.0", "", "[config.imaging]", "channels = 1",
             "enabled = true", f"frame_rate_hz = {RATE_HZ}", f"height = {h}", f"width = {w}", ""]
    (d / "session.toml").write_text("\n".join(toml))
    (d / "summary.json").write_text(json.dumps({"trials": nt, "rewards": nt, "water_ul": 4.0 * nt}))
    return d


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=120)
    p.add_argument("--dir", default="/tmp/nwb-bench")
    p.add_argument("--raw-frames", help="WxH: also store raw frames of this size")
    p.add_argument("--reuse", action="store_true", help="use an existing session folder")
    p.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    root = Path(a.dir)
    raw = tuple(int(x) for x in a.raw_frames.split("x")) if a.raw_frames else None
    d = root / "BENCH" / "2026-12-01_090000"
    if a.write_only:
        make_session(root, a.minutes, raw)
        return
    if not (a.reuse and d.is_dir()):
        # In a child process: a child's peak RSS (ru_maxrss) starts from its
        # parent's at fork, so this process must stay small.
        t = time.monotonic()
        subprocess.run([sys.executable, __file__, "--write-only"] + sys.argv[1:], check=True)
        print(f"wrote {d} in {time.monotonic() - t:.0f} s", flush=True)
    size = sum(f.stat().st_size for f in d.iterdir())
    out = root / "bench.nwb"
    if out.exists():
        out.unlink()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "python"), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "rigsession", "export-nwb", str(d), "-o", str(out), "--location", "Primary motor area"]
    t = time.monotonic()
    subprocess.run(cmd, check=True, env=env)
    wall = time.monotonic() - t
    # The largest child's peak: the export (the writer, if it ran, is smaller
    # or reported above; run with --reuse to measure the export alone).
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({
        "minutes": a.minutes, "raw_frames": a.raw_frames, "session_mib": round(size / 2**20, 1),
        "nwb_mib": round(out.stat().st_size / 2**20, 1), "export_wall_s": round(wall, 1), "peak_rss_mib": round(peak_mib, 1),
    }))


if __name__ == "__main__":
    main()
