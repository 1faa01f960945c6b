"""Convert suite2p's ROIs into the label image rigd reads (``[imaging].roi_labels``).

suite2p writes, per plane, ``stat.npy`` (a pickled object array: one dict per
ROI with ``ypix``, ``xpix`` and ``overlap``), ``iscell.npy`` (N x 2: is a cell,
probability) and ``ops.npy`` (a pickled dict with the frame size ``Ly``,
``Lx`` and the mean image ``meanImg``). rigd reads no pickles; this writes:

* ``<out>.npy``: a 2-D ``uint32`` label image the size of the frame, 0 =
  background, ``k`` = the k-th ROI kept (in suite2p's order). A pixel suite2p
  marks as overlapping another ROI is left out of both, as suite2p leaves it
  out of their traces;
* ``<out>.tsv``: the sidecar table (``[imaging].roi_table``): ``roi``,
  ``type`` (empty: suite2p does not know it) and ``note`` (the suite2p index
  and cell probability, to find the ROI in suite2p again);
* with ``ops.npy`` present, ``<out>_mean.npy``: suite2p's mean image as
  ``float32``, usable as ``[imaging].reference_image``.

Only ROIs suite2p classified as cells are kept unless ``keep_all``; a minimum
probability can be asked for too. Every problem is an error naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class Suite2pError(Exception):
    """A suite2p folder that cannot be converted; the message names the file."""


@dataclass
class Conversion:
    labels: np.ndarray
    # One row per label k = 1..n: (suite2p index, cell probability or NaN).
    kept: list = field(default_factory=list)
    skipped_not_cell: int = 0
    skipped_probability: int = 0
    skipped_empty: int = 0
    overlap_pixels: int = 0
    mean_image: np.ndarray | None = None


def _load_pickled(path: Path):
    try:
        return np.load(path, allow_pickle=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same error
        raise Suite2pError(f"{path}: cannot read it as a NumPy file ({e})") from e


def convert(plane_dir, *, keep_all: bool = False, min_probability: float | None = None,
            shape: tuple[int, int] | None = None) -> Conversion:
    """Read a suite2p plane folder (``.../suite2p/plane0``) into a label image."""
    d = Path(plane_dir)
    stat_path = d / "stat.npy"
    if not stat_path.is_file():
        raise Suite2pError(f"{stat_path}: not found (give suite2p's plane folder, e.g. suite2p/plane0)")
    stat = _load_pickled(stat_path)
    if stat.ndim != 1 or not all(isinstance(s, dict) for s in stat):
        raise Suite2pError(f"{stat_path}: expected suite2p's array of ROI dicts")
    n = len(stat)
    iscell = None
    iscell_path = d / "iscell.npy"
    if iscell_path.is_file():
        iscell = np.asarray(_load_pickled(iscell_path), dtype=float)
        if iscell.ndim == 1:
            iscell = iscell[:, None]
        if iscell.shape[0] != n:
            raise Suite2pError(f"{iscell_path}: {iscell.shape[0]} rows for the {n} ROIs of {stat_path}")
    elif not keep_all:
        raise Suite2pError(f"{iscell_path}: not found; without it every ROI is kept only with keep_all")
    ops = None
    ops_path = d / "ops.npy"
    if ops_path.is_file():
        o = _load_pickled(ops_path)
        ops = o.item() if isinstance(o, np.ndarray) and o.dtype == object and o.shape == () else o
    if shape is None:
        if ops is None or "Ly" not in ops or "Lx" not in ops:
            raise Suite2pError(f"{ops_path}: needed for the frame size (Ly, Lx); or give the shape")
        shape = (int(ops["Ly"]), int(ops["Lx"]))
    ly, lx = shape
    if ly <= 0 or lx <= 0:
        raise Suite2pError(f"frame size {ly} x {lx}: must be positive")
    labels = np.zeros((ly, lx), dtype=np.uint32)
    out = Conversion(labels=labels)
    for i, s in enumerate(stat):
        prob = float(iscell[i, 1]) if iscell is not None and iscell.shape[1] > 1 else float("nan")
        if iscell is not None and not keep_all and iscell[i, 0] < 0.5:
            out.skipped_not_cell += 1
            continue
        if min_probability is not None and not (prob >= min_probability):
            out.skipped_probability += 1
            continue
        try:
            y = np.asarray(s["ypix"], dtype=np.int64).ravel()
            x = np.asarray(s["xpix"], dtype=np.int64).ravel()
        except KeyError as e:
            raise Suite2pError(f"{stat_path}: ROI {i} has no {e.args[0]}") from None
        if y.shape != x.shape:
            raise Suite2pError(f"{stat_path}: ROI {i}: ypix and xpix differ in length")
        if y.size and (y.min() < 0 or x.min() < 0 or y.max() >= ly or x.max() >= lx):
            raise Suite2pError(
                f"{stat_path}: ROI {i} has pixels outside the {ly} x {lx} frame (a different plane or crop?)")
        ov = np.asarray(s.get("overlap", np.zeros(y.size, dtype=bool)), dtype=bool).ravel()
        if ov.shape != y.shape:
            ov = np.zeros(y.size, dtype=bool)
        keep = ~ov
        out.overlap_pixels += int(ov.sum())
        # A pixel already taken (suite2p did not mark the overlap) stays with
        # the first ROI.
        yk, xk = y[keep], x[keep]
        free = labels[yk, xk] == 0
        yk, xk = yk[free], xk[free]
        if yk.size == 0:
            out.skipped_empty += 1
            continue
        k = len(out.kept) + 1
        labels[yk, xk] = k
        out.kept.append((i, prob))
    if ops is not None and "meanImg" in ops:
        m = np.asarray(ops["meanImg"], dtype=np.float32)
        if m.shape == (ly, lx):
            out.mean_image = m
    return out


def write(conv: Conversion, out_stem) -> list[Path]:
    """Write ``<stem>.npy``, ``<stem>.tsv`` (and ``<stem>_mean.npy``); each is
    written to a temporary name and renamed, so no half-written file is left."""
    stem = Path(out_stem)
    if stem.suffix == ".npy":
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []

    def put(path: Path, save):
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            save(f)
        tmp.replace(path)
        written.append(path)

    put(stem.with_suffix(".npy"), lambda f: np.save(f, np.ascontiguousarray(conv.labels)))

    def table(f):
        rows = ["roi\ttype\tnote"]
        for k, (i, p) in enumerate(conv.kept, start=1):
            note = f"suite2p roi {i}" + ("" if p != p else f", cell probability {p:.3f}")
            rows.append(f"{k}\t\t{note}")
        f.write(("\n".join(rows) + "\n").encode())

    put(stem.with_suffix(".tsv"), table)
    if conv.mean_image is not None:
        put(stem.with_name(stem.name + "_mean.npy"), lambda f: np.save(f, conv.mean_image))
    return written
