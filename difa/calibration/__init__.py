"""Calibration: runs the stock pipeline with a search attached and returns a Plan. Nothing else.

Two searches: `trajectory` (the default; calibration/search.py: block cells from one recorded generation,
error per predicted second, whole-plan checks; threshold or latency-budget mode) and `greedy` (DiTFastAttn's
per-step, per-layer greedy over attention cells, kept exactly for paper parity and `preset:ditfastattn`).
Both measure the latency cost model (calibration/latency.py) and record the plan's predicted seconds."""

from __future__ import annotations

import copy
import time
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import torch

from difa.adapters import JOINT, adapter_for
from difa.attention import window_tokens
from difa.calibration import search as trajectory
from difa.calibration.cost import collapsed_steps, plan_flops
from difa.calibration.greedy import GreedySearch
from difa.calibration.latency import CACHE_DIR, Capture, LatencyModel, decode_seconds, measure, retile
from difa.engine import Engine, plan_blocks, plan_layers
from difa.errors import DifaError
from difa.plan import (AGENT, BLOCK, CFG_METHODS, FULL, RESIDUAL_METHODS, TOME, ModelIdentity, Plan, config_hash,
                       executed_cells, residual_producers)
from difa.techniques import REGISTRY, TECHNIQUES, agent, candidate_kinds, kind_of, tome, unfit, wars

DITFASTATTN_CANDIDATES = ("ast", "wars", "asc", "wars+asc")
# Every technique whose file says DEFAULT_CANDIDATE, in registry order. Ties in the greedy's cost model keep this
# order: `tgate` before `ast` on cross-attention, because gating every cross-attention layer of a step also lets
# the engine drop one CFG half (which per-layer FLOPs do not show).
DEFAULT_CANDIDATES = tuple(t.NAME for t in TECHNIQUES if t.DEFAULT_CANDIDATE)


def check_candidates(candidates: Sequence[str]) -> list[str]:
    bad = [c for c in candidates if c not in REGISTRY]
    if bad:
        raise DifaError(f"unknown candidate method(s) {', '.join(map(repr, bad))}; choose from {', '.join(sorted(REGISTRY))}")
    return [c for c in dict.fromkeys(candidates) if c != FULL]


def denoiser_calls(scheduler: Any, steps: int) -> int:
    """Denoiser forwards per generation: num_inference_steps, +1 for PNDM's warm-up, x2 for Heun-type solvers."""
    probe = copy.deepcopy(scheduler)
    if getattr(getattr(probe, "config", None), "use_dynamic_shifting", False):  # FLUX: the shift (mu) comes from the
        probe.set_timesteps(steps, mu=1.0)  # image size, and does not change the count
    else:
        probe.set_timesteps(steps)
    return len(probe.timesteps)


def model_identity(model: Any, layers: Sequence[tuple[str, Any]], name: str, family: str,
                   blocks: Sequence[tuple[str, Any]] = ()) -> ModelIdentity:
    return ModelIdentity(type(model).__name__, config_hash(model.config), tuple(n for n, _ in layers), name, family,
                         tuple(n for n, _ in blocks))


def attention_row(name: str, proposed: Sequence[str], ran: Sequence[bool], producers: frozenset[str],
                  adapter: Any = None) -> tuple[str, ...]:
    """Layer `name`'s cells as proposed, each left `full` where it cannot run as written: a method that does not apply
    to the layer (techniques.unfit: its kind, token axis, the family's CFG), a moot cell (its block skipped), a cache
    read with nothing computed before it."""
    out: list[str] = []
    for t, m in enumerate(proposed):
        if m not in REGISTRY:
            raise DifaError(f"unknown method {m!r}; choose from {', '.join(sorted(REGISTRY))}")
        done = [x for x, r in zip(out, ran) if r]
        no_residual = m in RESIDUAL_METHODS and not producers & set(done)
        no_cache = REGISTRY[m].READS_CACHE and not done
        out.append(FULL if not ran[t] or m == BLOCK or unfit(m, name, adapter) or no_cache or no_residual else m)
    return tuple(out)


