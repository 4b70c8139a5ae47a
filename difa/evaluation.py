"""Evaluation as a library: a plan (or a diffusers hook) next to the uncompressed model on the same seeds, one
row per method: FID, class accuracy, fidelity to the baseline images, attention FLOPs, counted MACs, latency
(measured, and the plan's prediction) and peak memory. Batches of the methods are interleaved, so machine noise
hits both alike. One whole run (check, load, build the plan or peer, generate, score): `evaluate`, in
difa/evaluation_run.py and re-exported here. `difa/cli/evaluate.py` is the thin Hydra CLI over it
(`python -m difa.evaluate`)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from difa import fid as fid_metrics, metrics
from difa.adapters import Adapter
from difa.data import FMNIST_CLASSES, captions
from difa.engine import Engine
from difa.apply import apply_plan, remove_plan
from difa.peers import CacheDit, DiffusersHook
from difa.plan import Plan

NO_PLAN = "none"
BASELINE = "baseline"
FMNIST = "fmnist"  # model.dataset of the Fashion-MNIST models: FID reference set and classifier apply
MAX_REFERENCE = 10_000  # images in the committed Fashion-MNIST test split
COLUMNS = ["method", "fid", "inception_score", "class_acc", "class_acc_lo", "class_acc_hi", "rel_l1", "rel_l1_lo",
           "rel_l1_hi", "psnr_db", "psnr_db_lo", "psnr_db_hi", "ssim", "ssim_lo", "ssim_hi", "attn_flops", "macs",
           "gmacs_per_image", "s_per_image", "rel_latency", "rel_latency_min", "rel_latency_max", "timed_batches",
           "pred_latency", "peak_mem_mb", "cache_mb"]
# per image of every method, next to the table (<out>_images.csv): what the intervals are computed from
IMAGE_COLUMNS = ["method", "image", "label", "l1_num", "l1_den", "mse", "ssim", "class_hit"]


@dataclass
class Method:
    name: str
    plan: Plan | None
    hook: DiffusersHook | CacheDit | None = None  # a caching peer instead of a plan (difa.peers)
    images: list[torch.Tensor] = field(default_factory=list)  # per batch: (B, 3, H, W) in [0, 1]
    seconds: float = 0.0  # timed batches only
    batch_seconds: list[float] = field(default_factory=list)  # per timed batch: seconds per image
    timed: int = 0  # images in the timed batches
    peak_mb: float = 0.0
    flops: float = math.nan  # attention FLOPs relative to full attention
    counted: tuple[float, float] = (math.nan, math.nan)  # FlopCounterMode FLOPs of one image: (total, attention)
    cached: bool = False  # images (and features) came from the baseline cache
    cache_mb: float = 0.0  # most MB the plan's engine held across steps (Engine.peak_cache_bytes); NaN for hooks

    @property
    def compressed(self) -> bool:
        return self.plan is not None or self.hook is not None


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
            held = max(engine.peak_cache_bytes, engine.cache_bytes()) / 2**20
            method.cache_mb = max(method.cache_mb, held)
            if math.isnan(method.flops):
                method.flops = flops_fraction(method.plan, engine)
            remove_plan(pipe)


def call(pipe, adapter: Adapter, inputs: list, *, seed: int, steps: int, guidance: float, extra: dict):
    """One pipeline call at the run's settings, tensors out ("pt"), seeded by a CPU generator like every method's."""
    return adapter.call_pipeline(pipe, inputs, steps=steps, guidance_scale=guidance, output_type="pt",
                                 generator=torch.Generator(device="cpu").manual_seed(seed), extra=extra)


def generate_batch(pipe, adapter: Adapter, method: Method, inputs: list, seed: int, steps: int, guidance: float,
                   extra: dict, device: str) -> tuple[torch.Tensor, float, float]:
    """One timed pipeline call with the method's plan applied: images (B, 3, H, W) in [0, 1], seconds, peak MB."""
    with applied(pipe, method):
        with metrics.PeakMemory(device) as mem:
            t0 = time.perf_counter()
            out = call(pipe, adapter, inputs, seed=seed, steps=steps, guidance=guidance, extra=extra)
            images = torch.as_tensor(adapter.outputs(out)).float().cpu()  # .cpu() waits for queued CUDA kernels
            images = images.flatten(0, images.ndim - 4)  # videos (B, F, 3, H, W): every frame an image
            seconds = time.perf_counter() - t0
    return images, seconds, mem.mb


