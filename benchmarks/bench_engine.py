"""Engine overhead and plan speed-up, measured side by side in one run.

    python benchmarks/bench_engine.py [--layers 8] [--tokens 256] [--steps 10] [--repeats 5]

A DiT-shaped DiTTransformer2DModel (random weights, CPU, float32) runs whole DiTPipeline generations:
unpatched, with an all-`full` plan (pure engine overhead; must be bit-exact and <= 3% slower), and with
uniform single-method plans. Runs are interleaved so machine noise hits every variant alike; the table
reports median times relative to unpatched.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

import difa
from difa.calibration import fixed_plan

NULL_CLASS_TABLE = 1000  # DiTPipeline's null class id


def build(layers: int, tokens: int, heads: int, head_dim: int) -> DiTPipeline:
    side = int(math.isqrt(tokens)) * 2  # patch 2
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim,
                                        in_channels=4, out_channels=8, patch_size=2, sample_size=side,
                                        num_embeds_ada_norm=NULL_CLASS_TABLE).eval()
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = build(a.layers, a.tokens, a.heads, a.head_dim)
    guidance = 4.0
    variants = {"unpatched": None}
    for m in ("full", "wars", "asc", "wars+asc", "ast"):
        variants[f"plan: all {m}"] = fixed_plan(pipe, lambda i, t, m=m: m, steps=a.steps, guidance_scale=guidance)

    def generate():
        g = torch.Generator().manual_seed(0)
        return pipe(class_labels=[1, 2], num_inference_steps=a.steps, guidance_scale=guidance, generator=g,
                    output_type="pt").images

    times = {k: [] for k in variants}
    outputs = {}
    for _ in range(a.repeats + 1):  # the first round warms up and is dropped
        for name, plan in variants.items():
            if plan is not None:
                difa.apply_plan(pipe, plan)
            t0 = time.perf_counter()
            outputs[name] = generate()
            times[name].append(time.perf_counter() - t0)
            difa.remove_plan(pipe)
    base = statistics.median(times["unpatched"][1:])
    print(f"DiT {a.layers} layers, {a.tokens} tokens, {a.heads}x{a.head_dim} heads, batch 2x2 (CFG), {a.steps} steps, "
          f"{torch.get_num_threads()} threads, median of {a.repeats}")
    print("| variant | attention FLOPs vs full | time vs unpatched | max abs diff vs unpatched |")
    print("|---|---|---|---|")
    for name, plan in variants.items():
        med = statistics.median(times[name][1:])
        frac = "1.000" if plan is None else f"{_fraction(pipe, plan):.3f}"
        diff = (outputs[name] - outputs["unpatched"]).abs().max().item()
        print(f"| {name} | {frac} | {med / base:.3f} | {diff:.2e} |")


def _fraction(pipe, plan) -> float:
    from difa.cost import plan_flops
    from difa.techniques.base import LayerShape

    model = pipe.transformer
    n = (model.config.sample_size // model.config.patch_size) ** 2
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    shape = LayerShape(batch=4, n_q=n, n_kv=n, dim=inner, inner=inner, heads=model.config.num_attention_heads)
    return plan_flops(plan.methods, [shape] * len(plan.methods), plan.techniques)["fraction"]


if __name__ == "__main__":
    main()
