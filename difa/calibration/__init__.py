"""Calibration: runs the stock pipeline once with the greedy search attached and returns a Plan. Nothing else."""

from __future__ import annotations

import copy
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from difa.attention import window_tokens
from difa.calibration.cost import plan_flops
from difa.calibration.greedy import GreedySearch
from difa.engine import Engine, plan_layers
from difa.errors import DifaError
from difa.plan import AGENT, CFG_METHODS, FULL, RESIDUAL_METHODS, TOME, ModelIdentity, Plan, config_hash
from difa.techniques import REGISTRY, agent, kind_of, tome, wars

DITFASTATTN_CANDIDATES = ("ast", "wars", "asc", "wars+asc")
# Ties in the cost model keep this order: `tgate` before `ast` on cross-attention, because gating every
# cross-attention layer of a step also lets the engine drop one CFG half (which per-layer FLOPs do not show).
DEFAULT_CANDIDATES = ("tgate",) + DITFASTATTN_CANDIDATES + ("tome", "agent")


def check_candidates(candidates: Sequence[str]) -> list[str]:
    bad = [c for c in candidates if c not in REGISTRY]
    if bad:
        raise DifaError(f"unknown candidate method(s) {', '.join(map(repr, bad))}; choose from {', '.join(sorted(REGISTRY))}")
    return [c for c in dict.fromkeys(candidates) if c != FULL]


def denoiser_calls(scheduler: Any, steps: int) -> int:
    """Denoiser forwards per generation: num_inference_steps, +1 for PNDM's warm-up, x2 for Heun-type solvers."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(steps)
    return len(probe.timesteps)


def model_identity(model: Any, layers: Sequence[tuple[str, Any]], name: str, family: str) -> ModelIdentity:
    return ModelIdentity(type(model).__name__, config_hash(model.config), tuple(n for n, _ in layers), name, family)


def fixed_plan(
    pipe: Any,
    method: Callable[[int, int], str],
    *,
    steps: int,
    guidance_scale: float,
    window: float | int = wars.DEFAULT_WINDOW,
    name: str = "",
    techniques: Mapping[str, Mapping[str, Any]] | None = None,
    kinds: Sequence[str] = ("attn1", "attn2"),
) -> Plan:
    """A plan without calibration: `method(layer, step)` picks each cell of the layers of `kinds`.

    Cells stay `full` where the method does not apply to the layer's kind (e.g. `asc` on cross-attention) and
    at step 0 for methods that reuse an earlier step. `techniques` adds parameters (e.g. {"tome": {"ratio": 0.5}}).
    """
    adapter, model, layers = plan_layers(pipe)
    calls = denoiser_calls(pipe.scheduler, steps)

    def row(i: int) -> tuple[str, ...]:
        kind, out = kind_of(layers[i][0]), []
        for t in range(calls):
            m = method(i, t) if kind in kinds else FULL
            if m not in REGISTRY:
                raise DifaError(f"unknown method {m!r}; choose from {', '.join(sorted(REGISTRY))}")
            no_residual = m in RESIDUAL_METHODS and FULL not in out
            out.append(FULL if kind not in REGISTRY[m].KINDS or (t == 0 and REGISTRY[m].READS_CACHE) or no_residual
                       else m)
        return tuple(out)

    methods = tuple(row(i) for i in range(len(layers)))
    params = {wars.NAME: {"window": window}, **{k: dict(v) for k, v in (techniques or {}).items()}}
    return Plan(model=model_identity(model, layers, name, adapter.family), scheduler=type(pipe.scheduler).__name__,
                steps=calls, num_inference_steps=steps, methods=methods, cfg_enabled=guidance_scale > 1,
                cfg_layout=adapter.cfg_layout, guidance_scale=float(guidance_scale), techniques=params)


LOSS_ON = ("guided", "halves")


def sampled_channels(model) -> int | None:
    """Learned-sigma denoisers output (epsilon, variance); the pipelines' samplers read only epsilon."""
    cfg = getattr(model, "config", {})
    c_in, c_out = cfg.get("in_channels"), cfg.get("out_channels")
    return int(c_in) if c_in and c_out and int(c_out) == 2 * int(c_in) else None


