#!/usr/bin/env bash
# The paper's Table 1 comparison at full scale on GPUs (SPEC sections 4a, 5, 9), like with like:
#   msr-darts          the mean genotype of an MSR-DARTS search (cifar10 preset)
#   msr-darts-cells    its per-cell genotype, trained with one evaluation cell per search cell
#   msr-darts-cells-max  the authors' ablation: per-cell, the op and edges of highest stable rank, read off
#                      the same searches (genotype-cells-max.json)
#   darts-2nd (msr space)   DARTS on the same 4-op space: the paper's Table 1 DARTS row (1.65M at L = 8)
#   darts-2nd          DARTS on its own 8-op space, its own row (1.15M at L = 8)
#   random             8 genotypes drawn uniformly from the 4-op space, unconstrained (msrdarts compare
#                      prints each one's size beside its error; no size borrowed from another method)
# 3 search seeds each; every genotype trained with the DARTS protocol at L = 8 (the paper's Table 1,
# per-cell genotypes at their own depth) and the mean ones also at L = 20.
#   bash scripts/table1.sh [OUT] [DATA]      # DATA: CIFAR-10 folder (downloaded there if missing)
# Cost, roughly: searches 3 x (0.3 + 2 x 1.0) GPU-days; trainings ~33 x 0.6-1.5 GPU-days.
# Prefix any command with torchrun --nproc_per_node=N to use N GPUs (--batch-size is global).
set -euo pipefail
OUT=${1:-runs/table1}
DATA=(--dataset cifar10 --data "${2:-data}" --download)
mkdir -p "$OUT"
for seed in 0 1 2; do
  msrdarts search --preset cifar10 "${DATA[@]}" --seed $seed --out "$OUT/search-msr-$seed"
  msrdarts search --preset darts-cifar10 --space msr "${DATA[@]}" --seed $seed --out "$OUT/search-darts4-$seed"
  msrdarts search --preset darts-cifar10 "${DATA[@]}" --seed $seed --out "$OUT/search-darts8-$seed"
done
msrdarts sample --space msr --n 8 --seed 0 --out "$OUT/random"
for seed in 0 1 2; do   # per-cell: L_eval = L_search = 8 (the cifar10-cells preset)
  for f in genotype-cells genotype-cells-max; do
    msrdarts train --preset cifar10-cells "${DATA[@]}" --genotype "$OUT/search-msr-$seed/$f.json" \
      --out "$OUT/train-L8-$f-$seed"
  done
done
for layers in 8 20; do
  for g in "$OUT"/search-*/genotype.json "$OUT"/random/sample-*/genotype.json; do
    name=$(basename "$(dirname "$g")")
    msrdarts train --preset cifar10 "${DATA[@]}" --layers $layers --genotype "$g" --out "$OUT/train-L$layers-$name"
  done
  msrdarts compare "$OUT"/train-L$layers-* --out "$OUT/table-L$layers.md" --csv "$OUT/table-L$layers.csv"
done
