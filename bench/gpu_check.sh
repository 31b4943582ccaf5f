#!/usr/bin/env bash
# The GPU check of issue 4, prepared for a session that is lent a GPU (not yet run on one; no GPU
# has been lent so far). One script, about 10 minutes on one H200 if compiling is quick; each step
# has its own time limit so that one slow step cannot use up the device time.
#
#   bash bench/gpu_check.sh [OUT]        # OUT: where the figures go (default: runs/gpu-check)
#
# It checks the CUDA paths that the CPU tests cannot: bf16 autocast, channels_last and
# torch.compile in a real search step, a short real search with every GPU default, and DDP with
# NCCL (one process: the NCCL init, the gradient all-reduce and the buffer broadcasts). It times
# the CIFAR-10 search step (L=8, C=16, batch 64, 32x32), fused vs reference, and the evaluation
# network's training step (DARTS_V2, L=20, C=36, batch 96), reference vs fast, each in fp32, bf16 and
# bf16 compiled. Record the JSON lines in BENCHMARKS.md.
set -uo pipefail
out=${1:-runs/gpu-check}
mkdir -p "$out"
status=0
run() {   # run LIMIT_S NAME CMD...: one step, its output in $out/NAME.txt; a failure is reported, not fatal
  local limit=$1 name=$2
  shift 2
  echo "# $name: $*"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "  FAILED (rc $rc; 124: timed out): see $out/$name.txt"
    status=1
  fi
  grep -E '^\{|compile|error|Error' "$out/$name.txt" | tail -3
}
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"
step="msrdarts bench search-step --layers 8 --channels 16 --batch-size 64 --input-size 32 --device cuda --json"
run 120 step-fp32 $step --steps 10 --amp off --channels-last off --compile off
run 120 step-bf16 $step --steps 10 --amp bf16 --channels-last on --compile off
run 420 step-bf16-compiled $step --steps 10 --amp bf16 --channels-last on --compile on --no-memory
train="msrdarts bench train-step --genotype DARTS_V2 --layers 20 --channels 36 --batch-size 96 --device cuda --json"
run 120 train-fp32 $train --steps 10 --amp off --channels-last off --compile off
run 120 train-bf16 $train --steps 10 --amp bf16 --channels-last on --compile off
run 420 train-bf16-compiled $train --steps 10 --amp bf16 --channels-last on --compile on --no-memory
run 240 search-quick msrdarts search --preset quick --device cuda --out "$out/quick" --no-progress
run 180 ddp-nccl torchrun --standalone --nproc_per_node 1 -m msrdarts search --preset quick --device cuda \
  --epochs 1 --out "$out/ddp" --no-progress
exit $status
