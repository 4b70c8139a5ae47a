"""A whole front from one calibration: `calibrate_front` / `python -m difa.calibrate budget=[...]` records one
trajectory and writes one plan per budget, each checked on the final output, with measured errors non-increasing
in the budget."""

from __future__ import annotations

import importlib.util

import pytest

import difa
from difa.calibration import calibrate_front, search
from difa.calibration import table as error_table
from difa.cli import calibrate as calibrate_cli
from difa.errors import DifaError
from difa.models import pipeline_call_kwargs
from tests.conftest import GUIDANCE, INPUTS, STEPS, generate, tiny
from tests.test_cli import config
from tests.test_search import reachable

DRAWS = importlib.util.find_spec("matplotlib") is not None  # the eval extra is installed

pytestmark = pytest.mark.usefixtures("one_thread")


def front(pipe, tmp_path, budgets, **kw):
    return calibrate_front(pipe, INPUTS["dit"], budgets=budgets, steps=STEPS, guidance_scale=GUIDANCE["dit"], seed=3,
                           call_kwargs=pipeline_call_kwargs("dit"), latency_cache=tmp_path / "lat", **kw)


def test_one_trajectory_gives_one_plan_per_budget_each_checked(tmp_path):
    pipe = tiny("dit")
    budgets = [reachable(pipe, "dit", tmp_path, share) for share in (0.9, 0.2, 0.5)]
    calls = {"record": 0}
    original = error_table.record

    def counting(run, model, n_blocks):
        calls["record"] += n_blocks > 0  # (the other record: a warm run timing what lies outside the denoiser)
        return original(run, model, n_blocks)

    error_table.record, saved = counting, error_table.record
    try:
        plans = front(pipe, tmp_path, budgets)
    finally:
        error_table.record = saved
    assert calls["record"] == 1  # one recorded trajectory for the whole front
    assert [p.calibration["budget"] for p in plans] == sorted(budgets)
    errors = [p.calibration["measured_error"] for p in plans]
    assert all(a >= b for a, b in zip(errors, errors[1:]))  # non-increasing in the budget
    for p, b in zip(plans, sorted(budgets)):
        assert p.latency["predicted_fraction"] <= b + 5e-5
        assert p.calibration["front"]["budgets"] == sorted(budgets)
    ref = generate(pipe, "dit", seed=3)  # the recorded error is what the plan does
    difa.apply_plan(pipe, plans[0])
    got = generate(pipe, "dit", seed=3)
    difa.remove_plan(pipe)
    assert error_table.final_error(got, ref) == pytest.approx(plans[0].calibration["measured_error"], abs=1e-5)


def test_a_larger_budget_never_gets_a_worse_plan(tmp_path, monkeypatch):
    """Where the search at a larger budget checks worse than a smaller budget's plan, the smaller budget's plan is
    kept. The search is made to propose an every-block-skipped plan at the largest budget, which checks far worse."""
    pipe = tiny("dit")
    budgets = [reachable(pipe, "dit", tmp_path, share) for share in (0.3, 0.95)]
    real = search.front

    def worse_at_the_top(table, latency, n, steps, methods, check, goals):
        rows = [["full"] + ["reuse"] * (steps - 1) for _ in range(n)]
        c = search.Candidate(rows, 0.0, 0.0)
        c.measured = check(rows)
        return real(table, latency, n, steps, methods, check, goals)[:-1] + [(c, [c], [])]

    monkeypatch.setattr(search, "front", worse_at_the_top)
    low, high = front(pipe, tmp_path, budgets)
    assert high.blocks == low.blocks and high.calibration["kept_from_budget"] == min(budgets)
    assert high.calibration["measured_error"] == low.calibration["measured_error"]
    monkeypatch.setattr(search, "front", real)
    low2, high2 = front(pipe, tmp_path, budgets)
    assert "kept_from_budget" not in high2.calibration


def test_a_fronts_plans_are_nested(tmp_path):
    """Checked as a whole, a front's plans come from one path: a larger budget computes every block cell a smaller
    one computes (so errors on unseen seeds follow the budget, not the checks' noise)."""
    pipe = tiny("dit")
    budgets = [reachable(pipe, "dit", tmp_path, share) for share in (0.2, 0.4, 0.6, 0.8)]
    plans = front(pipe, tmp_path, budgets)
    computed = [{(j, t) for j, row in enumerate(p.blocks) for t, m in enumerate(row) if m == "full"} for p in plans]
    assert all(a <= b for a, b in zip(computed, computed[1:]))
    assert computed[0] != computed[-1]


