"""Compare rigd's online dF/F and motion shifts with the simulated microscope's
ground truth. Usage: check_analysis.py SESSION_DIR TRUTH_DIR SKIP_S
Prints one JSON object: median per-ROI Pearson r of dF/F (after SKIP_S seconds),
and the motion error (p95 and max, px, after removing the reference offset)."""
import json
import sys

import numpy as np


def tsv(path):
    rows = [l.rstrip("\n").split("\t") for l in open(path) if not l.startswith("#")]
    head = rows[0]
    return [dict(zip(head, r)) for r in rows[1:]]


session, truth_dir, skip_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
frames = tsv(session + "/frames.tsv")
rois = tsv(session + "/rois.tsv")
dff = np.load(session + "/dff.npy")
motion = tsv(session + "/motion.tsv")
truth_rows = tsv(truth_dir + "/frames_truth.tsv")
dff_truth = np.load(truth_dir + "/dff_truth.npy")
assert dff.shape[0] == len(frames) == len(motion), (dff.shape, len(frames), len(motion))

by_number = {int(r["frame_number"]): r for r in truth_rows}
t0 = None
ours, theirs, shifts = [], [], []
for i, f in enumerate(frames):
    if f["dropped"] == "1" or f["t_s"] == "":
        continue
    t = float(f["t_s"])
    t0 = t if t0 is None else t0
    tr = by_number.get(int(f["frame"]))
    if tr is None:
        continue
    m = motion[i]
    if m["dx_px"] != "":
        shifts.append((float(m["dx_px"]), float(m["dy_px"]),
                       float(tr["shift_x_px"]), float(tr["shift_y_px"])))
    if t - t0 < skip_s:
        continue
    ours.append(dff[i])
    theirs.append(dff_truth[int(tr["frame"])])
ours, theirs = np.array(ours), np.array(theirs)
rs = []
for c, roi in enumerate(rois):
    k = int(roi["roi"]) - 1  # label k is neuron k, 1-based; truth columns are 0-based
    a, b = ours[:, c], theirs[:, k]
    if np.std(a) > 0 and np.std(b) > 0:
        rs.append(float(np.corrcoef(a, b)[0, 1]))
s = np.array(shifts)
# The reference is the mean of the first frames, itself displaced: remove the
# constant offset between measured and true shifts, then compare.
ex = s[:, 0] - s[:, 2]
ey = s[:, 1] - s[:, 3]
err = np.hypot(ex - np.median(ex), ey - np.median(ey))
print(json.dumps({
    "rois": len(rois), "frames_compared": int(ours.shape[0]),
    "median_r": float(np.median(rs)), "min_r": float(np.min(rs)),
    "shift_frames": int(len(err)), "shift_err_p95": float(np.percentile(err, 95)),
    "shift_err_max": float(np.max(err)),
    "true_shift_range": float(np.ptp(s[:, 2]) + np.ptp(s[:, 3])),
}))
