"""`python -m difa.calibrate [+model=<name>] threshold=...`: calibrate a plan, save it, print a summary."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from difa import checks
from difa.calibration import DEFAULT_CANDIDATES, calibrate_front, calibrate_pipeline, technique_params
from difa.calibration.checkpoint import Checkpoint
from difa.cli.common import (CONF_DIR, call_kwargs, check_known_keys, check_model, check_settings, load_model,
                             model_config, precheck, reject_unplussed_model, report_errors, take_inputs)
from difa.errors import DifaError
from difa.files import check_target, target_lock
from difa.plan import Plan, attention_executed, block_executed
from difa.techniques import changed_params, check_params, letters

MAX_MAP_LAYERS = 40


def resolve_model(cfg: DictConfig) -> DictConfig:
    return cfg.model if "model" in cfg and cfg.model is not None else model_config(cfg.default_model)


def settings(cfg: DictConfig) -> tuple[DictConfig, dict, list, dict]:
    """Everything checked before the model loads: (model config, the checked calibration arguments (difa.checks),
    the inputs, the technique parameters that differ from the defaults)."""
    check_known_keys(cfg, "calibrate")
    check_settings(cfg)
    m = resolve_model(cfg)
    check_model(m, cfg)
    techniques = OmegaConf.to_container(cfg.get("techniques") or OmegaConf.create({}), resolve=True)
    check_params(techniques)
    techniques = changed_params(techniques)  # the plan records what differs from the defaults
    technique_params(cfg.window, techniques)
    front = OmegaConf.is_list(cfg.get("budget"))  # budget=[0.3,0.4,...]: a whole front from one calibration
    candidates = cfg.get("candidates")
    args = checks.calibration(
        threshold=cfg.threshold, steps=cfg.steps if cfg.steps is not None else m.steps,
        guidance_scale=cfg.guidance_scale if cfg.guidance_scale is not None else m.guidance_scale, seed=cfg.seed,
        candidates=OmegaConf.to_container(candidates) if OmegaConf.is_list(candidates) else
        candidates if candidates is not None else list(DEFAULT_CANDIDATES),
        window=cfg.window, loss_on=str(cfg.loss_on), search=str(cfg.get("search", "trajectory")),
        budget=None if front else cfg.get("budget"), budgets=list(cfg.budget) if front else None,
        latency_batch=cfg.get("latency_batch"), max_cache_mb=cfg.get("max_cache_mb"), techniques=techniques)
    inputs = take_inputs(m.inputs, cfg.n_calib if cfg.n_calib is not None else m.get("n_calib"))
    return m, args, inputs, techniques


def run(cfg: DictConfig) -> tuple[Plan, Path]:
    m, args, inputs, techniques = settings(cfg)
    if args["budgets"] is not None:
        return run_front(cfg, m, args, inputs, techniques)
    budget, steps = args["budget"], args["steps"]
    mode = f"b{budget}" if budget is not None else f"d{cfg.threshold}"
    out = Path(cfg.out) if cfg.out else Path("plans") / f"{m.name}_{mode}_s{steps}.json"
    if out.with_suffix(".png") == out:
        raise DifaError(f"out={str(out)!r} would be overwritten by its own heatmap; name the plan .json")
    check_target(out, "out")  # before any model forward
    check_target(out.with_suffix(".png"), "the heatmap next to out", follow=False)
    with target_lock(out):  # a second calibration writing the same out= is refused
        checkpoint = Checkpoint(out)  # greedy: a killed run of the same command resumes from its decided steps
        pipe = load_model(m, cfg.device, cfg.dtype)
        plan = calibrate_pipeline(pipe, inputs, **args, call_kwargs=call_kwargs(m), name=m.name,
                                  dtype=str(cfg.dtype), techniques=techniques, checkpoint=checkpoint)
        record = {**plan.calibration, "model_config": OmegaConf.to_container(m, resolve=True), "device": cfg.device,
                  "dtype": cfg.dtype, "weights_mb": round(weights_mb(pipe), 3)}
        plan = plan.with_(calibration=record)
        # The heatmap first: a kill between the two writes leaves the old plan next to a new heatmap, never a new
        # plan next to an old heatmap.
        heatmap = _heatmap(plan, out.with_suffix(".png"))
        plan.save(out)
        checkpoint.clear()
    print(summary(plan, out) + f"\nheatmap    {heatmap}")
    return plan, out


def _heatmap(plan: Plan, path: Path) -> str:
    """Write the plan's heatmap; without matplotlib (a core install) say which extra draws it."""
    try:
        import matplotlib
    except ImportError:
        matplotlib = None
    if matplotlib is None:
        return "not drawn: matplotlib is missing (pip install 'difa[eval]')"
    from difa.plots import plan_heatmap

    return str(plan_heatmap(plan, path, follow=False))


