"""Calibration losses, measured on the denoiser's final output."""

from __future__ import annotations

import torch

EPS = 1e-8
MAX_LOSS = 10.0


def relative_l1(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> float:
    """mean(|a - b| / (max(|a|, |b|) + eps)), clipped to [0, 10] (DiTFastAttn's loss).

    The denominator uses magnitudes: the reference took max of *signed* values, so near-zero negatives blew
    the ratio up to the clip.
    """
    a, b = a.double(), b.double()
    ratio = (a - b).abs() / (torch.maximum(a.abs(), b.abs()) + eps)
    return float(ratio.mean().clamp(0.0, MAX_LOSS))
