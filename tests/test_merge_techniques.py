"""ToMe, AgentSD and T-GATE against naive references written here (Python loops over tokens, explicit softmax),
on the attention layers of the real tiny pipelines while the engine runs a plan; CFG collapse against the
un-collapsed computation; the presets' schedules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import difa
from difa import presets
from difa.adapters import adapter_for
from difa.attention.merge import merge, partition, token_grid, unmerge, bipartite_match
from difa.calibration import fixed_plan
from difa.cost import method_flops
from difa.apply import plan_layers
from difa.errors import DifaError
from difa.techniques.base import LayerShape
from tests.conftest import GUIDANCE, STEPS, generate, tiny

ATOL = 2e-5  # float32 fused kernels vs the float64 explicit softmax below


# ---------------------------------------------------------------- naive references
def naive_groups(metric: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int) -> list[list[int]]:
    """ToMe's bipartite soft matching written out for one sample: metric (N, C) -> token groups (each group is
    one merged token; its first member is the destination or the kept source). Top-left destinations."""
    n = metric.shape[0]
    dst = [y * w + x for y in range(0, (h // sy) * sy, sy) for x in range(0, (w // sx) * sx, sx)]
    src = [i for i in range(n) if i not in set(dst)]
    unit = metric.double() / metric.double().norm(dim=-1, keepdim=True)
    best = []
    for i in src:
        sims = [float(unit[i] @ unit[j]) for j in dst]
        j = max(range(len(dst)), key=lambda k: (sims[k], -k))  # first maximum
        best.append((sims[j], i, dst[j]))
    ranked = sorted(best, key=lambda e: -e[0])  # stable: ties keep raster order
    r = min(r, len(src))
    groups = {j: [j] for j in dst}
    for _, i, j in ranked[:r]:
        groups[j].append(i)
    kept = [[i] for _, i, _ in ranked[r:]]
    return kept + list(groups.values())


def heads(x, h):  # (B, N, H*D) -> (B, H, N, D)
    b, n, hd = x.shape
    return x.view(b, n, h, hd // h).transpose(1, 2)


def lin(layer, x):
    return F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())


def naive_self_attention(attn, x):  # (B, N, C) -> (B, N, C), float64
    q, k, v = (heads(lin(m, x), attn.heads) for m in (attn.to_q, attn.to_k, attn.to_v))
    o = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v
    b, h, n, d = o.shape
    return lin(attn.to_out[0], o.transpose(1, 2).reshape(b, n, h * d))


def naive_agent_attention(attn, x, agents, k_scale2, k_shortcut):
    q, k, v = (heads(lin(m, x), attn.heads) for m in (attn.to_q, attn.to_k, attn.to_v))
    a = heads(lin(attn.to_q, agents), attn.heads)
    d = q.shape[-1]
    agent_v = (a @ k.transpose(-1, -2) * d ** -0.5).softmax(-1) @ v
    o = (q @ a.transpose(-1, -2) * d ** (-0.5 * k_scale2)).softmax(-1) @ agent_v + k_shortcut * v
    b, h, n, dd = o.shape
    return lin(attn.to_out[0], o.transpose(1, 2).reshape(b, n, h * dd))


def naive_tome(attn, x, metric, h, w, sx, sy, ratio, agent_ratio=None, k_scale2=0.3, k_shortcut=0.075):
    out = torch.empty(x.shape, dtype=torch.float64)
    n = x.shape[1]
    for b in range(x.shape[0]):
        groups = naive_groups(metric[b], h, w, sx, sy, int(n * ratio))
        tokens = torch.stack([x[b, g].double().mean(0) for g in groups])[None]  # (1, N', C)
        agent_groups = None if agent_ratio is None else naive_groups(metric[b], h, w, sx, sy, int(n * agent_ratio))
        if agent_groups is not None and len(agent_groups) * 2 < len(groups):
            agents = torch.stack([x[b, g].double().mean(0) for g in agent_groups])[None]
            y = naive_agent_attention(attn, tokens, agents, k_scale2, k_shortcut)[0]
        else:
            y = naive_self_attention(attn, tokens)[0]
        for gi, g in enumerate(groups):
            out[b, g] = y[gi]
    return out.float()


def run_capturing(pipe, family, plan, layer_name, run=generate):
    """Generate with `plan` (`run(pipe, family)`); record (attn input, attn output, block input) of one layer at
    every step."""
    model = adapter_for(pipe).denoiser(pipe)
    attn = model.get_submodule(layer_name)
    block = model.get_submodule(layer_name.rsplit(".", 1)[0])
    calls, blocks = [], []
    h1 = attn.register_forward_hook(lambda m, a, k, o: calls.append((a[0] if a else k["hidden_states"], o)),
                                    with_kwargs=True)
    h2 = block.register_forward_pre_hook(lambda m, a, k: blocks.append(a[0] if a else k["hidden_states"]),
                                         with_kwargs=True)
    difa.apply_plan(pipe, plan)
    try:
        run(pipe, family)
    finally:
        h1.remove()
        h2.remove()
        difa.remove_plan(pipe)
    return attn, calls, blocks


def first_self_attention(pipe):
    return next(i for i, (n, _) in enumerate(plan_layers(pipe)[2]) if n.endswith("attn1"))


# ---------------------------------------------------------------- pure math
def test_partition_merge_unmerge_roundtrip():
    src, dst = partition(8, 8, 2, 2)
    assert dst.tolist() == [y * 8 + x for y in range(0, 8, 2) for x in range(0, 8, 2)]
    assert sorted(src.tolist() + dst.tolist()) == list(range(64))
    g = torch.Generator().manual_seed(0)
    src_r, dst_r = partition(8, 8, 2, 2, g)
    assert len(dst_r) == 16 and not torch.equal(dst_r, dst)  # one random destination per 2x2 cell
    assert len({(int(t) // 8) // 2 * 4 + (int(t) % 8) // 2 for t in dst_r}) == 16  # distinct cells
    x = torch.randn(2, 64, 8)
    m = bipartite_match(x, src, dst, 20)
    y = merge(x, m)
    assert y.shape == (2, 44, 8)
    back = unmerge(y, m)
    kept = m.src[m.unmerged[0]]
    assert torch.equal(back[0, kept], x[0, kept])  # kept tokens come back untouched
    merged_src = m.src[m.merged[0]]
    assert torch.equal(back[0, merged_src], back[0, m.dst[m.target[0]]])  # merged ones take their destination


def test_ratio_cap_warns_instead_of_clamping_silently():
    pipe = tiny("dit")
    with pytest.warns(UserWarning, match="exceeds the maximum 0.75"):
        presets.tomesd(pipe, steps=STEPS, guidance_scale=4.0, ratio=0.9)
    with pytest.raises(DifaError, match="ratio must be in"):
        presets.tomesd(pipe, steps=STEPS, guidance_scale=4.0, ratio=1.5)


def test_token_grid():
    assert token_grid((16, 16), 64, 2) == (8, 8, 1)  # transformer: patch grid, every block at downsample 1
    assert token_grid((64, 64), 4096, None) == (64, 64, 1)  # UNet level 0
    assert token_grid((64, 64), 1024, None) == (32, 32, 2)
    assert token_grid((64, 48), 192, None) == (16, 12, 4)


# ---------------------------------------------------------------- techniques vs naive, in real pipelines
@pytest.mark.parametrize("method", ["tome", "agent"])
def test_merging_matches_naive_reference(family, method):
    pipe = tiny(family)
    row = first_self_attention(pipe)
    name = plan_layers(pipe)[2][row][0]
    if method == "tome":
        params = dict(ratio=0.5, sx=2, sy=2, use_rand=False)
    else:  # 4x4 cells: 4 destinations of 64 tokens -> agents (4) < half the 38 merged tokens
        params = dict(ratio=0.4, sx=4, sy=4, agent_ratio=0.95, use_rand=False)
    plan = fixed_plan(pipe, lambda i, t: method if i == row else "full", steps=STEPS,
                      guidance_scale=GUIDANCE[family], techniques={method: params})
    attn, calls, blocks = run_capturing(pipe, family, plan, name)
    assert len(calls) == STEPS
    n = calls[0][0].shape[1]
    side = int(math.isqrt(n))
    for t in (0, 3):
        x, out = calls[t]
        ref = naive_tome(attn, x, blocks[t], side, side, params["sx"], params["sy"], params["ratio"],
                         params.get("agent_ratio"))
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4, msg=f"{method} step {t}")
        full = naive_self_attention(attn, x).float()
        assert (out - full).abs().max() > 1e-3  # merging really changed the output


def test_unet_levels_beyond_max_downsample_are_not_merged():
    pipe = tiny("sd")
    layers = plan_layers(pipe)[2]
    low = next(i for i, (n, _) in enumerate(layers) if n.startswith("down_blocks.1") and n.endswith("attn1"))
    plan = fixed_plan(pipe, lambda i, t: "tome" if i == low else "full", steps=STEPS,
                      guidance_scale=GUIDANCE["sd"], techniques={"tome": {"ratio": 0.5, "max_downsample": 1}})
    ref = generate(pipe, "sd")
    difa.apply_plan(pipe, plan)
    assert torch.equal(generate(pipe, "sd"), ref)  # 4x4 tokens = downsample 2 > 1: untouched, bit for bit
    difa.remove_plan(pipe)
    plan2 = plan.with_(techniques={**plan.techniques, "tome": {"ratio": 0.5, "max_downsample": 2}})
    difa.apply_plan(pipe, plan2)
    assert not torch.equal(generate(pipe, "sd"), ref)


def test_random_partition_is_seeded_per_layer_and_step():
    pipe = tiny("dit")
    plan = fixed_plan(pipe, lambda i, t: "tome", steps=STEPS, guidance_scale=4.0,
                      techniques={"tome": {"ratio": 0.5, "use_rand": True, "seed": 1}})
    difa.apply_plan(pipe, plan)
    a, b = generate(pipe, "dit"), generate(pipe, "dit")
    difa.remove_plan(pipe)
    assert torch.equal(a, b)  # same seed -> same partitions -> same images
    difa.apply_plan(pipe, plan.with_(techniques={"tome": {"ratio": 0.5, "use_rand": True, "seed": 2}}))
    assert not torch.equal(generate(pipe, "dit"), a)


@pytest.mark.parametrize("family", ["pixart", "sd"])
def test_tgate_matches_naive_reference(family):
    pipe = tiny(family)
    layers = plan_layers(pipe)[2]
    row = next(i for i, (n, _) in enumerate(layers) if n.endswith("attn2"))
    gate = 3
    plan = fixed_plan(pipe, lambda i, t: "tgate" if i == row and t >= gate else "full", steps=STEPS,
                      guidance_scale=GUIDANCE[family])
    _, calls, _ = run_capturing(pipe, family, plan, layers[row][0])
    last = calls[gate - 1][1]  # (B, N, C): the last computed cross-attention output
    h = last.shape[0] // 2
    mean = (last[:h].double() + last[h:].double()) / 2
    for t in range(gate, STEPS):
        torch.testing.assert_close(calls[t][1].double(), torch.cat([mean, mean]), atol=1e-6, rtol=1e-6)


def test_tgate_needs_cross_attention():
    with pytest.raises(DifaError, match="has none"):
        presets.tgate(tiny("dit"), steps=STEPS, guidance_scale=4.0, gate_step=3)


# ---------------------------------------------------------------- CFG collapse
@pytest.mark.parametrize("family", ["pixart", "sd"])
@pytest.mark.parametrize("self_method", ["full", "ast", "tome", "asc", "wars+asc"])
def test_cfg_collapse_equals_uncollapsed(family, self_method):
    """All cross-attention gated from step 3: the engine runs one CFG half and duplicates it. The denoiser outputs
    must equal the whole-batch computation up to float32 rounding of batch-size-dependent kernels (1e-6 relative)."""
    pipe = tiny(family)
    layers = plan_layers(pipe)[2]

    def method(i, t):
        if layers[i][0].endswith("attn2"):
            return "tgate" if t >= 3 else "full"
        return self_method if t >= 4 else "full"

    plan = fixed_plan(pipe, method, steps=STEPS, guidance_scale=GUIDANCE[family])
    runs = {}
    for collapse in (True, False):
        handle = difa.apply_plan(pipe, plan, collapse_cfg=collapse)
        batches, outs = [], []
        h1 = handle.model.register_forward_pre_hook(
            lambda m, a, k: batches.append((a[0] if a else k[handle.adapter.latent_arg]).shape[0]), with_kwargs=True)
        h2 = handle.model.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o.sample).clone()))
        final = generate(pipe, family)
        h1.remove()
        h2.remove()
        difa.remove_plan(pipe)
        runs[collapse] = (batches, outs, final)
    full_b = runs[False][0][0]
    assert runs[False][0] == [full_b] * STEPS
    assert runs[True][0] == [full_b] * 3 + [full_b // 2] * (STEPS - 3)  # one half from the gate on
    for t in range(STEPS):
        a, b = runs[True][1][t], runs[False][1][t]
        torch.testing.assert_close(a, b, atol=1e-6 * float(b.abs().max()), rtol=0, msg=f"step {t}")
    for t in range(3):
        assert torch.equal(runs[True][1][t], runs[False][1][t])  # before the gate: the same computation


def test_collapse_is_skipped_when_a_reused_cache_differs_between_halves():
    """ast at the gate step reuses a pre-gate self-attention output whose CFG halves differ: collapsing would not
    be exact, so that step runs on the whole batch."""
    pipe = tiny("pixart")
    layers = plan_layers(pipe)[2]
    plan = fixed_plan(pipe, lambda i, t: ("tgate" if t >= 3 else "full") if layers[i][0].endswith("attn2")
                      else ("ast" if t == 3 else "full"), steps=STEPS, guidance_scale=GUIDANCE["pixart"])
    handle = difa.apply_plan(pipe, plan)
    batches = []
    hk = handle.model.register_forward_pre_hook(lambda m, a, k: batches.append(k["hidden_states"].shape[0] if "hidden_states" in k else a[0].shape[0]), with_kwargs=True)
    generate(pipe, "pixart")
    hk.remove()
    assert batches == [4, 4, 4, 4, 2, 2]


# ---------------------------------------------------------------- presets and cost model
def test_presets_follow_the_published_schedules():
    pipe = tiny("sd")
    names = [n for n, _ in plan_layers(pipe)[2]]
    p = presets.tgate(pipe, steps=12, guidance_scale=7.5, gate_step=8, sp_interval=3, fi_interval=2, warm_up=2)
    self_row = p.methods[names.index(next(n for n in names if n.endswith("attn1")))]
    cross_row = p.methods[names.index(next(n for n in names if n.endswith("attn2")))]
    assert cross_row == ("full",) * 8 + ("tgate",) * 4
    # tgate_scheduler (tgate 1.0.0): fresh up to warm_up, then at t % sp_interval == 0 (from step 0), always at
    # gate_step - 1, after the gate at t % fi_interval == 0; reuse after the gate reads the CFG mean (`tgate`)
    #          0     1     2     3     4    5     6     7     8     9        10    11
    assert self_row == ("full", "full", "full", "full", "ast", "ast", "full", "full", "full", "tgate", "full", "tgate")
    a = presets.agentsd(tiny("dit"), steps=10, guidance_scale=4.0)
    assert set(a.methods[0][:4]) == {"agent"} and set(a.methods[0][4:]) == {"tome"}
    assert a.techniques["agent"]["sx"] == 4 and a.techniques["tome"]["sx"] == 2
    t = presets.tomesd(tiny("pixart"), steps=STEPS, guidance_scale=4.5, ratio=0.5)
    assert all(set(r) == ({"tome"} if n.endswith("attn1") else {"full"}) for n, r in zip(t.layers, t.methods))
    with pytest.raises(DifaError, match="does not take"):
        presets.preset_plan("tomesd", pipe, steps=4, guidance_scale=7.5, gate_step=3)


def test_cost_model_orders_merging_methods_by_tokens():
    shape = LayerShape(batch=2, n_q=4096, n_kv=4096, dim=320, inner=320, heads=8)
    p = {"tome": {"ratio": 0.5}, "agent": {}}
    full, tome, agent = (method_flops(m, shape, p) for m in ("full", "tome", "agent"))
    assert agent < tome < full
    assert method_flops("tgate", shape, p) == 0.0
    low = LayerShape(batch=2, n_q=1024, n_kv=1024, dim=320, inner=320, heads=8, downsample=2)
    assert method_flops("tome", low, p) == method_flops("full", low, p)  # not merged beyond max_downsample


def test_conformance_with_real_tomesd():
    """Only where the real package is installed (not a dependency): experiments/conformance_tomesd.py."""
    pytest.importorskip("tomesd")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "conformance_tomesd.py"
    spec = importlib.util.spec_from_file_location("conformance_tomesd", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.compare(0.5, sample_size=8)
    assert r["max |difa - tomesd|"] < 1e-5 < r["max |tomesd - unpatched|"]
