"""`forecast_fit` (difa/techniques/forecast_fit.py): the fitted gains against naive least squares, the engine
against plain forward hooks applying the plan's gains, the table's cross-fitted error against a naive two-fold
computation, and a calibration whose plan carries the gains its check generation ran with."""

from __future__ import annotations

import json

import pytest
import torch

import difa
from difa.apply import plan_blocks
from difa.adapters import adapter_for
from difa.calibration import calibrate_pipeline, fixed_plan
from difa.calibration import table as T
from difa.errors import DifaError
from difa.models import pipeline_call_kwargs
from difa.plan import load_plan
from difa.techniques import check_params, forecast, forecast_fit
from tests.conftest import GUIDANCE, INPUTS, STEPS, generate, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def _points(g, shape=(4, 16, 6)):
    return [(1, torch.randn(shape, generator=g)), (3, torch.randn(shape, generator=g))]


def test_fit_recovers_known_gains_and_matches_lstsq():
    g = torch.Generator().manual_seed(0)
    pts = _points(g)
    a = torch.randn(6, generator=g)
    (s0, r0), (s1, r1) = pts
    d = (r1 - r0) * (4 - s1) / (s1 - s0)
    got = forecast_fit.fit(pts, 4, r1 + a * d)
    torch.testing.assert_close(got, a[None], atol=1e-3, rtol=1e-3)
    noisy = r1 + a * d + 0.3 * torch.randn(d.shape, generator=g)
    got = forecast_fit.fit(pts, 4, noisy)
    for c in range(6):  # naive: least squares per channel of (target - r1) on d
        A = d[..., c].flatten().double()[:, None]
        sol = torch.linalg.lstsq(A, (noisy - r1)[..., c].flatten().double()[:, None]).solution.flatten()
        torch.testing.assert_close(got[:, c].double(), sol, atol=2e-3, rtol=2e-3)  # (the ridge is 1e-4)
    torch.testing.assert_close(forecast_fit.fit(pts[1:], 4, r1 * 2), torch.ones(1, 6))  # one point: nothing to fit


def test_estimate_is_the_formula_and_the_prior_is_forecast():
    g = torch.Generator().manual_seed(1)
    pts = _points(g)
    gains = torch.randn(1, 6, generator=g)
    (s0, r0), (s1, r1) = pts
    torch.testing.assert_close(forecast_fit.estimate(pts, 6, gains), r1 + gains[0] * (r1 - r0) * (6 - s1) / (s1 - s0))
    torch.testing.assert_close(forecast_fit.estimate(pts, 6, None), forecast.extrapolate(pts, 6))
    assert forecast_fit.estimate(pts[1:], 6, gains) is r1  # one point: reuse


def _gains(n_blocks, steps, channels, cells, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"{j}/{t}": [(1 + 0.3 * torch.randn(channels, generator=g)).tolist()]
            for j in range(n_blocks) for t in range(steps) if cells(j, t)}


