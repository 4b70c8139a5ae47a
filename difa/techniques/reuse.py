"""`reuse`: skip the whole block and add its residual contribution (output - input) from its last computed step
to the current input (FORA, Δ-DiT and Learning-to-Cache layer caching; FirstBlockCache's mechanism per block).
Costs one addition; the block's attention and feed-forward do not run."""

from __future__ import annotations

from typing import Any, Callable

import torch

from difa.techniques.blocks import RESIDUAL, RESIDUAL_SLOT, BlockCell, stand_in
from difa.techniques.protocol import BLOCK, Technique, skipped_block

NAME = "reuse"


def estimate(points: list[tuple[int, torch.Tensor]], step: int, config: Any) -> torch.Tensor:
    """The last computed residual, as it is."""
    return points[-1][1]


def run(cell: BlockCell, x: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    return stand_in(cell, x, estimate, 1, NAME)  # (B, N, C)


TECHNIQUE = Technique(NAME, "R", "#17becf", (BLOCK,), run=run, estimate=estimate, reads=(RESIDUAL,),
                      skips_block=True, block_cost=skipped_block, candidate=True, slots=(RESIDUAL_SLOT,),
                      doc="skip the block, add its last residual")
