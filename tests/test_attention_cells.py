"""Attention cells in the trajectory search (difa/calibration/attention_cells.py): the block rerun on another
attention method against a naive reference (a plan with that one cell, the block's output read by a forward hook),
the rerun leaving the generation untouched, the table's interpolation, the row rule for methods that read a cache,
the greedy's choice against a brute force, and the search's seconds against the plan's prediction."""

from __future__ import annotations

import pytest
import torch

from difa.apply import plan_blocks, plan_layers
from difa.calibration import attention_cells as A
from difa.calibration import search as S
from difa.calibration import table as T
from difa.calibration.latency import LatencyModel
from difa.engine import Engine
from difa.models import pipeline_call_kwargs
from difa.techniques import REGISTRY
from tests.conftest import GUIDANCE, INPUTS, STEPS, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def _generate(pipe, family, attention, *, observer=None, calibrating=False, hook=None):
    """Final output of one seeded generation under `attention` rows (blocks all full); `hook` = (block, step, store):
    a plain forward hook stores the block's output at that step."""
    adapter, model, layers = plan_layers(pipe)
    blocks = plan_blocks(pipe)
    handle = None
    if hook is not None:
        j, step, store = hook
        calls = [0]

        def fwd(module, args, out):
            if calls[0] == step:
                store.append(out.detach().clone())
            calls[0] += 1
        handle = blocks[j][1].register_forward_hook(fwd)
    engine = Engine(model, adapter, layers, attention, {}, scheduler=pipe.scheduler, inference_steps=STEPS,
                    blocks=blocks, block_methods=[["full"] * STEPS for _ in blocks], on_block=observer,
                    calibrating=calibrating, metric_layers=list(range(len(layers))) if calibrating else None)
    if observer is not None:
        observer.engine = engine
    try:
        with engine:
            out = adapter.call_pipeline(pipe, INPUTS[family], steps=STEPS, guidance_scale=GUIDANCE[family],
                                        generator=torch.Generator().manual_seed(3),
                                        output_type=adapter.calib_output_type, extra=pipeline_call_kwargs(family))
    finally:
        if handle is not None:
            handle.remove()
    return out.images


class _Rerun:
    """An on_block observer that reruns block j at `step` with its layers `cells` on `method`, keeping the output."""

    def __init__(self, j, step, cells):
        self.engine, self.j, self.step, self.cells, self.out = None, j, step, cells, None

    def __call__(self, j, step, x, out):
        if (j, step) == (self.j, self.step):
            self.out = self.engine.rerun(self.cells)


@pytest.mark.parametrize("family,method", [("dit", "wars"), ("dit", "ast"), ("pixart", "wars"), ("pixart", "ast")])
def test_rerun_is_the_block_output_of_a_plan_with_that_cell(family, method):
    pipe = tiny(family)
    adapter, model, layers = plan_layers(pipe)
    blocks = plan_blocks(pipe)
    names = [n for n, _ in layers]
    j, step = 1, 3
    on = A.cell_layers(adapter, names, [n for n, _ in blocks], [method])[method][j]
    assert on  # the block has layers it runs on
    cells = {names.index(n): method for n in on}
    full = [["full"] * STEPS for _ in layers]
    watch = _Rerun(j, step, cells)
    plain = _generate(pipe, family, [list(r) for r in full])
    observed = _generate(pipe, family, [list(r) for r in full], observer=watch, calibrating=True)
    # the rerun restores every cache and the plan: the generation is the all-full one (the calibrating engine's own
    # attention path computes what the stock processor does, to float rounding)
    torch.testing.assert_close(observed, plain, rtol=1e-5, atol=1e-5)
    # naive reference: a plan whose only change is those layers at that step, the block's output by a forward hook
    ref, plan = [], [list(r) for r in full]
    for i in cells:
        plan[i][step] = method
    _generate(pipe, family, plan, hook=(j, step, ref))
    assert watch.out is not None and not torch.equal(ref[0], _block_output(pipe, family, full, j, step))
    torch.testing.assert_close(watch.out, ref[0], rtol=1e-5, atol=1e-5)


def _block_output(pipe, family, full, j, step):
    out = []
    _generate(pipe, family, [list(r) for r in full], hook=(j, step, out))
    return out[0]


