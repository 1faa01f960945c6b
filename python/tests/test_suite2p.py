"""Checks of rigsession.suite2p: a suite2p plane folder made here (stat.npy,
iscell.npy, ops.npy as suite2p writes them) converted into rigd's label image.
Plain asserts, run by tests/tests/suite2p.rs as `python test_suite2p.py DIR`:
it leaves the converted files in DIR for the Rust side and prints OK."""

import sys
import tempfile
from pathlib import Path

import numpy as np

from rigsession.cli import main as cli_main
from rigsession.suite2p import Suite2pError, convert, write

LY, LX = 48, 64


def roi(y0, x0, h, w, overlap=None):
    yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w]
    y, x = yy.ravel(), xx.ravel()
    ov = np.zeros(y.size, dtype=bool) if overlap is None else overlap(y, x)
    return {"ypix": y, "xpix": x, "lam": np.ones(y.size, np.float32), "overlap": ov, "med": [y0, x0]}


def plane(d: Path, stat, iscell, ops=True):
    d.mkdir(parents=True, exist_ok=True)
    arr = np.empty(len(stat), dtype=object)
    arr[:] = stat
    np.save(d / "stat.npy", arr, allow_pickle=True)
    np.save(d / "iscell.npy", np.asarray(iscell, dtype=np.float32))
    if ops:
        mean = np.arange(LY * LX, dtype=np.float32).reshape(LY, LX)
        np.save(d / "ops.npy", np.array({"Ly": LY, "Lx": LX, "meanImg": mean}, dtype=object), allow_pickle=True)


def test_cells_overlaps_and_order(tmp: Path):
    # 0: a cell; 1: not a cell; 2: a cell overlapping 3 on its right column,
    # which suite2p marks in both; 3: a cell of low probability; 4: a cell
    # whose every pixel overlaps.
    stat = [
        roi(2, 2, 5, 5),
        roi(20, 2, 5, 5),
        roi(30, 30, 4, 4, overlap=lambda y, x: x == 33),
        roi(30, 33, 4, 4, overlap=lambda y, x: x == 33),
        roi(10, 50, 3, 3, overlap=lambda y, x: np.ones(y.size, dtype=bool)),
    ]
    iscell = [[1, 0.9], [0, 0.2], [1, 0.8], [1, 0.55], [1, 0.7]]
    d = tmp / "suite2p" / "plane0"
    plane(d, stat, iscell)
    c = convert(d)
    lab = c.labels
    assert lab.dtype == np.uint32 and lab.shape == (LY, LX)
    assert [i for i, _ in c.kept] == [0, 2, 3], c.kept
    assert (c.skipped_not_cell, c.skipped_empty) == (1, 1)
    assert (lab == 1).sum() == 25 and lab[2:7, 2:7].min() == 1
    assert (lab == 2).sum() == 12 and (lab[30:34, 33] == 0).all(), "overlap left out"
    assert (lab == 3).sum() == 12
    assert (lab[20:25, 2:7] == 0).all(), "not a cell"
    assert c.overlap_pixels == 4 + 4 + 9
    c2 = convert(d, min_probability=0.6)
    assert [i for i, _ in c2.kept] == [0, 2] and c2.skipped_probability == 1
    c3 = convert(d, keep_all=True)
    assert [i for i, _ in c3.kept] == [0, 1, 2, 3]
    # The files, through the command line as a person runs it.
    out = tmp / "out" / "rois"
    assert cli_main(["suite2p-labels", str(d), "-o", str(out)]) == 0
    back = np.load(out.with_suffix(".npy"))
    assert back.dtype == np.uint32 and np.array_equal(back, lab)
    rows = out.with_suffix(".tsv").read_text().splitlines()
    assert rows[0] == "roi\ttype\tnote"
    assert rows[2] == "2\t\tsuite2p roi 2, cell probability 0.800", rows
    mean = np.load(out.with_name("rois_mean.npy"))
    assert mean.dtype == np.float32 and mean.shape == (LY, LX)
    assert not list((tmp / "out").glob("*.tmp")), "no temporary file left"
    return out


def test_errors_name_the_file(tmp: Path):
    d = tmp / "bad" / "plane0"
    try:
        convert(d)
        raise AssertionError("no stat.npy must fail")
    except Suite2pError as e:
        assert "stat.npy" in str(e) and "plane0" in str(e), e
    plane(d, [roi(0, 0, 2, 2)], [[1, 1], [1, 1]])
    try:
        convert(d)
        raise AssertionError("row count mismatch must fail")
    except Suite2pError as e:
        assert "iscell.npy" in str(e) and "2 rows for the 1 ROIs" in str(e), e
    plane(d, [roi(LY - 1, 0, 3, 2)], [[1, 1]])
    try:
        convert(d)
        raise AssertionError("pixels outside must fail")
    except Suite2pError as e:
        assert "outside the 48 x 64 frame" in str(e), e
    d2 = tmp / "noops" / "plane0"
    plane(d2, [roi(0, 0, 2, 2)], [[1, 1]], ops=False)
    try:
        convert(d2)
        raise AssertionError("no frame size must fail")
    except Suite2pError as e:
        assert "ops.npy" in str(e) and "Ly, Lx" in str(e), e
    assert convert(d2, shape=(LY, LX)).labels.shape == (LY, LX)
    assert cli_main(["suite2p-labels", str(tmp / "nowhere"), "-o", str(tmp / "x")]) == 1


if __name__ == "__main__":
    keep = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    keep.mkdir(parents=True, exist_ok=True)
    out = test_cells_overlaps_and_order(keep)
    test_errors_name_the_file(keep)
    print(f"OK {out.with_suffix('.npy')}")
