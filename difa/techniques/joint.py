"""Joint (MMDiT) attention split into its projections and its output, the same ops in the same order as SD3's
`JointAttnProcessor2_0` (so a `full` step that also caches the window residual stays bit-exact): for the methods that
change the attention core of a joint layer (`wars`). The sequence is [image | text]; the output (image, text).
FLUX's and CogVideoX's processors put the text first and rotate the image tokens (RoPE): not covered here, which is
why `wars` is refused on those families (Adapter.joint_window)."""

from __future__ import annotations

from typing import Any

import torch

from difa.errors import DifaError

PROCESSORS = ("JointAttnProcessor2_0",)  # the processors this file reproduces


def check(cell: Any, method: str) -> None:
    name = type(cell.original).__name__
    if name not in PROCESSORS:
        raise DifaError(f"{cell.name}: {method!r} on joint attention reproduces SD3's {', '.join(PROCESSORS)}, but this "
                        f"layer's processor is {name}; set this layer to 'full'")


def qkv(attn: Any, x: torch.Tensor, context: torch.Tensor | None):
    """(q, k, v), each (B, H, N + T, D): image tokens x (B, N, C) then text tokens context (B, T, C)."""
    b = x.shape[0]
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    head_dim = k.shape[-1] // attn.heads
    q = q.view(b, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, N, D)
    k = k.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    v = v.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if context is not None:
        cq, ck, cv = attn.add_q_proj(context), attn.add_k_proj(context), attn.add_v_proj(context)
        cq = cq.view(b, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, T, D)
        ck = ck.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        cv = cv.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
    return q, k, v


def out(attn: Any, o: torch.Tensor, n_image: int, has_text: bool, dtype: torch.dtype):
    """The processor's output from the attention output o (B, H, N + T, D): (image, text), or image alone."""
    b, h, _, d = o.shape
    x = o.transpose(1, 2).reshape(b, -1, h * d).to(dtype)  # (B, N + T, H*D)
    text = None
    if has_text:
        x, text = x[:, :n_image], x[:, n_image:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
    x = attn.to_out[0](x)
    x = attn.to_out[1](x)
    return (x, text) if has_text else x
