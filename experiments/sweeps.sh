#!/usr/bin/env bash
# Every sweep behind the tables and figures of experiments/README.md, on the bundled Fashion-MNIST models, then the
# collection into experiments/results/. Prints the wall time of each part and the total.
#   bash experiments/sweeps.sh              # N=100 images per method (the README numbers)
#   N=500 bash experiments/sweeps.sh        # more images, longer
#   CALIBRATE=0 bash experiments/sweeps.sh  # evaluate the plan files already under plans/, no calibration
#   PARTS="1 4" bash experiments/sweeps.sh  # only some parts (0 baselines, 1 difa's budgets, 1f reuse only, 1g the greedy's and
#                                           # DiTFastAttn's thresholds, 2 ablation, 3 peers, 3c cache-dit, 3d diffusers hooks and SmoothCache, 5 DiTFastAttn's
#                                           # residual rule, 4 collect)
# Jobs run two at a time (hydra/launcher=local, joblib) with one thread each: 2 CPU cores.
. "$(dirname "$0")/sweep_env.sh"  # set -euo pipefail, cd to the root, N, OUT, MODELS, L, EV
PARTS=${PARTS:-"0 1 1f 1g 2 3 3c 3d 5 4"}
has() { [[ " $PARTS " == *" $1 "* ]]; }
T0=$(date +%s)
part() { echo "[sweeps] $1: $(( $(date +%s) - T0 )) s so far"; }

if has 0; then
# 0. The baselines (and their cached images and Inception features), one job per model, side by side.
for M in $MODELS; do
  python -m difa.evaluate +model=$M plan=none "${EV[@]}" "hydra.run.dir=$OUT/evaluate/baseline_$M" &
done
wait
part baselines
fi

if has 1; then
# 1. difa's default (trajectory search over block cells) in budget mode, its latency model timed at the evaluation
#    batch (25 images per call).
for M in $MODELS; do
  calibrate -m $L +model=$M budget=0.3,0.4,0.5,0.6,0.7,0.8,0.9 latency_batch=25 \
    'out=plans/sweeps/${model.name}_difa_b${budget}.json' "hydra.sweep.dir=$OUT/calibrate/budget_$M"
  python -m difa.evaluate -m $L +model=$M "${EV[@]}" +budget=0.3,0.4,0.5,0.6,0.7,0.8,0.9 \
    'plan=plans/sweeps/${model.name}_difa_b${budget}.json' "hydra.sweep.dir=$OUT/evaluate/budget_$M"
done
part "difa budgets"
fi

if has 1f; then
# 1f. What forecast cells add over reuse alone (issue 19's ablation): the same budgets with candidates=[reuse], so
#     every skipped block reuses its last residual instead of extrapolating it; same latency model and search.
for M in $MODELS; do
  calibrate -m $L +model=$M budget=0.4,0.6,0.8 latency_batch=25 'candidates=[reuse]' \
    'out=plans/sweeps/${model.name}_reuse_b${budget}.json' "hydra.sweep.dir=$OUT/calibrate/reuse_$M"
  python -m difa.evaluate -m $L +model=$M "${EV[@]}" +budget=0.4,0.6,0.8 +tag=difa-reuse-only \
    'plan=plans/sweeps/${model.name}_reuse_b${budget}.json' "hydra.sweep.dir=$OUT/evaluate/reuse_$M"
done
part "reuse-only ablation"
fi

if has 1g; then
# 1g. The greedy over attention cells (search=greedy, the previous default) over DiTFastAttn's thresholds
#     (Table 1: D1..D6 = 0.025..0.15); DiTFastAttn's four candidates (ast, wars, asc, wars+asc) and its loss (both
#     CFG halves, unguided) at D2, D4, D6.
for M in $MODELS; do
  calibrate -m $L +model=$M search=greedy threshold=0.025,0.05,0.075,0.1,0.125,0.15 \
    'out=plans/sweeps/${model.name}_difa_d${threshold}.json' "hydra.sweep.dir=$OUT/calibrate/threshold_$M"
  calibrate -m $L +model=$M search=greedy threshold=0.05,0.1,0.15 'candidates=[ast,wars,asc,wars+asc]' loss_on=halves \
    'out=plans/sweeps/${model.name}_ditfastattn_d${threshold}.json' "hydra.sweep.dir=$OUT/calibrate/ditfastattn_$M"
  python -m difa.evaluate -m $L +model=$M "${EV[@]}" +variant=difa +delta=0.025,0.05,0.075,0.1,0.125,0.15 \
    'plan=plans/sweeps/${model.name}_${variant}_d${delta}.json' "hydra.sweep.dir=$OUT/evaluate/threshold_$M"
  python -m difa.evaluate -m $L +model=$M "${EV[@]}" +variant=ditfastattn +delta=0.05,0.1,0.15 \
    'plan=plans/sweeps/${model.name}_${variant}_d${delta}.json' "hydra.sweep.dir=$OUT/evaluate/ditfastattn_$M"
