"""Figures: the plan heatmap (layers x steps coloured by method) and the quality-vs-cost Pareto plot.

matplotlib's object API on an Agg canvas: no pyplot, no global backend switch, safe in worker processes.
Files are written atomically (temporary file, then rename); the format follows the suffix (.png, .pdf, .svg).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from difa.errors import DifaError
from difa.metrics import save_atomic
from difa.plan import Plan, load_plan
from difa.techniques import TECHNIQUES

# One fixed colour per method (each technique's description: Technique.color), so that heatmaps of different plans read alike.
METHOD_COLORS = {t.name: t.color for t in TECHNIQUES}
MOOT = "skipped (block)"  # attention cells of a block skipped at that step: they do not run
MOOT_COLOR = "#ffffff"  # white: nothing runs there
EXTRA_COLORS = ("#7f7f7f", "#843c39", "#7b4173", "#3182bd")  # a method without a COLOR (none today)
# Metrics where larger is better; every other column (FID, rel_l1, latency, FLOPs) is lower-is-better.
HIGHER_IS_BETTER = frozenset({"inception_score", "class_acc", "psnr_db", "ssim", "clip_score"})
AXIS_LABELS = {
    "s_per_image": "latency (s / image)",
    "rel_latency": "latency relative to the uncompressed model",
    "attn_flops": "attention FLOPs relative to full",
    "fid": "FID (lower is better)",
    "inception_score": "Inception Score (higher is better)",
    "class_acc": "class accuracy (higher is better)",
    "rel_l1": "relative L1 to the uncompressed images (lower is better)",
    "psnr_db": "PSNR to the uncompressed images, dB (higher is better)",
    "ssim": "SSIM to the uncompressed images (higher is better)",
}
BASELINE = "baseline"
IMAGE_FORMATS = ("png", "pdf", "svg")


def method_colors(methods: Sequence[str]) -> dict[str, str]:
    """Colour of each method: its technique file's COLOR (registered now, so a technique added at run time too),
    else the next spare colour."""
    from difa.techniques import REGISTRY

    extra = iter(EXTRA_COLORS * (1 + len(methods) // len(EXTRA_COLORS)))
    fixed = {**METHOD_COLORS, **{n: t.color for n, t in REGISTRY.items()}}
    return {m: MOOT_COLOR if m == MOOT else fixed[m] if m in fixed else next(extra) for m in methods}


def plan_rows(plan: Plan) -> tuple[list[str], list[list[str]]]:
    """Row names and cells of the heatmap: block rows first, then attention rows with moot cells marked."""
    from difa.plan import attention_executed, block_executed

    ran = attention_executed(plan)
    block_ran = block_executed(plan.model.blocks, plan.blocks, plan.steps)  # UNet units inside a cached unit
    cells = [[m if ok else MOOT for m, ok in zip(row, r)] for row, r in zip(plan.blocks, block_ran)] + \
        [[m if ok else MOOT for m, ok in zip(row, r)] for row, r in zip(plan.methods, ran)]
    return list(plan.model.blocks) + list(plan.layers), cells


def plan_grid(plan: Plan) -> tuple[np.ndarray, list[str]]:
    """(rows, steps) int codes into the returned method list (methods in METHOD_COLORS order, then others); rows
    are the block rows, then the attention layers."""
    _, rows = plan_rows(plan)
    used = {m for row in rows for m in row}
    methods = [m for m in METHOD_COLORS if m in used] + sorted(used - set(METHOD_COLORS) - {MOOT}) + \
        ([MOOT] if MOOT in used else [])
    code = {m: i for i, m in enumerate(methods)}
    return np.array([[code[m] for m in row] for row in rows], dtype=np.int64), methods


def _format(path: Path) -> str:
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in IMAGE_FORMATS:
        raise DifaError(f"figure path {str(path)!r} must end in {', '.join('.' + f for f in IMAGE_FORMATS)}")
    return fmt


def _save(fig, path: str | os.PathLike, follow: bool = True) -> Path:
    """Write the figure atomically; `follow` False: a symlink at `path` is refused (a side file, difa.files)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    fmt = _format(path)
    FigureCanvasAgg(fig)
    return save_atomic(path, lambda f: fig.savefig(f, format=fmt, dpi=120, bbox_inches="tight"), follow=follow)