def count_flops(pipe, adapter: Adapter, method: Method, inputs: list, steps: int, guidance: float, extra: dict) -> None:
    """FLOPs of one image (CFG batch included) under torch.utils.flop_counter: total and inside attention modules.
    SDPA runs on its MATH backend, which the counter sees (CPU's fused kernel counts as 0; see tests/test_flops.py)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    names = {n for n, _ in adapter.planned_layers(adapter.denoiser(pipe))}
    with applied(pipe, method), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        call(pipe, adapter, inputs[:1], seed=0, steps=steps, guidance=guidance, extra=extra)
    counts = fc.get_flop_counts()
    attn = sum(sum(ops.values()) for key, ops in counts.items() if key.split(".", 1)[-1] in names)
    method.counted = (float(fc.get_total_flops()), float(attn))


def flops_fraction(plan: Plan, engine: Engine) -> float:
    """Attention FLOPs of the plan relative to full attention: the plan's record, else from the shapes just run."""
    if "fraction" in plan.flops:
        return float(plan.flops["fraction"])
    from difa.cost import plan_flops

    shapes = [engine.shapes.get(i) for i in range(len(plan.layers))]
    if any(s is None for s in shapes):
        return math.nan
    from difa.cells import executed_share

    return float(plan_flops(plan.methods, shapes, plan.techniques, plan.layers, plan.cfg_enabled,
                            executed_share(plan.layers, plan.model.blocks, plan.blocks, plan.steps))["fraction"])


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
                m.batch_seconds.append(seconds / len(chunk))
                m.timed += len(chunk)
            m.peak_mb = max(m.peak_mb, mb)
    for m in methods:
        count_flops(pipe, adapter, m, inputs, steps, guidance, extra)


