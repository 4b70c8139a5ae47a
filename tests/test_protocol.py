"""The technique protocol: a new technique is one file plus one registry line. Two techniques are written here into
temporary modules, as a contributor would write them, and registered with one line each:

- `scaled_reuse`, a block technique with a Config parameter (reuse times `scale`): validated in a plan file,
  executed (against naive forward hooks), scored by its own estimator in the search's error table, chosen by the
  default search where it is best, counted in cache memory and drawn in the heatmap;
- `attn_reuse`, a block technique with a new kind of cache (slot `attn1_out`: the block's self-attention output,
  filled from the submodule by the engine): the same, against the naive reference `ast` on the block's attn1.
"""

from __future__ import annotations

import importlib.util
import textwrap

import pytest
import torch

import difa
from difa.apply import plan_blocks
from difa.calibration import calibrate_pipeline, fixed_plan, search
from difa.calibration import table as error_table
from difa.calibration.latency import LatencyModel
from difa.cost import cache_elements
from difa.errors import DifaError
from difa.plan import Plan
from difa import plots
from difa.techniques import Technique, default_candidates, letters, register, unregister
from tests.conftest import GUIDANCE, INPUTS, STEPS, generate, tiny
from tests.test_plots import colours_in, rgb255
from tests.test_registry import naive_scaled_reuse

pytestmark = pytest.mark.usefixtures("one_thread")

SCALED = '''
    """`scaled_reuse`: skip the block, add its last residual contribution times `scale`."""
    import math
    from dataclasses import dataclass

    from difa.errors import DifaError
    from difa.techniques.blocks import RESIDUAL, stand_in
    from difa.techniques.protocol import BLOCK, Technique, skipped_block

    NAME = "scaled_reuse"


    @dataclass(frozen=True)
    class Config:
        scale: float = 1.0


    def check_config(params):
        scale = params.get(NAME, {}).get("scale", 1.0)  # (its type is checked against the default's first)
        if scale < 0:
            raise DifaError(f"techniques.{NAME}.scale must be >= 0, got {scale!r}")


    def estimate(points, step, config):
        return config.scale * points[-1][1]


    def run(cell, x, compute):
        return stand_in(cell, x, estimate, 1, NAME)


    TECHNIQUE = Technique(NAME, "S", "#aec7e8", (BLOCK,), config=Config, run=run, estimate=estimate,
                          reads=(RESIDUAL,), skips_block=True, block_cost=skipped_block, check_config=check_config,
                          candidate=True)
'''

ATTN_REUSE = '''
    """`attn_reuse`: run the block, but its self-attention returns its output from the block's last computed step."""
    from difa.errors import DifaError
    from difa.techniques.blocks import OUTPUT, RESIDUAL, computed
    from difa.techniques.protocol import BLOCK, Slot, Technique

    NAME = "attn_reuse"
    ATTN_OUT = "attn1_out"
    # (B, N, C) the block's self-attention output, filled by the engine from the submodule wherever `full` runs
    SLOT = Slot(ATTN_OUT, BLOCK, "submodule:attn1", lambda s, cfg: s.batch * s.n_q * s.dim, writers=("full",),
                doc="the block's self-attention output")


    def run(cell, x, compute):
        return computed(cell, x, compute)


    def attention_output(cell, x):
        out = cell.state.get(ATTN_OUT)
        if out is None:
            raise DifaError(f"{cell.name} step {cell.step}: nothing cached")
        return out


    TECHNIQUE = Technique(NAME, "Q", "#98df8a", (BLOCK,), run=run, reads=(ATTN_OUT,), writes=(RESIDUAL, OUTPUT),
                          replaces="attn1", replace=attention_output, slots=(SLOT,))
'''


def load(tmp_path, name: str, code: str):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(code))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def registered(tmp_path, name: str, code: str):
    module = load(tmp_path, name, code)
    register(module.TECHNIQUE)  # the one registry line
    yield module
    unregister(module.NAME)


