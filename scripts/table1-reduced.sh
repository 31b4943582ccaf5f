#!/usr/bin/env bash
# The paper's Table 1 comparison, reduced to finish in well under an hour on a laptop CPU:
# MSR-DARTS, DARTS (first order) and random genotypes, 3 seeds each, searched and trained in the
# same pipeline on a 5,000-image CIFAR-10 subset held in one .npz file, then one table.
#   bash scripts/table1-reduced.sh DATA.npz [OUT]
# DATA.npz: uint8 x_train (N, 32, 32, 3), y_train, x_test, y_test (see --dataset npz in the README);
# python scripts/cifar10_subset.py data cifar10-5k.npz --download makes one (500 + 100 images per class).
# Tiny networks and budgets: this checks the pipeline and the bookkeeping, not the paper's claim.
set -euo pipefail
NPZ=${1:?usage: bash scripts/table1-reduced.sh DATA.npz [OUT]}
OUT=${2:-runs/table1-reduced}
DATA=(--dataset npz --data "$NPZ" --device cpu --no-progress)
SEARCH=(--layers 3 --channels 4 --batch-size 64 --epochs 5 --subset 0.2)
TRAIN=(--preset cifar10 --layers 4 --channels 8 --batch-size 64 --epochs 3 --drop-path 0)
mkdir -p "$OUT"
for seed in 0 1 2; do
  msrdarts search "${DATA[@]}" "${SEARCH[@]}" --subset-valid 0.1 --bn-recalibration 4 --seed $seed \
    --out "$OUT/search-msr-$seed"
  msrdarts search --preset darts-cifar10 "${DATA[@]}" "${SEARCH[@]}" --subset-valid 0.2 --order 1 --seed $seed \
    --out "$OUT/search-darts-$seed"
done
msrdarts sample --space msr --n 3 --seed 0 --out "$OUT/random"
for seed in 0 1 2; do
  for g in "search-msr-$seed" "search-darts-$seed" "random/sample-0$seed"; do
    msrdarts train "${DATA[@]}" "${TRAIN[@]}" --genotype "$OUT/$g/genotype.json" --seed $seed \
      --out "$OUT/train-${g//\//-}"
  done
done
msrdarts compare "$OUT"/train-* --out "$OUT/table.md" --csv "$OUT/table.csv"
