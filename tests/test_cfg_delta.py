"""`cfg_delta` (a CFG cell: the block on the conditional half, the other half from the last computed difference
between the halves) against a naive reference made of plain forward hooks, on the real tiny pipelines; its
estimator alone; plan validation; the trajectory search's table error for it."""

from __future__ import annotations

import pytest
import torch

import difa
from difa.adapters import adapter_for
from difa.apply import plan_blocks
from difa.errors import DifaError
from difa.plan import Plan
from difa.techniques import cfg_delta
from tests.conftest import generate, tiny
from tests.test_blocks import block_plan, schedule

pytestmark = pytest.mark.usefixtures("one_thread")
COND_FIRST = {"dit": True, "pixart": False, "sd": False}  # DiTPipeline: [cond, null]; the others: [uncond, cond]


def naive(pipe, family, method) -> torch.Tensor:
    """The blocks always run on the whole batch; at a CFG cell (odd steps, blocks 1..) the unconditional rows of
    the output are replaced by input + conditional residual + the difference d = (uncond - cond residual) of the
    last full step (`cfg_delta`), or extrapolated linearly from the last two full steps (`cfg_forecast`)."""
    model = adapter_for(pipe).denoiser(pipe)
    blocks = [m for _, m in plan_blocks(pipe)]
    step = [-1]
    full: dict[int, list] = {j: [] for j in range(len(blocks))}  # block -> [(step, residual (B, N, C))] at full steps
    handles = [model.register_forward_pre_hook(lambda m, a: step.__setitem__(0, step[0] + 1))]

    def on_block(j):
        def hook(module, args, kwargs, out):
            x, s = (args[0] if args else kwargs["hidden_states"]), step[0]
            if schedule(method)(j, s) == "full":
                full[j].append((s, out - x))
                return out
            half = x.shape[0] // 2
            c, u = (slice(0, half), slice(half, None)) if COND_FIRST[family] else (slice(half, None), slice(0, half))
            d = [(t, r[u] - r[c]) for t, r in full[j]]
            guess = d[-1][1]
            if method == "cfg_forecast" and len(d) > 1:
                (s0, d0), (s1, d1) = d[-2], d[-1]
                guess = d1 + (d1 - d0) * (s - s1) / (s1 - s0)
            new = out.clone()
            new[u] = x[u] + (out[c] - x[c]) + guess
            return new
        return hook

    handles += [b.register_forward_hook(on_block(j), with_kwargs=True) for j, b in enumerate(blocks)]
    try:
        return generate(pipe, family)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("method", ["cfg_delta", "cfg_forecast"])
def test_cfg_cells_match_naive_hooks(family, method):
    pipe = tiny(family)
    ref = generate(pipe, family)
    expected = naive(pipe, family, method)
    assert not torch.equal(expected, ref)  # the schedule really changes the images
    calls = []
    attn = plan_blocks(pipe)[1][1].attn1  # (the engine wraps the block's forward: its own hooks see the whole batch)
    h = attn.register_forward_pre_hook(lambda m, a, k: calls.append((a[0] if a else k["hidden_states"]).shape[0]),
                                       with_kwargs=True)
    difa.apply_plan(pipe, block_plan(pipe, family, method))
    got = generate(pipe, family)
    h.remove()
    # the block's attention ran on the whole batch at full steps and on half of it at CFG cells (2 inputs x 2)
    assert calls == [4, 2, 4, 2, 4, 2]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)  # (a half batch's matmuls round differently)
    difa.remove_plan(pipe)
    assert torch.equal(generate(pipe, family), ref)


def test_forecast_of_the_difference_is_not_its_reuse():
    pipe = tiny("dit")
    assert not torch.equal(naive(pipe, "dit", "cfg_delta"), naive(pipe, "dit", "cfg_forecast"))


def test_estimator_keeps_the_guidance_difference():
    g = torch.Generator().manual_seed(0)
    h1, o1, h = (torch.randn(2, 5, 3, generator=g) for _ in range(3))
    got = cfg_delta.estimate([(0, (h1, o1)), (2, (h, None))], 2, None)
    torch.testing.assert_close(got - h, o1 - h1)  # the other half keeps the last (other - computed) difference
    assert not torch.equal(got, h)  # unlike copying the computed half (asc)


def test_plans_that_cannot_run_it_are_one_line_errors():
    pipe = tiny("dit")
    plan = block_plan(pipe, "dit", "cfg_delta")
    d = plan.to_dict()
    d["block_methods"][d["model"]["blocks"][1]][0] = "cfg_delta"
    with pytest.raises(DifaError, match="no earlier step computes") as e:
        Plan.from_dict(d)
    assert "\n" not in str(e.value)
    d = plan.to_dict()
    d["cfg"]["enabled"] = False
    with pytest.raises(DifaError, match="needs a CFG batch but the plan has CFG off"):
        Plan.from_dict(d)
    d = plan.to_dict()
    layer = next(n for n in d["model"]["layers"] if n.startswith(d["model"]["blocks"][1] + "."))
    d["methods"][layer][2] = "ast"
    with pytest.raises(DifaError, match="run the block on half the batch"):
        Plan.from_dict(d)


