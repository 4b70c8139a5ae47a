"""Caching peers run through the same evaluation code as difa's plans (`plan=<peer>:<name>` in evaluate / generate):
diffusers' own hooks (`diffusers:<name>`, diffusers_hooks.py), cache-dit's DBCache (`cachedit:dbcache`, cachedit.py)
and SmoothCache (`smoothcache:<schedule.json|calibrate>`, smoothcache.py), each behind the small interface `Peer`;
`hook_from_spec` builds one from its spec. What more than one of them uses (the probe, `PARAMS`) is in common.py.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

# The import order fills PARAMS in the order the peers are listed.
from difa.peers.common import PARAMS
from difa.peers.diffusers_hooks import (
    FASTERCACHE, FBC, HOOKS, MAGCACHE, PAB, PREFIX, SEACACHE, TARGETS, TAYLORSEER, DiffusersHook, taylorseer_config,
)
from difa.peers.cachedit import CACHEDIT_PREFIX, DBCACHE, CacheDit
from difa.peers.smoothcache import (
    SMOOTHCACHE, SMOOTHCACHE_COMPONENTS, SMOOTHCACHE_PREFIX, SmoothCache, smoothcache_schedule,
)

__all__ = [
    "Peer", "hook_from_spec", "is_hook", "peer_keys", "PARAMS",
    "DiffusersHook", "taylorseer_config", "PREFIX", "HOOKS", "TARGETS",
    "PAB", "FBC", "TAYLORSEER", "MAGCACHE", "FASTERCACHE", "SEACACHE",
    "CacheDit", "CACHEDIT_PREFIX", "DBCACHE",
    "SmoothCache", "smoothcache_schedule", "SMOOTHCACHE_PREFIX", "SMOOTHCACHE", "SMOOTHCACHE_COMPONENTS",
]


class Peer(Protocol):
    """What every peer offers the evaluation and the CLI (DiffusersHook, CacheDit and SmoothCache all do; none
    subclasses this, it only names what they share).

    Those that calibrate first (MagCache, `smoothcache:calibrate`) also have `needs_calibration` (bool),
    `prepare(pipe, steps, generate_one)` (one calibration generation through `generate_one()`), `calibration`
    (a dict: forwards, seconds, images; empty until prepared) and, where more than one input, `calibration_inputs`;
    the callers read those with getattr, so a peer without them needs none."""

    params: dict  # its parameters: the defaults (PARAMS) overridden by the keys given, checked on construction

    @property
    def label(self) -> str:
        """Its spec as given to plan=, e.g. `diffusers:pab`: the method's name in the results."""
        ...

    def apply(self, pipe: Any) -> None:
        """Patch the pipeline (its denoiser, or for cache-dit its class) so that its calls are cached; applying
        twice is safe."""
        ...

    def remove(self, pipe: Any) -> None:
        """Undo `apply`: the pipeline computes as before; safe when not applied."""
        ...


def peer_keys(spec: Any) -> tuple[str, ...]:
    """The config keys the peer `spec` takes (none for an unknown name: its constructor says what exists)."""
    spec = str(spec)
    if spec.startswith("smoothcache:"):
        return tuple(PARAMS["smoothcache"])
    return tuple(PARAMS.get(spec.split(":", 1)[1], {}))


def is_hook(spec: Any) -> bool:
    return str(spec).startswith((PREFIX, CACHEDIT_PREFIX, "smoothcache:"))


def hook_from_spec(spec: str, params: Mapping[str, Any]) -> DiffusersHook | CacheDit | SmoothCache:
    """`diffusers:<name>`, `cachedit:dbcache` or `smoothcache:<schedule.json|calibrate>` plus the keys that apply to
    it (None values dropped)."""
    given = {k: v for k, v in params.items() if v is not None}
    if str(spec).startswith(CACHEDIT_PREFIX):
        return CacheDit(str(spec)[len(CACHEDIT_PREFIX):], given)
    if str(spec).startswith(SMOOTHCACHE_PREFIX):
        return SmoothCache(str(spec)[len(SMOOTHCACHE_PREFIX):], given)
    return DiffusersHook(str(spec)[len(PREFIX):], given)
