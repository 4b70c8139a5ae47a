"""Latency at the serving batch: the latency model is timed at the latency batch and at multiples of it, the plan
records its prediction at each timed batch, and `predicted_at` interpolates between them; generate and evaluate
print the prediction at the batch they run and warn outside the timed batches."""

from __future__ import annotations

import json

import pytest

from difa.calibration import calibrate_pipeline
from difa.calibration.latency import LatencyModel
from difa.calibration.timing import SERVE_FACTORS, predicted_at
from difa.cli import calibrate as calibrate_cli
from difa.cli import generate as generate_cli
from difa.models import pipeline_call_kwargs
from tests.conftest import GUIDANCE, INPUTS, STEPS, tiny
from tests.test_cli import config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_plan_records_its_prediction_at_every_timed_batch(tmp_path):
    pipe = tiny("dit")
    plan = calibrate_pipeline(pipe, INPUTS["dit"], threshold=0.05, budget=0.9, steps=STEPS,
                              guidance_scale=GUIDANCE["dit"], seed=3, call_kwargs=pipeline_call_kwargs("dit"),
                              latency_cache=tmp_path / "lat")
    b = len(INPUTS["dit"])
    want = sorted({b, *(max(1, round(b * f)) for f in SERVE_FACTORS)})
    by = plan.latency["by_batch"]
    assert sorted(map(int, by)) == want
    assert by[str(b)]["predicted_fraction"] == plan.latency["predicted_fraction"]  # the search's model is b's
    assert [by[str(x)]["full_s"] for x in want] == sorted(by[str(x)]["full_s"] for x in want)  # more images, more time
    # each entry is the prediction of one of the models measured (and cached), one per timed batch
    models = [LatencyModel(**json.loads(p.read_text())) for p in (tmp_path / "lat").glob("*.json")]
    assert sorted(m.images for m in models) == want
    for m in models:
        p = m.predict(list(plan.layers), plan.methods, plan.blocks, plan.steps)
        assert by[str(m.images)]["predicted_s"] == round(p["seconds"], 6)
        assert by[str(m.images)]["predicted_fraction"] == round(p["fraction"], 4)


def test_predicted_at_interpolates_between_the_timed_batches():
    record = {"batch": 4, "predicted_fraction": 0.4,
              "by_batch": {"1": {"predicted_s": 1.0, "full_s": 2.0}, "4": {"predicted_s": 2.0, "full_s": 5.0},
                           "16": {"predicted_s": 5.0, "full_s": 17.0}}}

    def naive(b):  # the segment's straight line through its two timed points
        (b0, s0, f0), (b1, s1, f1) = ((1, 1.0, 2.0), (4, 2.0, 5.0)) if b < 4 else ((4, 2.0, 5.0), (16, 5.0, 17.0))
        s, f = s0 + (b - b0) * (s1 - s0) / (b1 - b0), f0 + (b - b0) * (f1 - f0) / (b1 - b0)
        return s / f

    for b in (1, 2, 4, 10, 16):
        at = predicted_at(record, b)
        assert at["fraction"] == pytest.approx(naive(b)) and at["inside"] and at["timed"] == [1, 4, 16]
    far = predicted_at(record, 25)
    assert not far["inside"] and far["fraction"] == pytest.approx(naive(25))  # extrapolated from the last segment
    assert predicted_at({"batch": 4, "predicted_fraction": 0.5, "predicted_s": 1.0, "full_s": 2.0}, 4)["inside"]
    assert predicted_at({}, 4) is None


def test_generate_prints_the_prediction_at_its_batch_and_warns_outside(tmp_path, capsys):
    path = tmp_path / "p.json"
    calibrate_cli.run(config("calibrate", ["+model=tiny_dit", "budget=0.95", f"steps={STEPS}", "n_calib=2",
                                           f"out={path}"]))
    capsys.readouterr()
    generate_cli.run(config("generate", [f"plan={path}", "n=2", f"out={tmp_path / 'a'}"]))
    inside = capsys.readouterr().out
    assert "predicted" in inside and "at batch 2" in inside and "warning" not in inside
    generate_cli.run(config("generate", [f"plan={path}", "n=10", "inputs=[0,1,2,3,4,5,6,7,8,9]",
                                         f"out={tmp_path / 'b'}"]))
    outside = capsys.readouterr().out
    assert "at batch 10" in outside and "warning" in outside and "outside the batches" in outside
