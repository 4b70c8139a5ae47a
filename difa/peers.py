"""Caching peers run through the same evaluation code as difa's plans: diffusers' own hooks, Pyramid Attention
Broadcast (`diffusers.hooks.apply_pyramid_attention_broadcast`, arXiv 2408.12588), First Block Cache
(`diffusers.hooks.apply_first_block_cache`, ParaAttention), TaylorSeer (`apply_taylorseer_cache`, arXiv 2503.06923),
MagCache (`apply_mag_cache`, its one-generation calibration included), FasterCache (`apply_faster_cache`, arXiv
2410.19355) and SeaCache (`apply_sea_cache`: refused with a reason where it does not apply), `plan=diffusers:<name>`;
and cache-dit's DBCache (optionally with its TaylorSeer calibrator), `plan=cachedit:dbcache` (class CacheDit below).

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

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from difa.adapters import adapter_for
from difa.errors import DifaError

PREFIX = "diffusers:"
PAB, FBC, TAYLORSEER, MAGCACHE, FASTERCACHE, SEACACHE = "pab", "fbc", "taylorseer", "magcache", "fastercache", "seacache"
HOOKS = (PAB, FBC, TAYLORSEER, MAGCACHE, FASTERCACHE, SEACACHE)
# Parameters (evaluate/generate keys) and defaults: diffusers' documented defaults or examples. Keys map to diffusers'
# names: taylorseer cache_interval / warmup_steps / order = cache_interval / disable_cache_before_step / max_order
# (targets: which modules it forecasts, the denoiser's "blocks" or "attention"; factors in float32 as the docs'
# example); magcache threshold / max_skip_steps / retention_ratio as named; fastercache skip / timestep_range /
# uncond_skip = spatial_attention_block_skip_range / spatial_attention_timestep_skip_range /
# unconditional_batch_skip_range; seacache threshold / order = threshold / residual_order.
PARAMS = {
    PAB: {"skip": 2, "cross_skip": None, "timestep_range": (100, 800)},
    FBC: {"threshold": 0.05},
    TAYLORSEER: {"cache_interval": 5, "warmup_steps": 3, "order": 1, "targets": "blocks"},
    MAGCACHE: {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2},
    FASTERCACHE: {"skip": 2, "timestep_range": (-1, 681), "uncond_skip": 5},
    SEACACHE: {"threshold": 0.25, "order": 1},
}
TARGETS = ("blocks", "attention")
_PAB_HOOK = "pyramid_attention_broadcast"
_FBC_HOOKS = ("fbc_leader_block_hook", "fbc_block_hook")
_OTHER_HOOKS = ("taylorseer_cache", "mag_cache_leader_block_hook", "mag_cache_block_hook", "faster_cache_denoiser",
                "faster_cache_block", "sea_cache_root", "sea_cache_leader_block", "sea_cache_block", "sea_cache_post_norm")
# the denoiser's keyword inputs that hold both CFG halves (FasterCache splits them); DiT adds class_labels
_CFG_KWARGS = ("hidden_states", "encoder_hidden_states", "timestep", "attention_mask", "encoder_attention_mask",
               "class_labels")
_PROBE_ATTR = "_difa_peer_probe"


CACHEDIT_PREFIX = "cachedit:"
DBCACHE = "dbcache"
# cache-dit's DBCacheConfig knobs under short keys, with its own defaults (1.5.3); taylorseer: 0 = off, else the
# TaylorSeer calibrator's order. Trap: Fn_compute_blocks = 8 (the default) leaves nothing to cache on an 8-block
# model; the sweeps draw the curve over fn_blocks and threshold.
PARAMS[DBCACHE] = {"threshold": 0.08, "fn_blocks": 8, "bn_blocks": 0, "warmup_steps": 8, "taylorseer": 0}


def peer_keys(spec: Any) -> tuple[str, ...]:
    """The config keys the peer `spec` takes (none for an unknown name: its constructor says what exists)."""
    spec = str(spec)
    if spec.startswith("smoothcache:"):
        return tuple(PARAMS["smoothcache"])
    return tuple(PARAMS.get(spec.split(":", 1)[1], {}))


def is_hook(spec: Any) -> bool:
    return str(spec).startswith((PREFIX, CACHEDIT_PREFIX, "smoothcache:"))


@dataclass
class _Probe:
    """The denoiser's current timestep, and the per-generation reset of the hooks' state."""

    t: float = float("inf")
    handle: Any = None
    context: Any = None  # FBC: the CacheContext to set again after a reset (StateManager.reset clears it)
    on_new_generation: Any = None  # instead of resetting diffusers' hooks (SmoothCache: its helper's reset_state)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        from diffusers.hooks import HookRegistry

        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            raise DifaError(f"{type(module).__name__} was called without a timestep; diffusers hooks need one")
        t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        if t >= self.t and self.on_new_generation is not None:
            self.on_new_generation()
        elif t >= self.t:  # timesteps decrease within a generation: this call starts a new one
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks(recurse=True)
            if self.context is not None:
                from diffusers.hooks.hooks import _set_cache_context

                _set_cache_context(module, self.context)
        self.t = t


def _attach_probe(model: torch.nn.Module, probe: _Probe) -> None:
    """Run `probe` before every denoiser call (first of the pre-hooks); _detach_probe undoes it."""
    probe.handle = model.register_forward_pre_hook(probe, with_kwargs=True, prepend=True)
    setattr(model, _PROBE_ATTR, probe)


def _detach_probe(model: torch.nn.Module) -> None:
    probe = getattr(model, _PROBE_ATTR, None)
    if probe is not None:
        probe.handle.remove()
        delattr(model, _PROBE_ATTR)


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
            if len(lo_hi) != 2 or not lo_hi[0] < lo_hi[1]:
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


def _number(params: Mapping[str, Any], key: str) -> float:
    import math

    v = params[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise DifaError(f"{key} must be a number >= 0 (got {v!r})")
    return float(v)


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


SMOOTHCACHE_PREFIX = "smoothcache:"
SMOOTHCACHE = "smoothcache"
# `smoothcache:calibrate`: threshold = SmoothCache's alpha (its README's schedule: 0.35), lookahead = its
# calibration_lookahead N (3: a computed output serves at most 3 later steps)
PARAMS[SMOOTHCACHE] = {"threshold": 0.35, "lookahead": 3}
SMOOTHCACHE_COMPONENTS = ("attn1", "attn2", "ff")  # per BasicTransformerBlock: what SmoothCache caches, by type


def smoothcache_schedule(rows: list[list[float]], length: int, threshold: float) -> list[int]:
    """SmoothCache's schedule for one component type (Liu et al. 2024, arXiv 2411.10510, its calibration helper's
    row scan), from `rows[j][i]`: the error (relative L1, averaged over the blocks) of serving step i's output at
    step i + j + 1. Walking i forward: the longest reuse j + 1 <= len(rows) whose error is <= threshold computes
    step i and reuses it for j + 1 steps; else step i is computed alone. The first and last steps are always
    computed. 1 = compute, 0 = reuse."""
    schedule = [1] * length
    i = 0
    while i < length:
        reach = next((j for j in reversed(range(len(rows))) if i < len(rows[j]) and rows[j][i] <= threshold), None)
        if reach is None:
            i += 1
            continue
        for k in range(i + 1, min(i + reach + 2, length)):
            schedule[k] = 0
        i += reach + 2
    if length:
        schedule[0] = schedule[-1] = 1
    return schedule


def _import_smoothcache():
    import contextlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its __init__ prints warnings about optional helpers
            import SmoothCache.smooth_cache_helper as helper
    except ImportError:
        raise DifaError("SmoothCache is not installed; pip install 'difa[peers]' (dit-smoothcache 0.1.1)") from None
    return helper


@dataclass
class SmoothCache:
    """SmoothCache (Roblox, PyPI dit-smoothcache 0.1.1) on a diffusers DiT / PixArt: its own `SmoothCacheHelper`
    wraps attn1 / attn2 / ff of every BasicTransformerBlock and returns the cached output where the schedule says 0.
    The schedule comes from a JSON file in its format (`smoothcache:<path.json>`, {"attn1": [1, 0, ...], ...}), or
    from `smoothcache:calibrate`: one generation of up to 10 inputs records each component's output per step, and
    `smoothcache_schedule` turns the errors into the schedule (the wheel lacks its calibration helper, so difa
    carries that rule). Traps: the helper counts steps per module from its enable() and never resets, so difa resets
    it per generation (the probe, as for the diffusers hooks); it prints a line per call, silenced while applied."""

    spec: str
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        import json

        unknown = sorted(set(self.params) - set(PARAMS[SMOOTHCACHE]))
        if unknown:
            raise DifaError(f"{SMOOTHCACHE_PREFIX}{self.spec} takes {', '.join(PARAMS[SMOOTHCACHE])}; drop {', '.join(unknown)}")
        self.params = {**PARAMS[SMOOTHCACHE], **{k: v for k, v in self.params.items() if v is not None}}
        _number(self.params, "threshold")
        _int(self.params, "lookahead", 1)
        self.schedule: dict[str, list[int]] | None = None
        self.calibration: dict = {}
        self._helper = None
        if self.spec != "calibrate":
            from pathlib import Path

            try:
                data = json.loads(Path(self.spec).read_text())
            except (OSError, ValueError) as e:
                raise DifaError(f"cannot read the SmoothCache schedule {self.spec!r} ({e}); pass a JSON file "
                                "{\"attn1\": [1, 0, ...], ...} or smoothcache:calibrate") from None
            if (not isinstance(data, dict) or not data or not all(
                    isinstance(v, list) and v and all(x in (0, 1) and not isinstance(x, bool) for x in v)
                    for v in data.values())):
                raise DifaError(f"{self.spec}: a SmoothCache schedule maps component names to lists of 0/1 per step")
            self.schedule = data

    @property
    def label(self) -> str:
        return f"{SMOOTHCACHE_PREFIX}{self.spec}"

    @property
    def needs_calibration(self) -> bool:
        return self.schedule is None

    calibration_inputs = 10  # SmoothCache calibrates on 10 samples

    def prepare(self, pipe: Any, steps: int, generate_one) -> None:
        """Record each component's output per step over one generation (`generate_one`), then the schedule."""
        if not self.needs_calibration:
            return
        import time

        model = adapter_for(pipe).denoiser(pipe)
        n = self.params["lookahead"]
        last: dict[str, list[torch.Tensor]] = {}  # module name -> its last n outputs, newest first
        errors: dict[str, list[list[float]]] = {}  # module name -> rows[j] over the steps

        def record(name):
            def hook(module, args, output):
                out = output.detach().float()
                rows = errors.setdefault(name, [[] for _ in range(n)])
                for j, prev in enumerate(last.get(name, [])):
                    rows[j].append(float((prev - out).abs().sum() / out.abs().sum().clamp_min(1e-12)))
                last[name] = [out, *last.get(name, [])][:n]
            return hook

        handles = [module.register_forward_hook(record(name)) for name, module in self._components(model)]
        calls = []
        handles.append(model.register_forward_pre_hook(lambda *_: calls.append(1)))
        t0 = time.perf_counter()
        try:
            generate_one()
        finally:
            for h in handles:
                h.remove()
        schedule = {}
        for kind in SMOOTHCACHE_COMPONENTS:
            groups = [rows for name, rows in errors.items() if name.rsplit(".", 1)[-1] == kind]
            if groups:
                mean = [[sum(g[j][i] for g in groups) / len(groups) for i in range(len(groups[0][j]))] for j in range(n)]
                schedule[kind] = smoothcache_schedule(mean, steps, float(self.params["threshold"]))
        if not schedule or len(calls) != steps:
            raise DifaError(f"SmoothCache's calibration saw {len(calls)} denoiser calls for {steps} steps and "
                            f"{len(errors)} components; it needs one call per step of a DiT / PixArt model")
        self.schedule = schedule
        self.calibration = {"forwards": len(calls), "seconds": time.perf_counter() - t0,
                            "images": self.calibration_inputs}

    @staticmethod
    def _components(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        from diffusers.models.attention import BasicTransformerBlock

        return [(f"{name}.{c}", getattr(block, c)) for name, block in model.named_modules()
                if isinstance(block, BasicTransformerBlock) for c in SMOOTHCACHE_COMPONENTS
                if getattr(block, c, None) is not None]

    def apply(self, pipe: Any) -> None:
        helper_mod = _import_smoothcache()
        if self.schedule is None:
            raise DifaError("SmoothCache needs its schedule first: call prepare(pipe, steps, generate_one) "
                            "(difa.evaluate and difa.generate do)")
        from diffusers.models.attention import BasicTransformerBlock

        model = adapter_for(pipe).denoiser(pipe)
        self.remove(pipe)
        if not self._components(model):
            raise DifaError(f"SmoothCache wraps diffusers BasicTransformerBlocks; {type(model).__name__} has none")
        present = {name.rsplit(".", 1)[-1] for name, _ in self._components(model)}  # DiT's attn2 is None
        missing = sorted(set(self.schedule) - present)
        if missing:
            raise DifaError(f"the SmoothCache schedule names {', '.join(missing)}, which {type(model).__name__}'s "
                            f"blocks lack (they have {', '.join(sorted(present))})")
        helper = helper_mod.SmoothCacheHelper(model, BasicTransformerBlock, list(self.schedule), self.schedule)
        helper_mod.print = lambda *a, **k: None  # scoped: removed again in remove()
        helper.enable()
        probe = _Probe(on_new_generation=helper.reset_state)
        _attach_probe(model, probe)
        self._helper = helper

    def remove(self, pipe: Any) -> None:
        model = adapter_for(pipe).denoiser(pipe)
        _detach_probe(model)
        if self._helper is not None:
            self._helper.disable()
            self._helper = None
            helper_mod = _import_smoothcache()
            if "print" in vars(helper_mod):
                del helper_mod.print


def hook_from_spec(spec: str, params: Mapping[str, Any]) -> DiffusersHook | CacheDit | SmoothCache:
    """`diffusers:<name>`, `cachedit:dbcache` or `smoothcache:<schedule.json|calibrate>` plus the keys that apply to
    it (None values dropped)."""
    given = {k: v for k, v in params.items() if v is not None}
    if str(spec).startswith(CACHEDIT_PREFIX):
        return CacheDit(str(spec)[len(CACHEDIT_PREFIX):], given)
    if str(spec).startswith(SMOOTHCACHE_PREFIX):
        return SmoothCache(str(spec)[len(SMOOTHCACHE_PREFIX):], given)
    return DiffusersHook(str(spec)[len(PREFIX):], given)
