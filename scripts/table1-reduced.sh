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
NPZ=${1:-../shared/data/cifar10-mini.npz}
OUT=${2:-runs/reduced}   # shared with table2-reduced.sh: the runs both need are made once
RECORD=${3:-bench/results/table1-reduced}
LAYERS=${LAYERS:-5}; CHANNELS=${CHANNELS:-8}; SEARCH_EPOCHS=${SEARCH_EPOCHS:-8}; TRAIN_EPOCHS=${TRAIN_EPOCHS:-8}
SUBSET=${SUBSET:-0.4}   # search on a class-balanced 40 % (+ 10 % search-valid): searches cost more per image
DATA=(--dataset npz --data "$NPZ" --device cpu --no-progress --no-plots --no-tensorboard)
# every search measures its search-valid accuracy (which picks the genotype's epoch) the same way
SEARCH=(--layers "$LAYERS" --channels "$CHANNELS" --batch-size 64 --epochs "$SEARCH_EPOCHS" --subset "$SUBSET" --subset-valid 0.1
        --bn-recalibration 4)
TRAIN=(--preset cifar10 --layers "$LAYERS" --channels "$CHANNELS" --batch-size 64 --epochs "$TRAIN_EPOCHS" --drop-path 0)
mkdir -p "$OUT" "$RECORD"
runs=()
for seed in 0 1 2; do
  for g in "search-msr-$seed-genotype" "search-msr-$seed-genotype-cells" "search-msr-$seed-genotype-cells-max" \
           "search-darts4-$seed-genotype" "search-darts8-$seed-genotype" "random-sample-0$seed-genotype"; do
    runs+=("$OUT/train-$g")
  done
done
{
echo "# $(date -u +%Y-%m-%dT%H:%MZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores"
echo "# bash scripts/table1-reduced.sh $NPZ $OUT $RECORD  (LAYERS=$LAYERS CHANNELS=$CHANNELS SEARCH_EPOCHS=$SEARCH_EPOCHS TRAIN_EPOCHS=$TRAIN_EPOCHS SUBSET=$SUBSET)"
for seed in 0 1 2; do
  for kind in msr darts4 darts8; do
    out="$OUT/search-$kind-$seed"
    [ -f "$out/genotype.json" ] && [ "$(python -c "import json,sys; h=open('$out/history.jsonl').read().splitlines(); print(len(h))")" = "$SEARCH_EPOCHS" ] && continue
    resume=(); [ -f "$out/checkpoint.pt" ] && resume=(--resume)
    case $kind in
      msr)    msrdarts search "${DATA[@]}" "${SEARCH[@]}" --seed $seed --out "$out" "${resume[@]}" ;;
      darts4) msrdarts search --method darts --space msr --order 1 "${DATA[@]}" "${SEARCH[@]}" --seed $seed --out "$out" "${resume[@]}" ;;
      darts8) msrdarts search --method darts --space darts --order 1 "${DATA[@]}" "${SEARCH[@]}" --seed $seed --out "$out" "${resume[@]}" ;;
    esac
  done
done
[ -d "$OUT/random" ] || msrdarts sample --space msr --n 3 --seed 0 --out "$OUT/random" --layers "$LAYERS" --channels "$CHANNELS"
for seed in 0 1 2; do
  for g in "search-msr-$seed/genotype.json" "search-msr-$seed/genotype-cells.json" "search-msr-$seed/genotype-cells-max.json" \
           "search-darts4-$seed/genotype.json" "search-darts8-$seed/genotype.json" "random/sample-0$seed/genotype.json"; do
    name=$(echo "${g%.json}" | tr '/' '-')
    out="$OUT/train-$name"
    [ -f "$out/results.json" ] && continue
    resume=(); [ -f "$out/checkpoint.pt" ] && resume=(--resume)
    msrdarts train "${DATA[@]}" "${TRAIN[@]}" --genotype "$OUT/$g" --seed $seed --out "$out" "${resume[@]}"
  done
done
msrdarts compare "${runs[@]}" --out "$RECORD/table.md" --csv "$RECORD/table.csv"
} 2>&1 | tee -a "$RECORD/log.txt"
for d in "${runs[@]}" "$OUT"/search-msr-? "$OUT"/search-darts4-? "$OUT"/search-darts8-?; do
  mkdir -p "$RECORD/$(basename "$d")"
  for f in config.json results.json genotype.json genotype-cells.json; do
    if [ -f "$d/$f" ]; then cp "$d/$f" "$RECORD/$(basename "$d")/"; fi
  done
done
