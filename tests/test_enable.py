"""difa.enable / difa.disable (difa/enable.py): the first call's images are the pipeline's own, later calls run
the cached plan, other settings make another plan, a killed calibration leaves no plan, disable restores the
pipeline bit for bit."""

from __future__ import annotations

import logging

import pytest
import torch

import difa
from difa.apply import plan_blocks
from difa.enable import STATE_ATTR
from difa.errors import DifaError
from tests.conftest import tiny

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 6


def call(pipe, steps=STEPS, seed=3):
    out = pipe(class_labels=[1, 7], num_inference_steps=steps, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(seed), output_type="pt")
    return out.images


class Count:
    """Calls of every block's attention module: a block a plan skips does not call it."""

    def __init__(self, pipe):
        self.n = 0
        self.handles = [b.attn1.register_forward_hook(self.hook) for _, b in plan_blocks(pipe)]

    def hook(self, *a):
        self.n += 1

    def close(self):
        for h in self.handles:
            h.remove()


def test_first_call_is_exact_then_the_plan_runs_and_disable_restores(tmp_path, caplog):
    pipe = tiny("dit")
    cls = type(pipe)
    count = Count(pipe)
    ref = call(pipe)
    full_calls = count.n
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    difa.enable(pipe, threshold=0.05, cache=tmp_path)
    with caplog.at_level(logging.INFO, logger="difa"):
        first = call(pipe)  # calibrates
        count.n = 0
        second = call(pipe)  # the plan
        planned_calls = count.n
    count.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "difa"]
    assert len(logged) == 1 and "calibrated a plan for these settings in" in logged[0]  # the cost, once
    torch.testing.assert_close(first, ref, rtol=0, atol=0)  # the pipeline's own images
    plans = list(tmp_path.glob("*.json"))
    assert len(plans) == 1
    plan = difa.load_plan(plans[0])
    assert plan.calibration["enable_settings"]["num_inference_steps"] == STEPS
    assert planned_calls < full_calls  # the plan skips blocks
    # the images are the plan's, with the error its calibration checked on this very call (its noise replayed)
    err = float((second.double() - ref.double()).abs().sum() / ref.double().abs().sum())
    assert err > 0 and err == pytest.approx(plan.calibration["measured_error"], abs=1e-5)
    assert plan.latency["predicted_fraction"] < 1
    assert difa.disable(pipe) and not difa.disable(pipe)
    assert type(pipe) is cls and not hasattr(pipe, STATE_ATTR)
    torch.testing.assert_close(call(pipe), ref, rtol=0, atol=0)
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in weights.items())


def test_settings_key_the_plans_and_a_new_process_reuses_them(tmp_path, monkeypatch):
    pipe = tiny("dit")
    difa.enable(pipe, threshold=0.05, cache=tmp_path)
    call(pipe)
    call(pipe, seed=5)  # other generator, same settings: no new plan
    assert len(list(tmp_path.glob("*.json"))) == 1
    call(pipe, steps=STEPS + 2)  # other settings: a second plan
    assert len(list(tmp_path.glob("*.json"))) == 2
    difa.disable(pipe)

    import difa.calibration as calibration

    def refuse(*a, **k):
        raise AssertionError("calibrated although the cache holds the plan")

    monkeypatch.setattr(calibration, "calibrate_pipeline", refuse)
    other = tiny("dit")  # as a later process would: a new pipeline object, the same cache folder
    difa.enable(other, threshold=0.05, cache=tmp_path)
    count = Count(other)
    call(other)
    assert getattr(other, STATE_ATTR).applied is not None
    count.close()
    difa.disable(other)


def test_a_killed_calibration_leaves_no_plan_in_the_cache(tmp_path, monkeypatch):
    import difa.calibration as calibration
    from difa.plan import Plan

    pipe = tiny("dit")
    difa.enable(pipe, threshold=0.05, cache=tmp_path)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibration, "calibrate_pipeline", killed)
    with pytest.raises(KeyboardInterrupt):
        call(pipe)
    assert not list(tmp_path.glob("*.json"))
    monkeypatch.undo()

    real = Plan.to_json

    def half_written(self):  # killed while the plan file is being written
        raise KeyboardInterrupt(real(self)[:100])

    monkeypatch.setattr(Plan, "to_json", half_written)
    with pytest.raises(KeyboardInterrupt):
        call(pipe)
    assert not [p for p in tmp_path.iterdir() if p.is_file()]  # no plan, no temporary file
    monkeypatch.undo()
    call(pipe)  # calibrates now
    assert len(list(tmp_path.glob("*.json"))) == 1
    difa.disable(pipe)


