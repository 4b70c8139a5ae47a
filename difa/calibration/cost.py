"""Cost model: attention FLOPs of each method at a layer's shapes, and of a whole plan.

FLOPs count the attention module (q/k/v/out projections plus Q·Kᵀ and P·V), 2 FLOPs per multiply-add.
The window residual cached at a `full` step is charged to that step (DiTFastAttn's counter charged
nothing for window attention at all).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from difa.attention import band_pairs, window_tokens
from difa.plan import FULL, residual_steps
from difa.techniques import REGISTRY, wars
from difa.techniques.base import LayerShape, core_flops


def method_flops(method: str, shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    return REGISTRY[method].flops(shape, params)


def residual_flops(shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    """Extra window attention computed at a `full` step to cache R."""
    w = window_tokens(wars.Config(**params.get(wars.NAME, {})).window, shape.n_kv)
    return core_flops(shape, band_pairs(shape.n_kv, w))


def order_candidates(candidates: Iterable[str], shape: LayerShape, params: Mapping[str, Mapping]) -> list[str]:
    """Cheapest first at this layer's token count (a fixed order would try WA-RS before ASC at 1k tokens)."""
    cands = list(candidates)
    return sorted(cands, key=lambda m: (method_flops(m, shape, params), cands.index(m)))


def plan_flops(methods: Sequence[Sequence[str]], shapes: Sequence[LayerShape], params: Mapping[str, Mapping]) -> dict:
    keep_r = residual_steps(methods)
    full_total = plan_total = 0.0
    for row, keep, shape in zip(methods, keep_r, shapes):
        f = method_flops(FULL, shape, params)
        full_total += f * len(row)
        for m, k in zip(row, keep):
            plan_total += method_flops(m, shape, params) + (residual_flops(shape, params) if k else 0.0)
    return {
        "full_gflops": full_total / 1e9,
        "plan_gflops": plan_total / 1e9,
        "fraction": plan_total / full_total if full_total else 1.0,
    }
