"""The default calibration driver: records one all-full generation with the engine's block observer, measures the
latency model, and runs the trajectory search (calibration/search.py) on it; returns a Plan."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Sequence

import torch

from difa.apply import plan_blocks, plan_layers
from difa.calibration import attention_cells, cache_cap, search
from difa.calibration import table as error_table
from difa.calibration.latency import Capture
from difa.calibration.timing import latency_curve, latency_record, shape_of
from difa.cells import executed_share
from difa.collapse import other_half
from difa.cost import plan_flops
from difa.engine import Engine
from difa.errors import DifaError
from difa.planning import denoiser_calls, model_identity, technique_params
from difa.plan import Plan
from difa.techniques import REGISTRY, default_candidates
from difa.techniques.protocol import FITTED, FULL


def calibrate_goals(pipe: Any, inputs: Sequence, *, threshold: float, budgets: Sequence[float] | None, steps: int,
                    guidance_scale: float, seed: int, candidates: Sequence[str], window, call_kwargs, name: str,
                    techniques, dtype: str, latency_cache, latency_batch: int | None,
                    max_cache_mb: float | None = None, call=None) -> list[Plan]:
    """One recorded trajectory, one latency model and one error table; then one plan per budget (ascending), or one
    plan for `threshold` (budgets None). A front takes every plan from one of the search's paths (search.PATHS),
    the one with less measured error summed over its budgets (search.front): its plans are nested, so errors on
    unseen seeds follow the budget too. Its measured errors are non-increasing in the budget: where a larger budget's plan
    checks worse than a smaller budget's, that smaller budget's plan (which fits the larger budget too) is kept,
    and the plan records `kept_from_budget`. Check generations of identical plans run once."""
    methods = [c for c in candidates if REGISTRY[c].searchable]  # (at least one: difa.checks.calibration)
    adapter, model, layers = plan_layers(pipe)
    if not adapter.runs_cfg(guidance_scale) or adapter.temporal is not None:  # CFG cells need a CFG batch per block
        methods = [c for c in methods if not REGISTRY[c].half_batch]
        if not methods:
            raise DifaError(f"candidates {list(candidates)} need a CFG batch in every block, which {adapter.family} "
                            f"at guidance_scale={guidance_scale} does not have; add reuse or forecast to the candidates")
    # attention cells (calibration/attention_cells.py); those that share work across the CFG halves need CFG
    attn_methods = [c for c in candidates if attention_cells.searchable(c)
                    and (adapter.runs_cfg(guidance_scale) or not REGISTRY[c].shares_cfg)]
    blocks = plan_blocks(pipe)
    if not blocks:
        raise DifaError(f"found no transformer blocks in {type(model).__name__}; use search=greedy")
    calls = denoiser_calls(pipe.scheduler, steps)
    params = technique_params(window, techniques)
    full_attention = [[FULL] * calls for _ in layers]
    forwards = [0]

    def run(rows, on_block=None, attention=None, scorer=None, techniques=None) -> torch.Tensor:
        """One generation with block rows `rows` and attention rows `attention` (default all full); a `scorer`
        observes every block of an all-full generation that keeps every cache (attention_cells)."""
        engine = Engine(model, adapter, layers, [list(r) for r in attention or full_attention], techniques or params,
                        scheduler=pipe.scheduler, inference_steps=steps, blocks=blocks, block_methods=rows,
                        on_block=scorer or on_block, calibrating=scorer is not None,
                        keep_steps=None if scorer is None else {s - 1 for s in scorer.steps},
                        metric_layers=list(range(len(layers))) if scorer is not None else None)
        if scorer is not None:
            scorer.engine = engine
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with engine:
            out = call() if call is not None else adapter.call_pipeline(
                pipe, inputs, steps=steps, guidance_scale=guidance_scale, generator=generator,
                output_type=adapter.calib_output_type, extra=call_kwargs)
        forwards[0] += engine.forwards
        return _images(adapter, out)

    t0 = time.perf_counter()
    full_rows = [[FULL] * calls for _ in blocks]
    capture = Capture(model, adapter, blocks, layers)
    try:
        traj = error_table.record(lambda on_block: run(full_rows, on_block), model, len(blocks))
    finally:
        capture.close()
    # The time outside the denoiser, again on a warm all-full run: the first generation of a process pays one-time
    # costs (a text encoder's first call, allocator growth) that a served plan does not, and an overstated
    # remainder made predictions of the bundled PixArt ~10% too slow. The smaller of the two stands.
    # (the same generation probes the attention cells: calibration/attention_cells.py)
    names, block_names = [n for n, _ in layers], [n for n, _ in blocks]
    probe = attention_cells.Scorer(names, attention_cells.cell_layers(adapter, names, block_names, attn_methods),
                                   traj.sample, attention_cells.probe_steps(calls),
                                   _guided(adapter, guidance_scale) if adapter.runs_cfg(guidance_scale) else None)
    warm = error_table.record(lambda on_block: run(full_rows, scorer=probe if attn_methods else None), model, 0)
    traj.remainder_s = min(traj.outside_s, warm.outside_s)
    latency, curve = latency_curve(pipe, adapter, model, blocks, layers, capture, params,
                                   timed_units(candidates, adapter, guidance_scale), traj, len(inputs), latency_batch,
                                   dtype, latency_cache, call_kwargs, own_calls=call is None)
    on = attention_cells.cell_layers(adapter, names, block_names, attn_methods, latency.attn_s)
    latency = replace(latency, cell_layers=on)
    curve = {b: replace(m, cell_layers=on) for b, m in curve.items()}
    rows = traj.residual[0][0].shape[0] if traj.residual and 0 in traj.residual[0] else 0  # a block call's batch
    cfg_batch = adapter.runs_cfg(guidance_scale) and rows % 2 == 0
    table = error_table.Table(traj, params=params, cond=adapter.cond_slice(rows) if cfg_batch else None)
    table.attn = attention_cells.table(probe.result(), latency, calls)  # the cells that save time
    forwards[0] += -(-probe.reruns // len(blocks))  # the probe's block reruns, in whole-model forwards
    cells = [m for m in attn_methods if any(k[2] == m for k in table.attn)]
    allowed = methods + cells
    if max_cache_mb is not None:  # per block, the methods whose residual slots fit the cap (at the latency batch)
        slot_bytes = [_slot_bytes(capture, j) for j in range(len(blocks))]
        allowed = [a + tuple(cells) for a in cache_cap.cache_slots(table, calls, methods, slot_bytes,
                                                                 max_cache_mb * 2**20)]
    measured: dict[tuple, float] = {}
    fits: dict[tuple, dict] = {}  # a checked plan -> its fitted techniques' tables (table.CheckFit)

    def fitted(rows) -> dict:
        """The technique table of a plan: `params`, with its fitted techniques' parameters (as its check fitted
        them, table.CheckFit)."""
        if any(REGISTRY[m].fit is not None for r in rows for m in r):
            check(rows)  # (checked already wherever the search measured it)
        return {**params, **fits.get(tuple(map(tuple, rows)), {})}

    def check(rows) -> float:  # one check generation per distinct plan, however many budgets propose it
        key = tuple(map(tuple, rows))
        if key not in measured:
            block_rows, attention = attention_cells.split(rows, names, latency, calls)
            # a fitted technique's cells: each input with parameters fitted on the other inputs (table.CheckFit)
            fitting = {m: table.check_fit(m) for m in {m for r in rows for m in r} if REGISTRY[m].fit is not None}
            techniques = {**params, **{m: {**params.get(m, {}), FITTED: f} for m, f in fitting.items()}}
            measured[key] = error_table.final_error(run(block_rows, attention=attention, techniques=techniques),
                                                    traj.final)
            fits[key] = {m: {**params.get(m, {}), FITTED: REGISTRY[m].fitted_params(f.fits)}
                         for m, f in fitting.items()}
        return measured[key]

    goals = sorted(set(budgets)) if budgets is not None else [None]
    if len(goals) > 1:  # a front, checked as a whole: one path's nested plans (search.front)
        results = search.front(table, latency, len(blocks), calls, allowed, check, goals)
    else:
        results = [search.search(table, latency, len(blocks), calls, allowed, check, budget=goals[0],
                                 threshold=None if goals[0] is not None else threshold)]
    found = []  # (budget, chosen, seq, checks, kept_from)
    for b, (chosen, seq, checks) in zip(goals, results):
        kept_from = None
        if found and found[-1][1].measured is not None and chosen.measured is not None \
                and found[-1][1].measured < chosen.measured:
            kept_from = found[-1][4] if found[-1][4] is not None else found[-1][0]
            chosen = found[-1][1]  # a smaller budget's plan: less error, and within this budget too
        found.append((b, chosen, seq, checks, kept_from))
    wall = time.perf_counter() - t0
    shapes = [shape_of(capture, i, layers) for i in range(len(layers))] if capture.attn_in else []
    front = {"budgets": [b for b, *_ in found]} if budgets is not None and len(found) > 1 else {}
    plans = []
    for b, chosen, seq, checks, kept_from in found:
        block_rows, attention = attention_cells.split(chosen.rows, names, latency, calls)
        rows = tuple(tuple(r) for r in block_rows)
        executed = executed_share([n for n, _ in layers], [n for n, _ in blocks], rows, calls)
        flops = plan_flops(attention, shapes, params, [n for n, _ in layers], adapter.runs_cfg(guidance_scale),
                           executed) if shapes else {}
        if shapes:
            flops["shapes"] = [s.to_dict() for s in shapes]  # also what the cache accounting reads
        plans.append(Plan(
            model=model_identity(model, layers, name, adapter.family, blocks),
            scheduler=type(pipe.scheduler).__name__,
            steps=calls,
            num_inference_steps=steps,
            methods=tuple(tuple(r) for r in attention),
            cfg_enabled=adapter.runs_cfg(guidance_scale),
            cfg_layout=adapter.cfg_layout,
            guidance_scale=float(guidance_scale),
            techniques=fitted(chosen.rows),
            blocks=rows,
            calibration={
                "search": "trajectory",
                "threshold": None if b is not None else float(threshold),
                "budget": b,
                "inputs": list(inputs),
                "seed": seed,
                "candidates": allowed if max_cache_mb is None else methods + cells,
                "loss": "relative L1 (sum |a-b| / sum |b|) of the final output against the all-full generation",
                "table_error": round(chosen.table_error, 5),
                "measured_error": None if chosen.measured is None else round(chosen.measured, 5),
                "checks": checks,
                **({} if kept_from is None else {"kept_from_budget": kept_from}),
                **({} if max_cache_mb is None else {"max_cache_mb": max_cache_mb, "allowed_per_block": {
                    n: list(a) for (n, _), a in zip(blocks, allowed)}}),
                "sequence": [[round(c.predicted, 4), round(c.table_error, 5)] for c in seq],
                **({"front": front} if front else {}),
                "wall_time_s": round(wall, 3),
                "forwards": forwards[0] + latency.forwards,
            },
            flops=flops,
            latency=latency_record(latency, [n for n, _ in layers], attention, rows, calls,
                                   latency_batch or len(inputs), curve=curve),
        ))
    return plans


def timed_units(candidates: Sequence[str], adapter, guidance_scale: float) -> list[str]:
    """The techniques the latency model times beyond whole blocks and their stand-ins: the CFG halves and attention
    cells that apply, of the candidates and of the default ones (techniques marked `candidate`) alike. So the model
    is one per pipeline and shapes, whatever the candidates, and a calibration with fewer of them (block cells
    only) plans on the same seconds as the default one: the default's path of skipped cells only (search.PATHS) is
    then the block-only search's own. (Timed apart, the bundled PixArt's two models differed by 9% in the denoiser
    step, enough to move budget 0.3's plan by 3 cells and its checked error from 0.37 to 0.55.) A half unit is
    timed with the dearest stand-in of them all (calibration/latency.py)."""
    cfg = adapter.runs_cfg(guidance_scale)
    pool = list(dict.fromkeys([*candidates, *default_candidates()]))
    halves = [c for c in pool if REGISTRY[c].searchable and REGISTRY[c].half_batch and cfg and adapter.temporal is None]
    cells = [c for c in pool if attention_cells.searchable(c) and (cfg or not REGISTRY[c].shares_cfg)]
    return halves + cells


def _slot_bytes(capture: Capture, j: int) -> int:
    """Bytes of one residual of block j (its input's size) at the captured (latency) batch."""
    args, kwargs = capture.block_in[j]
    x = args[0] if args else kwargs["hidden_states"]
    return x.numel() * x.element_size()


def _guided(adapter, g: float):
    """(B, n, C) of a CFG batch -> u + g (c - u) (B/2, n, C), the combination the sampler takes."""
    def combine(t: torch.Tensor) -> torch.Tensor:
        c = adapter.cond_slice(t.shape[0])
        u = other_half(c, t.shape[0])
        return t[u] + g * (t[c] - t[u])
    return combine


def _images(adapter, out) -> torch.Tensor:
    """The images (or latents, videos) of a pipeline call's output as one float tensor: a caller's own call
    (`call=`) may ask for PIL images or numpy arrays, or a tuple (return_dict=False)."""
    images = out[0] if isinstance(out, tuple) else adapter.outputs(out)
    if torch.is_tensor(images):
        return images
    import numpy as np

    return torch.from_numpy(np.asarray(images if not isinstance(images, list) else
                                       [np.asarray(i) for i in images])).float()
