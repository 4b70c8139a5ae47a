"""Block cells (`reuse`, `forecast`, `forecast2`, `foca`, `mlp_reuse`) against naive references made of plain forward hooks, on the
real tiny pipelines; all-full exactness, undo, apply twice, and plan validation."""

from __future__ import annotations

import json

import pytest
import torch

import difa
from difa.wrap import ROUTE, ROUTED
from difa.adapters import adapter_for
from difa.calibration import fixed_plan
from difa.apply import plan_blocks
from difa.errors import DifaError
from difa.plan import Plan, load_plan
from tests.conftest import GUIDANCE, STEPS, generate, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def schedule(method):
    """Every second step skips (or half-computes) every block but the first; block 0 always computes."""
    return lambda j, t: method if t % 2 and j > 0 else "full"


def block_plan(pipe, family, method, attention=lambda i, t: "full"):
    return fixed_plan(pipe, attention, steps=STEPS, guidance_scale=GUIDANCE[family], block=schedule(method))


def foca_by_steps(pts, s):
    """FoCa's predictor-corrector run one step at a time (after cache-dit's FoCaCalibrator, with the anchor slope
    per step): from the last three computed (step, residual) points, the run after the second-last taken as the
    first-order forecast through the first two; then BDF2 at h = 1 plus the Heun correction towards the anchor."""
    (s0, r0), (s1, r1), (s2, r2) = pts
    before = r1 + (r1 - r0) * ((s2 - 1 - s1) / (s1 - s0))  # the value the step before s2 had (r1 if s2 - 1 == s1)
    anchor = (r2 - r1) / (s2 - s1)
    prev, cur = before, r2
    for _ in range(s2 + 1, s + 1):
        prev, cur = cur, 2 * cur - prev + 0.5 * (anchor - (cur - prev))
    return cur


