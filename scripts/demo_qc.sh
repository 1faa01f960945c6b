#!/usr/bin/env bash
# Run `rigd demo` N times with different seeds (speed 10, 1 minute each) and
# add up the frame-stamp checks of each session's qc record (summary.json):
# ttl rows on / not on a recorded frame-clock edge, stamps not increasing.
# Usage: scripts/demo_qc.sh [N] [speed]   (uses $RIGD, else the debug rigd of
# $CARGO_TARGET_DIR or ./target: build it first)
set -euo pipefail
n=${1:-20}
speed=${2:-10}
target=${CARGO_TARGET_DIR:-target}
rigd=${RIGD:-$target/debug/rigd}
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
for i in $(seq 1 "$n"); do
    seed=$((7919 * i))
    "$rigd" demo --speed "$speed" --minutes 1 --seed "$seed" --mouse "QC$i" --data "$data" >/dev/null 2>&1 \
        || echo "run $i (seed $seed) failed" >&2
done
python3 - "$data" <<'PY'
import json, sys, glob
tot = dict(sessions=0, ttl_on=0, ttl_off=0, ttl_before=0, not_increasing=0, mapped=0, dropped=0, rows=0)
for f in sorted(glob.glob(sys.argv[1] + "/*/*/summary.json")):
    fr = json.load(open(f)).get("qc", {}).get("frames")
    if not fr:
        continue
    tot["sessions"] += 1
    tot["ttl_on"] += fr["ttl_on_an_edge"]
    tot["ttl_off"] += fr["ttl_not_on_an_edge"]
    tot["ttl_before"] += fr["ttl_unverifiable"]
    tot["not_increasing"] += fr["stamps_not_increasing"]
    tot["mapped"] += fr["by_source"].get("mapped", 0)
    tot["dropped"] += fr["dropped"]
    tot["rows"] += fr["rows"]
print(json.dumps(tot))
PY
