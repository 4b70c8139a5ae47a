"""A cap on the block residuals a plan keeps across steps (`max_cache_mb`): which methods each block may take."""

from __future__ import annotations

from typing import Sequence

from difa.calibration.table import Table
from difa.techniques import REGISTRY


def cache_slots(table: Table, steps: int, methods: Sequence[str], slot_bytes: Sequence[int],
                cap_bytes: float) -> list[tuple[str, ...]]:
    """Per block, the methods a plan may use so that its block caches fit in `cap_bytes` whatever cells the search
    skips: a block whose methods read at most p residual points holds p residuals (slot_bytes[j] each; `reuse` 1, a
    first-order `forecast` 2). From the every-second-step schedule's table errors: first the fewest-point methods
    to the blocks cheapest to skip, then each dearer level of points to the blocks where it removes the most error,
    while the cap allows. A block left without a method is never skipped."""
    n = len(slot_bytes)
    odd = set(range(1, steps, 2))
    levels = sorted({REGISTRY[m].points for m in methods})
    at = {p: [m for m in methods if REGISTRY[m].points <= p] for p in levels}  # the methods a block of p slots may use
    best = [table.row(j, steps, odd, list(methods))[0] for j in range(n)]
    held = [0] * n  # residual slots granted per block
    left = float(cap_bytes)
    for k, p in enumerate(levels):
        if k == 0:
            order = sorted(range(n), key=lambda j: best[j])  # cheapest to skip first
        else:
            below = [table.row(j, steps, odd, at[levels[k - 1]])[0] if held[j] else float("inf") for j in range(n)]
            order = sorted((j for j in range(n) if held[j]), key=lambda j: best[j] - below[j])  # most gain first
        for j in order:
            need = slot_bytes[j] * (p - held[j])
            if need <= left:
                held[j] = p
                left -= need
    return [tuple(m for m in methods if held[j] and REGISTRY[m].points <= held[j]) for j in range(n)]
