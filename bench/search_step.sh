#!/usr/bin/env bash
# Times one supernet search step (forward, backward, clip, SGD): fused vs reference implementation,
# and the fused one without spectral norms, side by side in one process (alternating rounds),
# with the machine's copy-bandwidth and matmul ceilings measured in the same run and the peak
# memory of one step (fresh processes). Results go in BENCHMARKS.md.
#   bash bench/search_step.sh            # CIFAR-10 search configuration and the quick preset, CPU
set -euo pipefail
echo "# CIFAR-10 search configuration (L=8, C=16, batch 64, 32x32)"
msrdarts bench search-step --layers 8 --channels 16 --batch-size 64 --input-size 32 --device cpu --steps 6 --json
echo "# quick preset (digits: L=5, C=8, batch 64, 8x8 grey)"
msrdarts bench search-step --layers 5 --channels 8 --batch-size 64 --input-size 8 --in-channels 1 --device cpu --steps 20 --json --profile
