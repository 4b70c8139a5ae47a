"""`forecast2`: skip the whole block and extrapolate its residual contribution to second order from its last three
computed steps s0 < s1 < s2: the quadratic through (s0, r0), (s1, r1), (s2, r2) evaluated at the step s (Lagrange
form, for steps at any spacing):

    r(s) = w0 r0 + w1 r1 + w2 r2,  w0 = (s-s1)(s-s2) / ((s0-s1)(s0-s2)),  w1 = (s-s0)(s-s2) / ((s1-s0)(s1-s2)),
                                   w2 = (s-s0)(s-s1) / ((s2-s0)(s2-s1))

TaylorSeer's `max_order=2` (its finite differences are this polynomial at equal spacing); with fewer than three
computed steps so far it is `forecast` (order 1, or `reuse` with one). It holds three residuals per block, one more
than `forecast`, and costs three fused passes over (B, N, C); the search's error table decides per cell whether the
curvature term helps (it does where a block's residual bends smoothly, and hurts where it is noisy)."""

from __future__ import annotations

from typing import Any

import torch

from difa.techniques.blocks import RESIDUAL, stand_in_run
from difa.techniques.forecast import extrapolate
from difa.techniques.protocol import BLOCK, Technique, skipped_block

NAME = "forecast2"
POINTS = 3  # the last three computed residuals (r0, r1, r2)


def quadratic(points: list[tuple[int, torch.Tensor]], step: int, config: Any = None) -> torch.Tensor:
    """Second-order extrapolation of the last three (step, residual) points to `step`; fewer points: first order.
    (It is the technique's search estimator as it stands: `config` is unused.)"""
    if len(points) < 3:
        return extrapolate(points, step)
    (s0, r0), (s1, r1), (s2, r2) = points[-3:]
    w0 = (step - s1) * (step - s2) / ((s0 - s1) * (s0 - s2))
    w1 = (step - s0) * (step - s2) / ((s1 - s0) * (s1 - s2))
    w2 = (step - s0) * (step - s1) / ((s2 - s0) * (s2 - s1))
    return torch.add(r2 * w2, r1, alpha=w1).add_(r0, alpha=w0)  # (B, N, C), a new tensor


TECHNIQUE = Technique(NAME, "E", "#dbdb8d", (BLOCK,), run=stand_in_run(quadratic, POINTS, NAME), estimate=quadratic,
                      reads=(RESIDUAL,), points=POINTS, skips_block=True, block_cost=skipped_block, candidate=False,
                      doc="skip the block, extrapolate its residual to second order")
