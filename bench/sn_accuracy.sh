#!/usr/bin/env bash
# Spectral norms during a real quick search, against the dense operator (bench/sn_accuracy.py), with the
# default refreshes (drift-triggered), over the whole quick search (8 epochs); then its wall time.
# Raw output: bench/results/sn-accuracy.txt (bench/run_all.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/sn_accuracy.py --epochs 8 --every 2
rm -rf runs/bench-sn-quick
/usr/bin/time -f "quick search: %e s wall" msrdarts search --preset quick \
  --out runs/bench-sn-quick --no-progress --device cpu 2>&1 | tail -2
rm -rf runs/bench-sn-quick
