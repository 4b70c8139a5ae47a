"""Plan building without a search: fixed schedules (`fixed_plan`, the presets' building block), a plan moved to
another step count (`retime_plan`), and the row builders both use. A proposed cell that cannot run as written is
left `full` by the same rule plan validation refuses it by (difa.cells.cell_problem), so a built plan always
validates."""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

from difa import checks
from difa.adapters import JOINT, adapter_for
from difa.apply import plan_blocks, plan_layers
from difa.cells import cell_problem, executed_cells
from difa.errors import DifaError
from difa.plan import ModelIdentity, Plan, config_hash
from difa.techniques import REGISTRY, check_params, kind_of, unfit, wars
from difa.techniques.protocol import ATTENTION_KINDS, FULL


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


def attention_row(name: str, proposed: Sequence[str], ran: Sequence[bool], params: Mapping[str, Mapping],
                  adapter: Any = None) -> tuple[str, ...]:
    """Layer `name`'s cells as proposed, each left `full` where it cannot run as written (cells.cell_problem: a
    method that does not apply to the layer, a moot cell, a cache read with nothing computed before it)."""
    out: list[str] = []
    for t, m in enumerate(proposed):
        if m not in REGISTRY:
            raise DifaError(f"unknown method {m!r}; choose from {', '.join(sorted(REGISTRY))}")
        done = [x for x, r in zip(out, ran) if r]
        bad = cell_problem(m, t, runs=ran[t], earlier=done, params=params, layer=name, adapter=adapter)
        out.append(FULL if bad else m)
    return tuple(out)


def block_rows(blocks: Sequence[tuple[str, Any]], method: Callable[[int, int], str], calls: int,
               params: Mapping[str, Mapping] | None = None) -> tuple[tuple[str, ...], ...]:
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
            if m not in REGISTRY or not REGISTRY[m].is_block:
                raise DifaError(f"{m!r} is not a block method; choose from "
                                f"{', '.join(sorted(k for k, v in REGISTRY.items() if v.is_block))}")
            runs = not any(REGISTRY[rows[a][t]].skips_block for a in around)
            done = [x for x, r in zip(out, ran) if r]
            out.append(FULL if cell_problem(m, t, runs=runs, earlier=done, params=params or {}) else m)
            ran.append(runs)
        rows[j] = tuple(out)
    return tuple(rows)


def technique_params(window, techniques: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The plan's technique parameters: the `wars` window, merged with whatever `techniques` gives."""
    if techniques is not None and (not isinstance(techniques, Mapping)
                                   or not all(isinstance(v, Mapping) for v in techniques.values())):
        raise DifaError("techniques must map technique names to parameter tables, e.g. {'tome': {'ratio': 0.5}}")
    params = {k: dict(v) for k, v in (techniques or {}).items()}
    params[wars.NAME] = {"window": checks.window(window), **params.get(wars.NAME, {})}
    check_params(params)  # unknown names, parameters of the wrong type or range: one line before anything runs
    wars.residual_from(params)
    return params


def retime_plan(plan: Plan, pipe: Any, steps: int) -> Plan:
    """`plan` (calibrated at S = plan.inference_steps) for `steps` = S' on `pipe`'s scheduler: each cell of the new
    schedule takes the method of the cell at the nearest normalized position, t' (S_calls - 1) / (S'_calls - 1)
    (the same fraction of the denoising trajectory), then cells that cannot run as mapped (a cache read before
    anything was computed, a moot cell) are left `full`. Latency and FLOPs records are dropped (they were for S).
    The plan is not recalibrated: measure its error (experiments/README.md, step transfer) before relying on it."""
    checks.count("steps", steps, checks.MAX_STEPS, example="steps=20")
    if type(pipe.scheduler).__name__ != plan.scheduler:  # positions along another sampler's trajectory mean nothing
        raise DifaError(f"the plan was calibrated with {plan.scheduler} and the pipeline uses "
                        f"{type(pipe.scheduler).__name__}, so its steps cannot be mapped; recalibrate with this scheduler")
    calls = denoiser_calls(pipe.scheduler, int(steps))
    if calls == plan.steps:
        return plan
    fitted = sorted({m for row in plan.blocks for m in row if m in REGISTRY and REGISTRY[m].fit is not None})
    if fitted:  # parameters fitted for the calibration's own steps and spacings: they do not transfer
        raise DifaError(f"the plan's {', '.join(fitted)} cells were fitted at steps={plan.inference_steps} and do not "
                        f"transfer to steps={steps}; recalibrate with steps={steps}")

    def src(t: int) -> int:
        return 0 if calls == 1 else min(plan.steps - 1, round(t * (plan.steps - 1) / (calls - 1)))

    names = [(n, None) for n in plan.model.blocks]
    brows = block_rows(names, lambda j, t: plan.blocks[j][src(t)], calls, plan.techniques) if plan.blocks else ()
    ran = executed_cells(plan.model.layers, plan.model.blocks, brows, calls)
    adapter = adapter_for(pipe, plan.model.family)
    methods = tuple(attention_row(name, [row[src(t)] for t in range(calls)], ran[i], plan.techniques, adapter)
                    for i, (name, row) in enumerate(zip(plan.model.layers, plan.methods)))
    calibration = {**plan.calibration, "retimed_from": {"steps": plan.inference_steps, "calls": plan.steps}}
    return plan.with_(steps=calls, num_inference_steps=int(steps), methods=methods, blocks=brows,
                      calibration=calibration, latency={}, flops={})


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
    checks.count("steps", steps, checks.MAX_STEPS, example="steps=20")
    checks.number("guidance_scale", guidance_scale, example="guidance_scale=4.0")
    if not callable(method) or (block is not None and not callable(block)):
        raise DifaError("method (and block) must be functions of (layer or block index, step) returning a method "
                        "name, e.g. method=lambda i, t: 'ast'")
    unknown = [k for k in checks.names("kinds", kinds, "kinds=('attn1',)") if k not in ATTENTION_KINDS]
    if unknown:
        raise DifaError(f"unknown layer kind(s) {unknown}; kinds are among {', '.join(ATTENTION_KINDS)}")
    adapter, model, layers = plan_layers(pipe)
    calls = denoiser_calls(pipe.scheduler, steps)
    blocks = plan_blocks(pipe, cache_units) if block is not None else []
    params = technique_params(window, techniques)
    brows = block_rows(blocks, block, calls, params) if block is not None else ()
    ran = executed_cells([n for n, _ in layers], [n for n, _ in blocks], brows, calls)

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
    methods = tuple(attention_row(layers[i][0], proposed(i), ran[i], params, adapter) for i in range(len(layers)))
    wanted = {method(i, t) for i in range(len(layers)) for t in range(calls) if kind_of(layers[i][0], adapter) in kinds} - {FULL}
    for m in sorted(wanted - {x for row in methods for x in row}):  # proposed, but it runs nowhere: say why
        reasons = [unfit(m, n, adapter) for n, _ in layers if kind_of(n, adapter) in kinds]
        reason = next((r for r in reasons if r), None)
        if reason is not None and all(reasons):
            raise DifaError(f"{reason}, on every layer of {type(model).__name__}; this schedule does not apply to "
                            f"the {adapter.family} family")
    return Plan(model=model_identity(model, layers, name, adapter.family, blocks), scheduler=type(pipe.scheduler).__name__,
                steps=calls, num_inference_steps=steps, methods=methods, cfg_enabled=adapter.runs_cfg(guidance_scale),
                cfg_layout=adapter.cfg_layout, guidance_scale=float(guidance_scale), techniques=params, blocks=brows)
