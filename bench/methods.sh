#!/usr/bin/env bash
# One whole search step of each method (its architecture step, the weight step, the amortised
# spectral-norm refresh) side by side in one process at the same configuration, in each space, with
# the peak memory of one step (fresh processes). Results go in BENCHMARKS.md and bench/results/methods/.
#   bash bench/methods.sh [LAYERS CHANNELS BATCH STEPS]     # default: 5 16 32 4 (CIFAR-10 images, 32x32)
set -euo pipefail
L=${1:-5}; C=${2:-16}; B=${3:-32}; S=${4:-4}
for space in msr darts; do
  methods=msr,darts,pc-darts,p-darts
  if [ "$space" = darts ]; then methods=darts,pc-darts,p-darts; fi   # MSR-DARTS ranks convs: its space is the 4 conv ops
  echo "# msrdarts bench search-step --method $methods --space $space --layers $L --channels $C --batch-size $B --input-size 32 --steps $S --warmup 1 --json"
  msrdarts bench search-step --method $methods --space $space --layers "$L" --channels "$C" --batch-size "$B" \
    --input-size 32 --steps "$S" --warmup 1 --json
done
