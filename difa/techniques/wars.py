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
from difa.techniques.base import Cell, LayerShape, check_plain, core_flops, project_out, project_qkv, projection_flops

NAME = "wars"
LETTER = "W"  # one character per cell in the calibration summary
COLOR = "#1f77b4"  # its colour in plan heatmaps (difa.plots), the same in every plot
KINDS = ("attn1", "joint")  # joint (Adapter.joint_window): image tokens windowed, text attending fully
AXES = ("spatial", "temporal")  # token axes it runs on: within a frame, across frames (video)
READS_CACHE = True
NEEDS_METRIC = False
SHARES_CFG = False  # needs the two CFG halves in one batch
READS_OUTPUT = False  # returns the layer's last computed output (the step before must keep it)
READS_RESIDUAL = True  # adds the window residual R of an earlier step
ON_ONE_HALF = None  # what it becomes when the engine runs one CFG half (None: itself)
DEFAULT_CANDIDATE = True
# Why it does not run on a joint (MMDiT) attention layer, as the one phrase `unfit` gives (README: "MMDiT and
# joint attention"): on a family whose joint processor is not reproduced (Adapter.joint_window)
NOT_JOINT = ("window attention on joint layers needs the family's joint processor reproduced (techniques/joint.py: "
             "SD3, CogVideoX and FLUX are), and this family's is not")
DEFAULT_WINDOW = 0.125  # DiTFastAttn: w = N/8 tokens on each side


@dataclass(frozen=True)
class Config:
    window: float | int = DEFAULT_WINDOW
    # which steps compute R: "full" (difa's default) or "full+asc" (DiTFastAttn's rule; see plan.RESIDUAL_RULES)
    residual_from: str = "full"


def check_config(params: Mapping[str, Mapping]) -> None:
    """A one-line error for a bad window (residual_from: difa.plan.residual_producers)."""
    cfg = Config(**params.get(NAME, {}))
    try:
        window_tokens(cfg.window, 16)
    except ValueError as e:
        raise DifaError(f"techniques.{NAME}.{e}") from None


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
    residual = cell.state.residual
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
    return windowed_output(cell, hidden_states, cell.state.residual, NAME)

