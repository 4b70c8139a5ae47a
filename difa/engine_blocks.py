"""Block calls, the part of the engine that runs block cells: a routed call of a planned block (difa/wrap.py) or
of its routed submodule goes to `_run_block` / `_run_sub`, which hand the block technique a `BlockCell` and the
stock call; a CFG cell also gets the stock block run on the conditional rows (`_half_call`). `rerun` serves the
calibration's block hook. A mixin of `difa.engine.Engine`, whose attributes (step, cond, block methods and states,
adapter) it reads: the split keeps each file about one thing, not two objects to keep in step."""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from difa import collapse
from difa.calls import join_streams
from difa.techniques import REGISTRY
from difa.techniques.blocks import BlockCell
from difa.techniques.protocol import FULL


class BlockCalls:
    def _run_block(self, j: int, original: Callable, *args, **kwargs):
        """A call of block j, routed here (difa/wrap.py; `original` is the stock call): its plan cell decides whether
        and how the block runs. A two-stream block
        (Adapter.block_streams) is seen by the block techniques as one tensor: hidden_states and encoder_hidden_states
        joined along the tokens (input and output alike), so a residual or a forecast covers both streams."""
        step = self.step
        x = args[0] if args else kwargs.get("hidden_states")
        if step is None or not torch.is_tensor(x):  # outside a denoiser forward
            return original(*args, **kwargs)
        if self.on_block is None and self.block_methods[j][step] == FULL and not self.block_cell_keep[j][step]:
            return original(*args, **kwargs)  # a computed cell that caches nothing: the block as it is
        compute = lambda: original(*args, **kwargs)  # noqa: E731
        streams = self.adapter.block_streams
        if streams is not None:
            e = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            x, compute, split = join_streams(x, e, compute, streams, getattr(self.blocks_by_index[j], "context_pre_only", False))
        st = self.block_states[j]
        self._fit_slots(st, x.shape[0])
        method = self.block_methods[j][step]
        keep = self.block_cell_keep[j][step]
        cell = BlockCell(self.block_names[j], j, step, st, keep, self._configs.get(method), self.params)
        if REGISTRY[method].half_batch and self.cond is not None and not self.collapsed and x.shape[0] % 2 == 0:
            cell.half, cell.compute_half = self._half_call(j, original, args, kwargs, x.shape[0])
        self._block_cells[j] = cell
        # (a calibration that reruns the block with other attention cells needs the caches as they were before it)
        before = self._states_of(j) if self.calibrating and self.on_block is not None and not self._inside else None
        out = REGISTRY[method].run(cell, x, compute)
        if self.on_block is not None and not self._inside:
            self._computing = (j, compute, before)
            try:
                self.on_block(j, step, x, out)
            finally:
                self._computing = None
        return out if streams is None else split(out)

    def rerun(self, layer_methods: Mapping[int, str]) -> torch.Tensor:
        """Inside `on_block`: the observed block's output again, with attention layers `layer_methods` (layer index
        -> method) running those methods at this step on the caches the generation holds; every cache, and the
        plan, restored after. (Calibration scores attention cells by it: the block's output error, exact for a plan
        whose only change at this step is these cells.) Joined as the block's input is (two-stream blocks)."""
        if self._computing is None or self._computing[2] is None:
            raise RuntimeError("Engine.rerun is called from on_block of a calibrating engine only")
        j, compute, before = self._computing
        after = self._states_of(j)
        methods = {i: self.methods[i][self.step] for i in layer_methods}
        for i, m in layer_methods.items():
            self.methods[i][self.step] = m
        self._restore(j, before)  # the caches this step's cells read: those of the steps before it
        self._inside = True
        try:
            return compute()
        finally:
            self._inside = False
            for i, m in methods.items():
                self.methods[i][self.step] = m
            self._restore(j, after)

    def _states_of(self, j: int) -> list[dict]:
        """Snapshots of block j's own state and of its attention layers' states."""
        return [s.snapshot() for s in (self.block_states[j], *(self.states[i] for i in self.block_layers[j]))]

    def _restore(self, j: int, snaps: list[dict]) -> None:
        for s, snap in zip((self.block_states[j], *(self.states[i] for i in self.block_layers[j])), snaps):
            s.restore(snap)

    def _half_call(self, j: int, original: Callable, args: tuple, kwargs: dict, b: int):
        """(computed rows, other rows) of a CFG batch of b, and the block run on its conditional rows: every batched
        argument (hidden states, text, timestep embedding, class labels, masks) cut to them (collapse.take_half)."""
        cond = self.adapter.cond_slice(b)
        other = collapse.other_half(cond, b)
        h_args, h_kwargs = collapse.take_half(args, b, cond), collapse.take_half(kwargs, b, cond)
        compute = lambda: original(*h_args, **h_kwargs)  # noqa: E731
        streams = self.adapter.block_streams
        if streams is not None:  # a two-stream block: the halves of both streams, joined as in _run_block
            x = h_args[0] if h_args else h_kwargs.get("hidden_states")
            e = h_args[1] if len(h_args) > 1 else h_kwargs.get("encoder_hidden_states")
            _, compute, _ = join_streams(x, e, compute, streams, getattr(self.blocks_by_index[j], "context_pre_only", False))
        return (cond, other), compute

    def _run_sub(self, j: int, sub: str, original: Callable, x, *args, **kwargs):
        """A routed call of block j's submodule `sub` (the feed-forward: x (B, N, C), its normed input): the
        cell's technique replaces it, or its output is cached where a later cell reads it."""
        cell = self._block_cells.get(j)
        if self.step is None or cell is None or cell.step != self.step:
            return original(x, *args, **kwargs)
        technique = REGISTRY[self.block_methods[j][self.step]]
        if technique.replaces == sub:
            return technique.replace(cell, x)
        out = original(x, *args, **kwargs)  # (B, N, C)
        for slot in self.from_sub.get(sub, ()):
            if slot in cell.keep:
                cell.state.slots[slot] = out
        return out
