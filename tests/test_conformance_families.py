"""The seed papers' published schedules as difa presets on the new families (issue 14), against the real packages
on tiny random-weight pipelines: T-GATE (`tgate` 1.0.0) on SD-XL, LCM-SDXL, PixArt-LCM and SVD; T-GATE + DeepCache
on SD-XL (TgateSDXLDeepCacheLoader); DeepCache (`DeepCache` 0.1.1, DeepCacheSDHelper) on SD-XL; ToMe (`tomesd`
0.1.3) on SD-XL.

Each case generates three times with the same seed and output_type="latent": the stock pipeline (the reference; the
method must change it), the difa preset applied to it, and the real package on a fresh pipe built with the same seed
(the packages never undo their patches). Bit-exact where the computation is the same; ToMe has a stated tolerance.

The schedules at 25 steps are scaled to 10 (gate_step 10 -> 4, sp_interval 5 -> 2, warm_up 2 -> 1); the LCMs run
their published 4 steps; test_published_defaults_at_25_steps runs the 25-step schedules as published, with each
side's defaults. Each package case is skipped where its package is not installed (the `conformance` extra).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import difa
from difa import adapters
from difa.presets import TGATE_SETTINGS, preset_plan
from difa.tiny import build_tiny_pipeline, tiny_call_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red bird", "a blue car"]
STEPS = 10
SCALED = dict(gate_step=4, sp_interval=2, fi_interval=1, warm_up=1)  # SD-XL / SVD's 10, 5, 1, 2 of 25, at 10 steps
SCALED_DEEPCACHE = dict(gate_step=4, sp_interval=1, fi_interval=1, warm_up=0)  # the README's SD-XL + DeepCache


def tiny(family: str):
    pipe = build_tiny_pipeline(family, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text(call, family: str, steps: int, guidance: float, **extra) -> torch.Tensor:
    """Final latents of one seeded text-to-image generation (two prompts)."""
    return call(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                generator=torch.Generator().manual_seed(3), **tiny_call_kwargs(family), **extra).images


def changes(theirs: torch.Tensor, reference: torch.Tensor, at_least: float) -> bool:
    """The method really changes the result: relative L1 distance above `at_least`."""
    return not torch.equal(theirs, reference) and float((theirs - reference).abs().sum() / reference.abs().sum()) > at_least


def ours(pipe, family: str, preset: str, steps: int, guidance: float, **params) -> torch.Tensor:
    difa.apply_plan(pipe, preset_plan(preset, pipe, steps=steps, guidance_scale=guidance, **params))
    try:
        return text(pipe, family, steps, guidance)
    finally:
        difa.remove_plan(pipe)


@pytest.mark.parametrize("params", [SCALED, dict(SCALED, fi_interval=2)])  # fi 2: self-attention reuses the gate's mean
def test_tgate_on_sdxl(params, monkeypatch):
    """TgateSDXLLoader runs the *unconditional* half after the gate (its negative pooled text embedding, zeros by
    default, enters every resnet's temb); difa's collapse keeps that half (Adapter.collapse_to "uncond"). Keeping the
    conditional half instead gives another image, so the collapse half is really tested here."""
    tgate = pytest.importorskip("tgate")
    pipe = tiny("sdxl")
    reference = text(pipe, "sdxl", STEPS, 5.0)
    mine = ours(pipe, "sdxl", "tgate", STEPS, 5.0, **params)
    theirs = text(tgate.TgateSDXLLoader(tiny("sdxl")).tgate, "sdxl", STEPS, 5.0, **params)
    assert changes(theirs, reference, 1e-3)
    assert torch.equal(mine, theirs)
    monkeypatch.setitem(adapters.ADAPTERS, "sdxl", dataclasses.replace(adapters.ADAPTERS["sdxl"], collapse_to="cond"))
    assert not torch.equal(ours(pipe, "sdxl", "tgate", STEPS, 5.0, **params), theirs)


@pytest.mark.parametrize("family, guidance", [("lcm_sdxl", 5.0), ("lcm_pixart", 0.0)])
@pytest.mark.parametrize("gate_step", [1, 2])
def test_tgate_on_the_lcms(family, guidance, gate_step):
    """T-GATE's LCM setting (4 steps, gate_step 1 or 2, nothing cached before it: sp 1, fi 1, warm_up 0), with
    lcm=True passed to `.tgate` (TgateSDXLLoader ignores loader kwargs in 1.0.0). No CFG batch: the gated output is
    reused as it is. difa gets only gate_step (the rest are the family's published defaults; gate 1 is the default
    too). The change is small on random weights (the LCM scheduler re-noises each step), but never zero."""
    tgate = pytest.importorskip("tgate")
    assert TGATE_SETTINGS[family] == (1, 1, 1, 0)
    loader = tgate.TgateSDXLLoader if family == "lcm_sdxl" else tgate.TgatePixArtAlphaLoader
    pipe = tiny(family)
    reference = text(pipe, family, 4, guidance)
    mine = ours(pipe, family, "tgate", 4, guidance, **({} if gate_step == 1 else dict(gate_step=gate_step)))
    theirs = text(loader(tiny(family)).tgate, family, 4, guidance, gate_step=gate_step, sp_interval=1, fi_interval=1,
                  warm_up=0, lcm=True)
    assert changes(theirs, reference, 1e-6)
    assert torch.equal(mine, theirs)


def test_tgate_on_svd():
    """TgateSVDLoader: spatial and temporal attention on one schedule, the *conditional* half after the gate (the
    real image latents and embedding, guidance 1 for every frame). The image is a tensor at the tiny CLIP-vision size
    (224: stock SVD resizes only PIL images to it); height, width and num_frames explicit (the package defaults
    to 576 x 1024)."""
    tgate = pytest.importorskip("tgate")
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def video(call, **extra):
        return call(image=image, num_inference_steps=STEPS, max_guidance_scale=3.0, output_type="latent",
                    generator=torch.Generator().manual_seed(3), **tiny_call_kwargs("svd"), **extra).frames

    pipe = tiny("svd")
    reference = video(pipe)
    difa.apply_plan(pipe, preset_plan("tgate", pipe, steps=STEPS, guidance_scale=3.0, **SCALED))
    mine = video(pipe)
    difa.remove_plan(pipe)
    theirs = video(tgate.TgateSVDLoader(tiny("svd")).tgate, **SCALED)
    assert changes(theirs, reference, 1e-2)
    assert torch.equal(mine, theirs)


def test_tgate_with_deepcache_on_sdxl():
    """TgateSDXLDeepCacheLoader(cache_interval 3, branch 0). On SD-XL a DeepCache-cached step runs no attention at
    all (branch 0 keeps conv_in, the last UpBlock2D's last resnet, conv_out), so after the gate such a step has no
    gated cross-attention cell; the engine must still run it on one half (Engine._gates), as the package does."""
    tgate = pytest.importorskip("tgate")
    pytest.importorskip("DeepCache")
    pipe = tiny("sdxl")
    reference = text(pipe, "sdxl", STEPS, 5.0)
    mine = ours(pipe, "sdxl", "tgate+deepcache", STEPS, 5.0, **SCALED_DEEPCACHE)
    tgate_only = ours(pipe, "sdxl", "tgate", STEPS, 5.0, **SCALED_DEEPCACHE)
    loader = tgate.TgateSDXLDeepCacheLoader(tiny("sdxl"), cache_interval=3, cache_branch_id=0)
    theirs = text(loader.tgate, "sdxl", STEPS, 5.0, **SCALED_DEEPCACHE)
    assert changes(theirs, reference, 1e-2) and not torch.equal(mine, tgate_only)
    assert torch.equal(mine, theirs)


@pytest.mark.parametrize("interval, branch_id", [(3, 0), (2, 4)])
def test_deepcache_on_sdxl(interval, branch_id):
    """DeepCacheSDHelper on StableDiffusionXLPipeline: DownBlock2D / UpBlock2D levels have no attentions."""
    DeepCache = pytest.importorskip("DeepCache")
    pipe = tiny("sdxl")
    reference = text(pipe, "sdxl", STEPS, 5.0)
    mine = ours(pipe, "sdxl", "deepcache", STEPS, 5.0, cache_interval=interval, cache_branch_id=branch_id)
    theirs_pipe = tiny("sdxl")
    helper = DeepCache.DeepCacheSDHelper(pipe=theirs_pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch_id)
    helper.enable()
    try:
        theirs = text(theirs_pipe, "sdxl", STEPS, 5.0)
    finally:
        helper.disable()
    assert changes(theirs, reference, 1e-3)
    assert torch.equal(mine, theirs)


def test_tomesd_on_sdxl():
    """tomesd.apply_patch on SD-XL. Its default max_downsample 1 merges nothing there (the full-resolution level has
    no attention), so the difa preset defaults to 2 on SD-XL; with the package at 2 both merge the level-1 blocks.

    Tolerance, not bit-exact: difa orders the merged tokens differently from tomesd (the existing SD conformance,
    experiments/conformance_tomesd.py), which changes the summation order inside attention; float32 rounding then
    grows over the steps (max 1.4e-5 here, against a change of ~1e-2 relative). use_rand=False (top-left
    destinations): with use_rand=True the destinations cannot match, as tomesd draws them from a generator cloned
    from the global RNG state at the first UNet call, one stream across every layer and step, while difa seeds one
    generator per (seed, layer, step)."""
    tomesd = pytest.importorskip("tomesd")
    steps, guidance = 8, 5.0
    pipe = tiny("sdxl")
    reference = text(pipe, "sdxl", steps, guidance)
    plan = preset_plan("tomesd", pipe, steps=steps, guidance_scale=guidance, ratio=0.5, use_rand=False)
    assert plan.calibration["params"]["max_downsample"] == 2
    difa.apply_plan(pipe, plan)
    mine = text(pipe, "sdxl", steps, guidance)
    difa.remove_plan(pipe)
    theirs_pipe = tiny("sdxl")
    tomesd.apply_patch(theirs_pipe, ratio=0.5, max_downsample=1, sx=2, sy=2, use_rand=False)
    assert torch.equal(text(theirs_pipe, "sdxl", steps, guidance), reference)  # tomesd's default: a no-op on SD-XL
    tomesd.apply_patch(theirs_pipe, ratio=0.5, max_downsample=2, sx=2, sy=2, use_rand=False)
    theirs = text(theirs_pipe, "sdxl", steps, guidance)
    assert changes(theirs, reference, 1e-3)
    assert (mine - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("case", ["sdxl", "sdxl+deepcache", "svd"])
def test_published_defaults_at_25_steps(case):
    """The published schedules at their own 25 steps, with no schedule argument on either side: difa's per-family
    defaults (TGATE_SETTINGS; tgate+deepcache's) are the package's signature defaults (SD-XL and SVD: gate 10, sp 5,
    fi 1, warm_up 2; SD-XL + DeepCache: gate 10, sp 1, fi 1, warm_up 0, interval 3, branch 0)."""
    tgate = pytest.importorskip("tgate")
    steps, family = 25, case.split("+")[0]
    preset = "tgate+deepcache" if case.endswith("deepcache") else "tgate"
    if case == "svd":
        image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))

        def run(call):
            return call(image=image, num_inference_steps=steps, max_guidance_scale=3.0, output_type="latent",
                        generator=torch.Generator().manual_seed(3), **tiny_call_kwargs("svd")).frames

        loader = tgate.TgateSVDLoader(tiny("svd"))
    else:
        def run(call):
            return text(call, "sdxl", steps, 5.0)

        if preset == "tgate+deepcache":
            pytest.importorskip("DeepCache")
            loader = tgate.TgateSDXLDeepCacheLoader(tiny("sdxl"), cache_interval=3, cache_branch_id=0)
        else:
            loader = tgate.TgateSDXLLoader(tiny("sdxl"))
    pipe = tiny(family)
    difa.apply_plan(pipe, preset_plan(preset, pipe, steps=steps, guidance_scale=3.0 if case == "svd" else 5.0))
    mine = run(pipe)
    difa.remove_plan(pipe)
    assert torch.equal(mine, run(loader.tgate))
