"""The plan: which method each (layer, step) cell runs, for attention layers and for whole transformer blocks.
A plain, frozen value.

JSON schema version 3 (no pickle anywhere; loading never executes code). Version 3 adds block cells
(`model.blocks`, `block_methods`); version 2 listed cross-attention (`*.attn2`) layers too; version 1 files
(self-attention only) and version 2 files (no block cells: every block computed) still load:

    {"schema": "difa.plan", "version": 1,
     "model":      {"class", "config_hash", "layers": [attention module names (attn1 and attn2), execution order],
                   "name", "family"},
     "scheduler":  {"class", "steps": denoiser calls per generation, "num_inference_steps"},
     "cfg":        {"enabled", "layout", "guidance_scale"},
     "techniques": {method name: {parameter: value}},       e.g. {"wars": {"window": 0.125}, "tome": {"ratio": 0.5}}
     "methods":    {layer name: [method at step 0, 1, ...]},
     "block_methods": {block name: [method at step 0, 1, ...]}   (version 3; model.blocks lists the names)
     "calibration": {...}  free-form record: threshold, inputs, seed, per-decision losses, time, forwards
     "flops":      {...}   summary from the cost model}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from difa.errors import DifaError
from difa.techniques import REGISTRY as _REGISTRY  # (technique files never import the plan)
from difa.techniques.protocol import FULL  # noqa: F401  (the reference method, as plans write it)
from difa.cells import block_executed, executed_cells  # noqa: F401  (re-exported: the rules live in difa.cells)

SCHEMA = "difa.plan"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

# Derived from the technique descriptions (difa.techniques.protocol): methods that need the two CFG halves in one
# batch. (A plan names methods only as data: nothing here knows what any method does.)
CFG_METHODS = frozenset(n for n, t in _REGISTRY.items() if t.shares_cfg)


CFG_LAYOUTS = ("cond_first", "uncond_first", "none")  # none: guidance-distilled, no CFG batch


def known_methods() -> frozenset[str]:
    from difa.techniques import REGISTRY

    return frozenset(REGISTRY)


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable short hash of a diffusers model config (private `_` keys such as the load path excluded)."""
    public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    text = json.dumps(public, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelIdentity:
    cls: str
    config_hash: str
    layers: tuple[str, ...]
    name: str = ""
    family: str = ""
    blocks: tuple[str, ...] = ()  # transformer block module names, execution order; () = no block cells


def _count(rows: Sequence[Sequence[str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in rows:
        for m in row:
            out[m] = out.get(m, 0) + 1
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Plan:
    model: ModelIdentity
    scheduler: str
    steps: int  # denoiser calls per generation (= num_inference_steps, +1 for PNDM, x2 for Heun)
    methods: tuple[tuple[str, ...], ...]  # (n_layers, steps), same order as model.layers
    num_inference_steps: int | None = None  # what the pipeline was called with
    cfg_enabled: bool = True
    cfg_layout: str = "cond_first"
    guidance_scale: float | None = None
    techniques: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    calibration: Mapping[str, Any] = field(default_factory=dict)
    flops: Mapping[str, Any] = field(default_factory=dict)
    blocks: tuple[tuple[str, ...], ...] = ()  # (n_blocks, steps), same order as model.blocks; () = all computed
    latency: Mapping[str, Any] = field(default_factory=dict)  # predicted seconds from the measured cost model

    def __post_init__(self) -> None:
        validate(self)

    # -- queries ---------------------------------------------------------------------------
    @property
    def inference_steps(self) -> int:
        return self.num_inference_steps if self.num_inference_steps is not None else self.steps

    @property
    def layers(self) -> tuple[str, ...]:
        return self.model.layers

    def method(self, layer: int, step: int) -> str:
        return self.methods[layer][step]

    def block_method(self, block: int, step: int) -> str:
        return self.blocks[block][step] if self.blocks else FULL

    def counts(self) -> dict[str, int]:
        """Attention cells per method (cells of skipped blocks included as written, i.e. `full`)."""
        return _count(self.methods)

    def block_counts(self) -> dict[str, int]:
        return _count(self.blocks)

    def with_(self, **changes: Any) -> "Plan":
        return replace(self, **changes)

    # -- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "model": {
                "class": self.model.cls,
                "config_hash": self.model.config_hash,
                "layers": list(self.model.layers),
                "name": self.model.name,
                "family": self.model.family,
                "blocks": list(self.model.blocks),
            },
            "scheduler": {"class": self.scheduler, "steps": self.steps, "num_inference_steps": self.num_inference_steps},
            "cfg": {"enabled": self.cfg_enabled, "layout": self.cfg_layout, "guidance_scale": self.guidance_scale},
            "techniques": {k: dict(v) for k, v in self.techniques.items()},
            "methods": {name: list(row) for name, row in zip(self.model.layers, self.methods)},
            "block_methods": {name: list(row) for name, row in zip(self.model.blocks, self.blocks)},
            "calibration": dict(self.calibration),
            "flops": dict(self.flops),
            "latency": dict(self.latency),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "plan") -> "Plan":
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA:
            raise DifaError(f"{source} is not a difa plan (missing \"schema\": \"{SCHEMA}\"); pass a file written by difa.calibrate")
        if d.get("version") not in READABLE_VERSIONS:
            raise DifaError(f"{source} has plan schema version {d.get('version')!r}, this difa reads version {VERSION}; recalibrate or upgrade difa")
        unknown = sorted(set(d) - set(PLAN_KEYS)) + [f"{k}.{x}" for k, known in PLAN_KEYS.items() if known
                                                      and isinstance(d.get(k), Mapping) for x in sorted(set(d[k]) - known)]
        if unknown:  # a misspelt "block_method" would otherwise run the plan without its block cells
            raise DifaError(f"{source} has key(s) this difa does not know: {', '.join(map(str, unknown))[:200]}; "
                            "fix the spelling or recalibrate (a plan from a newer difa needs that version)")
        try:
            m, s, c = (_field(d, k, Mapping) for k in ("model", "scheduler", "cfg"))
            layers = _names(m, "layers", f"{source} model.layers")
            rows = d["methods"]
            if not isinstance(rows, Mapping) or set(rows) != set(layers):
                raise DifaError(f"{source}: \"methods\" must have one row per layer in model.layers; recalibrate to get a consistent plan")
            blocks = _names(m, "blocks", f"{source} model.blocks") if "blocks" in m else ()  # versions 1, 2: none
            block_rows = d.get("block_methods", {})
            if not isinstance(block_rows, Mapping) or set(block_rows) != set(blocks):
                raise DifaError(f"{source}: \"block_methods\" must have one row per block in model.blocks; recalibrate to get a consistent plan")
            techniques = _field(d, "techniques", Mapping, {})
            if not all(isinstance(v, Mapping) for v in techniques.values()):
                raise DifaError(f"{source}: \"techniques\" must map technique names to parameter tables")
            from difa.techniques import check_params

            check_params(techniques)  # unknown techniques or parameters, bad values (a window of 0)
            guidance = c.get("guidance_scale")
            if guidance is not None and not _is_number(guidance):
                raise DifaError(f"{source}: cfg.guidance_scale must be a finite number or null (got {guidance!r})")
            n_inf = s.get("num_inference_steps")
            return cls(
                model=ModelIdentity(_field(m, "class", str), _field(m, "config_hash", str), layers,
                                    _field(m, "name", str, ""), _field(m, "family", str, ""), blocks),
                scheduler=_field(s, "class", str),
                steps=_positive_int(s.get("steps"), f"{source} scheduler.steps"),
                num_inference_steps=None if n_inf is None else _positive_int(n_inf, f"{source} scheduler.num_inference_steps"),
                methods=tuple(_row(rows[name], f"{source} methods[{name!r}]") for name in layers),
                cfg_enabled=_field(c, "enabled", bool),
                cfg_layout=_field(c, "layout", str),
                guidance_scale=guidance,
                techniques=techniques,
                calibration=_field(d, "calibration", Mapping, {}),
                flops=_field(d, "flops", Mapping, {}),
                blocks=tuple(_row(block_rows[name], f"{source} block_methods[{name!r}]") for name in blocks),
                latency=_field(d, "latency", Mapping, {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DifaError(f"{source} is missing or has a malformed field ({type(e).__name__}: {e}); recalibrate to rewrite it") from None

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> "Plan":
        try:
            d = json.loads(text, object_pairs_hook=_no_repeats)
        except json.JSONDecodeError as e:
            raise DifaError(f"{source} is not valid JSON ({e.msg} at line {e.lineno}); recalibrate or restore the file") from None
        except RecursionError:
            raise DifaError(f"{source} is nested too deeply to be a difa plan; pass a .json written by difa.calibrate") from None
        except _Repeated as e:
            raise DifaError(f"{source} repeats the key {str(e)[:80]!r} in one object (JSON readers would silently keep "
                            "one of them); keep one and check which is meant, or recalibrate") from None
        return cls.from_dict(d, source)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (difa.files.write_atomic): the old file stays intact on any failure."""
        from difa.files import write_atomic

        return write_atomic(path, lambda f: f.write(self.to_json()), binary=False)


# The keys a plan file may have, and those of its fixed sub-tables (None: a free record, e.g. the calibration's).
PLAN_KEYS: dict[str, frozenset[str] | None] = {
    "schema": None, "version": None, "techniques": None, "methods": None, "block_methods": None, "calibration": None,
    "flops": None, "latency": None,
    "model": frozenset({"class", "config_hash", "layers", "name", "family", "blocks"}),
    "scheduler": frozenset({"class", "steps", "num_inference_steps"}),
    "cfg": frozenset({"enabled", "layout", "guidance_scale"}),
}


class _Repeated(ValueError):
    """A key repeated within one JSON object."""


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Repeated(k)
        out[k] = v
    return out


MAX_PLAN_BYTES = 16 * 2**20  # a 50-step plan of a 28-block model is ~100 KB; refuse anything this big unread


def _field(d: Mapping, key: str, kind: type, default: Any = ...) -> Any:
    """d[key] of type `kind` (bool strictly: "false" is not a bool); `default` when absent, if given."""
    if key not in d and default is not ...:
        return default
    v = d[key]
    if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
        raise TypeError(f"{key!r} must be {kind.__name__}, got {type(v).__name__} {v!r:.40}")
    return v


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(v: Any, what: str) -> int:
    """A positive integer as JSON writes one (4, not 4.0, "4", true or 1e400)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise DifaError(f"{what} must be a positive integer (got {v!r:.40}); recalibrate to rewrite the plan")
    return v


def _names(m: Mapping, key: str, what: str) -> tuple[str, ...]:
    v = m[key]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise DifaError(f"{what} must be a list of module names")
    return tuple(v)


def _row(v: Any, what: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise DifaError(f"{what} must be a list of method names, one per step")
    return tuple(v)


def load_plan(path: str | os.PathLike) -> Plan:
    path = Path(path)
    if path.is_dir():
        raise DifaError(f"plan={str(path)!r} is a folder; pass plan=<path to a .json written by difa.calibrate>")
    if path.exists() and not path.is_file():
        raise DifaError(f"plan={str(path)!r} is not a regular file (a pipe or device: never read); pass a .json written "
                        "by difa.calibrate")
    if not path.is_file():
        raise DifaError(f"plan file {str(path)!r} does not exist; pass plan=<path to a .json written by difa.calibrate>")
    source = f"plan {str(path)!r}"
    size = path.stat().st_size
    if size > MAX_PLAN_BYTES:
        raise DifaError(f"{source} is {size / 2**20:.0f} MB, over the {MAX_PLAN_BYTES // 2**20} MB a plan can be; "
                        "pass a .json written by difa.calibrate")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DifaError(f"{source} is not valid JSON (it is binary, e.g. a pickle); pass a .json written by difa.calibrate") from None
    return Plan.from_json(text, source=source)


def validate(plan: Plan) -> None:
    """Raise DifaError (one line) if the plan is not executable as written (the rules: difa.cells)."""
    from difa.adapters import ADAPTERS
    from difa.cells import cell_problem

    adapter = ADAPTERS.get(plan.model.family)  # its family's facts (token axes, CFG); None: a family difa lacks

    known = known_methods()
    n = len(plan.model.layers)
    if plan.steps < 1:
        raise DifaError(f"plan has steps={plan.steps}; a plan needs at least one denoising step")
    if len(plan.methods) != n:
        raise DifaError(f"plan has {len(plan.methods)} method rows for {n} layers; recalibrate to get a consistent plan")
    if plan.cfg_layout not in CFG_LAYOUTS:
        raise DifaError(f"plan cfg layout {plan.cfg_layout!r} is unknown; use one of {', '.join(CFG_LAYOUTS)}")
    if plan.blocks and len(plan.blocks) != len(plan.model.blocks):
        raise DifaError(f"plan has {len(plan.blocks)} block rows for {len(plan.model.blocks)} blocks; recalibrate to get a consistent plan")
    for name, row in zip(plan.model.blocks, plan.blocks):
        if len(row) != plan.steps:
            raise DifaError(f"plan row for block {name} has {len(row)} steps, expected {plan.steps}; recalibrate to get a consistent plan")
    block_ran = block_executed(plan.model.blocks, plan.blocks, plan.steps)
    for name, row, ran in zip(plan.model.blocks, plan.blocks, block_ran):
        for step, m in enumerate(row):
            if m not in known or not _REGISTRY[m].is_block:
                options = sorted(k for k in known if _REGISTRY[k].is_block)
                raise DifaError(f"plan block cell ({name}, step {step}) has method {m!r}, which is not a block method; "
                                f"use one of {', '.join(options)}")
            why = cell_problem(m, step, runs=ran[step], earlier=[x for x, r in zip(row[:step], ran) if r],
                               params=plan.techniques, adapter=adapter, cfg_enabled=plan.cfg_enabled)
            if why is not None:
                raise DifaError(f"plan block cell ({name}, step {step}) is {m!r}, {why}")
        half = [m for m in row if _REGISTRY[m].half_batch]
        if half:  # its attention layers run on half the batch at those steps: caches of theirs would not fit
            inside = [(n, r) for n, r in zip(plan.model.layers, plan.methods) if n.startswith(name + ".")]
            busy = next((n for n, r in inside if set(r) != {FULL}), None)
            if busy is not None:
                raise DifaError(f"plan block {name} has {half[0]!r} cells, which run the block on half the batch, but "
                                f"its attention layer {busy} is not 'full' throughout; use 'full' for that layer")
    for name, row, ran in zip(plan.model.layers, plan.methods, attention_executed(plan)):
        if len(row) != plan.steps:
            raise DifaError(f"plan row for {name} has {len(row)} steps, expected {plan.steps}; recalibrate to get a consistent plan")
        for step, m in enumerate(row):
            if m not in known:
                raise DifaError(f"plan cell ({name}, step {step}) has unknown method {m!r}; known methods: {', '.join(sorted(known))}")
            why = cell_problem(m, step, runs=ran[step], earlier=[x for x, r in zip(row[:step], ran) if r],
                               params=plan.techniques, layer=name, adapter=adapter, cfg_enabled=plan.cfg_enabled)
            if why is not None:
                raise DifaError(f"plan cell ({name}, step {step}) is {m!r}, {why}")


def attention_executed(plan: Plan) -> list[list[bool]]:
    """[layer][step]: the attention layer really runs (its block is not skipped by a block cell at that step)."""
    return executed_cells(plan.model.layers, plan.model.blocks, plan.blocks, plan.steps)
