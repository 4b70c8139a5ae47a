"""Do plans run as fast as they promise? Per budget: the predicted fraction of full latency at the batch run, the
measured one (median and min-max over interleaved timed batches), MACs and latency / MACs, and the error on seeds
the calibration never used, next to diffusers' TaylorSeer and FirstBlockCache, on the bundled models.

    python benchmarks/bench_realized.py [--models fmnist_dit fmnist_pixart] [--batches 4 25] [--repeats 4]
        [--budgets 0.3 0.4 0.5 0.6 0.7 0.8 0.9] [--latency default served] [--out runs/bench_realized.json]

One front per (model, latency mode) from `calibrate_front` (calibration inputs and seed 0, the README's defaults;
`served`: latency_batch set to the batch run). Every timed repeat runs every variant once on the same inputs and
seed (seed 1 + repeat: never the calibration's), in alternating order; the first round is a warm-up and is not
timed. measured = the median over repeats of (variant's seconds / baseline's seconds in the same repeat).
error = sum |a - b| / sum |b| over all images of the timed repeats against the baseline's (the calibration's
metric, difa.calibration.table.final_error). MACs: torch.utils.flop_counter on one image (CFG included).
Results are appended to --out as they come (a rerun skips what is there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difa.calibration import calibrate_front, fixed_plan  # noqa: E402
from difa.calibration import table as error_table  # noqa: E402
from difa.calibration.timing import predicted_at  # noqa: E402
from difa.evaluation import Method, batch_seed, class_inputs, count_flops, generate_batch  # noqa: E402
from difa.models import load_configured  # noqa: E402
from difa.peers import hook_from_spec  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
PEERS = {"taylorseer o1 i2": ("diffusers:taylorseer", {"order": 1, "cache_interval": 2, "warmup_steps": 1}),
         "taylorseer o1 i3": ("diffusers:taylorseer", {"order": 1, "cache_interval": 3, "warmup_steps": 1}),
         "fbc 0.05": ("diffusers:fbc", {"threshold": 0.05}),
         "fbc 0.1": ("diffusers:fbc", {"threshold": 0.1})}


def run(model: str, batch: int, mode: str, budgets: list[float], repeats: int) -> list[dict]:
    m = load_configured(model)  # the pipeline as the CLIs call it; calibration inputs: the config's defaults
    pipe, adapter, extra, steps, guidance, calib = m.pipe, m.adapter, m.extra, m.steps, m.guidance, m.calib
    t0 = time.perf_counter()
    plans = calibrate_front(pipe, calib, budgets=budgets, steps=steps, guidance_scale=guidance, seed=0,
                            call_kwargs=extra, name=model, latency_batch=batch if mode == "served" else None)
    calib_s = time.perf_counter() - t0
    full = fixed_plan(pipe, lambda i, t: "full", steps=steps, guidance_scale=guidance, block=lambda j, t: "full")
    methods = [Method("baseline", None), Method("difa all-full", full)]  # all-full: the executor's own overhead
    methods += [Method(f"difa b{p.calibration['budget']}", p) for p in plans]
    methods += [Method(name, None, hook_from_spec(spec, params)) for name, (spec, params) in PEERS.items()]
    _, inputs = class_inputs(adapter, batch, seed=1)
    seconds = {m.name: [] for m in methods}
    images = {m.name: [] for m in methods}
    for r in range(repeats + 1):  # round 0 warms up
        order = methods if r % 2 else methods[::-1]
        for m in order:
            out, s, _ = generate_batch(pipe, adapter, m, inputs, batch_seed(1, r), steps, guidance, extra, "cpu")
            if r:
                seconds[m.name].append(s)
                images[m.name].append(out)
    for m in methods:
        count_flops(pipe, adapter, m, inputs, steps, guidance, extra)
    base_s, base_img = seconds["baseline"], torch.cat(images["baseline"])
    rows = []
    for m in methods:
        ratios = [s / b for s, b in zip(seconds[m.name], base_s)]
        macs = m.counted[0] / methods[0].counted[0]
        pred = predicted_at(m.plan.latency, batch) if m.plan is not None and m.plan.latency else None
        rows.append({"model": model, "batch": batch, "latency": mode, "method": m.name,
                     "predicted": None if pred is None else round(pred["fraction"], 4),
                     "predicted_inside": None if pred is None else pred["inside"],
                     "measured": round(statistics.median(ratios), 4), "measured_min": round(min(ratios), 4),
                     "measured_max": round(max(ratios), 4), "macs": round(macs, 4),
                     "latency_per_macs": round(statistics.median(ratios) / macs, 4),
                     "error_unseen": round(error_table.final_error(torch.cat(images[m.name]), base_img), 5),
                     "error_calib": None if m.plan is None else m.plan.calibration.get("measured_error"),
                     "kept_from_budget": None if m.plan is None else m.plan.calibration.get("kept_from_budget"),
                     "repeats": repeats, "calib_s": round(calib_s, 1), "threads": torch.get_num_threads()})
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | batch | latency | method | predicted | measured (min-max) | MACs | latency/MACs | "
            "error, unseen seeds | error, calibration |")
    lines = [head, "|---" * 10 + "|"]
    for r in rows:
        pred = "" if r["predicted"] is None else f"{r['predicted']:.3f}" + ("" if r["predicted_inside"] else " (extrap.)")
        calib = "" if r["error_calib"] is None else f"{r['error_calib']:.4f}"
        lines.append(f"| {r['model']} | {r['batch']} | {r['latency']} | {r['method']} | {pred} | {r['measured']:.3f} "
                     f"({r['measured_min']:.3f}-{r['measured_max']:.3f}) | {r['macs']:.3f} | "
                     f"{r['latency_per_macs']:.3f} | {r['error_unseen']:.4f} | {calib} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["fmnist_dit", "fmnist_pixart"])
    ap.add_argument("--batches", nargs="+", type=int, default=[4, 25])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    ap.add_argument("--latency", nargs="+", default=["default", "served"], choices=["default", "served"])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_realized.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    rows = json.loads(out.read_text()) if out.is_file() else []
    done = {(r["model"], r["batch"], r["latency"]) for r in rows}
    for model in a.models:
        for batch in a.batches:
            for mode in a.latency:
                n_calib = int(yaml.safe_load((CONF / f"{model}.yaml").read_text())["n_calib"])
                if (model, batch, mode) in done or (mode == "served" and batch == n_calib):
                    continue  # (served at the calibration batch is the default)
                rows += run(model, batch, mode, a.budgets, a.repeats)
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps(rows, indent=1))
                tmp.replace(out)  # a checkpoint after every (model, batch, mode)
                print(table([r for r in rows if (r["model"], r["batch"], r["latency"]) == (model, batch, mode)]),
                      flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
