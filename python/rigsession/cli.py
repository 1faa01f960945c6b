"""The ``rigsession`` command: ``export-nwb SESSION_DIR [-o FILE]``,
``export-nwb --mouse MOUSE_DIR [-o OUTDIR]`` and
``suite2p-labels PLANE_DIR -o OUT``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .session import Session, load_mouse

NWB_INSTALL = "pip install './python[nwb]'  (from the rigd checkout)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rigsession", description="rigd session folders: export to NWB")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser(
        "export-nwb",
        help="export a session folder (or every session of a mouse) to NWB",
        description=(
            "Export a rigd session folder to an NWB file. Subject fields come from the mouse "
            "record <mouse folder>/subject.toml; options given here override it."
        ),
    )
    e.add_argument("session_dir", nargs="?", help="a session folder <data_root>/<mouse>/<date>_<time>")
    e.add_argument("--mouse", metavar="MOUSE_DIR", help="export every session folder of this mouse folder")
    e.add_argument("-o", "--output", help="output file (one session) or folder (--mouse); default: beside the session folder(s)")
    e.add_argument("--overwrite", action="store_true", help="replace existing NWB files (--mouse skips them otherwise)")
    g = e.add_argument_group("subject (when the mouse record lacks them)")
    g.add_argument("--subject-id")
    g.add_argument("--species", help="e.g. 'Mus musculus'")
    g.add_argument("--sex", choices=["M", "F", "U", "O"])
    g.add_argument("--date-of-birth", help="YYYY-MM-DD")
    g.add_argument("--age", help="ISO 8601 duration at the session, e.g. P90D")
    g.add_argument("--strain")
    g.add_argument("--genotype")
    g.add_argument("--experimenter", help="'Last, First'")
    g.add_argument("--lab")
    g.add_argument("--institution")
    m = e.add_argument_group("imaging metadata the rig configuration does not record (placeholders otherwise)")
    m.add_argument("--indicator", help="e.g. GCaMP6f (default 'unknown')")
    m.add_argument("--location", help="brain area, e.g. 'M1, caudal forelimb area' (default 'unknown')")
    m.add_argument("--excitation-nm", type=float, help="excitation wavelength, nm (default NaN)")
    m.add_argument("--emission-nm", type=float, help="emission wavelength, nm (default NaN)")
    m.add_argument("--raw-imaging-file", action="append", default=[], help="the acquisition's own raw file(s), referenced when rigd stored no frames")
    e.add_argument("--description", help="session description (default: made from session.toml)")
    s = sub.add_parser(
        "suite2p-labels",
        help="convert suite2p's ROIs (stat.npy, iscell.npy) into rigd's label image",
        description=(
            "Write OUT.npy (uint32 label image for [imaging].roi_labels), OUT.tsv (for "
            "[imaging].roi_table: the suite2p index of each ROI) and, with ops.npy, OUT_mean.npy "
            "(suite2p's mean image, float32, for [imaging].reference_image)."
        ),
    )
    s.add_argument("plane_dir", help="suite2p's plane folder, e.g. .../suite2p/plane0")
    s.add_argument("-o", "--output", required=True, help="output stem, e.g. /data/M12/rois (writes rois.npy, rois.tsv)")
    s.add_argument("--all", action="store_true", help="keep every ROI, not only those suite2p classified as cells")
    s.add_argument("--min-probability", type=float, help="keep ROIs with at least this cell probability")
    return p


def _suite2p(a) -> int:
    from .suite2p import Suite2pError, convert, write

    try:
        conv = convert(a.plane_dir, keep_all=a.all, min_probability=a.min_probability)
        paths = write(conv, a.output)
    except Suite2pError as err:
        print(f"rigsession suite2p-labels: {err}", file=sys.stderr)
        return 1
    ly, lx = conv.labels.shape
    print(
        f"{len(conv.kept)} ROIs in a {lx} x {ly} label image; skipped: {conv.skipped_not_cell} not cells, "
        f"{conv.skipped_probability} below the probability, {conv.skipped_empty} empty; "
        f"{conv.overlap_pixels} overlapping pixels left out"
    )
    for p in paths:
        print(f"  {p}")
    return 0


def _options(a):
    from .nwb import ExportOptions, SubjectInfo

    subject = SubjectInfo(
        id=a.subject_id,
        species=a.species,
        sex=a.sex,
        date_of_birth=a.date_of_birth,
        age=a.age,
        strain=a.strain,
        genotype=a.genotype,
        experimenter=a.experimenter,
        lab=a.lab,
        institution=a.institution,
    )
    return ExportOptions(
        subject=subject,
        indicator=a.indicator,
        location=a.location,
        excitation_nm=a.excitation_nm,
        emission_nm=a.emission_nm,
        raw_imaging_files=a.raw_imaging_file,
        session_description=a.description,
    )


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    if a.command == "suite2p-labels":
        return _suite2p(a)
    try:
        import pynwb  # noqa: F401
    except ImportError:
        print(f"rigsession export-nwb needs pynwb: {NWB_INSTALL}", file=sys.stderr)
        return 2
    from .nwb import ExportError, default_name, export

    opts = _options(a)
    placeholders = [o for o, v in (("--indicator", a.indicator), ("--location", a.location),
                                   ("--excitation-nm", a.excitation_nm), ("--emission-nm", a.emission_nm)) if v is None]
    if placeholders:
        print(
            f"rigsession export-nwb: no {', '.join(placeholders)}: the imaging plane gets placeholders "
            "(unknown / NaN; docs/python.md); without --location nwbinspector reports a BEST_PRACTICE_VIOLATION",
            file=sys.stderr,
        )
    if bool(a.mouse) == bool(a.session_dir):
        print("rigsession export-nwb: give either SESSION_DIR or --mouse MOUSE_DIR", file=sys.stderr)
        return 2
    try:
        if a.session_dir:
            out = a.output
            if out is None:
                s = Session(a.session_dir)
                out = s.path.parent / default_name(s)
            if Path(out).exists() and not Path(out).is_dir() and not a.overwrite:
                print(f"{out} exists; --overwrite to replace it", file=sys.stderr)
                return 1
            t = time.monotonic()
            path = export(a.session_dir, out, opts)
            print(f"{path}  ({time.monotonic() - t:.1f} s)")
            return 0
        sessions = load_mouse(a.mouse)
        outdir = Path(a.output) if a.output else Path(a.mouse)
        outdir.mkdir(parents=True, exist_ok=True)
        failed = 0
        for i, s in enumerate(sessions, 1):
            out = outdir / default_name(s)
            prefix = f"[{i}/{len(sessions)}] {s.path.name}"
            if out.exists() and not a.overwrite:
                print(f"{prefix}: {out.name} exists, skipped", flush=True)
                continue
            t = time.monotonic()
            try:
                export(s.path, out, opts)
                print(f"{prefix}: {out}  ({time.monotonic() - t:.1f} s)", flush=True)
            except ExportError as err:
                failed += 1
                print(f"{prefix}: FAILED: {err}", file=sys.stderr, flush=True)
        print(f"{len(sessions) - failed} of {len(sessions)} sessions exported to {outdir}")
        return 1 if failed else 0
    except (ExportError, FileNotFoundError) as err:
        print(f"rigsession export-nwb: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
