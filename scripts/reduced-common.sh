# Shared by scripts/table1-reduced.sh and scripts/table2-reduced.sh (sourced, not run): arguments and
# budget, the data and recipe flags, one resumable search, one resumable training, the log header and
# the record of raw outputs. The caller sets NAME (its RECORD folder's default name) first.
#   Arguments: [DATA.npz] [OUT] [RECORD]; budget (env): LAYERS, CHANNELS, SEARCH_EPOCHS, TRAIN_EPOCHS, SUBSET.
NPZ=${1:-../shared/data/cifar10-mini.npz}
OUT=${2:-runs/reduced}   # shared by both scripts: the runs both need are made once
RECORD=${3:-bench/results/$NAME}
LAYERS=${LAYERS:-5}; CHANNELS=${CHANNELS:-8}; SEARCH_EPOCHS=${SEARCH_EPOCHS:-8}; TRAIN_EPOCHS=${TRAIN_EPOCHS:-8}
SUBSET=${SUBSET:-0.4}   # search on a class-balanced 40 % (+ 10 % search-valid): searches cost more per image
DATA=(--dataset npz --data "$NPZ" --device cpu --no-progress --no-plots --no-tensorboard)
# every search measures its search-valid accuracy (which picks the genotype's epoch) the same way
SEARCH=(--layers "$LAYERS" --channels "$CHANNELS" --batch-size 64 --subset "$SUBSET" --subset-valid 0.1 --bn-recalibration 4)
TRAIN=(--preset cifar10 --layers "$LAYERS" --channels "$CHANNELS" --batch-size 64 --epochs "$TRAIN_EPOCHS" --drop-path 0)
mkdir -p "$OUT" "$RECORD"

header() {
  echo "# $(date -u +%Y-%m-%dT%H:%MZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores"
  echo "# bash scripts/$NAME.sh $NPZ $OUT $RECORD  (LAYERS=$LAYERS CHANNELS=$CHANNELS SEARCH_EPOCHS=$SEARCH_EPOCHS TRAIN_EPOCHS=$TRAIN_EPOCHS SUBSET=$SUBSET)"
}

search_run() {   # KIND SEED EPOCHS_IN_HISTORY FLAGS...: OUT/search-KIND-SEED, skipped when finished, else resumed
  local out="$OUT/search-$1-$2" seed=$2 n=$3; shift 3
  if [ -f "$out/genotype.json" ] && [ "$(wc -l < "$out/history.jsonl")" -ge "$n" ]; then return; fi
  local resume=()
  if [ -f "$out/checkpoint.pt" ] || [ -f "$out/stage-1/checkpoint.pt" ]; then resume=(--resume); fi
  msrdarts search "${DATA[@]}" "${SEARCH[@]}" "$@" --seed "$seed" --out "$out" "${resume[@]}"
}

train_run() {    # GENOTYPE (relative to OUT) SEED: OUT/train-<genotype path with - for />
  local out
  out="$OUT/train-$(echo "${1%.json}" | tr '/' '-')"
  if [ -f "$out/results.json" ]; then return; fi
  local resume=()
  if [ -f "$out/checkpoint.pt" ]; then resume=(--resume); fi
  msrdarts train "${DATA[@]}" "${TRAIN[@]}" --genotype "$OUT/$1" --seed "$2" --out "$out" "${resume[@]}"
}

sample_random() {   # 3 genotypes of the 4-op space, unconstrained
  if [ ! -d "$OUT/random" ]; then
    msrdarts sample --space msr --n 3 --seed 0 --out "$OUT/random" --layers "$LAYERS" --channels "$CHANNELS"
  fi
}

record_runs() {   # FOLDERS...: each one's config, results and genotypes into RECORD/<folder name>/
  local d f
  for d in "$@"; do
    mkdir -p "$RECORD/$(basename "$d")"
    for f in config.json results.json genotype.json genotype-cells.json; do
      if [ -f "$d/$f" ]; then cp "$d/$f" "$RECORD/$(basename "$d")/"; fi
    done
  done
}
