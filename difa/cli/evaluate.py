"""`python -m difa.evaluate [+model=<name>] [plan=<path>|none] [n=2000] [fid=true] [out=<csv>]`: a plan next to the
uncompressed model on the same seeds, one table row per method: FID, class accuracy, fidelity to the baseline
images, attention FLOPs, latency and peak memory. Batches of the methods are interleaved, so machine noise hits
both alike."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from difa import metrics
from difa.adapters import Adapter, get_adapter
from difa.cli.common import (CONF_DIR, call_kwargs, check_no_preset_keys, hook_from_cfg, is_preset, load_model,
                             model_config, preset_from_cfg, reject_unplussed_model, report_errors)
from difa.data import FMNIST_CLASSES, captions
from difa.engine import Engine, apply_plan, remove_plan
from difa.errors import DifaError
from difa.peers import DiffusersHook, is_hook
from difa.plan import CFG_METHODS, Plan, load_plan

NO_PLAN = "none"
BASELINE = "baseline"
FMNIST = "fmnist"  # model.dataset of the Fashion-MNIST models: FID reference set and classifier apply
MAX_REFERENCE = 10_000  # images in the committed Fashion-MNIST test split
COLUMNS = ["method", "fid", "inception_score", "class_acc", "rel_l1", "psnr_db", "ssim", "attn_flops", "macs",
           "gmacs_per_image", "s_per_image", "rel_latency", "pred_latency", "peak_mem_mb"]


@dataclass
class Method:
    name: str
    plan: Plan | None
    hook: DiffusersHook | None = None  # a diffusers caching hook instead of a plan (difa.peers)
    images: list[torch.Tensor] = field(default_factory=list)  # per batch: (B, 3, H, W) in [0, 1]
    seconds: float = 0.0  # timed batches only
    timed: int = 0  # images in the timed batches
    peak_mb: float = 0.0
    flops: float = math.nan  # attention FLOPs relative to full attention
    counted: tuple[float, float] = (math.nan, math.nan)  # FlopCounterMode FLOPs of one image: (total, attention)
    cached: bool = False  # images (and features) came from the baseline cache

    @property
    def compressed(self) -> bool:
        return self.plan is not None or self.hook is not None


def resolve(cfg: DictConfig) -> tuple[DictConfig, Plan | None]:
    """Model: +model=<name>, else the one recorded in the plan, else `default_model`."""
    plan = None if str(cfg.plan) == NO_PLAN or is_preset(cfg.plan) or is_hook(cfg.plan) else load_plan(cfg.plan)
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


@contextmanager
def applied(pipe, method: Method):
    """The method's plan or hook applied to `pipe`, removed on exit."""
    if method.hook is not None:
        method.hook.apply(pipe)
        try:
            yield
        finally:
            method.hook.remove(pipe)
        return
    engine: Engine | None = apply_plan(pipe, method.plan) if method.plan is not None else None
    try:
        yield
    finally:
        if engine is not None:
            if math.isnan(method.flops):
                method.flops = flops_fraction(method.plan, engine)
            remove_plan(pipe)


def generate_batch(pipe, adapter: Adapter, method: Method, inputs: list, seed: int, steps: int, guidance: float,
                   extra: dict, device: str) -> tuple[torch.Tensor, float, float]:
    """One timed pipeline call with the method's plan applied: images (B, 3, H, W) in [0, 1], seconds, peak MB."""
    with applied(pipe, method):
        with metrics.PeakMemory(device) as mem:
            t0 = time.perf_counter()
            out = adapter.call_pipeline(pipe, inputs, steps=steps, guidance_scale=guidance, output_type="pt",
                                        generator=torch.Generator(device="cpu").manual_seed(seed), extra=extra)
            images = torch.as_tensor(out.images).float().cpu()  # .cpu() waits for queued CUDA kernels
            seconds = time.perf_counter() - t0
    return images, seconds, mem.mb


