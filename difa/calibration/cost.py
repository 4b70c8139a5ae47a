"""Cost model: attention FLOPs of each method at a layer's shapes, and of a whole plan.

FLOPs count the attention module (q/k/v/out projections plus Q·Kᵀ and P·V), 2 FLOPs per multiply-add.
The window residual cached at a `full` step is charged to that step (DiTFastAttn's counter charged
nothing for window attention at all).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from difa.plan import FULL, TGATE, residual_producers, residual_steps
from difa.techniques import REGISTRY, kind_of, wars
from difa.techniques.base import LayerShape, core_flops


def method_flops(method: str, shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    return REGISTRY[method].flops(shape, params)


def residual_flops(shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    """Extra window attention computed at a `full` step to cache R."""
    return core_flops(shape, wars.window_pairs(shape, params))


def order_candidates(candidates: Iterable[str], shape: LayerShape, params: Mapping[str, Mapping]) -> list[str]:
    """Cheapest first at this layer's token count (a fixed order would try WA-RS before ASC at 1k tokens)."""
    cands = list(candidates)
    return sorted(cands, key=lambda m: (method_flops(m, shape, params), cands.index(m)))


def collapsed_steps(methods: Sequence[Sequence[str]], names: Sequence[str], cfg: bool) -> list[bool]:
    """Steps the engine can run on one CFG half: every cross-attention layer is `tgate` (T-GATE's CFG drop)."""
    cross = [row for row, n in zip(methods, names) if kind_of(n) == "attn2"]
    steps = len(methods[0]) if methods else 0
    return [cfg and bool(cross) and all(row[t] == TGATE for row in cross) for t in range(steps)]


def plan_flops(methods: Sequence[Sequence[str]], shapes: Sequence[LayerShape], params: Mapping[str, Mapping],
               names: Sequence[str] = (), cfg: bool = False, executed: Sequence[Sequence[bool]] | None = None) -> dict:
    """Attention FLOPs of the plan vs all-full. With `names` and `cfg`, steps that collapse CFG (all cross-attention
    gated) count self-attention at half the batch (the engine skips the collapse when a cache's halves differ).
    `executed` ([layer][step], from `plan.attention_executed`): cells of skipped blocks cost nothing."""
    keep_r = residual_steps(methods, executed, residual_producers(params))
    collapsed = collapsed_steps(methods, names, cfg) if names else [False] * (len(methods[0]) if methods else 0)
    full_total = plan_total = 0.0
    for i, (row, keep, shape) in enumerate(zip(methods, keep_r, shapes)):
        f = method_flops(FULL, shape, params)
        full_total += f * len(row)
        for t, (m, k) in enumerate(zip(row, keep)):
            if executed is not None and not executed[i][t]:
                continue
            extra = residual_flops(shape, params) * (0.5 if m == "asc" else 1.0) if k else 0.0  # asc: cond half
            cost = method_flops(m, shape, params) + extra
            plan_total += cost / 2 if collapsed[t] else cost
    return {
        "full_gflops": full_total / 1e9,
        "plan_gflops": plan_total / 1e9,
        "fraction": plan_total / full_total if full_total else 1.0,
    }


def cache_elements(plan, shapes: Sequence[LayerShape]) -> int | None:
    """Elements the engine holds across steps for `plan` at the batch of `shapes` (one LayerShape per attention
    layer, as the engine records them): the slots its cells write and a later cell reads, each the size it has at a
    full-batch step. Attention layer (B, N, C), inner = heads x head_dim: the last output (B, N, C) where `ast` /
    `tgate` follow; the window residual (B, H, N, D) where `wars` follows; T-GATE's gated mean (B/2, N, C with CFG);
    ToMe's block-input metric (B, N, C). Block (its attn1's B, N, C): the last one or two residuals a `reuse` /
    `forecast` reads, the feed-forward output `mlp_reuse` reads. None for plans with DeepCache units (their outputs'
    shapes are not recorded). Joint (MMDiT) layers: N counts image and text tokens. CFG-collapsed steps write half-batch tensors, so this is an upper bound there."""
    from difa.plan import (block_executed, block_keeps, executed_cells, output_steps)

    if len(shapes) != len(plan.model.layers) or any(s is None for s in shapes):
        return None
    names, blocks = plan.model.layers, plan.model.blocks
    executed = executed_cells(names, blocks, plan.blocks, plan.steps)
    keep_out = output_steps(plan.methods, executed)
    keep_res = residual_steps(plan.methods, executed, residual_producers(plan.techniques))
    total = 0
    for i, (row, s) in enumerate(zip(plan.methods, shapes)):
        ran = [m for m, r in zip(row, executed[i]) if r]
        if any(keep_out[i]):
            total += s.batch * s.n_q * s.dim
        if any(keep_res[i]):
            total += s.batch * s.n_q * s.inner
        if TGATE in ran:
            total += (s.batch // 2 if plan.cfg_enabled else s.batch) * s.n_q * s.dim
        if any(getattr(REGISTRY[m], "NEEDS_METRIC", False) for m in ran):
            total += s.batch * s.n_q * s.dim
    by_name = dict(zip(names, shapes))
    ran_blocks = block_executed(blocks, plan.blocks, plan.steps) if plan.blocks else []
    for j, row in enumerate(plan.blocks):
        if any(getattr(REGISTRY[m], "NEEDS", None) == "output" for m in row):
            return None
        s = by_name.get(f"{blocks[j]}.attn1")  # a joint (MMDiT) block: its one layer, whose tokens are both streams'
        if s is None:  # (the block's residual joins them too: engine._join_streams)
            s = next((by_name[n] for n in names if n.rsplit(".", 1)[0] == blocks[j]), None)
        if s is None:
            return None
        points = max([getattr(REGISTRY[m], "NEEDS_POINTS", 1) for m in row
                      if getattr(REGISTRY[m], "NEEDS", None) == "residual"] or [0])  # as Engine's residual_points
        slots = min(points, sum(block_keeps(row, "residual", ran_blocks[j])))
        slots += any(block_keeps(row, "ff", ran_blocks[j]))
        total += slots * s.batch * s.n_q * s.dim
    return total
