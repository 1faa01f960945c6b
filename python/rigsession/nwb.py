"""Export a rigd session folder to an NWB file with pynwb.

Large streams (lever, raw frames, F, dF/F) are written chunk by chunk from the
memory-mapped session files into chunked, gzip-compressed HDF5 datasets, so a
session of any length exports without being loaded into memory. The mapping
from session files to NWB objects is described in docs/python.md.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from .session import Session, Stream, Table, read_rows

# Imported lazily by export(): pynwb is an optional dependency.
pynwb = None

DANDI_REQUIRED = ("id", "species", "sex")
SEXES = ("M", "F", "U", "O")

# Placeholders for imaging metadata the rig configuration does not record.
# Documented in docs/python.md; override with options of export-nwb.
PLACEHOLDER_INDICATOR = "unknown"
PLACEHOLDER_LOCATION = "unknown"
PLACEHOLDER_EXCITATION_NM = float("nan")
PLACEHOLDER_EMISSION_NM = float("nan")


class ExportError(Exception):
    """An export that cannot go on; the message says what to give and how."""


@dataclass
class SubjectInfo:
    """DANDI-required subject fields plus the optional ones of the mouse record."""

    id: Optional[str] = None
    species: Optional[str] = None
    sex: Optional[str] = None
    date_of_birth: Optional[str] = None
    age: Optional[str] = None
    strain: Optional[str] = None
    genotype: Optional[str] = None
    description: Optional[str] = None
    experimenter: Optional[str] = None
    lab: Optional[str] = None
    institution: Optional[str] = None


@dataclass
class ExportOptions:
    subject: SubjectInfo = field(default_factory=SubjectInfo)
    indicator: Optional[str] = None
    location: Optional[str] = None
    excitation_nm: Optional[float] = None
    emission_nm: Optional[float] = None
    raw_imaging_files: List[str] = field(default_factory=list)
    session_description: Optional[str] = None
    compression_level: int = 4


def _parse_date(text: str, what: str) -> dt.datetime:
    try:
        d = dt.date.fromisoformat(str(text)[:10])
    except ValueError:
        raise ExportError(f"{what} = {text!r}: not an RFC 3339 date like 2026-09-01") from None
    return dt.datetime(d.year, d.month, d.day, tzinfo=dt.timezone.utc)


def parse_utc(text: str) -> dt.datetime:
    """session.toml's RFC 3339 UTC time, as a timezone-aware datetime."""
    s = text.strip()
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    t = dt.datetime.fromisoformat(s)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t


def resolve_subject(session: Session, given: SubjectInfo) -> SubjectInfo:
    """Merge the mouse record (``<mouse>/subject.toml``) with options given on
    the command line (options win), and check the fields DANDI requires."""
    record = session.subject() or {}
    out = SubjectInfo()
    for name in SubjectInfo.__dataclass_fields__:
        value = getattr(given, name)
        if value in (None, ""):
            value = record.get(name)
        if value not in (None, ""):
            setattr(out, name, str(value))
    if not out.id:
        out.id = session.mouse
    if out.description is None:
        parts = []
        if record.get("baseline_weight_g") is not None:
            parts.append(f"baseline weight {record['baseline_weight_g']} g")
        if record.get("notes"):
            parts.append(str(record["notes"]))
        if parts:
            out.description = "; ".join(parts)
    where = session.path.parent / "subject.toml"
    missing = [n for n in ("species", "sex") if not getattr(out, n)]
    if not out.age and not out.date_of_birth:
        missing.append("date_of_birth or age")
    if missing:
        raise ExportError(
            f"{session.path}: the subject lacks {', '.join(missing)}, which DANDI requires. "
            f"Give it in the mouse record {where} (keys species, sex, date_of_birth) or with "
            f"the options --species 'Mus musculus' --sex F|M|U|O --date-of-birth YYYY-MM-DD "
            f"(or --age P90D)."
        )
    if out.sex not in SEXES:
        raise ExportError(f"subject sex = {out.sex!r}: must be one of M, F, U, O")
    if out.age and not re.fullmatch(r"P(?!$)(\d+Y)?(\d+M)?(\d+W)?(\d+D)?(T(\d+H)?(\d+M)?(\d+S)?)?(/.*)?", out.age):
        raise ExportError(f"subject age = {out.age!r}: must be an ISO 8601 duration like P90D")
    if out.date_of_birth:
        _parse_date(out.date_of_birth, "date_of_birth")
    return out


