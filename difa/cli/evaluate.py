"""`python -m difa.evaluate [+model=<name>] [plan=<path>|none] [n=2000] [fid=true] [out=<csv>]`: the Hydra CLI over
difa.evaluation (a plan next to the uncompressed model on the same seeds, one table row per method). This file
only turns the config into library calls."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from difa import evaluation, metrics
from difa.adapters import get_adapter
from difa.cli.common import (CONF_DIR, call_kwargs, check_known_keys, check_no_preset_keys, check_settings,
                             hook_from_cfg, is_preset, load_model, model_config, preset_from_cfg,
                             plan_model_config, prepare_hook, reject_unplussed_model, report_errors, transfer)
from difa.engine import apply_plan, remove_plan
from difa.errors import DifaError
from difa.evaluation import (BASELINE, COLUMNS, FMNIST, MAX_REFERENCE, NO_PLAN, Method, baseline_key, class_inputs,
                             classifier_dir, generate_all, load_baseline, report, save_baseline)
from difa.peers import is_hook
from difa.plan import CFG_METHODS, Plan, load_plan


def resolve(cfg: DictConfig) -> tuple[DictConfig, Plan | None]:
    """Model: +model=<name>, else the one recorded in the plan, else `default_model`."""
    plan = None if str(cfg.plan) == NO_PLAN or is_preset(cfg.plan) or is_hook(cfg.plan) else load_plan(cfg.plan)
    if "model" in cfg and cfg.model is not None:
        return cfg.model, plan
    if plan is not None:
        return plan_model_config(plan), plan
    return model_config(cfg.default_model), plan


def run_settings(cfg: DictConfig, m: DictConfig, plan: Plan | None) -> tuple[int, float]:
    steps = int(cfg.steps if cfg.steps is not None else plan.inference_steps if plan else m.steps)
    default_scale = plan.guidance_scale if plan and plan.guidance_scale is not None else m.guidance_scale
    guidance = float(cfg.guidance_scale if cfg.guidance_scale is not None else default_scale)
    if plan is not None and guidance <= 1 and any(x in CFG_METHODS for x in plan.counts()):
        raise DifaError(f"the plan shares attention across CFG halves but guidance_scale={guidance} turns CFG off; use guidance_scale > 1")
    return steps, guidance


def check_counts(cfg: DictConfig, fid: bool) -> tuple[int, int, int]:
    n, batch = _int(cfg, "n"), _int(cfg, "batch")
    ref_n = _int(cfg, "ref_n") if cfg.ref_n is not None else min(n, MAX_REFERENCE)
    if n < 1:
        raise DifaError(f"n must be >= 1 (got {n}); e.g. n=2000 for FID")
    if batch < 1:
        raise DifaError(f"batch must be >= 1 (got {batch})")
    if fid and (n < 2 or not 2 <= ref_n <= MAX_REFERENCE):
        raise DifaError(f"FID needs n >= 2 and 2 <= ref_n <= {MAX_REFERENCE} (got n={n}, ref_n={ref_n}); or pass fid=false")
    if cfg.fid_source not in metrics.FID_SOURCES:
        raise DifaError(f"unknown fid_source {cfg.fid_source!r}; use one of {', '.join(metrics.FID_SOURCES)}")
    return n, batch, ref_n


def _int(cfg: DictConfig, key: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DifaError(f"{key} must be an integer (got {value!r})")
    return value


def run(cfg: DictConfig):
    import pandas as pd

    check_known_keys(cfg, "evaluate")
    check_settings(cfg)
    m, plan = resolve(cfg)
    adapter = get_adapter(m.family)
    fmnist = m.get("dataset") == FMNIST
    n, batch, ref_n = check_counts(cfg, fid=bool(cfg.fid) and fmnist)
    steps, guidance = run_settings(cfg, m, plan)
    notes = []
    clf_dir = classifier_dir(str(cfg.classifier)) if fmnist else None
    if not fmnist:
        notes.append(f"FID and class accuracy skipped: model {m.name} has no reference set (model.dataset is not {FMNIST})")
    else:
        if not cfg.fid:
            notes.append("FID skipped (fid=false)")
        if clf_dir is None:
            notes.append(f"class accuracy skipped: no classifier at {cfg.classifier} (train it or pass classifier=<dir>)")
    notes.append("CLIP score skipped: no CLIP weights are available offline (torchmetrics would download them)")
    time_batches = cfg.get("time_batches")
    if time_batches is not None and (isinstance(time_batches, bool) or not isinstance(time_batches, int) or time_batches < 1):
        raise DifaError(f"time_batches must be an integer >= 1 or null (got {time_batches!r})")

    labels, inputs = class_inputs(adapter, n, int(cfg.seed))
    check_no_preset_keys(cfg)
    hook = hook_from_cfg(cfg) if is_hook(cfg.plan) else None
    pipe = load_model(m, cfg.device, cfg.dtype)
    pipe.set_progress_bar_config(disable=True)
    if is_preset(cfg.plan):
        plan = preset_from_cfg(cfg, pipe, m, steps, guidance, list(dict.fromkeys(inputs))[:10])
    elif plan is not None and steps != plan.inference_steps:
        plan = transfer(plan, pipe, steps)
    if plan is not None:  # fail before generating anything if the plan does not fit the model
        apply_plan(pipe, plan)
        remove_plan(pipe)
    if hook is not None:
        note = prepare_hook(hook, pipe, adapter, m, inputs, steps=steps, guidance=guidance, seed=int(cfg.seed))
        if note:
            notes.append(note)
        hook.apply(pipe)
        hook.remove(pipe)
    label = (str(cfg.plan).replace(":", "_") if is_preset(cfg.plan) or is_hook(cfg.plan)
             else Path(str(cfg.plan)).stem)
    base = Method(BASELINE, None)
    methods = [base] + ([Method(label, plan, hook)] if plan is not None or hook is not None else [])
    cache = feature_cache = None
    if cfg.get("baseline_cache"):
        key = baseline_key(pipe, adapter, m.family, call_kwargs(m), inputs, seed=int(cfg.seed), steps=steps,
                           guidance=guidance, batch=batch, device=cfg.device, dtype=cfg.dtype)
        cache = Path(str(cfg.baseline_cache)) / f"{m.name}_{key}.pt"
        feature_cache = cache.with_name(f"{cache.stem}_{cfg.fid_source}.npy")
        if load_baseline(cache, base):
            notes.append(f"baseline images from {cache}; latency of both timed side by side on the first "
                         f"{time_batches or 'all'} batches")
    generate_all(pipe, adapter, methods, inputs, seed=int(cfg.seed), steps=steps, guidance=guidance, batch=batch,
                 extra=call_kwargs(m), device=cfg.device, warmup=bool(cfg.warmup),
                 time_batches=time_batches if base.cached else None)
    save_baseline(cache, base)
    del pipe

    net = fid_ref = classifier = None
    if fmnist and cfg.fid:
        net = metrics.load_fid_inception(cfg.fid_source, cfg.device)
        fid_ref = metrics.reference_features(ref_n, cfg.cache_dir, net, batch_size=batch, progress=True)
        if net.logit_weight is None:
            notes.append(f"Inception Score not available from fid_source={cfg.fid_source} (no softmax layer)")
    if clf_dir is not None:
        from difa.zoo import FMNISTClassifier

        classifier = FMNISTClassifier.from_pretrained(str(clf_dir)).to(cfg.device).eval()
    rows, image_rows = evaluation.score(methods, labels, fid_ref=fid_ref, net=net, classifier=classifier, batch=batch,
                 feature_cache=feature_cache)

    mem = metrics.PeakMemory(cfg.device).kind
    table = pd.DataFrame(rows, columns=COLUMNS).dropna(axis=1, how="all")
    record = table.assign(model=m.name, plan=str(cfg.plan), n=n, ref_n=ref_n if fid_ref is not None else None,
                          steps=steps, guidance_scale=guidance, seed=int(cfg.seed), batch=batch, device=cfg.device,
                          dtype=cfg.dtype, mem_measure=mem, timed_images=[x.timed for x in methods],
                          threads=torch.get_num_threads())
    if hook is not None and getattr(hook, "calibration", None):  # a peer's own calibration (MagCache, SmoothCache)
        record = record.assign(calib_forwards=[0, hook.calibration["forwards"]],
                               calib_s=[0.0, hook.calibration["seconds"]])
    name = f"{m.name}_{methods[-1].name if len(methods) > 1 else 'full'}_n{n}_s{steps}_g{guidance}_seed{int(cfg.seed)}"
    out = Path(cfg.out) if cfg.out else Path("outputs") / "evaluate" / f"{name}.csv"
    if hook is not None and getattr(hook, "calibration", None) and getattr(hook, "schedule", None):
        import json  # SmoothCache's calibrated schedule, in its own JSON format

        target = out.with_name(f"{out.stem}_smoothcache.json")
        metrics.save_atomic(target, lambda f: f.write(json.dumps(hook.schedule).encode()))
        notes.append(f"SmoothCache schedule written to {target} (reuse it with plan=smoothcache:{target})")
    images_out = out.with_name(f"{out.stem}_images.csv")  # per image: what the intervals come from
    per_image = pd.DataFrame(image_rows).reindex(columns=[c for c in evaluation.IMAGE_COLUMNS
                                                         if any(c in r for r in image_rows)])
    metrics.save_atomic(images_out, lambda f: f.write(per_image.to_csv(index=False).encode()))
    metrics.save_atomic(out, lambda f: f.write(record.to_csv(index=False).encode()))
    print(report(table, m.name, n, steps, guidance, mem, notes, out))
    return table, out


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="evaluate")
def _hydra_main(cfg: DictConfig) -> None:
    report_errors(lambda: run(cfg))


def main() -> None:
    reject_unplussed_model(sys.argv[1:], "difa.evaluate")
    _hydra_main()