def test_table_interpolates_between_probed_steps_and_drops_cells_that_cost_time():
    lat = LatencyModel(step_s=1.0, fixed_s=0.0, block_s=(0.4, 0.4), ff_s=(0.1, 0.1), skip_s=(0.0, 0.0),
                       attn_s={"b.0.attn1": {"full": 0.2, "ast": 0.05}, "b.1.attn1": {"full": 0.2, "ast": 0.3}},
                       block_names=("b.0", "b.1"), cell_layers={"ast": (("b.0.attn1",), ("b.1.attn1",))})
    probe = {(0, 1, "ast"): 0.1, (0, 4, "ast"): 0.4, (0, 7, "ast"): 0.1, (1, 4, "ast"): 0.01}
    t = A.table(probe, lat, 9)
    naive = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.3, 6: 0.2, 7: 0.1, 8: 0.1}  # linear between, nearest beyond
    assert {s: round(t[(0, s, "ast")], 9) for s in range(1, 9)} == pytest.approx(naive)
    assert not any(k[0] == 1 for k in t)  # block 1's attention cell is slower than its full attention
    assert A.probe_steps(20) == {1, 7, 13, 19} and A.probe_steps(1) == set()


def _table(steps, attn):
    traj = T.Trajectory([{}], [{}], torch.zeros(1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, generator=g)
    for s in range(steps):
        traj.observe(0, s, x, x + torch.randn(2, 8, 4, generator=g))
    return S.Table(traj, attn=attn)


def test_a_method_that_reads_a_cache_needs_the_step_before_computed_in_full():
    assert REGISTRY["ast"].reads and not REGISTRY["tome"].reads
    attn = {(0, s, m): 0.01 * s for s in range(1, 6) for m in ("ast", "tome")}
    table = _table(6, attn)
    total, row, _ = table.row(0, 6, {2: S.ATTN, 3: S.ATTN}, ["reuse", "ast"])
    assert row == ["full", "full", "ast", "full", "full", "full"] and total == pytest.approx(0.02)
    total, row, _ = table.row(0, 6, {2: S.ATTN, 3: S.ATTN}, ["reuse", "tome"])
    assert row[2:4] == ["tome", "tome"] and total == pytest.approx(0.05)
    _, row, _ = table.row(0, 6, {1: S.SKIP, 2: S.ATTN}, ["reuse", "ast"])
    assert row[:3] == ["full", "reuse", "full"]  # after a skipped step the cache is older than it was scored at
    # a block with a half cell keeps its attention full throughout (plan validation): no attention cell
    halved = S.Table(table.traj, attn=attn, cond=slice(0, 1))
    _, row, _ = halved.row(0, 6, {2: S.HALF, 4: S.ATTN}, ["cfg_delta", "tome"])
    assert row[2] == "cfg_delta" and row[4] == "full"
    # an attention cell is a computed step for the block's stand-ins after it
    _, row, stale = table.row(0, 6, {2: S.ATTN, 3: S.SKIP}, ["reuse", "tome"])
    assert row[2:4] == ["tome", "reuse"] and stale == 1


def test_greedys_first_move_is_the_least_error_per_second_saved():
    steps = 6
    lat = LatencyModel(step_s=1.0, fixed_s=0.0, block_s=(0.5,), ff_s=(0.1,), skip_s=(0.0,),
                       attn_s={"b.0.attn1": {"full": 0.3, "tome": 0.1}}, block_names=("b.0",),
                       cell_layers={"tome": (("b.0.attn1",),)})
    attn = {(0, s, "tome"): 0.002 * s for s in range(1, steps)}
    table = _table(steps, attn)
    seq = S.greedy_sequence(table, lat, 1, steps, ["reuse", "tome"], lambda c: len(c.rows[0]) - c.rows[0].count("full")
                            >= 1, steps * 1.0)
    # brute force over every one-cell move from all-full (stale one: the cell after a computed step)
    best = None
    for s in range(1, steps):
        for m, cost in (("reuse", lat.skip_s[0]), ("tome", lat.block_cost(0, "tome"))):
            err = table.error(0, s, list(range(s)), m)
            ratio = err / (lat.block_s[0] - cost)
            if best is None or ratio < best[0]:
                best = (ratio, s, m)
    first = seq[1].rows[0]
    assert first[best[1]] == best[2] and sum(m != "full" for m in first) == 1
    assert lat.block_cost(0, "tome") == pytest.approx(0.5 - 0.2)


def test_the_searchs_seconds_are_the_plans_prediction():
    lat = LatencyModel(step_s=1.0, fixed_s=0.3, block_s=(0.4, 0.4), ff_s=(0.1, 0.1), skip_s=(0.01, 0.01),
                       attn_s={"b.0.attn1": {"full": 0.2, "wars": 0.12}, "b.0.attn2": {"full": 0.1, "wars": 0.05},
                               "b.1.attn1": {"full": 0.2, "wars": 0.1}},
                       block_names=("b.0", "b.1"), cell_layers={"wars": (("b.0.attn1",), ("b.1.attn1",))})
    layers = ["b.0.attn1", "b.0.attn2", "b.1.attn1"]
    rows = [["full", "wars", "reuse", "wars"], ["full", "reuse", "wars", "forecast"]]
    blocks, attention = A.split(rows, layers, lat, 4)
    assert blocks == [["full", "full", "reuse", "full"], ["full", "reuse", "full", "forecast"]]
    assert attention == [["full", "wars", "full", "wars"], ["full"] * 4, ["full", "full", "wars", "full"]]
    full = lat.fixed_s + 4 * lat.step_s
    assert S.fraction(lat, rows, 4, full) == pytest.approx(lat.predict(layers, attention, blocks, 4)["fraction"])


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_a_plan_with_attention_cells_does_what_its_calibration_recorded(family, tmp_path, monkeypatch):
    """Where the latency model says only attention cells pay (timings faked: attention nearly free on `ast` /
    `wars`, a skipped or halved block as dear as a computed one), a budget under full takes them; the plan runs,
    within its budget, with the recorded error on those inputs. (With real block timings, which budgets take
    attention cells depends on the machine's load: a run of the whole suite beside other work took none.)"""
    from dataclasses import replace

    import difa
    from difa.calibration import latency, timing
    from tests.test_search import calibrate, final

    real, measure = latency.time_attention, timing.measure

    def cheap(*args, **kwargs):
        timed = real(*args, **kwargs)
        return {m: (t if m == "full" else t * 0.05) if m in ("full", "ast", "wars") else t for m, t in timed.items()}

    def no_block_savings(*args, **kwargs):
        m = measure(*args, **kwargs)
        return replace(m, skip_s=m.block_s, keep_s=(), half_s=m.block_s if m.half_s else ())

    monkeypatch.setattr(latency, "time_attention", cheap)
    monkeypatch.setattr(timing, "measure", no_block_savings)
    pipe = tiny(family)
    ref = final(pipe, family)
    for budget in (0.995, 0.98):
        plan = calibrate(pipe, family, tmp_path, budget=budget)
        used = {m for row in plan.methods for m in row} - {"full"}
        assert used and used <= {"ast", "wars"}
        assert plan.latency["predicted_fraction"] <= budget + 5e-5
        difa.apply_plan(pipe, plan)
        got = final(pipe, family)
        difa.remove_plan(pipe)
        assert T.final_error(got, ref) == pytest.approx(plan.calibration["measured_error"], abs=1e-5)


def test_attention_timings_at_other_batches_scale_the_methods_difference():
    from difa.calibration.timing import _scaled

    at = {"l0": {"full": 2.0}, "l1": {"full": 1.0}}
    main = {"l0": {"full": 1.0, "wars": 0.6, "ast": 0.1}, "l2": {"full": 1.0, "ast": 0.0}}
    got = _scaled(at, main, 4.0)
    assert set(got) == {"l0"}  # (l2 was not timed at this batch, l1 has no method)
    assert got["l0"] == pytest.approx({"full": 2.0, "wars": 2.0 - 4 * 0.4, "ast": 2.0 - 4 * 0.9})


def test_layers_alike_share_one_attention_timing_and_others_do_not():
    from difa.calibration.latency import Capture, _signature

    for family in ("dit", "sd"):
        pipe = tiny(family)
        adapter, model, layers = plan_layers(pipe)
        capture = Capture(model, adapter, plan_blocks(pipe), layers)
        try:
            _generate(pipe, family, [["full"] * STEPS for _ in layers])
        finally:
            capture.close()
        keys = {n: _signature(a, n, capture.attn_in[i], adapter) for i, (n, a) in enumerate(layers)}
        shapes = {n: (n.rsplit(".", 1)[-1], tuple(capture.attn_in[i][0][0].shape) if capture.attn_in[i][0]
                      else tuple(capture.attn_in[i][1]["hidden_states"].shape)) for i, (n, _) in enumerate(layers)}
        for a in keys:  # same key -> same kind and input shape; and (DiT) identical blocks share one key
            for b in keys:
                if keys[a] == keys[b]:
                    assert shapes[a] == shapes[b]
        if family == "dit":
            assert len(set(keys.values())) == 1
        else:
            assert len(set(keys.values())) > 2  # self- and cross-attention, at each UNet resolution
