"""Do fitted forecasts (`forecast_fit`: per-channel gains fitted per cell on the calibration trajectory) lower the
final-output error on seeds the calibration never saw? Two measurements on one bundled model:

1. **Per cell** (what the search's error table sees): the every-second-step schedule (each block computed at even
   steps, stood in for at odd ones), each stand-in's error |r^ - r| / |output| against the all-full trajectory of
   the unseen images, summed over cells: `forecast` against `forecast_fit` with gains fitted on the calibration
   inputs' all-full trajectory.
2. **Same cells, final output**: the block-only front (`candidates=[reuse,forecast]`, one calibration), and each of
   its plans with every `forecast` cell turned into a fitted one (gains fitted on the calibration inputs for the
   cell's own last computed steps): "a per channel" (the technique, run by the engine), and by forward hooks the
   variants measured before it: "a, b per channel" (also a gain on the last residual, r1 + a d + b r1) and
   "a, b per cell" (one scalar pair per cell).

    python benchmarks/fitted_forecast.py [--model fmnist_dit] [--n-calib 4] [--images 64]
        [--budgets 0.4 0.5 0.6 0.7 0.8] [--out runs/fitted_forecast.json]

Unseen: as benchmarks/front_monotone.py (class ids 0..9 cycled or a caption per class, batches of 8, seeds 1, 2,
...); the calibration uses seed 0 and the first n_calib inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from front_monotone import load_model, unseen  # noqa: E402

from difa.adapters import adapter_for  # noqa: E402
from difa.apply import plan_blocks  # noqa: E402
from difa.calibration import calibrate_front  # noqa: E402
from difa.calibration import table as error_table  # noqa: E402
from difa.evaluation import batch_seed, class_inputs  # noqa: E402
from difa.techniques import forecast_fit  # noqa: E402
from difa.techniques.protocol import FITTED  # noqa: E402


def recorded(pipe, inputs, seed_of, steps, guidance, extra, batch=8) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """[block][step] -> the block's (residual, output), each (B, n, C) on the error table's tokens, over batches of
    `batch` inputs (batch k with seed seed_of(k)), by forward hooks on an all-full generation."""
    blocks = [m for _, m in plan_blocks(pipe)]
    out: list[list[list]] = [[] for _ in blocks]
    adapter = adapter_for(pipe)
    for k in range(-(-len(inputs) // batch)):
        part: list[list] = [[] for _ in blocks]

        def hook(j):
            def keep(module, args, kwargs, o):
                x = args[0] if args else kwargs["hidden_states"]
                o = error_table.Trajectory.sample(o[0] if isinstance(o, tuple) else o)
                part[j].append((o - error_table.Trajectory.sample(x), o))
            return keep
        handles = [b.register_forward_hook(hook(j), with_kwargs=True) for j, b in enumerate(blocks)]
        try:
            adapter.call_pipeline(pipe, inputs[k * batch:(k + 1) * batch], steps=steps, guidance_scale=guidance,
                                  output_type="pt", generator=torch.Generator().manual_seed(seed_of(k)), extra=extra)
        finally:
            for h in handles:
                h.remove()
        for j in range(len(blocks)):
            out[j].append(part[j])
    return [[tuple(torch.cat([b[s][i] for b in out[j]]) for i in (0, 1)) for s in range(len(out[j][0]))]
            for j in range(len(blocks))]


def a_and_b(points, step, target) -> torch.Tensor:
    """Per-channel gains on the slope and on the last residual, r1 + a d + b r1 (least squares on (d, r1) per
    channel), as the (2, C) pair (a, b): the variant measured before `forecast_fit` kept the slope gain alone."""
    r1, d = forecast_fit.features(points, step)
    c = target.shape[-1]
    R, y = r1.reshape(-1, c).double(), (target - r1).reshape(-1, c).double()
    D = d.reshape(-1, c).double() if d is not None else torch.zeros_like(R)
    out = torch.stack([torch.linalg.lstsq(torch.stack([D[:, k], R[:, k]], 1), y[:, k:k + 1]).solution.flatten()
                       for k in range(c)], 1)  # (2, C)
    return out.float()


def per_cell(points, step, target) -> torch.Tensor:
    """One (a, b) pair per cell, least squares over every channel, broadcast to (2, C)."""
    r1, d = forecast_fit.features(points, step)
    c = target.shape[-1]
    y, R = (target - r1).flatten().double(), r1.flatten().double()
    if d is None:
        return torch.tensor([[0.0] * c, [float(R @ y / (R @ R).clamp_min(1e-30))] * c])
    sol = torch.linalg.lstsq(torch.stack([d.flatten().double(), R], 1), y[:, None]).solution.flatten()
    return torch.tensor([[float(sol[0])] * c, [float(sol[1])] * c])


VARIANTS = {"a per channel": forecast_fit.fit, "a, b per channel": a_and_b, "a, b per cell": per_cell}


def stand_in(points, step, gains) -> torch.Tensor:
    """r1 + a d (+ b r1 where the gains carry b)."""
    r1, _ = forecast_fit.features(points, step)
    out = forecast_fit.estimate(points, step, gains[:1])
    return out + gains[1] * r1 if gains.shape[0] > 1 else out





def per_cell_errors(calib, seen, steps) -> dict[str, float]:
    """Sum over the every-second-step schedule's stand-ins (from step 3: two computed points) of each one's error."""
    total = {"forecast": 0.0, **dict.fromkeys(VARIANTS, 0.0)}
    for j in range(len(calib)):
        for s in range(3, steps, 2):
            fit_pts = [(s - 3, calib[j][s - 3][0]), (s - 1, calib[j][s - 1][0])]
            pts, (r, o) = [(s - 3, seen[j][s - 3][0]), (s - 1, seen[j][s - 1][0])], seen[j][s]
            scale = float(o.abs().sum())  # |block output|, as the error table's
            total["forecast"] += float((forecast_fit.estimate(pts, s, None) - r).abs().sum()) / scale
            for name, fit in VARIANTS.items():
                gains = fit(fit_pts, s, calib[j][s][0])
                total[name] += float((stand_in(pts, s, gains) - r).abs().sum()) / scale
    return total


def fitted_cells(plan, calib, fit) -> dict:
    """(block, step) -> gains from `fit` on the calibration residuals, for every `forecast` cell of the plan (at
    the cell's own last two computed steps)."""
    cells = {}
    for j, row in enumerate(plan.blocks):
        history = []
        for s, m in enumerate(row):
            if m == "forecast" and history:
                cells[(j, s)] = fit([(u, calib[j][u][0]) for u in history[-2:]], s, calib[j][s][0])
            elif m == "full":
                history.append(s)
    return cells


def twin(plan, cells):
    """The plan with its forecast cells on `forecast_fit` with the gains `cells` (the library's technique)."""
    rows = [[forecast_fit.NAME if (j, s) in cells else m for s, m in enumerate(r)] for j, r in enumerate(plan.blocks)]
    table = {**plan.techniques, forecast_fit.NAME: {FITTED: forecast_fit.fitted_params(cells)}}
    return replace(plan, blocks=tuple(tuple(r) for r in rows), techniques=table)


def hooked_unseen(pipe, plan, cells, images, steps, guidance, extra) -> torch.Tensor:
    """The unseen images of a block plan of full / reuse / forecast cells run by forward hooks, its forecast cells
    replaced by `stand_in` with the gains `cells` (the variants the technique does not run, e.g. a gain on r1)."""
    adapter, blocks = adapter_for(pipe), [m for _, m in plan_blocks(pipe)]
    _, everything = class_inputs(adapter, images, seed=1)
    model, outs = adapter.denoiser(pipe), []
    for k in range(images // 8):
        step, cache = [-1], {j: [] for j in range(len(blocks))}

        def hook(j):
            def run(module, args, kwargs, out):
                x, t = (args[0] if args else kwargs["hidden_states"]), step[0]
                m = plan.blocks[j][t]
                if m == "full":
                    cache[j] = [*cache[j][-1:], (t, out - x)]
                    return out
                pts = cache[j]
                return x + (stand_in(pts, t, cells[(j, t)]) if (j, t) in cells else
                            forecast_fit.estimate(pts, t, None) if m == "forecast" else pts[-1][1])
            return run
        handles = [model.register_forward_pre_hook(lambda m, a: step.__setitem__(0, step[0] + 1))]
        handles += [b.register_forward_hook(hook(j), with_kwargs=True) for j, b in enumerate(blocks)]
        try:
            g = torch.Generator(device="cpu").manual_seed(batch_seed(1, k))
            outs.append(adapter.call_pipeline(pipe, everything[8 * k: 8 * k + 8], steps=steps, guidance_scale=guidance,
                                              output_type="pt", generator=g, extra=extra).images)
        finally:
            for h in handles:
                h.remove()
    return torch.cat(outs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fmnist_dit")
    ap.add_argument("--n-calib", type=int, default=4)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.4, 0.5, 0.6, 0.7, 0.8])
    ap.add_argument("--out", default="runs/fitted_forecast.json")
    a = ap.parse_args()
    cfg, pipe, extra, steps, guidance = load_model(a.model)
    calib_inputs = [cfg["inputs"][i % len(cfg["inputs"])] for i in range(a.n_calib)]
    calib = recorded(pipe, calib_inputs, lambda k: 0, steps, guidance, extra, batch=a.n_calib)
    _, everything = class_inputs(adapter_for(pipe), a.images, seed=1)
    seen = recorded(pipe, everything, lambda k: batch_seed(1, k), steps, guidance, extra)
    by_cell = per_cell_errors(calib, seen, steps)
    print(f"\n{a.model}: per-cell stand-in error, every-second-step schedule, {a.images} unseen images (sum over "
          "cells; fitted on the calibration inputs)")
    for name, e in by_cell.items():
        print(f"  {name:<18} {e:8.4f}  ({e / by_cell['forecast']:.3f} of forecast)")

    plans = calibrate_front(pipe, calib_inputs, budgets=a.budgets, steps=steps, guidance_scale=guidance, seed=0,
                            call_kwargs=extra, name=a.model, candidates=["reuse", "forecast"])
    base = unseen(pipe, None, a.images, steps, guidance, extra)
    rows, done = [], {}
    print(f"\n{a.model}: the block-only front's plans, and each with its forecast cells fitted (unseen relative L1)")
    print(f"{'budget':>6} {'predicted':>9} {'forecast':>9} " + " ".join(f"{n:>17}" for n in VARIANTS))
    for b, plan in zip(a.budgets, plans):
        if plan.blocks not in done:
            errs = {"forecast": error_table.final_error(unseen(pipe, plan, a.images, steps, guidance, extra), base)}
            for name, fit in VARIANTS.items():
                cells = fitted_cells(plan, calib, fit)
                got = unseen(pipe, twin(plan, cells), a.images, steps, guidance, extra) if fit is forecast_fit.fit \
                    else hooked_unseen(pipe, plan, cells, a.images, steps, guidance, extra)  # (not a technique)
                errs[name] = error_table.final_error(got, base)
            done[plan.blocks] = errs
        errs = done[plan.blocks]
        rows.append({"budget": b, "predicted": plan.latency["predicted_fraction"], **errs})
        print(f"{b:>6} {plan.latency['predicted_fraction']:>9.3f} {errs['forecast']:>9.4f} "
              + " ".join(f"{errs[n]:>9.4f} ({errs[n] / errs['forecast']:.2f})" for n in VARIANTS), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"model": a.model, "n_calib": a.n_calib, "images": a.images,
                                       "per_cell": by_cell, "front": rows}, indent=1))


if __name__ == "__main__":
    main()