def _make_iterator_class():
    from hdmf.data_utils import GenericDataChunkIterator

    class StreamIterator(GenericDataChunkIterator):
        """Rows of several memory-mapped .npy chunks as one dataset.

        ``rows`` optionally selects rows of the concatenation (an increasing
        int64 index array), ``transform`` maps a block of rows to the
        dataset's values (for example one column)."""

        def __init__(self, layout, transform, shape, dtype, rows=None, **kwargs):
            self._layout = layout
            self._starts = np.cumsum([0] + [sh[0] for _, _, _, sh in layout])
            self._transform = transform
            self._shape = tuple(int(s) for s in shape)
            self._dtype = np.dtype(dtype)
            self._rows = rows
            super().__init__(**kwargs)

        def _raw(self, start, stop):
            parts = []
            for k, (path, offset, dtype, shape) in enumerate(self._layout):
                lo, hi = self._starts[k], self._starts[k + 1]
                s, e = max(start, lo), min(stop, hi)
                if s < e:
                    parts.extend(read_rows(path, offset, dtype, shape, s - lo, e - lo, e - s))
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        def _get_data(self, selection):
            rows = selection[0]
            if self._rows is None:
                block = self._raw(rows.start, rows.stop)
            else:
                idx = self._rows[rows.start : rows.stop]
                lo = int(idx.min())
                block = self._raw(lo, int(idx.max()) + 1)[idx - lo]
            out = self._transform(block)
            return out[(slice(None),) + tuple(selection[1:])]

        def _get_maxshape(self):
            return self._shape

        def _get_dtype(self):
            return self._dtype

    return StreamIterator


