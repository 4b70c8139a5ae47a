"""The engine: executes a method table on a stock diffusers model. It knows nothing about what a method does: it
reads each cell's technique description (difa.techniques.protocol) and the slot rules (difa.cells).

It installs one processor per planned attention layer (the original processor is kept for `full` cells
and for undo), one forward pre-hook on the denoiser that advances the single step counter, and, on a
pipeline, a wrapper around `scheduler.set_timesteps`, which every diffusers pipeline calls once at the
start of a generation: that call resets the caches and checks the step count. On a bare model the
counter wraps after `steps` forwards (a new generation), and `Engine.reset()` restarts it by hand.
Layers whose methods hold a block-input slot (ToMe's similarity metric) get a pre-hook on their block that
hands it over.

Block cells: a block whose plan row is not all `full` has its calls routed through the engine (difa/wrap.py: a
class swap, undone exactly; `forward` is left to others, e.g. accelerate's offload hooks, and to torch.compile);
the block technique decides whether to call the stock block. A slot filled from a block's submodule ("submodule:ff")
and a technique that `replaces` a submodule get that submodule's calls routed too. Attention
cells of a skipped block never run, so their caches are derived from the cells that do run (`cells.executed_cells`).
A `half_batch` cell (a CFG cell) also gets the stock block called on the conditional rows of every batched
argument (`_half_call`); its attention layers then run on half the batch (validation keeps them `full`). The
block calls live in difa/engine_blocks.py.

CFG collapse (difa/collapse.py): when every cross-attention layer of a CFG step runs a technique that
`collapses_cfg`, the engine runs the denoiser on one half and duplicates its output, where that is exact.
Applying and removing plans: difa/apply.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from difa import collapse, parallel
from difa.calls import PlanProcessor, compact, plan_processor, shape
from difa.adapters import CROSS_ATTN, JOINT, TEMPORAL, Adapter
from difa.attention.merge import token_grid
from difa.cells import block_executed, executed_cells, kept_slots, writes
from difa.engine_blocks import BlockCalls
from difa.errors import DifaError
from difa.techniques import REGISTRY, joint, kind_of, slots, unfit
from difa.techniques.base import Cell, LayerShape, LayerState
from difa.techniques.blocks import BlockCell, BlockState
from difa.techniques.protocol import BLOCK, FULL, LAYER
from difa.wrap import Router

ENGINE_ATTR = "_difa_engine"  # the handle on the denoiser, so that remove_plan(pipe) can find it
SUBMODULE = "submodule:"  # a slot source: the block's submodule of that name

@dataclass(frozen=True)
class StepContext:
    """What a search's step hook sees of the forward in progress (never the engine itself)."""

    step: int
    cond: slice | None  # the conditional CFG half of the batch; None when the call is not a CFG batch
    shapes: Mapping[int, LayerShape]  # layer -> the shapes it saw at its first call


# on_step(context, trial) -> the step's column of methods (one per layer), or None to keep the plan's. `trial(column)`
# runs this step's forward with `column` proposed and returns the denoiser output; the caches are restored after
# each trial, and the engine (not the search) writes the returned column into its own table.
StepHook = Callable[[StepContext, Callable[[Sequence[str]], torch.Tensor]], Sequence[str] | None]


def _slot_sources(level: str, source: str) -> list[str]:
    return [n for n, s in slots().items() if s.level == level and s.source == source]


