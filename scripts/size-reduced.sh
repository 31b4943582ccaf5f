#!/usr/bin/env bash
# Sizes the reduced comparison recipes before CPU hours go into them (issue 16): trains 8 random
# genotypes of the 4-op MSR space (seed 0) and one of them with 3 more seeds, all with the same
# budget, then compares the spread of test errors across genotypes with the seed-to-seed spread
# (scripts/spread.py). A budget can rank methods only where the first is clearly larger.
#   bash scripts/size-reduced.sh DATA.npz OUT EPOCHS LAYERS CHANNELS
# e.g. bash scripts/size-reduced.sh ../shared/data/cifar10-mini.npz runs/size-e8 8 5 8
# Results: OUT/spread.json (and bench/results/size-reduced-*.json when recorded).
set -euo pipefail
NPZ=${1:?usage: bash scripts/size-reduced.sh DATA.npz OUT EPOCHS LAYERS CHANNELS}
OUT=${2:?OUT}; EPOCHS=${3:?EPOCHS}; LAYERS=${4:?LAYERS}; CHANNELS=${5:?CHANNELS}
COMMON=(--dataset npz --data "$NPZ" --device cpu --no-progress --no-plots --no-tensorboard
        --preset cifar10 --layers "$LAYERS" --channels "$CHANNELS" --batch-size 64 --epochs "$EPOCHS" --drop-path 0)
mkdir -p "$OUT"
[ -d "$OUT/random" ] || msrdarts sample --space msr --n 8 --seed 0 --out "$OUT/random" --layers "$LAYERS" --channels "$CHANNELS"
# 11 trainings, JOBS at a time (default 2, one thread each: tiny networks use cores better side by side)
export OMP_NUM_THREADS=1
one() {   # genotype seed out
  [ -f "$3/results.json" ] || msrdarts train "${COMMON[@]}" --genotype "$1" --seed "$2" --out "$3" > "$3.log" 2>&1
}
for job in $(seq 0 10); do
  if [ "$job" -lt 8 ]; then one "$OUT/random/sample-0$job/genotype.json" 0 "$OUT/g$job" &
  else one "$OUT/random/sample-00/genotype.json" $((job - 7)) "$OUT/s$((job - 7))" &
  fi
  while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-2}" ]; do wait -n || true; done
done
wait
python "$(dirname "$0")/spread.py" --genotypes "$OUT"/g? --seeds "$OUT/g0" "$OUT"/s? --json "$OUT/spread.json"
