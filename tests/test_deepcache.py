"""`deepcache` (UNet units return their cached output) and presets `deepcache` / `tgate+deepcache` on the tiny SD
UNet: against a naive reference written here (plain forward hooks replacing module outputs), and against the real
packages (DeepCache's DeepCacheSDHelper, tgate's TgateSDDeepCacheLoader), bit for bit; undo, apply twice, plan
round trip and one-line errors."""

from __future__ import annotations

import pytest
import torch

import difa
from difa.calibration import fixed_plan
from difa.errors import DifaError
from difa.plan import Plan, attention_executed
from difa.presets import preset_plan
from tests.conftest import GUIDANCE, INPUTS, generate, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 8


def deep_modules(unet, branch_id: int) -> list[torch.nn.Module]:
    """DeepCache's deep branch, written out from the paper's picture: the mid block, the down path from the cut
    (block branch_id // 3, layer branch_id % 3) on, and the mirrored up path before it (counted from the output).
    Outermost modules only: what runs inside them never matters."""
    cb, cl = divmod(branch_id, 3)
    mods = [unet.mid_block]
    for i, block in enumerate(unet.down_blocks):
        if i > cb or (i == cb and cl == 0):
            mods.append(block)
        elif i == cb:
            for part in ("resnets", "attentions"):
                mods += [m for k, m in enumerate(getattr(block, part, None) or []) if k >= cl]
            mods += list(block.downsamplers or [])
    n = len(unet.up_blocks)
    for i, block in enumerate(unet.up_blocks):
        b = n - 1 - i
        if b > cb:
            mods.append(block)
        elif b == cb:
            last = len(block.resnets) - 1
            for part in ("resnets", "attentions"):
                mods += [m for k, m in enumerate(getattr(block, part, None) or []) if last - k > cl]
    return mods


def naive_deepcache(pipe, interval: int, branch_id: int) -> torch.Tensor:
    """Every module always runs; at non-fresh steps the deep ones' outputs are replaced by their outputs at the
    last fresh step (forward hooks only)."""
    step, cache, handles = [-1], {}, []
    handles.append(pipe.unet.register_forward_pre_hook(lambda m, a: step.__setitem__(0, step[0] + 1)))

    def hook(module, args, out):
        if step[0] % interval == 0:
            cache[module] = out
            return out
        return cache[module]

    for m in deep_modules(pipe.unet, branch_id):
        handles.append(m.register_forward_hook(hook))
    try:
        return generate(pipe, "sd", steps=STEPS)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("interval, branch_id", [(3, 0), (2, 1), (3, 3), (4, 2)])
def test_deepcache_preset_matches_naive_hooks(interval, branch_id):
    pipe = tiny("sd")
    base = generate(pipe, "sd", steps=STEPS)
    plan = preset_plan("deepcache", pipe, steps=STEPS, guidance_scale=GUIDANCE["sd"], cache_interval=interval,
                       cache_branch_id=branch_id)
    difa.apply_plan(pipe, plan)
    difa.apply_plan(pipe, plan)  # twice: replaces, never stacks
    try:
        got = generate(pipe, "sd", steps=STEPS)
        again = generate(pipe, "sd", steps=STEPS)  # caches reset per generation
    finally:
        difa.remove_plan(pipe)
    assert torch.equal(generate(pipe, "sd", steps=STEPS), base)  # undo is exact
    assert torch.equal(got, naive_deepcache(pipe, interval, branch_id)) and torch.equal(got, again)
    assert not torch.equal(got, base)
    assert any(not all(r) for r in attention_executed(plan))  # attention inside cached units is moot


def test_deepcache_plan_round_trip_and_moot_cells(tmp_path):
    pipe = tiny("sd")
    plan = preset_plan("deepcache", pipe, steps=STEPS, guidance_scale=GUIDANCE["sd"])
    loaded = difa.load_plan(plan.save(tmp_path / "dc.json"))
    assert loaded == plan and "mid_block" in loaded.model.blocks
    j = loaded.model.blocks.index("down_blocks.0.resnets.0")  # inside down block 0, which is cached: moot
    assert loaded.blocks[j][1] == "full" and loaded.blocks[loaded.model.blocks.index("down_blocks.0")][1] == "deepcache"
    from difa.plots import MOOT, plan_rows

    assert plan_rows(loaded)[1][j][1] == MOOT and plan_rows(loaded)[1][j][0] == "full"  # the heatmap says so too
    rows = [list(r) for r in loaded.blocks]
    rows[j][1] = "deepcache"  # a moot cell that is not `full` is refused
    with pytest.raises(DifaError, match="a block around it is skipped at that step"):
        loaded.with_(blocks=tuple(map(tuple, rows)))
    rows = [list(r) for r in loaded.blocks]
    rows[loaded.model.blocks.index("mid_block")][0] = "deepcache"  # nothing cached before step 0
    with pytest.raises(DifaError, match="no earlier step computes it"):
        loaded.with_(blocks=tuple(map(tuple, rows)))


