"""A plan under diffusers' context parallelism (README "Works with"): 2 CPU processes, gloo, Ulysses degree 2, the
tiny FLUX (its _cp_plan splits the image and text tokens at the model's input and gathers at proj_out).

CPU caveat (diffusers 0.42.1): `_resolve_parallel_config` takes `rank % torch.accelerator.device_count()`, which is
0 on a machine without an accelerator, so the workers (only) report one device; ring attention needs the
log-sum-exp that the `native` backend does not return, so only Ulysses runs on CPU. The GPU check runs ring and
Ulysses (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import difa
from difa.errors import DifaError
from difa.planning import fixed_plan

STEPS = 4


def _plan(pipe, attention=lambda i, t: "full"):
    return fixed_plan(pipe, attention, steps=STEPS, guidance_scale=3.5,
                      block=lambda j, t: "forecast" if t % 2 and j > 0 else "full")


def _generate(pipe):
    from difa.models import pipeline_call_kwargs

    return pipe(["a red bird"], num_inference_steps=STEPS, guidance_scale=3.5, output_type="latent",
                generator=torch.Generator().manual_seed(3), **pipeline_call_kwargs("flux")).images


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    from difa.models import build_tiny_pipeline

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.accelerator.device_count = lambda: 1  # this worker process only: see the module docstring
    try:
        pipe = build_tiny_pipeline("flux", seed=0)
        pipe.set_progress_bar_config(disable=True)
        pipe.transformer.set_attention_backend("native")
        plan = _plan(pipe)
        full = _generate(pipe)
        engine = difa.apply_plan(pipe, plan)
        single = _generate(pipe)  # the plan on one process: the reference
        single_tokens = _cached_tokens(engine)
        difa.remove_plan(pipe)
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        parallel_full = _generate(pipe)
        engine = difa.apply_plan(pipe, plan)
        parallel = _generate(pipe)
        parallel_tokens = _cached_tokens(engine)
        try:
            difa.apply_plan(pipe, _plan(pipe, lambda i, t: "wars" if t % 2 == 0 and t > 0 else "full"))
            refused = ""
        except DifaError as e:
            refused = str(e)
        still = _generate(pipe)  # the refused plan left the block plan in place
        torch.save(dict(full=full, single=single, parallel_full=parallel_full, parallel=parallel, still=still,
                        refused=refused, single_tokens=single_tokens, parallel_tokens=parallel_tokens), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _cached_tokens(engine) -> list[int]:
    """Tokens of every cached block residual (the joined image + text sequence)."""
    return sorted({int(t.shape[1]) for st in engine.block_states for pts in st.slots.values()
                   for t in _tensors(pts)})


def _tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
def test_every_rank_follows_the_plan_on_its_shard(ranks):
    r0, r1 = ranks
    assert (r0["single"] - r0["full"]).abs().max() > 1e-3  # the plan changes the images
    for r in ranks:  # the parallel model is the single-process one (Ulysses attention is exact)
        torch.testing.assert_close(r["parallel_full"], r["full"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["parallel"], r["single"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r0["parallel"], r1["parallel"], rtol=0, atol=0)  # the ranks agree
    # each rank's caches hold its shard only: half of the tokens the single-process caches hold
    assert r0["single_tokens"] and [2 * n for n in r0["parallel_tokens"]] == r0["single_tokens"]


@pytest.mark.slow
def test_attention_cells_are_refused_under_context_parallelism(ranks):
    for r in ranks:
        assert "attention cells" in r["refused"] and "context parallel" in r["refused"] and "\n" not in r["refused"]
        torch.testing.assert_close(r["still"], r["parallel"], rtol=0, atol=0)


def test_a_sharding_block_cannot_be_skipped():
    """Wan and QwenImage split the sequence in a block's hook; a plan that skips that block is refused."""
    from diffusers.hooks import HookRegistry, ModelHook

    pipe = difa.models.build_tiny_pipeline("flux", seed=0)
    plan = _plan(pipe)
    block = pipe.transformer.transformer_blocks[1]
    HookRegistry.check_if_exists_or_initialize(block).register_hook(ModelHook(), "cp_input---1")
    pipe.transformer._parallel_config = type("P", (), {"context_parallel_config": object()})()
    with pytest.raises(DifaError, match=r"block transformer_blocks.1 splits or gathers"):
        difa.apply_plan(pipe, plan)
    assert not hasattr(pipe.transformer, "_difa_engine")
