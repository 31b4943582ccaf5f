#!/usr/bin/env bash
# A CPU torchrun search against one process, per image (issue 18): the quick search for 3 epochs in
# one process, then under torchrun with 2 processes and OMP_NUM_THREADS=2 set in the shell (as many
# clusters do; each rank must take its share of the cores, not 2 threads each). Prints each run's
# search-train images/s per epoch (history.jsonl) and the ratio of the medians.
#   bash bench/torchrun_cpu.sh [OUT]
set -euo pipefail
OUT=${1:-runs/bench-torchrun}
rm -rf "$OUT"; mkdir -p "$OUT"
ARGS=(--preset quick --epochs 3 --no-progress --no-plots --no-tensorboard --device cpu)
echo "# $(date -u +%Y-%m-%dT%H:%MZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, torch $(python -c 'import torch; print(torch.__version__)')"
echo "# one process: msrdarts search ${ARGS[*]}"
msrdarts search "${ARGS[@]}" --out "$OUT/one" > "$OUT/one.log" 2>&1
echo "# two processes: OMP_NUM_THREADS=2 torchrun --standalone --nproc_per_node=2 -m msrdarts search ${ARGS[*]}"
OMP_NUM_THREADS=2 torchrun --standalone --nproc_per_node=2 -m msrdarts search "${ARGS[@]}" --out "$OUT/two" \
  > "$OUT/two.log" 2>&1
grep -h "processes" "$OUT/two.log" | head -1
python - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
rates = {k: [json.loads(l)["train_images_per_s"] for l in (out / k / "history.jsonl").read_text().splitlines()]
         for k in ("one", "two")}
for k, v in rates.items():
    print(json.dumps({"run": k, "train_images_per_s": [round(x, 1) for x in v]}))
print(json.dumps({"two_over_one_median": round(statistics.median(rates["two"]) / statistics.median(rates["one"]), 3)}))
PY