def _why_skipped(method: str, layers, adapter, model) -> str:
    """Why calibration proposes `method` nowhere on this model (the reason recorded in the plan)."""
    kinds = candidate_kinds(method)
    fitting = [n for n, _ in layers if kind_of(n, adapter) in kinds]
    if not fitting:
        joint = [n for n, _ in layers if kind_of(n, adapter) == JOINT]  # MMDiT: say why not on joint attention
        return (joint and unfit(method, joint[0], adapter)) or f"no {'/'.join(kinds)} layers in {type(model).__name__}"  # e.g. T-GATE on class-conditional DiT
    return unfit(method, fitting[0], adapter) or f"applies to no layer of {type(model).__name__}"


def retime_plan(plan: Plan, pipe: Any, steps: int) -> Plan:
    """`plan` (calibrated at S = plan.inference_steps) for `steps` = S' on `pipe`'s scheduler: each cell of the new
    schedule takes the method of the cell at the nearest normalized position, t' (S_calls - 1) / (S'_calls - 1)
    (the same fraction of the denoising trajectory), then cells that cannot run as mapped (a cache read before
    anything was computed, a moot cell) are left `full`. Latency and FLOPs records are dropped (they were for S).
    The plan is not recalibrated: measure its error (experiments/README.md, step transfer) before relying on it."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DifaError(f"steps must be an integer >= 1 (got {steps!r})")
    if type(pipe.scheduler).__name__ != plan.scheduler:  # positions along another sampler's trajectory mean nothing
        raise DifaError(f"the plan was calibrated with {plan.scheduler} and the pipeline uses "
                        f"{type(pipe.scheduler).__name__}, so its steps cannot be mapped; recalibrate with this scheduler")
    calls = denoiser_calls(pipe.scheduler, int(steps))
    if calls == plan.steps:
        return plan

    def src(t: int) -> int:
        return 0 if calls == 1 else min(plan.steps - 1, round(t * (plan.steps - 1) / (calls - 1)))

    names = [(n, None) for n in plan.model.blocks]
    brows = block_rows(names, lambda j, t: plan.blocks[j][src(t)], calls) if plan.blocks else ()
    ran = executed_cells(plan.model.layers, plan.model.blocks, brows, calls)
    producers = residual_producers(plan.techniques)
    adapter = adapter_for(pipe, plan.model.family)
    methods = tuple(attention_row(name, [row[src(t)] for t in range(calls)], ran[i], producers, adapter)
                    for i, (name, row) in enumerate(zip(plan.model.layers, plan.methods)))
    calibration = {**plan.calibration, "retimed_from": {"steps": plan.inference_steps, "calls": plan.steps}}
    return plan.with_(steps=calls, num_inference_steps=int(steps), methods=methods, blocks=brows,
                      calibration=calibration, latency={}, flops={})


def block_rows(blocks: Sequence[tuple[str, Any]], method: Callable[[int, int], str], calls: int) -> tuple[tuple[str, ...], ...]:
    """Block cells from `method(block, step)`; a cell that would read a cache nothing computed yet stays `full`, and
    so does a cell of a block nested in one that skips at that step (moot; UNet DeepCache units). Outer blocks are
    decided first."""
    names = [n for n, _ in blocks]
    rows: list[tuple[str, ...] | None] = [None] * len(blocks)
    for j in sorted(range(len(blocks)), key=lambda j: names[j].count(".")):  # a block's name extends its ancestors'
        around = [a for a in range(len(blocks)) if names[j].startswith(names[a] + ".")]
        out: list[str] = []
        ran: list[bool] = []
        for t in range(calls):
            m = method(j, t)
            if m not in REGISTRY or BLOCK not in REGISTRY[m].KINDS:
                raise DifaError(f"{m!r} is not a block method; choose from "
                                f"{', '.join(sorted(k for k, v in REGISTRY.items() if BLOCK in v.KINDS))}")
            runs = not any(REGISTRY[rows[a][t]].SKIPS_ATTENTION for a in around)
            needs = getattr(REGISTRY[m], "NEEDS", None)
            done = [x for x, r in zip(out, ran) if r]
            if not runs or (needs is not None and not any(needs in getattr(REGISTRY[x], "COMPUTES", ()) for x in done)):
                m = FULL
            out.append(m)
            ran.append(runs)
        rows[j] = tuple(out)
    return tuple(rows)


def fixed_plan(
    pipe: Any,
    method: Callable[[int, int], str],
    *,
    steps: int,
    guidance_scale: float,
    window: float | int = wars.DEFAULT_WINDOW,
    name: str = "",
    techniques: Mapping[str, Mapping[str, Any]] | None = None,
    kinds: Sequence[str] = ("attn1", "attn2", "joint"),
    block: Callable[[int, int], str] | None = None,
    cache_units: bool = False,
) -> Plan:
    """A plan without calibration: `method(layer, step)` picks each cell of the layers of `kinds`, and
    `block(block, step)` (optional) each block cell: of the transformer blocks, followed by a UNet's DeepCache units
    with `cache_units`.

    Cells stay `full` where the method does not apply to the layer's kind (e.g. `asc` on cross-attention), at
    step 0 for methods that reuse an earlier step, and where the layer's block is skipped (the cell is moot).
    `techniques` adds parameters (e.g. {"tome": {"ratio": 0.5}}).
    """
    adapter, model, layers = plan_layers(pipe)
    calls = denoiser_calls(pipe.scheduler, steps)
    blocks = plan_blocks(pipe, cache_units) if block is not None else []
    brows = block_rows(blocks, block, calls) if block is not None else ()
    ran = executed_cells([n for n, _ in layers], [n for n, _ in blocks], brows, calls)
    producers = residual_producers(techniques or {})

    def proposed(i: int) -> list[str]:
        kind = kind_of(layers[i][0], adapter)
        return [method(i, t) if kind in kinds and ran[i][t] else FULL for t in range(calls)]

    joint = [n for n, _ in layers if kind_of(n, adapter) == JOINT]
    if joint and JOINT not in kinds:  # a schedule for attn1 / attn2 (tomesd, agentsd) on an MMDiT: nothing would run
        asked = sorted({method(i, t) for i in range(len(layers)) for t in range(calls)} - {FULL})
        reason = next((r for r in (unfit(m, joint[0], adapter) for m in asked) if r), None)
        if reason is not None:
            raise DifaError(f"{reason}; this schedule (for {'/'.join(kinds)} layers) does not apply to the "
                            f"{adapter.family} family")
    methods = tuple(attention_row(layers[i][0], proposed(i), ran[i], producers, adapter) for i in range(len(layers)))
    wanted = {method(i, t) for i in range(len(layers)) for t in range(calls) if kind_of(layers[i][0], adapter) in kinds} - {FULL}
    for m in sorted(wanted - {x for row in methods for x in row}):  # proposed, but it runs nowhere: say why
        reasons = [unfit(m, n, adapter) for n, _ in layers if kind_of(n, adapter) in kinds]
        reason = next((r for r in reasons if r), None)
        if reason is not None and all(reasons):
            raise DifaError(f"{reason}, on every layer of {type(model).__name__}; this schedule does not apply to "
                            f"the {adapter.family} family")
    params = technique_params(window, techniques)
    return Plan(model=model_identity(model, layers, name, adapter.family, blocks), scheduler=type(pipe.scheduler).__name__,
                steps=calls, num_inference_steps=steps, methods=methods, cfg_enabled=adapter.runs_cfg(guidance_scale),
                cfg_layout=adapter.cfg_layout, guidance_scale=float(guidance_scale), techniques=params, blocks=brows)


def technique_params(window, techniques: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The plan's technique parameters: the `wars` window, merged with whatever `techniques` gives."""
    params = {k: dict(v) for k, v in (techniques or {}).items()}
    params[wars.NAME] = {"window": window, **params.get(wars.NAME, {})}
    residual_producers(params)  # a bad residual_from is a one-line error before anything runs
    return params


