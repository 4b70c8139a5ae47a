"""What every technique receives, and the projections they share.

A technique file has one shape: NAME, KINDS (the attention kinds it applies to: "attn1" self-, "attn2"
cross-attention, "joint" MMDiT attention over text and image tokens at once, whose output may be a tuple),
READS_CACHE (it reuses something an earlier step computed, so it cannot run at step 0),
NEEDS_METRIC (it needs the transformer block's input, e.g. ToMe's similarity metric), a frozen `Config`,
`flops(shape, params)` for the cost model and `execute(cell, hidden_states, encoder_hidden_states,
attention_mask, **kw)` returning the attention module's output. Techniques know nothing about the model
family; the engine builds the `Cell`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from difa.errors import DifaError


@dataclass
class LayerState:
    """Per-layer caches for one generation; the engine calls reset() when a generation starts."""

    out: Any = None  # (B, N, C) last computed module output, after to_out (`ast`, `tgate`); joint: maybe a tuple
    residual: torch.Tensor | None = None  # (B, H, N, D) O_full - O_window at the last full step (for `wars`)
    gated: torch.Tensor | None = None  # (B, N, C) `out` averaged over the CFG halves (`tgate`); None when stale
    metric: torch.Tensor | None = None  # (B, N, C) input of the layer's transformer block in this forward (ToMe)

    def reset(self) -> None:
        self.out = self.residual = self.gated = self.metric = None

    def snapshot(self) -> tuple:
        return (self.out, self.residual, self.gated)

    def restore(self, snap: tuple) -> None:
        self.out, self.residual, self.gated = snap


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
    keep_residual: bool = False  # a `wars` cell follows before the next `full` one: cache R now
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
