"""`foca`: skip the whole block and forecast its residual contribution with FoCa's predictor-corrector (Zheng et
al., "Forecast then Calibrate: Feature Caching as ODE for Efficient Diffusion Transformers", AAAI 2026,
arXiv 2508.16211), after the public cache-dit `FoCaCalibrator` (its h = 1 form), made step-aware.

The recursion, one step at a time over a skipped run after the block's last computed step a:

    predictor (BDF2 at h = 1):  P(t+1) = 2 V(t) - V(t-1)              V: the value at a step, computed or predicted
    corrector (Heun):           P(t+1) += (s_anchor - (V(t) - V(t-1))) / 2
                                s_anchor = (F(a) - F(a')) / (a - a'), the slope between the last two computed steps

so each predicted step advances by the mean of the local slope and the anchor slope, and the local slope relaxes
to the anchor's by halves: sigma_1 = (s_0 + s_anchor) / 2, sigma_{n+1} = (sigma_n + s_anchor) / 2, where
s_0 = F(a) - V(a-1) is the change into the computed step from the value the step before it had (the prediction
there when that step was skipped). Summed, m steps after a:

    r(a + m) = F(a) + m s_anchor + (1 - 2^-m) (s_0 - s_anchor)

A damped curvature term: where the block's residual bends, the last prediction before a computed step lags, s_0
departs from the anchor slope and the forecast bends with it, by at most |s_0 - s_anchor| however long the run
(a quadratic, `forecast2`, grows with m^2). With adjacent computed steps s_0 = s_anchor: it is `forecast`.

Two choices of ours, where the calibrator's code is not a plan-time function:
- step-aware: the anchor slope is divided by the gap between the computed steps (cache-dit takes h = 1 between
  anchors, so its slope is the whole change across the gap);
- bounded: the recursion starts afresh at the third-last computed step (its run taken as the first-order forecast
  through it and the second-last), so the forecast is a function of the last three computed residuals, the same
  three the engine keeps for `forecast2`, and the search scores exactly what the engine runs. (cache-dit carries
  the predicted values through the whole generation; with long gaps its s_0 feeds back with weight near -1.)
"""

from __future__ import annotations

from typing import Any

import torch

from difa.techniques.blocks import RESIDUAL, stand_in_run
from difa.techniques.forecast import extrapolate
from difa.techniques.protocol import BLOCK, Technique, skipped_block

NAME = "foca"
POINTS = 3  # the last three computed residuals (r0, r1, r2)


def weights(s0: int, s1: int, s2: int, step: int) -> tuple[float, float, float]:
    """(w0, w1, w2) with r(step) = w0 r0 + w1 r1 + w2 r2 for computed steps s0 < s1 < s2 < step (they sum to 1)."""
    g1, g2, m = s1 - s0, s2 - s1, step - s2
    c = 1.0 - 0.5 ** m  # how far the local slope has relaxed towards the anchor's
    # s_anchor = (r2 - r1) / g2; the value at s2 - 1 is the first-order forecast r1 + (g2 - 1) (r1 - r0) / g1, so
    # s_0 = r2 - r1 - (g2 - 1) (r1 - r0) / g1; r = r2 + (m - c) s_anchor + c s_0, collected per point:
    w0 = c * (g2 - 1) / g1
    w1 = -(m - c) / g2 - c - w0
    return w0, w1, 1.0 + (m - c) / g2 + c


def predict(points: list[tuple[int, torch.Tensor]], step: int, config: Any = None) -> torch.Tensor:
    """FoCa's forecast at `step` from the last three (step, residual) points; fewer points: first order (`forecast`,
    or `reuse` with one). (It is the technique's search estimator as it stands: `config` is unused.)"""
    if len(points) < 3:
        return extrapolate(points, step)
    (s0, r0), (s1, r1), (s2, r2) = points[-3:]
    w0, w1, w2 = weights(s0, s1, s2, step)
    return torch.add(r2 * w2, r1, alpha=w1).add_(r0, alpha=w0)  # (B, N, C), a new tensor


TECHNIQUE = Technique(NAME, "O", "#ad494a", (BLOCK,), run=stand_in_run(predict, POINTS, NAME), estimate=predict,
                      reads=(RESIDUAL,), points=POINTS, skips_block=True, block_cost=skipped_block, candidate=False,
                      doc="skip the block, forecast its residual with FoCa's predictor-corrector")
