"""The technique protocol: what a technique file declares, so that the engine, the search, the cost and latency
models and plan validation can use it without knowing its name.

A technique file declares one frozen `Technique` (only the fields that differ from the defaults below), its
execution (`execute` for an attention cell, `run` for a block cell) and, for a block technique that stands in for a
skipped block, its search estimator `estimate(points, step, config)`: the stand-in residual the search scores
against the recorded trajectory, and the same function the engine runs. `difa.techniques.register` checks every
description when the registry is built (fields complete, letters and colours unique, slots known).

Caches are **slots**: a named kind of tensor a cell writes at one step and a later cell of the same layer or block
reads (`Slot`). Layer and block state hold a mapping slot -> value. Which steps must keep slot X for a later reader
is one generic rule (`difa.plan.keeps`), and cache accounting, snapshot / restore and the CFG-collapse check
iterate over slots. A new kind of cache is one `Slot` declared in the technique file that introduces it.

(Compare diffusers' explicit `ModelHook` in `hooks/hooks.py`: a technique is data plus pure functions.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

FULL = "full"  # the reference method: every cell starts as it, and a plan writes it where nothing else runs
BLOCK = "block"  # the kind of a block cell (a whole transformer block, or a UNet DeepCache unit)
ATTENTION_KINDS = ("attn1", "attn2", "joint")  # self-, cross- and joint (MMDiT) attention layers
SPATIAL, TEMPORAL = "spatial", "temporal"  # token axes: within a frame, across frames (video)
LAYER = "layer"  # a slot of an attention layer's state (LayerState)
FITTED = "fitted"  # the Config field holding a fitted technique's per-cell parameters (Technique.fit)


@dataclass(frozen=True)
class NoConfig:
    """The Config of a technique without parameters."""


def no_flops(shape: Any, params: Mapping[str, Mapping]) -> float:
    return 0.0


@dataclass(frozen=True)
class Slot:
    """A kind of cache kept across steps (or, `per_forward`, within one denoiser call).

    source: who writes it. "output": the engine caches the cell's return value (an attention layer's output, a
    block's output); "residual": a block cell caches output - input; "technique": the writing technique stores it
    itself (e.g. the window residual, computed inside attention); "block_input": the engine hands the layer its
    transformer block's input every forward; "submodule:<name>": the engine wraps the block's submodule <name>
    (e.g. "ff") and caches its output."""

    name: str
    level: str  # LAYER (an attention layer's state) or BLOCK (a block's state)
    source: str
    # elements(shape, cfg) held for one layer / block, from the attention LayerShape (batch included) and whether
    # the generation runs CFG; None: not known from the shapes (e.g. a UNet unit's output)
    elements: Callable[[Any, bool], int | None]
    fit_batch: bool = True  # the engine cuts it to one CFG half (collapse) or doubles it to fit the call's batch
    derived_from: str | None = None  # a memo of another slot: dropped whenever that slot is written
    per_forward: bool = False  # written every forward, never read across steps (not kept by the keep rule)
    # methods that compute it besides those whose `writes` name it: a slot filled by the engine from what a cell
    # computes anyway (its output, a submodule's output) names here the methods that compute that (e.g. "full"),
    # so that a new kind of cache needs no edit to their files
    writers: tuple[str, ...] = ()
    # write_flops(writer Technique, shape, params): extra FLOPs a writing cell spends to compute it (cost model)
    write_flops: Callable[[Any, Any, Mapping[str, Mapping]], float] | None = None
    doc: str = ""


@dataclass(frozen=True)
class BlockTimes:
    """Measured seconds of one block (difa.calibration.latency), what a block technique's cost is made of."""

    block: float  # the block, computed
    ff: float  # its feed-forward module
    skip: float  # a skipped block's stand-in (the dearest registered estimator plus the add)
    half: float = 0.0  # the block on one CFG half of the batch, with the other half's stand-in (0: not timed)


def computed_block(times: BlockTimes) -> float:
    return times.block


def half_block(times: BlockTimes) -> float:
    """A block computed on one CFG half (its whole time where the half was not timed: no CFG batch)."""
    return times.half if times.half > 0 else times.block


def skipped_block(times: BlockTimes) -> float:
    return times.skip


