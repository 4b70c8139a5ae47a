"""The cost model (difa.cost, techniques' flops()) against torch.utils.flop_counter.FlopCounterMode.

What each counts. FlopCounterMode counts 2 FLOPs per multiply-add of the matmul-like aten ops it knows (mm,
addmm, bmm, baddbmm, convolutions, the CUDA SDPA kernels) and nothing else (softmax, norms, elementwise ops are
0). On CPU, F.scaled_dot_product_attention dispatches to a fused kernel it does not know (counted as 0), so every
count here runs under the MATH backend, which decomposes attention into two bmm's it does count. The cost model
counts the attention module: q/k/v/out projections plus Q·Kᵀ and P·V, 2 FLOPs per multiply-add, no softmax.
So the two must agree exactly (tolerance 0) for every method that computes what it is charged for: full,
asc, ast, tome, agent, tgate and CFG collapse.

The one planned difference is window attention (`wars`, `wars+asc`, and the residual a `full` step computes
for them): the cost model charges the band's (query, key) pairs, the ideal (flash-attn's window kernel on CUDA
skips the tiles outside the band); the CPU path computes each query block against block + 2w keys, so it does
more. The tests charge that excess exactly and bound it: at most 1.125x the band at the default block sizes
once w >= 128 tokens (N >= 1024 at w = N/8); far more on the tiny model (N = 64: blocks of 32 against w = 8,
2.5x), where all of attention is tiny anyway.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from difa.attention import band_pairs, window_attention, window_tokens
from difa.attention.window import default_block
from difa.calibration import fixed_plan
from difa.cost import plan_flops
from difa.apply import apply_plan, remove_plan
from difa.cells import keeps
from difa.techniques import REGISTRY
from difa.techniques.wars import WINDOW_RESIDUAL

WARS_ASC = "wars+asc"
RESIDUAL_METHODS = {n for n, t in REGISTRY.items() if WINDOW_RESIDUAL in t.reads}
from difa.techniques import full, kind_of, wars
from tests.conftest import GUIDANCE, STEPS, generate, tiny


pytestmark = pytest.mark.usefixtures("one_thread")


def counted(fn) -> FlopCounterMode:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc


def module_flops(fc: FlopCounterMode, names) -> int:
    """FLOPs inside the named modules (FlopCounterMode keys them '<RootClass>.<module path>', children included)."""
    counts = fc.get_flop_counts()
    return sum(sum(ops.values()) for key, ops in counts.items() if key.split(".", 1)[-1] in set(names))


def run_plan(family: str, pattern):
    """(counted attention FLOPs, cost model dict, plan, engine shapes) of one generation under a fixed plan."""
    pipe = tiny(family)
    plan = fixed_plan(pipe, lambda i, t: pattern[t], steps=STEPS, guidance_scale=GUIDANCE[family])
    engine = apply_plan(pipe, plan)
    try:
        fc = counted(lambda: generate(pipe, family))
    finally:
        remove_plan(pipe)
    shapes = [engine.shapes[i] for i in range(len(plan.layers))]
    model = plan_flops(plan.methods, shapes, plan.techniques, plan.layers, plan.cfg_enabled)
    return module_flops(fc, plan.layers), model, plan, shapes


def blocked_pairs(n: int, w: int) -> int:
    """(query, key) pairs the CPU window kernel computes: each query block against its clipped key band."""
    block = min(n, default_block(n, w))
    return sum((min(n, s + block) - s) * (min(n, s + block + w) - max(0, s - w)) for s in range(0, n, block))


@pytest.mark.parametrize("family, layer", [("dit", "attn1"), ("pixart", "attn1"), ("pixart", "attn2")])
def test_one_full_attention_call(family, layer):
    """One attention module call, at the shapes the engine recorded in a real generation."""
    pipe = tiny(family)
    plan = fixed_plan(pipe, lambda i, t: "full", steps=2, guidance_scale=GUIDANCE[family])
    engine = apply_plan(pipe, plan)
    generate(pipe, family, steps=2)
    remove_plan(pipe)
    i = next(i for i, n in enumerate(plan.layers) if kind_of(n) == layer)
    shape, attn = engine.shapes[i], pipe.transformer.get_submodule(plan.layers[i])
    x = torch.randn(shape.batch, shape.n_q, shape.dim)  # (B, N, C)
    context = torch.randn(shape.batch, shape.n_kv, attn.cross_attention_dim) if layer == "attn2" else None
    fc = counted(lambda: attn(x, encoder_hidden_states=context))
    assert fc.get_total_flops() == full.flops(shape, {}) > 0
    if layer == "attn2":
        assert shape.n_kv != shape.n_q  # text tokens: the cross-attention shapes really differ


def test_denoiser_forward_attention_share():
    """A whole DiT forward: the attention modules account for exactly the cost model's full FLOPs, and the rest
    of the denoiser (MLPs, adaLN, patch embed) is counted separately: it is what attention savings cannot touch."""
    pipe = tiny("dit")
    plan = fixed_plan(pipe, lambda i, t: "full", steps=1, guidance_scale=GUIDANCE["dit"])
    engine = apply_plan(pipe, plan)
    model = pipe.transformer
    b, c, s = 4, model.config.in_channels, model.config.sample_size
    latents = torch.randn(b, c, s, s)  # (B, C, H, W): two inputs x two CFG halves
    call = lambda: model(latents, timestep=torch.full((b,), 500), class_labels=torch.tensor([1, 7, 1000, 1000]))
    try:
        fc = counted(call)
    finally:
        remove_plan(pipe)
    shapes = [engine.shapes[i] for i in range(len(plan.layers))]
    attention = module_flops(fc, plan.layers)
    assert attention == sum(full.flops(sh, {}) for sh in shapes)
    assert attention == plan_flops(plan.methods, shapes, {})["full_gflops"] * 1e9
    total = sum(fc.get_flop_counts()["DiTTransformer2DModel"].values())
    assert 0.2 < attention / total < 0.8  # the tiny DiT spends a real share outside attention


@pytest.mark.parametrize("family, pattern", [
    ("dit", ("full", "ast", "asc", "full", "asc", "ast")),
    ("dit", ("full", "tome", "tome", "agent", "agent", "full")),
    ("pixart", ("full", "tome", "ast", "asc", "full", "ast")),  # asc/ast on attn1; attn2 stays full or ast
    ("pixart", ("full", "full", "tgate", "tgate", "tgate", "tgate")),  # CFG collapse: the whole step on one half
])
def test_generation_matches_the_cost_model_exactly(family, pattern):
    got, model, _, _ = run_plan(family, pattern)
    assert got == pytest.approx(model["plan_gflops"] * 1e9, rel=1e-12, abs=0)
    assert model["fraction"] < 1.0


@pytest.mark.parametrize("family, pattern", [
    ("dit", ("full", "wars", "wars+asc", "full", "wars", "full")),
    ("pixart", ("full", "wars", "ast", "wars", "full", "full")),
])
def test_window_attention_is_the_band_plus_the_cpu_block_overhead(family, pattern):
    """Counted = cost model + (computed - band) pairs of every window-attention call, exactly."""
    got, model, plan, shapes = run_plan(family, pattern)
    excess = 0.0
    for row, keep, shape in zip(plan.methods, [keeps(r, WINDOW_RESIDUAL, {}) for r in plan.methods], shapes):
        n, w = shape.n_kv, window_tokens(wars.DEFAULT_WINDOW, shape.n_kv)
        extra_pairs = blocked_pairs(n, w) - band_pairs(n, w)
        for m, k in zip(row, keep):
            calls = (m in RESIDUAL_METHODS) + k  # a wars cell, and a full cell that caches the residual
            batch = shape.batch // 2 if m == WARS_ASC else shape.batch  # wars+asc: conditional half only
            excess += calls * 4.0 * batch * shape.inner * extra_pairs  # Q·Kᵀ and P·V, 2 FLOPs per multiply-add
    assert excess > 0
    assert got == pytest.approx(model["plan_gflops"] * 1e9 + excess, rel=1e-12, abs=0)
    assert got > model["plan_gflops"] * 1e9


@pytest.mark.parametrize("n", [1024, 4096])
def test_window_overhead_is_small_at_real_sizes(n):
    """w = N/8 (DiTFastAttn): the CPU kernel computes at most 1.125x the band's pairs (block = w/4)."""
    w = window_tokens(wars.DEFAULT_WINDOW, n)
    q = torch.randn(1, 1, n, 8)  # (B, H, N, D): one head is enough, FLOPs scale with B·H·D
    fc = counted(lambda: window_attention(q, q, q, w))
    band = 4 * 8 * band_pairs(n, w)
    assert fc.get_total_flops() == 4 * 8 * blocked_pairs(n, w)
    assert 1.0 < fc.get_total_flops() / band <= 1.125
