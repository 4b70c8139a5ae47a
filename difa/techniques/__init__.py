"""Technique registry: method name (as written in plans) -> technique module.

Adding a technique is one file with the common skeleton (NAME, LETTER, COLOR, KINDS, AXES, READS_CACHE, NEEDS_METRIC,
DEFAULT_CANDIDATE, Config, flops, execute or run; optional: CANDIDATE_KINDS, SHARES_CFG, READS_OUTPUT,
READS_RESIDUAL, ON_ONE_HALF, NOT_JOINT) plus one entry in TECHNIQUES below.
"""

import dataclasses
from typing import Any, Mapping

from difa.adapters import JOINT, NO_CFG
from difa.errors import DifaError
from difa.techniques import (agent, asc, ast, deepcache, forecast, full, mlp_reuse, reuse, tgate, tome, wars,
                             wars_asc)

# Registry order is the greedy's tie order among equal costs (`tgate` before `ast`: see calibration).
TECHNIQUES = (full, tgate, ast, wars, asc, wars_asc, tome, agent, reuse, forecast, mlp_reuse, deepcache)
REGISTRY = {m.NAME: m for m in TECHNIQUES}
BLOCK = "block"


def kind_of(layer_name: str, adapter: Any = None) -> str:
    """"attn1" (self-attention), "attn2" (cross-attention) or, given the model's adapter (difa.adapters.Adapter),
    "joint" for a joint-attention family's layers (their names, `attn` / `attn1`, do not say it)."""
    if adapter is not None:
        return adapter.kind(layer_name)
    return layer_name.rsplit(".", 1)[-1]


def unfit(method: str, layer: str, adapter: Any = None) -> str | None:
    """Why `method` cannot run on attention layer `layer` of a model with `adapter` (difa.adapters.Adapter), as one
    phrase; None when it can. The layer's kind (attn1 / attn2 from its name; joint from the adapter: a technique's
    NOT_JOINT says why it skips joint attention), its token axis (a video model's temporal layers attend across
    frames: no 2-D grid to merge on) and the family's CFG (a guidance-distilled model has no CFG batch to share
    attention across)."""
    t = REGISTRY[method]
    kind = kind_of(layer, adapter)
    if kind == JOINT and kind not in t.KINDS and getattr(t, "NOT_JOINT", None):
        return f"{method!r} does not run on joint (MMDiT) attention such as {layer}: {t.NOT_JOINT}"
    if kind not in t.KINDS:
        return f"{method!r} applies to {'/'.join(t.KINDS)} layers only, not {kind}"
    if kind == JOINT and method == wars.NAME and not adapter.joint_window:
        return (f"{method!r} does not run on joint (MMDiT) attention of {adapter.family} such as {layer}: "
                f"{t.NOT_JOINT}")
    if adapter is None:
        return None
    axis = adapter.axis(layer)
    if axis not in t.AXES:
        return f"{method!r} needs a 2-D token grid; {layer} is a temporal layer (its tokens are frames)"
    if getattr(t, "SHARES_CFG", False) and adapter.cfg_layout == NO_CFG:
        return (f"{method!r} shares attention across the CFG halves, but {adapter.family} is guidance-distilled "
                "(its pipeline never runs a CFG batch)")
    return None


def letters() -> dict[str, str]:
    """Method -> the one character the calibration summary prints for its cells."""
    return {name: t.LETTER for name, t in REGISTRY.items()}


def candidate_kinds(method: str) -> tuple[str, ...]:
    """The kinds of layers calibration proposes `method` on (a technique may narrow its KINDS)."""
    t = REGISTRY[method]
    return tuple(getattr(t, "CANDIDATE_KINDS", t.KINDS))


def is_block_method(method: str) -> bool:
    return BLOCK in REGISTRY[method].KINDS and method != full.NAME


def attention_methods(methods) -> list[str]:
    return [m for m in methods if m in REGISTRY and not is_block_method(m)]


def block_methods(methods) -> list[str]:
    return [m for m in methods if m in REGISTRY and is_block_method(m)]


def default_params() -> dict[str, dict[str, Any]]:
    """Technique -> its Config's defaults, for the techniques that take parameters: the CLI's `techniques` table
    (Hydra then refuses unknown technique names and keys, and `techniques={tome: {ratio: 0.3}}` merges)."""
    return {t.NAME: {f.name: f.default for f in dataclasses.fields(t.Config)}
            for t in TECHNIQUES if dataclasses.fields(t.Config)}


def changed_params(params: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Only the entries of `params` that differ from the defaults (what a plan records)."""
    defaults = default_params()
    out = {}
    for name, table in params.items():
        diff = {k: v for k, v in dict(table).items() if defaults.get(name, {}).get(k, object()) != v}
        if diff:
            out[name] = diff
    return out


def check_params(params: Mapping[str, Mapping[str, Any]]) -> None:
    """One-line errors for unknown techniques, unknown parameters and bad values, before any model loads."""
    for name, table in params.items():
        t = REGISTRY.get(name)
        if t is None:
            raise DifaError(f"techniques.{name}: no such technique; choose from {', '.join(sorted(REGISTRY))}")
        known = {f.name for f in dataclasses.fields(t.Config)}
        unknown = sorted(set(dict(table)) - known)
        if unknown:
            raise DifaError(f"techniques.{name}: unknown parameter(s) {unknown}; "
                            f"{'known: ' + ', '.join(sorted(known)) if known else name + ' takes none'}")
        check = getattr(t, "check_config", None)
        if check is not None:
            check(params)
