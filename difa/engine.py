"""The engine: executes a method table on a stock diffusers model. It knows nothing about what a method does.

It installs one processor per planned attention layer (the original processor is kept for `full` cells
and for undo), one forward pre-hook on the denoiser that advances the single step counter, and, on a
pipeline, a wrapper around `scheduler.set_timesteps`, which every diffusers pipeline calls once at the
start of a generation: that call resets the caches and checks the step count. On a bare model the
counter wraps after `steps` forwards (a new generation), and `Engine.reset()` restarts it by hand.
Layers whose methods need the transformer block's input (ToMe's similarity metric) get a pre-hook on
their block that hands it over.

Block cells: a block whose plan row is not all `full` gets its `forward` wrapped (an instance attribute, removed
on undo); the block technique decides whether to call the original forward. `mlp_reuse` cells also wrap the
block's feed-forward module. Attention cells of a skipped block never run, so their caches are derived from
the cells that do run (`plan.executed_cells`).

CFG collapse: when every cross-attention layer of a CFG step is `tgate`, the two halves of the batch
see identical inputs everywhere, so the engine runs the denoiser on one half and duplicates its output.
It does so only when that is exact: a self-attention cell that reuses a cache (`ast`, `wars`) must find
the cache's two halves equal; otherwise the step runs on the whole batch. Trap: on SD-XL the halves also differ in
the pooled text embedding (added_cond_kwargs, into every resnet's temb), so there the collapse is T-GATE's own
choice of half (Adapter.collapse_to: the unconditional one), not a lossless rewrite of the whole-batch step.
A step where no cross-attention runs (a DeepCache step on SD-XL) collapses as the last step where some did.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import torch

from difa.adapters import CROSS_ATTN, JOINT, TEMPORAL, TEXT_FIRST, Adapter, adapter_for
from difa.attention.merge import token_grid
from difa.errors import DifaError
from difa.plan import (AST, CFG_METHODS, FULL, OUTPUT_READERS, TGATE, WARS, Plan, block_executed, block_keeps,
                       config_hash, executed_cells, output_steps, residual_producers, residual_steps)
from difa.techniques import REGISTRY, joint, kind_of, unfit
from difa.techniques.base import Cell, LayerShape, LayerState
from difa.techniques.blocks import BlockCell, BlockState, first_tensor

ENGINE_ATTR = "_difa_engine"  # the handle on the denoiser, so that remove_plan(pipe) can find it

# on_step(engine, trial) -> the step's column of methods (one per layer), or None to keep the plan's. `trial(column)`
# runs this step's forward with `column` proposed and returns the denoiser output; the caches are restored after
# each trial, and the engine (not the search) writes the returned column into its own table.
StepHook = Callable[["Engine", Callable[[Sequence[str]], torch.Tensor]], Sequence[str] | None]


class PlanProcessor:
    """Attention processor for one planned layer; forwards every call to the engine.

    Its call signature, as `inspect.signature` reports it, is the original processor's (see `plan_processor`):
    diffusers filters the attention kwargs against it (`Attention.forward`, `FluxAttention.forward`), so a kwarg such
    as CogVideoX's `image_rotary_emb` must not be dropped, and FLUX's processor is called positionally
    (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb) with no **kwargs."""

    def __init__(self, engine: "Engine", layer: int, original: Callable):
        self.engine = engine
        self.layer = layer
        self.original = original

    def __call__(self, attn, hidden_states, *args, **kwargs):
        args = list(args)
        ehs = args.pop(0) if args else kwargs.pop("encoder_hidden_states", None)
        mask = args.pop(0) if args else kwargs.pop("attention_mask", None)
        return self.engine.run_cell(self.layer, self.original, attn, hidden_states, ehs, mask, kwargs, tuple(args))


def plan_processor(engine: "Engine", layer: int, original: Callable) -> PlanProcessor:
    """A PlanProcessor whose `__call__` reports the original processor's signature (a subclass per layer)."""
    import inspect

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return PlanProcessor.__call__(self, attn, hidden_states, *args, **kwargs)

    try:
        sig = inspect.signature(original.__call__)
        __call__.__signature__ = sig.replace(parameters=[
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *sig.parameters.values()])
    except (TypeError, ValueError):
        pass
    cls = type(PlanProcessor.__name__, (PlanProcessor,), {"__call__": __call__})
    return cls(engine, layer, original)


