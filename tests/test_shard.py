"""Sharded generation (difa.shard): two accelerate processes on CPU produce exactly the images of one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from difa import shard
from difa.calibration import fixed_plan
from difa.cli.common import REPO_ROOT
from difa.apply import apply_plan, remove_plan
from difa.errors import DifaError
from difa.models import pipeline_call_kwargs
from tests.conftest import GUIDANCE, tiny

STEPS = 3
INPUTS = [0, 1, 2, 3, 4, 5, 1]  # 7 jobs in batches of 2: 4 batches, the last one short; label 1 twice
PLAN = ("full", "asc", "ast")  # per step: caches and CFG sharing must survive sharding too

# Run as one process (python) and as two (accelerate launch); each process leaves <out>.rank<i> with the process
# count and the gathered images' shape, and the main process saves the images.
SCRIPT = textwrap.dedent(f"""
    import sys
    from pathlib import Path

    import torch
    torch.set_num_threads(1)
    from difa.calibration import fixed_plan
    from difa.apply import apply_plan
    from difa.models import pipeline_call_kwargs
    from difa.shard import generate_sharded, make_jobs, pipeline_generate, process_state
    from tests.conftest import tiny

    pipe = tiny("dit")
    apply_plan(pipe, fixed_plan(pipe, lambda i, t: {PLAN!r}[t], steps={STEPS}, guidance_scale={GUIDANCE['dit']}))
    generate = pipeline_generate(pipe, steps={STEPS}, guidance_scale={GUIDANCE['dit']}, extra=pipeline_call_kwargs("dit"))
    images = generate_sharded(generate, make_jobs({INPUTS!r}, seed=5), batch=2, cpu=True)
    state = process_state(cpu=True)
    out = Path(sys.argv[1])
    out.with_suffix(f".rank{{state.process_index}}").write_text(f"{{state.num_processes}} {{tuple(images.shape)}}")
    if state.is_main_process:
        torch.save(images, sys.argv[1])
""")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_every_job_once_in_fixed_batches(world):
    jobs = shard.make_jobs(list(range(11)), seed=0)
    chunks = list(enumerate(shard.batches(jobs, 3)))
    assert [len(c) for _, c in chunks] == [3, 3, 3, 2]  # the batches do not depend on the process count
    shares = [shard.shard(chunks, r, world) for r in range(world)]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    got = sorted((k, j.index) for share in shares for k, chunk in share for j in chunk)
    assert [i for _, i in got] == list(range(11))


def test_job_seeds_are_distinct_and_reproducible():
    a, b = shard.make_jobs([3] * 50, seed=0), shard.make_jobs([3] * 50, seed=0)
    assert a == b and len({j.seed for j in a}) == 50
    assert [j.seed for j in shard.make_jobs([3] * 50, seed=1)] != [j.seed for j in a]


def test_bad_batch_and_rank():
    with pytest.raises(DifaError, match="batch size must be an integer >= 1"):
        shard.batches([1, 2], 0)
    with pytest.raises(DifaError, match="outside 0..1"):
        shard.shard([1, 2], 2, 2)


def test_one_process_returns_every_image_in_job_order():
    pipe = tiny("dit")
    apply_plan(pipe, fixed_plan(pipe, lambda i, t: PLAN[t], steps=STEPS, guidance_scale=GUIDANCE["dit"]))
    generate = shard.pipeline_generate(pipe, steps=STEPS, guidance_scale=GUIDANCE["dit"],
                                       extra=pipeline_call_kwargs("dit"))
    jobs = shard.make_jobs(INPUTS, seed=5)
    try:
        images = shard.generate_sharded(generate, jobs, batch=2, cpu=True)
        alone = generate([jobs[6]])  # the last job by itself: its noise comes from its own seed only
        by_hand = torch.cat([generate(c) for c in shard.batches(jobs, 2)])
    finally:
        remove_plan(pipe)
    assert images.shape == (len(INPUTS), 3, 128, 128) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, by_hand)
    torch.testing.assert_close(images[6:7], alone, atol=1e-4, rtol=0)  # batch neighbours only move rounding
    assert not torch.allclose(images[1], images[6], atol=1e-3)  # same label, different seeds


def test_mislaunch_is_refused(monkeypatch):
    """WORLD_SIZE=2 but a process group of one (e.g. cpu=False on a CPU machine): every process would make
    every image, so refuse."""
    class Alone:
        def __init__(self, cpu=False):
            self.num_processes, self.process_index, self.is_main_process = 1, 0, True

    monkeypatch.setattr("accelerate.PartialState", Alone)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DifaError, match="launched 2 processes but accelerate joined 1"):
        shard.generate_sharded(lambda c: torch.zeros(len(c), 1), shard.make_jobs([0, 1], 0), batch=1, cpu=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(script), str(tmp_path / "two.pt")]
    two = subprocess.run(launch, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    shape = str((len(INPUTS), 3, 128, 128))
    assert (tmp_path / "one.rank0").read_text() == f"1 {shape}"
    # really two processes, and both got every image back
    assert (tmp_path / "two.rank0").read_text() == (tmp_path / "two.rank1").read_text() == f"2 {shape}"
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a.shape == (len(INPUTS), 3, 128, 128)
    assert torch.equal(a, b)
