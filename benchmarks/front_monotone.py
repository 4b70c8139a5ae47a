"""Does a larger budget ever give a worse plan on seeds the calibration never saw? A front of budgets, chosen per
budget (each budget's own best check, as single-budget calibration does, plus the calibration-error repair
`kept_from_budget`) against the front checked as a whole (calibrate_front: one path's nested plans), with 4 and 8
calibration inputs; each plan's final-output relative L1 against the uncompressed model on unseen seeds. Mode
"each path": the front of every one of the search's paths (search.PATHS) in turn, from the same calibration, as
the front would deliver it (a larger budget checking worse keeps the smaller budget's plan): what choosing the
path costs or gains on unseen seeds.

    python benchmarks/front_monotone.py [--model fmnist_dit] [--n-calib 4 8] [--images 32]
        [--budgets 0.3 0.35 ... 0.9] [--modes "per budget" "whole front" "each path"] [--out runs/front_monotone.json]

Unseen: class ids 0..9 cycled (text models: a Fashion-MNIST caption per class, evaluation.class_inputs),
batches of 8 images with seeds 1, 2, ... (the calibration uses seed 0 and the first
n_calib inputs). Prints, per setting, each budget's predicted fraction, calibration error and unseen error, and the
number of budget pairs (b < b') where the unseen error rises, with the largest rise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difa import apply_plan, remove_plan  # noqa: E402
from difa.adapters import adapter_for  # noqa: E402
from difa.calibration import calibrate_front, calibrate_pipeline, search  # noqa: E402
from difa.calibration import table as error_table  # noqa: E402
from difa.evaluation import batch_seed, class_inputs  # noqa: E402
from difa.models import load_pipeline, pipeline_call_kwargs  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
BUDGETS = [round(0.3 + 0.05 * i, 2) for i in range(13)]


def per_budget(pipe, calib, budgets, **kw) -> list:
    """Each budget calibrated alone (its own best check), then the repair a front applies: a larger budget whose
    calibration error is above a smaller budget's takes that plan."""
    plans = [calibrate_pipeline(pipe, calib, budget=b, threshold=0.0, **kw) for b in budgets]
    out = [plans[0]]
    for p in plans[1:]:
        out.append(out[-1] if out[-1].calibration["measured_error"] < p.calibration["measured_error"] else p)
    return out


def each_path(pipe, calib, budgets, **kw) -> dict[str, tuple[list, float]]:
    """Per path of search.PATHS, the front calibrate_front delivers when that path is the one taken: the search's
    choice of path replaced for the call (the calibration is otherwise the library's own); with its seconds."""
    real, fronts = search.front, {}
    for k, name in enumerate(search.PATHS):
        def take(table, latency, n_blocks, steps, methods, check, goals, k=k):
            out = []
            for b in goals:
                options, seq = search.budget_options(table, latency, n_blocks, steps, methods, b)
                for c in options:
                    c.measured = check(c.rows)  # (one generation per distinct plan: the driver memoizes)
                out.append((options[k], seq, []))
            return out
        search.front, t0 = take, time.perf_counter()
        try:
            fronts[name] = (calibrate_front(pipe, calib, budgets=budgets, **kw), time.perf_counter() - t0)
        finally:
            search.front = real
    return fronts


