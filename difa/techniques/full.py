"""`full`: the layer's own attention (or, as a block cell, the block), untouched. At a full step that a `wars` step will reuse, also cache
the window-attention residual R = O_full - O_window (before to_out), as DiTFastAttn does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


from difa.attention import full_attention
from difa.techniques import joint, wars
from difa.techniques.blocks import BlockCell, computed
from difa.techniques.base import Cell, LayerShape, check_plain, core_flops, project_out, project_qkv, projection_flops

NAME = "full"
LETTER = "F"  # one character per cell in the calibration summary
COLOR = "#d9d9d9"  # its colour in plan heatmaps (difa.plots), the same in every plot
KINDS = ("attn1", "attn2", "joint", "block")
AXES = ("spatial", "temporal")  # token axes it runs on: within a frame, across frames (video)
READS_CACHE = False
NEEDS_METRIC = False
SHARES_CFG = False  # needs the two CFG halves in one batch
READS_OUTPUT = False  # returns the layer's last computed output (the step before must keep it)
READS_RESIDUAL = False  # adds the window residual R of an earlier step
ON_ONE_HALF = None  # what it becomes when the engine runs one CFG half (None: itself)
DEFAULT_CANDIDATE = False
SKIPS_ATTENTION = False  # as a block method: the block runs as it is
COMPUTES = ("residual", "ff", "output")
NEEDS = None


@dataclass(frozen=True)
class Config:
    pass


def flops(shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    return projection_flops(shape) + core_flops(shape, shape.n_q * shape.n_kv)


def execute(cell: Cell, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
    if not cell.keep_residual:
        return cell.original(cell.attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
    check_plain(cell, attention_mask, NAME)
    attn = cell.attn
    if cell.joint:  # text and image tokens in one softmax; R = O_full - O_window over the whole joint sequence
        image_first = joint.check(cell, "wars")
        rotary = args[0] if args else kwargs.get("image_rotary_emb")  # FLUX passes it positionally
        q, k, v, n = joint.qkv(cell, hidden_states, encoder_hidden_states, rotary)  # (B, H, L, D)
        o = full_attention(q, k, v)
        cell.state.residual = o - wars.joint_window(cell, q, k, v, n, image_first)
        return joint.out(cell, o, n, encoder_hidden_states is not None, q.dtype)
    q, k, v = project_qkv(attn, hidden_states, encoder_hidden_states)  # (B, H, N, D)
    o = full_attention(q, k, v)  # (B, H, N, D)
    cell.state.residual = o - wars.window(cell, q, k, v)
    return project_out(attn, o, hidden_states, q.dtype)


def run(cell: BlockCell, x, compute):
    """As a block cell: run the block, keep its residual if a later cell reads it."""
    return computed(cell, x, compute)
