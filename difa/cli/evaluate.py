"""`python -m difa.evaluate [+model=<name>] [plan=<path>|none] [n=2000] [fid=true] [out=<csv>]`: the Hydra CLI over
difa.evaluation (a plan next to the uncompressed model on the same seeds, one table row per method). This file
only turns the config into library calls."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from difa.cli.common import (CONF_DIR, HOOK_KEYS, PRESET_KEYS, check_known_keys, check_model, check_no_preset_keys,
                             check_settings, user_inputs,
                             is_preset, load_model, model_config, plan_model_config, precheck, reject_unplussed_model,
                             report_errors)
from difa.evaluation import NO_PLAN, evaluate
from difa.errors import need
from difa.evaluation_run import check_out
from difa.files import check_target
from difa.peers import is_hook
from difa.plan import load_plan


def resolve(cfg: DictConfig) -> DictConfig:
    """Model: +model=<name>, else the one recorded in the plan, else `default_model`. A plan file is read here even
    with +model (evaluate reads it again), so that a missing or broken one is the first error."""
    plan = None if str(cfg.plan) == NO_PLAN or is_preset(cfg.plan) or is_hook(cfg.plan) else load_plan(cfg.plan)
    if "model" in cfg and cfg.model is not None:
        return cfg.model
    if plan is not None:
        return plan_model_config(plan)
    return model_config(cfg.default_model)


EVAL_MODULES = ("torchvision", "pytorch_fid", "torchmetrics", "scipy", "pandas", "matplotlib")  # the eval extra


def run(cfg: DictConfig):
    need("eval", EVAL_MODULES, "difa evaluate")
    check_known_keys(cfg, "evaluate")
    check_settings(cfg)
    m = resolve(cfg)
    check_model(m, cfg)
    check_no_preset_keys(cfg)  # so only the keys of this plan's preset or peer are set
    out = check_out(cfg.out) if cfg.out else None  # before the model loads and any image is made
    if cfg.get("save_plan"):
        check_target(cfg.save_plan, "save_plan")
    params = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v  # timestep_range: a plain list
              for k in (PRESET_KEYS if is_preset(cfg.plan) else HOOK_KEYS) if (v := cfg.get(k)) is not None}
    result = evaluate(
        model=OmegaConf.to_container(m, resolve=True), load=lambda: load_model(m, cfg.device, cfg.dtype),
        plan=str(cfg.plan), params=params, n=cfg.n, seed=cfg.seed, steps=cfg.steps,
        guidance_scale=cfg.guidance_scale, batch=cfg.batch, warmup=cfg.warmup, fid=cfg.fid, fid_source=cfg.fid_source,
        ref_n=cfg.ref_n, cache_dir=cfg.cache_dir, classifier=cfg.classifier, baseline_cache=cfg.get("baseline_cache"),
        time_batches=cfg.get("time_batches"), device=cfg.device, dtype=cfg.dtype, save_plan=cfg.get("save_plan"),
        inputs=user_inputs(cfg))
    out = result.save(out or Path("outputs") / "evaluate" / f"{result.name}.csv")
    print(result.report(out))
    return result.table, out


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="evaluate")
def _hydra_main(cfg: DictConfig) -> None:
    report_errors(lambda: run(cfg))


def main() -> None:
    reject_unplussed_model(sys.argv[1:], "difa.evaluate")
    precheck("evaluate", sys.argv[1:])
    _hydra_main()
