"""CFG collapse: when every cross-attention layer of a CFG step runs a technique that `collapses_cfg` (T-GATE's
gate), the two halves of the batch see identical inputs everywhere, so the engine runs the denoiser on one half
and duplicates its output.

It does so only when that is exact: every slot a cell reads at that step must have equal halves (a technique that
`averages_halves` reads their mean, so its halves need not be equal); otherwise the step runs on the whole batch.
Trap: on SD-XL the halves also differ in the pooled text embedding (added_cond_kwargs, into every resnet's temb), so
there the collapse is T-GATE's own choice of half (Adapter.collapse_to: the unconditional one), not a lossless
rewrite of the whole-batch step. A step where no cross-attention runs (a DeepCache step on SD-XL) collapses as the
last step where some did.
A ControlNet (or T2I-Adapter) under CFG reads the text, so its residuals differ between the halves: where a
denoiser call carries such residuals with unequal halves, the step runs on the whole batch (`same_controls`).
"""

from __future__ import annotations

from typing import Any

import torch

from difa.techniques import REGISTRY
from difa.techniques.blocks import first_tensor


def gates(engine: Any, step: int) -> bool:
    """Every cross-attention layer that runs at `step` collapses CFG (moot cells inside a skipped block do not
    count). A step where no cross-attention runs at all keeps the answer of the last step where some did: on SD-XL
    with DeepCache branch 0 the shallow branch (conv_in, the last UpBlock2D's last resnet, conv_out) has no
    attention, so a cached step after the gate has no gated cell, yet T-GATE dropped CFG for good at the gate and the
    deep branch's cached outputs have that step's one-half batch (tgate's TgateSDXLDeepCacheLoader runs one half)."""
    if not engine.collapse_cfg or step >= engine.steps:
        return False
    for s in range(step, -1, -1):
        ran = [i for i in engine.cross if engine.executed[i][s]]
        if ran:
            return all(REGISTRY[engine.methods[i][s]].collapses_cfg for i in ran)
    return False


def _halves_differ(value: Any, b: int) -> bool:
    values = value if isinstance(value, list) else [value]  # a block residual: (step, tensor) points
    for v in values:
        c = first_tensor(v[1] if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], int) else v)
        if c is not None and c.shape[0] == b and not torch.equal(c[: b // 2], c[b // 2:]):
            return True
    return False


# the denoiser call arguments that carry a ControlNet's or an adapter's residuals (UNet2DConditionModel,
# SD3Transformer2DModel, FluxTransformer2DModel, ...): added into the hidden states, so they must match across halves
CONTROLS = ("down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals",
            "block_controlnet_hidden_states", "controlnet_block_samples", "controlnet_single_block_samples")


def same_controls(kwargs: dict, b: int) -> bool:
    """Every control residual of a denoiser call has equal CFG halves (or there is none)."""
    for name in CONTROLS:
        value = kwargs.get(name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if torch.is_tensor(v) and _halves_differ(v, b):
                return False
    return True


def can_collapse(engine: Any, step: int, b: int, kwargs: dict | None = None) -> bool:
    if engine.cond is None or not gates(engine, step):
        return False
    if kwargs is not None and not same_controls(kwargs, b):
        return False
    cells = [(engine.states[i], row[step]) for i, row in enumerate(engine.methods)]
    cells += [(engine.block_states[j], engine.block_methods[j][step]) for j, _, _ in engine.blocks]
    for state, method in cells:  # exact only if every cache read at this step has equal halves
        t = REGISTRY[method]
        if t.averages_halves:
            continue
        if any(_halves_differ(state.get(slot), b) for slot in t.reads):
            return False
    return True


@torch.compiler.disable  # (reads the step counter: see difa/wrap.py)
def post_forward(engine: Any, module, args, output):
    if not engine.collapsed or engine._inside:
        return None
    engine.collapsed = False
    if isinstance(output, tuple):
        return (torch.cat([output[0], output[0]]), *output[1:])
    output.sample = torch.cat([output.sample, output.sample])
    return output


def fit(engine: Any, c: Any, b: int) -> Any:
    """A cache (a tensor, a joint layer's tuple of them, a block's (step, tensor) points) cut to one CFG half or
    doubled to fit batch b; anything else as it is."""
    if isinstance(c, (tuple, list)):
        return type(c)(fit(engine, x, b) for x in c)
    if not torch.is_tensor(c) or c.shape[0] == b:
        return c
    if c.shape[0] == 2 * b and engine.collapsed:
        return c[engine.adapter.kept_half(2 * b)]
    if 2 * c.shape[0] == b:
        return torch.cat([c, c])
    return c


def other_half(half: slice, b: int) -> slice:
    """The rows of a batch of b that are not `half` (one of its two contiguous halves)."""
    return slice(half.stop, b) if half.start in (0, None) else slice(0, half.start)


def take_half(obj: Any, b: int, half: slice) -> Any:
    """Every tensor of batch size b in `obj` (args tuple, kwargs dict, nested) cut to `half`; the rest as is."""
    if torch.is_tensor(obj):
        return obj[half] if obj.ndim >= 1 and obj.shape[0] == b else obj
    if isinstance(obj, dict):
        return {k: take_half(v, b, half) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(take_half(v, b, half) for v in obj)
    return obj