LOSS_ON = ("guided", "halves")
SEARCHES = ("trajectory", "greedy")
# What the trajectory search plans: block methods that stand in for the block's residual (its error table models
# exactly those: reuse, forecast). mlp_reuse (needs "ff") and deepcache (needs "output") are for fixed plans.
BLOCK_CANDIDATES = tuple(t.NAME for t in TECHNIQUES if "block" in t.KINDS and getattr(t, "NEEDS", None) == "residual")


def check_budget(budget: Any) -> float | None:
    if budget is None:
        return None
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise DifaError(f"budget must be a fraction of the full latency in (0, 1], got {budget!r}; try budget=0.5") from None
    if not (0 < b <= 1):  # NaN fails this too
        raise DifaError(f"budget must be a fraction of the full latency in (0, 1], got {budget!r}; try budget=0.5")
    return b


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
    search: str = "trajectory",
    budget: float | None = None,
    dtype: str = "float32",
    latency_cache: Any = CACHE_DIR,  # None: measure every time
    latency_batch: int | None = None,
    max_cache_mb: float | None = None,
    checkpoint: Any = None,  # greedy: a calibration.checkpoint.Checkpoint to resume from and write to
) -> Plan:
    """Calibrate `pipe` on `inputs` (class ids or prompts) -> Plan.

    search="trajectory" (default): block cells (`reuse` / `forecast` among `candidates`) from one recorded
    generation. threshold: the fastest plan whose final-output relative L1 on the calibration inputs is <= δ;
    budget (overrides threshold): the least-error plan whose predicted latency is <= budget x full.

    search="greedy": DiTFastAttn's greedy over attention cells. threshold: δ; layer i of L accepts a method whose relative-L1 error on the final model output is below
    δ·(i+1)/L. 0 gives an all-full plan; larger is faster and less faithful (DiTFastAttn's D1..D6 are
    0.025..0.15).
    loss_on: "guided" compares the noise prediction the sampler reads (CFG halves combined with the guidance
    scale); "halves" compares both CFG halves as they leave the denoiser (DiTFastAttn, for paper parity).
    max_cache_mb (trajectory): the block residuals the plan keeps across steps, at `latency_batch` images per call
    (default: the calibration inputs), stay within this many MB (search.cache_slots).
    """
    if loss_on not in LOSS_ON:
        raise DifaError(f"unknown loss_on {loss_on!r}; use one of {', '.join(LOSS_ON)}")
    from difa.engine import ENGINE_ATTR

    if getattr(adapter_for(pipe).denoiser(pipe), ENGINE_ATTR, None) is not None:  # calibrating would remove it
        raise DifaError("the pipeline has a plan applied; calibrate the uncompressed model: remove_plan(pipe) first "
                        "(and apply_plan again afterwards)")
    if search not in SEARCHES:
        raise DifaError(f"unknown search {search!r}; use one of {', '.join(SEARCHES)}")
    budget = check_budget(budget)
    if latency_batch is not None and (isinstance(latency_batch, bool) or not isinstance(latency_batch, int) or latency_batch < 1):
        raise DifaError(f"latency_batch must be a positive integer (images per pipeline call) or null, got {latency_batch!r}")
    if max_cache_mb is not None and (isinstance(max_cache_mb, bool) or not isinstance(max_cache_mb, (int, float))
                                     or not max_cache_mb >= 0):
        raise DifaError(f"max_cache_mb must be a number of MB >= 0 (got {max_cache_mb!r}), e.g. max_cache_mb=512")
    if max_cache_mb is not None and search != "trajectory":
        raise DifaError("max_cache_mb caps the block caches of search=trajectory; the greedy plans attention cells")
    if budget is not None and search != "trajectory":
        raise DifaError("budget mode needs search=trajectory (the greedy works with a threshold only)")
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
    if search == "trajectory":
        return _calibrate_trajectory(pipe, inputs, threshold=float(threshold), budget=budget, steps=steps,
                                     guidance_scale=guidance_scale, seed=seed, candidates=cands, window=window,
                                     call_kwargs=call_kwargs, name=name, techniques=techniques, dtype=dtype,
                                     latency_cache=latency_cache, latency_batch=latency_batch,
                                     max_cache_mb=max_cache_mb)
    cands = [c for c in cands if BLOCK not in REGISTRY[c].KINDS]  # the greedy plans attention cells only
    adapter, model, layers = plan_layers(pipe)
    cfg_on = adapter.runs_cfg(guidance_scale)
    if guidance_scale <= 1:
        cands = [c for c in cands if c not in CFG_METHODS]

    if not layers:
        raise DifaError(f"found no attention layers in {type(model).__name__}")
    allowed = [[c for c in cands if kind_of(n, adapter) in candidate_kinds(c) and not unfit(c, n, adapter)] for n, _ in layers]
    skipped = {c: _why_skipped(c, layers, adapter, model) for c in cands if not any(c in a for a in allowed)}
    if guidance_scale <= 1:
        skipped.update({c: "CFG is off" for c in check_candidates(candidates) if c in CFG_METHODS})
    cands = [c for c in cands if c not in skipped]
    params = technique_params(window, techniques)
    for merging in (TOME, AGENT):
        if merging in cands or merging in params:
            tome.config(params, merging, agent.Config if merging == AGENT else tome.Config)  # one-line errors up front
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
    search = GreedySearch(methods, cands, float(threshold), params, allowed=allowed, progress=progress,
                          guidance=guidance, channels=sampled_channels(model), resume=resume, on_decided=on_decided)
    metric = [i for i, a in enumerate(allowed) if any(REGISTRY[c].NEEDS_METRIC and c in cands for c in a)]
    engine = Engine(model, adapter, layers, [list(r) for r in methods], params, scheduler=pipe.scheduler,
                    calibrating=True, on_step=search.on_step, inference_steps=steps, metric_layers=metric)
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
    latency = _latency(pipe, adapter, model, blocks, layers, capture, params, cands, None, len(inputs), latency_batch,
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
            "decisions": search.decisions,
            "resumed_steps": len(resume),
        },
        flops=flops,
        latency=_latency_record(latency, [n for n, _ in layers], methods, (), calls, latency_batch or len(inputs),
                                cfg_on),
    )


