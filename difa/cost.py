"""Cost model: attention FLOPs of each method at a layer's shapes, of a whole plan, and the cache memory a plan holds.

FLOPs count the attention module (q/k/v/out projections plus Q·Kᵀ and P·V), 2 FLOPs per multiply-add; each
technique declares its own (`Technique.flops`). Computing a slot that a later cell reads costs the slot's writer
extra work, which the writer's technique charges through `write_flops` (the window residual cached at a `full`
step: one window attention; DiTFastAttn's counter charged nothing for window attention at all). Nothing here names
a method.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from difa.cells import block_executed, executed_cells, kept_slots
from difa.techniques import REGISTRY, kind_of, slots
from difa.techniques.base import LayerShape
from difa.techniques.protocol import BLOCK, FULL, LAYER


def method_flops(method: str, shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    return REGISTRY[method].flops(shape, params)


def write_flops(slot: str, method: str, shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    """Extra FLOPs of `method` computing `slot` at a cell that keeps it (declared by the slot: Slot.write_flops)."""
    cost = slots()[slot].write_flops
    return 0.0 if cost is None else cost(REGISTRY[method], shape, params)


def order_candidates(candidates: Iterable[str], shape: LayerShape, params: Mapping[str, Mapping]) -> list[str]:
    """Cheapest first at this layer's token count (a fixed order would try WA-RS before ASC at 1k tokens)."""
    cands = list(candidates)
    return sorted(cands, key=lambda m: (method_flops(m, shape, params), cands.index(m)))


def collapsed_steps(methods: Sequence[Sequence[str]], names: Sequence[str], cfg: bool) -> list[bool]:
    """Steps the engine can run on one CFG half: every cross-attention layer collapses CFG (T-GATE's CFG drop)."""
    cross = [row for row, n in zip(methods, names) if kind_of(n) == "attn2"]
    steps = len(methods[0]) if methods else 0
    return [cfg and bool(cross) and all(REGISTRY[row[t]].collapses_cfg for row in cross) for t in range(steps)]


def plan_flops(methods: Sequence[Sequence[str]], shapes: Sequence[LayerShape], params: Mapping[str, Mapping],
               names: Sequence[str] = (), cfg: bool = False, executed: Sequence[Sequence[bool]] | None = None) -> dict:
    """Attention FLOPs of the plan vs all-full. With `names` and `cfg`, steps that collapse CFG (all cross-attention
    gated) count self-attention at half the batch (the engine skips the collapse when a cache's halves differ).
    `executed` ([layer][step], from `plan.attention_executed` or `cells.executed_share`): cells of skipped blocks
    cost nothing; a share counts that part of the batch (a block computed on one CFG half: 1/2)."""
    kept = kept_slots(methods, params, executed, LAYER)
    collapsed = collapsed_steps(methods, names, cfg) if names else [False] * (len(methods[0]) if methods else 0)
    full_total = plan_total = 0.0
    for i, (row, shape) in enumerate(zip(methods, shapes)):
        f = method_flops(FULL, shape, params)
        full_total += f * len(row)
        for t, m in enumerate(row):
            if executed is not None and not executed[i][t]:
                continue
            extra = sum(write_flops(s, m, shape, params) for s, keep in kept.items() if keep[i][t])
            cost = (method_flops(m, shape, params) + extra) * (1.0 if executed is None else float(executed[i][t]))
            plan_total += cost / 2 if collapsed[t] else cost
    return {
        "full_gflops": full_total / 1e9,
        "plan_gflops": plan_total / 1e9,
        "fraction": plan_total / full_total if full_total else 1.0,
    }


def cache_elements(plan, shapes: Sequence[LayerShape]) -> int | None:
    """Elements the engine holds across steps for `plan` at the batch of `shapes` (one LayerShape per attention
    layer, as the engine records them): every slot its cells keep for a later reader or hold for themselves, each
    the size its `Slot.elements` gives at a full-batch step (e.g. an attention layer's last output (B, N, C), the
    window residual (B, H, N, D), T-GATE's CFG mean (B/2, N, C), ToMe's block input (B, N, C); a block's last one or
    two residuals (B, N, C) at its attention layer's shape, as many as its readers' `points`). None when a slot's
    size is not known from the shapes (a UNet unit's whole output). Joint (MMDiT) layers: N counts image and text
    tokens. CFG-collapsed steps write half-batch tensors, so this is an upper bound there."""
    if len(shapes) != len(plan.model.layers) or any(s is None for s in shapes):
        return None
    table = slots()
    names, blocks = plan.model.layers, plan.model.blocks
    executed = executed_cells(names, blocks, plan.blocks, plan.steps)
    total = 0
    for slot, keep in kept_slots(plan.methods, plan.techniques, executed, LAYER).items():
        for i, s in enumerate(shapes):
            if any(keep[i]):
                total += table[slot].elements(s, plan.cfg_enabled)
    for i, (row, s) in enumerate(zip(plan.methods, shapes)):
        held = {h for m, r in zip(row, executed[i]) if r for h in REGISTRY[m].holds}
        total += sum(table[h].elements(s, plan.cfg_enabled) for h in sorted(held))
    by_name = dict(zip(names, shapes))
    ran_blocks = block_executed(blocks, plan.blocks, plan.steps) if plan.blocks else []
    kept = kept_slots(plan.blocks, plan.techniques, ran_blocks, BLOCK)
    for j, row in enumerate(plan.blocks):
        s = by_name.get(f"{blocks[j]}.attn1")  # a joint (MMDiT) block: its one layer, whose tokens are both streams'
        if s is None:  # (the block's residual joins them too: engine._join_streams)
            s = next((by_name[n] for n in names if n.rsplit(".", 1)[0] == blocks[j]), None)
        for slot, keep in kept.items():
            if not any(keep[j]):
                continue
            size = table[slot].elements(s, plan.cfg_enabled) if s is not None else None
            if size is None:
                return None
            points = max([REGISTRY[m].points for m in row if slot in REGISTRY[m].reads] or [1])  # as the engine's
            total += min(points, sum(keep[j])) * size
    return total
