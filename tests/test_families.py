"""The model families beyond DiT / PixArt / SD 1.5 (issue 14): SD-XL, Playground v2.5, LCM-SDXL, PixArt-LCM,
Stable Video Diffusion and Latte, on tiny random-weight pipelines with the real architectures.

For each: the adapter row is found, an all-full plan is bit-exact with the unpatched pipeline and undo is exact,
each technique that applies matches a naive reference written here on that architecture's attention layers while
the engine runs a plan (video: spatial and temporal layers both), and a method that does not apply is refused with
a one-line reason (in a hand-written plan) or skipped with a recorded reason (in calibration)."""

from __future__ import annotations

import functools
import inspect
import math
from functools import partial

import pytest
import torch

import difa
from difa.adapters import adapter_for
from difa.calibration import calibrate_pipeline, fixed_plan
from difa.calibration.latency import Capture
from difa.calibration.served import decode_seconds
from difa.apply import plan_blocks, plan_layers
from difa.errors import DifaError
from difa.plan import Plan
from difa.tiny import build_tiny_pipeline, tiny_call_kwargs
from tests.test_calibrate import assert_loss_is_what_the_sampler_reads
from tests.test_merge_techniques import naive_self_attention, naive_tome, run_capturing
from tests.test_techniques import naive_attention, naive_out

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = ("sdxl", "playground_v25", "lcm_sdxl", "lcm_pixart", "svd", "latte")
VIDEO = ("svd", "latte")
NO_CFG = ("lcm_sdxl", "lcm_pixart")
STEPS = 6
INPUTS = {"svd": ["synthetic:0", "synthetic:1"]}
GUIDANCE = {"sdxl": 5.0, "playground_v25": 3.0, "lcm_sdxl": 8.0, "lcm_pixart": 0.0, "svd": 3.0, "latte": 7.5,
            "sd3": 7.0, "sd35": 4.5, "flux": 3.5, "cogvideox": 6.0}  # the last four: tests/test_families_mmdit.py
BARE = {"lcm_pixart": "pixart", "playground_v25": "sdxl"}  # a bare denoiser has no scheduler to tell them apart
ATOL = 2e-5


@pytest.fixture(params=NEW)
def fam(request) -> str:
    return request.param


def tiny(family: str):
    pipe = build_tiny_pipeline(family, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, family: str, steps: int = STEPS) -> torch.Tensor:
    """Final latents of one seeded generation (two inputs)."""
    adapter = adapter_for(pipe)
    out = adapter.call_pipeline(pipe, INPUTS.get(family, ["a red bird", "a blue car"]), steps=steps,
                                guidance_scale=GUIDANCE[family], generator=torch.Generator().manual_seed(3),
                                output_type="latent", extra=tiny_call_kwargs(family))
    return adapter.outputs(out)


def test_adapter_rows_are_found(fam):
    pipe = tiny(fam)
    adapter = adapter_for(pipe)
    assert adapter.family == fam
    assert adapter_for(adapter.denoiser(pipe)).family == BARE.get(fam, fam)
    assert (adapter.cfg_layout == "none") == (fam in NO_CFG)
    axes = {adapter.axis(n) for n, _ in adapter.planned_layers(adapter.denoiser(pipe))}
    assert axes == ({"spatial", "temporal"} if fam in VIDEO else {"spatial"})


def test_all_full_plan_is_bit_exact_and_undo_is_exact(fam):
    pipe = tiny(fam)
    ref = generate(pipe, fam)
    difa.apply_plan(pipe, fixed_plan(pipe, lambda i, t: "full", steps=STEPS, guidance_scale=GUIDANCE[fam]))
    assert torch.equal(generate(pipe, fam), ref)
    difa.apply_plan(pipe, fixed_plan(pipe, lambda i, t: "ast", steps=STEPS, guidance_scale=GUIDANCE[fam]))
    changed = generate(pipe, fam)
    assert not torch.equal(changed, ref)  # the plan ran
    assert difa.remove_plan(pipe)
    assert torch.equal(generate(pipe, fam), ref)


def layer_named(pipe, part: str) -> tuple[int, str]:
    """Row and name of the first self-attention layer whose name contains `part` (spatial / temporal)."""
    names = [n for n, _ in plan_layers(pipe)[2]]
    adapter = adapter_for(pipe)
    i = next(i for i, n in enumerate(names) if n.endswith("attn1") and adapter.axis(n) == part)
    return i, names[i]


def run_row(pipe, family, row: int, name: str, pattern: list[str], **kw):
    """Generate with `pattern` on plan row `row`; record (input, output, block input) of the layer at every step."""
    plan = fixed_plan(pipe, lambda i, t: pattern[t] if i == row else "full", steps=STEPS,
                      guidance_scale=GUIDANCE[family], **kw)
    assert plan.methods[row] == tuple(pattern)
    attn, calls, blocks = run_capturing(pipe, family, plan, name, run=generate)
    assert len(calls) == STEPS
    return attn, calls, blocks


