"""Check an NWB export against its session folder, value by value, and run
nwbinspector with the DANDI configuration.

    python check_nwb.py SESSION_DIR FILE.nwb

Exits non-zero with the first difference, or with the inspector's CRITICAL /
BEST_PRACTICE_VIOLATION messages. Run by tests/tests/nwb.rs.
"""

import sys

import numpy as np
from pynwb import NWBHDF5IO

from rigsession import load_session
from rigsession.nwb import join_detail, time_order


def same(a, b, what):
    """Exact equality, NaN equal to NaN, for numbers; equality for text."""
    a = np.asarray(a)
    b = np.asarray(b)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    if a.dtype.kind in "OUS" or b.dtype.kind in "OUS":
        la, lb = [str(x) for x in a.ravel()], [str(x) for x in b.ravel()]
        bad = [i for i, (x, y) in enumerate(zip(la, lb)) if x != y]
        assert not bad, f"{what}: row {bad[0]}: {la[bad[0]]!r} != {lb[bad[0]]!r}"
        return
    fa, fb = a.astype(np.float64), b.astype(np.float64)
    ok = (fa == fb) | (np.isnan(fa) & np.isnan(fb))
    if not ok.all():
        i = np.flatnonzero(~ok.ravel())[0]
        raise AssertionError(f"{what}: element {i}: {fa.ravel()[i]!r} != {fb.ravel()[i]!r} ({(~ok).sum()} differ)")