def test_table_error_of_a_cfg_cell_is_the_other_halfs():
    from difa.calibration import search as S
    from tests.test_search import _trajectory

    traj = _trajectory(6)  # one block, batch 2: row 0 the conditional half here, row 1 the other
    table = S.Table(traj, cond=slice(0, 1))
    r, scale = traj.residual[0], traj.scale[0][4]
    guess = r[4][:1] + (r[3][1:] - r[3][:1])
    assert table.error(0, 4, [1, 3], "cfg_delta") == pytest.approx(float((guess - r[4][1:]).abs().sum()) / scale)
    assert S.Table(traj).error(0, 4, [1, 3], "cfg_delta") == float("inf")  # no CFG batch: never chosen
    total, row, _ = table.row(0, 6, {2: S.HALF, 4: S.SKIP}, ["reuse", "forecast", "cfg_delta"])
    assert row[2] == "cfg_delta" and row[4] in ("reuse", "forecast") and row[3] == "full"
    # a half cell is not a computed step: the skip at 4 reads steps 1 and 3 (or 3), never 2
    expected = table.error(0, 2, [0, 1], "cfg_delta") + min(table.error(0, 4, [0, 1, 3], m) for m in ("reuse", "forecast"))
    assert total == pytest.approx(expected)


def test_greedy_halves_cells_where_that_costs_least_error_per_second():
    """Residuals that jump every step (skipping costs error) with a constant difference between the CFG halves
    (a CFG cell costs none): the first moves halve cells (each one step from a computed one: the greedy's first
    round), then halves are upgraded to skips, until every cell after step 0 is skipped."""
    from difa.calibration import search as S
    from difa.calibration import table as T
    from difa.calibration.latency import LatencyModel

    steps, traj = 6, T.Trajectory([{}], [{}], torch.empty(0))
    g = torch.Generator().manual_seed(1)
    for s in range(steps):
        x, c = torch.randn(1, 8, 4, generator=g), torch.randn(1, 8, 4, generator=g) * 3
        traj.observe(0, s, torch.cat([x, x]), torch.cat([x + c, x + c + 0.5]))  # uncond - cond = 0.5 everywhere
    lat = LatencyModel(step_s=1.0, fixed_s=0.0, block_s=(0.4,), ff_s=(0.2,), skip_s=(0.0,), half_s=(0.2,))
    seq = S.greedy_sequence(S.Table(traj, cond=slice(0, 1)), lat, 1, steps, ["reuse", "cfg_delta"], lambda c: False,
                            steps * 1.0)
    first = seq[1].rows[0]
    assert first.count("cfg_delta") == 1 and first.count("reuse") == 0 and seq[1].table_error < 1e-6
    assert seq[1].predicted == pytest.approx((steps - 0.2) / steps)
    halves = [c.rows[0].count("cfg_delta") for c in seq]
    assert halves[:4] == [0, 1, 2, 3] and seq[3].rows[0] == ["full", "cfg_delta", "full", "cfg_delta", "full", "cfg_delta"]
    assert seq[-1].rows[0] == ["full"] + ["reuse"] * (steps - 1)  # and at the end every one skipped



def test_a_budget_also_checks_the_schedule_with_skipped_cells_only():
    """The table rates CFG cells free here (a constant difference between the halves), so both paths take them;
    where they check worse on the final output, the budget's third candidate, the every-second-step schedule with
    skipped cells only, is the one chosen. With skip candidates only there is no third plan to check."""
    from difa.calibration import search as S
    from difa.calibration import table as T
    from difa.calibration.latency import LatencyModel

    steps, traj = 6, T.Trajectory([{}], [{}], torch.empty(0))
    g = torch.Generator().manual_seed(1)
    for s in range(steps):
        x, c = torch.randn(1, 8, 4, generator=g), torch.randn(1, 8, 4, generator=g) * 3
        traj.observe(0, s, torch.cat([x, x]), torch.cat([x + c, x + c + 0.5]))
    lat = LatencyModel(step_s=1.0, fixed_s=0.0, block_s=(0.4,), ff_s=(0.2,), skip_s=(0.0,), half_s=(0.2,))
    table, methods, budget = S.Table(traj, cond=slice(0, 1)), ["reuse", "cfg_delta"], 0.9
    options, _ = S.budget_options(table, lat, 1, steps, methods, budget)
    assert len(options) == len(S.PATHS) and all(o.predicted <= budget + 1e-9 for o in options)
    assert all("cfg_delta" in o.rows[0] for o in options[:2])
    only = options[2].rows[0]
    assert set(only) == {"full", "reuse"} and options[2].predicted < options[1].predicted

    def check(rows):  # each CFG cell costs 0.01 on the final output, each skip 0.001
        return sum(0.01 * (m == "cfg_delta") + 0.001 * (m == "reuse") for r in rows for m in r)

    chosen, _, checks = S.search(table, lat, 1, steps, methods, check, budget=budget)
    assert chosen.rows == options[2].rows and len(checks) == len({str(o.rows) for o in options})  # each plan once
    block_only, _ = S.budget_options(table, lat, 1, steps, ["reuse"], budget)
    assert block_only[2] is block_only[1]


