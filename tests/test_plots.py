"""difa.plots: plan heatmap and Pareto plot (Agg canvas, atomic writes, one-line errors)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from difa import plots
from difa.errors import DifaError
from difa.plan import ModelIdentity, Plan

LAYERS = ("blocks.0.attn1", "blocks.1.attn1", "blocks.1.attn2")
METHODS = (("full", "ast", "ast", "wars"), ("full", "asc", "ast", "ast"), ("full", "tgate", "tgate", "tgate"))


def make_plan() -> Plan:
    return Plan(model=ModelIdentity("PixArtTransformer2DModel", "0" * 16, LAYERS, "toy", "pixart"),
                scheduler="DPMSolverMultistepScheduler", steps=4, methods=METHODS,
                techniques={"wars": {"window": 0.125}}, calibration={"threshold": 0.05}, flops={"fraction": 0.4})


def colours_in(path: Path) -> set[tuple[int, int, int]]:
    rgb = (imread(path)[..., :3] * 255).round().astype(int)  # (H, W, 3)
    return set(map(tuple, rgb.reshape(-1, 3)))


def rgb255(colour: str) -> tuple[int, int, int]:
    return tuple(round(c * 255) for c in to_rgb(colour))


def test_plan_grid_codes_follow_the_fixed_method_order():
    grid, methods = plots.plan_grid(make_plan())
    assert methods == ["full", "tgate", "ast", "wars", "asc"]  # METHOD_COLORS (registry) order, only the used ones
    assert grid.shape == (3, 4)
    assert [methods[c] for c in grid[0]] == list(METHODS[0])
    assert [methods[c] for c in grid[2]] == list(METHODS[2])


def test_method_colors_fixed_then_spare():
    colors = plots.method_colors(["ast", "newmethod", "full", "other"])
    assert colors["ast"] == plots.METHOD_COLORS["ast"] and colors["full"] == plots.METHOD_COLORS["full"]
    assert colors["newmethod"] != colors["other"] and colors["newmethod"] not in plots.METHOD_COLORS.values()


def test_heatmap_png_has_each_used_method_colour(tmp_path):
    path = plots.plan_heatmap(make_plan(), tmp_path / "sub" / "plan.png")
    assert path == tmp_path / "sub" / "plan.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    seen = colours_in(path)
    for m in ("full", "wars", "ast", "asc", "tgate"):
        assert rgb255(plots.METHOD_COLORS[m]) in seen, m
    for m in ("tome", "agent", "wars+asc"):  # not in the plan
        assert rgb255(plots.METHOD_COLORS[m]) not in seen, m
    assert [p.name for p in path.parent.iterdir()] == ["plan.png"]  # no temporary file left behind


def test_heatmap_from_a_plan_file_and_bigger_plans_give_bigger_figures(tmp_path):
    small = plots.plan_heatmap(make_plan().save(tmp_path / "p.json"), tmp_path / "small.png")
    rows = tuple(f"transformer_blocks.{i}.attn1" for i in range(28))
    big = Plan(model=ModelIdentity("DiTTransformer2DModel", "0" * 16, rows, "big", "dit"), scheduler="DDIM",
               steps=50, methods=tuple(("full",) + ("ast",) * 49 for _ in rows))
    big_path = plots.plan_heatmap(big, tmp_path / "big.svg")
    assert big_path.read_text().lstrip().startswith("<?xml") and "transformer_blocks.27.attn1" in big_path.read_text()
    assert imread(small).shape[0] < 400
    assert plots.plan_heatmap(big, tmp_path / "big.png") and imread(tmp_path / "big.png").shape[0] > 600


def test_heatmap_bad_suffix_is_refused_before_drawing(tmp_path):
    with pytest.raises(DifaError, match=r"must end in \.png, \.pdf, \.svg"):
        plots.plan_heatmap(make_plan(), tmp_path / "plan.jpg")
    assert not any(tmp_path.iterdir())


def test_pareto_front():
    x = [1.0, 0.5, 0.6, 0.4, math.nan, 0.7]
    y = [10.0, 11.0, 12.0, 15.0, 1.0, 11.0]
    assert plots.pareto_front(x, y).tolist() == [True, True, False, True, False, False]
    # higher-is-better y (accuracy): the fastest point with the best accuracy wins
    assert plots.pareto_front([1.0, 0.5, 0.6], [0.9, 0.8, 0.95], maximize_y=True).tolist() == [False, True, True]


def results() -> pd.DataFrame:
    return pd.DataFrame({
        "family": ["baseline", "difa", "difa", "difa", "tomesd", "tomesd"],
        "s_per_image": [1.0, 0.8, 0.6, 0.5, 0.7, 0.55],
        "fid": [10.0, 10.5, 11.0, 13.0, 12.0, 15.0],
        "class_acc": [math.nan] * 6,
        "threshold": [math.nan, 0.025, 0.05, 0.1, math.nan, math.nan],
    })


def test_pareto_plot_one_line_per_family(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or Path(path))
    plots.pareto_plot(results(), tmp_path / "p.png", label="threshold", title="toy")
    ax = figures[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"difa", "tomesd", "Pareto front"}
    assert list(lines["difa"].get_xdata()) == [0.5, 0.6, 0.8]  # sorted by cost
    assert list(lines["difa"].get_ydata()) == [13.0, 11.0, 10.5]
    assert sorted(t.get_text() for t in ax.texts) == ["0.025", "0.05", "0.1"]  # NaN labels skipped
    assert ax.get_xlabel() == plots.AXIS_LABELS["s_per_image"]


def test_pareto_plot_writes_a_png(tmp_path):
    path = plots.pareto_plot(results(), tmp_path / "p.png", x="s_per_image", y="fid")
    assert path.read_bytes()[:4] == b"\x89PNG" and imread(path).shape[1] > 300


@pytest.mark.parametrize("kwargs, message", [
    (dict(y="clip_score"), "no column 'clip_score' for the y axis"),
    (dict(y="class_acc"), "column 'class_acc' has no values"),
    (dict(family="preset"), "no column 'preset' to group the lines by"),
    (dict(label="ratio"), "no column 'ratio' to label"),
])
def test_pareto_plot_bad_columns(tmp_path, kwargs, message):
    with pytest.raises(DifaError, match=message):
        plots.pareto_plot(results(), tmp_path / "p.png", **kwargs)
    assert not (tmp_path / "p.png").exists()


def test_no_pyplot_state_is_touched(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plots.plan_heatmap(make_plan(), tmp_path / "a.png")
    plots.pareto_plot(results(), tmp_path / "b.png")
    assert plt.get_fignums() == before
    assert np.isfinite(imread(tmp_path / "a.png")).all()


def test_error_bars_from_interval_columns():
    df = pd.DataFrame({"rel_l1": [0.1, 0.2], "rel_l1_lo": [0.08, math.nan], "rel_l1_hi": [0.13, math.nan],
                       "rel_latency": [0.5, 0.6], "rel_latency_min": [0.45, 0.6], "rel_latency_max": [0.5, 0.7]})
    assert plots._error_bars(df, "rel_l1") == pytest.approx(np.array([[0.02, 0.0], [0.03, 0.0]]))
    assert plots._error_bars(df, "rel_latency") == pytest.approx(np.array([[0.05, 0.0], [0.0, 0.1]]))
    assert plots._error_bars(df, "ssim") is None
