"""What every attention technique receives, and the projections they share.

A technique file declares a `protocol.Technique` and an `execute(cell, hidden_states, encoder_hidden_states,
attention_mask, **kw)` returning the attention module's output. Techniques know nothing about the model family;
the engine builds the `Cell`. The layer-level slots every family has are declared here: OUT (the engine caches a
cell's output where a later cell reads it) and METRIC (the engine hands the layer its block's input).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from difa.errors import DifaError
from difa.techniques.protocol import LAYER, Slot

OUT = "out"
METRIC = "metric"
# (B, N, C) the layer's last computed module output, after to_out; a joint layer's may be a tuple
OUT_SLOT = Slot(OUT, LAYER, "output", lambda s, cfg: s.batch * s.n_q * s.dim,
                doc="the layer's last computed output (after to_out, before the block's adaLN gate)")
# (B, N, C) the input of the layer's transformer block in this forward (ToMe's similarity metric)
METRIC_SLOT = Slot(METRIC, LAYER, "block_input", lambda s, cfg: s.batch * s.n_q * s.dim, fit_batch=False,
                   per_forward=True, doc="the layer's block input in this forward")


@dataclass
class LayerState:
    """Per-layer caches for one generation, slot -> value; the engine calls reset() when a generation starts."""

    slots: dict[str, Any] = field(default_factory=dict)

    def get(self, slot: str) -> Any:
        return self.slots.get(slot)

    def reset(self) -> None:
        self.slots = {}

    def snapshot(self) -> dict[str, Any]:
        return dict(self.slots)

    def restore(self, snap: dict[str, Any]) -> None:
        self.slots = dict(snap)


@dataclass(frozen=True)
class LayerShape:
    """Shapes seen by one attention layer, recorded on its first call; input of the cost model."""

    batch: int  # B, both CFG halves included
    n_q: int  # query tokens
    n_kv: int  # key/value tokens
    dim: int  # query input channels C
    inner: int  # heads * head_dim
    heads: int
    downsample: int = 1  # UNet block downsampling relative to the latent (ToMe's max_downsample); 1 in transformers
    text: int = 0  # of the n_q tokens, the text tokens of a joint (MMDiT) layer (full attention under `wars`)

    @property
    def head_dim(self) -> int:
        return self.inner // self.heads

    def to_dict(self) -> dict[str, int]:
        d = dict(batch=self.batch, n_q=self.n_q, n_kv=self.n_kv, dim=self.dim, inner=self.inner, heads=self.heads,
                 downsample=self.downsample)
        return {**d, "text": self.text} if self.text else d


@dataclass
class Cell:
    """One (layer, step) call, as the engine hands it to a technique."""

    attn: Any  # diffusers Attention module
    name: str
    layer: int
    step: int
    state: LayerState
    params: Mapping[str, Mapping[str, Any]]  # technique name -> config dict (from the plan)
    original: Callable  # the processor the module had before the plan was applied
    cond: slice | None = None  # batch slice of the conditional CFG half; None when the batch is not a CFG batch
    keep: frozenset = frozenset()  # slots this cell writes that a later cell reads: cache them now
    grid: tuple[int, int, int] | None = None  # (h, w, downsample) of the layer's token grid, from the adapter
    collapsed: bool = False  # the engine runs one CFG half only (every cross-attention gated): halves are equal
    joint: bool = False  # a joint (MMDiT) layer: hidden_states are the image tokens, encoder_hidden_states the text
    text_tokens: int | None = None  # text tokens of the denoiser call (FLUX single-stream layers: the joined length)

    def require_cfg(self, method: str) -> slice:
        if self.cond is None:
            raise DifaError(
                f"{self.name} step {self.step} uses {method!r} (CFG sharing) but this call is not a CFG batch; "
                "run with guidance_scale > 1 or use a plan calibrated without CFG"
            )
        return self.cond


def check_plain(cell: Cell, attention_mask: torch.Tensor | None, method: str) -> None:
    attn = cell.attn
    if (attention_mask is not None or getattr(attn, "spatial_norm", None) is not None
            or getattr(attn, "group_norm", None) is not None):
        raise DifaError(
            f"{cell.name}: {method!r} supports unmasked token attention only (this layer has a mask, spatial_norm or "
            "group_norm); set this layer to 'full' in the plan"
        )


def project_qkv(attn: Any, x: torch.Tensor, context: torch.Tensor | None = None):
    """Same ops, in the same order, as diffusers' AttnProcessor2_0, so `full` stays bit-exact."""
    b = x.shape[0]  # x: (B, N, C)
    q = attn.to_q(x)
    if context is None:
        context = x
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    k = attn.to_k(context)
    v = attn.to_v(context)
    head_dim = k.shape[-1] // attn.heads
    q = q.view(b, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, N, D)
    k = k.view(b, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, M, D)
    v = v.view(b, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, M, D)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


def project_out(attn: Any, o: torch.Tensor, residual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b, h, n, d = o.shape  # o: (B, H, N, D)
    x = o.transpose(1, 2).reshape(b, n, h * d).to(dtype)  # (B, N, H*D)
    x = attn.to_out[0](x)
    x = attn.to_out[1](x)  # dropout (identity in eval)
    if attn.residual_connection:
        x = x + residual
    return x / attn.rescale_output_factor


def projection_flops(shape: LayerShape) -> float:
    # q from (B, Nq, C), k and v from (B, Nkv, C), out back to C: 2 FLOPs per multiply-add
    return 2.0 * shape.batch * shape.inner * shape.dim * (2 * shape.n_q + 2 * shape.n_kv)


def core_flops(shape: LayerShape, pairs: int) -> float:
    # Q·Kᵀ and P·V over `pairs` (query, key) pairs: 2 matmuls x 2 FLOPs per multiply-add
    return 4.0 * shape.batch * shape.inner * pairs
