"""Greedy calibration end to end on the tiny pipelines, its loss, and its cost-model ordering."""

from __future__ import annotations

import pytest
import torch

import difa
from difa.calibration import calibrate_pipeline
from difa.cost import order_candidates, plan_flops
from difa.calibration.loss import relative_l1
from difa.errors import DifaError
from difa.models import pipeline_call_kwargs
from difa.techniques.base import LayerShape
from tests.conftest import GUIDANCE, INPUTS, STEPS, generate, tiny


def calibrate(pipe, family, threshold, **kw):
    """The greedy search (DiTFastAttn's), kept exactly; the trajectory search is tested in test_search.py."""
    return calibrate_pipeline(pipe, INPUTS[family], threshold=threshold, steps=STEPS, guidance_scale=GUIDANCE[family],
                              call_kwargs=pipeline_call_kwargs(family), **{"search": "greedy", **kw})


def test_threshold_zero_gives_all_full(family):
    plan = calibrate(tiny(family), family, 0.0)
    assert plan.counts() == {"full": len(plan.layers) * plan.steps}
    assert plan.flops["fraction"] == pytest.approx(1.0)


def test_huge_threshold_gives_cheapest_everywhere_but_step_0(family):
    plan = calibrate(tiny(family), family, 1e6)
    for name, row in zip(plan.layers, plan.methods):  # free methods; on cross-attention tgate wins the tie
        cheapest = "tgate" if name.endswith("attn2") else "ast"
        assert row == ("full",) + (cheapest,) * (plan.steps - 1)
    assert plan.flops["fraction"] == pytest.approx(1 / plan.steps)


def test_moderate_threshold_records_every_decision(family):
    pipe = tiny(family)
    plan = calibrate(pipe, family, 0.05)
    decisions = plan.calibration["decisions"]
    assert len(decisions) == len(plan.layers) * (plan.steps - 1)
    for d in decisions:
        assert d["chosen"] == plan.methods[d["layer"]][d["step"]]
        if d["chosen"] != "full":
            assert d["tried"][d["chosen"]] < d["threshold"]
            assert list(d["tried"])[-1] == d["chosen"]  # the first passing candidate stops the search
        assert all(loss >= d["threshold"] for m, loss in d["tried"].items() if m != d["chosen"])
    assert plan.calibration["forwards"] > plan.steps
    assert 0 < plan.flops["fraction"] < 1
    # The calibrated plan, applied, differs from full but stays close to it
    ref = generate(pipe, family)
    difa.apply_plan(pipe, plan)
    out = generate(pipe, family)
    assert 0 < relative_l1(out, ref) < 1


def test_calibration_inputs_are_validated():
    pipe = tiny("dit")
    with pytest.raises(DifaError, match="threshold must be a number >= 0"):
        calibrate(pipe, "dit", -0.1)
    with pytest.raises(DifaError, match="unknown candidate"):
        calibrate(pipe, "dit", 0.1, candidates=["ast", "magic"])
    with pytest.raises(DifaError, match="window"):
        calibrate(pipe, "dit", 0.1, window=-3)


def test_cfg_off_never_picks_cfg_sharing():
    plan = calibrate_pipeline(tiny("dit"), INPUTS["dit"], threshold=1e6, steps=STEPS, guidance_scale=1.0,
                              candidates=["asc", "wars"], search="greedy")
    assert not plan.cfg_enabled and set(plan.counts()) <= {"full", "wars"}


def test_relative_l1_matches_naive_formula():
    a = torch.tensor([1.0, -2.0, 0.0, -1e-9])
    b = torch.tensor([1.5, -2.0, 0.0, 1e-9])
    naive = sum(abs(x - y) / (max(abs(x), abs(y)) + 1e-8) for x, y in zip(a.tolist(), b.tolist())) / 4
    assert relative_l1(a, b) == pytest.approx(naive)
    # signed max (the reference's bug) would divide by ~0 here; magnitudes keep the ratio <= 2
    assert relative_l1(torch.tensor([-5.0]), torch.tensor([-4.0])) == pytest.approx(0.2, rel=1e-6)


def pixart_shape(n: int) -> LayerShape:
    return LayerShape(batch=2, n_q=n, n_kv=n, dim=1152, inner=1152, heads=16)


def test_candidates_are_ordered_by_cost_not_by_a_fixed_list():
    params = {"wars": {"window": 0.125}}
    # 1024 tokens: projections dominate, so CFG sharing (50%) beats WA-RS (~77%)
    assert order_candidates(["wars", "asc", "wars+asc", "ast"], pixart_shape(1024), params) == ["ast", "wars+asc", "asc", "wars"]
    # 16384 tokens: quadratic attention dominates, so WA-RS beats CFG sharing
    assert order_candidates(["asc", "wars"], pixart_shape(16384), params) == ["wars", "asc"]


