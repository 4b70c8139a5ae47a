"""`ast`: attention sharing across timesteps (DiTFastAttn). Returns the layer's last *computed* module output
(after to_out, before the block's adaLN gate, so the current step's gate still applies). Costs nothing.
A joint (MMDiT) layer's output is a tuple (image or video part, text part): both parts are reused."""

from __future__ import annotations

from difa.errors import DifaError
from difa.techniques.base import METRIC_SLOT, OUT, OUT_SLOT, Cell
from difa.techniques.blocks import first_tensor
from difa.techniques.protocol import ATTENTION_KINDS, Technique

NAME = "ast"


def execute(cell: Cell, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
    out = cell.state.get(OUT)
    if out is None:
        raise DifaError(f"{cell.name} step {cell.step}: 'ast' has no earlier output to reuse; the step before must compute")
    b = first_tensor(out).shape[0]
    if b != hidden_states.shape[0]:
        raise DifaError(
            f"{cell.name} step {cell.step}: 'ast' cached a batch of {b} but this call has "
            f"{hidden_states.shape[0]}; keep the batch fixed within a generation"
        )
    return out


TECHNIQUE = Technique(NAME, "A", "#2ca02c", ATTENTION_KINDS, execute=execute, reads=(OUT,), candidate=True,
                      slots=(OUT_SLOT, METRIC_SLOT), doc="reuse the layer's last computed output")
