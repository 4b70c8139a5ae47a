"""Argument checks shared by the CLIs and the Python API (calibrate_pipeline, evaluate, presets, peers), so that a
bad value is the same one-line DifaError from either side, before anything is allocated or loaded where the value
alone tells. Everything here is pipe-free except `inputs`, which needs the model's class count."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from difa.errors import DifaError

# Upper bounds on counts, checked before any list or tensor is built from them (a huge value would allocate for
# minutes before dying of MemoryError): far above any real use.
MAX_STEPS = 10_000  # denoising steps
MAX_INPUTS = 100_000  # calibration / evaluation inputs (n_calib, n)
MAX_BATCH = 4_096  # images per pipeline call (latency_batch, batch)
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
LOSS_ON = ("guided", "halves")
SEARCHES = ("trajectory", "greedy")


def _show(value: Any) -> str:
    return repr(value)[:40]


def count(name: str, value: Any, high: int, low: int = 1, example: str = "") -> int:
    """A whole number in [low, high] (bools, floats and text refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise DifaError(f"{name} must be an integer in [{low}, {high}], got {_show(value)}"
                        + (f"; e.g. {example}" if example else ""))
    return value


def seed(value: Any) -> int:
    return count("seed", value, MAX_SEED, low=0, example="seed=0")


def boolean(name: str, value: Any) -> bool:
    """True or False only: `fid=maybe`, `warmup=1` or the text "false" are refused, never read as true."""
    if not isinstance(value, bool):
        raise DifaError(f"{name} must be true or false, got {_show(value)}")
    return value


def number(name: str, value: Any, low: float | None = None, high: float | None = None, *, open_low: bool = False,
           example: str = "") -> float:
    """A finite number (not a bool) in [low, high] ((low, high] with open_low)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low is None or (value > low if open_low else value >= low)) and (high is None or value <= high)
    if not ok:
        where = "" if low is None and high is None else (
            f" in {'(' if open_low else '['}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]")
        raise DifaError(f"{name} must be a finite number{where}, got {_show(value)}" + (f"; e.g. {example}" if example else ""))
    return float(value)


def like_default(key: str, value: Any, default: Any) -> None:
    """A parameter of its default's type (bools strict; a number where the default is a float; a finite one), so
    that `techniques.tome.ratio=abc` is one line, not a comparison failing deep in a technique."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
              and (isinstance(default, float) or isinstance(value, int)))
    else:
        ok = default is None or isinstance(value, type(default))
    if not ok:
        kind = "true or false" if isinstance(default, bool) else "an integer" if isinstance(default, int) else \
            "a number" if isinstance(default, float) else f"a {type(default).__name__}"
        raise DifaError(f"{key} must be {kind}, got {value!r:.40}; the default is {default!r}")



