#!/usr/bin/env bash
# Times one supernet search step (forward, backward, clip, SGD): fused vs reference implementation,
# and the fused one without spectral norms, side by side in one process (alternating rounds),
# with the machine's copy-bandwidth and matmul ceilings measured in the same run and the peak
# memory of one step (fresh processes). Results go in BENCHMARKS.md.
#   bash bench/search_step.sh            # CIFAR-10 search configuration and the quick preset, CPU
#   bash bench/search_step.sh quick      # the quick preset's line only (a few minutes)
#   bash bench/search_step.sh quick 120  # the same over 120 steps (60 rounds; about 8 minutes)
# The search refreshes each bundle of depthwise convs (one map size and stride) when its weights have
# drifted (--sn-refresh-drift), so how often is a property of a real search: each line amortises
# each bundle's refresh at the rate a real search of its preset refreshed it, read off that search's
# history (--sn-refresh-history: sn_refreshes_by_map over train_steps): the whole quick search, and
# the first epoch of the cifar10 preset on the offline mini CIFAR-10 (../shared/data/cifar10-mini.npz;
# the first epoch drifts fastest, so this overstates the refreshes of a 50-epoch search). Without
# that file the CIFAR-10 line amortises a refresh of all convs every 10 steps, the fixed schedule
# before the drift trigger.
set -euo pipefail
cd "$(dirname "$0")/.."
only=${1:-}
quick_steps=${2:-40}
if [ -n "$only" ] && [ "$only" != quick ]; then echo "bench/search_step.sh: '$only': unknown; allowed: quick" >&2; exit 2; fi
if ! [[ "$quick_steps" =~ ^[1-9][0-9]*$ ]]; then echo "bench/search_step.sh: steps '$quick_steps': must be a positive integer" >&2; exit 2; fi
run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT
summary() {   # a search's history.jsonl -> its refreshes, on stderr
  python - "$1" <<'PY'
import json, sys
h = [json.loads(line) for line in open(sys.argv[1])]
by_map = {}
for r in h:
    for k, v in r["sn_refreshes_by_map"].items():
        by_map[k] = by_map.get(k, 0) + v
print(f"# {sys.argv[1]}: {sum(r['train_steps'] for r in h)} steps, steps with depthwise refreshes per epoch "
      f"{[r['sn_refreshes'] for r in h]}, refreshes by bundle {by_map}", file=sys.stderr)
PY
}
msrdarts search --preset quick --out "$run/quick" --no-progress --device cpu > /dev/null
summary "$run/quick/history.jsonl"
cifar=(--sn-refresh-interval 10)
if [ -z "$only" ] && [ -f ../shared/data/cifar10-mini.npz ]; then
  msrdarts search --preset cifar10 --dataset npz --data ../shared/data/cifar10-mini.npz --epochs 1 --out "$run/cifar" \
    --no-progress --device cpu --no-plots > /dev/null
  summary "$run/cifar/history.jsonl"
  cifar=(--sn-refresh-history "$run/cifar/history.jsonl")
fi
if [ -z "$only" ]; then
  echo "# CIFAR-10 search configuration (L=8, C=16, batch 64, 32x32), refreshes amortised as: ${cifar[*]}"
  msrdarts bench search-step --layers 8 --channels 16 --batch-size 64 --input-size 32 --device cpu --steps 6 --json \
    "${cifar[@]}"
fi
echo "# quick preset (digits: L=5, C=8, batch 64, 8x8 grey), refreshes amortised at the quick search's rates"
msrdarts bench search-step --layers 5 --channels 8 --batch-size 64 --input-size 8 --in-channels 1 --device cpu --steps "$quick_steps" \
  --json --profile --sn-refresh-history "$run/quick/history.jsonl"
