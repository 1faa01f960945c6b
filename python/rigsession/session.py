"""Read rigd session folders as docs/session-format.md describes them.

Only the documented files are read. numpy is required; pandas is optional
(``Table.to_pandas()``). Large streams (lever, frames, F, dF/F) are opened
memory-mapped chunk by chunk, so nothing is loaded until asked for.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from array import array

import numpy as np

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - older Pythons
    import tomli as tomllib  # type: ignore[no-redef]

_NAN = float("nan")
_UNESCAPE = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r", '"': '"'}
_ESCAPE_RE = re.compile(r"\\(.)")

# Column types of the documented tables. "f" float (empty = NaN), "i" int,
# "s" text (escaped), "t" time in seconds (float, empty = NaN).
TRIALS_COLUMNS = {
    "trial": "i",
    "t_start_s": "f",
    "t_cue_s": "f",
    "t_response_s": "f",
    "outcome": "s",
    "t_reward_s": "f",
    "reward_ul": "f",
    "valve_open_us": "i",
    "lever_mm_at_cue": "f",
    "iti_presses": "i",
    "capped": "i",
}
EVENTS_COLUMNS = {"t_s": "f", "source": "s", "kind": "s", "value": "f", "detail": "s"}
FRAMES_COLUMNS = {"index": "i", "frame": "i", "t_s": "f", "source": "s", "dropped": "i"}
MOTION_COLUMNS = {"frame": "i", "dx_px": "f", "dy_px": "f", "peak": "f", "flagged": "i"}
ROIS_COLUMNS = {
    "column": "i",
    "roi": "i",
    "type": "s",
    "pixels": "i",
    "neuropil_pixels": "i",
    "x": "f",
    "y": "f",
}

STREAMS = ("lever", "frames", "f", "dff")


def unescape(text: str) -> str:
    """Undo the TSV text escaping (``\\\\ \\t \\n \\r \\"``)."""
    if "\\" not in text:
        return text
    return _ESCAPE_RE.sub(lambda m: _UNESCAPE.get(m.group(1), m.group(0)), text)


class Table(dict):
    """Columns by name, each a numpy array of the same length (text columns
    are object arrays of str). ``to_pandas()`` needs pandas."""

    def __len__(self) -> int:  # number of rows
        for v in self.values():
            return int(v.shape[0])
        return 0

    @property
    def columns(self) -> List[str]:
        return list(self.keys())

    def to_pandas(self):
        import pandas as pd  # optional dependency

        return pd.DataFrame({k: v for k, v in self.items()})


def read_tsv(path: os.PathLike, types: Optional[Dict[str, str]] = None) -> Table:
    """A documented TSV table: header row, one row per line, no quoting.

    Known columns get their documented type; unknown columns are kept: as
    numbers when every cell parses as one, else as text. An empty number cell
    is NaN (an integer column with an empty cell becomes float). Read line by
    line; repeated text (kinds, sources, empty details) is stored once."""
    types = types or {}
    with open(path, "r", encoding="utf-8", newline="") as fh:
        header_line = fh.readline()
        if not header_line.endswith("\n"):
            return Table()
        header = header_line[:-1].split("\t")
        kinds = [types.get(name) for name in header]
        # Numbers go straight into typed arrays (8 bytes a cell, no objects).
        cols: List = [array("q") if k == "i" else array("d") if k == "f" else [] for k in kinds]
        empties: List[List[int]] = [[] for _ in header]
        row = 0
        seen: Dict[str, str] = {}
        width = len(header)
        for line in fh:
            # A crashed, unrecovered session may end in a half-written row.
            if not line.endswith("\n"):
                break
            if line == "\n":
                continue
            cells = line[:-1].split("\t")
            if len(cells) < width:
                cells += [""] * (width - len(cells))
            for j in range(width):
                c = cells[j]
                k = kinds[j]
                if k == "s" or k is None:
                    v = seen.get(c)
                    if v is None:
                        v = seen[c] = unescape(c) if k == "s" else c
                    cols[j].append(v)
                elif c == "":
                    cols[j].append(0 if k == "i" else _NAN)
                    if k == "i":
                        empties[j].append(row)
                elif k == "i":
                    cols[j].append(int(c))
                else:
                    cols[j].append(float(c))  # also NaN, Inf, -Inf
            row += 1
    table = Table()
    for name, kind, values, empty in zip(header, kinds, cols, empties):
        if kind == "i":
            col = np.frombuffer(values, dtype=np.int64).copy() if len(values) else np.zeros(0, np.int64)
            if empty:
                col = col.astype(np.float64)
                col[empty] = np.nan
            table[name] = col
            continue
        if kind == "f":
            table[name] = np.frombuffer(values, dtype=np.float64).copy() if len(values) else np.zeros(0)
            continue
        if kind is None:
            try:
                values = [None if c == "" else float(c) for c in values]
                kind = "f"
            except ValueError:
                values = [unescape(c) for c in values]
                kind = "s"
        if kind == "s":
            col = np.empty(len(values), dtype=object)
            col[:] = values
        elif kind == "i" and all(v is not None for v in values):
            col = np.array(values, dtype=np.int64)
        else:
            col = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        table[name] = col
        values.clear()
    return table


@dataclass
class Stream:
    """One chunked ``.npy`` stream (lever, frames, f, dff): its chunk files in
    order. Iterate chunks memory-mapped, or load it whole."""

    name: str
    files: List[Path]

    def __bool__(self) -> bool:
        return bool(self.files)

    def chunks(self, mmap: bool = True) -> Iterator[np.ndarray]:
        for f in self.files:
            yield np.load(f, mmap_mode="r" if mmap else None)

    def layout(self):
        """(path, data offset, dtype, shape) of each chunk, from its header;
        no data is read."""
        out = []
        for f in self.files:
            m = np.load(f, mmap_mode="r")
            out.append((f, int(m.offset), m.dtype, tuple(m.shape)))
            del m
        return out

    def blocks(self, rows: int = 1 << 18) -> Iterator[np.ndarray]:
        """The rows of every chunk in order, ``rows`` at a time, read with
        plain reads (no mapping stays resident): memory stays bounded."""
        for path, offset, dtype, shape in self.layout():
            yield from read_rows(path, offset, dtype, shape, 0, shape[0], rows)

    def shape(self):
        """Total shape without loading the data."""
        n, rest, dtype = 0, None, None
        for a in self.chunks():
            n += a.shape[0]
            rest, dtype = a.shape[1:], a.dtype
        return None if rest is None else (n, *rest)

    @property
    def dtype(self):
        for a in self.chunks():
            return a.dtype
        return None

    def load(self) -> np.ndarray:
        arrays = [np.asarray(a) for a in self.chunks(mmap=False)]
        if not arrays:
            raise FileNotFoundError(f"no {self.name}.npy in the session")
        return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]


