"""Attention cells in the trajectory search: a computed block cell whose attention layers run a cheaper attention
method (window attention with residual sharing, attention shared across steps or CFG halves, token merging, agent
attention), competing with the block's skipped and CFG cells by error per predicted second.

- **Where.** Method m at block j runs on the block's layers of the kinds m is proposed on, where it fits the layer
  and the latency model timed it (`cell_layers`). It is proposed only in blocks where the latency model says it
  saves time: at 256 tokens on a CPU token merging costs more than the attention it replaces.
- **Error.** The warm all-full generation the driver runs anyway (to time what lies outside the denoiser) runs
  with every cache kept (the engine's calibrating mode), and at PROBES steps spread over the generation it reruns
  every block with its layers on each method (`Engine.rerun`), on the caches that generation holds: what a
  method reads (the window residual, the last output) comes from the step before, where the layer ran full. The
  error is sum |out_m - out| / sum |out| on the block table's sampled tokens and normalization, exact at those
  steps for a plan whose only change there is that cell, and interpolated linearly between them (`table`): the
  whole-plan checks then measure what the search built. A method that reads a cache is proposed only where the
  block was computed in full the step before (search.Table.row), the age its error was measured at; a block
  with a CFG (half) cell takes none (plan validation keeps such a block's attention full throughout).
- **Cost.** PROBES x methods reruns of every block: on the bundled DiT (4 methods) 16 model forwards, with no
  generation of its own.
- **Not here.** T-GATE (`collapses_cfg`): its gain is the whole step on one CFG half once every cross-attention
  is gated, which a per-block score cannot see. Attention shared across the CFG halves (`asc`, `wars+asc`,
  `shares_cfg`): it erases the guidance difference in the layer, an error the guidance multiplies through every
  later block and step, and the per-cell score does not see that compounding (see `Scorer.score_on`); the CFG
  cells (cfg_delta, cfg_forecast) share work across the halves and keep the difference. Both stay in presets and
  the per-layer greedy.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from difa.calibration.latency import LatencyModel
from difa.techniques import REGISTRY, kind_of, unfit
from difa.techniques.protocol import FULL


def searchable(name: str) -> bool:
    """An attention technique the trajectory search can plan as a cell (see the module's 'Not here')."""
    t = REGISTRY[name]
    return not t.is_block and not t.collapses_cfg and not t.shares_cfg


PROBES = 4  # steps probed per generation


def probe_steps(calls: int) -> set[int]:
    """PROBES steps evenly spread over 1 .. calls - 1 (step 0 takes no cell)."""
    if calls < 2:
        return set()
    return {round(1 + k * (calls - 2) / max(PROBES - 1, 1)) for k in range(PROBES)}


def cell_layers(adapter: Any, layers: Sequence[str], blocks: Sequence[str], methods: Sequence[str],
                attn_s: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, tuple[tuple[str, ...], ...]]:
    """method -> per block, the attention layers an attention cell of that method runs on: the block's layers of
    the kinds it is proposed on where it fits (and, given the latency model's attention timings, was timed)."""
    out = {}
    for m in methods:
        kinds = REGISTRY[m].proposed_on()
        out[m] = tuple(tuple(n for n in layers if n.startswith(b + ".") and kind_of(n, adapter) in kinds
                             and not unfit(m, n, adapter) and (attn_s is None or m in attn_s.get(n, {})))
                       for b in blocks)
    return out


def table(probe: Mapping[tuple[int, int, str], float], latency: LatencyModel, steps: int
          ) -> dict[tuple[int, int, str], float]:
    """(block, step, method) -> error at every step 1 .. steps - 1, from the probed steps (linear between them,
    the nearest beyond them), for the cells the latency model predicts faster than the computed block."""
    out = {}
    for j, m in sorted({(j, m) for j, _, m in probe}):
        on = latency.cell_layers.get(m)
        if not (on and on[j]) or latency.block_cost(j, m) >= latency.block_s[j]:
            continue
        seen = sorted((s, e) for (b, s, k), e in probe.items() if b == j and k == m)
        for s in range(1, steps):
            lo = max([p for p in seen if p[0] <= s], default=seen[0])
            hi = min([p for p in seen if p[0] >= s], default=seen[-1])
            w = (s - lo[0]) / (hi[0] - lo[0]) if hi[0] > lo[0] else 0.0
            out[(j, s, m)] = lo[1] + w * (hi[1] - lo[1])
    return out


class Scorer:
    """The `on_block` observer of an all-full generation that keeps the caches of the steps before `steps` (see the
    module doc): at those steps every block reruns with its cell layers `layers_of[method][j]` on each method.
    `engine` is set by the driver before the generation runs; `errors[(block, step, method)]` is what it measured."""

    def __init__(self, layers: Sequence[str], layers_of: Mapping[str, Sequence[Sequence[str]]],
                 sample: Callable[[torch.Tensor], torch.Tensor], steps: set[int],
                 guided: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.engine: Any = None
        self.guided = guided
        self.layer_index = {n: i for i, n in enumerate(layers)}
        self.layers_of, self.sample, self.steps = layers_of, sample, steps
        self.errors: dict[tuple[int, int, str], float] = {}
        self.reruns = 0
        self.failed: set[tuple[int, str]] = set()  # (block, method) that raised: never proposed

    def __call__(self, j: int, step: int, x: torch.Tensor, out: torch.Tensor) -> None:
        if step not in self.steps:
            return
        ref = self.score_on(out)
        scale = float(ref.abs().sum().clamp_min(1e-12))
        for m in self.layers_of:
            if (j, m) in self.failed or not self.layers_of[m][j]:
                continue
            cells = {self.layer_index[n]: m for n in self.layers_of[m][j]}
            try:
                guess = self.score_on(self.engine.rerun(cells))
            except Exception:  # a method that cannot run here (a mask, no token grid): not a cell of this block
                self.failed.add((j, m))
                continue
            finally:
                self.reruns += 1
            self.errors[(j, step, m)] = float((guess - ref).abs().sum()) / scale

    def score_on(self, out: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> the sampled tokens (B, n, C), or with CFG their guided combination u + g (c - u) (B/2, n, C):
        what the halves do not err alike, the sampler multiplies by g - 1. (Attention shared across the halves,
        `asc`, errs only there: scored per half it looked cheap, took every cell of the bundled DiT's budget-0.4
        plans and measured 0.59 final-output error; scored so it still measured 0.32, and it is not searched.)"""
        t = self.sample(out)
        return self.guided(t) if self.guided is not None and t.shape[0] % 2 == 0 else t

    def result(self) -> dict[tuple[int, int, str], float]:
        """The errors, less those of any (block, method) that failed at some step."""
        return {k: e for k, e in self.errors.items() if (k[0], k[2]) not in self.failed}


def split(rows: Sequence[Sequence[str]], layers: Sequence[str], latency: LatencyModel, steps: int
          ) -> tuple[list[list[str]], list[list[str]]]:
    """(block rows, attention rows (n_layers, steps)) of the search's rows, where an attention method in a block
    row means the block computed with that method on its `cell_layers`."""
    index = {n: i for i, n in enumerate(layers)}
    attention = [[FULL] * steps for _ in layers]
    blocks = []
    for j, row in enumerate(rows):
        out = []
        for s, m in enumerate(row):
            if REGISTRY[m].is_block:
                out.append(m)
                continue
            for n in latency.cell_layers[m][j]:
                attention[index[n]][s] = m
            out.append(FULL)
        blocks.append(out)
    return blocks, attention
