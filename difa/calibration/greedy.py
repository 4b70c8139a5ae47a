"""Greedy per-step, per-layer search (DiTFastAttn §3.4, with the post-paper threshold δ·(i+1)/L).

Runs inside the real sampler loop: the engine calls `on_step(context, trial)` at the start of every denoiser
forward (context: the step, its CFG half and the layers' shapes; never the engine itself); the search
proposes columns of methods and reads the outputs of trial forwards of that same call, then returns the decided
column, which the engine runs; so the trajectory is the compressed one and errors accumulate as they will at
inference. The search writes only its own table (`methods`), never the engine's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import torch

from difa.adapters import JOINT
from difa.apply import plan_blocks, plan_layers
from difa.calibration.latency import Capture
from difa.calibration.loss import relative_l1
from difa.cost import plan_flops
from difa.calibration.timing import latency_curve, latency_record, sampled_channels
from difa.engine import Engine
from difa.errors import DifaError
from difa.plan import Plan
from difa.planning import denoiser_calls, model_identity, technique_params
from difa.cost import order_candidates
from difa.techniques import REGISTRY, candidate_kinds, kind_of, slots, unfit
from difa.techniques.protocol import FULL


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

    def guided(self, ctx, out: torch.Tensor) -> torch.Tensor:
        """The denoiser output (B, C, ...) as the sampler reads it: epsilon channels, CFG halves combined."""
        out = out[:, : self.channels] if self.channels else out
        if self.guidance is None or ctx.cond is None:
            return out
        b = out.shape[0]
        cond = out[ctx.cond]  # (B/2, ...)
        uncond = out[b // 2 :] if ctx.cond.start == 0 else out[: b // 2]
        g = self.guidance(cond.shape)
        g = g.to(cond) if torch.is_tensor(g) else g  # the pipeline casts its ramp to the latents' dtype
        return uncond + g * (cond - uncond)

    def layer_threshold(self, i: int) -> float:
        return self.threshold * (i + 1) / len(self.methods)

    def on_step(self, ctx, trial: Callable[[list[str]], torch.Tensor]) -> list[str] | None:
        t = ctx.step
        if t == 0:  # nothing is cached yet: step 0 is always full
            return None
        if t in self.resume:  # decided before the kill: the same methods, no trials
            column, records = self.resume[t]
            self.decisions.extend(records)
        else:
            column, records = self.decide(ctx, trial, t)
            if self.on_decided is not None:
                self.on_decided(t, column, records)
        for row, m in zip(self.methods, column):
            row[t] = m
        if self.progress is not None:
            self.progress(t)
        return list(column)

    def decide(self, ctx, trial: Callable[[list[str]], torch.Tensor], t: int) -> tuple[list[str], list[dict]]:
        """Layer by layer, the first candidate (cheapest first) under the layer's threshold, given the decisions of
        the layers before it at this step (later layers full while trying)."""
        first = len(self.decisions)
        column = [FULL] * len(self.methods)
        reference = self.guided(ctx, trial(column))
        for i in range(len(self.methods)):
            thr = self.layer_threshold(i)
            allowed = [c for c in self.candidates if not self.allowed or c in self.allowed[i]]
            order = order_candidates(allowed, ctx.shapes[i], self.params)
            tried: dict[str, float] = {}
            for m in order:
                if REGISTRY[m].shares_cfg and ctx.cond is None:
                    continue
                column[i] = m
                tried[m] = self.loss(self.guided(ctx, trial(column)), reference)
                if tried[m] < thr:
                    break
            else:
                column[i] = FULL
            self.decisions.append({"step": t, "layer": i, "threshold": thr, "tried": tried, "chosen": column[i]})
        return column, self.decisions[first:]


def calibrate_greedy(pipe: Any, inputs: Sequence, *, threshold: float, steps: int, guidance_scale: float, seed: int,
                     candidates: Sequence[str], cands: list[str], window, call_kwargs, name: str, progress: Any,
                     techniques, loss_on: str, dtype: str, latency_cache, latency_batch: int | None,
                     checkpoint: Any) -> Plan:
    """DiTFastAttn's greedy over attention cells, run inside the pipeline's own sampler loop (see GreedySearch).
    `candidates`: as the user gave them (recorded when skipped); `cands`: checked."""
    cands = [c for c in cands if not REGISTRY[c].is_block]  # the greedy plans attention cells only
    adapter, model, layers = plan_layers(pipe)
    cfg_on = adapter.runs_cfg(guidance_scale)
    if guidance_scale <= 1:
        cands = [c for c in cands if not REGISTRY[c].shares_cfg]

    if not layers:
        raise DifaError(f"found no attention layers in {type(model).__name__}")
    allowed = [[c for c in cands if kind_of(n, adapter) in candidate_kinds(c) and not unfit(c, n, adapter)] for n, _ in layers]
    skipped = {c: _why_skipped(c, layers, adapter, model) for c in cands if not any(c in a for a in allowed)}
    if guidance_scale <= 1:
        skipped.update({c: "CFG is off" for c in dict.fromkeys(candidates) if c != FULL and REGISTRY[c].shares_cfg})
    cands = [c for c in cands if c not in skipped]
    params = technique_params(window, techniques)
    for m in [*cands, *params]:  # one-line errors for bad technique parameters, up front
        if m in REGISTRY and REGISTRY[m].check_config is not None:
            REGISTRY[m].check_config(params)
    calls = denoiser_calls(pipe.scheduler, steps)
    methods = [[FULL] * calls for _ in layers]
    guided = cfg_on and loss_on == "guided"
    resume, on_decided = {}, None
    if checkpoint is not None:  # the settings that decide the search's choices
        resume = checkpoint.start({"model": model_identity(model, layers, name, adapter.family).__dict__,
                                   "inputs": list(inputs), "steps": steps, "guidance": guidance_scale, "seed": seed,
                                   "threshold": threshold, "candidates": cands, "params": params,
                                   "loss_on": loss_on, "dtype": dtype, "torch": torch.__version__})
        on_decided = checkpoint.save
    # what the sampler's guidance multiplies by: the scale, or SVD's per-frame ramp (Adapter.guidance)
    guidance = partial(adapter.guidance, float(guidance_scale), call_kwargs=call_kwargs) if guided else None
    greedy = GreedySearch(methods, cands, float(threshold), params, allowed=allowed, progress=progress,
                          guidance=guidance, channels=sampled_channels(model), resume=resume, on_decided=on_decided)
    block_input = {n for n, s in slots().items() if s.source == "block_input"}  # the block input (ToMe's metric)
    metric = [i for i, a in enumerate(allowed) if any(block_input & set(REGISTRY[c].holds) and c in cands for c in a)]
    engine = Engine(model, adapter, layers, [list(r) for r in methods], params, scheduler=pipe.scheduler,
                    calibrating=True, on_step=greedy.on_step, inference_steps=steps, metric_layers=metric)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    blocks = plan_blocks(pipe)
    capture = Capture(model, adapter, blocks, layers)
    t0 = time.perf_counter()
    try:
        with engine:
            adapter.call_pipeline(pipe, inputs, steps=steps, guidance_scale=guidance_scale, generator=generator,
                                  output_type=adapter.calib_output_type, extra=call_kwargs)
    finally:
        capture.close()
    wall = time.perf_counter() - t0
    latency, curve = latency_curve(pipe, adapter, model, blocks, layers, capture, params, cands, None, len(inputs), latency_batch,
                       dtype, latency_cache)
    shapes = [engine.shapes[i] for i in range(len(layers))]
    flops = plan_flops(methods, shapes, params, [n for n, _ in layers], cfg_on)
    flops["shapes"] = [s.to_dict() for s in shapes]
    return Plan(
        model=model_identity(model, layers, name, adapter.family),
        scheduler=type(pipe.scheduler).__name__,
        steps=calls,
        num_inference_steps=steps,
        methods=tuple(tuple(r) for r in methods),
        cfg_enabled=cfg_on,
        cfg_layout=adapter.cfg_layout,
        guidance_scale=float(guidance_scale),
        techniques=params,
        calibration={
            "threshold": float(threshold),
            "inputs": list(inputs),
            "seed": seed,
            "candidates": cands,
            "skipped_candidates": skipped,
            "loss": "relative_l1 of the guided epsilon" if guided else "relative_l1 of epsilon",
            "loss_on": loss_on,
            "search": "greedy",
            "wall_time_s": round(wall, 3),
            "forwards": engine.forwards + latency.forwards,
            "decisions": greedy.decisions,
            "resumed_steps": len(resume),
        },
        flops=flops,
        latency=latency_record(latency, [n for n, _ in layers], methods, (), calls, latency_batch or len(inputs),
                               cfg_on, curve=curve),
    )




def _why_skipped(method: str, layers, adapter, model) -> str:
    """Why calibration proposes `method` nowhere on this model (the reason recorded in the plan)."""
    kinds = candidate_kinds(method)
    fitting = [n for n, _ in layers if kind_of(n, adapter) in kinds]
    if not fitting:
        joint = [n for n, _ in layers if kind_of(n, adapter) == JOINT]  # MMDiT: say why not on joint attention
        return (joint and unfit(method, joint[0], adapter)) or f"no {'/'.join(kinds)} layers in {type(model).__name__}"  # e.g. T-GATE on class-conditional DiT
    return unfit(method, fitting[0], adapter) or f"applies to no layer of {type(model).__name__}"


