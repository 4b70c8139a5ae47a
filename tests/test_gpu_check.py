"""benchmarks/gpu_check.sh in its dry-run mode (CPU): every check line passes, and a broken kernel is caught."""

from __future__ import annotations

import subprocess
import sys

import torch

from difa.cli.common import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_dry_run_passes_and_prints_one_line_per_check():
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert sum(line.startswith("PASS") for line in lines) == len(gpu_check.DRY_SIZES)
    assert sum(line.startswith("INFO") for line in lines) == len(gpu_check.DRY_SIZES)
    assert lines[-1].startswith("gpu_check: all checks passed")


def test_the_reference_catches_a_wrong_band(monkeypatch):
    """The check fails when the kernel's band is off by one token."""
    real = gpu_check.window_attention
    monkeypatch.setattr(gpu_check, "window_attention", lambda q, k, v, w: real(q, k, v, w + 1))
    ok, line = gpu_check.check_window("cpu", torch.float32, 64)
    assert not ok and "max err" in line
    monkeypatch.undo()
    assert gpu_check.check_window("cpu", torch.float32, 64)[0]


def test_without_cuda_it_says_so_in_one_line(capsys):
    if torch.cuda.is_available():
        return
    assert gpu_check.main([]) == 2
    assert "no CUDA device here" in capsys.readouterr().out


def test_bench_scale_runs_every_plan_at_a_toy_size(capsys):
    """benchmarks/bench_scale.py at DiT-XL's width, one block, 256 tokens: a row per plan with finite numbers, the
    all-full plan at FLOPs 1 and predicted 1, and block reuse at about half the FLOPs (every second step skipped)."""
    import math
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_scale

    bench_scale.main(["--archs", "dit", "--tokens", "256", "--reps", "1", "--depth", "1"])
    rows = {line.split()[2]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("dit ") and len(line.split()) == 9}
    assert set(rows) == {"all-full", "wars", "ast", "asc", "wars+asc", "tome", "agent", "d6-mix", "reuse", "forecast"}
    assert all(math.isfinite(float(v)) for r in rows.values() for v in (r[4], r[6], r[7], r[8]))
    assert float(rows["all-full"][6]) == 1.0 and float(rows["all-full"][7]) == 1.0
    assert 0.6 < float(rows["reuse"][6]) < 0.72  # 1 of 3 steps skipped: the block's FLOPs, not the embedding's
