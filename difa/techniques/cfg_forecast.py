"""`cfg_forecast`: a CFG cell like `cfg_delta` (the block on the conditional half only), whose unconditional half
extrapolates the difference between the halves to first order from the block's last two computed steps s0 < s1:

    d(s) = d1 + (d1 - d0) (s - s1) / (s1 - s0),   d = r_u - r_c,   r_u(s) ≈ r_c(s) + d(s)

With one computed step so far it is `cfg_delta`. On the bundled DiT's recorded trajectory (every second step, every
block) the extrapolated difference had 22% less table error than the reused one, and less error per second saved
than forecasting the whole skipped block. Holds two residuals per block, as `forecast`.
"""

from __future__ import annotations

from typing import Any

import torch

from difa.techniques.blocks import RESIDUAL, half_stand_in
from difa.techniques.forecast import extrapolate
from difa.techniques.protocol import BLOCK, Technique, half_block

NAME = "cfg_forecast"
POINTS = 2


def estimate(points: list[tuple[int, tuple[torch.Tensor, Any]]], step: int, config: Any) -> torch.Tensor:
    """The other half's residual: this step's computed half plus the extrapolated (other - computed) difference.
    points: the last one or two computed steps' (step, (computed half, other half)), then (step, (computed, None))."""
    diffs = [(u, o - h) for u, (h, o) in points[:-1]]  # (B/2, n, C) each
    return points[-1][1][0] + extrapolate(diffs, step)  # (B/2, n, C)


def run(cell, x: torch.Tensor, compute) -> torch.Tensor:
    return half_stand_in(cell, x, compute, estimate, POINTS, NAME)  # (B, N, C)


TECHNIQUE = Technique(NAME, "V", "#f7b6d2", (BLOCK,), run=run, estimate=estimate, reads=(RESIDUAL,), points=POINTS,
                      half_batch=True, shares_cfg=True, block_cost=half_block, candidate=True,
                      doc="compute the block on the conditional CFG half; the other half from the forecast CFG difference")
