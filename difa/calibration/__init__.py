"""Calibration: runs the stock pipeline with a search attached and returns a Plan. Nothing else.

Two searches, each with its driver beside it: `trajectory` (the default; calibration/trajectory.py drives
calibration/search.py: block cells from one recorded generation, error per predicted second, whole-plan checks;
threshold or latency-budget mode) and `greedy` (calibration/greedy.py: DiTFastAttn's per-step, per-layer greedy
over attention cells, kept exactly for paper parity and `preset:ditfastattn`). Both measure the latency cost model
(calibration/latency.py) and record the plan's predicted seconds. Plan building without a search (fixed_plan,
retime_plan) lives in difa/planning.py and is re-exported here."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from difa import checks
from difa.adapters import adapter_for
from difa.calibration.greedy import calibrate_greedy
from difa.calibration.latency import CACHE_DIR
from difa.calibration.trajectory import calibrate_goals
from difa.errors import DifaError
from difa.plan import Plan
from difa.planning import (attention_row, block_rows, denoiser_calls, fixed_plan, model_identity,  # noqa: F401
                           retime_plan, technique_params)
from difa.techniques import REGISTRY, default_candidates, wars

# Every technique whose description says `candidate`, in registry order. Ties in the greedy's cost model keep this
# order: `tgate` before `ast` on cross-attention, because gating every cross-attention layer of a step also lets
# the engine drop one CFG half (which per-layer FLOPs do not show).
DEFAULT_CANDIDATES = default_candidates()
LOSS_ON, SEARCHES = checks.LOSS_ON, checks.SEARCHES
# What the trajectory search plans: block methods with an estimator (Technique.estimate) that its error table
# scores. mlp_reuse and deepcache (no estimator) are for fixed plans.
BLOCK_CANDIDATES = tuple(n for n, t in REGISTRY.items() if t.searchable)
__all__ = ["calibrate_pipeline", "calibrate_front", "check_budget", "check_budgets", "check_candidates", "attention_row", "block_rows", "denoiser_calls",
           "fixed_plan", "model_identity", "retime_plan", "technique_params", "DEFAULT_CANDIDATES",
           "BLOCK_CANDIDATES", "LOSS_ON", "SEARCHES", "CACHE_DIR"]


check_candidates = checks.candidates  # (the checks live in difa.checks, shared with the CLI)
check_budget = checks.budget
check_budgets = checks.budgets


def calibrate_front(pipe: Any, inputs: Sequence, *, budgets: Sequence[float], **kwargs: Any) -> list[Plan]:
    """One plan per budget from one recorded trajectory (search=trajectory), ascending; their measured errors on the
    calibration inputs are non-increasing in the budget (see calibration/trajectory.py). `kwargs`: as
    calibrate_pipeline's (threshold is not used)."""
    kwargs.setdefault("threshold", 0.0)
    return calibrate_pipeline(pipe, inputs, budgets=budgets, **kwargs)


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
    budgets: Sequence[float] | None = None,  # (calibrate_front's: one plan per budget)
    call: Any = None,  # trajectory: runs the pipeline for every generation of the calibration (see below)
) -> Any:
    """Calibrate `pipe` on `inputs` (class ids or prompts) -> Plan (a list of them with `budgets`: calibrate_front).

    search="trajectory" (default): block cells (`reuse` / `forecast`, with CFG `cfg_delta` / `cfg_forecast`,
    among `candidates`) and attention cells (`ast` / `wars` / `tome` / `agent` among them, where they pay:
    calibration/attention_cells.py) from one recorded generation. threshold: the fastest plan whose final-output relative L1 on the calibration inputs is <= δ;
    budget (overrides threshold): the least-error plan whose predicted latency is <= budget x full.

    search="greedy": DiTFastAttn's greedy over attention cells. threshold: δ; layer i of L accepts a method whose relative-L1 error on the final model output is below
    δ·(i+1)/L. 0 gives an all-full plan; larger is faster and less faithful (DiTFastAttn's D1..D6 are
    0.025..0.15).
    loss_on: "guided" compares the noise prediction the sampler reads (CFG halves combined with the guidance
    scale); "halves" compares both CFG halves as they leave the denoiser (DiTFastAttn, for paper parity).
    max_cache_mb (trajectory): the block residuals the plan keeps across steps, at `latency_batch` images per call
    (default: the calibration inputs), stay within this many MB (cache_cap.cache_slots).
    call (trajectory): a function that runs the pipeline once on `inputs` and returns its output, used for every
    generation of the calibration instead of a call seeded with `seed`; it must draw the same noise each time
    (difa.enable: the user's own call with a copy of its generator, so the recorded generation is that call's).
    """
    from difa.engine import ENGINE_ATTR

    if getattr(adapter_for(pipe).denoiser(pipe), ENGINE_ATTR, None) is not None:  # calibrating would remove it
        raise DifaError("the pipeline has a plan applied; calibrate the uncompressed model: remove_plan(pipe) first "
                        "(and apply_plan again afterwards)")
    # The CLI's checks (it makes the same call before loading the model), then the inputs against the model.
    args = checks.calibration(threshold=threshold, steps=steps, guidance_scale=guidance_scale, seed=seed,
                              candidates=candidates, window=window, loss_on=loss_on, search=search, budget=budget,
                              budgets=budgets, latency_batch=latency_batch, max_cache_mb=max_cache_mb,
                              techniques=techniques)
    threshold, cands = args["threshold"], args["candidates"]
    budget, budgets = args["budget"], args["budgets"]
    inputs = checks.inputs(pipe, inputs)
    if search == "trajectory":
        plans = calibrate_goals(pipe, inputs, threshold=float(threshold),
                                budgets=budgets if budgets is not None else None if budget is None else [budget],
                                steps=steps, guidance_scale=guidance_scale, seed=seed, candidates=cands, window=window,
                                call_kwargs=call_kwargs, name=name, techniques=techniques, dtype=dtype,
                                latency_cache=latency_cache, latency_batch=latency_batch, max_cache_mb=max_cache_mb,
                                call=call)
        return plans if budgets is not None else plans[0]
    if call is not None:
        raise DifaError("call= runs the trajectory search's generations; search=greedy makes its own")
    return calibrate_greedy(pipe, inputs, threshold=threshold, steps=steps, guidance_scale=guidance_scale, seed=seed,
                            candidates=cands, cands=cands, window=window, call_kwargs=call_kwargs, name=name,
                            progress=progress, techniques=techniques, loss_on=loss_on, dtype=dtype,
                            latency_cache=latency_cache, latency_batch=latency_batch, checkpoint=checkpoint)
