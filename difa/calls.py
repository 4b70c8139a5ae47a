"""What one planned call looks like to the engine: the attention processor that hands it over, an attention call's
shapes (the cost model's input), a joint layer's output made compact for caching, and a two-stream block seen as
one tensor."""

from __future__ import annotations

from typing import Any, Callable

import torch

from difa.errors import DifaError
from difa.techniques.base import LayerShape
from difa.techniques.protocol import FULL


def shape(attn, x: torch.Tensor, context: torch.Tensor | None, grid: tuple[int, int, int] | None,
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


def compact(out: Any) -> Any:
    """A joint layer's output tuple to cache, each part owning its memory: SD3's last joint layer returns its text
    part as a slice of the whole (B, N + T, C) attention output, which would otherwise stay held with it."""
    if not isinstance(out, tuple):
        return out
    return tuple(x.clone() if torch.is_tensor(x) and x.untyped_storage().nbytes() > x.numel() * x.element_size()
                 else x for x in out)


def join_streams(x: torch.Tensor, e: Any, compute: Callable, streams: str, text_dropped: bool):
    """A two-stream block as one tensor: (x joined with its text e along the tokens (B, N + T, C), a compute that
    returns the output joined the same way, and split(joined) -> the block's own output tuple). streams: the tuple's
    order (TEXT_FIRST or HIDDEN_FIRST); `text_dropped`: the block returns None for the text (SD3's last block), whose
    slot is then filled with the input text (residual 0) and emptied again by split."""
    from difa.adapters import TEXT_FIRST

    if not torch.is_tensor(e) or e.shape[0] != x.shape[0] or e.shape[-1] != x.shape[-1]:
        raise DifaError(f"a two-stream block got hidden_states {tuple(x.shape)} and encoder_hidden_states "
                        f"{None if not torch.is_tensor(e) else tuple(e.shape)}; block methods need both, with the same "
                        f"batch and channels; use {FULL!r} for the blocks")
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


class PlanProcessor:
    """Attention processor for one planned layer; forwards every call to the engine.

    Its call signature, as `inspect.signature` reports it, is the original processor's (see `plan_processor`):
    diffusers filters the attention kwargs against it (`Attention.forward`, `FluxAttention.forward`), so a kwarg such
    as CogVideoX's `image_rotary_emb` must not be dropped, and FLUX's processor is called positionally
    (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb) with no **kwargs."""

    def __init__(self, engine: Any, layer: int, original: Callable):
        self.engine = engine
        self.layer = layer
        self.original = original

    @torch.compiler.disable  # the cell's dispatch reads the step counter: traced, it would recompile every step
    def __call__(self, attn, hidden_states, *args, **kwargs):
        args = list(args)
        ehs = args.pop(0) if args else kwargs.pop("encoder_hidden_states", None)
        mask = args.pop(0) if args else kwargs.pop("attention_mask", None)
        return self.engine.run_cell(self.layer, self.original, attn, hidden_states, ehs, mask, kwargs, tuple(args))


def plan_processor(engine: Any, layer: int, original: Callable) -> PlanProcessor:
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
