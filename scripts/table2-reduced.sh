#!/usr/bin/env bash
# scripts/table2.sh reduced to one unattended run on a 2-core CPU, with the budget of
# scripts/table1-reduced.sh (the same env settings and PROVISIONAL defaults: see its header): MSR-DARTS (mean
# and per-cell), DARTS (1st order), PC-DARTS, P-DARTS and random genotypes, all in the 4-op MSR space
# (the paper's Table 1 setting, where the methods differ only in how they pick), 3 seeds each, then one
# table by msrdarts compare. Runs it shares with table1-reduced.sh (MSR-DARTS, DARTS in the msr space,
# random, all with the same settings) are reused when both write to the same OUT (the default); keep
# the env settings the same for both.
#   bash scripts/table2-reduced.sh [DATA.npz] [OUT] [RECORD]
# P-DARTS: stages of LAYERS-2, LAYERS, LAYERS+2 cells (keeping 3, 2, then 1 of the 4 ops), each stage
# SEARCH_EPOCHS/2 epochs (at least 2), so its search costs about what one of the others does.
# PC-DARTS: K = 2 (CHANNELS must be even), architecture steps from the start (no warm-up at this size).
set -euo pipefail
NAME=table2-reduced
source "$(dirname "$0")/reduced-common.sh"
STAGE_EPOCHS=$(( SEARCH_EPOCHS / 2 > 2 ? SEARCH_EPOCHS / 2 : 2 ))
runs=()
for seed in 0 1 2; do
  for g in "search-msr-$seed-genotype" "search-msr-$seed-genotype-cells" "search-darts4-$seed-genotype" \
           "search-pc-darts-$seed-genotype" "search-p-darts-$seed-genotype" "random-sample-0$seed-genotype"; do
    runs+=("$OUT/train-$g")
  done
done
{
header
for seed in 0 1 2; do
  search_run msr "$seed" "$SEARCH_EPOCHS" --epochs "$SEARCH_EPOCHS"
  search_run darts4 "$seed" "$SEARCH_EPOCHS" --method darts --space msr --order 1 --epochs "$SEARCH_EPOCHS"
  search_run pc-darts "$seed" "$SEARCH_EPOCHS" --method pc-darts --space msr --partial-channels 2 --epochs "$SEARCH_EPOCHS"
  search_run p-darts "$seed" $((3 * STAGE_EPOCHS)) --method p-darts --space msr \
    --stage-layers "$((LAYERS - 2)),$LAYERS,$((LAYERS + 2))" --stage-keep 3,2,1 --skip-dropout 0.1,0.4,0.7 \
    --epochs "$STAGE_EPOCHS" --arch-start 1
done
sample_random
for seed in 0 1 2; do
  for g in "search-msr-$seed/genotype.json" "search-msr-$seed/genotype-cells.json" "search-darts4-$seed/genotype.json" \
           "search-pc-darts-$seed/genotype.json" "search-p-darts-$seed/genotype.json" "random/sample-0$seed/genotype.json"; do
    train_run "$g" "$seed"
  done
done
msrdarts compare "${runs[@]}" --out "$RECORD/table.md" --csv "$RECORD/table.csv"
} 2>&1 | tee -a "$RECORD/log.txt"
record_runs "${runs[@]}" "$OUT"/search-msr-? "$OUT"/search-darts4-? "$OUT"/search-pc-darts-? "$OUT"/search-p-darts-?
