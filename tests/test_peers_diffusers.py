"""diffusers' TaylorSeer, MagCache and FasterCache hooks as peers (`plan=diffusers:<name>`): through difa they give
exactly what calling diffusers' apply_* functions directly gives (with the glue written here: a timestep callback and
a cache context), undo restores the stock model, and SeaCache is refused in one line where it does not apply."""

from __future__ import annotations

import ast
import re

import pytest
import torch
from diffusers.hooks import (FasterCacheConfig, HookRegistry, MagCacheConfig, TaylorSeerCacheConfig, apply_faster_cache,
                             apply_mag_cache, apply_taylorseer_cache)
from diffusers.hooks.hooks import CacheContext, _set_cache_context

from difa.adapters import adapter_for
from difa.errors import DifaError
from difa.peers import DiffusersHook
from tests.conftest import generate, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 8


def direct(pipe, family, apply):
    """One generation with `apply(model, timestep)` having hooked the denoiser; the hooks removed afterwards."""
    model = adapter_for(pipe).denoiser(pipe)
    seen = {"t": float("inf")}

    def record(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        seen["t"] = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)

    handle = model.register_forward_pre_hook(record, with_kwargs=True, prepend=True)
    apply(model, lambda: seen["t"])
    try:
        return generate(pipe, family, steps=STEPS)
    finally:
        handle.remove()
        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in list(registry.hooks):
            registry.remove_hook(name, recurse=True)
        for _, sub in model.named_modules():
            r = getattr(sub, "_diffusers_hook", None)
            if r is not None:
                for name in list(r.hooks):
                    r.remove_hook(name, recurse=False)


def through_difa(pipe, family, hook):
    hook.prepare(pipe, STEPS, lambda: generate(pipe, family, steps=STEPS))
    hook.apply(pipe)
    hook.apply(pipe)  # twice is safe
    try:
        got, again = generate(pipe, family, steps=STEPS), generate(pipe, family, steps=STEPS)  # reset per generation
    finally:
        hook.remove(pipe)
    assert torch.equal(got, again)
    return got


@pytest.mark.parametrize("family", ["dit", "pixart"])
@pytest.mark.parametrize("targets, order", [("blocks", 1), ("attention", 2)])
def test_taylorseer_equals_diffusers_directly(family, targets, order):
    pipe = tiny(family)
    base = generate(pipe, family, steps=STEPS)
    got = through_difa(pipe, family, DiffusersHook("taylorseer", {"cache_interval": 2, "warmup_steps": 2,
                                                                  "order": order, "targets": targets}))
    assert torch.equal(generate(pipe, family, steps=STEPS), base)  # removed: the stock model again
    adapter = adapter_for(pipe)
    model = adapter.denoiser(pipe)
    names = [n for n, _ in (adapter.block_layers(model) if targets == "blocks" else adapter.planned_layers(model))]

    def apply(model, _):
        apply_taylorseer_cache(model, TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=2, max_order=order, taylor_factors_dtype=torch.float32,
            cache_identifiers=[re.escape(n) for n in names]))
        _set_cache_context(model, CacheContext("test"))

    assert torch.equal(got, direct(pipe, family, apply)) and not torch.equal(got, base)


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_fastercache_equals_diffusers_directly(family):
    pipe = tiny(family)
    base = generate(pipe, family, steps=STEPS)
    got = through_difa(pipe, family, DiffusersHook("fastercache", {"skip": 2, "uncond_skip": 3,
                                                                   "timestep_range": (-1, 900)}))
    assert torch.equal(generate(pipe, family, steps=STEPS), base)

    def apply(model, now):
        apply_faster_cache(model, FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 900),
            unconditional_batch_skip_range=3, tensor_format="BCHW", current_timestep_callback=now,
            attention_weight_callback=lambda _: 0.5,
            _unconditional_conditional_input_kwargs_identifiers=["hidden_states", "encoder_hidden_states", "timestep",
                                                                 "attention_mask", "encoder_attention_mask",
                                                                 "class_labels"]))

    assert torch.equal(got, direct(pipe, family, apply)) and not torch.equal(got, base)


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_magcache_calibrates_then_equals_diffusers_directly(family, capsys):
    pipe = tiny(family)
    base = generate(pipe, family, steps=STEPS)
    hook = DiffusersHook("magcache", {"threshold": 0.5, "max_skip_steps": 2, "retention_ratio": 0.25})
    with pytest.raises(DifaError, match="magnitude ratios first"):
        hook.apply(pipe)
    got = through_difa(pipe, family, hook)
    assert hook.calibration == {"forwards": STEPS, "seconds": hook.calibration["seconds"], "images": 1}
    assert torch.equal(generate(pipe, family, steps=STEPS), base)
    # diffusers' calibration mode, run directly, prints the ratios to copy into the config
    direct(pipe, family, lambda model, _: apply_mag_cache(model, MagCacheConfig(calibrate=True, num_inference_steps=STEPS)))
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert hook.mag_ratios == pytest.approx(ast.literal_eval(printed), rel=0, abs=0)

    def apply(model, _):
        apply_mag_cache(model, MagCacheConfig(threshold=0.5, max_skip_steps=2, retention_ratio=0.25,
                                              num_inference_steps=STEPS, mag_ratios=hook.mag_ratios))

    assert torch.equal(got, direct(pipe, family, apply)) and not torch.equal(got, base)


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_seacache_is_refused_where_it_does_not_apply(family):
    pipe = tiny(family)
    base = generate(pipe, family, steps=2)
    with pytest.raises(DifaError, match="SeaCache does not apply to .*Transformer2DModel"):
        DiffusersHook("seacache").apply(pipe)
    assert torch.equal(generate(pipe, family, steps=2), base)


@pytest.mark.parametrize("name, params, message", [
    ("taylorseer", {"cache_interval": 0}, "cache_interval must be an integer >= 1"),
    ("taylorseer", {"targets": "mlp"}, "targets must be one of blocks, attention"),
    ("taylorseer", {"warmup_steps": 0}, "warmup_steps must be an integer >= 1"),
    ("magcache", {"retention_ratio": 1.5}, r"retention_ratio must be in \[0, 1\]"),
    ("magcache", {"threshold": float("nan")}, "threshold must be a number >= 0"),
    ("fastercache", {"uncond_skip": 0}, "uncond_skip must be an integer >= 1"),
    ("fastercache", {"timestep_range": (900, -1)}, "low < high"),
    ("seacache", {"order": 2}, "order must be 0"),
    ("taylorseer", {"skip": 2}, "drop skip"),
])
def test_bad_peer_parameters(name, params, message):
    with pytest.raises(DifaError, match=message):
        DiffusersHook(name, params)
