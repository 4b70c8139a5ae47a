"""`mlp_reuse`: run the block's attention, reuse its feed-forward module's output from the last step that
computed it (FORA / Δ-DiT at sublayer granularity). The cache is taken before the block's adaLN gate, as `ast`
does for attention, so the current step's gate and shift still apply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from difa.errors import DifaError
from difa.techniques.blocks import BlockCell, computed

NAME = "mlp_reuse"
LETTER = "L"
COLOR = "#637939"  # its colour in plan heatmaps (difa.plots), the same in every plot
KINDS = ("block",)
AXES = ("spatial", "temporal")  # token axes it runs on: within a frame, across frames (video)
READS_CACHE = True
NEEDS_METRIC = False
SKIPS_ATTENTION = False
NEEDS = "ff"
COMPUTES = ("residual", "output")
DEFAULT_CANDIDATE = False  # fixed plans only: the trajectory search has no error table for it yet


@dataclass(frozen=True)
class Config:
    pass


def flops(shape, params: Mapping[str, Mapping]) -> float:
    return 0.0


def run(cell: BlockCell, x: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    return computed(cell, x, compute)  # the engine's feed-forward wrapper returns `ff_output` below


def ff_output(cell: BlockCell, x: torch.Tensor) -> torch.Tensor:
    ff = cell.state.ff
    if ff is None:
        raise DifaError(f"{cell.name} step {cell.step}: {NAME!r} has no earlier feed-forward output; an earlier step must be 'full'")
    if ff.shape[:-1] != x.shape[:-1]:
        raise DifaError(f"{cell.name} step {cell.step}: the cached feed-forward output has shape {tuple(ff.shape)} but the "
                        f"input has {tuple(x.shape)}; keep the batch and size fixed within a generation")
    return ff
