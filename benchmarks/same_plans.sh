#!/usr/bin/env bash
# Do a refactor's default plans equal those of an earlier commit? Calibrates the bundled models with the README's
# commands at REV (a git worktree) and in this checkout, sharing one latency cache (the measured cost model is
# timed once, by REV's run, and copied into this checkout's runs/cache/latency, so both searches see the same
# seconds), and compares the plan files field by field,
# leaving out only the wall time and the forwards the latency measurement cost (0 when read from the cache).
#   benchmarks/same_plans.sh [REV]      (default REV: HEAD; about 1 min on 2 cores)
set -euo pipefail
rev=${1:-HEAD}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'git -C "$here" worktree remove --force "$work/rev" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$here" worktree add -q --detach "$work/rev" "$rev"
export OMP_NUM_THREADS=1  # (the latency cache is keyed by the thread count: both sides use the same)
runs=("dit_default|" "dit_b06|budget=0.6" "pixart_default|+model=fmnist_pixart")
for side in rev here; do
  dir=$([ "$side" = rev ] && echo "$work/rev" || echo "$here")
  mkdir -p "$work/$side" "$here/runs/cache/latency"
  # this checkout reads REV's timings (same keys: same device, threads, versions, model and shapes)
  [ "$side" = here ] && cp "$work/rev/runs/cache/latency/"*.json "$here/runs/cache/latency/"
  for r in "${runs[@]}"; do
    name=${r%%|*}; args=${r#*|}
    (cd "$dir" && python -m difa.calibrate $args out="$work/$side/$name.json" >"$work/$side/$name.log" 2>&1)
  done
done
python - "$work" <<'EOF'
import json, sys
work, same = sys.argv[1], True
for name in ("dit_default", "dit_b06", "pixart_default"):
    a, b = (json.load(open(f"{work}/{side}/{name}.json")) for side in ("rev", "here"))
    for d in (a, b):
        d["calibration"].pop("wall_time_s", None)
        d["calibration"].pop("forwards", None)
    print(f"{name:15s} {'identical' if a == b else 'DIFFERENT: ' + ', '.join(k for k in a if a[k] != b.get(k))}")
    same &= a == b
sys.exit(0 if same else 1)
EOF
