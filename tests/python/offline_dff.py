#!/usr/bin/env python3
"""Offline suite2p-style dF/F from F, compared with rigd's online dF/F.

Usage: offline_dff.py F.npy ONLINE_DFF.npy FRAME_RATE_HZ [--sigma 10] [--window-s 60]

F and ONLINE_DFF are frames x ROIs float32 (row-aligned). The offline baseline
is suite2p's `maximin`: a *centred* Gaussian smoothing (sigma frames, truncated
at 4 sigma, 'reflect' edges as scipy.ndimage), then a centred minimum filter and
a centred maximum filter of size int(window_s * fs) ('reflect' edges, origin 0),
all in numpy only. dF/F = (F - F0) / F0.

Prints `median_r <r>` (median over ROIs of the Pearson correlation between
offline and online dF/F over all frames), then `median_r_after_warmup <r>`
(frames after the first window, where the online window is full), `min_r`,
and `rois <n>` / `frames <n>`.
"""
import argparse
import sys

import numpy as np


def _reflect_pad(x, before, after):
    # scipy.ndimage 'reflect' == numpy 'symmetric' (d c b a | a b c d).
    return np.pad(x, ((before, after), (0, 0)), mode="symmetric")


def gaussian_smooth(x, sigma):
    if sigma <= 0:
        return x.copy()
    radius = int(4.0 * sigma + 0.5)
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (k / sigma) ** 2)
    w /= w.sum()
    p = _reflect_pad(x.astype(np.float64), radius, radius)
    out = np.zeros_like(x, dtype=np.float64)
    n = x.shape[0]
    for i, wi in enumerate(w):
        out += wi * p[i:i + n]
    return out


def _sliding(x, size, op, fill):
    """Centred running op (np.minimum / np.maximum) of `size` along axis 0,
    scipy origin-0 convention, reflect edges; van Herk / Gil-Werman, O(n)."""
    n, m = x.shape
    before = size // 2
    after = size - 1 - before
    p = _reflect_pad(x, before, after)  # length n + size - 1
    L = p.shape[0]
    nb = -(-L // size)
    q = np.full((nb * size, m), fill, dtype=p.dtype)
    q[:L] = p
    blocks = q.reshape(nb, size, m)
    g = op.accumulate(blocks, axis=1).reshape(nb * size, m)
    h = op.accumulate(blocks[:, ::-1], axis=1)[:, ::-1].reshape(nb * size, m)
    idx = np.arange(n)
    return op(h[idx], g[idx + size - 1])


def maximin(F, fs, sigma=10.0, window_s=60.0):
    win = max(1, int(window_s * fs))
    s = gaussian_smooth(F, sigma)
    lo = _sliding(s, win, np.minimum, np.inf)
    return _sliding(lo, win, np.maximum, -np.inf), win


def column_corr(a, b):
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(axis=0) / den


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("f")
    ap.add_argument("online_dff")
    ap.add_argument("fs", type=float)
    ap.add_argument("--sigma", type=float, default=10.0)
    ap.add_argument("--window-s", type=float, default=60.0)
    ap.add_argument("--save", help="write the offline dF/F here (npy)")
    a = ap.parse_args(argv)
    F = np.load(a.f).astype(np.float64)
    on = np.load(a.online_dff).astype(np.float64)
    if F.ndim != 2 or F.shape != on.shape:
        print(f"shape mismatch: F {F.shape} vs online {on.shape}", file=sys.stderr)
        return 2
    F0, win = maximin(F, a.fs, a.sigma, a.window_s)
    off = (F - F0) / F0
    if a.save:
        np.save(a.save, off.astype(np.float32))
    r = column_corr(off, on)
    r_w = column_corr(off[win:], on[win:]) if F.shape[0] > win + 2 else r
    print(f"median_r {np.nanmedian(r):.4f}")
    print(f"median_r_after_warmup {np.nanmedian(r_w):.4f}")
    print(f"min_r {np.nanmin(r):.4f}")
    print(f"rois {F.shape[1]}")
    print(f"frames {F.shape[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
