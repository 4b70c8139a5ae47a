"""`full`: the layer's own attention (or, as a block cell, the block), untouched. At a full step that a `wars` step
will reuse, also cache the window-attention residual R = O_full - O_window (before to_out), as DiTFastAttn does."""

from __future__ import annotations

from typing import Mapping

from difa.attention import full_attention
from difa.techniques import joint, wars
from difa.techniques.base import OUT, Cell, LayerShape, check_plain, core_flops, project_out, project_qkv, projection_flops
from difa.techniques.blocks import FF, OUTPUT, RESIDUAL, BlockCell, computed
from difa.techniques.protocol import ATTENTION_KINDS, BLOCK, FULL, Technique

NAME = FULL


def flops(shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    return projection_flops(shape) + core_flops(shape, shape.n_q * shape.n_kv)


def execute(cell: Cell, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
    if wars.WINDOW_RESIDUAL not in cell.keep:
        return cell.original(cell.attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
    check_plain(cell, attention_mask, NAME)
    attn = cell.attn
    if cell.joint:  # text and image tokens in one softmax; R = O_full - O_window over the whole joint sequence
        image_first = joint.check(cell, "wars")
        rotary = args[0] if args else kwargs.get("image_rotary_emb")  # FLUX passes it positionally
        q, k, v, n = joint.qkv(cell, hidden_states, encoder_hidden_states, rotary)  # (B, H, L, D)
        o = full_attention(q, k, v)
        cell.state.slots[wars.WINDOW_RESIDUAL] = o - wars.joint_window(cell, q, k, v, n, image_first)
        return joint.out(cell, o, n, encoder_hidden_states is not None, q.dtype)
    q, k, v = project_qkv(attn, hidden_states, encoder_hidden_states)  # (B, H, N, D)
    o = full_attention(q, k, v)  # (B, H, N, D)
    cell.state.slots[wars.WINDOW_RESIDUAL] = o - wars.window(cell, q, k, v)
    return project_out(attn, o, hidden_states, q.dtype)


def run(cell: BlockCell, x, compute):
    """As a block cell: run the block, keep its residual if a later cell reads it."""
    return computed(cell, x, compute)


TECHNIQUE = Technique(
    NAME, "F", "#d9d9d9", (*ATTENTION_KINDS, BLOCK), execute=execute, run=run, flops=flops,
    writes=(OUT, wars.WINDOW_RESIDUAL, RESIDUAL, FF, OUTPUT),
    doc="the layer's own attention, or the block as it is: the reference")
