"""`difa.enable` on the bundled DiT: the first call's cost (the calibration, which returns the call's images),
then the enabled pipeline against the unpatched one, interleaved.

    OMP_NUM_THREADS=2 python benchmarks/bench_enable.py [--budget 0.5] [--batch 4] [--repeats 4]

Two copies of the pipeline (the same weights): one enabled, one left as it is. After the enabled one's first call
(which calibrates, into a temporary plan cache), each round calls both once on the same class ids and seed, in
alternating order; the ratio is enabled seconds / unpatched seconds, median (min-max) over the rounds, next to the
plan's predicted fraction at this batch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import difa
from difa.calibration.timing import predicted_at
from difa.enable import STATE_ATTR
from difa.models import load_configured


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=4)
    a = ap.parse_args()
    plain, enabled = load_configured("fmnist_dit").pipe, load_configured("fmnist_dit").pipe
    labels = [i % 10 for i in range(a.batch)]

    def call(pipe, seed):
        t0 = time.perf_counter()
        pipe(class_labels=labels, num_inference_steps=20, guidance_scale=4.0,
             generator=torch.Generator().manual_seed(seed), output_type="pt")
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as cache:
        difa.enable(enabled, budget=a.budget, cache=cache)
        first = call(enabled, 1)
        call(plain, 1)  # warm-up
        plan = next(iter(getattr(enabled, STATE_ATTR).plans.values()))
        ratios = []
        for r in range(a.repeats):
            pair = [(plain, "plain"), (enabled, "enabled")]
            times = {name: call(p, 2 + r) for p, name in (pair if r % 2 else pair[::-1])}
            ratios.append(times["enabled"] / times["plain"])
        difa.disable(enabled)
    pred = predicted_at(plan.latency, a.batch)
    print(f"fmnist_dit, batch {a.batch}, budget {a.budget}: first call (the calibration) {first:.1f} s, "
          f"calibration {plan.calibration['wall_time_s']:.1f} s, {plan.calibration['forwards']} forwards")
    predicted = f"; predicted {pred['fraction']:.3f}" if pred else ""
    print(f"enabled / unpatched: {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) over "
          f"{a.repeats} interleaved rounds{predicted}")


if __name__ == "__main__":
    main()
