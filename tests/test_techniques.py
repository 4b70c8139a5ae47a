"""Each DiTFastAttn technique against a naive reference written here (explicit masks, explicit softmax),
checked on the attention layers of the real tiny pipelines while the engine runs a plan."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import difa
from difa.calibration import fixed_plan
from difa.apply import plan_layers
from tests.conftest import GUIDANCE, STEPS, generate, tiny

ATOL = 2e-5  # float32: blocked/fused attention vs the explicit softmax below
WINDOW = 0.125  # w = round(N / 8) tokens per side
PATTERN = ["full", "wars", "ast", "asc", "wars+asc", "full"]  # layer-0 row, one entry per step


def heads(x, h):  # (B, N, H*D) -> (B, H, N, D)
    b, n, hd = x.shape
    return x.view(b, n, h, hd // h).transpose(1, 2)


def naive_attention(attn, x, w=None):
    """softmax(QKᵀ/√d + band mask) V with the band |i - j| <= w written out as an N×N mask. (B, H, N, D)."""
    q = heads(F.linear(x, attn.to_q.weight, attn.to_q.bias), attn.heads)
    k = heads(F.linear(x, attn.to_k.weight, attn.to_k.bias), attn.heads)
    v = heads(F.linear(x, attn.to_v.weight, attn.to_v.bias), attn.heads)
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if w is not None:
        i = torch.arange(x.shape[1])
        s = s.masked_fill((i[:, None] - i[None, :]).abs() > w, float("-inf"))
    return (s.softmax(-1) @ v.double()).float()


def naive_out(attn, o):  # (B, H, N, D) -> (B, N, C)
    b, h, n, d = o.shape
    return F.linear(o.transpose(1, 2).reshape(b, n, h * d), attn.to_out[0].weight, attn.to_out[0].bias)


def capture(module):
    """Record (input, output) of every call of an Attention module."""
    calls = []

    def hook(mod, args, kwargs, out):
        calls.append((args[0] if args else kwargs["hidden_states"], out))

    return calls, module.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("layer", [0, 2])
def test_plan_row_matches_naive_reference(family, layer):
    pipe = tiny(family)
    model = pipe.unet if family == "sd" else pipe.transformer
    attns = [(n, m) for n, m in model.named_modules() if n.endswith("attn1")]
    name, attn = attns[layer]
    row = [n for n, _ in plan_layers(pipe)[2]].index(name)  # the plan lists attn2 layers too
    plan = fixed_plan(pipe, lambda i, t: PATTERN[t] if i == row else "full", steps=STEPS,
                      guidance_scale=GUIDANCE[family], window=WINDOW)
    assert plan.methods[row] == tuple(PATTERN)
    calls, handle = capture(attn)
    difa.apply_plan(pipe, plan)
    generate(pipe, family)
    handle.remove()
    difa.remove_plan(pipe)
    assert len(calls) == STEPS
    n = calls[0][0].shape[1]
    w = round(WINDOW * n)
    b = calls[0][0].shape[0]
    cond = slice(0, b // 2) if family == "dit" else slice(b // 2, b)  # DiT puts the conditional half first

    x0 = calls[0][0]
    residual = naive_attention(attn, x0) - naive_attention(attn, x0, w)  # cached before to_out
    expected = {0: naive_out(attn, naive_attention(attn, x0))}
    x1 = calls[1][0]
    expected[1] = naive_out(attn, naive_attention(attn, x1, w) + residual)
    expected[2] = calls[1][1]  # ast: the last computed output, as is
    x3 = calls[3][0]
    o3 = naive_out(attn, naive_attention(attn, x3[cond]))
    expected[3] = torch.cat([o3, o3])
    x4 = calls[4][0]
    o4 = naive_out(attn, naive_attention(attn, x4[cond], w) + residual[cond])
    expected[4] = torch.cat([o4, o4])
    expected[5] = naive_out(attn, naive_attention(attn, calls[5][0]))
    for t in range(STEPS):
        torch.testing.assert_close(calls[t][1], expected[t], atol=ATOL, rtol=1e-4, msg=f"step {t} ({PATTERN[t]})")
    assert calls[2][1] is calls[1][1]  # ast returns the cached tensor itself


def test_window_covering_everything_makes_wars_exact():
    """With w >= N-1 the window is full attention and R = 0: a wars plan must equal the unpatched model."""
    pipe = tiny("dit")
    ref = generate(pipe, "dit")
    plan = fixed_plan(pipe, lambda i, t: "wars", steps=STEPS, guidance_scale=GUIDANCE["dit"], window=1.0)
    difa.apply_plan(pipe, plan)
    torch.testing.assert_close(generate(pipe, "dit"), ref, atol=1e-5, rtol=1e-5)


def test_asc_with_identical_halves_is_exact(family):
    """When both CFG halves see the same conditioning, sharing attention across them changes nothing."""
    pipe = tiny(family)
    ref = generate(pipe, family, guidance=GUIDANCE[family])
    plan = fixed_plan(pipe, lambda i, t: "asc", steps=STEPS, guidance_scale=GUIDANCE[family])
    difa.apply_plan(pipe, plan)
    out = generate(pipe, family)
    assert not torch.equal(out, ref)  # halves differ in the real CFG batch, so asc is an approximation...
    difa.remove_plan(pipe)
    model = pipe.unet if family == "sd" else pipe.transformer
    attn = next(m for n, m in model.named_modules() if n.endswith("attn1"))
    x = torch.randn(1, 64, attn.to_q.in_features).repeat(2, 1, 1)  # ...but exact on identical halves
    from difa.techniques import asc
    from difa.techniques.base import Cell, LayerState

    cell = Cell(attn, "attn1", 0, 1, LayerState(), {}, attn.processor, cond=slice(1, 2))
    torch.testing.assert_close(asc.execute(cell, x), attn.processor(attn, x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rule", ["full", "full+asc"])
def test_ditfastattn_residual_rule_against_naive_reference(rule):
    """With residual_from="full+asc" (DiTFastAttn), an `asc` step computes R on the conditional half and both
    halves read it; with "full" (difa's default) R stays the one of the last `full` step."""
    pipe = tiny("dit")
    name, attn = next((n, m) for n, m in pipe.transformer.named_modules() if n.endswith("attn1"))
    pattern = ["full", "asc", "wars", "wars+asc", "full", "full"]
    plan = fixed_plan(pipe, lambda i, t: pattern[t] if i == 0 else "full", steps=STEPS,
                      guidance_scale=GUIDANCE["dit"], window=WINDOW, techniques={"wars": {"residual_from": rule}})
    assert plan.methods[0] == tuple(pattern)
    calls, handle = capture(attn)
    difa.apply_plan(pipe, plan)
    generate(pipe, "dit")
    handle.remove()
    difa.remove_plan(pipe)
    x = [c[0] for c in calls]
    w = round(WINDOW * x[0].shape[1])
    cond = slice(0, x[0].shape[0] // 2)  # DiT: conditional half first
    if rule == "full":
        r = naive_attention(attn, x[0]) - naive_attention(attn, x[0], w)
    else:
        half = naive_attention(attn, x[1][cond]) - naive_attention(attn, x[1][cond], w)
        r = torch.cat([half, half])
    o1 = naive_out(attn, naive_attention(attn, x[1][cond]))
    torch.testing.assert_close(calls[1][1], torch.cat([o1, o1]), atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(calls[2][1], naive_out(attn, naive_attention(attn, x[2], w) + r), atol=ATOL, rtol=1e-4)
    o3 = naive_out(attn, naive_attention(attn, x[3][cond], w) + r[cond])
    torch.testing.assert_close(calls[3][1], torch.cat([o3, o3]), atol=ATOL, rtol=1e-4)
