#!/usr/bin/env bash
# Times one supernet search step (forward, backward, clip, SGD): fused vs reference implementation,
# and the fused one without spectral norms, side by side in one process (alternating rounds),
# with the machine's copy-bandwidth and matmul ceilings measured in the same run and the peak
# memory of one step (fresh processes). Results go in BENCHMARKS.md.
#   bash bench/search_step.sh            # CIFAR-10 search configuration and the quick preset, CPU
# The search refreshes the depthwise convs' spectral norms when their weights have drifted
# (--sn-refresh-drift), so how often is a property of a real search: the quick preset's interval
# is read off a whole quick search run first (its history's train_steps over sn_refreshes). The
# CIFAR-10 line amortises a refresh every 10 steps, the fixed schedule before the drift trigger.
set -euo pipefail
cd "$(dirname "$0")/.."
run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT
msrdarts search --preset quick --out "$run/quick" --no-progress --device cpu > /dev/null
interval=$(python - "$run/quick/history.jsonl" <<'PY'
import json, sys
h = [json.loads(line) for line in open(sys.argv[1])]
steps, refreshes = sum(r["train_steps"] for r in h), sum(r["sn_refreshes"] for r in h)
print(f"# quick search: {steps} steps, {refreshes} full refreshes {[r['sn_refreshes'] for r in h]}", file=sys.stderr)
print(round(steps / refreshes, 2))
PY
)
echo "# CIFAR-10 search configuration (L=8, C=16, batch 64, 32x32)"
msrdarts bench search-step --layers 8 --channels 16 --batch-size 64 --input-size 32 --device cpu --steps 6 --json
echo "# quick preset (digits: L=5, C=8, batch 64, 8x8 grey), a full refresh every $interval steps (a real quick search's)"
msrdarts bench search-step --layers 5 --channels 8 --batch-size 64 --input-size 8 --in-channels 1 --device cpu --steps 20 \
  --json --profile --sn-refresh-interval "$interval"