@pytest.mark.parametrize("axis", ["spatial", "temporal"])
def test_window_reuse_and_cfg_sharing_match_naive_reference(fam, axis):
    """wars (band |i - j| <= 1 plus the residual of step 0), ast (the last output as is) and, with a CFG batch, asc
    (the conditional rows' attention for both halves) on a spatial and (video) a temporal self-attention layer."""
    if axis == "temporal" and fam not in VIDEO:
        pytest.skip("image model: no temporal layers")
    pipe = tiny(fam)
    row, name = layer_named(pipe, axis)
    share = "full" if fam in NO_CFG else "asc"
    pattern = ["full", "wars", "ast", share, "wars", "full"]
    attn, calls, _ = run_row(pipe, fam, row, name, pattern, window=1)
    x0 = calls[0][0]  # spatial: (B*F, h*w, C); temporal: (B*h*w, F, C)
    residual = naive_attention(attn, x0) - naive_attention(attn, x0, 1)
    rows = x0.shape[0]
    cond = slice(0, rows // 2) if fam == "dit" else slice(rows // 2, rows)  # [uncond, cond] rows in these families
    expected = {0: naive_out(attn, naive_attention(attn, x0)),
                1: naive_out(attn, naive_attention(attn, calls[1][0], 1) + residual),
                2: calls[1][1],
                4: naive_out(attn, naive_attention(attn, calls[4][0], 1) + residual),  # asc does not compute R
                5: naive_out(attn, naive_attention(attn, calls[5][0]))}
    if share == "asc":
        o3 = naive_out(attn, naive_attention(attn, calls[3][0][cond]))
        expected[3] = torch.cat([o3, o3])
    else:  # a full step 3 computes the residual step 4 adds
        x3 = calls[3][0]
        expected[3] = naive_out(attn, naive_attention(attn, x3))
        r3 = naive_attention(attn, x3) - naive_attention(attn, x3, 1)
        expected[4] = naive_out(attn, naive_attention(attn, calls[4][0], 1) + r3)
    for t, e in expected.items():
        torch.testing.assert_close(calls[t][1], e, atol=ATOL, rtol=1e-4, msg=f"{fam} {axis} step {t} ({pattern[t]})")
    assert (calls[1][1] - naive_out(attn, naive_attention(attn, calls[1][0]))).abs().max() > 1e-4  # not just full


@pytest.mark.parametrize("method", ["tome", "agent"])
def test_token_merging_matches_naive_reference_on_spatial_layers(fam, method):
    """tome / agent on the first spatial self-attention layer (its frames' grids for video), top-left
    destinations."""
    pipe = tiny(fam)
    row, name = layer_named(pipe, "spatial")
    if method == "tome":
        params = dict(ratio=0.5, sx=2, sy=2, use_rand=False, max_downsample=8)  # SD-XL's attention starts at 2x
    else:
        params = dict(ratio=0.4, sx=4, sy=4, agent_ratio=0.95, use_rand=False, max_downsample=8)
    attn, calls, blocks = run_row(pipe, fam, row, name, [method] * STEPS, techniques={method: params})
    for t in (0, 3):
        x, out = calls[t]
        side = math.isqrt(x.shape[1])
        ref = naive_tome(attn, x, blocks[t], side, side, params["sx"], params["sy"], params["ratio"],
                         params.get("agent_ratio"))
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4, msg=f"{fam} {method} step {t}")
        assert (out - naive_self_attention(attn, x).float()).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["reuse", "forecast"])
def test_block_methods_match_naive_hooks(fam, method):
    """Block reuse / forecast every second step on every block but the first (video: spatial and temporal blocks)
    against forward hooks that replace the blocks' outputs (tests/test_blocks.naive)."""
    from tests.test_blocks import naive, schedule

    pipe = tiny(fam)
    ref = generate(pipe, fam)
    expected = naive(pipe, fam, method, run=generate)
    assert not torch.equal(expected, ref)
    plan = fixed_plan(pipe, lambda i, t: "full", steps=STEPS, guidance_scale=GUIDANCE[fam], block=schedule(method))
    if fam in VIDEO:
        adapter = adapter_for(pipe)
        assert {adapter.axis(n + ".attn1") for n, r in zip(plan.model.blocks, plan.blocks) if method in r} == \
            {"spatial", "temporal"}
    difa.apply_plan(pipe, plan)
    torch.testing.assert_close(generate(pipe, fam), expected, rtol=0, atol=1e-6)
    difa.remove_plan(pipe)
    assert torch.equal(generate(pipe, fam), ref)


