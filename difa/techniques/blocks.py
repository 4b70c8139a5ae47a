"""What every block technique receives: the per-block state and the `BlockCell` handed over by the engine.

A block technique file has the attention techniques' shape plus three facts: SKIPS_ATTENTION (the block's
attention layers do not run at such a step, so their plan cells are moot), NEEDS (what an earlier step of the
block must have computed: "residual", "ff" or "output"), COMPUTES (what this method computes and may cache), and
`run(cell, x, compute)` returning the block's output; `compute()` runs the block as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class BlockState:
    """Per-block caches for one generation; the engine calls reset() when a generation starts."""

    residuals: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # last `points` (step, out - in), (B, N, C)
    ff: torch.Tensor | None = None  # (B, N, C) the feed-forward module's output at its last computed step
    output: Any = None  # the block's whole output at its last computed step, as returned (a tensor or a tuple)
    points: int = 2  # residuals its readers need at most (`reuse` 1, a first-order `forecast` 2)

    def reset(self) -> None:
        self.residuals = []
        self.ff = None
        self.output = None

    def push(self, step: int, residual: torch.Tensor) -> None:
        self.residuals = [*self.residuals, (step, residual)][-self.points:]  # older ones are never read


@dataclass
class BlockCell:
    """One (block, step) call."""

    name: str
    block: int
    step: int
    state: BlockState
    keep_residual: bool  # a later cell of this block reuses or forecasts the residual: cache it now
    keep_ff: bool  # a later cell reuses the feed-forward output: cache it now (done by the engine's ff wrapper)
    keep_output: bool = False  # a later cell returns the whole output (`deepcache`): cache it now


def computed(cell: BlockCell, x: torch.Tensor, compute: Callable[[], Any]) -> Any:
    """Run the block; cache its residual contribution (output - input) or its output when a later step reads it."""
    out = compute()  # (B, N, C) for a transformer block; a UNet unit may return a tuple
    if cell.keep_residual:
        cell.state.push(cell.step, out - x)
    if cell.keep_output:
        cell.state.output = out
    return out


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in a module output (a tensor, or nested tuples / lists of them): its batch is the output's."""
    if torch.is_tensor(obj) or obj is None:
        return obj
    if isinstance(obj, (tuple, list)):
        return next((t for t in map(first_tensor, obj) if t is not None), None)
    return None
