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

SCHEMA = "difa.plan"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

FULL = "full"
WARS = "wars"
AST = "ast"
ASC = "asc"
WARS_ASC = "wars+asc"
TOME = "tome"
AGENT = "agent"
TGATE = "tgate"
# Derived from the technique files: methods that need the two CFG halves in one batch,
CFG_METHODS = frozenset(n for n, t in _REGISTRY.items() if getattr(t, "SHARES_CFG", False))
# that add the window-attention residual cached at an earlier step,
RESIDUAL_METHODS = frozenset(n for n, t in _REGISTRY.items() if getattr(t, "READS_RESIDUAL", False))
# and that return a cached module output instead of computing one.
OUTPUT_READERS = frozenset(n for n, t in _REGISTRY.items() if getattr(t, "READS_OUTPUT", False))
# Which methods compute the window residual R that a later `wars` reads (the `residual_from` of the `wars`
# technique parameters): "full" (difa) or "full+asc" (DiTFastAttn: an `asc` step is "full attention + CFG
# sharing", computes R on the conditional half and gives it to both halves; DESIGN.md §7).
RESIDUAL_RULES = {"full": frozenset({FULL}), "full+asc": frozenset({FULL, ASC})}


def residual_producers(techniques: Mapping[str, Mapping[str, Any]]) -> frozenset[str]:
    rule = dict(techniques.get(WARS, {}) or {}).get("residual_from", "full")
    if rule not in RESIDUAL_RULES:
        raise DifaError(f"wars residual_from {rule!r} is unknown; use one of {', '.join(RESIDUAL_RULES)}")
    return RESIDUAL_RULES[rule]


