"""Joint (MMDiT) attention split into its projections and its output, the same ops in the same order as the stock
processors (so a `full` step that also caches the window residual stays bit-exact), for the methods that change the
attention core of a joint layer (`wars`):

- SD3's `JointAttnProcessor2_0`: sequence [image | text], separate projections for the text (add_q_proj, ...),
  output (image, text) with to_out / to_add_out (none in the last block: context_pre_only). SD3.5 Medium's second
  attention (attn2, in its dual-attention blocks) runs the same processor without text: image tokens only, one output.
- CogVideoX's `CogVideoXAttnProcessor2_0`: sequence [text | video], one set of projections on the joined sequence,
  RoPE on the video part where the model uses it (5b; the 2b passes None), one to_out, output (video, text).
- FLUX's `FluxAttnProcessor` (default attention backend): [text | image] with RoPE on the whole sequence; a
  double-stream layer projects the text with add_*_proj and returns (image, text); a single-stream layer gets the
  joined sequence and returns it as is. Its text length is the denoiser's (Cell.text_tokens).
"""

from __future__ import annotations

from typing import Any

import torch

from difa.errors import DifaError

PROCESSORS = {"JointAttnProcessor2_0": "sd3", "CogVideoXAttnProcessor2_0": "cogvideox", "FluxAttnProcessor": "flux"}
IMAGE_FIRST = {"sd3": True, "cogvideox": False, "flux": False}  # token order of the joint sequence


def text_in_sequence(processor: Any) -> bool:
    """Whether a joint layer called without encoder_hidden_states gets the text inside its one sequence (FLUX's
    single-stream layers: the denoiser's text length tells it apart) rather than no text at all (SD3.5's second
    attention, attn2: JointAttnProcessor2_0 over the image tokens only)."""
    return PROCESSORS.get(type(processor).__name__) == "flux"


def check(cell: Any, method: str) -> bool:
    """Whether the layer's sequence is [image | text] (else [text | image]); a one-line error for other processors."""
    name = type(cell.original).__name__
    if name not in PROCESSORS:
        raise DifaError(f"{cell.name}: {method!r} on joint attention reproduces {', '.join(PROCESSORS)} only, but "
                        f"this layer's processor is {name}; set this layer to 'full'")
    if getattr(cell.original, "_attention_backend", None) is not None:
        raise DifaError(f"{cell.name}: {method!r} reproduces the default attention backend, but this layer's processor "
                        f"uses {cell.original._attention_backend}; set this layer to 'full'")
    return IMAGE_FIRST[PROCESSORS[name]]


def _heads(attn: Any, b: int, *ts: torch.Tensor):
    head_dim = ts[1].shape[-1] // attn.heads
    return [t.view(b, -1, attn.heads, head_dim).transpose(1, 2) for t in ts]  # (B, H, L, D)


def qkv(cell: Any, x: torch.Tensor, context: torch.Tensor | None, rotary: Any = None):
    """(q, k, v, n_image): q, k, v each (B, H, L, D) in the processor's token order, L = image + text tokens; x is the
    image (or video) tokens (B, N, C) and context the text (B, T, C), or x the joined sequence (FLUX single-stream)."""
    attn, family = cell.attn, PROCESSORS[type(cell.original).__name__]
    if family == "flux":
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        q, k, v, cq, ck, cv = _get_qkv_projections(attn, x, context)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))  # (B, N, H, D)
        q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.added_kv_proj_dim is not None:
            cq, ck, cv = (t.unflatten(-1, (-1, attn.head_dim)) for t in (cq, ck, cv))
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
        if rotary is not None:
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
            k = apply_rotary_emb(k, rotary, sequence_dim=1)
        if context is not None:
            n = x.shape[1]
        elif cell.text_tokens is None:
            raise DifaError(f"{cell.name}: the text length of this single-stream layer is unknown (the denoiser got no "
                            "encoder_hidden_states); set this layer to 'full'")
        else:
            n = x.shape[1] - cell.text_tokens
        return *(t.permute(0, 2, 1, 3) for t in (q, k, v)), n  # (B, H, L, D), as the native backend hands SDPA
    if family == "cogvideox":
        t = context.size(1)
        h = torch.cat([context, x], dim=1)  # (B, T + N, C)
        q, k, v = _heads(attn, h.shape[0], attn.to_q(h), attn.to_k(h), attn.to_v(h))  # (B, H, T + N, D)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if rotary is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            q[:, :, t:] = apply_rotary_emb(q[:, :, t:], rotary)
            if not attn.is_cross_attention:
                k[:, :, t:] = apply_rotary_emb(k[:, :, t:], rotary)
        return q, k, v, x.shape[1]
    b = x.shape[0]  # SD3
    q, k, v = _heads(attn, b, attn.to_q(x), attn.to_k(x), attn.to_v(x))  # (B, H, N, D)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if context is not None:
        cq, ck, cv = _heads(attn, b, attn.add_q_proj(context), attn.add_k_proj(context), attn.add_v_proj(context))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
    return q, k, v, x.shape[1]


def out(cell: Any, o: torch.Tensor, n_image: int, has_text: bool, dtype: torch.dtype):
    """The processor's output from the attention output o (B, H, L, D): (image, text), or one tensor."""
    attn, family = cell.attn, PROCESSORS[type(cell.original).__name__]
    b, h, length, d = o.shape
    if family == "flux":
        y = o.permute(0, 2, 1, 3).flatten(2, 3).to(dtype)  # (B, L, H*D)
        if not has_text:
            return y  # single-stream: the joined sequence (the block splits it)
        text, image = y.split_with_sizes([length - n_image, n_image], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())
    if family == "cogvideox":  # to_out on the joined sequence, then split
        y = o.transpose(1, 2).reshape(b, -1, h * d)
        y = attn.to_out[1](attn.to_out[0](y))
        text, image = y.split([length - n_image, n_image], dim=1)
        return image, text
    x = o.transpose(1, 2).reshape(b, -1, h * d).to(dtype)  # (B, N + T, H*D)
    text = None
    if has_text:
        x, text = x[:, :n_image], x[:, n_image:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
    x = attn.to_out[1](attn.to_out[0](x))
    return (x, text) if has_text else x