class Engine:
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
        # blocks with at least one cell that is not plain `full` (the others are left untouched)
        # on_block(block, step, input, output) observes every block call (calibration records the trajectory)
        self.on_block = on_block
        self.blocks = [(j, n, m) for j, ((n, m), row) in enumerate(zip(blocks, block_methods))
                       if set(row) != {FULL} or on_block is not None]
        self.block_methods = block_methods
        self.block_names = [n for n, _ in blocks]
        self.blocks_by_index = [m for _, m in blocks]
        self.block_states = [BlockState(points=residual_points(row)) for row in
                             (block_methods if len(block_methods) == len(blocks) else [()] * len(blocks))]
        block_ran = block_executed([n for n, _ in blocks], block_methods, self.steps)
        self.keep_block_residual = [block_keeps(row, "residual", r) for row, r in zip(block_methods, block_ran)]
        self.keep_ff = [block_keeps(row, "ff", r) for row, r in zip(block_methods, block_ran)]
        self.keep_block_output = [block_keeps(row, "output", r) for row, r in zip(block_methods, block_ran)]
        self.executed = executed = executed_cells([n for n, _ in layers], [n for n, _ in blocks], block_methods,
                                                  self.steps)
        self.inference_steps = inference_steps or self.steps  # num_inference_steps, for messages
        self.scheduler, self.calibrating, self.on_step = scheduler, calibrating, on_step
        self.owner: Any = None  # the pipeline whose `scheduler` is wrapped (apply_plan sets it)
        self.states = [LayerState() for _ in self.layers]
        self.peak_cache_bytes = 0  # most bytes held across steps so far (cache_bytes), over all generations
        self.shapes: dict[int, LayerShape] = {}
        self.producers = producers = residual_producers(params)
        if calibrating:  # future decisions are unknown: keep every cache that a later cell could read
            self.keep_residual = [[m in producers and not unfit(WARS, n, adapter) for m in row]
                                  for (n, _), row in zip(self.layers, methods)]
            self.keep_output = [[True] * self.steps for _ in methods]
        else:
            self.keep_residual = residual_steps(methods, executed, producers)
            self.keep_output = output_steps(methods, executed)
        self.cfg_steps = [any(row[t] in CFG_METHODS for row in methods) for t in range(self.steps)]
        self.tgate_steps = [any(row[t] == TGATE for row in methods) for t in range(self.steps)]
        self.cross = [i for i, (n, _) in enumerate(self.layers) if kind_of(n, adapter) == CROSS_ATTN]
        self.temporal = {i for i, (n, _) in enumerate(self.layers) if adapter.axis(n) == TEMPORAL}  # tokens = frames
        self.collapse_cfg = collapse_cfg and bool(self.cross)
        if metric_layers is None:  # layers whose plan uses a method that reads the block input
            metric_layers = [i for i, row in enumerate(methods) if any(REGISTRY[m].NEEDS_METRIC for m in row)]
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
        self._installed = False
        self._block_cells: dict[int, BlockCell] = {}  # block index -> its cell in the forward in progress

    # -- lifecycle -------------------------------------------------------------------------
    def install(self) -> "Engine":
        if self._installed:
            return self
        old = getattr(self.model, ENGINE_ATTR, None)
        if old is not None:
            old.remove()
        for i, (_, attn) in enumerate(self.layers):
            attn.set_processor(plan_processor(self, i, attn.processor))
        self._handles.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        if self.collapse_cfg:
            self._handles.append(self.model.register_forward_hook(self._post_forward))
        for j, name, block in self.blocks:
            ff = getattr(block, "ff", None)
            if any(REGISTRY[m].NEEDS == "ff" for m in self.block_methods[j]) and not isinstance(ff, torch.nn.Module):
                raise DifaError(f"block {name} has no feed-forward module 'ff', so 'mlp_reuse' cannot run there; use 'full'")
            block.forward = functools.partial(self._run_block, j, block.forward)
            if isinstance(ff, torch.nn.Module) and any(self.keep_ff[j]):
                ff.forward = functools.partial(self._run_ff, j, ff.forward)
        for i in self.metric_layers:
            block = self.model.get_submodule(self.layers[i][0].rsplit(".", 1)[0])
            self._handles.append(block.register_forward_pre_hook(functools.partial(self._block_input, i), with_kwargs=True))
        if self.scheduler is not None:
            self._wrap_scheduler()
        setattr(self.model, ENGINE_ATTR, self)
        self._installed = True
        return self

    def remove(self) -> None:
        """Undo install(): original processors back, hooks and the scheduler wrapper gone."""
        if not self._installed:
            return
        for _, attn in self.layers:
            if isinstance(attn.processor, PlanProcessor) and attn.processor.engine is self:
                attn.set_processor(attn.processor.original)
        for _, _, block in self.blocks:
            for module in (block, getattr(block, "ff", None)):
                if isinstance(module, torch.nn.Module) and _ours(vars(module).get("forward"), self):
                    del module.forward
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.scheduler is not None and "set_timesteps" in vars(self.scheduler):
            del self.scheduler.set_timesteps
        if getattr(self.model, ENGINE_ATTR, None) is self:
            delattr(self.model, ENGINE_ATTR)
        self._installed = False
        self.reset()

    def cache_bytes(self) -> int:
        """Bytes of the tensors the engine holds across steps now (each storage counted once): attention outputs,
        window residuals, gated outputs, ToMe metrics, block residuals, feed-forward and block outputs."""
        seen: dict[int, int] = {}

        def add(x: Any) -> None:
            if torch.is_tensor(x):
                seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            elif isinstance(x, (tuple, list)):
                for y in x:
                    add(y)

        for s in self.states:
            add((s.out, s.residual, s.gated, s.metric))
        for b in self.block_states:
            add(([r for _, r in b.residuals], b.ff, b.output))
        return sum(seen.values())

    def reset(self) -> None:
        """Start a new generation: step counter to 0, every cache emptied."""
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())
        self._next = 0
        self.step = None
        self.collapsed = False
        for s in self.states:
            s.reset()
        for b in self.block_states:
            b.reset()
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
        self.step, self._next = self._next, self._next + 1
        self.cond = None
        self.collapsed = False
        latents = self.adapter.latent_input(args, kwargs)  # (B, C, H, W)
        text = kwargs.get("encoder_hidden_states")  # (B, T, C): joint layers' text length
        self.text_tokens = int(text.shape[1]) if torch.is_tensor(text) and text.ndim == 3 else None
        self.latent_hw = (int(latents.shape[-2]), int(latents.shape[-1]))
        b = latents.shape[0]
        if self.cfg_steps[self.step] or self.tgate_steps[self.step] or self.on_step is not None \
                or self._gates(self.step):  # halves matter
            self.cond = self.adapter.cond_slice(b) if self.adapter.is_cfg_batch(args, kwargs) else None
        if self.cond is None and self.cfg_steps[self.step]:
            raise DifaError(
                f"step {self.step} of the plan shares attention across CFG halves but this call runs without "
                "classifier-free guidance; use guidance_scale > 1 or a plan calibrated with CFG off"
            )
        if self.on_step is not None:
            snapshot = [s.snapshot() for s in self.states]
            block_snapshot = [(list(b.residuals), b.ff) for b in self.block_states]

            def restore() -> None:
                for s, snap in zip(self.states, snapshot):
                    s.restore(snap)
                for b, (res, ff) in zip(self.block_states, block_snapshot):
                    b.residuals, b.ff = list(res), ff

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
                decided = self.on_step(self, trial)
            finally:
                self._inside = False
                restore()
            for row, m in zip(self.methods, before if decided is None else decided):
                row[self.step] = m
        self.forwards += 1
        if self._can_collapse(self.step, b):
            self.collapsed = True
            keep = self.adapter.kept_half(b)  # the half T-GATE's own pipeline runs after the gate
            self.cond = None
            return _take_half(args, b, keep), _take_half(kwargs, b, keep)
        return None

    def _gates(self, step: int) -> bool:
        """Every cross-attention layer that runs at `step` is gated (moot cells inside a skipped block do not count).
        A step where no cross-attention runs at all keeps the answer of the last step where some did: on SD-XL with
        DeepCache branch 0 the shallow branch (conv_in, the last UpBlock2D's last resnet, conv_out) has no attention,
        so a cached step after the gate has no `tgate` cell, yet T-GATE dropped CFG for good at the gate and the deep
        branch's cached outputs have that step's one-half batch (tgate's TgateSDXLDeepCacheLoader runs one half)."""
        if not self.collapse_cfg or step >= self.steps:
            return False
        for s in range(step, -1, -1):
            ran = [i for i in self.cross if self.executed[i][s]]
            if ran:
                return all(self.methods[i][s] == TGATE for i in ran)
        return False

    def _can_collapse(self, step: int, b: int) -> bool:
        if self.cond is None or not self._gates(step):
            return False
        for i, row in enumerate(self.methods):  # exact only if every cache read at this step has equal halves
            cache = first_tensor({AST: self.states[i].out, WARS: self.states[i].residual}.get(row[step]))
            if cache is not None and cache.shape[0] == b and not torch.equal(cache[: b // 2], cache[b // 2:]):
                return False
        for j, _, _ in self.blocks:
            st, needs = self.block_states[j], REGISTRY[self.block_methods[j][step]].NEEDS
            caches = {"residual": [r for _, r in st.residuals], "ff": [st.ff],
                      "output": [first_tensor(st.output)]}.get(needs, [])
            if any(c is not None and c.shape[0] == b and not torch.equal(c[: b // 2], c[b // 2:]) for c in caches):
                return False
        return True

    def _post_forward(self, module, args, output):
        if not self.collapsed or self._inside:
            return None
        self.collapsed = False
        if isinstance(output, tuple):
            return (torch.cat([output[0], output[0]]), *output[1:])
        output.sample = torch.cat([output.sample, output.sample])
        return output

    def _block_input(self, layer: int, module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        self.states[layer].metric = x if torch.is_tensor(x) and x.ndim == 3 else None
        return None

    def _fit_caches(self, state: LayerState, b: int) -> None:
        """Caches made on the whole CFG batch used on one half (collapse), or the other way round."""
        for field in ("out", "residual"):  # (halves checked equal, or only the kept half is read)
            setattr(state, field, self._fit(getattr(state, field), b))

    def _fit(self, c: Any, b: int) -> Any:
        """A cache (a tensor, or a joint layer's tuple of them) cut to one CFG half or doubled to fit batch b."""
        if isinstance(c, (tuple, list)):
            return type(c)(self._fit(x, b) for x in c)
        if c is None or c.shape[0] == b:
            return c
        if c.shape[0] == 2 * b and self.collapsed:
            return c[self.adapter.kept_half(2 * b)]
        if 2 * c.shape[0] == b:
            return torch.cat([c, c])
        return c

    def _run_block(self, j: int, original: Callable, *args, **kwargs):
        """The wrapped forward of block j: its plan cell decides whether and how the block runs. A two-stream block
        (Adapter.block_streams) is seen by the block techniques as one tensor: hidden_states and encoder_hidden_states
        joined along the tokens (input and output alike), so a residual or a forecast covers both streams."""
        step = self.step
        x = args[0] if args else kwargs.get("hidden_states")
        if step is None or not torch.is_tensor(x):  # outside a denoiser forward
            return original(*args, **kwargs)
        compute = lambda: original(*args, **kwargs)  # noqa: E731
        streams = self.adapter.block_streams
        if streams is not None:
            e = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            x, compute, split = _join_streams(x, e, compute, streams, getattr(self.blocks_by_index[j], "context_pre_only", False))
        st = self.block_states[j]
        st.residuals = [(s, self._fit(r, x.shape[0])) for s, r in st.residuals]
        st.ff = self._fit(st.ff, x.shape[0])
        cell = BlockCell(self.block_names[j], j, step, st, self.keep_block_residual[j][step], self.keep_ff[j][step],
                         self.keep_block_output[j][step])
        self._block_cells[j] = cell
        out = REGISTRY[self.block_methods[j][step]].run(cell, x, compute)
        if self.on_block is not None and not self._inside:
            self.on_block(j, step, x, out)
        return out if streams is None else split(out)

    def _run_ff(self, j: int, original: Callable, x, *args, **kwargs):
        """The wrapped forward of block j's feed-forward module (x: (B, N, C), its normed input)."""
        cell = self._block_cells.get(j)
        if self.step is None or cell is None or cell.step != self.step:
            return original(x, *args, **kwargs)
        technique = REGISTRY[self.block_methods[j][self.step]]
        if technique.NEEDS == "ff":
            return technique.ff_output(cell, x)
        out = original(x, *args, **kwargs)  # (B, N, C)
        if cell.keep_ff:
            cell.state.ff = out
        return out

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
        joint_layer = kind_of(self.layers[layer][0], self.adapter) == JOINT
        text_tokens = self.text_tokens if joint_layer and joint.text_in_sequence(original) else None
        if layer not in self.shapes:
            self.shapes[layer] = _shape(attn, hidden_states, encoder_hidden_states,
                                        self._grid(layer, hidden_states, encoder_hidden_states),
                                        joint=joint_layer, text_tokens=text_tokens)
        method = self.methods[layer][step]
        if self.collapsed and REGISTRY[method].ON_ONE_HALF:  # one half only: sharing across halves is plain attention
            method = REGISTRY[method].ON_ONE_HALF
        # (calibrating, every cell may keep R: only the methods of the residual rule compute it)
        keep_residual = self.keep_residual[layer][step] and method in self.producers
        if method == FULL and not keep_residual and not self.keep_output[layer][step]:
            return original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        state = self.states[layer]
        if REGISTRY[method].READS_CACHE and method != TGATE:  # tgate averages the halves itself
            self._fit_caches(state, hidden_states.shape[0])
        grid = self._grid(layer, hidden_states, encoder_hidden_states) if REGISTRY[method].NEEDS_METRIC else None
        cell = Cell(attn, self.layers[layer][0], layer, step, state, self.params, original,
                    self._cond_rows(hidden_states.shape[0]), keep_residual, grid, self.collapsed,
                    joint_layer, text_tokens)
        out = REGISTRY[method].execute(cell, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if method not in OUTPUT_READERS and self.keep_output[layer][step]:
            state.out = _compact(out)
            state.gated = None
        return out


def _ours(forward: Any, engine: "Engine") -> bool:
    return isinstance(forward, functools.partial) and getattr(forward.func, "__self__", None) is engine


def _shape(attn, x: torch.Tensor, context: torch.Tensor | None, grid: tuple[int, int, int] | None,
           joint: bool = False, text_tokens: int | None = None) -> LayerShape:
    b, n, c = x.shape[0], x.shape[-2], x.shape[-1]  # x: (B, N, C)
    n_kv = n if context is None else context.shape[-2]
    text = 0
    if joint:  # joint attention: every query attends over image and text tokens
        text = context.shape[-2] if context is not None else (text_tokens or 0)  # FLUX single-stream: joined already
        # (text_tokens None: a joint layer without text, SD3.5's attn2)
        n = n_kv = n + (context.shape[-2] if context is not None else 0)
    return LayerShape(batch=b, n_q=n, n_kv=n_kv, dim=c, inner=attn.inner_dim, heads=attn.heads,
                      downsample=grid[2] if grid else 1, text=text)


def _compact(out: Any) -> Any:
    """A joint layer's output tuple to cache, each part owning its memory: SD3's last joint layer returns its text
    part as a slice of the whole (B, N + T, C) attention output, which would otherwise stay held with it."""
    if not isinstance(out, tuple):
        return out
    return tuple(x.clone() if torch.is_tensor(x) and x.untyped_storage().nbytes() > x.numel() * x.element_size()
                 else x for x in out)


def _join_streams(x: torch.Tensor, e: Any, compute: Callable, streams: str, text_dropped: bool):
    """A two-stream block as one tensor: (x joined with its text e along the tokens (B, N + T, C), a compute that
    returns the output joined the same way, and split(joined) -> the block's own output tuple). streams: the tuple's
    order (TEXT_FIRST or HIDDEN_FIRST); `text_dropped`: the block returns None for the text (SD3's last block), whose
    slot is then filled with the input text (residual 0) and emptied again by split."""
    if not torch.is_tensor(e) or e.shape[0] != x.shape[0] or e.shape[-1] != x.shape[-1]:
        raise DifaError(f"a two-stream block got hidden_states {tuple(x.shape)} and encoder_hidden_states "
                        f"{None if not torch.is_tensor(e) else tuple(e.shape)}; block methods need both, with the same "
                        "batch and channels; use 'full' for the blocks")
    n = x.shape[1]
    text_first = streams == TEXT_FIRST

    def joined() -> torch.Tensor:
        out = compute()
        text, hidden = (out[0], out[1]) if text_first else (out[1], out[0])
        return torch.cat([hidden, e if text is None else text], dim=1)

    def split(y: torch.Tensor) -> tuple:
        hidden, text = y[:, :n], (None if text_dropped else y[:, n:])
        return (text, hidden) if text_first else (hidden, text)

    return torch.cat([x, e], dim=1), joined, split


def _take_half(obj: Any, b: int, half: slice) -> Any:
    """Every tensor of batch size b in `obj` (args tuple, kwargs dict, nested) cut to `half`; the rest as is."""
    if torch.is_tensor(obj):
        return obj[half] if obj.ndim >= 1 and obj.shape[0] == b else obj
    if isinstance(obj, dict):
        return {k: _take_half(v, b, half) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_take_half(v, b, half) for v in obj)
    return obj


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
    adapter, model, layers = plan_layers(obj, plan.model.family)
    blocks = adapter.block_layers(model) if plan.blocks else []
    if plan.blocks and len(plan.model.blocks) > len(blocks):  # a plan with DeepCache units
        blocks = blocks + [(n, m) for n, m, _ in adapter.cache_units(model)]
    check_identity(plan, model, [n for n, _ in layers], [n for n, _ in blocks])
    if plan.cfg_layout != adapter.cfg_layout:
        raise DifaError(f"the plan assumes CFG layout {plan.cfg_layout} but {adapter.family} uses {adapter.cfg_layout}; recalibrate")
    scheduler = getattr(obj, "scheduler", None) if obj is not model else None
    engine = Engine(model, adapter, layers, plan.methods, plan.techniques, scheduler=scheduler,
                    inference_steps=plan.inference_steps, collapse_cfg=collapse_cfg, blocks=blocks,
                    block_methods=plan.blocks)
    engine.owner = obj if scheduler is not None else None  # its scheduler must stay the one wrapped
    return engine.install()


def residual_points(row: Sequence[str]) -> int:
    """How many past residuals a block row's readers need at most (2 when unknown, e.g. while calibrating)."""
    readers = [getattr(REGISTRY[m], "NEEDS_POINTS", 1) for m in row if getattr(REGISTRY[m], "NEEDS", None) == "residual"]
    return max(readers) if readers else 2


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


def remove_plan(obj: Any) -> bool:
    """Remove whatever plan is applied to `obj`; returns False if none was."""
    adapter = adapter_for(obj)
    engine = getattr(adapter.denoiser(obj), ENGINE_ATTR, None)
    if engine is None:
        return False
    engine.remove()
    return True
