"""Fidelity of budget plans inside the user's stack (README "Works with"), on evaluation seeds the calibration never
used (it uses seed 0).

    OMP_NUM_THREADS=1 python experiments/stack_fidelity.py [--budget 0.6] [--cn-budget 0.8] [--seeds 1 2 ... 8]

- ControlNet (tiny SD and SD3 from config, random weights: a check that the plan's error does not change with a
  ControlNet, not a quality claim): a plan calibrated on the ControlNet pipeline (its control image passed to
  every calibration call) against the uncompressed ControlNet generation, next to a plan calibrated on the plain
  pipeline against the plain generation.
- int8 (torchao) on the bundled Fashion-MNIST PixArt (trained): the float plan against the float model; the same
  plan on the quantized model against the quantized model; the quantized model against the float one.
Metric: relative L1 of the final latents, |x - ref|_1 / |ref|_1, mean (min-max) over the seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import difa  # noqa: E402
from difa.models import load_configured, pipeline_call_kwargs  # noqa: E402

STEPS = 10
PROMPTS = ["a red bird", "a blue car"]


def rel_l1(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).abs().sum() / ref.abs().sum())


def summary(v: list[float]) -> str:
    return f"{statistics.mean(v):.4f} ({min(v):.4f}-{max(v):.4f})"


def controlnet_rows(budget: float, seeds: list[int]) -> None:
    from tests.test_controlnet import controlnet_pipe

    for family in ("sd", "sd3"):
        pipe, cpipe, image = controlnet_pipe(family)
        key = "control_image" if family == "sd3" else "image"
        g = 5.0 if family == "sd3" else 7.5

        def gen(p, seed, **kw):
            return p(PROMPTS, num_inference_steps=STEPS, guidance_scale=g, output_type="latent",
                     generator=torch.Generator().manual_seed(seed), **pipeline_call_kwargs(family), **kw).images

        for name, p, kw in (("plain", pipe, {}), ("controlnet", cpipe, {key: image})):
            plan = difa.calibrate_pipeline(p, PROMPTS, threshold=0.05, budget=budget, steps=STEPS, guidance_scale=g,
                                           call_kwargs={**pipeline_call_kwargs(family), **kw}, latency_cache=None)
            refs = [gen(p, s, **kw) for s in seeds]
            difa.apply_plan(p, plan)
            errs = [rel_l1(gen(p, s, **kw), r) for s, r in zip(seeds, refs)]
            difa.remove_plan(p)
            cells = plan.block_counts()
            print(f"{family:4s} {name:10s} budget {budget}: rel-L1 {summary(errs)}  cells {dict(cells)}")


def quant_rows(budget: float, seeds: list[int]) -> None:
    import torchao.quantization as q

    for scheme in ("int8_weight_only", "int8_dynamic"):
        c = load_configured("fmnist_pixart")
        pipe = c.pipe
        calib, unseen = c.cfg["inputs"][:4], c.cfg["inputs"][4:8]  # evaluation prompts the calibration never saw

        def gen(seed):
            return pipe(unseen, num_inference_steps=c.steps, guidance_scale=c.guidance, output_type="latent",
                        generator=torch.Generator().manual_seed(seed), **c.extra).images

        plan = difa.calibrate_pipeline(pipe, calib, threshold=0.05, budget=budget, steps=c.steps,
                                       guidance_scale=c.guidance, call_kwargs=c.extra, latency_cache=None)
        float_full = [gen(s) for s in seeds]
        difa.apply_plan(pipe, plan)
        float_plan = [rel_l1(gen(s), r) for s, r in zip(seeds, float_full)]
        difa.remove_plan(pipe)
        config = q.Int8WeightOnlyConfig() if scheme == "int8_weight_only" else q.Int8DynamicActivationInt8WeightConfig()
        q.quantize_(pipe.transformer, config)
        quant_full = [gen(s) for s in seeds]
        difa.apply_plan(pipe, plan)
        quant_plan = [rel_l1(gen(s), r) for s, r in zip(seeds, quant_full)]
        difa.remove_plan(pipe)
        quant = [rel_l1(x, r) for x, r in zip(quant_full, float_full)]
        print(f"fmnist_pixart {scheme:17s} budget {budget}: float plan vs float {summary(float_plan)}; "
              f"plan on int8 vs int8 {summary(quant_plan)}; int8 vs float {summary(quant)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=0.6, help="the PixArt plans' budget")
    ap.add_argument("--cn-budget", type=float, default=0.8,
                    help="the ControlNet rows' (the tiny SD's fastest block plan is ~0.7 of full)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8])
    a = ap.parse_args()
    torch.set_num_threads(1)
    controlnet_rows(a.cn_budget, a.seeds)
    quant_rows(a.budget, a.seeds)


if __name__ == "__main__":
    main()
