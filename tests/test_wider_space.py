"""experiments/wider_space.py's matched-latency reading: Pareto points and linear interpolation between them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import wider_space as W  # noqa: E402


def pt(lat, err):
    return {"latency": lat, "error": err, "lo": err - 0.01, "hi": err + 0.01}


def test_pareto_drops_points_beaten_on_both_axes():
    pts = [pt(0.5, 0.05), pt(0.4, 0.08), pt(0.6, 0.06), pt(0.7, 0.02)]  # (0.6, 0.06) is slower and worse than 0.5's
    assert [(p["latency"], p["error"]) for p in W.pareto(pts)] == [(0.4, 0.08), (0.5, 0.05), (0.7, 0.02)]


def test_error_at_a_latency_is_linear_between_the_pareto_points_around_it():
    pts = [pt(0.4, 0.08), pt(0.6, 0.06), pt(0.5, 0.04)]
    v = W.at_latency(pts, 0.45)  # between (0.4, 0.08) and (0.5, 0.04); (0.6, 0.06) is dominated
    assert v["error"] == pytest.approx(0.06) and v["lo"] == pytest.approx(0.05) and v["hi"] == pytest.approx(0.07)
    assert W.at_latency(pts, 0.5)["error"] == pytest.approx(0.04)
    assert W.at_latency(pts, 0.3) is None and W.at_latency(pts, 0.55) is None  # outside the Pareto points
