"""Does a larger budget ever give a worse plan on seeds the calibration never saw? A front of budgets, chosen per
budget (each budget's own best check, as single-budget calibration does, plus the calibration-error repair
`kept_from_budget`) against the front checked as a whole (calibrate_front: one path's nested plans), with 4 and 8
calibration inputs; each plan's final-output relative L1 against the uncompressed model on unseen seeds.

    python benchmarks/front_monotone.py [--model fmnist_dit] [--n-calib 4 8] [--images 32]
        [--budgets 0.3 0.35 ... 0.9] [--out runs/front_monotone.json]

Unseen: class ids 0..9 cycled, batches of 8 images with seeds 1, 2, ... (the calibration uses seed 0 and the first
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
from difa.evaluation import batch_seed  # noqa: E402
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


def unseen(pipe, plan, images: int, steps: int, guidance: float, extra: dict) -> torch.Tensor:
    adapter = adapter_for(pipe)
    outs = []
    for k in range(images // 8):
        inputs = [(8 * k + i) % 10 for i in range(8)]
        if plan is not None:
            apply_plan(pipe, plan)
        try:
            g = torch.Generator(device="cpu").manual_seed(batch_seed(1, k))
            outs.append(adapter.call_pipeline(pipe, inputs, steps=steps, guidance_scale=guidance, output_type="pt",
                                              generator=g, extra=extra).images)
        finally:
            remove_plan(pipe)
    return torch.cat(outs)


def rises(errors: list[float]) -> tuple[int, float]:
    pairs = [(a, b) for i, a in enumerate(errors) for b in errors[i + 1:] if b > a]
    return len(pairs), max([b - a for a, b in pairs] or [0.0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fmnist_dit")
    ap.add_argument("--n-calib", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    ap.add_argument("--modes", nargs="+", default=["per budget", "whole front"], choices=["per budget", "whole front"])
    ap.add_argument("--candidates", nargs="+", default=None, help="block candidates (default: the default ones)")
    ap.add_argument("--out", default="runs/front_monotone.json")
    a = ap.parse_args()
    cfg = yaml.safe_load((CONF / f"{a.model}.yaml").read_text())
    pipe = load_pipeline(cfg)
    pipe.set_progress_bar_config(disable=True)
    extra = {**pipeline_call_kwargs(cfg["family"]), **(cfg.get("call_kwargs") or {})}
    steps, guidance = int(cfg["steps"]), float(cfg["guidance_scale"])
    base = unseen(pipe, None, a.images, steps, guidance, extra)
    results = []
    for n in a.n_calib:
        calib = [cfg["inputs"][i % len(cfg["inputs"])] for i in range(n)]
        kw = dict(steps=steps, guidance_scale=guidance, seed=0, call_kwargs=extra, name=a.model,
                  **({"candidates": a.candidates} if a.candidates else {}))
        for mode in a.modes:
            t0 = time.perf_counter()
            plans = per_budget(pipe, calib, a.budgets, **kw) if mode == "per budget" else \
                calibrate_front(pipe, calib, budgets=a.budgets, **kw)
            wall = time.perf_counter() - t0
            forwards = sum(p.calibration["forwards"] for p in plans) if mode == "per budget" else plans[0].calibration["forwards"]
            errors = [search.final_error(unseen(pipe, p, a.images, steps, guidance, extra), base) for p in plans]
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