def test_attention_in_a_cfg_cell_counts_half_its_flops():
    from difa.cells import executed_share
    from difa.cost import plan_flops
    from difa.techniques.base import LayerShape

    pipe = tiny("dit")
    plan = block_plan(pipe, "dit", "cfg_delta")
    share = executed_share(plan.model.layers, plan.model.blocks, plan.blocks, plan.steps)
    assert share[0] == [1.0] * plan.steps  # block 0 always computes
    assert share[1] == [1.0, 0.5] * (plan.steps // 2)
    skip = block_plan(pipe, "dit", "reuse")
    assert executed_share(skip.model.layers, skip.model.blocks, skip.blocks, skip.steps)[1] == [1.0, 0.0] * (plan.steps // 2)
    shapes = [LayerShape(batch=4, n_q=64, n_kv=64, dim=16, inner=16, heads=2)] * len(plan.model.layers)
    f = plan_flops(plan.methods, shapes, plan.techniques, plan.model.layers, True, share)
    layers = len(plan.model.layers)
    assert f["fraction"] == pytest.approx((layers * plan.steps - (layers - 1) * (plan.steps // 2) * 0.5) / (layers * plan.steps))


def test_a_cfg_cell_plan_run_without_cfg_is_a_one_line_error():
    from difa.evaluation_run import run_settings

    pipe = tiny("dit")
    plan = block_plan(pipe, "dit", "cfg_forecast")
    with pytest.raises(DifaError, match="shares work across the CFG halves but guidance_scale=1.0"):
        run_settings({"steps": 6, "guidance_scale": 4.0}, plan, None, 1.0)
    difa.apply_plan(pipe, plan)
    with pytest.raises(DifaError, match="shares work across the CFG halves") as e:
        generate(pipe, "dit", guidance=1.0)
    assert "\n" not in str(e.value)
    difa.remove_plan(pipe)


def test_video_blocks_that_fold_frames_into_the_batch_refuse_cfg_cells(tmp_path):
    from difa.calibration import calibrate_pipeline, fixed_plan
    from difa.tiny import tiny_call_kwargs
    from tests.test_families import GUIDANCE as G, STEPS as S, tiny as tiny_family

    pipe = tiny_family("svd")
    with pytest.raises(DifaError, match="fold frames or positions into the batch") as e:
        fixed_plan(pipe, lambda i, t: "full", steps=S, guidance_scale=G["svd"], block=lambda j, t: "cfg_delta" if t else "full")
    assert "\n" not in str(e.value)
    with pytest.raises(DifaError, match="need a CFG batch in every block"):
        calibrate_pipeline(pipe, ["x"], threshold=0.1, steps=S, guidance_scale=G["svd"], candidates=["cfg_delta"],
                           call_kwargs=tiny_call_kwargs("svd"), latency_cache=tmp_path)


def test_the_latency_model_times_half_blocks_where_a_cfg_batch_runs(tmp_path):
    """Whatever the candidates (block-only here: one latency model for every candidate set, trajectory.timed_units),
    half blocks are timed where the pipeline runs a CFG batch, and not where it runs none."""
    import json

    from difa.calibration import calibrate_pipeline
    from difa.models import pipeline_call_kwargs
    from tests.conftest import GUIDANCE, INPUTS, STEPS

    pipe = tiny("dit")
    halves = {}
    for name, guidance in (("cfg", GUIDANCE["dit"]), ("none", 1.0)):
        calibrate_pipeline(pipe, INPUTS["dit"], threshold=0.05, steps=STEPS, guidance_scale=guidance,
                           candidates=["reuse", "forecast"], call_kwargs=pipeline_call_kwargs("dit"),
                           latency_cache=tmp_path / name)
        timed = [json.loads(p.read_text()) for p in (tmp_path / name).glob("*.json")]
        halves[name] = [(d["images"], d["half_s"], d["block_s"]) for d in timed]
    assert all(h == [] for _, h, _ in halves["none"])
    assert all(len(h) == len(b) and all(0 < x for x in h) for _, h, b in halves["cfg"])
    # at the calibration batch (2 images, 4 rows) half a block costs less than the block
    assert all(sum(h) < sum(b) for n, h, b in halves["cfg"] if n == len(INPUTS["dit"]))
