"""Technique registry: method name (as written in plans) -> its `protocol.Technique` description.

Adding a technique is one file that declares `TECHNIQUE = Technique(...)` (difa/techniques/protocol.py) and one
entry in `TECHNIQUES` below (or `register(TECHNIQUE)` at run time). Every description is checked when it is
registered: fields complete, letters and colours unique, the slots it reads and writes declared by some technique.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from difa.adapters import JOINT, NO_CFG
from difa import checks
from difa.errors import DifaError
from difa.techniques import (agent, asc, ast, cfg_delta, cfg_forecast, deepcache, foca, forecast, forecast2,
                             forecast_fit, full, mlp_reuse, reuse, tgate, tome, wars, wars_asc)
from difa.techniques.protocol import BLOCK, FULL, Slot, Technique, check

# Registry order is the searches' tie order among equal costs (`tgate` before `ast`: see calibration).
TECHNIQUES: tuple[Technique, ...] = tuple(m.TECHNIQUE for m in (full, tgate, ast, wars, asc, wars_asc, tome, agent,
                                                                reuse, forecast, forecast_fit, forecast2, foca,
                                                                cfg_delta, cfg_forecast, mlp_reuse, deepcache))
REGISTRY: dict[str, Technique] = {}


def slots() -> dict[str, Slot]:
    """Every slot declared by a registered technique, by name."""
    return {s.name: s for t in REGISTRY.values() for s in t.slots}


def register(technique: Technique, *, check_slots: bool = True) -> Technique:
    """Add a technique (checked: fields, unique name, letter and colour, declared slots); returns it."""
    if not isinstance(technique, Technique):
        raise TypeError(f"register takes a protocol.Technique, not {type(technique).__name__}")
    if technique.name in REGISTRY:
        raise ValueError(f"technique {technique.name!r} is registered already")
    for other in REGISTRY.values():
        if other.letter == technique.letter or other.color == technique.color:
            raise ValueError(f"technique {technique.name!r}: letter {technique.letter!r} or colour {technique.color} "
                             f"is {other.name!r}'s already")
    known = slots()
    for s in technique.slots:
        if s.name in known and known[s.name] is not s:
            raise ValueError(f"technique {technique.name!r}: slot {s.name!r} is declared already")
    if check_slots:
        check(technique, {**known, **{s.name: s for s in technique.slots}})
    REGISTRY[technique.name] = technique
    return technique


def unregister(name: str) -> None:
    """Remove a technique registered at run time (the built-in ones stay)."""
    if name in {t.name for t in TECHNIQUES}:
        raise ValueError(f"{name!r} is a built-in technique")
    REGISTRY.pop(name, None)


for _t in TECHNIQUES:
    register(_t, check_slots=False)  # (a slot may be declared by a technique registered after its first reader)
for _t in TECHNIQUES:  # every slot is declared by the technique that introduces it, read or written by some
    check(_t, slots())


def kind_of(layer_name: str, adapter: Any = None) -> str:
    """"attn1" (self-attention), "attn2" (cross-attention) or, given the model's adapter (difa.adapters.Adapter),
    "joint" for a joint-attention family's layers (their names, `attn` / `attn1`, do not say it)."""
    if adapter is not None:
        return adapter.kind(layer_name)
    return layer_name.rsplit(".", 1)[-1]


def unfit(method: str, layer: str, adapter: Any = None) -> str | None:
    """Why `method` cannot run on attention layer `layer` of a model with `adapter` (difa.adapters.Adapter), as one
    phrase; None when it can. The layer's kind (attn1 / attn2 from its name; joint from the adapter: a technique's
    not_joint says why it skips joint attention), its token axis (a video model's temporal layers attend across
    frames: no 2-D grid to merge on) and the family's CFG (a guidance-distilled model has no CFG batch to share
    attention across)."""
    t = REGISTRY[method]
    kind = kind_of(layer, adapter)
    if kind == JOINT and kind not in t.kinds and t.not_joint:
        return f"{method!r} does not run on joint (MMDiT) attention such as {layer}: {t.not_joint}"
    if kind not in t.kinds:
        return f"{method!r} applies to {'/'.join(t.kinds)} layers only, not {kind}"
    if kind == JOINT and t.joint_reproduced and not adapter.joint_window:
        return (f"{method!r} does not run on joint (MMDiT) attention of {adapter.family} such as {layer}: "
                f"{t.not_joint}")
    if adapter is None:
        return None
    axis = adapter.axis(layer)
    if axis not in t.axes:
        return f"{method!r} needs a 2-D token grid; {layer} is a temporal layer (its tokens are frames)"
    if t.shares_cfg and adapter.cfg_layout == NO_CFG:
        return (f"{method!r} shares attention across the CFG halves, but {adapter.family} is guidance-distilled "
                "(its pipeline never runs a CFG batch)")
    return None


def letters() -> dict[str, str]:
    """Method -> the one character the calibration summary prints for its cells."""
    return {name: t.letter for name, t in REGISTRY.items()}


def candidate_kinds(method: str) -> tuple[str, ...]:
    """The kinds of layers calibration proposes `method` on (a technique may narrow its kinds)."""
    return REGISTRY[method].proposed_on()


def is_block_method(method: str) -> bool:
    return REGISTRY[method].is_block and method != FULL


def attention_methods(methods) -> list[str]:
    return [m for m in methods if m in REGISTRY and not is_block_method(m)]


def block_methods(methods) -> list[str]:
    return [m for m in methods if m in REGISTRY and is_block_method(m)]


def default_candidates() -> tuple[str, ...]:
    """Every registered technique marked `candidate`, in registry order."""
    return tuple(name for name, t in REGISTRY.items() if t.candidate)


def default_params() -> dict[str, dict[str, Any]]:
    """Technique -> its Config's defaults, for the techniques that take parameters: the CLI's `techniques` table
    (Hydra then refuses unknown technique names and keys, and `techniques={tome: {ratio: 0.3}}` merges)."""
    return {t.name: {f.name: _default(f) for f in dataclasses.fields(t.config)}
            for t in REGISTRY.values() if dataclasses.fields(t.config)}


def _default(f: dataclasses.Field) -> Any:
    """A Config field's default (a fresh one where it has a factory, e.g. `forecast_fit`'s empty gain table)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


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
        known = {f.name for f in dataclasses.fields(t.config)}
        unknown = sorted(set(dict(table)) - known)
        if unknown:
            raise DifaError(f"techniques.{name}: unknown parameter(s) {unknown}; "
                            f"{'known: ' + ', '.join(sorted(known)) if known else name + ' takes none'}")
        for f in dataclasses.fields(t.config):
            if f.name in table:
                checks.like_default(f"techniques.{name}.{f.name}", table[f.name], _default(f))
        if t.check_config is not None:
            t.check_config(params)


__all__ = ["BLOCK", "FULL", "REGISTRY", "TECHNIQUES", "Technique", "register", "unregister", "slots", "kind_of",
           "unfit", "letters", "candidate_kinds", "is_block_method", "attention_methods", "block_methods",
           "default_candidates", "default_params", "changed_params", "check_params"]
