#!/usr/bin/env bash
# The paper's Table 1 comparison (scripts/table1.sh) reduced to one unattended run on a 2-core CPU,
# on a class-balanced CIFAR-10 subset in one .npz file, with the same rows:
#   msr-darts, msr-darts-cells (per-cell, L_eval = L_search), msr-darts-cells-max (the authors' ablation:
#   per-cell, highest stable rank, read off the same searches),
#   darts-1st (msr space) (the paper's DARTS row: the same 4-op space), darts-1st (its own 8-op space),
#   random (3 genotypes of the 4-op space, unconstrained: each one's size is printed beside its error).
# 3 seeds each; every genotype trained at the search depth with the same budget; then one table.
#   bash scripts/table1-reduced.sh [DATA.npz] [OUT] [RECORD]
# DATA.npz: uint8 x_train (N, 32, 32, 3), y_train, x_test, y_test (see --dataset npz in the README);
# default ../shared/data/cifar10-mini.npz (5,000 + 1,000 images); python scripts/cifar10_subset.py makes
# another. RECORD (default bench/results/table1-reduced) receives the raw outputs: the table, every
# run's config.json and results.json, and the log, so each figure in BENCHMARKS.md has its file.
# The budget (env: LAYERS, CHANNELS, SEARCH_EPOCHS, TRAIN_EPOCHS, SUBSET) is sized by
# scripts/size-reduced.sh. The defaults are PROVISIONAL: no sized point has yet separated random genotypes
# from seed noise on cifar10-mini.npz (BENCHMARKS.md, "Table 1, reduced: sizing the recipe"), so a run at
# them cannot rank methods less than about 2 points apart.
set -euo pipefail
NAME=table1-reduced
source "$(dirname "$0")/reduced-common.sh"
runs=()
for seed in 0 1 2; do
  for g in "search-msr-$seed-genotype" "search-msr-$seed-genotype-cells" "search-msr-$seed-genotype-cells-max" \
           "search-darts4-$seed-genotype" "search-darts8-$seed-genotype" "random-sample-0$seed-genotype"; do
    runs+=("$OUT/train-$g")
  done
done
{
header
for seed in 0 1 2; do
  search_run msr "$seed" "$SEARCH_EPOCHS" --epochs "$SEARCH_EPOCHS"
  search_run darts4 "$seed" "$SEARCH_EPOCHS" --method darts --space msr --order 1 --epochs "$SEARCH_EPOCHS"
  search_run darts8 "$seed" "$SEARCH_EPOCHS" --method darts --space darts --order 1 --epochs "$SEARCH_EPOCHS"
done
sample_random
for seed in 0 1 2; do
  for g in "search-msr-$seed/genotype.json" "search-msr-$seed/genotype-cells.json" "search-msr-$seed/genotype-cells-max.json" \
           "search-darts4-$seed/genotype.json" "search-darts8-$seed/genotype.json" "random/sample-0$seed/genotype.json"; do
    train_run "$g" "$seed"
  done
done
msrdarts compare "${runs[@]}" --out "$RECORD/table.md" --csv "$RECORD/table.csv"
} 2>&1 | tee -a "$RECORD/log.txt"
record_runs "${runs[@]}" "$OUT"/search-msr-? "$OUT"/search-darts4-? "$OUT"/search-darts8-?
