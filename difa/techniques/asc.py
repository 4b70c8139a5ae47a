"""`asc`: attention sharing across CFG (DiTFastAttn). Attention runs on the conditional half of the CFG batch
only and its output is copied to the unconditional half: half the attention cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from difa.techniques import full
from difa.techniques.base import Cell, LayerShape

NAME = "asc"
LETTER = "C"  # one character per cell in the calibration summary
KINDS = ("attn1",)
READS_CACHE = False
NEEDS_METRIC = False
DEFAULT_CANDIDATE = True


@dataclass(frozen=True)
class Config:
    pass


def flops(shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    return 0.5 * full.flops(shape, params)


def half(x: torch.Tensor | None, cond: slice) -> torch.Tensor | None:
    return None if x is None else x[cond]


def execute(cell: Cell, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
    cond = cell.require_cfg(NAME)
    out = cell.original(
        cell.attn, hidden_states[cond], half(encoder_hidden_states, cond), half(attention_mask, cond), *args, **kwargs
    )  # (B/2, N, C)
    return torch.cat([out, out], dim=0)  # (B, N, C): both halves get the conditional output
