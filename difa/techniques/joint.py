"""Joint (MMDiT) attention split into its projections and its output, the same ops in the same order as the stock
processors (so a `full` step that also caches the window residual stays bit-exact), for the methods that change the
attention core of a joint layer (`wars`):

- SD3's `JointAttnProcessor2_0`: sequence [image | text], separate projections for the text (add_q_proj, ...),
  output (image, text) with to_out / to_add_out (none in the last block: context_pre_only).
- CogVideoX's `CogVideoXAttnProcessor2_0`: sequence [text | video], one set of projections on the joined sequence,
  RoPE on the video part where the model uses it (5b; the 2b passes None), one to_out, output (video, text).

FLUX's `FluxAttnProcessor` is not reproduced (its single-stream layers get the joined sequence without the text
length); `wars` is refused on FLUX (Adapter.joint_window)."""

from __future__ import annotations

from typing import Any

import torch

from difa.errors import DifaError

IMAGE_FIRST = {"JointAttnProcessor2_0": True, "CogVideoXAttnProcessor2_0": False}  # the processors reproduced


def check(cell: Any, method: str) -> bool:
    """Whether the layer's sequence is [image | text] (else [text | image]); a one-line error for other processors."""
    name = type(cell.original).__name__
    if name not in IMAGE_FIRST:
        raise DifaError(f"{cell.name}: {method!r} on joint attention reproduces {' and '.join(IMAGE_FIRST)} only, but "
                        f"this layer's processor is {name}; set this layer to 'full'")
    return IMAGE_FIRST[name]


def qkv(cell: Any, x: torch.Tensor, context: torch.Tensor | None, rotary: Any = None):
    """(q, k, v), each (B, H, N + T, D), in the processor's token order: image (or video) tokens x (B, N, C), text
    tokens context (B, T, C)."""
    attn = cell.attn
    if not IMAGE_FIRST[type(cell.original).__name__]:  # CogVideoX
        t = context.size(1)
        h = torch.cat([context, x], dim=1)  # (B, T + N, C)
        b = h.shape[0]
        q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
        head_dim = k.shape[-1] // attn.heads
        q = q.view(b, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, T + N, D)
        k = k.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        v = v.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if rotary is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            q[:, :, t:] = apply_rotary_emb(q[:, :, t:], rotary)
            if not attn.is_cross_attention:
                k[:, :, t:] = apply_rotary_emb(k[:, :, t:], rotary)
        return q, k, v
    b = x.shape[0]  # SD3
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


def out(cell: Any, o: torch.Tensor, n_image: int, has_text: bool, dtype: torch.dtype):
    """The processor's output from the attention output o (B, H, L, D): (image, text), or the image alone."""
    attn = cell.attn
    b, h, length, d = o.shape
    if not IMAGE_FIRST[type(cell.original).__name__]:  # CogVideoX: to_out on the joined sequence, then split
        y = o.transpose(1, 2).reshape(b, -1, h * d)
        y = attn.to_out[0](y)
        y = attn.to_out[1](y)
        text, image = y.split([length - n_image, n_image], dim=1)
        return image, text
    x = o.transpose(1, 2).reshape(b, -1, h * d).to(dtype)  # (B, N + T, H*D)
    text = None
    if has_text:
        x, text = x[:, :n_image], x[:, n_image:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
    x = attn.to_out[0](x)
    x = attn.to_out[1](x)
    return (x, text) if has_text else x
