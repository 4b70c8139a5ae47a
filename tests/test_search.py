"""The trajectory search (the default), budget mode, and the measured latency cost model."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

import difa
from difa.calibration import calibrate_pipeline, denoiser_calls
from difa.calibration import attention_cells as A
from difa.calibration import search as S
from difa.calibration import table as T
from difa.calibration.latency import REPS, LatencyModel
from difa.errors import DifaError
from difa.models import pipeline_call_kwargs
from tests.conftest import GUIDANCE, INPUTS, STEPS, generate, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def calibrate(pipe, family, tmp_path, **kw):
    return calibrate_pipeline(pipe, INPUTS[family], steps=STEPS, guidance_scale=GUIDANCE[family], seed=3,
                              call_kwargs=pipeline_call_kwargs(family), latency_cache=tmp_path / "lat",
                              **{"threshold": 0.05, **kw})


def final(pipe, family):
    return generate(pipe, family, seed=3)


def reachable(pipe, family, tmp_path, share: float) -> float:
    """A budget `share` of the way from the fastest block plan to full, from the latency model that a first
    calibration measured and cached (timings vary with machine load; the cached model makes the test exact)."""
    calibrate(pipe, family, tmp_path, threshold=0.0)
    timed = [json.loads(p.read_text()) for p in (tmp_path / "lat").glob("*.json")]  # one per timed batch
    (d,) = [x for x in timed if x["images"] == len(INPUTS[family])]  # the search's: at the calibration batch
    lat = LatencyModel(**d)
    calls, n = denoiser_calls(pipe.scheduler, STEPS), len(d["block_s"])
    skipped = [["full"] + ["reuse"] * (calls - 1)] * n
    fastest = lat.predict([], [], skipped, calls)["fraction"]
    return fastest + share * (1 - fastest)


@pytest.mark.parametrize("share", [0.8, 0.3])
def test_budget_plan_is_within_budget_and_its_recorded_error_is_what_it_does(family, share, tmp_path):
    pipe = tiny(family)
    ref = final(pipe, family)
    budget = reachable(pipe, family, tmp_path, share)
    plan = calibrate(pipe, family, tmp_path, budget=budget)
    assert plan.latency["predicted_fraction"] <= budget + 5e-5  # recorded to 4 digits
    assert plan.blocks and set(plan.block_counts()) - {"full"}  # it skips something
    assert plan.calibration["search"] == "trajectory" and plan.calibration["budget"] == budget
    # the recorded error is the final-output error of exactly this plan on these inputs and seed
    difa.apply_plan(pipe, plan)
    got = final(pipe, family)
    difa.remove_plan(pipe)
    assert T.final_error(got, ref) == pytest.approx(plan.calibration["measured_error"], abs=1e-5)


def test_threshold_mode_keeps_the_checked_error_under_threshold(tmp_path):
    pipe = tiny("dit")
    plan = calibrate(pipe, "dit", tmp_path, threshold=0.02)
    checks = plan.calibration["checks"]
    if plan.calibration["measured_error"] is not None:
        assert plan.calibration["measured_error"] <= 0.02
    assert len(checks) <= 2
    zero = calibrate(pipe, "dit", tmp_path, threshold=0.0)
    assert set(zero.block_counts()) == {"full"}


def test_forwards_are_a_few_generations_not_steps_x_layers_x_candidates(tmp_path):
    pipe = tiny("dit")
    calls = denoiser_calls(pipe.scheduler, STEPS)
    fresh = calibrate(pipe, "dit", tmp_path, budget=0.95)  # reachable even when a loaded machine inflates fixed costs
    # one recorded generation, one warm all-full generation timing what lies outside the denoiser, at most two
    # checks, and the denoiser microbenchmark (warm-up + REPS) at each batch the latency is timed at
    # (calibration.timing.SERVE_FACTORS)
    # plus the attention cells' probe: PROBES steps of block reruns per attention method (attention_cells)
    timed = len(fresh.latency["by_batch"])
    probed = [m for m in difa.techniques.REGISTRY if A.searchable(m) and difa.techniques.REGISTRY[m].candidate]
    assert fresh.calibration["forwards"] <= 4 * calls + timed * (REPS + 1) + A.PROBES * len(probed)
    cached = calibrate(pipe, "dit", tmp_path, budget=0.95)  # the latency model now comes from runs/cache
    assert cached.calibration["forwards"] == fresh.calibration["forwards"] - timed * (REPS + 1)
    assert list((tmp_path / "lat").glob("*.json"))
    greedy = calibrate(pipe, "dit", tmp_path, search="greedy", threshold=0.05)
    # (generation forwards, the shared microbenchmark and the attention probe left out: at 6 steps the greedy's
    # trials already cost more than the trajectory's four generations; at 20 steps on the bundled DiT it is 12x with
    # the microbenchmark, 7x with everything, README)
    micro = timed * (REPS + 1)
    assert greedy.calibration["forwards"] - micro > 1.5 * (fresh.calibration["forwards"] - micro - A.PROBES * len(probed))


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), "half"])
def test_bad_budgets_are_one_line_errors(bad, tmp_path):
    with pytest.raises(DifaError, match="budget must be") as e:
        calibrate(tiny("dit"), "dit", tmp_path, budget=bad)
    assert "\n" not in str(e.value)


def test_a_budget_no_plan_reaches_is_a_one_line_error(tmp_path):
    with pytest.raises(DifaError, match="below the fastest block plan") as e:
        calibrate(tiny("dit"), "dit", tmp_path, budget=0.01)
    assert "\n" not in str(e.value)


def test_budget_needs_the_trajectory_search_and_block_candidates(tmp_path):
    with pytest.raises(DifaError, match="search=trajectory"):
        calibrate(tiny("dit"), "dit", tmp_path, budget=0.5, search="greedy")
    with pytest.raises(DifaError, match="reuse and/or forecast"):
        calibrate(tiny("dit"), "dit", tmp_path, candidates=["ast", "wars"])
    with pytest.raises(DifaError, match="unknown search"):
        calibrate(tiny("dit"), "dit", tmp_path, search="anneal")


def _trajectory(steps: int, blocks: int = 1, seed: int = 0) -> T.Trajectory:
    g = torch.Generator().manual_seed(seed)
    traj = T.Trajectory([{} for _ in range(blocks)], [{} for _ in range(blocks)], torch.zeros(1))
    for j in range(blocks):
        x = torch.randn(2, 8, 4, generator=g)
        for s in range(steps):
            out = x + torch.randn(2, 8, 4, generator=g) * (1 + s)
            traj.observe(j, s, x, out)
    return traj


def test_table_errors_match_a_naive_formula():
    traj = _trajectory(6)
    table = S.Table(traj)
    r = traj.residual[0]
    scale = traj.scale[0][4]
    assert table.error(0, 4, [1, 3], "reuse") == pytest.approx(float((r[3] - r[4]).abs().sum()) / scale)
    forecast = r[3] + (r[3] - r[1]) * (4 - 3) / (3 - 1)
    assert table.error(0, 4, [1, 3], "forecast") == pytest.approx(float((forecast - r[4]).abs().sum()) / scale)
    total, row, stale = table.row(0, 6, {2, 4, 5}, ["reuse", "forecast"])
    assert row[0] == row[1] == row[3] == "full" and stale == 2
    expected = sum(min(table.error(0, s, h, m) for m in ("reuse", "forecast")) for s, h in ((2, [0, 1]), (4, [0, 1, 3]),
                                                                                          (5, [0, 1, 3])))
    assert total == pytest.approx(expected)


def test_greedy_takes_every_stale_one_cell_before_any_stale_two_cell():
    steps, blocks = 9, 2
    traj = _trajectory(steps, blocks)
    lat = LatencyModel(step_s=1.0, fixed_s=0.0, block_s=(0.4, 0.4), ff_s=(0.2, 0.2), skip_s=(0.0, 0.0))
    seq = S.greedy_sequence(S.Table(traj), lat, blocks, steps, ["reuse", "forecast"], lambda c: False, steps * 1.0)
    staleness = []
    for c in seq[1:]:
        worst = 0
        for row in c.rows:
            last = 0
            for s, m in enumerate(row):
                if m == "full":
                    last = s
                else:
                    worst = max(worst, s - last)
        staleness.append(worst)
    assert staleness == sorted(staleness)  # rounds of growing staleness
    assert staleness[0] == 1 and staleness[-1] == steps - 1  # ends with every cell but step 0 skipped
    assert seq[-1].predicted == pytest.approx((steps - 2 * 0.4 * (steps - 1)) / steps)


def test_latency_prediction_matches_a_naive_sum():
    lat = LatencyModel(step_s=1.0, fixed_s=0.5, block_s=(0.3, 0.3), ff_s=(0.1, 0.2), skip_s=(0.01, 0.02),
                       attn_s={"b.0.attn1": {"full": 0.1, "ast": 0.0}}, block_names=("b.0", "b.1"))
    layers, att = ["b.0.attn1", "b.1.attn1"], [["full", "ast", "full"], ["full"] * 3]
    blocks = [["full", "full", "mlp_reuse"], ["full", "reuse", "forecast"]]
    p = lat.predict(layers, att, blocks, 3)
    step1 = 1.0 - (0.3 - 0.02) - 0.1  # block 1 skipped, layer 0 on ast
    step2 = 1.0 - 0.1 - (0.3 - 0.02)  # block 0 without its feed-forward, block 1 forecast
    assert p["seconds"] == pytest.approx(0.5 + 1.0 + step1 + step2)
    assert p["fraction"] == pytest.approx(p["seconds"] / 3.5)
    assert lat.predict(layers, [["full"] * 3] * 2, [["full"] * 3] * 2, 3)["fraction"] == pytest.approx(1.0)
    assert not math.isnan(p["fraction"])
    # Caching residuals costs a subtraction at each computed step a later skip reads: block 1's steps 0 (for the
    # reuse at 1; the forecast at 2 has only step 0 before it as well).
    kept = replace(lat, keep_s=(0.05, 0.07)).predict(layers, att, blocks, 3)
    assert kept["seconds"] == pytest.approx(p["seconds"] + 0.07)
    fc = [["full"] * 4, ["full", "full", "forecast", "reuse"]]  # the forecast reads steps 0 and 1, the reuse step 1
    one = replace(lat, block_names=("b.1",))
    base4 = one.predict(layers[1:], [["full"] * 4], fc[1:], 4)["seconds"]
    assert replace(one, keep_s=(0.05, 0.07)).predict(layers[1:], [["full"] * 4], fc[1:], 4)["seconds"] == \
        pytest.approx(base4 + 2 * 0.05)
    # A step the engine runs on one CFG half (every cross-attention T-GATE'd) costs half of what it would cost.
    halved = lat.predict(layers, att, blocks, 3, collapsed=[False, True, False])
    assert halved["seconds"] == pytest.approx(0.5 + 1.0 + step1 / 2 + step2)
    assert lat.predict(layers, att, blocks, 3, collapsed=[False] * 3)["seconds"] == pytest.approx(p["seconds"])


def test_fewer_candidates_plan_on_the_default_calibrations_seconds(tmp_path):
    """One latency model per pipeline and shapes, whatever the candidates: a block-only calibration after a default
    one times nothing new and predicts the same seconds (so the default's path of skipped cells only, search.PATHS,
    is the block-only search's own structured path)."""
    pipe = tiny("dit")
    budget = reachable(pipe, "dit", tmp_path, 0.5)
    default = calibrate(pipe, "dit", tmp_path, budget=budget)
    cached = sorted((tmp_path / "lat").iterdir())
    blocks = calibrate(pipe, "dit", tmp_path, budget=budget, candidates=["reuse", "forecast"])
    assert sorted((tmp_path / "lat").iterdir()) == cached
    assert blocks.latency["full_s"] == default.latency["full_s"] and blocks.latency["step_s"] == default.latency["step_s"]
