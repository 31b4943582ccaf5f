#!/usr/bin/env bash
# The paper's Table 2 search methods at their published budgets on GPUs, side by side in one pipeline
# (SPEC sections 5, 10): the same data, splits, supernet code, evaluation recipe and bookkeeping.
#   msr-darts          MSR-DARTS, mean genotype (cifar10 preset), and per-cell (msr-darts-cells, L = 8)
#   darts-1st          DARTS, first order (darts-cifar10 --order 1)
#   pc-darts           PC-DARTS (pc-darts-cifar10)
#   p-darts            P-DARTS (p-darts-cifar10: stages of 5, 11, 17 cells)
#   random             8 genotypes of the 4-op space, unconstrained
# 3 search seeds each; every mean genotype trained with the DARTS protocol (L = 20, C = 36, 600 epochs).
#   bash scripts/table2.sh [OUT] [DATA]      # DATA: CIFAR-10 folder (downloaded there if missing)
# Cost, roughly: searches 3 x (0.3 + 1.0 + 0.1 + 0.3) GPU-days; trainings ~26 x 1-1.5 GPU-days.
# Prefix any command with torchrun --nproc_per_node=N to use N GPUs (--batch-size is global).
set -euo pipefail
OUT=${1:-runs/table2}
DATA=(--dataset cifar10 --data "${2:-data}" --download)
mkdir -p "$OUT"
for seed in 0 1 2; do
  msrdarts search --preset cifar10 "${DATA[@]}" --seed $seed --out "$OUT/search-msr-$seed"
  msrdarts search --preset darts-cifar10 --order 1 "${DATA[@]}" --seed $seed --out "$OUT/search-darts-$seed"
  msrdarts search --preset pc-darts-cifar10 "${DATA[@]}" --seed $seed --out "$OUT/search-pc-darts-$seed"
  msrdarts search --preset p-darts-cifar10 "${DATA[@]}" --seed $seed --out "$OUT/search-p-darts-$seed"
done
msrdarts sample --space msr --n 8 --seed 0 --out "$OUT/random"
for seed in 0 1 2; do
  msrdarts train --preset cifar10-cells "${DATA[@]}" --genotype "$OUT/search-msr-$seed/genotype-cells.json" \
    --out "$OUT/train-cells-$seed"
done
for g in "$OUT"/search-*/genotype.json "$OUT"/random/sample-*/genotype.json; do
  name=$(basename "$(dirname "$g")")
  msrdarts train --preset cifar10 "${DATA[@]}" --genotype "$g" --out "$OUT/train-$name"
done
msrdarts compare "$OUT"/train-* --out "$OUT/table.md" --csv "$OUT/table.csv"
