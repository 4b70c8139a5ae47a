"""`cfg_delta`: a CFG cell. Compute the block on the conditional half of the CFG batch only, and stand in for the
unconditional half by this step's conditional residual plus the last computed difference between the halves:

    r_u(s) ≈ r_c(s) + (r_u(s1) - r_c(s1))       (s1: the block's last computed step; r = output - input)

The guidance difference u - c changes slowly over the steps while each half's residual moves, so keeping the
difference (instead of copying one half to the other, as DiTFastAttn's `asc` does for attention, which erases it)
leaves the guided output close. FasterCache's CFG cache is a frequency-weighted relative of this difference reuse.

The conditional half is computed because the guided output (1 - g) u + g c weighs an error in u by g - 1, one less
than an error in c. Costs the block on half the batch plus one add; holds the block's last computed residual (one
point, as `reuse`). It needs a CFG batch: at a step without one (CFG collapsed, or off) the block runs whole.
"""

from __future__ import annotations

from typing import Any

import torch

from difa.techniques.blocks import RESIDUAL, half_stand_in
from difa.techniques.protocol import BLOCK, Technique, half_block

NAME = "cfg_delta"


def estimate(points: list[tuple[int, tuple[torch.Tensor, Any]]], step: int, config: Any) -> torch.Tensor:
    """The other (unconditional) half's residual: this step's computed half plus the last computed point's
    (other - computed) difference. points: [(s1, (computed half, other half)), (step, (computed half, None))]."""
    (_, (h1, o1)), (_, (h, _)) = points[-2], points[-1]
    return torch.add(h, o1).sub_(h1)  # (B/2, n, C), a new tensor


def run(cell, x: torch.Tensor, compute) -> torch.Tensor:
    return half_stand_in(cell, x, compute, estimate, 1, NAME)  # (B, N, C)


TECHNIQUE = Technique(NAME, "U", "#c49c94", (BLOCK,), run=run, estimate=estimate, reads=(RESIDUAL,),
                      half_batch=True, shares_cfg=True, block_cost=half_block, candidate=True,
                      doc="compute the block on the conditional CFG half; the other half from the last CFG difference")