def run_front(cfg: DictConfig, m: DictConfig, args: dict, inputs: list, techniques: dict) -> tuple[list[Plan], Path]:
    """One plan per budget from one recorded trajectory, written as <out dir>/<model>_b<budget>_s<steps>.json with
    its heatmap, and the front's plot (<model>_front_s<steps>.png); `out` names the directory (default plans/)."""
    budgets, steps = args["budgets"], args["steps"]
    folder = Path(cfg.out) if cfg.out else Path("plans")
    if folder.suffix == ".json":
        raise DifaError(f"with a list of budgets out= names a directory for one plan per budget, not {folder}; "
                        "e.g. out=plans/front")
    outs = [folder / f"{m.name}_b{b}_s{steps}.json" for b in budgets]
    figure = folder / f"{m.name}_front_s{steps}.png"
    for path in (*outs, *(o.with_suffix(".png") for o in outs), figure):
        check_target(path, "a file of the front", follow=False)  # before any model forward; side files: no links
    with target_lock(figure):
        pipe = load_model(m, cfg.device, cfg.dtype)
        plans = calibrate_front(pipe, inputs, **{**args, "budget": None}, call_kwargs=call_kwargs(m), name=m.name,
                                dtype=str(cfg.dtype), techniques=techniques)
        extra = {"model_config": OmegaConf.to_container(m, resolve=True), "device": cfg.device, "dtype": cfg.dtype,
                 "weights_mb": round(weights_mb(pipe), 3)}
        plans = [p.with_(calibration={**p.calibration, **extra}) for p in plans]
        drawn = _heatmap(plans[0], outs[0].with_suffix(".png"))  # (the first heatmap, or why none is drawn)
        for plan, out in zip(plans, outs):
            if plan is not plans[0] and not drawn.startswith("not drawn"):
                _heatmap(plan, out.with_suffix(".png"))
            plan.save(out)
        if not drawn.startswith("not drawn"):
            from difa.plots import front_plot

            front_plot(plans, figure, follow=False)
    print(front_summary(plans, outs, figure if not drawn.startswith("not drawn") else drawn))
    return plans, folder


def front_summary(plans: list[Plan], outs: list[Path], figure: Path | str) -> str:
    """One screen: a line per budget (predicted latency, checked error, skipped block cells, file)."""
    c = plans[0].calibration
    lines = [f"difa front: {len(plans)} plans of {plans[0].model.name or plans[0].model.cls} from one recorded "
             f"trajectory ({c['forwards']} model forwards, {c['wall_time_s']:.1f} s wall, {len(c['inputs'])} inputs, "
             f"seed {c['seed']})",
             f"{'budget':>6} {'predicted':>9} {'error':>8} {'skipped':>7}  plan"]
    for plan, out in zip(plans, outs):
        p = plan.calibration
        kept = f"  (= budget {p['kept_from_budget']}'s plan: less error)" if p.get("kept_from_budget") else ""
        skipped = sum(m != "full" for row in plan.blocks for m in row)
        lines.append(f"{p['budget']:>6} {plan.latency['predicted_fraction']:>9.3f} {p['measured_error']:>8.4f} "
                     f"{skipped:>7}  {out}{kept}")
    lines.append(f"error: final-output relative L1 on the calibration inputs (checked); front plot {figure}")
    return "\n".join(lines)