def read_rows(path, offset, dtype, shape, start, stop, rows=1 << 18):
    """Rows [start, stop) of an .npy file's data, ``rows`` at a time."""
    per_row = int(np.prod(shape[1:], dtype=np.int64))
    with open(path, "rb") as fh:
        for s in range(start, stop, rows):
            e = min(stop, s + rows)
            fh.seek(offset + s * per_row * dtype.itemsize)
            a = np.fromfile(fh, dtype=dtype, count=(e - s) * per_row)
            yield a.reshape((e - s,) + tuple(shape[1:]))


def _chunk_key(path: str):
    return (len(path), path)


class Session:
    """One session folder ``<data_root>/<mouse>/<YYYY-MM-DD>_<HHMMSS>/``."""

    def __init__(self, path: os.PathLike):
        self.path = Path(path)
        toml_path = self.path / "session.toml"
        if not toml_path.is_file():
            raise FileNotFoundError(f"{self.path}: no session.toml (not a session folder)")
        with open(toml_path, "rb") as fh:
            self.meta: dict = tomllib.load(fh)

    def __repr__(self) -> str:
        return f"Session({str(self.path)!r})"

    # -- metadata -----------------------------------------------------------
    @property
    def mouse(self) -> str:
        return self.meta.get("mouse", self.path.parent.name)

    @property
    def state(self) -> str:
        return self.meta.get("state", "")

    @property
    def config(self) -> dict:
        return self.meta.get("config", {})

    @property
    def session_toml_text(self) -> str:
        return (self.path / "session.toml").read_text(encoding="utf-8")

    @property
    def summary(self) -> Optional[dict]:
        p = self.path / "summary.json"
        if not p.is_file():
            return None
        with open(p, "r", encoding="utf-8") as fh:
            return json.load(fh)

    def subject(self) -> Optional[dict]:
        """The mouse record ``<mouse folder>/subject.toml``, if present."""
        p = self.path.parent / "subject.toml"
        if not p.is_file():
            return None
        with open(p, "rb") as fh:
            return tomllib.load(fh)

    # -- tables -------------------------------------------------------------
    def _table(self, name: str, types: Dict[str, str]) -> Table:
        p = self.path / name
        if not p.is_file():
            return Table()
        return read_tsv(p, types)

    def trials(self) -> Table:
        return self._table("trials.tsv", TRIALS_COLUMNS)

    def events(self) -> Table:
        return self._table("events.tsv", EVENTS_COLUMNS)

    def frames_table(self) -> Table:
        return self._table("frames.tsv", FRAMES_COLUMNS)

    def motion(self) -> Table:
        return self._table("motion.tsv", MOTION_COLUMNS)

    def rois(self) -> Table:
        return self._table("rois.tsv", ROIS_COLUMNS)

    # -- arrays -------------------------------------------------------------
    def stream(self, name: str) -> Stream:
        """A chunked stream. The chunk files are found by name (the form that
        also works on a running or crashed session), checked against
        ``[chunks]`` in session.toml when it lists more."""
        base = self.path / f"{name}.npy"
        found = [str(base)] if base.is_file() else []
        found += sorted(glob.glob(str(self.path / f"{name}.[0-9]*.npy")), key=_chunk_key)
        listed = [str(self.path / f) for f in self.meta.get("chunks", {}).get(name, [])]
        files = found if len(found) >= len(listed) else [f for f in listed if os.path.isfile(f)]
        return Stream(name, [Path(f) for f in files])

    def lever(self) -> np.ndarray:
        """(N, 3) float64: t_s, position_mm, raw_counts (all chunks)."""
        return self.stream("lever").load()

    def frames(self) -> np.ndarray:
        """Raw frames, uint16 (frames, C, H, W); rows = frames.tsv rows with
        dropped = 0. Memory-mapped chunks: use ``stream('frames')`` for long
        sessions."""
        return self.stream("frames").load()

    def frame_times(self) -> np.ndarray:
        """Session time of each stored frame (frames.tsv rows with dropped = 0)."""
        ft = self.frames_table()
        if not len(ft):
            return np.zeros(0)
        return ft["t_s"][ft["dropped"] == 0]

    def f(self) -> np.ndarray:
        """Neuropil-corrected fluorescence, float32 (frames, ROIs); row k = frames.tsv row k."""
        return self.stream("f").load()

    def dff(self) -> np.ndarray:
        """Online dF/F, float32 (frames, ROIs); row k = frames.tsv row k."""
        return self.stream("dff").load()

    def mean_image(self) -> Optional[np.ndarray]:
        p = self.path / "mean_image.npy"
        return np.load(p) if p.is_file() else None

    def reference_image(self) -> Optional[np.ndarray]:
        """The motion-correction reference the session registered its frames
        against (H, W), from its copy ``reference_image.npy``: the mouse's
        imaging reference (see ``imaging_reference``) or the rig's. None when
        the reference was built from the session's first frames."""
        p = self.path / "reference_image.npy"
        if not p.is_file():
            return None
        a = np.load(p)
        return a.reshape(a.shape[-2:]) if a.ndim > 2 else a

    @property
    def imaging_reference(self) -> dict:
        """session.toml's ``[imaging_reference]``: where the reference came
        from (``source`` = ``mouse`` or ``rig``, when it was set, from which
        session); {} when none was used."""
        return self.meta.get("imaging_reference", {})

    @property
    def fov_check(self) -> dict:
        """session.toml's ``[fov_check]``: the field of view at the start
        against the reference (``verdict``, ``dx_px``, ``dy_px``,
        ``rotation_deg``, ``correlation``, the limits, any ``problems``); {}
        when no check was made."""
        return self.meta.get("fov_check", {})

    def fov_check_mean(self) -> Optional[np.ndarray]:
        """The mean image (H, W) the field-of-view check registered
        (``fov_check_mean.npy``), or None."""
        p = self.path / "fov_check_mean.npy"
        if not p.is_file():
            return None
        a = np.load(p)
        return a.reshape(a.shape[-2:]) if a.ndim > 2 else a

    def roi_labels(self) -> Optional[np.ndarray]:
        """The ROI label image (H, W) the session ran with: its copy in the
        session folder (``roi_labels.npy``), else the file named by
        ``[config.imaging].roi_labels`` when it is still there. None when the
        session used no label image (the daemon then uses a grid of tiles whose
        layout the session format does not record) or the file is gone."""
        own = self.path / "roi_labels.npy"
        if own.is_file():
            return np.load(own)
        p = self.config.get("imaging", {}).get("roi_labels")
        if not p:
            return None
        path = Path(p)
        if not path.is_absolute():
            path = self.path / path
        if not path.is_file():
            return None
        return np.load(path)

    def roi_masks(self) -> Optional[np.ndarray]:
        """Boolean masks (ROIs, H, W) in the column order of f.npy / dff.npy,
        from the label image (see ``roi_labels``); None when not available."""
        labels = self.roi_labels()
        rois = self.rois()
        if labels is None or not len(rois):
            return None
        labels = np.asarray(labels).reshape(labels.shape[-2:])
        return np.stack([labels == v for v in rois["roi"]])


def load_session(path: os.PathLike) -> Session:
    """Open one session folder."""
    return Session(path)


_SESSION_RE = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{6}(_\d)?$")


def load_mouse(path: os.PathLike) -> List[Session]:
    """Every session folder of a mouse (``<data_root>/<mouse>``), oldest first."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    out = []
    for d in sorted(root.iterdir(), key=lambda p: p.name):
        if d.is_dir() and _SESSION_RE.match(d.name) and (d / "session.toml").is_file():
            out.append(Session(d))
    return out
