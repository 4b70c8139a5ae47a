"""Caching peers run through the same evaluation code as difa's plans: diffusers' own hooks, Pyramid Attention
Broadcast (`diffusers.hooks.apply_pyramid_attention_broadcast`, arXiv 2408.12588), First Block Cache
(`diffusers.hooks.apply_first_block_cache`, ParaAttention), TaylorSeer (`apply_taylorseer_cache`, arXiv 2503.06923),
MagCache (`apply_mag_cache`, its one-generation calibration included), FasterCache (`apply_faster_cache`, arXiv
2410.19355) and SeaCache (`apply_sea_cache`: refused with a reason where it does not apply), `plan=diffusers:<name>`
(class DiffusersHook below).

The hooks are diffusers' code, unchanged. difa only supplies what the stock DiT / PixArt pipelines do not:
- PAB needs `current_timestep_callback`; the pipelines have no `current_timestep`, so a forward pre-hook on the
  denoiser records the timestep it is called with;
- both hooks keep state across denoiser calls that must be reset per generation; those pipelines never reset it
  (only `CacheMixin` models do), so the same pre-hook resets it when the timestep stops decreasing (a new
  generation starts);
- FBC and TaylorSeer read a cache context that only `CacheMixin` pipelines set; difa sets one ("difa") on apply and
  after each reset (resetting clears it). Trap: that uses `diffusers.hooks.hooks._set_cache_context`, private, so
  diffusers is pinned (0.42.1);
- FasterCache needs `current_timestep_callback` (the probe's timestep, as PAB) and the names of the denoiser's
  keyword inputs that hold the CFG batch: DiT's class labels are `class_labels`, which its default list lacks;
- MagCache needs the magnitude ratios of the model: `DiffusersHook.prepare` runs diffusers' own calibration mode
  (`MagCacheConfig(calibrate=True)`) for one generation of one input and reads the ratios it reports.
Trap: TaylorSeer's default module patterns (`^transformer_blocks.*attn`, full match) match no module of DiT or PixArt
(their attention modules are `attn1` / `attn2`), so it would change nothing: difa passes the denoiser's own block (or
attention) names as `cache_identifiers`.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from difa.adapters import adapter_for
from difa.errors import DifaError
from difa.peers.common import PARAMS, _attach_probe, _detach_probe, _int, _number, _Probe

PREFIX = "diffusers:"
PAB, FBC, TAYLORSEER, MAGCACHE, FASTERCACHE, SEACACHE = "pab", "fbc", "taylorseer", "magcache", "fastercache", "seacache"
HOOKS = (PAB, FBC, TAYLORSEER, MAGCACHE, FASTERCACHE, SEACACHE)
# Parameters (evaluate/generate keys) and defaults: diffusers' documented defaults or examples. Keys map to diffusers'
# names: taylorseer cache_interval / warmup_steps / order = cache_interval / disable_cache_before_step / max_order
# (targets: which modules it forecasts, the denoiser's "blocks" or "attention"; factors in float32 as the docs'
# example); magcache threshold / max_skip_steps / retention_ratio as named; fastercache skip / timestep_range /
# uncond_skip = spatial_attention_block_skip_range / spatial_attention_timestep_skip_range /
# unconditional_batch_skip_range; seacache threshold / order = threshold / residual_order.
PARAMS.update({
    PAB: {"skip": 2, "cross_skip": None, "timestep_range": (100, 800)},
    FBC: {"threshold": 0.05},
    TAYLORSEER: {"cache_interval": 5, "warmup_steps": 3, "order": 1, "targets": "blocks"},
    MAGCACHE: {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2},
    FASTERCACHE: {"skip": 2, "timestep_range": (-1, 681), "uncond_skip": 5},
    SEACACHE: {"threshold": 0.25, "order": 1},
})
TARGETS = ("blocks", "attention")
_PAB_HOOK = "pyramid_attention_broadcast"
_FBC_HOOKS = ("fbc_leader_block_hook", "fbc_block_hook")
_OTHER_HOOKS = ("taylorseer_cache", "mag_cache_leader_block_hook", "mag_cache_block_hook", "faster_cache_denoiser",
                "faster_cache_block", "sea_cache_root", "sea_cache_leader_block", "sea_cache_block", "sea_cache_post_norm")
# the denoiser's keyword inputs that hold both CFG halves (FasterCache splits them); DiT adds class_labels
_CFG_KWARGS = ("hidden_states", "encoder_hidden_states", "timestep", "attention_mask", "encoder_attention_mask",
               "class_labels")


@dataclass
class DiffusersHook:
    """One diffusers hook with its parameters, applied to a pipeline's denoiser; `apply` twice is safe, `remove`
    restores the unpatched forward methods."""

    name: str
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in HOOKS:
            raise DifaError(f"unknown diffusers hook {self.name!r}; use {' or '.join(PREFIX + h for h in HOOKS)}")
        unknown = sorted(set(self.params) - set(PARAMS[self.name]))
        if unknown:
            raise DifaError(f"{PREFIX}{self.name} takes {', '.join(PARAMS[self.name])}; drop {', '.join(unknown)}")
        self.params = {**PARAMS[self.name], **{k: v for k, v in self.params.items() if v is not None}}
        self.mag_ratios: list[float] | None = None  # MagCache: set by prepare()
        self.calibration: dict = {}  # MagCache: what its calibration run cost
        p = self.params
        if self.name in (PAB, FASTERCACHE):
            for key in ("skip", "cross_skip", "uncond_skip"):
                if key in p and p[key] is not None:
                    _int(p, key, 1)
            lo_hi = p["timestep_range"]
            ok = isinstance(lo_hi, (list, tuple)) and len(lo_hi) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in lo_hi)
            if not ok or not lo_hi[0] < lo_hi[1]:
                raise DifaError(f"timestep_range must be [low, high] with low < high (got {lo_hi!r})")
            p["timestep_range"] = (float(lo_hi[0]), float(lo_hi[1]))
        if "threshold" in p:
            _number(p, "threshold")
        if self.name == TAYLORSEER:
            _int(p, "cache_interval", 1)
            _int(p, "warmup_steps", 1)  # 0 would forecast from nothing (diffusers raises mid-generation)
            _int(p, "order", 0)
            if p["targets"] not in TARGETS:
                raise DifaError(f"targets must be one of {', '.join(TARGETS)} (got {p['targets']!r})")
        elif self.name == MAGCACHE:
            _int(p, "max_skip_steps", 1)
            _number(p, "retention_ratio")
            if p["retention_ratio"] > 1:
                raise DifaError(f"retention_ratio must be in [0, 1] (got {p['retention_ratio']!r})")
        elif self.name == SEACACHE and p["order"] not in (0, 1):
            raise DifaError(f"order must be 0 (reuse) or 1 (extrapolate) for SeaCache (got {p['order']!r})")

    @property
    def needs_calibration(self) -> bool:
        return self.name == MAGCACHE and self.mag_ratios is None

    def prepare(self, pipe: Any, steps: int, generate_one) -> None:
        """MagCache: run `generate_one()` (one generation of one input at the evaluation's settings) under diffusers'
        calibration mode and keep the magnitude ratios it reports, with the run's cost in `self.calibration`.
        The other hooks need nothing."""
        if not self.needs_calibration:
            return
        import contextlib
        import io
        import logging
        import time

        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        model = adapter_for(pipe).denoiser(pipe)
        self.remove(pipe)
        calls = []
        counter = model.register_forward_pre_hook(lambda *_: calls.append(1))
        found: list[str] = []

        class Catch(logging.Handler):  # diffusers logs "MagCache Calibration Results: [r0, r1, ...]" at the end
            def emit(self, record):
                found.append(record.getMessage())

        log = logging.getLogger("diffusers.hooks.mag_cache")
        handler, level, propagate = Catch(), log.level, log.propagate
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # its INFO lines stay out of the console
        t0 = time.perf_counter()
        try:
            probe = _Probe()
            apply_mag_cache(model, MagCacheConfig(calibrate=True, num_inference_steps=steps))
            _attach_probe(model, probe)
            with contextlib.redirect_stdout(io.StringIO()):  # it also prints the ratios for copying
                generate_one()
        finally:
            seconds = time.perf_counter() - t0
            log.removeHandler(handler)
            log.setLevel(level)
            log.propagate = propagate
            counter.remove()
            self.remove(pipe)
        import ast

        results = [m.split(":", 1)[1] for m in found if m.startswith("MagCache Calibration Results:")]
        if not results:
            raise DifaError("MagCache's calibration run reported no ratios (the denoiser was not called with "
                            f"{steps} times); check steps=")
        self.mag_ratios = [float(r) for r in ast.literal_eval(results[-1].strip())]
        self.calibration = {"forwards": len(calls), "seconds": seconds, "images": 1}

    @property
    def label(self) -> str:
        return f"{PREFIX}{self.name}"

    def apply(self, pipe: Any) -> None:
        adapter = adapter_for(pipe)
        model = adapter.denoiser(pipe)
        self.remove(pipe)
        probe = _Probe()
        p = self.params
        if self.name == PAB:
            from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

            apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=p["skip"], spatial_attention_timestep_skip_range=p["timestep_range"],
                cross_attention_block_skip_range=p["cross_skip"], cross_attention_timestep_skip_range=p["timestep_range"],
                current_timestep_callback=lambda: probe.t))
        elif self.name == FASTERCACHE:
            from diffusers.hooks import FasterCacheConfig, apply_faster_cache

            with _quiet("diffusers.hooks.faster_cache"):  # it warns "purely experimental" on every apply
                apply_faster_cache(model, FasterCacheConfig(
                    spatial_attention_block_skip_range=p["skip"], spatial_attention_timestep_skip_range=p["timestep_range"],
                    unconditional_batch_skip_range=p["uncond_skip"], tensor_format="BCHW",
                    current_timestep_callback=lambda: probe.t, attention_weight_callback=lambda _: 0.5,
                    _unconditional_conditional_input_kwargs_identifiers=list(_CFG_KWARGS)))
        elif self.name == MAGCACHE:
            from diffusers.hooks import MagCacheConfig, apply_mag_cache

            if self.mag_ratios is None:
                raise DifaError("MagCache needs its magnitude ratios first: call prepare(pipe, steps, generate_one) "
                                "(difa.evaluate and difa.generate do)")
            apply_mag_cache(model, MagCacheConfig(
                threshold=float(p["threshold"]), max_skip_steps=p["max_skip_steps"],
                retention_ratio=float(p["retention_ratio"]), num_inference_steps=len(self.mag_ratios),
                mag_ratios=list(self.mag_ratios)))
        elif self.name == SEACACHE:
            self._refuse_seacache(pipe, model)
        else:  # FBC, TaylorSeer: stateful hooks that read a cache context
            from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
            from diffusers.hooks.hooks import CacheContext, _set_cache_context

            try:
                if self.name == FBC:
                    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=float(p["threshold"])))
                else:
                    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

                    apply_taylorseer_cache(model, TaylorSeerCacheConfig(**taylorseer_config(p, adapter, model)))
            except (KeyError, ValueError, IndexError) as e:
                self.remove(pipe)
                raise DifaError(f"diffusers' {self.name} hook does not support {type(model).__name__} ({e}); "
                                f"use {PREFIX}{PAB} or a difa plan") from None
            # Trap: the registry caches its child registries; the block hooks just added are not in that cache yet.
            HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
            probe.context = CacheContext("difa")
            _set_cache_context(model, probe.context)
        _attach_probe(model, probe)

    def _refuse_seacache(self, pipe: Any, model: torch.nn.Module) -> None:
        """SeaCache's indicator filters the visual latents with the flow-matching noise level sigma in [0, 1] and needs
        a model adapter returning them (diffusers 0.42.1 ships Wan T2V and Cosmos 3); refuse elsewhere, in one line."""
        from diffusers.hooks import SeaCacheConfig  # noqa: F401  (the version that has it)

        kind = type(model).__name__
        if kind not in ("WanTransformer3DModel", "Cosmos3OmniTransformer"):
            raise DifaError(f"diffusers' SeaCache does not apply to {kind}: it needs flow-matching sigmas in [0, 1] and "
                            f"a visual-latent adapter, which diffusers 0.42.1 has for Wan T2V and Cosmos 3 only; "
                            f"use {PREFIX}{TAYLORSEER} or {PREFIX}{FBC}, or a difa plan with forecast cells")
        raise DifaError(f"{PREFIX}{SEACACHE} on {kind} needs the pipeline's per-step cache_context; run the model's "
                        f"own pipeline with transformer.enable_cache(SeaCacheConfig(...)) instead")

    def remove(self, pipe: Any) -> None:
        from diffusers.hooks import HookRegistry

        model = adapter_for(pipe).denoiser(pipe)
        _detach_probe(model)
        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in (_PAB_HOOK, *_FBC_HOOKS, *_OTHER_HOOKS):
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()


def taylorseer_config(p: Mapping[str, Any], adapter: Any, model: torch.nn.Module) -> dict:
    """TaylorSeerCacheConfig keyword arguments for the params: the modules to forecast named exactly (re.fullmatch)."""
    import re

    modules = adapter.block_layers(model) if p["targets"] == "blocks" else adapter.planned_layers(model)
    return {"cache_interval": p["cache_interval"], "disable_cache_before_step": p["warmup_steps"],
            "max_order": p["order"], "taylor_factors_dtype": torch.float32,
            "cache_identifiers": [re.escape(name) for name, _ in modules]}


class _quiet:
    """Raise one diffusers logger to ERROR inside the block (scoped: its level is restored)."""

    def __init__(self, name: str):
        import logging

        self.log = logging.getLogger(name)

    def __enter__(self):
        import logging

        self.level = self.log.level
        self.log.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.log.setLevel(self.level)
