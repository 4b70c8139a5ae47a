"""`tome`: token merging inside self-attention (ToMe for SD, Bolya & Hoffman 2023, dbolya/tomesd).

With tomesd's default configuration (merge_attn on, cross-attention and MLP off) the whole technique lives in
self-attention: the normed tokens are merged by bipartite soft matching (similarity measured on the transformer
block's input, as tomesd does), the layer's own attention runs on the N - r merged tokens, and the output is
unmerged (each merged token takes its destination's output). Layers downsampled more than `max_downsample`
(UNet only; transformer blocks are all at downsample 1) run unchanged.

Random destinations come from a generator seeded by (seed, layer, step), so one (layer, step) always uses the
same partition for the whole batch: tomesd's rule that odd batches switch randomness off is not needed.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Mapping

import torch

from difa.attention.merge import Match, bipartite_match, max_merge, merge, partition, unmerge
from difa.errors import DifaError
from difa.techniques.base import METRIC, OUT, Cell, LayerShape, check_plain, core_flops, projection_flops
from difa.techniques.protocol import SPATIAL, Technique

NAME = "tome"


@dataclass(frozen=True)
class Config:
    ratio: float = 0.5  # fraction of tokens merged away: r = floor(N * ratio)
    sx: int = 2  # destination stride in x (one destination per sy x sx cell)
    sy: int = 2
    max_downsample: int = 1  # UNet: merge only in blocks downsampled at most this much (1, 2, 4, 8)
    use_rand: bool = True  # random destination per cell (seeded); False: the top-left token
    seed: int = 0


def config(params: Mapping[str, Mapping], name: str = NAME, cls=Config):
    """The technique's Config from the plan's `techniques` table, with one-line errors for bad values."""
    raw = dict(params.get(name, {}))
    known = {f.name for f in dataclasses.fields(cls)}
    if set(raw) - known:
        raise DifaError(f"unknown {name} parameter(s) {sorted(set(raw) - known)}; known: {', '.join(sorted(known))}")
    cfg = cls(**raw)
    if not 0 <= cfg.ratio < 1:
        raise DifaError(f"{name} ratio must be in [0, 1), got {cfg.ratio}; e.g. ratio=0.5")
    if int(cfg.sx) != cfg.sx or int(cfg.sy) != cfg.sy or cfg.sx < 1 or cfg.sy < 1 or cfg.sx * cfg.sy < 2:
        raise DifaError(f"{name} needs integer strides sx, sy >= 1 with sx*sy >= 2, got sx={cfg.sx}, sy={cfg.sy}")
    cap = 1 - 1 / (cfg.sx * cfg.sy)
    if cfg.ratio > cap:
        warnings.warn(f"{name}: ratio {cfg.ratio} exceeds the maximum {cap:.4g} = 1 - 1/(sx*sy) for sx={cfg.sx}, "
                      f"sy={cfg.sy}; at most {cap:.4g} of the tokens will be merged (raise sx/sy to merge more)",
                      stacklevel=3)
    return cfg


def check_config(params: Mapping[str, Mapping]) -> None:
    config(params)


def generator(cfg, cell: Cell) -> torch.Generator | None:
    if not cfg.use_rand:
        return None
    return torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + cell.layer * 10_007 + cell.step)


def grid(cell: Cell, n: int) -> tuple[int, int, int]:
    if cell.grid is None:
        raise DifaError(f"{cell.name}: token merging needs the token grid; run the plan through difa.apply_plan")
    h, w, ds = cell.grid
    if h * w != n:
        raise DifaError(f"{cell.name}: {n} tokens do not form the {h}x{w} grid token merging assumes; use a "
                        "resolution whose latent side divides by the model's total downsampling")
    return h, w, ds


def partition_for(cfg, cell: Cell, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(src, dst) of this cell, or None when the layer is not merged (too downsampled)."""
    h, w, ds = grid(cell, x.shape[1])
    if ds > cfg.max_downsample:
        return None
    return partition(h, w, int(cfg.sx), int(cfg.sy), generator(cfg, cell), x.device)


def metric(cell: Cell, x: torch.Tensor) -> torch.Tensor:
    m = cell.state.get(METRIC)  # the block input (tomesd measures similarity there), (B, N, C')
    return x if m is None or m.shape[:2] != x.shape[:2] else m


def matching(cfg, cell: Cell, x: torch.Tensor) -> Match | None:
    parts = partition_for(cfg, cell, x)
    if parts is None:
        return None
    src, dst = parts
    _, r = max_merge(src.numel(), x.shape[1], cfg.ratio)
    return bipartite_match(metric(cell, x), src, dst, r) if r > 0 else None


def kept_tokens(shape: LayerShape, ratio: float, sx: int, sy: int) -> tuple[int, int, int]:
    """(N - r, sources, destinations) at this layer, for the cost model."""
    n = shape.n_q
    n_dst = n // (sx * sy)
    _, r = max_merge(n - n_dst, n, ratio)
    return n - r, n - n_dst, n_dst


def matching_flops(shape: LayerShape, n_src: int, n_dst: int) -> float:
    return 2.0 * shape.batch * n_src * n_dst * shape.dim  # cosine scores (B, Ns, Nd)


def flops(shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    cfg = Config(**params.get(NAME, {}))
    if shape.downsample > cfg.max_downsample:
        return projection_flops(shape) + core_flops(shape, shape.n_q * shape.n_kv)
    kept, n_src, n_dst = kept_tokens(shape, cfg.ratio, cfg.sx, cfg.sy)
    merged = dataclasses.replace(shape, n_q=kept, n_kv=kept)
    return projection_flops(merged) + core_flops(merged, kept * kept) + matching_flops(shape, n_src, n_dst)


def execute(cell: Cell, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
    check_plain(cell, attention_mask, NAME)
    if encoder_hidden_states is not None:
        raise DifaError(f"{cell.name}: {NAME!r} applies to self-attention only; set this layer to 'full'")
    m = matching(config(cell.params), cell, hidden_states)
    if m is None:
        return cell.original(cell.attn, hidden_states, None, None, *args, **kwargs)
    out = cell.original(cell.attn, merge(hidden_states, m), None, None, *args, **kwargs)  # (B, N - r, C)
    return unmerge(out, m)  # (B, N, C)


# What every token-merging technique declares (agent attention merges as ToMe does): self-attention on the 2-D grid
# (not across frames), the block input held as the similarity metric
MERGING = dict(kinds=("attn1",), axes=(SPATIAL,), writes=(OUT,), holds=(METRIC,), candidate=True)
TECHNIQUE = Technique(
    NAME, "M", "#d62728", config=Config, execute=execute, flops=flops, check_config=check_config, **MERGING,
    not_joint="token merging works on a 2-D grid of image tokens; the joint sequence also holds text tokens",
    doc="token merging (ToMe for SD)")