def test_bad_goals_are_one_line_errors(tmp_path):
    pipe = tiny("dit")
    for kw in ({}, {"budget": 0.5, "threshold": 0.05}, {"budget": 2}, {"threshold": -1}):
        with pytest.raises(DifaError) as e:
            difa.enable(pipe, cache=tmp_path, **kw)
        assert "\n" not in str(e.value)
    assert not hasattr(pipe, STATE_ATTR)


def test_a_text_pipeline_with_its_own_call_arguments(tmp_path):
    from difa.models import pipeline_call_kwargs

    pipe = tiny("pixart")
    extra = pipeline_call_kwargs("pixart")

    def run(**kw):
        return pipe(prompt=["a red bird", "a blue car"], num_inference_steps=STEPS, guidance_scale=4.5,
                    generator=torch.Generator().manual_seed(3), output_type="latent", **extra, **kw).images

    ref = run()
    difa.enable(pipe, threshold=0.05, cache=tmp_path)
    torch.testing.assert_close(run(), ref, rtol=0, atol=0)
    (path,) = tmp_path.glob("*.json")
    plan = difa.load_plan(path)
    assert plan.calibration["inputs"] == ["a red bird", "a blue car"]
    assert plan.calibration["enable_settings"]["passed"] == {k: repr(v) if not isinstance(v, (int, float, str, bool))
                                                             else v for k, v in extra.items()}
    run()  # the plan
    assert getattr(pipe, STATE_ATTR).applied is not None
    difa.disable(pipe)
    torch.testing.assert_close(run(), ref, rtol=0, atol=0)


def test_a_budget_goal_gives_a_plan_within_it(tmp_path):
    pipe = tiny("dit")
    difa.enable(pipe, budget=0.95, cache=tmp_path)  # (reachable on a loaded machine too: tests/test_search.py)
    call(pipe)
    (path,) = tmp_path.glob("*.json")
    plan = difa.load_plan(path)
    assert plan.calibration["budget"] == 0.95 and plan.latency["predicted_fraction"] <= 0.95 + 5e-5
    difa.disable(pipe)


def test_the_first_call_is_the_calibrations_recorded_generation(tmp_path, monkeypatch):
    """No generation beyond the calibration's own: the call's images are those of its recorded all-full run."""
    pipe = tiny("dit")
    runs = []
    real = type(pipe.scheduler).set_timesteps
    monkeypatch.setattr(type(pipe.scheduler), "set_timesteps", lambda self, *a, **k: (runs.append(1), real(self, *a, **k))[1])
    difa.calibrate_pipeline(pipe, [1, 7], threshold=0.05, steps=STEPS, guidance_scale=4.0, latency_cache=tmp_path / "l")
    alone, runs[:] = len(runs), []
    difa.enable(pipe, threshold=0.05, cache=tmp_path)
    call(pipe)
    assert len(runs) == alone  # (the latency microbenchmark calls the denoiser, not the pipeline)
    difa.disable(pipe)


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_the_callers_step_callback_runs_once_per_step_of_the_first_call(tmp_path, family):
    """The calibration's other generations do not replay the caller's step callback (SD: callback_on_step_end,
    PixArt: the older callback): the first call runs it once per step, as a plain call does, on the same latents,
    and returns the plain call's images."""
    from difa.models import pipeline_call_kwargs

    pipe = tiny(family)
    seen = []

    def on_step_end(p, i, t, tensors):
        seen.append((i, tensors["latents"].clone()))
        return {}

    def on_step(i, t, latents):
        seen.append((i, latents.clone()))

    hook = dict(callback_on_step_end=on_step_end) if family == "sd" else dict(callback=on_step, callback_steps=1)

    def called():
        seen.clear()
        out = pipe(prompt=["a red bird", "a blue car"], num_inference_steps=STEPS, guidance_scale=4.5,
                   generator=torch.Generator().manual_seed(3), output_type="latent", **pipeline_call_kwargs(family),
                   **hook).images
        return out, list(seen)

    ref, plain = called()
    difa.enable(pipe, threshold=0.05, cache=tmp_path)
    first, during = called()
    assert [i for i, _ in during] == list(range(STEPS))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(during, plain))
    assert torch.equal(first, ref)
    _, planned = called()  # the plan's call runs it once per step too
    assert [i for i, _ in planned] == list(range(STEPS))
    difa.disable(pipe)
