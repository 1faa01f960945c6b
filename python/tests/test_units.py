"""Unit checks of rigsession's pure parts (no session needed). Plain asserts,
run by tests/tests/nwb.rs as `python test_units.py`; prints OK at the end."""

import tempfile
from pathlib import Path

import numpy as np

from rigsession.session import read_tsv, unescape, load_mouse, TRIALS_COLUMNS
from rigsession.nwb import ExportError, SubjectInfo, join_detail, lever_timing, resolve_subject, split_detail
from rigsession import Session
from rigsession.session import Stream


def test_unescape():
    assert unescape(r"a\tb\\c\nd\"e\rf") == 'a\tb\\c\nd"e\rf'
    assert unescape("plain") == "plain"
    assert unescape(r"\\t") == "\\t"  # an escaped backslash, then t


def test_detail_split_is_reversible():
    cases = [
        "",
        "plain text",
        "Tone(Tone { frequency_hz: 6000, duration_ms: 1000 })",
        "A { x: B { y: 1 } } tail",
        "{} no colon",
        "weird } { a: 1",
        "x { a: 1 } y { b: 2 }",
    ]
    for c in cases:
        d, f = split_detail(c)
        assert join_detail(d, f) == c, (c, d, f)
        if f:
            # What nwbinspector looks for: '{', then ':' inside, then '}'.
            import re

            assert not re.search(r"{.+:.+}", d), d


def test_tsv_types_and_empty_cells():
    with tempfile.TemporaryDirectory() as t:
        p = Path(t) / "trials.tsv"
        p.write_text(
            "trial\tt_start_s\tt_cue_s\tt_response_s\toutcome\tt_reward_s\treward_ul\tvalve_open_us\tlever_mm_at_cue\titi_presses\tcapped\textra\n"
            "1\t4.348000\t4.367023\t4.722000\trewarded\t4.759652\t4\t38182\t0\t1\t0\tx\n"
            "2\t10.544000\t10.557382\t\tmiss\t\t0\t0\t-0.25\t0\t0\ty\n"
            "3\t11.0\t11.5\tNaN\taborted\tInf\t0\t0\t-Inf\t0\t1\t"  # a half-written last line
        )
        t = read_tsv(p, TRIALS_COLUMNS)
        assert len(t) == 2, len(t)
        assert t["trial"].dtype == np.int64 and list(t["trial"]) == [1, 2]
        assert t["t_cue_s"][1] == 10.557382
        assert np.isnan(t["t_response_s"][1]) and np.isnan(t["t_reward_s"][1])
        assert list(t["outcome"]) == ["rewarded", "miss"]
        assert list(t["extra"]) == ["x", "y"]  # unknown columns are kept
        try:
            import pandas  # optional
        except ImportError:
            return
        df = t.to_pandas()
        assert list(df.columns) == list(t.columns) and len(df) == 2
        assert df["t_cue_s"].iloc[1] == 10.557382 and df["outcome"].iloc[0] == "rewarded"


def _npy(path, arr):
    np.save(path, arr)
    return path


def test_lever_timing_regular_and_gaps():
    with tempfile.TemporaryDirectory() as t:
        d = Path(t)
        us = np.arange(0, 5000, 1000, dtype=np.int64)
        a = _npy(d / "a.npy", np.column_stack([us / 1e6, us * 0.0, us * 0.0]))
        us2 = np.arange(5000, 9000, 1000, dtype=np.int64)
        b = _npy(d / "b.npy", np.column_stack([us2 / 1e6, us2 * 0.0, us2 * 0.0]))
        regular, t0, rate, n = lever_timing(Stream("lever", [a, b]))
        assert regular and t0 == 0.0 and rate == 1000.0 and n == 9, (regular, t0, rate, n)
        us3 = np.array([10000, 11000, 13000], dtype=np.int64)  # a gap across chunks and inside
        c = _npy(d / "c.npy", np.column_stack([us3 / 1e6, us3 * 0.0, us3 * 0.0]))
        regular, _, rate, n = lever_timing(Stream("lever", [a, b, c]))
        assert not regular and rate is None and n == 12


def test_times_of_frames_takes_the_last_row_of_a_number():
    from rigsession.nwb import times_of_frames, time_order

    frames = np.array([5, 6, 7, 1, 2])  # the producer restarted after 7
    t = np.array([0.1, 0.2, np.nan, 0.4, 0.5])
    got = times_of_frames(frames, t, np.array([6, 7, 1, 9, 5]))
    assert np.array_equal(got, [0.2, np.nan, 0.4, np.nan, 0.1], equal_nan=True), got
    frames = np.array([1, 2, 1])
    assert times_of_frames(frames, np.array([1.0, 2.0, 3.0]), np.array([1]))[0] == 3.0
    assert list(time_order(np.array([0.3, np.nan, 0.1, 0.3, 0.2]))) == [2, 4, 0, 3]


def test_subject_needs_dandi_fields():
    with tempfile.TemporaryDirectory() as t:
        d = Path(t) / "M1" / "2026-12-01_090000"
        d.mkdir(parents=True)
        (d / "session.toml").write_text('format_version = 1\nstate = "complete"\nmouse = "M1"\nstart_utc = "2026-12-01T09:00:00.000000Z"\n')
        s = Session(d)
        try:
            resolve_subject(s, SubjectInfo())
            raise AssertionError("no subject fields: must refuse")
        except ExportError as e:
            msg = str(e)
            for want in ("species", "sex", "date_of_birth or age", "subject.toml", "--species"):
                assert want in msg, (want, msg)
        got = resolve_subject(s, SubjectInfo(species="Mus musculus", sex="F", age="P90D"))
        assert got.id == "M1" and got.age == "P90D"
        (d.parent / "subject.toml").write_text('id = "M1"\nspecies = "Mus musculus"\nsex = "X"\ndate_of_birth = 2026-09-01\n')
        try:
            resolve_subject(s, SubjectInfo())
            raise AssertionError("sex X: must refuse")
        except ExportError as e:
            assert "M, F, U, O" in str(e)
        got = resolve_subject(s, SubjectInfo(sex="M"))  # the option wins over the record
        assert got.sex == "M" and got.date_of_birth == "2026-09-01"
        assert [x.path.name for x in load_mouse(d.parent)] == ["2026-12-01_090000"]


if __name__ == "__main__":
    n = 0
    for name, fn in sorted(globals().items()):
        if name.startswith("test_") and callable(fn):
            fn()
            n += 1
    print(f"OK {n} unit checks")
