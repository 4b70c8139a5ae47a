"""`wars+asc`: both DiTFastAttn savings at once: window attention + residual on the conditional CFG half
only, copied to the unconditional half."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from difa.errors import DifaError
from difa.techniques import wars
from difa.techniques.base import Cell, LayerShape, check_plain

NAME = "wars+asc"
LETTER = "X"  # one character per cell in the calibration summary
COLOR = "#9467bd"  # its colour in plan heatmaps (difa.plots), the same in every plot
KINDS = ("attn1",)
AXES = ("spatial", "temporal")  # token axes it runs on: within a frame, across frames (video)
READS_CACHE = True
NEEDS_METRIC = False
SHARES_CFG = True  # needs the two CFG halves in one batch
READS_OUTPUT = False  # returns the layer's last computed output (the step before must keep it)
READS_RESIDUAL = True  # adds the window residual R of an earlier step
ON_ONE_HALF = "wars"  # what it becomes when the engine runs one CFG half (None: itself)
DEFAULT_CANDIDATE = True
# Why it does not run on a joint (MMDiT) attention layer, as the one phrase `unfit` gives (README: "MMDiT and
# joint attention")
NOT_JOINT = ("it shares attention across the CFG halves, which the joint sequence's text tokens tell apart "
             "(see 'asc')")


@dataclass(frozen=True)
class Config:
    pass  # the window comes from the `wars` entry of the plan's techniques


def flops(shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    return 0.5 * wars.flops(shape, params)


def execute(cell: Cell, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
    cond = cell.require_cfg(NAME)
    check_plain(cell, attention_mask, NAME)
    if encoder_hidden_states is not None:
        raise DifaError(f"{cell.name}: {NAME!r} applies to self-attention only; set this layer to 'full'")
    r = cell.state.residual
    out = wars.windowed_output(cell, hidden_states[cond], None if r is None else r[cond], NAME)  # (B/2, N, C)
    return torch.cat([out, out], dim=0)  # (B, N, C)