def calibrate_pipeline(
    pipe: Any,
    inputs: Sequence,
    *,
    threshold: float,
    steps: int,
    guidance_scale: float,
    seed: int = 0,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    window: float | int = wars.DEFAULT_WINDOW,
    call_kwargs: Mapping[str, Any] | None = None,
    name: str = "",
    progress: Any = None,
    techniques: Mapping[str, Mapping[str, Any]] | None = None,
    loss_on: str = "guided",
) -> Plan:
    """Greedy DiTFastAttn-style calibration of `pipe` on `inputs` (class ids or prompts) -> Plan.

    threshold: δ; layer i of L accepts a method whose relative-L1 error on the final model output is below
    δ·(i+1)/L. 0 gives an all-full plan; larger is faster and less faithful (DiTFastAttn's D1..D6 are
    0.025..0.15).
    loss_on: "guided" compares the noise prediction the sampler reads (CFG halves combined with the guidance
    scale); "halves" compares both CFG halves as they leave the denoiser (DiTFastAttn, for paper parity).
    """
    if loss_on not in LOSS_ON:
        raise DifaError(f"unknown loss_on {loss_on!r}; use one of {', '.join(LOSS_ON)}")
    if not isinstance(threshold, (int, float)) or threshold < 0:
        raise DifaError(f"threshold must be a number >= 0 (got {threshold!r}); try threshold=0.05")
    if not isinstance(steps, int) or steps < 1:
        raise DifaError(f"steps must be a positive integer (got {steps!r})")
    if not inputs:
        raise DifaError("calibration needs at least one prompt or class id; set n_calib >= 1")
    try:
        window_tokens(window, 1 << 20)
    except ValueError as e:
        raise DifaError(str(e)) from None
    cands = check_candidates(candidates)
    cfg_on = guidance_scale > 1
    if not cfg_on:
        cands = [c for c in cands if c not in CFG_METHODS]

    adapter, model, layers = plan_layers(pipe)
    if not layers:
        raise DifaError(f"found no attention layers in {type(model).__name__}")
    kinds = {kind_of(n) for n, _ in layers}
    skipped = {c: f"no {'/'.join(REGISTRY[c].KINDS)} layers in {type(model).__name__}"
               for c in cands if not kinds & set(REGISTRY[c].KINDS)}  # e.g. T-GATE on class-conditional DiT
    if not cfg_on:
        skipped.update({c: "CFG is off" for c in check_candidates(candidates) if c in CFG_METHODS})
    cands = [c for c in cands if c not in skipped]
    params = {wars.NAME: {"window": window}, **{k: dict(v) for k, v in (techniques or {}).items()}}
    for merging in (TOME, AGENT):
        if merging in cands or merging in params:
            tome.config(params, merging, agent.Config if merging == AGENT else tome.Config)  # one-line errors up front
    calls = denoiser_calls(pipe.scheduler, steps)
    methods = [[FULL] * calls for _ in layers]
    guided = cfg_on and loss_on == "guided"
    search = GreedySearch(methods, cands, float(threshold), params, kinds=[kind_of(n) for n, _ in layers],
                          progress=progress, guidance_scale=float(guidance_scale) if guided else None,
                          channels=sampled_channels(model))
    metric = [i for i, (n, _) in enumerate(layers) if any(REGISTRY[c].NEEDS_METRIC and kind_of(n) in REGISTRY[c].KINDS
                                                          for c in cands)]
    engine = Engine(model, adapter, layers, methods, params, scheduler=pipe.scheduler, calibrating=True,
                    on_step=search.on_step, inference_steps=steps, metric_layers=metric)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    t0 = time.perf_counter()
    with engine:
        adapter.call_pipeline(pipe, inputs, steps=steps, guidance_scale=guidance_scale, generator=generator,
                              output_type=adapter.calib_output_type, extra=call_kwargs)
    wall = time.perf_counter() - t0
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
            "wall_time_s": round(wall, 3),
            "forwards": engine.forwards,
            "decisions": search.decisions,
        },
        flops=flops,
    )
