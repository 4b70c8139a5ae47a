"""torch.compile with a plan applied (README "Works with"). Regional compile (difa.compile_blocks, or diffusers'
compile_repeated_blocks): the engine routes block calls outside the compiled regions (difa/wrap.py), so the blocks'
computed paths compile during the first generation and never again, with no graph break inside a block of a
block-cell plan. Dynamo's behaviour (graphs, breaks, guards) does not depend on the backend, so most tests use the
`eager` backend; one runs inductor (gcc) on the tiny DiT."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import difa
from difa.adapters import adapter_for
from tests.conftest import STEPS, generate, tiny
from tests.test_stack import skip_plan

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def breaks() -> int:
    return sum(counters["graph_break"].values())


def graphs_by_step(pipe, family) -> tuple[torch.Tensor, list[int]]:
    """(images, dynamo's graph count at the start of each denoiser call) of one generation."""
    seen: list[int] = []
    model = adapter_for(pipe).denoiser(pipe)
    handle = model.register_forward_pre_hook(torch.compiler.disable(lambda *_: seen.append(graphs())))
    try:
        return generate(pipe, family), seen
    finally:
        handle.remove()


def compiles_in_the_first_steps_only(pipe, family) -> torch.Tensor:
    """The first generation: every graph exists by the third step (a computed step and a skipping one have run),
    so a step-dependent guard, which would compile each step anew, fails it. Its images."""
    out, seen = graphs_by_step(pipe, family)
    assert len(seen) == STEPS and seen[2] == seen[-1] == graphs(), seen
    return out


def second_generation_compiles_nothing(pipe, family) -> torch.Tensor:
    """Run a second generation with dynamo told to raise on any recompile; its images."""
    before = graphs()
    with dynamo.config.patch(error_on_recompile=True):
        out = generate(pipe, family)
    assert graphs() == before
    return out


@pytest.mark.parametrize("order", ["plan_first", "compile_first"])
def test_regional_compile_keeps_a_block_plan_without_breaks_or_recompiles(family, order):
    pipe = tiny(family)
    plan = skip_plan(pipe, family, "forecast")
    difa.apply_plan(pipe, plan)
    eager = generate(pipe, family)
    difa.remove_plan(pipe)
    if order == "compile_first":
        n = difa.compile_blocks(pipe, backend="eager", fullgraph=True)  # fullgraph: a break inside a block raises
        difa.apply_plan(pipe, plan)
    else:
        difa.apply_plan(pipe, plan)
        n = difa.compile_blocks(pipe, backend="eager", fullgraph=True)
    assert n == len(plan.model.blocks)
    first = compiles_in_the_first_steps_only(pipe, family)
    # every block shares the same graphs (two: the first block's input is a transposed view, the others' are not):
    # a per-block graph would exhaust torch's recompile limit (8) on a real model, which then silently runs eagerly
    assert 1 <= graphs() <= 2 < len(plan.model.blocks) and breaks() == 0
    torch.testing.assert_close(first, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(second_generation_compiles_nothing(pipe, family), eager, rtol=0, atol=1e-6)
    difa.remove_plan(pipe)


def test_attention_cells_under_regional_compile_break_at_their_layers_only():
    """An attention cell's dispatch runs outside the graph (it reads the step counter): a break at each planned
    attention layer, and still no recompile after the first generation."""
    pipe = tiny("pixart")
    plan = skip_plan(pipe, "pixart", "reuse", lambda i, t: "wars" if t % 2 == 0 and t > 0 else "full")
    planned = sum(any(m != "full" for m in row) for row in plan.methods)
    difa.apply_plan(pipe, plan)
    eager = generate(pipe, "pixart")
    difa.compile_blocks(pipe, backend="eager")
    torch.testing.assert_close(compiles_in_the_first_steps_only(pipe, "pixart"), eager, rtol=0, atol=1e-6)
    assert 0 < breaks() and planned > 0
    torch.testing.assert_close(second_generation_compiles_nothing(pipe, "pixart"), eager, rtol=0, atol=1e-6)
    difa.remove_plan(pipe)


def test_whole_denoiser_compile_runs_a_plan_without_recompiles():
    """torch.compile on the whole denoiser: the engine's step hook and routed blocks run outside the graph, so the
    images are the eager plan's and a new step does not recompile (the routed blocks themselves run eagerly there:
    compile the blocks for speed)."""
    pipe = tiny("dit")
    plan = skip_plan(pipe, "dit", "forecast")
    difa.apply_plan(pipe, plan)
    eager = generate(pipe, "dit")
    pipe.transformer.compile(backend="eager")
    torch.testing.assert_close(compiles_in_the_first_steps_only(pipe, "dit"), eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(second_generation_compiles_nothing(pipe, "dit"), eager, rtol=0, atol=1e-6)
    difa.remove_plan(pipe)
    full = generate(pipe, "dit")
    assert not torch.equal(full, eager)


def test_inductor_compiled_plan_matches_the_eager_plan():
    pipe = tiny("dit")
    plan = skip_plan(pipe, "dit", "forecast")
    difa.apply_plan(pipe, plan)
    eager = generate(pipe, "dit")
    difa.compile_blocks(pipe)  # inductor, the default backend (gcc)
    torch.testing.assert_close(compiles_in_the_first_steps_only(pipe, "dit"), eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second_generation_compiles_nothing(pipe, "dit"), eager, rtol=1e-4, atol=1e-4)
    difa.remove_plan(pipe)
