"""`reuse`: skip the whole block and add its residual contribution (output - input) from its last computed step
to the current input (FORA, Δ-DiT and Learning-to-Cache layer caching; FirstBlockCache's mechanism per block).
Costs one addition; the block's attention and feed-forward do not run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from difa.errors import DifaError
from difa.techniques.blocks import BlockCell

NAME = "reuse"
LETTER = "R"
COLOR = "#17becf"  # its colour in plan heatmaps (difa.plots), the same in every plot
KINDS = ("block",)
AXES = ("spatial", "temporal")  # token axes it runs on: within a frame, across frames (video)
READS_CACHE = True
NEEDS_METRIC = False
SKIPS_ATTENTION = True
NEEDS = "residual"
COMPUTES = ()
DEFAULT_CANDIDATE = True


@dataclass(frozen=True)
class Config:
    pass


def flops(shape, params: Mapping[str, Mapping]) -> float:
    return 0.0


def last_residual(cell: BlockCell, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    res = cell.state.residuals
    if not res:
        raise DifaError(f"{cell.name} step {cell.step}: {NAME!r} has no earlier residual; an earlier step must compute the block")
    if res[-1][1].shape != x.shape:
        raise DifaError(f"{cell.name} step {cell.step}: the cached residual has shape {tuple(res[-1][1].shape)} but the "
                        f"input has {tuple(x.shape)}; keep the batch and size fixed within a generation")
    return res


def run(cell: BlockCell, x: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    return x + last_residual(cell, x)[-1][1]  # (B, N, C)