# ---------------------------------------------------------------- baseline cache
def baseline_key(pipe, adapter: Adapter, family: str, call_kwargs: dict, inputs: list, *, seed: int, steps: int,
                 guidance: float, batch: int, device: str, dtype: str) -> str:
    """Everything the baseline images depend on: weights (hashed), inputs, seeds, settings, versions, threads."""
    import diffusers

    digest = hashlib.sha256()
    for module in (adapter.denoiser(pipe), getattr(pipe, "vae", None)):
        for name, t in (module.state_dict().items() if module is not None else ()):
            digest.update(name.encode())
            digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    payload = {"weights": digest.hexdigest(), "scheduler": dict(pipe.scheduler.config), "family": family,
               "inputs": [str(x) for x in inputs], "call_kwargs": call_kwargs, "seed": seed, "steps": steps,
               "guidance": guidance, "batch": batch, "device": device, "dtype": dtype,
               "threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def load_baseline(cache: Path | None, base: Method) -> bool:
    """Fill the baseline's images from the cache; True on a hit."""
    if cache is None:
        return False
    from difa.files import check_side_file

    check_side_file(cache, "the baseline cache")  # a link, FIFO or folder planted there: refused, never read
    if not cache.is_file():
        return False
    state = torch.load(cache, weights_only=True)
    base.images, base.cached = list(state["images"]), True
    return True


def save_baseline(cache: Path | None, base: Method) -> None:
    if cache is None or base.cached:
        return
    metrics.save_atomic(cache, lambda f: torch.save({"images": base.images}, f), follow=False, what="the baseline cache")


def classifier_dir(path: str) -> Path | None:
    """The classifier folder: as given (absolute or relative to the working directory), else a bundled data/<...>."""
    from difa.models import resolve_path

    p = Path(resolve_path(path))
    return p if p.is_dir() else None


def score(methods: list[Method], labels: torch.Tensor, *, fid_ref: np.ndarray | None, net, classifier, batch: int,
          feature_cache: Path | None = None) -> tuple[list[dict], list[dict]]:
    """Table rows (one per method, COLUMNS) and per-image rows (IMAGE_COLUMNS). Fidelity and class accuracy carry
    95% bootstrap intervals over images (metrics.metric_intervals); latency the median and min-max of the per-batch
    ratios to the baseline timed side by side (latency_spread)."""
    base = torch.cat(methods[0].images)  # (N, 3, H, W)
    total0, attn0 = methods[0].counted
    rows, image_rows = [], []
    for m in methods:
        images = torch.cat(m.images)
        total, attn = m.counted
        s_img = m.seconds / m.timed if m.timed else math.nan
        per_image = metrics.per_image_fidelity(images, base)
        if classifier is not None:
            per_image["class_hit"] = metrics.class_hits(images, labels, classifier, batch_size=batch)
        row = {"method": m.name, "fid": math.nan, "inception_score": math.nan,
               **metrics.metric_intervals(per_image),
               # plans: the cost model (the ideal window kernel); hooks have none, so the counted FLOPs
               "attn_flops": 1.0 if not m.compressed else m.flops if m.plan is not None else attn / attn0,
               "macs": total / total0, "gmacs_per_image": total / 2e9, "s_per_image": s_img,
               **latency_spread(m.batch_seconds, methods[0].batch_seconds),
               # the plan's measured cost model (calibration), next to the measured rel_latency
               "pred_latency": 1.0 if not m.compressed else predicted_latency(m.plan, batch),
               "peak_mem_mb": m.peak_mb, "cache_mb": math.nan if m.hook is not None else m.cache_mb}
        if fid_ref is not None:
            cached = feature_cache if m is methods[0] and feature_cache is not None else None
            if cached is not None and cached.is_file():
                feats = np.load(cached, allow_pickle=False)
            else:
                feats = fid_metrics.inception_features(images, batch_size=batch, progress=True, net=net)
                if cached is not None:
                    metrics.save_atomic(cached, lambda f: np.save(f, feats, allow_pickle=False), follow=False,
                                        what="the baseline's feature cache")
            row["fid"] = fid_metrics.fid_from_features(feats, fid_ref)
            if net.logit_weight is not None:
                row["inception_score"] = fid_metrics.inception_score(feats, net)[0]
        rows.append(row)
        for i in range(len(images)):
            image_rows.append({"method": m.name, "image": i, "label": int(labels[i]),
                               **{k: float(v[i]) for k, v in per_image.items()}})
    return rows, image_rows


def latency_spread(seconds: list[float], base_seconds: list[float]) -> dict[str, float]:
    """rel_latency: the median over the timed batches of (method's s/image) / (baseline's s/image on the same batch,
    timed next to it); its min and max; and how many batches. NaN where nothing was timed."""
    ratios = [a / b for a, b in zip(seconds, base_seconds) if b > 0]
    if not ratios:
        return {"rel_latency": math.nan, "rel_latency_min": math.nan, "rel_latency_max": math.nan, "timed_batches": 0}
    return {"rel_latency": float(np.median(ratios)), "rel_latency_min": min(ratios), "rel_latency_max": max(ratios),
            "timed_batches": len(ratios)}


def predicted_latency(plan: Plan | None, batch: int | None = None) -> float:
    """The plan's predicted fraction of full latency at `batch` images per call (its latency record's curve over
    the timed batches: calibration.timing.predicted_at); None: at the batch it was timed at."""
    if plan is None or "predicted_fraction" not in plan.latency:
        return math.nan
    if batch is None:
        return float(plan.latency["predicted_fraction"])
    from difa.calibration.timing import predicted_at

    return float(predicted_at(plan.latency, batch)["fraction"])


def compact(table):
    """The table with each metric's interval folded into one cell: `v [lo, hi]` (latency: `v (min-max)`)."""
    out = table.copy()
    for col in list(out.columns):
        lo, hi, sep = ((f"{col}_lo", f"{col}_hi", ", ") if f"{col}_lo" in out.columns
                       else (f"{col}_min", f"{col}_max", "-") if f"{col}_min" in out.columns else (None, None, None))
        if lo is not None:
            brackets = "[]" if sep == ", " else "()"
            out[col] = [f"{v:.4g} {brackets[0]}{a:.4g}{sep}{b:.4g}{brackets[1]}" if a == a else f"{v:.4g}"
                        for v, a, b in zip(out[col], out[lo], out[hi])]
            out = out.drop(columns=[lo, hi])
    return out.map(lambda v: f"{v:.4g}" if isinstance(v, float) else v)


def report(table, model: str, n: int, steps: int, guidance: float, mem: str, notes: list[str], out: Path) -> str:
    lines = [
        f"difa evaluation of {model}: {n} samples, {steps} steps, guidance {guidance}, same seeds for every method",
        compact(table).to_string(index=False),
        ("rel_l1 / psnr_db / ssim: against the baseline images; attn_flops: attention FLOPs relative to full; "
         "*_lo / *_hi: 95% bootstrap interval over images; "
         "macs: all multiply-adds of one image relative to the baseline (torch.utils.flop_counter); "
         f"s_per_image: wall clock, methods interleaved; rel_latency: median over the timed batches of the ratio "
         f"to the baseline timed next to it (min and max beside it); cache_mb: the most the plan's caches held "
         f"across steps, at the evaluation batch; "
         f"peak_mem_mb: {metrics.MEMORY_MEASURES[mem]}"),
        *notes,
        f"written to {out}",
    ]
    return "\n".join(lines)


def __getattr__(name: str):
    """`evaluate` and its result `Evaluation` are re-exported from difa.evaluation_run, which imports this module
    (so they are looked up on first use rather than imported at the top: either module may be imported first)."""
    if name in ("evaluate", "Evaluation"):
        from difa import evaluation_run

        return getattr(evaluation_run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
