"""`deepcache`: a UNet unit (resnet, attention, sampler, down / mid / up block) returns its whole output from the
last step it ran, without running (DeepCache, arXiv 2312.00858, as its `DeepCacheSDHelper` does it on a stock
diffusers UNet). Free; the unit's attention cells are moot at that step.

Its published schedule (`schedule`, preset `deepcache`): every `cache_interval`-th step (counted from the first)
is computed in full; at the steps between, the units of the deep branch return their cached outputs and only the
shallow branch runs. `cache_branch_id` b picks the cut: block b // 3, layer b % 3. With the defaults (interval 3,
branch 0) that is the mid block, every down block (down block 0 as a whole included, since its layer 0 >= 0) and
every up block but the last, where only the last resnet / attention layer (layer 0 counted from the output)
runs, on cached features.

Trap: a cached output keeps the batch it was made at; a step that changes the batch (T-GATE's one-half after the
gate) must be computed, as tgate's DeepCache pipeline does by restarting DeepCache at gate_step - 1 and gate_step.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from difa.errors import DifaError
from difa.techniques.blocks import OUTPUT, OUTPUT_SLOT, BlockCell, first_tensor
from difa.techniques.protocol import BLOCK, Technique, skipped_block

NAME = "deepcache"


def run(cell: BlockCell, x: torch.Tensor, compute: Callable[[], Any]) -> Any:
    out = cell.state.get(OUTPUT)
    if out is None:
        raise DifaError(f"{cell.name} step {cell.step}: {NAME!r} has no earlier output; an earlier step must run the unit")
    cached = first_tensor(out)
    if cached is not None and cached.shape[0] != x.shape[0]:
        raise DifaError(f"{cell.name} step {cell.step}: the cached output has batch {cached.shape[0]} but the input has "
                        f"{x.shape[0]}; compute the step where the batch changes (e.g. T-GATE's gate step)")
    return out


# -- DeepCache's schedule (DeepCacheSDHelper.is_skip_step, DeepCache 0.1.1) ------------------------------------

def branch(cache_branch_id: int) -> tuple[int, int]:
    """(block, layer) of the cut: DeepCache's cache_block_id = id // 3, cache_layer_id = id % 3."""
    return cache_branch_id // 3, cache_branch_id % 3


def deep(coord: tuple[str, int, int], cache_branch_id: int) -> bool:
    """The unit at (part, block, layer) is in the deep branch: cached at a non-fresh step."""
    part, b, layer = coord
    cb, cl = branch(cache_branch_id)
    if part == "mid" or b > cb:
        return True
    if b < cb:
        return False
    return layer >= cl if part == "down" else layer > cl


def schedule(coords: Sequence[tuple[str, int, int]], steps: int, cache_interval: int, cache_branch_id: int,
             fresh: Callable[[int], bool] | None = None) -> list[list[str]]:
    """[unit][step] cells: `full` at fresh steps (default: every cache_interval-th from step 0) and for the shallow
    units, `deepcache` for the deep ones between (cells inside a cached unit are made moot by the plan)."""
    fresh = fresh or (lambda t: t % cache_interval == 0)
    return [["full" if fresh(t) or not deep(c, cache_branch_id) else NAME for t in range(steps)] for c in coords]


# candidate=False: a fixed schedule (preset); the trajectory search plans transformer blocks only
TECHNIQUE = Technique(NAME, "D", "#393b79", (BLOCK,), run=run, reads=(OUTPUT,), skips_block=True,
                      block_cost=skipped_block, slots=(OUTPUT_SLOT,), doc="a UNet unit returns its cached output")
