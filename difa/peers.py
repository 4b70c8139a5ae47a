"""Caching peers run through the same evaluation code as difa's plans: diffusers' own hooks, Pyramid Attention
Broadcast (`diffusers.hooks.apply_pyramid_attention_broadcast`, arXiv 2408.12588) and First Block Cache
(`diffusers.hooks.apply_first_block_cache`, ParaAttention), and cache-dit's DBCache (optionally with its TaylorSeer
calibrator), `plan=cachedit:dbcache` (class CacheDit below).

The hooks are diffusers' code, unchanged. difa only supplies what the stock DiT / PixArt pipelines do not:
- PAB needs `current_timestep_callback`; the pipelines have no `current_timestep`, so a forward pre-hook on the
  denoiser records the timestep it is called with;
- both hooks keep state across denoiser calls that must be reset per generation; those pipelines never reset it
  (only `CacheMixin` models do), so the same pre-hook resets it when the timestep stops decreasing (a new
  generation starts);
- FBC reads a cache context that only `CacheMixin` pipelines set; difa sets one ("difa") on apply and after each
  reset (resetting clears it). Trap: that uses `diffusers.hooks.hooks._set_cache_context`, private, so diffusers is
  pinned (0.42.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from difa.adapters import adapter_for
from difa.errors import DifaError

PREFIX = "diffusers:"
PAB, FBC = "pab", "fbc"
HOOKS = (PAB, FBC)
# Parameters (evaluate/generate keys) and defaults: diffusers' documented examples.
PARAMS = {
    PAB: {"skip": 2, "cross_skip": None, "timestep_range": (100, 800)},
    FBC: {"threshold": 0.05},
}
_PAB_HOOK = "pyramid_attention_broadcast"
_FBC_HOOKS = ("fbc_leader_block_hook", "fbc_block_hook")
_PROBE_ATTR = "_difa_peer_probe"


CACHEDIT_PREFIX = "cachedit:"
DBCACHE = "dbcache"
# cache-dit's DBCacheConfig knobs under short keys, with its own defaults (1.5.3); taylorseer: 0 = off, else the
# TaylorSeer calibrator's order. Trap: Fn_compute_blocks = 8 (the default) leaves nothing to cache on an 8-block
# model; the sweeps draw the curve over fn_blocks and threshold.
PARAMS[DBCACHE] = {"threshold": 0.08, "fn_blocks": 8, "bn_blocks": 0, "warmup_steps": 8, "taylorseer": 0}


def is_hook(spec: Any) -> bool:
    return str(spec).startswith((PREFIX, CACHEDIT_PREFIX))


@dataclass
class _Probe:
    """The denoiser's current timestep, and the per-generation reset of the hooks' state."""

    t: float = float("inf")
    handle: Any = None
    context: Any = None  # FBC: the CacheContext to set again after a reset (StateManager.reset clears it)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        from diffusers.hooks import HookRegistry

        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            raise DifaError(f"{type(module).__name__} was called without a timestep; diffusers hooks need one")
        t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        if t >= self.t:  # timesteps decrease within a generation: this call starts a new one
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks(recurse=True)
            if self.context is not None:
                from diffusers.hooks.hooks import _set_cache_context

                _set_cache_context(module, self.context)
        self.t = t


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
        p = self.params
        if self.name == PAB:
            for key in ("skip", "cross_skip"):
                if p[key] is not None and (isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 1):
                    raise DifaError(f"{key} must be an integer >= 1 (got {p[key]!r}): compute attention every {key} steps")
            lo_hi = p["timestep_range"]
            if len(lo_hi) != 2 or not lo_hi[0] < lo_hi[1]:
                raise DifaError(f"timestep_range must be [low, high] with low < high (got {lo_hi!r})")
            p["timestep_range"] = (float(lo_hi[0]), float(lo_hi[1]))
        elif not isinstance(p["threshold"], (int, float)) or p["threshold"] < 0:
            raise DifaError(f"threshold must be a number >= 0 (got {p['threshold']!r})")

    @property
    def label(self) -> str:
        return f"{PREFIX}{self.name}"

    def apply(self, pipe: Any) -> None:
        model = adapter_for(pipe).denoiser(pipe)
        self.remove(pipe)
        probe = _Probe()
        if self.name == PAB:
            from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

            p = self.params
            apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=p["skip"], spatial_attention_timestep_skip_range=p["timestep_range"],
                cross_attention_block_skip_range=p["cross_skip"], cross_attention_timestep_skip_range=p["timestep_range"],
                current_timestep_callback=lambda: probe.t))
        else:
            from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
            from diffusers.hooks.hooks import CacheContext, _set_cache_context

            try:
                apply_first_block_cache(model, FirstBlockCacheConfig(threshold=float(self.params["threshold"])))
            except (KeyError, ValueError, IndexError) as e:
                self.remove(pipe)
                raise DifaError(f"diffusers' FirstBlockCache does not support {type(model).__name__} ({e}); "
                                f"use {PREFIX}{PAB} or a difa plan") from None
            # Trap: the registry caches its child registries; the block hooks just added are not in that cache yet.
            HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
            probe.context = CacheContext("difa")
            _set_cache_context(model, probe.context)
        probe.handle = model.register_forward_pre_hook(probe, with_kwargs=True, prepend=True)
        setattr(model, _PROBE_ATTR, probe)

    def remove(self, pipe: Any) -> None:
        from diffusers.hooks import HookRegistry

        model = adapter_for(pipe).denoiser(pipe)
        probe = getattr(model, _PROBE_ATTR, None)
        if probe is not None:
            probe.handle.remove()
            delattr(model, _PROBE_ATTR)
        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in (_PAB_HOOK, *_FBC_HOOKS):
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()


def _int(params: Mapping[str, Any], key: str, low: int) -> int:
    v = params[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise DifaError(f"{key} must be an integer >= {low} (got {v!r})")
    return v


@dataclass
class CacheDit:
    """cache-dit's DBCache on a pipeline cache-dit supports (DiTPipeline, PixArt...), its code unchanged; `apply`
    twice is safe, `remove` is cache-dit's `disable_cache`, which restores the pipeline exactly.

    Trap: cache-dit patches the pipeline *class*'s __call__ (every instance of that class is cached while applied) and
    resets its state per pipeline call, so it must be applied to a pipeline and called through it."""

    name: str
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name != DBCACHE:
            raise DifaError(f"unknown cache-dit method {self.name!r}; use {CACHEDIT_PREFIX}{DBCACHE}")
        unknown = sorted(set(self.params) - set(PARAMS[DBCACHE]))
        if unknown:
            raise DifaError(f"{CACHEDIT_PREFIX}{DBCACHE} takes {', '.join(PARAMS[DBCACHE])}; drop {', '.join(unknown)}")
        self.params = {**PARAMS[DBCACHE], **{k: v for k, v in self.params.items() if v is not None}}
        p = self.params
        if isinstance(p["threshold"], bool) or not isinstance(p["threshold"], (int, float)) or not p["threshold"] >= 0:
            raise DifaError(f"threshold must be a number >= 0 (got {p['threshold']!r}): cache-dit's residual_diff_threshold")
        for key, low in (("fn_blocks", 1), ("bn_blocks", 0), ("warmup_steps", 0), ("taylorseer", 0)):
            _int(p, key, low)
        if p["taylorseer"] > 2:
            raise DifaError(f"taylorseer must be 0 (off), 1 or 2, the TaylorSeer order (got {p['taylorseer']})")

    @property
    def label(self) -> str:
        return f"{CACHEDIT_PREFIX}{self.name}"

    def configs(self) -> tuple[Any, Any]:
        """(DBCacheConfig, TaylorSeerCalibratorConfig or None) as cache-dit takes them."""
        try:
            import cache_dit
        except ImportError:
            raise DifaError("cache-dit is not installed; pip install 'difa[peers]' (cache-dit 1.5.3)") from None
        p = self.params
        cache = cache_dit.DBCacheConfig(Fn_compute_blocks=p["fn_blocks"], Bn_compute_blocks=p["bn_blocks"],
                                        residual_diff_threshold=float(p["threshold"]), max_warmup_steps=p["warmup_steps"])
        calib = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=p["taylorseer"]) if p["taylorseer"] else None
        return cache, calib

    def apply(self, pipe: Any) -> None:
        import cache_dit

        cache, calib = self.configs()
        self.remove(pipe)
        n_blocks = len(adapter_for(pipe).block_layers(adapter_for(pipe).denoiser(pipe)))
        if self.params["fn_blocks"] + self.params["bn_blocks"] > n_blocks:
            raise DifaError(f"fn_blocks + bn_blocks = {self.params['fn_blocks'] + self.params['bn_blocks']} exceeds the "
                            f"model's {n_blocks} blocks; lower them")
        try:
            cache_dit.enable_cache(pipe, cache_config=cache, calibrator_config=calib)
        except (ValueError, AssertionError, KeyError) as e:
            self.remove(pipe)
            raise DifaError(f"cache-dit does not support {type(pipe).__name__} ({e}); use a difa plan") from None

    def remove(self, pipe: Any) -> None:
        import cache_dit

        if getattr(pipe, "_is_cached", False) or hasattr(type(pipe), "_original_call"):
            cache_dit.disable_cache(pipe)


def hook_from_spec(spec: str, params: Mapping[str, Any]) -> DiffusersHook | CacheDit:
    """`diffusers:<pab|fbc>` or `cachedit:dbcache` plus the keys that apply to it (None values dropped)."""
    given = {k: v for k, v in params.items() if v is not None}
    if str(spec).startswith(CACHEDIT_PREFIX):
        return CacheDit(str(spec)[len(CACHEDIT_PREFIX):], given)
    return DiffusersHook(str(spec)[len(PREFIX):], given)