@pytest.fixture
def scaled(tmp_path):
    yield from registered(tmp_path, "scaled_reuse", SCALED)


@pytest.fixture
def attn_reuse(tmp_path):
    yield from registered(tmp_path, "attn_reuse", ATTN_REUSE)


def held_bytes(pipe, plan) -> tuple[int, int]:
    """(bytes the engine holds after a generation, bytes the cost model accounts for)."""
    engine = difa.apply_plan(pipe, plan)
    generate(pipe, "dit")
    shapes = [engine.shapes.get(i) for i in range(len(plan.layers))]
    held = engine.cache_bytes()
    difa.remove_plan(pipe)
    return held, cache_elements(plan, shapes) * 4  # float32


def test_a_technique_with_a_parameter(scaled, tmp_path):
    pipe = tiny("dit")
    ref = generate(pipe, "dit")
    plan = fixed_plan(pipe, lambda i, t: "full", steps=STEPS, guidance_scale=GUIDANCE["dit"],
                      block=lambda j, t: "scaled_reuse" if t % 2 else "full",
                      techniques={"scaled_reuse": {"scale": 0.5}})
    assert letters()["scaled_reuse"] == "S" and "scaled_reuse" in default_candidates()
    assert Plan.from_json(plan.to_json()) == plan  # validation knows it, and its parameter
    for bad, message in (({"scale": "x"}, "scale must be a number"), ({"scale": -1.0}, "scale must be >= 0"),
                         ({"sacle": 1.0}, "unknown parameter")):
        d = plan.to_dict()
        d["techniques"]["scaled_reuse"] = bad
        with pytest.raises(DifaError, match=message) as e:
            Plan.from_dict(d)
        assert "\n" not in str(e.value)

    difa.apply_plan(pipe, plan)
    got = generate(pipe, "dit")
    difa.remove_plan(pipe)
    blocks = [m for _, m in plan_blocks(pipe)]
    expected = naive_scaled_reuse(pipe, blocks, 0.5)
    assert not torch.equal(expected, ref)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    held, accounted = held_bytes(pipe, plan)  # one residual per block
    assert held == accounted > 0

    path = plots.plan_heatmap(plan, tmp_path / "plan.png")
    assert rgb255("#aec7e8") in colours_in(path)


def synthetic(decay: float, blocks: int = 2, steps: int = 6) -> error_table.Trajectory:
    """Residuals r[j][s] = decay^s * base: scaled reuse with scale=decay is exact, plain reuse is not."""
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(1, 8, 4, generator=g) for _ in range(blocks)]
    residual = [{s: base[j] * decay ** s for s in range(steps)} for j in range(blocks)]
    scale = [{s: float(residual[j][s].abs().sum()) for s in range(steps)} for j in range(blocks)]
    return error_table.Trajectory(residual, scale, torch.zeros(1))


def test_the_search_scores_it_with_its_own_estimator(scaled):
    traj = synthetic(0.5)
    exact = search.Table(traj, params={"scaled_reuse": {"scale": 0.5}})
    assert exact.error(0, 3, [0, 2], "scaled_reuse") == pytest.approx(0.0, abs=1e-7)
    r2, r3 = traj.residual[0][2], traj.residual[0][3]
    assert exact.error(0, 3, [0, 2], "reuse") == pytest.approx(float((r2 - r3).abs().sum()) / traj.scale[0][3])
    wrong = search.Table(traj, params={"scaled_reuse": {"scale": 3.0}})
    assert wrong.error(0, 3, [0, 2], "scaled_reuse") > wrong.error(0, 3, [0, 2], "reuse")

    latency = LatencyModel(step_s=1.0, fixed_s=0.0, block_s=(0.5, 0.5), ff_s=(0.0, 0.0), skip_s=(0.01, 0.01),
                           block_names=("b0", "b1"))
    methods = ["reuse", "scaled_reuse"]

    def skipped_methods(table) -> set[str]:
        seq = search.greedy_sequence(table, latency, 2, 6, methods, lambda c: c.predicted <= 0.6, 6.0)
        return {m for row in seq[-1].rows for m in row} - {"full"}

    assert skipped_methods(exact) == {"scaled_reuse"}  # chosen where it is best
    assert skipped_methods(wrong) == {"reuse"}  # and not where it is not


