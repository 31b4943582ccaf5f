#!/usr/bin/env bash
# Spectral norms during a real quick search, against the dense operator (bench/sn_accuracy.py), with the
# default refresh schedule and with --sn-refresh-drift 0.04; then the wall time of the whole quick search
# (8 epochs) with each, run one after the other. Raw output: bench/results/sn-accuracy.txt (bench/run_all.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/sn_accuracy.py --epochs 2
python bench/sn_accuracy.py --epochs 2 --sn-refresh-drift 0.04
for drift in 0 0.04; do
  rm -rf runs/bench-sn-quick
  /usr/bin/time -f "quick search, --sn-refresh-drift $drift: %e s wall" msrdarts search --preset quick \
    --out runs/bench-sn-quick --no-progress --device cpu --sn-refresh-drift "$drift" 2>&1 | tail -2
done
rm -rf runs/bench-sn-quick
