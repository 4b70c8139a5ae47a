"""SmoothCache (Roblox, PyPI dit-smoothcache, arXiv 2411.10510) as a peer, `plan=smoothcache:<schedule.json|calibrate>`
(class SmoothCache below): its own helper caches the components of diffusers' BasicTransformerBlocks on a schedule,
read from a file or calibrated by difa (`smoothcache_schedule`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from difa.adapters import adapter_for
from difa.errors import DifaError
from difa.peers.common import PARAMS, _attach_probe, _detach_probe, _int, _number, _Probe

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