def test_deepcache_errors_are_one_line():
    with pytest.raises(DifaError, match="has no down/mid/up blocks"):
        preset_plan("deepcache", tiny("dit"), steps=STEPS, guidance_scale=GUIDANCE["dit"])
    pipe = tiny("sd")
    with pytest.raises(DifaError, match="cache_branch_id 9 is past"):
        preset_plan("deepcache", pipe, steps=STEPS, guidance_scale=GUIDANCE["sd"], cache_branch_id=9)
    with pytest.raises(DifaError, match="cache_interval must be an integer >= 1"):
        preset_plan("deepcache", pipe, steps=STEPS, guidance_scale=GUIDANCE["sd"], cache_interval=0)
    # A cached output made at one batch cannot serve another (a step where the batch changes must run).
    plan = fixed_plan(pipe, lambda i, t: "full", steps=STEPS, guidance_scale=GUIDANCE["sd"], cache_units=True,
                      block=lambda j, t: "deepcache" if t == 1 else "full")
    difa.apply_plan(pipe, plan)
    try:
        calls = []

        def half_batch(module, args, kwargs):  # step 1 gets one CFG half only
            calls.append(1)
            if len(calls) == 2:
                return (args[0][:1], *args[1:]), {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"][:1]}
            return None

        h = pipe.unet.register_forward_pre_hook(half_batch, with_kwargs=True, prepend=True)
        with pytest.raises(DifaError, match="the cached output has batch 4 but the input has 1"):
            generate(pipe, "sd", steps=STEPS)
        h.remove()
    finally:
        difa.remove_plan(pipe)


def test_deepcache_is_the_deepcache_package():
    DeepCache = pytest.importorskip("DeepCache")
    pipe = tiny("sd")
    for interval, branch_id in ((3, 0), (2, 4)):
        difa.apply_plan(pipe, preset_plan("deepcache", pipe, steps=STEPS, guidance_scale=GUIDANCE["sd"],
                                          cache_interval=interval, cache_branch_id=branch_id))
        ours = generate(pipe, "sd", steps=STEPS)
        difa.remove_plan(pipe)
        helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch_id)
        helper.enable()
        try:
            theirs = generate(pipe, "sd", steps=STEPS)
        finally:
            helper.disable()
        assert torch.equal(ours, theirs)


def test_tgate_with_deepcache_is_the_tgate_package():
    """T-GATE's README combination (TgateSDDeepCacheLoader): DeepCache restarts at gate_step - 1 and gate_step."""
    tgate = pytest.importorskip("tgate")
    pytest.importorskip("DeepCache")
    steps, params = 12, dict(gate_step=6, sp_interval=3, fi_interval=1, warm_up=1)
    pipe = tiny("sd")

    def run(call, **extra):
        return call(prompt=INPUTS["sd"], num_inference_steps=steps, guidance_scale=GUIDANCE["sd"],
                    output_type="latent", generator=torch.Generator().manual_seed(3), **extra).images

    plan: Plan = preset_plan("tgate+deepcache", pipe, steps=steps, guidance_scale=GUIDANCE["sd"], **params)
    difa.apply_plan(pipe, plan)
    ours = run(pipe)
    difa.remove_plan(pipe)
    alone = tiny("sd")
    difa.apply_plan(alone, preset_plan("tgate", alone, steps=steps, guidance_scale=GUIDANCE["sd"], **params))
    tgate_only = run(alone)
    theirs = run(tgate.TgateSDDeepCacheLoader(tiny("sd"), cache_interval=3, cache_branch_id=0).tgate, **params)
    assert torch.equal(ours, theirs) and not torch.equal(ours, tgate_only)


def test_tgate_with_deepcache_stays_on_one_half_where_no_attention_runs():
    """SD-XL (tiny: DownBlock2D first, UpBlock2D last) with DeepCache branch 0: a cached step runs only conv_in, the
    last up block's last resnet and conv_out, so after the gate it has no cross-attention cell that runs, let alone a
    gated one. The engine must keep such a step on the one half of the gate step (T-GATE dropped CFG for good, and the
    deep branch's cached outputs have one-half batch); before the fix it ran the whole batch and failed on the
    batch check. Needs no package."""
    from difa.tiny import build_tiny_pipeline, tiny_call_kwargs

    pipe = build_tiny_pipeline("sdxl", seed=0)
    pipe.set_progress_bar_config(disable=True)
    steps, gate = 10, 4
    plan = preset_plan("tgate+deepcache", pipe, steps=steps, guidance_scale=5.0, gate_step=gate, sp_interval=1,
                       fi_interval=1, warm_up=0)
    executed = attention_executed(plan)
    cross = [i for i, n in enumerate(plan.model.layers) if n.endswith("attn2")]
    assert not any(executed[i][gate + 1] for i in cross)  # the case: no cross-attention runs at step gate + 1
    batches = []
    h = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    difa.apply_plan(pipe, plan)
    try:
        pipe(prompt=INPUTS["sd"], num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
             generator=torch.Generator().manual_seed(3), **tiny_call_kwargs("sdxl"))
    finally:
        difa.remove_plan(pipe)
        h.remove()
    assert batches == [4] * gate + [2] * (steps - gate)