def test_plan_flops_charge_residual_caching():
    shape = pixart_shape(1024)
    params = {"wars": {"window": 0.125}}
    full = plan_flops([["full", "full"]], [shape], params)
    wars = plan_flops([["full", "wars"]], [shape], params)
    assert full["fraction"] == 1.0
    assert 0.5 < wars["fraction"] < 1.0
    # the first step pays for the window attention that makes R
    ast_only = plan_flops([["full", "ast"]], [shape], params)
    assert ast_only["fraction"] == pytest.approx(0.5)
    assert wars["plan_gflops"] > ast_only["plan_gflops"] + 0.25 * full["full_gflops"] / 2


def test_calibration_runs_the_compressed_trajectory(family):
    """The denoiser outputs the sampler saw during calibration are exactly those of the finished plan."""
    pipe = tiny(family)
    seen: list[torch.Tensor] = []
    step = pipe.scheduler.step

    def recording_step(model_output, *args, **kwargs):
        seen.append(model_output.clone())
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = recording_step
    plan = calibrate_pipeline(pipe, INPUTS[family], threshold=0.05, steps=STEPS, guidance_scale=GUIDANCE[family],
                              seed=3, call_kwargs=pipeline_call_kwargs(family), search="greedy")
    during = list(seen)
    assert set(plan.counts()) != {"full"}
    seen.clear()
    difa.apply_plan(pipe, plan)
    generate(pipe, family, seed=3)
    assert len(seen) == len(during) == plan.steps
    for t, (a, b) in enumerate(zip(during, seen)):
        assert torch.equal(a, b), f"step {t}"


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_the_loss_is_measured_on_what_the_sampler_reads(family):
    """The last decision of step 1 against the sampler's own input at step 1 (the pipeline's guided epsilon,
    recorded at scheduler.step) with step 1's choices applied vs all full. The last self-attention layer is
    used because PixArt's first one sees identical CFG halves (text enters by cross-attention after it)."""
    pipe = tiny(family)
    plan = calibrate(pipe, family, 1e6, candidates=["asc"])  # CFG sharing: guidance multiplies its change
    assert_loss_is_what_the_sampler_reads(pipe, plan, "asc", lambda: generate(pipe, family, seed=0))


def assert_loss_is_what_the_sampler_reads(pipe, plan, candidate: str, run) -> None:
    """`plan`'s last decision for `candidate` at step 1 equals relative_l1 of the sampler's input at step 1 (recorded
    at scheduler.step) with step 1's choices up to that layer applied against all full; `run()` generates."""
    step1 = [d for d in plan.calibration["decisions"] if d["step"] == 1]
    last = [d for d in step1 if d["chosen"] == candidate][-1]
    assert "guided" in plan.calibration["loss"]

    def sampler_inputs(methods):
        seen, step = [], pipe.scheduler.step

        def recording_step(model_output, *args, **kwargs):
            seen.append(model_output.clone())
            return step(model_output, *args, **kwargs)

        pipe.scheduler.step = recording_step
        difa.apply_plan(pipe, plan.with_(methods=tuple(tuple(r) for r in methods)))
        try:
            run()
        finally:
            difa.remove_plan(pipe)
            pipe.scheduler.step = step
        return seen

    full = [["full"] * plan.steps for _ in plan.layers]
    cells = [row[:] for row in full]
    for d in step1:
        if d["layer"] <= last["layer"]:
            cells[d["layer"]][1] = d["chosen"]
    want = relative_l1(sampler_inputs(cells)[1], sampler_inputs(full)[1])
    assert want > 0 and last["tried"][candidate] == pytest.approx(want, rel=1e-6)


def test_paper_parity_loss_on_both_halves():
    """loss_on=halves (DiTFastAttn's): the raw CFG batch is compared, so CFG sharing looks cheaper than it is."""
    pipe = tiny("pixart")
    guided = calibrate(pipe, "pixart", 1e6, candidates=["asc"])
    halves = calibrate(pipe, "pixart", 1e6, candidates=["asc"], loss_on="halves")
    g, h = (sum(d["tried"].get("asc", 0) for d in p.calibration["decisions"] if d["step"] == 1)
            for p in (guided, halves))
    assert halves.calibration["loss_on"] == "halves" and "guided" not in halves.calibration["loss"]
    assert 0 < h < g  # guidance (4.5) multiplies the change of the halves' difference
    with pytest.raises(DifaError, match="unknown loss_on"):
        calibrate(pipe, "pixart", 0.1, loss_on="cfg")