def test_the_front_takes_the_path_with_less_error_over_all_budgets(monkeypatch):
    """Per budget the greedy path checks better at 0.3 and the structured one at 0.6; summed over the front the
    structured one wins, so both budgets take it (a per-budget choice would hop between the paths)."""
    def cand(tag):
        return search.Candidate([[tag]], 0.0, 0.0)

    paths = {0.3: (cand("g3"), cand("s3")), 0.6: (cand("g6"), cand("s6"))}
    errors = {"g3": 0.10, "s3": 0.12, "g6": 0.05, "s6": 0.02}
    monkeypatch.setattr(search, "budget_options", lambda *a: (list(paths[a[-1]]), []))
    chosen = search.front(None, None, 1, 1, [], lambda rows: errors[rows[0][0]], [0.3, 0.6])
    assert [c.rows[0][0] for c, _, _ in chosen] == ["s3", "s6"]
    errors.update(g6=0.01)  # now the greedy path has less error in sum: both budgets take it
    paths = {b: (cand(g.rows[0][0]), cand(s.rows[0][0])) for b, (g, s) in paths.items()}
    chosen = search.front(None, None, 1, 1, [], lambda rows: errors[rows[0][0]], [0.3, 0.6])
    assert [c.rows[0][0] for c, _, _ in chosen] == ["g3", "g6"]
    # a third path (the schedule with skipped cells only, search.PATHS) with less error in sum: both take it
    errors.update(x3=0.09, x6=0.015)
    paths = {b: (cand(g.rows[0][0]), cand(s.rows[0][0]), cand("x" + str(b)[-1])) for b, (g, s) in paths.items()}
    chosen = search.front(None, None, 1, 1, [], lambda rows: errors[rows[0][0]], [0.3, 0.6])
    assert [c.rows[0][0] for c, _, _ in chosen] == ["x3", "x6"]
    # summed as checked the third path wins (0.125 against 0.13), but the greedy path's 0.6 plan checks worse than
    # its 0.3 one, so its front delivers 0.05 + 0.05 (the smaller budget's plan kept, calibration/trajectory.py)
    errors.update(g3=0.05, g6=0.08, s3=0.2, s6=0.2, x3=0.06, x6=0.065)
    paths = {b: tuple(cand(c.rows[0][0]) for c in opts) for b, opts in paths.items()}
    chosen = search.front(None, None, 1, 1, [], lambda rows: errors[rows[0][0]], [0.3, 0.6])
    assert [c.rows[0][0] for c, _, _ in chosen] == ["g3", "g6"]


def test_the_cli_writes_a_front_on_one_screen(tmp_path, capsys):
    out = tmp_path / "front"
    plans, folder = calibrate_cli.run(config("calibrate", ["+model=tiny_dit", "budget=[0.9,0.95]", f"steps={STEPS}",
                                                            "n_calib=2", f"out={out}"]))
    text = capsys.readouterr().out.strip().splitlines()
    assert len(plans) == 2 and folder == out and len(text) <= 24
    for p in plans:
        path = out / f"tiny_dit_b{p.calibration['budget']}_s{STEPS}.json"
        # (a core install without matplotlib draws no heatmap, and says so: benchmarks/core_install.sh)
        assert difa.load_plan(path) == p and path.with_suffix(".png").is_file() == DRAWS
    assert (out / f"tiny_dit_front_s{STEPS}.png").is_file() == DRAWS
    with pytest.raises(DifaError, match="names a directory"):
        calibrate_cli.run(config("calibrate", ["+model=tiny_dit", "budget=[0.9]", f"out={tmp_path / 'x.json'}"]))
    with pytest.raises(DifaError, match="fraction"):
        calibrate_cli.run(config("calibrate", ["+model=tiny_dit", "budget=[0.9,2]", f"out={out}"]))


def test_budget_lists_are_checked():
    from difa.calibration import check_budgets

    assert check_budgets([0.5, 0.3, 0.5]) == [0.3, 0.5]
    for bad in ([], "0.5", [0.5, 0], None):
        with pytest.raises(DifaError):
            check_budgets(bad)
