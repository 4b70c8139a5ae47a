"""Does the wider plan space pay? The default search (block, CFG and attention cells) against block-only plans
(`candidates=[reuse,forecast]`) and against each peer over its settings, at matched wall-clock, on seeds the
calibration never used (issue 29).

    python experiments/wider_space.py [--model fmnist_dit] [--batch 25] [--repeats 4] [--n-calib 4]
        [--budgets 0.35 0.4 ... 0.8] [--targets 0.4 0.45 0.5 0.6] [--peers taylorseer fbc cache-dit]
        [--variants default block-only no-attention fitted]
        [--out runs/wider_space_<model>.json]   (the plans go next to it: <out>_<variant>_b<budget>.json)

Calibration: the README's defaults (the model config's inputs and n_calib, seed 0), one front per candidate set
(`calibrate_front`). Evaluation: `--repeats` timed rounds after one warm-up round; every round runs every variant
once on the same `--batch` class ids (cycling 0..9; PixArt: their captions) and seed (batch_seed(1, round): never
the calibration's), in alternating order. Per variant: latency = the median (min-max) over rounds of its seconds /
the baseline's seconds in the same round; error = relative L1 of all its images against the baseline's (sum |a-b| /
sum |b|, the calibration's metric) with a 95% percentile bootstrap interval over images (difa.metrics).

Matched wall-clock: per family (difa default, difa block-only, TaylorSeer o1/o2 x interval 2/3/4, FirstBlockCache
thresholds, cache-dit DBCache thresholds), the Pareto points (no point of the family is both faster and better),
and at each target latency the error interpolated linearly between the two Pareto points around it (its interval
too); "-" where the family's points do not reach the target. Identical plans (a budget that keeps a smaller
budget's plan; both candidate sets where no CFG cell pays) run once and share that measurement: measured twice
in one run, the same plan's latency differed by up to 15% (budget 0.45's on the DiT: 0.399 and 0.457 of full).
Every run measures all its variants in one interleaved session (a comparison is fair only within one run) and
overwrites --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difa.calibration import calibrate_front  # noqa: E402
from difa.evaluation import Method, batch_seed, class_inputs, generate_batch  # noqa: E402
from difa.metrics import FIDELITY_STATS, bootstrap_interval  # noqa: E402
from difa.models import load_configured  # noqa: E402
from difa.peers import hook_from_spec  # noqa: E402

BUDGETS = [0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8]
BLOCK_ONLY = ["reuse", "forecast"]
# difa's candidate sets (None: the default, every candidate technique); no-attention: the default before attention
# cells joined the search (calibration/attention_cells.py)
VARIANTS = {"default": None, "block-only": BLOCK_ONLY, "no-attention": BLOCK_ONLY + ["cfg_delta", "cfg_forecast"],
            "fitted": BLOCK_ONLY + ["forecast_fit"]}  # fitted: block-only with forecast_fit (not a default candidate)
PEERS = {  # family -> {variant: (spec, params)}: each peer over the settings its own docs suggest
    # (warm-up 1 step; and 5 steps at interval 2, which reaches the 0.6-0.7 of full that interval 2 alone does not)
    "taylorseer": {f"taylorseer o{o} i{i} w{w}": ("diffusers:taylorseer",
                                                 {"order": o, "cache_interval": i, "warmup_steps": w})
                   for o in (1, 2) for i, w in ((2, 1), (3, 1), (4, 1), (2, 5))},
    "fbc": {f"fbc {t}": ("diffusers:fbc", {"threshold": t}) for t in (0.02, 0.05, 0.1, 0.2)},
    "cache-dit": {f"cache-dit F1 {t}": ("cachedit:dbcache", {"threshold": t, "fn_blocks": 1, "warmup_steps": 2,
                                                               "taylorseer": 1}) for t in (0.05, 0.1, 0.2)},
}


def rel_l1(images: torch.Tensor, base: torch.Tensor) -> tuple[float, float, float]:
    """Relative L1 of a set against the baseline's, and its 95% bootstrap interval over images."""
    d = (images - base).flatten(1).double()  # (N, C*H*W)
    cols = {"l1_num": d.abs().sum(1).numpy(), "l1_den": base.flatten(1).double().abs().sum(1).numpy()}
    stat = FIDELITY_STATS["rel_l1"][1]
    lo, hi = bootstrap_interval(cols, stat)
    return float(stat(cols)), lo, hi


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point beats on both latency and error, by latency."""
    pts = sorted(points, key=lambda p: (p["latency"], p["error"]))
    out = []
    for p in pts:
        if not out or p["error"] < out[-1]["error"]:
            out.append(p)
    return out


def at_latency(points: list[dict], target: float) -> dict | None:
    """Error (and interval) of a family at `target` latency, linear between its Pareto points around it."""
    front = pareto(points)
    for a, b in zip(front, front[1:]):
        if a["latency"] <= target <= b["latency"]:
            w = (target - a["latency"]) / max(b["latency"] - a["latency"], 1e-12)
            return {k: a[k] + w * (b[k] - a[k]) for k in ("error", "lo", "hi")}
    exact = [p for p in front if abs(p["latency"] - target) < 1e-9]
    return {k: exact[0][k] for k in ("error", "lo", "hi")} if exact else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fmnist_dit")
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    ap.add_argument("--targets", nargs="+", type=float, default=[0.4, 0.45, 0.5, 0.6])
    ap.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    ap.add_argument("--variants", nargs="+", default=["default", "block-only"], choices=list(VARIANTS),
                    help="difa candidate sets: the default, block-only, no-attention (block and CFG cells), fitted "
                         "(block-only and forecast_fit)")
    ap.add_argument("--n-calib", type=int, default=None, help="calibration inputs (default: the model config's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out or f"runs/wider_space_{a.model}.json")
    m = load_configured(a.model, a.n_calib)  # the pipeline as the CLIs call it, the config's calibration inputs
    pipe, adapter, extra, steps, guidance, calib = m.pipe, m.adapter, m.extra, m.steps, m.guidance, m.calib
    families: dict[str, list[Method]] = {}
    calib_s = {}
    for family, cands in ((f"difa {v}", VARIANTS[v]) for v in a.variants):
        t0 = time.perf_counter()
        plans = calibrate_front(pipe, calib, budgets=a.budgets, steps=steps, guidance_scale=guidance, seed=0,
                                call_kwargs=extra, name=a.model, **({} if cands is None else {"candidates": cands}))
        calib_s[family] = round(time.perf_counter() - t0, 1)
        families[family] = [Method(f"{family} b{p.calibration['budget']}", p) for p in plans]
        out.parent.mkdir(parents=True, exist_ok=True)
        for p in plans:  # the plans themselves, next to the results
            p.save(out.parent / f"{out.stem}_{family.split()[-1]}_b{p.calibration['budget']}.json")
    for family in a.peers:
        families[family] = [Method(name, None, hook_from_spec(spec, params)) for name, (spec, params) in PEERS[family].items()]
    same: dict[str, str] = {}  # a plan identical to one listed before it -> that one's name (measured once)
    first: dict[str, str] = {}
    for m in (m for ms in families.values() for m in ms if m.plan is not None):
        key = json.dumps([m.plan.blocks, m.plan.methods])
        same[m.name] = first.setdefault(key, m.name)
    methods = [Method("baseline", None)] + [m for ms in families.values() for m in ms
                                            if same.get(m.name, m.name) == m.name]
    _, inputs = class_inputs(adapter, a.batch, seed=1)
    seconds = {m.name: [] for m in methods}
    images = {m.name: [] for m in methods}
    for r in range(a.repeats + 1):  # round 0 warms up
        for m in (methods if r % 2 else methods[::-1]):
            img, s, _ = generate_batch(pipe, adapter, m, inputs, batch_seed(1, r), steps, guidance, extra, "cpu")
            if r:
                seconds[m.name].append(s)
                images[m.name].append(img)
        print(f"round {r} done", flush=True)
    base = torch.cat(images["baseline"])
    rows = []
    for family, ms in [("baseline", methods[:1])] + list(families.items()):
        for m in ms:
            src = same.get(m.name, m.name)
            ratios = [s / b for s, b in zip(seconds[src], seconds["baseline"])]
            err, lo, hi = rel_l1(torch.cat(images[src]), base)
            rows.append({"model": a.model, "family": family, "method": m.name, "latency": statistics.median(ratios),
                         "latency_min": min(ratios), "latency_max": max(ratios), "error": err, "lo": lo, "hi": hi,
                         "predicted": None if m.plan is None else m.plan.latency.get("predicted_fraction"),
                         "cells": None if m.plan is None else m.plan.block_counts(),
                         "attention": None if m.plan is None else m.plan.counts(), "measured_as": src,
                         "images": int(base.shape[0]), "batch": a.batch, "repeats": a.repeats})
    matched = []
    for t in a.targets:
        for family in families:
            v = at_latency([r for r in rows if r["family"] == family], t)
            matched.append({"target": t, "family": family, **({} if v is None else v)})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows, "matched": matched, "calib_s": calib_s, "args": vars(a)}, indent=1))
    tmp.replace(out)
    print(report(rows, matched, a))


def report(rows: list[dict], matched: list[dict], a) -> str:
    lines = [f"{a.model}: {rows[0]['images']} unseen images (batch {a.batch} x {a.repeats} rounds), latency = median "
             "(min-max) of per-round ratios to the baseline, error = relative L1 [95% bootstrap interval]", "",
             "| family | method | latency (min-max) | predicted | error [95% CI] |", "|---|---|---|---|---|"]
    for r in rows:
        pred = "" if r["predicted"] is None else f"{r['predicted']:.3f}"
        lines.append(f"| {r['family']} | {r['method']} | {r['latency']:.3f} ({r['latency_min']:.3f}-{r['latency_max']:.3f}) "
                     f"| {pred} | {r['error']:.4f} [{r['lo']:.4f}, {r['hi']:.4f}] |")
    fams = list(dict.fromkeys(m["family"] for m in matched))
    lines += ["", "At matched wall-clock (linear between each family's Pareto points):", "",
              "| latency | " + " | ".join(fams) + " |", "|---" * (len(fams) + 1) + "|"]
    for t in dict.fromkeys(m["target"] for m in matched):
        cells = []
        for f in fams:
            v = next(m for m in matched if m["target"] == t and m["family"] == f)
            cells.append(f"{v['error']:.4f} [{v['lo']:.4f}, {v['hi']:.4f}]" if "error" in v else "-")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
