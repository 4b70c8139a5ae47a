"""`ast`: attention sharing across timesteps (DiTFastAttn). Returns the layer's last *computed* module output
(after to_out, before the block's adaLN gate, so the current step's gate still applies). Costs nothing.
A joint (MMDiT) layer's output is a tuple (image or video part, text part): both parts are reused."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from difa.errors import DifaError
from difa.techniques.base import Cell, LayerShape
from difa.techniques.blocks import first_tensor

NAME = "ast"
LETTER = "A"  # one character per cell in the calibration summary
COLOR = "#2ca02c"  # its colour in plan heatmaps (difa.plots), the same in every plot
KINDS = ("attn1", "attn2", "joint")
AXES = ("spatial", "temporal")  # token axes it runs on: within a frame, across frames (video)
READS_CACHE = True
NEEDS_METRIC = False
SHARES_CFG = False  # needs the two CFG halves in one batch
READS_OUTPUT = True  # returns the layer's last computed output (the step before must keep it)
READS_RESIDUAL = False  # adds the window residual R of an earlier step
ON_ONE_HALF = None  # what it becomes when the engine runs one CFG half (None: itself)
DEFAULT_CANDIDATE = True


@dataclass(frozen=True)
class Config:
    pass


def flops(shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    return 0.0


def execute(cell: Cell, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
    out = cell.state.out
    if out is None:
        raise DifaError(f"{cell.name} step {cell.step}: 'ast' has no earlier output to reuse; the step before must compute")
    b = first_tensor(out).shape[0]
    if b != hidden_states.shape[0]:
        raise DifaError(
            f"{cell.name} step {cell.step}: 'ast' cached a batch of {b} but this call has "
            f"{hidden_states.shape[0]}; keep the batch fixed within a generation"
        )
    return out
