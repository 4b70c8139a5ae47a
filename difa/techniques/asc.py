"""`asc`: attention sharing across CFG (DiTFastAttn). Attention runs on the conditional half of the CFG batch
only and its output is copied to the unconditional half: half the attention cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from difa.attention import full_attention
from difa.techniques import full, wars
from difa.techniques.base import Cell, LayerShape, check_plain, project_out, project_qkv

NAME = "asc"
LETTER = "C"  # one character per cell in the calibration summary
COLOR = "#ff7f0e"  # its colour in plan heatmaps (difa.plots), the same in every plot
KINDS = ("attn1",)
AXES = ("spatial", "temporal")  # token axes it runs on: within a frame, across frames (video)
READS_CACHE = False
NEEDS_METRIC = False
SHARES_CFG = True  # needs the two CFG halves in one batch
READS_OUTPUT = False  # returns the layer's last computed output (the step before must keep it)
READS_RESIDUAL = False  # adds the window residual R of an earlier step
ON_ONE_HALF = "full"  # what it becomes when the engine runs one CFG half (None: itself)
DEFAULT_CANDIDATE = True
# Why it does not run on a joint (MMDiT) attention layer, as the one phrase `unfit` gives (README: "MMDiT and
# joint attention")
NOT_JOINT = ("the CFG halves attend over different text tokens (negative vs positive prompt) inside the joint "
             "sequence, so sharing one half's attention would erase the text stream's guidance difference")


@dataclass(frozen=True)
class Config:
    pass


def flops(shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    return 0.5 * full.flops(shape, params)


def half(x: torch.Tensor | None, cond: slice) -> torch.Tensor | None:
    return None if x is None else x[cond]


def execute(cell: Cell, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
    cond = cell.require_cfg(NAME)
    if cell.keep_residual:  # DiTFastAttn's rule (wars residual_from="full+asc"): R from the conditional half
        check_plain(cell, attention_mask, NAME)
        x = hidden_states[cond]
        q, k, v = project_qkv(cell.attn, x)  # (B/2, H, N, D)
        o = full_attention(q, k, v)  # (B/2, H, N, D)
        r = o - wars.window(cell, q, k, v)
        cell.state.residual = torch.cat([r, r], dim=0)  # (B, H, N, D): both halves read the conditional R
        out = project_out(cell.attn, o, x, q.dtype)  # (B/2, N, C)
        return torch.cat([out, out], dim=0)
    out = cell.original(
        cell.attn, hidden_states[cond], half(encoder_hidden_states, cond), half(attention_mask, cond), *args, **kwargs
    )  # (B/2, N, C)
    return torch.cat([out, out], dim=0)  # (B, N, C): both halves get the conditional output