def test_tgate_matches_naive_reference(fam):
    """tgate on a cross-attention layer: from the gate on, the output of the last computed step, averaged over the
    CFG halves when there is a CFG batch (LCM: as it is)."""
    if fam == "latte":
        name = "transformer_blocks.0.attn2"
    else:
        name = next(n for n, _ in plan_layers(tiny(fam))[2] if n.endswith("attn2"))
    pipe = tiny(fam)
    row = [n for n, _ in plan_layers(pipe)[2]].index(name)
    _, calls, _ = run_row(pipe, fam, row, name, ["full", "full", "tgate", "tgate", "tgate", "tgate"])
    last = calls[1][1]
    h = last.shape[0] // 2
    mean = last if fam in NO_CFG else torch.cat([(last[:h] + last[h:]) / 2] * 2)
    for t in range(2, STEPS):
        torch.testing.assert_close(calls[t][1], mean, atol=0, rtol=0)


def test_methods_that_do_not_apply_are_refused_and_skipped():
    # token merging across frames: refused in a hand-written plan with the reason
    pipe = tiny("latte")
    plan = fixed_plan(pipe, lambda i, t: "full", steps=STEPS, guidance_scale=GUIDANCE["latte"])
    row, name = layer_named(pipe, "temporal")
    d = plan.to_dict()
    d["methods"][name][1] = "tome"
    with pytest.raises(DifaError, match="temporal layer") as e:
        Plan.from_dict(d, source="test")
    assert "\n" not in str(e.value)
    # ...and a preset-like fixed schedule leaves the temporal layers full
    tome_plan = fixed_plan(pipe, lambda i, t: "tome", steps=STEPS, guidance_scale=GUIDANCE["latte"], kinds=("attn1",))
    assert set(tome_plan.methods[row]) == {"full"} and "tome" in tome_plan.counts()
    # CFG sharing on a guidance-distilled model: refused in a plan, in a fixed schedule, skipped in calibration
    lcm = tiny("lcm_sdxl")
    with pytest.raises(DifaError, match="guidance-distilled"):
        fixed_plan(lcm, lambda i, t: "asc", steps=4, guidance_scale=8.0)
    plan = fixed_plan(lcm, lambda i, t: "full", steps=4, guidance_scale=8.0)
    assert not plan.cfg_enabled and plan.cfg_layout == "none"
    d = plan.to_dict()
    d["methods"][next(n for n in plan.model.layers if n.endswith("attn1"))][1] = "asc"
    with pytest.raises(DifaError, match="guidance-distilled"):
        Plan.from_dict(d, source="test")
    plan = calibrate_pipeline(lcm, ["a red bird"], threshold=0.05, steps=4, guidance_scale=8.0, seed=0,
                              call_kwargs=tiny_call_kwargs("lcm_sdxl"), search="greedy", latency_cache=None,
                              candidates=["asc", "ast"])
    assert "guidance-distilled" in plan.calibration["skipped_candidates"]["asc"]
    assert "asc" not in plan.counts()


def test_svd_loss_reads_the_per_frame_guidance():
    """SVD's sampler reads uncond + g_f * (cond - uncond) with g ramping over the frames from min_guidance_scale
    to max_guidance_scale: the greedy's loss is measured on exactly that (a scalar g would read another tensor)."""
    pipe = tiny("svd")
    kw = {**tiny_call_kwargs("svd"), "min_guidance_scale": 1.5}
    plan = calibrate_pipeline(pipe, INPUTS["svd"], threshold=1e6, steps=STEPS, guidance_scale=GUIDANCE["svd"], seed=3,
                              call_kwargs=kw, search="greedy", candidates=["asc"], latency_cache=None)
    adapter = adapter_for(pipe)

    def run():
        adapter.call_pipeline(pipe, INPUTS["svd"], steps=STEPS, guidance_scale=GUIDANCE["svd"], output_type="latent",
                              generator=torch.Generator().manual_seed(3), extra=kw)

    assert_loss_is_what_the_sampler_reads(pipe, plan, "asc", run)


def latents_then_decoded(pipe, family: str, inputs, kw):
    """Two seeded 2-step calls: latent output under a calibration Capture, then np output (which decodes). Returns
    the latents and the capture."""
    adapter = adapter_for(pipe)
    call = partial(adapter.call_pipeline, pipe, inputs, steps=2, guidance_scale=GUIDANCE[family], extra=kw)
    _, _, layers = plan_layers(pipe)
    capture = Capture(adapter.denoiser(pipe), adapter, plan_blocks(pipe), layers)
    try:
        final = adapter.outputs(call(generator=torch.Generator().manual_seed(0), output_type="latent"))
    finally:
        capture.close()
    call(generator=torch.Generator().manual_seed(0), output_type="np")
    return final, capture