def test_the_default_search_calibrates_with_it(scaled):
    pipe = tiny("dit")
    plan = calibrate_pipeline(pipe, INPUTS["dit"], threshold=0.05, budget=0.85, steps=STEPS,
                              guidance_scale=GUIDANCE["dit"], candidates=["scaled_reuse"],
                              techniques={"scaled_reuse": {"scale": 0.9}}, latency_cache=None)
    assert plan.block_counts().get("scaled_reuse", 0) > 0
    assert plan.techniques["scaled_reuse"] == {"scale": 0.9} and plan.calibration["candidates"] == ["scaled_reuse"]
    assert Plan.from_json(plan.to_json()) == plan


def test_a_technique_with_a_new_cache_slot(attn_reuse, tmp_path):
    pipe = tiny("dit")
    ref = generate(pipe, "dit")
    reused = lambda j, t: t % 2 == 1 and j in (0, 2)  # noqa: E731
    plan = fixed_plan(pipe, lambda i, t: "full", steps=STEPS, guidance_scale=GUIDANCE["dit"],
                      block=lambda j, t: "attn_reuse" if reused(j, t) else "full")
    assert Plan.from_json(plan.to_json()) == plan
    d = plan.to_dict()
    d["block_methods"][d["model"]["blocks"][0]][0] = "attn_reuse"
    with pytest.raises(DifaError, match="no earlier step computes"):
        Plan.from_dict(d)

    difa.apply_plan(pipe, plan)
    got = generate(pipe, "dit")
    difa.remove_plan(pipe)
    # the naive reference: DiTFastAttn's `ast` on the same blocks' attn1 returns the same cached module output
    layers = plan.model.layers
    ast_plan = fixed_plan(pipe, lambda i, t: "ast" if reused(int(layers[i].split(".")[1]), t)
                          and layers[i].endswith("attn1") else "full", steps=STEPS, guidance_scale=GUIDANCE["dit"])
    assert ast_plan.counts().get("ast", 0) == 2 * (STEPS // 2)
    difa.apply_plan(pipe, ast_plan)
    expected = generate(pipe, "dit")
    difa.remove_plan(pipe)
    assert not torch.equal(expected, ref)
    assert torch.equal(got, expected)
    assert torch.equal(generate(pipe, "dit"), ref)  # undo: the wrapped submodules are stock again

    held, accounted = held_bytes(pipe, plan)  # the new slot, one (B, N, C) tensor per reusing block
    shapes = [s for s in plan_shapes(pipe, plan)]
    assert held == accounted == 2 * shapes[0].batch * shapes[0].n_q * shapes[0].dim * 4

    path = plots.plan_heatmap(plan, tmp_path / "plan.png")
    assert rgb255("#98df8a") in colours_in(path)


def plan_shapes(pipe, plan):
    engine = difa.apply_plan(pipe, plan)
    generate(pipe, "dit")
    difa.remove_plan(pipe)
    return [engine.shapes[i] for i in range(len(plan.layers))]


def test_the_registry_checks_each_description():
    def run(cell, x, compute):
        return compute()

    with pytest.raises(ValueError, match="letter"):
        register(Technique("clash", "F", "#000001", ("block",), run=run))  # `full`'s letter
    with pytest.raises(ValueError, match="declared by no technique"):
        register(Technique("orphan", "?", "#000002", ("block",), run=run, reads=("nowhere",)))
    with pytest.raises(ValueError, match="needs run"):
        register(Technique("no_run", "!", "#000003", ("block",)))
    with pytest.raises(ValueError, match="needs execute"):
        register(Technique("no_execute", "~", "#000004", ("attn1",)))
    assert {"clash", "orphan", "no_run", "no_execute"}.isdisjoint(letters())