def main(session_dir, nwb_path):
    s = load_session(session_dir)
    checked = []
    with NWBHDF5IO(nwb_path, mode="r") as io:
        nwb = io.read()
        assert nwb.session_start_time.tzinfo is not None, "start time without a time zone"
        assert nwb.session_start_time.utcoffset().total_seconds() == 0
        assert nwb.subject is not None and nwb.subject.subject_id and nwb.subject.species and nwb.subject.sex

        # Trials: every column of trials.tsv.
        trials = s.trials()
        if len(trials):
            t = nwb.trials
            assert t is not None, "no trials table"
            for name, col in trials.items():
                same(t[name].data[:], col, f"trials.{name}")
            same(t["start_time"].data[:], trials["t_start_s"], "trials.start_time")
            checked.append(f"trials {len(trials)} rows x {len(trials.columns)} columns")
        else:
            assert nwb.trials is None or len(nwb.trials) == 0

        # Lever: position, raw counts, and the time of every sample.
        lever = s.lever()
        beh = nwb.processing["behavior"]
        pos = beh["lever_position"]
        same(pos.data[:], lever[:, 1], "lever position (mm)")
        same(beh["lever_raw_counts"].data[:], lever[:, 2], "lever raw counts")
        assert pos.conversion == 1e-3 and pos.unit == "meters"
        if pos.timestamps is not None:
            same(pos.timestamps[:], lever[:, 0], "lever timestamps")
            how = "timestamps"
        else:
            step_us = round(1e6 / pos.rate)
            assert abs(1e6 / step_us - pos.rate) < 1e-9
            t0_us = round(pos.starting_time * 1e6)
            assert t0_us / 1e6 == pos.starting_time
            rebuilt = (t0_us + step_us * np.arange(lever.shape[0], dtype=np.int64)) / 1e6
            same(rebuilt, lever[:, 0], "lever time from starting_time and rate")
            how = f"starting_time + rate {pos.rate} Hz"
        checked.append(f"lever {lever.shape[0]} samples ({how})")

        # Events, one table per source.
        ev = s.events()
        n_ev = 0
        for src in dict.fromkeys(ev["source"].tolist()):
            sel = ev["source"] == src
            table = nwb.events[f"events_{src}"]
            same(table["timestamp"].data[:], ev["t_s"][sel], f"events {src} t_s")
            same(table["kind"].data[:], ev["kind"][sel], f"events {src} kind")
            same(table["value"].data[:], ev["value"][sel], f"events {src} value")
            fields = table["detail_fields"].data[:] if "detail_fields" in table.colnames else [""] * len(table)
            joined = [join_detail(d, f) for d, f in zip(table["detail"].data[:], fields)]
            same(np.array(joined, dtype=object), ev["detail"][sel], f"events {src} detail")
            n_ev += int(sel.sum())
        assert n_ev == len(ev)
        checked.append(f"events {n_ev}")

        # Imaging: raw frames and their stamps, F, dF/F, motion.
        ft = s.frames_table()
        if len(ft):
            t_all = ft["t_s"]
            kept = ft["dropped"] == 0
            timed = time_order(t_all)
            order_moved = int(np.sum(timed != np.flatnonzero(np.isfinite(t_all))))
            checked.append(f"frame rows moved into time order {order_moved}")
            frames = s.stream("frames")
            if frames:
                raw = frames.load()
                sel = time_order(t_all[kept])
                tps = nwb.acquisition["TwoPhotonSeries"]
                same(tps.timestamps[:], t_all[kept][sel], "frame stamps")
                data = tps.data
                assert data.shape == (len(sel),) + raw.shape[2:], (data.shape, raw.shape)
                assert data.dtype == np.uint16
                assert np.array_equal(data[:], raw[sel, 0]), "raw frames differ"
                checked.append(f"frames {data.shape[0]} of {raw.shape[0]} stored ({len(ft)} rows)")
            ophys = nwb.processing["ophys"]
            for name, arr, container in (("f", s.f(), "Fluorescence"), ("dff", s.dff(), "DfOverF")):
                series = ophys[container]["RoiResponseSeries"]
                got = series.data[:]
                assert got.dtype == np.float32, got.dtype
                assert np.array_equal(got.view(np.uint32), arr[timed].view(np.uint32)), f"{name} differs bit for bit"
                same(series.timestamps[:], t_all[timed], f"{name} stamps")
                checked.append(f"{name} {got.shape}")
            rois = s.rois()
            ps = ophys["ImageSegmentation"]["PlaneSegmentation"]
            same(ps["roi"].data[:], rois["roi"], "rois.roi")
            same(ps["roi_type"].data[:], rois["type"], "rois.type")
            same(ps["centroid_x"].data[:], rois["x"], "rois.x")
            masks = s.roi_masks()
            if masks is not None:
                for i in range(len(rois)):
                    m = np.zeros(masks.shape[1:], bool)
                    for x, y, w in ps["pixel_mask"][i]:
                        m[int(y), int(x)] = True
                    assert np.array_equal(m, masks[i]), f"mask of ROI {rois['roi'][i]}"
                checked.append(f"masks {masks.shape}")
            motion = s.motion()
            if len(motion):
                mo = ophys["motion"]
                t_by_frame = {int(fr): t for fr, t in zip(ft["frame"], t_all)}
                mt = np.array([t_by_frame.get(int(fr), np.nan) for fr in motion["frame"]])
                ok = time_order(mt)
                same(mo.timestamps[:], mt[ok], "motion stamps")
                same(mo.data[:, 0], motion["dx_px"][ok], "motion dx")
                same(mo.data[:, 1], motion["dy_px"][ok], "motion dy")
                same(ophys["motion_flagged"].data[:], motion["flagged"][ok], "motion flagged")
                checked.append(f"motion {len(ok)} of {len(motion)}")

        # Kept verbatim: session.toml (config snapshot) and summary/qc.
        assert nwb.data_collection == s.session_toml_text, "session.toml not kept verbatim"
        import json

        notes = json.loads(nwb.notes)
        if s.summary is not None:
            want = {k: v for k, v in s.summary.items() if k != "qc"}
            assert notes["summary"] == want, "summary.json not kept"
            if "qc" in s.summary:
                assert notes["qc"] == s.summary["qc"]

    # nwbinspector with the DANDI configuration.
    from nwbinspector import Importance, inspect_nwbfile, load_config

    messages = list(inspect_nwbfile(nwbfile_path=nwb_path, config=load_config("dandi")))
    for m in messages:
        print(f"inspector: {m.importance.name}: {m.check_function_name}: {m.object_type} {m.location}: {m.message}")
    bad = [m for m in messages if m.importance in (Importance.CRITICAL, Importance.BEST_PRACTICE_VIOLATION, Importance.ERROR)]
    assert not bad, f"nwbinspector (dandi): {len(bad)} CRITICAL/ERROR/BEST_PRACTICE_VIOLATION messages (above)"
    print(f"OK {nwb_path}: " + "; ".join(checked) + f"; nwbinspector dandi: {len(messages)} messages, none critical")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
