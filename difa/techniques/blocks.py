"""What every block technique receives: the per-block state and the `BlockCell` handed over by the engine, and the
block-level slots the engine knows how to fill.

A block technique declares a `protocol.Technique` with kinds (BLOCK,) and `run(cell, x, compute)` returning the
block's output; `compute()` runs the block as it is. A technique that skips the block and stands in for its
residual contribution declares `estimate(points, step, config)` (the search scores it on the recorded
trajectory) and runs `stand_in` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from difa.errors import DifaError
from difa.techniques.protocol import BLOCK, Slot

RESIDUAL = "residual"
OUTPUT = "output"
FF = "ff"


def _tokens(s: Any, cfg: bool) -> int:
    return s.batch * s.n_q * s.dim  # (B, N, C) at the block's attention layer's shape


# (B, N, C) output - input at the block's last computed steps, as a list of (step, residual) points
RESIDUAL_SLOT = Slot(RESIDUAL, BLOCK, "residual", _tokens, doc="the block's residual contribution (output - input)")
# the block's whole output at its last computed step, as returned (a tensor or a tuple): shapes unknown
OUTPUT_SLOT = Slot(OUTPUT, BLOCK, "output", lambda s, cfg: None, fit_batch=False, doc="the block's whole output")
# (B, N, C) the block's feed-forward module output at its last computed step (before the adaLN gate)
FF_SLOT = Slot(FF, BLOCK, "submodule:ff", _tokens, doc="the block's feed-forward output")


@dataclass
class BlockState:
    """Per-block caches for one generation, slot -> value (RESIDUAL: a list of (step, tensor) points); the engine
    calls reset() when a generation starts."""

    slots: dict[str, Any] = field(default_factory=dict)
    points: int = 2  # residual points its readers need at most (`reuse` 1, a first-order `forecast` 2)

    def get(self, slot: str) -> Any:
        return self.slots.get(slot)

    def reset(self) -> None:
        self.slots = {}

    def snapshot(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, list) else v for k, v in self.slots.items()}

    def restore(self, snap: dict[str, Any]) -> None:
        self.slots = {k: list(v) if isinstance(v, list) else v for k, v in snap.items()}

    def push(self, step: int, residual: torch.Tensor) -> None:
        points = self.slots.get(RESIDUAL, [])
        self.slots[RESIDUAL] = [*points, (step, residual)][-self.points:]  # older ones are never read


@dataclass
class BlockCell:
    """One (block, step) call."""

    name: str
    block: int
    step: int
    state: BlockState
    keep: frozenset = frozenset()  # slots this cell computes that a later cell of the block reads: cache them now
    config: Any = None  # the running technique's Config, from the plan's technique table
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # the plan's whole technique table
    # a `half_batch` technique's cell in a CFG batch: (computed rows, other rows) of the batch, and the block run
    # on the computed (conditional) rows of every batched argument, returning (B/2, N, C); None otherwise
    half: tuple[slice, slice] | None = None
    compute_half: Callable[[], Any] | None = None


def computed(cell: BlockCell, x: torch.Tensor, compute: Callable[[], Any]) -> Any:
    """Run the block; cache its residual contribution (output - input) or its output when a later step reads it."""
    out = compute()  # (B, N, C) for a transformer block; a UNet unit may return a tuple
    if RESIDUAL in cell.keep:
        cell.state.push(cell.step, out - x)
    if OUTPUT in cell.keep:
        cell.state.slots[OUTPUT] = out
    return out


def residual_points(cell: BlockCell, x: torch.Tensor, method: str) -> list[tuple[int, torch.Tensor]]:
    """The block's cached (step, residual) points, checked against the input's shape."""
    res = cell.state.get(RESIDUAL)
    if not res:
        raise DifaError(f"{cell.name} step {cell.step}: {method!r} has no earlier residual; an earlier step must "
                        "compute the block")
    if res[-1][1].shape != x.shape:
        raise DifaError(f"{cell.name} step {cell.step}: the cached residual has shape {tuple(res[-1][1].shape)} but the "
                        f"input has {tuple(x.shape)}; keep the batch and size fixed within a generation")
    return res


def stand_in(cell: BlockCell, x: torch.Tensor, estimate: Callable, points: int, method: str) -> torch.Tensor:
    """A skipped block: its input plus the estimated residual contribution from the cached points."""
    return x + estimate(residual_points(cell, x, method)[-points:], cell.step, cell.config)  # (B, N, C)


def stand_in_run(estimate: Callable, points: int, method: str) -> Callable:
    """The `run` of a technique that skips the block for `estimate` of its residual from the last `points`."""
    return lambda cell, x, compute: stand_in(cell, x, estimate, points, method)  # (B, N, C)


def half_stand_in(cell: BlockCell, x: torch.Tensor, compute: Callable, estimate: Callable, points: int,
                  method: str) -> torch.Tensor:
    """The block computed on one CFG half, the other half stood in for by `estimate` from the last `points` computed
    residuals (split into the halves) and this step's computed half. Without a CFG batch (CFG off, or collapsed to
    one half) the block runs whole."""
    if cell.half is None or cell.compute_half is None:
        return compute()
    h, o = cell.half
    pts = [(u, (r[h], r[o])) for u, r in residual_points(cell, x, method)[-points:]]
    done = cell.compute_half()  # (B/2, N, C) the block's output on the computed rows
    other = estimate([*pts, (cell.step, (done - x[h], None))], cell.step, cell.config)  # (B/2, N, C) residual
    out = torch.empty_like(x)  # (B, N, C)
    out[h] = done
    torch.add(x[o], other, out=out[o])
    return out


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in a module output (a tensor, or nested tuples / lists of them): its batch is the output's."""
    if torch.is_tensor(obj) or obj is None:
        return obj
    if isinstance(obj, (tuple, list)):
        return next((t for t in map(first_tensor, obj) if t is not None), None)
    return None