CFG_LAYOUTS = ("cond_first", "uncond_first", "none")  # none: guidance-distilled, no CFG batch
BLOCK = "block"  # the kind of a block cell (a whole transformer block)


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
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise DifaError(f"{source} is not valid JSON ({e.msg} at line {e.lineno}); recalibrate or restore the file") from None
        except RecursionError:
            raise DifaError(f"{source} is nested too deeply to be a difa plan; pass a .json written by difa.calibrate") from None
        return cls.from_dict(d, source)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (difa.files.write_atomic): the old file stays intact on any failure."""
        from difa.files import write_atomic

        return write_atomic(path, lambda f: f.write(self.to_json()), binary=False)


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
    """Raise DifaError (one line) if the plan is not executable as written."""
    from difa.adapters import ADAPTERS
    from difa.techniques import REGISTRY, unfit

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
            if m not in known or BLOCK not in REGISTRY[m].KINDS:
                options = sorted(k for k in known if BLOCK in REGISTRY[k].KINDS)
                raise DifaError(f"plan block cell ({name}, step {step}) has method {m!r}, which is not a block method; "
                                f"use one of {', '.join(options)}")
            if not ran[step]:
                if m != FULL:
                    raise DifaError(f"plan block cell ({name}, step {step}) is {m!r} but a block around it is skipped at "
                                    "that step, so it never runs (moot); write 'full' there")
                continue
            needs = getattr(REGISTRY[m], "NEEDS", None)  # what an earlier step of the block must have computed
            if needs is not None and not any(needs in _computes(REGISTRY[x]) for x, r in zip(row[:step], ran) if r):
                raise DifaError(f"plan block cell ({name}, step {step}) is {m!r}, which reuses the block's {needs} from an "
                                f"earlier step, but no earlier step computes it; use 'full' there")
    executed = attention_executed(plan)
    producers = residual_producers(plan.techniques)
    for name, row, ran in zip(plan.model.layers, plan.methods, executed):
        if len(row) != plan.steps:
            raise DifaError(f"plan row for {name} has {len(row)} steps, expected {plan.steps}; recalibrate to get a consistent plan")
        for step, m in enumerate(row):
            if m not in known:
                raise DifaError(f"plan cell ({name}, step {step}) has unknown method {m!r}; known methods: {', '.join(sorted(known))}")
            if not ran[step]:
                if m != FULL:
                    raise DifaError(f"plan cell ({name}, step {step}) is {m!r} but its block is skipped at that step, so "
                                    "the attention never runs (moot); write 'full' there")
                continue
            if step == 0 and REGISTRY[m].READS_CACHE:
                raise DifaError(f"plan cell ({name}, step 0) is {m!r}, which reuses an earlier step; nothing is cached at step 0")
            why = unfit(m, name, adapter)
            if why is not None:
                raise DifaError(f"plan cell ({name}, step {step}): {why}; use 'full' there")
            done = [x for x, r in zip(row[:step], ran[:step]) if r]
            if m in RESIDUAL_METHODS and not producers & set(done):
                raise DifaError(f"plan cell ({name}, step {step}) is {m!r}, which needs a computed "
                                f"{' or '.join(sorted(map(repr, producers)))} step of the layer before it")
            if REGISTRY[m].READS_CACHE and not done:
                raise DifaError(f"plan cell ({name}, step {step}) is {m!r}, which reuses an earlier output, but the layer "
                                "has not run before (its block was skipped); use 'full' there")
            if m in CFG_METHODS and not plan.cfg_enabled:
                raise DifaError(f"plan cell ({name}, step {step}) uses {m!r} (CFG sharing) but the plan has CFG off; use guidance_scale > 1 or drop {m!r}")


def _computes(technique) -> tuple[str, ...]:
    return getattr(technique, "COMPUTES", ())


def attention_executed(plan: Plan) -> list[list[bool]]:
    """[layer][step]: the attention layer really runs (its block is not skipped by a block cell at that step)."""
    return executed_cells(plan.model.layers, plan.model.blocks, plan.blocks, plan.steps)


def executed_cells(layers: Sequence[str], block_names: Sequence[str], block_rows: Sequence[Sequence[str]],
                   steps: int) -> list[list[bool]]:
    """[layer][step]: the attention layer runs, i.e. no block containing it (its transformer block, or a UNet
    DeepCache unit around it) skips at that step."""
    return _not_skipped(layers, block_names, block_rows, steps)


def block_executed(block_names: Sequence[str], block_rows: Sequence[Sequence[str]], steps: int) -> list[list[bool]]:
    """[block][step]: the block's own cell runs, i.e. no block containing it skips at that step (nested UNet units:
    a resnet inside a skipped down block never runs; its cell is moot)."""
    return _not_skipped(block_names, block_names, block_rows, steps)


def _not_skipped(names: Sequence[str], block_names: Sequence[str], block_rows: Sequence[Sequence[str]],
                 steps: int) -> list[list[bool]]:
    from difa.techniques import REGISTRY

    out = []
    for name in names:
        around = [j for j, b in enumerate(block_names) if name.startswith(b + ".")] if block_rows else []
        out.append([not any(REGISTRY[block_rows[j][t]].SKIPS_ATTENTION for j in around) for t in range(steps)])
    return out


def block_keeps(row: Sequence[str], what: str, ran: Sequence[bool] | None = None) -> list[bool]:
    """[step]: this cell of a block row computes `what` ("residual", "ff" or "output") and a later cell reads it:
    only the last NEEDS_POINTS computing steps before a reader keep it (a `forecast` reads two, `reuse` one), since
    caching costs time (a residual is an (B, N, C) subtraction at every keeping step; the latency model charges it).
    `ran`: the row's cells that run (block_executed); a moot cell computes nothing."""
    from difa.techniques import REGISTRY

    keep = [False] * len(row)
    for s, m in enumerate(row):
        if getattr(REGISTRY[m], "NEEDS", None) != what:
            continue
        makers = [t for t in range(s) if what in getattr(REGISTRY[row[t]], "COMPUTES", ()) and (ran is None or ran[t])]
        for t in makers[-getattr(REGISTRY[m], "NEEDS_POINTS", 1):]:
            keep[t] = True
    return keep


def residual_steps(methods: Sequence[Sequence[str]], executed: Sequence[Sequence[bool]] | None = None,
                   producers: frozenset[str] = RESIDUAL_RULES["full"]) -> list[list[bool]]:
    """[layer][step]: this `full` cell (or a cell of another residual producer) must cache the window residual,
    because a `wars` cell of the same layer follows before the next producer. Derived from the plan, never
    tracked by hand. Cells that do not run (`executed` False: their block is skipped) are passed over."""
    out = []
    for i, row in enumerate(methods):
        keep, needed = [False] * len(row), False
        for t in range(len(row) - 1, -1, -1):  # scan backwards: is a residual reader ahead?
            if executed is not None and not executed[i][t]:
                continue
            if row[t] in producers:
                keep[t], needed = needed, False
            elif row[t] in RESIDUAL_METHODS:
                needed = True
        out.append(keep)
    return out


def output_steps(methods: Sequence[Sequence[str]], executed: Sequence[Sequence[bool]] | None = None) -> list[list[bool]]:
    """[layer][step]: this computed cell's output must be cached, because the next step of the layer that runs
    reuses it (`ast`, `tgate`)."""
    out = []
    for i, row in enumerate(methods):
        ran = executed[i] if executed is not None else [True] * len(row)
        keep = [False] * len(row)
        for t, m in enumerate(row):
            if not ran[t] or m in OUTPUT_READERS:
                continue
            nxt = next((u for u in range(t + 1, len(row)) if ran[u]), None)
            keep[t] = nxt is not None and row[nxt] in OUTPUT_READERS
        out.append(keep)
    return out