def plan_title(plan: Plan) -> str:
    c, parts = plan.calibration, [plan.model.name or plan.model.cls]
    if "preset" in c:
        parts.append(f"preset {c['preset']}")
    elif c.get("budget") is not None:
        parts.append(f"budget {c['budget']}")
    elif c.get("threshold") is not None:
        parts.append(f"threshold {c['threshold']}")
    if "predicted_fraction" in plan.latency:
        parts.append(f"{100 * plan.latency['predicted_fraction']:.0f}% of full latency (predicted)")
    if "fraction" in plan.flops:
        parts.append(f"{100 * plan.flops['fraction']:.1f}% of full attention FLOPs")
    return ", ".join(parts)


def plan_heatmap(plan: Plan | str | os.PathLike, path: str | os.PathLike, *, title: str | None = None,
                 follow: bool = True) -> Path:
    """Draw the plan as a layers x steps grid, one colour per method, and write it to `path` (.png/.pdf/.svg)."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    _format(Path(path))  # fail before drawing
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    grid, methods = plan_grid(plan)  # (L, T)
    colors = method_colors(methods)
    n_layers, steps = grid.shape
    fig = Figure(figsize=(min(3 + 0.3 * steps, 24), min(1.5 + 0.22 * n_layers, 40)))
    ax = fig.subplots()
    cmap = ListedColormap([colors[m] for m in methods])
    norm = BoundaryNorm(np.arange(len(methods) + 1) - 0.5, len(methods))
    ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    names, rows = plan_rows(plan)
    ax.set_yticks(range(n_layers), labels=names, fontsize=7 if n_layers > 20 else 8)
    tick_every = max(1, math.ceil(steps / 25))
    ax.set_xticks(range(0, steps, tick_every))
    ax.set_xlabel("denoising step (denoiser call)")
    ax.set_ylabel("block / attention layer" if plan.blocks else "attention layer")
    ax.set_xticks(np.arange(-0.5, steps, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_layers, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    counts: dict[str, int] = {}
    for row in rows:
        for m in row:
            counts[m] = counts.get(m, 0) + 1
    handles = [Patch(facecolor=colors[m], edgecolor="black", linewidth=0.3, label=f"{m} ({counts[m]})") for m in methods]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title if title is not None else plan_title(plan), fontsize=9)
    return _save(fig, path, follow)


def front_plot(plans: Sequence[Plan], path: str | os.PathLike, follow: bool = True) -> Path:
    """A calibrated front (difa.calibration.calibrate_front): each budget's plan at its predicted latency against its
    measured final-output error on the calibration inputs, labelled with its budget."""
    from matplotlib.figure import Figure

    _format(Path(path))
    x = [p.latency.get("predicted_fraction", math.nan) for p in plans]
    y = [p.calibration.get("measured_error", math.nan) for p in plans]
    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots()
    ax.plot(x, y, "o-", color=METHOD_COLORS.get("forecast", "#333333"))
    for p, xi, yi in zip(plans, x, y):
        kept = p.calibration.get("kept_from_budget")
        ax.annotate(f"{p.calibration.get('budget')}" + (f" (= {kept})" if kept is not None else ""), (xi, yi),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("predicted latency (fraction of full)")
    ax.set_ylabel("final-output relative L1 (calibration inputs)")
    ax.set_title(f"{plans[0].model.name or plans[0].model.cls}: one plan per budget, one recorded trajectory", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path, follow)


def pareto_front(x: Sequence[float], y: Sequence[float], *, maximize_y: bool = False) -> np.ndarray:
    """Boolean mask of the points that no other point beats on both axes (x lower-is-better; y as given).
    NaN points are never on the front."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if maximize_y:
        ys = -ys
    ok = ~(np.isnan(xs) | np.isnan(ys))
    front = np.zeros(len(xs), dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok.copy()
        others[i] = False
        dominated = (xs[others] <= xs[i]) & (ys[others] <= ys[i]) & ((xs[others] < xs[i]) | (ys[others] < ys[i]))
        front[i] = not dominated.any()
    return front


def _column(df, name: str, what: str) -> None:
    if name not in df.columns:
        raise DifaError(f"no column {name!r} for the {what} axis; columns: {', '.join(map(str, df.columns))}")
    if df[name].isna().all():
        raise DifaError(f"column {name!r} has no values (e.g. FID needs fid=true in difa.evaluate); pick another {what} column")


MAIN_FAMILY = "difa"
# Okabe & Ito's colour-blind-safe palette (blue first, for difa), and markers cycling independently of it.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999", "#882255",
           "#117733")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p")


