"""Adding a technique is one file plus one registry entry: the README's example, taken from the README itself,
registered and run through plan validation, the engine and the summary, against a naive reference."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

import difa
from difa.calibration import fixed_plan
from difa.apply import plan_blocks
from difa.techniques import letters, register, unregister
from tests.conftest import GUIDANCE, STEPS, generate, tiny

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def half_reuse(tmp_path, monkeypatch):
    code = re.search(r'```python\n("""`half_reuse`.*?)```', README.read_text(), re.S).group(1)
    path = tmp_path / "half_reuse.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("half_reuse", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    register(module.TECHNIQUE)  # the one registry line
    yield module
    unregister(module.NAME)


def test_the_readme_example_technique_runs_everywhere(half_reuse):
    pipe = tiny("dit")
    ref = generate(pipe, "dit")
    blocks = [m for _, m in plan_blocks(pipe)]
    plan = fixed_plan(pipe, lambda i, t: "full", steps=STEPS, guidance_scale=GUIDANCE["dit"],
                      block=lambda j, t: "half_reuse" if t % 2 else "full")
    assert plan.block_counts()["half_reuse"] == len(blocks) * (STEPS // 2) and letters()["half_reuse"] == "H"
    assert difa.Plan.from_json(plan.to_json()) == plan  # validation knows it
    difa.apply_plan(pipe, plan)
    got = generate(pipe, "dit")
    difa.remove_plan(pipe)

    expected = naive_scaled_reuse(pipe, blocks, 0.5)
    assert not torch.equal(expected, ref)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def naive_scaled_reuse(pipe, blocks, factor: float) -> torch.Tensor:
    """The naive reference, written with plain forward hooks: at odd steps every block returns its input plus
    `factor` times its residual (output - input) of the last computed step."""
    step, last = [-1], {}
    handles = [pipe.transformer.register_forward_pre_hook(lambda m, a: step.__setitem__(0, step[0] + 1))]

    def hook(j):
        def h(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            if step[0] % 2:
                return x + factor * last[j]
            last[j] = out - x
            return out
        return h

    handles += [b.register_forward_hook(hook(j), with_kwargs=True) for j, b in enumerate(blocks)]
    try:
        return generate(pipe, "dit")
    finally:
        for h in handles:
            h.remove()
