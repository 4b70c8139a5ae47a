# Sourced by sweeps.sh and transfer.sh: one thread per job, offline, the shared sizes and the evaluate settings.
# Evaluate settings shared by every job: the uncompressed baseline of (model, N, seeds) is generated once (cached
# under runs/cache/baseline) and, in every job, timed side by side with the method on the first batch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
N=${N:-100}
OUT=${OUT:-multirun}
MODELS=${MODELS:-"fmnist_dit fmnist_pixart"}
L=hydra/launcher=local
# time_batches=3: the baseline is timed next to the method on 3 of the 4 batches (rel_latency: the median of the
# 3 paired ratios, with their min and max)
EV=(n=$N ref_n=2000 batch=25 warmup=false time_batches=3 'out=${hydra:runtime.output_dir}/evaluate.csv')
# CALIBRATE=0 reuses the plan files already under plans/ (e.g. to re-evaluate them with other metrics)
calibrate() {
  if [[ ${CALIBRATE:-1} == 1 ]]; then python -m difa.calibrate "$@"; else echo "[sweeps] CALIBRATE=0: plans under plans/ reused"; fi
}