def _skipping(j, t):
    return t % 2 == 1 and j > 0


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_engine_matches_naive_hooks_with_the_plans_gains(family):
    pipe = tiny(family)
    ref = generate(pipe, family)
    blocks = [m for _, m in plan_blocks(pipe)]
    channels = blocks[0].norm1.normalized_shape[0] if hasattr(blocks[0].norm1, "normalized_shape") else None
    channels = channels or blocks[0].attn1.to_q.in_features
    table = _gains(len(blocks), STEPS, channels, _skipping)
    plan = fixed_plan(pipe, lambda i, t: "full", steps=STEPS, guidance_scale=GUIDANCE[family],
                      block=lambda j, t: "forecast_fit" if _skipping(j, t) else "full",
                      techniques={"forecast_fit": {"fitted": table}})
    model = adapter_for(pipe).denoiser(pipe)
    step, cache = [-1], {j: [] for j in range(len(blocks))}

    def hook(j):
        def run(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            if _skipping(j, step[0]):
                a = torch.tensor(table[f"{j}/{step[0]}"][0])
                (s1, r1) = cache[j][-1]
                if len(cache[j]) < 2:
                    return x + r1
                (s0, r0) = cache[j][-2]
                return x + r1 + a * (r1 - r0) * (step[0] - s1) / (s1 - s0)
            cache[j] = [*cache[j][-1:], (step[0], out - x)]
            return out
        return run

    handles = [model.register_forward_pre_hook(lambda m, a: step.__setitem__(0, step[0] + 1))]
    handles += [b.register_forward_hook(hook(j), with_kwargs=True) for j, b in enumerate(blocks)]
    try:
        expected = generate(pipe, family)
    finally:
        for h in handles:
            h.remove()
    assert not torch.equal(expected, ref)
    difa.apply_plan(pipe, plan)
    got = generate(pipe, family)
    # (the engine fuses the sum in another order: float rounding, relative to the output's scale: PixArt's is ~600)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    difa.remove_plan(pipe)
    assert torch.equal(generate(pipe, family), ref)


def test_missing_or_malformed_gains_are_one_line_errors():
    pipe = tiny("dit")
    plan = fixed_plan(pipe, lambda i, t: "full", steps=STEPS, guidance_scale=GUIDANCE["dit"],
                      block=lambda j, t: "forecast_fit" if _skipping(j, t) else "full")
    difa.apply_plan(pipe, plan)
    with pytest.raises(DifaError, match=r"no fitted gains.*recalibrate") as e:
        generate(pipe, "dit")
    assert "\n" not in str(e.value)
    difa.remove_plan(pipe)
    for bad in ({"1/1": [1.0, 2.0]}, {"x/1": [[1.0]]}, {"1/1": [[1.0, 2.0], [0.0, 1.0]]}, {"1/1": [["a"]]},
                {"1/1": [[]]}, {"1/1": [[True]]}):
        with pytest.raises(DifaError, match="fitted"):
            check_params({"forecast_fit": {"fitted": bad}})
    check_params({"forecast_fit": {"fitted": {"1/3": [[1.0, 2.0]]}}})


def test_table_error_is_cross_fitted_over_the_inputs():
    g = torch.Generator().manual_seed(2)
    steps, rows = 5, 8  # a CFG batch of 4 inputs: rows 0-3 one half, 4-7 the other
    traj = T.Trajectory([{}], [{}], torch.zeros(1))
    for s in range(steps):
        x = torch.randn(rows, 10, 3, generator=g)
        traj.observe(0, s, x, x + torch.randn(rows, 10, 3, generator=g) * (1 + s))
    table = T.Table(traj, cond=slice(4, 8))
    r = traj.residual[0]
    even = torch.tensor([i % 4 % 2 == 0 for i in range(rows)])
    total = 0.0
    for test, train in ((even, ~even), (~even, even)):
        gains = forecast_fit.fit([(1, r[1][train]), (3, r[3][train])], 4, r[4][train])
        total += float((forecast_fit.estimate([(1, r[1][test]), (3, r[3][test])], 4, gains) - r[4][test]).abs().sum())
    assert table.error(0, 4, [0, 1, 3], "forecast_fit") == pytest.approx(total / traj.scale[0][4], rel=1e-6)
    in_sample = forecast_fit.fit([(1, r[1]), (3, r[3])], 4, r[4])
    fitted_on_all = float((forecast_fit.estimate([(1, r[1]), (3, r[3])], 4, in_sample) - r[4]).abs().sum())
    assert fitted_on_all / traj.scale[0][4] < table.error(0, 4, [0, 1, 3], "forecast_fit")  # not scored in-sample


def test_check_fit_gives_each_fold_the_other_folds_gains():
    g = torch.Generator().manual_seed(4)
    traj = T.Trajectory([{}], [{}], torch.zeros(1))
    for s in range(5):
        x = torch.randn(8, 10, 3, generator=g)
        traj.observe(0, s, x, x + torch.randn(8, 10, 3, generator=g) * (1 + s))
    fitter = T.Table(traj, cond=slice(4, 8)).check_fit("forecast_fit")
    r = traj.residual[0]
    running = [(1, torch.randn(8, 10, 3, generator=g)), (3, torch.randn(8, 10, 3, generator=g))]  # the plan's own
    per_row = fitter(0, 4, torch.zeros(8, 10, 3), running)  # (1, B, 1, C)
    even = torch.tensor([i % 4 % 2 == 0 for i in range(8)])  # inputs 0, 2 (both CFG halves) against 1, 3
    for mine, other in ((even, ~even), (~even, even)):
        want = forecast_fit.fit([(1, r[1][other]), (3, r[3][other])], 4, r[4][other])  # on the recorded residuals
        torch.testing.assert_close(per_row[0, mine, 0], want.expand(int(mine.sum()), -1))
    torch.testing.assert_close(fitter.fits[(0, 4)], forecast_fit.fit([(1, r[1]), (3, r[3])], 4, r[4]))
    assert not torch.allclose(per_row[0, 0, 0], per_row[0, 1, 0])


def _recorded(pipe, family):
    """Every block's input and output (B, N, C) at every step of the all-full generation, by forward hooks."""
    blocks = [m for _, m in plan_blocks(pipe)]
    seen = [[] for _ in blocks]

    def hook(j):
        def keep(module, args, kwargs, out):
            seen[j].append((args[0] if args else kwargs["hidden_states"], out))
        return keep
    handles = [b.register_forward_hook(hook(j), with_kwargs=True) for j, b in enumerate(blocks)]
    try:
        final = generate(pipe, family, seed=3)
    finally:
        for h in handles:
            h.remove()
    return seen, final


def _checked(pipe, plan, seen):
    """The plan's generation by forward hooks, each forecast_fit cell's gains fitted on the all-full generation's
    residuals at the cell's own last computed steps: the rows of each input fold with the gains fitted on the other
    fold's rows, applied to this generation's own cached residuals. Returns the images and the fits on all rows."""
    blocks = [m for _, m in plan_blocks(pipe)]
    model = adapter_for(pipe).denoiser(pipe)
    step, cache, fits = [-1], {j: [] for j in range(len(blocks))}, {}

    def hook(j):
        def run(module, args, kwargs, out):
            x, t = (args[0] if args else kwargs["hidden_states"]), step[0]
            if plan.blocks[j][t] != "forecast_fit":
                cache[j] = [*cache[j][-1:], (t, out - x)]
                return out
            recorded = [(u, seen[j][u][1] - seen[j][u][0]) for u, _ in cache[j]]
            target = seen[j][t][1] - seen[j][t][0]
            fits[f"{j}/{t}"] = forecast_fit.fit(recorded, t, target)
            rows = x.shape[0]
            fold = torch.arange(rows) % (rows // 2) % 2 == 0  # 2 inputs x 2 CFG halves: {0, 2}, {1, 3}
            stand = torch.empty_like(x)
            for mine, other in ((fold, ~fold), (~fold, fold)):
                gains = forecast_fit.fit([(u, r[other]) for u, r in recorded], t, target[other])
                (s1, r1) = cache[j][-1]
                (s0, r0) = cache[j][-2] if len(cache[j]) > 1 else (s1 - 1, r1)  # one point: no slope
                stand[mine] = x[mine] + r1[mine] + gains[0] * (r1 - r0)[mine] * (t - s1) / (s1 - s0)
            return stand
        return run

    handles = [model.register_forward_pre_hook(lambda m, a: step.__setitem__(0, step[0] + 1))]
    handles += [b.register_forward_hook(hook(j), with_kwargs=True) for j, b in enumerate(blocks)]
    try:
        return generate(pipe, "dit", seed=3), fits
    finally:
        for h in handles:
            h.remove()


def test_calibrated_plan_holds_the_gains_its_check_fitted_and_the_check_is_cross_fitted(tmp_path):
    pipe = tiny("dit")
    seen, ref = _recorded(pipe, "dit")
    assert seen[0][0][0].shape[1] <= T.MAX_TOKENS  # the table keeps every token: the naive fits see the same
    plan = calibrate_pipeline(pipe, INPUTS["dit"], steps=STEPS, guidance_scale=GUIDANCE["dit"], seed=3,
                              call_kwargs=pipeline_call_kwargs("dit"), latency_cache=tmp_path / "lat",
                              threshold=10.0, candidates=["forecast_fit"])
    table = plan.techniques["forecast_fit"]["fitted"]
    cells = {f"{j}/{t}" for j, row in enumerate(plan.blocks) for t, m in enumerate(row) if m == "forecast_fit"}
    assert cells and set(table) == cells
    got, fits = _checked(pipe, plan, seen)
    # the recorded error: each input's cells with gains fitted on the other input
    assert T.final_error(got, ref) == pytest.approx(plan.calibration["measured_error"], abs=1e-5)
    # the plan's gains: the fits on both inputs at each cell (the plan file rounds them)
    for k in cells:
        torch.testing.assert_close(torch.tensor(table[k]), fits[k], atol=2e-3, rtol=1e-3)
    path = tmp_path / "plan.json"
    plan.save(path)
    assert json.loads(path.read_text())["techniques"]["forecast_fit"]["fitted"].keys() == cells
    difa.apply_plan(pipe, load_plan(path))
    assert generate(pipe, "dit", seed=3).shape == ref.shape  # the saved plan runs
    difa.remove_plan(pipe)


def test_retiming_a_plan_with_fitted_cells_is_a_one_line_error():
    from difa import retime_plan
    pipe = tiny("dit")
    plan = fixed_plan(pipe, lambda i, t: "full", steps=STEPS, guidance_scale=GUIDANCE["dit"],
                      block=lambda j, t: "forecast_fit" if _skipping(j, t) else "full")
    with pytest.raises(DifaError, match=f"fitted at steps={STEPS}.*recalibrate with steps=10") as e:
        retime_plan(plan, pipe, 10)
    assert "\n" not in str(e.value)
    assert retime_plan(plan, pipe, STEPS) is plan
