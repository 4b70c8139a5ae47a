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
EV=(n=$N ref_n=2000 batch=25 warmup=false time_batches=1 'out=${hydra:runtime.output_dir}/evaluate.csv')