def unseen(pipe, plan, images: int, steps: int, guidance: float, extra: dict) -> torch.Tensor:
    adapter = adapter_for(pipe)
    _, everything = class_inputs(adapter, images, seed=1)  # class ids, or one caption per class (text models)
    outs = []
    for k in range(images // 8):
        inputs = everything[8 * k: 8 * k + 8]
        if plan is not None:
            apply_plan(pipe, plan)
        try:
            g = torch.Generator(device="cpu").manual_seed(batch_seed(1, k))
            outs.append(adapter.call_pipeline(pipe, inputs, steps=steps, guidance_scale=guidance, output_type="pt",
                                              generator=g, extra=extra).images)
        finally:
            remove_plan(pipe)
    return torch.cat(outs)


def load_model(name: str):
    """(config, pipeline, call kwargs, steps, guidance) of a bundled model config, as the CLIs load it."""
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    pipe = load_pipeline(cfg)
    pipe.set_progress_bar_config(disable=True)
    extra = {**pipeline_call_kwargs(cfg["family"]), **(cfg.get("call_kwargs") or {})}
    return cfg, pipe, extra, int(cfg["steps"]), float(cfg["guidance_scale"])


def rises(errors: list[float]) -> tuple[int, float]:
    pairs = [(a, b) for i, a in enumerate(errors) for b in errors[i + 1:] if b > a]
    return len(pairs), max([b - a for a, b in pairs] or [0.0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fmnist_dit")
    ap.add_argument("--n-calib", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    ap.add_argument("--modes", nargs="+", default=["per budget", "whole front"],
                    choices=["per budget", "whole front", "each path"])
    ap.add_argument("--candidates", nargs="+", default=None, help="block candidates (default: the default ones)")
    ap.add_argument("--out", default="runs/front_monotone.json")
    a = ap.parse_args()
    cfg, pipe, extra, steps, guidance = load_model(a.model)
    base = unseen(pipe, None, a.images, steps, guidance, extra)
    results, seen = [], {}

    def measured(plan) -> float:  # unseen error, once per distinct plan
        key = json.dumps([plan.blocks, plan.methods])
        if key not in seen:
            seen[key] = error_table.final_error(unseen(pipe, plan, a.images, steps, guidance, extra), base)
        return seen[key]

    for n in a.n_calib:
        calib = [cfg["inputs"][i % len(cfg["inputs"])] for i in range(n)]
        kw = dict(steps=steps, guidance_scale=guidance, seed=0, call_kwargs=extra, name=a.model,
                  **({"candidates": a.candidates} if a.candidates else {}))
        runs = []
        for mode in a.modes:
            t0 = time.perf_counter()
            if mode == "each path":
                runs += [(f"path: {name}", plans, wall) for name, (plans, wall) in
                         each_path(pipe, calib, a.budgets, **kw).items()]
                continue
            plans = per_budget(pipe, calib, a.budgets, **kw) if mode == "per budget" else \
                calibrate_front(pipe, calib, budgets=a.budgets, **kw)
            runs.append((mode, plans, time.perf_counter() - t0))
        for mode, plans, wall in runs:
            forwards = sum(p.calibration["forwards"] for p in plans) if mode == "per budget" else plans[0].calibration["forwards"]
            errors = [measured(p) for p in plans]
            n_rise, worst = rises(errors)
            results.append({"model": a.model, "n_calib": n, "mode": mode, "budgets": a.budgets,
                            "candidates": a.candidates or "default",
                            "predicted": [round(p.latency["predicted_fraction"], 4) for p in plans],
                            "calib_error": [p.calibration["measured_error"] for p in plans],
                            "unseen_error": [round(e, 5) for e in errors], "rising_pairs": n_rise,
                            "largest_rise": round(worst, 5), "unseen_mean": round(sum(errors) / len(errors), 5),
                            "calib_s": round(wall, 1), "forwards": forwards, "images": a.images})
            r = results[-1]
            print(f"\n{a.model}, n_calib {n}, {mode}, candidates {a.candidates or 'default'}: {forwards} forwards, {wall:.1f} s; rising pairs "
                  f"{n_rise} of {len(errors) * (len(errors) - 1) // 2}, largest rise {worst:.4f}, mean unseen "
                  f"{r['unseen_mean']:.4f}", flush=True)
            print(f"{'budget':>6} {'predicted':>9} {'calib':>8} {'unseen':>8}")
            for b, p, c, e in zip(a.budgets, r["predicted"], r["calib_error"], r["unseen_error"]):
                print(f"{b:>6} {p:>9.3f} {c:>8.4f} {e:>8.4f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
