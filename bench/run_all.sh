#!/usr/bin/env bash
# Regenerates the CPU figures of BENCHMARKS.md in one unattended run; each command's raw output goes to
# bench/results/<name>.txt behind a header (date, commit, machine, command), so every figure there has
# its file and its command. Run on an otherwise idle machine (the ratios are side by side, the absolute
# times are not).
#   bash bench/run_all.sh [ONLY]      # ONLY: one of search-step, search-step-quick, search-step-quick-120, since-filing, train-step, train-profile, batchnorm, depthwise-32px, pointwise, methods,
#                                     # torchrun-cpu, quick, sn-accuracy, sn-accuracy-fixed10, sn-accuracy-drift15-cap50, sn-accuracy-batch16,
#                                     # sn-accuracy-depthwise50, sn-accuracy-depthwise20, sn-accuracy-depthwise20-e8, sn-accuracy-drift25, sn-accuracy-batch16-default, fits-80gb, recompute-auto,
#                                     # recompute-auto-bf16, memory-timeline,
#                                     # sn-accuracy-cifar10, sn-accuracy-cifar10-default, sn-accuracy-cifar10-lr05, sn-accuracy-cifar10-lr05-it3,
#                                     # sn-accuracy-cifar10-lr05-drift (need
#                                     # ../shared/data/cifar10-mini.npz)
set -euo pipefail
cd "$(dirname "$0")/.."
R=bench/results
mkdir -p "$R"
header() {
  echo "# $(date -u +%Y-%m-%dT%H:%MZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet -- . ':!bench/results' 2>/dev/null || echo '+changes')"
  echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem/ {print $2}') GiB, torch $(python -c 'import torch; print(torch.__version__)')"
  echo "# command: $*"
}
run() {   # name command...
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && [ "$ONLY" != "$name" ]; then return; fi
  { header "$@"; "$@"; } 2>&1 | tee "$R/$name.txt"
}
ONLY=${1:-}
run search-step bash bench/search_step.sh
run search-step-quick bash bench/search_step.sh quick
run search-step-quick-120 bash bench/search_step.sh quick 120
run since-filing python bench/since_filing.py
run train-step msrdarts bench train-step --genotype DARTS_V2 --layers 20 --channels 36 --batch-size 96 --steps 8 --json
run train-profile python bench/train_profile.py
run batchnorm python bench/batchnorm.py
run depthwise-32px python bench/depthwise.py 32
run pointwise python bench/pointwise.py
run methods bash bench/methods.sh
run torchrun-cpu bash bench/torchrun_cpu.sh runs/bench-torchrun
rm -rf runs/bench-quick
run quick /usr/bin/time -f "%e s wall, %M KB peak resident" msrdarts search --preset quick --out runs/bench-quick \
  --no-progress --device cpu
rm -rf runs/bench-quick
run sn-accuracy bash bench/sn_accuracy.sh
# The runs below pin the refresh settings they were recorded with: before the drift trigger became
# the default (--sn-refresh-drift 0.15, and all convs every 100 steps) the depthwise convs refreshed
# every 10 steps and on no drift (--sn-refresh-drift 0).
run sn-accuracy-fixed10 python bench/sn_accuracy.py --epochs 4 --every 2 --sn-refresh-depthwise-every 10 --sn-refresh-drift 0
run sn-accuracy-drift15-cap50 python bench/sn_accuracy.py --epochs 8 --every 2 --sn-refresh-depthwise-every 50 \
  --sn-refresh-drift 0.15
# The harsher regime: the quick preset at batch 16 (4x the steps, each noisier); and the depthwise
# refresh every 50 or 20 steps instead of 10 (no timing figures from these).
run sn-accuracy-batch16 python bench/sn_accuracy.py --epochs 2 --every 3 --batch-size 16 --sn-refresh-depthwise-every 10 \
  --sn-refresh-drift 0
run sn-accuracy-depthwise50 python bench/sn_accuracy.py --epochs 4 --every 2 --sn-refresh-depthwise-every 50 --sn-refresh-drift 0
run sn-accuracy-depthwise20 python bench/sn_accuracy.py --epochs 4 --every 2 --sn-refresh-depthwise-every 20 --sn-refresh-drift 0
run sn-accuracy-depthwise20-e8 python bench/sn_accuracy.py --epochs 8 --every 2 --sn-refresh-depthwise-every 20 \
  --sn-refresh-drift 0
# The defaults at batch 16 (4x the steps of the quick search, each noisier).
run sn-accuracy-batch16-default python bench/sn_accuracy.py --epochs 2 --every 3 --batch-size 16
# A drift trigger of 0.25 instead of the default 0.15 (the whole quick search).
run sn-accuracy-drift25 python bench/sn_accuracy.py --epochs 8 --every 2 --sn-refresh-drift 0.25
run fits-80gb python bench/fits_80gb.py
run recompute-auto python bench/recompute_auto.py
run recompute-auto-bf16 python bench/recompute_auto.py --amp bf16
run memory-timeline python bench/memory_timeline.py
run sn-accuracy-cifar10 python bench/sn_accuracy.py --preset cifar10 --dataset npz --data ../shared/data/cifar10-mini.npz \
  --epochs 1 --every 3 --sample 40 --sn-refresh-depthwise-every 10 --sn-refresh-drift 0
run sn-accuracy-cifar10-default python bench/sn_accuracy.py --preset cifar10 --dataset npz \
  --data ../shared/data/cifar10-mini.npz --epochs 1 --every 3 --sample 40
run sn-accuracy-cifar10-lr05 python bench/sn_accuracy.py --preset cifar10 --dataset npz \
  --data ../shared/data/cifar10-mini.npz --epochs 1 --every 3 --sample 40 --lr 0.5 \
  --sn-refresh-depthwise-every 10 --sn-refresh-drift 0
run sn-accuracy-cifar10-lr05-it3 python bench/sn_accuracy.py --preset cifar10 --dataset npz \
  --data ../shared/data/cifar10-mini.npz --epochs 1 --every 3 --sample 40 --lr 0.5 --sn-iterations 3 \
  --sn-refresh-depthwise-every 10 --sn-refresh-drift 0
run sn-accuracy-cifar10-lr05-drift python bench/sn_accuracy.py --preset cifar10 --dataset npz \
  --data ../shared/data/cifar10-mini.npz --epochs 1 --every 3 --sample 40 --lr 0.5 --sn-refresh-drift 0.1 \
  --sn-refresh-depthwise-every 10
