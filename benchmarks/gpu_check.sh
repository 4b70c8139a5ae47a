#!/usr/bin/env bash
# The GPU checks (benchmarks/gpu_check.py), one line per check. On a CUDA machine with network access to PyPI,
# `INSTALL=1` first installs the cuda extra (flash-attn; it compiles where no wheel matches, which can exceed the
# 8-minute budget: then run without it and the blocked SDPA path is checked instead).
#   bash benchmarks/gpu_check.sh            # on CUDA
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: CPU, float32, small sizes
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${INSTALL:-0}" == 1 ]]; then pip install -q -e '.[cuda]'; fi
python benchmarks/gpu_check.py "$@"
# the user's stack under a plan: offloading (enable_model_cpu_offload / enable_sequential_cpu_offload), regional
# torch.compile; context parallelism where two GPUs are there (README "Works with")
python benchmarks/gpu_stack_check.py "$@"
# then the end-to-end plans at real widths and full depth (benchmarks/bench_scale.py); skipped in the dry run
if [[ " $* " != *" --dry-run "* ]]; then
  timeout 300 python benchmarks/bench_scale.py --device cuda --dtype float16 --steps 3 --reps 3 \
    | awk '/^#/ || /^arch/ {next} {printf "bench_scale %s %s %s: time %s FLOPs %s predicted %s measured/ideal %s\n", $1, $2, $3, $5, $7, $8, $9}'
fi
