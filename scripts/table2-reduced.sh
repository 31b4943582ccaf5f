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
NPZ=${1:-../shared/data/cifar10-mini.npz}
OUT=${2:-runs/reduced}
RECORD=${3:-bench/results/table2-reduced}
LAYERS=${LAYERS:-5}; CHANNELS=${CHANNELS:-8}; SEARCH_EPOCHS=${SEARCH_EPOCHS:-8}; TRAIN_EPOCHS=${TRAIN_EPOCHS:-8}
SUBSET=${SUBSET:-0.4}
STAGE_EPOCHS=$(( SEARCH_EPOCHS / 2 > 2 ? SEARCH_EPOCHS / 2 : 2 ))
DATA=(--dataset npz --data "$NPZ" --device cpu --no-progress --no-plots --no-tensorboard)
SEARCH=(--layers "$LAYERS" --channels "$CHANNELS" --batch-size 64 --subset "$SUBSET" --subset-valid 0.1
        --bn-recalibration 4)
TRAIN=(--preset cifar10 --layers "$LAYERS" --channels "$CHANNELS" --batch-size 64 --epochs "$TRAIN_EPOCHS" --drop-path 0)
mkdir -p "$OUT" "$RECORD"
finished() {   # a search folder whose genotype.json exists and whose history has all its epochs
  [ -f "$1/genotype.json" ] && [ "$(wc -l < "$1/history.jsonl")" -ge "$2" ]
}
runs=()
for seed in 0 1 2; do
  runs+=("$OUT/train-search-msr-$seed-genotype" "$OUT/train-search-msr-$seed-genotype-cells"
         "$OUT/train-search-darts4-$seed-genotype" "$OUT/train-search-pc-darts-$seed-genotype"
         "$OUT/train-search-p-darts-$seed-genotype" "$OUT/train-random-sample-0$seed-genotype")
done
{
echo "# $(date -u +%Y-%m-%dT%H:%MZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores"
echo "# bash scripts/table2-reduced.sh $NPZ $OUT $RECORD  (LAYERS=$LAYERS CHANNELS=$CHANNELS SEARCH_EPOCHS=$SEARCH_EPOCHS TRAIN_EPOCHS=$TRAIN_EPOCHS SUBSET=$SUBSET)"
for seed in 0 1 2; do
  for kind in msr darts4 pc-darts p-darts; do
    out="$OUT/search-$kind-$seed"
    case $kind in
      msr)      args=(--epochs "$SEARCH_EPOCHS"); n=$SEARCH_EPOCHS ;;
      darts4)   args=(--method darts --space msr --order 1 --epochs "$SEARCH_EPOCHS"); n=$SEARCH_EPOCHS ;;
      pc-darts) args=(--method pc-darts --space msr --partial-channels 2 --epochs "$SEARCH_EPOCHS"); n=$SEARCH_EPOCHS ;;
      p-darts)  args=(--method p-darts --space msr --stage-layers "$((LAYERS - 2)),$LAYERS,$((LAYERS + 2))" --stage-keep 3,2,1
                      --skip-dropout 0.1,0.4,0.7 --epochs "$STAGE_EPOCHS" --arch-start 1); n=$((3 * STAGE_EPOCHS)) ;;
    esac
    finished "$out" "$n" && continue
    resume=(); { [ -f "$out/checkpoint.pt" ] || [ -f "$out/stage-1/checkpoint.pt" ]; } && resume=(--resume)
    msrdarts search "${DATA[@]}" "${SEARCH[@]}" "${args[@]}" --seed $seed --out "$out" "${resume[@]}"
  done
done
[ -d "$OUT/random" ] || msrdarts sample --space msr --n 3 --seed 0 --out "$OUT/random" --layers "$LAYERS" --channels "$CHANNELS"
for seed in 0 1 2; do
  for g in "search-msr-$seed/genotype.json" "search-msr-$seed/genotype-cells.json" "search-darts4-$seed/genotype.json" \
           "search-pc-darts-$seed/genotype.json" "search-p-darts-$seed/genotype.json" "random/sample-0$seed/genotype.json"; do
    name=$(echo "${g%.json}" | tr '/' '-')
    out="$OUT/train-$name"
    [ -f "$out/results.json" ] && continue
    resume=(); [ -f "$out/checkpoint.pt" ] && resume=(--resume)
    msrdarts train "${DATA[@]}" "${TRAIN[@]}" --genotype "$OUT/$g" --seed $seed --out "$out" "${resume[@]}"
  done
done
msrdarts compare "${runs[@]}" --out "$RECORD/table.md" --csv "$RECORD/table.csv"
} 2>&1 | tee -a "$RECORD/log.txt"
for d in "${runs[@]}" "$OUT"/search-msr-? "$OUT"/search-darts4-? "$OUT"/search-pc-darts-? "$OUT"/search-p-darts-?; do
  mkdir -p "$RECORD/$(basename "$d")"
  for f in config.json results.json genotype.json genotype-cells.json; do
    if [ -f "$d/$f" ]; then cp "$d/$f" "$RECORD/$(basename "$d")/"; fi
  done
done
