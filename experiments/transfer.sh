#!/usr/bin/env bash
# Plans across step counts (issue 19): the 20-step budget-0.6 plan of each bundled model (plans/sweeps/, from
# sweeps.sh part 1) used at 10, 30 and 50 steps (difa.retime_plan: nearest normalized step), next to a plan
# calibrated natively at each step count with the same budget; same seeds, metric code and N as sweeps.sh.
#   bash experiments/transfer.sh            # then experiments/results/transfer/{results.md,matched.md}
. "$(dirname "$0")/sweep_env.sh"  # set -euo pipefail, cd to the root, N, OUT, MODELS, L, EV
STEPS=${STEPS:-"10 30 50"}
EV+=(fid=false)
T0=$(date +%s)
for M in $MODELS; do
  for S in $STEPS; do
    calibrate +model=$M budget=0.6 steps=$S latency_batch=25 out=plans/transfer/${M}_b0.6_s$S.json \
      "hydra.run.dir=$OUT/calibrate/transfer_${M}_s$S"
  done
  python -m difa.evaluate -m $L +model=$M "${EV[@]}" steps=${STEPS// /,} plan=plans/sweeps/${M}_difa_b0.6.json \
    +tag=from-20-steps "hydra.sweep.dir=$OUT/transfer/from20_$M"
  python -m difa.evaluate -m $L +model=$M "${EV[@]}" steps=${STEPS// /,} +tag=native \
    'plan=plans/transfer/${model.name}_b0.6_s${steps}.json' "hydra.sweep.dir=$OUT/transfer/native_$M"
done
# (under $OUT/transfer, not $OUT/evaluate: sweeps.sh part 4 collects every folder there, one step count)
python experiments/collect.py $OUT/transfer/* --out experiments/results/transfer
echo "[transfer] $(( $(date +%s) - T0 )) s"