done
part "greedy and DiTFastAttn thresholds"
fi

if has 2; then
# 2. Single-technique ablation (DiTFastAttn Table 2 shape) at D4 = 0.1, calibration restricted to one candidate,
#    with DiTFastAttn's loss (loss_on=halves) as in the paper: every self-attention technique on the DiT; T-GATE
#    (cross-attention only) on PixArt.
calibrate -m $L +model=fmnist_dit search=greedy threshold=0.1 +technique=ast,wars,asc,wars+asc,tome,agent \
  'candidates=[${technique}]' loss_on=halves 'out=plans/ablation/${model.name}_${technique}_d${threshold}.json' \
  "hydra.sweep.dir=$OUT/calibrate/ablation_fmnist_dit"
python -m difa.evaluate -m $L +model=fmnist_dit "${EV[@]}" +delta=0.1 +technique=ast,wars,asc,wars+asc,tome,agent \
  'plan=plans/ablation/${model.name}_${technique}_d${delta}.json' "hydra.sweep.dir=$OUT/evaluate/ablation_fmnist_dit"
if [[ " $MODELS " == *" fmnist_pixart "* ]]; then
  calibrate +model=fmnist_pixart search=greedy threshold=0.1 'candidates=[tgate]' loss_on=halves \
    'out=plans/ablation/${model.name}_tgate_d${threshold}.json' "hydra.run.dir=$OUT/calibrate/ablation_fmnist_pixart"
  python -m difa.evaluate +model=fmnist_pixart "${EV[@]}" +delta=0.1 +technique=tgate \
    'plan=plans/ablation/${model.name}_${technique}_d${delta}.json' "hydra.run.dir=$OUT/evaluate/ablation_fmnist_pixart"
fi
part ablation
fi

if has 3; then
# 3. Peers on the same models, seeds and metric code: difa's implementations of ToMe-SD, AgentSD and T-GATE
#    (presets), and diffusers' own Pyramid Attention Broadcast and First Block Cache hooks (the real code).
for M in $MODELS; do
  python -m difa.evaluate -m $L +model=$M "${EV[@]}" plan=preset:tomesd,preset:agentsd \
    "hydra.sweep.dir=$OUT/evaluate/peers_presets_$M"
  python -m difa.evaluate -m $L +model=$M "${EV[@]}" plan=diffusers:pab skip=2,4 \
    "hydra.sweep.dir=$OUT/evaluate/peers_pab_$M"
  python -m difa.evaluate -m $L +model=$M "${EV[@]}" plan=diffusers:fbc threshold=0.02,0.05,0.1,0.2,0.4 \
    "hydra.sweep.dir=$OUT/evaluate/peers_fbc_$M"
done
if [[ " $MODELS " == *" fmnist_pixart "* ]]; then
  python -m difa.evaluate -m $L +model=fmnist_pixart "${EV[@]}" plan=preset:tgate gate_step=5,10 \
    "hydra.sweep.dir=$OUT/evaluate/peers_tgate_fmnist_pixart"
fi
part peers
fi

