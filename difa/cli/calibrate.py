"""`python -m difa.calibrate [+model=<name>] threshold=...`: calibrate a plan, save it, print a summary."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from difa.calibration import calibrate_pipeline
from difa.cli.common import CONF_DIR, call_kwargs, load_model, model_config, reject_unplussed_model, report_errors, take_inputs
from difa.plan import Plan

# One character per cell in the summary's plan map.
METHOD_CHARS = {"full": "F", "wars": "W", "ast": "A", "asc": "C", "wars+asc": "X", "tome": "M", "agent": "G",
                "tgate": "T"}
MAX_MAP_LAYERS = 40


def resolve_model(cfg: DictConfig) -> DictConfig:
    return cfg.model if "model" in cfg and cfg.model is not None else model_config(cfg.default_model)


def run(cfg: DictConfig) -> tuple[Plan, Path]:
    m = resolve_model(cfg)
    steps = int(cfg.steps if cfg.steps is not None else m.steps)
    guidance = float(cfg.guidance_scale if cfg.guidance_scale is not None else m.guidance_scale)
    inputs = take_inputs(m.inputs, cfg.n_calib if cfg.n_calib is not None else m.get("n_calib"))
    pipe = load_model(m, cfg.device, cfg.dtype)
    plan = calibrate_pipeline(
        pipe, inputs, threshold=cfg.threshold, steps=steps, guidance_scale=guidance, seed=int(cfg.seed),
        candidates=list(cfg.candidates), window=cfg.window, loss_on=str(cfg.loss_on), call_kwargs=call_kwargs(m),
        name=m.name,
        techniques=OmegaConf.to_container(cfg.get("techniques") or OmegaConf.create({}), resolve=True),
    )
    record = {**plan.calibration, "model_config": OmegaConf.to_container(m, resolve=True), "device": cfg.device, "dtype": cfg.dtype}
    plan = plan.with_(calibration=record)
    out = Path(cfg.out) if cfg.out else Path("plans") / f"{m.name}_d{cfg.threshold}_s{steps}.json"
    plan.save(out)
    from difa.plots import plan_heatmap

    heatmap = plan_heatmap(plan, out.with_suffix(".png"))
    print(summary(plan, out) + f"\nheatmap    {heatmap}")
    return plan, out


def summary(plan: Plan, path: Path) -> str:
    c = plan.calibration
    counts = " | ".join(f"{k} {v}" for k, v in plan.counts().items())
    lines = [
        f"difa plan written to {path}",
        f"model      {plan.model.cls} ({plan.model.name}): {len(plan.layers)} attention layers x {plan.steps} steps, "
        f"{plan.scheduler}, CFG {'on, scale ' + str(plan.guidance_scale) if plan.cfg_enabled else 'off'}",
        f"methods    {counts}",
        f"attention  {100 * plan.flops['fraction']:.1f}% of full attention FLOPs "
        f"({plan.flops['plan_gflops']:.3g} of {plan.flops['full_gflops']:.3g} GFLOPs per generation)",
        f"calibrated in {c['wall_time_s']:.1f} s wall, {c['forwards']} model forwards; threshold {c['threshold']}, "
        f"{len(c['inputs'])} inputs, seed {c['seed']}",
    ]
    if c.get("skipped_candidates"):
        lines.append("skipped    " + "; ".join(f"{k}: {v}" for k, v in c["skipped_candidates"].items()))
    if len(plan.layers) <= MAX_MAP_LAYERS:
        legend = ", ".join(f"{ch} {m}" for m, ch in METHOD_CHARS.items())
        lines.append(f"plan map   (row = layer, column = step; {legend})")
        for i, row in enumerate(plan.methods):
            lines.append(f"  {i:>3} " + "".join(METHOD_CHARS.get(x, "?") for x in row) + f"  {plan.layers[i]}")
    return "\n".join(lines)


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="calibrate")
def _hydra_main(cfg: DictConfig) -> None:
    report_errors(lambda: run(cfg))


def main() -> None:
    reject_unplussed_model(sys.argv[1:], "difa.calibrate")
    _hydra_main()
