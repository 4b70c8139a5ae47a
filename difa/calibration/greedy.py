"""Greedy per-step, per-layer search (DiTFastAttn §3.4, with the post-paper threshold δ·(i+1)/L).

Runs inside the real sampler loop: the engine calls `on_step` at the start of every denoiser forward; the search
proposes columns of methods and reads the outputs of trial forwards of that same call, then returns the decided
column, which the engine runs; so the trajectory is the compressed one and errors accumulate as they will at
inference. The search writes only its own table (`methods`), never the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from difa.calibration.cost import order_candidates
from difa.calibration.loss import relative_l1
from difa.plan import CFG_METHODS, FULL


@dataclass
class GreedySearch:
    methods: list[list[str]]  # (n_layers, steps): the search's own record of its decisions (the plan)
    candidates: Sequence[str]  # non-full methods allowed
    threshold: float  # δ
    params: Mapping[str, Mapping]
    # per layer: the candidates that apply to it (techniques.unfit: kind, token axis, CFG); () = all, everywhere
    allowed: Sequence[Sequence[str]] = ()
    loss: Callable[[torch.Tensor, torch.Tensor], float] = relative_l1
    progress: Callable[[int], None] | None = None  # called with the step index after each decided step
    # CFG batches: the loss compares what the sampler consumes, uncond + g * (cond - uncond), not the two halves.
    # Trap: T-GATE and ASC change the halves' difference, which guidance multiplies by g; on the raw output their
    # error looks g times smaller than it is. None: the raw output (DiTFastAttn's choice). Called with the output's
    # shape, it returns g: a scalar, or a tensor that broadcasts (SVD: a per-frame ramp, Adapter.guidance).
    guidance: Callable[[Sequence[int]], float | torch.Tensor] | None = None
    channels: int | None = None  # learned-sigma models: the sampler reads only the first `channels` (epsilon)
    decisions: list[dict] = field(default_factory=list)
    # Resuming a killed calibration: step -> (its column of methods, its decision records), replayed without
    # trials; `on_decided(step, column, records)` is called after each decided step (a checkpoint).
    resume: Mapping[int, tuple[list[str], list[dict]]] = field(default_factory=dict)
    on_decided: Callable[[int, list[str], list[dict]], None] | None = None

    def guided(self, engine, out: torch.Tensor) -> torch.Tensor:
        """The denoiser output (B, C, ...) as the sampler reads it: epsilon channels, CFG halves combined."""
        out = out[:, : self.channels] if self.channels else out
        if self.guidance is None or engine.cond is None:
            return out
        b = out.shape[0]
        cond = out[engine.cond]  # (B/2, ...)
        uncond = out[b // 2 :] if engine.cond.start == 0 else out[: b // 2]
        g = self.guidance(cond.shape)
        g = g.to(cond) if torch.is_tensor(g) else g  # the pipeline casts its ramp to the latents' dtype
        return uncond + g * (cond - uncond)

    def layer_threshold(self, i: int) -> float:
        return self.threshold * (i + 1) / len(self.methods)

    def on_step(self, engine, trial: Callable[[list[str]], torch.Tensor]) -> list[str] | None:
        t = engine.step
        if t == 0:  # nothing is cached yet: step 0 is always full
            return None
        if t in self.resume:  # decided before the kill: the same methods, no trials
            column, records = self.resume[t]
            self.decisions.extend(records)
        else:
            column, records = self.decide(engine, trial, t)
            if self.on_decided is not None:
                self.on_decided(t, column, records)
        for row, m in zip(self.methods, column):
            row[t] = m
        if self.progress is not None:
            self.progress(t)
        return list(column)

    def decide(self, engine, trial: Callable[[list[str]], torch.Tensor], t: int) -> tuple[list[str], list[dict]]:
        """Layer by layer, the first candidate (cheapest first) under the layer's threshold, given the decisions of
        the layers before it at this step (later layers full while trying)."""
        first = len(self.decisions)
        column = [FULL] * len(self.methods)
        reference = self.guided(engine, trial(column))
        for i in range(len(self.methods)):
            thr = self.layer_threshold(i)
            allowed = [c for c in self.candidates if not self.allowed or c in self.allowed[i]]
            order = order_candidates(allowed, engine.shapes[i], self.params)
            tried: dict[str, float] = {}
            for m in order:
                if m in CFG_METHODS and engine.cond is None:
                    continue
                column[i] = m
                tried[m] = self.loss(self.guided(engine, trial(column)), reference)
                if tried[m] < thr:
                    break
            else:
                column[i] = FULL
            self.decisions.append({"step": t, "layer": i, "threshold": thr, "tried": tried, "chosen": column[i]})
        return column, self.decisions[first:]