def _error_bars(part, col: str):
    """(2, n) distances below and above each point from `col`'s interval columns, or None without them."""
    import numpy as np

    for lo, hi in (("_lo", "_hi"), ("_min", "_max")):
        if f"{col}{lo}" in part.columns and f"{col}{hi}" in part.columns and part[f"{col}{lo}"].notna().any():
            v = part[col].to_numpy(dtype=float)
            a, b = part[f"{col}{lo}"].to_numpy(dtype=float), part[f"{col}{hi}"].to_numpy(dtype=float)
            below, above = np.nan_to_num(v - a, nan=0.0, posinf=0.0), np.nan_to_num(b - v, nan=0.0, posinf=0.0)
            return np.stack([np.clip(below, 0, None), np.clip(above, 0, None)])
    return None


def pareto_plot(df, path: str | os.PathLike, *, x: str = "s_per_image", y: str = "fid", family: str = "family",
                label: str | None = None, title: str | None = None) -> Path:
    """Quality `y` against cost `x`, one line per value of the `family` column (points joined in order of x), with
    the Pareto front over all points dashed. `label` names a column whose values annotate the points (e.g. the
    threshold). Rows where x or y is NaN are left out. Where the table has interval columns (`<y>_lo`/`<y>_hi`:
    difa.evaluate's 95% bootstrap interval; `<x>_min`/`<x>_max`: the latency's spread over the timed batches),
    each point carries them as error bars."""
    from matplotlib.figure import Figure

    _format(Path(path))
    _column(df, x, "x")
    _column(df, y, "y")
    if family not in df.columns:
        raise DifaError(f"no column {family!r} to group the lines by; columns: {', '.join(map(str, df.columns))}")
    if label is not None and label not in df.columns:
        raise DifaError(f"no column {label!r} to label the points with")
    data = df[df[x].notna() & df[y].notna()]
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.subplots()
    names = sorted(data[family].astype(str).unique(), key=lambda f: (f != BASELINE, f != MAIN_FAMILY, f))
    others = 0
    for name in names:
        part = data[data[family].astype(str) == name].sort_values(x)
        if name == BASELINE:
            ax.scatter(part[x], part[y], marker="*", s=120, color="black", zorder=3, label=name)
        elif name == MAIN_FAMILY:  # difa's own curve: first, boldest, on top
            ax.plot(part[x], part[y], marker="o", markersize=6, linewidth=2.6, color=PALETTE[0], zorder=4, label=name)
        else:  # a colour and a marker per family, so series differ in print and for colour-blind readers
            others += 1
            ax.plot(part[x], part[y], marker=MARKERS[others % len(MARKERS)], markersize=4, linewidth=1.1,
                    color=PALETTE[1 + (others - 1) % (len(PALETTE) - 1)], label=name)
        color = "black" if name == BASELINE else ax.get_lines()[-1].get_color()
        xerr, yerr = _error_bars(part, x), _error_bars(part, y)
        if xerr is not None or yerr is not None:
            ax.errorbar(part[x], part[y], xerr=xerr, yerr=yerr, fmt="none", ecolor=color, elinewidth=0.7,
                        capsize=1.5, alpha=0.8, zorder=2)
        if label is not None and name != BASELINE:
            for _, row in part[part[label].notna()].iterrows():
                ax.annotate(str(row[label]), (row[x], row[y]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = data[pareto_front(data[x], data[y], maximize_y=y in HIGHER_IS_BETTER)].sort_values(x)
    if len(front) > 1:
        ax.step(front[x], front[y], where="post", linestyle="--", color="grey", linewidth=0.8, label="Pareto front")
    ax.set_xlabel(AXIS_LABELS.get(x, x))
    ax.set_ylabel(AXIS_LABELS.get(y, y))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over points
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