@dataclass(frozen=True)
class Technique:
    name: str  # as written in plans
    letter: str  # one character per cell in the calibration summary
    color: str  # its colour in plan heatmaps (difa.plots), the same in every plot
    kinds: tuple[str, ...]  # ATTENTION_KINDS it applies to, or (BLOCK,)
    config: type = NoConfig  # frozen dataclass of its parameters, read from plan.techniques[name]
    execute: Callable | None = None  # attention: execute(cell, hidden_states, encoder_hidden_states, mask, ...)
    run: Callable | None = None  # block: run(cell, x, compute) -> the block's output; compute() runs the block
    axes: tuple[str, ...] = (SPATIAL, TEMPORAL)  # token axes it runs on
    reads: tuple[str, ...] = ()  # slots an earlier computed step must have written (refused at step 0)
    writes: tuple[str, ...] = ()  # slots it computes, kept where a later cell reads them
    extra_writes: Callable[[Mapping[str, Mapping]], tuple[str, ...]] | None = None  # slots written under some params
    holds: tuple[str, ...] = ()  # slots it fills for itself (a memo, a per-forward input): counted in cache memory
    points: int = 1  # past values of each read slot it needs (a first-order forecast: 2)
    shares_cfg: bool = False  # needs the two CFG halves in one batch
    on_one_half: str | None = None  # what it becomes when the engine runs one CFG half (None: itself)
    averages_halves: bool = False  # reads its cache as the mean of the CFG halves: the halves need not be equal
    collapses_cfg: bool = False  # when every cross-attention cell of a step is this, one CFG half is exact
    skips_block: bool = False  # block: the block does not run (its attention cells and nested units are moot)
    replaces: str | None = None  # block: the submodule whose output `replace(cell, x)` stands in for
    replace: Callable | None = None
    estimate: Callable | None = None  # block: estimate(points, step, config) -> stand-in residual (search + run)
    # block: fit(points, step, target) -> the estimator's parameters for one cell, fitted to the residual `target`
    # (..., n, C); its estimate then takes them in place of `config`. The search scores it cross-fitted and the
    # check generation runs it so (calibration/table.py: CheckFit, which the check passes in the Config's field
    # FITTED); the plan holds the fits on every input there, `fitted_params({(block, step): parameters})`
    fit: Callable | None = None
    fitted_params: Callable | None = None
    # block: computes the block on the conditional CFG half only and stands in for the other half. Its `run` gets
    # cell.half (computed rows, other rows) and cell.compute_half(); its estimator gets each point as a pair
    # (step, (computed half, other half)) and last the current step's (step, (computed half, None)), and returns
    # the other half's residual (B/2, n, C). It needs a CFG batch (shares_cfg) and never skips the block.
    half_batch: bool = False
    block_cost: Callable[[BlockTimes], float] = computed_block  # block: seconds of one cell
    flops: Callable = no_flops  # attention: flops(shape, params) for the cost model
    check_config: Callable[[Mapping[str, Mapping]], None] | None = None  # one-line errors for bad parameters
    candidate: bool = False  # a default calibration candidate
    candidate_kinds: tuple[str, ...] | None = None  # where calibration proposes it (default: kinds)
    not_joint: str | None = None  # why it does not run on joint (MMDiT) attention, one phrase
    # on joint layers it reproduces the family's joint processor (techniques/joint.py): only where the adapter says
    # that processor is reproduced (Adapter.joint_window), else `not_joint` is the reason
    joint_reproduced: bool = False
    slots: tuple[Slot, ...] = ()  # the kinds of cache this file introduces
    doc: str = ""  # one line: what it does (the README's tables say more)

    @property
    def is_block(self) -> bool:
        return BLOCK in self.kinds

    @property
    def searchable(self) -> bool:
        """The trajectory search can score it: a block stand-in with an estimator."""
        return self.is_block and self.estimate is not None

    def writes_for(self, params: Mapping[str, Mapping]) -> tuple[str, ...]:
        return self.writes + (self.extra_writes(params) if self.extra_writes is not None else ())

    def cfg(self, params: Mapping[str, Mapping]) -> Any:
        """Its Config from a plan's technique table (defaults for absent keys)."""
        return self.config(**dict(params.get(self.name, {}) or {}))

    def proposed_on(self) -> tuple[str, ...]:
        return self.candidate_kinds if self.candidate_kinds is not None else self.kinds


def check(t: Technique, slots: Mapping[str, Slot]) -> None:
    """Raise ValueError if the description is incomplete or inconsistent (at registry build time)."""
    where = f"technique {t.name!r}"
    if not t.name or not isinstance(t.name, str):
        raise ValueError(f"{where}: a name is required")
    if len(t.letter) != 1:
        raise ValueError(f"{where}: letter must be one character, got {t.letter!r}")
    if not (isinstance(t.color, str) and t.color.startswith("#") and len(t.color) == 7):
        raise ValueError(f"{where}: color must be '#rrggbb', got {t.color!r}")
    unknown_kinds = set(t.kinds) - {*ATTENTION_KINDS, BLOCK}
    if not t.kinds or unknown_kinds:
        raise ValueError(f"{where}: kinds must be among {(*ATTENTION_KINDS, BLOCK)}, got {t.kinds!r}")
    if not (dataclasses.is_dataclass(t.config) and t.config.__dataclass_params__.frozen):
        raise ValueError(f"{where}: config must be a frozen dataclass")
    if any(k in ATTENTION_KINDS for k in t.kinds) and t.execute is None:
        raise ValueError(f"{where}: an attention technique needs execute")
    if t.is_block and t.run is None:
        raise ValueError(f"{where}: a block technique needs run")
    for s in (*t.reads, *t.writes, *t.holds, *([t.replaces] if t.replaces else [])):
        if s not in slots and not (t.replaces and s == t.replaces):
            raise ValueError(f"{where}: slot {s!r} is declared by no technique")
    if t.reads and t.name == FULL:
        raise ValueError(f"{where}: the reference method reads no cache")
    if (t.replaces is None) != (t.replace is None):
        raise ValueError(f"{where}: replaces and replace go together")
    if t.half_batch and (not t.is_block or t.skips_block or not t.shares_cfg or t.estimate is None):
        raise ValueError(f"{where}: a half_batch technique is a block technique with an estimate that shares_cfg "
                         "and does not skip the block")
    if (t.fit is None) != (t.fitted_params is None) or (t.fit is not None and t.estimate is None):
        raise ValueError(f"{where}: fit and fitted_params go together, with an estimate")
    if t.points < 1:
        raise ValueError(f"{where}: points must be >= 1")
    if t.on_one_half is not None and not isinstance(t.on_one_half, str):
        raise ValueError(f"{where}: on_one_half must be a method name")
    for s in t.slots:
        if s.level not in (LAYER, BLOCK):
            raise ValueError(f"{where}: slot {s.name!r} has level {s.level!r}; use {LAYER!r} or {BLOCK!r}")
