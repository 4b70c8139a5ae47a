"""Budget mode and the cost of calibration, measured side by side in one run on the bundled models.

    python benchmarks/bench_budget.py [--models fmnist_dit fmnist_pixart] [--budgets 0.4 0.6 0.8] [--batch 25]
                                      [--repeats 3] [--no-greedy]

For each bundled model:
1. calibration cost: the default trajectory search (threshold 0.05) and DiTFastAttn's greedy (`search=greedy`,
   the previous default, threshold 0.05) on the model's default calibration inputs, one after the other, the
   latency model measured afresh (no cache): model forwards and wall seconds of each, and their ratios;
2. budget mode: a plan per budget (latency model timed at --batch images per call), then whole pipeline calls
   of --batch images, uncompressed and with each plan, interleaved --repeats times (machine noise hits all
   alike): measured latency / uncompressed next to the budget and the plan's prediction.
One thread (the latency model is per thread count, and the 2-core machine is shared).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import difa
from difa.calibration import calibrate_pipeline
from difa.cli.common import call_kwargs, load_model, model_config, take_inputs
from difa.apply import remove_plan


def timed_call(pipe, m, adapter, inputs, steps, guidance) -> float:
    t0 = time.perf_counter()
    adapter.call_pipeline(pipe, inputs, steps=steps, guidance_scale=guidance, output_type="pil",
                          generator=torch.Generator().manual_seed(0), extra=call_kwargs(m))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["fmnist_dit", "fmnist_pixart"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.4, 0.6, 0.8])
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-greedy", action="store_true", help="skip the calibration-cost comparison")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from difa.adapters import adapter_for

    for name in a.models:
        m = model_config(name)
        pipe = load_model(m, "cpu", "float32")
        pipe.set_progress_bar_config(disable=True)
        adapter = adapter_for(pipe)
        steps, guidance = int(m.steps), float(m.guidance_scale)
        calib = take_inputs(m.inputs, m.get("n_calib"))
        common = dict(steps=steps, guidance_scale=guidance, call_kwargs=call_kwargs(m), name=m.name)
        print(f"== {name}: {steps} steps, {len(calib)} calibration inputs, batch {a.batch}, 1 thread")
        if not a.no_greedy:
            rows = []
            for search in ("trajectory", "greedy"):
                t0 = time.perf_counter()
                plan = calibrate_pipeline(pipe, calib, threshold=0.05, search=search, latency_cache=None, **common)
                rows.append((search, plan.calibration["forwards"], time.perf_counter() - t0))
            for search, fw, wall in rows:
                print(f"calibration  {search:<10} {fw:>5} forwards  {wall:7.1f} s wall")
            print(f"calibration  greedy / trajectory: {rows[1][1] / rows[0][1]:.1f}x forwards, "
                  f"{rows[1][2] / rows[0][2]:.1f}x wall")
        inputs = take_inputs(m.inputs, a.batch)
        plans = {b: calibrate_pipeline(pipe, calib, threshold=0.05, budget=b, latency_batch=a.batch, **common)
                 for b in a.budgets}
        times: dict = {None: [], **{b: [] for b in a.budgets}}
        timed_call(pipe, m, adapter, inputs, steps, guidance)  # warm-up
        for r in range(a.repeats):
            order = [None, *a.budgets] if r % 2 == 0 else [*a.budgets, None][::-1]
            for b in order:
                if b is not None:
                    difa.apply_plan(pipe, plans[b])
                times[b].append(timed_call(pipe, m, adapter, inputs, steps, guidance))
                remove_plan(pipe)
        base = statistics.median(times[None])
        print(f"uncompressed {base:.2f} s per call of {a.batch} images (median of {a.repeats})")
        print("budget  predicted  measured  (min-max)     measured/budget  final-output error (calibration)")
        for b in a.budgets:
            ratios = [t / base for t in times[b]]
            print(f"{b:6.2f}  {plans[b].latency['predicted_fraction']:9.3f}  {statistics.median(ratios):8.3f}  "
                  f"({min(ratios):.3f}-{max(ratios):.3f})  {statistics.median(ratios) / b:15.3f}  "
                  f"{plans[b].calibration['measured_error']:.4f}")


if __name__ == "__main__":
    main()
