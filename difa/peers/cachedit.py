"""cache-dit's DBCache (optionally with its TaylorSeer calibrator) as a peer, `plan=cachedit:dbcache` (class CacheDit
below): cache-dit's code, unchanged, applied to the whole pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from difa.adapters import adapter_for
from difa.errors import DifaError
from difa.peers.common import PARAMS, _int

CACHEDIT_PREFIX = "cachedit:"
DBCACHE = "dbcache"
# cache-dit's DBCacheConfig knobs under short keys, with its own defaults (1.5.3); taylorseer: 0 = off, else the
# TaylorSeer calibrator's order. Trap: Fn_compute_blocks = 8 (the default) leaves nothing to cache on an 8-block
# model; the sweeps draw the curve over fn_blocks and threshold.
PARAMS[DBCACHE] = {"threshold": 0.08, "fn_blocks": 8, "bn_blocks": 0, "warmup_steps": 8, "taylorseer": 0}


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