def times_of_frames(frames: np.ndarray, t: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """The time of each frame number in ``wanted``: of its frames.tsv row
    (the last one, should a number repeat after a producer restart); NaN for
    a number frames.tsv lacks."""
    frames = np.asarray(frames, dtype=np.int64)
    wanted = np.asarray(wanted, dtype=np.int64)
    order = np.argsort(frames, kind="stable")
    ordered = frames[order]
    pos = np.searchsorted(ordered, wanted, side="right") - 1
    found = pos >= 0
    found[found] = ordered[pos[found]] == wanted[found]
    out = np.full(wanted.shape, np.nan)
    out[found] = t[order[pos[found]]]
    return out


def time_order(t: np.ndarray) -> np.ndarray:
    """Indices of the rows that have a time, in time order (stable: rows
    with equal times keep their order). NWB wants ascending timestamps;
    frames.tsv is in arrival order and its stamps need not increase."""
    idx = np.flatnonzero(np.isfinite(t))
    return idx[np.argsort(t[idx], kind="stable")].astype(np.int64)


def _stream_data(stream: Stream, transform, shape, dtype, level, rows=None, chunk_rows=None):
    """An H5DataIO of a chunked stream, compressed, written block by block."""
    from pynwb import H5DataIO

    if shape[0] == 0:
        return np.zeros(shape, dtype=dtype)
    cls = _make_iterator_class()
    layout = stream.layout()
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    if chunk_rows is None:
        chunk_rows = max(1, min(shape[0], (1 << 20) // max(row_bytes, 1)))  # ~1 MiB chunks
    chunk_shape = (chunk_rows,) + tuple(shape[1:])
    buffer_rows = max(chunk_rows, (8 << 20) // max(row_bytes, 1) // chunk_rows * chunk_rows)  # ~8 MiB
    it = cls(
        layout,
        transform,
        shape,
        dtype,
        rows=rows,
        chunk_shape=chunk_shape,
        buffer_shape=(min(buffer_rows, shape[0]),) + tuple(shape[1:]),
    )
    return H5DataIO(data=it, compression="gzip", compression_opts=level)


def _small(data, level):
    from pynwb import H5DataIO

    data = np.asarray(data)
    if data.size < 1024:
        return data
    return H5DataIO(data=data, compression="gzip", compression_opts=level)


def lever_timing(stream: Stream):
    """(regular, t0_s, rate_hz, n): regular when every lever sample follows
    the previous one by the same whole number of microseconds (no gap). One
    pass over the memory-mapped chunks."""
    step = None
    prev = None
    n = 0
    t0 = None
    regular = True
    for a in stream.blocks():
        if a.shape[0] == 0:
            continue
        us = np.rint(a[:, 0] * 1e6).astype(np.int64)
        if t0 is None:
            t0 = float(a[0, 0])
        if prev is not None:
            us = np.concatenate([[prev], us])
        d = np.diff(us)
        if d.size:
            if step is None:
                step = int(d[0])
            if step <= 0 or not np.all(d == step):
                regular = False
        prev = int(us[-1])
        n += a.shape[0]
    if step is None or not regular:
        return False, t0, None, n
    return True, t0, 1e6 / step, n


def _description(session: Session, opts: ExportOptions) -> str:
    if opts.session_description:
        return opts.session_description
    notes = session.meta.get("notes") or ""
    text = (
        f"Lever-press task (rigd {session.meta.get('software_version', '?')}) on rig "
        f"{session.meta.get('rig', '?')}, mouse {session.mouse}; session state "
        f"{session.state or '?'}"
    )
    if session.meta.get("stop_reason"):
        text += f", stopped by {session.meta['stop_reason']}"
    if notes:
        text += f". Notes: {notes}"
    return text


def identifier_for(session: Session) -> str:
    """A stable identifier: the same session always exports with the same one."""
    key = f"rigd:{session.meta.get('rig', '')}:{session.mouse}:{session.meta.get('start_utc', session.path.name)}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, key))


def _qc_and_summary_notes(session: Session) -> str:
    summary = session.summary
    notes = {"session_notes": session.meta.get("notes", "")}
    if summary is not None:
        if "qc" in summary:
            notes["qc"] = summary["qc"]
        notes["summary"] = {k: v for k, v in summary.items() if k != "qc"}
    return json.dumps(notes, indent=1, sort_keys=True)


def split_detail(text: str):
    """(detail, fields): the text between the first '{' and the last '}' moved
    out when it holds a ':' (NWB best practice: no dictionary-like text in a
    table cell). Exactly reversed by ``join_detail``."""
    i, j = text.find("{"), text.rfind("}")
    if i < 0 or j <= i or ":" not in text[i + 1 : j]:
        return text, ""
    return text[:i] + "{}" + text[j + 1 :], text[i + 1 : j]


def join_detail(detail: str, fields: str) -> str:
    """The events.tsv detail from the NWB columns detail and detail_fields."""
    if not fields:
        return detail
    i = detail.find("{}")
    return detail[:i] + "{" + fields + "}" + detail[i + 2 :]


def _events_tables(session: Session, level: int):
    from pynwb.event import EventsTable, TimestampVectorData

    events = session.events()
    if not len(events):
        return []
    tables = []
    descriptions = {
        "device": "events stamped by the microcontroller on the rig clock (licks, valve, tone/cue, frame TTL, acks, faults, sync-out)",
        "command": "commands the host sent, at their send time mapped onto the rig clock",
        "link": "serial link changes (connected, lost, sample gaps, ...), host time mapped onto the rig clock",
        "task": "task-engine state changes",
        "daemon": "notices of the daemon itself (storage, imaging)",
    }
    sources = list(dict.fromkeys(events["source"].tolist()))
    for src in sources:
        sel = events["source"] == src
        name = f"events_{re.sub(r'[^A-Za-z0-9_]', '_', src)}"
        t = events["t_s"][sel]
        table = EventsTable(
            name=name,
            description=f"events.tsv rows with source = {src}: "
            + descriptions.get(src, "events of this source")
            + ". Columns kind, value (NaN = empty) and detail as in events.tsv.",
            source_description=f"rigd events.tsv, source {src}",
            columns=[
                TimestampVectorData(name="timestamp", description="session time of the event (t_s)", data=t, resolution=1e-6),
            ],
        )
        table.add_column(name="kind", description="what happened (events.tsv kind)", data=list(events["kind"][sel]))
        table.add_column(name="value", description="the event's number (events.tsv value; NaN = empty)", data=events["value"][sel])
        detail = events["detail"][sel]  # object array of (shared) str
        fields = None
        for i in np.flatnonzero([("{" in d) for d in detail]):
            d, f = split_detail(detail[i])
            if f:
                if fields is None:
                    fields = np.full(len(detail), "", dtype=object)
                detail[i], fields[i] = d, f
        table.add_column(
            name="detail",
            description="free text (events.tsv detail; '' = empty); a {...} part is moved to detail_fields and '{}' left in its place",
            data=list(detail),
        )
        if fields is not None:
            table.add_column(
                name="detail_fields",
                description="the text between the first '{' and the last '}' of events.tsv detail ('' = none): "
                "events.tsv detail = detail with its first '{}' replaced by '{' + detail_fields + '}'",
                data=list(fields),
            )
        tables.append(table)
    return tables


def _trials(nwbfile, session: Session, end_s: float):
    trials = session.trials()
    if not len(trials):
        return 0
    start = trials["t_start_s"].astype(np.float64)
    stop = np.empty_like(start)
    stop[:-1] = start[1:]
    stop[-1] = max(end_s, start[-1]) if math.isfinite(end_s) else start[-1]
    docs = {
        "trial": "trial number, from 1 (also the sync-out bitcode at trial start)",
        "t_start_s": "trial start (s): end of the inter-trial interval, start of the quiescence wait",
        "t_cue_s": "cue tone on (s)",
        "t_response_s": "lever sample that crossed the press threshold (s); NaN for a miss",
        "outcome": "rewarded, miss, or aborted",
        "t_reward_s": "valve opened (s); NaN if no water or unconfirmed",
        "reward_ul": "water delivered (uL)",
        "valve_open_us": "valve open time commanded (us); 0 if none",
        "lever_mm_at_cue": "lever displacement from rest at the cue (mm)",
        "iti_presses": "threshold crossings during the preceding inter-trial interval",
        "capped": "1 if a reward was earned but withheld by a water or reward cap",
    }
    for name in trials:
        nwbfile.add_trial_column(name=name, description=docs.get(name, f"trials.tsv column {name}"))
    cols = list(trials.items())
    for i in range(len(start)):
        row = {}
        for name, col in cols:
            v = col[i]
            row[name] = str(v) if col.dtype == object else v.item()
        nwbfile.add_trial(start_time=float(start[i]), stop_time=float(stop[i]), **row)
    return len(start)


def build_nwbfile(session: Session, opts: ExportOptions):
    """The NWBFile for a session; large data stay iterators until written."""
    import pynwb as _pynwb
    from pynwb import NWBFile, TimeSeries
    from pynwb.file import Subject
    from pynwb.epoch import TimeIntervals
    from pynwb.ophys import (
        DfOverF,
        Fluorescence,
        ImageSegmentation,
        OpticalChannel,
        TwoPhotonSeries,
    )

    meta = session.meta
    if "start_utc" not in meta:
        raise ExportError(f"{session.path}/session.toml has no start_utc")
    if meta.get("state") == "running":
        raise ExportError(
            f"{session.path} is still 'running' (being recorded, or left by a crash): "
            f"run `rigctl recover {session.path}` first"
        )
    subj = resolve_subject(session, opts.subject)
    start = parse_utc(meta["start_utc"])
    level = opts.compression_level
    experimenter = [subj.experimenter] if subj.experimenter else None

    nwbfile = NWBFile(
        session_description=_description(session, opts),
        identifier=identifier_for(session),
        session_start_time=start,
        timestamps_reference_time=start,
        session_id=f"{session.mouse}_{session.path.name}",
        experimenter=experimenter,
        lab=subj.lab,
        institution=subj.institution,
        experiment_description="Head-fixed lever-press task with two-photon imaging, recorded by rigd",
        notes=_qc_and_summary_notes(session),
        data_collection=session.session_toml_text,
        source_script=f"rigsession {__import__('rigsession').__version__} (pynwb {_pynwb.__version__})",
        source_script_file_name="rigsession/nwb.py",
    )
    subject_kwargs = dict(
        subject_id=subj.id,
        species=subj.species,
        sex=subj.sex,
        strain=subj.strain,
        genotype=subj.genotype,
        description=subj.description,
    )
    if subj.date_of_birth:
        dob = _parse_date(subj.date_of_birth, "date_of_birth")
        subject_kwargs["date_of_birth"] = dob
        if not subj.age:
            days = (start - dob).days
            if days >= 0:
                subj.age = f"P{days}D"
    if subj.age:
        subject_kwargs["age"] = subj.age
        subject_kwargs["age__reference"] = "birth"
    nwbfile.subject = Subject(**{k: v for k, v in subject_kwargs.items() if v is not None})

    behavior = nwbfile.create_processing_module(
        name="behavior", description="lever position and task events from rigd"
    )

    # Lever: data in mm (conversion to metres in the attribute), rig time.
    lever = session.stream("lever")
    end_s = float("nan")
    if lever:
        regular, t0, rate, n = lever_timing(lever)
        if n:
            path, offset, dtype, shape = [c for c in lever.layout() if c[3][0]][-1]
            end_s = float(next(read_rows(path, offset, dtype, shape, shape[0] - 1, shape[0]))[0, 0])
            cfg_counts = session.config.get("rig", {}).get("encoder_counts_per_mm")
            pos = _stream_data(lever, lambda b: b[:, 1], (n,), np.float64, level)
            timing = (
                dict(starting_time=t0, rate=rate)
                if regular
                else dict(timestamps=_stream_data(lever, lambda b: b[:, 0], (n,), np.float64, level))
            )
            position = TimeSeries(
                name="lever_position",
                description=(
                    "lever displacement from rest, zeroed at session start (lever.npy column 1, all chunks); "
                    "data in mm (conversion 0.001 to metres); rig clock"
                    + ("" if regular else "; timestamps because the samples have gaps")
                ),
                data=pos,
                unit="meters",
                conversion=1e-3,
                resolution=(1e-3 / float(cfg_counts)) if cfg_counts else -1.0,
                **timing,
            )
            counts = TimeSeries(
                name="lever_raw_counts",
                description="raw encoder count as sent by the device (lever.npy column 2)",
                data=_stream_data(lever, lambda b: b[:, 2], (n,), np.float64, level),
                unit="counts",
                timestamps=position if not regular else None,
                **({} if not regular else dict(starting_time=t0, rate=rate)),
            )
            behavior.add(position)
            behavior.add(counts)

    for table in _events_tables(session, level):
        nwbfile.add_events_table(table)

    _trials(nwbfile, session, end_s)

    # Imaging.
    ft = session.frames_table()
    im = session.config.get("imaging", {})
    if len(ft):
        _imaging(nwbfile, session, opts, ft, im, level)
    return nwbfile


def _imaging(nwbfile, session, opts, ft: Table, im: dict, level: int):
    from pynwb import TimeSeries
    from pynwb.ophys import (
        DfOverF,
        Fluorescence,
        ImageSegmentation,
        OpticalChannel,
        RoiResponseSeries,
        TwoPhotonSeries,
    )

    rate = float(im.get("frame_rate_hz", float("nan")))
    width, height = int(im.get("width", 0)), int(im.get("height", 0))
    channels = int(im.get("channels", 1))
    device = nwbfile.create_device(
        name="Microscope",
        description=f"two-photon microscope; frames through the shared-memory ring {im.get('shm_name', '?')}",
    )
    indicator = opts.indicator or PLACEHOLDER_INDICATOR
    location = opts.location or PLACEHOLDER_LOCATION
    exc = opts.excitation_nm if opts.excitation_nm is not None else PLACEHOLDER_EXCITATION_NM
    emi = opts.emission_nm if opts.emission_nm is not None else PLACEHOLDER_EMISSION_NM
    planes = []
    for c in range(channels):
        ch = OpticalChannel(
            name=f"OpticalChannel{c + 1}" if channels > 1 else "OpticalChannel",
            description=f"channel {c + 1} of {channels}",
            emission_lambda=float(emi),
        )
        planes.append(
            nwbfile.create_imaging_plane(
                name=f"ImagingPlane{c + 1}" if channels > 1 else "ImagingPlane",
                optical_channel=ch,
                description=f"imaging plane, {width} x {height} pixels, channel {c + 1}",
                device=device,
                excitation_lambda=float(exc),
                imaging_rate=rate,
                indicator=indicator,
                location=location,
            )
        )

    dropped = ft["dropped"].astype(bool)
    t_all = ft["t_s"].astype(np.float64)
    kept = np.flatnonzero(~dropped)
    # Rows with a time (rows of f/dff/motion that NWB can place on the clock),
    # in time order: frames.tsv is in arrival order, and a stamp can be
    # earlier than the one before it (see time_order).
    timed = time_order(t_all)
    kept_timed = time_order(t_all[kept])

    frames = session.stream("frames")
    if frames:
        shape = frames.shape()
        for c, plane in enumerate(planes):
            n = len(kept_timed)
            data = _stream_data(
                frames,
                (lambda b, c=c: b[:, c]),
                (n, shape[2], shape[3]),
                np.uint16,
                level,
                rows=kept_timed,
                chunk_rows=1,
            )
            nwbfile.add_acquisition(
                TwoPhotonSeries(
                    name=f"TwoPhotonSeries{c + 1}" if channels > 1 else "TwoPhotonSeries",
                    description=(
                        "raw frames (frames.npy, all chunks), channel %d, dimensions (frame, y, x) as "
                        "stored; frames without a time are left out" % (c + 1)
                    ),
                    imaging_plane=plane,
                    data=data,
                    unit="n.a.",
                    timestamps=_small(t_all[kept][kept_timed], level),
                )
            )
    elif opts.raw_imaging_files:
        nwbfile.add_acquisition(
            TwoPhotonSeries(
                name="TwoPhotonSeries",
                description="raw frames are in the acquisition program's own files (not stored by rigd)",
                imaging_plane=planes[0],
                external_file=list(opts.raw_imaging_files),
                starting_frame=[0] * len(opts.raw_imaging_files),
                format="external",
                unit="n.a.",
                timestamps=_small(t_all[kept][kept_timed], level),
            )
        )

    ophys = nwbfile.create_processing_module(
        name="ophys", description="online motion correction, ROIs, F and dF/F computed by rigd"
    )
    _summary_images(session, ophys)
    rois = session.rois()
    f = session.stream("f")
    dff = session.stream("dff")
    if len(rois) and (f or dff):
        seg = ImageSegmentation()
        ophys.add(seg)
        plane = seg.create_plane_segmentation(
            name="PlaneSegmentation",
            description=(
                "ROIs of rois.tsv, in the column order of f.npy/dff.npy"
                + ("" if session.roi_labels() is not None else
                   "; masks not recorded in the session folder (the label image of "
                   "[config.imaging].roi_labels is absent, or the daemon used its grid of tiles): "
                   "each ROI's pixel_mask holds only its centroid (x, y from rois.tsv) with weight 0")
            ),
            imaging_plane=planes[0],
        )
        masks = session.roi_masks()
        doc = {
            "roi": "label value of the ROI in the label image (rois.tsv roi)",
            "roi_type": "cell type (rois.tsv type)",
            "pixels": "ROI pixels (rois.tsv pixels)",
            "neuropil_pixels": "neuropil annulus pixels (rois.tsv neuropil_pixels)",
            "centroid_x": "centroid x, pixels (rois.tsv x)",
            "centroid_y": "centroid y, pixels (rois.tsv y)",
        }
        plane.add_column("roi", doc["roi"])
        plane.add_column("roi_type", doc["roi_type"])
        plane.add_column("pixels", doc["pixels"])
        plane.add_column("neuropil_pixels", doc["neuropil_pixels"])
        plane.add_column("centroid_x", doc["centroid_x"])
        plane.add_column("centroid_y", doc["centroid_y"])
        for i in range(len(rois)):
            if masks is not None:
                ys, xs = np.nonzero(masks[i])
                pm = [(int(x), int(y), 1.0) for x, y in zip(xs, ys)]
            else:
                pm = [(int(round(rois["x"][i])), int(round(rois["y"][i])), 0.0)]
            plane.add_roi(
                pixel_mask=pm,
                roi=int(rois["roi"][i]),
                roi_type=str(rois["type"][i]),
                pixels=int(rois["pixels"][i]),
                neuropil_pixels=int(rois["neuropil_pixels"][i]),
                centroid_x=float(rois["x"][i]),
                centroid_y=float(rois["y"][i]),
            )
        region = plane.create_roi_table_region(
            region=list(range(len(rois))), description="all ROIs, in f.npy/dff.npy column order"
        )
        n_rois = len(rois)
        times = _small(t_all[timed], level)
        first = None
        for name, stream, container_cls, unit, what in (
            ("RoiResponseSeries", f, Fluorescence, "a.u.", "neuropil-corrected ROI fluorescence F - r*Fneu (f.npy)"),
            ("RoiResponseSeries", dff, DfOverF, "n.a.", "online dF/F (dff.npy)"),
        ):
            if not stream:
                continue
            container = container_cls()
            ophys.add(container)
            series = container.create_roi_response_series(
                name=name,
                description=what + "; rows = frames.tsv rows that have a time (dropped frames, NaN, left out), in time order",
                data=_stream_data(stream, lambda b: b, (len(timed), n_rois), np.float32, level, rows=timed),
                rois=region,
                unit=unit,
                timestamps=times if first is None else first,
            )
            if first is None:
                first = series
    # Motion: dx, dy per frame of motion.tsv, on the frame's time.
    motion = session.motion()
    if len(motion):
        # motion.tsv 'frame' = frames.tsv 'frame' (the acquisition's frame number).
        mt = times_of_frames(ft["frame"], t_all, motion["frame"])
        ok = time_order(mt)
        shifts = np.column_stack([motion["dx_px"][ok], motion["dy_px"][ok]])
        ophys.add(
            TimeSeries(
                name="motion",
                description=(
                    "rigid shift against the reference (motion.tsv dx_px, dy_px; NaN while the reference "
                    "is built); columns peak and flagged in motion_peak / motion_flagged"
                ),
                data=_small(shifts, level),
                unit="pixels",
                timestamps=_small(mt[ok], level),
            )
        )
        ophys.add(
            TimeSeries(
                name="motion_peak",
                description="phase-correlation strength (motion.tsv peak, 1 = identical)",
                data=_small(motion["peak"][ok].astype(np.float64), level),
                unit="n.a.",
                timestamps=ophys["motion"],
            )
        )
        ophys.add(
            TimeSeries(
                name="motion_flagged",
                description="1: shift at the search limit or weak peak (motion.tsv flagged; NaN = empty)",
                data=_small(motion["flagged"][ok].astype(np.float64), level),
                unit="n.a.",
                timestamps=ophys["motion"],
            )
        )


def _summary_images(session: Session, ophys) -> None:
    """The session's mean image, the reference it registered against (the
    mouse's day-1 field of view, when it has one) and the field-of-view
    check's mean image, as ``ophys/SummaryImages``."""
    from pynwb.base import Images
    from pynwb.image import GrayscaleImage

    images = []
    mean = session.mean_image()
    if mean is not None:
        plane = mean.reshape(mean.shape[-2:]) if mean.ndim > 2 else mean
        images.append(GrayscaleImage(
            name="mean",
            data=plane.astype(np.float32),
            description="mean of the session's raw frames, first channel (mean_image.npy); (y, x) as stored",
        ))
    ref = session.reference_image()
    if ref is not None:
        src = session.imaging_reference
        origin = src.get("source", "?")
        if origin == "mouse":
            origin = f"the mouse's imaging reference, set {src.get('set_utc', '?')} from {src.get('from_session', '?')}"
        images.append(GrayscaleImage(
            name="reference",
            data=ref.astype(np.float32),
            description=f"motion-correction reference (reference_image.npy): {origin}; (y, x) as stored",
        ))
    fov = session.fov_check_mean()
    if fov is not None:
        c = session.fov_check
        what = ", ".join(f"{k} = {c[k]}" for k in ("verdict", "dx_px", "dy_px", "rotation_deg", "correlation") if k in c)
        images.append(GrayscaleImage(
            name="fov_check",
            data=fov.astype(np.float32),
            description=f"mean of the first frames, registered against the reference at the start (fov_check_mean.npy): {what}; (y, x) as stored",
        ))
    if images:
        ophys.add(Images(
            name="SummaryImages",
            images=images,
            description="the session's mean image, its motion-correction reference and the field-of-view check",
        ))


def export(session_dir, out_path=None, opts: Optional[ExportOptions] = None) -> Path:
    """Export one session folder; returns the NWB file's path."""
    from pynwb import NWBHDF5IO

    session = Session(session_dir)
    opts = opts or ExportOptions()
    out = Path(out_path) if out_path else session.path.with_suffix(".nwb")
    if out.is_dir():
        out = out / default_name(session)
    nwbfile = build_nwbfile(session, opts)
    tmp = out.with_name(out.stem + ".partial.nwb")
    with NWBHDF5IO(str(tmp), mode="w") as io:
        io.write(nwbfile)
    tmp.replace(out)
    return out


def default_name(session: Session) -> str:
    """DANDI-style file name: sub-<mouse>_ses-<folder>_behavior+ophys.nwb."""
    clean = lambda s: re.sub(r"[^A-Za-z0-9]", "", s) or "x"
    return f"sub-{clean(session.mouse)}_ses-{clean(session.path.name)}_behavior+ophys.nwb"
