"""`asc`: attention sharing across CFG (DiTFastAttn). Attention runs on the conditional half of the CFG batch
only and its output is copied to the unconditional half: half the attention cost."""

from __future__ import annotations

from typing import Mapping

import torch

from difa.attention import full_attention
from difa.techniques import full, wars
from difa.techniques.base import OUT, Cell, LayerShape, check_plain, project_out, project_qkv
from difa.techniques.protocol import FULL, Technique

NAME = "asc"


def flops(shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    return 0.5 * full.flops(shape, params)


def half(x: torch.Tensor | None, cond: slice) -> torch.Tensor | None:
    return None if x is None else x[cond]


def execute(cell: Cell, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
    cond = cell.require_cfg(NAME)
    if wars.WINDOW_RESIDUAL in cell.keep:  # DiTFastAttn's rule (wars residual_from="full+asc"): R from the conditional half
        check_plain(cell, attention_mask, NAME)
        x = hidden_states[cond]
        q, k, v = project_qkv(cell.attn, x)  # (B/2, H, N, D)
        o = full_attention(q, k, v)  # (B/2, H, N, D)
        r = o - wars.window(cell, q, k, v)
        cell.state.slots[wars.WINDOW_RESIDUAL] = torch.cat([r, r], dim=0)  # (B, H, N, D): both halves read the conditional R
        out = project_out(cell.attn, o, x, q.dtype)  # (B/2, N, C)
        return torch.cat([out, out], dim=0)
    out = cell.original(
        cell.attn, hidden_states[cond], half(encoder_hidden_states, cond), half(attention_mask, cond), *args, **kwargs
    )  # (B/2, N, C)
    return torch.cat([out, out], dim=0)  # (B, N, C): both halves get the conditional output


def extra_writes(params: Mapping[str, Mapping]) -> tuple[str, ...]:
    """Under DiTFastAttn's residual rule (wars residual_from="full+asc") an `asc` step also computes R."""
    return (wars.WINDOW_RESIDUAL,) if wars.residual_from(params) == "full+asc" else ()


TECHNIQUE = Technique(
    NAME, "C", "#ff7f0e", ("attn1",), execute=execute, flops=flops, writes=(OUT,), extra_writes=extra_writes,
    shares_cfg=True, on_one_half=FULL, candidate=True,
    not_joint=("the CFG halves attend over different text tokens (negative vs positive prompt) inside the joint "
               "sequence, so sharing one half's attention would erase the text stream's guidance difference"),
    doc="attention on the conditional CFG half, copied to the other")
