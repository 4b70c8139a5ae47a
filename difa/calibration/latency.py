"""The measured latency cost model: seconds, not FLOPs, on the target device, dtype and shapes.

At calibration start the denoiser, each transformer block, each block's feed-forward module and each attention
layer under each candidate method are timed on the real inputs of one denoiser call (a short microbenchmark).
A plan's seconds per generation are then predicted as

    fixed + sum over steps of [ step - sum over blocks of (block - cost of the block's cell)
                                     + sum over blocks caching a residual at that step of (the subtraction)
                                     + sum over running attention cells of (method - full) ]

where `fixed` is what the pipeline spends outside the denoiser (scheduler, VAE, text encoder), measured on the
calibration run. Results are cached under runs/cache/latency/, keyed by device, dtype, threads, versions,
model config and input shapes (the remainder outside the denoiser included: the first measurement stands).
FLOPs (difa/cost.py) stay for reporting.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from difa.adapters import NO_CFG, TEMPORAL
from difa.cells import executed_cells, keeps, writes
from difa.collapse import other_half, take_half
from difa.files import check_side_file
from difa.plan import config_hash
from difa.techniques import REGISTRY, kind_of, slots, unfit
from difa.techniques.base import Cell, LayerState
from difa.techniques.blocks import RESIDUAL
from difa.techniques.joint import text_in_sequence
from difa.techniques.protocol import FULL, LAYER, BlockTimes

CACHE_DIR = Path("runs/cache/latency")
REPS = 5  # timed repetitions per unit (after one warm-up); the median is kept


@dataclass(frozen=True)
class LatencyModel:
    step_s: float  # one all-full denoiser call
    fixed_s: float  # the rest of a generation: scheduler, VAE decode, text encoder
    block_s: tuple[float, ...]  # per block: the whole block, computed
    ff_s: tuple[float, ...]  # per block: its feed-forward module (what `mlp_reuse` saves)
    skip_s: tuple[float, ...]  # per block: a skipped block's stand-in (the dearest registered estimator, plus the add)
    keep_s: tuple[float, ...] = ()  # per block: caching the residual slot (output - input) at a computed step
    # per block: the block on one CFG half with the other half's stand-in (a `half_batch` cell); () not timed
    half_s: tuple[float, ...] = ()
    attn_s: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # layer -> method -> one call
    forwards: int = 0  # denoiser forwards this measurement cost (0 when read from the cache)
    images: int = 0  # images per pipeline call it was timed at (0: not recorded, a cache written before)
    # attention method -> per block, the layers an attention cell of that method runs on (set by the trajectory
    # search: calibration/attention_cells.py; not cached)
    cell_layers: Mapping[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)

    def block_cost(self, j: int, method: str) -> float:
        """One cell of block j, from the measured parts its technique declares (Technique.block_cost); an attention
        method: the block computed, its cell layers on that method (an attention cell)."""
        if not REGISTRY[method].is_block:
            return self.block_s[j] + sum(self.attn_delta(n, method) for n in self.cell_layers[method][j])
        return REGISTRY[method].block_cost(BlockTimes(self.block_s[j], self.ff_s[j], self.skip_s[j],
                                                      self.half_s[j] if self.half_s else 0.0))

    def row_seconds(self, j: int, row: Sequence[str]) -> float:
        """Block j's seconds over a generation with cells `row`: its cells, plus the residuals it caches."""
        kept = sum(keeps(row, RESIDUAL, {})) if self.keep_s else 0
        return sum(self.block_cost(j, m) for m in row) + kept * (self.keep_s[j] if self.keep_s else 0.0)

    def attn_delta(self, layer: str, method: str) -> float:
        t = self.attn_s.get(layer, {})
        if method == FULL or method not in t or FULL not in t:
            return 0.0
        return t[method] - t[FULL]

    def predict(self, layers: Sequence[str], methods: Sequence[Sequence[str]], block_methods: Sequence[Sequence[str]],
                steps: int, collapsed: Sequence[bool] = ()) -> dict[str, float]:
        """Predicted seconds per generation for a plan's cells, and the fraction of the all-full plan.
        `collapsed` (per step, `cost.collapsed_steps`): steps the engine runs on one CFG half (every cross-attention
        T-GATE'd) are charged half their time: time follows the batch at the sizes where T-GATE matters
        (benchmarks/bench_scale.py, PixArt at 1024 tokens: FLOPs 0.618, measured 0.615)."""
        ran = executed_cells(layers, self.block_names, block_methods, steps) if block_methods else None
        kept = [keeps(row, RESIDUAL, {}) for row in block_methods]  # what the engine caches (a subtraction)
        total = self.fixed_s
        for t in range(steps):
            s = self.step_s
            for j, row in enumerate(block_methods):
                s -= self.block_s[j] - self.block_cost(j, row[t])
                if self.keep_s and kept[j][t]:
                    s += self.keep_s[j]
            for i, (name, row) in enumerate(zip(layers, methods)):
                if ran is None or ran[i][t]:
                    s += self.attn_delta(name, row[t])
            total += s / 2 if t < len(collapsed) and collapsed[t] else s
        full = self.fixed_s + steps * self.step_s
        return {"seconds": total, "full_seconds": full, "fraction": total / full if full else 1.0}

    block_names: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def median_time(fn: Callable[[], Any], reps: int | None = None) -> float:
    reps = REPS if reps is None else reps  # read at call time: benchmarks/bench_scale.py lowers it at 16k tokens
    with torch.no_grad():
        fn()  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _interleaved_times(fns: Sequence[Callable[[], Any]], reps: int | None = None) -> list[float]:
    """The median time of each function, timed round-robin: one call of each per round, `reps` rounds after one
    warm-up round. A noisy stretch of the machine then slows every unit of the rounds it hits alike, so the ratios
    the latency model is built from (a block to the whole step, a stand-in to a block) hold, where timing each
    unit's repetitions back to back let a noisy minute inflate some units and not others."""
    reps = REPS if reps is None else reps
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for fn in fns:
            fn()  # warm-up
        for _ in range(reps):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _clone(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


class Capture:
    """Records the inputs of one denoiser call (the `at`-th) and of every block and attention layer in it, with
    forward pre-hooks that `close()` removes. The microbenchmark replays them."""

    def __init__(self, model: torch.nn.Module, adapter: Any, blocks: Sequence[tuple[str, torch.nn.Module]],
                 layers: Sequence[tuple[str, torch.nn.Module]], at: int = 1):
        self.calls, self.at = -1, at
        self.adapter, self.patch = adapter, adapter.patch_size(model)
        self.block_of = {n: j for j, (n, _) in enumerate(blocks)}  # block name -> index
        self.model_in: tuple | None = None
        self.block_in: dict[int, tuple] = {}
        self.ff_in: dict[int, tuple] = {}
        self.attn_in: dict[int, tuple] = {}
        self.handles = [model.register_forward_pre_hook(self._model, with_kwargs=True)]
        for j, (_, b) in enumerate(blocks):
            self.handles.append(b.register_forward_pre_hook(self._store(self.block_in, j), with_kwargs=True))
            if isinstance(getattr(b, "ff", None), torch.nn.Module):
                self.handles.append(b.ff.register_forward_pre_hook(self._store(self.ff_in, j), with_kwargs=True))
        for i, (_, a) in enumerate(layers):
            self.handles.append(a.register_forward_pre_hook(self._store(self.attn_in, i), with_kwargs=True))

    def _model(self, module, args, kwargs):
        self.calls += 1
        if self.calls == self.at:
            self.model_in = _clone((args, kwargs))

    def _store(self, into: dict, key: int):
        def hook(module, args, kwargs):
            if self.calls >= self.at and key not in into:  # (>=: the greedy's trial forwards nest inside a call)
                into[key] = _clone((args, kwargs))
        return hook

    def grid(self, x: torch.Tensor, context: torch.Tensor | None, layer: str = ""):
        """(h, w, downsample) of a self-attention input's tokens, as the engine computes it (None: temporal layer)."""
        from difa.attention.merge import token_grid

        if context is not None or self.model_in is None or self.adapter.axis(layer) == TEMPORAL:
            return None
        latents = self.adapter.latent_input(*self.model_in)  # (B, C, H, W)
        return token_grid((int(latents.shape[-2]), int(latents.shape[-1])), x.shape[-2], self.patch)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def cache_key(model: torch.nn.Module, capture: Capture, params: Mapping, candidates: Sequence[str], dtype: str) -> str:
    import diffusers

    import difa

    def shapes(obj):
        if torch.is_tensor(obj):
            return list(obj.shape)
        if isinstance(obj, dict):
            return {k: shapes(v) for k, v in sorted(obj.items())}
        if isinstance(obj, (list, tuple)):
            return [shapes(v) for v in obj]
        return repr(obj) if isinstance(obj, (int, float, str, bool, type(None))) else type(obj).__name__

    device = next(model.parameters()).device
    blob = json.dumps({
        "device": str(device), "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else os.uname().machine,
        "dtype": dtype, "threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "difa": difa.__version__, "model": type(model).__name__, "config": config_hash(model.config),
        "inputs": shapes(capture.model_in), "params": params, "candidates": sorted(candidates), "model_version": 6,
        # a skip is charged the dearest registered stand-in (measure): a model timed before one was added is stale
        "stand_ins": sorted(t.name for t in REGISTRY.values() if t.searchable and not t.half_batch),
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def measure(model: torch.nn.Module, adapter: Any, blocks: Sequence[tuple[str, torch.nn.Module]],
            layers: Sequence[tuple[str, torch.nn.Module]], capture: Capture, params: Mapping[str, Mapping],
            candidates: Sequence[str], fixed_s: float, *, dtype: str = "float32",
            cache_dir: Path | None = CACHE_DIR, images: int = 0) -> LatencyModel:
    """Time the denoiser, its blocks, feed-forwards and attention candidates on the captured inputs, and each block
    on one CFG half where a CFG cell (`half_batch`) is among the candidates."""
    key = cache_key(model, capture, params, candidates, dtype)
    path = cache_dir / f"{key}.json" if cache_dir is not None else None
    if path is not None:
        check_side_file(path, "the latency cache")  # a planted link or FIFO: refused, never read or followed
    if path is not None and path.is_file():
        try:
            d = json.loads(path.read_text())
            return LatencyModel(**{**d, "forwards": 0,
                                   **{k: tuple(d.get(k, ())) for k in ("block_s", "ff_s", "skip_s", "keep_s", "half_s",
                                                                           "block_names")}})
        except (ValueError, TypeError, KeyError):
            pass  # a stale or broken cache file: measure again
    args, kwargs = capture.model_in
    units: list[Callable[[], Any]] = [lambda: model(*args, **kwargs)]  # the whole step, then per block (below)
    stand_ins = [t for t in REGISTRY.values() if t.searchable and not t.half_batch]
    # CFG cells among the candidates: one unit per block, the block on one half with the dearest of their stand-ins
    # (the half block dominates; their stand-ins differ by a pass over half the batch)
    halves = sorted((REGISTRY[c] for c in candidates if c in REGISTRY and REGISTRY[c].half_batch),
                    key=lambda t: -t.points)[:1]
    rows = int(adapter.latent_input(*capture.model_in).shape[0])
    # (not timed on two-stream blocks, whose calls return a tuple: there a half cell is charged the whole block)
    # (nor on video blocks that fold frames or positions into their batch: the search proposes no CFG cell there)
    cond = adapter.cond_slice(rows) if halves and rows % 2 == 0 and adapter.cfg_layout != NO_CFG \
        and adapter.block_streams is None and adapter.temporal is None else None
    for j, (_, block) in enumerate(blocks):
        b_args, b_kwargs = capture.block_in[j]
        units.append(lambda block=block, a=b_args, k=b_kwargs: block(*a, **k))
        f_args, f_kwargs = capture.ff_in.get(j, ((), {}))
        units.append((lambda block=block, a=f_args, k=f_kwargs: block.ff(*a, **k)) if j in capture.ff_in else None)
        x = b_args[0] if b_args else b_kwargs["hidden_states"]
        r0, r1 = torch.randn_like(x), torch.randn_like(x)
        units += [lambda x=x, r0=r0, r1=r1, t=t: x + t.estimate([(0, r0), (1, r1)][-t.points:], 2, t.cfg(params))
                  for t in stand_ins]
        units.append(lambda x=x, r1=r1: r1 - x)  # the residual a computed step caches for a later skip
        whole = cond is not None and x.shape[0] == rows
        units += [_half_unit(block, b_args, b_kwargs, x, r0, r1, cond, t, params) if whole else None for t in halves]
    timed = iter(_interleaved_times([u for u in units if u is not None]))
    seconds = [next(timed) if u is not None else 0.0 for u in units]
    step_s, per_block = seconds[0], 3 + len(stand_ins) + len(halves)  # block, ff, each stand-in, keep, the half
    block_s, ff_s, skip_s, keep_s, half_s = [], [], [], [], []
    for j in range(len(blocks)):
        row = seconds[1 + j * per_block: 1 + (j + 1) * per_block]
        block_s.append(row[0])
        ff_s.append(row[1])
        skip_s.append(max(row[2:2 + len(stand_ins)] or [0.0]))  # the dearest stand-in
        keep_s.append(row[2 + len(stand_ins)])
        half_s.append(max(row[3 + len(stand_ins):] or [0.0]))  # the half cell (0: none proposed, or no CFG batch)
    inside = sum(block_s)
    if inside > step_s:  # blocks timed alone add up to more than the denoiser (noise, warm caches): rescale them
        block_s, ff_s = [t * step_s / inside for t in block_s], [t * step_s / inside for t in ff_s]
        half_s = [t * step_s / inside for t in half_s]
    attn_s = {}
    attention = [c for c in candidates if c in REGISTRY and not REGISTRY[c].is_block]
    timed: dict[tuple, dict[str, float]] = {}  # layers alike (kind, axis, input and weight shapes) time alike
    for i, (name, attn) in enumerate(layers):
        if i in capture.attn_in:
            key = _signature(attn, name, capture.attn_in[i], adapter)
            if key not in timed:
                timed[key] = time_attention(attn, name, i, capture.attn_in[i], attention, params, adapter, capture)
            attn_s[name] = dict(timed[key])
    model_ = LatencyModel(step_s, fixed_s, tuple(block_s), tuple(ff_s), tuple(skip_s), tuple(keep_s),
                          tuple(half_s) if any(half_s) else (), attn_s,
                          forwards=REPS + 1, images=images, block_names=tuple(n for n, _ in blocks))
    if path is not None:
        _write_atomic(path, json.dumps({k: v for k, v in model_.to_dict().items()
                                        if k not in ("forwards", "cell_layers")}))
    return model_


def _half_unit(block, args, kwargs, x, r0, r1, cond: slice, t, params) -> Callable[[], Any]:
    """A `half_batch` cell's work (blocks.half_stand_in): the block on the conditional rows, the other rows'
    stand-in from the cached residual's halves, both written into one output."""
    b = x.shape[0]
    other = other_half(cond, b)
    h_args, h_kwargs = take_half(args, b, cond), take_half(kwargs, b, cond)

    def unit():
        done = block(*h_args, **h_kwargs)  # (B/2, N, C)
        past = [(0, (r0[cond], r0[other])), (1, (r1[cond], r1[other]))][-t.points:]
        guess = t.estimate([*past, (2, (done - x[cond], None))], 2, t.cfg(params))
        out = torch.empty_like(x)
        out[cond] = done
        torch.add(x[other], guess, out=out[other])
        return out
    return unit


def _signature(attn: torch.nn.Module, name: str, inputs: tuple, adapter: Any) -> tuple:
    """What an attention call's time depends on: the layer's kind and token axis, its processor's type, its
    heads, the shapes of its weights and of its inputs. (Timing each of a DiT's identical layers on every method took
    minutes at 4096 tokens; their timings differ by noise only.)"""
    def shapes(obj: Any) -> Any:
        if torch.is_tensor(obj):
            return tuple(obj.shape), str(obj.dtype)
        if isinstance(obj, dict):
            return tuple(sorted((k, shapes(v)) for k, v in obj.items()))
        if isinstance(obj, (list, tuple)):
            return tuple(shapes(v) for v in obj)
        return type(obj).__name__
    weights = tuple((n, tuple(p.shape)) for n, p in attn.named_parameters())
    return (kind_of(name, adapter), adapter.axis(name), type(attn.processor).__name__, getattr(attn, "heads", None),
            weights, shapes(inputs))


def time_attention(attn, name: str, i: int, inputs: tuple, methods: Sequence[str], params: Mapping, adapter: Any,
                   capture: Capture) -> dict[str, float]:
    """One attention call per method on the captured input; the slots a method reads are filled by a `full` call."""
    args, kwargs = inputs
    x = args[0] if args else kwargs["hidden_states"]  # (B, N, C)
    context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    mask = kwargs.get("attention_mask")
    original = attn.processor
    b = x.shape[0]
    cond = adapter.cond_slice(b) if b % 2 == 0 and adapter.cfg_layout != NO_CFG else None
    state = LayerState()
    block_in = capture.block_in.get(capture.block_of.get(name.rsplit(".", 1)[0], -1))
    if block_in is not None:  # the slots the engine fills with the block's input (ToMe's metric)
        for slot in (n for n, s in slots().items() if s.level == LAYER and s.source == "block_input"):
            state.slots[slot] = block_in[0][0] if block_in[0] else block_in[1].get("hidden_states")
    out: dict[str, float] = {}
    joint = kind_of(name, adapter) == "joint"
    text = capture.model_in[1].get("encoder_hidden_states") if capture.model_in is not None else None
    text_tokens = int(text.shape[1]) if torch.is_tensor(text) and text.ndim == 3 else None
    if not (joint and text_in_sequence(original)):  # the text is not inside this layer's sequence (SD3.5's attn2)
        text_tokens = None
    with torch.no_grad():
        full = REGISTRY[FULL]
        # what the methods read that `full` computes inside attention (the window residual), where they can run
        keep = frozenset(slot for m in methods if not unfit(m, name, adapter) for slot in REGISTRY[m].reads
                         if slot in writes(FULL, params) and slots()[slot].source == "technique") if mask is None else frozenset()
        outputs = [n for n, s in slots().items() if s.level == LAYER and s.source == "output"]
        try:
            o = full.execute(Cell(attn, name, i, 1, state, params, original, cond, keep, joint=joint,
                                  text_tokens=text_tokens), x, context, mask)
        except Exception:
            o = full.execute(Cell(attn, name, i, 1, state, params, original, cond, frozenset(), joint=joint,
                                  text_tokens=text_tokens), x, context, mask)
        state.slots.update({slot: o for slot in outputs})
    for m in [FULL, *methods]:
        if unfit(m, name, adapter):
            continue
        cell = Cell(attn, name, i, 1, state, params, original, cond, frozenset(), capture.grid(x, context, name), False, joint,
                    text_tokens)
        try:
            out[m] = median_time(lambda: REGISTRY[m].execute(cell, x, context, mask))
        except Exception:  # a method that cannot run on this layer (masked attention, no grid): never chosen
            continue
    return out


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
