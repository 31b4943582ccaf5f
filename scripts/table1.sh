#!/usr/bin/env bash
# The paper's Table 1 comparison at full scale on GPUs (SPEC section 5): MSR-DARTS, DARTS (second
# order, its published settings) and 8 random genotypes of the MSR space matched to MSR-DARTS's
# parameter budget, 3 search seeds each, every genotype trained with the DARTS protocol at
# L = 20 (and at L = 8, as the paper's Table 1 also reports), then one table.
#   bash scripts/table1.sh [OUT] [DATA]      # DATA: CIFAR-10 folder (downloaded there if missing)
# Cost, roughly: searches 3 x (0.3 + 1.0) GPU-days; trainings 14 x ~1.5 GPU-days at L = 20.
# Prefix any command with torchrun --nproc_per_node=N to use N GPUs (--batch-size is global).
set -euo pipefail
OUT=${1:-runs/table1}
DATA=(--dataset cifar10 --data "${2:-data}" --download)
mkdir -p "$OUT"
for seed in 0 1 2; do
  msrdarts search --preset cifar10 "${DATA[@]}" --seed $seed --out "$OUT/search-msr-$seed"
  msrdarts search --preset darts-cifar10 "${DATA[@]}" --seed $seed --out "$OUT/search-darts-$seed"
done
msrdarts sample --space msr --n 8 --seed 0 --params-m 3.3 --tolerance 0.15 --out "$OUT/random"
for layers in 20 8; do
  for g in "$OUT"/search-*/genotype.json "$OUT"/random/sample-*/genotype.json; do
    name=$(basename "$(dirname "$g")")
    msrdarts train --preset cifar10 "${DATA[@]}" --layers $layers --genotype "$g" --out "$OUT/train-L$layers-$name"
  done
  msrdarts compare "$OUT"/train-L$layers-* --out "$OUT/table-L$layers.md" --csv "$OUT/table-L$layers.csv"
done
