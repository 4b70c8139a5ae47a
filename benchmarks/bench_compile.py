"""A plan under torch.compile on the bundled DiT: compiled plan against compiled full model against eager plan,
interleaved.

    OMP_NUM_THREADS=2 python benchmarks/bench_compile.py [--plan plans/fmnist_dit_b0.6_s20.json] [--batch 4]
        [--repeats 4] [--mode regional|whole] [--backend inductor]

Four copies of the pipeline (the same weights): eager full, eager plan, compiled full, compiled plan. `regional`
compiles each transformer block (difa.compile_blocks; diffusers' compile_repeated_blocks does the same for the
models that list their blocks), `whole` the denoiser (`transformer.compile()`). One warm-up call each (the
compilation), then each round calls the four once, in a rotated order, on the same class ids and seed. Printed: per
ratio the median (min-max) over the rounds and the ratio of the fastest rounds, and dynamo's graph count after the
warm-up and at the end (equal: no recompile after the first generation).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch._dynamo.utils import counters

import difa
from difa.calibration.timing import predicted_at
from difa.models import load_configured


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", default="plans/fmnist_dit_b0.6_s20.json")
    ap.add_argument("--model", default="fmnist_dit")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--mode", choices=["regional", "whole"], default="regional")
    ap.add_argument("--backend", default="inductor")
    a = ap.parse_args()
    plan = difa.load_plan(a.plan)
    pipes = {name: load_configured(a.model).pipe for name in ("eager_full", "eager_plan", "compiled_full", "compiled_plan")}
    for name, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        if name.endswith("plan"):
            difa.apply_plan(pipe, plan)
        if name.startswith("compiled"):
            if a.mode == "regional":
                difa.compile_blocks(pipe, backend=a.backend)
            else:
                pipe.transformer.compile(backend=a.backend)
    labels = [i % 10 for i in range(a.batch)]

    def call(pipe, seed):
        t0 = time.perf_counter()
        with torch.inference_mode():
            pipe(class_labels=labels, num_inference_steps=plan.inference_steps, guidance_scale=plan.guidance_scale,
                 generator=torch.Generator().manual_seed(seed), output_type="pt")
        return time.perf_counter() - t0

    warm = {name: call(p, 1) for name, p in pipes.items()}  # the compilation
    graphs = counters["stats"]["unique_graphs"]
    print("warm-up seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in warm.items()), f"| graphs {graphs}")
    names = list(pipes)
    rounds = []
    for r in range(a.repeats):
        order = names[r % 4:] + names[: r % 4]
        rounds.append({name: call(pipes[name], 2 + r) for name in order})
    ratios = {
        "eager plan / eager full": ("eager_plan", "eager_full"),
        "compiled plan / compiled full": ("compiled_plan", "compiled_full"),
        "compiled full / eager full": ("compiled_full", "eager_full"),
        "compiled plan / eager plan": ("compiled_plan", "eager_plan"),
        "compiled plan / eager full": ("compiled_plan", "eager_full"),
    }
    predicted = predicted_at(plan.latency or {}, a.batch)
    print(f"{a.model} batch {a.batch}, {plan.inference_steps} steps, plan {a.plan} (predicted fraction of the eager "
          f"full model {predicted['fraction']:.3f}), {a.mode} {a.backend}, {a.repeats} rounds" if predicted else "")
    fastest = {name: min(r[name] for r in rounds) for name in names}  # (this machine's rounds swing widely)
    for label, (x, y) in ratios.items():
        v = [r[x] / r[y] for r in rounds]
        print(f"  {label:32s} {statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})  fastest rounds "
              f"{fastest[x] / fastest[y]:.3f}")
    for name in names:
        v = [r[name] for r in rounds]
        print(f"  seconds {name:14s} {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})")
    after = counters["stats"]["unique_graphs"]
    print(f"graphs after warm-up {graphs}, at the end {after}" + (" (no recompile)" if after == graphs else " (RECOMPILED)"))


if __name__ == "__main__":
    main()
