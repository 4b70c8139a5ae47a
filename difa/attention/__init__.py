"""Attention math: pure functions of (B, H, N, D) tensors, torch only, no module state."""

from difa.attention.full import full_attention
from difa.attention.window import band_pairs, joint_window_attention, window_attention, window_tokens

__all__ = ["band_pairs", "full_attention", "joint_window_attention", "window_attention", "window_tokens"]