def count_flops(pipe, adapter: Adapter, method: Method, inputs: list, steps: int, guidance: float, extra: dict) -> None:
    """FLOPs of one image (CFG batch included) under torch.utils.flop_counter: total and inside attention modules.
    SDPA runs on its MATH backend, which the counter sees (CPU's fused kernel counts as 0; see tests/test_flops.py)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    names = {n for n, _ in adapter.planned_layers(adapter.denoiser(pipe))}
    with applied(pipe, method), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        adapter.call_pipeline(pipe, inputs[:1], steps=steps, guidance_scale=guidance, output_type="pt",
                              generator=torch.Generator(device="cpu").manual_seed(0), extra=extra)
    counts = fc.get_flop_counts()
    attn = sum(sum(ops.values()) for key, ops in counts.items() if key.split(".", 1)[-1] in names)
    method.counted = (float(fc.get_total_flops()), float(attn))


def flops_fraction(plan: Plan, engine: Engine) -> float:
    """Attention FLOPs of the plan relative to full attention: the plan's record, else from the shapes just run."""
    if "fraction" in plan.flops:
        return float(plan.flops["fraction"])
    from difa.calibration.cost import plan_flops

    shapes = [engine.shapes.get(i) for i in range(len(plan.layers))]
    if any(s is None for s in shapes):
        return math.nan
    from difa.plan import attention_executed

    return float(plan_flops(plan.methods, shapes, plan.techniques, plan.layers, plan.cfg_enabled,
                            attention_executed(plan))["fraction"])


def generate_all(pipe, adapter: Adapter, methods: list[Method], inputs: list, *, seed: int, steps: int,
                 guidance: float, batch: int, extra: dict, device: str, warmup: bool, time_batches: int | None) -> None:
    """Every method's images, batch by batch, methods interleaved. A method whose images are cached is run only on
    the first `time_batches` batches, for its latency next to the others; the others are timed on those too."""
    from tqdm.auto import tqdm

    chunks = [inputs[i : i + batch] for i in range(0, len(inputs), batch)]
    timed = len(chunks) if time_batches is None else min(len(chunks), time_batches)
    if warmup:  # first-call costs (allocator, kernels) stay out of the timings
        for m in methods:
            generate_batch(pipe, adapter, m, chunks[0], batch_seed(seed, 0), steps, guidance, extra, device)
    for k, chunk in enumerate(tqdm(chunks, desc="generate", unit="batch")):
        for m in methods if k % 2 == 0 else methods[::-1]:  # alternate who goes first
            if m.cached and k >= timed:
                continue
            images, seconds, mb = generate_batch(pipe, adapter, m, chunk, batch_seed(seed, k), steps, guidance, extra, device)
            if not m.cached:
                m.images.append(images)
            if k < timed:
                m.seconds += seconds
                m.timed += len(chunk)
            m.peak_mb = max(m.peak_mb, mb)
    for m in methods:
        count_flops(pipe, adapter, m, inputs, steps, guidance, extra)


