"""Applying a plan to a diffusers pipeline or bare denoiser, and removing it exactly: the model's identity is
checked against the plan, then an Engine (difa.engine) is installed."""

from __future__ import annotations

import logging

from typing import Any, Sequence

import torch

from difa import checks
from difa.adapters import Adapter, adapter_for
from difa.engine import ENGINE_ATTR, Engine
from difa.errors import DifaError
from difa.plan import Plan, config_hash


def plan_layers(obj: Any, family: str | None = None) -> tuple[Adapter, torch.nn.Module, list[tuple[str, torch.nn.Module]]]:
    adapter = adapter_for(obj, family)
    model = adapter.denoiser(obj)
    return adapter, model, adapter.planned_layers(model)


def plan_blocks(obj: Any, cache_units: bool = False) -> list[tuple[str, torch.nn.Module]]:
    """The transformer blocks a plan can hold block cells for, in execution order; with `cache_units`, followed by
    a UNet's DeepCache units (adapters.Adapter.cache_units)."""
    adapter = adapter_for(obj)
    model = adapter.denoiser(obj)
    units = [(n, m) for n, m, _ in adapter.cache_units(model)] if cache_units else []
    return adapter.block_layers(model) + units


def check_identity(plan: Plan, model: torch.nn.Module, names: Sequence[str], blocks: Sequence[str] = ()) -> None:
    cls = type(model).__name__
    if plan.model.cls != cls:
        raise DifaError(f"the plan was made for a {plan.model.cls} but this model is a {cls}; load the plan made for this model or recalibrate")
    if tuple(names) != plan.model.layers:
        raise DifaError(
            f"the plan lists {len(plan.model.layers)} attention layers but this model has {len(names)} "
            f"(first difference: {_first_diff(plan.model.layers, names)}); recalibrate for this model"
        )
    if plan.model.blocks and tuple(blocks) != plan.model.blocks:
        raise DifaError(
            f"the plan has cells for {len(plan.model.blocks)} blocks but this model has {len(blocks)} "
            f"(first difference: {_first_diff(plan.model.blocks, blocks)}); recalibrate for this model"
        )
    h = config_hash(model.config)
    if plan.model.config_hash != h:
        raise DifaError(
            f"the plan was made for a {cls} with config hash {plan.model.config_hash} but this one has {h} "
            "(different architecture or settings); recalibrate for this model"
        )


def _first_diff(a: Sequence[str], b: Sequence[str]) -> str:
    for x, y in zip(a, b):
        if x != y:
            return f"{x} vs {y}"
    return f"{len(a)} vs {len(b)} layers"


def apply_plan(obj: Any, plan: Plan, *, collapse_cfg: bool = True) -> Engine:
    """Execute `plan` on a diffusers pipeline or bare denoiser; returns the engine handle.

    Applying again replaces the previous plan; `remove_plan(obj)` (or `handle.remove()`) restores the model
    exactly. `collapse_cfg=False` keeps whole CFG batches at steps where every cross-attention is gated
    (same result, for checking the collapse).
    """
    plan = as_plan(plan)
    checks.boolean("collapse_cfg", collapse_cfg)
    adapter, model, layers = plan_layers(obj, plan.model.family)
    blocks = adapter.block_layers(model) if plan.blocks else []
    if plan.blocks and len(plan.model.blocks) > len(blocks):  # a plan with DeepCache units
        blocks = blocks + [(n, m) for n, m, _ in adapter.cache_units(model)]
    check_identity(plan, model, [n for n, _ in layers], [n for n, _ in blocks])
    if plan.cfg_layout != adapter.cfg_layout:
        raise DifaError(f"the plan assumes CFG layout {plan.cfg_layout} but {adapter.family} uses {adapter.cfg_layout}; recalibrate")
    scheduler = getattr(obj, "scheduler", None) if obj is not model else None
    if scheduler is not None and type(scheduler).__name__ != plan.scheduler:  # its steps sit at other timesteps
        logging.getLogger("difa").warning(
            "the plan was calibrated with %s and this pipeline runs %s: its cells are placed by step index, so "
            "errors may differ from the calibrated ones (recalibrate with this scheduler for a measured plan)",
            plan.scheduler, type(scheduler).__name__)
    engine = Engine(model, adapter, layers, plan.methods, plan.techniques, scheduler=scheduler,
                    inference_steps=plan.inference_steps, collapse_cfg=collapse_cfg, blocks=blocks,
                    block_methods=plan.blocks)
    engine.owner = obj if scheduler is not None else None  # its scheduler must stay the one wrapped
    return engine.install()


def as_plan(plan: Any) -> Plan:
    """A Plan, a path to a plan file, or a plan dict (as `Plan.to_dict` writes it) -> a Plan; else a one-line error."""
    import os
    from collections.abc import Mapping as AnyMapping

    from difa.plan import load_plan

    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return load_plan(plan)
    if isinstance(plan, AnyMapping):
        return Plan.from_dict(plan, source="plan dict")  # validated on construction
    raise DifaError(f"apply_plan takes a Plan, a path to a plan file or a plan dict, not {type(plan).__name__}")


def compile_blocks(obj: Any, **compile_kwargs: Any) -> int:
    """Regional torch.compile of a pipeline's (or bare denoiser's) transformer blocks, in place: `block.compile()`
    on each block a plan can hold cells for, as diffusers' `compile_repeated_blocks` does for the models that list
    their repeated blocks (DiT and PixArt do not). A plan's engine routes each block call outside the compiled region
    (difa/wrap.py), so the blocks share their graphs, compile during the first generation and never recompile after,
    whether the plan is applied before or after. `compile_kwargs` go to torch.compile (backend, mode, fullgraph,
    dynamic); `dynamic` defaults to False: a plan with CFG cells calls its blocks on the whole CFG batch and on its
    conditional half, which then get a static graph each instead of one with a dynamic batch dimension. Returns the
    number of blocks compiled. (Compiling the whole denoiser instead also runs a plan, but the routed blocks then
    run eagerly: README "Works with".)"""
    blocks = plan_blocks(obj)
    if not blocks:
        raise DifaError(f"{type(adapter_for(obj).denoiser(obj)).__name__} has no transformer blocks to compile; "
                        "use torch.compile on the denoiser")
    compile_kwargs.setdefault("dynamic", False)  # (see the docstring)
    for _, block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def remove_plan(obj: Any) -> bool:
    """Remove whatever plan is applied to `obj`; returns False if none was."""
    adapter = adapter_for(obj)
    engine = getattr(adapter.denoiser(obj), ENGINE_ATTR, None)
    if engine is None:
        return False
    engine.remove()
    return True
