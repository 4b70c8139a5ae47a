"""`wars`: window attention + residual sharing (DiTFastAttn, arXiv 2406.08552, thu-nics/DiTFastAttn).

Returns to_out(O_window + R) where R = O_full - O_window was cached, before to_out, at the layer's last
`full` step. The window is a 1-D band |i - j| <= w over raster-flattened tokens (the paper's), with w given
as a fraction of the token count (1/8 by default) or as a number of tokens per side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from difa.attention import band_pairs, joint_window_attention, window_attention, window_tokens
from difa.errors import DifaError
from difa.techniques.base import OUT, Cell, LayerShape, check_plain, core_flops, project_out, project_qkv, projection_flops
from difa.techniques.protocol import LAYER, Slot, Technique

NAME = "wars"
DEFAULT_WINDOW = 0.125  # DiTFastAttn: w = N/8 tokens on each side
WINDOW_RESIDUAL = "window_residual"
# (B, H, N, D) R = O_full - O_window at the layer's last residual-computing step (before to_out)
WINDOW_RESIDUAL_SLOT = Slot(
    WINDOW_RESIDUAL, LAYER, "technique", lambda s, cfg: s.batch * s.n_q * s.inner, doc="the window residual",
    # one window attention at the writing step; a writer that shares CFG computes it on the conditional half only
    write_flops=lambda writer, shape, params: (core_flops(shape, window_pairs(shape, params))
                                               * (0.5 if writer.shares_cfg else 1.0)))
# Which steps compute R (Config.residual_from): "full" (difa) or "full+asc" (DiTFastAttn: an `asc` step is "full
# attention + CFG sharing", computes R on the conditional half and gives it to both halves; DESIGN.md §7). The
# methods named here declare it themselves (their `extra_writes`): this is the set of legal values.
RESIDUAL_RULES = ("full", "full+asc")


@dataclass(frozen=True)
class Config:
    window: float | int = DEFAULT_WINDOW
    # which steps compute R: "full" (difa's default) or "full+asc" (DiTFastAttn's rule; see RESIDUAL_RULES)
    residual_from: str = "full"


def check_config(params: Mapping[str, Mapping]) -> None:
    """One-line errors for a bad window or residual rule."""
    cfg = Config(**params.get(NAME, {}))
    try:
        window_tokens(cfg.window, 16)
    except ValueError as e:
        raise DifaError(f"techniques.{NAME}.{e}") from None
    residual_from(params)


def residual_from(params: Mapping[str, Mapping]) -> str:
    """The residual rule of a plan's technique table (checked)."""
    rule = dict(params.get(NAME, {}) or {}).get("residual_from", "full")
    if rule not in RESIDUAL_RULES:
        raise DifaError(f"wars residual_from {rule!r} is unknown; use one of {', '.join(RESIDUAL_RULES)}")
    return rule


def window_pairs(shape: LayerShape, params: Mapping[str, Mapping]) -> int:
    """(query, key) pairs of the window attention: the band over the tokens; on a joint layer the band over its image
    tokens, plus image x text and text x everything (text attends and is attended fully)."""
    image = shape.n_kv - shape.text
    w = window_tokens(Config(**params.get(NAME, {})).window, image)
    return band_pairs(image, w) + shape.text * (image + shape.n_kv)


def flops(shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    return projection_flops(shape) + core_flops(shape, window_pairs(shape, params))


def window(cell: Cell, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    w = window_tokens(Config(**cell.params.get(NAME, {})).window, k.shape[-2])
    return window_attention(q, k, v, w)  # (B, H, N, D)


def joint_window(cell: Cell, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_image: int,
                 image_first: bool) -> torch.Tensor:
    """Joint sequence ([image | text] or [text | image]): image tokens attend to their band (w from the image token
    count) and to every text token, text tokens to everything."""
    w = window_tokens(Config(**cell.params.get(NAME, {})).window, n_image)
    return joint_window_attention(q, k, v, n_image, w, image_first=image_first)  # (B, H, L, D)


def joint_output(cell: Cell, hidden_states, encoder_hidden_states, method: str, rotary=None):
    """The joint layer's (image, text) output from O_window + R."""
    from difa.techniques import joint

    image_first = joint.check(cell, method)
    residual = cell.state.get(WINDOW_RESIDUAL)
    if residual is None:
        raise DifaError(f"{cell.name} step {cell.step}: {method!r} needs a residual from an earlier 'full' step; "
                        "fix the plan")
    q, k, v, n = joint.qkv(cell, hidden_states, encoder_hidden_states, rotary)  # (B, H, L, D)
    if residual.shape != q.shape:
        raise DifaError(f"{cell.name} step {cell.step}: cached residual has shape {tuple(residual.shape)} but this call "
                        f"has {tuple(q.shape)}; the batch or resolution changed mid-generation, keep them fixed")
    o = joint_window(cell, q, k, v, n, image_first) + residual
    return joint.out(cell, o, n, encoder_hidden_states is not None, q.dtype)


def windowed_output(cell: Cell, hidden_states: torch.Tensor, residual: torch.Tensor, method: str) -> torch.Tensor:
    """to_out(O_window + R) for the batch in `hidden_states`; `residual` must cover the same batch."""
    if residual is None:
        raise DifaError(f"{cell.name} step {cell.step}: {method!r} needs a residual from an earlier 'full' step; fix the plan")
    q, k, v = project_qkv(cell.attn, hidden_states)  # (B, H, N, D)
    if residual.shape != q.shape:
        raise DifaError(
            f"{cell.name} step {cell.step}: cached residual has shape {tuple(residual.shape)} but this call has "
            f"{tuple(q.shape)}; the batch or resolution changed mid-generation, keep them fixed"
        )
    o = window(cell, q, k, v) + residual  # (B, H, N, D)
    return project_out(cell.attn, o, hidden_states, q.dtype)


def execute(cell: Cell, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
    check_plain(cell, attention_mask, NAME)
    if cell.joint:
        rotary = args[0] if args else kwargs.get("image_rotary_emb")  # FLUX passes it positionally
        return joint_output(cell, hidden_states, encoder_hidden_states, NAME, rotary)
    if encoder_hidden_states is not None:
        raise DifaError(f"{cell.name}: {NAME!r} applies to self-attention only; set this layer to 'full'")
    return windowed_output(cell, hidden_states, cell.state.get(WINDOW_RESIDUAL), NAME)


TECHNIQUE = Technique(
    NAME, "W", "#1f77b4", ("attn1", "joint"), config=Config, execute=execute, flops=flops, check_config=check_config,
    reads=(WINDOW_RESIDUAL,), writes=(OUT,), candidate=True, slots=(WINDOW_RESIDUAL_SLOT,), joint_reproduced=True,
    # joint (Adapter.joint_window): image tokens windowed, text attending fully
    not_joint=("window attention on joint layers needs the family's joint processor reproduced (techniques/joint.py: "
               "SD3, CogVideoX and FLUX are), and this family's is not"),
    doc="window attention + the residual cached at the last full step")
