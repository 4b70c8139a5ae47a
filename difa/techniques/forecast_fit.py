"""`forecast_fit`: skip the whole block and stand in for its residual contribution with a first-order forecast whose
slope has a per-channel gain fitted, for this one cell, to the calibration's recorded trajectory (least squares,
closed form):

    r(s) = r1 + a * (r1 - r0) * (s - s1) / (s1 - s0)        a: (C,) per channel, per (block, step)

from the last two computed steps s0 < s1 (one computed step so far: r1, `reuse`). With a = 1 it is `forecast`, the
prior the fit shrinks toward (a ridge of 1e-4 of each channel's feature energy). A gain below 1 damps a slope that
overshoots at this block and step, above 1 extends one that lags.

What it caches: the same two residuals per block as `forecast`. What it costs: one fused pass over (B, N, C),
as `forecast`. What the plan holds: C numbers per cell (`techniques.forecast_fit.fitted`, "block/step" -> [a]),
fitted by the calibration for the cell's own last computed steps in its plan (calibration/table.py: `CheckFit`).
How the search estimates its error: cross-fitted, the calibration inputs split in two (`Table._folds`: an input's
CFG halves together), each half scored with the gains fitted on the other, so the table does not score a fit on the
data it was fitted to; the check generation runs the same way, and the plan keeps the fit on every input.

Measured (`benchmarks/fitted_forecast.py`, 64 unseen images, README "Fitted forecasts"): per cell, a per-channel
slope gain has 22-23% less stand-in error than `forecast`, a gain on r1 as well 31-38% less; on the final output the
slope gain alone did better (the second gain, a per-channel scale of the cached residual, shifts whole channels).
Related: calibrated caching (ERTACache's offline residual profiling, HarmoniCa); here a few numbers per cell, no
training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from difa.errors import DifaError
from difa.techniques.blocks import RESIDUAL, BlockCell, residual_points
from difa.techniques.protocol import BLOCK, FITTED, Technique, skipped_block

NAME = "forecast_fit"
POINTS = 2  # the last two computed residuals (r0, r1)
RIDGE = 1e-4  # toward the prior a = 1, relative to each channel's feature energy (measured: more only hurts)


def key(block: int, step: int) -> str:
    return f"{block}/{step}"


@dataclass(frozen=True)
class Config:
    # "block/step" -> [a], a list of C floats: the fitted gains of each forecast_fit cell of the plan (a
    # calibration's check generation passes a function of (block, step, x, points) instead: table.CheckFit)
    fitted: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_tensors", {})  # (key, device, dtype) -> (1, C) tensor, built on first use

    def gains(self, block: int, step: int, like: torch.Tensor, points: list | None = None) -> torch.Tensor:
        if callable(self.fitted):  # a calibration's check generation: fitted as it runs (table.CheckFit)
            return self.fitted(block, step, like, points)
        k = key(block, step)
        if k not in self.fitted:
            raise DifaError(f"block {block} step {step}: the plan has no fitted gains for this {NAME} cell "
                            f"(techniques.{NAME}.fitted[{k!r}]); recalibrate the plan")
        memo = (k, like.device, like.dtype)
        if memo not in self._tensors:
            g = torch.tensor(self.fitted[k], dtype=like.dtype, device=like.device)  # (1, C): a
            if g.shape != (1, like.shape[-1]):
                raise DifaError(f"block {block} step {step}: {NAME} gains have shape {tuple(g.shape)}, the block has "
                                f"{like.shape[-1]} channels; the plan was calibrated for another model")
            self._tensors[memo] = g
        return self._tensors[memo]


def features(points: list[tuple[int, torch.Tensor]], step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(r1, d) with d = (r1 - r0) (s - s1) / (s1 - s0), the order-1 forecast's increment (None with one point)."""
    (s1, r1) = points[-1]
    if len(points) < 2:
        return r1, None
    s0, r0 = points[-2]
    return r1, (r1 - r0) * ((step - s1) / (s1 - s0))  # (..., n, C)


def estimate(points: list[tuple[int, torch.Tensor]], step: int, gains: Any = None) -> torch.Tensor:
    """The stand-in residual with `gains` (1, C) (or (1, B, 1, C), per batch row); anything else (None, or a
    technique Config as the latency model passes): the prior a = 1, computed the same way (timed at its cost)."""
    if len(points) < 2:
        return points[-1][1]
    (s0, r0), (s1, r1) = points[-2:]
    k = (step - s1) / (s1 - s0)
    a = gains[0] if torch.is_tensor(gains) else torch.ones(r1.shape[-1], dtype=r1.dtype, device=r1.device)
    # r1 + a k (r1 - r0) = lerp(r0, r1, 1 + a k): one fused pass over (..., n, C) (three, as sub, mul and addcmul,
    # made the bundled PixArt's fitted plans run 7-13% over their predicted latency at batch 50)
    return torch.lerp(r0, r1, 1 + k * a)  # a: (C,) or (B, 1, C)


def fit(points: list[tuple[int, torch.Tensor]], step: int, target: torch.Tensor) -> torch.Tensor:
    """Least-squares gains (1, C) for the points and the recorded residual `target` (..., n, C) at `step`: per
    channel, a = sum d (target - r1) / sum d d over every token and input, shrunk toward 1 by the ridge."""
    r1, d = features(points, step)
    c = target.shape[-1]
    if d is None:  # nothing to fit: the stand-in is r1
        return torch.ones(1, c)
    D, y = d.reshape(-1, c).double(), (target - r1).reshape(-1, c).double()  # (T, C): every token of every input
    dd = (D * D).sum(0)
    # minimizes |y - a D|^2 + RIDGE |D|^2 (a - 1)^2 per channel (y: what reuse misses)
    return (((y * D).sum(0) + RIDGE * dd) / (dd * (1 + RIDGE)).clamp_min(1e-30))[None].float()  # (1, C)


def fitted_params(cells: Mapping[tuple[int, int], torch.Tensor]) -> dict[str, Any]:
    """The plan's table, {"block/step": [a]}, to five significant digits (the plan is JSON)."""
    return {key(j, s): _rounded(g.tolist()) for (j, s), g in sorted(cells.items())}


def _rounded(v: Any) -> Any:
    return [_rounded(e) for e in v] if isinstance(v, list) else float(f"{v:.5g}")


def run(cell: BlockCell, x: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    points = residual_points(cell, x, NAME)[-POINTS:]
    return x + estimate(points, cell.step, cell.config.gains(cell.block, cell.step, x, points))  # (B, N, C)


def check_config(params: Mapping[str, Mapping]) -> None:
    table = (params.get(NAME) or {}).get(FITTED, {})
    for k, v in dict(table).items():
        parts = str(k).split("/")
        row = v[0] if isinstance(v, (list, tuple)) and len(v) == 1 else None
        ok = len(parts) == 2 and all(p.isdigit() for p in parts) and isinstance(row, (list, tuple)) and len(row) > 0 \
            and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in row)
        if not ok:
            raise DifaError(f"techniques.{NAME}.fitted[{k!r}] must be [gains], one list of numbers per channel, "
                            "keyed 'block/step'; recalibrate the plan")


TECHNIQUE = Technique(NAME, "K", "#c5b0d5", (BLOCK,), config=Config, run=run, estimate=estimate, fit=fit,
                      fitted_params=fitted_params,
                      reads=(RESIDUAL,), points=POINTS, skips_block=True, block_cost=skipped_block, candidate=False,
                      check_config=check_config,
                      doc="skip the block, forecast its residual to first order with per-channel gains fitted per cell")
