#!/usr/bin/env bash
# The overnight soak: rigd against the virtual rig and its simulated
# microscope at high speed for 12 h of device time (about 12 minutes at 60x),
# with link faults injected every 30 device-minutes, then every trial, reward,
# lever sample and frame accounted for and rigd's memory, file descriptors and
# threads checked. Extra arguments go to the bench, e.g.
#   scripts/soak.sh --hours 24 --speed 60 --fault-every-min 15 --frame-px 32
# Needs a python3 with numpy (RIG_PYTHON), like the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench -p rig-tests --bench soak -- "$@"
