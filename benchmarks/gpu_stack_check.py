"""The GPU checks of "Works with" (issue 31), one line each (run by benchmarks/gpu_check.sh).

    python benchmarks/gpu_stack_check.py            # on CUDA
    python benchmarks/gpu_stack_check.py --dry-run  # anywhere: the accelerate hooks with the CPU as execution device

On CUDA, with a block plan (every second step skips every block but the first) on the tiny DiT and PixArt:
- `pipe.enable_model_cpu_offload()` and `pipe.enable_sequential_cpu_offload()`, the plan applied before and after:
  the images equal those of the plan on the GPU without offloading (max |diff| <= 1e-5, float32), and undo leaves
  the offloading hooks working;
- regional torch.compile (difa.compile_blocks, inductor): no recompile after the first generation, images within
  1e-3 of the eager plan's.
Context parallelism needs two GPUs: with two or more, `torchrun --nproc_per_node=2 benchmarks/gpu_stack_check.py
--cp` runs Ulysses and ring (nccl) with the plan against the single-GPU plan (tests/test_parallel.py does Ulysses on
CPU); on one GPU the line says skipped. Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

import torch

import difa
from difa.adapters import adapter_for
from difa.models import build_tiny_pipeline, pipeline_call_kwargs
from difa.planning import fixed_plan

STEPS = 6
INPUTS = {"dit": [1, 7], "pixart": ["a red bird", "a blue car"], "flux": ["a red bird"]}
SIZE = {"dit": 16, "pixart": 16, "flux": None}


def plan_for(pipe, family):
    return fixed_plan(pipe, lambda i, t: "full", steps=STEPS, guidance_scale=4.0,
                      block=lambda j, t: "forecast" if t % 2 and j > 0 else "full")


def generate(pipe, family, device):
    return adapter_for(pipe).call_pipeline(
        pipe, INPUTS[family], steps=STEPS, guidance_scale=4.0, generator=torch.Generator(device).manual_seed(3),
        output_type="latent" if family != "dit" else "pt", extra=pipeline_call_kwargs(family)).images.float().cpu()


def offload_checks(device: str, dry: bool) -> list[tuple[bool, str]]:
    from accelerate import cpu_offload, cpu_offload_with_hook

    out = []
    for family in ("dit", "pixart"):
        for offload in ("model", "sequential"):
            for order in ("plan_first", "offload_first"):
                pipe = build_tiny_pipeline(family, seed=0, sample_size=SIZE[family]).to(device)
                pipe.set_progress_bar_config(disable=True)
                plan = plan_for(pipe, family)
                difa.apply_plan(pipe, plan)
                expected = generate(pipe, family, device)
                difa.remove_plan(pipe)
                if not dry:
                    pipe.to("cpu")

                def hook():
                    if dry:  # the hooks the pipeline methods install, with the CPU as execution device
                        model = adapter_for(pipe).denoiser(pipe)
                        (cpu_offload_with_hook if offload == "model" else cpu_offload)(model, execution_device=torch.device("cpu"))
                    elif offload == "model":
                        pipe.enable_model_cpu_offload()
                    else:
                        pipe.enable_sequential_cpu_offload()

                if order == "offload_first":
                    hook()
                    difa.apply_plan(pipe, plan)
                else:
                    difa.apply_plan(pipe, plan)
                    hook()
                got = generate(pipe, family, device)
                difa.remove_plan(pipe)
                generate(pipe, family, device)  # the hooks still run the model
                diff = float((got - expected).abs().max())
                out.append((diff <= 1e-5, f"offload {family} {offload} {order}: max|diff| {diff:.2e} (<= 1e-5)"))
    return out


def compile_check(device: str, dry: bool) -> tuple[bool, str]:
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    pipe = build_tiny_pipeline("dit", seed=0, sample_size=16).to(device)
    pipe.set_progress_bar_config(disable=True)
    difa.apply_plan(pipe, plan_for(pipe, "dit"))
    eager = generate(pipe, "dit", device)
    difa.compile_blocks(pipe, backend="eager" if dry else "inductor")
    first = generate(pipe, "dit", device)
    graphs = counters["stats"]["unique_graphs"]
    second = generate(pipe, "dit", device)
    again = counters["stats"]["unique_graphs"] - graphs
    diff = float(max((first - eager).abs().max(), (second - eager).abs().max()))
    return again == 0 and diff <= 1e-3, f"compile dit regional: {graphs} graphs, {again} recompiles after the first generation, max|diff| {diff:.2e}"


def cp_check() -> list[tuple[bool, str]]:
    """Under torchrun on >= 2 GPUs: the plan under Ulysses and ring context parallelism against one GPU."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    out = []
    for mode in ("ulysses", "ring"):
        pipe = build_tiny_pipeline("flux", seed=0).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        plan = plan_for(pipe, "flux")
        difa.apply_plan(pipe, plan)
        single = generate(pipe, "flux", "cuda")
        difa.remove_plan(pipe)
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(**{f"{mode}_degree": 2}))
        difa.apply_plan(pipe, plan)
        parallel = generate(pipe, "flux", "cuda")
        diff = float((parallel - single).abs().max())
        out.append((diff <= 1e-4, f"context parallel {mode} rank {rank}: max|diff| {diff:.2e} (<= 1e-4)"))
    dist.destroy_process_group()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--cp", action="store_true", help="context parallelism (under torchrun, >= 2 GPUs)")
    a = ap.parse_args(argv)
    if a.cp:
        results = cp_check()
    else:
        if not a.dry_run and not torch.cuda.is_available():
            print("gpu_stack_check: no CUDA device (use --dry-run)")
            return 1
        device = "cpu" if a.dry_run else "cuda"
        results = offload_checks(device, a.dry_run) + [compile_check(device, a.dry_run)]
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n < 2:
            results.append((True, f"context parallel: skipped ({n} GPU; needs 2: torchrun --nproc_per_node=2 "
                                  "benchmarks/gpu_stack_check.py --cp)"))
    for ok, line in results:
        print(("ok   " if ok else "FAIL ") + line)
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
