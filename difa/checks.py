"""Argument checks shared by the CLIs and the Python API (calibrate_pipeline and friends), so that a bad value is
the same one-line DifaError from either side, before anything is allocated or loaded where the value alone tells."""

from __future__ import annotations

import math
from typing import Any, Sequence

from difa.errors import DifaError

# Upper bounds on counts, checked before any list or tensor is built from them (a huge value would allocate for
# minutes before dying of MemoryError): far above any real use.
MAX_STEPS = 10_000  # denoising steps
MAX_INPUTS = 100_000  # calibration / evaluation inputs (n_calib, n)
MAX_BATCH = 4_096  # images per pipeline call (latency_batch, batch)


def count(name: str, value: Any, high: int, low: int = 1, example: str = "") -> int:
    """A whole number in [low, high] (bools, floats and text refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise DifaError(f"{name} must be an integer in [{low}, {high}], got {str(value)[:40]!r}"
                        + (f"; e.g. {example}" if example else ""))
    return value


def threshold(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise DifaError(f"threshold must be a number >= 0 (got {value!r}); try threshold=0.05")
    return float(value)


def inputs(pipe: Any, items: Sequence) -> list:
    """Calibration or generation inputs for `pipe`: class ids in the label embedding's range (its null class
    excluded) for a class-conditional model, non-empty prompts for a text model; never a mix. (Image-conditioned
    video models take their inputs as the adapter reads them.)"""
    from difa.adapters import adapter_for

    items = list(items) if isinstance(items, (list, tuple)) else None
    if not items:
        raise DifaError("inputs must be a non-empty list of class ids or prompts; e.g. inputs=[0,1,2]")
    count("the number of inputs", len(items), MAX_INPUTS)
    adapter = adapter_for(pipe)
    if adapter.inputs_kind == "classes":
        n = getattr(adapter.denoiser(pipe).config, "num_embeds_ada_norm", None)
        bad = [x for x in items if isinstance(x, bool) or not isinstance(x, int) or (n is not None and not 0 <= x < n)]
        if bad:
            raise DifaError(f"class ids must be integers in [0, {n}) for this model, got "
                            f"{', '.join(repr(x)[:40] for x in bad[:3])}; e.g. inputs=[0,1,2]")
    elif adapter.inputs_kind == "prompts":
        bad = [x for x in items if not isinstance(x, str) or not x.strip()]
        if bad:
            raise DifaError(f"this is a text model: inputs must be non-empty prompts, got "
                            f"{', '.join(repr(x)[:40] for x in bad[:3])}; e.g. inputs=['a red bird']")
    return items
