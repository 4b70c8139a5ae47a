"""`wars+asc`: both DiTFastAttn savings at once: window attention + residual on the conditional CFG half
only, copied to the unconditional half."""

from __future__ import annotations

from typing import Mapping

import torch

from difa.errors import DifaError
from difa.techniques import wars
from difa.techniques.base import OUT, Cell, LayerShape, check_plain
from difa.techniques.protocol import Technique

NAME = "wars+asc"


def flops(shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    return 0.5 * wars.flops(shape, params)


def execute(cell: Cell, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
    cond = cell.require_cfg(NAME)
    check_plain(cell, attention_mask, NAME)
    if encoder_hidden_states is not None:
        raise DifaError(f"{cell.name}: {NAME!r} applies to self-attention only; set this layer to 'full'")
    r = cell.state.get(wars.WINDOW_RESIDUAL)
    out = wars.windowed_output(cell, hidden_states[cond], None if r is None else r[cond], NAME)  # (B/2, N, C)
    return torch.cat([out, out], dim=0)  # (B, N, C)


# (the window comes from the `wars` entry of the plan's techniques)
TECHNIQUE = Technique(
    NAME, "X", "#9467bd", ("attn1",), execute=execute, flops=flops, reads=(wars.WINDOW_RESIDUAL,), writes=(OUT,),
    shares_cfg=True, on_one_half=wars.NAME, candidate=True,
    not_joint="it shares attention across the CFG halves, which the joint sequence's text tokens tell apart (see 'asc')",
    doc="wars on the conditional CFG half, copied to the other")