@pytest.mark.parametrize("family,chunk", [("svd", True), ("svd", False), ("latte", True), ("latte", False),
                                          ("cogvideox", False)])
def test_video_decode_is_timed_as_the_pipeline_decodes(family, chunk):
    """Budget mode adds the decode a pil/np call does to its fixed cost: for video, the pipeline's own decode_latents
    called exactly as the pipeline calls it (the latents' shape, frame count, decode_chunk_size: the user's, or
    without one the pipeline's default)."""
    pipe = tiny(family)
    real = pipe.decode_latents
    calls = []

    @functools.wraps(real)
    def recording(*args, **kwargs):
        bound = inspect.signature(real).bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append({k: tuple(v.shape) if torch.is_tensor(v) else v for k, v in bound.arguments.items()})
        return real(*args, **kwargs)

    pipe.decode_latents = recording
    kw = tiny_call_kwargs(family)
    if not chunk:
        kw.pop("decode_chunk_size", None)
    inputs = INPUTS.get(family, ["a red bird", "a blue car"])
    final, capture = latents_then_decoded(pipe, family, inputs, kw)
    assert len(calls) == 1  # the np call decoded once, the latent one not at all
    pipelines = calls.pop()
    seconds = decode_seconds(pipe, capture, len(inputs), final, kw)
    assert seconds > 0 and len(calls) == 4  # a warm-up and three timed runs
    assert all(c == pipelines for c in calls), (calls[0], pipelines)


@pytest.mark.parametrize("family", ["svd", "latte", "lcm_pixart"])
def test_calibrate_and_run_a_plan(family, tmp_path):
    """Both searches produce a plan that saves, loads and runs; the temporal layers get cells too."""
    pipe = tiny(family)
    inputs = INPUTS.get(family, ["a red bird", "a blue car"])
    plan = calibrate_pipeline(pipe, inputs, threshold=0.2, steps=STEPS, guidance_scale=GUIDANCE[family], seed=0,
                              call_kwargs=tiny_call_kwargs(family), search="greedy", latency_cache=None)
    path = plan.save(tmp_path / "p.json")
    loaded = difa.load_plan(path)
    assert loaded.model.family == family
    if family in VIDEO:
        adapter = adapter_for(pipe)
        temporal = [r for n, r in zip(plan.model.layers, plan.methods) if adapter.axis(n) == "temporal"]
        assert any(m != "full" for r in temporal for m in r)
    difa.apply_plan(pipe, loaded)
    out = generate(pipe, family)
    difa.remove_plan(pipe)
    assert torch.isfinite(out).all()


TINY_KW = {"svd": dict(height=64, width=64, num_frames=4, decode_chunk_size=4),
           "latte": dict(height=64, width=64, video_length=4, decode_chunk_size=4),
           "lcm_pixart": dict(height=64, width=64)}


def test_cli_calibrates_and_generates_every_tiny_family(fam, tmp_path):
    """`python -m difa.calibrate +model=tiny_<family>` then `python -m difa.generate plan=...`, in-process."""
    from difa.cli import calibrate as calibrate_cli
    from difa.cli import generate as generate_cli
    from tests.test_cli import config

    plan_path = tmp_path / "plan.json"
    plan, _ = calibrate_cli.run(config("calibrate", [f"+model=tiny_{fam}", "threshold=0.05", "steps=4", "n_calib=2",
                                                     f"out={plan_path}"]))
    assert plan.model.family == fam and plan_path.is_file()
    images, out = generate_cli.run(config("generate", [f"plan={plan_path}", "n=2", f"out={tmp_path / 'out'}"]))
    assert len(images) == 2 and (out / "grid.png").is_file()
    assert (out / ("000.gif" if fam in VIDEO else "000.png")).is_file()


def test_hub_configs_load_through_from_pretrained(fam, tmp_path):
    """`+model=<family>` (the hub config) with model.path=<a save_pretrained dir of the tiny model>: the real loading
    path, the real scheduler swap of the config; LCM-SDXL's distilled UNet through model.components.unet."""
    from difa.cli import calibrate as calibrate_cli
    from tests.test_cli import config

    local = tmp_path / fam
    tiny(fam).save_pretrained(local)
    overrides = [f"+model={fam}", f"model.path={local}", "steps=3", "n_calib=1", f"out={tmp_path / 'p.json'}",
                 "threshold=0.05"]
    if fam == "lcm_sdxl":
        overrides.append(f"model.components.unet={local / 'unet'}")
    overrides += [f"++model.call_kwargs.{k}={v}" for k, v in TINY_KW.get(fam, {}).items()]  # tiny sizes
    plan, _ = calibrate_cli.run(config("calibrate", overrides))
    assert plan.model.name == fam and plan.model.family == fam and plan.inference_steps == 3
