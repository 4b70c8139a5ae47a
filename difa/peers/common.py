"""What more than one peer uses: the registry of every peer's parameters (`PARAMS`), the probe (a forward pre-hook on
the denoiser that records its timestep and resets a peer's state when a new generation starts; the diffusers hooks
and SmoothCache use it), and the checks of numeric parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from difa.errors import DifaError

# Every peer's parameters (evaluate/generate keys) and defaults, by method name; each peer module adds its own.
PARAMS: dict[str, dict] = {}
_PROBE_ATTR = "_difa_peer_probe"


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
