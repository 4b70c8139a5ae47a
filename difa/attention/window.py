"""1-D band ("window") attention of DiTFastAttn: query i attends to keys j with |i - j| <= w.

Source: Yuan et al., "DiTFastAttn", arXiv 2406.08552; https://github.com/thu-nics/DiTFastAttn.
Tokens are raster-flattened, so the band is a stripe of image rows, not a square neighbourhood.
The reference passed flash-attn `window_size=(-w, w)`, which lets every query see all earlier keys;
the symmetric band is `window_size=(w, w)`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from difa.attention.full import full_attention

HALF_PRECISION = (torch.float16, torch.bfloat16)  # dtypes flash-attn accepts
# Default query block = w/4, so a block computes (block+2w)/(2w+1) <= 1.125× its band's pairs, within
# [MIN_BLOCK, MAX_BLOCK]: below 32 queries the per-call cost dominates; torch's CPU flash kernel tiles queries
# by 32 below 192 and by 64 below 768, so blocks past 256 add masked work without a faster tile
# (tuned with benchmarks/bench_window.py).
BLOCK_PER_WINDOW = 0.25
MIN_BLOCK, MAX_BLOCK = 32, 256


def window_tokens(window: float | int, n_tokens: int) -> int:
    """Tokens per side of the band: a float in (0, 1] is a fraction of n_tokens (DiTFastAttn uses 1/8),
    an int >= 1 is a token count."""
    if isinstance(window, float) and 0.0 < window <= 1.0:
        return round(window * n_tokens)
    if isinstance(window, int) and not isinstance(window, bool) and window >= 1:
        return window
    raise ValueError(
        f"window={window!r} is invalid; use a float in (0, 1] (fraction of the tokens, e.g. 0.125) "
        "or an int >= 1 (tokens per side)"
    )


def band_pairs(n: int, w: int) -> int:
    """Number of (query, key) pairs with |i - j| <= w among n tokens: n² minus the two corners beyond the band."""
    outside = max(0, n - 1 - w)  # the corner j - i > w holds outside·(outside+1)/2 pairs
    return n * n - outside * (outside + 1)


def default_block(n: int, w: int) -> int:
    """Query block size for the CPU path (see BLOCK_PER_WINDOW)."""
    return min(n, max(MIN_BLOCK, min(MAX_BLOCK, int(BLOCK_PER_WINDOW * w))))


def _band_mask(block: int, w: int, device: torch.device) -> torch.Tensor:
    """(block, block+2w) bool: row r is query s+r, column c is key s-w+c; allowed iff |r + w - c| <= w.
    Identical for every block, so it is built once and only sliced where the band is clipped."""
    rows = torch.arange(block, device=device)[:, None]  # (block, 1)
    cols = torch.arange(block + 2 * w, device=device)[None, :]  # (1, block+2w)
    return (cols >= rows) & (cols <= rows + 2 * w)  # (block, block+2w)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, block: int | None) -> None:
    if not isinstance(w, int) or isinstance(w, bool) or w < 0:
        raise ValueError(f"w={w!r} is invalid; pass the tokens per side as an int >= 0 (see window_tokens)")
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} must be equal and (B, H, N, D); "
            "window attention is self-attention only"
        )
    if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block < 1):
        raise ValueError(f"block={block!r} is invalid; pass an int >= 1 or None for the default")


@functools.cache
def _flash_attn_func():
    """flash_attn.flash_attn_func, or None where flash-attn is not installed (it is optional)."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, *, scale: float | None = None, block: int | None = None
) -> torch.Tensor:
    """Band attention |i - j| <= w (w tokens each side, clipped at the ends) for (B, H, N, D) inputs.

    Never builds an N×N mask or score matrix: queries go in blocks of `block` tokens (default from
    `default_block`), each attending only to its key band [start-w, end+w). w >= N-1 is full attention.
    """
    _check(q, k, v, w, block)
    n = q.shape[-2]
    if w >= n - 1:
        return full_attention(q, k, v, scale)  # (B, H, N, D)
    flash = _flash_attn_func() if q.is_cuda and q.dtype in HALF_PRECISION else None
    if flash is not None:
        # flash-attn takes (B, N, H, D); window_size=(left, right) keys per side, so (w, w) is the symmetric band.
        o = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, window_size=(w, w))
        return o.transpose(1, 2)  # (B, H, N, D)

    block = min(n, block or default_block(n, w))
    mask = _band_mask(block, w, q.device)  # (block, block+2w)
    out = torch.empty_like(q)  # (B, H, N, D)
    for start in range(0, n, block):
        end = min(n, start + block)
        k_start, k_end = max(0, start - w), min(n, end + w)
        col = k_start - (start - w)  # mask column of key k_start; > 0 only where the band is clipped on the left
        out[:, :, start:end] = F.scaled_dot_product_attention(
            q[:, :, start:end],  # (B, H, b, D)
            k[:, :, k_start:k_end],  # (B, H, b+2w, D) or fewer at the ends
            v[:, :, k_start:k_end],
            attn_mask=mask[: end - start, col : col + k_end - k_start],  # (b, keys)
            scale=scale,
        )
    return out


def joint_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_image: int, w: int, *,
                           image_first: bool = True, scale: float | None = None,
                           block: int | None = None) -> torch.Tensor:
    """Band attention over the image part of a joint (MMDiT) sequence, full attention for its text part.

    q, k, v: (B, H, L, D) over L = n_image + T tokens, [image | text] (`image_first`) or [text | image]. Image query i
    attends to image keys j with |i - j| <= w and to every text key; text queries attend to every key. Image
    queries go in blocks, each with its key band plus the text keys (a (block, block + 2w + T) mask, never L×L).
    """
    _check(q, k, v, w, block)
    length = q.shape[-2]
    n, t = n_image, length - n_image
    img = slice(0, n) if image_first else slice(t, length)
    txt = slice(n, length) if image_first else slice(0, t)
    out = torch.empty_like(q)  # (B, H, L, D)
    out[:, :, txt] = full_attention(q[:, :, txt], k, v, scale)  # text rows: the whole sequence
    if w >= n - 1:
        out[:, :, img] = full_attention(q[:, :, img], k, v, scale)
        return out
    qi, ki, vi = q[:, :, img], k[:, :, img], v[:, :, img]  # (B, H, n, D)
    kt, vt = k[:, :, txt], v[:, :, txt]  # (B, H, T, D)
    block = min(n, block or default_block(n, w))
    band = _band_mask(block, w, q.device)  # (block, block+2w)
    ones = torch.ones(block, t, dtype=torch.bool, device=q.device)
    o = torch.empty_like(qi)
    for start in range(0, n, block):
        end = min(n, start + block)
        k_start, k_end = max(0, start - w), min(n, end + w)
        col = k_start - (start - w)
        mask = torch.cat([band[: end - start, col: col + k_end - k_start], ones[: end - start]], dim=1)
        o[:, :, start:end] = F.scaled_dot_product_attention(
            qi[:, :, start:end],  # (B, H, b, D)
            torch.cat([ki[:, :, k_start:k_end], kt], dim=2),  # (B, H, band + T, D)
            torch.cat([vi[:, :, k_start:k_end], vt], dim=2),
            attn_mask=mask, scale=scale)
    out[:, :, img] = o
    return out
