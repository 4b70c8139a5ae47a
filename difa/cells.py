"""The rules every plan cell obeys, shared by plan validation (difa.plan.validate), the plan builders
(difa.planning: fixed_plan, retime_plan) and the engine, all read off the technique descriptions
(difa.techniques.protocol), so none of them names a method:

- a cell is **moot** where a block around it skips (its technique declares `skips_block`): it never runs;
- a cell that **reads** a slot needs an earlier running cell of its row that **writes** it (`cell_problem`);
- a cell that writes a slot **keeps** it only where a later reader needs it: the last `points` writing steps
  before each reader (`keeps`), e.g. the window residual at the `full` step before a `wars` one, a block's last two
  residuals before a first-order `forecast`.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from difa.adapters import NO_CFG
from difa.techniques import REGISTRY, slots, unfit
from difa.techniques.protocol import FITTED, FULL


def writers(slot: str, params: Mapping[str, Mapping[str, Any]]) -> frozenset[str]:
    """Methods that compute `slot` under the plan's technique parameters (e.g. the window residual: `full`, and
    `asc` under DiTFastAttn's rule)."""
    # (a fitted technique's per-cell parameters, FITTED, never change what a method writes: left out of the key)
    shown = {k: {f: v for f, v in dict(t or {}).items() if f != FITTED} for k, t in params.items()}
    key = (slot, json.dumps(shown, sort_keys=True, default=str), tuple(map(id, REGISTRY.values())))
    if key not in _WRITERS:  # (the searches ask this in their inner loops)
        declared = slots()[slot].writers if slot in slots() else ()
        _WRITERS[key] = frozenset(n for n, t in REGISTRY.items() if slot in t.writes_for(params) or n in declared)
    return _WRITERS[key]


def writes(method: str, params: Mapping[str, Mapping[str, Any]]) -> frozenset[str]:
    """The slots `method` computes under the plan's technique parameters."""
    return frozenset(s for s in slots() if method in writers(s, params))


_WRITERS: dict[tuple, frozenset[str]] = {}  # a memo, keyed by the registry's techniques too


def keeps(row: Sequence[str], slot: str, params: Mapping[str, Mapping[str, Any]],
          ran: Sequence[bool] | None = None) -> list[bool]:
    """[step]: this cell computes `slot` and a later cell of the row reads it, so it must cache it: for each reader,
    the last `points` writing steps before it (caching costs time and memory: only what is read is kept). `ran`:
    the row's cells that run; a moot cell neither reads nor writes."""
    made = writers(slot, params)
    keep = [False] * len(row)
    for s, m in enumerate(row):
        t = REGISTRY[m]
        if slot not in t.reads or (ran is not None and not ran[s]):
            continue
        makers = [u for u in range(s) if row[u] in made and (ran is None or ran[u])]
        for u in makers[-t.points:]:
            keep[u] = True
    return keep


def kept_slots(rows: Sequence[Sequence[str]], params: Mapping[str, Mapping[str, Any]],
               executed: Sequence[Sequence[bool]] | None, level: str) -> dict[str, list[list[bool]]]:
    """slot -> [row][step] keep table, for every slot of `level` that some cell of `rows` reads."""
    read = {s for row in rows for m in row for s in REGISTRY[m].reads}
    return {name: [keeps(row, name, params, None if executed is None else executed[i]) for i, row in enumerate(rows)]
            for name, slot in slots().items() if slot.level == level and name in read}


def cell_problem(method: str, step: int, *, runs: bool, earlier: Sequence[str], params: Mapping[str, Mapping],
                 layer: str | None = None, adapter: Any = None, cfg_enabled: bool | None = None) -> str | None:
    """Why a known `method` cannot run at this cell as written, as the end of a sentence "... is {method!r}, ...";
    None when it can. `earlier`: the methods of the row's earlier cells that run. `layer`: an attention layer's
    name (its kind, axis and family are checked); None for a block cell. `cfg_enabled` None: not checked."""
    t = REGISTRY[method]
    if not runs:
        if method == FULL:
            return None
        where = "its block" if layer is not None else "a block around it"
        return f"but {where} is skipped at that step, so it never runs (moot); write {FULL!r} there"
    if step == 0 and t.reads and layer is not None:
        return "which reuses an earlier step; nothing is cached at step 0"
    if layer is not None:
        why = unfit(method, layer, adapter)
        if why is not None:
            return f"which cannot run there: {why}; use {FULL!r} there"
    for slot in t.reads:
        made = writers(slot, params)
        if not made & set(earlier):
            doc = slots()[slot].doc or slot
            return (f"which reads {doc} ({slot}) from an earlier step, but no earlier step computes it (a "
                    f"{' or '.join(sorted(map(repr, made)))} cell would); use {FULL!r} there")
    if layer is None and t.half_batch and adapter is not None and adapter.temporal is not None:
        return (f"which runs a block on one CFG half of its batch, but {adapter.family}'s blocks fold frames or "
                f"positions into the batch; use {FULL!r} there")
    if layer is None and t.shares_cfg and adapter is not None and adapter.cfg_layout == NO_CFG:
        return (f"which needs a CFG batch, but {adapter.family} is guidance-distilled (its pipeline never runs one); "
                f"use {FULL!r} there")
    if cfg_enabled is False and t.shares_cfg:
        what = "shares attention across the CFG halves (CFG sharing)" if layer is not None else "needs a CFG batch"
        return f"which {what} but the plan has CFG off; use guidance_scale > 1 or drop {method!r}"
    return None


def executed_cells(layers: Sequence[str], block_names: Sequence[str], block_rows: Sequence[Sequence[str]],
                   steps: int) -> list[list[bool]]:
    """[layer][step]: the attention layer runs, i.e. no block containing it (its transformer block, or a UNet
    DeepCache unit around it) skips at that step."""
    return _not_skipped(layers, block_names, block_rows, steps)


def executed_share(layers: Sequence[str], block_names: Sequence[str], block_rows: Sequence[Sequence[str]],
                   steps: int) -> list[list[float]]:
    """[layer][step]: the share of the batch the attention layer runs on: 0 where a block around it skips, 1/2 where
    one runs on one CFG half (`half_batch`), else 1 (for the FLOPs count)."""
    ran = executed_cells(layers, block_names, block_rows, steps)
    out = []
    for name, row in zip(layers, ran):
        around = [j for j, b in enumerate(block_names) if name.startswith(b + ".")] if block_rows else []
        out.append([0.0 if not row[t] else 0.5 if any(REGISTRY[block_rows[j][t]].half_batch for j in around) else 1.0
                    for t in range(steps)])
    return out


def block_executed(block_names: Sequence[str], block_rows: Sequence[Sequence[str]], steps: int) -> list[list[bool]]:
    """[block][step]: the block's own cell runs, i.e. no block containing it skips at that step (nested UNet units:
    a resnet inside a skipped down block never runs; its cell is moot)."""
    return _not_skipped(block_names, block_names, block_rows, steps)


def _not_skipped(names: Sequence[str], block_names: Sequence[str], block_rows: Sequence[Sequence[str]],
                 steps: int) -> list[list[bool]]:
    out = []
    for name in names:
        around = [j for j, b in enumerate(block_names) if name.startswith(b + ".")] if block_rows else []
        out.append([not any(REGISTRY[block_rows[j][t]].skips_block for j in around) for t in range(steps)])
    return out