def _latency(pipe, adapter, model, blocks, layers, capture: Capture, params, cands, traj, images: int,
             latency_batch: int | None, dtype: str, cache, call_kwargs: Mapping | None = None) -> LatencyModel:
    """The measured cost model at `latency_batch` images per call. Outside the denoiser: the calibration run's own
    remainder (scaled with the batch), plus the VAE decode where calibration skipped it (latent output)."""
    batch = latency_batch or images
    retile(capture, batch / images)
    fixed = 0.0
    if traj is not None:
        fixed = max(traj.wall_s - traj.denoiser_s, 0.0) * batch / images
        if adapter.calib_output_type == "latent":
            fixed += decode_seconds(pipe, capture, batch, traj.final, call_kwargs)
    return measure(model, adapter, blocks, layers, capture, params, cands, fixed, dtype=dtype, cache_dir=cache)


def _latency_record(latency: LatencyModel, layers: Sequence[str], methods, block_methods, calls: int,
                    batch: int | None = None, cfg: bool = False) -> dict:
    p = latency.predict(layers, methods, block_methods, calls, collapsed_steps(methods, layers, cfg))
    return {"batch": batch,"predicted_fraction": round(p["fraction"], 4), "predicted_s": round(p["seconds"], 4),
            "full_s": round(p["full_seconds"], 4), "step_s": round(latency.step_s, 5),
            "fixed_s": round(latency.fixed_s, 5), "model": "measured microbenchmark (difa.calibration.latency)"}