class Engine(BlockCalls):
    def __init__(
        self,
        model: torch.nn.Module,
        adapter: Adapter,
        layers: Sequence[tuple[str, torch.nn.Module]],
        methods: Sequence[Sequence[str]],  # (n_layers, steps); while calibrating, on_step decides each step's column
        params: Mapping[str, Mapping[str, Any]],
        *,
        scheduler: Any = None,
        calibrating: bool = False,
        keep_steps: Sequence[int] | None = None,  # while calibrating: the steps whose caches are kept (None: all)
        on_step: StepHook | None = None,
        inference_steps: int | None = None,
        collapse_cfg: bool = True,
        metric_layers: Sequence[int] | None = None,
        blocks: Sequence[tuple[str, torch.nn.Module]] = (),
        block_methods: Sequence[Sequence[str]] = (),  # (n_blocks, steps); () = every block computed
        on_block: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    ):
        self.model, self.adapter, self.layers = model, adapter, list(layers)
        self.methods, self.params = methods, params
        self.steps = len(methods[0]) if methods else (len(block_methods[0]) if block_methods else 0)  # calls per generation
        # on_block(block, step, input, output) observes every block call (calibration records the trajectory)
        self.on_block = on_block
        # blocks with at least one cell that is not plain `full` (the others are left untouched)
        self.blocks = [(j, n, m) for j, ((n, m), row) in enumerate(zip(blocks, block_methods))
                       if set(row) != {FULL} or on_block is not None]
        self.block_methods = block_methods
        self.block_names = [n for n, _ in blocks]
        self.blocks_by_index = [m for _, m in blocks]
        self.block_states = [BlockState(points=residual_points(row)) for row in
                             (block_methods if len(block_methods) == len(blocks) else [()] * len(blocks))]
        block_ran = block_executed([n for n, _ in blocks], block_methods, self.steps)
        # slot -> [block][step]: the cell computes the slot and a later cell of the block reads it
        self.block_keep = kept_slots(block_methods, params, block_ran, BLOCK)
        self.executed = executed = executed_cells([n for n, _ in layers], [n for n, _ in blocks], block_methods,
                                                  self.steps)
        self.inference_steps = inference_steps or self.steps  # num_inference_steps, for messages
        self.scheduler, self.calibrating, self.on_step = scheduler, calibrating, on_step
        self.owner: Any = None  # the pipeline whose `scheduler` is wrapped (apply_plan sets it)
        self.states = [LayerState() for _ in self.layers]
        self.peak_cache_bytes = 0  # most bytes held across steps so far (cache_bytes), over all generations
        self.shapes: dict[int, LayerShape] = {}
        if calibrating:  # future decisions are unknown: keep every slot that a later cell could read
            at = [keep_steps is None or t in keep_steps for t in range(self.steps)]
            self.keep = {name: [[a and any(name in REGISTRY[r].reads and not unfit(r, n, adapter) for r in REGISTRY)
                                 for a in at] for n, _ in self.layers]
                         for name, s in slots().items() if s.level == LAYER and not s.per_forward}
        else:
            self.keep = kept_slots(methods, params, executed, LAYER)
        # per call, precomputed (the per-cell Python work is on every denoiser call's critical path):
        self.slot_table = slots()
        self.made = {m: writes(m, params) for m in REGISTRY}  # method -> the slots it computes
        self.cell_keep = [[frozenset(s for s, table in self.keep.items() if table[i][t]) for t in range(self.steps)]
                          for i in range(len(self.layers))]  # [layer][step] -> slots a writer there keeps
        self.block_cell_keep = [[frozenset(s for s, table in self.block_keep.items() if table[j][t])
                                 for t in range(self.steps)] for j in range(len(block_methods))]
        self.derived = {n: [d for d, x in self.slot_table.items() if x.derived_from == n] for n in self.slot_table}
        self.from_sub: dict[str, list[str]] = {}  # submodule name -> the slots filled from its output
        for n, x in self.slot_table.items():
            if x.source.startswith(SUBMODULE):
                self.from_sub.setdefault(x.source[len(SUBMODULE):], []).append(n)
        self.joint_layers = {i for i, (n, _) in enumerate(self.layers) if kind_of(n, adapter) == JOINT}
        self.outputs = _slot_sources(LAYER, "output")  # slots holding a cell's own output
        self.cfg_steps = [any(REGISTRY[row[t]].shares_cfg for row in (*methods, *block_methods)) for t in range(self.steps)]
        self.gate_steps = [any(REGISTRY[row[t]].collapses_cfg for row in methods) for t in range(self.steps)]
        self.cross = [i for i, (n, _) in enumerate(self.layers) if kind_of(n, adapter) == CROSS_ATTN]
        self.temporal = {i for i, (n, _) in enumerate(self.layers) if adapter.axis(n) == TEMPORAL}  # tokens = frames
        self.collapse_cfg = collapse_cfg and bool(self.cross)
        self.inputs = set(_slot_sources(LAYER, "block_input"))  # slots the engine fills with the block's input
        if metric_layers is None:  # layers whose plan uses a method that holds the block input
            metric_layers = [i for i, row in enumerate(methods) if any(self.inputs & set(REGISTRY[m].holds) for m in row)]
        self.metric_layers = list(metric_layers)
        self.patch = adapter.patch_size(model)
        self.latent_hw: tuple[int, int] | None = None
        self.text_tokens: int | None = None  # text tokens of the forward in progress
        self.collapsed = False  # the forward in progress runs on one CFG half
        self.step: int | None = None  # step of the forward in progress
        self.cond: slice | None = None  # conditional half of the current batch, None if not a CFG batch
        self.forwards = 0
        self._next = 0
        self._inside = False
        self._handles: list[Any] = []
        self._router = Router()  # the blocks' (and submodules') calls routed through _run_block / _run_sub
        self._installed = False
        self._block_cells: dict[int, BlockCell] = {}  # block index -> its cell in the forward in progress
        # (block, its computation, its caches before it) while on_block observes it (Engine.rerun)
        self._computing: tuple[int, Callable, list | None] | None = None
        self.block_layers = [[i for i, (n, _) in enumerate(self.layers) if n.startswith(b + ".")] for b in self.block_names]
        self._shape_hooks: dict[int, Any] = {}  # layer -> the pre-hook recording its shapes (layers left stock)
        self._shape_layer: dict[int, int] = {}  # id(attention module) -> its layer index, for that hook
        self._configs = {name: t.cfg(params) for name, t in REGISTRY.items() if t.is_block}

    # -- lifecycle -------------------------------------------------------------------------
    def _submodules(self, j: int) -> list[str]:
        """Names of block j's submodules whose forward the engine wraps: a slot filled from one that a later cell
        reads, or one a technique of the row replaces."""
        row = self.block_methods[j]
        subs = [sub for sub, names in self.from_sub.items() if any(any(self.block_keep[n][j]) for n in names
                                                                    if n in self.block_keep)]
        subs += [REGISTRY[m].replaces for m in row if REGISTRY[m].replaces]
        return list(dict.fromkeys(subs))

    def _needs_processor(self, i: int) -> bool:
        """Layer i's processor must be the engine's: a cell other than `full`, a slot kept, or a search deciding
        its cells as it goes. Elsewhere the stock processor stays, and costs nothing extra (profile: README)."""
        return (self.on_step is not None or self.calibrating or any(m != FULL for m in self.methods[i])
                or any(self.cell_keep[i]))

    def _record_shape(self, module, args, kwargs) -> None:
        """A stock layer's shapes at its first call inside a denoiser forward (the cost model's input); then the
        hook removes itself. Inside a compiled block it does nothing (a traced read of the step counter would
        recompile every step, and removing a hook while tracing breaks the graph): shapes are for calibration and
        evaluation, which run eagerly. Trap: one hook for every layer, not one partial per layer index - dynamo
        guards on a partial's arguments, so each block would get its own graph and the blocks would exhaust
        torch's recompile limit (8 per function), after which they silently run eagerly."""
        if torch.compiler.is_compiling() or self.step is None:
            return None
        i = self._shape_layer.get(id(module))
        if i is None or i in self.shapes:
            return None
        x = args[0] if args else kwargs.get("hidden_states")
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        if torch.is_tensor(x):
            self.shapes[i] = self._layer_shape(i, module, x, context, module.processor)
            self._shape_hooks.pop(i).remove()
        return None

    def _layer_shape(self, i: int, attn, x: torch.Tensor, context: Any, processor: Any) -> LayerShape:
        joint_layer = i in self.joint_layers
        text_tokens = self.text_tokens if joint_layer and joint.text_in_sequence(processor) else None
        return shape(attn, x, context, self._grid(i, x, context), joint=joint_layer, text_tokens=text_tokens)

    def install(self) -> "Engine":
        if self._installed:
            return self
        self._check_parallel()  # before any change: a refused plan leaves the model as it was
        self._check_submodules()
        old = getattr(self.model, ENGINE_ATTR, None)
        if old is not None:
            old.remove()
        for i, (_, attn) in enumerate(self.layers):
            if self._needs_processor(i):
                attn.set_processor(plan_processor(self, i, attn.processor))
            else:  # the stock processor runs every cell: only its shapes are recorded, at its first call
                self._shape_layer[id(attn)] = i
                self._shape_hooks[i] = attn.register_forward_pre_hook(self._record_shape, with_kwargs=True)
        self._handles.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        if self.collapse_cfg:
            self._handles.append(self.model.register_forward_hook(functools.partial(collapse.post_forward, self)))
        # every block of a plan with block cells is routed, the unplanned ones passing straight through: under
        # regional torch.compile a block graph guards on its module's class, and two classes would need twice the graphs
        for j, block in enumerate(self.blocks_by_index if self.blocks else ()):
            self._router.route(block, functools.partial(self._run_block, j))
        for j, _, block in self.blocks:
            for sub in self._submodules(j):
                self._router.route(getattr(block, sub), functools.partial(self._run_sub, j, sub))
        for i in self.metric_layers:
            block = self.model.get_submodule(self.layers[i][0].rsplit(".", 1)[0])
            self._handles.append(block.register_forward_pre_hook(functools.partial(self._block_input, i), with_kwargs=True))
        if self.scheduler is not None:
            self._wrap_scheduler()
        setattr(self.model, ENGINE_ATTR, self)
        self._installed = True
        return self

    def _check_submodules(self) -> None:
        for j, name, block in self.blocks:
            for sub in self._submodules(j):
                if not isinstance(getattr(block, sub, None), torch.nn.Module):
                    users = sorted({m for m in self.block_methods[j] if REGISTRY[m].replaces == sub} or {FULL})
                    raise DifaError(f"block {name} has no submodule {sub!r}, so {', '.join(map(repr, users))} cannot "
                                    f"run there; use {FULL!r}")

    def _check_parallel(self) -> None:
        why = parallel.conflict(self.model, [(n, row) for (n, _), row in zip(self.layers, self.methods)],
                                [(n, m, self.block_methods[j]) for j, n, m in self.blocks], FULL)
        if why is not None:
            raise DifaError(why)

    def remove(self) -> None:
        """Undo install(): original processors back, hooks and the scheduler wrapper gone."""
        if not self._installed:
            return
        for _, attn in self.layers:
            if isinstance(attn.processor, PlanProcessor) and attn.processor.engine is self:
                attn.set_processor(attn.processor.original)
        self._router.unroute()
        for h in [*self._handles, *self._shape_hooks.values()]:
            h.remove()
        self._handles.clear()
        self._shape_hooks.clear()
        self._shape_layer.clear()
        if self.scheduler is not None and "set_timesteps" in vars(self.scheduler):
            del self.scheduler.set_timesteps
        if getattr(self.model, ENGINE_ATTR, None) is self:
            delattr(self.model, ENGINE_ATTR)
        self._installed = False
        self.reset()

    def cache_bytes(self) -> int:
        """Bytes of the tensors the engine holds across steps now (each storage counted once), over every slot of
        every layer and block."""
        seen: dict[int, int] = {}

        def add(x: Any) -> None:
            if torch.is_tensor(x):
                seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            elif isinstance(x, (tuple, list)):
                for y in x:
                    add(y)

        for s in (*self.states, *self.block_states):
            add(list(s.slots.values()))
        return sum(seen.values())

    def reset(self) -> None:
        """Start a new generation: step counter to 0, every cache emptied."""
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())
        self._next = 0
        self.step = None
        self.collapsed = False
        for s in (*self.states, *self.block_states):
            s.reset()
        self._block_cells.clear()

    def __enter__(self) -> "Engine":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _wrap_scheduler(self) -> None:
        original = self.scheduler.set_timesteps

        @functools.wraps(original)
        def set_timesteps(*args, **kwargs):
            out = original(*args, **kwargs)
            n = len(self.scheduler.timesteps)
            if n != self.steps:
                asked = getattr(self.scheduler, "num_inference_steps", n)
                raise DifaError(
                    f"the plan was made for num_inference_steps={self.inference_steps} ({self.steps} denoiser calls) "
                    f"but the pipeline runs {asked} ({n} calls); pass num_inference_steps={self.inference_steps} "
                    f"or recalibrate with steps={asked}"
                )
            self.reset()
            return out

        self.scheduler.set_timesteps = set_timesteps

    # -- per forward -----------------------------------------------------------------------
    @torch.compiler.disable  # a compiled denoiser calls it eagerly (the step counter must not be guarded on)
    def _pre_forward(self, module, args, kwargs):
        if self._inside:
            return None
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())  # what the last step left held
        if self.owner is not None and getattr(self.owner, "scheduler", None) is not self.scheduler:
            # the step-count check and the per-generation reset live on the scheduler the plan was applied with
            raise DifaError("pipe.scheduler was replaced after apply_plan, so the plan can no longer check the step "
                            "count or reset its caches; call apply_plan(pipe, plan) again after changing the scheduler")
        if self._next >= self.steps:
            self.reset()
        if self._next == 0:  # a new generation: parallelism may have been enabled since install
            self._check_parallel()
        self.step, self._next = self._next, self._next + 1
        self.cond = None
        self.collapsed = False
        latents = self.adapter.latent_input(args, kwargs)  # (B, C, H, W)
        text = kwargs.get("encoder_hidden_states")  # (B, T, C): joint layers' text length
        self.text_tokens = int(text.shape[1]) if torch.is_tensor(text) and text.ndim == 3 else None
        self.latent_hw = (int(latents.shape[-2]), int(latents.shape[-1]))
        b = latents.shape[0]
        if self.cfg_steps[self.step] or self.gate_steps[self.step] or self.calibrating or self.on_step is not None \
                or collapse.gates(self, self.step):  # halves matter
            self.cond = self.adapter.cond_slice(b) if self.adapter.is_cfg_batch(args, kwargs) else None
        if self.cond is None and self.cfg_steps[self.step]:
            raise DifaError(
                f"step {self.step} of the plan shares work across the CFG halves but this call runs without "
                "classifier-free guidance; use guidance_scale > 1 or a plan calibrated with CFG off"
            )
        if self.on_step is not None:
            self._decide(module, args, kwargs)
        self.forwards += 1
        if collapse.can_collapse(self, self.step, b, kwargs):
            self.collapsed = True
            keep = self.adapter.kept_half(b)  # the half T-GATE's own pipeline runs after the gate
            self.cond = None
            return collapse.take_half(args, b, keep), collapse.take_half(kwargs, b, keep)
        return None

    def _decide(self, module, args, kwargs) -> None:
        """Calibration's step hook: trial forwards of this step, caches restored after each; the hook's column
        becomes this step's."""
        snapshot = [s.snapshot() for s in (*self.states, *self.block_states)]

        def restore() -> None:
            for s, snap in zip((*self.states, *self.block_states), snapshot):
                s.restore(snap)

        def trial(column: Sequence[str]) -> torch.Tensor:
            restore()
            for row, m in zip(self.methods, column):
                row[self.step] = m
            self.forwards += 1
            out = module(*args, **kwargs)
            return out.sample if hasattr(out, "sample") else out[0]

        before = [row[self.step] for row in self.methods]
        self._inside = True
        try:
            decided = self.on_step(StepContext(self.step, self.cond, self.shapes), trial)
        finally:
            self._inside = False
            restore()
        for row, m in zip(self.methods, before if decided is None else decided):
            row[self.step] = m

    def _block_input(self, layer: int, module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        for slot in self.inputs:
            self.states[layer].slots[slot] = x if torch.is_tensor(x) and x.ndim == 3 else None
        return None

    def _fit_slots(self, state: Any, b: int) -> None:
        """Caches made on the whole CFG batch used on one half (collapse), or the other way round (the slots that
        `fit_batch`: their halves were checked equal, or only the kept half is read)."""
        if not self.collapse_cfg:  # the batch changes within a generation only where CFG collapses
            return
        table = self.slot_table
        for name, value in list(state.slots.items()):
            if value is not None and table[name].fit_batch:
                state.slots[name] = collapse.fit(self, value, b)


    def _cond_rows(self, rows: int) -> slice | None:
        """The conditional half of an attention call's batch. Video layers fold frames or positions into the batch
        (B*F, B*h*w rows), each CFG half's rows contiguous, so the half is taken of the rows, not of the latent batch."""
        return None if self.cond is None else self.adapter.cond_slice(rows)

    def _grid(self, layer: int, x: torch.Tensor, context: torch.Tensor | None) -> tuple[int, int, int] | None:
        """(h, w, downsample) of a self-attention call's tokens; None for cross-attention, temporal layers (their
        tokens are frames) or outside a forward."""
        if self.latent_hw is None or context is not None or layer in self.temporal:
            return None
        return token_grid(self.latent_hw, x.shape[-2], self.patch)

    def run_cell(self, layer: int, original: Callable, attn, hidden_states, encoder_hidden_states, attention_mask, kwargs,
                 args: tuple = ()):
        """One planned attention call. `args`: positional arguments after the mask (FLUX's image_rotary_emb); the
        original processor gets (attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)."""
        step = self.step
        if step is None:  # called outside a denoiser forward (e.g. the module used alone)
            return original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        joint_layer = layer in self.joint_layers
        text_tokens = self.text_tokens if joint_layer and joint.text_in_sequence(original) else None
        if layer not in self.shapes:
            self.shapes[layer] = self._layer_shape(layer, attn, hidden_states, encoder_hidden_states, original)
        method = self.methods[layer][step]
        if self.collapsed and REGISTRY[method].on_one_half:  # one half only: sharing across halves is plain attention
            method = REGISTRY[method].on_one_half
        technique = REGISTRY[method]
        # (calibrating, every cell may keep a slot: only the methods that write it compute it)
        keep = self.cell_keep[layer][step] & self.made[method]
        if method == FULL and not keep:
            return original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        state = self.states[layer]
        if technique.reads and not technique.averages_halves:  # (a CFG mean is cut to the halves by its technique)
            self._fit_slots(state, hidden_states.shape[0])
        # (the token grid, for the techniques that hold the block input: token merging)
        grid = self._grid(layer, hidden_states, encoder_hidden_states) if self.inputs & set(technique.holds) else None
        cell = Cell(attn, self.layers[layer][0], layer, step, state, self.params, original,
                    self._cond_rows(hidden_states.shape[0]), keep, grid, self.collapsed, joint_layer, text_tokens)
        out = technique.execute(cell, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        for slot in self.outputs:
            if slot in keep:
                state.slots[slot] = compact(out)
                for name in self.derived[slot]:  # memos of the old value are stale now
                    state.slots.pop(name, None)
        return out


def residual_points(row: Sequence[str]) -> int:
    """How many past values a block row's readers need at most (2 when unknown, e.g. while calibrating)."""
    readers = [REGISTRY[m].points for m in row if REGISTRY[m].reads]
    return max(readers) if readers else 2

