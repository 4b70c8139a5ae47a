"""A plan under context parallelism (diffusers' `model.enable_parallelism(config=ContextParallelConfig(...))`).

Each rank runs the denoiser on its shard of the sequence (the model's `_cp_plan` splits the inputs along the tokens
and gathers the output); only the attention kernel looks across ranks (Ulysses all-to-all, ring). A plan is static:
every rank runs the same cell at every step, so no cache decision can diverge between ranks (the known failure of
dynamic caches under sequence parallelism: xDiT PR #741, cache-dit #1094). Block cells work on shards as they are:
a skipped block's stand-in is its own rank's shard plus that shard's cached residual.

Refused, in one line (the engine checks before each generation, as parallelism can be enabled after the plan):
- attention cells: their methods compute attention themselves, within the rank's shard only (a window would miss
  the tokens of the other ranks), not through diffusers' parallel dispatch;
- a cell other than `full` on a block that carries a sharding hook of the `_cp_plan` (Wan splits its input at
  `blocks.0`, QwenImage at every `transformer_blocks.*`): a skipped block would not split or gather.
"""

from __future__ import annotations

from typing import Sequence

import torch

CP_HOOK_PREFIX = "cp_"  # diffusers.hooks.context_parallel names its hooks "cp_input---<id>" / "cp_output---<id>"


def context_parallel(model: torch.nn.Module) -> bool:
    config = getattr(model, "_parallel_config", None)
    return getattr(config, "context_parallel_config", None) is not None


def shards_here(module: torch.nn.Module) -> bool:
    """The module carries a context-parallel split or gather hook."""
    registry = getattr(module, "_diffusers_hook", None)
    return any(name.startswith(CP_HOOK_PREFIX) for name in getattr(registry, "hooks", {}))


def conflict(model: torch.nn.Module, layer_rows: Sequence[tuple[str, Sequence[str]]],
             block_rows: Sequence[tuple[str, torch.nn.Module, Sequence[str]]], full: str) -> str | None:
    """Why this plan cannot run under the model's context parallelism, or None. `layer_rows`: (layer name, its
    cells); `block_rows`: (block name, block, its cells)."""
    if not context_parallel(model):
        return None
    cells = sorted({m for _, row in layer_rows for m in row if m != full})
    if cells:
        first = next(n for n, row in layer_rows if any(m != full for m in row))
        return (f"the plan has attention cells ({', '.join(cells)}; first at {first}) and the model runs context "
                "parallel, where they would attend within each rank's shard only; use a plan with block cells only "
                "(recalibrate without attention cells) or apply it without parallelism")
    for name, block, row in block_rows:
        if any(m != full for m in row) and shards_here(block):
            return (f"block {name} splits or gathers the sequence for context parallelism (the model's _cp_plan), so "
                    f"it must run at every step, but the plan skips or changes it; recalibrate with {name} computed")
    return None