def weights_mb(pipe) -> float:
    """MB of the denoiser's parameters and buffers as loaded (the model's own memory the cache sits beside)."""
    from difa.adapters import adapter_for

    denoiser = adapter_for(pipe).denoiser(pipe)
    tensors = [*denoiser.parameters(), *denoiser.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def cache_mb(plan: Plan) -> tuple[float, int] | None:
    """(MB the plan's caches hold across steps, batch rows) at the calibration's shapes and dtype, or None."""
    import torch

    from difa.cost import cache_elements
    from difa.techniques.base import LayerShape

    shapes = [LayerShape(**d) for d in plan.flops.get("shapes", [])]
    n = cache_elements(plan, shapes) if shapes else None
    if n is None:
        return None
    size = torch.empty(0, dtype=getattr(torch, str(plan.calibration.get("dtype", "float32")))).element_size()
    return n * size / 2**20, shapes[0].batch


def summary(plan: Plan, path: Path) -> str:
    c = plan.calibration
    counts = " | ".join(f"{k} {v}" for k, v in plan.counts().items())
    goal = f"budget {c['budget']}" if c.get("budget") is not None else f"threshold {c.get('threshold')}"
    lines = [
        f"difa plan written to {path}",
        f"model      {plan.model.cls} ({plan.model.name}): {len(plan.layers)} attention layers, {len(plan.model.blocks)} "
        f"blocks x {plan.steps} steps, {plan.scheduler}, CFG {'on, scale ' + str(plan.guidance_scale) if plan.cfg_enabled else 'off'}",
    ]
    if plan.blocks:
        lines.append("blocks     " + " | ".join(f"{k} {v}" for k, v in plan.block_counts().items()))
    lines.append(f"attention  {counts}")
    if plan.latency:
        lat = plan.latency
        lines.append(f"latency    {100 * lat['predicted_fraction']:.1f}% of full predicted ({lat['predicted_s']:.3g} of "
                     f"{lat['full_s']:.3g} s per call of {lat.get('batch') or len(c['inputs'])} images, measured cost model"
                     + (f"; timed at {', '.join(lat['by_batch'])} images per call, generate / evaluate print it at "
                        "the batch they run" if lat.get("by_batch") else "") + ")")
    if c.get("measured_error") is not None:
        lines.append(f"error      final-output relative L1 {c['measured_error']:.4f} on the calibration inputs (checked)")
    if plan.flops:
        lines.append(f"FLOPs      {100 * plan.flops['fraction']:.1f}% of full attention FLOPs "
                     f"({plan.flops['plan_gflops']:.3g} of {plan.flops['full_gflops']:.3g} GFLOPs per generation)")
    cache = cache_mb(plan)
    if cache is not None:
        lines.append(f"cache      {cache[0]:.3g} MB held across steps at the calibration batch of {cache[1]} rows (CFG "
                     f"halves included; it grows with batch and tokens: python -m difa.evaluate reports it per run)"
                     + (f"; the denoiser's weights: {c['weights_mb']:.3g} MB" if c.get("weights_mb") is not None else "")
                     + (f"; capped at {c['max_cache_mb']:.3g} MB" if c.get("max_cache_mb") is not None else ""))
    lines.append(f"calibrated in {c['wall_time_s']:.1f} s wall, {c['forwards']} model forwards ({c.get('search', 'greedy')} "
                 f"search); {goal}, {len(c['inputs'])} inputs, seed {c['seed']}")
    if c.get("resumed_steps"):
        lines.append(f"resumed    {c['resumed_steps']} decided steps replayed from the checkpoint of a killed run")
    if c.get("skipped_candidates"):
        lines.append("skipped    " + "; ".join(f"{k}: {v}" for k, v in c["skipped_candidates"].items()))
    chars = letters()
    rows = [*zip(plan.model.blocks, plan.blocks), *zip(plan.layers, plan.methods)]
    if len(rows) <= MAX_MAP_LAYERS:
        used = sorted({m for _, r in rows for m in r}, key=list(chars).index)
        legend = ", ".join(f"{chars[m]} {m}" for m in used)
        lines.append(f"plan map   (row = block or attention layer, column = step; {legend}; attention cells of a "
                     "skipped block print '.')")
        ran = {**dict(zip(plan.model.blocks, block_executed(plan.model.blocks, plan.blocks, plan.steps))),
               **dict(zip(plan.layers, attention_executed(plan)))}
        for i, (name, row) in enumerate(rows):
            cells = "".join(chars[x] if ran.get(name, [True] * len(row))[t] else "." for t, x in enumerate(row))
            lines.append(f"  {i:>3} {cells}  {name}")
    return "\n".join(lines)


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="calibrate")
def _hydra_main(cfg: DictConfig) -> None:
    report_errors(lambda: run(cfg))


def main() -> None:
    reject_unplussed_model(sys.argv[1:], "difa.calibrate")
    precheck("calibrate", sys.argv[1:])
    _hydra_main()
