"""benchmarks/gpu_check.sh in its dry-run mode (CPU): every check line passes, and a broken kernel is caught."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys

import torch

from difa.cli.common import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_dry_run_passes_and_prints_one_line_per_check():
    # the script calls `python`: this interpreter's, also when the venv is not activated
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PATH": path})
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert sum(line.startswith("PASS") for line in lines) == len(gpu_check.DRY_SIZES)
    assert sum(line.startswith("INFO") for line in lines) == len(gpu_check.DRY_SIZES)
    assert any(line.startswith("gpu_check: all checks passed") for line in lines)
    stack = [line for line in lines if line.startswith(("ok   ", "FAIL "))]  # benchmarks/gpu_stack_check.py
    assert len(stack) == 10 and all(line.startswith("ok") for line in stack), stack


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


@pytest.mark.slow
def test_bench_scale_runs_every_plan_at_a_toy_size(capsys):
    """benchmarks/bench_scale.py at DiT-XL's width, three blocks, 256 tokens: a row per plan with finite numbers, the
    all-full plan at FLOPs 1 and predicted 1, and block reuse at about two thirds of the FLOPs (1 of 3 steps
    skipped). With one block the DiTFastAttn-like mix is plain `wars` and is left out."""
    import math
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_scale

    bench_scale.main(["--archs", "dit", "--tokens", "256", "--reps", "1", "--depth", "3"])
    rows = {line.split()[2]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("dit ") and len(line.split()) == 9}
    assert set(rows) == {"all-full", "wars", "ast", "asc", "wars+asc", "tome", "agent", "d6-mix", "reuse", "forecast"}
    assert all(math.isfinite(float(v)) for r in rows.values() for v in (r[4], r[6], r[7], r[8]))
    assert float(rows["all-full"][6]) == 1.0 and float(rows["all-full"][7]) == 1.0
    assert 0.6 < float(rows["reuse"][6]) < 0.72  # 1 of 3 steps skipped: the block's FLOPs, not the embedding's
    _, holder, _ = bench_scale.build("dit", 256, 1, torch.float32, "cpu")
    assert "d6-mix" not in bench_scale.plans(holder, 3) and "wars" in bench_scale.plans(holder, 3)


def test_window_split_benchmark_computes_the_band_exactly():
    """benchmarks/bench_window_split.py's log-sum-exp split (middle + two causal triangles, merged) on the interior
    query blocks equals dense band attention written out here (explicit N×N mask and softmax)."""
    import math

    import bench_window_split

    n, w, b = 256, 32, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 8, generator=g) for _ in range(3))  # (B, H, N, D)
    pos = torch.arange(n)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill((pos[:, None] - pos[None, :]).abs() > w, float("-inf"))  # (B, H, N, N)
    dense = scores.softmax(-1) @ v  # (B, H, N, D)
    got, count = bench_window_split.lse_split(q, k, v, w, b)  # (count, H, b, D): blocks from token w on
    assert count == (n - 2 * w) // b
    got = got.permute(1, 0, 2, 3).reshape(4, count * b, 8)  # (H, count·b, D)
    torch.testing.assert_close(got, dense[0, :, w: w + count * b], atol=1e-5, rtol=1e-5)
