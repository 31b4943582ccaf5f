#!/usr/bin/env bash
# Times one supernet search step (forward, backward, clip, SGD): fused vs reference implementation,
# and the fused one without spectral norms, side by side in one process (alternating rounds),
# with the machine's copy-bandwidth and matmul ceilings measured in the same run and the peak
# memory of one step (fresh processes). Results go in BENCHMARKS.md.
#   bash bench/search_step.sh            # CIFAR-10 search configuration and the quick preset, CPU
# The search refreshes the depthwise convs' spectral norms when their weights have drifted
# (--sn-refresh-drift), so how often is a property of a real search: each line amortises the mean
# interval of a real search of its preset, read off that search's history (train_steps over
# sn_refreshes): the whole quick search, and the first epoch of the cifar10 preset on the offline
# mini CIFAR-10 (../shared/data/cifar10-mini.npz; the first epoch drifts fastest, so this
# overstates the refreshes of a 50-epoch search). Without that file the CIFAR-10 line amortises a
# refresh every 10 steps, the fixed schedule before the drift trigger.
set -euo pipefail
cd "$(dirname "$0")/.."
run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT
interval() {   # a search's history.jsonl -> its mean steps per full refresh
  python - "$1" <<'PY'
import json, sys
h = [json.loads(line) for line in open(sys.argv[1])]
steps, refreshes = sum(r["train_steps"] for r in h), sum(r["sn_refreshes"] for r in h)
print(f"# {sys.argv[1]}: {steps} steps, {refreshes} full refreshes {[r['sn_refreshes'] for r in h]}", file=sys.stderr)
print(round(steps / refreshes, 2))
PY
}
msrdarts search --preset quick --out "$run/quick" --no-progress --device cpu > /dev/null
quick=$(interval "$run/quick/history.jsonl")
cifar=10
if [ -f ../shared/data/cifar10-mini.npz ]; then
  msrdarts search --preset cifar10 --dataset npz --data ../shared/data/cifar10-mini.npz --epochs 1 --out "$run/cifar" \
    --no-progress --device cpu --no-plots > /dev/null
  cifar=$(interval "$run/cifar/history.jsonl")
fi
echo "# CIFAR-10 search configuration (L=8, C=16, batch 64, 32x32), a full refresh every $cifar steps"
msrdarts bench search-step --layers 8 --channels 16 --batch-size 64 --input-size 32 --device cpu --steps 6 --json \
  --sn-refresh-interval "$cifar"
echo "# quick preset (digits: L=5, C=8, batch 64, 8x8 grey), a full refresh every $quick steps"
msrdarts bench search-step --layers 5 --channels 8 --batch-size 64 --input-size 8 --in-channels 1 --device cpu --steps 20 \
  --json --profile --sn-refresh-interval "$quick"
