"""difa.attention against naive dense references written here, on small N."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from difa.attention import band_pairs, full_attention, window_attention, window_tokens
from difa.attention import window as window_module

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}
HEAD_DIM = 8


def qkv(b: int, h: int, n: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, HEAD_DIM, generator=g, dtype=dtype) for _ in range(3))  # (B, H, N, D) each


def naive_window(q, k, v, w, scale=None):
    """softmax(q·kᵀ·scale + band) · v with the dense |i - j| <= w mask built explicitly."""
    n = q.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    pos = torch.arange(n)
    band = (pos[:, None] - pos[None, :]).abs() <= w  # (N, N)
    bias = torch.zeros(n, n, dtype=q.dtype).masked_fill(~band, float("-inf"))  # (N, N)
    scores = q @ k.transpose(-1, -2) * scale + bias  # (B, H, N, N)
    return scores.softmax(dim=-1) @ v  # (B, H, N, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "b, h, n, w, block",
    [
        (1, 1, 1, 0, None),  # a single token
        (1, 1, 17, 0, 4),  # w=0: each query sees only itself
        (1, 2, 17, 1, 4),  # N not divisible by the block
        (2, 3, 50, 6, 8),  # B>1, H>1
        (1, 1, 20, 3, 64),  # N < block
        (1, 1, 33, 5, 1),  # block of one query
        (1, 2, 40, 25, 8),  # band wider than half the sequence
        (1, 1, 24, 22, 5),  # w = N-2: the last band-limited case
        (1, 1, 24, 23, None),  # w = N-1: full attention
        (2, 2, 24, 100, None),  # w > N: full attention
        (1, 4, 300, 37, None),  # default block
    ],
)
def test_window_matches_dense_reference(b, h, n, w, block, dtype):
    q, k, v = qkv(b, h, n, dtype)
    out = window_attention(q, k, v, w, block=block)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, naive_window(q, k, v, w), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_window_scale(dtype):
    q, k, v = qkv(1, 2, 30, dtype)
    torch.testing.assert_close(
        window_attention(q, k, v, 4, scale=0.3, block=7), naive_window(q, k, v, 4, scale=0.3), **TOLERANCE[dtype]
    )


def test_window_zero_is_identity_on_values():
    q, k, v = qkv(2, 2, 19, torch.float64)
    torch.testing.assert_close(window_attention(q, k, v, 0), v, **TOLERANCE[torch.float64])


def test_full_attention_matches_dense_reference():
    q, k, v = qkv(2, 3, 21, torch.float64)
    torch.testing.assert_close(full_attention(q, k, v), naive_window(q, k, v, 21), **TOLERANCE[torch.float64])
    torch.testing.assert_close(
        full_attention(q, k, v, scale=2.0), naive_window(q, k, v, 21, scale=2.0), **TOLERANCE[torch.float64]
    )


def test_wide_window_calls_full_attention(monkeypatch):
    calls = []
    monkeypatch.setattr(window_module, "full_attention", lambda *a: calls.append(a) or full_attention(*a))
    q, k, v = qkv(1, 1, 10, torch.float32)
    window_attention(q, k, v, 9)
    window_attention(q, k, v, 8)
    assert len(calls) == 1


def test_no_n_by_n_tensor(monkeypatch):
    """Every SDPA call sees a query block and a key band far smaller than N, and no mask storage is N×N."""
    n, w = 8192, 64
    budget = n * n // 64  # elements; an N×N score or mask block would be 64× this
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape[-2], k.shape[-2], attn_mask))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(window_module.F, "scaled_dot_product_attention", recording_sdpa)
    q, k, v = qkv(1, 1, n, torch.float32)
    out = window_attention(q, k, v, w)
    assert len(seen) > 1
    for n_q, n_k, mask in seen:
        assert n_q * n_k <= budget
        assert mask.shape == (n_q, n_k) and mask.untyped_storage().nbytes() <= budget * mask.element_size()
    rows = slice(n // 2, n // 2 + 50)  # spot-check an interior stretch against the dense math on its band
    keys = slice(rows.start - w, rows.stop + w)
    local = naive_window(q[:, :, keys], k[:, :, keys], v[:, :, keys], w)[:, :, w:-w]  # (1, 1, 50, D)
    torch.testing.assert_close(out[:, :, rows], local, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("n", [1, 2, 3, 10, 33])
def test_band_pairs_matches_brute_force(n):
    for w in range(n + 3):
        brute = sum(abs(i - j) <= w for i in range(n) for j in range(n))
        assert band_pairs(n, w) == brute


def test_band_pairs_interior_formula():
    n, w = 4096, 512
    assert band_pairs(n, w) == n * (2 * w + 1) - w * (w + 1)
    assert band_pairs(n, n) == n * n


@pytest.mark.parametrize(
    "window, n, expected",
    [(0.125, 4096, 512), (0.125, 1024, 128), (1.0, 64, 64), (0.5, 3, 2), (0.01, 10, 0), (1, 4096, 1), (300, 256, 300)],
)
def test_window_tokens(window, n, expected):
    assert window_tokens(window, n) == expected


@pytest.mark.parametrize("window", [0.0, -0.1, 1.5, 0, -3, True, "0.125", None])
def test_window_tokens_rejects(window):
    with pytest.raises(ValueError, match="window="):
        window_tokens(window, 100)


def test_window_attention_rejects_bad_inputs():
    q, k, v = qkv(1, 2, 10, torch.float32)
    for bad_w in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="w="):
            window_attention(q, k, v, bad_w)
    with pytest.raises(ValueError, match="shapes"):
        window_attention(q, k[:, :, :5], v[:, :, :5], 2)
    with pytest.raises(ValueError, match="shapes"):
        window_attention(q[0], k[0], v[0], 2)
    for bad_block in (0, 2.0):
        with pytest.raises(ValueError, match="block="):
            window_attention(q, k, v, 2, block=bad_block)