# ---------------------------------------------------------------- baseline cache
def baseline_key(pipe, adapter: Adapter, m: DictConfig, inputs: list, *, seed: int, steps: int, guidance: float,
                 batch: int, device: str, dtype: str) -> str:
    """Everything the baseline images depend on: weights (hashed), inputs, seeds, settings, versions, threads."""
    import diffusers

    digest = hashlib.sha256()
    for module in (adapter.denoiser(pipe), getattr(pipe, "vae", None)):
        for name, t in (module.state_dict().items() if module is not None else ()):
            digest.update(name.encode())
            digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    payload = {"weights": digest.hexdigest(), "scheduler": dict(pipe.scheduler.config), "family": m.family,
               "inputs": [str(x) for x in inputs], "call_kwargs": call_kwargs(m), "seed": seed, "steps": steps,
               "guidance": guidance, "batch": batch, "device": device, "dtype": dtype,
               "threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def load_baseline(cache: Path | None, base: Method) -> bool:
    """Fill the baseline's images from the cache; True on a hit."""
    if cache is None or not cache.is_file():
        return False
    state = torch.load(cache, weights_only=True)
    base.images, base.cached = list(state["images"]), True
    return True


def save_baseline(cache: Path | None, base: Method) -> None:
    if cache is None or base.cached:
        return
    metrics.save_atomic(cache, lambda f: torch.save({"images": base.images}, f))


def classifier_dir(path: str) -> Path | None:
    """The classifier folder: as given (absolute or relative to the working directory), else a bundled data/<...>."""
    from difa.models import resolve_path

    p = Path(resolve_path(path))
    return p if p.is_dir() else None


def score(methods: list[Method], labels: torch.Tensor, *, fid_ref: np.ndarray | None, net, classifier, batch: int,
          feature_cache: Path | None = None) -> list[dict]:
    base = torch.cat(methods[0].images)  # (N, 3, H, W)
    total0, attn0 = methods[0].counted
    rows = []
    for m in methods:
        images = torch.cat(m.images)
        total, attn = m.counted
        s_img = m.seconds / m.timed if m.timed else math.nan
        row = {"method": m.name, "fid": math.nan, "inception_score": math.nan, "class_acc": math.nan,
               "rel_l1": metrics.relative_l1(images, base), "psnr_db": metrics.psnr(images, base),
               "ssim": metrics.ssim(images, base),
               # plans: the cost model (the ideal window kernel); hooks have none, so the counted FLOPs
               "attn_flops": 1.0 if not m.compressed else m.flops if m.plan is not None else attn / attn0,
               "macs": total / total0, "gmacs_per_image": total / 2e9, "s_per_image": s_img,
               "rel_latency": s_img / (methods[0].seconds / methods[0].timed) if methods[0].timed else math.nan,
               # the plan's measured cost model (calibration), next to the measured rel_latency
               "pred_latency": 1.0 if not m.compressed else predicted_latency(m.plan),
               "peak_mem_mb": m.peak_mb}
        if fid_ref is not None:
            cached = feature_cache if m is methods[0] and feature_cache is not None else None
            if cached is not None and cached.is_file():
                feats = np.load(cached)
            else:
                feats = metrics.inception_features(images, batch_size=batch, progress=True, net=net)
                if cached is not None:
                    metrics.save_atomic(cached, lambda f: np.save(f, feats))
            row["fid"] = metrics.fid_from_features(feats, fid_ref)
            if net.logit_weight is not None:
                row["inception_score"] = metrics.inception_score(feats, net)[0]
        if classifier is not None:
            row["class_acc"] = metrics.class_accuracy(images, labels, classifier, batch_size=batch)
        rows.append(row)
    return rows


def predicted_latency(plan: Plan | None) -> float:
    if plan is None or "predicted_fraction" not in plan.latency:
        return math.nan
    return float(plan.latency["predicted_fraction"])


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
    if plan is not None:  # fail before generating anything if the plan does not fit the model
        apply_plan(pipe, plan)
        remove_plan(pipe)
    if hook is not None:
        hook.apply(pipe)
        hook.remove(pipe)
    label = (str(cfg.plan).replace(":", "_") if is_preset(cfg.plan) or is_hook(cfg.plan)
             else Path(str(cfg.plan)).stem)
    base = Method(BASELINE, None)
    methods = [base] + ([Method(label, plan, hook)] if plan is not None or hook is not None else [])
    cache = feature_cache = None
    if cfg.get("baseline_cache"):
        key = baseline_key(pipe, adapter, m, inputs, seed=int(cfg.seed), steps=steps, guidance=guidance, batch=batch,
                           device=cfg.device, dtype=cfg.dtype)
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
    rows = score(methods, labels, fid_ref=fid_ref, net=net, classifier=classifier, batch=batch,
                 feature_cache=feature_cache)

    mem = metrics.PeakMemory(cfg.device).kind
    table = pd.DataFrame(rows, columns=COLUMNS).dropna(axis=1, how="all")
    record = table.assign(model=m.name, plan=str(cfg.plan), n=n, ref_n=ref_n if fid_ref is not None else None,
                          steps=steps, guidance_scale=guidance, seed=int(cfg.seed), batch=batch, device=cfg.device,
                          dtype=cfg.dtype, mem_measure=mem, timed_images=[x.timed for x in methods],
                          threads=torch.get_num_threads())
    name = f"{m.name}_{methods[-1].name if len(methods) > 1 else 'full'}_n{n}_s{steps}_g{guidance}_seed{int(cfg.seed)}"
    out = Path(cfg.out) if cfg.out else Path("outputs") / "evaluate" / f"{name}.csv"
    metrics.save_atomic(out, lambda f: f.write(record.to_csv(index=False).encode()))
    print(report(table, m.name, n, steps, guidance, mem, notes, out))
    return table, out


def report(table, model: str, n: int, steps: int, guidance: float, mem: str, notes: list[str], out: Path) -> str:
    lines = [
        f"difa evaluation of {model}: {n} samples, {steps} steps, guidance {guidance}, same seeds for every method",
        table.to_string(index=False, float_format=lambda v: f"{v:.4g}"),
        ("rel_l1 / psnr_db / ssim: against the baseline images; attn_flops: attention FLOPs relative to full; "
         "macs: all multiply-adds of one image relative to the baseline (torch.utils.flop_counter); "
         f"s_per_image: wall clock, methods interleaved; rel_latency: vs the baseline timed on the same batches; "
         f"peak_mem_mb: {metrics.MEMORY_MEASURES[mem]}"),
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
