#!/usr/bin/env bash
# The GPU checks (benchmarks/gpu_check.py), one line per check. On a CUDA machine with network access to PyPI,
# `INSTALL=1` first installs the cuda extra (flash-attn; it compiles where no wheel matches, which can exceed the
# 8-minute budget: then run without it and the blocked SDPA path is checked instead).
#   bash benchmarks/gpu_check.sh            # on CUDA
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: CPU, float32, small sizes
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${INSTALL:-0}" == 1 ]]; then pip install -q -e '.[cuda]'; fi
exec python benchmarks/gpu_check.py "$@"
