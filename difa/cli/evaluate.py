"""`python -m difa.evaluate [+model=<name>] [plan=<path>|none] [n=2000] [fid=true] [out=<csv>]`: a plan next to the
uncompressed model on the same seeds, one table row per method: FID, class accuracy, fidelity to the baseline
images, attention FLOPs, latency and peak memory. Batches of the methods are interleaved, so machine noise hits
both alike."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from difa import metrics
from difa.adapters import Adapter, get_adapter
from difa.cli.common import (CONF_DIR, REPO_ROOT, call_kwargs, check_no_preset_keys, is_preset, load_model, model_config,
                             preset_from_cfg, reject_unplussed_model, report_errors)
from difa.data import FMNIST_CLASSES, captions
from difa.engine import Engine, apply_plan, remove_plan
from difa.errors import DifaError
from difa.plan import CFG_METHODS, Plan, load_plan

NO_PLAN = "none"
BASELINE = "baseline"
FMNIST = "fmnist"  # model.dataset of the Fashion-MNIST models: FID reference set and classifier apply
MAX_REFERENCE = 10_000  # images in the committed Fashion-MNIST test split
COLUMNS = ["method", "fid", "inception_score", "class_acc", "rel_l1", "psnr_db", "ssim", "attn_flops",
           "s_per_image", "peak_mem_mb"]


@dataclass
class Method:
    name: str
    plan: Plan | None
    images: list[torch.Tensor] = field(default_factory=list)  # per batch: (B, 3, H, W) in [0, 1]
    seconds: float = 0.0
    peak_mb: float = 0.0
    flops: float = math.nan  # attention FLOPs relative to full attention


def resolve(cfg: DictConfig) -> tuple[DictConfig, Plan | None]:
    """Model: +model=<name>, else the one recorded in the plan, else `default_model`."""
    plan = None if str(cfg.plan) == NO_PLAN or is_preset(cfg.plan) else load_plan(cfg.plan)
    if "model" in cfg and cfg.model is not None:
        return cfg.model, plan
    if plan is not None:
        recorded = plan.calibration.get("model_config")
        return (OmegaConf.create(recorded) if recorded else model_config(plan.model.name)), plan
    return model_config(cfg.default_model), plan


def run_settings(cfg: DictConfig, m: DictConfig, plan: Plan | None) -> tuple[int, float]:
    steps = int(cfg.steps if cfg.steps is not None else plan.inference_steps if plan else m.steps)
    default_scale = plan.guidance_scale if plan and plan.guidance_scale is not None else m.guidance_scale
    guidance = float(cfg.guidance_scale if cfg.guidance_scale is not None else default_scale)
    if plan is not None and steps != plan.inference_steps:
        raise DifaError(f"the plan was made for {plan.inference_steps} steps; drop steps={steps} or recalibrate with steps={steps}")
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


def class_inputs(adapter: Adapter, n: int, seed: int) -> tuple[torch.Tensor, list]:
    """Labels cycling 0..9 (n,), and the pipeline inputs: the labels, or one Fashion-MNIST caption per label."""
    labels = [i % len(FMNIST_CLASSES) for i in range(n)]
    inputs = labels if adapter.inputs_kind == "classes" else captions(labels, seed=seed)
    return torch.tensor(labels), inputs


def batch_seed(seed: int, index: int) -> int:
    """Independent, reproducible seed of batch `index`: the same for every method."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def generate_batch(pipe, adapter: Adapter, method: Method, inputs: list, seed: int, steps: int, guidance: float,
                   extra: dict, device: str) -> tuple[torch.Tensor, float, float]:
    """One timed pipeline call with the method's plan applied: images (B, 3, H, W) in [0, 1], seconds, peak MB."""
    engine: Engine | None = apply_plan(pipe, method.plan) if method.plan is not None else None
    try:
        with metrics.PeakMemory(device) as mem:
            t0 = time.perf_counter()
            out = adapter.call_pipeline(pipe, inputs, steps=steps, guidance_scale=guidance, output_type="pt",
                                        generator=torch.Generator(device="cpu").manual_seed(seed), extra=extra)
            images = torch.as_tensor(out.images).float().cpu()  # .cpu() waits for queued CUDA kernels
            seconds = time.perf_counter() - t0
    finally:
        if engine is not None:
            if math.isnan(method.flops):
                method.flops = flops_fraction(method.plan, engine)
            remove_plan(pipe)
    return images, seconds, mem.mb


def flops_fraction(plan: Plan, engine: Engine) -> float:
    """Attention FLOPs of the plan relative to full attention: the plan's record, else from the shapes just run."""
    if "fraction" in plan.flops:
        return float(plan.flops["fraction"])
    from difa.calibration.cost import plan_flops

    shapes = [engine.shapes.get(i) for i in range(len(plan.layers))]
    if any(s is None for s in shapes):
        return math.nan
    return float(plan_flops(plan.methods, shapes, plan.techniques, plan.layers, plan.cfg_enabled)["fraction"])