def threshold(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise DifaError(f"threshold must be a number >= 0 (got {value!r}); try threshold=0.05")
    return float(value)


def budget(value: Any) -> float | None:
    """A latency budget: a fraction of the full latency in (0, 1], or None."""
    if value is None:
        return None
    try:
        b = float(value)
    except (TypeError, ValueError):
        b = math.nan
    if isinstance(value, bool) or not 0 < b <= 1:  # NaN fails this too
        raise DifaError(f"budget must be a fraction of the full latency in (0, 1], got {value!r}; try budget=0.5")
    return b


def budgets(values: Any) -> list[float]:
    """A list of budgets (a front), each checked, ascending, without repeats."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise DifaError(f"budgets must be a non-empty list of fractions in (0, 1], got {values!r}; try "
                        "budget=[0.4,0.5,0.6]")
    if len(values) > 100:
        raise DifaError(f"a front takes at most 100 budgets, got {len(values)}")
    return sorted({budget(b) for b in values})


def names(name: str, value: Any, example: str) -> list[str]:
    """A list of names; one name alone is a list of one (`candidates=reuse` means [reuse], never 'r','e',...)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
        return list(value)
    raise DifaError(f"{name} must be a list of names, got {_show(value)}; e.g. {example}")


def candidates(value: Any) -> list[str]:
    """Known technique names, `full` and repeats dropped."""
    from difa.techniques import REGISTRY
    from difa.techniques.protocol import FULL

    value = names("candidates", value, "candidates=[reuse,forecast]")
    bad = [c for c in value if c not in REGISTRY]
    if bad:
        raise DifaError(f"unknown candidate method(s) {', '.join(map(repr, bad))}; choose from {', '.join(sorted(REGISTRY))}")
    return [c for c in dict.fromkeys(value) if c != FULL]


def window(value: Any) -> float | int:
    from difa.attention import window_tokens

    try:
        window_tokens(value, 1 << 20)
    except ValueError as e:
        raise DifaError(str(e)) from None
    return value


def calibration(*, threshold: Any, steps: Any, guidance_scale: Any, seed: Any = 0, candidates: Any, window: Any,
                loss_on: Any = "guided", search: Any = "trajectory", budget: Any = None, budgets: Any = None,
                latency_batch: Any = None, max_cache_mb: Any = None, techniques: Any = None) -> dict[str, Any]:
    """Every calibration argument that needs no model, checked as calibrate_pipeline and the calibrate CLI take
    them (the CLI calls this before it loads the model); returns them normalized (candidates checked, budgets
    sorted). The inputs need the model's class count: `inputs`."""
    from difa import checks as c  # (the parameters shadow this module's function names)
    from difa.techniques import REGISTRY, check_params

    if loss_on not in LOSS_ON:
        raise DifaError(f"unknown loss_on {loss_on!r}; use one of {', '.join(LOSS_ON)}")
    if search not in SEARCHES:
        raise DifaError(f"unknown search {search!r}; use one of {', '.join(SEARCHES)}")
    out = dict(threshold=c.threshold(threshold), budget=c.budget(budget),
               budgets=None if budgets is None else c.budgets(budgets),
               steps=count("steps", steps, MAX_STEPS, example="steps=20"),
               guidance_scale=number("guidance_scale", guidance_scale, example="guidance_scale=4.0"),
               seed=c.seed(seed), window=c.window(window), loss_on=loss_on, search=search,
               latency_batch=None if latency_batch is None else count("latency_batch", latency_batch, MAX_BATCH,
                                                                      example="latency_batch=25"),
               max_cache_mb=None if max_cache_mb is None else number("max_cache_mb", max_cache_mb, 0,
                                                                     example="max_cache_mb=512"),
               candidates=c.candidates(candidates))
    if techniques is not None:
        if not isinstance(techniques, Mapping) or not all(isinstance(v, Mapping) for v in techniques.values()):
            raise DifaError("techniques must map technique names to parameter tables, e.g. {'tome': {'ratio': 0.5}}")
        check_params(techniques)
    if search != "trajectory":
        for key, why in (("budget", "budget mode"), ("budgets", "a list of budgets"), ("max_cache_mb", "max_cache_mb")):
            if out[key] is not None:
                raise DifaError(f"{why} needs search=trajectory (the greedy plans attention cells for a threshold only)")
    cands = out["candidates"]
    if search == "trajectory" and not any(REGISTRY[c].searchable for c in cands):
        raise DifaError(f"search=trajectory plans block cells: add reuse and/or forecast to candidates (got "
                        f"{', '.join(cands) or 'none'}), or use search=greedy for attention-only candidates")
    if search == "greedy" and not any(not REGISTRY[c].is_block for c in cands):
        raise DifaError(f"search=greedy plans attention cells, and candidates {cands} has none (the plan would be all "
                        "full); add some, e.g. candidates=[ast,wars,asc], or use search=trajectory for block cells")
    return out


def inputs(pipe: Any, items: Sequence) -> list:
    """Calibration or generation inputs for `pipe`: class ids in the label embedding's range (its null class
    excluded) for a class-conditional model, non-empty prompts for a text model; never a mix. (Image-conditioned
    video models take their inputs as the adapter reads them.)"""
    from difa.adapters import adapter_for

    items = input_list(items)
    adapter = adapter_for(pipe)
    if adapter.inputs_kind == "classes":
        n = getattr(adapter.denoiser(pipe).config, "num_embeds_ada_norm", None)
        bad = [x for x in items if isinstance(x, bool) or not isinstance(x, int) or (n is not None and not 0 <= x < n)]
        if bad:
            raise DifaError(f"class ids must be integers in [0, {n}) for this model, got "
                            f"{', '.join(repr(x)[:40] for x in list(dict.fromkeys(bad))[:3])}; e.g. inputs=[0,1,2]")
    elif adapter.inputs_kind == "prompts":
        bad = [x for x in items if not isinstance(x, str) or not x.strip()]
        if bad:
            raise DifaError(f"this is a text model: inputs must be non-empty prompts, got "
                            f"{', '.join(repr(x)[:40] for x in list(dict.fromkeys(bad))[:3])}; e.g. inputs=['a red bird']")
    return items


def input_list(items: Any) -> list:
    """A non-empty list (or tuple) of at most MAX_INPUTS class ids or prompts, of one type: the model-free part of
    `inputs`."""
    if not isinstance(items, (list, tuple)) or not items:
        raise DifaError(f"inputs must be a non-empty list of class ids or prompts, got {_show(items)}; e.g. inputs=[0,1,2]")
    count("the number of inputs", len(items), MAX_INPUTS)
    kinds = {"prompt" if isinstance(x, str) else "class id" for x in items}
    if len(kinds) > 1:
        raise DifaError("inputs mix class ids and prompts; give one kind, e.g. inputs=[0,1,2] or inputs=['a red bird']")
    return list(items)


MAX_PROMPTS_BYTES = 16 * 2**20


def prompts_file(path: Any) -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped): a regular file (a FIFO is never read), at
    most 16 MB, UTF-8, at least one prompt."""
    import os
    import stat
    from pathlib import Path

    p = Path(str(path))
    try:
        mode = p.stat().st_mode
    except OSError:
        raise DifaError(f"prompts file {str(p)!r} does not exist; pass prompts=<a text file, one prompt per line>") from None
    if not stat.S_ISREG(mode):
        raise DifaError(f"prompts={str(p)!r} is not a regular file (a folder, pipe or device); pass a text file, one "
                        "prompt per line")
    if os.path.getsize(p) > MAX_PROMPTS_BYTES:
        raise DifaError(f"prompts file {str(p)!r} is over {MAX_PROMPTS_BYTES // 2**20} MB; pass at most "
                        f"{MAX_INPUTS} prompts, one per line")
    try:
        lines = [x.strip() for x in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise DifaError(f"prompts file {str(p)!r} is not UTF-8 text; pass a text file, one prompt per line") from None
    prompts = [x for x in lines if x]
    if not prompts:
        raise DifaError(f"prompts file {str(p)!r} has no prompts; write one prompt per line")
    return input_list(prompts)
