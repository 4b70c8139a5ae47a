"""`mlp_reuse`: run the block's attention, reuse its feed-forward module's output from the last step that
computed it (FORA / Δ-DiT at sublayer granularity). The cache is taken before the block's adaLN gate, as `ast`
does for attention, so the current step's gate and shift still apply."""

from __future__ import annotations

from typing import Callable

import torch

from difa.errors import DifaError
from difa.techniques.blocks import FF, FF_SLOT, OUTPUT, RESIDUAL, BlockCell, computed
from difa.techniques.protocol import BLOCK, BlockTimes, Technique

NAME = "mlp_reuse"


def run(cell: BlockCell, x: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    return computed(cell, x, compute)  # the engine's feed-forward wrapper returns `ff_output` below


def ff_output(cell: BlockCell, x: torch.Tensor) -> torch.Tensor:
    ff = cell.state.get(FF)
    if ff is None:
        raise DifaError(f"{cell.name} step {cell.step}: {NAME!r} has no earlier feed-forward output; an earlier step must be 'full'")
    if ff.shape[:-1] != x.shape[:-1]:
        raise DifaError(f"{cell.name} step {cell.step}: the cached feed-forward output has shape {tuple(ff.shape)} but the "
                        f"input has {tuple(x.shape)}; keep the batch and size fixed within a generation")
    return ff


def cost(times: BlockTimes) -> float:
    return times.block - times.ff  # attention runs, the feed-forward does not


# candidate=False: fixed plans only, the trajectory search has no estimator for it yet
TECHNIQUE = Technique(NAME, "L", "#637939", (BLOCK,), run=run, reads=(FF,), writes=(RESIDUAL, OUTPUT),
                      replaces=FF, replace=ff_output, block_cost=cost, slots=(FF_SLOT,),
                      doc="run the attention, reuse the feed-forward output")