def generate_all(pipe, adapter: Adapter, methods: list[Method], inputs: list, *, seed: int, steps: int,
                 guidance: float, batch: int, extra: dict, device: str, warmup: bool) -> None:
    from tqdm.auto import tqdm

    chunks = [inputs[i : i + batch] for i in range(0, len(inputs), batch)]
    if warmup:  # first-call costs (allocator, kernels) stay out of the timings
        for m in methods:
            generate_batch(pipe, adapter, m, chunks[0], batch_seed(seed, 0), steps, guidance, extra, device)
    for k, chunk in enumerate(tqdm(chunks, desc="generate", unit="batch")):
        for m in methods if k % 2 == 0 else methods[::-1]:  # alternate who goes first
            images, seconds, mb = generate_batch(pipe, adapter, m, chunk, batch_seed(seed, k), steps, guidance, extra, device)
            m.images.append(images)
            m.seconds += seconds
            m.peak_mb = max(m.peak_mb, mb)


def classifier_dir(path: str) -> Path | None:
    """The classifier folder: relative paths are looked up under the repository root, then the working directory."""
    for p in (REPO_ROOT / path, Path(path)):  # an absolute path stays as it is
        if p.is_dir():
            return p
    return None


def score(methods: list[Method], labels: torch.Tensor, *, fid_ref: np.ndarray | None, net, classifier, batch: int,
          n: int) -> list[dict]:
    base = torch.cat(methods[0].images)  # (N, 3, H, W)
    rows = []
    for m in methods:
        images = torch.cat(m.images)
        row = {"method": m.name, "fid": math.nan, "inception_score": math.nan, "class_acc": math.nan,
               "rel_l1": metrics.relative_l1(images, base), "psnr_db": metrics.psnr(images, base),
               "ssim": metrics.ssim(images, base), "attn_flops": 1.0 if m.plan is None else m.flops,
               "s_per_image": m.seconds / n, "peak_mem_mb": m.peak_mb}
        if fid_ref is not None:
            feats = metrics.inception_features(images, batch_size=batch, progress=True, net=net)
            row["fid"] = metrics.fid_from_features(feats, fid_ref)
            if net.logit_weight is not None:
                row["inception_score"] = metrics.inception_score(feats, net)[0]
        if classifier is not None:
            row["class_acc"] = metrics.class_accuracy(images, labels, classifier, batch_size=batch)
        rows.append(row)
    return rows


def run(cfg: DictConfig):
    import pandas as pd

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

    labels, inputs = class_inputs(adapter, n, int(cfg.seed))
    check_no_preset_keys(cfg)
    pipe = load_model(m, cfg.device, cfg.dtype)
    pipe.set_progress_bar_config(disable=True)
    if is_preset(cfg.plan):
        plan = preset_from_cfg(cfg, pipe, m, steps, guidance, list(dict.fromkeys(inputs))[:10])
    if plan is not None:  # fail before generating anything if the plan does not fit the model
        apply_plan(pipe, plan)
        remove_plan(pipe)
    label = str(cfg.plan).replace(":", "_") if is_preset(cfg.plan) else Path(str(cfg.plan)).stem
    methods = [Method(BASELINE, None)] + ([Method(label, plan)] if plan is not None else [])
    generate_all(pipe, adapter, methods, inputs, seed=int(cfg.seed), steps=steps, guidance=guidance, batch=batch,
                 extra=call_kwargs(m), device=cfg.device, warmup=bool(cfg.warmup))
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
    rows = score(methods, labels, fid_ref=fid_ref, net=net, classifier=classifier, batch=batch, n=n)

    mem = metrics.PeakMemory(cfg.device).kind
    table = pd.DataFrame(rows, columns=COLUMNS).dropna(axis=1, how="all")
    record = table.assign(model=m.name, plan=str(cfg.plan), n=n, ref_n=ref_n if fid_ref is not None else None,
                          steps=steps, guidance_scale=guidance, seed=int(cfg.seed), batch=batch, device=cfg.device,
                          dtype=cfg.dtype, mem_measure=mem)
    name = f"{m.name}_{methods[-1].name if plan is not None else 'full'}_n{n}_s{steps}"
    out = Path(cfg.out) if cfg.out else Path("outputs") / "evaluate" / f"{name}.csv"
    metrics.save_atomic(out, lambda f: f.write(record.to_csv(index=False).encode()))
    print(report(table, m.name, n, steps, guidance, mem, notes, out))
    return table, out


def report(table, model: str, n: int, steps: int, guidance: float, mem: str, notes: list[str], out: Path) -> str:
    lines = [
        f"difa evaluation of {model}: {n} samples, {steps} steps, guidance {guidance}, same seeds for every method",
        table.to_string(index=False, float_format=lambda v: f"{v:.4g}"),
        ("rel_l1 / psnr_db / ssim: against the baseline images; attn_flops: attention FLOPs relative to full; "
         f"s_per_image: wall clock, methods interleaved; peak_mem_mb: {metrics.MEMORY_MEASURES[mem]}"),
        *notes,
        f"written to {out}",
    ]
    return "\n".join(lines)


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="evaluate")
def _hydra_main(cfg: DictConfig) -> None:
    report_errors(lambda: run(cfg))


def main() -> None:
    reject_unplussed_model(sys.argv[1:], "difa.evaluate")
    _hydra_main()