def _calibrate_trajectory(pipe: Any, inputs: Sequence, *, threshold: float, budget: float | None, steps: int,
                          guidance_scale: float, seed: int, candidates: Sequence[str], window, call_kwargs, name: str,
                          techniques, dtype: str, latency_cache, latency_batch: int | None,
                          max_cache_mb: float | None = None) -> Plan:
    methods = [c for c in candidates if c in BLOCK_CANDIDATES]
    if not methods:
        raise DifaError(f"search=trajectory plans block cells: add reuse and/or forecast to candidates (got "
                        f"{', '.join(candidates) or 'none'}), or use search=greedy for attention-only candidates")
    adapter, model, layers = plan_layers(pipe)
    blocks = plan_blocks(pipe)
    if not blocks:
        raise DifaError(f"found no transformer blocks in {type(model).__name__}; use search=greedy")
    calls = denoiser_calls(pipe.scheduler, steps)
    params = technique_params(window, techniques)
    attention = [[FULL] * calls for _ in layers]
    forwards = [0]

    def run(rows, on_block=None) -> torch.Tensor:
        engine = Engine(model, adapter, layers, attention, params, scheduler=pipe.scheduler, inference_steps=steps,
                        blocks=blocks, block_methods=rows, on_block=on_block)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with engine:
            out = adapter.call_pipeline(pipe, inputs, steps=steps, guidance_scale=guidance_scale, generator=generator,
                                        output_type=adapter.calib_output_type, extra=call_kwargs)
        forwards[0] += engine.forwards
        return adapter.outputs(out)

    t0 = time.perf_counter()
    full_rows = [[FULL] * calls for _ in blocks]
    capture = Capture(model, adapter, blocks, layers)
    try:
        traj = trajectory.record(lambda on_block: run(full_rows, on_block), model, len(blocks))
    finally:
        capture.close()
    latency = _latency(pipe, adapter, model, blocks, layers, capture, params, [], traj, len(inputs), latency_batch,
                       dtype, latency_cache, call_kwargs)
    table = trajectory.Table(traj)
    allowed = methods
    if max_cache_mb is not None:  # per block, the methods whose residual slots fit the cap (at the latency batch)
        slot_bytes = [_slot_bytes(capture, j) for j in range(len(blocks))]
        allowed = trajectory.cache_slots(table, calls, methods, slot_bytes, max_cache_mb * 2**20)
    chosen, seq, checks = trajectory.search(
        table, latency, len(blocks), calls, allowed, lambda rows: trajectory.final_error(run(rows), traj.final),
        budget=budget, threshold=None if budget is not None else threshold)
    wall = time.perf_counter() - t0
    rows = tuple(tuple(r) for r in chosen.rows)
    executed = executed_cells([n for n, _ in layers], [n for n, _ in blocks], rows, calls)
    shapes = [_shape_of(capture, i, layers) for i in range(len(layers))] if capture.attn_in else []
    flops = plan_flops(attention, shapes, params, [n for n, _ in layers], adapter.runs_cfg(guidance_scale), executed) if shapes else {}
    if shapes:
        flops["shapes"] = [s.to_dict() for s in shapes]  # also what the cache accounting reads
    return Plan(
        model=model_identity(model, layers, name, adapter.family, blocks),
        scheduler=type(pipe.scheduler).__name__,
        steps=calls,
        num_inference_steps=steps,
        methods=tuple(tuple(r) for r in attention),
        cfg_enabled=adapter.runs_cfg(guidance_scale),
        cfg_layout=adapter.cfg_layout,
        guidance_scale=float(guidance_scale),
        techniques=params,
        blocks=rows,
        calibration={
            "search": "trajectory",
            "threshold": None if budget is not None else float(threshold),
            "budget": budget,
            "inputs": list(inputs),
            "seed": seed,
            "candidates": methods,
            "loss": "relative L1 (sum |a-b| / sum |b|) of the final output against the all-full generation",
            "table_error": round(chosen.table_error, 5),
            "measured_error": None if chosen.measured is None else round(chosen.measured, 5),
            "checks": checks,
            **({} if max_cache_mb is None else {"max_cache_mb": max_cache_mb, "allowed_per_block": {
                n: list(a) for (n, _), a in zip(blocks, allowed)}}),
            "sequence": [[round(c.predicted, 4), round(c.table_error, 5)] for c in seq],
            "wall_time_s": round(wall, 3),
            "forwards": forwards[0] + latency.forwards,
        },
        flops=flops,
        latency=_latency_record(latency, [n for n, _ in layers], attention, rows, calls, latency_batch or len(inputs)),
    )


def _slot_bytes(capture: Capture, j: int) -> int:
    """Bytes of one residual of block j (its input's size) at the captured (latency) batch."""
    args, kwargs = capture.block_in[j]
    x = args[0] if args else kwargs["hidden_states"]
    return x.numel() * x.element_size()


def _shape_of(capture: Capture, i: int, layers) -> Any:
    from difa.engine import _shape

    args, kwargs = capture.attn_in[i]
    x = args[0] if args else kwargs["hidden_states"]
    context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return _shape(layers[i][1], x, context, capture.grid(x, context, layers[i][0]))
