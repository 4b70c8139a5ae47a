"""Image generation sharded across processes with `accelerate`: every process generates a share of the jobs, the
images come back in the original job order, identical to a single-process run.

Why identical: the jobs are cut into fixed batches first (the same batches whatever the process count), whole
batches go round-robin to the processes, and each image's noise comes from its own generator seeded by its job,
so no image depends on which process made it or on what else was in flight.

    accelerate launch --multi_gpu --num_processes 2 my_script.py   # CPU (torchrun; gloo), or N GPUs
    python my_script.py                                             # one process, same images

On a machine without GPUs, `accelerate launch --cpu --num_processes 2` starts one process unless MPI is set
up (accelerate's multi-CPU path is mpirun); `--multi_gpu` uses torchrun, and `cpu=True` below makes the
processes join a gloo group instead of looking for CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np
import torch

from difa.errors import DifaError

T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    index: int  # position in the caller's list: the output order
    seed: int  # seed of this image's own generator
    input: int | str  # class id or prompt


def job_seed(seed: int, index: int) -> int:
    """Independent, reproducible seed of job `index` (numpy SeedSequence; any process computes the same)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def make_jobs(inputs: Sequence[int | str], seed: int) -> list[Job]:
    return [Job(i, job_seed(seed, i), x) for i, x in enumerate(inputs)]


def batches(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive chunks of `size` (the last may be shorter): fixed before sharding, so that every process count
    computes the same batches."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DifaError(f"batch size must be an integer >= 1 (got {size!r})")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """This process's share: items rank, rank + world, ... (round-robin keeps the shares within one item)."""
    if not 0 <= rank < world:
        raise DifaError(f"process index {rank} is outside 0..{world - 1}")
    return list(items[rank::world])


def process_state(cpu: bool):
    """accelerate's PartialState; refuses a launch whose processes did not join one group (each would make
    every image)."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != state.num_processes:
        raise DifaError(f"launched {launched} processes but accelerate joined {state.num_processes}; on CPU pass "
                        "cpu=True (device cpu) and launch with `accelerate launch --multi_gpu --num_processes N`")
    return state


def generate_sharded(generate: Callable[[list[Job]], torch.Tensor], jobs: Sequence[Job], *, batch: int,
                     cpu: bool = False, progress: bool = False) -> torch.Tensor:
    """Run generate(batch of jobs) -> (b, ...) images for this process's share of `batch`-sized batches and
    gather everything: every process gets all images (N, ...) in job order; only the main process need use them."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    state = process_state(cpu)
    chunks = list(enumerate(batches(list(jobs), batch)))
    mine = shard(chunks, state.process_index, state.num_processes)
    done = []
    for k, chunk in tqdm(mine, desc="generate", unit="batch", disable=not (progress and state.is_main_process)):
        images = generate(chunk)
        if images.shape[0] != len(chunk):
            raise DifaError(f"generate returned {images.shape[0]} images for a batch of {len(chunk)} jobs")
        done.append((k, images.cpu()))
    gathered = gather_object(done) if state.num_processes > 1 else done  # [(batch index, (b, ...))] from all ranks
    if not gathered:
        raise DifaError("no jobs to generate; pass at least one input")
    return torch.cat([images for _, images in sorted(gathered, key=lambda kv: kv[0])])


def pipeline_generate(pipe: Any, *, steps: int, guidance_scale: float, extra: Mapping | None = None,
                      output_type: str = "pt") -> Callable[[list[Job]], torch.Tensor]:
    """generate() for generate_sharded on a diffusers pipeline (any plan applied to it stays applied):
    a batch of jobs -> (b, 3, H, W) float images, each from a generator seeded by its job."""
    from difa.adapters import adapter_for

    adapter = adapter_for(pipe)

    def generate(chunk: list[Job]) -> torch.Tensor:
        generators = [torch.Generator(device="cpu").manual_seed(j.seed) for j in chunk]  # one per image
        out = adapter.call_pipeline(pipe, [j.input for j in chunk], steps=steps, guidance_scale=guidance_scale,
                                    generator=generators, output_type=output_type, extra=extra)
        return torch.as_tensor(adapter.outputs(out)).float()

    return generate