def naive(pipe, family, method, run=generate) -> torch.Tensor:
    """The same schedule with forward hooks only: the blocks always run, and their outputs are replaced.
    `run(pipe, family)` generates (tests/test_families.py passes its own for the other families)."""
    model = adapter_for(pipe).denoiser(pipe)
    blocks = [m for _, m in plan_blocks(pipe)]
    step = [-1]
    cache: dict[int, list] = {j: [] for j in range(len(blocks))}  # j -> [(step, residual)], last two
    ff_cache: dict[int, torch.Tensor] = {}
    handles = [model.register_forward_pre_hook(lambda m, a: step.__setitem__(0, step[0] + 1))]

    def skipping(j):
        return schedule(method)(j, step[0]) == method

    def on_block(j):
        def hook(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            if method in ("reuse", "forecast", "forecast2", "foca") and skipping(j):
                pts, s = cache[j], step[0]
                if method == "reuse" or len(pts) < 2:
                    return x + pts[-1][1]
                if method == "forecast2" and len(pts) == 3:  # Newton's divided differences (the code: Lagrange)
                    (s0, r0), (s1, r1), (s2, r2) = pts
                    d01, d12 = (r1 - r0) / (s1 - s0), (r2 - r1) / (s2 - s1)
                    return x + (r2 + (s - s2) * d12 + (s - s2) * (s - s1) * (d12 - d01) / (s2 - s0))
                if method == "foca" and len(pts) == 3:
                    return x + foca_by_steps(pts, s)
                (s0, r0), (s1, r1) = pts[-2], pts[-1]
                return x + (r1 + (r1 - r0) * ((s - s1) / (s1 - s0)))
            cache[j] = [*cache[j][-2:], (step[0], out - x)]
            return out
        return hook

    def on_ff(j):
        def hook(module, args, out):
            if skipping(j):
                return ff_cache[j]
            ff_cache[j] = out
            return out
        return hook

    for j, b in enumerate(blocks):
        handles.append(b.register_forward_hook(on_block(j), with_kwargs=True))
        if method == "mlp_reuse":
            handles.append(b.ff.register_forward_hook(on_ff(j)))
    try:
        return run(pipe, family)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("method", ["reuse", "forecast", "forecast2", "foca", "mlp_reuse"])
def test_block_method_matches_naive_hooks(family, method):
    pipe = tiny(family)
    ref = generate(pipe, family)
    expected = naive(pipe, family, method)
    assert not torch.equal(expected, ref)  # the schedule really changes the images
    difa.apply_plan(pipe, block_plan(pipe, family, method))
    got = generate(pipe, family)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    difa.remove_plan(pipe)
    assert torch.equal(generate(pipe, family), ref)


def test_forecast_differs_from_reuse():
    pipe = tiny("dit")
    difa.apply_plan(pipe, block_plan(pipe, "dit", "reuse"))
    a = generate(pipe, "dit")
    difa.apply_plan(pipe, block_plan(pipe, "dit", "forecast"))
    b = generate(pipe, "dit")
    difa.apply_plan(pipe, block_plan(pipe, "dit", "forecast2"))  # its last skipped step has three points
    c = generate(pipe, "dit")
    difa.apply_plan(pipe, block_plan(pipe, "dit", "foca"))  # computed steps two apart: not the first-order forecast
    assert not torch.equal(b, a) and not torch.equal(c, b) and not torch.equal(generate(pipe, "dit"), b)
    difa.remove_plan(pipe)


def test_all_full_block_plan_is_bit_exact_and_undo(family):
    pipe = tiny(family)
    ref = generate(pipe, family)
    plan = block_plan(pipe, family, "full")
    assert plan.blocks and set(plan.block_counts()) == {"full"}
    difa.apply_plan(pipe, plan)
    assert torch.equal(generate(pipe, family), ref)
    plan = block_plan(pipe, family, "forecast")
    difa.apply_plan(pipe, plan)
    once = generate(pipe, family)
    difa.apply_plan(pipe, plan)  # replaces, never stacks
    assert torch.equal(generate(pipe, family), once)
    blocks = [m for _, m in plan_blocks(pipe)]
    stock = [type(b.ff) for b in blocks]
    # routed blocks: a subclass of the same name (difa/wrap.py); `forward` is never touched
    assert all(ROUTE in vars(b) and type(b).__name__ == type(b).__mro__[1].__name__ for b in blocks[1:])
    assert all("forward" not in vars(b) and "forward" not in vars(b.ff) for b in blocks)
    difa.remove_plan(pipe)
    assert all(ROUTE not in vars(b) and ROUTED not in type(b).__dict__ for b in blocks)
    assert [type(b.ff) for b in blocks] == stock
    assert torch.equal(generate(pipe, family), ref)


def test_skipped_blocks_do_not_run_attention():
    pipe = tiny("dit")
    calls = []
    attn = pipe.transformer.transformer_blocks[3].attn1
    h = attn.register_forward_pre_hook(lambda m, a: calls.append(1))
    difa.apply_plan(pipe, block_plan(pipe, "dit", "reuse"))
    generate(pipe, "dit")
    assert len(calls) == (STEPS + 1) // 2  # steps 0, 2, 4
    h.remove()


def test_block_cells_compose_with_attention_cells():
    """`ast` right after a skipped step reads the output of the last step that ran (two steps back)."""
    pipe = tiny("dit")
    plan = block_plan(pipe, "dit", "reuse", attention=lambda i, t: "ast" if t % 4 == 2 else "full")
    assert plan.methods[2][2] == "ast" and plan.blocks[1][1] == "reuse"
    difa.apply_plan(pipe, plan)
    a = generate(pipe, "dit")
    assert torch.isfinite(a).all()
    assert torch.equal(generate(pipe, "dit"), a)


def _edit(plan: Plan, **changes) -> dict:
    d = plan.to_dict()
    d.update(changes)
    return d


def test_contradictions_are_one_line_errors():
    pipe = tiny("dit")
    plan = block_plan(pipe, "dit", "reuse")
    d = plan.to_dict()
    layer = d["model"]["layers"][2]  # transformer_blocks.2.attn1, skipped at odd steps
    d["methods"][layer][1] = "ast"
    with pytest.raises(DifaError, match="moot") as e:
        Plan.from_dict(d)
    assert "\n" not in str(e.value)
    d = plan.to_dict()
    d["block_methods"][d["model"]["blocks"][1]][0] = "reuse"
    with pytest.raises(DifaError, match="no earlier step computes"):
        Plan.from_dict(d)
    d = plan.to_dict()
    row = d["block_methods"][d["model"]["blocks"][1]]
    row[:] = ["full", "mlp_reuse", "reuse", "mlp_reuse", "full", "full"]  # mlp_reuse at 3: ff last computed at 0
    Plan.from_dict(d)  # valid: the feed-forward output of step 0 is reused
    row[0] = "full"
    d["block_methods"][d["model"]["blocks"][1]] = ["full"] + ["ast"] * 5
    with pytest.raises(DifaError, match="not a block method"):
        Plan.from_dict(d)
    d = plan.to_dict()
    d["block_methods"].pop(d["model"]["blocks"][1])
    with pytest.raises(DifaError, match="one row per block"):
        Plan.from_dict(d)


def test_plan_with_blocks_round_trips_and_checks_identity(tmp_path):
    pipe = tiny("dit")
    plan = block_plan(pipe, "dit", "forecast")
    path = plan.save(tmp_path / "p.json")
    assert load_plan(path) == plan
    assert json.loads(path.read_text())["version"] == 3
    d = plan.to_dict()
    d["model"]["blocks"] = [n.replace("transformer_blocks", "blocks") for n in d["model"]["blocks"]]
    d["block_methods"] = {n.replace("transformer_blocks", "blocks"): r for n, r in d["block_methods"].items()}
    with pytest.raises(DifaError, match="cells for 4 blocks"):
        difa.apply_plan(pipe, Plan.from_dict(d))


def test_version_2_plans_still_load():
    import glob

    paths = [p for p in glob.glob("plans/*.json") if json.loads(open(p).read()).get("version") == 2]
    assert paths, "the repository ships version-2 plans"
    plan = load_plan(paths[0])
    assert plan.blocks == () and plan.model.blocks == ()


def test_second_order_forecast_is_the_parabola_through_three_points():
    """At uneven spacing (steps 0, 3, 4 -> 6): the value at 6 of the quadratic numpy fits through the three
    points, element by element; with two points it is the first-order forecast, with one the residual itself."""
    import numpy as np

    from difa.techniques import forecast, forecast2

    g = torch.Generator().manual_seed(0)
    r = [torch.randn(2, 5, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    pts = list(zip((0, 3, 4), r))
    got = forecast2.quadratic(pts, 6)
    ys = np.stack([t.numpy().ravel() for t in r])  # (3, elements)
    coef = np.polyfit(np.array([0.0, 3.0, 4.0]), ys, 2)  # (3, elements), highest power first
    want = coef[0] * 36 + coef[1] * 6 + coef[2]
    np.testing.assert_allclose(got.numpy().ravel(), want, rtol=1e-9, atol=1e-9)
    assert torch.equal(forecast2.quadratic(pts[1:], 6), forecast.extrapolate(pts[1:], 6))
    assert forecast2.quadratic(pts[2:], 6) is r[2]


def test_foca_is_its_step_by_step_recursion_and_first_order_where_steps_are_adjacent():
    """The closed form (three weights) against the recursion run step by step, at uneven spacings and over long
    runs; with adjacent computed steps it is the first-order forecast; a residual linear in the step is forecast
    exactly; the correction stays bounded where a parabola's grows."""
    from difa.techniques import foca, forecast, forecast2

    g = torch.Generator().manual_seed(0)
    r = [torch.randn(2, 5, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    for steps in ((0, 3, 4), (0, 2, 5), (1, 2, 6), (0, 4, 8)):
        pts = list(zip(steps, r))
        for s in range(steps[2] + 1, steps[2] + 7):
            torch.testing.assert_close(foca.predict(pts, s), foca_by_steps(pts, s), rtol=0, atol=1e-12)
    adjacent = list(zip((3, 4, 5), r))
    for s in (6, 9):
        torch.testing.assert_close(foca.predict(adjacent, s), forecast.extrapolate(adjacent[1:], s), rtol=0,
                                   atol=1e-12)
    line = [(t, r[0] + 0.5 * t * r[1]) for t in (0, 3, 4)]
    torch.testing.assert_close(foca.predict(line, 9), r[0] + 4.5 * r[1], rtol=0, atol=1e-12)
    bent = [(t, float(t * t) * r[0]) for t in (0, 2, 4)]  # the block's residual a parabola in the step
    far = [(foca.predict(bent, 4 + m) - forecast.extrapolate(bent[1:], 4 + m)).abs().max() for m in (4, 40)]
    quad = [(forecast2.quadratic(bent, 4 + m) - forecast.extrapolate(bent[1:], 4 + m)).abs().max() for m in (4, 40)]
    assert far[1] < 1.1 * far[0] and quad[1] > 50 * quad[0]
    assert torch.equal(foca.predict(pts[1:], 9), forecast.extrapolate(pts[1:], 9))
    assert foca.predict(pts[2:], 9) is r[2]
