"""Standard softmax attention, the reference every compressed method is measured against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v over all key tokens; scale defaults to 1/sqrt(D)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, H, N, D)
