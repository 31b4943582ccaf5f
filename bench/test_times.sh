#!/usr/bin/env bash
# Times the test tiers on this machine and appends the raw closing lines to bench/results/tests.txt.
#   bash bench/test_times.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results/tests.txt
{
    echo "## $(date -u +%Y-%m-%dT%H:%MZ) commit $(git rev-parse --short HEAD) $(nproc) cores, $(python -c 'import torch; print("torch", torch.__version__)')"
    echo "\$ python -m pytest -q -m 'not slow'"
    python -m pytest -q -m "not slow" -p no:cacheprovider 2>&1 | tail -1
    echo "\$ python -m pytest -q"
    python -m pytest -q -p no:cacheprovider 2>&1 | tail -1
} >> "$out"
tail -5 "$out"