if has 3c; then
# 3c. cache-dit's DBCache (the real package, `pip install 'difa[peers]'`) over its documented knobs: Fn_compute_blocks
#     1 and 2 (its default 8 caches nothing on these 8-block models), residual_diff_threshold 0.05 to 0.2 (its
#     default 0.08 inside), 2 warm-up steps (its default 8 would fix 40% of 20 steps); then F1 with its TaylorSeer
#     calibrator (order 1).
for M in $MODELS; do
  for F in 1 2; do
    python -m difa.evaluate -m $L +model=$M "${EV[@]}" plan=cachedit:dbcache fn_blocks=$F warmup_steps=2 \
      +tag=cachedit-F$F threshold=0.05,0.1,0.2 "hydra.sweep.dir=$OUT/evaluate/peers_cachedit_F${F}_$M"
  done
  python -m difa.evaluate -m $L +model=$M "${EV[@]}" plan=cachedit:dbcache fn_blocks=1 warmup_steps=2 taylorseer=1 \
    +tag=cachedit-F1-taylorseer threshold=0.05,0.1,0.2 "hydra.sweep.dir=$OUT/evaluate/peers_cachedit_ts_$M"
done
part "cache-dit"
fi

if has 3d; then
# 3d. The one-line caching peers of diffusers 0.42.1 (issue 19), the real hooks, over the ranges their docs recommend:
#     TaylorSeer (forecasts every block's output; cache_interval 2, 3 and its default 5, order 1, its 3 warm-up
#     steps), MagCache (its default threshold 0.06 and looser 0.12, 0.24; its one-image calibration run is counted
#     in calib_s), FasterCache (attention reuse every 2 or 3 steps, the unconditional batch every 5, its defaults);
#     and SmoothCache (dit-smoothcache, schedules calibrated on 10 inputs at its published alphas 0.18 and 0.35;
#     N = 3). Ten points per model, so that the part fits a session (about 20 min). SeaCache does not apply to these models (one-line refusal, tests/test_peers_diffusers.py).
for M in $MODELS; do
  python -m difa.evaluate -m $L +model=$M "${EV[@]}" plan=diffusers:taylorseer order=1 cache_interval=2,3,5 \
    +tag=taylorseer "hydra.sweep.dir=$OUT/evaluate/peers_taylorseer_$M"
  python -m difa.evaluate -m $L +model=$M "${EV[@]}" plan=diffusers:magcache threshold=0.06,0.12,0.24 \
    "hydra.sweep.dir=$OUT/evaluate/peers_magcache_$M"
  python -m difa.evaluate -m $L +model=$M "${EV[@]}" plan=diffusers:fastercache skip=2,3 \
    "hydra.sweep.dir=$OUT/evaluate/peers_fastercache_$M"
  python -m difa.evaluate -m $L +model=$M "${EV[@]}" plan=smoothcache:calibrate threshold=0.18,0.35 \
    +tag=smoothcache "hydra.sweep.dir=$OUT/evaluate/peers_smoothcache_$M"
done
part "diffusers hooks and SmoothCache"
fi

if has 5; then
# 5. DiTFastAttn's residual rule (an `asc` step also refreshes the window residual; DESIGN.md §7) against difa's
#    (only `full` steps do), same candidates, loss and thresholds as the `ditfastattn` variant of part 1.
for M in $MODELS; do
  calibrate -m $L +model=$M search=greedy threshold=0.05,0.1,0.15 'candidates=[ast,wars,asc,wars+asc]' \
    loss_on=halves 'techniques={wars: {residual_from: full+asc}}' \
    'out=plans/sweeps/${model.name}_ditfastattn-rule_d${threshold}.json' "hydra.sweep.dir=$OUT/calibrate/dfarule_$M"
  python -m difa.evaluate -m $L +model=$M "${EV[@]}" +variant=ditfastattn-rule +delta=0.05,0.1,0.15 +tag=ditfastattn-rule \
    'plan=plans/sweeps/${model.name}_${variant}_d${delta}.json' "hydra.sweep.dir=$OUT/evaluate/dfarule_$M"
done
part "residual rule"
fi

if has 4; then
# 4. Tables and figures.
python experiments/collect.py "$OUT/evaluate" --out experiments/results --heatmaps
if compgen -G "$OUT/evaluate/ablation_*" > /dev/null; then
  python experiments/collect.py $OUT/evaluate/threshold_* $OUT/evaluate/ditfastattn_* $OUT/evaluate/ablation_* \
    --out experiments/results/ablation --x attn_flops
fi
fi
part "total (N=$N)"
